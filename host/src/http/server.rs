//! Serving HTTP/1 without being knocked over: the async runtime (with its
//! blocking threads capped), the listening socket, and the accept loop every
//! listener runs — at most so many connections at once, headers and bodies
//! within their time, accepting on through errors such as running out of
//! file descriptors — and draining: once told to stop, it accepts nothing
//! more and lets the requests under way finish, for so long.

use super::response::Body;
use super::seats::{Seat, Seats};
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Threads for blocking work (judging with policies, writing the trail,
/// the approvals store) per core, at most: tokio keeps the threads it
/// started busy in turn, so a burst would otherwise leave its peak of
/// threads (and their memory) behind for good. Past it, work waits its
/// turn; the connection cap bounds how much can wait.
const BLOCKING_THREADS_PER_CORE: usize = 16;

/// The async runtime HTTP listeners run on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS_PER_CORE * cores)
        .build()
        .context("cannot start the async runtime")
}

/// Binds the listening socket.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// How a listener guards itself against clients that never finish.
#[derive(Debug, Clone, Copy)]
pub struct Guard {
    /// Connections served at once; more wait in the kernel's queue.
    pub max_connections: usize,
    /// Connections one peer address may hold before a request on them
    /// authenticates (0: no limit); more are closed as they come.
    pub max_connections_per_peer: usize,
    /// How long a client may take to send a request's headers (and how
    /// long a kept-alive connection may idle).
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// How long the requests under way may take to finish once the
    /// listener is told to stop.
    pub drain: Duration,
}

impl Guard {
    /// The guard `[serve]` configures.
    pub fn of(serve: &crate::config::ServeConfig) -> Self {
        Self {
            max_connections: serve.max_connections,
            max_connections_per_peer: serve.peer_share(),
            header_timeout: Duration::from_secs(serve.header_timeout_secs),
            body_timeout: Duration::from_secs(serve.body_timeout_secs),
            drain: Duration::from_secs(serve.drain_secs),
        }
    }
}

/// Told once this process starts draining: event streams that stand open
/// (a session's `GET` stream, `subscriptions/listen`) end then, so that
/// they do not hold the drain, and their clients reconnect elsewhere.
fn drain_signal() -> &'static tokio::sync::watch::Sender<bool> {
    static DRAINING: std::sync::OnceLock<tokio::sync::watch::Sender<bool>> =
        std::sync::OnceLock::new();
    DRAINING.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// Completes once this process starts draining.
pub async fn drained() {
    let mut draining = drain_signal().subscribe();
    let _ = draining.wait_for(|draining| *draining).await;
}

/// Where a request came from: the peer's address, and the seat its
/// connection holds ([`Seat::claim`] it for the agent a request
/// authenticates as).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Its connection's seat.
    pub seat: Arc<Seat>,
}

/// The first pause after a failed `accept`; it doubles up to
/// [`ACCEPT_BACKOFF_MAX`] while accepting keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Answers every HTTP/1 request on `socket` with `respond` until `shutdown`
/// completes, as `guard` says; then drains: the socket closes (a balancer
/// sends new connections elsewhere), each connection closes after the
/// request it is serving, and those still serving after `guard.drain` are
/// cut. A failed `accept` (say, no file descriptor left) is logged and
/// counted, and accepting goes on after a pause.
pub async fn serve<R, F>(
    socket: tokio::net::TcpListener,
    guard: Guard,
    shutdown: impl Future<Output = ()>,
    respond: R,
) -> Result<()>
where
    R: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    accept(socket, guard, shutdown, respond, &connections).await?;
    drain_signal().send_replace(true);
    if tokio::time::timeout(guard.drain, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still under way after {:?} of draining are cut",
            guard.drain
        );
    }
    Ok(())
}

/// Accepts connections on `socket` until `shutdown`, each watched by
/// `connections`.
async fn accept<R, F>(
    socket: tokio::net::TcpListener,
    guard: Guard,
    shutdown: impl Future<Output = ()>,
    respond: R,
    connections: &hyper_util::server::graceful::GracefulShutdown,
) -> Result<()>
where
    R: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(guard.max_connections));
    let seats = Seats::new(guard.max_connections_per_peer);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // A free slot first: past the cap, connections wait in the kernel's
        // queue and cost this process nothing.
        if slots.available_permits() == 0 {
            crate::util::metrics::global().listener("at-capacity");
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.context("the connection slots closed")?,
            () = &mut shutdown => return Ok(()),
        };
        let (stream, peer) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    crate::util::metrics::global().listener("accept-error");
                    tracing::warn!("cannot accept a connection: {e}; retrying in {backoff:?}");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => return Ok(()),
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        backoff = ACCEPT_BACKOFF_MIN;
        // One address may not hold every slot with connections that never
        // authenticate: past its share, they are closed as they come.
        let seat = match seats.take(peer.ip()) {
            Ok(seat) => Arc::new(seat),
            Err(over) => {
                crate::util::metrics::global().listener("over-share");
                tracing::debug!(%peer, "connection closed: {over}");
                continue;
            }
        };
        let respond = respond.clone();
        let service = hyper::service::service_fn(move |request| {
            let peer = Peer {
                addr: peer,
                seat: seat.clone(),
            };
            let answer = respond(request, peer);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let io = hyper_util::rt::TokioIo::new(stream);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(guard.header_timeout)
            .serve_connection(io, service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            let served = connection.await;
            if let Err(e) = served {
                if e.is_timeout() {
                    crate::util::metrics::global().listener("slow-client");
                }
                tracing::debug!(%peer, "connection closed: {e}");
            }
        });
    }
}

/// Why a request body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than the limit.
    TooLarge,
    /// Not sent in time.
    TooSlow,
    /// The connection failed.
    Failed(String),
}

/// A request's whole body, at most `max` bytes, sent within `timeout`.
/// A body that came whole with its headers (most do) is taken at once;
/// only one still arriving is timed, sparing a timer per request.
pub async fn read_body(body: Incoming, max: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    let mut collecting = std::pin::pin!(Limited::new(body, max).collect());
    let first = {
        let mut at_once = std::task::Context::from_waker(std::task::Waker::noop());
        collecting.as_mut().poll(&mut at_once)
    };
    let collected = match first {
        Poll::Ready(collected) => collected,
        Poll::Pending => match tokio::time::timeout(timeout, collecting).await {
            Ok(collected) => collected,
            Err(_) => {
                crate::util::metrics::global().listener("slow-client");
                return Err(BodyError::TooSlow);
            }
        },
    };
    match collected {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Failed(e.to_string())),
    }
}
