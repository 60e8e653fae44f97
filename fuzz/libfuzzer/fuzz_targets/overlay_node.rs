#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_fuzz_targets::overlay_node(data));
