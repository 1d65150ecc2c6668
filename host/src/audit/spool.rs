//! A delivering sink's queue on disk: records are appended to a spool file
//! as they are written (a `write` to the page cache, no network on the
//! message path) and read back in order by the sink's delivery thread, which
//! moves a cursor past what was delivered. The spool survives a crash, so
//! records are delivered after a restart; it is bounded, and once caught up
//! it is emptied. One process owns a spool directory at a time (a lock held
//! while it runs); another process of the same deployment takes the next
//! free slot, and a slot left by a process that died is taken over — with
//! its records — by the next one to start.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A spool is emptied once delivered up to its end and at least this big.
const COMPACT_BYTES: u64 = 4 << 20;

/// One slot's spool file, cursor and lock.
pub struct Spool {
    dir: PathBuf,
    /// Held for the life of the process: the slot is ours.
    _owner: File,
    file: Mutex<File>,
    /// Where delivery has got to; the `cursor` file keeps it for the next
    /// owner, and only the owner moves it.
    cursor: AtomicU64,
    max_bytes: u64,
}

impl Spool {
    /// Takes the first free slot under `root`.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Self> {
        for slot in 0.. {
            let dir = root.join(slot.to_string());
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the spool {}", dir.display()))?;
            let owner = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("owner.lock"))?;
            if owner.try_lock().is_err() {
                continue;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(dir.join("spool.jsonl"))?;
            let mut text = String::new();
            if let Ok(mut saved) = File::open(dir.join("cursor")) {
                saved.read_to_string(&mut text)?;
            }
            return Ok(Self {
                dir,
                _owner: owner,
                file: Mutex::new(file),
                cursor: AtomicU64::new(text.trim().parse().unwrap_or(0)),
                max_bytes,
            });
        }
        unreachable!("slots are unbounded")
    }

    /// Appends records (JSON lines); false when the spool is full.
    pub fn push(&self, lines: &str) -> Result<bool> {
        let mut file = self.file.lock().expect("spool lock poisoned");
        if file.metadata()?.len() + lines.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        file.write_all(lines.as_bytes())?;
        Ok(true)
    }

    /// Up to `max` whole records from the cursor on, and the offset after
    /// them.
    pub fn peek(&self, max: usize) -> Result<(Vec<String>, u64)> {
        let cursor = self.cursor.load(Ordering::Acquire);
        let mut reader = BufReader::new(File::open(self.dir.join("spool.jsonl"))?);
        reader.seek(SeekFrom::Start(cursor))?;
        let (mut lines, mut end) = (Vec::new(), cursor);
        let mut line = String::new();
        while lines.len() < max {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            end += read as u64;
            lines.push(line.trim_end().to_string());
        }
        Ok((lines, end))
    }

    /// Moves the cursor to `offset` (what was delivered); empties the
    /// spool once all of a big one was.
    pub fn commit(&self, offset: u64) -> Result<()> {
        let file = self.file.lock().expect("spool lock poisoned");
        if offset >= COMPACT_BYTES && offset == file.metadata()?.len() {
            file.set_len(0)?;
            return self.set_cursor(0);
        }
        self.set_cursor(offset)
    }

    /// Bytes waiting to be delivered.
    pub fn backlog(&self) -> u64 {
        let len = self
            .file
            .lock()
            .expect("spool lock poisoned")
            .metadata()
            .map_or(0, |m| m.len());
        len.saturating_sub(self.cursor.load(Ordering::Acquire))
    }

    fn set_cursor(&self, offset: u64) -> Result<()> {
        let partial = self.dir.join("cursor.partial");
        std::fs::write(&partial, offset.to_string())?;
        std::fs::rename(&partial, self.dir.join("cursor"))?;
        self.cursor.store(offset, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_and_a_second_owner_gets_another_slot() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(spool.push("{\"n\":1}\n{\"n\":2}\n").unwrap());
        assert!(spool.push("{\"n\":3}\n").unwrap());
        let (first, end) = spool.peek(2).unwrap();
        assert_eq!(first, ["{\"n\":1}", "{\"n\":2}"]);
        spool.commit(end).unwrap();
        let (rest, _) = spool.peek(10).unwrap();
        assert_eq!(rest, ["{\"n\":3}"]);
        assert_eq!(spool.backlog(), 8);

        let other = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(other.dir.ends_with("1"), "slot 0 is taken");
        drop(spool);
        let again = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            again.peek(10).unwrap().0,
            ["{\"n\":3}"],
            "a freed slot's records are kept"
        );
        assert!(!again.push(&"x".repeat(2 << 20)).unwrap(), "full");
    }
}
