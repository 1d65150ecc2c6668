//! The client sessions `portcullis serve` keeps: those opened with
//! `initialize` (found by their `Mcp-Session-Id`, for their own agent only)
//! and the standing session each agent's stateless (2026-07-28) requests
//! share per scope. Sessions cost memory, so none lives forever: one idle
//! longer than `serve.session_idle_secs` is expired, unless a request or an
//! event stream is using it, and one agent may have only
//! `serve.max_sessions_per_agent` open at once; a session has at most one
//! event stream open. A session owns the server connections dedicated to
//! it (`isolation = "per-session"`): they stop when it is dropped.
//!
//! A session belongs to an agent, but caches none of its rights: each
//! request is authorized by its own credentials under the config in force
//! (see `gateway/mod.rs`), and what a session is sent between requests
//! (notices, server requests) goes only where its latest caller, read again
//! under the config in force, may still go ([`ClientSession::grants`]).

use crate::identity::Identity;
use crate::relay::Relay;
use crate::upstream::Upstream;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Which servers a session reaches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every server the agent may use, merged.
    All,
    /// One server, names untouched.
    Server(String),
}

impl Scope {
    /// The endpoint serving this scope.
    pub fn endpoint(&self) -> String {
        match self {
            Scope::All => "/mcp".into(),
            Scope::Server(server) => format!("/servers/{server}/mcp"),
        }
    }
}

/// The servers a session reaches.
#[derive(Default)]
pub struct Reach {
    /// A relay per server, each judging that server's traffic.
    pub relays: BTreeMap<String, Arc<Relay>>,
    /// The connection to each server: shared, or its own.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The connections it owns.
    pub own: Vec<Own>,
}

/// A server connection of a session's own (or of its agent's sessions'):
/// stopped once the last session holding it lets it go.
#[derive(Clone)]
pub struct Own(Arc<Stopping>);

/// A connection stopped when dropped.
pub struct Stopping(Arc<Upstream>);

impl Drop for Stopping {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Own {
    /// `upstream`, stopped when the last holder lets it go.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Self(Arc::new(Stopping(upstream)))
    }

    /// Another holder of the same connection, if one still holds it.
    pub fn shared(held: &std::sync::Weak<Stopping>) -> Option<Self> {
        held.upgrade().map(Self)
    }

    /// A handle that does not keep the connection.
    pub fn downgrade(&self) -> std::sync::Weak<Stopping> {
        Arc::downgrade(&self.0)
    }
}

impl Own {
    /// The connection.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0.0
    }
}

/// A server's request to the client, relayed and awaiting the client's
/// answer.
pub struct Asked {
    /// The server that asked.
    pub server: String,
    /// Its id on the server's connection.
    pub upstream_id: Box<RawValue>,
    /// The pair its request and answer are judged as.
    pub pair: u64,
    /// When the server stops waiting for the answer.
    pub until: Instant,
}

/// The server requests a session's client has to answer, by the id the
/// client sees (one of Portcullis', so servers' ids never collide).
#[derive(Default)]
pub struct Questions {
    next: u64,
    open: HashMap<u64, Asked>,
}

/// How many server requests a client may leave unanswered at once.
const MOST_QUESTIONS: usize = 64;

impl Questions {
    /// Keeps `asked`: its id for the client, or `None` when the client has
    /// as many unanswered as it may; and those past their time, forgotten.
    pub fn ask(&mut self, asked: Asked) -> (Option<u64>, Vec<Asked>) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, asked)| asked.until <= now)
            .map(|(id, _)| *id)
            .collect();
        let expired = late.iter().filter_map(|id| self.open.remove(id)).collect();
        if self.open.len() >= MOST_QUESTIONS {
            return (None, expired);
        }
        self.next += 1;
        self.open.insert(self.next, asked);
        (Some(self.next), expired)
    }

    /// The request the client answers under `id`.
    pub fn answered(&mut self, id: &RawValue) -> Option<Asked> {
        self.open.remove(&id.get().parse().ok()?)
    }

    /// The client's id for `server`'s request `upstream_id`.
    pub fn client_id(&self, server: &str, upstream_id: &RawValue) -> Option<u64> {
        self.open
            .iter()
            .find(|(_, a)| a.server == server && a.upstream_id.get() == upstream_id.get())
            .map(|(id, _)| *id)
    }
}

/// One client session.
pub struct ClientSession {
    /// Its `Mcp-Session-Id`.
    pub id: String,
    /// Who opened it: the agent it belongs to.
    pub identity: Identity,
    /// Who sent its latest request, as that request's credentials showed.
    caller: Mutex<Identity>,
    /// What it reaches.
    pub scope: Scope,
    /// The protocol revision it speaks.
    pub protocol: String,
    /// A relay per server it reaches, each judging that server's traffic.
    pub relays: BTreeMap<String, Arc<Relay>>,
    /// The connection to each server it reaches.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The capabilities its client declared.
    pub capabilities: Value,
    /// Which server listed each resource URI (the merged endpoint routes by
    /// it).
    pub resources: Mutex<HashMap<String, String>>,
    /// The resource URIs it subscribed to, by server.
    pub subscriptions: Mutex<HashSet<(String, String)>>,
    /// The servers' requests it has to answer.
    pub questions: Mutex<Questions>,
    /// Its requests being handled, by their id (canonical): a client's
    /// cancellation stops the one it names.
    pub calls: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Its calls waiting for its agent's input (2026-07-28).
    pub parked: Mutex<crate::gateway::rounds::Lot>,
    /// Its `subscriptions/listen` streams (2026-07-28).
    pub listens: Mutex<crate::gateway::listening::Listens>,
    /// The server connections it owns, until it ends.
    own: Mutex<Vec<Own>>,
    /// Whether it has ended.
    ended: tokio::sync::watch::Sender<bool>,
    /// When it was last used, in ms since [`since_epoch`]'s start.
    last_used: AtomicU64,
    /// Whether its event stream (GET) is open: one at a time.
    streaming: AtomicBool,
}

impl ClientSession {
    /// A session reaching `reach`, used now.
    pub fn new(
        id: String,
        identity: Identity,
        scope: Scope,
        protocol: String,
        capabilities: Value,
        reach: Reach,
    ) -> Self {
        Self {
            id,
            caller: Mutex::new(identity.clone()),
            identity,
            scope,
            protocol,
            relays: reach.relays,
            upstreams: reach.upstreams,
            capabilities,
            resources: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashSet::new()),
            questions: Mutex::new(Questions::default()),
            calls: Mutex::new(HashMap::new()),
            parked: Mutex::default(),
            listens: Mutex::default(),
            own: Mutex::new(reach.own),
            ended: tokio::sync::watch::channel(false).0,
            last_used: AtomicU64::new(since_epoch()),
            streaming: AtomicBool::new(false),
        }
    }

    /// Its event stream, unless one is open already: the session is in use
    /// (it does not expire) until the stream is dropped.
    pub fn open_stream(self: &Arc<Self>) -> Option<Stream> {
        let opened = self
            .streaming
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        opened.then(|| Stream(self.clone()))
    }

    /// Takes `identity` as the sender of its latest request.
    pub fn called_by(&self, identity: &Identity) {
        *self.caller.lock().unwrap_or_else(PoisonError::into_inner) = identity.clone();
    }

    /// Who sent its latest request.
    pub fn caller(&self) -> Identity {
        self.caller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether its latest caller may still use `server` under `g`, the
    /// generation in charge: its credential must still be valid and grant
    /// the server now. What servers send between requests goes nowhere
    /// else.
    pub fn grants(&self, server: &str, g: &crate::relay::generation::Generation) -> bool {
        g.grants(&self.caller(), server)
    }

    fn touch(&self) {
        self.last_used.store(since_epoch(), Ordering::Relaxed);
    }

    fn idle(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }

    /// Whether `notice`, which `server` sent all its clients, concerns this
    /// session: a resource's update only if it subscribed to it.
    pub fn wants(&self, server: &str, notice: &crate::protocol::parsed::Parsed) -> bool {
        let message = notice.message();
        if message.method.as_deref() != Some("notifications/resources/updated") {
            return true;
        }
        let Some(uri) = message.params_value()["uri"].as_str().map(str::to_string) else {
            return false;
        };
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(server.to_string(), uri))
    }

    /// Ends it: its calls are cancelled, its streams close, and the server
    /// connections of its own stop, even while a request still holds it.
    pub fn end(&self) {
        self.ended.send_replace(true);
        for call in self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            call.notify_one();
        }
        let parked =
            std::mem::take(&mut *self.parked.lock().unwrap_or_else(PoisonError::into_inner));
        let own = std::mem::take(&mut *self.own.lock().unwrap_or_else(PoisonError::into_inner));
        drop((parked, own));
    }

    /// Completes once it has ended.
    pub async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        // The sender lives as long as the session.
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Cancels its request in flight with the id key `key`, if there is one.
    pub fn cancel_call(&self, key: &str) -> bool {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let call = calls.get(key);
        if let Some(call) = call {
            call.notify_one();
        }
        call.is_some()
    }

    /// Cancels the calls it holds for approval.
    pub fn cancel_held(&self, why: &str) {
        for relay in self.relays.values() {
            relay.cancel_held(why);
        }
    }
}

/// A session's open event stream; dropping it closes the stream.
pub struct Stream(Arc<ClientSession>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::Release);
    }
}

/// An agent at its cap of open sessions.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManySessions {
    /// The agent.
    pub agent: String,
    /// How many it may have open.
    pub limit: usize,
}

impl std::fmt::Display for TooManySessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent '{}' already has {} open sessions (serve.max_sessions_per_agent); \
             end one (HTTP DELETE) or let idle ones expire",
            self.agent, self.limit
        )
    }
}

impl std::error::Error for TooManySessions {}

#[derive(Default)]
struct Open {
    by_id: HashMap<String, Arc<ClientSession>>,
    per_agent: HashMap<String, usize>,
}

impl Open {
    /// Keeps `session`, if its agent has room for it (`limit`, 0: no limit).
    fn keep(&mut self, session: Arc<ClientSession>, limit: usize) -> Result<(), TooManySessions> {
        let agent = session.identity.agent.id.clone();
        let count = self.per_agent.entry(agent.clone()).or_default();
        if limit > 0 && *count >= limit {
            return Err(TooManySessions { agent, limit });
        }
        *count += 1;
        self.by_id.insert(session.id.clone(), session);
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Option<Arc<ClientSession>> {
        let session = self.by_id.remove(id)?;
        let agent = &session.identity.agent.id;
        if let Some(count) = self.per_agent.get_mut(agent) {
            *count -= 1;
            if *count == 0 {
                self.per_agent.remove(agent);
            }
        }
        Some(session)
    }
}

/// Every session of a `serve` process.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<Open>,
    standing: Mutex<HashMap<(String, Scope), Arc<ClientSession>>>,
}

impl Sessions {
    /// Whether `agent` may open another session, `limit` being its cap (0:
    /// none).
    pub fn room_for(&self, agent: &str, limit: usize) -> Result<(), TooManySessions> {
        let open = self.open();
        let count = open.per_agent.get(agent).copied().unwrap_or(0);
        if limit > 0 && count >= limit {
            return Err(TooManySessions {
                agent: agent.to_string(),
                limit,
            });
        }
        Ok(())
    }

    /// Keeps `session`, if its agent has room for it.
    pub fn insert(&self, session: Arc<ClientSession>, limit: usize) -> Result<(), TooManySessions> {
        self.open().keep(session, limit)
    }

    /// Keeps `session`, resumed here from its sealed id, if its agent has
    /// room for it; when a request resumed it first, that one.
    pub fn adopt(
        &self,
        session: Arc<ClientSession>,
        limit: usize,
    ) -> Result<Arc<ClientSession>, TooManySessions> {
        let mut open = self.open();
        if let Some(resumed) = open.by_id.get(&session.id) {
            // Ids are sealed per agent: another agent's is never handed out.
            if resumed.identity.agent.id != session.identity.agent.id {
                return Err(TooManySessions {
                    agent: session.identity.agent.id.clone(),
                    limit,
                });
            }
            return Ok(resumed.clone());
        }
        open.keep(session.clone(), limit)?;
        Ok(session)
    }

    /// The session `id`, if it belongs to `agent`; it counts as used now.
    pub fn get(&self, id: &str, agent: &str) -> Option<Arc<ClientSession>> {
        let open = self.open();
        let session = open
            .by_id
            .get(id)
            .filter(|s| s.identity.agent.id == agent)?;
        session.touch();
        Some(session.clone())
    }

    /// Removes session `id` of `agent`.
    pub fn remove(&self, id: &str, agent: &str) -> Option<Arc<ClientSession>> {
        let mut open = self.open();
        let owned = open
            .by_id
            .get(id)
            .is_some_and(|s| s.identity.agent.id == agent);
        if owned { open.remove(id) } else { None }
    }

    /// The standing session of `identity` on `scope`, opened with `open`
    /// when there is none or it does not reach every server the agent may
    /// use now (`fits` says whether it does); it counts as used now. A
    /// token refreshed, or rights narrowed, keep it: each request is
    /// authorized on its own.
    pub fn standing<E>(
        &self,
        identity: &Identity,
        scope: &Scope,
        fits: impl Fn(&ClientSession) -> bool,
        open: impl FnOnce() -> Result<Arc<ClientSession>, E>,
    ) -> Result<Arc<ClientSession>, E> {
        let key = (identity.agent.id.clone(), scope.clone());
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        let session = match standing.get(&key) {
            Some(session) if fits(session) => session.clone(),
            _ => {
                // The one it replaces ends first: its own connections count
                // against the limits no longer.
                if let Some(replaced) = standing.remove(&key) {
                    replaced.end();
                }
                let session = open()?;
                standing.insert(key, session.clone());
                session
            }
        };
        session.touch();
        Ok(session)
    }

    /// The standing session of `identity`'s agent on `scope`, if there is
    /// one.
    pub fn standing_of(&self, identity: &Identity, scope: &Scope) -> Option<Arc<ClientSession>> {
        let key = (identity.agent.id.clone(), scope.clone());
        let standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        standing.get(&key).cloned()
    }

    /// Ends every session (Portcullis is stopping).
    pub fn clear(&self) {
        let open = std::mem::take(&mut *self.open());
        let standing =
            std::mem::take(&mut *self.standing.lock().unwrap_or_else(PoisonError::into_inner));
        drop((open, standing));
    }

    /// Every session, opened or standing.
    pub fn all(&self) -> Vec<Arc<ClientSession>> {
        let open = self.open();
        let standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        open.by_id
            .values()
            .chain(standing.values())
            .cloned()
            .collect()
    }

    /// How many sessions are kept: opened, standing.
    pub fn count(&self) -> (usize, usize) {
        let standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        (self.open().by_id.len(), standing.len())
    }

    /// Removes and returns the sessions idle for longer than `idle`; one a
    /// request or event stream is using (holding it) stays.
    pub fn expire(&self, idle: Duration) -> Vec<Arc<ClientSession>> {
        let now = since_epoch();
        let unused = |s: &Arc<ClientSession>| Arc::strong_count(s) == 1 && s.idle(now) > idle;
        let mut expired = Vec::new();
        {
            let mut open = self.open();
            let ids: Vec<String> = open
                .by_id
                .values()
                .filter(|s| unused(s))
                .map(|s| s.id.clone())
                .collect();
            expired.extend(ids.iter().filter_map(|id| open.remove(id)));
        }
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        standing.retain(|_, session| {
            let keep = !unused(session);
            if !keep {
                expired.push(session.clone());
            }
            keep
        });
        expired
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Milliseconds since this process first asked (a monotonic clock).
fn since_epoch() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, agent: &str) -> Arc<ClientSession> {
        let identity = Identity::for_tests(agent);
        Arc::new(ClientSession::new(
            id.into(),
            identity,
            Scope::All,
            "2025-11-25".into(),
            Value::Null,
            Reach::default(),
        ))
    }

    #[test]
    fn an_agent_finds_only_its_own_sessions_and_has_a_cap() {
        let sessions = Sessions::default();
        sessions.insert(session("s1", "bot"), 2).unwrap();
        sessions.insert(session("s2", "bot"), 2).unwrap();
        assert_eq!(
            sessions.insert(session("s3", "bot"), 2),
            Err(TooManySessions {
                agent: "bot".into(),
                limit: 2
            })
        );
        assert!(sessions.room_for("bot", 2).is_err());
        sessions.insert(session("o1", "other"), 2).unwrap();
        assert!(sessions.get("s1", "other").is_none(), "not its session");
        assert!(sessions.remove("s1", "other").is_none());
        assert!(sessions.get("s1", "bot").is_some());
        assert!(sessions.remove("s1", "bot").is_some());
        sessions
            .insert(session("s3", "bot"), 2)
            .expect("room again");
        assert_eq!(sessions.count(), (3, 0));
    }

    #[test]
    fn a_session_has_one_event_stream_and_it_keeps_the_session() {
        let sessions = Sessions::default();
        sessions.insert(session("s", "bot"), 0).unwrap();
        let streamed = sessions.get("s", "bot").unwrap();
        let stream = streamed.open_stream().unwrap();
        assert!(streamed.open_stream().is_none(), "one at a time");
        drop(streamed);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            sessions.expire(Duration::from_millis(10)).is_empty(),
            "streaming"
        );
        drop(stream);
        let again = sessions.get("s", "bot").unwrap();
        assert!(again.open_stream().is_some(), "closed, it may open again");
    }

    #[test]
    fn idle_sessions_expire_unless_in_use() {
        let sessions = Sessions::default();
        sessions.insert(session("idle", "bot"), 0).unwrap();
        sessions.insert(session("busy", "bot"), 0).unwrap();
        let identity = Identity::for_tests("stateless");
        let opened = sessions.standing(
            &identity,
            &Scope::All,
            |_| true,
            || Ok::<_, ()>(session("st", "stateless")),
        );
        assert!(opened.is_ok());
        drop(opened);
        assert!(
            sessions.expire(Duration::from_secs(60)).is_empty(),
            "recent"
        );
        let in_use = sessions.get("busy", "bot").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let expired = sessions.expire(Duration::from_millis(10));
        let mut ids: Vec<&str> = expired.iter().map(|s| s.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["idle", "st"]);
        assert!(sessions.get("idle", "bot").is_none());
        drop(in_use);
        assert!(sessions.get("busy", "bot").is_some(), "used, so kept");
        assert!(sessions.room_for("bot", 1).is_err(), "busy still counts");
    }
}
