//! Fuzz target `framing`: see `portcullis::fuzzing::framing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::framing(data));
