//! Portcullis' own listing of the server's tools in stdio mode, so that a
//! client that never lists them (it cached them, or skips `tools/list`)
//! has its first call judged knowing the tool's annotations. Once the
//! client has initialized, and whenever the server says its tools changed,
//! Portcullis asks the server for every page itself, under request ids of
//! its own (a random prefix no client can guess), and takes the answers out
//! of the server's output: the client never sees them. A client's first
//! tool call waits (briefly, bounded) for the first listing; a listing the
//! server leaves unanswered is given up on. An answer under one of its ids
//! never reaches the client, even one to a listing given up on or one over
//! the size limit.

use crate::contract::MessageKind;
use crate::protocol::framing::Frame;
use crate::protocol::jsonrpc::{self, Message};
use crate::surface::listing::{Paged, ToolPages};
use serde_json::value::RawValue;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The listings of one server's tools.
pub struct Survey {
    state: Mutex<State>,
    /// Signalled when the first listing is over.
    first_over: Condvar,
}

struct State {
    /// The random part of its request ids.
    nonce: String,
    /// What its request ids start with.
    prefix: String,
    /// Requests sent so far.
    sent: u64,
    /// The listing under way, if any.
    current: Option<Round>,
    /// Whether a first listing was made, or given up on.
    first_over: bool,
}

/// How long a listing may wait for an answer before it is given up on (a
/// server that never answers, or answers inside a batch).
const ROUND_WAIT: Duration = Duration::from_secs(30);

/// One listing under way.
struct Round {
    /// The id of its request in flight (canonical, [`jsonrpc::id_key`]).
    key: String,
    pages: ToolPages,
    /// Whether the tools changed again meanwhile: it is then done again.
    again: bool,
    /// When its request was sent.
    sent: Instant,
}

/// What the server's answer to Portcullis' own request means.
#[derive(Debug, Default)]
pub struct Answered {
    /// The listing, complete.
    pub listed: Option<Arc<RawValue>>,
    /// Why the listing failed.
    pub failed: Option<String>,
    /// The request to send the server next.
    pub send: Option<String>,
}

impl Default for Survey {
    fn default() -> Self {
        let nonce = crate::util::encode::hex(&rand::random::<[u8; 8]>());
        Self {
            state: Mutex::new(State {
                prefix: format!("portcullis-{nonce}-"),
                nonce,
                sent: 0,
                current: None,
                first_over: false,
            }),
            first_over: Condvar::new(),
        }
    }
}

impl Survey {
    /// Starts a listing: the request to send the server, unless one is
    /// under way (it is then done again once it ends).
    pub fn start(&self) -> Option<String> {
        let mut state = self.state();
        if let Some(round) = &mut state.current
            && round.sent.elapsed() < ROUND_WAIT
        {
            round.again = true;
            return None;
        }
        let pages = ToolPages::default();
        let (key, request) = state.next_request(&pages);
        state.current = Some(Round {
            key,
            pages,
            again: false,
            sent: Instant::now(),
        });
        Some(request)
    }

    /// If `frame`, from the server, answers one of Portcullis' own requests,
    /// takes it: what it means. An answer to an earlier listing (given up
    /// on), or one over the size limit, is taken too, so that no id of
    /// Portcullis' ever reaches the client. Anything else is the client's
    /// (`None`).
    pub fn take(&self, frame: &Frame) -> Option<Answered> {
        let mut state = self.state();
        if state.sent == 0 {
            return None;
        }
        let (key, message) = match frame {
            Frame::Line(line) => {
                // Cheap first: the id's random part, which no JSON writer
                // escapes.
                memchr::memmem::find(line, state.nonce.as_bytes())?;
                let message = std::str::from_utf8(line)
                    .ok()
                    .and_then(|t| Message::parse(t).ok())?;
                let answers = matches!(
                    message.kind(),
                    Some(MessageKind::Result | MessageKind::Error)
                );
                (
                    answers.then(|| message.id.map(jsonrpc::id_key))??,
                    Some(message),
                )
            }
            Frame::Oversized { prefix, suffix, .. } => {
                let id = jsonrpc::leading_id(prefix).or_else(|| jsonrpc::trailing_id(suffix))?;
                (jsonrpc::id_key(&id), None)
            }
        };
        if !key.starts_with(&format!("\"{}", state.prefix)) {
            return None;
        }
        let Some(round) = state.current.as_mut().filter(|round| round.key == key) else {
            // An answer to a listing given up on: dropped.
            return Some(Answered::default());
        };
        let paged = match message {
            None => Err(anyhow::anyhow!("its answer is over the size limit")),
            Some(Message {
                result: Some(result),
                ..
            }) => round.pages.add(result),
            Some(Message { error, .. }) => Err(anyhow::anyhow!(
                "the server answered tools/list with an error: {}",
                error.map_or("", |e| e.get())
            )),
        };
        let mut answered = Answered::default();
        match paged {
            Ok(Paged::More) => {
                let pages = std::mem::take(&mut round.pages);
                let (key, request) = state.next_request(&pages);
                state.current = Some(Round {
                    key,
                    pages,
                    again: round_again(&state.current),
                    sent: Instant::now(),
                });
                answered.send = Some(request);
                return Some(answered);
            }
            Ok(Paged::Done(listing)) => answered.listed = Some(listing),
            Err(e) => answered.failed = Some(format!("{e:#}")),
        }
        let again = round_again(&state.current);
        state.current = None;
        drop(state);
        if again {
            answered.send = self.start();
        }
        Some(answered)
    }

    /// Says a listing ended (learned from, or failed): calls waiting for
    /// the first one go on.
    pub fn ended(&self) {
        let mut state = self.state();
        if !state.first_over {
            state.first_over = true;
            self.first_over.notify_all();
        }
    }

    /// Whether a first listing was started and has not ended.
    pub fn first_under_way(&self) -> bool {
        let state = self.state();
        !state.first_over && state.sent > 0
    }

    /// Waits until the first listing has ended ([`Survey::ended`]), `wait`
    /// at most; past that, it is waited for no longer.
    pub fn await_first(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut state = self.state();
        while !state.first_over && state.sent > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                state.first_over = true;
                return;
            };
            state = self
                .first_over
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The next request for `pages`, under a new id: its key, and its text.
    fn next_request(&mut self, pages: &ToolPages) -> (String, String) {
        self.sent += 1;
        let id = serde_json::Value::String(format!("{}{}", self.prefix, self.sent)).to_string();
        let key = RawValue::from_string(id.clone()).map(|raw| jsonrpc::id_key(&raw));
        (key.unwrap_or_default(), pages.request(&id))
    }
}

fn round_again(round: &Option<Round>) -> bool {
    round.as_ref().is_some_and(|r| r.again)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn id_of(request: &str) -> Value {
        serde_json::from_str::<Value>(request).unwrap()["id"].clone()
    }

    fn answer(id: &Value, result: Value) -> Frame {
        line(json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    fn line(message: Value) -> Frame {
        Frame::Line(message.to_string().into_bytes())
    }

    #[test]
    fn every_page_is_listed_under_ids_of_its_own_and_the_clients_answers_pass() {
        let survey = Survey::default();
        let first = survey.start().unwrap();
        assert!(survey.first_under_way());
        let id = id_of(&first);
        assert!(id.as_str().unwrap().starts_with("portcullis-"));
        // The client's answers, even to a request with a similar id, are not taken.
        assert!(
            survey
                .take(&answer(&json!(1), json!({"tools": []})))
                .is_none()
        );
        assert!(
            survey
                .take(&answer(&json!("portcullis-1"), json!({"tools": []})))
                .is_none()
        );
        assert!(survey.take(&Frame::Line(b"not json".to_vec())).is_none());
        let next = survey.take(&answer(
            &id,
            json!({"tools": [{"name": "a"}], "nextCursor": "c"}),
        ));
        let next = next.unwrap().send.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&next).unwrap()["params"]["cursor"],
            "c"
        );
        assert_ne!(id_of(&next), id, "each page under a new id");
        // An id written with escapes is the same id.
        let escaped = id_of(&next).as_str().unwrap().replacen('p', "\\u0070", 1);
        let line = format!(
            r#"{{"jsonrpc":"2.0","id":"{escaped}","result":{{"tools":[{{"name":"b"}}]}}}}"#
        );
        let done = survey.take(&Frame::Line(line.into_bytes())).unwrap();
        let listed: Value = serde_json::from_str(done.listed.unwrap().get()).unwrap();
        assert_eq!(listed, json!({"tools": [{"name": "a"}, {"name": "b"}]}));
        assert!(done.send.is_none());
        // An answer to a listing no longer under way never reaches the client.
        let stale = survey.take(&answer(&id, json!({"tools": []}))).unwrap();
        assert!(stale.listed.is_none() && stale.failed.is_none() && stale.send.is_none());
    }

    #[test]
    fn tools_changing_during_a_listing_list_them_again_and_an_error_ends_one() {
        let survey = Survey::default();
        let first = survey.start().unwrap();
        assert!(survey.start().is_none(), "one at a time");
        let error = json!({"code": -32601, "message": "no"});
        let failed = survey
            .take(&line(
                json!({"jsonrpc": "2.0", "id": id_of(&first), "error": error}),
            ))
            .unwrap();
        assert!(failed.failed.unwrap().contains("error"));
        let again = failed
            .send
            .expect("listed again, as the tools changed meanwhile");
        let done = survey
            .take(&answer(&id_of(&again), json!({"tools": []})))
            .unwrap();
        assert!(done.listed.is_some() && done.send.is_none());
    }

    #[test]
    fn an_answer_over_the_size_limit_ends_the_listing_and_is_not_relayed() {
        let survey = Survey::default();
        let first = survey.start().unwrap();
        let prefix = format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{"tools":[{{"#,
            id_of(&first)
        );
        let oversized = Frame::Oversized {
            len: 1 << 30,
            prefix: prefix.into_bytes(),
            suffix: b"}]}}".to_vec(),
        };
        let taken = survey.take(&oversized).unwrap();
        assert!(taken.failed.unwrap().contains("size limit"));
        let theirs = Frame::Oversized {
            len: 1 << 30,
            prefix: br#"{"jsonrpc":"2.0","id":3,"result":{"#.to_vec(),
            suffix: b"}}".to_vec(),
        };
        assert!(
            survey.take(&theirs).is_none(),
            "the client's answer is the relay's"
        );
    }

    #[test]
    fn a_first_call_waits_for_the_first_listing_only_while_it_is_under_way() {
        let survey = Arc::new(Survey::default());
        survey.await_first(Duration::from_secs(60)); // none under way: no wait
        let first = survey.start().unwrap();
        let answering = survey.clone();
        let answerer = std::thread::spawn(move || {
            let answered = answering
                .take(&answer(&id_of(&first), json!({"tools": []})))
                .unwrap();
            // Answered, but not yet learned from: still under way.
            assert!(answering.first_under_way());
            answering.ended();
            answered
        });
        survey.await_first(Duration::from_secs(60));
        assert!(answerer.join().unwrap().listed.is_some());
        assert!(!survey.first_under_way());
        // A server that never answers is waited for once, not at every call.
        let silent = Survey::default();
        silent.start().unwrap();
        silent.await_first(Duration::from_millis(1));
        assert!(!silent.first_under_way());
    }
}
