//! Fuzz target `oci`: see `portcullis::fuzzing::oci`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::oci(data));
