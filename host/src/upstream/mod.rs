//! The MCP servers `portcullis serve` reaches on behalf of agents: stdio
//! servers it spawns and supervises ([`process`]) and remote Streamable
//! HTTP servers ([`remote`]). Portcullis is their MCP client, always with
//! the server's own credentials from the config. A shared connection is
//! introduced as Portcullis and used by every agent; a dedicated one
//! (`isolation = "per-session"`) is introduced with one client's
//! capabilities and `clientInfo`. What a server sends on its own — its
//! requests, progress, logging, changes — goes to the call it relates to
//! (its [`Side`]) or to the connection's [`Upstream::notices`]. Only
//! configured servers exist: the config is the allowlist.

pub mod process;
pub mod remote;

use crate::config::{Config, Isolation, ServerConfig};
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
/// so are passed on to every agent session using it; a resource's update
/// goes to the sessions subscribed to it. Others (progress, logging) belong
/// to one request or client and would leak across agents.
pub const SHARED_NOTIFICATIONS: &[&str] = &[
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
    "notifications/resources/updated",
];
/// A server's answer to a request, under the id it was sent with upstream;
/// or its text, if Portcullis cannot read it, for the relay to refuse.
pub type Answer = std::result::Result<Parsed, NotParsed>;
/// Where the messages a server sends about one call in flight go: its
/// requests to the caller, and the call's progress (with the caller's own
/// `progressToken`).
pub type Side = tokio::sync::mpsc::Sender<Parsed>;

/// How Portcullis introduces itself to a server in `initialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Introduction {
    /// The revision asked for.
    pub protocol: String,
    /// The client capabilities declared.
    pub capabilities: Value,
    /// Who the client is.
    pub client_info: Value,
}

impl Introduction {
    /// Portcullis as itself, the one client of a shared connection: it
    /// declares no capabilities, so the server asks nothing of it.
    pub fn portcullis() -> Self {
        Self {
            protocol: UPSTREAM_PROTOCOL.into(),
            capabilities: serde_json::json!({}),
            client_info: serde_json::json!({
                "name": "portcullis", "version": env!("CARGO_PKG_VERSION")
            }),
        }
    }

    /// On behalf of a client that sent `initialize` with `params`: its
    /// capabilities and `clientInfo`, and the revision it settled on.
    pub fn on_behalf(params: &Value, protocol: &str) -> Self {
        let portcullis = Self::portcullis();
        let kept = |member: &str, default: Value| match &params[member] {
            Value::Object(_) => params[member].clone(),
            _ => default,
        };
        Self {
            protocol: protocol.into(),
            capabilities: kept("capabilities", portcullis.capabilities),
            client_info: kept("clientInfo", portcullis.client_info),
        }
    }

    /// The `initialize` request, under `id`.
    fn request(&self, id: u64) -> String {
        serde_json::json!({
            "jsonrpc": "2.0", "id": id, "method": "initialize",
            "params": {
                "protocolVersion": self.protocol,
                "capabilities": self.capabilities,
                "clientInfo": self.client_info,
            }
        })
        .to_string()
    }
}

/// On a connection dedicated to one session, where what the server sends
/// the session not about a call goes (its requests, its logging): the
/// session's latest stream, if one is open.
#[derive(Default)]
pub struct Inbox(std::sync::Mutex<Option<tokio::sync::mpsc::Sender<Parsed>>>);

/// How many of the server's messages to its session may wait to be read.
const INBOX: usize = 64;

impl Inbox {
    /// A new receiver, which from now on gets what the inbox takes (the
    /// one before it no longer does).
    pub fn open(&self) -> tokio::sync::mpsc::Receiver<Parsed> {
        let (sender, receiver) = tokio::sync::mpsc::channel(INBOX);
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
        receiver
    }

    /// Where it sends now, if a receiver is open.
    pub fn sender(&self) -> Option<tokio::sync::mpsc::Sender<Parsed>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What a connection dedicated to one session holds until it is gone (its
/// place among those running).
pub type Held = Box<dyn Send + Sync>;

/// A cancellation of request `id`, sent upstream when its caller gave up.
fn cancellation(id: &str, why: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": { "requestId": serde_json::from_str::<Value>(id).unwrap_or(Value::Null), "reason": why }
    })
    .to_string()
}

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
    /// For a server with a connection per session or agent: how many run now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
}

impl Health {
    fn starting() -> Self {
        Self {
            state: Cow::Borrowed("starting"),
            restarts: 0,
            pid: None,
            last_error: None,
            instances: None,
        }
    }

    /// A server with a connection per session, `instances` of them now.
    pub fn per_session(instances: usize) -> Self {
        Self {
            state: Cow::Borrowed("per-session"),
            instances: Some(instances),
            ..Self::starting()
        }
    }

    /// A server with a connection per agent, `instances` of them now.
    pub fn per_agent(instances: usize) -> Self {
        Self {
            state: Cow::Borrowed("per-agent"),
            ..Self::per_session(instances)
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
    /// the request carried upstream, not necessarily the client's. What the
    /// server sends about the call meanwhile goes to `side`; without one,
    /// its requests are refused. Should the caller give up (drop this), the
    /// server is told the request is cancelled.
    pub async fn request(
        &self,
        request: &Parsed,
        wait: Duration,
        side: Option<Side>,
    ) -> Result<Answer> {
        match self {
            Upstream::Process(p) => p.request(request, wait, side).await,
            Upstream::Remote(r) => r.request(request, wait, side).await,
        }
    }

    /// Sends a message that gets no answer: a notification, or the answer to
    /// one of the server's own requests.
    pub async fn send(&self, text: &str) -> Result<()> {
        match self {
            Upstream::Process(p) => p.send_text(text),
            Upstream::Remote(r) => r.send(text).await,
        }
    }

    /// On a connection dedicated to one session, what the server sends it
    /// not about a call (its requests, its logging) from now on; only the
    /// latest receiver gets them.
    pub fn inbox(&self) -> tokio::sync::mpsc::Receiver<Parsed> {
        match self {
            Upstream::Process(p) => p.inbox(),
            Upstream::Remote(r) => r.inbox(),
        }
    }

    /// The server's [`SHARED_NOTIFICATIONS`] from now on.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Arc<Parsed>> {
        match self {
            Upstream::Process(p) => p.notices(),
            Upstream::Remote(r) => r.notices(),
        }
    }

    /// How it is doing.
    pub fn health(&self) -> Health {
        match self {
            Upstream::Process(p) => p.health(),
            Upstream::Remote(r) => r.health(),
        }
    }

    /// Stops a process, or ends the session with a remote server.
    pub fn stop(&self) {
        match self {
            Upstream::Process(p) => p.stop(),
            Upstream::Remote(r) => r.stop(),
        }
    }
}

/// How to reach one server, resolved from the config: what starting a
/// connection to it needs.
pub struct Plan {
    name: String,
    reach: Reach,
    max_message_bytes: usize,
    /// Whose connection is whose.
    pub isolation: Isolation,
}

enum Reach {
    Command(ServerCommand),
    Url(String, BTreeMap<String, String>),
}

impl Plan {
    /// The plan for `server` (named `name`) of `config`.
    pub fn of(name: &str, server: &ServerConfig, config: &Config) -> Result<Self> {
        let base = config.path.parent().unwrap_or(Path::new("."));
        let reach = match (&server.command, &server.url) {
            (Some(program), None) => Reach::Command(ServerCommand {
                program: program.clone(),
                args: server.args.clone(),
                env: server.resolved_env(base)?,
            }),
            (None, Some(url)) => Reach::Url(url.clone(), server.resolved_headers(base)?),
            _ => bail!("give either command (a stdio server) or url (a Streamable HTTP server)"),
        };
        Ok(Self {
            name: name.to_string(),
            reach,
            max_message_bytes: config.limits.max_message_bytes,
            isolation: server.isolation,
        })
    }

    /// Starts a connection introduced as `introduction`: shared by every
    /// agent, or dedicated to one client session, which `held` (if given)
    /// says; the connection holds `held` until it is gone.
    pub fn start(
        &self,
        introduction: Introduction,
        held: Option<Held>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Upstream> {
        let max = self.max_message_bytes;
        match &self.reach {
            Reach::Command(command) => Ok(Upstream::Process(process::Process::start(
                &self.name,
                command.clone(),
                process::Role {
                    introduction,
                    dedicated: held.is_some(),
                    held,
                },
                max,
                runtime.clone(),
            ))),
            Reach::Url(url, headers) => {
                let remote = remote::Remote::new(
                    &self.name,
                    url,
                    headers.clone(),
                    (introduction, held),
                    max,
                )?;
                remote.connect_in_background(runtime);
                Ok(Upstream::Remote(remote))
            }
        }
    }
}

/// The plan of every server of `config`, or only the one named `only`.
pub fn plans(config: &Config, only: Option<&str>) -> Result<BTreeMap<String, Plan>> {
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
    config
        .servers
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()))
        .map(|(name, server)| {
            let plan = Plan::of(name, server, config)
                .with_context(|| format!("{}: servers.{name}", config.path.display()))?;
            Ok((name.clone(), plan))
        })
        .collect()
}

/// Starts a shared connection, introduced as Portcullis, to every server
/// of `config` on `runtime`, or only to the one named `only`.
pub fn start_all(
    config: &Config,
    only: Option<&str>,
    runtime: &tokio::runtime::Handle,
) -> Result<BTreeMap<String, Arc<Upstream>>> {
    plans(config, only)?
        .into_iter()
        .map(|(name, plan)| {
            let upstream = plan.start(Introduction::portcullis(), None, runtime)?;
            Ok((name, Arc::new(upstream)))
        })
        .collect()
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
