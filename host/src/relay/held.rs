//! Calls held for a person's approval: asking the approvals store (or
//! reusing an earlier approval), resuming a call that comes back with a
//! receipt or with its user's answer to an elicitation, waking when a
//! decision is made, settling the call as decided, and cancelling what a
//! client abandons.

use super::*;

impl Relay {
    /// Records the approval a held request waits on, under the terms of the
    /// approval rule it matches; its id is the id of the request's audit
    /// record. An approval of the very same call still within its reuse
    /// window lets it run instead. Where the rule says to ask the client's
    /// user and the request can be answered `input_required`, that is the
    /// answer, and the request sent again with the user's answer resumes its
    /// approval. Only a client's requests can be held.
    pub(super) fn ask(
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
        let call = store::Call {
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
        if let Some(earlier) = store.reusable(&call, crate::util::clock::now_ms())? {
            return Ok(Asked::Approved(earlier.id, "approval:reused"));
        }
        let rule = hold::rule_for(&g.config.approvals, &call);
        // The client's user is asked only where the rule says so and the
        // call can be shown to them whole.
        let elicit = rule.elicit && elicit::can_show(&call.arguments);
        let request = store::Request {
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
    pub(super) fn resume(
        &self,
        g: &Generation,
        store: &store::Approvals,
        call: &store::Call,
        state: &str,
        params: &serde_json::Value,
        id: Option<&RawValue>,
    ) -> anyhow::Result<Asked> {
        let key = store.receipt_key();
        let claims = match receipt::open(key, state, call, crate::util::clock::now_ms()) {
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
    pub(super) fn answered_by_user(
        &self,
        direction: Direction,
        kind: MessageKind,
        message: &Message,
    ) -> bool {
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
    /// meanwhile: `then` runs on the approvals watcher's thread, and says
    /// whether its transport took the delivery: an approved call it could
    /// no longer send (its client went away as it was decided) is recorded
    /// as withheld.
    pub fn on_decision(
        self: &Arc<Self>,
        held: Held,
        then: impl FnOnce(Delivery) -> bool + Send + 'static,
    ) {
        let relay = self.clone();
        let (approval, expires_ms) = (held.approval.clone(), held.expires_ms);
        let held_for = approval.clone();
        let settle: Then = Box::new(move |ended| {
            let (approval, key) = (held_for, held.key.clone());
            let settled = relay.settle(held, ended);
            let relaying = settled.forward.is_some();
            if !then(settled) && relaying {
                relay.withheld(&approval, &key, "its client went away as it was approved");
            }
        });
        if let Err((e, settle)) = self.current.holding.on_end(&approval, expires_ms, settle) {
            settle(Err(e));
        }
    }

    /// The approved call held under `key` for `approval` was not relayed,
    /// for `why`: recorded, and no longer awaited as in flight.
    fn withheld(&self, approval: &str, key: &str, why: &str) {
        self.session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(Direction::ClientToServer, key);
        let recorded = self
            .current
            .holding
            .store()
            .and_then(|store| {
                anyhow::Context::context(store.get(approval)?, "the approval is gone")
            })
            .and_then(|approval| {
                let mut record = ApprovalRecord::new(&approval, None, true);
                record.withheld = Some(why.to_string());
                self.current().audit.write(&record)
            });
        if let Err(e) = recorded {
            tracing::error!(approval, "cannot record an approved call withheld: {e:#}");
        }
    }

    /// A held request whose approval ended as `ended` says: relayed if
    /// approved, refused if denied or expired, dropped if cancelled. Each
    /// ending is audited, once: a request already settled (e.g. cancelled
    /// when its client left) gives nothing.
    pub(super) fn settle(&self, held: Held, ended: anyhow::Result<Approval>) -> Delivery {
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
        let mut record = ApprovalRecord::new(&approval, jsonrpc_id, bound);
        // Approved, it runs only if its caller may still use the server:
        // a grant taken away while it waited is taken away from it too.
        let revoked = held
            .caller
            .as_ref()
            .filter(|_| approval.state == State::Approved && bound)
            .filter(|caller| !g.grants(caller, &held.exchange.server));
        if let Some(caller) = revoked {
            let stop = boundary::grant_stop(&caller.agent.id, &held.exchange.server);
            record.withheld = Some(stop.reason);
        }
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
        if let Some(why) = &record.withheld {
            let why = format!("Approved, but not relayed: {why}");
            return refused(DENIED, &why, data);
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

    /// Stops holding the request held under `key` for `approval` (and no
    /// other approval that took its key since).
    pub(super) fn unhold(&self, key: &str, approval: &str) -> Option<HeldEntry> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.get(key).is_some_and(|e| e.approval == approval) {
            held.remove(key)
        } else {
            None
        }
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
    pub(super) fn cancelled_by_client(&self, params: Option<&str>) {
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

    /// The request travelling `direction` that its transport named `pair`
    /// will not be answered (its asker went away, or it could not be
    /// delivered): it no longer holds a place among the requests in flight.
    pub fn unanswered(&self, direction: Direction, pair: u64) {
        if let Some(key) = paired(Some(pair)) {
            let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
            session.forget(direction, &key);
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
                let mut record = ApprovalRecord::new(&ended, jsonrpc_id, true);
                if ended.state == State::Approved {
                    // Approved as it was abandoned: it never runs.
                    record.withheld = Some(why.to_string());
                }
                metrics::global().approval(record.state);
                self.current().audit.write(&record)
            });
        if let Err(e) = cancelled {
            tracing::error!(approval, "cannot cancel the approval: {e:#}");
        }
    }
}

pub(super) fn held_arguments(exchange: &Exchange) -> serde_json::Value {
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
