//! The MCP servers `portcullis serve` reaches on behalf of every agent:
//! stdio servers it spawns and supervises ([`process`]) and remote
//! Streamable HTTP servers ([`remote`]). Portcullis is their one MCP client:
//! it initializes each once, with its own identity and the server's own
//! credentials from the config, and shares the connection among all agents'
//! sessions. Only configured servers exist: the config is the allowlist.

pub mod process;
pub mod remote;

use crate::config::{Config, ServerConfig};
use crate::protocol::parsed::{NotParsed, Parsed};
use anyhow::{Context, Result, anyhow, bail};
use process::ServerCommand;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The first pause before a stdio server is restarted or a remote one is
/// reached again; it doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The protocol revision Portcullis asks its upstreams for.
pub const UPSTREAM_PROTOCOL: &str = "2025-06-18";
/// Server notifications that concern all of a server's clients alike, and
/// so are passed on to every agent session using it. Others (progress,
/// logging) belong to one request or client and would leak across agents.
pub const SHARED_NOTIFICATIONS: &[&str] = &[
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
];
/// A server's answer to a request, under the id it was sent with upstream;
/// or its text, if Portcullis cannot read it, for the relay to refuse.
pub type Answer = std::result::Result<Parsed, NotParsed>;

/// The notification that completes the handshake.
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// How an upstream is doing, for the health endpoint and the status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `starting`, `ready`, `restarting` (a process) or `unreachable` (remote).
    pub state: Cow<'static, str>,
    /// Restarts (a process) or reconnections (remote) so far.
    pub restarts: u64,
    /// The child's process id while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why it last stopped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Health {
    fn starting() -> Self {
        Self {
            state: Cow::Borrowed("starting"),
            restarts: 0,
            pid: None,
            last_error: None,
        }
    }
}

/// One upstream server.
pub enum Upstream {
    /// A stdio server Portcullis runs.
    Process(Arc<process::Process>),
    /// A Streamable HTTP server elsewhere.
    Remote(remote::Remote),
}

impl Upstream {
    /// The server's `initialize` result, waiting up to `wait` for it.
    pub async fn initialized(&self, wait: Duration) -> Result<Arc<Value>> {
        match self {
            Upstream::Process(p) => p.initialized(wait).await,
            Upstream::Remote(r) => r.initialized(wait).await,
        }
    }

    /// Sends `request` and returns the server's answer. Its id is the one
    /// the request carried upstream, not necessarily the client's.
    pub async fn request(&self, request: &Parsed, wait: Duration) -> Result<Answer> {
        match self {
            Upstream::Process(p) => p.request(request, wait).await,
            Upstream::Remote(r) => r.request(request, wait).await,
        }
    }

    /// Sends a notification.
    pub async fn notify(&self, text: &str) -> Result<()> {
        match self {
            Upstream::Process(p) => p.notify(text),
            Upstream::Remote(r) => r.notify(text).await,
        }
    }

    /// The server's [`SHARED_NOTIFICATIONS`] from now on; `None` for a remote
    /// server, whose notifications are not received.
    pub fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<Parsed>>> {
        match self {
            Upstream::Process(p) => Some(p.notices()),
            Upstream::Remote(_) => None,
        }
    }

    /// Whether [`Upstream::notices`] has any.
    pub fn has_notices(&self) -> bool {
        matches!(self, Upstream::Process(_))
    }

    /// How it is doing.
    pub fn health(&self) -> Health {
        match self {
            Upstream::Process(p) => p.health(),
            Upstream::Remote(r) => r.health(),
        }
    }

    /// Stops a process (a remote server is simply no longer used).
    pub fn stop(&self) {
        if let Upstream::Process(p) = self {
            p.stop();
        }
    }
}

/// Starts every server of `config` on `runtime`, or only the one named
/// `only`.
pub fn start_all(
    config: &Config,
    only: Option<&str>,
    runtime: &tokio::runtime::Handle,
) -> Result<BTreeMap<String, Arc<Upstream>>> {
    if config.servers.is_empty() {
        bail!("{}: no [servers] configured", config.path.display());
    }
    if let Some(name) = only
        && !config.servers.contains_key(name)
    {
        bail!(
            "{}: no server named '{name}' in [servers]",
            config.path.display()
        );
    }
    let base = config.path.parent().unwrap_or(Path::new("."));
    config
        .servers
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()))
        .map(|(name, server)| {
            let upstream = start(name, server, config, base, runtime)
                .with_context(|| format!("{}: servers.{name}", config.path.display()))?;
            Ok((name.clone(), Arc::new(upstream)))
        })
        .collect()
}

fn start(
    name: &str,
    server: &ServerConfig,
    config: &Config,
    base: &Path,
    runtime: &tokio::runtime::Handle,
) -> Result<Upstream> {
    let max = config.limits.max_message_bytes;
    match (&server.command, &server.url) {
        (Some(program), None) => {
            let command = ServerCommand {
                program: program.clone(),
                args: server.args.clone(),
                env: server.resolved_env(base)?,
            };
            Ok(Upstream::Process(process::Process::start(
                name,
                command,
                max,
                runtime.clone(),
            )))
        }
        (None, Some(url)) => {
            let headers = server.resolved_headers(base)?;
            let remote = remote::Remote::new(name, url, headers, max)?;
            remote.connect_in_background(runtime);
            Ok(Upstream::Remote(remote))
        }
        _ => bail!("give either command (a stdio server) or url (a Streamable HTTP server)"),
    }
}

/// Portcullis' own `initialize` request.
fn initialize_request(id: u64) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {
            "protocolVersion": UPSTREAM_PROTOCOL,
            "capabilities": {},
            "clientInfo": { "name": "portcullis", "version": env!("CARGO_PKG_VERSION") }
        }
    })
    .to_string()
}

/// The result of an `initialize` answer, or why there is none.
fn initialize_result(answer: &str) -> Result<Value> {
    let mut answer: Value = serde_json::from_str(answer).context("initialize answer")?;
    match answer.get_mut("result") {
        Some(result) => Ok(result.take()),
        None => bail!("initialize failed: {}", answer["error"]),
    }
}

fn not_available(name: &str, health: &Health) -> anyhow::Error {
    let why = health
        .last_error
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    anyhow!("server '{name}' is not available ({}{why})", health.state)
}
