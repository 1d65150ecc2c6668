//! The stateless 2026-07-28 revision of MCP over HTTP, as `portcullis
//! serve` speaks it: which requests belong to it (by `MCP-Protocol-Version`),
//! the per-request envelope a client must send (protocol version and client
//! capabilities in `params._meta`, `Mcp-Method` and `Mcp-Name` headers that
//! agree with the body), the envelope's removal before a message goes to a
//! server of an older revision, and the members this revision requires of
//! results (`resultType`, cache hints, the server's identity).

use crate::protocol::jsonrpc::{INVALID_PARAMS, METHOD_NOT_FOUND};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::StatusCode;
use hyper::header::HeaderMap;
use serde_json::{Map, Value, json};

/// The revision.
pub const VERSION: &str = "2026-07-28";
/// Revisions negotiated with `initialize` (and `Mcp-Session-Id`).
const HANDSHAKE_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// Methods of the handshake revisions that this one removed.
pub const REMOVED: &[&str] = &[
    "initialize",
    "notifications/initialized",
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
];
/// Methods whose results carry cache hints.
const CACHEABLE: &[&str] = &[
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

const VERSION_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const CAPABILITIES_KEY: &str = "io.modelcontextprotocol/clientCapabilities";
const SERVER_INFO_KEY: &str = "io.modelcontextprotocol/serverInfo";
const ENVELOPE_PREFIX: &str = "io.modelcontextprotocol/";

/// 2026-07-28: a routing header is missing or disagrees with the body.
const HEADER_MISMATCH: i32 = -32020;
/// 2026-07-28: the requested revision is not supported.
const UNSUPPORTED_VERSION: i32 = -32022;

/// Whether a request with this `MCP-Protocol-Version` is handled statelessly:
/// any revision that is not negotiated with `initialize`.
pub fn is_stateless(version: &[u8]) -> bool {
    !HANDSHAKE_VERSIONS.iter().any(|v| v.as_bytes() == version)
}

/// A request whose envelope is wrong: the error to answer with.
#[derive(Debug, PartialEq)]
pub struct Rejection {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON-RPC error code.
    pub code: i32,
    /// Why.
    pub message: String,
    /// Details for the client.
    pub data: Option<Value>,
}

impl Rejection {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            status: status_of(code),
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// The HTTP status this revision gives a JSON-RPC error code.
pub fn status_of(code: i32) -> StatusCode {
    match code {
        METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        -32700 | -32600 | INVALID_PARAMS | HEADER_MISMATCH | -32021 | UNSUPPORTED_VERSION => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::OK,
    }
}

/// Checks the envelope of a request with `method` and `params`, in the order
/// the revision gives: `_meta`, then headers against the body, then the
/// version.
pub fn check(headers: &HeaderMap, method: &str, params: &Value) -> Result<(), Rejection> {
    let meta = &params["_meta"];
    let (Some(version), true) = (
        meta[VERSION_KEY].as_str(),
        meta[CAPABILITIES_KEY].is_object(),
    ) else {
        return Err(Rejection::new(
            INVALID_PARAMS,
            format!("Invalid params: _meta must carry {VERSION_KEY} and {CAPABILITIES_KEY}"),
        ));
    };
    let header = |name: &str| -> Result<Option<String>, Rejection> {
        let mut values = headers.get_all(name).iter();
        let (value, again) = (values.next(), values.next());
        if again.is_some() {
            return Err(Rejection::new(
                HEADER_MISMATCH,
                format!("Header mismatch: {name} appears more than once"),
            ));
        }
        Ok(value.and_then(|v| v.to_str().ok()).and_then(decode_header))
    };
    let agree = |name: &str, expected: &str| -> Result<(), Rejection> {
        match header(name)? {
            Some(value) if value == expected => Ok(()),
            Some(value) => Err(Rejection::new(
                HEADER_MISMATCH,
                format!("Header mismatch: {name} is '{value}' but the body says '{expected}'"),
            )),
            None => Err(Rejection::new(
                HEADER_MISMATCH,
                format!("Header mismatch: {name} is required (the body says '{expected}')"),
            )),
        }
    };
    agree("mcp-protocol-version", version)?;
    agree("mcp-method", method)?;
    let named = match method {
        "tools/call" | "prompts/get" => Some(&params["name"]),
        "resources/read" => Some(&params["uri"]),
        _ => None,
    };
    if let Some(name) = named {
        agree("mcp-name", name.as_str().unwrap_or_default())?;
    }
    if version != VERSION {
        let mut rejection = Rejection::new(UNSUPPORTED_VERSION, "Unsupported protocol version");
        let mut supported = vec![VERSION];
        supported.extend(crate::gateway::PROTOCOL_VERSIONS);
        rejection.data = Some(json!({ "supported": supported, "requested": version }));
        return Err(rejection);
    }
    Ok(())
}

/// A header value, decoded if it is `=?base64?…?=` (UTF-8 that is not plain
/// printable ASCII); `None` if that encoding is malformed or not canonical.
fn decode_header(value: &str) -> Option<String> {
    let Some(payload) = value
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    else {
        return Some(value.to_string());
    };
    let bytes = STANDARD.decode(payload).ok()?;
    (STANDARD.encode(&bytes) == payload)
        .then(|| String::from_utf8(bytes).ok())
        .flatten()
}

/// Whether the client's envelope declares it can ask its user
/// (elicitation), so a held call may be answered `input_required`.
pub fn elicits(params: &Value) -> bool {
    params["_meta"][CAPABILITIES_KEY]["elicitation"].is_object()
}

/// `params` without this revision's envelope keys in `_meta` (a server of an
/// older revision is sent what it knows; the client's envelope is between it
/// and Portcullis). `None` when there was nothing to remove.
pub fn without_envelope(params: &Value) -> Option<Value> {
    let meta = params["_meta"].as_object()?;
    if !meta.keys().any(|key| key.starts_with(ENVELOPE_PREFIX)) {
        return None;
    }
    let kept: Map<String, Value> = meta
        .iter()
        .filter(|(key, _)| !key.starts_with(ENVELOPE_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut params = params.clone();
    let object = params.as_object_mut()?;
    if kept.is_empty() {
        object.remove("_meta");
    } else {
        object.insert("_meta".into(), Value::Object(kept));
    }
    Some(params)
}

/// An answer to `method` with the members this revision requires of a
/// result: `resultType`, cache hints where the method is cacheable (never
/// shared: what an agent sees depends on its grants), and who answered;
/// with the HTTP status this revision gives it.
pub fn complete(answer: &str, method: &str, server_info: &Value) -> (String, StatusCode) {
    let Ok(mut message) = serde_json::from_str::<Map<String, Value>>(answer) else {
        return (answer.to_string(), StatusCode::OK);
    };
    let Some(result) = message.get_mut("result").and_then(Value::as_object_mut) else {
        let code = message.get("error").and_then(|e| e["code"].as_i64());
        let status = code.map_or(StatusCode::OK, |code| status_of(code as i32));
        return (answer.to_string(), status);
    };
    result
        .entry("resultType")
        .or_insert_with(|| json!("complete"));
    if CACHEABLE.contains(&method) {
        result.entry("ttlMs").or_insert_with(|| json!(0));
        result
            .entry("cacheScope")
            .or_insert_with(|| json!("private"));
    }
    if let Some(meta) = result
        .entry("_meta")
        .or_insert_with(|| json!({}))
        .as_object_mut()
    {
        meta.entry(SERVER_INFO_KEY)
            .or_insert_with(|| server_info.clone());
    }
    (Value::Object(message).to_string(), StatusCode::OK)
}

/// The result of `server/discover`.
pub fn discovery(capabilities: Map<String, Value>, instructions: Option<&str>) -> Value {
    let mut result = json!({
        "supportedVersions": [VERSION],
        "capabilities": capabilities,
    });
    if let Some(instructions) = instructions {
        result["instructions"] = json!(instructions);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn params(version: &str, extra: Value) -> Value {
        let mut params = json!({"_meta": {VERSION_KEY: version, CAPABILITIES_KEY: {}}});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        params
    }

    const GOOD: &[(&str, &str)] = &[
        ("mcp-protocol-version", VERSION),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
    ];

    #[test]
    fn the_handshake_revisions_are_not_stateless() {
        assert!(!is_stateless(b"2025-06-18") && !is_stateless(b"2025-11-25"));
        assert!(is_stateless(b"2026-07-28") && is_stateless(b"2027-01-01"));
    }

    #[test]
    fn a_request_whose_headers_agree_with_its_body_passes() {
        let call = params(VERSION, json!({"name": "echo"}));
        assert_eq!(check(&headers(GOOD), "tools/call", &call), Ok(()));
        let encoded = format!("=?base64?{}?=", STANDARD.encode("héllo"));
        let unicode = params(VERSION, json!({"name": "héllo"}));
        let sent = headers(&[GOOD[0], GOOD[1], ("mcp-name", &encoded)]);
        assert_eq!(check(&sent, "tools/call", &unicode), Ok(()));
    }

    #[test]
    fn envelope_errors_come_in_the_revisions_order() {
        let code = |sent: &[(&'static str, &str)], method: &str, params: &Value| {
            let rejection = check(&headers(sent), method, params).unwrap_err();
            (rejection.status.as_u16(), rejection.code)
        };
        let call = params(VERSION, json!({"name": "echo"}));
        assert_eq!(
            code(GOOD, "tools/call", &json!({"name": "echo"})),
            (400, -32602)
        );
        assert_eq!(code(&GOOD[..2], "tools/call", &call), (400, -32020));
        let other = params(VERSION, json!({"name": "rm"}));
        assert_eq!(code(GOOD, "tools/call", &other), (400, -32020));
        assert_eq!(code(GOOD, "tools/list", &call), (400, -32020));
        let twice = [GOOD[0], GOOD[1], GOOD[2], ("mcp-name", "echo")];
        assert_eq!(code(&twice, "tools/call", &call), (400, -32020));
        let bad_base64 = [GOOD[0], GOOD[1], ("mcp-name", "=?base64?ZWNobw?=")];
        assert_eq!(code(&bad_base64, "tools/call", &call), (400, -32020));
        let future = params("2099-01-01", json!({"name": "echo"}));
        let sent = [("mcp-protocol-version", "2099-01-01"), GOOD[1], GOOD[2]];
        let rejection = check(&headers(&sent), "tools/call", &future).unwrap_err();
        assert_eq!(rejection.code, -32022);
        assert_eq!(rejection.data.unwrap()["supported"][0], VERSION);
    }

    #[test]
    fn the_envelope_is_removed_and_other_meta_kept() {
        let sent = params(VERSION, json!({"name": "echo"}));
        assert_eq!(without_envelope(&sent).unwrap(), json!({"name": "echo"}));
        let mut traced = sent.clone();
        traced["_meta"]["progressToken"] = json!(7);
        assert_eq!(
            without_envelope(&traced).unwrap(),
            json!({"name": "echo", "_meta": {"progressToken": 7}})
        );
        assert_eq!(without_envelope(&json!({"name": "echo"})), None);
    }

    #[test]
    fn results_get_the_members_the_revision_requires() {
        let info = json!({"name": "portcullis", "version": "1"});
        let (listed, status) = complete(
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#,
            "tools/list",
            &info,
        );
        assert_eq!(status, StatusCode::OK);
        let listed: Value = serde_json::from_str(&listed).unwrap();
        assert_eq!(listed["result"]["resultType"], "complete");
        assert_eq!(listed["result"]["ttlMs"], 0);
        assert_eq!(listed["result"]["cacheScope"], "private");
        assert_eq!(listed["result"]["_meta"][SERVER_INFO_KEY], info);
        let (called, _) = complete(
            r#"{"jsonrpc":"2.0","id":2,"result":{"content":[]}}"#,
            "tools/call",
            &info,
        );
        assert!(!called.contains("ttlMs") && called.contains(r#""resultType":"complete""#));
        let denied = r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"no"}}"#;
        assert_eq!(
            complete(denied, "tools/call", &info),
            (denied.into(), StatusCode::OK)
        );
        let unknown = r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"no"}}"#;
        assert_eq!(complete(unknown, "x/y", &info).1, StatusCode::NOT_FOUND);
    }
}
