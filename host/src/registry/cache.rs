//! The content-addressed cache of what was pulled from registries: every
//! manifest and blob under `blobs/sha256/HEX`, written only after its bytes
//! hashed to its digest and checked again whenever it is read, so a damaged
//! or tampered entry is never used; and each artifact's cosign signature
//! manifest, as last seen, under `signatures/sha256-HEX.json` (signatures
//! are checked on every use, so the cache need not be trusted for them).

use crate::util::encode::hex;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The cache in a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// `sha256:HEX` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Content that is not what its digest says: tampered with, or damaged.
#[derive(Debug)]
pub struct Mismatch(pub String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the content does not match its digest: {}", self.0)
    }
}

impl std::error::Error for Mismatch {}

/// The hex part of a `sha256:HEX` digest, refusing anything else (it names
/// a file).
fn hex_of(digest: &str) -> Result<&str> {
    if !crate::config::is_sha256_digest(digest) {
        bail!("'{digest}' is not a sha256 digest");
    }
    Ok(&digest["sha256:".len()..])
}

impl Cache {
    /// The cache kept in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the blob `digest` is kept.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs").join("sha256").join(hex_of(digest)?))
    }

    /// The blob `digest`, if cached intact. A damaged entry is removed and
    /// reported as missing, so it is fetched again.
    pub fn get(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(digest)?;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if digest_of(&bytes) != digest {
            tracing::warn!(path = %path.display(), "a cached blob does not match its digest; it is discarded");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Keeps `bytes` as the blob `digest`, refusing bytes that are not it.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf> {
        let actual = digest_of(bytes);
        if actual != digest {
            return Err(Mismatch(format!("expected {digest}, got {actual}")).into());
        }
        let path = self.blob_path(digest)?;
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    /// The signature manifest last seen for the artifact `digest`.
    pub fn signatures(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let path = self.signatures_path(digest)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Records the signature manifest seen for the artifact `digest`, or
    /// that it has none.
    pub fn set_signatures(&self, digest: &str, manifest: Option<&[u8]>) -> Result<()> {
        let path = self.signatures_path(digest)?;
        match manifest {
            Some(bytes) => write_atomically(&path, bytes),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
                _ => Ok(()),
            },
        }
    }

    fn signatures_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .dir
            .join("signatures")
            .join(format!("sha256-{}.json", hex_of(digest)?)))
    }
}

/// Writes `bytes` to `path` through a file beside it, so a reader sees the
/// whole content or none.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a cache path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temporary = dir.join(format!(
        ".{}.{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    // A new file (never a link left at that name) holds the bytes.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    std::io::Write::write_all(&mut file, bytes)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_matches_its_digest_and_drops_a_tampered_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let digest = digest_of(b"module");
        assert!(cache.put(&digest_of(b"other"), b"module").is_err());
        assert_eq!(cache.get(&digest).unwrap(), None);
        let path = cache.put(&digest, b"module").unwrap();
        assert_eq!(cache.get(&digest).unwrap().as_deref(), Some(&b"module"[..]));
        std::fs::write(&path, b"tampered").unwrap();
        assert_eq!(cache.get(&digest).unwrap(), None);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_digests_that_are_not_file_names() {
        let cache = Cache::new(PathBuf::from("/nonexistent"));
        assert!(cache.blob_path("sha256:../../etc/passwd").is_err());
        assert!(cache.get("md5:00").is_err());
    }
}
