//! Server requests for agents of the stateless 2026-07-28 revision, which
//! keep no stream open to be asked on. When a server asks something while
//! it works on such an agent's call, the call is parked (kept running) and
//! the agent is answered `input_required`, carrying the server's request
//! and a `requestState` that names the parked call; the agent sends its
//! request again with its answer in `inputResponses` and that state, and
//! the answer goes to the server (judged and audited) while the call goes
//! on. The state is a random handle (128 bits) valid only in the agent's own
//! session and once; a parked call its agent does not come back for within
//! the request timeout is cancelled, and the server told.

use crate::gateway::calls::{Aborting, Call, Next};
use crate::gateway::inbound;
use crate::gateway::sessions::ClientSession;
use crate::identity::Identity;
use crate::protocol::jsonrpc::{self, INVALID_PARAMS};
use crate::protocol::parsed::Parsed;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

/// What a `requestState` naming a parked call starts with.
const STATE_PREFIX: &str = "pcp1.";
/// How many calls one session may have parked at once.
const MOST_PARKED: usize = 16;

/// A call waiting for its agent to answer a server's request.
pub struct Parked {
    call: Call,
    /// The method and tool it was, which the request sent again must be.
    what: (String, Option<String>),
    /// The key of the server's request shown to the agent: the one answer
    /// taken when it comes back.
    asked: String,
    /// Gives it up at its deadline; ended with it.
    _deadline: Aborting<()>,
}

/// A session's parked calls, by the handle in their `requestState`.
#[derive(Default)]
pub struct Lot(HashMap<String, Parked>);

/// Whether `params` carries a `requestState` naming a parked call.
pub fn resumes(params: &Value) -> bool {
    params["requestState"]
        .as_str()
        .is_some_and(|state| state.starts_with(STATE_PREFIX))
}

/// What a request is, for matching it when it is sent again: its method and
/// tool (or prompt, or resource).
pub fn what(method: &str, params: &Value) -> (String, Option<String>) {
    let named = params["name"].as_str().or_else(|| params["uri"].as_str());
    (method.to_string(), named.map(str::to_string))
}

/// Runs `call` (the request `id` of `session`, which is `what`) until it is
/// answered, or until its server asks the agent something: then the call is
/// parked and the answer is `input_required`.
pub async fn drive(
    session: &Arc<ClientSession>,
    mut call: Call,
    id: &RawValue,
    what: (String, Option<String>),
    wait: Duration,
) -> Option<String> {
    loop {
        match call.next().await {
            Next::Answer(answer) => {
                return answer.map(|answer| under_id(answer, id));
            }
            Next::Event(event) => {
                let Some((key, request)) = server_request(&event) else {
                    // Progress and logging have no stream to go on.
                    continue;
                };
                let Some(handle) = park(session, (call, what, key.clone()), wait) else {
                    let why = "too many calls of this agent are waiting for its input";
                    return Some(jsonrpc::error_response(
                        Some(id),
                        jsonrpc::INVALID_REQUEST,
                        why,
                        None,
                    ));
                };
                let mut requests = Map::new();
                requests.insert(key, request);
                let result = json!({
                    "resultType": "input_required",
                    "inputRequests": requests,
                    "requestState": format!("{STATE_PREFIX}{handle}"),
                });
                return Some(format!(
                    r#"{{"jsonrpc":"2.0","id":{},"result":{result}}}"#,
                    id.get()
                ));
            }
        }
    }
}

/// The request `id` of `session`, which is `what`, sent again by `caller`
/// with the agent's `inputResponses` and the `requestState` of a parked
/// call: the answers go to the server (as `caller`'s), and the call goes on
/// as [`drive`] says.
pub async fn resume(
    session: &Arc<ClientSession>,
    caller: &Identity,
    params: &Value,
    id: &RawValue,
    what: (String, Option<String>),
    wait: Duration,
) -> Option<String> {
    let refuse = |why: &str| {
        let why = format!("Invalid params: {why}");
        Some(jsonrpc::error_response(
            Some(id),
            INVALID_PARAMS,
            &why,
            None,
        ))
    };
    let state = params["requestState"].as_str().unwrap_or_default();
    let handle = state.strip_prefix(STATE_PREFIX).unwrap_or_default();
    let Some(parked) = unpark(session, handle) else {
        return refuse("requestState names no call of this agent waiting for input");
    };
    if parked.what != what {
        // Not the request it was issued for: that call is given up.
        return refuse("requestState was issued for another request");
    }
    // Only the request this call was parked on is answered: not another
    // parked call's, and nothing named at random.
    let response = &params["inputResponses"][parked.asked.as_str()];
    if let Ok(key) = parked.asked.parse::<u64>()
        && !response.is_null()
    {
        let answer = json!({ "jsonrpc": "2.0", "id": key, "result": response }).to_string();
        if let Ok(answer) = Parsed::parse(answer) {
            inbound::answered(session, answer, caller).await;
        }
    }
    drive(session, parked.call, id, parked.what, wait).await
}

/// The key and the request (method and params) of an event that is a
/// server's request to the agent.
fn server_request(event: &str) -> Option<(String, Value)> {
    let message: Value = serde_json::from_str(event).ok()?;
    let id = message.get("id")?;
    let method = message.get("method")?;
    let mut request = json!({ "method": method });
    if let Some(params) = message.get("params") {
        request["params"] = params.clone();
    }
    Some((id.to_string(), request))
}

/// `answer` under the id of the request it now answers.
fn under_id(answer: String, id: &RawValue) -> String {
    match Parsed::parse(answer) {
        Ok(parsed) => parsed.with_id(id),
        Err(unread) => unread.text,
    }
}

/// Parks a call (which is `what`, waiting for its agent to answer the
/// request `asked`) in `session` for `wait` at most: a call its agent does
/// not come back for in time is cancelled (dropped), and its server told.
fn park(
    session: &Arc<ClientSession>,
    (call, what, asked): (Call, (String, Option<String>), String),
    wait: Duration,
) -> Option<String> {
    let mut lot = lot(session);
    if lot.0.len() >= MOST_PARKED {
        return None;
    }
    let handle = crate::util::encode::hex(&rand::random::<[u8; 16]>());
    let (parked_in, parked_as) = (Arc::downgrade(session), handle.clone());
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if let Some(session) = parked_in.upgrade() {
            let expired = self::lot(&session).0.remove(&parked_as);
            drop(expired);
        }
    });
    let parked = Parked {
        call,
        what,
        asked,
        _deadline: Aborting(deadline),
    };
    lot.0.insert(handle.clone(), parked);
    Some(handle)
}

fn unpark(session: &ClientSession, handle: &str) -> Option<Parked> {
    lot(session).0.remove(handle)
}

fn lot(session: &ClientSession) -> std::sync::MutexGuard<'_, Lot> {
    session
        .parked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_request_becomes_an_input_request_under_its_id() {
        let event = r#"{"jsonrpc":"2.0","id":3,"method":"roots/list","params":{}}"#;
        let (key, request) = server_request(event).unwrap();
        assert_eq!(key, "3");
        assert_eq!(request, json!({"method": "roots/list", "params": {}}));
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#;
        assert!(
            server_request(progress).is_none(),
            "a notification asks nothing"
        );
    }

    #[test]
    fn only_a_parked_calls_state_resumes_and_requests_are_matched_by_what_they_are() {
        assert!(resumes(&json!({"requestState": "pcp1.00ff"})));
        assert!(
            !resumes(&json!({"requestState": "pcr1.receipt"})),
            "an approval's receipt"
        );
        assert!(!resumes(&json!({"requestState": 7})));
        let call = what("tools/call", &json!({"name": "echo"}));
        assert_eq!(call, ("tools/call".to_string(), Some("echo".to_string())));
        assert_ne!(call, what("tools/call", &json!({"name": "rm"})));
        assert_eq!(
            what("resources/read", &json!({"uri": "a://b"}))
                .1
                .as_deref(),
            Some("a://b")
        );
    }
}
