//! A keyed hasher for maps whose keys are u64 values already spread over their range
//! (statement fingerprints, connection ids), looked up on every transaction. std's SipHash
//! cost about 150 instructions per lookup there (callgrind, docs/performance.md); this is a
//! splitmix64 finalizer, a handful. The key is random per process, so a client cannot choose
//! statements whose fingerprints fall into one bucket of the query table.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A map from u64 keys, hashed with [`U64Keyed`].
pub type U64Map<V> = HashMap<u64, V, U64Keyed>;

/// The process's key, drawn once.
fn process_key() -> u64 {
    static KEY: OnceLock<u64> = OnceLock::new();
    *KEY.get_or_init(rand::random)
}

#[derive(Debug, Clone, Copy)]
pub struct U64Keyed {
    key: u64,
}

impl Default for U64Keyed {
    fn default() -> Self {
        U64Keyed { key: process_key() }
    }
}

impl BuildHasher for U64Keyed {
    type Hasher = U64Hasher;

    fn build_hasher(&self) -> U64Hasher {
        U64Hasher { h: self.key }
    }
}

pub struct U64Hasher {
    h: u64,
}

/// splitmix64's finalizer: every input bit moves about half the output bits.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Hasher for U64Hasher {
    fn write_u64(&mut self, n: u64) {
        self.h = mix(self.h ^ n);
    }

    /// Other key types are not meant for this hasher, but still hash correctly.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_neighbours_spread() {
        let mut m: U64Map<u64> = U64Map::default();
        for i in 0..10_000u64 {
            m.insert(i, i * 2);
        }
        assert!((0..10_000u64).all(|i| m[&i] == i * 2));
        // sequential ids land in different low bits (the bucket index) and top bits (tags)
        let h = |k: u64| U64Keyed::default().hash_one(k);
        let low: std::collections::HashSet<u64> = (0..256u64).map(|k| h(k) & 0xff).collect();
        let top: std::collections::HashSet<u64> = (0..256u64).map(|k| h(k) >> 57).collect();
        assert!(
            low.len() > 140 && top.len() > 100,
            "{} {}",
            low.len(),
            top.len()
        );
    }
}
