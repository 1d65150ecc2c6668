//! Method allow/deny lists by JSON-RPC method glob, in both directions: e.g.
//! refuse `sampling/*` requests a server makes of the client, or every
//! `resources/*` call an agent makes. Answers are always let through (their
//! request was already judged).

use portcullis_policy::{Exchange, Globs, MessageKind, Policy, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "everything")]
    allow: Globs,
    #[serde(default)]
    deny: Globs,
}

fn everything() -> Globs {
    Globs::new(&["*"])
}

fn judge(settings: &Settings, exchange: &Exchange) -> Verdict {
    if matches!(exchange.kind, MessageKind::Result | MessageKind::Error) {
        return Verdict::allow();
    }
    let method = exchange.method.as_str();
    if settings.deny.matches(method) || !settings.allow.matches(method) {
        return Verdict::deny(format!("method '{method}' is not allowed"));
    }
    Verdict::allow()
}

struct MethodFilter;

impl Policy for MethodFilter {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        judge(settings, exchange)
    }

    fn on_response(settings: &Settings, exchange: &Exchange) -> Verdict {
        judge(settings, exchange)
    }
}

portcullis_policy::export!(MethodFilter);
