//! The audit trail: one [`AuditRecord`] for every message Portcullis judged —
//! allowed, modified, denied or unreadable — written to every configured
//! [`Sink`] before the message's effect is relayed. A record that cannot be
//! written stops the message (fail-closed); it is never silently lost.

pub mod chain;
mod component;
mod delivery;
pub mod lines;
mod otlp;
mod select;
mod sinks;
mod spool;
mod webhook;

use component::{ComponentOptions, ComponentSink};
pub use delivery::{DeliveringSink, DeliveryOptions, flush};
pub use otlp::traces::traceparent;
pub use webhook::{Webhook, WebhookOptions};

use select::{Selected, Selection};

pub use sinks::{Console, FileOptions, FileSink, Sink, rotated_files};

use crate::config::{Config, OnFull, SinkConfig};
use crate::policy::chain::PolicyVerdict;
use crate::surface::drift::ToolDrift;
use crate::util::clock::rfc3339_now;
use crate::util::encode::hex;
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

/// One audited message.
#[derive(Debug, Serialize)]
pub struct AuditRecord {
    /// When the decision was made (RFC 3339, UTC, µs).
    pub time: String,
    /// Unique, time-ordered decision id (UUIDv7); also sent to a refused
    /// client in the error's `data.decision`.
    pub id: String,
    /// The agent's identity.
    pub agent: String,
    /// The agent's attributes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_attributes: BTreeMap<String, String>,
    /// The server's configured name.
    pub server: String,
    /// `client-to-server` or `server-to-client`.
    pub direction: &'static str,
    /// `request`, `notification`, `result`, `error`, or `invalid`.
    pub kind: &'static str,
    /// The method (for answers: of the request answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The tool, for `tools/call` and its answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The JSON-RPC id, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<Box<RawValue>>,
    /// sha256 of the canonical JSON of the arguments (`tools/call`) or params.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments_sha256: Option<String>,
    /// The arguments themselves, unless `audit.include_arguments = false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// For `tools/call` and its answer: the tool's annotations as the
    /// server declared them in its latest `tools/list`, as the policies saw
    /// them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<RecordedAnnotations>,
    /// For a message refused before it could be judged (unreadable,
    /// ambiguous, malformed): sha256 of its bytes as received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_sha256: Option<String>,
    /// sha256 of the canonical JSON of an answer's result or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_sha256: Option<String>,
    /// An answer's result or error itself, with `audit.include_results`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// `allow`, `modify`, `deny`, or `hold` (held for approval; the
    /// approval's id is this record's).
    pub outcome: &'static str,
    /// For a denial: the JSON-RPC error code sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// For a denial: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a denial: the policy that decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// For a call that needed approval and ran under an earlier approval of
    /// the same call (a rule's reuse window): that approval's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Tags attached by the policies and the boundary.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// How the tools the message concerns differ from the lock file, with a
    /// readable diff.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<ToolDrift>,
    /// Every policy's own verdict, in chain order.
    pub policies: Vec<PolicyVerdict>,
    /// Time spent in the policy chain, in µs.
    pub latency_us: u64,
    /// The W3C `traceparent` the agent sent in the message's
    /// `params._meta` (for an answer: in its request's), when valid: the
    /// trace the decision's span joins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// A tool's annotations in an audit record, by their MCP names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedAnnotations {
    /// Human-readable title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// `readOnlyHint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_hint: Option<bool>,
    /// `destructiveHint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destructive_hint: Option<bool>,
    /// `idempotentHint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent_hint: Option<bool>,
    /// `openWorldHint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_world_hint: Option<bool>,
}

impl From<&crate::contract::ToolAnnotations> for RecordedAnnotations {
    fn from(a: &crate::contract::ToolAnnotations) -> Self {
        Self {
            title: a.title.clone(),
            read_only_hint: a.read_only_hint,
            destructive_hint: a.destructive_hint,
            idempotent_hint: a.idempotent_hint,
            open_world_hint: a.open_world_hint,
        }
    }
}

impl From<&RecordedAnnotations> for crate::contract::ToolAnnotations {
    fn from(a: &RecordedAnnotations) -> Self {
        Self {
            title: a.title.clone(),
            read_only_hint: a.read_only_hint,
            destructive_hint: a.destructive_hint,
            idempotent_hint: a.idempotent_hint,
            open_world_hint: a.open_world_hint,
        }
    }
}

impl AuditRecord {
    /// A record with a fresh id and time and no decision yet (`allow`).
    pub fn new(agent: &crate::contract::Agent, server: &str, direction: &'static str) -> Self {
        Self {
            time: rfc3339_now(),
            id: decision_id(),
            agent: agent.id.clone(),
            agent_attributes: agent.attributes.iter().cloned().collect(),
            server: server.to_string(),
            direction,
            kind: "invalid",
            method: None,
            tool: None,
            jsonrpc_id: None,
            arguments_sha256: None,
            arguments: None,
            annotations: None,
            message_sha256: None,
            result_sha256: None,
            result: None,
            outcome: "allow",
            code: None,
            reason: None,
            decided_by: None,
            approval: None,
            tags: Vec::new(),
            drift: Vec::new(),
            policies: Vec::new(),
            latency_us: 0,
            trace: None,
        }
    }

    /// Marks the record as a denial.
    pub fn deny(&mut self, code: i32, reason: impl Into<String>, decided_by: Option<&str>) {
        self.outcome = "deny";
        self.code = Some(code);
        self.reason = Some(reason.into());
        self.decided_by = decided_by.map(str::to_string);
    }
}

/// The audit event of a reload attempt.
#[derive(Debug, Serialize)]
pub struct ReloadRecord {
    /// When (RFC 3339, UTC, µs).
    pub time: String,
    /// Unique id (UUIDv7).
    pub id: String,
    /// Always `reload`.
    pub event: &'static str,
    /// `file` or `signal`.
    pub trigger: &'static str,
    /// `ok` or `failed`.
    pub result: &'static str,
    /// The generation now serving.
    pub generation: u64,
    /// Why the reload failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The policies now serving, with the digests they replaced.
    pub policies: Vec<ReloadedPolicy>,
}

/// One policy in a reload event.
#[derive(Debug, Serialize)]
pub struct ReloadedPolicy {
    /// Policy name.
    pub name: String,
    /// sha256 of its module now.
    pub sha256: String,
    /// sha256 of its module before, if it served before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
    /// For a registry module: the `oci://` reference configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// For a registry module: the manifest digest now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For a registry module: the manifest digest before, if it served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_digest: Option<String>,
    /// For a registry module under `[trust]`: the key that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// The audit event of a registry module refused by `[trust]` (at start or
/// on reload; the generation serving, if any, keeps serving).
#[derive(Debug, Serialize)]
pub struct ModuleRecord {
    /// When (RFC 3339, UTC, µs).
    pub time: String,
    /// Unique id (UUIDv7).
    pub id: String,
    /// Always `module-refused`.
    pub event: &'static str,
    /// The `oci://` reference configured.
    pub module: String,
    /// The manifest digest it resolved to.
    pub digest: String,
    /// Why it was refused.
    pub reason: String,
}

impl ModuleRecord {
    /// The event of `refused`.
    pub fn refused(refused: &crate::registry::Refused) -> Self {
        Self {
            time: rfc3339_now(),
            id: decision_id(),
            event: "module-refused",
            module: refused.reference.clone(),
            digest: refused.digest.clone(),
            reason: refused.reason.clone(),
        }
    }
}

impl ReloadRecord {
    /// A reload event with a fresh id and time.
    pub fn new(
        trigger: &'static str,
        result: &'static str,
        generation: u64,
        error: Option<String>,
        policies: Vec<ReloadedPolicy>,
    ) -> Self {
        Self {
            time: rfc3339_now(),
            id: decision_id(),
            event: "reload",
            trigger,
            result,
            generation,
            error,
            policies,
        }
    }
}

/// The audit event of a held call's approval ending: approved (and the
/// call relayed), denied, expired or cancelled. The call's own record,
/// whose id is the approval's, says it was held (`outcome: hold`).
#[derive(Debug, Serialize)]
pub struct ApprovalRecord {
    /// When (RFC 3339, UTC, µs).
    pub time: String,
    /// Unique id (UUIDv7).
    pub id: String,
    /// Always `approval`.
    pub event: &'static str,
    /// The approval's id: the id of the held call's record.
    pub approval: String,
    /// `approved`, `denied`, `expired` or `cancelled`; `mismatch` when the
    /// approval in the store no longer matches the held call's arguments (the
    /// call is refused).
    pub state: &'static str,
    /// The agent.
    pub agent: String,
    /// The server's configured name.
    pub server: String,
    /// The method.
    pub method: String,
    /// The tool, for `tools/call`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The held request's JSON-RPC id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<String>,
    /// sha256 of the canonical arguments approved.
    pub arguments_sha256: String,
    /// The policy that asked for approval.
    pub policy: String,
    /// Who decided: an approver, `client` (cancelled) or `portcullis`
    /// (expired, or the holding process ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The decider's comment, or why it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Each approver's approval, when more than one was required.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<crate::approval::store::Vote>,
    /// How long the call was held, in ms.
    pub held_ms: u64,
    /// Why a call approved was never relayed: its client was gone, or its
    /// agent may no longer use its server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withheld: Option<String>,
}

impl ApprovalRecord {
    /// The event of `approval` ending for a held call (JSON-RPC id
    /// `jsonrpc_id`, when known); `bound` is false when the approval's
    /// arguments are not the held call's.
    pub fn new(
        approval: &crate::approval::store::Approval,
        jsonrpc_id: Option<String>,
        bound: bool,
    ) -> Self {
        let ended = approval
            .decided_ms
            .unwrap_or_else(crate::util::clock::now_ms);
        Self {
            time: rfc3339_now(),
            id: decision_id(),
            event: "approval",
            approval: approval.id.clone(),
            state: if bound {
                approval.state.as_str()
            } else {
                "mismatch"
            },
            agent: approval.call.agent.clone(),
            server: approval.call.server.clone(),
            method: approval.call.method.clone(),
            tool: approval.call.tool.clone(),
            jsonrpc_id,
            arguments_sha256: approval.call.arguments_sha256.clone(),
            policy: approval.call.policy.clone(),
            decided_by: approval.decided_by.clone(),
            comment: approval.comment.clone(),
            votes: if approval.terms.required > 1 {
                approval.votes.clone()
            } else {
                Vec::new()
            },
            held_ms: ended.saturating_sub(approval.created_ms),
            withheld: None,
        }
    }

    /// What the agent reads when the held call is refused.
    pub fn message(&self) -> String {
        let by = self.decided_by.as_deref().unwrap_or("portcullis");
        let comment = self
            .comment
            .as_deref()
            .map_or_else(String::new, |c| format!(": {c}"));
        match self.state {
            "denied" => format!("Approval denied by {by}{comment}"),
            "expired" => format!(
                "Approval expired: nobody decided in time (approval {})",
                self.approval
            ),
            "mismatch" => format!(
                "Refused by Portcullis: approval {} does not match the held call's arguments",
                self.approval
            ),
            other => format!("Approval {other}{comment}"),
        }
    }
}

/// The audit event of an agent's access to `portcullis serve`: a session
/// opened or ended, or credentials refused. What the agent does in the
/// session is in the message records.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// When (RFC 3339, UTC, µs).
    pub time: String,
    /// Unique id (UUIDv7).
    pub id: String,
    /// `session-opened`, `session-ended` or `credentials-refused`.
    pub event: &'static str,
    /// The agent, once authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The agent's attributes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_attributes: BTreeMap<String, String>,
    /// The path the agent used (`/mcp` or `/servers/NAME/mcp`).
    pub endpoint: String,
    /// The client's address.
    pub peer: String,
    /// The client software, as it introduced itself (`name/version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The protocol revision agreed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// Why access was refused (never the credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `message-refused`: the JSON-RPC error code it was refused with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// For `message-refused`: sha256 of the message's bytes as received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_sha256: Option<String>,
    /// For a refusal that sums up a window of them: how many more
    /// refusals of this kind came from this peer (the record describes the
    /// latest) after the first, which was written whole at `since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
    /// When the first refusal of the window was written (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl AccessRecord {
    /// An access event with a fresh id and time, by `agent` if known.
    pub fn new(
        event: &'static str,
        agent: Option<&crate::contract::Agent>,
        endpoint: &str,
        peer: std::net::SocketAddr,
    ) -> Self {
        Self {
            time: rfc3339_now(),
            id: decision_id(),
            event,
            agent: agent.map(|a| a.id.clone()),
            agent_attributes: agent
                .map(|a| a.attributes.iter().cloned().collect())
                .unwrap_or_default(),
            endpoint: endpoint.to_string(),
            peer: peer.to_string(),
            client: None,
            protocol_version: None,
            reason: None,
            code: None,
            message_sha256: None,
            repeated: None,
            since: None,
        }
    }

    /// Portcullis listed a server's tools itself (for `agent`, on its
    /// connection of its own, if given): how many, and the listing's digest.
    pub fn tools_surveyed(
        endpoint: &str,
        agent: Option<&crate::contract::Agent>,
        listing: &serde_json::value::RawValue,
    ) -> Self {
        let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let mut record = Self::new("tools-surveyed", agent, endpoint, peer);
        let count = serde_json::from_str::<serde_json::Value>(listing.get())
            .ok()
            .and_then(|l| l["tools"].as_array().map(Vec::len))
            .unwrap_or(0);
        record.reason = Some(format!("Portcullis listed the server's {count} tools"));
        record.message_sha256 = Some(bytes_digest(listing.get().as_bytes()));
        record
    }
}

/// A UUIDv7: milliseconds since the epoch, then random bits from a
/// thread-local generator (no system call per record).
fn decision_id() -> String {
    use rand::Rng;
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// sha256 of the canonical form of a JSON text (object keys sorted, no
/// insignificant whitespace), so equal values digest equally however they
/// were written. `None` if the text is not JSON.
pub fn canonical_digest(json: &RawValue) -> Option<(String, Value)> {
    let value: Value = serde_json::from_str(json.get()).ok()?;
    Some((value_digest(&value), value))
}

/// sha256 of bytes as received (a message that could not be read as JSON).
pub fn bytes_digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a JSON value's canonical form: its compact text with every
/// object's keys sorted. The keys are sorted here, not left to serde_json's
/// map order (a dependency may turn on its `preserve_order`).
pub fn value_digest(value: &Value) -> String {
    let mut hasher = Sha256::new();
    canonical(value, &mut hasher);
    hex(&hasher.finalize())
}

fn canonical(value: &Value, out: &mut Sha256) {
    match value {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort_unstable();
            out.update(b"{");
            for (n, key) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.update(b",");
                }
                out.update(Value::String(key.clone()).to_string().as_bytes());
                out.update(b":");
                canonical(&fields[key], out);
            }
            out.update(b"}");
        }
        Value::Array(items) => {
            out.update(b"[");
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.update(b",");
                }
                canonical(item, out);
            }
            out.update(b"]");
        }
        scalar => out.update(scalar.to_string().as_bytes()),
    }
}

/// Set when this process' stdout carries MCP messages (`portcullis stdio`):
/// no stdout sink may open then.
static STDOUT_CARRIES_MCP: AtomicBool = AtomicBool::new(false);

/// Marks stdout as carrying MCP messages for the life of the process.
pub fn stdout_carries_mcp() {
    STDOUT_CARRIES_MCP.store(true, Ordering::Relaxed);
}

/// Compiles, starts and configures the component sink `sink` configures.
pub fn load_component(sink: &SinkConfig, base: &Path) -> Result<ComponentSink> {
    let SinkConfig::Component {
        module,
        allow_hosts,
        settings,
        max_memory_mb,
        ..
    } = sink
    else {
        bail!("not a component sink");
    };
    ComponentSink::load(ComponentOptions {
        module: module.path()?.to_path_buf(),
        digest: module.pulled().map(|p| p.component.clone()),
        allow_hosts: allow_hosts.clone(),
        settings: resolve_all(settings, base)?.into_iter().collect(),
        max_memory: usize::try_from(max_memory_mb.saturating_mul(1 << 20))?,
    })
    .with_context(|| format!("component sink {module}"))
}

/// `values` with their `${env:}` / `${file:}` references resolved.
fn resolve_all(values: &BTreeMap<String, String>, base: &Path) -> Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|(k, v)| Ok((k.clone(), crate::config::resolve_secret(v, base)?)))
        .collect()
}

/// The delivering sink `sink` configures, carried by `transport`.
fn delivering(
    sink: &SinkConfig,
    base: &Path,
    transport: Box<dyn delivery::Transport>,
) -> Result<Box<dyn Sink>> {
    let (kind, name) = match sink {
        SinkConfig::Webhook { url, .. } => ("webhook", url.clone()),
        SinkConfig::Component { .. } => ("component", sink.component_name().unwrap_or_default()),
        _ => bail!("not a delivering sink"),
    };
    let (SinkConfig::Webhook {
        batch_records,
        batch_ms,
        spool_dir,
        spool_max_bytes,
        on_full,
        ..
    }
    | SinkConfig::Component {
        batch_records,
        batch_ms,
        spool_dir,
        spool_max_bytes,
        on_full,
        ..
    }) = sink
    else {
        bail!("not a delivering sink");
    };
    let options = DeliveryOptions {
        kind,
        name,
        batch_records: (*batch_records).max(1),
        batch_wait: std::time::Duration::from_millis(*batch_ms),
        spool_dir: spool_dir.clone().unwrap_or_else(|| base.join("spool")),
        spool_max_bytes: *spool_max_bytes,
        drop_when_full: *on_full == OnFull::Drop,
    };
    Ok(Box::new(DeliveringSink::open(options, transport)?))
}

/// The configured sinks and what goes into records.
pub struct Audit {
    sinks: Vec<Box<dyn Sink>>,
    include_arguments: bool,
    include_policy_logs: bool,
    include_results: bool,
    /// The replica named in every record, when `[state] replica` is set.
    replica: Option<String>,
    /// When the chained files' heads go to the delivering sinks.
    heads: Option<Heads>,
}

/// How often the chained files' heads reach the delivering sinks: after
/// `every` records or `secs`, whichever comes first.
struct Heads {
    every: u64,
    secs: std::time::Duration,
    /// Records since the heads last went, and when they did.
    since: Mutex<(u64, std::time::Instant)>,
}

impl Heads {
    /// `[audit]`'s schedule, when there are both chained files and sinks
    /// that deliver: nothing to hand over otherwise.
    fn of(config: &crate::config::AuditConfig, sinks: &[Box<dyn Sink>]) -> Option<Self> {
        let chained = config
            .sinks
            .iter()
            .any(|s| matches!(s, SinkConfig::File { chain: true, .. }));
        let delivering = sinks.iter().any(|s| s.delivers());
        (chained && delivering && config.head_every > 0).then(|| Self {
            every: config.head_every,
            secs: std::time::Duration::from_secs(config.head_secs),
            since: Mutex::new((0, std::time::Instant::now())),
        })
    }

    /// Counts one record; whether the heads are due now.
    fn due(&self) -> bool {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.0 += 1;
        let due = since.0 >= self.every || since.1.elapsed() >= self.secs;
        if due {
            *since = (0, std::time::Instant::now());
        }
        due
    }
}

/// The head of a chained file, as handed to the delivering sinks.
#[derive(Serialize)]
struct ChainHead {
    time: String,
    id: String,
    event: &'static str,
    /// The chained file.
    file: String,
    /// The head's record number.
    head_seq: u64,
    /// sha256 of that record's line.
    head: String,
}

impl Audit {
    /// Opens every sink of `config`'s `[audit]`, plus a file sink at
    /// `extra_file`.
    pub fn open(config: &Config, extra_file: Option<PathBuf>) -> Result<Self> {
        Self::open_sinks(config, extra_file, false)
    }

    /// Opens the sinks of `config` that can be opened before its registry
    /// modules were all pulled: all but component sinks still waiting on
    /// theirs (to record why a module was refused).
    pub fn open_pulled(config: &Config, extra_file: Option<PathBuf>) -> Result<Self> {
        Self::open_sinks(config, extra_file, true)
    }

    fn open_sinks(config: &Config, extra_file: Option<PathBuf>, pulled_only: bool) -> Result<Self> {
        let base = config.path.parent().unwrap_or(Path::new("."));
        let replica = config.state.replica(base)?;
        let config = &config.audit;
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let extra = extra_file.map(SinkConfig::file);
        for sink in config.sinks.iter().chain(&extra) {
            if pulled_only
                && let SinkConfig::Component { module, .. } = sink
                && module.path().is_err()
            {
                tracing::warn!("audit sink {module} is skipped: its module was not pulled");
                continue;
            }
            let opened: Box<dyn Sink> = match sink {
                SinkConfig::File {
                    path,
                    chain,
                    rotate_bytes,
                    rotate_secs,
                    fsync,
                    ..
                } => {
                    let options = FileOptions {
                        chain: *chain,
                        rotate_bytes: *rotate_bytes,
                        rotate_secs: *rotate_secs,
                        fsync: *fsync,
                        replica: replica.clone(),
                    };
                    Box::new(FileSink::open_with(path, options)?)
                }
                SinkConfig::Webhook {
                    url,
                    format,
                    protocol,
                    secret,
                    headers,
                    ..
                } => {
                    let resolve = |v: &str| crate::config::resolve_secret(v, base);
                    let webhook = Webhook::new(WebhookOptions {
                        url: url.clone(),
                        format: *format,
                        protocol: *protocol,
                        secret: secret.as_deref().map(resolve).transpose()?,
                        headers: resolve_all(headers, base)?,
                    });
                    delivering(sink, base, Box::new(webhook))?
                }
                SinkConfig::Component { .. } => {
                    let component = load_component(sink, base)?;
                    delivering(sink, base, Box::new(component))?
                }
                SinkConfig::Stdout { .. } if STDOUT_CARRIES_MCP.load(Ordering::Relaxed) => {
                    bail!(
                        "a stdout audit sink cannot be used by `portcullis stdio`: its stdout carries the MCP messages (use stderr or a file)"
                    )
                }
                SinkConfig::Stdout { .. } => Box::new(Console::Stdout),
                SinkConfig::Stderr { .. } => Box::new(Console::Stderr),
            };
            let (only, redact) = sink.selection();
            sinks.push(match Selection::new(only, redact) {
                Some(selection) => Box::new(Selected::new(opened, selection)),
                None => opened,
            });
        }
        Ok(Self {
            heads: Heads::of(config, &sinks),
            sinks,
            include_arguments: config.include_arguments,
            include_policy_logs: config.include_policy_logs,
            include_results: config.include_results,
            replica: replica.map(|r| serde_json::Value::from(r).to_string()),
        })
    }

    /// An audit trail with the given sinks, recording arguments but not
    /// policy logs.
    pub fn with_sinks(sinks: Vec<Box<dyn Sink>>) -> Self {
        Self {
            sinks,
            include_arguments: true,
            include_policy_logs: false,
            include_results: false,
            replica: None,
            heads: None,
        }
    }

    /// Whether records carry the arguments themselves.
    pub fn include_arguments(&self) -> bool {
        self.include_arguments
    }

    /// Whether answers' records carry the result and their request's
    /// arguments.
    pub fn include_results(&self) -> bool {
        self.include_results
    }

    /// Whether records carry what policies logged.
    pub fn include_policy_logs(&self) -> bool {
        self.include_policy_logs
    }

    /// Writes `record` (one JSON object) to every sink (each taking the
    /// records it selects, as it redacts them); fails if any sink failed.
    pub fn write(&self, record: &impl Serialize) -> Result<()> {
        let line = self.line(record)?;
        let failures: Vec<String> = self
            .sinks
            .iter()
            .filter_map(|s| {
                s.write(&line)
                    .err()
                    .map(|e| format!("{}: {e:#}", s.describe()))
            })
            .collect();
        if !failures.is_empty() {
            return Err(anyhow!("audit sink failed: {}", failures.join("; ")));
        }
        if self.heads.as_ref().is_some_and(Heads::due) {
            self.hand_over_heads();
        }
        Ok(())
    }

    /// `record` as a line of the trail.
    fn line(&self, record: &impl Serialize) -> Result<String> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        if let Some(replica) = &self.replica {
            line = chain::with_member(&line, "replica", replica)?;
        }
        Ok(line)
    }

    /// Hands the head of each chained file to the sinks that deliver
    /// elsewhere (`chain-head` records), so a second party holds what
    /// `portcullis audit verify --head` checks the file against. A sink
    /// that cannot take it is logged: the message was recorded already.
    fn hand_over_heads(&self) {
        for (file, head) in self.sinks.iter().filter_map(|s| s.head()) {
            let record = ChainHead {
                time: rfc3339_now(),
                id: decision_id(),
                event: "chain-head",
                file: file.display().to_string(),
                head_seq: head.seq,
                head: head.hash,
            };
            let Ok(line) = self.line(&record) else {
                continue;
            };
            for sink in self.sinks.iter().filter(|s| s.delivers()) {
                if let Err(e) = sink.write(&line) {
                    tracing::warn!(sink = %sink.describe(), "cannot hand over the chain's head: {e:#}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_canonical_digest_sorts_keys_and_matches_compact_sorted_text() {
        let written: Value =
            serde_json::from_str(r#"{ "b": [1, {"z": "\u00e9", "a": null}], "a": 1.5 }"#).unwrap();
        let text = r#"{"a":1.5,"b":[1,{"a":null,"z":"é"}]}"#;
        assert_eq!(
            value_digest(&written),
            hex(&Sha256::digest(text.as_bytes()))
        );
    }

    use super::*;

    #[test]
    fn decision_ids_are_unique_time_ordered_uuids() {
        let a = decision_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = decision_id();
        for id in [&a, &b] {
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
        }
        assert!(a < b, "{a} < {b}");
        assert_ne!(decision_id(), decision_id());
    }

    #[test]
    fn digest_ignores_key_order_and_whitespace() {
        let a: Box<RawValue> = serde_json::from_str(r#"{"b": 1, "a": [1, 2]}"#).unwrap();
        let b: Box<RawValue> = serde_json::from_str(r#"{"a":[1,2],"b":1}"#).unwrap();
        assert_eq!(
            canonical_digest(&a).unwrap().0,
            canonical_digest(&b).unwrap().0
        );
        assert_eq!(canonical_digest(&a).unwrap().0.len(), 64);
    }

    #[test]
    fn records_go_to_every_sink_as_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::with_sinks(vec![Box::new(FileSink::open(&path).unwrap())]);
        let agent = crate::contract::Agent {
            id: "bot".into(),
            attributes: vec![("team".into(), "infra".into())],
        };
        let mut record = AuditRecord::new(&agent, "fs", "client-to-server");
        record.deny(-32001, "no", Some("ro"));
        audit.write(&record).unwrap();
        audit.write(&record).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["agent"], "bot");
        assert_eq!(lines[0]["agent_attributes"]["team"], "infra");
        assert_eq!(lines[0]["outcome"], "deny");
        assert_eq!(lines[0]["decided_by"], "ro");
    }
}
