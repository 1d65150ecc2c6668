//! Guest SDK for Portcullis policies written in Rust.
//!
//! It owns the WIT bindings of `portcullis:policy` and the glue that turns a
//! [`Policy`] implementation into the exported `hooks` interface, plus helpers
//! every policy needs: reading the exchange's JSON, building verdicts, matching
//! tool globs and spotting secrets. It never performs I/O.
//!
//! A whole policy:
//!
//! ```ignore
//! use portcullis_policy::{Exchange, Policy, Verdict};
//!
//! #[derive(serde::Deserialize)]
//! struct Settings { blocked: Vec<String> }
//!
//! struct Blocklist;
//! impl Policy for Blocklist {
//!     type Settings = Settings;
//!     fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
//!         match exchange.tool.as_deref() {
//!             Some(tool) if settings.blocked.iter().any(|b| b == tool) => Verdict::deny("blocked tool"),
//!             _ => Verdict::allow(),
//!         }
//!     }
//! }
//! portcullis_policy::export!(Blocklist);
//! ```

extern crate self as portcullis_policy;

pub mod coverage;
pub mod document;
pub mod secrets;

wit_bindgen::generate!({
    path: "../../wit",
    world: "policy",
    pub_export_macro: true,
    export_macro_name: "__export_hooks",
    default_bindings_module: "::portcullis_policy",
    runtime_path: "::portcullis_policy::__wit_bindgen::rt",
    additional_derives: [PartialEq],
});

#[doc(hidden)]
pub use exports::portcullis::policy::hooks::Guest as __Guest;
pub use portcullis::policy::log::{Level, log};
/// Counters and values kept by Portcullis for this policy (`get`, `set`,
/// `increment` with a time to live).
pub use portcullis::policy::store;
/// How the tools a message concerns differ from their pinned definitions.
pub use portcullis::policy::surface::{DriftKind, ToolDrift, drift};
pub use portcullis::policy::types::{
    Agent, Denial, Direction, Exchange, MessageKind, Outcome, ToolAnnotations, Verdict,
};
#[doc(hidden)]
pub use serde_json as __serde_json;
pub use serde_json::Value;
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The JSON-RPC error code Portcullis' policies use for a refusal.
pub const DENIED: i32 = -32001;

/// A policy: settings parsed once per instance, and two hooks.
pub trait Policy {
    /// The policy's settings, deserialized from the `settings` table of its
    /// entry in the Portcullis config.
    type Settings: serde::de::DeserializeOwned;

    /// Further checks on parsed settings; an error stops the policy loading.
    fn check(_settings: &Self::Settings) -> Result<(), String> {
        Ok(())
    }

    /// Judge a client → server message. Allows by default.
    fn on_request(_settings: &Self::Settings, _exchange: &Exchange) -> Verdict {
        Verdict::allow()
    }

    /// Judge a server → client message. Allows by default.
    fn on_response(_settings: &Self::Settings, _exchange: &Exchange) -> Verdict {
        Verdict::allow()
    }
}

/// Parses and checks settings for `P`; used by [`export!`].
#[doc(hidden)]
pub fn configure<P: Policy>(settings: &str) -> Result<P::Settings, String> {
    let parsed: P::Settings =
        serde_json::from_str(settings).map_err(|e| format!("invalid settings: {e}"))?;
    P::check(&parsed)?;
    Ok(parsed)
}

/// Exports a [`Policy`] implementation as the component's `hooks`.
#[macro_export]
macro_rules! export {
    ($policy:ty) => {
        struct __PortcullisHooks;

        thread_local! {
            static __SETTINGS: ::core::cell::RefCell<
                ::core::option::Option<<$policy as $crate::Policy>::Settings>,
            > = const { ::core::cell::RefCell::new(None) };
        }

        fn __with_settings(
            hook: fn(&<$policy as $crate::Policy>::Settings, &$crate::Exchange) -> $crate::Verdict,
            exchange: &$crate::Exchange,
        ) -> $crate::Verdict {
            __SETTINGS.with(|cell| match &*cell.borrow() {
                Some(settings) => hook(settings, exchange),
                None => $crate::Verdict::deny("policy evaluated before configure"),
            })
        }

        impl $crate::__Guest for __PortcullisHooks {
            fn configure(settings: String) -> Result<(), String> {
                let parsed = $crate::configure::<$policy>(&settings)?;
                __SETTINGS.with(|cell| *cell.borrow_mut() = Some(parsed));
                Ok(())
            }
            fn on_request(exchange: $crate::Exchange) -> $crate::Verdict {
                __with_settings(<$policy as $crate::Policy>::on_request, &exchange)
            }
            fn on_response(exchange: $crate::Exchange) -> $crate::Verdict {
                __with_settings(<$policy as $crate::Policy>::on_response, &exchange)
            }
        }

        $crate::__export_hooks!(__PortcullisHooks with_types_in $crate);
    };
}

impl Verdict {
    /// Let the message through.
    pub fn allow() -> Self {
        Self::from(Outcome::Allow)
    }

    /// Refuse with Portcullis' usual code, [`DENIED`].
    pub fn deny(reason: impl Into<String>) -> Self {
        Self::deny_with_code(DENIED, reason)
    }

    /// Refuse with a specific JSON-RPC error code.
    pub fn deny_with_code(code: i32, reason: impl Into<String>) -> Self {
        Self::from(Outcome::Deny(Denial {
            code,
            reason: reason.into(),
        }))
    }

    /// Hold the message for a person to approve.
    pub fn require_approval(reason: impl Into<String>) -> Self {
        Self::from(Outcome::RequireApproval(reason.into()))
    }

    /// Replace the message's payload (`params`, `result` or `error`).
    pub fn modify(payload: &Value) -> Self {
        Self::from(Outcome::Modify(payload.to_string()))
    }

    /// Add an audit tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
}

impl From<Outcome> for Verdict {
    fn from(outcome: Outcome) -> Self {
        Verdict {
            outcome,
            tags: Vec::new(),
        }
    }
}

impl Direction {
    /// `client-to-server` or `server-to-client`, as audit records say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client-to-server",
            Direction::ServerToClient => "server-to-client",
        }
    }
}

impl MessageKind {
    /// `request`, `notification`, `result` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Request => "request",
            MessageKind::Notification => "notification",
            MessageKind::Result => "result",
            MessageKind::Error => "error",
        }
    }
}

impl DriftKind {
    /// The kind's name, as the config and audit records write it.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Added => "added",
            DriftKind::Removed => "removed",
            DriftKind::Description => "description",
            DriftKind::Schema => "schema",
            DriftKind::Annotations => "annotations",
            DriftKind::Escalated => "escalated",
        }
    }
}

impl Exchange {
    /// True for a `tools/call` request.
    pub fn is_tool_call(&self) -> bool {
        self.kind == MessageKind::Request && self.method == "tools/call"
    }

    /// True for the result of a `tools/list` request.
    pub fn is_tool_list_result(&self) -> bool {
        self.kind == MessageKind::Result && self.method == "tools/list"
    }

    /// The parsed `params` (of the request, or of the request being answered).
    pub fn params_json(&self) -> Option<Value> {
        parse(self.params.as_deref())
    }

    /// The parsed `result` (or `error`) member of an answer.
    pub fn result_json(&self) -> Option<Value> {
        parse(self.result.as_deref())
    }

    /// The `arguments` of a `tools/call`, or `null`.
    pub fn arguments(&self) -> Value {
        self.params_json()
            .and_then(|mut params| params.get_mut("arguments").map(Value::take))
            .unwrap_or(Value::Null)
    }

    /// The server declared the tool read-only (`readOnlyHint: true`).
    pub fn is_read_only(&self) -> bool {
        self.annotations
            .as_ref()
            .and_then(|a| a.read_only_hint)
            .unwrap_or(false)
    }

    /// The tool may be destructive, by MCP's defaults: a tool that is not
    /// read-only is destructive unless it says `destructiveHint: false`.
    pub fn is_destructive(&self) -> bool {
        let hint = self.annotations.as_ref().and_then(|a| a.destructive_hint);
        !self.is_read_only() && hint.unwrap_or(true)
    }
}

fn parse(text: Option<&str>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(t).ok())
}

/// A set of glob patterns (`*`, `?`) matched against names.
#[derive(Debug, Default, Clone)]
pub struct Globs(Vec<wildmatch::WildMatch>);

impl Globs {
    /// Compiles the patterns.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self(
            patterns
                .iter()
                .map(|p| wildmatch::WildMatch::new(p.as_ref()))
                .collect(),
        )
    }

    /// True if any pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|g| g.matches(name))
    }
}

impl<'de> serde::Deserialize<'de> for Globs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Globs::new(&Vec::<String>::deserialize(deserializer)?))
    }
}

/// Keeps only the tools of a `tools/list` result for which `keep` is true.
/// Returns `None` when nothing was removed.
pub fn filter_tools(result: &Value, mut keep: impl FnMut(&Value) -> bool) -> Option<Value> {
    let tools = result.get("tools")?.as_array()?;
    let kept: Vec<Value> = tools.iter().filter(|t| keep(t)).cloned().collect();
    if kept.len() == tools.len() {
        return None;
    }
    let mut filtered = result.clone();
    filtered["tools"] = Value::Array(kept);
    Some(filtered)
}

/// Reads a tool definition's `readOnlyHint` annotation.
pub fn declared_read_only(tool: &Value) -> bool {
    tool.pointer("/annotations/readOnlyHint")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}
