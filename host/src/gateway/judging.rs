//! Serve's side of judging. Each message is judged by its session's relay
//! for the server, as the view parsed when it arrived, on a blocking thread
//! (policies are WebAssembly and may take milliseconds). A call held for
//! approval waits here for its decision, and is cancelled, never run, if
//! its client goes away meanwhile.

use crate::contract::{Direction, MessageKind};
use crate::protocol::jsonrpc::{INTERNAL_ERROR, INVALID_REQUEST, Unreadable, error_response};
use crate::protocol::parsed::{NotParsed, Parsed};
use crate::relay::{Arrival, Delivery, Read, Relay, Step};
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
    fn judged_by<'t>(&'t self, relay: &Relay, direction: Direction, arrival: &Arrival) -> Step<'t>;
}

impl Judgeable for Parsed {
    fn judged_by<'t>(&'t self, relay: &Relay, direction: Direction, arrival: &Arrival) -> Step<'t> {
        let read = Read::View(self.message());
        relay.judge_read(direction, self.text(), read, arrival)
    }
}

impl Judgeable for Arc<Parsed> {
    fn judged_by<'t>(&'t self, relay: &Relay, direction: Direction, arrival: &Arrival) -> Step<'t> {
        (**self).judged_by(relay, direction, arrival)
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
    /// `answer`, to go back under the client's `id`. A reply that is not an
    /// answer (a request or notification in its place) is refused as an
    /// unusable one: it must not reach the client as an answer, nor be
    /// given the client's id.
    pub fn new(answer: Answer, id: Box<RawValue>) -> Self {
        match answer {
            Ok(answer) if answers(&answer) => Returning::Read {
                text: answer.with_id(&id),
                answer,
                id,
            },
            Ok(other) => {
                let why = Unreadable {
                    code: INVALID_REQUEST,
                    message:
                        "Invalid Request: the server replied with something other than an answer"
                            .into(),
                };
                let answer = NotParsed {
                    text: other.into_text(),
                    why,
                };
                Returning::Unread { answer, id }
            }
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
    fn judged_by<'t>(&'t self, relay: &Relay, direction: Direction, arrival: &Arrival) -> Step<'t> {
        match self {
            Returning::Read { text, answer, id } => {
                let view = answer.view_with_id(id);
                relay.judge_read(direction, text, Read::View(&view), arrival)
            }
            Returning::Unread { answer, id } => {
                let read = Read::Unreadable(&answer.why, Some(id));
                relay.judge_read(direction, &answer.text, read, arrival)
            }
        }
    }
}

/// Whether `message` is an answer: a result or an error.
fn answers(message: &Parsed) -> bool {
    matches!(
        message.message().kind(),
        Some(MessageKind::Result | MessageKind::Error)
    )
}

/// Judges `message` travelling `direction` with `relay`, as it came
/// (`arrival`), off the async workers; a held call waits here for its
/// decision, which then replaces the judgement. Should the client go away
/// meanwhile (its HTTP request is dropped), the call is cancelled, never
/// run.
pub async fn judge<T: Judgeable>(
    relay: Arc<Relay>,
    direction: Direction,
    message: T,
    arrival: Arrival,
) -> Judged<T> {
    let judging = relay.clone();
    let judged = tokio::task::spawn_blocking(move || {
        let Step {
            forward,
            reply,
            held,
        } = message.judged_by(&judging, direction, &arrival);
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
    let key = held.key.clone();
    let cancelling = relay.clone();
    let abandoned = Armed::new(move || {
        // Cancelling writes to the store and the trail: off the async
        // workers.
        tokio::task::spawn_blocking(move || {
            cancelling.cancel(&key, "the client disconnected");
        });
    });
    let (settled, decision) = oneshot::channel();
    relay.on_decision(held, move |delivery| settled.send(delivery).is_ok());
    let delivery: Delivery = decision.await.unwrap_or_default();
    abandoned.disarm();
    let text = |bytes: Option<Vec<u8>>| bytes.and_then(|b| String::from_utf8(b).ok());
    Judged {
        forward: text(delivery.forward).map(Pass::Changed),
        reply: text(delivery.reply),
    }
}

/// Runs its action if dropped armed: the future holding it was dropped,
/// because its client disconnected.
pub struct Armed<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Armed<F> {
    /// Armed with `action`.
    pub fn new(action: F) -> Self {
        Self(Some(action))
    }

    /// Dropped without acting.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for Armed<F> {
    fn drop(&mut self) {
        if let Some(action) = self.0.take() {
            action();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_id() -> Box<RawValue> {
        RawValue::from_string(r#""c-1""#.into()).unwrap()
    }

    #[test]
    fn an_answer_goes_back_under_the_clients_id() {
        let answer = Parsed::parse(r#"{"jsonrpc":"2.0","id":41,"result":{}}"#.into());
        let returning = Returning::new(answer, client_id());
        assert!(matches!(returning, Returning::Read { .. }));
        assert_eq!(
            returning.into_text(),
            r#"{"jsonrpc":"2.0","id":"c-1","result":{}}"#
        );
    }

    #[test]
    fn a_reply_that_is_not_an_answer_is_never_given_the_clients_id() {
        for reply in [
            r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":41,"method":"sampling/createMessage","params":{}}"#,
        ] {
            let returning = Returning::new(Parsed::parse(reply.into()), client_id());
            let Returning::Unread { answer, .. } = returning else {
                panic!("{reply} was taken as an answer");
            };
            assert_eq!(answer.text, reply);
            assert_eq!(answer.why.code, INVALID_REQUEST);
        }
    }
}
