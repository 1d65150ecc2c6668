//! A client's request handled as a task of its own: what the server sends
//! about it meanwhile comes out first, then its answer. The client can
//! cancel it by its id (`notifications/cancelled`), and it is aborted when
//! its client goes away; either way the server is told it is cancelled.

use crate::gateway::Gateway;
use crate::gateway::inbound::Outlet;
use crate::gateway::sessions::ClientSession;
use crate::identity::Identity;
use crate::protocol::jsonrpc;
use crate::protocol::parsed::Parsed;
use crate::relay::Asking;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// How many of a call's events may wait for its client to read them.
const EVENTS: usize = 32;

/// A request being handled.
pub struct Call {
    events: mpsc::Receiver<String>,
    answer: Aborting<Option<String>>,
    /// The request's id, for the error answer should handling it fail.
    id: Option<Box<serde_json::value::RawValue>>,
}

/// What a call yields next.
pub enum Next {
    /// A message the server sent about it, for the client.
    Event(String),
    /// Its answer; `None` if the client cancelled it.
    Answer(Option<String>),
}

impl Call {
    /// Starts handling `request` of `session`, sent by `caller`, with
    /// `gateway`. Messages the server sends about it are relayed only if
    /// the client `streams` (accepts an event stream); otherwise its
    /// requests are refused.
    pub fn start(
        gateway: Arc<Gateway>,
        session: Arc<ClientSession>,
        (request, caller): (Parsed, Identity),
        asking: Asking,
        streams: bool,
    ) -> Self {
        let (outlet, events) = mpsc::channel(EVENTS);
        let cancel = Arc::new(Notify::new());
        let id = request.message().id.map(ToOwned::to_owned);
        let key = id.as_deref().map(jsonrpc::id_key);
        let registration = key.map(|key| Registration::new(session.clone(), key, &cancel));
        let task = tokio::spawn(async move {
            let _registration = registration;
            let outlet: Option<Outlet> = streams.then_some(outlet);
            tokio::select! {
                answer = gateway.handle(&session, request, &caller, asking, outlet.as_ref()) => answer,
                () = cancel.notified() => None,
            }
        });
        Self {
            events,
            answer: Aborting(task),
            id,
        }
    }

    /// The next event, or the answer once no event is left.
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            biased;
            Some(event) = self.events.recv() => Next::Event(event),
            answer = &mut self.answer => Next::Answer(match answer {
                Ok(answer) => answer,
                // A failure inside Portcullis (never an input's due): the
                // client is told, and it is logged.
                Err(e) => {
                    tracing::error!("handling a request failed inside Portcullis: {e}");
                    let why = "Portcullis failed while handling this request";
                    Some(jsonrpc::error_response(self.id.as_deref(), jsonrpc::INTERNAL_ERROR, why, None))
                }
            }),
        }
    }
}

/// A call known to its session by its id while it runs.
struct Registration {
    session: Arc<ClientSession>,
    key: String,
    cancel: Arc<Notify>,
}

impl Registration {
    fn new(session: Arc<ClientSession>, key: String, cancel: &Arc<Notify>) -> Self {
        session
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), cancel.clone());
        Self {
            session,
            key,
            cancel: cancel.clone(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut calls = self
            .session
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A later call under the same id stays.
        if calls
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cancel))
        {
            calls.remove(&self.key);
        }
    }
}

/// A task aborted when this is dropped.
pub struct Aborting<T>(pub JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Aborting<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}
