//! Audit records as OpenTelemetry logs: a batch becomes one OTLP
//! `ExportLogsServiceRequest` (protobuf, for OTLP/HTTP `/v1/logs`), each
//! record a `LogRecord` with its time, a severity (warnings for refusals), a
//! one-line body, and every field as an attribute named `portcullis.FIELD`
//! (strings, integers and booleans as such; nested values as JSON), so any
//! collector can route and query decisions by outcome, agent, server, tool
//! or policy. The protobuf is written by hand: the few messages needed do not
//! warrant a code generator in the build.

use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// OTLP severity numbers.
const INFO: u64 = 9;
const WARN: u64 = 13;

/// The protobuf body of an OTLP/HTTP logs export of `records` (JSON texts).
pub fn export(records: &[String]) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut scope_logs = Vec::new();
    // InstrumentationScope { name = 1 }
    field_bytes(&mut scope_logs, 1, &string_field(1, "portcullis.audit"));
    for record in records {
        let Ok(record) = serde_json::from_str::<Value>(record) else {
            continue;
        };
        // ScopeLogs { log_records = 2 }
        field_bytes(&mut scope_logs, 2, &log_record(&record, now));
    }
    let mut resource = Vec::new();
    // Resource { attributes = 1 }
    field_bytes(
        &mut resource,
        1,
        &key_value("service.name", &Value::from("portcullis")),
    );
    let mut resource_logs = Vec::new();
    // ResourceLogs { resource = 1, scope_logs = 2 }
    field_bytes(&mut resource_logs, 1, &resource);
    field_bytes(&mut resource_logs, 2, &scope_logs);
    let mut request = Vec::new();
    // ExportLogsServiceRequest { resource_logs = 1 }
    field_bytes(&mut request, 1, &resource_logs);
    request
}

/// One record as a `LogRecord`.
fn log_record(record: &Value, observed: u64) -> Vec<u8> {
    let time = record["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(observed, |d| d.as_nanos() as u64);
    let refused = matches!(record["outcome"].as_str(), Some("deny"))
        || matches!(record["state"].as_str(), Some("denied" | "mismatch"))
        || record["event"].as_str() == Some("admin-credentials-refused")
        || record["event"].as_str() == Some("credentials-refused");
    let (severity, severity_text) = if refused {
        (WARN, "WARN")
    } else {
        (INFO, "INFO")
    };
    let mut out = Vec::new();
    field_fixed64(&mut out, 1, time); // time_unix_nano
    field_varint(&mut out, 2, severity); // severity_number
    field_bytes(&mut out, 3, severity_text.as_bytes()); // severity_text
    field_bytes(&mut out, 5, &any_value(&Value::from(summary(record)))); // body
    if let Some(fields) = record.as_object() {
        for (name, value) in fields {
            field_bytes(
                &mut out,
                6,
                &key_value(&format!("portcullis.{name}"), value),
            );
        }
    }
    field_fixed64(&mut out, 11, observed); // observed_time_unix_nano
    out
}

/// A line saying what the record records.
fn summary(record: &Value) -> String {
    let text = |field: &str| record[field].as_str().unwrap_or("");
    let what = record["event"]
        .as_str()
        .map_or_else(|| text("outcome").to_string(), str::to_string);
    let call = record["tool"]
        .as_str()
        .or(record["method"].as_str())
        .unwrap_or("");
    let mut line = format!(
        "{what} {call} agent={} server={}",
        text("agent"),
        text("server")
    );
    if let Some(reason) = record["reason"].as_str() {
        line.push_str(": ");
        line.push_str(reason);
    }
    line
}

/// `KeyValue { key = 1, value = 2 }`.
fn key_value(key: &str, value: &Value) -> Vec<u8> {
    let mut out = string_field(1, key);
    field_bytes(&mut out, 2, &any_value(value));
    out
}

/// `AnyValue { string_value = 1, bool_value = 2, int_value = 3,
/// double_value = 4 }`; other JSON as its text.
fn any_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match value {
        Value::String(text) => field_bytes(&mut out, 1, text.as_bytes()),
        Value::Bool(flag) => field_varint(&mut out, 2, u64::from(*flag)),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            field_varint(&mut out, 3, n.as_i64().unwrap_or(i64::MAX) as u64);
        }
        Value::Number(n) => {
            key(&mut out, 4, 1);
            out.extend_from_slice(&n.as_f64().unwrap_or_default().to_le_bytes());
        }
        other => field_bytes(&mut out, 1, other.to_string().as_bytes()),
    }
    out
}

fn string_field(number: u32, text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    field_bytes(&mut out, number, text.as_bytes());
    out
}

fn key(out: &mut Vec<u8>, number: u32, wire: u8) {
    varint(out, (u64::from(number) << 3) | u64::from(wire));
}

fn field_varint(out: &mut Vec<u8>, number: u32, value: u64) {
    key(out, number, 0);
    varint(out, value);
}

fn field_fixed64(out: &mut Vec<u8>, number: u32, value: u64) {
    key(out, number, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    key(out, number, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_are_encoded_as_protobuf_does() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        assert_eq!(string_field(1, "hi"), [0x0a, 0x02, b'h', b'i']);
        let mut flag = Vec::new();
        field_varint(&mut flag, 2, 1);
        assert_eq!(flag, [0x10, 0x01]);
    }

    #[test]
    fn a_refusal_is_a_warning_with_its_fields_as_attributes() {
        let record = serde_json::json!({
            "time": "2026-11-24T12:00:00Z", "outcome": "deny", "agent": "bot",
            "server": "fs", "tool": "write_file", "reason": "read-only", "latency_us": 7
        });
        let encoded = log_record(&record, 1);
        let contains = |needle: &[u8]| encoded.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"WARN"));
        assert!(contains(b"portcullis.outcome"));
        assert!(contains(b"deny write_file agent=bot server=fs: read-only"));
        let expected = humantime::parse_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert_eq!(encoded[1..9], expected.to_le_bytes());
    }
}
