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

mod schema;
#[cfg(test)]
pub(crate) mod tests;

use crate::util::clock::now_ms;
use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, Row, params};
use schema::{BUSY, fetch, migrate, read, restrict, to_wal, with_votes};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

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

/// Why an approval nobody decided ended.
pub const EXPIRED: &str = "nobody decided in time";

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
