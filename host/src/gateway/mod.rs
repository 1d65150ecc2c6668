//! The MCP server side of `portcullis serve`: client sessions, and the
//! routing of each client message to the upstream server that serves it.
//! A session either targets one server (its own path) or sees every server
//! its agent may use, merged: tools and prompts get collision-free names
//! (`prefix` + `separator` + name), resources keep their URIs and are routed
//! by which server listed them. Every message to or from a server passes
//! through the session's [`Relay`] for that server, so it is judged (with the
//! real server and tool names) and audited exactly as in stdio mode.

pub mod http;
pub mod judging;
pub mod naming;
pub mod routing;
pub mod sessions;
pub mod stateless;

use crate::audit::AccessRecord;
use crate::config::Config;
use crate::contract::Direction;
use crate::gateway::judging::{Armed, Pass, Returning, judge};
use crate::gateway::naming::Naming;
use crate::gateway::routing::{LISTINGS, Listing, Route};
use crate::gateway::sessions::{ClientSession, Scope, Sessions, TooManySessions};
use crate::identity::Identity;
use crate::protocol::jsonrpc::{INTERNAL_ERROR, INVALID_REQUEST, Message, error_response};
use crate::protocol::parsed::Parsed;
use crate::relay::generation::Current;
use crate::relay::session::Session;
use crate::relay::{Asking, Relay};
use crate::upstream::{Health, Upstream};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Protocol revisions a client may choose; the first is the default.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];
/// How long a merged answer waits for a server that is not ready (starting
/// or restarting) before leaving it out, so one server down does not hold up
/// the agent's view of the others.
const MERGE_WAIT: Duration = Duration::from_secs(5);

/// The servers, the sessions, and the naming of merged lists.
pub struct Gateway {
    current: Arc<Current>,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    naming: Naming,
    timeout: Duration,
    /// The sessions opened with `initialize`, and the one each agent's
    /// stateless (2026-07-28) requests share per scope, so what its servers
    /// listed is known when it calls.
    sessions: Sessions,
}

impl Gateway {
    /// A gateway over `upstreams`, configured by `config`.
    pub fn new(
        config: &Config,
        current: Arc<Current>,
        upstreams: BTreeMap<String, Arc<Upstream>>,
    ) -> Self {
        Self {
            current,
            upstreams,
            naming: Naming::new(
                crate::config::prefixes(&config.servers),
                config.serve.separator.clone(),
            ),
            timeout: Duration::from_secs(config.serve.request_timeout_secs),
            sessions: Sessions::default(),
        }
    }

    /// The upstream servers, by name.
    pub fn upstreams(&self) -> &BTreeMap<String, Arc<Upstream>> {
        &self.upstreams
    }

    /// How each server is doing, by name.
    pub fn health(&self) -> BTreeMap<String, Health> {
        self.upstreams
            .iter()
            .map(|(name, upstream)| (name.clone(), upstream.health()))
            .collect()
    }

    /// Whether `server` is configured.
    pub fn has_server(&self, server: &str) -> bool {
        self.upstreams.contains_key(server)
    }

    /// The session `id`, if it exists and belongs to `identity`'s agent.
    pub fn session(&self, id: &str, identity: &Identity) -> Option<Arc<ClientSession>> {
        self.sessions.get(id, &identity.agent.id)
    }

    /// Ends session `id` (the client's DELETE), cancelling the calls it
    /// holds; false if it was not there.
    pub fn end(&self, id: &str, identity: &Identity) -> bool {
        let Some(session) = self.sessions.remove(id, &identity.agent.id) else {
            return false;
        };
        session.cancel_held("the client ended its session");
        true
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
    /// as many sessions open as it may.
    pub async fn initialize(
        &self,
        identity: Identity,
        scope: Scope,
        message: &Message<'_>,
    ) -> Result<(Option<Arc<ClientSession>>, String), TooManySessions> {
        let limit = self.current.get().config.serve.max_sessions_per_agent;
        self.sessions.room_for(&identity.agent.id, limit)?;
        let requested = message.params_value()["protocolVersion"]
            .as_str()
            .map(str::to_string);
        let protocol = requested
            .filter(|v| PROTOCOL_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| PROTOCOL_VERSIONS[0].to_string());
        let result = match &scope {
            Scope::Server(server) => match self.upstreams[server].initialized(self.timeout).await {
                Ok(upstream) => {
                    let mut result = (*upstream).clone();
                    result["protocolVersion"] = json!(protocol);
                    result
                }
                Err(e) => {
                    let why = format!("Portcullis: {e:#}");
                    return Ok((None, error_response(message.id, INTERNAL_ERROR, &why, None)));
                }
            },
            Scope::All => json!({
                "protocolVersion": protocol,
                "capabilities": self.merged_capabilities(&identity, true).await,
                "serverInfo": portcullis_info(),
                "instructions": self.merged_instructions(),
            }),
        };
        let session = self.open(identity, scope, protocol);
        self.sessions.insert(session.clone(), limit)?;
        let id = message.id.map_or("null", |id| id.get());
        let answer = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
        Ok((Some(session), answer))
    }

    /// A new session of `identity` on `scope`, with a relay per server.
    fn open(&self, identity: Identity, scope: Scope, protocol: String) -> Arc<ClientSession> {
        let servers = match &scope {
            Scope::All => self.reachable(&identity),
            Scope::Server(server) => vec![server.clone()],
        };
        let relays = servers
            .into_iter()
            .map(|server| {
                let session = Session::new(server.clone(), identity.agent.clone());
                (server, Arc::new(Relay::new(self.current.clone(), session)))
            })
            .collect();
        Arc::new(ClientSession::new(
            uuid_like(),
            identity,
            scope,
            protocol,
            relays,
        ))
    }

    /// The session `identity`'s stateless requests on `scope` share; a new
    /// one when the agent comes with other rights or attributes (another
    /// token, a reloaded config).
    pub fn standing(&self, identity: &Identity, scope: &Scope) -> Arc<ClientSession> {
        self.sessions.standing(identity, scope, || {
            let protocol = stateless::VERSION.to_string();
            self.open(identity.clone(), scope.clone(), protocol)
        })
    }

    /// The notifications `session`'s servers send all their clients, each
    /// judged by the session's relay for that server, from now until the
    /// receiver is dropped.
    pub fn notices(&self, session: &ClientSession) -> mpsc::Receiver<String> {
        let (sender, receiver) = mpsc::channel(16);
        for (server, relay) in &session.relays {
            let Some(mut notices) = self.upstreams[server].notices() else {
                continue;
            };
            let (sender, relay) = (sender.clone(), relay.clone());
            tokio::spawn(async move {
                loop {
                    let notice = tokio::select! {
                        notice = notices.recv() => notice,
                        () = sender.closed() => return,
                    };
                    let notice = match notice {
                        Ok(notice) => notice,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let s2c = Direction::ServerToClient;
                    let judged = judge(relay.clone(), s2c, notice, Asking::Connection, None).await;
                    let text = match judged.forward {
                        Some(Pass::AsItCame(notice)) => notice.text().to_string(),
                        Some(Pass::Changed(text)) => text,
                        None => continue,
                    };
                    if sender.send(text).await.is_err() {
                        return;
                    }
                }
            });
        }
        receiver
    }

    /// The result of `server/discover` (2026-07-28) for `session`, and who
    /// answers for it.
    pub async fn discover(&self, session: &ClientSession) -> Result<(Value, Value), String> {
        match &session.scope {
            Scope::Server(server) => {
                let upstream = self.upstreams[server]
                    .initialized(self.timeout)
                    .await
                    .map_err(|e| format!("Portcullis: {e:#}"))?;
                let capabilities = listed_capabilities(&upstream["capabilities"], false);
                let result = stateless::discovery(capabilities, upstream["instructions"].as_str());
                Ok((result, upstream["serverInfo"].clone()))
            }
            Scope::All => {
                let capabilities = self.merged_capabilities(&session.identity, false).await;
                let instructions = self.merged_instructions();
                let result = stateless::discovery(capabilities, Some(&instructions));
                Ok((result, portcullis_info()))
            }
        }
    }

    /// Who answers for `scope`: Portcullis for the merged endpoint, else the
    /// server as it introduced itself.
    pub async fn server_info(&self, scope: &Scope) -> Value {
        match scope {
            Scope::All => portcullis_info(),
            Scope::Server(server) => match self.upstreams[server].initialized(MERGE_WAIT).await {
                Ok(upstream) => upstream["serverInfo"].clone(),
                Err(_) => json!({ "name": server, "version": "unknown" }),
            },
        }
    }

    /// The capabilities of the merged endpoint: the lists that at least one
    /// of `identity`'s servers offers, and, with `changes`, whether one of
    /// them tells when a list changed (on the GET stream).
    async fn merged_capabilities(&self, identity: &Identity, changes: bool) -> Map<String, Value> {
        let mut capabilities = Map::new();
        for server in self.reachable(identity) {
            let upstream = &self.upstreams[&server];
            let Ok(init) = upstream.initialized(MERGE_WAIT).await else {
                continue;
            };
            let relayed = changes && upstream.has_notices();
            for (name, offer) in listed_capabilities(&init["capabilities"], relayed) {
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
        self.upstreams
            .keys()
            .filter(|server| identity.may_use(server))
            .cloned()
            .collect()
    }

    /// Handles one message of `session` (not `initialize`); returns the
    /// answer to send back, if the message was a request.
    /// Its client can be asked about a held call as `asking` says.
    pub async fn handle(
        &self,
        session: &ClientSession,
        request: Parsed,
        asking: Asking,
    ) -> Option<String> {
        let message = request.message();
        let method = message.method.as_deref().unwrap_or_default();
        match (&session.scope, message.id) {
            // Answers to server requests: the gateway never relays those.
            (_, _) if message.method.is_none() => None,
            (_, Some(id)) if method == "ping" => Some(format!(
                r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
                id.get()
            )),
            (_, None) if method == "notifications/initialized" => None,
            (Scope::Server(server), _) => self.forward(session, server, request, asking).await,
            (Scope::All, None) => None,
            (Scope::All, Some(_)) => Some(self.aggregate(session, request, asking).await),
        }
    }

    /// A request on the aggregated endpoint.
    async fn aggregate(&self, session: &ClientSession, request: Parsed, asking: Asking) -> String {
        let message = request.message();
        if let Some(listing) = routing::listing(message.method.as_deref().unwrap_or_default()) {
            return self.merge(session, message, listing).await;
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
        self.forward(session, &server, request, asking)
            .await
            .unwrap_or_else(|| error_response(id.as_deref(), INTERNAL_ERROR, "no answer", None))
    }

    /// A list request sent to every server of the session that offers it; the
    /// answers are merged. A server that fails is left out and logged.
    async fn merge(
        &self,
        session: &ClientSession,
        message: &Message<'_>,
        listing: &Listing,
    ) -> String {
        let id = message.id.map_or("null", |id| id.get());
        let request = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"{}"}}"#,
            message.method.as_deref().unwrap_or_default()
        );
        let mut items = Vec::new();
        for server in session.relays.keys() {
            let offers = match self.upstreams[server].initialized(MERGE_WAIT).await {
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
            let Some(answer) = self
                .forward(session, server, request, Asking::Connection)
                .await
            else {
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

    /// Judges `request` on its way to `server`, sends it, and judges the
    /// answer on its way back. Returns what the client gets, if anything.
    async fn forward(
        &self,
        session: &ClientSession,
        server: &str,
        request: Parsed,
        asking: Asking,
    ) -> Option<String> {
        let relay = session.relays.get(server)?.clone();
        // The request and its answer are one HTTP exchange with the server:
        // they are judged as a pair, whatever ids clients sharing a session
        // use.
        let pair = PAIRS.fetch_add(1, Ordering::Relaxed);
        let id = request.message().id.map(ToOwned::to_owned);
        let c2s = Direction::ClientToServer;
        let outbound = judge(relay.clone(), c2s, request, asking, Some(pair)).await;
        if let Some(reply) = outbound.reply {
            return Some(reply);
        }
        let request = match outbound.forward? {
            Pass::AsItCame(request) => Ok(request),
            // A message Portcullis changed is read again, as the server will.
            Pass::Changed(text) => Parsed::parse(text),
        };
        let upstream = &self.upstreams[server];
        let Some(id) = id else {
            let notified = match &request {
                // A cancellation names its request by the client's id, which
                // on a connection all agents share may be another agent's
                // request: it is judged and audited, not passed on.
                Ok(request) if request.message().method.as_deref() == Some(CANCELLED) => {
                    tracing::debug!(
                        server,
                        "a client's cancellation is not passed to a shared server"
                    );
                    Ok(())
                }
                Ok(request) => upstream.notify(request.text()).await,
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
        let unanswered = Armed::new(move || forgetting.unanswered(pair));
        let answer = match request {
            Ok(request) => upstream.request(&request, self.timeout).await,
            Err(unread) => Err(anyhow::anyhow!(
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
        let judged = judge(relay, s2c, returning, Asking::Connection, Some(pair)).await;
        // A request is always answered: an answer the relay dropped (it
        // could not be matched to this request) becomes an error.
        match judged.forward {
            Some(Pass::AsItCame(returning)) => Some(returning.into_text()),
            Some(Pass::Changed(text)) => Some(text),
            None => {
                let why = "Portcullis: the server's answer could not be relayed";
                Some(error_response(Some(&id), INTERNAL_ERROR, why, None))
            }
        }
    }
}

/// A client's cancellation of one of its requests.
const CANCELLED: &str = "notifications/cancelled";

/// Names each request/answer pair the gateway relays.
static PAIRS: AtomicU64 = AtomicU64::new(1);

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
