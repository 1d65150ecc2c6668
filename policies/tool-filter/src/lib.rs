//! Tool allow/deny lists by server and tool glob. A tool is callable when some
//! rule for its server allows it and none denies it; with `hide`, tools an
//! agent may not call are also removed from `tools/list` results.

use portcullis_policy::{Exchange, Globs, Policy, Value, Verdict, filter_tools};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    rules: Vec<Rule>,
    #[serde(default = "yes")]
    hide: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default = "everything")]
    server: Globs,
    #[serde(default = "everything")]
    allow: Globs,
    #[serde(default)]
    deny: Globs,
}

fn yes() -> bool {
    true
}

fn everything() -> Globs {
    Globs::new(&["*"])
}

impl Settings {
    fn verdict(&self, server: &str, tool: &str) -> Result<(), String> {
        let rules: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.server.matches(server))
            .collect();
        if rules.iter().any(|r| r.deny.matches(tool)) {
            return Err(format!("tool '{tool}' is denied on server '{server}'"));
        }
        if rules.iter().any(|r| r.allow.matches(tool)) {
            return Ok(());
        }
        Err(format!("tool '{tool}' is not allowed on server '{server}'"))
    }
}

struct ToolFilter;

impl Policy for ToolFilter {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        if !exchange.is_tool_call() {
            return Verdict::allow();
        }
        let Some(tool) = exchange.tool.as_deref() else {
            return Verdict::deny("tools/call without a tool name");
        };
        match settings.verdict(&exchange.server, tool) {
            Ok(()) => Verdict::allow(),
            Err(reason) => Verdict::deny(reason),
        }
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
            settings.verdict(&exchange.server, name).is_ok()
        };
        match filter_tools(&result, visible) {
            Some(filtered) => Verdict::modify(&filtered).tag("tools-hidden"),
            None => Verdict::allow(),
        }
    }
}

portcullis_policy::export!(ToolFilter);
