//! The checks Portcullis makes itself, before the policy chain: a request to
//! a quarantined server, a call over its rate, a call to a tool that drifted
//! from the lock file, arguments that do not fit the tool's input schema; and
//! what a `tools/list` result's drift does to it (hidden tools, a
//! quarantined server). It also keeps what those checks remember across
//! messages and reloads: the rate buckets, the quarantines, the schemas
//! compiled from listings.

use crate::config::{DriftAction, PinningConfig};
use crate::contract::Exchange;
use crate::protocol::jsonrpc::{DENIED, INVALID_PARAMS};
use crate::relay::generation::Generation;
use crate::relay::quarantine::Quarantines;
use crate::relay::session::Session;
use crate::surface::drift::{self, ToolDrift};
use crate::surface::ratelimit::{Buckets, Caller, Limited, Refusal};
use crate::surface::schema::Schemas;
use serde_json::{Map, Value, json};
use std::time::Instant;

/// JSON-RPC: a request over its rate limit.
pub const RATE_LIMITED: i32 = -32004;
/// Requests a quarantined server still answers.
const LIFECYCLE: &[&str] = &["initialize", "ping"];

/// Who refused, in audit records and error data.
pub const PINNING: &str = "portcullis:pinning";
/// Who refused a call over its rate.
pub const RATE_LIMIT: &str = "portcullis:rate-limit";
/// Who refused arguments that do not fit their schema.
pub const VALIDATION: &str = "portcullis:validation";
/// Who refused a message to a server its sender's grant does not include.
pub const GRANT: &str = "portcullis:grant";

/// A message the boundary refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Stop {
    /// The JSON-RPC error code.
    pub code: i32,
    /// Which check refused ([`PINNING`], [`RATE_LIMIT`], [`VALIDATION`],
    /// [`GRANT`]).
    pub by: &'static str,
    /// Why, for the agent and the audit trail.
    pub reason: String,
    /// What the agent gets in the error's `data` besides the reason.
    pub data: Map<String, Value>,
    /// The audit tag.
    pub tag: &'static str,
}

/// What the boundary makes of a `tools/list` result.
#[derive(Debug, PartialEq)]
pub enum Listing {
    /// Relay it as it is.
    Pass,
    /// Relay this result instead (drifted tools removed).
    Rewrite(String),
    /// Refuse it: the server is quarantined.
    Refuse(Stop),
}

/// The refusal of a call over its rate.
fn rate_stop(limited: &Limited) -> Stop {
    let ms = limited.retry_after.as_millis().max(1) as u64;
    let reason = format!(
        "Rate limit exceeded: at most {}; retry after {:.1} s",
        limited.limit,
        ms as f64 / 1000.0
    );
    let data = Map::from_iter([
        ("retryAfterMs".into(), json!(ms)),
        ("retryAfter".into(), json!(ms.div_ceil(1000))),
        ("limit".into(), json!(limited.limit)),
    ]);
    Stop {
        code: RATE_LIMITED,
        by: RATE_LIMIT,
        reason,
        data,
        tag: "rate-limited",
    }
}

/// The refusal of a message from `agent` to `server`, which its grant does
/// not include (any more: a reload narrowed it, or the message came with
/// other credentials than the session's first).
pub fn grant_stop(agent: &str, server: &str) -> Stop {
    Stop {
        code: DENIED,
        by: GRANT,
        reason: format!("agent '{agent}' may not use server '{server}' (not in its grant)"),
        data: Map::from_iter([("server".into(), json!(server))]),
        tag: "grant:refused",
    }
}

/// What the boundary remembers, for the life of the process.
#[derive(Default)]
pub struct Boundary {
    buckets: Buckets,
    /// Quarantined servers.
    quarantines: Quarantines,
    /// Input schemas from listings, compiled.
    pub schemas: Schemas,
}

impl Boundary {
    /// A boundary whose rate buckets live in the deployment's `shared`
    /// state.
    pub fn shared(shared: std::sync::Arc<crate::state::Shared>) -> Self {
        Self {
            buckets: Buckets::Shared(shared.clone()),
            quarantines: Quarantines::shared(shared),
            ..Self::default()
        }
    }

    /// Checks a request from the agent; `drift` is the drift of its tool.
    pub fn request(
        &self,
        g: &Generation,
        session: &Session,
        exchange: &Exchange,
        arguments: Option<&serde_json::value::RawValue>,
        drift: &[ToolDrift],
    ) -> Result<(), Stop> {
        let server = exchange.server.as_str();
        if let Some(why) = self.quarantined(g, server)
            && !LIFECYCLE.contains(&exchange.method.as_str())
        {
            return Err(pinning_stop(why, "quarantined", &[]));
        }
        if !g.rates.is_empty() {
            let caller = Caller {
                agent: &exchange.agent.id,
                server,
                method: &exchange.method,
                tool: exchange.tool.as_deref(),
            };
            match self.buckets.admit(&g.rates, &caller, Instant::now()) {
                Ok(()) => {}
                Err(Refusal::Limited(limited)) => return Err(rate_stop(&limited)),
                Err(Refusal::Unavailable(why)) => {
                    return Err(Stop {
                        code: RATE_LIMITED,
                        by: RATE_LIMIT,
                        reason: format!(
                            "Rate limits cannot be checked, so the call is refused: {why}"
                        ),
                        data: Map::from_iter([("retryAfter".into(), json!(1))]),
                        tag: "rate-limit-unavailable",
                    });
                }
            }
        }
        let Some(tool) = exchange.tool.as_deref() else {
            return Ok(());
        };
        if let (Some(pinning), Some(pins)) = (&g.config.pinning, &g.pins) {
            self.refuse_drifted(pinning, &pins.digest, drift)?;
        }
        if !g.config.validation.arguments {
            return Ok(());
        }
        let pinned = g
            .pins
            .as_ref()
            .and_then(|p| p.schema(server, tool))
            .cloned();
        let Some(schema) = pinned.or_else(|| session.tool_schema(tool)) else {
            return Ok(());
        };
        let arguments: Option<Value> = arguments.and_then(|a| serde_json::from_str(a.get()).ok());
        schema.check(arguments.as_ref()).map_err(|invalid| Stop {
            code: INVALID_PARAMS,
            by: VALIDATION,
            reason: invalid.message(),
            data: Map::from_iter([
                ("field".into(), json!(invalid.field)),
                ("errors".into(), json!(invalid.errors)),
            ]),
            tag: "invalid-arguments",
        })
    }

    /// A call to a drifted tool: refused when its drift hides it, and the
    /// server quarantined when it calls for that.
    fn refuse_drifted(
        &self,
        pinning: &PinningConfig,
        digest: &str,
        drift: &[ToolDrift],
    ) -> Result<(), Stop> {
        for d in drift {
            match pinning.action(&d.kinds) {
                DriftAction::Alert => {}
                DriftAction::Hide => {
                    let why = format!(
                        "Refused by Portcullis: tool '{}' differs from its pinned definition ({}); it is hidden until it is pinned again",
                        d.tool,
                        kinds(d)
                    );
                    return Err(pinning_stop(why, "drift-refused", drift));
                }
                DriftAction::DenyServer => {
                    let why = self.quarantine(&d.server, digest, d);
                    return Err(pinning_stop(why, "quarantined", drift));
                }
            }
        }
        Ok(())
    }

    /// Applies the drift of a `tools/list` result (`result` is its JSON
    /// text): drifted tools are hidden, or the server is quarantined, as the
    /// config says. Every drift is logged.
    pub fn listing(&self, g: &Generation, result: &str, drift: &[ToolDrift]) -> Listing {
        let (Some(pinning), Some(pins)) = (&g.config.pinning, &g.pins) else {
            return Listing::Pass;
        };
        let mut hidden = Vec::new();
        for d in drift {
            let action = pinning.action(&d.kinds);
            tracing::warn!(
                server = %d.server,
                tool = %d.tool,
                kinds = %kinds(d),
                action = action.as_str(),
                "tool drifted from the lock file:\n{}",
                d.diff.join("\n")
            );
            match action {
                DriftAction::Alert => {}
                DriftAction::Hide => hidden.push(d.tool.as_str()),
                DriftAction::DenyServer => {
                    let why = self.quarantine(&d.server, &pins.digest, d);
                    return Listing::Refuse(pinning_stop(why, "quarantined", drift));
                }
            }
        }
        if hidden.is_empty() {
            return Listing::Pass;
        }
        let Ok(mut value) = serde_json::from_str::<Value>(result) else {
            return Listing::Pass;
        };
        if let Some(tools) = value["tools"].as_array_mut() {
            tools.retain(|t| !t["name"].as_str().is_some_and(|n| hidden.contains(&n)));
        }
        Listing::Rewrite(value.to_string())
    }

    /// Why `server` is quarantined under the lock in force, if it is.
    fn quarantined(&self, g: &Generation, server: &str) -> Option<String> {
        let digest = &g.pins.as_ref()?.digest;
        self.quarantines.why(server, digest)
    }

    fn quarantine(&self, server: &str, digest: &str, cause: &ToolDrift) -> String {
        let why = format!(
            "Refused by Portcullis: server '{server}' is quarantined: tool '{}' differs from its pinned definition ({}); every request is refused until the server is pinned again (`portcullis pin`)",
            cause.tool,
            kinds(cause)
        );
        self.quarantines.quarantine(server, digest, why)
    }
}

/// The drift a call to `tool` on `session`'s server carries: a tool the lock
/// file does not have, or how its last listing differs from the lock in
/// force (so a re-pin applies at once, without a new listing).
pub fn call_drift(g: &Generation, session: &Session, tool: &str) -> Vec<ToolDrift> {
    let server = session.server();
    let Some(pinned) = g.pins.as_ref().and_then(|p| p.server(server)) else {
        return Vec::new();
    };
    let Some(before) = pinned.tools.get(tool) else {
        return vec![ToolDrift::added(server, tool)];
    };
    session
        .tool_definition(tool)
        .and_then(|now| drift::item(server, tool, before, now))
        .into_iter()
        .collect()
}

fn kinds(drift: &ToolDrift) -> String {
    let names: Vec<&str> = drift.kinds.iter().map(|k| k.as_str()).collect();
    names.join(", ")
}

fn pinning_stop(reason: String, tag: &'static str, drift: &[ToolDrift]) -> Stop {
    // The kinds only: a diff may quote a poisoned description, which the
    // agent's model must not read.
    let mut data = Map::new();
    if !drift.is_empty() {
        let kinds: Vec<Value> = drift
            .iter()
            .map(|d| json!({ "tool": d.tool, "kinds": d.kinds }))
            .collect();
        data.insert("drift".into(), Value::Array(kinds));
    }
    Stop {
        code: DENIED,
        by: PINNING,
        reason,
        data,
        tag,
    }
}
