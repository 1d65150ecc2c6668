//! Fuzz target `sse`: see `portcullis::fuzzing::sse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::sse(data));
