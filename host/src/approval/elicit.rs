//! Asking the client's own user: for a held call whose approval rule says
//! `elicit = true`, and a client that declared the `elicitation` capability,
//! Portcullis sends the client an `elicitation/create` request of its own
//! (its id says it is Portcullis') showing the call, and reads the user's
//! answer as a decision. A client of the stateless 2026-07-28 revision is
//! answered `input_required` instead, carrying the same question and a
//! sealed receipt for the approval as `requestState` ([`crate::approval::receipt`]);
//! it asks its user and sends the request again with the answer in
//! `inputResponses`. The approval stays in the store meanwhile, so an
//! approver may still decide it on the page or in a terminal; whichever
//! comes first counts. The client is trusted to have asked its user, which
//! is why a rule must opt in.

use crate::approval::store::Approval;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// How Portcullis' own requests to the client are named.
const ID_PREFIX: &str = "portcullis-approval-";
/// The key of Portcullis' question among a request's `inputRequests`.
const INPUT_KEY: &str = "portcullis-approval";
/// The longest arguments (JSON text) a question shows. A call whose
/// arguments are longer is not put to the client's user: they would approve
/// what they were not shown.
const MAX_SHOWN: usize = 2000;

/// What the user answered.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Approve, with an optional comment.
    Approved(Option<String>),
    /// Refuse, saying why.
    Denied(String),
    /// No answer the call can go on: left to other approvers or its expiry.
    Undecided(String),
}

/// Portcullis' elicitation request for `approval`, and its JSON-RPC id (as
/// JSON text).
pub fn request(approval: &Approval) -> (String, String) {
    let name = format!("{ID_PREFIX}{}", approval.id);
    let text = json!({
        "jsonrpc": "2.0",
        "id": name,
        "method": "elicitation/create",
        "params": question(approval)
    })
    .to_string();
    (json!(name).to_string(), text)
}

/// The answer to request `id` asking the client to put `approval` to its
/// user and send the request again with `receipt` (2026-07-28
/// `input_required`).
pub fn input_required(id: Option<&RawValue>, approval: &Approval, receipt: &str) -> String {
    let result = json!({
        "resultType": "input_required",
        "inputRequests": {
            INPUT_KEY: { "method": "elicitation/create", "params": question(approval) }
        },
        "requestState": receipt
    });
    let id = id.map_or("null", RawValue::get);
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

/// The receipt a request sent again carries (its `requestState`).
pub fn request_state(params: &Value) -> Option<&str> {
    params["requestState"].as_str()
}

/// The user's answer a request sent again carries, if any.
pub fn input_answer(params: &Value) -> Option<Value> {
    params["inputResponses"]
        .get(INPUT_KEY)
        .filter(|answer| answer.is_object())
        .cloned()
}

/// `params` without the answer and state meant for Portcullis (the server
/// is sent the call as approved); `None` when there were none.
pub fn without_input(params: &Value) -> Option<Value> {
    let object = params.as_object()?;
    if !object.contains_key("inputResponses") && !object.contains_key("requestState") {
        return None;
    }
    let mut kept = object.clone();
    kept.remove("inputResponses");
    kept.remove("requestState");
    Some(Value::Object(kept))
}

/// Whether a call with these arguments (JSON text) can be put to the
/// client's user whole.
pub fn can_show(arguments: &str) -> bool {
    arguments.len() <= MAX_SHOWN
}

/// The elicitation (form mode) putting `approval`'s call to the user.
fn question(approval: &Approval) -> Value {
    let call = &approval.call;
    let what = call.tool.as_deref().unwrap_or(&call.method);
    let arguments = &call.arguments;
    let message = format!(
        "Portcullis holds a call for your approval.\n\n{} wants to call {what} on {} with:\n{arguments}\n\n{}: {}\n\nApprove this call, exactly as shown?",
        call.agent, call.server, call.policy, call.reason
    );
    let schema = json!({
        "type": "object",
        "properties": {
            "approve": {
                "type": "boolean",
                "title": "Approve",
                "description": "Run this call exactly as shown",
                "default": false
            },
            "comment": {
                "type": "string",
                "title": "Comment",
                "description": "Kept in the audit trail"
            }
        },
        "required": ["approve"]
    });
    json!({ "mode": "form", "message": message, "requestedSchema": schema })
}

/// The user's answer, from the client's result (or error) for the request.
pub fn answer(result: Option<&Value>, error: Option<&Value>) -> Answer {
    if let Some(error) = error {
        let why = error["message"].as_str().unwrap_or("an error");
        return Answer::Undecided(format!("the client could not ask its user: {why}"));
    }
    let Some(result) = result else {
        return Answer::Undecided("the client's answer is empty".into());
    };
    let comment = result["content"]["comment"]
        .as_str()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    match result["action"].as_str() {
        Some("accept") if result["content"]["approve"] == json!(true) => Answer::Approved(comment),
        Some("accept") => Answer::Denied(comment.unwrap_or_else(|| "not approved".into())),
        Some("decline") => Answer::Denied(comment.unwrap_or_else(|| "declined".into())),
        Some("cancel") => Answer::Denied("the user dismissed the question".into()),
        _ => Answer::Undecided("the client's answer has no action".into()),
    }
}

/// Whether a JSON-RPC id (as JSON text) names one of Portcullis' own
/// requests to the client.
pub fn is_ours(id: &str) -> bool {
    id.strip_prefix('"')
        .is_some_and(|name| name.starts_with(ID_PREFIX))
}

/// Who decided, as the approval and the audit trail name them.
pub fn decider(agent: &str) -> String {
    format!("user of {agent} (elicitation)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portcullis_knows_its_own_requests_by_their_ids() {
        let approval = crate::approval::store::tests::approval();
        let (id, text) = request(&approval);
        assert!(is_ours(&id));
        assert!(!is_ours("\"1\"") && !is_ours("7"));
        let sent: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(sent["method"], "elicitation/create");
        assert_eq!(sent["id"].to_string(), id);
        let message = sent["params"]["message"].as_str().unwrap();
        assert!(
            message.contains("bot wants to call delete on fs"),
            "{message}"
        );
    }

    #[test]
    fn a_request_sent_again_carries_the_answer_and_the_approval_it_resumes() {
        let approval = crate::approval::store::tests::approval();
        let id = RawValue::from_string("7".into()).unwrap();
        let asked: Value =
            serde_json::from_str(&input_required(Some(&id), &approval, "pcr1.x.y")).unwrap();
        assert_eq!(asked["result"]["resultType"], "input_required");
        assert_eq!(asked["result"]["requestState"], "pcr1.x.y");
        let question = &asked["result"]["inputRequests"][INPUT_KEY];
        assert_eq!(question["method"], "elicitation/create");
        let again = json!({
            "name": "delete",
            "arguments": {"path": "/x"},
            "requestState": "pcr1.x.y",
            "inputResponses": { INPUT_KEY: { "action": "accept", "content": {"approve": true} } }
        });
        assert_eq!(request_state(&again), Some("pcr1.x.y"));
        assert_eq!(input_answer(&again).unwrap()["action"], "accept");
        assert_eq!(
            without_input(&again).unwrap(),
            json!({"name": "delete", "arguments": {"path": "/x"}})
        );
        assert_eq!(without_input(&json!({"name": "delete"})), None);
    }

    #[test]
    fn arguments_too_long_to_show_whole_are_not_put_to_the_user() {
        assert!(can_show(&"a".repeat(MAX_SHOWN)));
        assert!(!can_show(&"a".repeat(MAX_SHOWN + 1)));
    }

    #[test]
    fn only_an_accepted_form_saying_approve_approves() {
        let accept = |content: Value| json!({ "action": "accept", "content": content });
        assert_eq!(
            answer(
                Some(&accept(json!({"approve": true, "comment": " ok "}))),
                None
            ),
            Answer::Approved(Some("ok".into()))
        );
        assert_eq!(
            answer(Some(&accept(json!({"approve": false}))), None),
            Answer::Denied("not approved".into())
        );
        assert_eq!(
            answer(Some(&accept(json!({"approve": "yes"}))), None),
            Answer::Denied("not approved".into())
        );
        assert_eq!(
            answer(Some(&json!({"action": "decline"})), None),
            Answer::Denied("declined".into())
        );
        assert!(matches!(
            answer(None, Some(&json!({"code": -32601, "message": "no"}))),
            Answer::Undecided(_)
        ));
    }
}
