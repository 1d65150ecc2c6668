//! What the relay makes of one judged message: its exchange view, its audit
//! record, the step that relays it as judged, and the refusal of a message
//! that could not be judged ([`Unjudged`]), audited with a digest of its
//! bytes.

use super::*;

impl Relay {
    /// Learns the server's tools from a listing Portcullis made itself (all
    /// pages in one `result`), as if the client had listed them: a first
    /// call is judged knowing its tool's annotations and schema, and its
    /// drift from the lock.
    pub fn learn_listing(&self, result: &RawValue) {
        let g = self.current();
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let pinned = g.pins.as_ref().and_then(|p| p.server(session.server()));
        let listing = crate::relay::session::Pending {
            method: "tools/list".into(),
            tool: None,
            params: None,
            agent: session.agent().clone(),
        };
        let schemas = &self.current.boundary.schemas;
        // Drift is judged call by call, against what is learned here.
        session.learn_tools(&listing, result, pinned, schemas);
    }

    /// Learns the server's tools as the lock file pins them (the vetted
    /// definitions), if it pins this server: a first call is judged by them
    /// before anyone lists the tools. Whether it did.
    pub fn learn_pinned(&self) -> bool {
        let g = self.current();
        let server = {
            let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
            session.server().to_string()
        };
        let Some(pinned) = g.pins.as_ref().and_then(|p| p.server(&server)) else {
            return false;
        };
        let tools: Vec<serde_json::Value> = pinned
            .tools
            .iter()
            .map(|(name, definition)| {
                let mut tool = definition.clone();
                if let Some(tool) = tool.as_object_mut() {
                    tool.insert("name".into(), json!(name));
                }
                tool
            })
            .collect();
        let listing = json!({ "tools": tools }).to_string();
        match RawValue::from_string(listing) {
            Ok(listing) => {
                self.learn_listing(&listing);
                true
            }
            Err(_) => false,
        }
    }

    /// The agent on this connection.
    pub fn agent(&self) -> crate::contract::Agent {
        let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        session.agent().clone()
    }

    /// Whether a message travelling `direction` made the server's tools
    /// due to be listed by Portcullis (see [`Relay::learn_listing`]);
    /// asking says they are no longer.
    pub fn survey_due(&self, direction: Direction) -> bool {
        self.survey_due[lane(direction)].swap(false, Ordering::AcqRel)
    }

    /// The exchange for a message, and the drift of the tools it concerns.
    /// An answer is matched to its request, and a `tools/list` result
    /// teaches the session the tools.
    pub(super) fn exchange(
        &self,
        g: &Generation,
        direction: Direction,
        kind: MessageKind,
        (message, key): (&Message, Option<&str>),
        tool: Option<String>,
        caller: Option<&Identity>,
    ) -> (Exchange, Vec<ToolDrift>) {
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(caller) = caller {
            // What the server sends of its own accord from now on is judged
            // as concerning this agent.
            session.acting_for(&caller.agent);
        }
        let (mut exchange, listed) = match kind {
            MessageKind::Request | MessageKind::Notification => {
                if survey_trigger(direction, message.method.as_deref()) {
                    self.survey_due[lane(direction)].store(true, Ordering::Release);
                }
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
        if let Some(caller) = caller {
            exchange.agent = caller.agent.clone();
        }
        let drift = match (listed, &exchange.tool) {
            (Some(listed), _) => listed,
            (None, Some(tool)) => boundary::call_drift(g, &session, tool),
            (None, None) => Vec::new(),
        };
        (exchange, drift)
    }

    /// The boundary's checks: a client's message from a `caller` whose
    /// grant does not include the server is refused; a request may be
    /// refused before the chain runs; a `tools/list` result may be
    /// rewritten (drifted tools hidden) or refused.
    pub(super) fn cross(
        &self,
        g: &Generation,
        (direction, kind): (Direction, MessageKind),
        exchange: &Exchange,
        arguments: Option<&RawValue>,
        drift: &[ToolDrift],
        caller: Option<&Identity>,
    ) -> Result<Option<String>, Stop> {
        let boundary = &self.current.boundary;
        if let Some(caller) = caller
            && direction == Direction::ClientToServer
            && !caller.may_use(&exchange.server)
        {
            return Err(boundary::grant_stop(&caller.agent.id, &exchange.server));
        }
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
    pub(super) fn pass<'a>(
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

    pub(super) fn record(
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
        record.annotations = exchange.annotations.as_ref().map(Into::into);
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
                if let Some((digest, value)) = message.payload(kind).1.and_then(canonical_digest) {
                    record.result_sha256 = Some(digest);
                    record.result = g.audit.include_results().then_some(value);
                }
                if g.audit.include_results() {
                    let asked = request_arguments(exchange);
                    if let Some((digest, value)) = asked.as_deref().and_then(canonical_digest) {
                        record.arguments_sha256 = Some(digest);
                        record.arguments = g.audit.include_arguments().then_some(value);
                    }
                }
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
    pub(super) fn reject<'a>(
        &self,
        g: &Generation,
        direction: Direction,
        unjudged: Unjudged,
    ) -> Step<'a> {
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
    pub(super) fn oversized(
        &self,
        g: &Generation,
        direction: Direction,
        len: usize,
        (prefix, suffix): (&[u8], &[u8]),
    ) -> Delivery {
        let id = jsonrpc::leading_id(prefix).or_else(|| jsonrpc::trailing_id(suffix));
        let why =
            format!("message of {len} bytes exceeds the size limit (limits.max_message_bytes)");
        let key = id.as_deref().map(jsonrpc::id_key);
        let unjudged = Unjudged::new(INVALID_REQUEST, why)
            .id(id.as_deref())
            .key(key);
        into_delivery(self.reject(g, direction, unjudged))
    }
}

/// A message refused before the chain could judge it: unreadable, ambiguous,
/// too large, or not the message its method says.
pub(super) struct Unjudged<'t> {
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
    pub(super) fn new(code: i32, why: String) -> Self {
        Self {
            id: None,
            code,
            why,
            method: None,
            text: None,
            key: None,
        }
    }

    pub(super) fn key(self, key: Option<String>) -> Self {
        Self { key, ..self }
    }

    pub(super) fn id(self, id: Option<&'t RawValue>) -> Self {
        Self { id, ..self }
    }

    pub(super) fn method(self, method: Option<&'t str>) -> Self {
        Self { method, ..self }
    }

    pub(super) fn text(self, text: &'t [u8]) -> Self {
        Self {
            text: Some(text),
            ..self
        }
    }
}

/// The refusal of a message: a request is answered with an error, an answer
/// is replaced by an error, a notification is dropped.
pub(super) fn refuse<'a>(
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

/// Marks `record` refused for `why`, on behalf of the policy that asked for
/// approval; the decision to send.
pub(super) fn refused(record: &mut AuditRecord, asked_by: &Refusal, why: String) -> Decided {
    record.deny(DENIED, why.clone(), Some(&asked_by.policy));
    Decided::Deny(Refusal {
        code: DENIED,
        policy: asked_by.policy.clone(),
        reason: why,
    })
}

/// Whether a message travelling `direction` with `method` makes the server's
/// tools due to be listed: the client has finished initializing, or the
/// server says its tools changed.
fn survey_trigger(direction: Direction, method: Option<&str>) -> bool {
    matches!(
        (direction, method),
        (Direction::ClientToServer, Some("notifications/initialized"))
            | (
                Direction::ServerToClient,
                Some("notifications/tools/list_changed")
            )
    )
}

/// The index of `direction` among per-direction state.
fn lane(direction: Direction) -> usize {
    match direction {
        Direction::ClientToServer => 0,
        Direction::ServerToClient => 1,
    }
}

/// For an answer: its request's arguments (`tools/call`) or params, as a
/// request's record holds them.
fn request_arguments(exchange: &Exchange) -> Option<Box<RawValue>> {
    let params: serde_json::Value = serde_json::from_str(exchange.params.as_deref()?).ok()?;
    let asked = match (exchange.method.as_str(), params) {
        ("tools/call", serde_json::Value::Object(mut params)) => params.remove("arguments")?,
        (_, params) => params,
    };
    serde_json::value::to_raw_value(&asked).ok()
}
