//! The MCP server side of `portcullis serve`: client sessions, and the
//! routing of each client message to the upstream server that serves it.
//! A session either targets one server (its own path) or sees every server
//! its agent may use, merged: tools and prompts get collision-free names
//! (`prefix` + `separator` + name), resources keep their URIs and are routed
//! by which server listed them. Every message to or from a server passes
//! through the session's [`Relay`] for that server, so it is judged (with the
//! real server and tool names) and audited exactly as in stdio mode. A
//! server is reached through one connection all sessions share, or through
//! one of each session's own (`isolation = "per-session"`), started when the
//! session opens and stopped when it ends.

pub mod calls;
pub mod door;
pub mod http;
pub mod inbound;
pub mod instances;
pub mod judging;
pub mod listening;
pub mod naming;
pub mod resumable;
pub mod rounds;
pub mod routing;
pub mod sessions;
pub mod stateless;
pub mod survey;

use crate::audit::AccessRecord;
use crate::config::{Config, Isolation};
use crate::contract::Direction;
use crate::contract::MessageKind;
use crate::gateway::inbound::Outlet;
use crate::gateway::instances::{Full, Instances, Limits};
use crate::gateway::judging::{Armed, Pass, Returning, judge};
use crate::gateway::naming::Naming;
use crate::gateway::resumable::{Opened, Seals};
use crate::gateway::routing::{LISTINGS, Listing, Route};
use crate::gateway::sessions::{
    ClientSession, Own, Reach, Scope, Sessions, Stopping, TooManySessions,
};
use crate::identity::Identity;
use crate::protocol::jsonrpc::{self, INTERNAL_ERROR, INVALID_REQUEST, Message, error_response};
use crate::protocol::parsed::Parsed;
use crate::relay::generation::Current;
use crate::relay::session::Session;
use crate::relay::{Arrival, Asking, Relay};
use crate::upstream::{Answer, Health, Introduction, Plan, Upstream};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Protocol revisions a client may choose; the first is the default.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];
/// How long a merged answer waits for a server that is not ready (starting
/// or restarting) before leaving it out, so one server down does not hold up
/// the agent's view of the others.
const MERGE_WAIT: Duration = Duration::from_secs(5);

/// A configured server, as the gateway reaches it.
enum Served {
    /// Through one connection every session shares.
    Shared(Arc<Upstream>),
    /// Through a connection of each session's own, started from this plan.
    PerSession(Arc<Plan>),
    /// Through a connection of each agent's own, started from this plan
    /// and shared by the agent's sessions (held weakly here, by agent).
    PerAgent(Arc<Plan>, AgentConnections),
}

impl Served {
    /// Whether each session, or agent, has its own connection.
    fn own(&self) -> bool {
        !matches!(self, Served::Shared(_))
    }
}

/// The connections of a per-agent server, by agent, while one of the
/// agent's sessions holds them.
type AgentConnections = Arc<std::sync::Mutex<HashMap<String, std::sync::Weak<Stopping>>>>;

/// Why a session cannot be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its agent has its fill of sessions.
    Sessions(TooManySessions),
    /// As many server connections of sessions' own run as may.
    Instances(Full),
    /// No session with that id can be resumed here.
    Unknown,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Sessions(too_many) => too_many.fmt(f),
            Refused::Instances(full) => full.fmt(f),
            Refused::Unknown => f.write_str("no session with this Mcp-Session-Id for this agent"),
        }
    }
}

impl From<TooManySessions> for Refused {
    fn from(too_many: TooManySessions) -> Self {
        Refused::Sessions(too_many)
    }
}

/// The servers, the sessions, and the naming of merged lists.
pub struct Gateway {
    current: Arc<Current>,
    servers: BTreeMap<String, Served>,
    /// The server connections of sessions' own that run.
    instances: Instances,
    runtime: tokio::runtime::Handle,
    naming: Naming,
    timeout: Duration,
    /// The sessions opened with `initialize`, and the one each agent's
    /// stateless (2026-07-28) requests share per scope, so what its servers
    /// listed is known when it calls.
    sessions: Arc<Sessions>,
    /// Each shared server's tools, as Portcullis last listed them.
    catalogue: Arc<Catalogue>,
    /// The keys session ids are sealed with, so any replica can resume
    /// them (`serve.session_keys`).
    seals: Option<Seals>,
}

/// Each shared server's tools, as Portcullis last listed them.
type Catalogue = std::sync::Mutex<BTreeMap<String, Arc<RawValue>>>;

impl Gateway {
    /// A gateway over the servers `plans` reach, configured by `config`; the
    /// shared connections start now, on `runtime`.
    pub fn new(
        config: &Config,
        current: Arc<Current>,
        plans: BTreeMap<String, Plan>,
        runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let servers = plans
            .into_iter()
            .map(|(name, plan)| {
                let served = match plan.isolation {
                    Isolation::Shared => {
                        let upstream = plan.start(Introduction::portcullis(), None, runtime)?;
                        Served::Shared(Arc::new(upstream))
                    }
                    Isolation::PerSession => Served::PerSession(Arc::new(plan)),
                    Isolation::PerAgent => Served::PerAgent(Arc::new(plan), Arc::default()),
                };
                Ok((name, served))
            })
            .collect::<anyhow::Result<_>>()?;
        let base = config.path.parent().unwrap_or(std::path::Path::new("."));
        let seals = match &config.serve.session_keys[..] {
            [] => None,
            keys => {
                let keys = keys
                    .iter()
                    .map(|key| crate::config::resolve_secret(key, base))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(|e| anyhow::anyhow!("serve.session_keys: {e:#}"))?;
                Some(Seals::new(&keys)?)
            }
        };
        let gateway = Self {
            current,
            servers,
            instances: Instances::default(),
            runtime: runtime.clone(),
            naming: Naming::new(
                crate::config::prefixes(&config.servers),
                config.serve.separator.clone(),
            ),
            timeout: Duration::from_secs(config.serve.request_timeout_secs),
            sessions: Arc::default(),
            catalogue: Arc::default(),
            seals,
        };
        gateway.survey_shared();
        Ok(gateway)
    }

    /// Keeps each shared server's tools listed, now and whenever they
    /// change, and teaches every session using it.
    fn survey_shared(&self) {
        for (server, served) in &self.servers {
            let Served::Shared(upstream) = served else {
                continue;
            };
            let (catalogue, sessions) = (self.catalogue.clone(), self.sessions.clone());
            let (server, shared) = (server.clone(), upstream.clone());
            let current = self.current.clone();
            let learned = move |listing: Arc<RawValue>| {
                catalogue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(server.clone(), listing.clone());
                for session in sessions.all() {
                    let uses = session
                        .upstreams
                        .get(&server)
                        .is_some_and(|u| Arc::ptr_eq(u, &shared));
                    if let (true, Some(relay)) = (uses, session.relays.get(&server)) {
                        relay.learn_listing(&listing);
                    }
                }
                audit_survey(&current, &server, None, &listing);
                true
            };
            let surveyed = survey::keep_surveyed(Arc::downgrade(upstream), self.timeout, learned);
            self.runtime.spawn(surveyed);
        }
    }

    /// Stops every server: the shared connections, and the sessions' own
    /// (the sessions end).
    pub fn stop(&self) {
        for served in self.servers.values() {
            if let Served::Shared(upstream) = served {
                upstream.stop();
            }
        }
        self.sessions.clear();
    }

    /// How each server is doing, by name.
    pub fn health(&self) -> BTreeMap<String, Health> {
        self.servers
            .iter()
            .map(|(name, served)| {
                let health = match served {
                    Served::Shared(upstream) => upstream.health(),
                    Served::PerSession(_) => Health::per_session(self.instances.of_server(name)),
                    Served::PerAgent(..) => Health::per_agent(self.instances.of_server(name)),
                };
                (name.clone(), health)
            })
            .collect()
    }

    /// How long a server may take to answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `server` is configured.
    pub fn has_server(&self, server: &str) -> bool {
        self.servers.contains_key(server)
    }

    /// The session `id`, if it exists here and belongs to `identity`'s
    /// agent.
    pub fn session(&self, id: &str, identity: &Identity) -> Option<Arc<ClientSession>> {
        self.sessions.get(id, &identity.agent.id)
    }

    /// What session `id` was opened with, if its id was sealed by this
    /// deployment for `identity`'s agent no longer than
    /// [`resumable::MAX_AGE`] ago.
    fn sealed(&self, id: &str, identity: &Identity) -> Option<Opened> {
        let opened = self.seals.as_ref()?.open(id)?;
        let age = crate::util::clock::now_ms().saturating_sub(opened.opened_ms);
        (opened.agent == identity.agent.id && age <= resumable::MAX_AGE.as_millis() as u64)
            .then_some(opened)
    }

    /// Session `id`, opened here again from its sealed id (another replica
    /// opened it, or this one before a restart): for its own agent only, on
    /// the endpoint it was opened on (`scope`, the request's), reaching what
    /// that agent may reach now. Not for a session whose servers run an
    /// instance of its own (`per-session`): their state cannot follow it.
    /// Refused, too, when the agent has its fill of sessions here.
    pub fn resume(
        &self,
        id: &str,
        identity: &Identity,
        asked: &Scope,
    ) -> Result<Arc<ClientSession>, Refused> {
        let opened = self.sealed(id, identity).ok_or(Refused::Unknown)?;
        let scope = opened.scope();
        if scope != *asked {
            return Err(Refused::Unknown);
        }
        // One its client ended stays ended; when that cannot be checked, it
        // is not resumed (its client initializes again).
        if let Some(state) = &self.current.state {
            match resumable::revoked(state, id) {
                Ok(false) => {}
                Ok(true) => return Err(Refused::Unknown),
                Err(e) => {
                    tracing::warn!(
                        "cannot tell whether a session was ended, so it is not resumed: {e}"
                    );
                    return Err(Refused::Unknown);
                }
            }
        }
        let servers = match &scope {
            Scope::All => self.reachable(identity),
            Scope::Server(server) if self.has_server(server) && identity.may_use(server) => {
                vec![server.clone()]
            }
            Scope::Server(_) => return Err(Refused::Unknown),
        };
        if servers
            .iter()
            .any(|s| matches!(self.servers.get(s), Some(Served::PerSession(_))))
        {
            return Err(Refused::Unknown);
        }
        let limit = self.current.get().config.serve.max_sessions_per_agent;
        self.sessions.room_for(&identity.agent.id, limit)?;
        let introduction = Introduction {
            protocol: opened.protocol.clone(),
            capabilities: opened.capabilities,
            client_info: opened.client_info,
        };
        let session = self.open(
            id.to_string(),
            identity.clone(),
            scope,
            opened.protocol,
            introduction,
        )?;
        Ok(self.sessions.adopt(session, limit)?)
    }

    /// Ends session `id` (the client's DELETE), cancelling the calls it
    /// holds; false if it was not there.
    /// A sealed session is remembered as ended in the shared state, so no
    /// replica resumes it again (those that did let their copies expire);
    /// one that was never resumed here ends here at once.
    pub fn end(&self, id: &str, identity: &Identity) -> bool {
        let sealed = self.sealed(id, identity).is_some();
        if sealed
            && let Some(state) = &self.current.state
            && let Err(e) = resumable::revoke(state, id)
        {
            tracing::warn!("cannot tell the other replicas a session ended: {e}");
        }
        let Some(session) = self.sessions.remove(id, &identity.agent.id) else {
            return sealed;
        };
        session.cancel_held("the client ended its session");
        session.end();
        true
    }

    /// Drops session `id` of `identity`, just resumed here, that nothing
    /// used yet.
    pub fn forget(&self, id: &str, identity: &Identity) {
        if let Some(session) = self.sessions.remove(id, &identity.agent.id) {
            session.end();
        }
    }

    /// Cancels every call a session holds for approval (Portcullis is
    /// stopping): nothing of theirs runs later.
    pub fn cancel_held(&self, why: &str) {
        for session in self.sessions.all() {
            session.cancel_held(why);
        }
    }

    /// Expires the sessions idle for longer than `serve.session_idle_secs`
    /// (none a request or stream is using), each audited.
    pub fn expire_idle(&self) {
        let generation = self.current.get();
        let idle = Duration::from_secs(generation.config.serve.session_idle_secs);
        for session in self.sessions.expire(idle) {
            session.cancel_held("the session expired");
            session.end();
            let endpoint = session.scope.endpoint();
            let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
            let mut record = AccessRecord::new(
                "session-expired",
                Some(&session.identity.agent),
                &endpoint,
                peer,
            );
            record.reason = Some(format!("idle for over {}s", idle.as_secs()));
            if let Err(e) = generation.audit.write(&record) {
                tracing::error!("cannot audit an expired session: {e:#}");
            }
        }
    }

    /// How many sessions are open: opened with `initialize`, and standing.
    pub fn session_count(&self) -> (usize, usize) {
        self.sessions.count()
    }

    /// Answers an `initialize` request: opens a session for `identity` on
    /// `scope` and returns it with the answer; refused when the agent has
    /// as many sessions open as it may, or the session would need a server
    /// connection of its own and as many run as may.
    pub async fn initialize(
        &self,
        identity: Identity,
        scope: Scope,
        message: &Message<'_>,
    ) -> Result<(Option<Arc<ClientSession>>, String), Refused> {
        let limit = self.current.get().config.serve.max_sessions_per_agent;
        self.sessions.room_for(&identity.agent.id, limit)?;
        let params = message.params_value();
        let requested = params["protocolVersion"].as_str().map(str::to_string);
        let protocol = requested
            .filter(|v| PROTOCOL_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| PROTOCOL_VERSIONS[0].to_string());
        let introduction = Introduction::on_behalf(&params, &protocol);
        let id = self.new_session_id(&identity, &scope, &introduction);
        let session = self.open(id, identity, scope, protocol.clone(), introduction)?;
        let result = match &session.scope {
            Scope::Server(server) => {
                match session.upstreams[server].initialized(self.timeout).await {
                    Ok(upstream) => {
                        let mut result = (*upstream).clone();
                        result["protocolVersion"] = json!(protocol);
                        result
                    }
                    Err(e) => {
                        let why = format!("Portcullis: {e:#}");
                        return Ok((None, error_response(message.id, INTERNAL_ERROR, &why, None)));
                    }
                }
            }
            Scope::All => json!({
                "protocolVersion": protocol,
                "capabilities": self.merged_capabilities(&session, true).await,
                "serverInfo": portcullis_info(),
                "instructions": self.merged_instructions(),
            }),
        };
        self.sessions.insert(session.clone(), limit)?;
        let id = message.id.map_or("null", |id| id.get());
        let answer = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
        Ok((Some(session), answer))
    }

    /// The id of a new session: sealed, so any replica can resume it, where
    /// `serve.session_keys` are set; random otherwise.
    fn new_session_id(
        &self,
        identity: &Identity,
        scope: &Scope,
        introduction: &Introduction,
    ) -> String {
        let sealed = self.seals.as_ref().and_then(|seals| {
            seals.seal(&Opened {
                agent: identity.agent.id.clone(),
                server: match scope {
                    Scope::All => None,
                    Scope::Server(server) => Some(server.clone()),
                },
                protocol: introduction.protocol.clone(),
                capabilities: introduction.capabilities.clone(),
                client_info: introduction.client_info.clone(),
                opened_ms: crate::util::clock::now_ms(),
            })
        });
        sealed.unwrap_or_else(uuid_like)
    }

    /// A session `id` of `identity` on `scope`, with a relay per server and
    /// a connection to each: the shared one, or its own, introduced as
    /// `introduction` says.
    fn open(
        &self,
        id: String,
        identity: Identity,
        scope: Scope,
        protocol: String,
        introduction: Introduction,
    ) -> Result<Arc<ClientSession>, Refused> {
        let servers = match &scope {
            Scope::All => self.reachable(&identity),
            Scope::Server(server) => vec![server.clone()],
        };
        let mut reach = Reach::default();
        for server in servers {
            let upstream = match &self.servers[&server] {
                Served::Shared(upstream) => upstream.clone(),
                Served::PerSession(plan) => {
                    let own = self.start_own(&server, plan, &identity, &introduction)?;
                    let upstream = own.upstream().clone();
                    reach.own.push(own);
                    upstream
                }
                Served::PerAgent(plan, connections) => {
                    let mut connections = connections
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let agent = &identity.agent.id;
                    let held = connections.get(agent).and_then(Own::shared);
                    let own = match held {
                        Some(own) => own,
                        None => {
                            let own = self.start_own(&server, plan, &identity, &introduction)?;
                            connections.retain(|_, held| held.strong_count() > 0);
                            connections.insert(agent.clone(), own.downgrade());
                            own
                        }
                    };
                    let upstream = own.upstream().clone();
                    reach.own.push(own);
                    upstream
                }
            };
            let session = Session::new(server.clone(), identity.agent.clone());
            let relay = Arc::new(Relay::new(self.current.clone(), session));
            self.teach(&server, &relay, &upstream, &identity);
            reach.relays.insert(server.clone(), relay);
            reach.upstreams.insert(server, upstream);
        }
        Ok(Arc::new(ClientSession::new(
            id,
            identity,
            scope,
            protocol,
            introduction.capabilities,
            reach,
        )))
    }

    /// Teaches a new session's `relay` for `server` the server's tools: as
    /// last listed, for a shared connection; as its own connection lists
    /// them from now on, otherwise.
    fn teach(
        &self,
        server: &str,
        relay: &Arc<Relay>,
        upstream: &Arc<Upstream>,
        identity: &Identity,
    ) {
        // What the lock pins first; what the server lists once it has.
        relay.learn_pinned();
        if let Some(Served::Shared(_)) = self.servers.get(server) {
            let catalogue = self
                .catalogue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(listing) = catalogue.get(server) {
                relay.learn_listing(listing);
            }
            return;
        }
        let (learner, current) = (Arc::downgrade(relay), self.current.clone());
        let (server, agent) = (server.to_string(), identity.agent.clone());
        let learned = move |listing: Arc<RawValue>| {
            let Some(relay) = learner.upgrade() else {
                return false;
            };
            relay.learn_listing(&listing);
            audit_survey(&current, &server, Some(&agent), &listing);
            true
        };
        self.runtime.spawn(survey::keep_surveyed(
            Arc::downgrade(upstream),
            self.timeout,
            learned,
        ));
    }

    /// A connection of one session's own to the server `plan` reaches,
    /// unless as many run as may.
    fn start_own(
        &self,
        server: &str,
        plan: &Plan,
        identity: &Identity,
        introduction: &Introduction,
    ) -> Result<Own, Refused> {
        let serve = &self.current.get().config.serve;
        let limits = Limits {
            total: serve.max_server_instances,
            per_agent: serve.max_server_instances_per_agent,
        };
        let place = self
            .instances
            .take(&identity.agent.id, server, limits)
            .map_err(Refused::Instances)?;
        // The place is held by the connection until it is gone.
        let upstream = plan
            .start(introduction.clone(), Some(Box::new(place)), &self.runtime)
            .map_err(|e| {
                tracing::error!("cannot start a server connection of a session's own: {e:#}");
                Refused::Instances(Full::Total(limits.total))
            })?;
        Ok(Own::new(Arc::new(upstream)))
    }

    /// The session `identity`'s stateless requests on `scope` share; a new
    /// one when it does not reach every server the agent may use now. Its
    /// own server connections, if any, are introduced with the client
    /// capabilities of the request that opened it.
    pub fn standing(
        &self,
        identity: &Identity,
        scope: &Scope,
        capabilities: &Value,
    ) -> Result<Arc<ClientSession>, Refused> {
        // Rights narrowed, or a token refreshed, keep it: each request is
        // authorized on its own. Rights widened on the merged endpoint need
        // a session that reaches the new servers.
        let reachable = match scope {
            Scope::All => self.reachable(identity),
            Scope::Server(_) => Vec::new(),
        };
        let fits =
            |session: &ClientSession| reachable.iter().all(|s| session.relays.contains_key(s));
        self.sessions.standing(identity, scope, fits, || {
            let protocol = stateless::VERSION.to_string();
            let params = json!({ "capabilities": capabilities });
            let introduction = Introduction::on_behalf(&params, PROTOCOL_VERSIONS[0]);
            let id = uuid_like();
            self.open(id, identity.clone(), scope.clone(), protocol, introduction)
        })
    }

    /// The session `identity`'s stateless requests on `scope` share, if
    /// there is one.
    pub fn standing_of(&self, identity: &Identity, scope: &Scope) -> Option<Arc<ClientSession>> {
        self.sessions.standing_of(identity, scope)
    }

    /// What `session`'s servers send it on their own (not about one call),
    /// each judged by the session's relay for that server, from now until
    /// the receiver is dropped: changes to their lists, updates of the
    /// resources it subscribed to, and from its own connections their
    /// logging and requests.
    pub fn notices(&self, session: &Arc<ClientSession>) -> mpsc::Receiver<String> {
        let (sender, receiver) = mpsc::channel(16);
        for (server, upstream) in &session.upstreams {
            let own = self.servers.get(server).is_some_and(Served::own);
            let inbox = own.then(|| upstream.inbox());
            let notices = upstream.notices();
            let (sender, session, server) = (sender.clone(), session.clone(), server.clone());
            let wait = self.timeout;
            tokio::spawn(relay_notices(session, server, notices, inbox, sender, wait));
        }
        // The stream stays open while the client reads it and the session
        // lasts, whether or not its servers send anything.
        let session = session.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = sender.closed() => {}
                () = session.ended() => {}
            }
        });
        receiver
    }

    /// The result of `server/discover` (2026-07-28) for `session`, and who
    /// answers for it.
    pub async fn discover(&self, session: &ClientSession) -> Result<(Value, Value), String> {
        match &session.scope {
            Scope::Server(server) => {
                let upstream = session.upstreams[server]
                    .initialized(self.timeout)
                    .await
                    .map_err(|e| format!("Portcullis: {e:#}"))?;
                let capabilities = listed_capabilities(&upstream["capabilities"], true);
                let result = stateless::discovery(capabilities, upstream["instructions"].as_str());
                Ok((result, upstream["serverInfo"].clone()))
            }
            Scope::All => {
                let capabilities = self.merged_capabilities(session, true).await;
                let instructions = self.merged_instructions();
                let result = stateless::discovery(capabilities, Some(&instructions));
                Ok((result, portcullis_info()))
            }
        }
    }

    /// Who answers for `session`: Portcullis for the merged endpoint, else
    /// the server as it introduced itself.
    pub async fn server_info(&self, session: &ClientSession) -> Value {
        match &session.scope {
            Scope::All => portcullis_info(),
            Scope::Server(server) => {
                match session.upstreams[server].initialized(MERGE_WAIT).await {
                    Ok(upstream) => upstream["serverInfo"].clone(),
                    Err(_) => json!({ "name": server, "version": "unknown" }),
                }
            }
        }
    }

    /// The capabilities of the merged endpoint: the lists that at least one
    /// of `session`'s servers offers, and, with `changes`, whether one of
    /// them tells when a list changed (on the GET stream).
    async fn merged_capabilities(
        &self,
        session: &ClientSession,
        changes: bool,
    ) -> Map<String, Value> {
        let mut capabilities = Map::new();
        for upstream in session.upstreams.values() {
            let Ok(init) = upstream.initialized(MERGE_WAIT).await else {
                continue;
            };
            for (name, offer) in listed_capabilities(&init["capabilities"], changes) {
                let merged = capabilities.entry(name).or_insert_with(|| json!({}));
                if offer["listChanged"] == json!(true) {
                    merged["listChanged"] = json!(true);
                }
            }
        }
        capabilities
    }

    fn merged_instructions(&self) -> String {
        "Tools and prompts of several MCP servers, named SERVER__NAME, behind Portcullis."
            .replace("__", self.naming.separator())
    }

    /// The servers `identity` may use, in name order.
    fn reachable(&self, identity: &Identity) -> Vec<String> {
        self.servers
            .keys()
            .filter(|server| identity.may_use(server))
            .cloned()
            .collect()
    }

    /// Handles one message of `session` (not `initialize`), sent by
    /// `caller` (as its own credentials show under the config in force: it
    /// reaches only the servers that grants, and policies judge it as
    /// `caller`'s); returns the answer to send back, if the message was a
    /// request. Its client can be asked about a held call as `asking` says;
    /// what servers send about the call meanwhile goes to `outlet` (without
    /// one, their requests are refused).
    pub async fn handle(
        &self,
        session: &ClientSession,
        request: Parsed,
        caller: &Identity,
        asking: Asking,
        outlet: Option<&Outlet>,
    ) -> Option<String> {
        let message = request.message();
        let method = message.method.as_deref().unwrap_or_default();
        if method == CANCELLED {
            cancel(session, message);
        }
        match (&session.scope, message.id) {
            (_, _) if message.method.is_none() => {
                inbound::answered(session, request, caller).await;
                None
            }
            (_, Some(id)) if method == "ping" => Some(format!(
                r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
                id.get()
            )),
            (_, None) if method == "notifications/initialized" => None,
            (Scope::Server(server), _) => {
                let asked = Asked::by(caller, asking);
                self.forward(session, server, request, asked, outlet).await
            }
            (Scope::All, None) => {
                self.notify_own(session, request, caller).await;
                None
            }
            (Scope::All, Some(_)) => {
                let asked = Asked::by(caller, asking);
                Some(self.aggregate(session, request, asked, outlet).await)
            }
        }
    }

    /// A client's notification on the aggregated endpoint (e.g. its roots
    /// changed): to each server of the session's own that `caller` may use,
    /// judged by its relay. A shared server knows one client, Portcullis,
    /// which sends it none.
    async fn notify_own(&self, session: &ClientSession, notification: Parsed, caller: &Identity) {
        for server in session.relays.keys() {
            if !self.servers.get(server).is_some_and(Served::own) || !caller.may_use(server) {
                continue;
            }
            if let Ok(copy) = Parsed::parse(notification.text().to_string()) {
                let asked = Asked::by(caller, Asking::Connection);
                self.forward(session, server, copy, asked, None).await;
            }
        }
    }

    /// A request on the aggregated endpoint. A request routed to a server
    /// its caller may no longer use is refused, and audited, by that
    /// server's relay.
    async fn aggregate(
        &self,
        session: &ClientSession,
        request: Parsed,
        asked: Asked<'_>,
        outlet: Option<&Outlet>,
    ) -> String {
        let message = request.message();
        if let Some(listing) = routing::listing(message.method.as_deref().unwrap_or_default()) {
            return self.merge(session, message, listing, asked.caller).await;
        }
        let id = message.id.map(ToOwned::to_owned);
        let resource = |uri: &str| {
            let resources = session.resources.lock().expect("resources lock poisoned");
            resources.get(uri).cloned()
        };
        let route = routing::route(&self.naming, session.relays.keys(), resource, &request);
        let (server, request) = match route {
            Ok(Route {
                server,
                renamed: None,
            }) => (server, request),
            Ok(Route {
                server,
                renamed: Some(renamed),
            }) => match Parsed::parse(renamed) {
                Ok(renamed) => (server, renamed),
                Err(e) => {
                    return error_response(id.as_deref(), INVALID_REQUEST, &e.to_string(), None);
                }
            },
            Err((code, why)) => return error_response(id.as_deref(), code, &why, None),
        };
        self.forward(session, &server, request, asked, outlet)
            .await
            .unwrap_or_else(|| error_response(id.as_deref(), INTERNAL_ERROR, "no answer", None))
    }

    /// A list request sent to every server of the session that offers it
    /// and `caller` may use; the answers are merged. A server that fails is
    /// left out and logged.
    async fn merge(
        &self,
        session: &ClientSession,
        message: &Message<'_>,
        listing: &Listing,
        caller: Option<&Identity>,
    ) -> String {
        let id = message.id.map_or("null", |id| id.get());
        let request = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"{}"}}"#,
            message.method.as_deref().unwrap_or_default()
        );
        let mut items = Vec::new();
        let granted = session
            .upstreams
            .iter()
            .filter(|(server, _)| caller.is_none_or(|caller| caller.may_use(server)));
        for (server, upstream) in granted {
            let offers = match upstream.initialized(MERGE_WAIT).await {
                Ok(init) => init["capabilities"].get(listing.capability).is_some(),
                Err(e) => {
                    tracing::warn!(server, "left out of a merged list: {e:#}");
                    false
                }
            };
            if !offers {
                continue;
            }
            let Ok(request) = Parsed::parse(request.clone()) else {
                continue;
            };
            let asked = Asked {
                caller,
                asking: Asking::Connection,
            };
            let Some(answer) = self.forward(session, server, request, asked, None).await else {
                continue;
            };
            let listed = match routing::listed_items(&self.naming, server, listing, &answer) {
                Ok(listed) => listed,
                Err(why) => {
                    tracing::warn!(server, "left out of a merged list: {why}");
                    continue;
                }
            };
            let mut resources = session.resources.lock().expect("resources lock poisoned");
            for item in &listed {
                if let Some(uri) = item["uri"].as_str() {
                    resources.insert(uri.to_string(), server.clone());
                }
            }
            items.extend(listed);
        }
        let result = json!({ listing.member: items });
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
    }

    /// Judges `request` on its way to `server`, as `asked` says, sends it,
    /// and judges the answer on its way back; what the server sends about
    /// it meanwhile goes to `outlet`. Returns what the client gets, if
    /// anything.
    async fn forward(
        &self,
        session: &ClientSession,
        server: &str,
        request: Parsed,
        asked: Asked<'_>,
        outlet: Option<&Outlet>,
    ) -> Option<String> {
        let relay = session.relays.get(server)?.clone();
        let upstream = session.upstreams.get(server)?.clone();
        // The request and its answer are one HTTP exchange with the server:
        // they are judged as a pair, whatever ids clients sharing a session
        // use.
        let pair = inbound::next_pair();
        let id = request.message().id.map(ToOwned::to_owned);
        let subscription = Subscription::of(server, request.message());
        let c2s = Direction::ClientToServer;
        let arrival = Arrival {
            caller: asked.caller.cloned(),
            asking: asked.asking,
            pair: Some(pair),
        };
        let outbound = judge(relay.clone(), c2s, request, arrival).await;
        if let Some(reply) = outbound.reply {
            return Some(reply);
        }
        let request = match outbound.forward? {
            Pass::AsItCame(request) => Ok(request),
            // A message Portcullis changed is read again, as the server will.
            Pass::Changed(text) => Parsed::parse(text),
        };
        let Some(id) = id else {
            let notified = match &request {
                // A cancellation names its request by the client's id; the
                // server knows it by another. The call it names, stopped,
                // tells the server (see `cancel`).
                Ok(request) if request.message().method.as_deref() == Some(CANCELLED) => Ok(()),
                Ok(request) => upstream.send(request.text()).await,
                Err(unread) => Err(anyhow::anyhow!("{unread}")),
            };
            if let Err(e) = notified {
                tracing::warn!(server, "notification not delivered: {e:#}");
            }
            return None;
        };
        // Should the client go away while the server works, its request
        // gives up its place among those in flight.
        let forgetting = relay.clone();
        let unanswered = Armed::new(move || forgetting.unanswered(Direction::ClientToServer, pair));
        let kept = subscription
            .as_ref()
            .and_then(|s| self.kept_subscription(session, s, &upstream, &id));
        let answer = match (request, kept) {
            (_, Some(kept)) => kept,
            (Ok(request), None) => self.ask(session, server, &upstream, &request, outlet).await,
            (Err(unread), None) => Err(anyhow::anyhow!(
                "the request as changed cannot be read: {unread}"
            )),
        };
        let returning = match answer {
            Ok(answer) => Returning::new(answer, id.clone()),
            Err(e) => Returning::error(id.clone(), &format!("Portcullis: {e:#}")),
        };
        let s2c = Direction::ServerToClient;
        // From here the answer is judged whatever becomes of the client.
        unanswered.disarm();
        let judged = judge(relay, s2c, returning, Arrival::paired(Some(pair))).await;
        // A request is always answered: an answer the relay dropped (it
        // could not be matched to this request) becomes an error.
        let answer = match judged.forward {
            Some(Pass::AsItCame(returning)) => returning.into_text(),
            Some(Pass::Changed(text)) => text,
            None => {
                let why = "Portcullis: the server's answer could not be relayed";
                error_response(Some(&id), INTERNAL_ERROR, why, None)
            }
        };
        if let Some(subscription) = subscription {
            subscription.settle(session, &answer);
        }
        Some(answer)
    }

    /// The answer Portcullis gives a (un)subscription itself, if it must not
    /// reach `upstream`: an unsubscription from a resource other sessions
    /// on the same shared connection still subscribe to (the server knows
    /// one client, Portcullis, and would stop their updates too); a
    /// subscription past [`MOST_SUBSCRIPTIONS`], refused.
    fn kept_subscription(
        &self,
        session: &ClientSession,
        subscription: &Subscription,
        upstream: &Arc<Upstream>,
        id: &serde_json::value::RawValue,
    ) -> Option<anyhow::Result<Answer>> {
        if subscription.subscribe {
            let held = session
                .subscriptions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len();
            return (held >= MOST_SUBSCRIPTIONS).then(|| {
                Err(anyhow::anyhow!(
                    "a session may subscribe to {MOST_SUBSCRIPTIONS} resources at most"
                ))
            });
        }
        let key = (subscription.server.clone(), subscription.uri.clone());
        let others = self.sessions.all().into_iter().any(|other| {
            other.id != session.id
                && other
                    .upstreams
                    .get(&subscription.server)
                    .is_some_and(|u| Arc::ptr_eq(u, upstream))
                && other
                    .subscriptions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&key)
        });
        others.then(|| {
            let answer = format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.get());
            Ok(Parsed::parse(answer))
        })
    }

    /// Sends `request` to `upstream` (the session's connection to `server`)
    /// and waits for its answer; what the server sends about it meanwhile
    /// is delivered to the client through `outlet`, in the order sent
    /// (without one, its requests are refused).
    async fn ask(
        &self,
        session: &ClientSession,
        server: &str,
        upstream: &Upstream,
        request: &Parsed,
        outlet: Option<&Outlet>,
    ) -> anyhow::Result<Answer> {
        let (side, mut related) = mpsc::channel(RELATED);
        let asked = upstream.request(request, self.timeout, Some(side));
        tokio::pin!(asked);
        let answer = loop {
            tokio::select! {
                biased;
                Some(message) = related.recv() => {
                    inbound::deliver(session, server, message, outlet, self.timeout).await;
                }
                answer = &mut asked => break answer,
            }
        };
        while let Ok(message) = related.try_recv() {
            inbound::deliver(session, server, message, outlet, self.timeout).await;
        }
        answer
    }
}

/// Who a request forwarded is from, and how its client can be asked about
/// it.
#[derive(Clone, Copy)]
pub struct Asked<'c> {
    /// The request's sender, as its credentials show now; `None` for
    /// Portcullis' own requests on the session's behalf (letting go of a
    /// subscription), which no grant stops.
    pub caller: Option<&'c Identity>,
    /// How its client can be asked about it, should it be held.
    pub asking: Asking,
}

impl<'c> Asked<'c> {
    /// A request of `caller`'s.
    pub fn by(caller: &'c Identity, asking: Asking) -> Self {
        Self {
            caller: Some(caller),
            asking,
        }
    }
}

/// Relays to `sender` (a session's stream) what `server` sends the session
/// not about a call: its `notices` for all clients that concern it, and its
/// `inbox` (a connection of the session's own: requests, logging); until
/// the stream closes or the session ends.
async fn relay_notices(
    session: Arc<ClientSession>,
    server: String,
    mut notices: broadcast::Receiver<Arc<Parsed>>,
    mut inbox: Option<mpsc::Receiver<Parsed>>,
    sender: Outlet,
    wait: Duration,
) {
    loop {
        let message: Parsed = tokio::select! {
            notice = notices.recv() => match notice {
                Ok(notice) if session.wants(&server, &notice) => match owned(notice) {
                    Some(notice) => notice,
                    None => continue,
                },
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some(message) = async { inbox.as_mut()?.recv().await } => message,
            () = sender.closed() => return,
            () = session.ended() => return,
        };
        inbound::deliver(&session, &server, message, Some(&sender), wait).await;
    }
}

/// A message broadcast to several sessions, as one of them owns it.
fn owned(notice: Arc<Parsed>) -> Option<Parsed> {
    match Arc::try_unwrap(notice) {
        Ok(notice) => Some(notice),
        Err(shared) => Parsed::parse(shared.text().to_string()).ok(),
    }
}

/// Records that Portcullis listed `server`'s tools (for `agent`'s own
/// connection, if it is one): how many, and the listing's digest.
fn audit_survey(
    current: &Arc<Current>,
    server: &str,
    agent: Option<&crate::contract::Agent>,
    listing: &RawValue,
) {
    let endpoint = format!("/servers/{server}/mcp");
    let record = AccessRecord::tools_surveyed(&endpoint, agent, listing);
    let current = current.clone();
    // A sink may wait for the disk: off the async workers.
    tokio::task::spawn_blocking(move || {
        if let Err(e) = current.get().audit.write(&record) {
            tracing::error!("cannot audit a listing of a server's tools: {e:#}");
        }
    });
}

/// A cancellation of one of its requests.
const CANCELLED: &str = "notifications/cancelled";
/// How many of a server's messages about one call may wait to be relayed.
const RELATED: usize = 64;
/// How many resources one session may subscribe to.
const MOST_SUBSCRIPTIONS: usize = 256;

/// A client's cancellation: the session's own call it names, if still
/// running, is stopped (and the server told). Only the session's own calls
/// can be named: a client cannot cancel another's.
fn cancel(session: &ClientSession, message: &Message<'_>) {
    #[derive(serde::Deserialize)]
    struct Params<'a> {
        #[serde(borrow, rename = "requestId")]
        request: &'a serde_json::value::RawValue,
    }
    let named = message
        .params
        .and_then(jsonrpc::from_object::<Params>)
        .map(|params| jsonrpc::id_key(params.request));
    if let Some(key) = named
        && session.cancel_call(&key)
    {
        tracing::debug!(session = %session.id, "the client cancelled its request {key}");
    }
}

/// A client's `resources/subscribe` or `resources/unsubscribe`: once the
/// server accepts it, the session is sent the resource's updates, or no
/// longer.
struct Subscription {
    server: String,
    uri: String,
    subscribe: bool,
}

impl Subscription {
    fn of(server: &str, message: &Message<'_>) -> Option<Self> {
        let subscribe = match message.method.as_deref()? {
            "resources/subscribe" => true,
            "resources/unsubscribe" => false,
            _ => return None,
        };
        let uri = message.params_value()["uri"].as_str()?.to_string();
        Some(Self {
            server: server.to_string(),
            uri,
            subscribe,
        })
    }

    /// Applies it to `session` if `answer` is a result.
    fn settle(self, session: &ClientSession, answer: &str) {
        let accepted = Message::parse(answer)
            .ok()
            .is_some_and(|a| a.kind() == Some(MessageKind::Result));
        if !accepted {
            return;
        }
        let mut subscriptions = session
            .subscriptions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.subscribe {
            subscriptions.insert((self.server, self.uri));
        } else {
            subscriptions.remove(&(self.server, self.uri));
        }
    }
}

/// Portcullis as the server answering on the merged endpoint.
fn portcullis_info() -> Value {
    json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") })
}

/// Of a server's capabilities, the lists Portcullis relays, with
/// `listChanged` where the server offers it and `changes` are relayed.
/// Subscriptions are not relayed.
fn listed_capabilities(offered: &Value, changes: bool) -> Map<String, Value> {
    LISTINGS
        .iter()
        .filter_map(|(_, listing)| {
            let offer = offered.get(listing.capability)?;
            let changing = changes && offer["listChanged"] == json!(true);
            let capability = if changing {
                json!({ "listChanged": true })
            } else {
                json!({})
            };
            Some((listing.capability.to_string(), capability))
        })
        .collect()
}

/// A random session id (128 bits, hex).
fn uuid_like() -> String {
    let bytes: [u8; 16] = rand::random();
    crate::util::encode::hex(&bytes)
}
