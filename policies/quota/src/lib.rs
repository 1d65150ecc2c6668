//! Quota: at most `calls` tool calls per `window_secs` seconds, counted in
//! Portcullis' store, so the count survives new instances and reloads. The
//! window is fixed: it starts with the first call counted and the counter
//! expires with it. A call over the quota is refused and tagged `quota`.
//!
//! Settings:
//! - `calls` (required, > 0): calls allowed per window;
//! - `window_secs` (required, > 0): the window's length in seconds;
//! - `per` (default `["agent"]`): what each counter is kept for, any of
//!   `"agent"`, `"server"` and `"tool"`; `[]` keeps one counter for all calls;
//! - `tools` (default `["*"]`): globs of the tools that count; calls to other
//!   tools pass uncounted.

use portcullis_policy::{Exchange, Globs, Policy, Verdict, store};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    calls: u64,
    window_secs: u64,
    #[serde(default = "per_agent")]
    per: Vec<Part>,
    #[serde(default = "everything")]
    tools: Globs,
}

/// What a counter may be kept for.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Part {
    Agent,
    Server,
    Tool,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Agent => "agent",
            Part::Server => "server",
            Part::Tool => "tool",
        }
    }
}

fn per_agent() -> Vec<Part> {
    vec![Part::Agent]
}

fn everything() -> Globs {
    Globs::new(&["*"])
}

/// The values a counter is keyed on: agent, server and tool of the call.
struct Call<'a> {
    agent: &'a str,
    server: &'a str,
    tool: &'a str,
}

impl Call<'_> {
    fn value(&self, part: Part) -> &str {
        match part {
            Part::Agent => self.agent,
            Part::Server => self.server,
            Part::Tool => self.tool,
        }
    }
}

impl Settings {
    /// The window in milliseconds, the counters' time to live.
    fn window_ms(&self) -> Option<u64> {
        self.window_secs.checked_mul(1000)
    }

    /// The store key of the counter `call` counts against: each part of
    /// `per` with its value, as JSON so no value can pass for another.
    fn key(&self, call: &Call) -> String {
        let parts: Vec<[&str; 2]> = self
            .per
            .iter()
            .map(|&part| [part.as_str(), call.value(part)])
            .collect();
        let parts = serde_json::to_string(&parts).unwrap_or_default();
        format!("calls:{parts}")
    }

    /// Who the counter is kept for, e.g. `agent 'ci-bot' and tool 'search'`.
    fn scope(&self, call: &Call) -> String {
        let named: Vec<String> = self
            .per
            .iter()
            .map(|&part| format!("{} '{}'", part.as_str(), call.value(part)))
            .collect();
        match named.as_slice() {
            [] => "all calls".into(),
            [one] => one.clone(),
            [first @ .., last] => format!("{} and {last}", first.join(", ")),
        }
    }

    /// The verdict on a call that is number `count` of its window.
    fn verdict(&self, call: &Call, count: i64) -> Verdict {
        if u64::try_from(count).is_ok_and(|n| n <= self.calls) || count <= 0 {
            return Verdict::allow();
        }
        Verdict::deny(format!(
            "quota of {} calls per {} s used up for {}",
            self.calls,
            self.window_secs,
            self.scope(call)
        ))
        .tag("quota")
    }
}

/// Counts one call against `key` in Portcullis' store; a new counter expires
/// after `window_ms`.
fn count(key: &str, window_ms: u64) -> i64 {
    store::increment(key, 1, Some(window_ms))
}

struct Quota;

impl Policy for Quota {
    type Settings = Settings;

    fn check(settings: &Settings) -> Result<(), String> {
        if settings.calls == 0 {
            return Err("calls must be greater than 0".into());
        }
        if settings.window_secs == 0 {
            return Err("window_secs must be greater than 0".into());
        }
        if settings.window_ms().is_none() {
            return Err("window_secs is too large".into());
        }
        for (i, part) in settings.per.iter().enumerate() {
            if settings.per[..i].contains(part) {
                return Err(format!("per names '{}' twice", part.as_str()));
            }
        }
        Ok(())
    }

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        let tool = exchange.tool.as_deref().unwrap_or("");
        if !exchange.is_tool_call() || !settings.tools.matches(tool) {
            return Verdict::allow();
        }
        let call = Call {
            agent: &exchange.agent.id,
            server: &exchange.server,
            tool,
        };
        let window_ms = settings.window_ms().unwrap_or(u64::MAX);
        settings.verdict(&call, count(&settings.key(&call), window_ms))
    }
}

portcullis_policy::export!(Quota);

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_policy::Outcome;

    fn settings(json: &str) -> Result<Settings, String> {
        portcullis_policy::configure::<Quota>(json)
    }

    const CALL: Call = Call {
        agent: "ci-bot",
        server: "fs",
        tool: "read_file",
    };

    #[test]
    fn settings_are_validated() {
        assert!(settings(r#"{"window_secs": 60}"#).is_err());
        assert!(settings(r#"{"calls": 0, "window_secs": 60}"#).is_err());
        assert!(settings(r#"{"calls": 5, "window_secs": 0}"#).is_err());
        assert!(settings(r#"{"calls": 5, "window_secs": 18446744073709551615}"#).is_err());
        assert!(settings(r#"{"calls": 5, "window_secs": 60, "per": ["user"]}"#).is_err());
        assert!(settings(r#"{"calls": 5, "window_secs": 60, "per": ["tool", "tool"]}"#).is_err());
        assert!(settings(r#"{"calls": 5, "window_secs": 60, "limit": 1}"#).is_err());
        let s = settings(r#"{"calls": 5, "window_secs": 60}"#).unwrap();
        assert_eq!(s.per, [Part::Agent]);
        assert!(s.tools.matches("anything"));
        assert_eq!(s.window_ms(), Some(60_000));
    }

    #[test]
    fn keys_follow_per() {
        let by_agent = settings(r#"{"calls": 5, "window_secs": 60}"#).unwrap();
        assert_eq!(by_agent.key(&CALL), r#"calls:[["agent","ci-bot"]]"#);
        let by_tool = settings(r#"{"calls": 5, "window_secs": 60, "per": ["server", "tool"]}"#);
        assert_eq!(
            by_tool.unwrap().key(&CALL),
            r#"calls:[["server","fs"],["tool","read_file"]]"#
        );
        let global = settings(r#"{"calls": 5, "window_secs": 60, "per": []}"#).unwrap();
        assert_eq!(global.key(&CALL), "calls:[]");
    }

    #[test]
    fn calls_over_the_quota_are_refused_naming_the_counter() {
        let s = settings(r#"{"calls": 5, "window_secs": 60}"#).unwrap();
        assert!(matches!(s.verdict(&CALL, 1).outcome, Outcome::Allow));
        assert!(matches!(s.verdict(&CALL, 5).outcome, Outcome::Allow));
        let over = s.verdict(&CALL, 6);
        let Outcome::Deny(denial) = &over.outcome else {
            panic!("expected deny");
        };
        assert_eq!(
            denial.reason,
            "quota of 5 calls per 60 s used up for agent 'ci-bot'"
        );
        assert_eq!(over.tags, ["quota"]);
    }

    #[test]
    fn the_scope_names_every_part() {
        let all = r#"{"calls": 1, "window_secs": 1, "per": ["agent", "server", "tool"]}"#;
        assert_eq!(
            settings(all).unwrap().scope(&CALL),
            "agent 'ci-bot', server 'fs' and tool 'read_file'"
        );
        let global = settings(r#"{"calls": 1, "window_secs": 1, "per": []}"#).unwrap();
        assert_eq!(global.scope(&CALL), "all calls");
    }
}
