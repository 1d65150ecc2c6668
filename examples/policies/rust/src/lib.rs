//! The reference policy in Rust: read-only, plus an argument rule, plus a tag.

use portcullis_policy::{Exchange, Level, Policy, Verdict, log};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    roots: Vec<String>,
}

impl Settings {
    fn inside_roots(&self, path: &str) -> bool {
        self.roots.iter().any(|root| {
            let root = root.trim_end_matches('/');
            path == root
                || path
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

struct Reference;

impl Policy for Reference {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !exchange.is_tool_call() {
            return Verdict::allow();
        }
        let tool = exchange.tool.as_deref().unwrap_or("");
        if !exchange.is_read_only() && !settings.allow.iter().any(|a| a == tool) {
            log(Level::Info, &format!("refusing {tool}"));
            let reason = format!("tool '{tool}' is not declared read-only (readOnlyHint)");
            return Verdict::deny(reason).tag("write-refused");
        }
        let arguments = exchange.arguments();
        if let Some(path) = arguments.get("path").and_then(|p| p.as_str())
            && !settings.roots.is_empty()
            && !settings.inside_roots(path)
        {
            let reason = format!("argument 'path' path '{path}' is outside the allowed roots");
            return Verdict::deny(reason).tag("bad-arguments");
        }
        Verdict::allow().tag("checked")
    }
}

portcullis_policy::export!(Reference);
