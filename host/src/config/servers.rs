//! `[servers.NAME]`: the MCP servers behind Portcullis, local commands or
//! remote URLs, with their environment and headers.

use super::*;

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
    /// In `serve` mode, whose connection to the server is whose.
    #[serde(default)]
    pub isolation: Isolation,
}

/// Whether agents share one connection to a server (`serve` mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// One process (or remote session) for every agent, initialized by
    /// Portcullis with no client capabilities: cheap, and right for servers
    /// whose tools do not ask their client anything. A stdio server's own
    /// requests are refused (nothing says which agent they concern); a
    /// remote server's, on a call's own stream, go to that call's agent.
    #[default]
    Shared,
    /// One process (or remote session) per client session, initialized with
    /// that client's capabilities and `clientInfo`: the server behaves as it
    /// would for the agent directly (sampling, elicitation, roots, logging,
    /// subscriptions). Stopped when the session ends or expires.
    PerSession,
    /// One process (or remote session) per agent, shared by that agent's
    /// sessions and introduced with the capabilities of the session that
    /// started it: the server tells agents apart, at a process per agent.
    /// Stopped when the agent's last session ends or expires.
    PerAgent,
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

/// Each server's prefix for merged names on serve's aggregated endpoint:
/// its `prefix`, or its name.
pub fn prefixes(servers: &BTreeMap<String, ServerConfig>) -> BTreeMap<String, String> {
    servers
        .iter()
        .map(|(name, server)| {
            let prefix = server.prefix.clone().unwrap_or_else(|| name.clone());
            (name.clone(), prefix)
        })
        .collect()
}

/// Why merged names could be read as two servers' (one prefix and the
/// separator begin another's, as `a__` begins `a__b__`): a call meant for
/// one server would be routed to the other.
pub(super) fn ambiguous_prefixes(
    servers: &BTreeMap<String, ServerConfig>,
    separator: &str,
) -> Option<String> {
    let prefixes = prefixes(servers);
    for (name, prefix) in &prefixes {
        for (other, other_prefix) in &prefixes {
            let (mine, theirs) = (
                format!("{prefix}{separator}"),
                format!("{other_prefix}{separator}"),
            );
            if name != other && theirs.starts_with(&mine) {
                return Some(format!(
                    "servers.{other}: its merged names ('{theirs}…') also begin with \
                     servers.{name}'s ('{mine}…'), so a name could belong to either; \
                     give one of them another prefix"
                ));
            }
        }
    }
    None
}
