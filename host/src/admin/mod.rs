//! The admin listener: where people decide held calls, apart from agent
//! traffic and with credentials of their own (`[approvers]`, an API key
//! each). It serves the approvals API, a live feed of it (SSE) and the page
//! built on both, from the same store the held calls wait on — inside
//! `portcullis serve`, or on its own as `portcullis admin` for stdio
//! deployments. Every decision is held to the rule stored with the approval.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/` | the approvals page |
//! | GET | `/api/me` | who the key belongs to |
//! | GET | `/api/approvals[?state=all]` | pending (or all) approvals |
//! | GET | `/api/approvals/ID` | one approval |
//! | POST | `/api/approvals/ID/approve`, `/deny` | decide, `{"comment": …}` |
//! | GET | `/api/events` | SSE: a snapshot each time anything changes |
//! | GET | `/metrics` | Prometheus metrics (no key: bind the listener privately) |

use crate::approval::store::{Ambiguous, Approval, Approvals, Refused, State, Verdict};
use crate::audit::{AccessRecord, Audit};
use crate::config::{ApproverEntry, Config, StoreLocation};
use crate::http::{self, Body};
use crate::identity;
use crate::relay::generation::Current;
use crate::runtime::status::{self, Status};
use crate::util::clock::now_ms;
use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// The page, self-contained.
const PAGE: &str = include_str!("../../assets/approvals.html");
/// How often the live feed looks for changes.
const FEED_POLL: Duration = Duration::from_millis(500);
/// How many ended approvals the feed shows.
const RECENT: usize = 25;
/// The largest decision body accepted.
const MAX_BODY: usize = 16 * 1024;

/// Where the admin listener reads the approvers and audits refusals.
pub enum Deployment {
    /// Inside `portcullis serve`: the generation in charge.
    Serving(Arc<Current>),
    /// `portcullis admin`: the config file, read again when it changes.
    File(ConfigFile),
}

/// A config file and what was built from it, rebuilt when it changes; a
/// change that does not load leaves the last good one in force.
pub struct ConfigFile {
    path: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Built)>,
}

/// A config and its audit sinks.
type Built = Arc<(Config, Audit)>;

impl ConfigFile {
    /// Loads the config at `path` and opens its audit sinks.
    pub fn open(path: &Path) -> Result<Self> {
        let config = Config::load(path)?;
        let audit = Audit::open(&config, None)?;
        Ok(Self {
            path: path.to_path_buf(),
            loaded: Mutex::new((modified(path), Arc::new((config, audit)))),
        })
    }

    fn get(&self) -> Built {
        let mut loaded = self.loaded.lock().expect("config lock poisoned");
        let now = modified(&self.path);
        if now != loaded.0 {
            loaded.0 = now;
            let reloaded =
                Config::load(&self.path).and_then(|c| Audit::open(&c, None).map(|a| (c, a)));
            match reloaded {
                Ok(fresh) => loaded.1 = Arc::new(fresh),
                Err(e) => tracing::error!("config change not applied: {e:#}"),
            }
        }
        loaded.1.clone()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Deployment {
    fn approvers(&self) -> BTreeMap<String, ApproverEntry> {
        match self {
            Deployment::Serving(current) => current.get().config.approvers.clone(),
            Deployment::File(file) => file.get().0.approvers.clone(),
        }
    }

    fn audit(&self, record: &AccessRecord) {
        let written = match self {
            Deployment::Serving(current) => current.get().audit.write(record),
            Deployment::File(file) => file.get().1.write(record),
        };
        if let Err(e) = written {
            tracing::error!("cannot audit an admin access: {e:#}");
        }
    }
}

/// The admin listener's state.
pub struct Admin {
    deployment: Deployment,
    store_location: StoreLocation,
    config_path: PathBuf,
    store: Mutex<Option<Arc<Approvals>>>,
    guard: http::Guard,
}

impl Admin {
    /// The admin side of the deployment whose config is `config`.
    pub fn new(config: &Config, deployment: Deployment) -> Self {
        Self {
            deployment,
            store_location: config.approvals_store(),
            config_path: config.path.clone(),
            store: Mutex::new(None),
            guard: http::Guard::of(&config.serve),
        }
    }

    /// Serves on `socket` until `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        socket: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let addr = socket.local_addr()?;
        tracing::info!(%addr, "portcullis admin (approvals) listening");
        let guard = self.guard;
        http::serve(socket, guard, shutdown, move |request, peer| {
            let admin = self.clone();
            async move { admin.respond(request, peer.addr).await }
        })
        .await
    }

    /// Answers one request from `peer`.
    pub async fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        if method == Method::GET && (path == "/" || path == "/index.html") {
            return page();
        }
        if method == Method::GET && path == "/healthz" {
            return http::plain(StatusCode::OK, "ok");
        }
        if method == Method::GET && path == "/metrics" {
            return self.metrics().await;
        }
        let Some(api) = path.strip_prefix("/api/") else {
            return http::plain(StatusCode::NOT_FOUND, "nothing here");
        };
        if !same_origin(request.headers()) {
            let origin = request.headers().get(header::ORIGIN).map(|o| o.as_bytes());
            let origin = String::from_utf8_lossy(origin.unwrap_or_default());
            let mut record = AccessRecord::new("admin-origin-refused", None, &path, peer);
            record.reason = Some(format!("Origin '{origin:.200}' is not the admin page's"));
            self.deployment.audit(&record);
            return http::plain(StatusCode::FORBIDDEN, "cross-origin requests are refused");
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(approver) = identity::approver(&self.deployment.approvers(), authorization) else {
            let mut record = AccessRecord::new("admin-credentials-refused", None, &path, peer);
            record.reason = Some("no approver's API key".into());
            self.deployment.audit(&record);
            let mut response = http::plain(
                StatusCode::UNAUTHORIZED,
                "an approver's API key is required (Authorization: Bearer)",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="portcullis-admin""#),
            );
            return response;
        };
        let route: Vec<&str> = api.split('/').collect();
        match (method, route.as_slice()) {
            (Method::GET, ["me"]) => json(StatusCode::OK, &json!({ "approver": approver })),
            (Method::GET, ["approvals"]) => {
                let all = request.uri().query() == Some("state=all");
                let listed = self
                    .blocking(move |store| store.list((!all).then_some(State::Pending), 200))
                    .await;
                match listed {
                    Ok(list) => json(
                        StatusCode::OK,
                        &Shown::all(list.unwrap_or_default(), &approver),
                    ),
                    Err(e) => failure(&e),
                }
            }
            (Method::GET, ["approvals", id]) => {
                let id = id.to_string();
                match self.blocking(move |store| store.find(&id)).await {
                    Ok(Some(Some(approval))) => {
                        json(StatusCode::OK, &Shown::new(approval, &approver))
                    }
                    Ok(_) => http::plain(StatusCode::NOT_FOUND, "no such approval"),
                    Err(e) if e.is::<Ambiguous>() => {
                        json(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() }))
                    }
                    Err(e) => failure(&e),
                }
            }
            (Method::POST, ["approvals", id, verb]) => {
                let verdict = match *verb {
                    "approve" => Verdict::Approve,
                    "deny" => Verdict::Deny,
                    _ => return http::plain(StatusCode::NOT_FOUND, "approve or deny"),
                };
                let id = id.to_string();
                let body =
                    http::read_body(request.into_body(), MAX_BODY, self.guard.body_timeout).await;
                let body = match body {
                    Ok(body) => body,
                    Err(http::BodyError::TooLarge) => {
                        return http::plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
                    }
                    Err(http::BodyError::TooSlow) => {
                        return http::plain(StatusCode::REQUEST_TIMEOUT, "body not sent in time");
                    }
                    Err(http::BodyError::Failed(_)) => {
                        return http::plain(StatusCode::BAD_REQUEST, "the body could not be read");
                    }
                };
                let comment = match comment(&body) {
                    Ok(comment) => comment,
                    Err(why) => return http::plain(StatusCode::BAD_REQUEST, why),
                };
                self.decide(id, verdict, approver, comment).await
            }
            (Method::GET, ["events"]) => self.events(approver),
            _ => http::plain(StatusCode::NOT_FOUND, "no such API"),
        }
    }

    /// This process' metrics, and the approvals pending in the store.
    async fn metrics(self: Arc<Self>) -> Response<Body> {
        let pending = self
            .blocking(|store| store.list(Some(State::Pending), usize::MAX >> 1))
            .await
            .map(|listed| listed.map_or(0, |l| l.len() as u64));
        let pending = match pending {
            Ok(pending) => Some(pending),
            Err(e) => {
                tracing::warn!("metrics: cannot count pending approvals: {e:#}");
                None
            }
        };
        exposition(pending)
    }

    /// Takes `approver`'s decision on `id`.
    async fn decide(
        self: Arc<Self>,
        id: String,
        verdict: Verdict,
        approver: String,
        comment: Option<String>,
    ) -> Response<Body> {
        let by = approver.clone();
        let unknown = Refused::Unknown(id.clone());
        let decided = self
            .blocking(move |store| Ok(store.decide(&id, verdict, &by, comment.as_deref())))
            .await
            .map(|decided| decided.unwrap_or(Err(unknown)));
        let (status, why) = match decided {
            Ok(Ok(approval)) => return json(StatusCode::OK, &Shown::new(approval, &approver)),
            Ok(Err(refused)) => {
                let status = match &refused {
                    Refused::Unknown(_) => StatusCode::NOT_FOUND,
                    Refused::Ambiguous(_) => StatusCode::BAD_REQUEST,
                    Refused::NotAllowed { .. } | Refused::NotAskable(_) => StatusCode::FORBIDDEN,
                    Refused::AlreadyApproved(_) | Refused::Ended(_) => StatusCode::CONFLICT,
                    Refused::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, refused.to_string())
            }
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        };
        json(status, &json!({ "error": why }))
    }

    /// The live feed: a snapshot now and whenever one differs from the last.
    fn events(self: Arc<Self>, approver: String) -> Response<Body> {
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let admin = self.clone();
                let who = approver.clone();
                let snapshot = tokio::task::spawn_blocking(move || {
                    admin.snapshot(&who).map(|s| s.to_string())
                })
                .await;
                match snapshot {
                    Ok(Ok(snapshot)) if snapshot != last => {
                        if sender.send(snapshot.clone()).await.is_err() {
                            return;
                        }
                        last = snapshot;
                    }
                    Ok(Err(e)) => tracing::warn!("approvals feed: {e:#}"),
                    _ => {}
                }
                tokio::select! {
                    () = tokio::time::sleep(FEED_POLL) => {}
                    () = sender.closed() => return,
                }
            }
        });
        http::event_stream("snapshot", receiver, None, http::Ending::Never)
    }

    /// Pending approvals, recent decisions and the policies serving, as
    /// `approver` sees them.
    fn snapshot(&self, approver: &str) -> Result<Value> {
        let (pending, recent) = match self.store()? {
            Some(store) => (
                store.list(Some(State::Pending), 200)?,
                store.recent(RECENT)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(json!({
            "approver": approver,
            "now_ms": now_ms(),
            "pending": Shown::all(pending, approver),
            "recent": recent,
            "processes": self.processes(),
        }))
    }

    /// The running Portcullis processes of this deployment's config.
    fn processes(&self) -> Vec<Status> {
        let ours = std::fs::canonicalize(&self.config_path).ok();
        status::read_all(&status::dir())
            .into_iter()
            .filter(|s| std::fs::canonicalize(&s.config).ok() == ours)
            .collect()
    }

    /// The store, once it exists (the first held call creates it).
    fn store(&self) -> Result<Option<Arc<Approvals>>> {
        let mut store = self.store.lock().expect("store lock poisoned");
        if store.is_none() && crate::approval::store::exists(&self.store_location) {
            *store = Some(Arc::new(Approvals::open(&self.store_location)?));
        }
        Ok(store.clone())
    }

    /// Runs `work` on the store off the async workers; `None` when there is
    /// no store yet.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Approvals) -> Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        let admin = self.clone();
        tokio::task::spawn_blocking(move || admin.store()?.map(|store| work(&store)).transpose())
            .await
            .context("the store task failed")?
    }
}

/// This process' metrics as a Prometheus scrape answer.
fn exposition(pending: Option<u64>) -> Response<Body> {
    let text = crate::util::metrics::global().render(pending);
    let mut response = Response::new(http::full(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves only `GET /metrics` on `addr`, from a thread of its own (a stdio
/// proxy's optional metrics listener).
pub fn serve_metrics(addr: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the metrics listener")?;
    let socket = runtime.block_on(http::bind(addr))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let guard = http::Guard::of(&crate::config::ServeConfig::default());
            let served = runtime.block_on(http::serve(
                socket,
                guard,
                std::future::pending(),
                |request, _| async move {
                    match (request.method(), request.uri().path()) {
                        (&Method::GET, "/metrics") => exposition(None),
                        _ => http::plain(StatusCode::NOT_FOUND, "only /metrics here"),
                    }
                },
            ));
            if let Err(e) = served {
                tracing::error!("metrics listener: {e:#}");
            }
        })
        .context("cannot start the metrics listener")?;
    tracing::info!(%addr, "metrics listening");
    Ok(())
}

/// An approval as the API shows it to one approver.
#[derive(Serialize)]
struct Shown {
    #[serde(flatten)]
    approval: Approval,
    /// Whether this approver may decide it now.
    may_decide: bool,
}

impl Shown {
    fn new(approval: Approval, approver: &str) -> Self {
        let allowed = approval
            .terms
            .approvers
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == approver));
        let voted = approval.votes.iter().any(|v| v.approver == approver);
        Self {
            may_decide: approval.state == State::Pending && allowed && !voted,
            approval,
        }
    }

    fn all(approvals: Vec<Approval>, approver: &str) -> Vec<Self> {
        approvals
            .into_iter()
            .map(|a| Self::new(a, approver))
            .collect()
    }
}

/// The optional comment of a decision's body (`{"comment": "…"}`).
fn comment(body: &Bytes) -> Result<Option<String>, &'static str> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| "the body is not JSON")?;
    match &value["comment"] {
        Value::Null => Ok(None),
        Value::String(text) if text.trim().is_empty() => Ok(None),
        Value::String(text) => Ok(Some(text.trim().to_string())),
        _ => Err("comment must be a string"),
    }
}

/// Whether a browser's request comes from the page itself: an `Origin`, if
/// any, must name the host the request was sent to.
fn same_origin(headers: &hyper::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    host.is_some() && origin_host == host
}

fn page() -> Response<Body> {
    let mut response = Response::new(http::full(Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    http::json_response(status, serde_json::to_string(value).unwrap_or_default())
}

fn failure(e: &anyhow::Error) -> Response<Body> {
    tracing::error!("admin API: {e:#}");
    json(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({ "error": format!("{e:#}") }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_body_carries_an_optional_comment() {
        assert_eq!(comment(&Bytes::new()), Ok(None));
        assert_eq!(comment(&Bytes::from_static(b"{}")), Ok(None));
        assert_eq!(
            comment(&Bytes::from_static(br#"{"comment":" looks right "}"#)),
            Ok(Some("looks right".into()))
        );
        assert!(comment(&Bytes::from_static(b"{\"comment\":3}")).is_err());
        assert!(comment(&Bytes::from_static(b"approve")).is_err());
    }

    #[test]
    fn only_the_page_itself_may_call_the_api_from_a_browser() {
        let mut headers = hyper::HeaderMap::new();
        assert!(same_origin(&headers), "not a browser");
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8809"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8809"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }
}
