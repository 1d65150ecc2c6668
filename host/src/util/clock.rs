//! The wall clock as Portcullis writes it: milliseconds since the epoch
//! (approvals, receipts) and RFC 3339 with microseconds (audit records,
//! status reports).

use std::time::SystemTime;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now, in RFC 3339 with microseconds, UTC.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
