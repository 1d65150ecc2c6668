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

use crate::contract::Direction;
use crate::gateway::judging::{Pass, judge};
use crate::gateway::sessions::{Asked, ClientSession};
use crate::protocol::jsonrpc::{self, INTERNAL_ERROR};
use crate::protocol::parsed::Parsed;
use crate::relay::Asking;
use serde_json::value::RawValue;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where messages for one client go: a call's event stream, or the
/// session's own (GET).
pub type Outlet = mpsc::Sender<String>;

/// JSON-RPC: the method does not exist (for this client).
const METHOD_NOT_FOUND: i32 = -32601;
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
/// `session`'s client through `outlet`. A request the server waits on for
/// `wait` at most.
pub async fn deliver(
    session: &ClientSession,
    server: &str,
    message: Parsed,
    outlet: &Outlet,
    wait: Duration,
) {
    let Some(relay) = session.relays.get(server).cloned() else {
        return;
    };
    let (method, id) = {
        let view = message.message();
        (
            view.method.as_deref().unwrap_or_default().to_string(),
            view.id.map(ToOwned::to_owned),
        )
    };
    let Some(upstream_id) = id else {
        let message = match method.as_str() {
            CANCELLED => match for_client_cancellation(session, server, &message) {
                Some(translated) => translated,
                None => return,
            },
            _ => message,
        };
        let judged = judge(
            relay,
            Direction::ServerToClient,
            message,
            Asking::Connection,
            None,
        );
        let text = match judged.await.forward {
            Some(Pass::AsItCame(notice)) => notice.into_text(),
            Some(Pass::Changed(text)) => text,
            None => return,
        };
        // A client that is gone, or slow to read, misses notifications.
        let _ = outlet.try_send(text);
        return;
    };
    if let Some(capability) = capability_for(&method)
        && session.capabilities.get(capability).is_none()
    {
        let why = format!("the agent's client did not declare the '{capability}' capability");
        refuse(session, server, &upstream_id, &method, &why).await;
        return;
    }
    let pair = next_pair();
    let s2c = Direction::ServerToClient;
    let judged = judge(relay.clone(), s2c, message, Asking::Connection, Some(pair)).await;
    if let Some(reply) = judged.reply {
        // Refused: the server learns why, under its own id.
        send(session, server, &reply).await;
        return;
    }
    let request = match judged.forward {
        Some(Pass::AsItCame(request)) => request,
        Some(Pass::Changed(text)) => match Parsed::parse(text) {
            Ok(request) => request,
            Err(e) => {
                relay.unanswered(s2c, pair);
                let why = format!("the request as changed cannot be read: {e}");
                refuse(session, server, &upstream_id, &method, &why).await;
                return;
            }
        },
        None => return,
    };
    let asked = Asked {
        server: server.to_string(),
        upstream_id: upstream_id.clone(),
        pair,
        until: Instant::now() + wait,
    };
    let client_id = lock_questions(session).ask(asked);
    let Some(client_id) = client_id else {
        relay.unanswered(s2c, pair);
        let why = "the agent has too many of the server's requests unanswered";
        refuse(session, server, &upstream_id, &method, why).await;
        return;
    };
    let as_client_sees = RawValue::from_string(client_id.to_string()).expect("a number");
    let text = request.with_id(&as_client_sees);
    if outlet.send(text).await.is_err() {
        lock_questions(session).answered(&as_client_sees);
        relay.unanswered(s2c, pair);
        let why = "the agent's connection closed";
        refuse(session, server, &upstream_id, &method, why).await;
    }
}

/// The client's answer to a server's request: judged, and sent to that
/// server under the id it asked with. An answer to no request in flight is
/// dropped, audited.
pub async fn answered(session: &ClientSession, answer: Parsed) {
    let asked = answer
        .message()
        .id
        .and_then(|id| lock_questions(session).answered(id));
    let Some(asked) = asked else {
        // Judged without a pair, it is refused as answering nothing.
        if let Some(relay) = session.relays.values().next().cloned() {
            let c2s = Direction::ClientToServer;
            judge(relay, c2s, answer, Asking::Connection, None).await;
        }
        return;
    };
    let Some(relay) = session.relays.get(&asked.server).cloned() else {
        return;
    };
    let c2s = Direction::ClientToServer;
    let judged = judge(relay, c2s, answer, Asking::Connection, Some(asked.pair)).await;
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
/// it; `None` if the client was never asked it.
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
    let text = crate::protocol::parsed::splice(
        notice.text(),
        params.request.get(),
        &client_id.to_string(),
    );
    Parsed::parse(text).ok()
}

/// Tells `server` its request `id` (of `method`) will not be answered, and
/// why.
async fn refuse(session: &ClientSession, server: &str, id: &RawValue, method: &str, why: &str) {
    tracing::info!(server, method, "a server's request was not relayed: {why}");
    let refusal = jsonrpc::error_response(
        Some(id),
        METHOD_NOT_FOUND,
        &format!("Portcullis: '{method}' cannot be relayed: {why}"),
        None,
    );
    send(session, server, &refusal).await;
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
