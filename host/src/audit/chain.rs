//! The tamper-evident trail: each record a chained file sink writes carries
//! `"chain":{"seq":N,"prev":H}` — its place in the trail and the sha256 of
//! the line before it (all zeros for the first) — so editing, removing or
//! reordering a line breaks the chain at that record, across rotated files
//! too. Every [`CHECKPOINT_EVERY`] records, and first in every rotated-in
//! file, a checkpoint record states the head of the chain, for copying to
//! somewhere an attacker cannot reach. [`verify`] walks a trail and names
//! the first record that does not follow.

use super::lines::{self, Line};
use crate::util::encode::hex;
use anyhow::{Result, bail};
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
pub type ReplicaTrail = (Option<String>, Verified);

/// The trails of several replicas, told apart by the `replica` of each
/// file's first record, each verified on its own (a file without one is
/// the trail of a process without a replica name), against the heads held
/// elsewhere that `anchors` names for them.
pub fn verify_replicas(files: &[PathBuf], anchors: &[Anchor]) -> Result<Vec<ReplicaTrail>> {
    let mut trails: std::collections::BTreeMap<Option<String>, Vec<PathBuf>> = Default::default();
    for file in files {
        let replica = first_record(file)?.and_then(|r| r["replica"].as_str().map(str::to_string));
        trails.entry(replica).or_default().push(file.clone());
    }
    for anchor in anchors {
        if !trails.contains_key(&anchor.replica) {
            let whose = anchor
                .replica
                .as_deref()
                .map_or("no replica".into(), |r| format!("replica {r}"));
            anyhow::bail!("--head {anchor}: the files hold no trail of {whose}");
        }
    }
    trails
        .into_iter()
        .map(|(replica, files)| {
            let anchor = anchors
                .iter()
                .find(|a| a.replica == replica)
                .map(|a| &a.head);
            Ok((replica, verify(&files, anchor)?))
        })
        .collect()
}

/// The first record of `file` that reads as JSON, if any.
fn first_record(file: &Path) -> Result<Option<Value>> {
    for line in lines::of(file)? {
        if let (_, Line::Text(text)) = line?
            && let Ok(record) = serde_json::from_str(&text)
        {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// A head held elsewhere (printed by `portcullis audit head`, delivered
/// to a SIEM in `chain-head` records): `[REPLICA=]SEQ:HASH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The replica whose trail it is the head of, if named.
    pub replica: Option<String>,
    /// The head.
    pub head: Head,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (replica, head) = match text.split_once('=') {
            Some((replica, head)) => (Some(replica.to_string()), head),
            None => (None, text),
        };
        let (seq, hash) = head
            .split_once(':')
            .ok_or("a head is SEQ:HASH, e.g. 1042:9f86d0…")?;
        let seq = seq
            .parse()
            .map_err(|_| format!("'{seq}' is not a record number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{hash}' is not a sha256 (64 hex digits)"));
        }
        let head = Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        };
        Ok(Self { replica, head })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(replica) = &self.replica {
            write!(f, "{replica}=")?;
        }
        write!(f, "{}:{}", self.head.seq, self.head.hash)
    }
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
    /// Where the trail does not follow its chain, in order
    /// ([`MOST_BREAKS`] at most; `more_breaks` counts the rest).
    pub breaks: Vec<Broken>,
    /// Breaks found past [`MOST_BREAKS`].
    pub more_breaks: u64,
}

impl Verified {
    /// Whether the trail is one unbroken chain.
    pub fn intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// How many breaks [`verify`] names; past it, it counts them.
pub const MOST_BREAKS: usize = 100;

/// Where a trail stops following its chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based); 0 where the break is at the trail's end.
    pub line: usize,
    /// The record's `seq` where it has one.
    pub seq: Option<u64>,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{} (its end)", self.file.display())?,
            line => write!(f, "{}:{line}", self.file.display())?,
        }
        if let Some(seq) = self.seq {
            write!(f, " (record {seq})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// Checks that `files` (a trail and its rotated files, in any order) form
/// one unbroken chain from its first record, reading them line by line;
/// and, given the `anchor` a second party holds, that the trail still
/// holds that very record (its newest records were neither rewritten nor
/// dropped). Every break is named, and the check goes on from the next
/// record.
pub fn verify(files: &[PathBuf], anchor: Option<&Head>) -> Result<Verified> {
    let mut trail = Vec::new();
    for file in files {
        let first = first_record(file)?
            .and_then(|r| r["chain"]["seq"].as_u64())
            .unwrap_or(u64::MAX);
        trail.push((first, file.clone()));
    }
    trail.sort_by_key(|(first, _)| *first);
    let mut walk = Walk {
        anchor: anchor.cloned(),
        ..Walk::default()
    };
    for (_, file) in &trail {
        for line in lines::of(file)? {
            let (number, line) = line?;
            walk.line(file, number, line);
        }
    }
    let last = trail
        .last()
        .map(|(_, file)| file.clone())
        .unwrap_or_default();
    walk.end(&last);
    Ok(Verified {
        files: trail.into_iter().map(|(_, file)| file).collect(),
        records: walk.records,
        head: walk.head,
        breaks: walk.breaks,
        more_breaks: walk.more_breaks,
    })
}

/// A walk along a trail's chain.
#[derive(Default)]
struct Walk {
    head: Head,
    /// Where the record `head` names is, to blame it when the next one
    /// says it was altered.
    at: Option<(PathBuf, usize)>,
    records: u64,
    breaks: Vec<Broken>,
    more_breaks: u64,
    /// A head held elsewhere, the trail is to hold.
    anchor: Option<Head>,
    /// The record it names, once walked by: its hash, file and line.
    anchored: Option<(String, PathBuf, usize)>,
}

impl Default for Head {
    fn default() -> Self {
        Self::genesis()
    }
}

impl Walk {
    fn broke(&mut self, broken: Broken) {
        if self.breaks.len() < MOST_BREAKS {
            self.breaks.push(broken);
        } else {
            self.more_breaks += 1;
        }
    }

    fn line(&mut self, file: &Path, number: usize, line: Line) {
        let broken = |seq: Option<u64>, why: String| Broken {
            file: file.to_path_buf(),
            line: number,
            seq,
            why,
        };
        let text = match line {
            Line::Text(text) => text,
            Line::Unreadable(why) => return self.broke(broken(None, format!("{why} (altered)"))),
        };
        let record: Value = match serde_json::from_str(&text) {
            Ok(record) => record,
            Err(_) => return self.broke(broken(None, "not a JSON record (altered)".into())),
        };
        let (Some(seq), Some(prev)) = (
            record["chain"]["seq"].as_u64(),
            record["chain"]["prev"].as_str(),
        ) else {
            return self.broke(broken(None, "has no chain (inserted or altered)".into()));
        };
        // Past a break, the walk goes on from this record.
        let hash = line_hash(&text);
        if seq > self.head.seq + 1 {
            let why = match (self.head.seq + 1, seq - 1) {
                (one, last) if one == last => {
                    format!("record {one} is missing here (removed or moved)")
                }
                (first, last) => {
                    format!("records {first} to {last} are missing here (removed or moved)")
                }
            };
            self.broke(broken(Some(seq), why));
        } else if seq <= self.head.seq {
            let why = format!(
                "comes after record {} (reordered or repeated)",
                self.head.seq
            );
            self.broke(broken(Some(seq), why));
            // The walk goes on from the record before it.
            self.records += 1;
            return;
        } else if prev != self.head.hash {
            let why = format!("was altered: its hash is not the one record {seq} (next) recorded");
            let (file, line) = self.at.clone().unwrap_or((file.to_path_buf(), number));
            let seq = Some(self.head.seq);
            self.broke(Broken {
                file,
                line,
                seq,
                why,
            });
        }
        self.head = Head { seq, hash };
        self.at = Some((file.to_path_buf(), number));
        self.records += 1;
        if self.anchor.as_ref().is_some_and(|a| a.seq == seq) && self.anchored.is_none() {
            self.anchored = Some((self.head.hash.clone(), file.to_path_buf(), number));
        }
    }

    /// Ends the walk at the end of `last`, the trail's newest file: a head
    /// held elsewhere must be a record the trail reaches, unchanged.
    fn end(&mut self, last: &Path) {
        let Some(anchor) = self.anchor.clone() else {
            return;
        };
        let seq = Some(anchor.seq);
        let broken = match self.anchored.take() {
            Some((hash, _, _)) if hash == anchor.hash => return,
            Some((_, file, line)) => Broken {
                file,
                line,
                seq,
                why: "is not the record the head held elsewhere names (rewritten)".into(),
            },
            None if self.head.seq < anchor.seq => Broken {
                file: last.to_path_buf(),
                line: 0,
                seq,
                why: format!(
                    "the trail ends at record {}, before the head held elsewhere: records {} to {} were removed",
                    self.head.seq,
                    self.head.seq + 1,
                    anchor.seq
                ),
            },
            None => Broken {
                file: last.to_path_buf(),
                line: 0,
                seq,
                why: "the record the head held elsewhere names is not in the trail".into(),
            },
        };
        self.broke(broken);
    }
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
        let verified = verify(&[path], None).unwrap();
        assert!(verified.intact());
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
            let verified = verify(std::slice::from_ref(&path), None).unwrap();
            let [first, ..] = &verified.breaks[..] else {
                panic!("intact");
            };
            Broken {
                file: first.file.clone(),
                line: first.line,
                seq: first.seq,
                why: first.why.clone(),
            }
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

    #[test]
    fn every_bad_line_is_named_and_the_walk_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = trail(dir.path(), 6);
        let mut bytes = lines[0].as_bytes().to_vec();
        bytes.extend_from_slice(b"\xff\xfe not a record\n");
        bytes.extend_from_slice(lines[1].as_bytes());
        bytes.extend_from_slice(lines[2].replace("\"n\":2", "\"n\":9").as_bytes());
        for line in &lines[3..] {
            bytes.extend_from_slice(line.as_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let verified = verify(std::slice::from_ref(&path), None).unwrap();
        let found: Vec<(usize, Option<u64>)> =
            verified.breaks.iter().map(|b| (b.line, b.seq)).collect();
        assert_eq!(found, [(2, None), (4, Some(3))], "{:?}", verified.breaks);
        assert!(verified.breaks[0].why.contains("not UTF-8"));
        assert_eq!(verified.records, 6);
    }

    #[test]
    fn a_head_held_elsewhere_catches_newest_records_rewritten_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = trail(dir.path(), 5);
        let held = verify(std::slice::from_ref(&path), None).unwrap().head;
        let anchor: Anchor = format!("{}:{}", held.seq, held.hash).parse().unwrap();
        assert!(
            verify(std::slice::from_ref(&path), Some(&anchor.head))
                .unwrap()
                .intact()
        );
        // The newest record rewritten and chained anew: the chain alone holds.
        let mut rewritten = lines[..4].to_vec();
        let head = Head::of(&rewritten[3]).unwrap();
        rewritten.push(link("{\"n\":\"forged\"}\n", &head).unwrap().0);
        std::fs::write(&path, rewritten.concat()).unwrap();
        assert!(verify(std::slice::from_ref(&path), None).unwrap().intact());
        let caught = verify(std::slice::from_ref(&path), Some(&anchor.head)).unwrap();
        let [broken] = &caught.breaks[..] else {
            panic!("{:?}", caught.breaks)
        };
        assert_eq!((broken.line, broken.seq), (5, Some(5)));
        assert!(broken.why.contains("rewritten"));
        // The newest two dropped.
        std::fs::write(&path, lines[..3].concat()).unwrap();
        let caught = verify(std::slice::from_ref(&path), Some(&anchor.head)).unwrap();
        assert!(
            caught.breaks[0].why.contains("records 4 to 5 were removed"),
            "{:?}",
            caught.breaks
        );
        assert!("12:abc".parse::<Anchor>().is_err());
        let named: Anchor = format!("a=3:{}", "F".repeat(64)).parse().unwrap();
        assert_eq!(named.replica.as_deref(), Some("a"));
        assert_eq!(named.head.hash, "f".repeat(64));
    }
}
