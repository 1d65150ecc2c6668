//! Pending approvals: a call a policy says needs a person is held, and its
//! approval lives here until someone decides it, it expires, or its client
//! gives up. The store is one SQLite file shared by every Portcullis process
//! of a deployment and by `portcullis approvals`, so whoever decides acts on
//! the same record the held call waits on. An approval is bound to the agent,
//! server, tool and the sha256 of the canonical arguments: the call that runs
//! is exactly the call that was shown. The rule that matched the call is
//! stored with it — who may decide, how many must approve, how long an
//! approval may be reused, whether the client's own user may decide it —
//! so every way of deciding (the CLI, the admin API and page) is held to the
//! same rule by [`Approvals::decide`], and the client's user only where the
//! rule let it ([`Approvals::answer_by_user`]). An approval that a client
//! carried back as a receipt runs its call once ([`Approvals::consume`]);
//! the store keeps the key those receipts are sealed with, so every process
//! sharing it honours them. One agent may have only so many approvals
//! pending at once ([`Request::max_pending`]).

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

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

impl Call {
    /// Whether `other` is the same call: agent, server, method, tool and
    /// arguments.
    pub fn same_call(&self, other: &Call) -> bool {
        self.agent == other.agent
            && self.server == other.server
            && self.method == other.method
            && self.tool == other.tool
            && self.arguments_sha256 == other.arguments_sha256
    }
}

/// Who may decide a call and what it takes, as the matching rule said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Terms {
    /// The approvers who may decide; `None`: anyone who may decide at all.
    pub approvers: Option<Vec<String>>,
    /// How many distinct approvers must approve (a deny by one is final).
    pub required: u32,
    /// For how long after its approval the same call (agent, server, tool,
    /// arguments) runs again without asking, in ms; 0: never.
    pub reuse_ms: u64,
}

impl Default for Terms {
    fn default() -> Self {
        Self {
            approvers: None,
            required: 1,
            reuse_ms: 0,
        }
    }
}

/// A held call's request for approval.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id of the held request's audit record, which names the approval.
    pub id: String,
    /// What is to be approved.
    pub call: Call,
    /// Who may decide it.
    pub terms: Terms,
    /// How long it may wait.
    pub expires_in: Duration,
    /// Who holds the call (this process), to tell orphans apart.
    pub holder: String,
    /// Whether the client's own user may decide it (the rule says `elicit`).
    pub elicit: bool,
    /// How many approvals the agent may have pending at once; the request is
    /// refused with [`TooManyPending`] past it. 0: no limit.
    pub max_pending: u32,
}

/// A request for approval refused because its agent has too many pending.
#[derive(Debug)]
pub struct TooManyPending {
    /// The agent.
    pub agent: String,
    /// How many it may have.
    pub limit: u32,
}

impl std::fmt::Display for TooManyPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent '{}' already has {} calls waiting for approval (approvals.max_pending_per_agent); \
             this one is refused until some are decided",
            self.agent, self.limit
        )
    }
}

impl std::error::Error for TooManyPending {}

/// An id prefix that more than one approval starts with.
#[derive(Debug)]
pub struct Ambiguous(pub String);

impl std::fmt::Display for Ambiguous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "'{}' names more than one approval; give more of the id",
            self.0
        )
    }
}

impl std::error::Error for Ambiguous {}

/// One approver's approval, while more are needed and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vote {
    /// Who approved.
    pub approver: String,
    /// When, in ms since the epoch.
    pub decided_ms: u64,
    /// Their comment.
    pub comment: Option<String>,
}

/// A person's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the call run (once enough approvers agree).
    Approve,
    /// Refuse it.
    Deny,
}

/// Why a person's decision was not taken.
#[derive(Debug)]
pub enum Refused {
    /// No such approval.
    Unknown(String),
    /// The rule does not let this approver decide it.
    NotAllowed {
        /// Who tried.
        approver: String,
        /// Who may.
        approvers: Vec<String>,
    },
    /// This approver already approved it; others must too.
    AlreadyApproved(Box<Approval>),
    /// It is no longer pending.
    Ended(Box<Approval>),
    /// Its rule does not let the client's user decide it.
    NotAskable(String),
    /// The id prefix names more than one approval.
    Ambiguous(String),
    /// The store failed.
    Store(anyhow::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unknown(id) => write!(f, "no approval '{id}'"),
            Refused::NotAllowed {
                approver,
                approvers,
            } => write!(
                f,
                "{approver} may not decide this call (its rule names {})",
                approvers.join(", ")
            ),
            Refused::AlreadyApproved(a) => write!(
                f,
                "{} already has your approval; it needs {} more",
                a.id,
                a.terms.required as usize - a.votes.len()
            ),
            Refused::Ended(a) => write!(
                f,
                "{} is already {}{}",
                a.id,
                a.state.as_str(),
                a.decided_by
                    .as_deref()
                    .map_or_else(String::new, |by| format!(" (by {by})"))
            ),
            Refused::NotAskable(id) => write!(
                f,
                "{id} may not be decided by the client's user: its rule does not say elicit, \
                 or names its approvers"
            ),
            Refused::Ambiguous(id) => Ambiguous(id.clone()).fmt(f),
            Refused::Store(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for Refused {}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<Ambiguous>() {
            Ok(ambiguous) => Refused::Ambiguous(ambiguous.0),
            Err(e) => Refused::Store(e),
        }
    }
}

impl From<rusqlite::Error> for Refused {
    fn from(e: rusqlite::Error) -> Self {
        Refused::Store(e.into())
    }
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
    /// Who may decide it.
    #[serde(flatten)]
    pub terms: Terms,
    /// The approvals given so far (all of them, once approved).
    pub votes: Vec<Vote>,
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
    /// Whether the client's own user may decide it.
    pub elicit: bool,
    /// When a client's receipt for it ran its call, in ms since the epoch:
    /// a receipt runs its call once.
    pub used_ms: Option<u64>,
}

/// The shared approvals store.
pub struct Approvals {
    path: PathBuf,
    db: Mutex<Connection>,
    /// The key receipts for its approvals are sealed with.
    receipt_key: [u8; 32],
    /// Told after each change made through this handle.
    on_change: OnceLock<Box<dyn Fn() + Send + Sync>>,
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

/// Version 1: the rule's terms and the votes of a two-person rule.
const SCHEMA_1: &str = "
ALTER TABLE approvals ADD COLUMN approvers TEXT;
ALTER TABLE approvals ADD COLUMN required INTEGER NOT NULL DEFAULT 1;
ALTER TABLE approvals ADD COLUMN reuse_ms INTEGER NOT NULL DEFAULT 0;
CREATE TABLE votes (
    approval TEXT NOT NULL REFERENCES approvals (id),
    approver TEXT NOT NULL,
    decided_ms INTEGER NOT NULL,
    comment TEXT,
    PRIMARY KEY (approval, approver)
);
CREATE INDEX approvals_reuse ON approvals (agent, server, arguments_sha256, state);
PRAGMA user_version = 1;
";

/// Version 2: who may decide through the client, single-use receipts and
/// their key, and counting an agent's pending approvals.
const SCHEMA_2: &str = "
ALTER TABLE approvals ADD COLUMN elicit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE approvals ADD COLUMN used_ms INTEGER;
CREATE TABLE keys (name TEXT PRIMARY KEY, key BLOB NOT NULL);
CREATE INDEX approvals_agent ON approvals (agent, state);
PRAGMA user_version = 2;
";

const COLUMNS: &str = "id, created_ms, expires_ms, agent, server, method, tool, arguments_sha256, \
     arguments, policy, reason, tags, state, decided_by, decided_ms, comment, holder, \
     approvers, required, reuse_ms, elicit, used_ms";

impl Approvals {
    /// Opens (creating if need be) the store at `path`, readable and
    /// writable by this user only: whoever can write it can approve.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut db = Connection::open(path)
            .with_context(|| format!("cannot open the approvals store {}", path.display()))?;
        restrict(path)?;
        db.busy_timeout(BUSY)?;
        to_wal(&db).context("cannot switch the approvals store to WAL")?;
        migrate(&mut db)
            .with_context(|| format!("{} is not an approvals store", path.display()))?;
        let receipt_key = receipt_key(&db)
            .with_context(|| format!("cannot read the receipt key of {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            db: Mutex::new(db),
            receipt_key,
            on_change: OnceLock::new(),
        })
    }

    /// The key receipts for this store's approvals are sealed with, the same
    /// for every process sharing it (and as secret as the store, which
    /// whoever can read can approve anyway).
    pub fn receipt_key(&self) -> &[u8; 32] {
        &self.receipt_key
    }

    /// Calls `hook` after each change made through this handle (once: a
    /// second hook is ignored).
    pub fn on_change(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(hook));
    }

    fn changed(&self) {
        if let Some(hook) = self.on_change.get() {
            hook();
        }
    }

    /// Where the store is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a pending approval for `request`.
    pub fn request(&self, request: &Request) -> Result<Approval> {
        let now = now_ms();
        let expires = now + request.expires_in.as_millis() as u64;
        let (call, terms) = (&request.call, &request.terms);
        let tags = serde_json::to_string(&call.tags)?;
        let approvers = terms
            .approvers
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if request.max_pending > 0 {
            let pending: i64 = tx.query_row(
                "SELECT COUNT(*) FROM approvals WHERE agent = ?1 AND state = 'pending' \
                 AND expires_ms > ?2",
                params![call.agent, now as i64],
                |r| r.get(0),
            )?;
            if pending >= i64::from(request.max_pending) {
                return Err(TooManyPending {
                    agent: call.agent.clone(),
                    limit: request.max_pending,
                }
                .into());
            }
        }
        tx.execute(
                &format!("INSERT INTO approvals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'pending', NULL, NULL, NULL, ?13, ?14, ?15, ?16, ?17, NULL)"),
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
                    request.holder,
                    approvers,
                    terms.required,
                    terms.reuse_ms as i64,
                    request.elicit
                ],
            )
            .context("cannot record the approval")?;
        let recorded =
            fetch(&tx, &request.id)?.context("the approval vanished as it was recorded")?;
        tx.commit()?;
        drop(db);
        self.changed();
        Ok(recorded)
    }

    /// The approval `id`, exactly.
    pub fn get(&self, id: &str) -> Result<Option<Approval>> {
        fetch(&self.db(), id)
    }

    /// The approval `id`, or the only one whose id starts with it (as people
    /// type ids); [`Ambiguous`] when several do.
    pub fn find(&self, id: &str) -> Result<Option<Approval>> {
        let db = self.db();
        if let Some(exact) = fetch(&db, id)? {
            return Ok(Some(exact));
        }
        if id.len() < 4 {
            return Ok(None);
        }
        let mut query =
            db.prepare("SELECT id FROM approvals WHERE substr(id, 1, length(?1)) = ?1 LIMIT 2")?;
        let found: Vec<String> = query
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        match found.as_slice() {
            [] => Ok(None),
            [one] => fetch(&db, one),
            _ => Err(Ambiguous(id.to_string()).into()),
        }
    }

    /// Of the approvals `ids`, those no longer pending.
    pub fn ended_among(&self, ids: &[String]) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
             AND id IN (SELECT value FROM json_each(?1))"
        ))?;
        let rows = query.query_map([serde_json::to_string(ids)?], read)?;
        let approvals: Vec<Approval> = rows.map(|r| r?).collect::<Result<_>>()?;
        approvals.into_iter().map(|a| with_votes(&db, a)).collect()
    }

    /// Marks approved approval `id` as used by the receipt a client carried
    /// back; false if it was used before (a receipt runs its call once).
    pub fn consume(&self, id: &str) -> Result<bool> {
        let used = self.db().execute(
            "UPDATE approvals SET used_ms = ?2 WHERE id = ?1 AND state = 'approved' \
             AND used_ms IS NULL",
            params![id, now_ms() as i64],
        )?;
        Ok(used == 1)
    }

    /// Approvals in `state` (all when `None`), newest first, at most `limit`.
    /// Pending ones past their expiry are expired first (a held call's
    /// process does that itself when it looks; a call answered
    /// `input_required` that never came back has nobody looking).
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>> {
        let db = self.db();
        let expired = db.execute(
            "UPDATE approvals SET state = 'expired', decided_by = 'portcullis', \
             decided_ms = expires_ms, comment = ?2 WHERE state = 'pending' AND expires_ms <= ?1",
            params![now_ms() as i64, EXPIRED],
        )?;
        if expired > 0 {
            self.changed();
        }
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE ?1 IS NULL OR state = ?1 \
             ORDER BY created_ms DESC, id DESC LIMIT ?2"
        ))?;
        let rows = query.query_map(params![state.map(State::as_str), limit as i64], read)?;
        let approvals: Vec<Approval> = rows.map(|r| r?).collect::<Result<_>>()?;
        approvals.into_iter().map(|a| with_votes(&db, a)).collect()
    }

    /// Ended approvals, most recently ended first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
             ORDER BY decided_ms DESC, id DESC LIMIT ?1"
        ))?;
        let rows = query.query_map([limit as i64], read)?;
        let approvals: Vec<Approval> = rows.map(|r| r?).collect::<Result<_>>()?;
        approvals.into_iter().map(|a| with_votes(&db, a)).collect()
    }

    /// An approval of exactly `call` (same agent, server, method, tool and
    /// arguments) that may still be reused at `now` (ms since the epoch).
    pub fn reusable(&self, call: &Call, now: u64) -> Result<Option<Approval>> {
        let db = self.db();
        let id: Option<String> = db
            .query_row(
                "SELECT id FROM approvals WHERE state = 'approved' AND agent = ?1 \
                 AND server = ?2 AND method = ?3 AND tool IS ?4 AND arguments_sha256 = ?5 \
                 AND reuse_ms > 0 AND decided_ms + reuse_ms > ?6 \
                 ORDER BY decided_ms DESC LIMIT 1",
                params![
                    call.agent,
                    call.server,
                    call.method,
                    call.tool,
                    call.arguments_sha256,
                    now as i64
                ],
                |r| r.get(0),
            )
            .optional()?;
        id.map_or(Ok(None), |id| fetch(&db, &id))
    }

    /// A person's decision on approval `id` (or a unique prefix of it), held
    /// to the terms stored with it: `by` must be one of its approvers; a deny
    /// ends it at once; an approval counts as a vote and ends it once
    /// `required` distinct approvers agree. Returns the approval as it then
    /// stands (still pending while more approvals are needed).
    pub fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        by: &str,
        comment: Option<&str>,
    ) -> Result<Approval, Refused> {
        let approval = self
            .find(id)?
            .ok_or_else(|| Refused::Unknown(id.to_string()))?;
        if let Some(approvers) = &approval.terms.approvers
            && !approvers.iter().any(|a| a == by)
        {
            return Err(Refused::NotAllowed {
                approver: by.to_string(),
                approvers: approvers.clone(),
            });
        }
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        let current = fetch(&tx, &approval.id)?.ok_or_else(|| Refused::Unknown(id.to_string()))?;
        if current.state != State::Pending {
            return Err(Refused::Ended(Box::new(current)));
        }
        if now >= current.expires_ms {
            end(
                &tx,
                &current.id,
                State::Expired,
                "portcullis",
                Some(EXPIRED),
                now,
            )?;
        } else if verdict == Verdict::Deny {
            end(&tx, &current.id, State::Denied, by, comment, now)?;
        } else {
            if current.votes.iter().any(|v| v.approver == by) {
                return Err(Refused::AlreadyApproved(Box::new(current)));
            }
            tx.execute(
                "INSERT INTO votes (approval, approver, decided_ms, comment) VALUES (?1, ?2, ?3, ?4)",
                params![current.id, by, now as i64, comment],
            )?;
            if current.votes.len() + 1 >= current.terms.required as usize {
                let mut voters: Vec<&str> =
                    current.votes.iter().map(|v| v.approver.as_str()).collect();
                voters.push(by);
                end(
                    &tx,
                    &current.id,
                    State::Approved,
                    &voters.join(", "),
                    comment,
                    now,
                )?;
            }
        }
        let decided =
            fetch(&tx, &current.id)?.context("the approval vanished as it was decided")?;
        tx.commit()?;
        drop(db);
        self.changed();
        Ok(decided)
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
            (State::Expired, "portcullis", Some(EXPIRED))
        } else {
            (state, by, comment)
        };
        let db = self.db();
        end(&db, &approval.id, state, by, comment, now)?;
        let settled = fetch(&db, &approval.id)?.context("the approval vanished as it was decided");
        drop(db);
        self.changed();
        settled
    }

    /// The decision of the client's own user on approval `id` (asked through
    /// elicitation, or `input_required`): taken only where its rule says
    /// `elicit` and leaves the decision to anyone (no named approvers, one
    /// approval); see [`Approvals::settle`] for an approval that ended.
    pub fn answer_by_user(
        &self,
        id: &str,
        state: State,
        by: &str,
        comment: Option<&str>,
    ) -> Result<Approval, Refused> {
        let approval = self
            .get(id)?
            .ok_or_else(|| Refused::Unknown(id.to_string()))?;
        if !approval.elicit || approval.terms.approvers.is_some() || approval.terms.required > 1 {
            return Err(Refused::NotAskable(approval.id));
        }
        Ok(self.settle(id, state, by, comment)?)
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

/// How long a process waits for another that holds the store's lock.
const BUSY: Duration = Duration::from_secs(5);

/// Switches the store to write-ahead logging. The switch takes the store
/// whole, which SQLite does not wait for: while another process is opening
/// the store at the same moment, it is tried again, for as long as [`BUSY`].
fn to_wal(db: &Connection) -> rusqlite::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match db.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && started.elapsed() < BUSY =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return done,
        }
    }
}

/// Why an approval nobody decided ended.
pub const EXPIRED: &str = "nobody decided in time";

/// Brings the store's schema up to date, once, whichever process comes
/// first.
fn migrate(db: &mut Connection) -> Result<()> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        tx.execute_batch(SCHEMA_1)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_2)?;
    }
    tx.commit()?;
    Ok(())
}

/// The store's receipt key, made on first use.
fn receipt_key(db: &Connection) -> Result<[u8; 32]> {
    let fresh: [u8; 32] = rand::random();
    db.execute(
        "INSERT OR IGNORE INTO keys (name, key) VALUES ('receipts', ?1)",
        [&fresh[..]],
    )?;
    let key: Vec<u8> = db.query_row("SELECT key FROM keys WHERE name = 'receipts'", [], |r| {
        r.get(0)
    })?;
    key.try_into()
        .map_err(|_| anyhow::anyhow!("the receipt key is not 32 bytes"))
}

/// Ends pending approval `id` as `state`.
fn end(
    db: &Connection,
    id: &str,
    state: State,
    by: &str,
    comment: Option<&str>,
    now: u64,
) -> Result<()> {
    db.execute(
        "UPDATE approvals SET state = ?2, decided_by = ?3, decided_ms = ?4, comment = ?5 \
         WHERE id = ?1 AND state = 'pending'",
        params![id, state.as_str(), by, now as i64, comment],
    )?;
    Ok(())
}

/// Approval `id` exactly, with its votes.
fn fetch(db: &Connection, id: &str) -> Result<Option<Approval>> {
    let found = db
        .query_row(
            &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
            [id],
            read,
        )
        .optional()?;
    found.transpose()?.map(|a| with_votes(db, a)).transpose()
}

/// `approval` with its votes, in the order given.
fn with_votes(db: &Connection, mut approval: Approval) -> Result<Approval> {
    let mut query = db.prepare(
        "SELECT approver, decided_ms, comment FROM votes WHERE approval = ?1 \
         ORDER BY decided_ms, approver",
    )?;
    approval.votes = query
        .query_map([&approval.id], |r| {
            Ok(Vote {
                approver: r.get(0)?,
                decided_ms: r.get::<_, i64>(1)? as u64,
                comment: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(approval)
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
    let approvers: Option<String> = row.get(17)?;
    let terms = (row.get::<_, i64>(18)?, row.get::<_, i64>(19)?);
    let elicit: bool = row.get(20)?;
    let used_ms: Option<i64> = row.get(21)?;
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
            terms: Terms {
                approvers: approvers
                    .map(|a| serde_json::from_str(&a))
                    .transpose()
                    .context("unreadable approvers")?,
                required: u32::try_from(terms.0).unwrap_or(1),
                reuse_ms: terms.1 as u64,
            },
            votes: Vec::new(),
            elicit,
            used_ms: used_ms.map(|v| v as u64),
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
pub(crate) mod tests {
    use super::*;

    /// A pending approval, as stored.
    pub(crate) fn approval() -> Approval {
        let request = request("0192-test", Duration::from_secs(60));
        Approval {
            id: request.id,
            created_ms: 1,
            expires_ms: 60_001,
            call: request.call,
            terms: request.terms,
            votes: Vec::new(),
            state: State::Pending,
            decided_by: None,
            decided_ms: None,
            comment: None,
            holder: request.holder,
            elicit: false,
            used_ms: None,
        }
    }

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
            terms: Terms::default(),
            expires_in,
            holder: "host-1".into(),
            elicit: false,
            max_pending: 0,
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
            .settle("0192-aaaa", State::Approved, "alice", Some("ok"))
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
        let ambiguous = store.find("same").unwrap_err();
        assert!(
            ambiguous.downcast_ref::<Ambiguous>().is_some(),
            "{ambiguous}"
        );
        assert!(ambiguous.to_string().contains("more than one"));
        assert!(
            store.get("same").unwrap().is_none(),
            "get takes exact ids only"
        );
        let refused = store.decide("same", Verdict::Approve, "alice", None);
        assert!(matches!(refused, Err(Refused::Ambiguous(_))), "{refused:?}");
        let cancelled = store.cancel_orphans(|holder| holder == "host-2").unwrap();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(cancelled[0].id, "same-1");
        assert_eq!(cancelled[0].state, State::Cancelled);
        let pending = store.list(Some(State::Pending), 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, "same-2");
    }

    #[test]
    fn a_two_person_rule_needs_two_distinct_named_approvers() {
        let (_dir, store) = store();
        let mut two = request("two-1", Duration::from_secs(60));
        two.terms = Terms {
            approvers: Some(vec!["alice".into(), "bob".into(), "carol".into()]),
            required: 2,
            reuse_ms: 0,
        };
        store.request(&two).unwrap();
        let refused = store.decide("two-1", Verdict::Approve, "mallory", None);
        assert!(
            matches!(refused, Err(Refused::NotAllowed { .. })),
            "{refused:?}"
        );
        let first = store
            .decide("two-1", Verdict::Approve, "alice", Some("fine"))
            .unwrap();
        assert_eq!(first.state, State::Pending, "one of two approvals");
        assert_eq!(first.votes.len(), 1);
        let again = store.decide("two-1", Verdict::Approve, "alice", None);
        assert!(
            matches!(again, Err(Refused::AlreadyApproved(_))),
            "{again:?}"
        );
        let second = store
            .decide("two-1", Verdict::Approve, "bob", None)
            .unwrap();
        assert_eq!(second.state, State::Approved);
        assert_eq!(second.decided_by.as_deref(), Some("alice, bob"));
        let late = store.decide("two-1", Verdict::Deny, "carol", None);
        assert!(matches!(late, Err(Refused::Ended(_))), "{late:?}");
    }

    #[test]
    fn one_deny_ends_a_two_person_approval() {
        let (_dir, store) = store();
        let mut two = request("deny-1", Duration::from_secs(60));
        two.terms.required = 2;
        store.request(&two).unwrap();
        store
            .decide("deny-1", Verdict::Approve, "alice", None)
            .unwrap();
        let denied = store
            .decide("deny-1", Verdict::Deny, "bob", Some("not today"))
            .unwrap();
        assert_eq!(denied.state, State::Denied);
        assert_eq!(denied.decided_by.as_deref(), Some("bob"));
    }

    #[test]
    fn an_approval_is_reused_only_for_the_same_call_within_its_window() {
        let (_dir, store) = store();
        let mut reused = request("reuse-1", Duration::from_secs(60));
        reused.terms.reuse_ms = 60_000;
        store.request(&reused).unwrap();
        let call = reused.call.clone();
        assert!(
            store.reusable(&call, now_ms()).unwrap().is_none(),
            "pending"
        );
        store
            .decide("reuse-1", Verdict::Approve, "alice", None)
            .unwrap();
        let found = store.reusable(&call, now_ms()).unwrap().unwrap();
        assert_eq!(found.id, "reuse-1");
        let other = Call {
            arguments_sha256: "cd".into(),
            ..call.clone()
        };
        assert!(store.reusable(&other, now_ms()).unwrap().is_none());
        let later = now_ms() + 61_000;
        assert!(
            store.reusable(&call, later).unwrap().is_none(),
            "window over"
        );
    }

    #[test]
    fn a_store_of_the_first_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute(
            &format!(
                "INSERT INTO approvals ({}) VALUES ('old-1', 1, 2, 'bot', 'fs', 'tools/call', NULL, \
                 'ab', '{{}}', 'gate', 'why', '[]', 'expired', 'portcullis', 2, NULL, 'h')",
                COLUMNS.split(", approvers").next().unwrap()
            ),
            [],
        )
        .unwrap();
        drop(old);
        let store = Approvals::open(&path).unwrap();
        let old = store.get("old-1").unwrap().unwrap();
        assert_eq!(old.terms, Terms::default());
        Approvals::open(&path).unwrap();
    }

    #[test]
    fn a_receipt_runs_its_call_once() {
        let (_dir, store) = store();
        store
            .request(&request("once-1", Duration::from_secs(60)))
            .unwrap();
        assert!(!store.consume("once-1").unwrap(), "pending: nothing to use");
        store
            .settle("once-1", State::Approved, "alice", None)
            .unwrap();
        assert!(store.consume("once-1").unwrap());
        assert!(!store.consume("once-1").unwrap(), "used once already");
        assert!(store.get("once-1").unwrap().unwrap().used_ms.is_some());
    }

    #[test]
    fn an_agent_may_have_only_so_many_pending() {
        let (_dir, store) = store();
        for i in 0..3 {
            let mut held = request(&format!("cap-{i}"), Duration::from_secs(60));
            held.max_pending = 3;
            store.request(&held).unwrap();
        }
        let mut fourth = request("cap-3", Duration::from_secs(60));
        fourth.max_pending = 3;
        let refused = store.request(&fourth).unwrap_err();
        assert!(
            refused.downcast_ref::<TooManyPending>().is_some(),
            "{refused}"
        );
        let mut other = fourth.clone();
        other.id = "cap-other".into();
        other.call.agent = "another-bot".into();
        store
            .request(&other)
            .expect("another agent has its own count");
        store.settle("cap-0", State::Denied, "alice", None).unwrap();
        store.request(&fourth).expect("one ended, so there is room");
        let mut expired = request("cap-x", Duration::ZERO);
        expired.call.agent = "third-bot".into();
        expired.max_pending = 1;
        store.request(&expired).unwrap();
        let mut after = request("cap-y", Duration::from_secs(60));
        after.call.agent = "third-bot".into();
        after.max_pending = 1;
        store
            .request(&after)
            .expect("an expired approval does not count");
    }

    #[test]
    fn the_clients_user_decides_only_where_the_rule_lets_it() {
        let (_dir, store) = store();
        store
            .request(&request("plain-1", Duration::from_secs(60)))
            .unwrap();
        let refused = store.answer_by_user("plain-1", State::Approved, "user", None);
        assert!(
            matches!(refused, Err(Refused::NotAskable(_))),
            "{refused:?}"
        );
        let mut named = request("named-1", Duration::from_secs(60));
        named.elicit = true;
        named.terms.approvers = Some(vec!["alice".into()]);
        store.request(&named).unwrap();
        let refused = store.answer_by_user("named-1", State::Approved, "user", None);
        assert!(
            matches!(refused, Err(Refused::NotAskable(_))),
            "{refused:?}"
        );
        let mut two = request("two-2", Duration::from_secs(60));
        two.elicit = true;
        two.terms.required = 2;
        store.request(&two).unwrap();
        assert!(
            store
                .answer_by_user("two-2", State::Approved, "user", None)
                .is_err()
        );
        let mut asked = request("asked-1", Duration::from_secs(60));
        asked.elicit = true;
        store.request(&asked).unwrap();
        let approved = store
            .answer_by_user("asked-1", State::Approved, "user", None)
            .unwrap();
        assert_eq!(approved.state, State::Approved);
        assert_eq!(
            store.get("named-1").unwrap().unwrap().state,
            State::Pending,
            "untouched"
        );
    }

    #[test]
    fn waiting_approvals_that_ended_are_found_together() {
        let (_dir, store) = store();
        for id in ["w-1", "w-2", "w-3"] {
            store
                .request(&request(id, Duration::from_secs(60)))
                .unwrap();
        }
        store.settle("w-2", State::Denied, "bob", None).unwrap();
        let ids = ["w-1", "w-2", "w-3", "w-4"].map(String::from);
        let ended = store.ended_among(&ids).unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, "w-2");
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
        assert_eq!(
            other.receipt_key(),
            store.receipt_key(),
            "receipts are honoured by every process sharing the store"
        );
        other
            .settle("shared-1", State::Denied, "bob", Some("no"))
            .unwrap();
        assert_eq!(store.get("shared-1").unwrap().unwrap().state, State::Denied);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
