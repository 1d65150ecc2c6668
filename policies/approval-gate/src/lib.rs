//! Approval gate: a call to a destructive tool needs a person's approval.
//! Destructive means named in `tools`, or — with `annotations` (the default) —
//! not read-only and not `destructiveHint: false`, as MCP defines the hints.

use portcullis_policy::{Exchange, Globs, Policy, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    tools: Globs,
    #[serde(default = "yes")]
    annotations: bool,
}

fn yes() -> bool {
    true
}

struct ApprovalGate;

impl Policy for ApprovalGate {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !exchange.is_tool_call() {
            return Verdict::allow();
        }
        let tool = exchange.tool.as_deref().unwrap_or("");
        let named = settings.tools.matches(tool);
        if !(named || settings.annotations && exchange.is_destructive()) {
            return Verdict::allow();
        }
        let why = if named {
            "is listed as high-impact"
        } else {
            "may be destructive"
        };
        Verdict::require_approval(format!("tool '{tool}' on '{}' {why}", exchange.server))
            .tag("risk:destructive")
    }
}

portcullis_policy::export!(ApprovalGate);
