//! Audit sinks: where serialized records go. Each write hands the record to
//! the operating system before returning, so a record survives the process
//! being killed the moment after. A file sink can chain its records, rotate
//! its file, and flush each record to the disk before its message goes on —
//! by group commit: one fsync covers every record written while the last
//! one ran, so concurrent messages share the disk's pace instead of queueing
//! for it.

use super::chain::{self, Head};
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

/// A destination for audit records.
pub trait Sink: Send + Sync {
    /// Writes one record: a JSON object followed by a newline.
    fn write(&self, line: &str) -> Result<()>;
    /// A short description for reports and errors, e.g. `file /var/log/a.jsonl`.
    fn describe(&self) -> String;
    /// For a chained file: the file and the head of its chain as this
    /// process last wrote it.
    fn head(&self) -> Option<(PathBuf, Head)> {
        None
    }
    /// Whether it delivers records elsewhere (a webhook, OTLP, a sink
    /// component): the heads of the chained files go to it, so a second
    /// party holds them.
    fn delivers(&self) -> bool {
        false
    }
}

/// How a file sink keeps its file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Chain the records (tamper evidence; see [`super::chain`]).
    pub chain: bool,
    /// Rotate once the file holds this many bytes (0: never).
    pub rotate_bytes: u64,
    /// Rotate once the file is this many seconds old (0: never).
    pub rotate_secs: u64,
    /// Flush each record to the disk before the message goes on (survives
    /// a power loss; concurrent records share an fsync).
    pub fsync: bool,
    /// The replica writing, named in its checkpoints.
    pub replica: Option<String>,
}

/// Appends JSON Lines to a file. With chaining or rotation, every process
/// writing the file takes turns (a lock file beside it), so each record
/// chains onto the one truly before it and a file rotated by one process is
/// left by all.
pub struct FileSink {
    path: PathBuf,
    options: FileOptions,
    state: Mutex<Open>,
    /// How far the disk has caught up, with `fsync`.
    synced: Mutex<Synced>,
    /// Signalled when an fsync ends.
    sync_ended: Condvar,
}

/// Group commit's bookkeeping: records are counted as written; an fsync
/// makes every record counted before it started durable.
#[derive(Debug, Default)]
struct Synced {
    /// Records known to be on the disk.
    upto: u64,
    /// Whether a writer is running an fsync for all.
    running: bool,
}

/// The file as this process has it open.
struct Open {
    file: File,
    /// Taken around each write when chaining or rotating.
    lock: Option<File>,
    /// Where this process last left the file's end, and the chain's head
    /// there: still true while the file has not grown since.
    known: Option<(u64, Head)>,
    /// Records this process has written.
    written: u64,
}

impl FileSink {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, FileOptions::default())
    }

    /// Opens (creating if needed) `path` for appending, kept as `options`
    /// say.
    pub fn open_with(path: &Path, options: FileOptions) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create audit directory {}", dir.display()))?;
        }
        let guarded = options.chain || options.rotate_bytes > 0 || options.rotate_secs > 0;
        let lock = guarded
            .then(|| {
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(lock_path(path))
                    .with_context(|| format!("cannot open the lock file of {}", path.display()))
            })
            .transpose()?;
        Ok(Self {
            path: path.to_path_buf(),
            options,
            state: Mutex::new(Open {
                file: append(path)?,
                lock,
                known: None,
                written: 0,
            }),
            synced: Mutex::default(),
            sync_ended: Condvar::new(),
        })
    }

    /// Writes `line` under the lock: after rotating the file if it is due,
    /// chained onto the file's last record if chaining.
    fn write_guarded(&self, open: &mut Open, line: &str) -> Result<()> {
        // Another process may have rotated the file since.
        if !same_file(&open.file, &self.path) {
            self.reopen(open)?;
        }
        let mut head = None;
        if self.rotation_due(&open.file)? {
            let tail = self.head(open)?;
            let rotated = self.rotate()?;
            self.reopen(open)?;
            if let Some(tail) = tail {
                let (checkpoint, next) = chain::link(
                    &chain::checkpoint(&tail, Some(&rotated), self.options.replica.as_deref()),
                    &tail,
                )?;
                open.file.write_all(checkpoint.as_bytes())?;
                head = Some(next);
            }
        }
        if !self.options.chain {
            open.file.write_all(line.as_bytes())?;
            return Ok(());
        }
        let head = match head {
            Some(head) => head,
            None => self.head(open)?.unwrap_or_else(Head::genesis),
        };
        let (linked, mut head) = chain::link(line, &head)?;
        let mut out = linked;
        if head.seq % chain::CHECKPOINT_EVERY == 0 {
            let (checkpoint, next) = chain::link(
                &chain::checkpoint(&head, None, self.options.replica.as_deref()),
                &head,
            )?;
            out.push_str(&checkpoint);
            head = next;
        }
        open.file.write_all(out.as_bytes())?;
        let end = open.file.metadata()?.len();
        open.known = Some((end, head));
        Ok(())
    }

    /// The chain's head at the file's end: known, or read from its last
    /// line (another process wrote since); `None` for an empty file or when
    /// not chaining.
    fn head(&self, open: &Open) -> Result<Option<Head>> {
        if !self.options.chain {
            return Ok(None);
        }
        let end = open.file.metadata()?.len();
        if let Some((known_end, head)) = &open.known
            && *known_end == end
        {
            return Ok(Some(head.clone()));
        }
        let Some(last) = last_line(&self.path)? else {
            return Ok(None);
        };
        Head::of(&last).map(Some).with_context(|| {
            format!(
                "the last line of {} is not a chained record; start a new file to chain",
                self.path.display()
            )
        })
    }

    /// Opens the file at the path anew (it was rotated), first flushing the
    /// one left to the disk when records must be durable: a later fsync of
    /// the new file does not cover it.
    fn reopen(&self, open: &mut Open) -> Result<()> {
        if self.options.fsync {
            self.fsync(&open.file)?;
        }
        open.file = append(&self.path)?;
        open.known = None;
        Ok(())
    }

    fn fsync(&self, file: &File) -> Result<()> {
        file.sync_data()
            .with_context(|| format!("cannot fsync {}", self.path.display()))
    }

    /// Returns once record number `written` is on the disk: at once if an
    /// fsync that started after it has ended; else after the fsync this
    /// writer runs for everyone (none running) or the one it waits for.
    fn durable(&self, written: u64) -> Result<()> {
        let mut synced = lock(&self.synced)?;
        while synced.upto < written {
            if synced.running {
                synced = self
                    .sync_ended
                    .wait(synced)
                    .map_err(|_| anyhow::anyhow!("audit sync lock poisoned"))?;
                continue;
            }
            synced.running = true;
            drop(synced);
            let flushed = self.flush_all();
            synced = lock(&self.synced)?;
            synced.running = false;
            self.sync_ended.notify_all();
            synced.upto = synced.upto.max(flushed?);
        }
        Ok(())
    }

    /// Flushes the file to the disk; returns how many records that covers.
    fn flush_all(&self) -> Result<u64> {
        let (file, written) = {
            let open = lock(&self.state)?;
            (open.file.try_clone()?, open.written)
        };
        self.fsync(&file)?;
        Ok(written)
    }

    fn rotation_due(&self, file: &File) -> Result<bool> {
        let FileOptions {
            rotate_bytes,
            rotate_secs,
            ..
        } = self.options;
        let meta = file.metadata()?;
        if meta.len() == 0 {
            return Ok(false);
        }
        let by_size = rotate_bytes > 0 && meta.len() >= rotate_bytes;
        let age = meta
            .created()
            .ok()
            .and_then(|created| created.elapsed().ok())
            .map_or(0, |age| age.as_secs());
        Ok(by_size || (rotate_secs > 0 && age >= rotate_secs))
    }

    /// Renames the file aside as `STEM.TIME.EXT`; returns the new name.
    fn rotate(&self) -> Result<PathBuf> {
        let (stem, ext) = stem_and_extension(&self.path);
        let time = crate::util::clock::rfc3339_now().replace(':', "");
        let mut rotated = self.path.with_file_name(format!("{stem}.{time}{ext}"));
        for n in 1.. {
            if !rotated.exists() {
                break;
            }
            rotated = self.path.with_file_name(format!("{stem}.{time}-{n}{ext}"));
        }
        std::fs::rename(&self.path, &rotated)
            .with_context(|| format!("cannot rotate {}", self.path.display()))?;
        Ok(rotated)
    }
}

impl Sink for FileSink {
    fn write(&self, line: &str) -> Result<()> {
        let written = {
            let mut open = lock(&self.state)?;
            match open.lock.as_ref().map(File::try_clone).transpose()? {
                // One write of the whole line to an O_APPEND file: records
                // never interleave.
                None => open.file.write_all(line.as_bytes())?,
                Some(lock) => {
                    lock.lock().with_context(|| {
                        format!("cannot lock {}", lock_path(&self.path).display())
                    })?;
                    let written = self.write_guarded(&mut open, line);
                    let _ = lock.unlock();
                    written?;
                }
            }
            open.written += 1;
            open.written
        };
        if self.options.fsync {
            self.durable(written)?;
        }
        Ok(())
    }

    fn head(&self) -> Option<(PathBuf, Head)> {
        let open = lock(&self.state).ok()?;
        let (_, head) = open.known.as_ref().filter(|_| self.options.chain)?;
        Some((self.path.clone(), head.clone()))
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// `mutex`, locked.
fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow::anyhow!("audit file lock poisoned"))
}

/// `STEM` and `.EXT` of a trail file's name (`.EXT` empty without one).
fn stem_and_extension(path: &Path) -> (String, String) {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    (stem.into_owned(), ext)
}

/// The files a file sink rotated out of `path` (`STEM.TIME.EXT`), oldest
/// first (by when they were last written: nothing is written to a file once
/// rotated).
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (stem, ext) = stem_and_extension(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.len() > stem.len() + ext.len() + 1
                && name.starts_with(&format!("{stem}."))
                && name.ends_with(&ext)
                && !name.ends_with(".lock")
                && p != path
        })
        .collect();
    found.sort_by_key(|p| {
        let written = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (written, p.clone())
    });
    found
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open audit file {}", path.display()))
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Whether `file` is (still) the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.ino() == named.ino() && open.dev() == named.dev(),
        _ => false,
    }
}

/// The last line of the file at `path`, read from its end.
fn last_line(path: &Path) -> Result<Option<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut tail = Vec::new();
    let mut start = len;
    // Back from the end, a chunk at a time, until a newline before the last
    // line's.
    while start > 0 {
        let step = start.min(64 * 1024);
        start -= step;
        let mut chunk = vec![0; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if body.contains(&b'\n') {
            break;
        }
    }
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let last = body.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    if last.is_empty() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(last).into_owned()))
}

/// Writes JSON Lines to the process' standard output or error.
pub enum Console {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Sink for Console {
    fn write(&self, line: &str) -> Result<()> {
        match self {
            Console::Stdout => std::io::stdout().lock().write_all(line.as_bytes())?,
            Console::Stderr => std::io::stderr().lock().write_all(line.as_bytes())?,
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            Console::Stdout => "stdout".into(),
            Console::Stderr => "stderr".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_durable_writes_each_return_once_an_fsync_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = FileOptions {
            fsync: true,
            chain: true,
            rotate_bytes: 4_000,
            ..FileOptions::default()
        };
        let sink = FileSink::open_with(&path, options).unwrap();
        std::thread::scope(|scope| {
            for writer in 0..8 {
                let sink = &sink;
                scope.spawn(move || {
                    for n in 0..25 {
                        sink.write(&format!("{{\"w\":{writer},\"n\":{n}}}\n"))
                            .unwrap();
                        let synced = sink.synced.lock().unwrap().upto;
                        let written = sink.state.lock().unwrap().written;
                        assert!(synced >= 1 && synced <= written);
                    }
                });
            }
        });
        assert_eq!(
            sink.synced.lock().unwrap().upto,
            200,
            "every record covered"
        );
        let mut files = rotated_files(&path);
        files.push(path.clone());
        let records = files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|l| l.contains("\"w\""))
            .count();
        assert_eq!(records, 200);
        files.reverse();
        assert!(chain::verify(&files, None).unwrap().intact());
    }

    #[test]
    fn writers_sharing_a_chained_file_keep_one_chain_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = FileOptions {
            chain: true,
            rotate_bytes: 2_000,
            ..FileOptions::default()
        };
        // Two writers, as two processes would be.
        let a = FileSink::open_with(&path, options.clone()).unwrap();
        let b = FileSink::open_with(&path, options).unwrap();
        for i in 0..120 {
            let sink = if i % 3 == 0 { &b } else { &a };
            sink.write(&format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(40)))
                .unwrap();
        }
        let mut files = rotated_files(&path);
        assert!(files.len() > 2, "rotated: {files:?}");
        files.push(path.clone());
        files.reverse();
        let verified = chain::verify(&files, None).unwrap();
        assert!(verified.intact(), "{:?}", verified.breaks);
        let checkpoints = files.len() as u64 - 1;
        assert_eq!(verified.records, 120 + checkpoints);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("{\"time\""),
            "a rotated-in file opens with a checkpoint"
        );
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains("\"event\":\"checkpoint\"")
        );
    }
}
