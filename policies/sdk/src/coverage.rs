//! Coverage lines: how a policy tells `portcullis test --coverage` which of
//! its rules a message exercised, through the `log` import (the policy
//! interface has no other channel). It owns the line's format only.

use serde_json::json;

/// The log line that reports `all` of a policy's rules, of which this
/// evaluation exercised `hit`.
pub fn line(all: &[String], hit: &[String]) -> String {
    format!("coverage {}", json!({ "all": all, "hit": hit }))
}
