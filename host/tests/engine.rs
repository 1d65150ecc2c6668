//! The engine's module handling with real policy components: one compiled,
//! linked module per digest, and the on-disk compile cache.

use portcullis::config::EngineConfig;
use portcullis::policy::engine::PolicyEngine;
use std::path::PathBuf;
use std::sync::Arc;

fn module(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/target/wasm32-wasip2/release")
        .join(name);
    assert!(
        path.exists(),
        "build the policies first: scripts/build-policies"
    );
    path
}

fn engine(cache: &std::path::Path) -> PolicyEngine {
    let config = EngineConfig {
        cache_dir: Some(cache.to_path_buf()),
        ..EngineConfig::default()
    };
    PolicyEngine::new(&config).unwrap()
}

#[test]
fn a_module_is_prepared_once_per_digest() {
    let cache = tempfile::tempdir().unwrap();
    let engine = engine(cache.path());
    let first = engine.prepare(&module("read_only.wasm")).unwrap();
    let copy = cache.path().join("copy-of-read-only.wasm");
    std::fs::copy(module("read_only.wasm"), &copy).unwrap();
    let second = engine.prepare(&copy).unwrap();
    assert!(
        Arc::ptr_eq(&first.sha256, &second.sha256),
        "same digest, same prepared module"
    );
    let other = engine.prepare(&module("tool_filter.wasm")).unwrap();
    assert_ne!(first.sha256, other.sha256);
}

#[test]
fn compiled_modules_are_cached_on_disk_by_digest_and_engine() {
    let cache = tempfile::tempdir().unwrap();
    let prepared = engine(cache.path())
        .prepare(&module("read_only.wasm"))
        .unwrap();
    let artifacts: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1);
    assert!(
        artifacts[0].starts_with(&format!("{}-", prepared.sha256)),
        "{artifacts:?}"
    );
    // A second engine with the same configuration loads the artifact.
    let again = engine(cache.path())
        .prepare(&module("read_only.wasm"))
        .unwrap();
    assert_eq!(again.sha256, prepared.sha256);
}

#[test]
fn a_file_that_is_not_a_component_is_refused_with_its_path() {
    let cache = tempfile::tempdir().unwrap();
    let bogus = cache.path().join("bogus.wasm");
    std::fs::write(&bogus, b"not wasm at all").unwrap();
    let error = format!("{:#}", engine(cache.path()).prepare(&bogus).err().unwrap());
    assert!(
        error.contains("bogus.wasm is not a valid policy component"),
        "{error}"
    );
    let missing = format!(
        "{:#}",
        engine(cache.path())
            .prepare(&cache.path().join("nope.wasm"))
            .err()
            .unwrap()
    );
    assert!(missing.contains("cannot read policy module"), "{missing}");
}
