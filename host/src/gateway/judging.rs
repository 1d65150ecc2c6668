//! Serve's side of judging. Each message is judged by its session's relay
//! for the server, as the view parsed when it arrived, on a blocking thread
//! (policies are WebAssembly and may take milliseconds). A call held for
//! approval waits here for its decision, and is cancelled, never run, if
//! its client goes away meanwhile.

use crate::contract::Direction;
use crate::protocol::jsonrpc::{INTERNAL_ERROR, error_response};
use crate::protocol::parsed::{NotParsed, Parsed};
use crate::relay::{Asking, Delivery, Read, Relay, Step};
use crate::upstream::Answer;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;
use tokio::sync::oneshot;

/// What the relay made of a message.
pub struct Judged<T> {
    /// What to pass on.
    pub forward: Option<Pass<T>>,
    /// What to answer its sender.
    pub reply: Option<String>,
}

/// A message to pass on.
pub enum Pass<T> {
    /// As it came.
    AsItCame(T),
    /// As the chain changed it, or as its approval released it.
    Changed(String),
}

/// A message as serve read it, in a form the judging thread can own.
pub trait Judgeable: Send + 'static {
    /// The relay's judgement of it.
    fn judged_by<'t>(
        &'t self,
        relay: &Relay,
        direction: Direction,
        asking: Asking,
        pair: Option<u64>,
    ) -> Step<'t>;
}

impl Judgeable for Parsed {
    fn judged_by<'t>(
        &'t self,
        relay: &Relay,
        direction: Direction,
        asking: Asking,
        pair: Option<u64>,
    ) -> Step<'t> {
        let read = Read::View(self.message());
        relay.judge_read(direction, self.text(), read, asking, pair)
    }
}

impl Judgeable for Arc<Parsed> {
    fn judged_by<'t>(
        &'t self,
        relay: &Relay,
        direction: Direction,
        asking: Asking,
        pair: Option<u64>,
    ) -> Step<'t> {
        (**self).judged_by(relay, direction, asking, pair)
    }
}

/// A server's answer on its way back to the client whose request it
/// answers, under that request's id (a shared upstream connection carries
/// it under another).
pub enum Returning {
    /// An answer read: `text` is how the client will read it (the answer
    /// with the client's `id` spliced in).
    Read {
        text: String,
        answer: Parsed,
        id: Box<RawValue>,
    },
    /// An answer Portcullis cannot read: refused, the client told under `id`.
    Unread {
        answer: NotParsed,
        id: Box<RawValue>,
    },
}

impl Returning {
    /// `answer`, to go back under the client's `id`.
    pub fn new(answer: Answer, id: Box<RawValue>) -> Self {
        match answer {
            Ok(answer) => Returning::Read {
                text: answer.with_id(&id),
                answer,
                id,
            },
            Err(answer) => Returning::Unread { answer, id },
        }
    }

    /// Portcullis' own error answer to the client's request `id`.
    pub fn error(id: Box<RawValue>, why: &str) -> Self {
        let text = error_response(Some(&id), INTERNAL_ERROR, why, None);
        Self::new(Parsed::parse(text), id)
    }

    /// The text the client reads.
    pub fn into_text(self) -> String {
        match self {
            Returning::Read { text, .. } => text,
            Returning::Unread { answer, .. } => answer.text,
        }
    }
}

impl Judgeable for Returning {
    fn judged_by<'t>(
        &'t self,
        relay: &Relay,
        direction: Direction,
        asking: Asking,
        pair: Option<u64>,
    ) -> Step<'t> {
        match self {
            Returning::Read { text, answer, id } => {
                let view = answer.view_with_id(id);
                relay.judge_read(direction, text, Read::View(&view), asking, pair)
            }
            Returning::Unread { answer, id } => {
                let read = Read::Unreadable(&answer.why, Some(id));
                relay.judge_read(direction, &answer.text, read, asking, pair)
            }
        }
    }
}

/// Judges `message` travelling `direction` with `relay`, off the async
/// workers; a held call waits here for its decision, which then replaces
/// the judgement. Should the client go away meanwhile (its HTTP request is
/// dropped), the call is cancelled, never run.
pub async fn judge<T: Judgeable>(
    relay: Arc<Relay>,
    direction: Direction,
    message: T,
    asking: Asking,
    pair: Option<u64>,
) -> Judged<T> {
    let judging = relay.clone();
    let judged = tokio::task::spawn_blocking(move || {
        let Step {
            forward,
            reply,
            held,
        } = message.judged_by(&judging, direction, asking, pair);
        let changed = forward.map(|forward| match forward {
            Cow::Borrowed(_) => None,
            Cow::Owned(changed) => Some(changed),
        });
        (message, changed, reply, held)
    })
    .await;
    let (message, changed, reply, held) = match judged {
        Ok(judged) => judged,
        // The relay turns its own failures into refusals; this is the task
        // itself failing (the runtime stopping).
        Err(e) => {
            tracing::error!("judging a message did not finish: {e}");
            let why = format!("Portcullis could not judge this message: {e}");
            let error = error_response(None, INTERNAL_ERROR, &why, None);
            return match direction {
                Direction::ClientToServer => Judged {
                    forward: None,
                    reply: Some(error),
                },
                Direction::ServerToClient => Judged {
                    forward: Some(Pass::Changed(error)),
                    reply: None,
                },
            };
        }
    };
    let Some(held) = held else {
        let forward = changed.map(|changed| match changed {
            None => Pass::AsItCame(message),
            Some(changed) => Pass::Changed(changed),
        });
        return Judged { forward, reply };
    };
    // Serve has no batches, so a message holds at most one call.
    let abandoned = Abandoned {
        relay: Some(relay.clone()),
        key: held.key.clone(),
    };
    let (settled, decision) = oneshot::channel();
    relay.on_decision(held, move |delivery| {
        let _ = settled.send(delivery);
    });
    let delivery: Delivery = decision.await.unwrap_or_default();
    abandoned.disarm();
    let text = |bytes: Option<Vec<u8>>| bytes.and_then(|b| String::from_utf8(b).ok());
    Judged {
        forward: text(delivery.forward).map(Pass::Changed),
        reply: text(delivery.reply),
    }
}

/// Cancels a held call if dropped armed: the future waiting for it was
/// dropped, because its client disconnected.
struct Abandoned {
    relay: Option<Arc<Relay>>,
    key: String,
}

impl Abandoned {
    fn disarm(mut self) {
        self.relay = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            let key = std::mem::take(&mut self.key);
            // Cancelling writes to the store and the trail: off the async
            // workers.
            tokio::task::spawn_blocking(move || {
                relay.cancel(&key, "the client disconnected");
            });
        }
    }
}
