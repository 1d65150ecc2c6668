//! The transport-independent heart of the proxy. For each frame from either
//! side it classifies the message, runs the boundary's own checks and the
//! guard chain, writes the audit record, and says what to send where. Transports (stdio today) only move
//! bytes; every decision is made here, so all transports decide alike.

use crate::audit::{AuditRecord, canonical_digest};
use crate::bindings::{Direction, Exchange, MessageKind};
use crate::boundary::{self, Listing, Stop};
use crate::drift::ToolDrift;
use crate::framing::Frame;
use crate::guard::{Decided, Decision, Refusal};
use crate::jsonrpc::{
    self, AUDIT_FAILED, INTERNAL_ERROR, INVALID_REQUEST, Message, PARSE_ERROR, error_response,
};
use crate::reload::{Current, Generation};
use crate::session::Session;
use serde_json::json;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// What to send after judging one frame. Frames carry no newline.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// A frame to pass on to the other side.
    pub forward: Option<Vec<u8>>,
    /// A frame to send back to the sender.
    pub reply: Option<Vec<u8>>,
}

/// The outcome for one message of a frame (a batch has several).
#[derive(Default)]
struct Step<'a> {
    forward: Option<Cow<'a, str>>,
    reply: Option<String>,
}

impl<'a> Step<'a> {
    fn forward(text: Cow<'a, str>) -> Self {
        Self {
            forward: Some(text),
            reply: None,
        }
    }

    fn reply(text: String) -> Self {
        Self {
            forward: None,
            reply: Some(text),
        }
    }

    fn unchanged(&self) -> bool {
        self.reply.is_none() && matches!(self.forward, Some(Cow::Borrowed(_)))
    }
}

/// The decision path shared by every transport.
pub struct Relay {
    current: Arc<Current>,
    session: Mutex<Session>,
}

impl Relay {
    /// A relay for one connection, judging with the generation in charge.
    pub fn new(current: Arc<Current>, session: Session) -> Self {
        Self {
            current,
            session: Mutex::new(session),
        }
    }

    /// The generation judging messages now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }

    /// Judges one frame travelling `direction`, with the current generation
    /// from start to end.
    pub fn handle(&self, direction: Direction, frame: Frame) -> Delivery {
        let generation = self.current();
        let g = &*generation;
        let bytes = match frame {
            Frame::Line(bytes) => bytes,
            Frame::Oversized {
                len,
                prefix,
                suffix,
            } => return self.oversized(g, direction, len, &prefix, &suffix),
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return into_delivery(self.reject(
                g,
                direction,
                None,
                PARSE_ERROR,
                "Parse error: message is not UTF-8".into(),
            ));
        };
        if jsonrpc::is_batch(text) {
            return self.batch(g, direction, text);
        }
        let step = self.message(g, direction, text);
        if step.unchanged() {
            return Delivery {
                forward: Some(bytes),
                reply: None,
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
                return into_delivery(self.reject(
                    g,
                    direction,
                    None,
                    PARSE_ERROR,
                    format!("Parse error: {e}"),
                ));
            }
        };
        if members.is_empty() {
            return into_delivery(self.reject(
                g,
                direction,
                None,
                INVALID_REQUEST,
                "Invalid Request: empty batch".into(),
            ));
        }
        let steps: Vec<Step> = members
            .iter()
            .map(|m| self.message(g, direction, m.get()))
            .collect();
        if steps.iter().all(Step::unchanged) {
            return Delivery {
                forward: Some(text.as_bytes().to_vec()),
                reply: None,
            };
        }
        let join = |parts: Vec<String>| {
            (!parts.is_empty()).then(|| format!("[{}]", parts.join(",")).into_bytes())
        };
        let (mut forward, mut reply) = (Vec::new(), Vec::new());
        for step in steps {
            forward.extend(step.forward.map(Cow::into_owned));
            reply.extend(step.reply);
        }
        Delivery {
            forward: join(forward),
            reply: join(reply),
        }
    }

    /// Judges one message and applies the decision.
    fn message<'a>(&self, g: &Generation, direction: Direction, text: &'a str) -> Step<'a> {
        let message = match Message::parse(text) {
            Ok(message) => message,
            Err(e) => {
                return self.reject(g, direction, None, PARSE_ERROR, format!("Parse error: {e}"));
            }
        };
        let Some(kind) = message.kind() else {
            let why = "Invalid Request: not a JSON-RPC 2.0 request, notification or response";
            return self.reject(g, direction, message.id, INVALID_REQUEST, why.into());
        };
        // A tool call's params are read once: the name for the exchange, the
        // arguments for the boundary's checks and the audit record.
        let call = message.tool_call();
        let tool = call.as_ref().map(|(name, _)| name.clone());
        let call_arguments = call.as_ref().and_then(|(_, arguments)| *arguments);
        let arguments = if call.is_some() {
            call_arguments
        } else {
            message.params
        };
        let (mut exchange, drift) = self.exchange(g, direction, kind, &message, tool);
        let crossing = self.cross(g, direction, kind, &exchange, call_arguments, &drift);
        let decision = match &crossing {
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
        if let Err(e) = g.audit.write(&record) {
            tracing::error!(record = %serde_json::to_string(&record).unwrap_or_default(), "{e:#}");
            let why = "Portcullis could not write the audit record, so the message was not relayed";
            return refuse(kind, message.id, AUDIT_FAILED, why, None);
        }
        match decision.outcome {
            Decided::Allow => self.pass(direction, kind, &message, &exchange, Cow::Borrowed(text)),
            Decided::Modify(payload) => {
                match jsonrpc::replace_member(text, message.payload(kind).0, &payload) {
                    Ok(modified) => {
                        self.pass(direction, kind, &message, &exchange, Cow::Owned(modified))
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
        message: &Message,
        tool: Option<String>,
    ) -> (Exchange, Vec<ToolDrift>) {
        let mut session = self.session.lock().expect("session lock poisoned");
        let (exchange, listed) = match kind {
            MessageKind::Request | MessageKind::Notification => {
                (session.exchange(direction, kind, message, tool), None)
            }
            MessageKind::Result | MessageKind::Error => {
                let pending = session.answered(direction, message.id);
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
                let session = self.session.lock().expect("session lock poisoned");
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
        message: &Message,
        exchange: &Exchange,
        text: Cow<'a, str>,
    ) -> Step<'a> {
        if let (MessageKind::Request, Some(id)) = (kind, message.id) {
            let mut session = self.session.lock().expect("session lock poisoned");
            session.forwarded(direction, id, exchange);
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
        }
        record.policies = decision.verdicts.clone();
        if !g.audit.include_policy_logs() {
            record.policies.iter_mut().for_each(|v| v.logs.clear());
        }
        record
    }

    /// A message that could not be read: audited, and answered when possible.
    fn reject<'a>(
        &self,
        g: &Generation,
        direction: Direction,
        id: Option<&RawValue>,
        code: i32,
        why: String,
    ) -> Step<'a> {
        let (agent, server) = {
            let session = self.session.lock().expect("session lock poisoned");
            (session.agent().clone(), session.server().to_string())
        };
        let mut record = AuditRecord::new(&agent, &server, direction.as_str());
        record.jsonrpc_id = id.map(ToOwned::to_owned);
        record.deny(code, why.clone(), None);
        if let Err(e) = g.audit.write(&record) {
            tracing::error!("{e:#}");
        }
        match direction {
            Direction::ClientToServer => Step::reply(error_response(id, code, &why, None)),
            Direction::ServerToClient => {
                tracing::warn!(server, "dropped a message from the server: {why}");
                let pending = self
                    .session
                    .lock()
                    .expect("session lock poisoned")
                    .answered(direction, id);
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
        prefix: &[u8],
        suffix: &[u8],
    ) -> Delivery {
        let id = jsonrpc::leading_id(prefix).or_else(|| jsonrpc::trailing_id(suffix));
        let why =
            format!("message of {len} bytes exceeds the size limit (limits.max_message_bytes)");
        into_delivery(self.reject(g, direction, id.as_deref(), INVALID_REQUEST, why))
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

fn into_delivery(step: Step) -> Delivery {
    Delivery {
        forward: step.forward.map(|f| f.into_owned().into_bytes()),
        reply: step.reply.map(String::into_bytes),
    }
}
