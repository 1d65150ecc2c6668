//! Fixture coverage: which of a policy's rules its fixtures exercised. A
//! policy that reports coverage (the Rego, Cedar and CEL components, given
//! `coverage = true`) logs one `coverage {"all": […], "hit": […]}` line per
//! evaluation: every rule it has, and those this message exercised. This
//! module gathers those lines across fixtures and writes the report; it
//! never changes a verdict.

use crate::policy::engine::LogLine;
use serde::Deserialize;
use std::collections::BTreeSet;

/// The prefix of a coverage log line.
const PREFIX: &str = "coverage ";

/// One evaluation's coverage line.
#[derive(Deserialize)]
struct Line {
    all: Vec<String>,
    hit: Vec<String>,
}

/// What the fixtures exercised so far.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Every rule, in the order the policy names them.
    all: Vec<String>,
    /// The rules some evaluation exercised.
    hit: BTreeSet<String>,
    /// Coverage lines that could not be read (e.g. cut at the log line cap).
    unreadable: usize,
}

impl Coverage {
    /// Takes in the coverage lines among one evaluation's logs.
    pub fn add(&mut self, logs: &[LogLine]) {
        for log in logs {
            let Some(json) = log.message.strip_prefix(PREFIX) else {
                continue;
            };
            match serde_json::from_str::<Line>(json) {
                Ok(line) => {
                    for rule in line.all {
                        if !self.all.contains(&rule) {
                            self.all.push(rule);
                        }
                    }
                    self.hit.extend(line.hit);
                }
                Err(_) => self.unreadable += 1,
            }
        }
    }

    /// The report, one line per fact.
    pub fn report(&self) -> String {
        if self.all.is_empty() && self.unreadable == 0 {
            return "coverage: the policy reported none (the rego, cedar and cel components do)\n"
                .into();
        }
        let exercised = self.all.iter().filter(|r| self.hit.contains(*r)).count();
        let mut out = format!(
            "coverage: {exercised} of {} rules exercised by the fixtures\n",
            self.all.len()
        );
        for rule in self.all.iter().filter(|r| !self.hit.contains(*r)) {
            out += &format!("  not exercised: {rule}\n");
        }
        if self.unreadable > 0 {
            out += &format!(
                "  {} coverage lines could not be read (longer than a policy's log line may be)\n",
                self.unreadable
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(message: &str) -> LogLine {
        LogLine {
            level: "debug",
            message: message.into(),
        }
    }

    #[test]
    fn rules_no_fixture_exercised_are_named() {
        let mut coverage = Coverage::default();
        coverage.add(&[
            log(r#"coverage {"all": ["a", "b", "c"], "hit": ["a"]}"#),
            log("something else"),
        ]);
        coverage.add(&[log(r#"coverage {"all": ["a", "b", "c"], "hit": ["c"]}"#)]);
        assert_eq!(
            coverage.report(),
            "coverage: 2 of 3 rules exercised by the fixtures\n  not exercised: b\n"
        );
    }

    #[test]
    fn a_policy_without_coverage_or_a_cut_line_says_so() {
        assert!(Coverage::default().report().contains("reported none"));
        let mut cut = Coverage::default();
        cut.add(&[log(r#"coverage {"all": ["a", "#)]);
        assert!(cut.report().contains("1 coverage lines could not be read"));
    }
}
