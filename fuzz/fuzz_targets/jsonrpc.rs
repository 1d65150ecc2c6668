//! Fuzz target `jsonrpc`: see `portcullis::fuzzing::jsonrpc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::jsonrpc(data));
