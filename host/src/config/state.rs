//! `[state]`: where the state that enforcement depends on lives when
//! several Portcullis processes must agree on it — rate buckets and the
//! policies' key-value store in Redis. Without it, each process keeps its
//! own in memory.

use super::*;

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB`, or `rediss://` for TLS;
    /// `${env:}` / `${file:}` references allowed. Read at start: changing
    /// it takes a restart.
    pub redis: Option<String>,
    /// How long one Redis call may take before it counts as failed, in
    /// milliseconds.
    #[serde(default = "default_state_timeout_ms")]
    pub timeout_ms: u64,
    /// Prefix of every key Portcullis writes, so deployments can share a
    /// Redis.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    /// This process' name among the deployment's replicas (e.g.
    /// `${env:HOSTNAME}`): in every audit record and checkpoint, in `portcullis
    /// status` and in `/metrics`.
    pub replica: Option<String>,
}

impl StateConfig {
    /// The replica's name, its references resolved and checked: letters,
    /// digits, `.`, `_` and `-`, at most 64.
    pub fn replica(&self, base: &Path) -> Result<Option<String>> {
        let Some(replica) = &self.replica else {
            return Ok(None);
        };
        let name = resolve_secret(replica, base).context("state.replica")?;
        let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if name.is_empty() || name.len() > 64 || !name.bytes().all(valid) {
            bail!("state.replica: '{name}' is not a name (letters, digits, . _ -, at most 64)");
        }
        Ok(Some(name))
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            redis: None,
            timeout_ms: default_state_timeout_ms(),
            prefix: default_state_prefix(),
            replica: None,
        }
    }
}

fn default_state_timeout_ms() -> u64 {
    500
}

fn default_state_prefix() -> String {
    "portcullis".into()
}
