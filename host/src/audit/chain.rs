//! The tamper-evident trail: each record a chained file sink writes carries
//! `"chain":{"seq":N,"prev":H}` — its place in the trail and the sha256 of
//! the line before it (all zeros for the first) — so editing, removing or
//! reordering a line breaks the chain at that record, across rotated files
//! too. Every [`CHECKPOINT_EVERY`] records, and first in every rotated-in
//! file, a checkpoint record states the head of the chain, for copying to
//! somewhere an attacker cannot reach. [`verify`] walks a trail and names
//! the first record that does not follow.

use crate::util::encode::hex;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// How often a checkpoint record is written, in records.
pub const CHECKPOINT_EVERY: u64 = 1000;
/// The `prev` of the first record of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The end of a chain: the last record's number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its `seq`.
    pub seq: u64,
    /// sha256 of its line (without the newline).
    pub hash: String,
}

impl Head {
    /// The head before any record.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.into(),
        }
    }

    /// The head after `line`, a chained record; `None` if it is not one.
    pub fn of(line: &str) -> Option<Self> {
        let record: Value = serde_json::from_str(line).ok()?;
        Some(Self {
            seq: record["chain"]["seq"].as_u64()?,
            hash: line_hash(line),
        })
    }
}

/// sha256 (hex) of a line as written, without its newline.
pub fn line_hash(line: &str) -> String {
    hex(&Sha256::digest(line.trim_end_matches('\n').as_bytes()))
}

/// `line` (one JSON object, a newline optional) with the member `name`
/// (a plain key) set to the JSON text `value`, last.
pub fn with_member(line: &str, name: &str, value: &str) -> Result<String> {
    let body = line.trim_end_matches('\n');
    let Some(open) = body.strip_suffix('}') else {
        bail!("an audit record is not a JSON object");
    };
    let separator = if open.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    Ok(format!("{open}{separator}\"{name}\":{value}}}\n"))
}

/// `line` (one JSON object and a newline) chained after `head`, and the new
/// head.
pub fn link(line: &str, head: &Head) -> Result<(String, Head)> {
    let seq = head.seq + 1;
    let chain = format!(r#"{{"seq":{seq},"prev":"{}"}}"#, head.hash);
    let linked = with_member(line, "chain", &chain)?;
    let next = Head {
        seq,
        hash: line_hash(&linked),
    };
    Ok((linked, next))
}

/// A checkpoint record stating `head`, written after it; `previous_file`
/// names the file rotated out just before, if any.
pub fn checkpoint(head: &Head, previous_file: Option<&Path>, replica: Option<&str>) -> String {
    #[derive(Serialize)]
    struct Checkpoint<'a> {
        time: String,
        event: &'static str,
        head_seq: u64,
        head: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_file: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        replica: Option<&'a str>,
    }
    let record = Checkpoint {
        time: crate::util::clock::rfc3339_now(),
        event: "checkpoint",
        head_seq: head.seq,
        head: &head.hash,
        previous_file: previous_file
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned()),
        replica,
    };
    serde_json::to_string(&record).unwrap_or_default() + "\n"
}

/// One replica's trail (`None`: a process without a replica name) and
/// what verifying it found.
pub type ReplicaTrail = (Option<String>, Result<Verified, Broken>);

/// The trails of several replicas, told apart by the `replica` of each
/// file's first record, each verified on its own (a file without one is
/// the trail of a process without a replica name).
pub fn verify_replicas(files: &[PathBuf]) -> Result<Vec<ReplicaTrail>> {
    let mut trails: std::collections::BTreeMap<Option<String>, Vec<PathBuf>> = Default::default();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let replica = text
            .lines()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .and_then(|record| record["replica"].as_str().map(str::to_string));
        trails.entry(replica).or_default().push(file.clone());
    }
    trails
        .into_iter()
        .map(|(replica, files)| Ok((replica, verify(&files)?)))
        .collect()
}

/// What [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The files, in chain order.
    pub files: Vec<PathBuf>,
    /// Records checked.
    pub records: u64,
    /// The head of the chain at the end.
    pub head: Head,
}

/// Where a trail stops following its chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based).
    pub line: usize,
    /// The record's `seq` where it has one.
    pub seq: Option<u64>,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (record {seq})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// Checks that `files` (a trail and its rotated files, in any order) form
/// one unbroken chain from its first record.
pub fn verify(files: &[PathBuf]) -> Result<Result<Verified, Broken>> {
    let mut trail = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let first = text.lines().find_map(Head::of).map_or(u64::MAX, |h| h.seq);
        trail.push((first, file.clone(), text));
    }
    trail.sort_by_key(|(first, _, _)| *first);
    let mut head = Head::genesis();
    // Where the record `head` names is, to blame it when the next one
    // says it was altered.
    let mut at: Option<(PathBuf, usize)> = None;
    let mut records = 0;
    for (_, file, text) in &trail {
        for (index, line) in text.lines().enumerate() {
            let broken = |seq: Option<u64>, why: String| Broken {
                file: file.clone(),
                line: index + 1,
                seq,
                why,
            };
            let record: Value = match serde_json::from_str(line) {
                Ok(record) => record,
                Err(_) => return Ok(Err(broken(None, "not a JSON record (altered)".into()))),
            };
            let (Some(seq), Some(prev)) = (
                record["chain"]["seq"].as_u64(),
                record["chain"]["prev"].as_str(),
            ) else {
                return Ok(Err(broken(
                    None,
                    "has no chain (inserted or altered)".into(),
                )));
            };
            let expected = &head;
            if seq > expected.seq + 1 {
                let why = match (expected.seq + 1, seq - 1) {
                    (one, last) if one == last => {
                        format!("record {one} is missing here (removed or moved)")
                    }
                    (first, last) => {
                        format!("records {first} to {last} are missing here (removed or moved)")
                    }
                };
                return Ok(Err(broken(Some(seq), why)));
            }
            if seq <= expected.seq {
                let why = format!(
                    "comes after record {} (reordered or repeated)",
                    expected.seq
                );
                return Ok(Err(broken(Some(seq), why)));
            }
            if prev != expected.hash {
                let why =
                    format!("was altered: its hash is not the one record {seq} (next) recorded");
                let (file, line) = at.clone().unwrap_or((file.clone(), index + 1));
                return Ok(Err(Broken {
                    file,
                    line,
                    seq: Some(expected.seq),
                    why,
                }));
            }
            head = Head {
                seq,
                hash: line_hash(line),
            };
            at = Some((file.clone(), index + 1));
            records += 1;
        }
    }
    Ok(Ok(Verified {
        files: trail.into_iter().map(|(_, file, _)| file).collect(),
        records,
        head,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(dir: &Path, records: usize) -> (PathBuf, Vec<String>) {
        let mut head = Head::genesis();
        let mut lines = Vec::new();
        for i in 0..records {
            let (line, next) = link(&format!("{{\"n\":{i}}}\n"), &head).unwrap();
            lines.push(line);
            head = next;
        }
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, lines.concat()).unwrap();
        (path, lines)
    }

    #[test]
    fn a_member_goes_last_in_any_object() {
        assert_eq!(
            with_member("{}\n", "replica", "\"a\"").unwrap(),
            "{\"replica\":\"a\"}\n"
        );
        assert_eq!(
            with_member("{\"n\":1}", "replica", "\"a\"").unwrap(),
            "{\"n\":1,\"replica\":\"a\"}\n"
        );
        assert!(with_member("[1]", "replica", "\"a\"").is_err());
    }

    #[test]
    fn an_intact_trail_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = trail(dir.path(), 5);
        let verified = verify(&[path]).unwrap().unwrap();
        assert_eq!(verified.records, 5);
        assert_eq!(verified.head, Head::of(&lines[4]).unwrap());
        assert!(lines[0].contains(GENESIS));
    }

    #[test]
    fn an_edited_removed_or_swapped_line_breaks_the_chain_there() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = trail(dir.path(), 5);
        let broken = |lines: Vec<String>| {
            std::fs::write(&path, lines.concat()).unwrap();
            verify(std::slice::from_ref(&path)).unwrap().unwrap_err()
        };
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":7");
        let found = broken(edited);
        assert_eq!((found.line, found.seq), (3, Some(3)), "{found}");
        assert!(found.why.contains("was altered"), "{found}");

        let mut removed = lines.clone();
        removed.remove(1);
        let found = broken(removed);
        assert_eq!((found.line, found.seq), (2, Some(3)));
        assert!(found.why.contains("record 2 is missing here"), "{found}");

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        let found = broken(swapped);
        assert_eq!((found.line, found.seq), (2, Some(3)));

        let found = broken(lines[1..].to_vec());
        assert_eq!(
            (found.line, found.seq),
            (1, Some(2)),
            "the first record removed"
        );
    }
}
