//! Fuzz target `jwt`: see `portcullis::fuzzing::jwt`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::jwt(data));
