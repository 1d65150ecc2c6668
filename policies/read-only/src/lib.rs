//! Read-only: refuses every tool the server does not annotate
//! `readOnlyHint: true`. `allow` names tools to permit anyway, `deny` tools to
//! refuse anyway; with `hide`, refused tools vanish from `tools/list`.

use portcullis_policy::{
    Exchange, Globs, Policy, Value, Verdict, declared_read_only, filter_tools,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    allow: Globs,
    #[serde(default)]
    deny: Globs,
    #[serde(default = "yes")]
    hide: bool,
}

fn yes() -> bool {
    true
}

impl Settings {
    fn permits(&self, tool: &str, read_only: bool) -> bool {
        !self.deny.matches(tool) && (read_only || self.allow.matches(tool))
    }
}

struct ReadOnly;

impl Policy for ReadOnly {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !exchange.is_tool_call() {
            return Verdict::allow();
        }
        let tool = exchange.tool.as_deref().unwrap_or("");
        if settings.permits(tool, exchange.is_read_only()) {
            return Verdict::allow();
        }
        let why = if settings.deny.matches(tool) {
            "is on the deny list"
        } else {
            "is not declared read-only (readOnlyHint)"
        };
        Verdict::deny(format!("tool '{tool}' {why}")).tag("write-refused")
    }

    fn on_response(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !settings.hide || !exchange.is_tool_list_result() {
            return Verdict::allow();
        }
        let Some(result) = exchange.result_json() else {
            return Verdict::allow();
        };
        let visible = |tool: &Value| {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or("");
            settings.permits(name, declared_read_only(tool))
        };
        match filter_tools(&result, visible) {
            Some(filtered) => Verdict::modify(&filtered).tag("tools-hidden"),
            None => Verdict::allow(),
        }
    }
}

portcullis_policy::export!(ReadOnly);
