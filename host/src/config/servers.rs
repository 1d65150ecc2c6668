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
