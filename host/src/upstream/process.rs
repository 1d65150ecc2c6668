//! A stdio MCP server that `portcullis serve` spawns, initializes as an MCP
//! client, and supervises — restarted with backoff when it exits, its
//! health reported. Requests share the one connection: each is sent with an
//! id unique on it (and its progress token swapped for that id), and its
//! answer is routed back by that id (the caller restores its client's id).
//! The server's own requests and notifications go to the call they relate
//! to — by progress token, or as the only call in flight — or, on a
//! dedicated connection, to its session's stream; a request nobody can
//! answer is refused at once, never left to hang. Reading and writing the
//! child's pipes happen on plain threads; callers await answers from async
//! code.

use super::{
    Answer, FIRST_BACKOFF, Health, Introduction, MAX_BACKOFF, SHARED_NOTIFICATIONS, Side,
    cancellation, not_available,
};
use crate::protocol::framing::{Frame, FrameReader};
use crate::protocol::jsonrpc;
use crate::protocol::parsed::Parsed;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc as tokio_mpsc, oneshot, watch};

/// The MCP server to run.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// A server that stayed up this long restarts without delay the next time.
const STABLE: Duration = Duration::from_secs(30);
/// How long a server may take to answer `initialize`.
const INITIALIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped server may take to exit once its stdin is closed,
/// before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the connection is to Portcullis.
pub struct Role {
    /// How Portcullis introduces itself.
    pub introduction: Introduction,
    /// Whether it serves one client session alone.
    pub dedicated: bool,
    /// What it holds until it is gone.
    pub held: Option<super::Held>,
}

/// A request sent, waiting for its answer.
struct Pending {
    answer: oneshot::Sender<Answer>,
    /// Where what the server sends about it goes.
    side: Option<Side>,
    /// The caller's own progress token, swapped for the request's id upstream.
    token: Option<Box<RawValue>>,
}

/// One supervised stdio MCP server.
pub struct Process {
    name: String,
    command: ServerCommand,
    role: Role,
    max_message_bytes: usize,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    link: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    health: Mutex<Health>,
    /// The server's `initialize` result while it is ready.
    ready: watch::Sender<Option<Arc<Value>>>,
    /// The server's notifications for all its clients.
    notices: broadcast::Sender<Arc<Parsed>>,
    /// On a dedicated connection, where what the server sends its session
    /// not about a call goes.
    inbox: super::Inbox,
    /// When it was told to stop, if it was.
    stopping: Mutex<Option<Instant>>,
}

impl Process {
    /// Starts supervising `command` as server `name`; answers are routed on
    /// `runtime`'s timers.
    pub fn start(
        name: &str,
        command: ServerCommand,
        role: Role,
        max_message_bytes: usize,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: name.to_string(),
            command,
            role,
            max_message_bytes,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            link: Mutex::new(None),
            health: Mutex::new(Health::starting()),
            ready: watch::channel(None).0,
            notices: broadcast::channel(64).0,
            inbox: super::Inbox::default(),
            stopping: Mutex::new(None),
        });
        let supervised = upstream.clone();
        std::thread::Builder::new()
            .name(format!("upstream-{name}"))
            .spawn(move || supervised.supervise(&runtime))
            .expect("cannot start an upstream supervisor thread");
        upstream
    }

    /// The server's notifications for all its clients, from now on.
    pub fn notices(&self) -> broadcast::Receiver<Arc<Parsed>> {
        self.notices.subscribe()
    }

    /// How it is doing now.
    pub fn health(&self) -> Health {
        self.health.lock().expect("health lock poisoned").clone()
    }

    /// The server's `initialize` result, waiting up to `wait` for it to be ready.
    pub async fn initialized(&self, wait: Duration) -> Result<Arc<Value>> {
        let mut ready = self.ready.subscribe();
        let outcome = tokio::time::timeout(wait, ready.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(result)) => Ok(result.clone().expect("waited for Some")),
            _ => Err(not_available(&self.name, &self.health())),
        }
    }

    /// Sends `request` under an id unique on this connection (its progress
    /// token, if it has one, swapped for the same) and returns the server's
    /// answer, which carries that id. What the server sends about it goes
    /// to `side`.
    pub async fn request(
        &self,
        request: &Parsed,
        wait: Duration,
        side: Option<Side>,
    ) -> Result<Answer> {
        self.initialized(wait).await?;
        if request.message().id.is_none() {
            bail!("a request needs an id");
        }
        let token = request.progress_token().map(ToOwned::to_owned);
        let (id, answer) = self.register(side, token);
        // Forgotten however this ends; the server is told when the caller
        // gives up.
        let _registered = Registered { process: self, id };
        let on_connection = RawValue::from_string(id.to_string())?;
        let sent = request.with_id_and_token(Some(&on_connection), Some(&on_connection));
        self.send(sent.into_bytes())?;
        let answer = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => bail!("server '{}' stopped before answering", self.name),
            Err(_) => bail!("server '{}' did not answer within {wait:?}", self.name),
        };
        Ok(answer)
    }

    /// Sends a message that gets no answer.
    pub fn send_text(&self, text: &str) -> Result<()> {
        self.send(text.as_bytes().to_vec())
    }

    /// Stops the server (its stdin is closed; it is killed if it has not
    /// exited [`STOP_GRACE`] later) and does not restart it.
    pub fn stop(&self) {
        self.stopping
            .lock()
            .expect("stopping lock poisoned")
            .get_or_insert_with(Instant::now);
        self.link.lock().expect("link lock poisoned").take();
        // A handshake under way gives up at once.
        self.pending().clear();
    }

    fn stopping(&self) -> Option<Instant> {
        *self.stopping.lock().expect("stopping lock poisoned")
    }

    fn register(
        &self,
        side: Option<Side>,
        token: Option<Box<RawValue>>,
    ) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, rx) = oneshot::channel();
        let pending = Pending {
            answer,
            side,
            token,
        };
        self.pending().insert(id, pending);
        (id, rx)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, frame: Vec<u8>) -> Result<()> {
        let link = self.link.lock().expect("link lock poisoned");
        let sent = link.as_ref().map(|link| link.send(frame));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(anyhow!("server '{}' is not running", self.name)),
        }
    }

    fn set_health(&self, state: &'static str, pid: Option<u32>, error: Option<String>) {
        let mut health = self.health.lock().expect("health lock poisoned");
        health.state = state.into();
        health.pid = pid;
        if error.is_some() {
            health.last_error = error;
        }
    }

    /// Runs the server, restarting it whenever it stops, until [`stop`](Self::stop).
    fn supervise(self: Arc<Self>, runtime: &tokio::runtime::Handle) {
        let mut backoff = FIRST_BACKOFF;
        while self.stopping().is_none() {
            let started = Instant::now();
            let why = match self.run_once(runtime) {
                Ok(why) => why,
                Err(e) => format!("{e:#}"),
            };
            self.ready.send_replace(None);
            self.link.lock().expect("link lock poisoned").take();
            // Requests in flight are answered with an error by their callers.
            self.pending().clear();
            if self.stopping().is_some() {
                break;
            }
            if started.elapsed() >= STABLE {
                backoff = FIRST_BACKOFF;
            }
            tracing::warn!(server = %self.name, restart_in = ?backoff, "upstream stopped: {why}");
            self.set_health("restarting", None, Some(why));
            self.health.lock().expect("health lock poisoned").restarts += 1;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Starts the server, initializes it, and serves until it exits; returns why.
    fn run_once(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> Result<String> {
        self.set_health("starting", None, None);
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .envs(&self.command.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.command.program))?;
        let pid = child.id();
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (link, frames) = mpsc::channel::<Vec<u8>>();
        *self.link.lock().expect("link lock poisoned") = Some(link);
        std::thread::spawn(move || {
            for mut frame in frames {
                frame.push(b'\n');
                if stdin
                    .write_all(&frame)
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        let reader = self.clone();
        std::thread::spawn(move || reader.read(stdout));
        match runtime.block_on(self.initialize()) {
            Ok(result) => {
                tracing::info!(server = %self.name, pid, "upstream ready");
                self.set_health("ready", Some(pid), None);
                self.ready.send_replace(Some(Arc::new(result)));
            }
            Err(e) => {
                stop_child(&mut child);
                return Err(e);
            }
        }
        let status = self.wait(&mut child)?;
        Ok(format!("exited with {status}"))
    }

    /// Waits for the child to exit; once told to stop, for [`STOP_GRACE`]
    /// at most before killing it.
    fn wait(&self, child: &mut Child) -> Result<std::process::ExitStatus> {
        loop {
            if let Some(status) = child.try_wait().context("waiting for the server")? {
                return Ok(status);
            }
            if self
                .stopping()
                .is_some_and(|since| since.elapsed() > STOP_GRACE)
            {
                let _ = child.kill();
                return child.wait().context("waiting for the server");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The MCP handshake, introduced as the role says.
    async fn initialize(&self) -> Result<Value> {
        let (id, answer) = self.register(None, None);
        self.send(self.role.introduction.request(id).into_bytes())?;
        let answer = tokio::time::timeout(INITIALIZE_TIMEOUT, answer)
            .await
            .context("no answer to initialize")?
            .context("the server stopped during initialize")??;
        let result = super::initialize_result(answer.text())?;
        self.send_text(super::INITIALIZED)?;
        Ok(result)
    }

    /// Reads the server's output until it closes, routing each answer to its caller.
    fn read(&self, stdout: std::process::ChildStdout) {
        let mut frames = FrameReader::new(BufReader::new(stdout), self.max_message_bytes);
        while let Ok(Some(frame)) = frames.read_frame() {
            match frame {
                Frame::Line(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => self.dispatch(text),
                    Err(_) => tracing::warn!(server = %self.name, "dropped a non-UTF-8 message"),
                },
                Frame::Oversized { len, prefix, .. } => {
                    tracing::warn!(server = %self.name, len, "dropped a message over the size limit");
                    let id = jsonrpc::leading_id(&prefix);
                    if let Some(waiting) = id.as_deref().and_then(|id| self.take_pending(id)) {
                        let why = format!(
                            "Portcullis: the server's answer of {len} bytes exceeds the size limit (limits.max_message_bytes)"
                        );
                        let refusal = jsonrpc::error_response(
                            id.as_deref(),
                            jsonrpc::INVALID_REQUEST,
                            &why,
                            None,
                        );
                        let _ = waiting.send(Parsed::parse(refusal));
                    }
                }
            }
        }
    }

    fn take_pending(&self, id: &RawValue) -> Option<oneshot::Sender<Answer>> {
        let id: u64 = id.get().parse().ok()?;
        self.pending().remove(&id).map(|pending| pending.answer)
    }

    /// One message from the server: an answer goes to whoever waits for it;
    /// pings are answered here; the server's own requests, and its
    /// notifications, go where [`Process::route`] says. An answer Portcullis
    /// cannot read still goes to its caller, by the id it begins with, for
    /// the relay to refuse.
    fn dispatch(&self, text: String) {
        let parsed = match Parsed::parse(text) {
            Ok(parsed) => parsed,
            Err(unread) => {
                let id = jsonrpc::leading_id(unread.text.as_bytes());
                match id.and_then(|id| self.take_pending(&id)) {
                    Some(waiting) => {
                        let _ = waiting.send(Err(unread));
                    }
                    None => {
                        tracing::warn!(server = %self.name, "dropped a message: {}", unread.why)
                    }
                }
                return;
            }
        };
        let message = parsed.message();
        match (message.method.as_deref(), message.id) {
            (None, Some(id)) => {
                if let Some(waiting) = self.take_pending(id) {
                    let _ = waiting.send(Ok(parsed));
                }
            }
            (Some("ping"), Some(id)) => {
                let pong = format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.get());
                let _ = self.send(pong.into_bytes());
            }
            (Some(method), Some(id)) => {
                let (method, id) = (method.to_string(), id.to_owned());
                if let Err(why) = self.route(parsed) {
                    let why = format!("Portcullis: no agent can answer '{method}': {why}");
                    let refusal =
                        jsonrpc::error_response(Some(&id), jsonrpc::METHOD_NOT_FOUND, &why, None);
                    let _ = self.send(refusal.into_bytes());
                }
            }
            (Some("notifications/progress"), None) => self.progress(parsed),
            (Some(method), None) if SHARED_NOTIFICATIONS.contains(&method) => {
                // No receiver (no agent listening) is fine.
                let _ = self.notices.send(Arc::new(parsed));
            }
            (Some(method), None) => {
                let method = method.to_string();
                if let Err(why) = self.route(parsed) {
                    tracing::debug!(server = %self.name, method, "notification not relayed: {why}")
                }
            }
            (None, None) => {
                tracing::warn!(server = %self.name, "dropped a message without id or method")
            }
        }
    }

    /// Where a server's request or notification that names no call goes.
    /// On a connection all agents share, nowhere: over stdio nothing says
    /// which agent it concerns. On a dedicated one (one session's), to the
    /// only call in flight, else to the session's own stream
    /// ([`Process::inbox`]), else to any of its calls. Why not, if nowhere.
    fn route(&self, message: Parsed) -> std::result::Result<(), &'static str> {
        if !self.role.dedicated {
            return Err(
                "the server is shared by all agents, and nothing tells which one it concerns",
            );
        }
        let (only, any) = {
            let pending = self.pending();
            let mut sides = pending.values().map(|p| p.side.clone());
            let first = sides.next();
            let only = match sides.next() {
                None => first.clone().flatten(),
                Some(_) => None,
            };
            let any = pending.values().find_map(|p| p.side.clone());
            (only, any)
        };
        let inbox = self.inbox.sender();
        let mut message = message;
        for outlet in [only, inbox, any].into_iter().flatten() {
            match outlet.try_send(message) {
                Ok(()) => return Ok(()),
                Err(failed) => message = failed.into_inner(),
            }
        }
        Err("its session has no stream open to carry it, or is not reading it")
    }

    /// What the server sends its (one) session not about a call, from now
    /// on: its requests and logging. Only the latest receiver gets them.
    pub fn inbox(&self) -> tokio_mpsc::Receiver<Parsed> {
        self.inbox.open()
    }

    /// A progress notification: to the call whose id it names (Portcullis
    /// sent each call's progress token as its id), with the caller's own
    /// token back in place.
    fn progress(&self, notice: Parsed) {
        let call = notice
            .progress_token()
            .and_then(|token| token.get().parse::<u64>().ok());
        let target = call.and_then(|id| {
            let pending = self.pending();
            let call = pending.get(&id)?;
            Some((call.side.clone()?, call.token.clone()?))
        });
        let Some((side, token)) = target else {
            tracing::debug!(server = %self.name, "dropped progress for no call in flight");
            return;
        };
        match Parsed::parse(notice.with_id_and_token(None, Some(&token))) {
            Ok(progress) => {
                let _ = side.try_send(progress);
            }
            Err(e) => tracing::warn!(server = %self.name, "dropped unreadable progress: {e}"),
        }
    }
}

/// A request waiting for its answer under `id`: no longer waited for once
/// dropped.
struct Registered<'a> {
    process: &'a Process,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let unanswered = self.process.pending().remove(&self.id).is_some();
        if unanswered {
            let why = "the client gave up on the request";
            let _ = self
                .process
                .send_text(&cancellation(&self.id.to_string(), why));
        }
    }
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
