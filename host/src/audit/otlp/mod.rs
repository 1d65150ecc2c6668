//! Audit records in OpenTelemetry's wire format (OTLP, protobuf) for the
//! delivering sinks whose `format` is `otlp` ([`logs`]: a log record per
//! audit record) or `otlp-traces` ([`traces`]: a span per decision). This
//! module owns what both share: the export envelope (the `portcullis`
//! service resource, the `portcullis.audit` scope), record fields as
//! attributes, and the protobuf encoding. The protobuf is written by hand:
//! the few messages needed do not warrant a code generator in the build.

pub mod logs;
pub mod traces;

use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// An export request (logs or traces: the same shape) of `items` (encoded
/// `LogRecord`s or `Span`s) from the `portcullis` service.
fn envelope(items: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut scoped = Vec::new();
    // InstrumentationScope { name = 1 }
    field_bytes(&mut scoped, 1, &string_field(1, "portcullis.audit"));
    for item in items {
        // ScopeLogs { log_records = 2 } / ScopeSpans { spans = 2 }
        field_bytes(&mut scoped, 2, &item);
    }
    let mut resource = Vec::new();
    // Resource { attributes = 1 }
    field_bytes(
        &mut resource,
        1,
        &key_value("service.name", &Value::from("portcullis")),
    );
    let mut per_resource = Vec::new();
    // ResourceLogs / ResourceSpans { resource = 1, scope_… = 2 }
    field_bytes(&mut per_resource, 1, &resource);
    field_bytes(&mut per_resource, 2, &scoped);
    let mut request = Vec::new();
    // Export…ServiceRequest { resource_… = 1 }
    field_bytes(&mut request, 1, &per_resource);
    request
}

/// Every field of `record` as an attribute `portcullis.FIELD` (field
/// `number` of the message): strings, integers and booleans as such,
/// nested values as JSON.
fn attributes(out: &mut Vec<u8>, number: u32, record: &Value) {
    if let Some(fields) = record.as_object() {
        for (name, value) in fields {
            field_bytes(
                out,
                number,
                &key_value(&format!("portcullis.{name}"), value),
            );
        }
    }
}

/// A record's `time`, in ns since the epoch.
fn record_time(record: &Value) -> Option<u64> {
    let time = humantime::parse_rfc3339(record["time"].as_str()?).ok()?;
    Some(unix_nanos(time))
}

/// `time` in ns since the epoch (0 before it).
fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
}
