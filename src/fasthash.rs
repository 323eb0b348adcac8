//! A keyed hasher for maps looked up on every transaction: u64 keys (statement fingerprints
//! and ids, connection ids) and short byte strings (the names clients give prepared
//! statements). std's SipHash cost about 150 instructions per lookup there (callgrind,
//! docs/performance.md); this is a splitmix64 finalizer per eight bytes, a handful. The key is
//! random per process and mixed in before the first byte, so a client cannot choose
//! statements, or names, that fall into one bucket of a map.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A map from u64 keys, hashed with [`U64Keyed`].
pub type U64Map<V> = HashMap<u64, V, U64Keyed>;

/// The hasher's builder by a name that fits other keys (statement names).
pub type Keyed = U64Keyed;

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

    /// Byte strings eight bytes at a time (std's `Hash` for them writes their length first,
    /// so a shorter string's zero padding does not collide with a longer one).
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

    #[test]
    fn names_round_trip_and_spread() {
        // drivers' statement names: a common prefix and a counter, some past eight bytes
        let names: Vec<Vec<u8>> = (0..256)
            .flat_map(|i| [format!("P0_{i}"), format!("__asyncpg_stmt_{i:x}__")])
            .map(String::into_bytes)
            .collect();
        let mut m: std::collections::HashMap<Box<[u8]>, usize, Keyed> = Default::default();
        for (i, n) in names.iter().enumerate() {
            m.insert(n.as_slice().into(), i);
        }
        assert!(names.iter().enumerate().all(|(i, n)| m[n.as_slice()] == i));
        assert!(
            !m.contains_key(&b"P0_1\0"[..]),
            "a zero byte more is another name"
        );
        let h = |n: &Vec<u8>| Keyed::default().hash_one(n.as_slice());
        let low: std::collections::HashSet<u64> = names.iter().map(|n| h(n) & 0xff).collect();
        // 512 names over 256 buckets: about 221 buckets used if spread at random
        assert!(low.len() > 200, "{}", low.len());
    }
}
