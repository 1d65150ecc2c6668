//! Policies: the wasmtime engine that compiles, caches and sandboxes policy
//! components; one loaded policy module with its settings and instances; the
//! chain that runs them in order and combines their verdicts; fixtures that
//! test a module; and the key-value store behind their `store` import.

pub mod chain;
pub mod coverage;
pub mod engine;
pub mod fixtures;
pub mod kv;
pub mod module;
