//! JSON-RPC 2.0 message views for the relay: a borrowed view of one message
//! that keeps its members as raw JSON text (so a message nobody changed is
//! relayed byte for byte, whatever protocol revision it belongs to), the error
//! responses Portcullis sends, and payload replacement for `modify` verdicts.

use crate::contract::MessageKind;
use crate::protocol::strict_json;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use yoke::Yokeable;

/// Invalid JSON.
pub const PARSE_ERROR: i32 = -32700;
/// Valid JSON, but not a JSON-RPC message (or too large).
pub const INVALID_REQUEST: i32 = -32600;
/// JSON-RPC: the method does not exist (or is not offered to this peer).
pub const METHOD_NOT_FOUND: i32 = -32601;
/// The params are not what the method takes.
pub const INVALID_PARAMS: i32 = -32602;
/// Something went wrong inside Portcullis or upstream.
pub const INTERNAL_ERROR: i32 = -32603;
/// A policy refused the message (the default code of a denial).
pub const DENIED: i32 = -32001;
/// A policy failed and is configured fail-closed.
pub const POLICY_FAILED: i32 = -32002;
/// The audit trail could not record the message, so it was not relayed.
pub const AUDIT_FAILED: i32 = -32003;

/// One JSON-RPC message, its members still raw JSON.
#[derive(Debug, Clone, Deserialize, Yokeable)]
pub struct Message<'a> {
    /// The id; `None` when absent or `null`.
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    /// The method of a request or notification.
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    /// The params of a request or notification.
    #[serde(borrow, default)]
    pub params: Option<&'a RawValue>,
    /// The result of a successful answer.
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    /// The error of a failed answer.
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// Why a message cannot be judged: the error to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// [`PARSE_ERROR`] for text that is not JSON Portcullis reads as every
    /// peer does, [`INVALID_REQUEST`] for JSON that is not a message.
    pub code: i32,
    /// What the sender is told.
    pub message: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unreadable {}

impl<'a> Message<'a> {
    /// Parses one message (not a batch), refusing any text a peer could
    /// read differently ([`strict_json::check`]): what is judged is what
    /// the receiver reads.
    pub fn parse(text: &'a str) -> Result<Self, Unreadable> {
        if let Err(refusal) = strict_json::check(text) {
            let (code, kind) = if refusal.syntax {
                (PARSE_ERROR, "Parse error")
            } else {
                (INVALID_REQUEST, "Invalid Request")
            };
            return Err(Unreadable {
                code,
                message: format!("{kind}: {refusal}"),
            });
        }
        let invalid = |why: String| Unreadable {
            code: INVALID_REQUEST,
            message: format!("Invalid Request: {why}"),
        };
        // serde would read a struct from an array, by position.
        if !text.trim_start().starts_with('{') {
            return Err(invalid("a message is a JSON object".into()));
        }
        let message: Self = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if let Some(id) = message.id
            && !valid_id(id)
        {
            return Err(invalid(format!(
                "id {} is not a string or an integer of at most 2^53 - 1",
                id.get()
            )));
        }
        Ok(message)
    }

    /// The JSON-RPC shape, or `None` if this is not a valid message.
    pub fn kind(&self) -> Option<MessageKind> {
        match (&self.method, self.id, self.result, self.error) {
            (Some(_), Some(_), None, None) => Some(MessageKind::Request),
            (Some(_), None, None, None) => Some(MessageKind::Notification),
            (None, Some(_), Some(_), None) => Some(MessageKind::Result),
            (None, _, None, Some(_)) => Some(MessageKind::Error),
            _ => None,
        }
    }

    /// The member a `modify` verdict replaces, and its current value.
    pub fn payload(&self, kind: MessageKind) -> (&'static str, Option<&'a RawValue>) {
        match kind {
            MessageKind::Request | MessageKind::Notification => ("params", self.params),
            MessageKind::Result => ("result", self.result),
            MessageKind::Error => ("error", self.error),
        }
    }

    /// The params as a JSON value; `Null` when there are none.
    pub fn params_value(&self) -> Value {
        self.params
            .and_then(|params| serde_json::from_str(params.get()).ok())
            .unwrap_or_default()
    }

    /// For `tools/call`: the tool's name and its arguments, or why its
    /// params do not name a tool as the protocol says (a string `name`;
    /// `arguments`, if any, an object). A call Portcullis cannot attribute
    /// to a tool is refused, never judged as a call of no tool.
    pub fn tool_call(&self) -> Option<Result<ToolCall<'a>, String>> {
        #[derive(Deserialize)]
        struct CallParams<'a> {
            name: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            arguments: Option<&'a RawValue>,
        }
        if self.method.as_deref() != Some("tools/call") {
            return None;
        }
        let invalid = |why: &str| Some(Err(format!("Invalid params: tools/call {why}")));
        let Some(params) = self.params else {
            return invalid("has no params");
        };
        let Some(params) = from_object::<CallParams<'a>>(params) else {
            return invalid("params must be an object with a string 'name'");
        };
        let Some(name) = params.name else {
            return invalid("params must name the tool ('name')");
        };
        let arguments = params.arguments.filter(|a| a.get() != "null");
        if arguments.is_some_and(|a| !a.get().starts_with('{')) {
            return invalid("arguments must be an object");
        }
        Some(Ok(ToolCall {
            name: name.into_owned(),
            arguments,
        }))
    }
}

/// `raw` read as `T`, when it is a JSON object that fits. A struct also
/// deserializes from an array, by position (`["write_file", {...}]`), which
/// no MCP peer reads as that struct.
pub fn from_object<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    raw.get()
        .starts_with('{')
        .then(|| serde_json::from_str(raw.get()).ok())
        .flatten()
}

/// A `tools/call` request's tool and arguments.
#[derive(Debug)]
pub struct ToolCall<'a> {
    /// The tool's name.
    pub name: String,
    /// Its arguments (an object), as raw JSON.
    pub arguments: Option<&'a RawValue>,
}

/// The largest integer every peer reads exactly (JavaScript's
/// `Number.MAX_SAFE_INTEGER`).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Whether `id` is one every peer reads and writes back alike: a string, or
/// an integer written plainly within ±(2^53 - 1). (JSON-RPC allows
/// fractions, but `1.0` comes back from a JavaScript server as `1`.)
fn valid_id(id: &RawValue) -> bool {
    let text = id.get();
    text.starts_with('"')
        || text
            .parse::<i64>()
            .is_ok_and(|n| n.abs() <= MAX_SAFE_INTEGER)
}

/// An id as a key that two spellings of the same id share (`"\u0061"` and
/// `"a"`, `-0` and `0`), so an answer is matched to its request as the
/// peer that wrote it meant.
pub fn id_key(id: &RawValue) -> String {
    let text = id.get();
    if let Ok(n) = text.parse::<i64>() {
        return n.to_string();
    }
    serde_json::from_str::<String>(text)
        .ok()
        .and_then(|s| serde_json::to_string(&s).ok())
        .unwrap_or_else(|| text.to_string())
}

/// True if `text` is a JSON array (a batch) rather than a single message.
pub fn is_batch(text: &str) -> bool {
    text.trim_start().starts_with('[')
}

/// A JSON-RPC error response.
pub fn error_response(
    id: Option<&RawValue>,
    code: i32,
    message: &str,
    data: Option<Value>,
) -> String {
    let mut error = json!({ "code": code, "message": message });
    if let Some(data) = data {
        error["data"] = data;
    }
    let id = id.map_or(Cow::Borrowed("null"), |id| Cow::Borrowed(id.get()));
    format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{error}}}"#)
}

/// `text` with its `member` replaced by the JSON text `payload`; every other
/// member is kept.
pub fn replace_member(
    text: &str,
    member: &str,
    payload: &str,
) -> Result<String, serde_json::Error> {
    let mut message: Map<String, Value> = serde_json::from_str(text)?;
    message.insert(member.to_string(), serde_json::from_str(payload)?);
    serde_json::to_string(&message)
}

/// Finds the top-level `id` in the first bytes of a message too large to
/// parse whole, so its sender can still be answered. Works when `id` comes
/// before the bulk of the message, as it does in practice.
pub fn leading_id(prefix: &[u8]) -> Option<Box<RawValue>> {
    struct FindId<'a>(&'a mut Option<Box<RawValue>>);
    impl<'de> DeserializeSeed<'de> for FindId<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for FindId<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON-RPC object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == "id" {
                    *self.0 = Some(map.next_value::<Box<RawValue>>()?);
                    return Err(serde::de::Error::custom("found"));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_slice(prefix);
    let _ = FindId(&mut found).deserialize(&mut deserializer);
    found.filter(|id| usable_id(id))
}

/// Finds a top-level `id` written last in a message too large to parse
/// whole (as the TypeScript MCP SDK writes answers), from its last bytes.
pub fn trailing_id(suffix: &[u8]) -> Option<Box<RawValue>> {
    let text = String::from_utf8_lossy(suffix);
    // The message's own closing brace, then the value just before it.
    let body = text.trim_end().strip_suffix('}')?.trim_end();
    let start = if let Some(inner) = body.strip_suffix('"') {
        let mut end = inner.len();
        loop {
            let quote = inner[..end].rfind('"')?;
            let backslashes = inner[..quote]
                .chars()
                .rev()
                .take_while(|c| *c == '\\')
                .count();
            if backslashes % 2 == 0 {
                break quote;
            }
            end = quote;
        }
    } else {
        // The start of the number or literal: just after the last
        // character that cannot be part of one (which may be multi-byte).
        body.char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || "+-.".contains(*c)))
            .map(|(i, c)| i + c.len_utf8())?
    };
    let key = body[..start]
        .trim_end()
        .strip_suffix(':')?
        .trim_end()
        .strip_suffix("\"id\"")?;
    if !key.trim_end().ends_with([',', '{']) {
        return None;
    }
    serde_json::from_str::<Box<RawValue>>(&body[start..])
        .ok()
        .filter(|id| usable_id(id))
}

/// Whether an id found in part of a message may be answered and audited: a
/// string or an integer every peer reads alike (not `null`).
fn usable_id(id: &RawValue) -> bool {
    valid_id(id) && strict_json::check(id.get()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        let kind = |t: &str| Message::parse(t).unwrap().kind();
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            Some(MessageKind::Request)
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Some(MessageKind::Notification)
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#),
            Some(MessageKind::Result)
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}"#),
            Some(MessageKind::Error)
        );
        assert_eq!(kind(r#"{"jsonrpc":"2.0","result":{}}"#), None);
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":1,"method":"x","result":{}}"#),
            None
        );
    }

    #[test]
    fn reads_tool_calls() {
        let m = Message::parse(r#"{"id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/a"}}}"#).unwrap();
        let call = m.tool_call().unwrap().unwrap();
        assert_eq!(call.name, "read_file");
        assert_eq!(call.arguments.unwrap().get(), r#"{"path":"/a"}"#);
        let listed = Message::parse(r#"{"id":1,"method":"tools/list"}"#).unwrap();
        assert!(listed.tool_call().is_none());
    }

    #[test]
    fn a_call_that_names_no_tool_is_invalid_not_toolless() {
        for params in [
            "",
            r#","params":{}"#,
            r#","params":{"name":7}"#,
            r#","params":[]"#,
            r#","params":[""]"#,
            r#","params":["write_file",{"path":"/a"}]"#,
            r#","params":{"name":"x","arguments":"rm -rf"}"#,
            r#","params":{"name":"x","arguments":[1]}"#,
        ] {
            let text = format!(r#"{{"id":1,"method":"tools/call"{params}}}"#);
            let m = Message::parse(&text).unwrap();
            let why = m.tool_call().unwrap().unwrap_err();
            assert!(why.starts_with("Invalid params"), "{text}: {why}");
        }
        let escaped = Message::parse(
            r#"{"id":1,"method":"tools/call","params":{"name":"wr\u0069te","arguments":null}}"#,
        )
        .unwrap();
        let call = escaped.tool_call().unwrap().unwrap();
        assert_eq!(call.name, "write");
        assert!(call.arguments.is_none());
    }

    #[test]
    fn ambiguous_messages_are_refused_before_they_are_read() {
        let twice = Message::parse(
            r#"{"id":1,"method":"tools/call","params":{"name":"read","name":"write"}}"#,
        )
        .unwrap_err();
        assert_eq!(twice.code, INVALID_REQUEST);
        assert!(
            twice.message.contains("'name' appears more than once"),
            "{twice}"
        );
        let huge = Message::parse(r#"{"id":1,"method":"x","params":{"pad":1e400}}"#).unwrap_err();
        assert_eq!(huge.code, PARSE_ERROR);
        let not_a_message = Message::parse(r#"{"id":1,"method":5}"#).unwrap_err();
        assert_eq!(not_a_message.code, INVALID_REQUEST);
        let by_position = Message::parse(r#"[1,"tools/call",{"name":"x"}]"#).unwrap_err();
        assert_eq!(by_position.code, INVALID_REQUEST);
    }

    #[test]
    fn ids_are_strings_or_safe_integers_and_match_however_spelled() {
        for bad in [
            r#"{"x":1}"#,
            "[1]",
            "1.0",
            "1e2",
            "true",
            "9007199254740992",
            "-9007199254740992",
        ] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":{bad},"method":"ping"}}"#);
            let refused = Message::parse(&text).unwrap_err();
            assert_eq!(refused.code, INVALID_REQUEST, "{bad}");
        }
        for good in [r#""a""#, "0", "-7", "9007199254740991", r#""\ud83d\ude00""#] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":{good},"method":"ping"}}"#);
            assert!(Message::parse(&text).is_ok(), "{good}");
        }
        let key = |text: &str| id_key(&RawValue::from_string(text.into()).unwrap());
        assert_eq!(key(r#""\u0061""#), key(r#""a""#));
        assert_eq!(key("-0"), key("0"));
        assert_ne!(key("1"), key(r#""1""#));
    }

    #[test]
    fn error_responses_keep_the_id_verbatim() {
        let id: Box<RawValue> = serde_json::from_str(r#""req-7""#).unwrap();
        let text = error_response(Some(&id), DENIED, "no", Some(json!({"policy": "p"})));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], "req-7");
        assert_eq!(v["error"]["code"], DENIED);
        assert_eq!(v["error"]["data"]["policy"], "p");
        assert!(error_response(None, PARSE_ERROR, "bad", None).contains(r#""id":null"#));
    }

    #[test]
    fn replaces_one_member_and_keeps_the_rest() {
        let out = replace_member(
            r#"{"jsonrpc":"2.0","id":3,"result":{"a":1},"x":true}"#,
            "result",
            r#"{"b":2}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, json!({"jsonrpc":"2.0","id":3,"result":{"b":2},"x":true}));
    }

    #[test]
    fn finds_an_id_written_last() {
        let tail = |t: &str| trailing_id(t.as_bytes()).map(|id| id.get().to_string());
        assert_eq!(
            tail(r#"aaaa"}]},"jsonrpc":"2.0","id":12}"#).as_deref(),
            Some("12")
        );
        assert_eq!(
            tail("aa\"}, \"id\" : \"req-\\\"9\" }\n").as_deref(),
            Some(r#""req-\"9""#)
        );
        assert_eq!(
            tail(r#"xx","id":"inner"}}"#),
            None,
            "a nested id is not the message's"
        );
        assert_eq!(tail(r#"xx","id":null}"#), None);
        assert_eq!(tail(r#"xx","valid":3}"#), None);
        assert_eq!(tail("garbage"), None);
        assert_eq!(
            tail(r#"xx","id":1e400}"#),
            None,
            "unreadable ids are not used"
        );
        assert_eq!(tail(r#"xx","id":"\ud800"}"#), None);
    }

    #[test]
    fn a_multibyte_character_before_the_id_does_not_panic() {
        for text in [
            "\"b\":é1}",
            "é1}",
            "xé}",
            "\"id\":é}",
            ",\"id\":\u{1F600}7}",
            "€",
        ] {
            let _ = trailing_id(text.as_bytes());
        }
        assert_eq!(
            trailing_id("\"a\":\"é\",\"id\":5}".as_bytes())
                .map(|id| id.get().to_string())
                .as_deref(),
            Some("5")
        );
        // Cut inside a character: the lossy decoding must not shift indices.
        let mut cut = "ééé".as_bytes()[1..].to_vec();
        cut.extend_from_slice(b",\"id\":9}");
        assert_eq!(
            trailing_id(&cut).map(|id| id.get().to_string()).as_deref(),
            Some("9")
        );
    }

    #[test]
    fn finds_the_id_in_a_truncated_message() {
        let id =
            leading_id(br#"{"jsonrpc":"2.0","id":42,"result":{"content":[{"text":"aaaa"#).unwrap();
        assert_eq!(id.get(), "42");
        let id = leading_id(br#"{"result":{"x":1},"id":"s","jsonrpc":"#).unwrap();
        assert_eq!(id.get(), r#""s""#);
        assert!(leading_id(br#"{"jsonrpc":"2.0","result":{"content":"aaaa"#).is_none());
        assert!(leading_id(b"garbage").is_none());
        assert!(leading_id(br#"{"id":1e400,"result":{"#).is_none());
    }
}
