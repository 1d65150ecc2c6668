//! The transport-independent heart of the proxy. For each frame from either
//! side it classifies the message, runs the boundary's own checks and the
//! guard chain, writes the audit record, and says what to send where; a
//! request the chain holds for approval is recorded in the approvals store
//! and handed to the transport to wait on, then settled here. Transports
//! only move bytes and wait; every decision is made here, so all transports
//! decide alike.

pub mod boundary;
pub mod generation;
mod held;
mod quarantine;
mod record;
pub mod session;
#[cfg(test)]
mod tests;

use crate::approval::elicit;
use crate::approval::hold;
use crate::approval::receipt;
use crate::approval::store::{self, Approval, State, TooManyPending};
use crate::approval::waiting::Then;
use crate::audit::{ApprovalRecord, AuditRecord, canonical_digest, value_digest};
use crate::contract::{Direction, Exchange, MessageKind};
use crate::identity::Identity;
use crate::policy::chain::{Decided, Decision, Refusal};
use crate::protocol::framing::Frame;
use crate::protocol::jsonrpc::{
    self, AUDIT_FAILED, DENIED, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, Message,
    PARSE_ERROR, Unreadable, error_response,
};
use crate::relay::generation::{Current, Generation};
use crate::relay::session::Session;
use crate::surface::drift::ToolDrift;
use crate::util::metrics;
use boundary::{Listing, Stop};
use record::{Unjudged, refuse, refused};
use serde_json::json;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What to send after judging one frame. Frames carry no newline.
#[derive(Debug, Default)]
pub struct Delivery {
    /// A frame to pass on to the other side.
    pub forward: Option<Vec<u8>>,
    /// A frame to send back to the sender.
    pub reply: Option<Vec<u8>>,
    /// Requests held for approval: [`Relay::on_decision`] each, off the
    /// transport's reading path.
    pub held: Vec<Held>,
}

/// What asking for approval came to.
enum Asked {
    /// The call is held; its approval (expiring at `expires_ms`) is bound
    /// to these arguments (sha256), and the client's user is asked
    /// `question` (an elicitation request).
    Held {
        digest: String,
        expires_ms: u64,
        question: Option<String>,
    },
    /// The client is to ask its user and send the request again: approval
    /// id, and the `input_required` answer.
    InputRequired(String, String),
    /// An approval lets it run: its id, and the tag saying which (reused, or
    /// just given through the client).
    Approved(String, &'static str),
    /// Its approval ended without approving it: the id, and why.
    Refused(String, String),
    /// The receipt (`requestState`) it came back with is not honoured: why.
    BadReceipt(String),
}

/// A message as its transport read it.
pub enum Read<'m> {
    /// Its view.
    View(&'m Message<'m>),
    /// Why it cannot be read, and the id its refusal carries (else the id
    /// the text begins with).
    Unreadable(&'m Unreadable, Option<&'m RawValue>),
}

/// How the client of a request can be asked about it, should it be held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Asking {
    /// As the connection allows: an `elicitation/create` request, to a
    /// client that declared the capability at `initialize`; else the call
    /// waits for an approver.
    #[default]
    Connection,
    /// By answering `input_required` (2026-07-28): the client asks its user
    /// and sends the request again with the answer.
    InputRequired,
}

/// How a message arrived, besides its text (serve): who sent it, how its
/// client can be asked about a held call, and the request/answer pair its
/// transport matched it to.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    /// Who sent a client's message, as that message's own credentials
    /// show under the config in force: policies and the trail see this
    /// agent, and the message may reach only a server it grants. `None`:
    /// the connection's agent (stdio), or a server's message.
    pub caller: Option<Identity>,
    /// How its client can be asked, should it be held.
    pub asking: Asking,
    /// The pair it belongs to: an answer is judged as the answer to that
    /// request whatever its JSON-RPC id, so clients sharing a session may
    /// reuse ids.
    pub pair: Option<u64>,
}

impl Arrival {
    /// A server's message, or one of a pair `pair`.
    pub fn paired(pair: Option<u64>) -> Self {
        Self {
            pair,
            ..Self::default()
        }
    }
}

/// A client's request held for a person's approval.
pub struct Held {
    /// The approval it waits on.
    pub approval: String,
    /// The key it is held under (its JSON-RPC id, canonical, or the pair
    /// its transport named).
    pub key: String,
    /// Its JSON-RPC id, as sent.
    id: Option<Box<RawValue>>,
    /// The request as it will be relayed if approved.
    text: String,
    /// sha256 of the canonical arguments the approval is bound to.
    arguments_sha256: String,
    /// When its approval expires, in ms since the epoch.
    expires_ms: u64,
    exchange: Exchange,
    /// Who sent it, when a transport authorizes each request (serve): it
    /// is relayed once approved only if that caller may still use its
    /// server then.
    caller: Option<Identity>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} for request {})", self.approval, self.key)
    }
}

/// What to do with one message (a batch has several): the outcome of
/// judging it.
#[derive(Debug, Default)]
pub struct Step<'a> {
    /// The message to pass on: as it came (borrowed), or as the chain
    /// changed it.
    pub forward: Option<Cow<'a, str>>,
    /// An answer to send back to the sender.
    pub reply: Option<String>,
    /// The request, held for approval: [`Relay::on_decision`] it.
    pub held: Option<Held>,
}

impl<'a> Step<'a> {
    fn forward(text: Cow<'a, str>) -> Self {
        Self {
            forward: Some(text),
            ..Self::default()
        }
    }

    fn reply(text: String) -> Self {
        Self {
            reply: Some(text),
            ..Self::default()
        }
    }

    fn unchanged(&self) -> bool {
        self.reply.is_none()
            && self.held.is_none()
            && matches!(self.forward, Some(Cow::Borrowed(_)))
    }
}

/// What the relay keeps of a held request.
struct HeldEntry {
    /// Its approval.
    approval: String,
    /// Its JSON-RPC id, as text.
    jsonrpc_id: Option<String>,
}

/// The decision path shared by every transport.
pub struct Relay {
    current: Arc<Current>,
    session: Mutex<Session>,
    /// Requests held for approval, by their in-flight key: their
    /// approvals and JSON-RPC ids.
    held: Mutex<HashMap<String, HeldEntry>>,
    /// Whether the client said it can ask its user (elicitation).
    elicits: AtomicBool,
    /// Whether the server's tools are due to be listed by Portcullis, by
    /// the direction of the message that made them due (the client has
    /// finished initializing, or the server said its tools changed): that
    /// direction's stdio thread lists them, after relaying the message.
    survey_due: [AtomicBool; 2],
    /// Portcullis' own questions to the client's user, by JSON-RPC id text:
    /// the approvals they decide.
    eliciting: Mutex<HashMap<String, String>>,
}

impl Relay {
    /// A relay for one connection, judging with the generation in charge.
    pub fn new(current: Arc<Current>, session: Session) -> Self {
        Self {
            current,
            session: Mutex::new(session),
            held: Mutex::new(HashMap::new()),
            elicits: AtomicBool::new(false),
            survey_due: Default::default(),
            eliciting: Mutex::new(HashMap::new()),
        }
    }

    /// The generation judging messages now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }

    /// Judges one frame travelling `direction` (stdio), with the current
    /// generation from start to end. Should judging fail inside Portcullis
    /// (a bug, never an input's due), the message is refused, audited and
    /// logged as an error, and the connection goes on.
    pub fn handle(&self, direction: Direction, frame: Frame) -> Delivery {
        let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.judge(direction, frame)
        }));
        judged.unwrap_or_else(|panic| into_delivery(self.failed(direction, &*panic, None)))
    }

    /// Judges one message its transport has read already (serve): `read`
    /// is the view of `text`, or why it cannot be read, and `arrival` how
    /// it came (a message of a request/answer pair its transport matches
    /// itself, one HTTP exchange, names the pair). Failures inside
    /// Portcullis are refused as [`Relay::handle`] refuses them.
    pub fn judge_read<'a>(
        &self,
        direction: Direction,
        text: &'a str,
        read: Read<'_>,
        arrival: &Arrival,
    ) -> Step<'a> {
        let pair = arrival.pair;
        let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let g = self.current();
            match read {
                Read::View(message) => self.judged(&g, direction, text, message, arrival),
                Read::Unreadable(why, id) => {
                    let id = id.map(ToOwned::to_owned);
                    self.unreadable(&g, direction, text, why, id, pair)
                }
            }
        }));
        judged.unwrap_or_else(|panic| self.failed(direction, &*panic, pair))
    }

    /// A message whose judging panicked inside Portcullis: refused, never
    /// relayed.
    fn failed(
        &self,
        direction: Direction,
        panic: &(dyn std::any::Any + Send),
        pair: Option<u64>,
    ) -> Step<'static> {
        let why = panic_message(panic);
        tracing::error!(
            direction = direction.as_str(),
            "judging a message failed inside Portcullis: {why}; the message was refused"
        );
        let g = self.current();
        let record = format!("Portcullis failed while judging this message: {why}");
        let unjudged = Unjudged::new(INTERNAL_ERROR, record).key(paired(pair));
        let mut step = self.reject(&g, direction, unjudged);
        // The sender learns that it failed, not how (that is in the trail);
        // whoever waits for an answer learns that it will not come.
        let why = "Portcullis failed while judging this message, so it was not relayed";
        let error = error_response(None, INTERNAL_ERROR, why, None);
        match direction {
            Direction::ClientToServer => step.reply = Some(error),
            Direction::ServerToClient => step.forward = Some(Cow::Owned(error)),
        }
        step
    }

    fn judge(&self, direction: Direction, frame: Frame) -> Delivery {
        let generation = self.current();
        let g = &*generation;
        let bytes = match frame {
            Frame::Line(bytes) => bytes,
            Frame::Oversized {
                len,
                prefix,
                suffix,
            } => return self.oversized(g, direction, len, (&prefix, &suffix)),
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            let why = "Parse error: message is not UTF-8";
            let unjudged = Unjudged::new(PARSE_ERROR, why.into()).text(&bytes);
            return into_delivery(self.reject(g, direction, unjudged));
        };
        if jsonrpc::is_batch(text) {
            return self.batch(g, direction, text);
        }
        let step = self.message(g, direction, text);
        if step.unchanged() {
            return Delivery {
                forward: Some(bytes),
                ..Delivery::default()
            };
        }
        into_delivery(step)
    }

    /// A JSON-RPC batch: each member is judged alone; if none changed, the
    /// batch is relayed verbatim.
    fn batch(&self, g: &Generation, direction: Direction, text: &str) -> Delivery {
        let members: Vec<&RawValue> = match serde_json::from_str(text) {
            Ok(members) => members,
            Err(e) => {
                let unjudged = Unjudged::new(PARSE_ERROR, format!("Parse error: {e}"));
                return into_delivery(self.reject(g, direction, unjudged.text(text.as_bytes())));
            }
        };
        if members.is_empty() {
            let unjudged = Unjudged::new(INVALID_REQUEST, "Invalid Request: empty batch".into());
            return into_delivery(self.reject(g, direction, unjudged));
        }
        let steps: Vec<Step> = members
            .iter()
            .map(|m| self.message(g, direction, m.get()))
            .collect();
        if steps.iter().all(Step::unchanged) {
            return Delivery {
                forward: Some(text.as_bytes().to_vec()),
                ..Delivery::default()
            };
        }
        let join = |parts: Vec<String>| {
            (!parts.is_empty()).then(|| format!("[{}]", parts.join(",")).into_bytes())
        };
        let (mut forward, mut reply, mut held) = (Vec::new(), Vec::new(), Vec::new());
        for step in steps {
            forward.extend(step.forward.map(Cow::into_owned));
            reply.extend(step.reply);
            held.extend(step.held);
        }
        Delivery {
            forward: join(forward),
            reply: join(reply),
            held,
        }
    }

    /// Reads one message (a line, or a member of a batch) and judges it.
    fn message<'a>(&self, g: &Generation, direction: Direction, text: &'a str) -> Step<'a> {
        match Message::parse(text) {
            Ok(message) => self.judged(g, direction, text, &message, &Arrival::default()),
            Err(why) => self.unreadable(g, direction, text, &why, None, None),
        }
    }

    /// A message that cannot be read (`why`): refused, under `id` or else
    /// the id it begins with.
    fn unreadable<'a>(
        &self,
        g: &Generation,
        direction: Direction,
        text: &str,
        why: &Unreadable,
        id: Option<Box<RawValue>>,
        pair: Option<u64>,
    ) -> Step<'a> {
        let id = id.or_else(|| jsonrpc::leading_id(text.as_bytes()));
        let key = paired(pair).or_else(|| id.as_deref().map(jsonrpc::id_key));
        let unjudged = Unjudged::new(why.code, why.message.clone())
            .id(id.as_deref())
            .text(text.as_bytes())
            .key(key);
        self.reject(g, direction, unjudged)
    }

    /// Judges one message, `message` being the view of `text`, and applies
    /// the decision.
    fn judged<'a>(
        &self,
        g: &Generation,
        direction: Direction,
        text: &'a str,
        message: &Message<'_>,
        arrival: &Arrival,
    ) -> Step<'a> {
        let (asking, caller) = (arrival.asking, arrival.caller.as_ref());
        let key = paired(arrival.pair).or_else(|| message.id.map(jsonrpc::id_key));
        let Some(kind) = message.kind() else {
            let why = "Invalid Request: not a JSON-RPC 2.0 request, notification or response";
            let unjudged = Unjudged::new(INVALID_REQUEST, why.into())
                .id(message.id)
                .text(text.as_bytes())
                .key(key);
            return self.reject(g, direction, unjudged);
        };
        if self.answered_by_user(direction, kind, message) {
            return Step::default();
        }
        if let Some(why) = self.out_of_turn(direction, kind, message, key.as_deref()) {
            let unjudged = Unjudged::new(INVALID_REQUEST, why)
                .id(message.id)
                .method(message.method.as_deref())
                .text(text.as_bytes())
                .key(key);
            let mut refused = self.reject(g, direction, unjudged);
            if kind != MessageKind::Request {
                // An answer is never answered: a stray one is dropped.
                refused.reply = None;
            }
            return refused;
        }
        // A tool call's params are read once: the name for the exchange, the
        // arguments for the boundary's checks and the audit record. A call
        // whose tool cannot be told is refused: judged as a call of no tool,
        // it would slip past every tool-scoped rule.
        let call = match message.tool_call() {
            Some(Err(why)) => {
                let unjudged = Unjudged::new(INVALID_PARAMS, why)
                    .id(message.id)
                    .method(message.method.as_deref())
                    .text(text.as_bytes());
                return self.reject(g, direction, unjudged);
            }
            Some(Ok(call)) => Some(call),
            None => None,
        };
        let tool = call.as_ref().map(|call| call.name.clone());
        let call_arguments = call.as_ref().and_then(|call| call.arguments);
        let arguments = if call.is_some() {
            call_arguments
        } else {
            message.params
        };
        let (mut exchange, drift) =
            self.exchange(g, direction, kind, (message, key.as_deref()), tool, caller);
        let crossing = self.cross(
            g,
            (direction, kind),
            &exchange,
            call_arguments,
            &drift,
            caller,
        );
        if direction == Direction::ClientToServer {
            match exchange.method.as_str() {
                "notifications/cancelled" => self.cancelled_by_client(exchange.params.as_deref()),
                "initialize" if kind == MessageKind::Request => {
                    let elicits = message.params_value()["capabilities"]["elicitation"].is_object();
                    self.elicits.store(elicits, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let mut decision = match &crossing {
            Err(stop) => Decision {
                outcome: Decided::Deny(Refusal {
                    code: stop.code,
                    policy: stop.by.into(),
                    reason: stop.reason.clone(),
                }),
                verdicts: Vec::new(),
                latency_us: 0,
            },
            Ok(rewritten) => {
                if let Some(result) = rewritten {
                    exchange.result = Some(result.clone());
                }
                let seen: Vec<_> = drift.iter().map(ToolDrift::to_wit).collect();
                let mut decision = g.guard.decide(&mut exchange, &seen);
                if let (Decided::Allow, Some(result)) = (&decision.outcome, rewritten) {
                    decision.outcome = Decided::Modify(result.clone());
                }
                decision
            }
        };
        let mut record = self.record(g, kind, message, arguments, &exchange, &decision);
        if !drift.is_empty() {
            record.tags.push("drift".into());
            let kinds: BTreeSet<_> = drift.iter().flat_map(|d| &d.kinds).collect();
            record
                .tags
                .extend(kinds.iter().map(|k| format!("drift:{}", k.as_str())));
        }
        if let Err(stop) = &crossing {
            record.tags.push(stop.tag.into());
        }
        record.drift = drift;
        let (mut bound, mut expires_ms, mut question) = (String::new(), 0, None);
        if let Decided::Hold(refusal, payload) = &decision.outcome {
            let refusal = refusal.clone();
            let asked = self.ask(
                g,
                (direction, kind, message),
                &exchange,
                &record,
                &refusal,
                asking,
            );
            let (outcome, tag) = match asked {
                Ok(Asked::Held {
                    digest,
                    expires_ms: expires,
                    question: q,
                }) => {
                    (bound, expires_ms, question) = (digest, expires, q);
                    (None, None)
                }
                Ok(Asked::InputRequired(approval, answer)) => {
                    record.approval = (approval != record.id).then_some(approval);
                    let step = Step {
                        reply: Some(answer),
                        ..Step::default()
                    };
                    return audited(g, &record, kind, message.id, step);
                }
                Ok(Asked::Approved(approval, tag)) => {
                    record.outcome = "allow";
                    record.approval = Some(approval);
                    let params = payload
                        .as_deref()
                        .or(message.params.map(RawValue::get))
                        .and_then(|p| serde_json::from_str(p).ok());
                    let sent = params.as_ref().and_then(elicit::without_input);
                    let outcome = match (sent, payload) {
                        (Some(params), _) => Decided::Modify(params.to_string()),
                        (None, Some(payload)) => Decided::Modify(payload.clone()),
                        (None, None) => Decided::Allow,
                    };
                    (Some(outcome), Some(tag))
                }
                Ok(Asked::Refused(approval, why)) => {
                    record.deny(DENIED, why.clone(), Some(&refusal.policy));
                    let data = json!({ "approval": approval, "policy": &*refusal.policy, "decision": record.id });
                    record.approval = Some(approval);
                    let step = refuse(kind, message.id, DENIED, &why, Some(data));
                    return audited(g, &record, kind, message.id, step);
                }
                Ok(Asked::BadReceipt(why)) => {
                    let why = format!("Invalid params: {why}");
                    record.deny(INVALID_PARAMS, why.clone(), Some(&refusal.policy));
                    record.tags.push("approval:bad-receipt".into());
                    let data = json!({ "policy": &*refusal.policy, "decision": record.id });
                    let step = refuse(kind, message.id, INVALID_PARAMS, &why, Some(data));
                    return audited(g, &record, kind, message.id, step);
                }
                Err(e) if e.is::<TooManyPending>() => {
                    record.tags.push("approval:too-many".into());
                    (Some(refused(&mut record, &refusal, e.to_string())), None)
                }
                Err(e) => {
                    // The details (a store's path, say) are for the log.
                    tracing::error!("cannot hold a call for approval: {e:#}");
                    record.tags.push("approval:unavailable".into());
                    let why = format!(
                        "approval required ({}), but Portcullis cannot hold the call for it",
                        refusal.reason
                    );
                    (Some(refused(&mut record, &refusal, why)), None)
                }
            };
            record.tags.extend(tag.map(str::to_string));
            if let Some(outcome) = outcome {
                decision.outcome = outcome;
            }
        }
        count(&record);
        if let Err(e) = g.audit.write(&record) {
            return audit_failed(&record, kind, message.id, &e);
        }
        match decision.outcome {
            Decided::Allow => self.pass(direction, kind, key, &exchange, Cow::Borrowed(text)),
            Decided::Modify(payload) => {
                match jsonrpc::replace_member(text, message.payload(kind).0, &payload) {
                    Ok(modified) => {
                        self.pass(direction, kind, key, &exchange, Cow::Owned(modified))
                    }
                    Err(e) => refuse(
                        kind,
                        message.id,
                        INTERNAL_ERROR,
                        &format!("cannot apply modification: {e}"),
                        None,
                    ),
                }
            }
            Decided::Deny(refusal) => {
                let mut data = json!({ "policy": &*refusal.policy, "reason": refusal.reason, "decision": record.id });
                // The boundary's own refusals read as Portcullis' words, not a
                // policy's.
                let text = match crossing {
                    Err(stop) => {
                        if let Some(data) = data.as_object_mut() {
                            data.extend(stop.data);
                        }
                        stop.reason
                    }
                    Ok(_) => refusal.message(),
                };
                refuse(kind, message.id, refusal.code, &text, Some(data))
            }
            Decided::Hold(_, payload) => {
                let text = match payload {
                    Some(payload) => jsonrpc::replace_member(text, "params", &payload)
                        .unwrap_or_else(|_| text.to_string()),
                    None => text.to_string(),
                };
                let key = key.unwrap_or_default();
                let entry = HeldEntry {
                    approval: record.id.clone(),
                    jsonrpc_id: message.id.map(|id| id.get().to_string()),
                };
                self.held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key.clone(), entry);
                Step {
                    held: Some(Held {
                        approval: record.id,
                        key,
                        id: message.id.map(ToOwned::to_owned),
                        text,
                        arguments_sha256: bound,
                        expires_ms,
                        exchange,
                        caller: caller.cloned(),
                    }),
                    reply: question,
                    ..Step::default()
                }
            }
        }
    }

    /// Why `message` cannot be judged now, if it cannot: an answer is judged
    /// knowing the request it answers, so a request whose id is already in
    /// flight (its answer could not be told from the other's), one past the
    /// session's bound of requests in flight, and an answer to no request
    /// in flight are refused.
    fn out_of_turn(
        &self,
        direction: Direction,
        kind: MessageKind,
        message: &Message,
        key: Option<&str>,
    ) -> Option<String> {
        let id = message.id.map_or("null", RawValue::get);
        match (kind, key) {
            (MessageKind::Request, Some(key)) => {
                if self.in_flight(direction, key) {
                    return Some(format!(
                        "Invalid Request: id {id} is already in use by a request in flight"
                    ));
                }
                let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
                let params = message.params.map_or(0, |p| p.get().len());
                (!session.has_room(params)).then(|| {
                    "Invalid Request: too many requests in flight; wait for their answers".into()
                })
            }
            (MessageKind::Result | MessageKind::Error, key) => {
                let asked = match direction {
                    Direction::ClientToServer => Direction::ServerToClient,
                    Direction::ServerToClient => Direction::ClientToServer,
                };
                let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
                let answers = key.is_some_and(|key| session.in_flight(asked, key));
                (!answers).then(|| format!("Invalid Request: {id} answers no request in flight"))
            }
            _ => None,
        }
    }

    /// Whether a request is in flight under `key` in `direction`: forwarded
    /// and unanswered, or held.
    fn in_flight(&self, direction: Direction, key: &str) -> bool {
        let held = direction == Direction::ClientToServer
            && self
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(key);
        held || self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_flight(direction, key)
    }
}
/// The in-flight key of the pair a transport named.
fn paired(pair: Option<u64>) -> Option<String> {
    pair.map(|pair| format!("#{pair}"))
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

fn into_delivery(step: Step) -> Delivery {
    Delivery {
        forward: step.forward.map(|f| f.into_owned().into_bytes()),
        reply: step.reply.map(String::into_bytes),
        held: step.held.into_iter().collect(),
    }
}

/// The arguments a held request is shown with: a tool call's `arguments`,
/// another request's params, as the chain left them.
/// Counts the decision `record` describes.
fn count(record: &AuditRecord) {
    let verdicts = record.policies.iter().map(|p| metrics::Verdict {
        policy: &p.policy,
        verdict: p.verdict,
        latency_us: p.latency_us,
    });
    metrics::global().decision(&record.server, record.outcome, record.latency_us, verdicts);
}

/// `step`, once `record` is in the audit trail; a refusal if it cannot be.
fn audited<'a>(
    g: &Generation,
    record: &AuditRecord,
    kind: MessageKind,
    id: Option<&RawValue>,
    step: Step<'a>,
) -> Step<'a> {
    match g.audit.write(record) {
        Ok(()) => step,
        Err(e) => audit_failed(record, kind, id, &e),
    }
}

/// The refusal of a message whose `record` could not be written (`e`).
fn audit_failed<'a>(
    record: &AuditRecord,
    kind: MessageKind,
    id: Option<&RawValue>,
    e: &anyhow::Error,
) -> Step<'a> {
    metrics::global().audit_failure();
    tracing::error!(record = %serde_json::to_string(record).unwrap_or_default(), "{e:#}");
    let why = "Portcullis could not write the audit record, so the message was not relayed";
    refuse(kind, id, AUDIT_FAILED, why, None)
}
