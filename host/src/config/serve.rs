//! `[serve]` and `[admin]`: the listeners of `portcullis serve` and their
//! limits (sessions, connections, timeouts).

use super::*;

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
    /// How many server connections of their own (`isolation =
    /// "per-session"`) all sessions may have at once; a session that would
    /// need one more is refused at `initialize` (HTTP 429).
    #[serde(default = "default_max_server_instances")]
    pub max_server_instances: usize,
    /// How many of those one agent's sessions may have at once.
    #[serde(default = "default_max_server_instances_per_agent")]
    pub max_server_instances_per_agent: usize,
    /// How many connections a listener (MCP and admin alike) serves at
    /// once; more wait in the kernel's queue until one closes. Read at start.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How many of them one agent may hold, whatever addresses it comes
    /// from (default: a quarter of `max_connections`); a request past it is
    /// refused (HTTP 429) and its connection closed. Event streams count.
    /// 0: no limit.
    #[serde(default)]
    pub max_connections_per_agent: Option<usize>,
    /// How many connections one peer address may hold before a request on
    /// them authenticates (default: an eighth of `max_connections`); more
    /// are closed as they come. Behind a balancer that connects from one
    /// address, raise it or set 0 (no limit). Read at start.
    #[serde(default)]
    pub max_connections_per_peer: Option<usize>,
    /// How long a client may take to send a request's headers, and how long
    /// an idle kept-alive connection stays open, in seconds. Read at start.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// How long a client may take to send a request's body, in seconds.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
    /// Keys (`${env:}` / `${file:}` references; each at least 32 characters)
    /// that seal session ids, so any replica holding them can resume a
    /// 2025-revision session another opened: the first seals, all open.
    /// Empty: random ids, each session served by the replica that opened it.
    #[serde(default)]
    pub session_keys: Vec<String>,
    /// Once told to stop (SIGTERM), how long the requests under way may
    /// take to finish; new connections are refused at once.
    #[serde(default = "default_drain")]
    pub drain_secs: u64,
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
            max_server_instances: default_max_server_instances(),
            max_server_instances_per_agent: default_max_server_instances_per_agent(),
            max_connections: default_max_connections(),
            max_connections_per_agent: None,
            max_connections_per_peer: None,
            header_timeout_secs: default_header_timeout(),
            body_timeout_secs: default_body_timeout(),
            session_keys: Vec::new(),
            drain_secs: default_drain(),
        }
    }
}

impl ServeConfig {
    /// How many connections one agent may hold (0: no limit).
    pub fn agent_share(&self) -> usize {
        self.max_connections_per_agent
            .unwrap_or((self.max_connections / 4).max(1))
    }

    /// How many unauthenticated connections one peer address may hold (0:
    /// no limit).
    pub fn peer_share(&self) -> usize {
        self.max_connections_per_peer
            .unwrap_or((self.max_connections / 8).max(1))
    }
}

fn default_session_idle() -> u64 {
    1800
}

fn default_max_sessions_per_agent() -> usize {
    128
}

fn default_max_server_instances() -> usize {
    32
}

fn default_max_server_instances_per_agent() -> usize {
    8
}

fn default_max_connections() -> usize {
    512
}

/// The most connections a listener may be configured to serve at once.
pub(super) const MAX_CONNECTIONS: usize = 1 << 20;

fn default_drain() -> u64 {
    30
}

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
