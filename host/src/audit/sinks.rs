//! Audit sinks: where serialized records go. Each write hands the record to
//! the operating system before returning, so a record survives the process
//! being killed the moment after.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A destination for audit records.
pub trait Sink: Send + Sync {
    /// Writes one record: a JSON object followed by a newline.
    fn write(&self, line: &str) -> Result<()>;
    /// A short description for reports and errors, e.g. `file /var/log/a.jsonl`.
    fn describe(&self) -> String;
}

/// Appends JSON Lines to a file.
pub struct FileSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl FileSink {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create audit directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open audit file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }
}

impl Sink for FileSink {
    fn write(&self, line: &str) -> Result<()> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("audit file lock poisoned"))?;
        // One write of the whole line to an O_APPEND file: records never interleave.
        file.write_all(line.as_bytes())?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// Writes JSON Lines to stderr.
pub struct StderrSink;

impl Sink for StderrSink {
    fn write(&self, line: &str) -> Result<()> {
        std::io::stderr().lock().write_all(line.as_bytes())?;
        Ok(())
    }

    fn describe(&self) -> String {
        "stderr".into()
    }
}
