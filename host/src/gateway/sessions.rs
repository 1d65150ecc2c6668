//! The client sessions `portcullis serve` keeps: those opened with
//! `initialize` (found by their `Mcp-Session-Id`, for their own agent only)
//! and the standing session each agent's stateless (2026-07-28) requests
//! share per scope. Sessions cost memory, so none lives forever: one idle
//! longer than `serve.session_idle_secs` is expired, unless a request or an
//! event stream is using it, and one agent may have only
//! `serve.max_sessions_per_agent` open at once; a session has at most one
//! event stream open.

use crate::identity::Identity;
use crate::relay::Relay;
use std::collections::{BTreeMap, HashMap};
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

/// One client session.
pub struct ClientSession {
    /// Its `Mcp-Session-Id`.
    pub id: String,
    /// Who opened it.
    pub identity: Identity,
    /// What it reaches.
    pub scope: Scope,
    /// The protocol revision it speaks.
    pub protocol: String,
    /// A relay per server it reaches, each judging that server's traffic.
    pub relays: BTreeMap<String, Arc<Relay>>,
    /// Which server listed each resource URI (the merged endpoint routes by
    /// it).
    pub resources: Mutex<HashMap<String, String>>,
    /// When it was last used, in ms since [`since_epoch`]'s start.
    last_used: AtomicU64,
    /// Whether its event stream (GET) is open: one at a time.
    streaming: AtomicBool,
}

impl ClientSession {
    /// A session with its relays, used now.
    pub fn new(
        id: String,
        identity: Identity,
        scope: Scope,
        protocol: String,
        relays: BTreeMap<String, Arc<Relay>>,
    ) -> Self {
        Self {
            id,
            identity,
            scope,
            protocol,
            relays,
            resources: Mutex::new(HashMap::new()),
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

    fn touch(&self) {
        self.last_used.store(since_epoch(), Ordering::Relaxed);
    }

    fn idle(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
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
        let agent = session.identity.agent.id.clone();
        let mut open = self.open();
        let count = open.per_agent.entry(agent.clone()).or_default();
        if limit > 0 && *count >= limit {
            return Err(TooManySessions { agent, limit });
        }
        *count += 1;
        open.by_id.insert(session.id.clone(), session);
        Ok(())
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
    /// when there is none or the agent came with other rights; it counts as
    /// used now.
    pub fn standing(
        &self,
        identity: &Identity,
        scope: &Scope,
        open: impl FnOnce() -> Arc<ClientSession>,
    ) -> Arc<ClientSession> {
        let key = (identity.agent.id.clone(), scope.clone());
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        let session = match standing.get(&key) {
            Some(session) if session.identity.same_as(identity) => session.clone(),
            _ => {
                let session = open();
                standing.insert(key, session.clone());
                session
            }
        };
        session.touch();
        session
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
            BTreeMap::new(),
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
        sessions.standing(&identity, &Scope::All, || session("st", "stateless"));
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
