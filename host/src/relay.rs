//! The transport-independent heart of the proxy. For each frame from either
//! side it classifies the message, runs the boundary's own checks and the
//! guard chain, writes the audit record, and says what to send where; a
//! request the chain holds for approval is recorded in the approvals store
//! and handed to the transport to wait on, then settled here. Transports
//! only move bytes and wait; every decision is made here, so all transports
//! decide alike.

use crate::approvals::{self, Approval, State, TooManyPending};
use crate::audit::{ApprovalRecord, AuditRecord, canonical_digest, value_digest};
use crate::awaiting::Then;
use crate::bindings::{Direction, Exchange, MessageKind};
use crate::boundary::{self, Listing, Stop};
use crate::drift::ToolDrift;
use crate::elicit;
use crate::framing::Frame;
use crate::guard::{Decided, Decision, Refusal};
use crate::hold;
use crate::jsonrpc::{
    self, AUDIT_FAILED, DENIED, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, Message,
    PARSE_ERROR, error_response,
};
use crate::metrics;
use crate::receipt;
use crate::reload::{Current, Generation};
use crate::session::Session;
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
    /// Requests held for approval: [`Relay::resolve`] each, off the
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
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} for request {})", self.approval, self.key)
    }
}

/// The outcome for one message of a frame (a batch has several).
#[derive(Default)]
struct Step<'a> {
    forward: Option<Cow<'a, str>>,
    reply: Option<String>,
    held: Option<Held>,
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
            eliciting: Mutex::new(HashMap::new()),
        }
    }

    /// The generation judging messages now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }

    /// Judges one frame travelling `direction`, with the current generation
    /// from start to end.
    pub fn handle(&self, direction: Direction, frame: Frame) -> Delivery {
        self.handle_asking(direction, frame, Asking::Connection)
    }

    /// Judges one frame as [`Relay::handle`] does, its client reachable for
    /// approval questions as `asking` says. Should judging fail inside
    /// Portcullis (a bug, never an input's due), the message is refused,
    /// audited and logged as an error, and the connection goes on.
    pub fn handle_asking(&self, direction: Direction, frame: Frame, asking: Asking) -> Delivery {
        self.guarded(direction, frame, asking, None)
    }

    /// Judges one message of a request/answer pair that its transport
    /// matches itself (serve: one HTTP exchange), named `pair` for both: the
    /// answer is judged as the answer to that request whatever its JSON-RPC
    /// id, so clients sharing a session may reuse ids.
    pub fn handle_paired(
        &self,
        direction: Direction,
        frame: Frame,
        asking: Asking,
        pair: u64,
    ) -> Delivery {
        self.guarded(direction, frame, asking, Some(pair))
    }

    fn guarded(
        &self,
        direction: Direction,
        frame: Frame,
        asking: Asking,
        pair: Option<u64>,
    ) -> Delivery {
        let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.judge(direction, frame, asking, pair)
        }));
        judged.unwrap_or_else(|panic| self.failed(direction, &panic_message(&*panic), pair))
    }

    /// A message whose judging failed inside Portcullis (`why`): refused,
    /// never relayed.
    fn failed(&self, direction: Direction, why: &str, pair: Option<u64>) -> Delivery {
        tracing::error!(
            direction = direction.as_str(),
            "judging a message failed inside Portcullis: {why}; the message was refused"
        );
        let g = self.current();
        let record = format!("Portcullis failed while judging this message: {why}");
        let unjudged = Unjudged::new(INTERNAL_ERROR, record).key(paired(pair));
        let mut delivery = into_delivery(self.reject(&g, direction, unjudged));
        // The sender learns that it failed, not how (that is in the trail);
        // whoever waits for an answer learns that it will not come.
        let why = "Portcullis failed while judging this message, so it was not relayed";
        let error = || error_response(None, INTERNAL_ERROR, why, None).into_bytes();
        match direction {
            Direction::ClientToServer => delivery.reply = Some(error()),
            Direction::ServerToClient => delivery.forward = Some(error()),
        }
        delivery
    }

    fn judge(
        &self,
        direction: Direction,
        frame: Frame,
        asking: Asking,
        pair: Option<u64>,
    ) -> Delivery {
        let generation = self.current();
        let g = &*generation;
        let bytes = match frame {
            Frame::Line(bytes) => bytes,
            Frame::Oversized {
                len,
                prefix,
                suffix,
            } => return self.oversized(g, direction, len, (&prefix, &suffix), pair),
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            let why = "Parse error: message is not UTF-8";
            let unjudged = Unjudged::new(PARSE_ERROR, why.into())
                .text(&bytes)
                .key(paired(pair));
            return into_delivery(self.reject(g, direction, unjudged));
        };
        if jsonrpc::is_batch(text) {
            return self.batch(g, direction, text);
        }
        let step = self.message(g, direction, text, asking, pair);
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
            .map(|m| self.message(g, direction, m.get(), Asking::Connection, None))
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

    /// Judges one message and applies the decision.
    fn message<'a>(
        &self,
        g: &Generation,
        direction: Direction,
        text: &'a str,
        asking: Asking,
        pair: Option<u64>,
    ) -> Step<'a> {
        let message = match Message::parse(text) {
            Ok(message) => message,
            Err(unreadable) => {
                let id = jsonrpc::leading_id(text.as_bytes());
                let key = paired(pair).or_else(|| id.as_deref().map(jsonrpc::id_key));
                let unjudged = Unjudged::new(unreadable.code, unreadable.message)
                    .id(id.as_deref())
                    .text(text.as_bytes())
                    .key(key);
                return self.reject(g, direction, unjudged);
            }
        };
        let key = paired(pair).or_else(|| message.id.map(jsonrpc::id_key));
        let Some(kind) = message.kind() else {
            let why = "Invalid Request: not a JSON-RPC 2.0 request, notification or response";
            let unjudged = Unjudged::new(INVALID_REQUEST, why.into())
                .id(message.id)
                .text(text.as_bytes())
                .key(key);
            return self.reject(g, direction, unjudged);
        };
        if self.answered_by_user(direction, kind, &message) {
            return Step::default();
        }
        if let Some(why) = self.out_of_turn(direction, kind, &message, key.as_deref()) {
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
            self.exchange(g, direction, kind, (&message, key.as_deref()), tool);
        let crossing = self.cross(g, direction, kind, &exchange, call_arguments, &drift);
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
        let mut record = self.record(g, kind, &message, arguments, &exchange, &decision);
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
                (direction, kind, &message),
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
                    }),
                    reply: question,
                    ..Step::default()
                }
            }
        }
    }

    /// Records the approval a held request waits on, under the terms of the
    /// approval rule it matches; its id is the id of the request's audit
    /// record. An approval of the very same call still within its reuse
    /// window lets it run instead. Where the rule says to ask the client's
    /// user and the request can be answered `input_required`, that is the
    /// answer, and the request sent again with the user's answer resumes its
    /// approval. Only a client's requests can be held.
    fn ask(
        &self,
        g: &Generation,
        (direction, kind, message): (Direction, MessageKind, &Message),
        exchange: &Exchange,
        record: &AuditRecord,
        refusal: &Refusal,
        asking: Asking,
    ) -> anyhow::Result<Asked> {
        if direction != Direction::ClientToServer || kind != MessageKind::Request {
            anyhow::bail!("only a client's requests can be held");
        }
        anyhow::ensure!(
            message.id.is_some(),
            "a request without an id cannot be held"
        );
        let holding = &self.current.holding;
        let arguments = held_arguments(exchange);
        let digest = value_digest(&arguments);
        let call = approvals::Call {
            agent: exchange.agent.id.clone(),
            server: exchange.server.clone(),
            method: exchange.method.clone(),
            tool: exchange.tool.clone(),
            arguments_sha256: digest.clone(),
            arguments: arguments.to_string(),
            policy: refusal.policy.to_string(),
            reason: refusal.reason.clone(),
            tags: record.tags.clone(),
        };
        let store = holding.store()?;
        let answerable = asking == Asking::InputRequired && exchange.tool.is_some();
        let params = message.params_value();
        if answerable && let Some(state) = elicit::request_state(&params) {
            return self.resume(g, &store, &call, state, &params, message.id);
        }
        if let Some(earlier) = store.reusable(&call, approvals::now_ms())? {
            return Ok(Asked::Approved(earlier.id, "approval:reused"));
        }
        let rule = hold::rule_for(&g.config.approvals, &call);
        // The client's user is asked only where the rule says so and the
        // call can be shown to them whole.
        let elicit = rule.elicit && elicit::can_show(&call.arguments);
        let request = approvals::Request {
            id: record.id.clone(),
            call,
            terms: rule.terms,
            expires_in: rule.expires_in,
            holder: holding.holder().to_string(),
            elicit,
            max_pending: g.config.approvals.max_pending_per_agent,
        };
        let approval = store.request(&request)?;
        holding.announce(&g.config, &approval);
        if elicit && answerable {
            let receipt = receipt::seal(store.receipt_key(), &approval);
            let answer = elicit::input_required(message.id, &approval, &receipt);
            return Ok(Asked::InputRequired(approval.id, answer));
        }
        // The client's own user is asked too, where the rule and the client
        // allow it.
        let question = (elicit && self.elicits.load(Ordering::Relaxed)).then(|| {
            let (id, text) = elicit::request(&approval);
            self.eliciting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, approval.id.clone());
            text
        });
        Ok(Asked::Held {
            digest,
            expires_ms: approval.expires_ms,
            question,
        })
    }

    /// A request sent again with its user's answer (2026-07-28): the
    /// receipt it carries (`requestState`) must open for this very agent and
    /// call, and name an approval its rule lets the client's user decide.
    /// The approval takes the answer, and the request runs (once: a receipt
    /// is used up when its call runs), is refused, or is asked about again
    /// while the approval is still pending. Its ending is audited.
    fn resume(
        &self,
        g: &Generation,
        store: &approvals::Approvals,
        call: &approvals::Call,
        state: &str,
        params: &serde_json::Value,
        id: Option<&RawValue>,
    ) -> anyhow::Result<Asked> {
        let key = store.receipt_key();
        let claims = match receipt::open(key, state, call, approvals::now_ms()) {
            Ok(claims) => claims,
            Err(invalid) => return Ok(Asked::BadReceipt(invalid.to_string())),
        };
        let Some(approval) = store
            .get(&claims.approval)?
            .filter(|a| a.elicit && a.call.same_call(call))
        else {
            let why = "requestState names no approval of this call that its user may decide";
            return Ok(Asked::BadReceipt(why.into()));
        };
        let answer = elicit::input_answer(params);
        let approval = match (approval.state, answer.as_ref()) {
            (State::Pending, Some(answer)) => {
                let by = elicit::decider(&call.agent);
                let decided = match elicit::answer(Some(answer), None) {
                    elicit::Answer::Approved(comment) => Some((State::Approved, comment)),
                    elicit::Answer::Denied(why) => Some((State::Denied, Some(why))),
                    elicit::Answer::Undecided(_) => None,
                };
                match decided {
                    Some((state, comment)) => {
                        store.answer_by_user(&approval.id, state, &by, comment.as_deref())?
                    }
                    None => approval,
                }
            }
            _ => approval,
        };
        if approval.state == State::Pending {
            let receipt = receipt::seal(key, &approval);
            let answer = elicit::input_required(id, &approval, &receipt);
            return Ok(Asked::InputRequired(approval.id, answer));
        }
        if approval.state == State::Approved && !store.consume(&approval.id)? {
            let why = format!(
                "approval {} was used already: a receipt runs its call once; send the call again without requestState to ask anew",
                approval.id
            );
            return Ok(Asked::Refused(approval.id, why));
        }
        let ending = ApprovalRecord::new(&approval, id.map(|i| i.get().to_string()), true);
        metrics::global().approval(ending.state);
        g.audit.write(&ending)?;
        Ok(match approval.state {
            State::Approved => Asked::Approved(approval.id, "approval:input"),
            _ => Asked::Refused(approval.id, ending.message()),
        })
    }

    /// The client's answer to Portcullis' own elicitation request for a
    /// held call's approval, if `message` is one: the user's decision is
    /// taken (an approver may have decided first), and the answer goes no
    /// further.
    fn answered_by_user(&self, direction: Direction, kind: MessageKind, message: &Message) -> bool {
        if direction != Direction::ClientToServer
            || !matches!(kind, MessageKind::Result | MessageKind::Error)
        {
            return false;
        }
        let Some(id) = message.id.filter(|id| elicit::is_ours(id.get())) else {
            return false;
        };
        let approval = self
            .eliciting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&jsonrpc::id_key(id));
        // A late answer, after an approver decided, is dropped too.
        let Some(approval) = approval else {
            return true;
        };
        let parse = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str(r.get()).ok());
        let (result, error): (Option<serde_json::Value>, Option<serde_json::Value>) =
            (parse(message.result), parse(message.error));
        let agent = self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .agent()
            .id
            .clone();
        let (state, comment) = match elicit::answer(result.as_ref(), error.as_ref()) {
            elicit::Answer::Approved(comment) => (State::Approved, comment),
            elicit::Answer::Denied(why) => (State::Denied, Some(why)),
            elicit::Answer::Undecided(why) => {
                tracing::warn!(approval, "{why}; the approval waits for an approver");
                return true;
            }
        };
        let decided = self.current.holding.store().and_then(|store| {
            let by = elicit::decider(&agent);
            Ok(store.answer_by_user(&approval, state, &by, comment.as_deref())?)
        });
        if let Err(e) = decided {
            tracing::error!(approval, "cannot record the user's decision: {e:#}");
        }
        true
    }

    /// Calls `then` with what `held` settles to once a person decides on
    /// it, its approval expires or it is cancelled. No thread waits
    /// meanwhile: `then` runs on the approvals watcher's thread.
    pub fn on_decision(self: &Arc<Self>, held: Held, then: impl FnOnce(Delivery) + Send + 'static) {
        let relay = self.clone();
        let (approval, expires_ms) = (held.approval.clone(), held.expires_ms);
        let settle: Then = Box::new(move |ended| then(relay.settle(held, ended)));
        if let Err((e, settle)) = self.current.holding.on_end(&approval, expires_ms, settle) {
            settle(Err(e));
        }
    }

    /// A held request whose approval ended as `ended` says: relayed if
    /// approved, refused if denied or expired, dropped if cancelled. Each
    /// ending is audited, once: a request already settled (e.g. cancelled
    /// when its client left) gives nothing.
    fn settle(&self, held: Held, ended: anyhow::Result<Approval>) -> Delivery {
        if self.unhold(&held.key, &held.approval).is_none() {
            return Delivery::default();
        }
        self.eliciting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, approval| *approval != held.approval);
        let g = self.current();
        let id = held.id;
        let refused = |code: i32, why: &str, data: serde_json::Value| Delivery {
            reply: Some(error_response(id.as_deref(), code, why, Some(data)).into_bytes()),
            ..Delivery::default()
        };
        let approval = match ended {
            Ok(approval) => approval,
            Err(e) => {
                let why = format!("the approval {} could not be read: {e:#}", held.approval);
                tracing::error!("{why}");
                return refused(INTERNAL_ERROR, &why, json!({ "approval": held.approval }));
            }
        };
        let bound = approval.call.arguments_sha256 == held.arguments_sha256;
        let jsonrpc_id = id.as_ref().map(|id| id.get().to_string());
        let record = ApprovalRecord::new(&approval, jsonrpc_id, bound);
        metrics::global().approval(record.state);
        let written = g.audit.write(&record);
        let data = json!({
            "approval": approval.id,
            "state": record.state,
            "decided_by": approval.decided_by,
            "policy": approval.call.policy,
            "reason": approval.call.reason,
        });
        if let Err(e) = written {
            metrics::global().audit_failure();
            tracing::error!(record = %serde_json::to_string(&record).unwrap_or_default(), "{e:#}");
            let why =
                "Portcullis could not write the audit record, so the held call was not relayed";
            return refused(AUDIT_FAILED, why, data);
        }
        match (approval.state, bound) {
            (State::Approved, true) => {
                let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
                session.forwarded(Direction::ClientToServer, &held.key, &held.exchange);
                Delivery {
                    forward: Some(held.text.into_bytes()),
                    ..Delivery::default()
                }
            }
            (State::Cancelled, _) => Delivery::default(),
            _ => refused(DENIED, &record.message(), data),
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

    /// Stops holding the request held under `key` for `approval` (and no
    /// other approval that took its key since).
    fn unhold(&self, key: &str, approval: &str) -> Option<HeldEntry> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.get(key).is_some_and(|e| e.approval == approval) {
            held.remove(key)
        } else {
            None
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

    /// Cancels every request this connection holds (its client went away):
    /// their approvals end as cancelled, each audited.
    pub fn cancel_held(&self, why: &str) {
        let held: Vec<String> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for key in held {
            self.cancel(&key, why);
        }
    }

    /// A client's `notifications/cancelled` for a held request cancels its
    /// approval.
    fn cancelled_by_client(&self, params: Option<&str>) {
        let request = params
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|p| p.get("requestId").map(ToString::to_string))
            .and_then(|id| RawValue::from_string(id).ok())
            .map(|id| jsonrpc::id_key(&id));
        if let Some(key) = request {
            self.session
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .forget(Direction::ClientToServer, &key);
            self.cancel(&key, "the client cancelled the request");
        }
    }

    /// Cancels the held request `key` (its in-flight key) and audits it at
    /// once (its waiting thread then finds it settled): the process may end
    /// before that thread would look again.
    pub fn cancel(&self, key: &str, why: &str) {
        let entry = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
        let Some(HeldEntry {
            approval,
            jsonrpc_id,
        }) = entry
        else {
            return;
        };
        let cancelled = self
            .current
            .holding
            .store()
            .and_then(|store| store.settle(&approval, State::Cancelled, "client", Some(why)))
            .and_then(|ended| {
                let record = ApprovalRecord::new(&ended, jsonrpc_id, true);
                metrics::global().approval(record.state);
                self.current().audit.write(&record)
            });
        if let Err(e) = cancelled {
            tracing::error!(approval, "cannot cancel the approval: {e:#}");
        }
    }

    /// The exchange for a message, and the drift of the tools it concerns.
    /// An answer is matched to its request, and a `tools/list` result
    /// teaches the session the tools.
    fn exchange(
        &self,
        g: &Generation,
        direction: Direction,
        kind: MessageKind,
        (message, key): (&Message, Option<&str>),
        tool: Option<String>,
    ) -> (Exchange, Vec<ToolDrift>) {
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let (exchange, listed) = match kind {
            MessageKind::Request | MessageKind::Notification => {
                (session.exchange(direction, kind, message, tool), None)
            }
            MessageKind::Result | MessageKind::Error => {
                let pending = session.answered(direction, key);
                let mut listed = None;
                if let (Some(request), Some(result)) = (&pending, message.result)
                    && request.method == "tools/list"
                    && direction == Direction::ServerToClient
                {
                    let pinned = g.pins.as_ref().and_then(|p| p.server(session.server()));
                    let schemas = &self.current.boundary.schemas;
                    listed = Some(session.learn_tools(request, result, pinned, schemas));
                }
                let payload = message.payload(kind).1;
                let exchange = session.answer_exchange(direction, kind, pending.as_ref(), payload);
                (exchange, listed)
            }
        };
        let drift = match (listed, &exchange.tool) {
            (Some(listed), _) => listed,
            (None, Some(tool)) => boundary::call_drift(g, &session, tool),
            (None, None) => Vec::new(),
        };
        (exchange, drift)
    }

    /// The boundary's checks: a request may be refused before the chain
    /// runs; a `tools/list` result may be rewritten (drifted tools hidden)
    /// or refused.
    fn cross(
        &self,
        g: &Generation,
        direction: Direction,
        kind: MessageKind,
        exchange: &Exchange,
        arguments: Option<&RawValue>,
        drift: &[ToolDrift],
    ) -> Result<Option<String>, Stop> {
        let boundary = &self.current.boundary;
        match (direction, kind) {
            (Direction::ClientToServer, MessageKind::Request) => {
                let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
                boundary.request(g, &session, exchange, arguments, drift)?;
                Ok(None)
            }
            (Direction::ServerToClient, MessageKind::Result) if exchange.method == "tools/list" => {
                let result = exchange.result.as_deref().unwrap_or_default();
                match boundary.listing(g, result, drift) {
                    Listing::Pass => Ok(None),
                    Listing::Rewrite(result) => Ok(Some(result)),
                    Listing::Refuse(stop) => Err(stop),
                }
            }
            _ => Ok(None),
        }
    }

    /// Relays a message, remembering a request so its answer can be matched.
    fn pass<'a>(
        &self,
        direction: Direction,
        kind: MessageKind,
        key: Option<String>,
        exchange: &Exchange,
        text: Cow<'a, str>,
    ) -> Step<'a> {
        if let (MessageKind::Request, Some(key)) = (kind, key) {
            let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
            session.forwarded(direction, &key, exchange);
        }
        Step::forward(text)
    }

    fn record(
        &self,
        g: &Generation,
        kind: MessageKind,
        message: &Message,
        arguments: Option<&RawValue>,
        exchange: &Exchange,
        decision: &Decision,
    ) -> AuditRecord {
        let mut record = AuditRecord::new(
            &exchange.agent,
            &exchange.server,
            exchange.direction.as_str(),
        );
        record.kind = kind.as_str();
        record.method = Some(exchange.method.clone()).filter(|m| !m.is_empty());
        record.tool = exchange.tool.clone();
        record.jsonrpc_id = message.id.map(ToOwned::to_owned);
        record.trace = exchange
            .params
            .as_deref()
            .and_then(crate::audit::traceparent);
        match kind {
            MessageKind::Request | MessageKind::Notification => {
                if let Some((digest, value)) = arguments.and_then(canonical_digest) {
                    record.arguments_sha256 = Some(digest);
                    record.arguments = g.audit.include_arguments().then_some(value);
                }
            }
            MessageKind::Result | MessageKind::Error => {
                record.result_sha256 = message
                    .payload(kind)
                    .1
                    .and_then(canonical_digest)
                    .map(|(d, _)| d);
            }
        }
        record.tags = decision.tags();
        record.latency_us = decision.latency_us;
        match &decision.outcome {
            Decided::Allow => {}
            Decided::Modify(_) => record.outcome = "modify",
            Decided::Deny(refusal) => {
                record.deny(refusal.code, refusal.reason.as_str(), Some(&refusal.policy))
            }
            Decided::Hold(refusal, _) => {
                record.outcome = "hold";
                record.reason = Some(refusal.reason.clone());
                record.decided_by = Some(refusal.policy.to_string());
            }
        }
        record.policies = decision.verdicts.clone();
        if !g.audit.include_policy_logs() {
            record.policies.iter_mut().for_each(|v| v.logs.clear());
        }
        record
    }

    /// A message that could not be read: audited, and answered when possible.
    fn reject<'a>(&self, g: &Generation, direction: Direction, unjudged: Unjudged) -> Step<'a> {
        let Unjudged {
            id,
            code,
            why,
            method,
            text,
            key,
        } = unjudged;
        let (agent, server) = {
            let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
            (session.agent().clone(), session.server().to_string())
        };
        let mut record = AuditRecord::new(&agent, &server, direction.as_str());
        record.jsonrpc_id = id.map(ToOwned::to_owned);
        record.method = method.map(str::to_string);
        record.message_sha256 = text.map(crate::audit::bytes_digest);
        record.deny(code, why.clone(), None);
        count(&record);
        if let Err(e) = g.audit.write(&record) {
            metrics::global().audit_failure();
            tracing::error!("{e:#}");
        }
        match direction {
            Direction::ClientToServer => Step::reply(error_response(id, code, &why, None)),
            Direction::ServerToClient => {
                tracing::warn!(server, "dropped a message from the server: {why}");
                let pending = self
                    .session
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .answered(direction, key.as_deref());
                match pending {
                    Some(_) => {
                        let message =
                            format!("Portcullis: the server sent an unusable answer: {why}");
                        Step::forward(Cow::Owned(error_response(
                            id,
                            INTERNAL_ERROR,
                            &message,
                            None,
                        )))
                    }
                    None => Step::default(),
                }
            }
        }
    }

    /// A frame over the size limit: its sender (client) or its waiting
    /// requester (when a server answer is too large) gets an error.
    fn oversized(
        &self,
        g: &Generation,
        direction: Direction,
        len: usize,
        (prefix, suffix): (&[u8], &[u8]),
        pair: Option<u64>,
    ) -> Delivery {
        let id = jsonrpc::leading_id(prefix).or_else(|| jsonrpc::trailing_id(suffix));
        let why =
            format!("message of {len} bytes exceeds the size limit (limits.max_message_bytes)");
        let key = paired(pair).or_else(|| id.as_deref().map(jsonrpc::id_key));
        let unjudged = Unjudged::new(INVALID_REQUEST, why)
            .id(id.as_deref())
            .key(key);
        into_delivery(self.reject(g, direction, unjudged))
    }
}

/// A message refused before the chain could judge it: unreadable, ambiguous,
/// too large, or not the message its method says.
struct Unjudged<'t> {
    /// Its id, when one could be read.
    id: Option<&'t RawValue>,
    /// The JSON-RPC error code it is refused with.
    code: i32,
    /// Why.
    why: String,
    /// Its method, when it could be read.
    method: Option<&'t str>,
    /// The message as received: the record keeps its sha256.
    text: Option<&'t [u8]>,
    /// The in-flight key of the request an answer answers, when known.
    key: Option<String>,
}

impl<'t> Unjudged<'t> {
    fn new(code: i32, why: String) -> Self {
        Self {
            id: None,
            code,
            why,
            method: None,
            text: None,
            key: None,
        }
    }

    fn key(self, key: Option<String>) -> Self {
        Self { key, ..self }
    }

    fn id(self, id: Option<&'t RawValue>) -> Self {
        Self { id, ..self }
    }

    fn method(self, method: Option<&'t str>) -> Self {
        Self { method, ..self }
    }

    fn text(self, text: &'t [u8]) -> Self {
        Self {
            text: Some(text),
            ..self
        }
    }
}

/// The refusal of a message: a request is answered with an error, an answer
/// is replaced by an error, a notification is dropped.
fn refuse<'a>(
    kind: MessageKind,
    id: Option<&RawValue>,
    code: i32,
    message: &str,
    data: Option<serde_json::Value>,
) -> Step<'a> {
    let error = || error_response(id, code, message, data);
    match kind {
        MessageKind::Request => Step::reply(error()),
        MessageKind::Notification => Step::default(),
        MessageKind::Result | MessageKind::Error => Step::forward(Cow::Owned(error())),
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

/// Marks `record` refused for `why`, on behalf of the policy that asked for
/// approval; the decision to send.
fn refused(record: &mut AuditRecord, asked_by: &Refusal, why: String) -> Decided {
    record.deny(DENIED, why.clone(), Some(&asked_by.policy));
    Decided::Deny(Refusal {
        code: DENIED,
        policy: asked_by.policy.clone(),
        reason: why,
    })
}

fn held_arguments(exchange: &Exchange) -> serde_json::Value {
    let params: serde_json::Value = exchange
        .params
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_default();
    match exchange.tool {
        Some(_) => params
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| json!({})),
        None => params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::Agent;
    use crate::engine::PolicyEngine;
    use serde_json::Value;

    /// A relay with no policies whose trail is a file in `dir`.
    fn relay(dir: &std::path::Path, limits: &str) -> Relay {
        let config = dir.join("portcullis.toml");
        let text = format!("[engine]\ncache_dir = \"cache\"\n{limits}");
        std::fs::write(&config, text).unwrap();
        let loaded = crate::config::Config::load(&config).unwrap();
        let engine = PolicyEngine::new(&loaded.engine).unwrap();
        let trail = dir.join("audit.jsonl");
        let generation = Generation::load(&engine, &config, Some(&trail), 1).unwrap();
        let agent = Agent {
            id: "bot".into(),
            attributes: vec![],
        };
        Relay::new(
            Arc::new(Current::new(generation)),
            Session::new("fs".into(), agent),
        )
    }

    fn trail(dir: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).expect("every record reads back"))
            .collect()
    }

    fn from_client(relay: &Relay, text: &str) -> Delivery {
        relay.handle(
            Direction::ClientToServer,
            Frame::Line(text.as_bytes().to_vec()),
        )
    }

    fn reply(delivery: &Delivery) -> Value {
        serde_json::from_slice(delivery.reply.as_deref().expect("a reply")).unwrap()
    }

    #[test]
    fn a_call_naming_its_tool_twice_is_refused_not_relayed() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "");
        let twice = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"read_text_file","arguments":{"path":"/a"},"name":"write_file"}}"#;
        let delivery = from_client(&relay, twice);
        assert!(delivery.forward.is_none(), "never reaches the server");
        let answer = reply(&delivery);
        assert_eq!(answer["id"], 5);
        assert_eq!(answer["error"]["code"], INVALID_REQUEST);
        let [record] = trail(dir.path()).try_into().unwrap();
        assert_eq!(record["outcome"], "deny");
        assert_eq!(record["jsonrpc_id"], 5);
        assert_eq!(
            record["message_sha256"],
            crate::audit::bytes_digest(twice.as_bytes())
        );
    }

    #[test]
    fn arguments_another_parser_reads_differently_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "");
        for arguments in [
            r#"{"path":"/x","pad":1e400}"#,
            r#"{"path":"/x","content":"\ud800"}"#,
        ] {
            let call = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"write_file","arguments":{arguments}}}}}"#
            );
            let delivery = from_client(&relay, &call);
            assert!(delivery.forward.is_none(), "{call}");
            assert_eq!(reply(&delivery)["error"]["code"], PARSE_ERROR);
        }
        let toolless =
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":["write_file"]}}"#;
        let delivery = from_client(&relay, toolless);
        assert!(delivery.forward.is_none());
        assert_eq!(reply(&delivery)["error"]["code"], INVALID_PARAMS);
        let records = trail(dir.path());
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r["outcome"] == "deny"));
        assert_eq!(records[2]["method"], "tools/call");
    }

    #[test]
    fn an_unreadable_id_never_reaches_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "[limits]\nmax_message_bytes = 1024\n");
        from_client(&relay, r#"{"jsonrpc":"2.0","id":1e400,"method":"ping"}"#);
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1e400,"method":"x","params":"{}"}}"#,
            "a".repeat(2000)
        );
        let oversized = crate::framing::FrameReader::new(big.as_bytes(), 1024)
            .read_frame()
            .unwrap()
            .unwrap();
        relay.handle(Direction::ClientToServer, oversized);
        let records = trail(dir.path());
        assert_eq!(records.len(), 2);
        assert!(
            records.iter().all(|r| r.get("jsonrpc_id").is_none()),
            "{records:?}"
        );
    }

    #[test]
    fn an_oversized_line_ending_in_a_multibyte_character_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "[limits]\nmax_message_bytes = 1024\n");
        let mut line = format!(
            r#"{{"jsonrpc":"2.0","method":"x","params":{{"a":"{}","#,
            "z".repeat(2000)
        );
        line.push_str(r#""b":é1}}"#);
        let frame = crate::framing::FrameReader::new(line.as_bytes(), 1024)
            .read_frame()
            .unwrap()
            .unwrap();
        let delivery = relay.handle(Direction::ClientToServer, frame);
        assert_eq!(reply(&delivery)["error"]["code"], INVALID_REQUEST);
        // The relay goes on judging.
        let ping = from_client(&relay, r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
        assert!(ping.forward.is_some());
    }

    #[test]
    fn a_failure_inside_portcullis_refuses_the_message_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "");
        let refused = relay.failed(Direction::ClientToServer, "index out of bounds", None);
        assert!(refused.forward.is_none());
        assert_eq!(reply(&refused)["error"]["code"], INTERNAL_ERROR);
        let answer = relay.failed(Direction::ServerToClient, "index out of bounds", None);
        let error: Value = serde_json::from_slice(&answer.forward.unwrap()).unwrap();
        assert_eq!(
            error["error"]["code"], INTERNAL_ERROR,
            "whoever waits learns of it"
        );
        let records = trail(dir.path());
        assert_eq!(records.len(), 2);
        assert!(
            records[0]["reason"]
                .as_str()
                .unwrap()
                .contains("index out of bounds")
        );
        assert_eq!(
            panic_message(&*std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err()),
            "boom 7"
        );
    }

    fn from_server(relay: &Relay, text: &str) -> Delivery {
        relay.handle(
            Direction::ServerToClient,
            Frame::Line(text.as_bytes().to_vec()),
        )
    }

    #[test]
    fn an_answer_is_judged_as_the_answer_to_its_own_request_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "");
        let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{}}}"#;
        assert!(from_client(&relay, call).forward.is_some());
        // The same id again while the first is in flight: whose would the
        // answer be?
        let again = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
        let refused = from_client(&relay, again);
        assert!(refused.forward.is_none());
        assert!(
            reply(&refused)["error"]["message"]
                .as_str()
                .unwrap()
                .contains("already in use")
        );
        // An answer nobody asked for is dropped, never judged as no one's.
        let stray = from_server(&relay, r#"{"jsonrpc":"2.0","id":8,"result":{}}"#);
        assert!(stray.forward.is_none() && stray.reply.is_none());
        // The answer to 7, however the server spells its id, is read_file's.
        let answer = from_server(
            &relay,
            r#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#,
        );
        assert!(answer.forward.is_some());
        let records = trail(dir.path());
        let answered = records.last().unwrap();
        assert_eq!(answered["tool"], "read_file");
        assert_eq!(answered["direction"], "server-to-client");
        // Answered, the id is free again; a cancelled request's answer is
        // dropped.
        assert!(from_client(&relay, again).forward.is_some());
        from_client(
            &relay,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}"#,
        );
        let late = from_server(&relay, r#"{"jsonrpc":"2.0","id":7,"result":{}}"#);
        assert!(late.forward.is_none());
    }

    #[test]
    fn requests_and_answers_paired_by_their_transport_may_share_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path(), "");
        let first = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{}}}"#;
        let second = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
        let frame = |text: &str| Frame::Line(text.as_bytes().to_vec());
        let c2s = Direction::ClientToServer;
        assert!(
            relay
                .handle_paired(c2s, frame(first), Asking::Connection, 10)
                .forward
                .is_some()
        );
        assert!(
            relay
                .handle_paired(c2s, frame(second), Asking::Connection, 11)
                .forward
                .is_some()
        );
        let answer = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        let s2c = Direction::ServerToClient;
        relay.handle_paired(s2c, frame(answer), Asking::Connection, 11);
        relay.handle_paired(s2c, frame(answer), Asking::Connection, 10);
        let tools: Vec<Value> = trail(dir.path())
            .into_iter()
            .filter(|r| r["direction"] == "server-to-client")
            .map(|r| r["tool"].clone())
            .collect();
        assert_eq!(tools, ["echo", "read_file"]);
    }
}
