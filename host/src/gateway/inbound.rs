//! What servers send a client session on their own — their requests
//! (sampling, elicitation, roots), progress, logging, resource updates — and
//! the client's answers to those requests. Each message is judged by the
//! session's relay for its server and audited, in both directions. A
//! server's request reaches the client under an id of Portcullis' own (the
//! servers of one session share the client's id space), and the client's
//! answer goes back under the id the server asked with. A request the client
//! cannot answer — it did not declare the capability, its stream is gone,
//! it has too many unanswered — gets a clear JSON-RPC error at once, never a
//! hang.

use crate::audit::AccessRecord;
use crate::contract::Direction;
use crate::gateway::judging::{Pass, judge};
use crate::gateway::sessions::{Asked, ClientSession};
use crate::identity::Identity;
use crate::protocol::jsonrpc::{self, INTERNAL_ERROR};
use crate::protocol::parsed::Parsed;
use crate::relay::{Arrival, Asking, Relay};
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where messages for one client go: a call's event stream, or the
/// session's own (GET).
pub type Outlet = mpsc::Sender<String>;

/// A server's cancellation of one of its requests.
const CANCELLED: &str = "notifications/cancelled";

/// Names each request/answer pair the gateway relays, in either direction.
static PAIRS: AtomicU64 = AtomicU64::new(1);

/// A new pair's name.
pub fn next_pair() -> u64 {
    PAIRS.fetch_add(1, Ordering::Relaxed)
}

/// The capability a client declares to be sent a server request of
/// `method`.
pub fn capability_for(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// Delivers `message`, which `server` sent of its own accord, to
/// `session`'s client through `outlet`; without one, a request is refused
/// and a notification dropped. A request the server waits on for `wait` at
/// most.
pub async fn deliver(
    session: &ClientSession,
    server: &str,
    message: Parsed,
    outlet: Option<&Outlet>,
    wait: Duration,
) {
    let Some(relay) = session.relays.get(server).cloned() else {
        return;
    };
    let (method, id) = {
        let view = message.message();
        let method = view.method.as_deref().unwrap_or_default().to_string();
        (method, view.id.map(ToOwned::to_owned))
    };
    // Only where the session's caller may still go: a grant taken away
    // takes the server's messages away too.
    let granted = session.grants(server, &relay.current());
    let Some(upstream_id) = id else {
        if !granted {
            return;
        }
        let Some(outlet) = outlet else {
            return;
        };
        let message = match method.as_str() {
            CANCELLED => match for_client_cancellation(session, server, &message) {
                Some(translated) => translated,
                None => return,
            },
            _ => message,
        };
        let s2c = Direction::ServerToClient;
        let judged = judge(relay, s2c, message, Arrival::default()).await;
        let text = match judged.forward {
            Some(Pass::AsItCame(notice)) => notice.into_text(),
            Some(Pass::Changed(text)) => text,
            None => return,
        };
        // A client that is gone, or slow to read, misses notifications.
        let _ = outlet.try_send(text);
        return;
    };
    let refusing = Refusing {
        session,
        server,
        id: &upstream_id,
        method: &method,
    };
    if !granted {
        return refusing
            .refuse("the agent may no longer use this server")
            .await;
    }
    let Some(outlet) = outlet else {
        let why =
            "the agent's connection cannot carry it (its client does not accept an event stream)";
        return refusing.refuse(why).await;
    };
    if let Some(capability) = capability_for(&method)
        && session.capabilities.get(capability).is_none()
    {
        let why = format!("the agent's client did not declare the '{capability}' capability");
        return refusing.refuse(&why).await;
    }
    let pair = next_pair();
    let s2c = Direction::ServerToClient;
    let judged = judge(relay.clone(), s2c, message, Arrival::paired(Some(pair))).await;
    if let Some(reply) = judged.reply {
        // Refused, and audited as such: the server learns why, under its own id.
        send(session, server, &reply).await;
        return;
    }
    let request = match judged.forward.map(|pass| match pass {
        Pass::AsItCame(request) => Ok(request),
        Pass::Changed(text) => Parsed::parse(text),
    }) {
        Some(Ok(request)) => request,
        Some(Err(e)) => {
            relay.unanswered(s2c, pair);
            let why = format!("the request as changed cannot be read: {e}");
            return refusing.refuse(&why).await;
        }
        None => {
            relay.unanswered(s2c, pair);
            return refusing.refuse("the relay did not pass it on").await;
        }
    };
    let asked = Asked {
        server: server.to_string(),
        upstream_id: upstream_id.clone(),
        pair,
        until: Instant::now() + wait,
    };
    let (client_id, expired) = lock_questions(session).ask(asked);
    for expired in expired {
        forget(session, &expired, "the agent did not answer in time").await;
    }
    let Some(client_id) = client_id else {
        relay.unanswered(s2c, pair);
        let why = "the agent has too many of the server's requests unanswered";
        return refusing.refuse(why).await;
    };
    let as_client_sees = RawValue::from_string(client_id.to_string()).expect("a number");
    // Should this be dropped before the client has it (its call ends), the
    // server is not left waiting.
    let undelivered = Undelivered::new(session, client_id, &relay);
    let text = request.with_id(&as_client_sees);
    if outlet.send(text).await.is_ok() {
        undelivered.disarm();
    }
}

/// A server's request kept for the client's answer, not yet handed to the
/// client: if dropped so, it is forgotten and the server told.
struct Undelivered<'a> {
    session: &'a ClientSession,
    client_id: u64,
    relay: Arc<Relay>,
    armed: bool,
}

impl<'a> Undelivered<'a> {
    fn new(session: &'a ClientSession, client_id: u64, relay: &Arc<Relay>) -> Self {
        Self {
            session,
            client_id,
            relay: relay.clone(),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Undelivered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let id = RawValue::from_string(self.client_id.to_string()).expect("a number");
        let Some(asked) = lock_questions(self.session).answered(&id) else {
            return;
        };
        self.relay.unanswered(Direction::ServerToClient, asked.pair);
        let Some(upstream) = self.session.upstreams.get(&asked.server).cloned() else {
            return;
        };
        let refusal = error(
            &asked.upstream_id,
            "the agent's connection closed before it was asked",
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = upstream.send(&refusal).await;
            });
        }
    }
}

/// A server's request that will not be answered: it no longer counts as in
/// flight, and the server is told `why`.
async fn forget(session: &ClientSession, asked: &Asked, why: &str) {
    if let Some(relay) = session.relays.get(&asked.server) {
        relay.unanswered(Direction::ServerToClient, asked.pair);
    }
    send(session, &asked.server, &error(&asked.upstream_id, why)).await;
}

/// A server's request being refused.
struct Refusing<'a> {
    session: &'a ClientSession,
    server: &'a str,
    id: &'a RawValue,
    method: &'a str,
}

impl Refusing<'_> {
    /// Tells the server its request will not be answered, and why, and
    /// records it.
    async fn refuse(self, why: &str) {
        let Refusing {
            session,
            server,
            id,
            method,
        } = self;
        tracing::info!(server, method, "a server's request was not relayed: {why}");
        let refusal = jsonrpc::error_response(
            Some(id),
            jsonrpc::METHOD_NOT_FOUND,
            &format!("Portcullis: '{method}' cannot be relayed: {why}"),
            None,
        );
        send(session, server, &refusal).await;
        let mut record = AccessRecord::new(
            "server-request-refused",
            Some(&session.identity.agent),
            &format!("/servers/{server}/mcp"),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        );
        record.reason = Some(format!("{method}: {why}"));
        write_access(session, server, record).await;
    }
}

/// Writes `record` with the generation `server`'s relay judges by, off the
/// async workers.
async fn write_access(session: &ClientSession, server: &str, record: AccessRecord) {
    let Some(relay) = session.relays.get(server).cloned() else {
        return;
    };
    let written = tokio::task::spawn_blocking(move || relay.current().audit.write(&record)).await;
    if let Ok(Err(e)) = written {
        tracing::error!("cannot audit a refused server request: {e:#}");
    }
}

/// The client's answer to a server's request, sent by `caller`: judged, and
/// sent to that server under the id it asked with. An answer to no request
/// in flight is dropped, audited.
pub async fn answered(session: &ClientSession, answer: Parsed, caller: &Identity) {
    let asked = answer
        .message()
        .id
        .and_then(|id| lock_questions(session).answered(id));
    let Some(asked) = asked else {
        // Answering nothing Portcullis asked: dropped, and on the trail.
        let Some(server) = session.relays.keys().next() else {
            return;
        };
        let mut record = AccessRecord::new(
            "message-refused",
            Some(&session.identity.agent),
            &session.scope.endpoint(),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        );
        record.reason = Some("an answer to no server request awaiting one".into());
        record.code = Some(jsonrpc::INVALID_REQUEST);
        record.message_sha256 = Some(crate::audit::bytes_digest(answer.text().as_bytes()));
        write_access(session, server, record).await;
        return;
    };
    let Some(relay) = session.relays.get(&asked.server).cloned() else {
        return;
    };
    let c2s = Direction::ClientToServer;
    let arrival = Arrival {
        caller: Some(caller.clone()),
        asking: Asking::Connection,
        pair: Some(asked.pair),
    };
    let judged = judge(relay, c2s, answer, arrival).await;
    let text = match judged.forward {
        Some(Pass::AsItCame(answer)) => answer.with_id(&asked.upstream_id),
        Some(Pass::Changed(text)) => match Parsed::parse(text) {
            Ok(answer) => answer.with_id(&asked.upstream_id),
            Err(e) => error(&asked.upstream_id, &format!("the answer as changed: {e}")),
        },
        None => error(&asked.upstream_id, "the client's answer was refused"),
    };
    send(session, &asked.server, &text).await;
}

/// A server's cancellation of its request, naming it as the client knows
/// it (the request no longer awaits the client's answer); `None` if the
/// client was never asked it.
fn for_client_cancellation(
    session: &ClientSession,
    server: &str,
    notice: &Parsed,
) -> Option<Parsed> {
    #[derive(serde::Deserialize)]
    struct Params<'a> {
        #[serde(borrow, rename = "requestId")]
        request: &'a RawValue,
    }
    let params: Params = jsonrpc::from_object(notice.message().params?)?;
    let client_id = lock_questions(session).client_id(server, params.request)?;
    let forgotten = RawValue::from_string(client_id.to_string()).expect("a number");
    if let Some(asked) = lock_questions(session).answered(&forgotten)
        && let Some(relay) = session.relays.get(server)
    {
        relay.unanswered(Direction::ServerToClient, asked.pair);
    }
    let text = crate::protocol::parsed::splice(
        notice.text(),
        params.request.get(),
        &client_id.to_string(),
    );
    Parsed::parse(text).ok()
}

fn error(id: &RawValue, why: &str) -> String {
    jsonrpc::error_response(
        Some(id),
        INTERNAL_ERROR,
        &format!("Portcullis: {why}"),
        None,
    )
}

async fn send(session: &ClientSession, server: &str, text: &str) {
    let Some(upstream) = session.upstreams.get(server) else {
        return;
    };
    if let Err(e) = upstream.send(text).await {
        tracing::warn!(server, "a message to the server was not delivered: {e:#}");
    }
}

fn lock_questions(
    session: &ClientSession,
) -> std::sync::MutexGuard<'_, crate::gateway::sessions::Questions> {
    session
        .questions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}
