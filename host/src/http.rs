//! The Streamable HTTP transport of `portcullis serve`: one endpoint for
//! every server the agent may use (`/mcp`) and one per server
//! (`/servers/NAME/mcp`). It checks `Origin`, authenticates the agent,
//! limits body size, keeps sessions (`Mcp-Session-Id`) and protocol versions
//! (`MCP-Protocol-Version`), and answers each POSTed request with JSON (or a
//! one-event SSE stream for a client that accepts only that). Requests of the
//! stateless 2026-07-28 revision, chosen by their `MCP-Protocol-Version`,
//! need no session. `/healthz`
//! reports the upstream servers. Deciding is left to the [`Gateway`].

use crate::audit::AccessRecord;
use crate::gateway::{Gateway, Scope};
use crate::identity::{self, Identity};
use crate::jsonrpc::{self, Message};
use crate::relay::Asking;
use crate::reload::Current;
use crate::stateless;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::mpsc;

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// How often an idle event stream gets a comment line.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Every response body.
pub type Body = BoxBody<Bytes, Infallible>;

/// What the listener needs besides the gateway.
pub struct Listener {
    /// The gateway deciding and routing.
    pub gateway: Arc<Gateway>,
    /// The generation in charge: agents, origins and limits are read from it
    /// per request, so a reload rotates keys without a restart.
    pub current: Arc<Current>,
}

/// Binds the listening socket.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves MCP on `socket` until `shutdown` completes.
pub async fn run(
    listener: Arc<Listener>,
    socket: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = socket.local_addr()?;
    tracing::info!(%addr, "portcullis serving MCP over Streamable HTTP");
    serve(socket, shutdown, move |request, peer| {
        let listener = listener.clone();
        async move { listener.respond(request, peer).await }
    })
    .await
}

/// Answers every HTTP/1 request on `socket` with `respond` until `shutdown`
/// completes.
pub async fn serve<R, F>(
    socket: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    respond: R,
) -> Result<()>
where
    R: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = socket.accept() => accepted.context("accepting a connection")?,
            () = &mut shutdown => return Ok(()),
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = respond(request, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
}

impl Listener {
    /// Answers one HTTP request from `peer`.
    pub async fn respond(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = request.uri().path().to_string();
        if path == "/healthz" && request.method() == Method::GET {
            return self.health();
        }
        let scope = match path.as_str() {
            "/mcp" => Scope::All,
            _ => match path
                .strip_prefix("/servers/")
                .and_then(|rest| rest.strip_suffix("/mcp"))
            {
                Some(server) if self.gateway.has_server(server) => {
                    Scope::Server(server.to_string())
                }
                _ => return plain(StatusCode::NOT_FOUND, "no MCP endpoint here"),
            },
        };
        let generation = self.current.get();
        let config = &generation.config;
        if let Some(origin) = request.headers().get(header::ORIGIN)
            && !config
                .serve
                .allowed_origins
                .iter()
                .any(|allowed| allowed.as_bytes() == origin.as_bytes())
        {
            return plain(StatusCode::FORBIDDEN, "origin not allowed");
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let identity = match identity::authenticate(
            config,
            generation.jwt.as_ref(),
            authorization,
            unix_now(),
        )
        .await
        {
            Ok(identity) => identity,
            Err(refusal) => {
                let mut record = AccessRecord::new("credentials-refused", None, &path, peer);
                record.reason = Some(refusal.explanation().to_string());
                if let Err(e) = generation.audit.write(&record) {
                    tracing::error!("cannot audit refused credentials: {e:#}");
                }
                let mut response = plain(StatusCode::UNAUTHORIZED, refusal.explanation());
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(refusal.challenge()),
                );
                return response;
            }
        };
        if let Scope::Server(server) = &scope
            && !identity.may_use(server)
        {
            // A server the agent may not use does not exist for it.
            return plain(StatusCode::NOT_FOUND, "no MCP endpoint here");
        }
        let max_body = config.limits.max_message_bytes;
        drop(generation);
        match *request.method() {
            Method::POST => {
                let from = (path.as_str(), peer);
                self.post(request, identity, scope, max_body, from).await
            }
            Method::DELETE => match session_id(request.headers()) {
                Some(id) if self.gateway.end(id, &identity) => {
                    let record =
                        AccessRecord::new("session-ended", Some(&identity.agent), &path, peer);
                    if let Err(e) = self.current.get().audit.write(&record) {
                        tracing::error!("cannot audit the end of a session: {e:#}");
                    }
                    plain(StatusCode::OK, "session ended")
                }
                Some(_) => plain(StatusCode::NOT_FOUND, "unknown session"),
                None => plain(StatusCode::BAD_REQUEST, "Mcp-Session-Id header is required"),
            },
            Method::GET => self.events(request.headers(), &identity, &scope),
            _ => {
                let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use POST, GET or DELETE");
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
        max_body: usize,
        (path, peer): (&str, SocketAddr),
    ) -> Response<Body> {
        let headers = request.headers().clone();
        let body = match Limited::new(request.into_body(), max_body).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                let why = format!(
                    "message exceeds the size limit of {max_body} bytes (limits.max_message_bytes)"
                );
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    jsonrpc::INVALID_REQUEST,
                    &why,
                );
            }
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                jsonrpc::PARSE_ERROR,
                "Parse error: body is not UTF-8",
            );
        };
        if jsonrpc::is_batch(text) {
            let why = "Invalid Request: batches are not supported by this protocol revision";
            return rpc_error(StatusCode::BAD_REQUEST, jsonrpc::INVALID_REQUEST, why);
        }
        let message = match Message::parse(text) {
            Ok(message) => message,
            Err(e) => {
                let why = format!("Parse error: {e}");
                return rpc_error(StatusCode::BAD_REQUEST, jsonrpc::PARSE_ERROR, &why);
            }
        };
        if let Some(version) = headers.get(VERSION_HEADER)
            && stateless::is_stateless(version.as_bytes())
        {
            return self
                .stateless(&headers, identity, scope, &message, text)
                .await;
        }
        if message.method.as_deref() == Some("initialize") && message.id.is_some() {
            let mut access = AccessRecord::new("session-opened", Some(&identity.agent), path, peer);
            let (session, answer) = self.gateway.initialize(identity, scope, &message).await;
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
            let mut response = answer_response(&headers, answer);
            if let Some(session) = session
                && let Ok(value) = HeaderValue::from_str(&session.id)
            {
                response.headers_mut().insert(SESSION_HEADER, value);
            }
            return response;
        }
        let Some(id) = session_id(&headers) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "Mcp-Session-Id header is required (initialize first)",
            );
        };
        let Some(session) = self
            .gateway
            .session(id, &identity)
            .filter(|s| s.scope == scope)
        else {
            return plain(StatusCode::NOT_FOUND, "unknown session; initialize again");
        };
        if let Some(version) = headers.get(VERSION_HEADER)
            && version.as_bytes() != session.protocol.as_bytes()
        {
            return plain(
                StatusCode::BAD_REQUEST,
                "MCP-Protocol-Version is not the revision this session negotiated",
            );
        }
        match self
            .gateway
            .handle(&session, text, Asking::Connection)
            .await
        {
            Some(answer) => answer_response(&headers, answer),
            None => empty(StatusCode::ACCEPTED),
        }
    }

    /// The server-to-client stream of a session (GET, revisions up to
    /// 2025-11-25): the notifications its servers send all their clients,
    /// as SSE events. Servers' own requests are not relayed to agents.
    fn events(&self, headers: &HeaderMap, identity: &Identity, scope: &Scope) -> Response<Body> {
        if !accepts(headers, "text/event-stream") {
            return plain(StatusCode::NOT_ACCEPTABLE, "GET streams text/event-stream");
        }
        let Some(id) = session_id(headers) else {
            let mut response = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "a GET stream belongs to a session (Mcp-Session-Id)",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        };
        let Some(session) = self
            .gateway
            .session(id, identity)
            .filter(|s| &s.scope == scope)
        else {
            return plain(StatusCode::NOT_FOUND, "unknown session; initialize again");
        };
        event_stream("message", self.gateway.notices(&session))
    }

    /// A request of the stateless 2026-07-28 revision: its envelope is
    /// checked, the agent's standing session judges and routes it, and the
    /// answer gets the members this revision requires.
    async fn stateless(
        &self,
        headers: &HeaderMap,
        identity: Identity,
        scope: Scope,
        message: &Message<'_>,
        text: &str,
    ) -> Response<Body> {
        let (Some(method), Some(id)) = (message.method.as_deref(), message.id) else {
            // A notification (e.g. a cancellation) or a stray response.
            return empty(StatusCode::ACCEPTED);
        };
        let params = message.params_value();
        if let Err(rejection) = stateless::check(headers, method, &params) {
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
            let answer = jsonrpc::error_response(Some(id), stateless::METHOD_NOT_FOUND, &why, None);
            return json_response(StatusCode::NOT_FOUND, answer);
        }
        let session = self.gateway.standing(&identity, &scope);
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
            let text = match stateless::without_envelope(&params) {
                Some(params) => jsonrpc::replace_member(text, "params", &params.to_string())
                    .unwrap_or_else(|_| text.to_string()),
                None => text.to_string(),
            };
            let asking = if stateless::elicits(&params) {
                Asking::InputRequired
            } else {
                Asking::Connection
            };
            let answer = self
                .gateway
                .handle(&session, &text, asking)
                .await
                .unwrap_or_else(|| {
                    jsonrpc::error_response(Some(id), jsonrpc::INTERNAL_ERROR, "no answer", None)
                });
            (answer, self.gateway.server_info(&scope).await)
        };
        let (answer, status) = stateless::complete(&answer, method, &server_info);
        let mut response = answer_response(headers, answer);
        *response.status_mut() = status;
        response
    }

    fn health(&self) -> Response<Body> {
        let servers = self.gateway.health();
        json_response(StatusCode::OK, json!({ "servers": servers }).to_string())
    }
}

/// A `text/event-stream` response of `events` (JSON texts), each an SSE
/// event named `name`.
pub fn event_stream(name: &'static str, events: mpsc::Receiver<String>) -> Response<Body> {
    let stream = EventStream {
        name,
        notices: Some(events),
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE),
    };
    let mut response = Response::new(stream.boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// An SSE stream of notices; a comment line every [`KEEPALIVE`] keeps it
/// open through proxies, and finds out when the client has gone. It ends
/// only when the client goes away.
struct EventStream {
    name: &'static str,
    notices: Option<mpsc::Receiver<String>>,
    keepalive: tokio::time::Interval,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(notices) = &mut this.notices {
            match notices.poll_recv(cx) {
                Poll::Ready(Some(notice)) => {
                    let event = sse_event(this.name, &notice);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))));
                }
                // No server sends notices: keep the stream, without them.
                Poll::Ready(None) => this.notices = None,
                Poll::Pending => {}
            }
        }
        match this.keepalive.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keepalive\n\n",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One JSON text as an SSE event named `name`.
fn sse_event(name: &str, message: &str) -> String {
    format!("event: {name}\ndata: {message}\n\n")
}

/// A whole body.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
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

/// A JSON-RPC answer, as JSON, or as one SSE event for a client that
/// accepts only an event stream.
fn answer_response(headers: &HeaderMap, answer: String) -> Response<Body> {
    let sse = accepts(headers, "text/event-stream") && !accepts(headers, "application/json");
    let (body, kind) = if sse {
        (sse_event("message", &answer), "text/event-stream")
    } else {
        (answer, "application/json")
    };
    let mut response = Response::new(full(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

fn rpc_error(status: StatusCode, code: i32, why: &str) -> Response<Body> {
    json_response(status, jsonrpc::error_response(None, code, why, None))
}

/// A JSON body with `status`.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A plain-text body with `status`.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}
