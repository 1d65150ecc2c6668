//! `[audit]`: the trail's sinks, their batching, spooling and filters.

use super::*;

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
    /// Record answers' results (and errors) themselves, with their
    /// request's arguments, so `portcullis replay` can re-judge answers
    /// too. Off by default: results can be large and sensitive.
    #[serde(default)]
    pub include_results: bool,
    /// Where records go; `--audit-file` adds a file sink.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// The head of each chained file goes to the delivering sinks (a
    /// `chain-head` record) after this many records at most, so a second
    /// party holds it (`portcullis audit verify --head`). 0: never.
    #[serde(default = "default_head_every")]
    pub head_every: u64,
    /// …or once this many seconds passed since the last, whichever comes
    /// first.
    #[serde(default = "default_head_secs")]
    pub head_secs: u64,
}

fn default_head_every() -> u64 {
    100
}

fn default_head_secs() -> u64 {
    10
}

impl AuditConfig {
    /// The modules of its component sinks.
    pub fn sink_modules(&self) -> impl Iterator<Item = &ModuleSource> {
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
            include_results: false,
            sinks: Vec::new(),
            head_every: default_head_every(),
            head_secs: default_head_secs(),
        }
    }
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
        /// The component: a path relative to the config file, or an `oci://`
        /// reference.
        module: ModuleSource,
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
        Some(name.clone().unwrap_or_else(|| module.stem()))
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
