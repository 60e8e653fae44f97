#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_fuzz_targets::proxy_v2(data));
