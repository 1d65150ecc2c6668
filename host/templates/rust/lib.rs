//! The {{name}} policy: refuses calls to tools the server marks destructive,
//! unless its settings allow them.

use portcullis_policy::{Exchange, Level, Policy, Verdict, log};
use serde::Deserialize;

/// The `settings` table from the Portcullis config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Tools let through even though the server marks them destructive.
    #[serde(default)]
    allow: Vec<String>,
}

struct Sample;

impl Policy for Sample {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !exchange.is_tool_call() {
            return Verdict::allow();
        }
        let tool = exchange.tool.as_deref().unwrap_or("");
        let destructive = exchange
            .annotations
            .as_ref()
            .is_some_and(|a| a.destructive_hint == Some(true));
        if destructive && !settings.allow.iter().any(|allowed| allowed == tool) {
            log(Level::Info, &format!("refusing {tool}"));
            return Verdict::deny(format!("tool '{tool}' is destructive")).tag("destructive");
        }
        Verdict::allow().tag("checked")
    }
}

portcullis_policy::export!(Sample);
