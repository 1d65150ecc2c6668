//! `portcullis audit`: reading the trail a JSON Lines file sink wrote —
//! `verify` its chain across rotated files (against a `head` kept
//! elsewhere, too), `tail` it (and follow it), and `query` it by time,
//! agent, server, tool, outcome or event — as readable tables or as JSON
//! Lines. Files are read line by line, never whole; a bad line is named
//! and the rest read.

use crate::audit::{self, chain};
use crate::config::{Config, SinkConfig};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use wildmatch::WildMatch;

/// What to do with the trail.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Check that a chained trail is unbroken; names the first record that
    /// was altered, removed or reordered (exit status 1).
    Verify {
        /// The trail's files, rotated ones included, in any order (several
        /// replicas' trails are told apart by the replica their records name).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head of the chain kept elsewhere (`portcullis audit head`, or a
        /// `chain-head` record a SIEM received), `SEQ:HASH` or
        /// `REPLICA=SEQ:HASH`: the trail must still hold that very record,
        /// so its newest records were neither rewritten nor dropped.
        #[arg(long = "head", value_name = "[REPLICA=]SEQ:HASH")]
        heads: Vec<chain::Anchor>,
    },
    /// Print the head of a chained trail (`SEQ:HASH`, one line per
    /// replica), to keep where whoever could alter the trail cannot reach.
    Head {
        /// The trail's files, rotated ones included.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the last records, and with --follow those that come.
    Tail {
        #[command(flatten)]
        trail: Trail,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing records as they are written.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// Print the records that match.
    Query {
        #[command(flatten)]
        trail: Trail,
        #[command(flatten)]
        filter: Filter,
    },
}

/// Which files make up the trail.
#[derive(Debug, Args)]
pub struct Trail {
    /// The trail's files (default: the file sinks of --config, with their
    /// rotated files).
    files: Vec<PathBuf>,
    /// The config whose file sinks to read.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON Lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// Which records to print.
#[derive(Debug, Args, Default)]
pub struct Filter {
    /// Only records since: a time (RFC 3339) or an age (e.g. 15m, 2h).
    #[arg(long)]
    since: Option<String>,
    /// Only records until: a time (RFC 3339) or an age.
    #[arg(long)]
    until: Option<String>,
    /// Only this agent (glob).
    #[arg(long)]
    agent: Option<String>,
    /// Only this server (glob).
    #[arg(long)]
    server: Option<String>,
    /// Only this tool (glob).
    #[arg(long)]
    tool: Option<String>,
    /// Only this outcome: allow, modify, deny or hold.
    #[arg(long)]
    outcome: Option<String>,
    /// Only this event: approval, reload, session-opened, checkpoint, …
    #[arg(long)]
    event: Option<String>,
}

/// Runs `action`; returns the exit status.
pub fn run(action: &Action) -> Result<i32> {
    match action {
        Action::Verify { files, heads } => verify(files, heads),
        Action::Head { files } => head(files),
        Action::Tail {
            trail,
            lines,
            follow,
            filter,
        } => {
            let files = trail.files()?;
            let matcher = Matcher::new(filter, SystemTime::now())?;
            let mut last = std::collections::VecDeque::with_capacity(*lines);
            read(&files, |record| {
                if matcher.matches(&record) {
                    if last.len() == *lines {
                        last.pop_front();
                    }
                    if *lines > 0 {
                        last.push_back(record);
                    }
                }
            })?;
            for record in &last {
                print(record, trail.json);
            }
            if *follow {
                follow_trail(&files, &matcher, trail.json)?;
            }
            Ok(0)
        }
        Action::Query { trail, filter } => {
            let matcher = Matcher::new(filter, SystemTime::now())?;
            read(&trail.files()?, |record| {
                if matcher.matches(&record) {
                    print(&record, trail.json);
                }
            })?;
            Ok(0)
        }
    }
}

/// Verifies the trail in `files`, or each replica's trail among them
/// (told apart by the replica its records name); 1 if any is broken.
/// A trail verified against a head held elsewhere names the replica it
/// is the head of when the files hold several replicas' trails.
fn verify(files: &[PathBuf], heads: &[chain::Anchor]) -> Result<i32> {
    let trails = chain::verify_replicas(files, heads)?;
    if heads.iter().any(|h| h.replica.is_none()) && trails.len() > 1 {
        bail!(
            "these files hold {} replicas' trails: name the replica a head is of (--head REPLICA=SEQ:HASH)",
            trails.len()
        );
    }
    let mut code = 0;
    for (replica, verified) in trails {
        let whose = replica.map_or_else(String::new, |r| format!("replica {r}: "));
        if verified.intact() {
            let anchored = if heads.is_empty() {
                ""
            } else {
                ", and holds the head kept elsewhere"
            };
            println!(
                "{whose}ok: {} records in {} file(s), unbroken{anchored}; head is record {} ({})",
                verified.records,
                verified.files.len(),
                verified.head.seq,
                verified.head.hash
            );
            continue;
        }
        code = 1;
        for broken in &verified.breaks {
            println!("{whose}BROKEN at {broken}");
        }
        if verified.more_breaks > 0 {
            println!("{whose}… and {} more breaks", verified.more_breaks);
        }
        println!(
            "{whose}{} records checked in {} file(s); {} break(s)",
            verified.records,
            verified.files.len(),
            verified.breaks.len() as u64 + verified.more_breaks
        );
    }
    Ok(code)
}

/// Prints the head of each trail in `files`; 1 if one is broken (its head
/// vouches for nothing).
fn head(files: &[PathBuf]) -> Result<i32> {
    let mut code = 0;
    for (replica, verified) in chain::verify_replicas(files, &[])? {
        let whose = replica
            .as_ref()
            .map_or_else(String::new, |r| format!("{r}="));
        match verified.breaks.first() {
            None => println!("{whose}{}:{}", verified.head.seq, verified.head.hash),
            Some(broken) => {
                eprintln!(
                    "the trail is broken, so it has no head to keep: {broken} (see portcullis audit verify)"
                );
                code = 1;
            }
        }
    }
    Ok(code)
}

impl Trail {
    /// The files to read, oldest first.
    fn files(&self) -> Result<Vec<PathBuf>> {
        if !self.files.is_empty() {
            return Ok(self.files.clone());
        }
        let Some(config) = &self.config else {
            bail!("name the trail's files, or --config to read its file sinks");
        };
        let config = Config::load(config)?;
        let mut files = Vec::new();
        for sink in &config.audit.sinks {
            if let SinkConfig::File { path, .. } = sink {
                files.extend(audit::rotated_files(path));
                files.push(path.clone());
            }
        }
        if files.is_empty() {
            bail!("{}: no file sink in [audit]", config.path.display());
        }
        Ok(files)
    }
}

/// Hands `each` every record of `files`, in order, line by line; a line
/// that is no record is named on stderr and skipped.
fn read(files: &[PathBuf], mut each: impl FnMut(Value)) -> Result<()> {
    for file in files {
        for line in audit::lines::of(file)? {
            let (number, line) = line?;
            let record = match line {
                audit::lines::Line::Text(text) => {
                    serde_json::from_str(&text).map_err(|e| format!("not a JSON record ({e})"))
                }
                audit::lines::Line::Unreadable(why) => Err(why),
            };
            match record {
                Ok(record) => each(record),
                Err(why) => eprintln!("{}:{number}: skipped: {why}", file.display()),
            }
        }
    }
    Ok(())
}

/// Prints records that are written to the last of `files` from now on.
fn follow_trail(files: &[PathBuf], matcher: &Matcher, json: bool) -> Result<()> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    let path = files.last().context("no file to follow")?;
    let mut reader = BufReader::new(std::fs::File::open(path)?);
    reader.seek(SeekFrom::End(0))?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || !line.ends_with('\n') {
            std::thread::sleep(Duration::from_millis(200));
            // A rotated file: start over on the new one.
            if std::fs::metadata(path).map_or(0, |m| m.len()) < reader.stream_position()? {
                reader = BufReader::new(std::fs::File::open(path)?);
            }
            continue;
        }
        if let Ok(record) = serde_json::from_str::<Value>(&line)
            && matcher.matches(&record)
        {
            print(&record, json);
        }
    }
}

/// A [`Filter`], ready to match.
struct Matcher {
    since: Option<String>,
    until: Option<String>,
    globs: Vec<(&'static str, WildMatch)>,
    outcome: Option<String>,
    event: Option<String>,
}

impl Matcher {
    fn new(filter: &Filter, now: SystemTime) -> Result<Self> {
        let globs = [
            ("agent", &filter.agent),
            ("server", &filter.server),
            ("tool", &filter.tool),
        ]
        .into_iter()
        .filter_map(|(field, glob)| glob.as_ref().map(|g| (field, WildMatch::new(g))))
        .collect();
        Ok(Self {
            since: filter
                .since
                .as_deref()
                .map(|t| instant(t, now))
                .transpose()?,
            until: filter
                .until
                .as_deref()
                .map(|t| instant(t, now))
                .transpose()?,
            globs,
            outcome: filter.outcome.clone(),
            event: filter.event.clone(),
        })
    }

    fn matches(&self, record: &Value) -> bool {
        let time = record["time"].as_str().unwrap_or_default();
        self.since.as_deref().is_none_or(|since| time >= since)
            && self.until.as_deref().is_none_or(|until| time <= until)
            && self.globs.iter().all(|(field, glob)| {
                record[*field]
                    .as_str()
                    .is_some_and(|value| glob.matches(value))
            })
            && self
                .outcome
                .as_deref()
                .is_none_or(|o| record["outcome"].as_str() == Some(o))
            && self
                .event
                .as_deref()
                .is_none_or(|e| record["event"].as_str() == Some(e))
    }
}

/// A time given as RFC 3339 or as an age before `now`, as the RFC 3339 text
/// records carry (UTC, so text order is time order).
fn instant(text: &str, now: SystemTime) -> Result<String> {
    let at = match humantime::parse_duration(text) {
        Ok(age) => now - age,
        Err(_) => humantime::parse_rfc3339_weak(text)
            .with_context(|| format!("'{text}' is neither a time (RFC 3339) nor an age (15m)"))?,
    };
    Ok(humantime::format_rfc3339_micros(at).to_string())
}

/// Prints one record: as JSON, or as a table row.
fn print(record: &Value, json: bool) {
    if json {
        println!("{record}");
    } else {
        println!("{}", row(record));
    }
}

/// One record as a table row: time, what happened, who, where, why.
fn row(record: &Value) -> String {
    let text = |field: &str| record[field].as_str().unwrap_or("");
    let time = text("time")
        .get(..19)
        .unwrap_or(text("time"))
        .replace('T', " ");
    let what = match record["event"].as_str() {
        Some(event) => match record["state"].as_str() {
            Some(state) => format!("{event}:{state}"),
            None => event.to_string(),
        },
        None => text("outcome").to_string(),
    };
    let call = match (record["tool"].as_str(), record["method"].as_str()) {
        (Some(tool), _) => tool.to_string(),
        (None, Some(method)) => method.to_string(),
        _ => String::new(),
    };
    let why = record["reason"]
        .as_str()
        .or(record["comment"].as_str())
        .or(record["decided_by"].as_str())
        .unwrap_or("");
    let mut why: String = why.chars().take(60).collect();
    if why.len() < record["reason"].as_str().map_or(0, str::len) {
        why.push('…');
    }
    format!(
        "{time}  {what:<18}  {:<14}  {:<12}  {call:<24}  {why}",
        text("agent"),
        text("server")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_filter_matches_by_time_name_globs_and_outcome() {
        let now = humantime::parse_rfc3339("2026-11-24T12:00:00Z").unwrap();
        let filter = Filter {
            since: Some("1h".into()),
            agent: Some("ci-*".into()),
            outcome: Some("deny".into()),
            ..Filter::default()
        };
        let matcher = Matcher::new(&filter, now).unwrap();
        let record = |time: &str, agent: &str, outcome: &str| json!({ "time": time, "agent": agent, "outcome": outcome, "server": "fs" });
        assert!(matcher.matches(&record("2026-11-24T11:30:00.000000Z", "ci-bot", "deny")));
        assert!(!matcher.matches(&record("2026-11-24T10:30:00.000000Z", "ci-bot", "deny")));
        assert!(!matcher.matches(&record("2026-11-24T11:30:00.000000Z", "dev", "deny")));
        assert!(!matcher.matches(&record("2026-11-24T11:30:00.000000Z", "ci-bot", "allow")));
    }

    #[test]
    fn a_row_says_when_what_who_where_and_why() {
        let record = json!({
            "time": "2026-11-24T11:30:00.123456Z", "outcome": "deny", "agent": "ci-bot",
            "server": "fs", "tool": "write_file", "reason": "read-only"
        });
        let shown = row(&record);
        assert!(shown.starts_with("2026-11-24 11:30:00  deny"), "{shown}");
        assert!(
            shown.contains("write_file") && shown.ends_with("read-only"),
            "{shown}"
        );
        let event = json!({ "time": "2026-11-24T11:31:00Z", "event": "approval", "state": "approved",
                            "agent": "ci-bot", "server": "fs", "decided_by": "alice" });
        assert!(row(&event).contains("approval:approved"));
    }
}
