//! The Streamable HTTP transport of `portcullis serve`: one endpoint for
//! every server the agent may use (`/mcp`) and one per server
//! (`/servers/NAME/mcp`). It checks `Origin`, authenticates the agent,
//! limits body size, keeps sessions (`Mcp-Session-Id`) and protocol versions
//! (`MCP-Protocol-Version`), and answers each POSTed request with JSON; for a
//! client that accepts an event stream, the answer becomes one once the
//! server sends something about the request before answering it (its
//! requests, progress, logging), which then comes first. Requests of the
//! stateless 2026-07-28 revision, chosen by their `MCP-Protocol-Version`,
//! need no session. `/healthz`
//! reports the upstream servers' state (nothing more: it needs no key).
//! Deciding is left to the [`Gateway`]. Every listener guards itself
//! ([`Guard`]): it serves at most so many connections at once, drops a
//! client that does not send its headers or body in time, and keeps
//! accepting through errors such as running out of file descriptors. What
//! it refuses at the door is audited.

use crate::audit::AccessRecord;
use crate::gateway::calls::{Aborting, Call, Next};
use crate::gateway::door::{self, Door, Refusals};
use crate::gateway::sessions::{ClientSession, Scope};
use crate::gateway::{Gateway, Refused};

use crate::gateway::stateless;
use crate::gateway::{listening, rounds};
use crate::http::{
    Body, BodyError, Ending, Guard, Peer, event_stream, full, json_response, plain, read_body,
    serve, sse_event,
};
use crate::identity::{self, Identity};
use crate::protocol::jsonrpc::{self, Message};
use crate::protocol::parsed::Parsed;
use crate::relay::Asking;
use crate::relay::generation::Current;
use anyhow::Result;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const SESSION_HEADER: &str = "mcp-session-id";
/// The answer to a path that is no endpoint, or a server the agent may not
/// use (which does not exist for it).
const NO_ENDPOINT: &str = "no MCP endpoint here";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// What the listener needs besides the gateway.
pub struct Listener {
    /// The gateway deciding and routing.
    gateway: Arc<Gateway>,
    /// The generation in charge: agents, origins and limits are read from it
    /// per request, so a reload rotates keys without a restart.
    current: Arc<Current>,
    /// The refusals at its door, summed up per peer.
    refusals: Arc<Refusals>,
}

/// Serves MCP on `socket` until `shutdown` completes.
pub async fn run(
    listener: Arc<Listener>,
    socket: tokio::net::TcpListener,
    guard: Guard,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = socket.local_addr()?;
    tracing::info!(%addr, "portcullis serving MCP over Streamable HTTP");
    let (current, refusals) = (listener.current.clone(), listener.refusals.clone());
    let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
    let summarizing = tokio::spawn(door::summarize(current, refusals, async {
        let _ = stop.await;
    }));
    let served = serve(socket, guard, shutdown, move |request, peer| {
        let listener = listener.clone();
        async move { listener.respond(request, peer).await }
    })
    .await;
    // The refusals still being counted reach the trail before it ends.
    let _ = stopped.send(());
    let _ = summarizing.await;
    served
}

impl Listener {
    /// A listener in front of `gateway`, judging with `current`.
    pub fn new(gateway: Arc<Gateway>, current: Arc<Current>) -> Self {
        Self {
            gateway,
            current,
            refusals: Arc::default(),
        }
    }

    /// Answers one HTTP request from `from` (its peer and connection).
    pub async fn respond(&self, request: Request<Incoming>, from: Peer) -> Response<Body> {
        let peer = from.addr;
        let path = request.uri().path().to_string();
        if path == "/healthz" && request.method() == Method::GET {
            return self.health();
        }
        let door = Door {
            current: self.current.clone(),
            refusals: self.refusals.clone(),
            path: path.clone(),
            peer,
        };
        let scope = match path.as_str() {
            "/mcp" => Scope::All,
            _ => match path
                .strip_prefix("/servers/")
                .and_then(|rest| rest.strip_suffix("/mcp"))
            {
                Some(server) if self.gateway.has_server(server) => {
                    Scope::Server(server.to_string())
                }
                _ => {
                    let status = StatusCode::NOT_FOUND;
                    return door.turned_away(None, status, NO_ENDPOINT).await;
                }
            },
        };
        let generation = self.current.get();
        if let Some(origin) = request.headers().get(header::ORIGIN)
            && !generation
                .config
                .serve
                .allowed_origins
                .iter()
                .any(|allowed| allowed.as_bytes() == origin.as_bytes())
        {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            let why = format!("Origin '{origin:.200}' is not in serve.allowed_origins");
            door.refused("origin-refused", None, why).await;
            return plain(StatusCode::FORBIDDEN, "origin not allowed");
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let limits = BodyLimits {
            max: generation.config.limits.max_message_bytes,
            timeout: Duration::from_secs(generation.config.serve.body_timeout_secs),
        };
        let identity = match identity::authenticate(
            &generation.config,
            generation.jwt.as_ref(),
            authorization,
            crate::util::clock::unix_now(),
        )
        .await
        {
            Ok(identity) => identity,
            Err(refusal) => {
                door.refused("credentials-refused", None, refusal.explanation().into())
                    .await;
                let mut response = plain(StatusCode::UNAUTHORIZED, refusal.explanation());
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(refusal.challenge()),
                );
                return response;
            }
        };
        // One agent holds at most its share of the connections, so that
        // others (and /healthz) find one free whatever it does.
        if let Err(over) = from
            .seat
            .claim(&identity.agent.id, generation.config.serve.agent_share())
        {
            let why = format!("{over} (serve.max_connections_per_agent)");
            door.refused("connection-refused", Some(&identity), why.clone())
                .await;
            let answer = jsonrpc::error_response(None, jsonrpc::INVALID_REQUEST, &why, None);
            let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, answer);
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        if let Scope::Server(server) = &scope
            && !identity.may_use(server)
        {
            // A server the agent may not use does not exist for it.
            let why = format!(
                "agent '{}' may not use server '{server}'",
                identity.agent.id
            );
            door.refused("server-refused", Some(&identity), why).await;
            return plain(StatusCode::NOT_FOUND, NO_ENDPOINT);
        }
        drop(generation);
        match *request.method() {
            Method::POST => self.post(request, identity, scope, limits, &door).await,
            Method::DELETE => match session_id(request.headers()) {
                Some(id) if self.end_session(id, &identity).await => {
                    let ended =
                        AccessRecord::new("session-ended", Some(&identity.agent), &path, peer);
                    door.record(ended).await;
                    plain(StatusCode::OK, "session ended")
                }
                Some(_) => {
                    door.unknown_session(&identity).await;
                    plain(StatusCode::NOT_FOUND, "unknown session")
                }
                None => {
                    let why = "Mcp-Session-Id header is required";
                    let status = StatusCode::BAD_REQUEST;
                    door.turned_away(Some(&identity), status, why).await
                }
            },
            Method::GET => {
                self.events(request.headers(), &identity, &scope, &door)
                    .await
            }
            _ => {
                let status = StatusCode::METHOD_NOT_ALLOWED;
                let why = "use POST, GET or DELETE";
                let mut response = door.turned_away(Some(&identity), status, why).await;
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, GET, DELETE"));
                response
            }
        }
    }

    async fn post(
        &self,
        request: Request<Incoming>,
        identity: Identity,
        scope: Scope,
        limits: BodyLimits,
        door: &Door,
    ) -> Response<Body> {
        let headers = request.headers().clone();
        let body = match read_body(request.into_body(), limits.max, limits.timeout).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                let why = format!(
                    "message exceeds the size limit of {} bytes (limits.max_message_bytes)",
                    limits.max
                );
                door.message_refused(Some(&identity), jsonrpc::INVALID_REQUEST, &why, None)
                    .await;
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    jsonrpc::INVALID_REQUEST,
                    &why,
                );
            }
            Err(BodyError::TooSlow) => {
                let why = format!(
                    "the message was not sent within {}s (serve.body_timeout_secs)",
                    limits.timeout.as_secs()
                );
                door.message_refused(Some(&identity), jsonrpc::INVALID_REQUEST, &why, None)
                    .await;
                return rpc_error(StatusCode::REQUEST_TIMEOUT, jsonrpc::INVALID_REQUEST, &why);
            }
            Err(BodyError::Failed(e)) => {
                tracing::debug!("reading a request body failed: {e}");
                let status = StatusCode::BAD_REQUEST;
                let why = "the body could not be read";
                return door.turned_away(Some(&identity), status, why).await;
            }
        };
        let text = match String::from_utf8(Vec::from(body)) {
            Ok(text) => text,
            Err(e) => {
                let why = "Parse error: body is not UTF-8";
                door.message_refused(
                    Some(&identity),
                    jsonrpc::PARSE_ERROR,
                    why,
                    Some(e.as_bytes()),
                )
                .await;
                return rpc_error(StatusCode::BAD_REQUEST, jsonrpc::PARSE_ERROR, why);
            }
        };
        if jsonrpc::is_batch(&text) {
            let why = "Invalid Request: batches are not supported by this protocol revision";
            door.message_refused(
                Some(&identity),
                jsonrpc::INVALID_REQUEST,
                why,
                Some(text.as_bytes()),
            )
            .await;
            return rpc_error(StatusCode::BAD_REQUEST, jsonrpc::INVALID_REQUEST, why);
        }
        // The one parse of this message: everything after uses this view.
        let request = match Parsed::parse(text) {
            Ok(request) => request,
            Err(unread) => {
                let (code, why, body) =
                    (unread.why.code, &unread.why.message, unread.text.as_bytes());
                door.message_refused(Some(&identity), code, why, Some(body))
                    .await;
                let id = jsonrpc::leading_id(body);
                let answer = jsonrpc::error_response(id.as_deref(), code, why, None);
                return json_response(StatusCode::BAD_REQUEST, answer);
            }
        };
        let message = request.message();
        if let Some(version) = headers.get(VERSION_HEADER)
            && stateless::is_stateless(version.as_bytes())
        {
            return self
                .stateless(&headers, identity, scope, request, door)
                .await;
        }
        if message.method.as_deref() == Some("initialize") && message.id.is_some() {
            return self
                .initialize(&headers, identity, scope, message, door)
                .await;
        }
        let Some(id) = session_id(&headers) else {
            let why = "Mcp-Session-Id header is required (initialize first)";
            let status = StatusCode::BAD_REQUEST;
            return door.turned_away(Some(&identity), status, why).await;
        };
        let session = match self.find_session(id, &identity, &scope, door).await {
            Ok(session) => session,
            Err(answer) => return answer,
        };
        session.called_by(&identity);
        if let Some(version) = headers.get(VERSION_HEADER)
            && version.as_bytes() != session.protocol.as_bytes()
        {
            let why = "MCP-Protocol-Version is not the revision this session negotiated";
            let body = request.text().as_bytes();
            door.message_refused(Some(&identity), jsonrpc::INVALID_REQUEST, why, Some(body))
                .await;
            return plain(StatusCode::BAD_REQUEST, why);
        }
        let is_request = message.id.is_some() && message.method.is_some();
        if !is_request {
            return match self
                .gateway
                .handle(&session, request, &identity, Asking::Connection, None)
                .await
            {
                Some(answer) => answer_response(&headers, answer),
                None => empty(StatusCode::ACCEPTED),
            };
        }
        let streams = accepts(&headers, "text/event-stream");
        let gateway = self.gateway.clone();
        let asked = (request, identity);
        let mut call = Call::start(gateway, session, asked, Asking::Connection, streams);
        match call.next().await {
            Next::Answer(Some(answer)) => answer_response(&headers, answer),
            Next::Answer(None) => empty(StatusCode::ACCEPTED),
            Next::Event(first) => call_stream(first, call),
        }
    }

    /// Ends session `id` of `identity` (its held calls are cancelled in the
    /// approvals store: off the async workers); false if there is none.
    async fn end_session(&self, id: &str, identity: &Identity) -> bool {
        let (gateway, id, identity) = (self.gateway.clone(), id.to_string(), identity.clone());
        tokio::task::spawn_blocking(move || gateway.end(&id, &identity))
            .await
            .unwrap_or(false)
    }

    /// Session `id` of `identity` on `scope`: open here, or resumed from its
    /// sealed id, once the trail has `session-resumed` (no session the trail
    /// does not know of); otherwise the answer to give, audited.
    async fn find_session(
        &self,
        id: &str,
        identity: &Identity,
        scope: &Scope,
        door: &Door,
    ) -> Result<Arc<ClientSession>, Response<Body>> {
        if let Some(session) = self
            .gateway
            .session(id, identity)
            .filter(|s| &s.scope == scope)
        {
            return Ok(session);
        }
        let session = match self.gateway.resume(id, identity, scope) {
            Ok(session) => session,
            Err(Refused::Unknown) => {
                door.unknown_session(identity).await;
                return Err(plain(
                    StatusCode::NOT_FOUND,
                    "unknown session; initialize again",
                ));
            }
            Err(refused) => {
                let why = refused.to_string();
                door.refused("session-refused", Some(identity), why.clone())
                    .await;
                let status = StatusCode::TOO_MANY_REQUESTS;
                return Err(rpc_error(status, jsonrpc::INVALID_REQUEST, &why));
            }
        };
        let mut resumed = AccessRecord::new(
            "session-resumed",
            Some(&identity.agent),
            &door.path,
            door.peer,
        );
        resumed.protocol_version = Some(session.protocol.clone());
        let current = self.current.clone();
        let written =
            tokio::task::spawn_blocking(move || current.get().audit.write(&resumed)).await;
        match written {
            Ok(Ok(())) => Ok(session),
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "the audit task failed".to_string(),
                };
                tracing::error!("cannot audit a resumed session: {why}");
                self.gateway.forget(&session.id, identity);
                let why = format!("the audit trail cannot record the session: {why}");
                Err(rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    jsonrpc::AUDIT_FAILED,
                    &why,
                ))
            }
        }
    }

    /// An `initialize` request: a new session, recorded in the trail before
    /// its id is given out; refused when the agent has its fill of them.
    async fn initialize(
        &self,
        headers: &HeaderMap,
        identity: Identity,
        scope: Scope,
        message: &Message<'_>,
        door: &Door,
    ) -> Response<Body> {
        let mut access = AccessRecord::new(
            "session-opened",
            Some(&identity.agent),
            &door.path,
            door.peer,
        );
        let refused_identity = identity.clone();
        let (session, answer) = match self.gateway.initialize(identity, scope, message).await {
            Ok(opened) => opened,
            Err(refused) => {
                let why = refused.to_string();
                door.refused("session-refused", Some(&refused_identity), why.clone())
                    .await;
                let answer =
                    jsonrpc::error_response(message.id, jsonrpc::INVALID_REQUEST, &why, None);
                return json_response(StatusCode::TOO_MANY_REQUESTS, answer);
            }
        };
        if let Some(session) = &session {
            let params = message.params_value();
            let info = &params["clientInfo"];
            access.client = info["name"]
                .as_str()
                .map(|name| format!("{name}/{}", info["version"].as_str().unwrap_or("?")));
            access.protocol_version = serde_json::from_str::<Value>(&answer)
                .ok()
                .and_then(|a| a["result"]["protocolVersion"].as_str().map(str::to_string));
            // No session the trail does not know of.
            if let Err(e) = self.current.get().audit.write(&access) {
                tracing::error!("cannot audit a new session: {e:#}");
                self.gateway.end(&session.id, &session.identity);
                let why = format!("the audit trail cannot record the session: {e:#}");
                return rpc_error(StatusCode::SERVICE_UNAVAILABLE, jsonrpc::AUDIT_FAILED, &why);
            }
        }
        let mut response = answer_response(headers, answer);
        if let Some(session) = session
            && let Ok(value) = HeaderValue::from_str(&session.id)
        {
            response.headers_mut().insert(SESSION_HEADER, value);
        }
        response
    }

    /// The server-to-client stream of a session (GET, revisions up to
    /// 2025-11-25), as SSE events: what its servers send it not about one
    /// call ([`Gateway::notices`]).
    async fn events(
        &self,
        headers: &HeaderMap,
        identity: &Identity,
        scope: &Scope,
        door: &Door,
    ) -> Response<Body> {
        if !accepts(headers, "text/event-stream") {
            let why = "GET streams text/event-stream";
            let status = StatusCode::NOT_ACCEPTABLE;
            return door.turned_away(Some(identity), status, why).await;
        }
        let Some(id) = session_id(headers) else {
            let why = "a GET stream belongs to a session (Mcp-Session-Id)";
            let status = StatusCode::METHOD_NOT_ALLOWED;
            let mut response = door.turned_away(Some(identity), status, why).await;
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        };
        let session = match self.find_session(id, identity, scope, door).await {
            Ok(session) => session,
            Err(answer) => return answer,
        };
        session.called_by(identity);
        let Some(stream) = session.open_stream() else {
            let why = "this session has an event stream open already";
            let status = StatusCode::CONFLICT;
            return door.turned_away(Some(identity), status, why).await;
        };
        event_stream(
            "message",
            self.gateway.notices(&session),
            Some(Box::new(stream)),
            // It ends with the session, or when this replica drains.
            Ending::WithEventsOrDrain,
        )
    }

    /// A request of the stateless 2026-07-28 revision: its envelope is
    /// checked, the agent's standing session judges and routes it, and the
    /// answer gets the members this revision requires.
    async fn stateless(
        &self,
        headers: &HeaderMap,
        identity: Identity,
        scope: Scope,
        request: Parsed,
        door: &Door,
    ) -> Response<Body> {
        let message = request.message();
        let (Some(method), Some(id)) = (message.method.as_deref(), message.id) else {
            // A notification or a stray response. A cancellation stops the
            // agent's own call it names, if one runs.
            if let Some(session) = self.gateway.standing_of(&identity, &scope)
                && message.method.as_deref() == Some("notifications/cancelled")
            {
                self.gateway
                    .handle(&session, request, &identity, Asking::Connection, None)
                    .await;
            }
            return empty(StatusCode::ACCEPTED);
        };
        let (method, id) = (method.to_string(), id.to_owned());
        let (method, id) = (method.as_str(), &*id);
        let params = message.params_value();
        if let Err(rejection) = stateless::check(headers, method, &params) {
            let why = &rejection.message;
            let body = request.text().as_bytes();
            door.message_refused(Some(&identity), rejection.code, why, Some(body))
                .await;
            let answer = jsonrpc::error_response(
                Some(id),
                rejection.code,
                &rejection.message,
                rejection.data,
            );
            return json_response(rejection.status, answer);
        }
        if stateless::REMOVED.contains(&method) {
            let why = format!(
                "Method not found: {method} is not part of {}",
                stateless::VERSION
            );
            let answer = jsonrpc::error_response(Some(id), jsonrpc::METHOD_NOT_FOUND, &why, None);
            return json_response(StatusCode::NOT_FOUND, answer);
        }
        let capabilities = &params["_meta"]["io.modelcontextprotocol/clientCapabilities"];
        let session = match self.gateway.standing(&identity, &scope, capabilities) {
            Ok(session) => {
                session.called_by(&identity);
                session
            }
            Err(refused) => {
                let why = refused.to_string();
                door.refused("session-refused", Some(&identity), why.clone())
                    .await;
                let answer =
                    jsonrpc::error_response(Some(id), jsonrpc::INVALID_REQUEST, &why, None);
                return json_response(StatusCode::TOO_MANY_REQUESTS, answer);
            }
        };
        if method == "subscriptions/listen" {
            return match listening::listen(&self.gateway, session, &identity, id, &params).await {
                Ok(events) => {
                    let opened = AccessRecord::new(
                        "listen-opened",
                        Some(&identity.agent),
                        &door.path,
                        door.peer,
                    );
                    door.record(opened).await;
                    event_stream("message", events, None, Ending::WithEventsOrDrain)
                }
                Err(why) => {
                    door.refused("listen-refused", Some(&identity), why.clone())
                        .await;
                    let answer =
                        jsonrpc::error_response(Some(id), jsonrpc::INVALID_REQUEST, &why, None);
                    json_response(StatusCode::TOO_MANY_REQUESTS, answer)
                }
            };
        }
        let (answer, server_info) = if method == "server/discover" {
            match self.gateway.discover(&session).await {
                Ok((result, info)) => (
                    format!(r#"{{"jsonrpc":"2.0","id":{},"result":{result}}}"#, id.get()),
                    info,
                ),
                Err(why) => (
                    jsonrpc::error_response(Some(id), jsonrpc::INTERNAL_ERROR, &why, None),
                    Value::Null,
                ),
            }
        } else {
            let asking = if stateless::elicits(&params) {
                Asking::InputRequired
            } else {
                Asking::Connection
            };
            // Without its envelope, the request is a new text, read once.
            let sent = stateless::without_envelope(&params).and_then(|params| {
                jsonrpc::replace_member(request.text(), "params", &params.to_string()).ok()
            });
            let request = match sent.map(Parsed::parse) {
                Some(Ok(sent)) => sent,
                _ => request,
            };
            // A call of its own: the agent going away, or cancelling it,
            // stops it and tells the server. A server asking the agent
            // something parks it, and the agent is answered input_required.
            let what = rounds::what(method, &params);
            let wait = self.gateway.timeout();
            let answer = if rounds::resumes(&params) {
                rounds::resume(&session, &identity, &params, id, what, wait).await
            } else {
                let gateway = self.gateway.clone();
                let asked = (request, identity.clone());
                let call = Call::start(gateway, session.clone(), asked, asking, true);
                rounds::drive(&session, call, id, what, wait).await
            };
            let Some(answer) = answer else {
                return empty(StatusCode::ACCEPTED);
            };
            (answer, self.gateway.server_info(&session).await)
        };
        let (answer, status) = stateless::complete(&answer, method, &server_info);
        let mut response = answer_response(headers, answer);
        *response.status_mut() = status;
        response
    }

    /// Each server's state and restarts: enough for a health check, nothing
    /// an unauthenticated caller should learn (pids, errors; `portcullis
    /// status` has those).
    fn health(&self) -> Response<Body> {
        let servers: serde_json::Map<String, Value> = self
            .gateway
            .health()
            .into_iter()
            .map(|(name, health)| {
                let shown = json!({ "state": health.state, "restarts": health.restarts });
                (name, shown)
            })
            .collect();
        json_response(StatusCode::OK, json!({ "servers": servers }).to_string())
    }
}

/// The limits on a request's body.
#[derive(Clone, Copy)]
struct BodyLimits {
    max: usize,
    timeout: Duration,
}

/// Whether the `Accept` header names `kind`.
fn accepts(headers: &HeaderMap, kind: &str) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains(kind))
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

/// The answer to a call whose server sent `first` before answering, as an
/// event stream: `first`, what else it sends, then the answer. A client
/// that goes away cancels the call.
fn call_stream(first: String, mut call: Call) -> Response<Body> {
    let (events, stream) = mpsc::channel(CALL_EVENTS);
    let _ = events.try_send(first);
    let relaying = tokio::spawn(async move {
        loop {
            let (event, last) = match call.next().await {
                Next::Event(event) => (event, false),
                Next::Answer(Some(answer)) => (answer, true),
                Next::Answer(None) => return,
            };
            if events.send(event).await.is_err() || last {
                return;
            }
        }
    });
    event_stream(
        "message",
        stream,
        Some(Box::new(Aborting(relaying))),
        Ending::WithEvents,
    )
}

/// How many events of a call may wait for its client to read them.
const CALL_EVENTS: usize = 16;

/// A JSON-RPC answer, as JSON, or as one SSE event for a client that
/// accepts only an event stream.
fn answer_response(headers: &HeaderMap, answer: String) -> Response<Body> {
    let sse = accepts(headers, "text/event-stream") && !accepts(headers, "application/json");
    let (body, kind) = if sse {
        (sse_event("message", &answer), "text/event-stream")
    } else {
        (Bytes::from(answer), "application/json")
    };
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

fn rpc_error(status: StatusCode, code: i32, why: &str) -> Response<Body> {
    json_response(status, jsonrpc::error_response(None, code, why, None))
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}
