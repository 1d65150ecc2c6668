//! Fuzz target `tool_call`: see `portcullis::fuzzing::tool_call`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::tool_call(data));
