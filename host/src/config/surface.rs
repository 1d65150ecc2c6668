//! `[pinning]`, `[validation]` and `[[rate_limits]]`: the lock file and what
//! drift does, schema checks of arguments, and rate limits.

use super::*;

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
