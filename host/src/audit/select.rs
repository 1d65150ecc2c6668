//! A sink's own share of the trail: which records it gets (by outcome,
//! event, server and agent) and which fields are removed from them before it
//! writes them — so one sink can keep everything while another, say, gets
//! only denials without their arguments.

use super::Sink;
use crate::config::RecordFilter;
use anyhow::Result;
use serde_json::Value;
use wildmatch::WildMatch;

/// A [`RecordFilter`] and redactions, ready to apply.
pub struct Selection {
    outcomes: Vec<String>,
    events: Vec<String>,
    servers: Vec<WildMatch>,
    agents: Vec<WildMatch>,
    redact: Vec<Vec<String>>,
}

impl Selection {
    /// The selection `only` and `redact` describe; `None` when it takes
    /// every record whole.
    pub fn new(only: &RecordFilter, redact: &[String]) -> Option<Self> {
        if only.is_empty() && redact.is_empty() {
            return None;
        }
        let globs = |patterns: &[String]| patterns.iter().map(|p| WildMatch::new(p)).collect();
        Some(Self {
            outcomes: only.outcomes.clone(),
            events: only.events.clone(),
            servers: globs(&only.servers),
            agents: globs(&only.agents),
            redact: redact
                .iter()
                .map(|path| path.split('.').map(str::to_string).collect())
                .collect(),
        })
    }

    /// Whether `record` is one this sink takes: each list it has must name
    /// the record's value; a record without the field (an event without an
    /// outcome, a reload without a server) is not held to that list.
    fn takes(&self, record: &Value) -> bool {
        let listed = |list: &[String], field: &str| match record[field].as_str() {
            Some(value) => list.is_empty() || list.iter().any(|l| l == value),
            None => true,
        };
        let globbed = |globs: &[WildMatch], field: &str| match record[field].as_str() {
            Some(value) => globs.is_empty() || globs.iter().any(|g| g.matches(value)),
            None => true,
        };
        listed(&self.outcomes, "outcome")
            && listed(&self.events, "event")
            && globbed(&self.servers, "server")
            && globbed(&self.agents, "agent")
    }

    /// `record` without the redacted fields.
    fn redacted(&self, mut record: Value) -> Value {
        for path in &self.redact {
            remove(&mut record, path);
        }
        record
    }
}

fn remove(value: &mut Value, path: &[String]) {
    match path {
        [] => {}
        [last] => {
            if let Some(object) = value.as_object_mut() {
                object.remove(last);
            }
        }
        [first, rest @ ..] => {
            if let Some(inner) = value.get_mut(first) {
                remove(inner, rest);
            }
        }
    }
}

/// A sink behind a [`Selection`].
pub struct Selected {
    sink: Box<dyn Sink>,
    selection: Selection,
}

impl Selected {
    /// `sink`, getting only what `selection` takes.
    pub fn new(sink: Box<dyn Sink>, selection: Selection) -> Self {
        Self { sink, selection }
    }
}

impl Sink for Selected {
    fn write(&self, line: &str) -> Result<()> {
        let record: Value = serde_json::from_str(line)?;
        if !self.selection.takes(&record) {
            return Ok(());
        }
        if self.selection.redact.is_empty() {
            return self.sink.write(line);
        }
        let mut redacted = serde_json::to_string(&self.selection.redacted(record))?;
        redacted.push('\n');
        self.sink.write(&redacted)
    }

    fn head(&self) -> Option<(std::path::PathBuf, super::chain::Head)> {
        self.sink.head()
    }

    fn delivers(&self) -> bool {
        self.sink.delivers()
    }

    fn describe(&self) -> String {
        format!("{} (selected)", self.sink.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sink_takes_its_records_without_the_redacted_fields() {
        let only = RecordFilter {
            outcomes: vec!["deny".into()],
            servers: vec!["prod-*".into()],
            ..RecordFilter::default()
        };
        let redact = [
            "arguments".to_string(),
            "agent_attributes.email".to_string(),
        ];
        let selection = Selection::new(&only, &redact).unwrap();
        let denied = json!({
            "outcome": "deny", "server": "prod-db", "agent": "bot",
            "arguments": {"sql": "drop"}, "agent_attributes": {"email": "a@b", "team": "x"}
        });
        assert!(selection.takes(&denied));
        assert!(!selection.takes(&json!({"outcome": "allow", "server": "prod-db"})));
        assert!(!selection.takes(&json!({"outcome": "deny", "server": "dev"})));
        assert!(
            selection.takes(&json!({"event": "reload"})),
            "events are not filtered by outcome"
        );
        assert_eq!(
            selection.redacted(denied),
            json!({"outcome": "deny", "server": "prod-db", "agent": "bot", "agent_attributes": {"team": "x"}})
        );
        assert!(Selection::new(&RecordFilter::default(), &[]).is_none());
    }
}
