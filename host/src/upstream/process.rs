//! A stdio MCP server that `portcullis serve` spawns, initializes once as
//! an MCP client, and supervises — restarted with backoff when it exits, its
//! health reported. Requests from many client sessions share the one
//! connection: each is sent with an id unique on it, and its answer is routed
//! back by that id (the caller restores its client's id). Reading and writing the
//! child's pipes happen on plain threads; callers await answers from async
//! code.

use super::{
    Answer, FIRST_BACKOFF, Health, MAX_BACKOFF, SHARED_NOTIFICATIONS, initialize_request,
    not_available,
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot, watch};

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

/// One supervised stdio MCP server.
pub struct Process {
    name: String,
    command: ServerCommand,
    max_message_bytes: usize,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    link: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    health: Mutex<Health>,
    /// The server's `initialize` result while it is ready.
    ready: watch::Sender<Option<Arc<Value>>>,
    /// The server's notifications for all its clients.
    notices: broadcast::Sender<Arc<Parsed>>,
    stopping: AtomicBool,
}

impl Process {
    /// Starts supervising `command` as server `name`; answers are routed on
    /// `runtime`'s timers.
    pub fn start(
        name: &str,
        command: ServerCommand,
        max_message_bytes: usize,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: name.to_string(),
            command,
            max_message_bytes,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            link: Mutex::new(None),
            health: Mutex::new(Health::starting()),
            ready: watch::channel(None).0,
            notices: broadcast::channel(16).0,
            stopping: AtomicBool::new(false),
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

    /// Sends `request` under an id unique on this connection and returns
    /// the server's answer, which carries that id.
    pub async fn request(&self, request: &Parsed, wait: Duration) -> Result<Answer> {
        self.initialized(wait).await?;
        if request.message().id.is_none() {
            bail!("a request needs an id");
        }
        let (id, answer) = self.register();
        // Forgotten however this ends, the caller giving up included.
        let _registered = Registered { process: self, id };
        let on_connection = RawValue::from_string(id.to_string())?;
        self.send(request.with_id(&on_connection).into_bytes())?;
        let answer = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => bail!("server '{}' stopped before answering", self.name),
            Err(_) => bail!("server '{}' did not answer within {wait:?}", self.name),
        };
        Ok(answer)
    }

    /// Sends a notification.
    pub fn notify(&self, text: &str) -> Result<()> {
        self.send(text.as_bytes().to_vec())
    }

    /// Stops the server (its stdin is closed) and does not restart it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.link.lock().expect("link lock poisoned").take();
    }

    fn register(&self) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock poisoned")
            .insert(id, tx);
        (id, rx)
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
        while !self.stopping.load(Ordering::SeqCst) {
            let started = Instant::now();
            let why = match self.run_once(runtime) {
                Ok(why) => why,
                Err(e) => format!("{e:#}"),
            };
            self.ready.send_replace(None);
            self.link.lock().expect("link lock poisoned").take();
            // Requests in flight are answered with an error by their callers.
            self.pending.lock().expect("pending lock poisoned").clear();
            if self.stopping.load(Ordering::SeqCst) {
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
        let status = child.wait().context("waiting for the server")?;
        Ok(format!("exited with {status}"))
    }

    /// The MCP handshake, as Portcullis' own client.
    async fn initialize(&self) -> Result<Value> {
        let (id, answer) = self.register();
        self.send(initialize_request(id).into_bytes())?;
        let answer = tokio::time::timeout(INITIALIZE_TIMEOUT, answer)
            .await
            .context("no answer to initialize")?
            .context("the server stopped during initialize")??;
        let result = super::initialize_result(answer.text())?;
        self.notify(super::INITIALIZED)?;
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
        self.pending
            .lock()
            .expect("pending lock poisoned")
            .remove(&id)
    }

    /// One message from the server: an answer goes to whoever waits for it;
    /// the server's own requests are answered here (the gateway does not
    /// relay them to agents); notifications for all clients are broadcast,
    /// others logged. An answer Portcullis cannot read still goes to its
    /// caller, by the id it begins with, for the relay to refuse.
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
                let why = format!("Portcullis does not relay '{method}' requests from servers");
                let refusal = jsonrpc::error_response(Some(id), -32601, &why, None);
                let _ = self.send(refusal.into_bytes());
            }
            (Some(method), None) if SHARED_NOTIFICATIONS.contains(&method) => {
                // No receiver (no agent listening) is fine.
                let _ = self.notices.send(Arc::new(parsed));
            }
            (Some(method), None) => {
                tracing::debug!(server = %self.name, method, "notification from the server")
            }
            (None, None) => {
                tracing::warn!(server = %self.name, "dropped a message without id or method")
            }
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
        self.process
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
