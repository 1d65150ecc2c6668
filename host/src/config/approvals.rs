//! `[approvals]`: which calls wait for a person, who may decide them, and
//! the store they wait in.

use super::*;

/// Human approval of held calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// The approvals store, shared by every Portcullis process of the
    /// deployment and `portcullis approvals`: an SQLite file, relative to
    /// the config file (default: beside it, `NAME.approvals.db` for
    /// `NAME.toml`), or a PostgreSQL database shared by replicas on many
    /// machines, `postgres://USER:PASSWORD@HOST:PORT/DB` (`${env:}` /
    /// `${file:}` references allowed).
    pub store: Option<String>,
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

/// Where the approvals store is.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// An SQLite file, shared by the processes of one machine.
    File(PathBuf),
    /// A PostgreSQL database, shared by replicas on many machines.
    Postgres {
        /// Its URL as configured, references unresolved (they are resolved
        /// when it is opened).
        url: String,
        /// The config file's folder, which `${file:}` references are
        /// relative to.
        base: PathBuf,
    },
}

impl StoreLocation {
    /// The store `store` names, relative to the config folder `base`; a
    /// reference naming the whole of it (`${env:APPROVALS_URL}`) is
    /// resolved to tell which kind it is.
    pub fn of(store: &str, base: &Path) -> Self {
        let named = match store.starts_with("${") {
            true => resolve_secret(store, base).unwrap_or_default(),
            false => store.to_string(),
        };
        if named.starts_with("postgres://") || named.starts_with("postgresql://") {
            StoreLocation::Postgres {
                url: store.to_string(),
                base: base.to_path_buf(),
            }
        } else {
            StoreLocation::File(base.join(named))
        }
    }

    /// What `url` names, to show: its user, hosts, ports and database, as
    /// the PostgreSQL driver reads them — never its password, wherever the
    /// URL put it.
    pub fn redacted(url: &str) -> String {
        use postgres::config::Host;
        let Ok(config) = url.parse::<postgres::Config>() else {
            return "postgres://(not a PostgreSQL URL)".into();
        };
        let user = config
            .get_user()
            .map_or_else(String::new, |user| format!("{user}@"));
        let ports = config.get_ports();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let name = match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match ports.get(i).or(ports.first()) {
                    Some(port) => format!("{name}:{port}"),
                    None => name,
                }
            })
            .collect();
        let database = config.get_dbname().unwrap_or_default();
        format!("postgres://{user}{}/{database}", hosts.join(","))
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::File(path) => write!(f, "{}", path.display()),
            // Shown resolved (where its references resolve), its password
            // never.
            StoreLocation::Postgres { url, base } => {
                let resolved = resolve_secret(url, base).unwrap_or_else(|_| url.clone());
                f.write_str(&Self::redacted(&resolved))
            }
        }
    }
}
