//! Drift guard: judges tool calls by how the tool drifted from its pinned
//! definition, as Portcullis' lock file comparison reports it (the `surface`
//! import). `deny` lists the drift kinds that refuse a call (default:
//! `escalated`, a tool that lost its read-only or non-destructive claim);
//! `require_approval` the kinds that hold it for a person; `tools` the tools
//! it judges. Pair it with `[pinning] on_drift = "alert"` to let drifted
//! tools stay listed while this policy decides what a drift means.

use portcullis_policy::{Exchange, Globs, Policy, ToolDrift, Verdict, drift};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "escalated")]
    deny: Vec<String>,
    #[serde(default)]
    require_approval: Vec<String>,
    #[serde(default = "everything")]
    tools: Globs,
}

fn escalated() -> Vec<String> {
    vec!["escalated".into()]
}

fn everything() -> Globs {
    Globs::new(&["*"])
}

/// A drift kind's name, as in the config and audit records.
const KINDS: [&str; 6] = [
    "added",
    "removed",
    "description",
    "schema",
    "annotations",
    "escalated",
];

/// What the settings make of a tool's drift kinds.
fn judge(settings: &Settings, tool: &str, kinds: &[&str]) -> Verdict {
    let hits = |listed: &[String]| -> Vec<&str> {
        kinds
            .iter()
            .copied()
            .filter(|k| listed.iter().any(|l| l == k))
            .collect()
    };
    let denied = hits(&settings.deny);
    if !denied.is_empty() {
        let why = format!(
            "tool '{tool}' drifted from its pinned definition ({})",
            denied.join(", ")
        );
        return Verdict::deny(why).tag("drift-refused");
    }
    let held = hits(&settings.require_approval);
    if !held.is_empty() {
        let why = format!(
            "tool '{tool}' drifted from its pinned definition ({})",
            held.join(", ")
        );
        return Verdict::require_approval(why).tag("drift-held");
    }
    Verdict::allow()
}

/// The kinds of the drift reported for `tool`.
fn kinds_of(drift: &[ToolDrift], tool: &str) -> Vec<&'static str> {
    drift
        .iter()
        .filter(|d| d.tool == tool)
        .flat_map(|d| d.kinds.iter().map(|k| k.as_str()))
        .collect()
}

struct DriftGuard;

impl Policy for DriftGuard {
    type Settings = Settings;

    fn check(settings: &Settings) -> Result<(), String> {
        let unknown = settings
            .deny
            .iter()
            .chain(&settings.require_approval)
            .find(|k| !KINDS.contains(&k.as_str()));
        match unknown {
            Some(kind) => Err(format!(
                "unknown drift kind '{kind}' (use {})",
                KINDS.join(", ")
            )),
            None => Ok(()),
        }
    }

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        let Some(tool) = exchange.tool.as_deref().filter(|_| exchange.is_tool_call()) else {
            return Verdict::allow();
        };
        if !settings.tools.matches(tool) {
            return Verdict::allow();
        }
        judge(settings, tool, &kinds_of(&drift(), tool))
    }
}

portcullis_policy::export!(DriftGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_policy::Outcome;

    fn settings(json: &str) -> Settings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn listed_kinds_deny_or_hold_and_others_pass() {
        let s = settings(r#"{"require_approval": ["schema"]}"#);
        let denied = judge(&s, "rm", &["annotations", "escalated"]);
        assert!(
            matches!(denied.outcome, Outcome::Deny(ref d) if d.reason == "tool 'rm' drifted from its pinned definition (escalated)")
        );
        assert!(matches!(
            judge(&s, "rm", &["schema"]).outcome,
            Outcome::RequireApproval(_)
        ));
        assert!(matches!(
            judge(&s, "rm", &["description"]).outcome,
            Outcome::Allow
        ));
        assert!(matches!(judge(&s, "rm", &[]).outcome, Outcome::Allow));
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let bad = settings(r#"{"deny": ["sideways"]}"#);
        let err = DriftGuard::check(&bad).unwrap_err();
        assert!(err.contains("unknown drift kind 'sideways'"), "{err}");
        assert!(DriftGuard::check(&settings("{}")).is_ok());
    }
}
