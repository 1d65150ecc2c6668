//! A remote Streamable HTTP MCP server, reached by Portcullis as its MCP
//! client: it initializes once (keeping the server's `Mcp-Session-Id`),
//! sends each request as a POST with the server's own credential headers from
//! the config (never an agent's), under an id unique on its connection (many
//! agents share it), and reads the answer from a JSON body or an
//! SSE stream (decoded as the SSE standard says — CRLF, multi-line `data:` —
//! by `sse-stream`, up to the answer, within the size limit and the request
//! timeout). A lost session or connection is re-established on the next
//! request. What the server sends about a request on that request's own
//! stream (its requests, progress, logging) goes to the request's [`Side`];
//! a request given up on is cancelled with the server. What it sends not
//! about a request comes on its own stream (HTTP GET), listened to while
//! the connection is used and opened again when it drops: its list changes
//! and resource updates for every session using it, and, on a connection
//! dedicated to one session, its requests and logging for that session.
//! Each event is held to the size limit. `https://` uses the platform's
//! root certificates.

use super::{
    Answer, FIRST_BACKOFF, Health, INITIALIZED, Introduction, MAX_BACKOFF, Side, cancellation,
    not_available,
};
use crate::protocol::jsonrpc;
use crate::protocol::parsed::Parsed;
use crate::util::outbound::{self, HttpClient};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use serde_json::Value;
use serde_json::value::RawValue;
use sse_stream::SseStream;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;
use tokio::sync::{broadcast, mpsc};

impl Drop for Remote {
    fn drop(&mut self) {
        self.end_background();
    }
}

/// What the handshake established.
struct Connection {
    session: Option<HeaderValue>,
    initialized: Arc<Value>,
}

/// One remote server.
pub struct Remote {
    inner: Arc<Inner>,
    /// Its tasks in the background (connecting, listening), which hold the
    /// connection: ended when it is stopped or dropped, so a quiet stream
    /// cannot keep a stopped connection, and its instance place, alive.
    background: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct Inner {
    name: String,
    url: Uri,
    /// The URL as errors show it (they may reach agents): its scheme and
    /// host, never its path or query, which may carry a credential.
    shown: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_message_bytes: usize,
    client: HttpClient,
    connection: AsyncMutex<Option<Connection>>,
    health: Mutex<Health>,
    /// The id of the next request on this connection: clients sharing it
    /// may use the same ids, so each request goes under one of its own.
    next_id: AtomicU64,
    introduction: Introduction,
    /// No longer used: it does not connect again.
    stopped: AtomicBool,
    /// What it holds until it is gone.
    _held: Option<super::Held>,
    /// Whether it serves one client session alone.
    dedicated: bool,
    /// The server's notifications for all its clients.
    notices: broadcast::Sender<Arc<Parsed>>,
    /// On a dedicated connection, where what the server sends its session
    /// not about a request goes.
    inbox: super::Inbox,
}

impl Remote {
    /// A server at `url`, sent `headers` (its credentials) with every request.
    pub fn new(
        name: &str,
        url: &str,
        headers: BTreeMap<String, String>,
        (introduction, held): (Introduction, Option<super::Held>),
        max_message_bytes: usize,
    ) -> Result<Self> {
        let url: Uri = url.parse().with_context(|| format!("url '{url}'"))?;
        if !outbound::supports(url.scheme_str()) {
            bail!("url '{url}': use an http:// or https:// URL");
        }
        let headers = headers
            .into_iter()
            .map(|(name, value)| {
                let name = HeaderName::try_from(name.as_str())
                    .with_context(|| format!("header name '{name}'"))?;
                let mut value = HeaderValue::try_from(value)
                    .with_context(|| format!("header '{name}' value"))?;
                value.set_sensitive(true);
                Ok((name, value))
            })
            .collect::<Result<_>>()?;
        let client = outbound::client()?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                shown: shown(&url),
                url,
                headers,
                max_message_bytes,
                client,
                connection: AsyncMutex::new(None),
                health: Mutex::new(Health::starting()),
                next_id: AtomicU64::new(1),
                introduction,
                stopped: AtomicBool::new(false),
                dedicated: held.is_some(),
                _held: held,
                notices: broadcast::channel(64).0,
                inbox: super::Inbox::default(),
            }),
            background: Mutex::default(),
        })
    }

    /// No longer used: it stops trying to connect, and ends its session
    /// with the server (HTTP DELETE).
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.end_background();
        let inner = self.inner.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { inner.end_session().await });
        }
    }

    /// The server's [`super::SHARED_NOTIFICATIONS`], from now on.
    pub fn notices(&self) -> broadcast::Receiver<Arc<Parsed>> {
        self.inner.notices.subscribe()
    }

    /// On a dedicated connection, what the server sends its session not
    /// about a request, from now on; only the latest receiver gets them.
    pub fn inbox(&self) -> mpsc::Receiver<Parsed> {
        self.inner.inbox.open()
    }

    /// Starts the handshake now, so health is known before the first agent,
    /// and tries again, backing off, until the server is reached: one that
    /// comes up after Portcullis is ready when it is, not at the first
    /// agent's request. Then it listens on the server's own stream.
    pub fn connect_in_background(&self, runtime: &tokio::runtime::Handle) {
        let inner = self.inner.clone();
        let listening = runtime.spawn(inner.clone().listen());
        let connecting = runtime.spawn(async move {
            let mut pause = FIRST_BACKOFF;
            while let Err(e) = inner.connection(Duration::from_secs(30)).await {
                tracing::warn!(server = %inner.name, "not reachable yet, trying again in {pause:?}: {e:#}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        });
        let mut background = self.background.lock().expect("background lock poisoned");
        background.extend([listening.abort_handle(), connecting.abort_handle()]);
    }

    /// Ends its tasks in the background.
    fn end_background(&self) {
        let mut background = self.background.lock().expect("background lock poisoned");
        for task in background.drain(..) {
            task.abort();
        }
    }

    /// How it is doing.
    pub fn health(&self) -> Health {
        self.inner
            .health
            .lock()
            .expect("health lock poisoned")
            .clone()
    }

    /// The server's `initialize` result (connecting first if needed).
    pub async fn initialized(&self, wait: Duration) -> Result<Arc<Value>> {
        self.inner.connection(wait).await.map(|c| c.1)
    }

    /// Sends `request` under an id unique on this connection and returns
    /// the server's answer, which carries that id; a session the server
    /// forgot is re-established once. What the server sends about it on its
    /// stream goes to `side`.
    pub async fn request(
        &self,
        request: &Parsed,
        wait: Duration,
        side: Option<Side>,
    ) -> Result<Answer> {
        if request.message().id.is_none() {
            bail!("a request needs an id");
        }
        let id = self
            .inner
            .next_id
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let text = request.with_id(&RawValue::from_string(id.clone())?);
        // Nobody to relay the server's requests to: they are refused, not
        // left to hang.
        let side = side.or_else(|| Some(refuser(self.inner.clone())));
        let mut unanswered = Unanswered {
            inner: Some(self.inner.clone()),
            id: &id,
        };
        for attempt in 0..2 {
            let (session, _) = self.inner.connection(wait).await?;
            let posted =
                self.inner
                    .exchange(&text, Some(&id), session.as_ref(), wait, side.clone());
            match posted.await.map(|(_, answer)| answer) {
                Ok(Some(answer)) => {
                    unanswered.inner = None;
                    return Ok(answer);
                }
                Ok(None) => bail!("server '{}' sent no answer", self.inner.name),
                Err(e) if attempt == 0 && e.downcast_ref::<SessionLost>().is_some() => {
                    self.inner.forget(&format!("{e:#}")).await;
                }
                Err(e) => {
                    self.inner.forget(&format!("{e:#}")).await;
                    return Err(e);
                }
            }
        }
        bail!("server '{}' keeps losing the session", self.inner.name)
    }

    /// Sends a message that gets no answer.
    pub async fn send(&self, text: &str) -> Result<()> {
        self.inner.send_message(text).await
    }
}

/// Where the server's messages about a request go when its caller takes
/// none: its requests are refused, its notifications dropped.
fn refuser(inner: Arc<Inner>) -> Side {
    let (side, mut messages) = tokio::sync::mpsc::channel::<Parsed>(8);
    tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let Some(id) = message.message().id else {
                continue;
            };
            let why = "Portcullis: this request cannot be relayed to any agent";
            let refusal = jsonrpc::error_response(Some(id), jsonrpc::METHOD_NOT_FOUND, why, None);
            if let Err(e) = inner.send_message(&refusal).await {
                tracing::debug!(server = %inner.name, "refusal not delivered: {e:#}");
            }
        }
    });
    side
}

/// A request sent and not (yet) answered: when its caller gives up, the
/// server is told it is cancelled.
struct Unanswered<'a> {
    inner: Option<Arc<Inner>>,
    id: &'a str,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let (Some(inner), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let cancelled = cancellation(self.id, "the client gave up on the request");
        runtime.spawn(async move {
            if let Err(e) = inner.send_message(&cancelled).await {
                tracing::debug!(server = %inner.name, "cancellation not delivered: {e:#}");
            }
        });
    }
}

/// `url` without its path and query.
fn shown(url: &Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.authority().map_or("", |a| a.as_str());
    // An authority may hold user:password@ too.
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}")
}

/// The server answered 404 to a request in a session: it no longer knows it.
#[derive(Debug)]
struct SessionLost;

impl std::fmt::Display for SessionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server no longer knows the session")
    }
}

impl std::error::Error for SessionLost {}

impl Inner {
    /// The session, connecting (the MCP handshake) if there is none.
    async fn connection(&self, wait: Duration) -> Result<(Option<HeaderValue>, Arc<Value>)> {
        let mut connection = self.connection.lock().await;
        if let Some(c) = connection.as_ref() {
            return Ok((c.session.clone(), c.initialized.clone()));
        }
        if self.stopped.load(Ordering::SeqCst) {
            bail!("server '{}': the connection is no longer used", self.name);
        }
        let handshake = async {
            let initialize = self.introduction.request(0);
            let (session, answer) = self
                .exchange(&initialize, Some("0"), None, wait, None)
                .await?;
            let answer = answer.context("no answer to initialize")??;
            let initialized = Arc::new(super::initialize_result(answer.text())?);
            self.exchange(INITIALIZED, None, session.as_ref(), wait, None)
                .await?;
            Ok::<_, anyhow::Error>(Connection {
                session,
                initialized,
            })
        };
        match handshake.await {
            Ok(established) => {
                tracing::info!(server = %self.name, url = %self.shown, "upstream ready");
                self.set_health("ready", None);
                let result = (established.session.clone(), established.initialized.clone());
                *connection = Some(established);
                Ok(result)
            }
            Err(e) => {
                self.set_health("unreachable", Some(format!("{e:#}")));
                Err(not_available(
                    &self.name,
                    &self.health.lock().expect("health lock poisoned"),
                ))
            }
        }
    }

    /// POSTs a message that gets no answer.
    async fn send_message(&self, text: &str) -> Result<()> {
        let wait = Duration::from_secs(30);
        let (session, _) = self.connection(wait).await?;
        self.exchange(text, None, session.as_ref(), wait, None)
            .await
            .map(drop)
    }

    /// Ends the session with the server, if there is one.
    async fn end_session(&self) {
        let Some(session) = self.connection.lock().await.take().and_then(|c| c.session) else {
            return;
        };
        let mut request = Request::delete(self.url.clone())
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", self.introduction.protocol.as_str());
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let Ok(request) = request.body(Full::new(Bytes::new())) else {
            return;
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), self.client.request(request));
        if let Ok(Err(e)) = ended.await {
            tracing::debug!(server = %self.name, "ending the session failed: {e}");
        }
    }

    async fn forget(&self, why: &str) {
        tracing::warn!(server = %self.name, "reconnecting: {why}");
        *self.connection.lock().await = None;
        let mut health = self.health.lock().expect("health lock poisoned");
        health.restarts += 1;
        health.last_error = Some(why.to_string());
    }

    fn set_health(&self, state: &'static str, error: Option<String>) {
        let mut health = self.health.lock().expect("health lock poisoned");
        health.state = state.into();
        if error.is_some() {
            health.last_error = error;
        }
    }

    /// POSTs one message; returns the session header the server set and,
    /// for a request (whose `id` is given), its answer.
    async fn exchange(
        &self,
        text: &str,
        id: Option<&str>,
        session: Option<&HeaderValue>,
        wait: Duration,
        side: Option<Side>,
    ) -> Result<(Option<HeaderValue>, Option<Answer>)> {
        let mut request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", self.introduction.protocol.as_str());
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::from(text.to_string())))?;
        tokio::time::timeout(wait, self.post(request, id, side))
            .await
            .with_context(|| format!("no answer within {wait:?}"))?
    }

    /// Sends `request` and reads the answer to `id` (if it is a request).
    async fn post(
        &self,
        request: Request<Full<Bytes>>,
        id: Option<&str>,
        side: Option<Side>,
    ) -> Result<(Option<HeaderValue>, Option<Answer>)> {
        let session = request.headers().contains_key("mcp-session-id");
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("POST {}", self.shown))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND && session {
            return Err(SessionLost.into());
        }
        if !status.is_success() {
            bail!("POST {} answered HTTP {status}", self.shown);
        }
        let new_session = response.headers().get("mcp-session-id").cloned();
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = Limited::new(response.into_body(), self.max_message_bytes);
        let Some(id) = id else {
            return Ok((new_session, None));
        };
        let answer = if sse {
            let body = body.map_err(body_error);
            answer_in_events(Box::pin(SseStream::new(body)), id, side).await?
        } else {
            let body = body
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
                .to_bytes();
            let body = String::from_utf8(body.to_vec()).context("the answer is not UTF-8")?;
            Some(body)
                .filter(|b| !b.trim().is_empty())
                .map(Parsed::parse)
        };
        Ok((new_session, answer))
    }
}

impl Inner {
    /// Listens on the server's own stream (GET) while the connection is
    /// used, opening it again (backing off) when it drops; a server that
    /// offers none (405) is not asked again.
    async fn listen(self: Arc<Self>) {
        let mut pause = FIRST_BACKOFF;
        let wait = Duration::from_secs(30);
        // Stopping aborts this task; the flag is for a stop it did not see.
        while !self.stopped.load(Ordering::SeqCst) {
            let opened = tokio::time::Instant::now();
            let outcome = match self.connection(wait).await {
                Ok((session, _)) => self.listen_once(session.as_ref()).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Listened::NotOffered) => {
                    tracing::debug!(server = %self.name, "the server offers no stream of its own");
                    return;
                }
                // One that ends at once is opened again backing off, as one that fails.
                Ok(Listened::Ended) if opened.elapsed() >= MAX_BACKOFF => pause = FIRST_BACKOFF,
                Ok(Listened::Ended) => {}
                Err(e) if e.downcast_ref::<SessionLost>().is_some() => {
                    self.forget(&format!("{e:#}")).await;
                }
                Err(e) => tracing::debug!(server = %self.name, "its own stream: {e:#}"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// One GET stream, read until it ends.
    async fn listen_once(&self, session: Option<&HeaderValue>) -> Result<Listened> {
        let mut request = Request::get(self.url.clone())
            .header(header::ACCEPT, "text/event-stream")
            .header("mcp-protocol-version", self.introduction.protocol.as_str());
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::new()))?;
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("GET {}", self.shown))?;
        match response.status() {
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => {
                return Ok(Listened::NotOffered);
            }
            StatusCode::NOT_FOUND if session.is_some() => return Err(SessionLost.into()),
            status if !status.is_success() => bail!("GET {} answered HTTP {status}", self.shown),
            _ => {}
        }
        let mut events = Box::pin(capped_events(
            response.into_body().into_data_stream(),
            self.max_message_bytes,
        ));
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| anyhow::anyhow!("reading its event stream: {e}"))?;
            let Some(data) = event.data else {
                continue;
            };
            match Parsed::parse(data) {
                Ok(message) => self.dispatch(message).await,
                Err(unread) => {
                    tracing::warn!(server = %self.name, "dropped an unreadable event: {}", unread.why)
                }
            }
        }
        Ok(Listened::Ended)
    }

    /// One message on the server's own stream: a notification for all its
    /// clients is broadcast; on a dedicated connection its requests and
    /// other notifications go to the session; a request nobody takes is
    /// refused at once.
    async fn dispatch(&self, message: Parsed) {
        let (method, id) = {
            let view = message.message();
            (
                view.method.as_deref().map(str::to_string),
                view.id.map(ToOwned::to_owned),
            )
        };
        let Some(method) = method else {
            return;
        };
        if id.is_none() && super::SHARED_NOTIFICATIONS.contains(&method.as_str()) {
            let _ = self.notices.send(Arc::new(message));
            return;
        }
        if let (Some(id), "ping") = (&id, method.as_str()) {
            let pong = format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.get());
            let _ = self.send_message(&pong).await;
            return;
        }
        let inbox = self.inbox.sender();
        let taken = match (self.dedicated, inbox) {
            (true, Some(inbox)) => inbox.try_send(message).is_ok(),
            _ => false,
        };
        if let (false, Some(id)) = (taken, id) {
            let why = format!("Portcullis: no agent can answer '{method}' now");
            let refusal = jsonrpc::error_response(Some(&id), jsonrpc::METHOD_NOT_FOUND, &why, None);
            let _ = self.send_message(&refusal).await;
        }
    }
}

/// How reading the server's own stream ended.
enum Listened {
    /// The server offers no such stream.
    NotOffered,
    /// It ended, or dropped.
    Ended,
}

/// The SSE events of a long-lived `body`, none allowed to grow past `max`
/// bytes (a server that never ends an event cannot fill memory).
fn capped_events<E: std::fmt::Display>(
    body: impl Stream<Item = Result<Bytes, E>> + Send,
    max: usize,
) -> impl Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Send {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = pending.clone();
    let bytes = body.map(move |chunk| {
        let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
        let so_far = counted.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len();
        if so_far > max {
            return Err(std::io::Error::other(format!(
                "an event over the size limit of {max} bytes"
            )));
        }
        if ends_a_block(&chunk) {
            // Nothing is held past a blank line: comments (keep-alives)
            // count no more than events do.
            counted.store(0, Ordering::Relaxed);
        }
        Ok(chunk)
    });
    sse_stream::SseByteStream::new(bytes).map(move |event| {
        pending.store(0, Ordering::Relaxed);
        event
    })
}

/// Whether `chunk` ends with a blank line, where an SSE block ends.
fn ends_a_block(chunk: &[u8]) -> bool {
    chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\r") || chunk.ends_with(b"\r\n\r\n")
}

/// A failure reading a body, as an I/O error (which the SSE decoder takes).
fn body_error(e: Box<dyn std::error::Error + Send + Sync>) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The answer to request `id` among the events of an SSE stream, read
/// until it comes (the stream may stay open after it); the server's other
/// messages on it go to `side`. An answer Portcullis cannot read is still
/// taken, by its id, for the relay to refuse.
async fn answer_in_events<S>(mut events: S, id: &str, side: Option<Side>) -> Result<Option<Answer>>
where
    S: Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Unpin,
{
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("reading the answer's event stream: {e}"))?;
        let Some(data) = event.data else {
            continue;
        };
        let answer = Parsed::parse(data);
        let answers = match &answer {
            Ok(parsed) => {
                let m = parsed.message();
                m.method.is_none() && m.id.is_some_and(|answered| answered.get() == id)
            }
            Err(unread) => {
                jsonrpc::leading_id(unread.text.as_bytes()).is_some_and(|found| found.get() == id)
            }
        };
        if answers {
            return Ok(Some(answer));
        }
        match (answer, &side) {
            (Ok(message), Some(side)) if message.message().method.is_some() => {
                // The stream waits for the caller, as the server does.
                if side.send(message).await.is_err() {
                    tracing::debug!("the caller no longer takes the server's messages");
                }
            }
            _ => tracing::debug!("dropped an event that is not the answer"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of an SSE stream that arrives in `chunks`.
    fn stream(
        chunks: &[&'static str],
    ) -> impl Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Unpin {
        let chunks: Vec<Result<Bytes, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from_static(c.as_bytes())))
            .collect();
        SseStream::from_bytes_stream(futures_util::stream::iter(chunks))
    }

    fn answer(chunks: &[&'static str], id: &str) -> Option<Value> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let found = runtime
            .block_on(answer_in_events(stream(chunks), id, None))
            .unwrap();
        found.map(|answer| serde_json::from_str(answer.unwrap().text()).unwrap())
    }

    /// What `capped_events` reads from `chunks`, held to `max` bytes: the
    /// data of each event, or the error it ended with.
    fn capped(chunks: Vec<String>, max: usize) -> Vec<Result<String, String>> {
        let chunks = chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Bytes::from(c)));
        let events = capped_events(futures_util::stream::iter(chunks), max);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(
            events
                .map(|event| match event {
                    Ok(event) => Ok(event.data.unwrap_or_default()),
                    Err(e) => Err(e.to_string()),
                })
                .collect(),
        )
    }

    #[test]
    fn keep_alives_never_add_up_to_an_event_over_the_limit() {
        let mut chunks = vec![": keep-alive\n\n".to_string(); 100];
        chunks.push("data: {}\n\n".to_string());
        assert_eq!(capped(chunks, 64), vec![Ok("{}".to_string())]);
    }

    #[test]
    fn an_event_that_never_ends_is_cut_off_at_the_limit() {
        let mut chunks = vec!["data: {\"a\":\"".to_string()];
        chunks.extend(vec!["x".repeat(16); 10]);
        let read = capped(chunks, 64);
        assert_eq!(read.len(), 1);
        assert!(
            read[0].as_ref().unwrap_err().contains("size limit"),
            "{read:?}"
        );
    }

    #[test]
    fn errors_show_a_url_without_what_may_be_a_credential() {
        let url: Uri = "https://user:pw@mcp.example.com:8443/v1/SECRET/mcp?api_key=k"
            .parse()
            .unwrap();
        assert_eq!(shown(&url), "https://mcp.example.com:8443");
    }

    #[test]
    fn the_answer_is_found_among_other_events() {
        let chunks = [
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
                      id: 7\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"a\",\"result\":{}}\n\n\
                      event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"ok\":true}}\n\n",
        ];
        assert_eq!(answer(&chunks, "3").unwrap()["result"]["ok"], true);
        assert!(answer(&chunks, "4").is_none());
    }

    #[test]
    fn crlf_lines_multiline_data_and_split_chunks_are_read_as_sse_says() {
        let chunks = [
            "event: message\r\ndata: {\r\ndata:   \"jsonrpc\": \"2.0\",\r\n",
            "data:   \"id\": 5,\r\ndata:   \"result\": {\"text\": \"two\\nlines\"}\r\ndata: }\r\n\r\n",
        ];
        let found = answer(&chunks, "5").unwrap();
        assert_eq!(found["result"]["text"], "two\nlines");
    }

    #[test]
    fn an_unreadable_answer_is_still_taken_by_its_id_for_the_relay_to_refuse() {
        let chunks = ["data: {\"jsonrpc\":\"2.0\",\"id\":9,\"result\":{\"a\":1,\"a\":2}}\n\n"];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let found = runtime
            .block_on(answer_in_events(stream(&chunks), "9", None))
            .unwrap();
        let unread = found.unwrap().unwrap_err();
        assert!(unread.text.contains(r#""a":1,"a":2"#));
    }
}
