//! Pending approvals: a call a policy says needs a person is held, and its
//! approval lives here until someone decides it, it expires, or its client
//! gives up. The store is one SQLite file shared by every Portcullis process
//! of a deployment and by `portcullis approvals`, so whoever decides acts on
//! the same record the held call waits on. An approval is bound to the agent,
//! server, tool and the sha256 of the canonical arguments: the call that runs
//! is exactly the call that was shown.

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How often a held call looks for its decision.
pub const POLL: Duration = Duration::from_millis(200);

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a person.
    Pending,
    /// A person approved it; the call runs.
    Approved,
    /// A person refused it.
    Denied,
    /// Nobody decided in time.
    Expired,
    /// The client cancelled the call or went away.
    Cancelled,
}

impl State {
    /// Its name in the store, the audit trail and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "pending" => State::Pending,
            "approved" => State::Approved,
            "denied" => State::Denied,
            "expired" => State::Expired,
            "cancelled" => State::Cancelled,
            other => bail!("unknown approval state '{other}'"),
        })
    }
}

/// The call a person is asked to approve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// The agent making the call.
    pub agent: String,
    /// The server's configured name.
    pub server: String,
    /// The method (`tools/call` for a tool).
    pub method: String,
    /// The tool, for `tools/call`.
    pub tool: Option<String>,
    /// sha256 of the canonical JSON of the arguments (or params).
    pub arguments_sha256: String,
    /// The arguments, as JSON text, for the person deciding.
    pub arguments: String,
    /// The policy that asked for approval.
    pub policy: String,
    /// Why it asked.
    pub reason: String,
    /// The tags of the decision (e.g. `risk:destructive`).
    pub tags: Vec<String>,
}

/// A held call's request for approval.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id of the held request's audit record, which names the approval.
    pub id: String,
    /// What is to be approved.
    pub call: Call,
    /// How long it may wait.
    pub expires_in: Duration,
    /// Who holds the call (this process), to tell orphans apart.
    pub holder: String,
}

/// An approval as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Approval {
    /// Its id (the held request's audit record id).
    pub id: String,
    /// When it was requested, in ms since the epoch.
    pub created_ms: u64,
    /// When it expires, in ms since the epoch.
    pub expires_ms: u64,
    /// What is to be approved.
    #[serde(flatten)]
    pub call: Call,
    /// Where it stands.
    pub state: State,
    /// Who decided (a person, `client`, `portcullis`).
    pub decided_by: Option<String>,
    /// When it was decided, in ms since the epoch.
    pub decided_ms: Option<u64>,
    /// The decider's comment or the reason it ended.
    pub comment: Option<String>,
    /// The process holding the call.
    pub holder: String,
}

/// The shared approvals store.
pub struct Approvals {
    path: PathBuf,
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    agent TEXT NOT NULL,
    server TEXT NOT NULL,
    method TEXT NOT NULL,
    tool TEXT,
    arguments_sha256 TEXT NOT NULL,
    arguments TEXT NOT NULL,
    policy TEXT NOT NULL,
    reason TEXT NOT NULL,
    tags TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    decided_ms INTEGER,
    comment TEXT,
    holder TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, created_ms);
";

const COLUMNS: &str = "id, created_ms, expires_ms, agent, server, method, tool, arguments_sha256, \
     arguments, policy, reason, tags, state, decided_by, decided_ms, comment, holder";

impl Approvals {
    /// Opens (creating if need be) the store at `path`, readable and
    /// writable by this user only: whoever can write it can approve.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = Connection::open(path)
            .with_context(|| format!("cannot open the approvals store {}", path.display()))?;
        restrict(path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")
            .context("cannot switch the approvals store to WAL")?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("{} is not an approvals store", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            db: Mutex::new(db),
        })
    }

    /// Where the store is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a pending approval for `request`.
    pub fn request(&self, request: &Request) -> Result<Approval> {
        let now = now_ms();
        let expires = now + request.expires_in.as_millis() as u64;
        let call = &request.call;
        let tags = serde_json::to_string(&call.tags)?;
        self.db()
            .execute(
                &format!("INSERT INTO approvals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'pending', NULL, NULL, NULL, ?13)"),
                params![
                    request.id,
                    now as i64,
                    expires as i64,
                    call.agent,
                    call.server,
                    call.method,
                    call.tool,
                    call.arguments_sha256,
                    call.arguments,
                    call.policy,
                    call.reason,
                    tags,
                    request.holder
                ],
            )
            .context("cannot record the approval")?;
        self.get(&request.id)?
            .context("the approval vanished as it was recorded")
    }

    /// The approval `id`, or the only one whose id starts with it.
    pub fn get(&self, id: &str) -> Result<Option<Approval>> {
        let db = self.db();
        let exact = db
            .query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                [id],
                read,
            )
            .optional()?;
        if exact.is_some() || id.len() < 4 {
            return exact.transpose();
        }
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE id LIKE ?1 || '%' LIMIT 2"
        ))?;
        let found: Vec<_> = query.query_map([id], read)?.collect::<Result<_, _>>()?;
        match found.len() {
            0 => Ok(None),
            1 => found.into_iter().next().transpose(),
            _ => bail!("'{id}' names more than one approval; give more of the id"),
        }
    }

    /// Approvals in `state` (all when `None`), newest first, at most `limit`.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE ?1 IS NULL OR state = ?1 \
             ORDER BY created_ms DESC, id DESC LIMIT ?2"
        ))?;
        let rows = query.query_map(params![state.map(State::as_str), limit as i64], read)?;
        rows.map(|r| r?).collect()
    }

    /// Ends a pending approval as `state` (approved, denied, cancelled or
    /// expired), by `by`. An approval that already ended is returned as it
    /// is; one past its expiry can only expire.
    pub fn settle(
        &self,
        id: &str,
        state: State,
        by: &str,
        comment: Option<&str>,
    ) -> Result<Approval> {
        let approval = self
            .get(id)?
            .with_context(|| format!("no approval '{id}'"))?;
        if approval.state != State::Pending {
            return Ok(approval);
        }
        let now = now_ms();
        let (state, by, comment) = if now >= approval.expires_ms && state != State::Cancelled {
            (State::Expired, "portcullis", Some("nobody decided in time"))
        } else {
            (state, by, comment)
        };
        self.db().execute(
            "UPDATE approvals SET state = ?2, decided_by = ?3, decided_ms = ?4, comment = ?5 \
             WHERE id = ?1 AND state = 'pending'",
            params![approval.id, state.as_str(), by, now as i64, comment],
        )?;
        self.get(&approval.id)?
            .context("the approval vanished as it was decided")
    }

    /// Pending approvals held by a holder `alive` says is gone: their calls
    /// can no longer run, so they are cancelled. Returns them, cancelled.
    pub fn cancel_orphans(&self, alive: impl Fn(&str) -> bool) -> Result<Vec<Approval>> {
        let orphans: Vec<Approval> = self
            .list(Some(State::Pending), usize::MAX >> 1)?
            .into_iter()
            .filter(|a| !alive(&a.holder))
            .collect();
        orphans
            .iter()
            .map(|a| {
                let why = "the Portcullis process holding the call ended";
                self.settle(&a.id, State::Cancelled, "portcullis", Some(why))
            })
            .collect()
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().expect("approvals store poisoned")
    }
}

/// Makes the store private to its owner.
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to its owner", path.display()))
}

fn read(row: &Row) -> rusqlite::Result<Result<Approval>> {
    let text = |i: usize| row.get::<_, String>(i);
    let tags: String = text(11)?;
    let state: String = text(12)?;
    let approval = (|| {
        Ok(Approval {
            id: text(0)?,
            created_ms: row.get::<_, i64>(1)? as u64,
            expires_ms: row.get::<_, i64>(2)? as u64,
            call: Call {
                agent: text(3)?,
                server: text(4)?,
                method: text(5)?,
                tool: row.get(6)?,
                arguments_sha256: text(7)?,
                arguments: text(8)?,
                policy: text(9)?,
                reason: text(10)?,
                tags: serde_json::from_str(&tags).context("unreadable tags")?,
            },
            state: State::parse(&state)?,
            decided_by: row.get(13)?,
            decided_ms: row.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            comment: row.get(15)?,
            holder: text(16)?,
        })
    })();
    Ok(approval)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, expires_in: Duration) -> Request {
        Request {
            id: id.into(),
            call: Call {
                agent: "bot".into(),
                server: "fs".into(),
                method: "tools/call".into(),
                tool: Some("delete".into()),
                arguments_sha256: "ab".into(),
                arguments: r#"{"path":"/x"}"#.into(),
                policy: "gate".into(),
                reason: "destructive".into(),
                tags: vec!["risk:destructive".into()],
            },
            expires_in,
            holder: "host-1".into(),
        }
    }

    fn store() -> (tempfile::TempDir, Approvals) {
        let dir = tempfile::tempdir().unwrap();
        let store = Approvals::open(&dir.path().join("state/approvals.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn an_approval_is_decided_once() {
        let (_dir, store) = store();
        let pending = store
            .request(&request("0192-aaaa", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(pending.state, State::Pending);
        assert_eq!(pending.call.tags, ["risk:destructive"]);
        let approved = store
            .settle("0192-a", State::Approved, "alice", Some("ok"))
            .unwrap();
        assert_eq!(approved.state, State::Approved);
        assert_eq!(approved.decided_by.as_deref(), Some("alice"));
        let again = store
            .settle("0192-aaaa", State::Denied, "bob", None)
            .unwrap();
        assert_eq!(again.state, State::Approved, "a decision is final");
        assert_eq!(store.list(Some(State::Pending), 10).unwrap(), vec![]);
    }

    #[test]
    fn a_late_decision_expires_the_approval_instead() {
        let (_dir, store) = store();
        store.request(&request("late-1", Duration::ZERO)).unwrap();
        let settled = store
            .settle("late-1", State::Approved, "alice", None)
            .unwrap();
        assert_eq!(settled.state, State::Expired);
        assert_eq!(settled.decided_by.as_deref(), Some("portcullis"));
    }

    #[test]
    fn orphans_are_cancelled_and_ambiguous_prefixes_refused() {
        let (_dir, store) = store();
        store
            .request(&request("same-1", Duration::from_secs(60)))
            .unwrap();
        let mut other = request("same-2", Duration::from_secs(60));
        other.holder = "host-2".into();
        store.request(&other).unwrap();
        assert!(
            store
                .get("same")
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
        let cancelled = store.cancel_orphans(|holder| holder == "host-2").unwrap();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(cancelled[0].id, "same-1");
        assert_eq!(cancelled[0].state, State::Cancelled);
        let pending = store.list(Some(State::Pending), 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, "same-2");
    }

    #[test]
    fn the_store_is_shared_between_handles_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = store();
        let path = dir.path().join("state/approvals.db");
        store
            .request(&request("shared-1", Duration::from_secs(60)))
            .unwrap();
        let other = Approvals::open(&path).unwrap();
        other
            .settle("shared-1", State::Denied, "bob", Some("no"))
            .unwrap();
        assert_eq!(store.get("shared-1").unwrap().unwrap().state, State::Denied);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
