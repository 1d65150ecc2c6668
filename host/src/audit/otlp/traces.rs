//! Decisions as OpenTelemetry spans: a batch becomes one OTLP
//! `ExportTraceServiceRequest` (protobuf, for OTLP/HTTP `/v1/traces`). Each
//! message record is a span named after its method and tool, ending when the
//! decision was made and lasting as long as the policy chain took, with a
//! child span per policy in chain order; its fields are attributes
//! `portcullis.FIELD`, plus `mcp.method.name` and `gen_ai.tool.name` as
//! OpenTelemetry's semantic conventions name them, and a refusal has an
//! error status. A decision joins the agent's trace when the agent sent a
//! W3C `traceparent` in the message's `params._meta` (the record's `trace`);
//! otherwise it is a trace of its own whose id is the record's id. Event
//! records (reloads, approvals, sessions, checkpoints) are logs, not spans.

use super::{
    attributes, envelope, field_bytes, field_fixed64, field_varint, key_value, record_time,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `Span.SpanKind.SPAN_KIND_INTERNAL`.
const INTERNAL: u64 = 1;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const ERROR: u64 = 2;

/// The protobuf body of an OTLP/HTTP traces export of `records` (JSON
/// texts).
pub fn export(records: &[String]) -> Vec<u8> {
    let records = records
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r).ok());
    envelope(records.flat_map(|record| spans(&record)))
}

/// The W3C `traceparent` an MCP message carries in its `params._meta`, if
/// it carries a valid one.
pub fn traceparent(params: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<Meta>,
    }
    #[derive(Deserialize)]
    struct Meta {
        traceparent: Option<String>,
    }
    // Most messages carry none: no parse for them.
    if !params.contains("traceparent") {
        return None;
    }
    let params: Params = serde_json::from_str(params).ok()?;
    let traceparent = params.meta?.traceparent?;
    parse_traceparent(&traceparent).map(|_| traceparent)
}

/// The trace id and parent span id of a `traceparent`
/// (`00-TRACEID-SPANID-FLAGS`, neither id all zeros).
fn parse_traceparent(text: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || flags.len() != 2 {
        return None;
    }
    let trace = unhex(trace).filter(|t| t.len() == 16 && t.iter().any(|b| *b != 0))?;
    let parent = unhex(parent).filter(|p| p.len() == 8 && p.iter().any(|b| *b != 0))?;
    unhex(flags)?;
    Some((trace, parent))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A span id made from the record's id and which span of it this is.
fn span_id(record_id: &str, part: usize) -> Vec<u8> {
    let digest = Sha256::digest(format!("{record_id}/{part}").as_bytes());
    digest[..8].to_vec()
}

/// The spans of a message record: its decision and its policies (none for
/// an event record).
fn spans(record: &Value) -> Vec<Vec<u8>> {
    let (Some(id), Some(end)) = (record["id"].as_str(), record_time(record)) else {
        return Vec::new();
    };
    if record.get("event").is_some() || record.get("outcome").is_none() {
        return Vec::new();
    }
    let (trace, parent) = match record["trace"].as_str().and_then(parse_traceparent) {
        Some((trace, parent)) => (trace, Some(parent)),
        None => match uuid::Uuid::parse_str(id) {
            Ok(uuid) => (uuid.as_bytes().to_vec(), None),
            Err(_) => return Vec::new(),
        },
    };
    let start = end.saturating_sub(micros(&record["latency_us"]));
    let method = record["method"].as_str();
    let tool = record["tool"].as_str();
    let name = match (method, tool) {
        (Some(method), Some(tool)) => format!("{method} {tool}"),
        (Some(method), None) => method.to_string(),
        _ => "invalid message".to_string(),
    };
    let decision = span_id(id, 0);
    let mut span = header(&trace, &decision, parent.as_deref(), &name, (start, end));
    if let Some(method) = method {
        field_bytes(
            &mut span,
            9,
            &key_value("mcp.method.name", &Value::from(method)),
        );
    }
    if let Some(tool) = tool {
        field_bytes(
            &mut span,
            9,
            &key_value("gen_ai.tool.name", &Value::from(tool)),
        );
    }
    attributes(&mut span, 9, record);
    if record["outcome"] == "deny" {
        status_error(&mut span, record["reason"].as_str().unwrap_or("refused"));
    }
    let mut spans = vec![span];
    let mut at = start;
    for (i, verdict) in record["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let took = micros(&verdict["latency_us"]);
        let name = format!("policy {}", verdict["policy"].as_str().unwrap_or("?"));
        let own = span_id(id, i + 1);
        let mut span = header(&trace, &own, Some(&decision), &name, (at, at + took));
        for field in ["policy", "verdict", "reason", "enforced", "tags"] {
            if let Some(value) = verdict.get(field) {
                let key = format!("portcullis.{field}");
                field_bytes(&mut span, 9, &key_value(&key, value));
            }
        }
        if verdict["verdict"] == "error" {
            status_error(&mut span, verdict["reason"].as_str().unwrap_or("failed"));
        }
        spans.push(span);
        at += took;
    }
    spans
}

/// A µs count as ns.
fn micros(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0).saturating_mul(1000)
}

/// A `Span`'s ids, name, kind and times.
fn header(
    trace: &[u8],
    id: &[u8],
    parent: Option<&[u8]>,
    name: &str,
    (start, end): (u64, u64),
) -> Vec<u8> {
    let mut span = Vec::new();
    field_bytes(&mut span, 1, trace); // trace_id
    field_bytes(&mut span, 2, id); // span_id
    if let Some(parent) = parent {
        field_bytes(&mut span, 4, parent); // parent_span_id
    }
    field_bytes(&mut span, 5, name.as_bytes()); // name
    field_varint(&mut span, 6, INTERNAL); // kind
    field_fixed64(&mut span, 7, start); // start_time_unix_nano
    field_fixed64(&mut span, 8, end); // end_time_unix_nano
    span
}

/// `Span.status = Status { message = 2, code = 3 }`: an error.
fn status_error(span: &mut Vec<u8>, message: &str) {
    let mut status = Vec::new();
    field_bytes(&mut status, 2, message.as_bytes());
    field_varint(&mut status, 3, ERROR);
    field_bytes(span, 15, &status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_in_meta_is_found_and_a_bad_one_ignored() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let params = format!(r#"{{"name":"x","_meta":{{"traceparent":"{good}"}}}}"#);
        assert_eq!(traceparent(&params).as_deref(), Some(good));
        assert_eq!(traceparent(r#"{"name":"x"}"#), None);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            let params = format!(r#"{{"_meta":{{"traceparent":"{bad}"}}}}"#);
            assert_eq!(traceparent(&params), None, "{bad}");
        }
    }

    #[test]
    fn a_decision_is_a_span_with_a_child_per_policy_and_events_are_not() {
        let record = serde_json::json!({
            "time": "2026-11-24T12:00:00.000100Z", "id": "019ab5c4-1a2b-7c3d-8e4f-0123456789ab",
            "outcome": "deny", "method": "tools/call", "tool": "write_file", "reason": "read-only",
            "latency_us": 100,
            "policies": [
                {"policy": "a", "verdict": "allow", "latency_us": 40},
                {"policy": "b", "verdict": "deny", "reason": "read-only", "latency_us": 50}
            ]
        });
        let spans = spans(&record);
        assert_eq!(spans.len(), 3);
        let contains = |span: &[u8], needle: &[u8]| span.windows(needle.len()).any(|w| w == needle);
        let trace = uuid::Uuid::parse_str("019ab5c4-1a2b-7c3d-8e4f-0123456789ab").unwrap();
        assert!(
            spans.iter().all(|s| contains(s, trace.as_bytes())),
            "one trace: the record's id"
        );
        assert!(contains(&spans[0], b"tools/call write_file"));
        assert!(contains(&spans[0], b"gen_ai.tool.name"));
        assert!(contains(&spans[2], b"policy b"));
        assert!(
            contains(&spans[2], &span_id(record["id"].as_str().unwrap(), 0)),
            "parent"
        );
        let event =
            serde_json::json!({"time": "2026-11-24T12:00:00Z", "id": "x", "event": "reload"});
        assert!(super::spans(&event).is_empty());
    }
}
