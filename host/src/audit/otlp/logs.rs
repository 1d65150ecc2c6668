//! Audit records as OpenTelemetry logs: a batch becomes one OTLP
//! `ExportLogsServiceRequest` (protobuf, for OTLP/HTTP `/v1/logs`), each
//! record a `LogRecord` with its time, a severity (warnings for refusals), a
//! one-line body, and every field as an attribute named `portcullis.FIELD`,
//! so any collector can route and query decisions by outcome, agent, server,
//! tool or policy.

use super::{
    any_value, attributes, envelope, field_bytes, field_fixed64, field_varint, record_time,
    unix_nanos,
};
use serde_json::Value;
use std::time::SystemTime;

/// OTLP severity numbers.
const INFO: u64 = 9;
const WARN: u64 = 13;

/// The protobuf body of an OTLP/HTTP logs export of `records` (JSON texts).
pub fn export(records: &[String]) -> Vec<u8> {
    let now = unix_nanos(SystemTime::now());
    let records = records
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r).ok());
    envelope(records.map(|record| log_record(&record, now)))
}

/// One record as a `LogRecord`.
fn log_record(record: &Value, observed: u64) -> Vec<u8> {
    let time = record_time(record).unwrap_or(observed);
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
    attributes(&mut out, 6, record);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let expected = unix_nanos(humantime::parse_rfc3339("2026-11-24T12:00:00Z").unwrap());
        assert_eq!(encoded[1..9], expected.to_le_bytes());
    }
}
