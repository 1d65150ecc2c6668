//! Who may connect and who may decide: the stdio agent, API-key agents,
//! agents' JWTs, and approvers.

use super::*;

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

/// A person who may decide held calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverEntry {
    /// sha256 (hex) of their API key, sent to the admin listener as
    /// `Authorization: Bearer KEY` (the page asks for it once).
    pub api_key_sha256: String,
}
