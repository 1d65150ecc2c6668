//! The Portcullis config file: its TOML shape, defaults, resolution of
//! relative paths against the file's directory, and validation whose errors
//! name the file and the field. It never loads policies or starts processes.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent identity used in stdio mode.
    #[serde(default)]
    pub agent: AgentConfig,
    /// MCP servers by name: in `serve` mode, the only servers agents can reach.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    /// The agents allowed to connect in `serve` mode, by id.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentEntry>,
    /// JWT bearer tokens as agent credentials, next to API keys.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// The HTTP listener of `portcullis serve`.
    #[serde(default)]
    pub serve: ServeConfig,
    /// The ordered policy chain.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyConfig>,
    /// Where audit records go.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The WebAssembly engine's limits and cache.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Limits on the traffic itself.
    #[serde(default)]
    pub limits: Limits,
    /// Tool definitions pinned in a lock file, and what drift from it means.
    #[serde(default)]
    pub pinning: Option<PinningConfig>,
    /// Checks of tool-call arguments at the boundary.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Call rates allowed, per agent, server and tool.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Where held calls wait for a person, who may decide them, and for how
    /// long.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The people who may decide held calls over the admin API and page.
    #[serde(default)]
    pub approvers: BTreeMap<String, ApproverEntry>,
    /// The admin listener: the approvals API and page.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The file this config was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

/// Who the client is, in stdio mode (one local agent per process).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's identifier, e.g. `claude-desktop`.
    #[serde(default = "default_agent_id")]
    pub id: String,
    /// Attributes passed to every policy and audit record.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            id: default_agent_id(),
            attributes: BTreeMap::new(),
        }
    }
}

fn default_agent_id() -> String {
    "local".into()
}

/// An MCP server: a stdio server Portcullis starts as a child process
/// (`command`), or, in `serve` mode, a remote Streamable HTTP server (`url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The program to run.
    pub command: Option<String>,
    /// The endpoint of a remote Streamable HTTP server.
    pub url: Option<String>,
    /// Headers sent to a remote server with every request: its credentials
    /// (values may contain `${env:NAME}` or `${file:PATH}` references).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables for it (its credentials among them: the
    /// agent's own token never reaches a server).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// In `serve` mode, what its tools and prompts are prefixed with on the
    /// aggregated endpoint (default: the server's name).
    pub prefix: Option<String>,
}

impl ServerConfig {
    /// The environment for the server, with each `${env:NAME}` and
    /// `${file:PATH}` reference in a value replaced from Portcullis'
    /// environment or that file (its content, without the trailing newline). This is how servers get
    /// their credentials without writing them into the config.
    pub fn resolved_env(&self, base: &Path) -> Result<BTreeMap<String, String>> {
        resolve_all(&self.env, base, "env")
    }

    /// The headers for a remote server, references resolved as for `env`.
    pub fn resolved_headers(&self, base: &Path) -> Result<BTreeMap<String, String>> {
        resolve_all(&self.headers, base, "header")
    }
}

fn resolve_all(
    values: &BTreeMap<String, String>,
    base: &Path,
    what: &str,
) -> Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|(key, value)| {
            let resolved = resolve_secret(value, base).with_context(|| format!("{what} {key}"))?;
            Ok((key.clone(), resolved))
        })
        .collect()
}

/// `value` with each `${env:NAME}` / `${file:PATH}` reference in it replaced
/// by what it names.
pub fn resolve_secret(value: &str, base: &Path) -> Result<String> {
    let mut resolved = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        resolved.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .with_context(|| format!("unclosed reference in '{value}'"))?;
        resolved.push_str(&resolve_reference(&rest[start + 2..start + end], base)?);
        rest = &rest[start + end + 1..];
    }
    resolved.push_str(rest);
    Ok(resolved)
}

fn resolve_reference(reference: &str, base: &Path) -> Result<String> {
    if let Some(name) = reference.strip_prefix("env:") {
        return std::env::var(name)
            .with_context(|| format!("environment variable {name} is not set"));
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let path = base.join(path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    bail!("unknown reference '${{{reference}}}' (use ${{env:NAME}} or ${{file:PATH}})")
}

/// An agent allowed to connect to `portcullis serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// sha256 (hex) of the agent's API key, which it sends as
    /// `Authorization: Bearer KEY`. The key itself is never stored. Without
    /// one, the agent can only come with a JWT naming it.
    #[serde(default)]
    pub api_key_sha256: Option<String>,
    /// The servers (globs) the agent may see and call.
    #[serde(default = "everything")]
    pub servers: Vec<String>,
    /// Attributes passed to every policy and audit record.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// How JWT bearer tokens are checked. The token's `agent_claim` names the
/// agent: `[agents.ID]` gives it servers and attributes, and `groups` grants
/// servers to the groups it is in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The required `iss` claim.
    pub issuer: String,
    /// The `aud` claim must be or contain this.
    pub audience: String,
    /// A JWKS file with the issuer's public keys (RS256, ES256).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL, fetched when needed and refreshed every `jwks_refresh_secs`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// An HS256 shared secret (at least 32 bytes), usually `${env:NAME}` or
    /// `${file:PATH}`.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// How often a JWKS URL is fetched again.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// The claim that names the agent.
    #[serde(default = "default_agent_claim")]
    pub agent_claim: String,
    /// The claim listing the agent's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Servers (globs) granted to each group.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
}

impl JwtConfig {
    /// The HS256 secret, its reference resolved.
    pub fn resolved_secret(&self, base: &Path) -> Result<Option<String>> {
        self.hs256_secret
            .as_deref()
            .map(|secret| resolve_secret(secret, base).context("jwt.hs256_secret"))
            .transpose()
    }
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_agent_claim() -> String {
    "sub".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_leeway() -> u64 {
    60
}

/// The HTTP listener of `portcullis serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address and port to listen on (default: localhost only).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Browser origins allowed to call the endpoint; a request carrying any
    /// other `Origin` is refused (requests without one are not browsers').
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Joins a server's prefix and a tool or prompt name on the aggregated
    /// endpoint.
    #[serde(default = "default_separator")]
    pub separator: String,
    /// How long a request to a server may take, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// How long a session may go unused before it expires (its client then
    /// gets 404 and initializes again), in seconds.
    #[serde(default = "default_session_idle")]
    pub session_idle_secs: u64,
    /// How many sessions one agent may have open at once; `initialize` past
    /// it is refused (HTTP 429). 0: no limit.
    #[serde(default = "default_max_sessions_per_agent")]
    pub max_sessions_per_agent: usize,
    /// How many connections a listener (MCP and admin alike) serves at
    /// once; more wait in the kernel's queue until one closes. Read at start.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long
    /// an idle kept-alive connection stays open, in seconds. Read at start.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// How long a client may take to send a request's body, in seconds.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            allowed_origins: Vec::new(),
            separator: default_separator(),
            request_timeout_secs: default_request_timeout(),
            session_idle_secs: default_session_idle(),
            max_sessions_per_agent: default_max_sessions_per_agent(),
            max_connections: default_max_connections(),
            header_timeout_secs: default_header_timeout(),
            body_timeout_secs: default_body_timeout(),
        }
    }
}

fn default_session_idle() -> u64 {
    1800
}

fn default_max_sessions_per_agent() -> usize {
    128
}

fn default_max_connections() -> usize {
    512
}

/// The most connections a listener may be configured to serve at once.
const MAX_CONNECTIONS: usize = 1 << 20;

fn default_header_timeout() -> u64 {
    30
}

fn default_body_timeout() -> u64 {
    30
}

fn default_listen() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 8808).into()
}

fn default_separator() -> String {
    "__".into()
}

fn default_request_timeout() -> u64 {
    120
}

/// One policy in the chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Unique name, used in errors, logs and audit records.
    pub name: String,
    /// Path to the `.wasm` component (relative to the config file).
    pub module: PathBuf,
    /// Settings handed to the policy's `configure` as JSON.
    #[serde(default = "empty_settings")]
    pub settings: serde_json::Value,
    /// Agent ids (globs) the policy applies to.
    #[serde(default = "everything")]
    pub agents: Vec<String>,
    /// Server names (globs) the policy applies to.
    #[serde(default = "everything")]
    pub servers: Vec<String>,
    /// JSON-RPC methods (globs) the policy applies to.
    #[serde(default = "everything")]
    pub methods: Vec<String>,
    /// Tool names (globs) the policy applies to; messages without a tool
    /// match only when this contains `*`.
    #[serde(default = "everything")]
    pub tools: Vec<String>,
    /// What a failure of the policy means.
    #[serde(default)]
    pub failure: FailureMode,
    /// Whether the verdict is enforced or only recorded.
    #[serde(default)]
    pub mode: Mode,
    /// Instance lifecycle.
    #[serde(default)]
    pub instances: InstanceMode,
    /// With `instances = "reuse"`: an instance is replaced after this many
    /// evaluations, bounding what state can build up in it.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u64,
    /// Wall-clock deadline per evaluation (default: `engine.timeout_ms`).
    pub timeout_ms: Option<u64>,
    /// Linear-memory cap per instance (default: `engine.memory_mb`).
    pub memory_mb: Option<u64>,
    /// WASI capabilities granted to the policy (none by default).
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Fixture files the policy must pass before it serves (at start and at
    /// every reload); relative to the config file.
    #[serde(default)]
    pub fixtures: Vec<PathBuf>,
}

fn default_recycle_after() -> u64 {
    10_000
}

fn empty_settings() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn everything() -> Vec<String> {
    vec!["*".into()]
}

/// What happens when a policy traps, times out, runs out of memory or
/// returns malformed output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Deny the message (the default).
    #[default]
    Closed,
    /// Let the message through; the failure is still recorded.
    Open,
}

/// Whether a policy's verdict counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The verdict is enforced (the default).
    #[default]
    Enforce,
    /// The verdict is recorded in the audit trail but never enforced.
    Monitor,
}

/// How policy instances are used across evaluations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// A new instance for every evaluation: no state can survive from one
    /// call to the next, at the price of instantiating each time (about
    /// 10 µs for a Rust policy).
    Fresh,
    /// Instances are kept and reused (the default): a call costs about 2 µs.
    /// Memory and globals survive between calls; an instance is discarded
    /// after any failure.
    #[default]
    Reuse,
}

/// A WASI capability a policy may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// The real wall and monotonic clocks (otherwise they read zero).
    Clock,
    /// Real randomness (otherwise a fixed-seed generator, so verdicts are
    /// reproducible).
    Random,
    /// The policy's stderr goes to Portcullis' stderr (otherwise discarded).
    Stderr,
}

/// The audit trail's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Record the arguments themselves, not only their digest.
    #[serde(default = "yes")]
    pub include_arguments: bool,
    /// Record what each policy logged while judging the message.
    #[serde(default)]
    pub include_policy_logs: bool,
    /// Where records go; `--audit-file` adds a file sink.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

impl AuditConfig {
    /// The modules of its component sinks.
    pub fn sink_modules(&self) -> impl Iterator<Item = &PathBuf> {
        self.sinks.iter().filter_map(|sink| match sink {
            SinkConfig::Component { module, .. } => Some(module),
            _ => None,
        })
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            include_arguments: true,
            include_policy_logs: false,
            sinks: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// One audit sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON Lines appended to a file.
    File {
        /// The file (relative to the config file).
        path: PathBuf,
        /// Chain the records, so `portcullis audit verify` can tell whether
        /// any was altered, removed or reordered.
        #[serde(default)]
        chain: bool,
        /// Rotate once the file holds this many bytes (0: never).
        #[serde(default)]
        rotate_bytes: u64,
        /// Rotate once the file is this many seconds old (0: never).
        #[serde(default)]
        rotate_secs: u64,
        /// Flush each record to the disk before its message goes on.
        #[serde(default)]
        fsync: bool,
        /// Which records it gets (default: all).
        #[serde(default)]
        only: RecordFilter,
        /// Fields removed from its records (dotted paths, e.g. `arguments`).
        #[serde(default)]
        redact: Vec<String>,
    },
    /// Batches POSTed to an HTTP(S) endpoint, signed, spooled on disk until
    /// delivered.
    Webhook {
        /// Where batches are POSTed.
        url: String,
        /// `json` (an array of records, default), `otlp` (OpenTelemetry
        /// logs over OTLP/HTTP, protobuf; `url` is a collector's
        /// `/v1/logs`) or `otlp-traces` (a span per decision; `/v1/traces`).
        #[serde(default)]
        format: BatchFormat,
        /// `http` (default) or, for the `otlp` formats, `grpc`: OTLP/gRPC
        /// to a collector's address (`url` without a path, e.g.
        /// `http://collector:4317`).
        #[serde(default)]
        protocol: Protocol,
        /// HMAC-SHA256 key for the `X-Portcullis-Signature` header; may be
        /// a `${env:NAME}` or `${file:PATH}` reference.
        secret: Option<String>,
        /// Extra request headers; values may hold references too.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Records per batch, at most.
        #[serde(default = "default_batch_records")]
        batch_records: usize,
        /// How long a batch waits to fill, in ms.
        #[serde(default = "default_batch_ms")]
        batch_ms: u64,
        /// Where undelivered records wait (default: `NAME.spool` beside the
        /// config).
        spool_dir: Option<PathBuf>,
        /// The most the spool holds, in bytes.
        #[serde(default = "default_spool_max_bytes")]
        spool_max_bytes: u64,
        /// When the spool is full: `refuse` the messages (default; nothing
        /// is lost) or `drop` their records (counted).
        #[serde(default)]
        on_full: OnFull,
        /// Which records it gets (default: all).
        #[serde(default)]
        only: RecordFilter,
        /// Fields removed from its records.
        #[serde(default)]
        redact: Vec<String>,
    },
    /// Batches handed to a WebAssembly sink component (`wit/sink`), which
    /// may send HTTP requests to the hosts granted here and nothing else;
    /// spooled on disk until delivered.
    Component {
        /// The component (relative to the config file).
        module: PathBuf,
        /// Its name, unique among component sinks: its spool and metrics go
        /// by it (default: the module's file name without `.wasm`).
        name: Option<String>,
        /// The hosts it may send requests to: `host` (any port) or
        /// `host:port`.
        #[serde(default)]
        allow_hosts: Vec<String>,
        /// Its settings, passed to its `configure`; values may hold
        /// `${env:NAME}` / `${file:PATH}` references.
        #[serde(default)]
        settings: BTreeMap<String, String>,
        /// The most memory it may use, in MiB.
        #[serde(default = "default_sink_memory_mb")]
        max_memory_mb: u64,
        /// Records per batch, at most.
        #[serde(default = "default_batch_records")]
        batch_records: usize,
        /// How long a batch waits to fill, in ms.
        #[serde(default = "default_batch_ms")]
        batch_ms: u64,
        /// Where undelivered records wait (default: `NAME.spool` beside the
        /// config).
        spool_dir: Option<PathBuf>,
        /// The most the spool holds, in bytes.
        #[serde(default = "default_spool_max_bytes")]
        spool_max_bytes: u64,
        /// When the spool is full: `refuse` the messages (default) or
        /// `drop` their records (counted).
        #[serde(default)]
        on_full: OnFull,
        /// Which records it gets (default: all).
        #[serde(default)]
        only: RecordFilter,
        /// Fields removed from its records.
        #[serde(default)]
        redact: Vec<String>,
    },
    /// JSON Lines on Portcullis' stdout (`serve` and `admin` only: in
    /// `stdio` mode stdout carries the MCP messages).
    Stdout {
        /// Which records it gets (default: all).
        #[serde(default)]
        only: RecordFilter,
        /// Fields removed from its records.
        #[serde(default)]
        redact: Vec<String>,
    },
    /// JSON Lines on Portcullis' stderr.
    Stderr {
        /// Which records it gets (default: all).
        #[serde(default)]
        only: RecordFilter,
        /// Fields removed from its records.
        #[serde(default)]
        redact: Vec<String>,
    },
}

impl SinkConfig {
    /// A file sink with nothing but its path.
    pub fn file(path: PathBuf) -> Self {
        SinkConfig::File {
            path,
            chain: false,
            rotate_bytes: 0,
            rotate_secs: 0,
            fsync: false,
            only: RecordFilter::default(),
            redact: Vec::new(),
        }
    }

    /// A component sink's name: the configured one, else its module's file
    /// name without `.wasm`.
    pub fn component_name(&self) -> Option<String> {
        let SinkConfig::Component { module, name, .. } = self else {
            return None;
        };
        let stem = || module.file_stem().unwrap_or_default().to_string_lossy();
        Some(name.clone().unwrap_or_else(|| stem().into_owned()))
    }

    /// Which records it gets, and the fields removed from them.
    pub fn selection(&self) -> (&RecordFilter, &[String]) {
        match self {
            SinkConfig::File { only, redact, .. }
            | SinkConfig::Webhook { only, redact, .. }
            | SinkConfig::Component { only, redact, .. }
            | SinkConfig::Stdout { only, redact }
            | SinkConfig::Stderr { only, redact } => (only, redact),
        }
    }
}

/// How a delivering sink encodes a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchFormat {
    /// A JSON array of the records.
    #[default]
    Json,
    /// An OTLP/HTTP logs export (protobuf): a log record per record.
    Otlp,
    /// An OTLP/HTTP traces export (protobuf): a span per decision, with a
    /// child span per policy.
    #[serde(rename = "otlp-traces")]
    OtlpTraces,
}

/// How a webhook sink sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// An HTTP POST per batch.
    #[default]
    Http,
    /// A unary gRPC call per batch (OTLP/gRPC).
    Grpc,
}

/// What a delivering sink does when its spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Refuse the messages whose records cannot be kept.
    #[default]
    Refuse,
    /// Drop the records, counting each.
    Drop,
}

fn default_batch_records() -> usize {
    500
}

fn default_batch_ms() -> u64 {
    1000
}

fn default_spool_max_bytes() -> u64 {
    1 << 30
}

fn default_sink_memory_mb() -> u64 {
    64
}

/// Which records a sink gets; every list given must match (empty: any).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordFilter {
    /// Message records with one of these outcomes (`allow`, `modify`,
    /// `deny`, `hold`); event records are not affected.
    #[serde(default)]
    pub outcomes: Vec<String>,
    /// Event records of these kinds (`approval`, `reload`, `checkpoint`,
    /// `session-opened`, …); message records are not affected.
    #[serde(default)]
    pub events: Vec<String>,
    /// Records about these servers (globs); records about no server (e.g.
    /// reloads) are not affected.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Records about these agents (globs); records about no agent are not
    /// affected.
    #[serde(default)]
    pub agents: Vec<String>,
}

impl RecordFilter {
    /// Whether it lets every record through.
    pub fn is_empty(&self) -> bool {
        *self == RecordFilter::default()
    }
}

/// Pinned tool definitions: the lock file `portcullis pin` writes, and what
/// Portcullis does when a server's tools drift from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinningConfig {
    /// The lock file (default: beside the config, `NAME.lock.json` for
    /// `NAME.toml`); relative to the config file.
    pub lock: Option<PathBuf>,
    /// What drift means, unless `on` says otherwise for its kind.
    #[serde(default)]
    pub on_drift: DriftAction,
    /// What each kind of drift means, overriding `on_drift`.
    #[serde(default)]
    pub on: BTreeMap<DriftKind, DriftAction>,
}

/// Human approval of held calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// The approvals store, shared by every Portcullis process of the
    /// deployment and `portcullis approvals` (default: beside the config,
    /// `NAME.approvals.db` for `NAME.toml`); relative to the config file.
    pub store: Option<PathBuf>,
    /// How long a held call waits for a decision before it is refused.
    #[serde(default = "default_expiry_secs")]
    pub expiry_secs: u64,
    /// Who may decide which held calls: the first rule matching a call
    /// applies; a call no rule matches may be decided by anyone who may
    /// decide at all, once.
    #[serde(default)]
    pub rules: Vec<ApprovalRule>,
    /// Webhook URLs (e.g. a chat's incoming webhook) told of every pending
    /// approval, with a link to the admin page.
    #[serde(default)]
    pub notify: Vec<String>,
    /// How many calls one agent may have waiting for approval at once,
    /// across the processes sharing the store; past it a call that needs
    /// approval is refused at once. 0: no limit.
    #[serde(default = "default_max_pending_per_agent")]
    pub max_pending_per_agent: u32,
}

fn default_expiry_secs() -> u64 {
    300
}

fn default_max_pending_per_agent() -> u32 {
    16
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            store: None,
            expiry_secs: default_expiry_secs(),
            rules: Vec::new(),
            notify: Vec::new(),
            max_pending_per_agent: default_max_pending_per_agent(),
        }
    }
}

/// Who may decide the held calls it matches, and what it takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// Servers (globs) it applies to.
    #[serde(default = "everything")]
    pub servers: Vec<String>,
    /// Tools (globs) it applies to; a request without a tool matches by its
    /// method.
    #[serde(default = "everything")]
    pub tools: Vec<String>,
    /// It applies only to calls tagged with one of these (empty: any call).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The policies (globs) whose require-approval it applies to.
    #[serde(default = "everything")]
    pub policies: Vec<String>,
    /// The `[approvers]` who may decide (empty: any of them).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// How many distinct approvers must approve (2 for a two-person rule);
    /// one deny is enough to refuse.
    #[serde(default = "one")]
    pub required: u32,
    /// How long a call may wait (default: `approvals.expiry_secs`).
    pub expiry_secs: Option<u64>,
    /// For how long an approved call may run again without asking — the same
    /// agent, server, tool and arguments (default 0: every call asks).
    #[serde(default)]
    pub reuse_secs: u64,
    /// Also ask the client's own user (MCP elicitation), when the client
    /// supports it; an approver may still decide first.
    #[serde(default)]
    pub elicit: bool,
}

fn is_http_url(url: &str) -> bool {
    let uri = url.parse::<hyper::Uri>().ok();
    crate::outbound::supports(uri.as_ref().and_then(|u| u.scheme_str()))
}

/// Whether `grant` is a host name or address, with an optional port.
fn is_host_grant(grant: &str) -> bool {
    let authority = grant.parse::<hyper::http::uri::Authority>().ok();
    authority.is_some_and(|a| !a.host().is_empty() && !grant.contains('@'))
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn one() -> u32 {
    1
}

/// A person who may decide held calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverEntry {
    /// sha256 (hex) of their API key, sent to the admin listener as
    /// `Authorization: Bearer KEY` (the page asks for it once).
    pub api_key_sha256: String,
}

/// The admin listener, apart from agent traffic: the approvals API and page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address and port to listen on.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
    /// The page's address as approvers reach it (e.g. behind a proxy), used
    /// in notifications (default: `http://` + `listen`).
    pub url: Option<String>,
}

fn default_admin_listen() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 8809).into()
}

impl AdminConfig {
    /// Where approvers reach the page.
    pub fn url(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }
}

/// A way a tool can differ from its pinned definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftKind {
    /// The server offers a tool the lock file does not have.
    Added,
    /// The lock file has a tool the server no longer lists.
    Removed,
    /// Its description or title changed.
    Description,
    /// Its input or output schema changed.
    Schema,
    /// Its annotations changed without granting more.
    Annotations,
    /// Its annotations now claim less safety (was read-only or
    /// non-destructive, is not).
    Escalated,
}

impl DriftKind {
    /// Its name in the config, audit records and diffs.
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

/// What Portcullis does about a drifted tool. Ordered by severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftAction {
    /// Let it through; warn and audit.
    Alert,
    /// Remove the tool from `tools/list` results and refuse calls to it
    /// (the default).
    #[default]
    Hide,
    /// Refuse every request to the server until the lock file changes.
    DenyServer,
}

impl DriftAction {
    /// Its name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftAction::Alert => "alert",
            DriftAction::Hide => "hide",
            DriftAction::DenyServer => "deny-server",
        }
    }
}

impl PinningConfig {
    /// What a drift of these kinds means: the most severe of their actions.
    pub fn action(&self, kinds: &[DriftKind]) -> DriftAction {
        kinds
            .iter()
            .map(|kind| self.on.get(kind).copied().unwrap_or(self.on_drift))
            .max()
            .unwrap_or(DriftAction::Alert)
    }
}

/// Checks of `tools/call` arguments before the policy chain runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate arguments against the tool's input schema (JSON Schema): the
    /// pinned one, or else the one the server listed.
    #[serde(default = "yes")]
    pub arguments: bool,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { arguments: true }
    }
}

/// A rate limit: a token bucket of `burst` calls refilled at `calls` per
/// `per_secs`, one bucket per distinct value of the `by` dimensions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Agents (globs) it applies to.
    #[serde(default = "everything")]
    pub agents: Vec<String>,
    /// Servers (globs) it applies to.
    #[serde(default = "everything")]
    pub servers: Vec<String>,
    /// Tools (globs) it applies to; requests without a tool match only `*`.
    #[serde(default = "everything")]
    pub tools: Vec<String>,
    /// Methods (globs) it applies to.
    #[serde(default = "tool_calls")]
    pub methods: Vec<String>,
    /// Calls allowed per `per_secs`, sustained.
    pub calls: u32,
    /// The period `calls` are counted over, in seconds.
    pub per_secs: u64,
    /// Calls allowed at once after a quiet spell (default: `calls`).
    pub burst: Option<u32>,
    /// What gets its own bucket: any of `agent`, `server` and `tool`
    /// (default: all three).
    #[serde(default = "all_dimensions")]
    pub by: Vec<RateDimension>,
}

/// A dimension a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateDimension {
    /// Each agent.
    Agent,
    /// Each server.
    Server,
    /// Each tool.
    Tool,
}

fn tool_calls() -> Vec<String> {
    vec!["tools/call".into()]
}

fn all_dimensions() -> Vec<RateDimension> {
    vec![
        RateDimension::Agent,
        RateDimension::Server,
        RateDimension::Tool,
    ]
}

/// Engine-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Default deadline per evaluation, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Default linear-memory cap per instance, in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// The largest memory cap any policy may be given, in MiB (sizes the
    /// pooling allocator's slots).
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    /// How many policy instances may be alive at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Where compiled policies are cached (default: the user's cache
    /// directory); relative to the config file.
    pub cache_dir: Option<PathBuf>,
    /// Set to false to compile every policy at every start.
    #[serde(default = "yes")]
    pub cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            timeout_ms: default_timeout_ms(),
            memory_mb: default_memory_mb(),
            max_memory_mb: default_max_memory_mb(),
            max_instances: default_max_instances(),
            cache_dir: None,
            cache: true,
        }
    }
}

fn default_timeout_ms() -> u64 {
    50
}
fn default_memory_mb() -> u64 {
    16
}
fn default_max_memory_mb() -> u64 {
    256
}
fn default_max_instances() -> u32 {
    256
}

/// Limits on traffic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest JSON-RPC message accepted from either side, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}

impl Config {
    /// Reads, parses, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for policy in &mut self.policies {
            policy.module = base.join(&policy.module);
            for fixture in &mut policy.fixtures {
                *fixture = base.join(&*fixture);
            }
        }
        let default_spool = self.beside("spool");
        let spool = |dir: &mut Option<PathBuf>| {
            *dir = Some(dir.as_ref().map_or(default_spool.clone(), |d| base.join(d)));
        };
        for sink in &mut self.audit.sinks {
            match sink {
                SinkConfig::File { path, .. } => *path = base.join(&*path),
                SinkConfig::Webhook { spool_dir, .. } => spool(spool_dir),
                SinkConfig::Component {
                    module, spool_dir, ..
                } => {
                    *module = base.join(&*module);
                    spool(spool_dir);
                }
                SinkConfig::Stdout { .. } | SinkConfig::Stderr { .. } => {}
            }
        }
        if let Some(file) = self.jwt.as_mut().and_then(|jwt| jwt.jwks_file.as_mut()) {
            *file = base.join(&*file);
        }
        if let Some(dir) = &mut self.engine.cache_dir {
            *dir = base.join(&*dir);
        }
        if let Some(store) = &mut self.approvals.store {
            *store = base.join(&*store);
        }
        let default_lock = self.default_lock();
        if let Some(pinning) = &mut self.pinning {
            let lock = pinning.lock.as_ref().map_or(default_lock, |l| base.join(l));
            pinning.lock = Some(lock);
        }
    }

    /// Where the lock file is when `[pinning]` does not say: beside the
    /// config, `NAME.lock.json` for `NAME.toml`.
    fn default_lock(&self) -> PathBuf {
        self.beside("lock.json")
    }

    /// `NAME.EXTENSION` beside the config file `NAME.toml`.
    fn beside(&self, extension: &str) -> PathBuf {
        let stem = self.path.file_stem().unwrap_or_default().to_string_lossy();
        self.path.with_file_name(format!("{stem}.{extension}"))
    }

    /// The approvals store.
    pub fn approvals_store(&self) -> PathBuf {
        self.approvals
            .store
            .clone()
            .unwrap_or_else(|| self.beside("approvals.db"))
    }

    /// The lock file of `[pinning]`, if pinning is configured.
    pub fn lock_path(&self) -> Option<&Path> {
        self.pinning.as_ref().and_then(|p| p.lock.as_deref())
    }

    /// The lock file `portcullis pin` writes: `[pinning] lock`, or the
    /// default beside the config.
    pub fn lock_file(&self) -> PathBuf {
        self.lock_path()
            .map_or_else(|| self.default_lock(), Path::to_path_buf)
    }

    fn validate_approvals(&self) -> Result<()> {
        if self.approvals.expiry_secs == 0 {
            bail!("approvals.expiry_secs: must be at least 1");
        }
        for (name, approver) in &self.approvers {
            if !is_sha256_hex(&approver.api_key_sha256) {
                bail!("approvers.{name}.api_key_sha256: must be 64 hex digits (the key's sha256)");
            }
        }
        for (i, rule) in self.approvals.rules.iter().enumerate() {
            if rule.required == 0 || rule.expiry_secs == Some(0) {
                bail!("approvals.rules[{i}]: required and expiry_secs must be at least 1");
            }
            if rule.elicit && (rule.required > 1 || !rule.approvers.is_empty()) {
                bail!(
                    "approvals.rules[{i}]: elicit lets the client's user decide alone, so it cannot go with required > 1 or named approvers"
                );
            }
            if let Some(unknown) = rule
                .approvers
                .iter()
                .find(|a| !self.approvers.contains_key(*a))
            {
                bail!("approvals.rules[{i}]: approver '{unknown}' is not in [approvers]");
            }
            let eligible = if rule.approvers.is_empty() {
                self.approvers.len()
            } else {
                rule.approvers.len()
            };
            if rule.required > 1 && (rule.required as usize) > eligible {
                bail!(
                    "approvals.rules[{i}]: required = {} but only {eligible} approver(s) may decide",
                    rule.required
                );
            }
        }
        for url in &self.approvals.notify {
            if !is_http_url(url) {
                bail!("approvals.notify: '{url}' is not an http(s) URL");
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let mut components = HashSet::new();
        for (i, sink) in self.audit.sinks.iter().enumerate() {
            match sink {
                SinkConfig::Webhook { url, .. } if !is_http_url(url) => {
                    bail!("audit.sinks[{i}]: '{url}' is not an http(s) URL");
                }
                SinkConfig::Webhook {
                    url,
                    format,
                    protocol: Protocol::Grpc,
                    ..
                } => {
                    if *format == BatchFormat::Json {
                        bail!(
                            "audit.sinks[{i}]: protocol = \"grpc\" needs format = \"otlp\" or \"otlp-traces\""
                        );
                    }
                    if !matches!(url.parse::<hyper::Uri>().map(|u| u.path().len()), Ok(0 | 1)) {
                        bail!(
                            "audit.sinks[{i}]: for gRPC, url is the collector's address without a path (e.g. http://collector:4317), not '{url}'"
                        );
                    }
                }
                SinkConfig::Component { allow_hosts, .. } => {
                    let name = sink.component_name().unwrap_or_default();
                    if !components.insert(name.clone()) {
                        bail!(
                            "audit.sinks[{i}]: another component sink is named '{name}'; give each its own `name`"
                        );
                    }
                    if let Some(bad) = allow_hosts.iter().find(|h| !is_host_grant(h)) {
                        bail!("audit.sinks[{i}].allow_hosts: '{bad}' is not `host` or `host:port`");
                    }
                }
                _ => {}
            }
        }
        let engine = &self.engine;
        if engine.timeout_ms == 0 {
            bail!("engine.timeout_ms: must be at least 1");
        }
        self.validate_approvals()?;
        if engine.memory_mb > engine.max_memory_mb {
            bail!(
                "engine.memory_mb: {} exceeds engine.max_memory_mb ({})",
                engine.memory_mb,
                engine.max_memory_mb
            );
        }
        if self.limits.max_message_bytes < 1024 {
            bail!("limits.max_message_bytes: must be at least 1024");
        }
        if self.agent.id.trim().is_empty() {
            bail!("agent.id: must not be empty");
        }
        for (id, agent) in &self.agents {
            if let Some(hash) = &agent.api_key_sha256
                && !is_sha256_hex(hash)
            {
                bail!("agents.{id}.api_key_sha256: must be 64 hex digits (the key's sha256)");
            }
        }
        if let Some(jwt) = &self.jwt {
            if jwt.issuer.trim().is_empty() || jwt.audience.trim().is_empty() {
                bail!("jwt: issuer and audience must not be empty");
            }
            let sources = [
                jwt.jwks_file.is_some(),
                jwt.jwks_url.is_some(),
                jwt.hs256_secret.is_some(),
            ];
            if sources.iter().filter(|given| **given).count() != 1 {
                bail!("jwt: give exactly one of jwks_file, jwks_url and hs256_secret");
            }
        }
        for (name, server) in &self.servers {
            if server.command.is_some() == server.url.is_some() {
                bail!(
                    "servers.{name}: give either command (a stdio server) or url (a Streamable HTTP server)"
                );
            }
        }
        for (i, limit) in self.rate_limits.iter().enumerate() {
            if limit.calls == 0 || limit.per_secs == 0 || limit.burst == Some(0) {
                bail!("rate_limits[{i}]: calls, per_secs and burst must be at least 1");
            }
            if limit.by.is_empty() {
                bail!("rate_limits[{i}].by: name at least one of agent, server and tool");
            }
        }
        if self.serve.separator.is_empty() {
            bail!("serve.separator: must not be empty");
        }
        let serve = &self.serve;
        for (name, value) in [
            ("session_idle_secs", serve.session_idle_secs),
            ("max_connections", serve.max_connections as u64),
            ("header_timeout_secs", serve.header_timeout_secs),
            ("body_timeout_secs", serve.body_timeout_secs),
        ] {
            if value == 0 {
                bail!("serve.{name}: must be at least 1");
            }
        }
        if serve.max_connections > MAX_CONNECTIONS {
            bail!("serve.max_connections: must be at most {MAX_CONNECTIONS}");
        }
        let mut names = std::collections::HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let at = format!("policy[{i}]");
            if policy.name.trim().is_empty() {
                bail!("{at}.name: must not be empty");
            }
            if !names.insert(policy.name.as_str()) {
                bail!("{at}.name: '{}' is used by another policy", policy.name);
            }
            let at = format!("{at} ('{}')", policy.name);
            if !policy.settings.is_object() {
                bail!("{at}.settings: must be a table");
            }
            if policy.recycle_after == 0 {
                bail!("{at}.recycle_after: must be at least 1");
            }
            if policy.timeout_ms == Some(0) {
                bail!("{at}.timeout_ms: must be at least 1");
            }
            if let Some(mb) = policy.memory_mb
                && mb > engine.max_memory_mb
            {
                bail!(
                    "{at}.memory_mb: {mb} exceeds engine.max_memory_mb ({})",
                    engine.max_memory_mb
                );
            }
            for (field, globs) in [
                ("servers", &policy.servers),
                ("methods", &policy.methods),
                ("tools", &policy.tools),
            ] {
                if globs.is_empty() {
                    bail!("{at}.{field}: must name at least one pattern (use \"*\" for all)");
                }
            }
        }
        for (name, server) in &self.servers {
            if server
                .command
                .as_deref()
                .is_some_and(|c| c.trim().is_empty())
            {
                bail!("servers.{name}.command: must not be empty");
            }
        }
        Ok(())
    }

    /// The policy's deadline per evaluation.
    pub fn timeout_ms(&self, policy: &PolicyConfig) -> u64 {
        policy.timeout_ms.unwrap_or(self.engine.timeout_ms)
    }

    /// The policy's memory cap in bytes.
    pub fn memory_bytes(&self, policy: &PolicyConfig) -> u64 {
        policy.memory_mb.unwrap_or(self.engine.memory_mb) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/portcullis/gw.toml"))
    }

    #[test]
    fn resolves_relative_paths_against_the_config_file() {
        let config = parse(
            r#"
            [[policy]]
            name = "ro"
            module = "policies/ro.wasm"
            [[audit.sinks]]
            type = "file"
            path = "/var/log/audit.jsonl"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.policies[0].module,
            Path::new("/etc/portcullis/policies/ro.wasm")
        );
        assert!(
            matches!(&config.audit.sinks[0], SinkConfig::File { path, .. } if path == Path::new("/var/log/audit.jsonl"))
        );
        assert_eq!(config.policies[0].failure, FailureMode::Closed);
        assert_eq!(config.policies[0].mode, Mode::Enforce);
    }

    #[test]
    fn jwt_needs_exactly_one_key_source() {
        let jwt = |keys: &str| {
            parse(&format!(
                "[jwt]\nissuer = \"https://idp\"\naudience = \"p\"\n{keys}"
            ))
        };
        let none = jwt("").unwrap_err().to_string();
        assert!(
            none.contains("exactly one of jwks_file, jwks_url and hs256_secret"),
            "{none}"
        );
        assert!(jwt("jwks_file = \"a.json\"\njwks_url = \"https://idp/jwks\"\n").is_err());
        let config = jwt("jwks_file = \"keys/jwks.json\"\n").unwrap();
        let jwt = config.jwt.unwrap();
        assert_eq!(
            jwt.jwks_file.unwrap(),
            Path::new("/etc/portcullis/keys/jwks.json")
        );
        assert_eq!((jwt.agent_claim.as_str(), jwt.leeway_secs), ("sub", 60));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\nfailure = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/portcullis/gw.toml"), "{err}");
        assert!(err.contains("failure"), "{err}");

        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\n[[policy]]\nname = \"a\"\nmodule = \"b.wasm\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy[1].name: 'a' is used by another policy"),
            "{err}"
        );

        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\nmemory_mb = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy[0] ('a').memory_mb"), "{err}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = parse("[engine]\ntimeout = 5\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn server_credentials_come_from_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-file\n").unwrap();
        // SAFETY: the variable is unique to this test; nothing else reads it.
        unsafe { std::env::set_var("PORTCULLIS_TEST_TOKEN", "from-env") };
        let server = |value: &str| ServerConfig {
            command: Some("server".into()),
            url: None,
            headers: BTreeMap::new(),
            args: vec![],
            env: BTreeMap::from([("TOKEN".into(), value.into())]),
            prefix: None,
        };
        let token = |value: &str| {
            server(value)
                .resolved_env(dir.path())
                .map(|env| env["TOKEN"].clone())
        };
        assert_eq!(token("plain").unwrap(), "plain");
        assert_eq!(token("${env:PORTCULLIS_TEST_TOKEN}").unwrap(), "from-env");
        assert_eq!(token("${file:token}").unwrap(), "from-file");
        assert_eq!(
            token("Bearer ${env:PORTCULLIS_TEST_TOKEN}/${file:token}").unwrap(),
            "Bearer from-env/from-file"
        );
        assert!(format!("{:#}", token("${env:X").unwrap_err()).contains("unclosed"));
        let missing = token("${env:PORTCULLIS_TEST_UNSET}").unwrap_err();
        assert!(format!("{missing:#}").contains("PORTCULLIS_TEST_UNSET is not set"));
        assert!(format!("{:#}", token("${vault:x}").unwrap_err()).contains("unknown reference"));
    }

    #[test]
    fn agent_keys_must_be_sha256_digests() {
        let err = parse("[agents.bot]\napi_key_sha256 = \"secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agents.bot.api_key_sha256: must be 64 hex digits"),
            "{err}"
        );
        let hash = "a".repeat(64);
        let config = parse(&format!("[agents.bot]\napi_key_sha256 = \"{hash}\"\n")).unwrap();
        assert_eq!(config.agents["bot"].servers, vec!["*"]);
        assert_eq!(config.serve.listen.to_string(), "127.0.0.1:8808");
    }

    #[test]
    fn a_delivering_sink_needs_an_http_url_and_a_known_field() {
        let err = parse("[[audit.sinks]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.sinks[0]: 'ftp://x' is not an http(s) URL"),
            "{err}"
        );
        let err = parse("[[audit.sinks]]\ntype = \"stderr\"\nonly = { outcome = [\"deny\"] }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `outcome`"), "{err}");
    }

    #[test]
    fn grpc_is_for_otlp_to_a_collectors_address_and_components_are_named_apart() {
        let sink = |fields: &str| {
            parse(&format!("[[audit.sinks]]\ntype = \"webhook\"\n{fields}"))
                .err()
                .map(|e| e.to_string())
        };
        let grpc = "protocol = \"grpc\"\n";
        let json = sink(&format!("url = \"http://c:4317\"\n{grpc}")).unwrap();
        assert!(json.contains("needs format = \"otlp\""), "{json}");
        let otlp = "format = \"otlp-traces\"\n";
        let path = sink(&format!("url = \"http://c:4317/v1/traces\"\n{grpc}{otlp}")).unwrap();
        assert!(path.contains("without a path"), "{path}");
        assert_eq!(
            sink(&format!("url = \"http://c:4317\"\n{grpc}{otlp}")),
            None
        );

        let component = "[[audit.sinks]]\ntype = \"component\"\nmodule = \"sinks/hec.wasm\"\n";
        let twice = parse(&format!("{component}{component}"))
            .unwrap_err()
            .to_string();
        assert!(
            twice.contains("another component sink is named 'hec'"),
            "{twice}"
        );
        let granted = format!("{component}allow_hosts = [\"https://siem\"]\n");
        let err = parse(&granted).unwrap_err().to_string();
        assert!(err.contains("is not `host` or `host:port`"), "{err}");
    }
}
