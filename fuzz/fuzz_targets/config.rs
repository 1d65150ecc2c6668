//! Fuzz target `config`: see `portcullis::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::config(data));
