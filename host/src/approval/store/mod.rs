//! Pending approvals: a call a policy says needs a person is held, and its
//! approval lives here until someone decides it, it expires, or its client
//! gives up. The store is shared by every Portcullis process of a deployment
//! and by `portcullis approvals` — an SQLite file on one machine
//! ([`sqlite`]), a PostgreSQL database across replicas ([`postgres`]) — so
//! whoever decides acts on the same record the held call waits on. An approval is bound to the agent,
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

mod postgres;
mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use crate::config::StoreLocation;
use crate::util::clock::now_ms;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::sync::{Arc, OnceLock};
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
                (a.terms.required as usize).saturating_sub(a.votes.len())
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

/// How an approval ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    /// The state it ends in.
    pub state: State,
    /// Who ended it.
    pub by: String,
    /// Their comment, or why it ended.
    pub comment: Option<String>,
    /// When, in ms since the epoch.
    pub at: u64,
}

/// What a person's decision does to a pending approval.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ruling {
    /// It ends (denied, or expired before the decision).
    End(Ending),
    /// One more approver's approval, which ends it when it is the last one
    /// needed.
    Vote { vote: Vote, then: Option<Ending> },
}

/// What `verdict` by `by` at `now` does to approval `current` as it stands
/// in the store, under the terms stored with it: the one place the rules
/// of deciding live, whichever store keeps the approval.
fn ruling(
    current: &Approval,
    verdict: Verdict,
    by: &str,
    comment: Option<&str>,
    now: u64,
) -> Result<Ruling, Refused> {
    if current.state != State::Pending {
        return Err(Refused::Ended(Box::new(current.clone())));
    }
    let ending = |state: State, by: &str, comment: Option<&str>| Ending {
        state,
        by: by.to_string(),
        comment: comment.map(str::to_string),
        at: now,
    };
    if now >= current.expires_ms {
        return Ok(Ruling::End(ending(
            State::Expired,
            "portcullis",
            Some(EXPIRED),
        )));
    }
    if verdict == Verdict::Deny {
        return Ok(Ruling::End(ending(State::Denied, by, comment)));
    }
    if current.votes.iter().any(|v| v.approver == by) {
        return Err(Refused::AlreadyApproved(Box::new(current.clone())));
    }
    let vote = Vote {
        approver: by.to_string(),
        decided_ms: now,
        comment: comment.map(str::to_string),
    };
    let last = current.votes.len() + 1 >= current.terms.required as usize;
    let then = last.then(|| {
        let mut voters: Vec<&str> = current.votes.iter().map(|v| v.approver.as_str()).collect();
        voters.push(by);
        ending(State::Approved, &voters.join(", "), comment)
    });
    Ok(Ruling::Vote { vote, then })
}

/// A decision's change to approval `id`, made atomically with reading it.
pub(crate) type Rule<'a> = &'a (dyn Fn(&Approval) -> Result<Ruling, Refused> + Sync);

/// What keeps the approvals: each operation is atomic, and every change is
/// seen by every process sharing the store.
trait Backend: Send + Sync {
    /// Records `request` as pending from `now`, unless its agent already has
    /// `max_pending` pending ([`TooManyPending`]).
    fn insert(&self, request: &Request, now: u64) -> Result<Approval>;
    /// Approval `id` exactly, with its votes.
    fn fetch(&self, id: &str) -> Result<Option<Approval>>;
    /// The ids starting with `prefix`, at most two.
    fn ids_starting(&self, prefix: &str) -> Result<Vec<String>>;
    /// Of the approvals `ids`, those no longer pending.
    fn ended_among(&self, ids: &[String]) -> Result<Vec<Approval>>;
    /// Marks approved approval `id` used at `now`, once.
    fn consume(&self, id: &str, now: u64) -> Result<bool>;
    /// Expires the pending approvals past their expiry at `now`; how many.
    fn expire_overdue(&self, now: u64) -> Result<usize>;
    /// Approvals in `state` (all when `None`), newest first.
    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>>;
    /// Ended approvals, most recently ended first.
    fn recent(&self, limit: usize) -> Result<Vec<Approval>>;
    /// The newest approval of exactly `call` whose reuse window is open at `now`.
    fn reusable(&self, call: &Call, now: u64) -> Result<Option<Approval>>;
    /// Applies `rule` to approval `id` as it stands, in one transaction;
    /// the approval as it then stands.
    fn decide(&self, id: &str, rule: Rule) -> Result<Approval, Refused>;
    /// Ends approval `id` as `ending` says, if it is still pending.
    fn end(&self, id: &str, ending: &Ending) -> Result<()>;
    /// The receipt key, made by whichever process comes first.
    fn receipt_key(&self) -> Result<[u8; 32]>;
    /// Calls `hook` whenever another process changes the store, where the
    /// store can say so; false where it cannot (it is then looked at every
    /// [`Approvals::poll_interval`]).
    fn watch(&self, hook: Hook) -> Result<bool>;
}

/// What is told of changes to the store.
pub(crate) type Hook = Arc<dyn Fn() + Send + Sync>;

/// The shared approvals store.
pub struct Approvals {
    location: StoreLocation,
    backend: Box<dyn Backend>,
    /// The key receipts for its approvals are sealed with.
    receipt_key: [u8; 32],
    /// Told after each change, made through this handle or (where the store
    /// notifies) by another process.
    on_change: OnceLock<Hook>,
    /// Whether changes made elsewhere are notified.
    notified: OnceLock<bool>,
}

/// How often a store that cannot notify is looked at for decisions made
/// elsewhere.
const POLL: Duration = Duration::from_millis(200);

/// How often a store that notifies is looked at anyway, in case a
/// notification was lost with its connection.
const BACKSTOP: Duration = Duration::from_secs(5);

/// Whether a store has been created at `location` (a PostgreSQL store
/// always counts: its tables are made on first use).
pub fn exists(location: &StoreLocation) -> bool {
    match location {
        StoreLocation::File(path) => path.exists(),
        StoreLocation::Postgres { .. } => true,
    }
}

/// The schema version of the store at `location` and the newest this
/// Portcullis knows, without creating or migrating it; `None` when nothing
/// was created there yet.
pub fn schema_version(location: &StoreLocation) -> Result<(Option<u32>, u32)> {
    match location {
        StoreLocation::File(path) => Ok((sqlite::version(path)?, sqlite::LATEST)),
        StoreLocation::Postgres { url, base } => {
            Ok((postgres::version(url, base)?, postgres::LATEST))
        }
    }
}

impl Approvals {
    /// Opens the store at `location`, creating or migrating it if need be.
    pub fn open(location: &StoreLocation) -> Result<Self> {
        let backend: Box<dyn Backend> = match location {
            StoreLocation::File(path) => Box::new(sqlite::Sqlite::open(path)?),
            StoreLocation::Postgres { url, base } => Box::new(postgres::Postgres::open(url, base)?),
        };
        let receipt_key = backend
            .receipt_key()
            .with_context(|| format!("cannot read the receipt key of {location}"))?;
        Ok(Self {
            location: location.clone(),
            backend,
            receipt_key,
            on_change: OnceLock::new(),
            notified: OnceLock::new(),
        })
    }

    /// The key receipts for this store's approvals are sealed with, the same
    /// for every process sharing it (and as secret as the store, which
    /// whoever can read can approve anyway).
    pub fn receipt_key(&self) -> &[u8; 32] {
        &self.receipt_key
    }

    /// Calls `hook` after each change made through this handle and, where
    /// the store notifies (PostgreSQL), after each change made by another
    /// process (once: a second hook is ignored).
    pub fn on_change(&self, hook: impl Fn() + Send + Sync + 'static) {
        let hook: Hook = Arc::new(hook);
        if self.on_change.set(hook.clone()).is_err() {
            return;
        }
        let notified = self.backend.watch(hook).unwrap_or_else(|e| {
            tracing::warn!(
                "changes to the approvals store will be looked for every {BACKSTOP:?}: {e:#}"
            );
            false
        });
        let _ = self.notified.set(notified);
    }

    /// How often the store should be looked at for changes made elsewhere:
    /// often where nothing tells of them, seldom where they are notified.
    pub fn poll_interval(&self) -> Duration {
        match (&self.location, self.notified.get()) {
            (StoreLocation::File(_), _) => POLL,
            (StoreLocation::Postgres { .. }, Some(true)) => BACKSTOP,
            (StoreLocation::Postgres { .. }, _) => POLL,
        }
    }

    fn changed(&self) {
        if let Some(hook) = self.on_change.get() {
            hook();
        }
    }

    /// Where the store is.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Records a pending approval for `request`.
    pub fn request(&self, request: &Request) -> Result<Approval> {
        let recorded = self.backend.insert(request, now_ms())?;
        self.changed();
        Ok(recorded)
    }

    /// The approval `id`, exactly.
    pub fn get(&self, id: &str) -> Result<Option<Approval>> {
        self.backend.fetch(id)
    }

    /// The approval `id`, or the only one whose id starts with it (as people
    /// type ids); [`Ambiguous`] when several do.
    pub fn find(&self, id: &str) -> Result<Option<Approval>> {
        if let Some(exact) = self.backend.fetch(id)? {
            return Ok(Some(exact));
        }
        if id.len() < 4 {
            return Ok(None);
        }
        match self.backend.ids_starting(id)?.as_slice() {
            [] => Ok(None),
            [one] => self.backend.fetch(one),
            _ => Err(Ambiguous(id.to_string()).into()),
        }
    }

    /// Of the approvals `ids`, those no longer pending.
    pub fn ended_among(&self, ids: &[String]) -> Result<Vec<Approval>> {
        self.backend.ended_among(ids)
    }

    /// Marks approved approval `id` as used by the receipt a client carried
    /// back; false if it was used before (a receipt runs its call once).
    pub fn consume(&self, id: &str) -> Result<bool> {
        self.backend.consume(id, now_ms())
    }

    /// Approvals in `state` (all when `None`), newest first, at most `limit`.
    /// Pending ones past their expiry are expired first (a held call's
    /// process does that itself when it looks; a call answered
    /// `input_required` that never came back has nobody looking).
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>> {
        if self.backend.expire_overdue(now_ms())? > 0 {
            self.changed();
        }
        self.backend.list(state, limit)
    }

    /// Ended approvals, most recently ended first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Result<Vec<Approval>> {
        self.backend.recent(limit)
    }

    /// An approval of exactly `call` (same agent, server, method, tool and
    /// arguments) that may still be reused at `now` (ms since the epoch).
    pub fn reusable(&self, call: &Call, now: u64) -> Result<Option<Approval>> {
        self.backend.reusable(call, now)
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
        let now = now_ms();
        let decided = self.backend.decide(&approval.id, &|current| {
            ruling(current, verdict, by, comment, now)
        })?;
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
        let ending = Ending {
            state,
            by: by.to_string(),
            comment: comment.map(str::to_string),
            at: now,
        };
        self.backend.end(&approval.id, &ending)?;
        let settled = self
            .backend
            .fetch(&approval.id)?
            .context("the approval vanished as it was decided");
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
}

/// Why an approval nobody decided ended.
pub const EXPIRED: &str = "nobody decided in time";

/// The columns of an approval's row, in the order both stores read them.
const COLUMNS: &str = "id, created_ms, expires_ms, agent, server, method, tool, arguments_sha256, \
     arguments, policy, reason, tags, state, decided_by, decided_ms, comment, holder, \
     approvers, required, reuse_ms, elicit, used_ms";

/// An approval's row as both stores keep it, before its text is parsed.
struct Row {
    id: String,
    created_ms: i64,
    expires_ms: i64,
    agent: String,
    server: String,
    method: String,
    tool: Option<String>,
    arguments_sha256: String,
    arguments: String,
    policy: String,
    reason: String,
    tags: String,
    state: String,
    decided_by: Option<String>,
    decided_ms: Option<i64>,
    comment: Option<String>,
    holder: String,
    approvers: Option<String>,
    required: i64,
    reuse_ms: i64,
    elicit: bool,
    used_ms: Option<i64>,
}

impl Row {
    /// The approval it holds (without its votes).
    fn parse(self) -> Result<Approval> {
        Ok(Approval {
            id: self.id,
            created_ms: self.created_ms as u64,
            expires_ms: self.expires_ms as u64,
            call: Call {
                agent: self.agent,
                server: self.server,
                method: self.method,
                tool: self.tool,
                arguments_sha256: self.arguments_sha256,
                arguments: self.arguments,
                policy: self.policy,
                reason: self.reason,
                tags: serde_json::from_str(&self.tags).context("unreadable tags")?,
            },
            state: State::parse(&self.state)?,
            decided_by: self.decided_by,
            decided_ms: self.decided_ms.map(|v| v as u64),
            comment: self.comment,
            holder: self.holder,
            terms: Terms {
                approvers: self
                    .approvers
                    .map(|a| serde_json::from_str(&a))
                    .transpose()
                    .context("unreadable approvers")?,
                required: u32::try_from(self.required).unwrap_or(1),
                reuse_ms: self.reuse_ms as u64,
            },
            votes: Vec::new(),
            elicit: self.elicit,
            used_ms: self.used_ms.map(|v| v as u64),
        })
    }
}

/// What a request stores beside its call: its tags and approvers as JSON.
fn encoded(request: &Request) -> Result<(String, Option<String>)> {
    let tags = serde_json::to_string(&request.call.tags)?;
    let approvers = request
        .terms
        .approvers
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?;
    Ok((tags, approvers))
}
