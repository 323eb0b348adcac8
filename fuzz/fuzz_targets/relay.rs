//! libFuzzer entry for `pgmux_fuzz::check_relay`: the properties live in fuzz/src/lib.rs, shared
//! with the proptest run in tests/fuzz_props.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux_fuzz::check_relay(data));
