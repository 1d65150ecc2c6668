//! Splunk HEC sink: an audit sink component (`portcullis:sink`) that sends
//! Portcullis' audit records to a Splunk HTTP Event Collector.
//!
//! It owns the whole Splunk side of delivery: reading its settings, turning
//! each audit record into a HEC event (with the record's own time), posting a
//! batch in HEC's batch format through the host's `outbound` interface, and
//! reading HEC's answer. Spooling, ordering and retries are the host's.
//!
//! Settings (all strings):
//! - `url` (required): the full HEC endpoint, e.g.
//!   `https://splunk.example:8088/services/collector/event`;
//! - `token` (required): the HEC token, sent as `Authorization: Splunk <token>`;
//! - `index`, `host` (optional): set on every event when given;
//! - `sourcetype` (default `portcullis:audit`), `source` (default `portcullis`).

use serde_json::{Map, Value};
use std::sync::OnceLock;

wit_bindgen::generate!({
    path: "../../../wit/sink",
    world: "sink",
});

use exports::portcullis::sink::deliver::Guest;
use portcullis::sink::outbound::{self, Request};

/// The sink's configuration, as given to `configure`.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    url: String,
    token: String,
    index: Option<String>,
    sourcetype: String,
    source: String,
    host: Option<String>,
}

/// The settings of this instance, set once by `configure`.
static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Reads the `settings` pairs into [`Settings`], filling in defaults.
///
/// Fails on an unknown or repeated key, a missing or empty `url` or `token`,
/// and a `url` that is not `http://` or `https://`.
fn parse_settings(pairs: &[(String, String)]) -> Result<Settings, String> {
    let mut url = None;
    let mut token = None;
    let mut index = None;
    let mut sourcetype = None;
    let mut source = None;
    let mut host = None;
    for (key, value) in pairs {
        let slot = match key.as_str() {
            "url" => &mut url,
            "token" => &mut token,
            "index" => &mut index,
            "sourcetype" => &mut sourcetype,
            "source" => &mut source,
            "host" => &mut host,
            _ => {
                return Err(format!(
                    "unknown setting '{key}' (known: url, token, index, sourcetype, source, host)"
                ));
            }
        };
        if slot.replace(value.clone()).is_some() {
            return Err(format!("setting '{key}' is given more than once"));
        }
    }
    let url = required(
        url,
        "url",
        "the HEC endpoint, e.g. https://splunk.example:8088/services/collector/event",
    )?;
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("url '{url}' is not an http:// or https:// URL"));
    }
    let token = required(token, "token", "the HEC token")?;
    Ok(Settings {
        url,
        token,
        index,
        sourcetype: sourcetype.unwrap_or_else(|| "portcullis:audit".into()),
        source: source.unwrap_or_else(|| "portcullis".into()),
        host,
    })
}

/// Returns a required setting's value, or an error naming it and what it is.
fn required(value: Option<String>, key: &str, what: &str) -> Result<String, String> {
    match value {
        Some(value) if !value.trim().is_empty() => Ok(value),
        Some(_) => Err(format!("setting '{key}' ({what}) is empty")),
        None => Err(format!("setting '{key}' ({what}) is missing")),
    }
}

/// Builds the HEC event for one audit record: `time` (from the record's own
/// `time`, when it parses), `source`, `sourcetype`, `index` and `host` (when
/// set), and the record itself as `event` — as a string when it is not JSON,
/// so one bad record does not hold back the batch.
fn event(settings: &Settings, record: &str) -> Value {
    let record =
        serde_json::from_str::<Value>(record).unwrap_or_else(|_| Value::String(record.into()));
    let mut event = Map::new();
    if let Some(time) = record
        .get("time")
        .and_then(Value::as_str)
        .and_then(epoch_seconds)
    {
        event.insert("time".into(), time.into());
    }
    event.insert("source".into(), settings.source.clone().into());
    event.insert("sourcetype".into(), settings.sourcetype.clone().into());
    if let Some(index) = &settings.index {
        event.insert("index".into(), index.clone().into());
    }
    if let Some(host) = &settings.host {
        event.insert("host".into(), host.clone().into());
    }
    event.insert("event".into(), record);
    Value::Object(event)
}

/// Builds the request body: the events of `records`, each JSON object
/// followed by a newline (HEC's batch format).
fn body(settings: &Settings, records: &[String]) -> Vec<u8> {
    let mut body = Vec::new();
    for record in records {
        body.extend_from_slice(event(settings, record).to_string().as_bytes());
        body.push(b'\n');
    }
    body
}

/// Builds the POST of `records` to the configured endpoint.
fn request(settings: &Settings, records: &[String]) -> Request {
    Request {
        method: "POST".into(),
        url: settings.url.clone(),
        headers: vec![
            ("authorization".into(), format!("Splunk {}", settings.token)),
            ("content-type".into(), "application/json".into()),
        ],
        body: body(settings, records),
    }
}

/// Converts an RFC 3339 UTC time (`2026-11-24T18:15:02.123456Z`; any number
/// of fractional digits, `Z` or `+00:00`) to seconds since the Unix epoch,
/// kept to the microsecond. `None` for anything else.
fn epoch_seconds(time: &str) -> Option<f64> {
    let (date, rest) = time.split_once(['T', 't'])?;
    let clock = rest
        .strip_suffix(['Z', 'z'])
        .or_else(|| rest.strip_suffix("+00:00"))?;
    let (clock, fraction) = match clock.split_once('.') {
        Some((clock, fraction)) => (clock, Some(fraction)),
        None => (clock, None),
    };
    let [year, month, day] = fields(date, '-', [4, 2, 2])?;
    let [hour, minute, second] = fields(clock, ':', [2, 2, 2])?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || !(1..=month_days[month as usize - 1]).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let micros = match fraction {
        Some(digits) => fraction_micros(digits)?,
        None => 0,
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    Some((seconds * 1_000_000 + micros) as f64 / 1e6)
}

/// Splits `text` at `separator` into exactly three all-digit fields of the
/// given widths, and reads them as numbers.
fn fields(text: &str, separator: char, widths: [usize; 3]) -> Option<[i64; 3]> {
    let mut parts = text.split(separator);
    let mut out = [0; 3];
    for (slot, width) in out.iter_mut().zip(widths) {
        let part = parts.next()?;
        if part.len() != width || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Reads fractional-second digits (at least one, any number) as whole
/// microseconds, dropping digits past the sixth.
fn fraction_micros(digits: &str) -> Option<i64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros = 0;
    for i in 0..6 {
        let digit = digits.as_bytes().get(i).map_or(0, |b| b - b'0');
        micros = micros * 10 + i64::from(digit);
    }
    Some(micros)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (negative
/// before it); Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Says why HEC refused a batch: the status and, when the body is HEC's
/// `{"text": …, "code": …}`, its text and code; otherwise the start of the
/// body, if any.
fn refusal(status: u16, body: &[u8]) -> String {
    let answer = serde_json::from_slice::<Value>(body).ok();
    let text = answer
        .as_ref()
        .and_then(|a| a.get("text"))
        .and_then(Value::as_str);
    let code = answer
        .as_ref()
        .and_then(|a| a.get("code"))
        .and_then(Value::as_i64);
    match (text, code) {
        (Some(text), Some(code)) => format!("HEC answered {status}: {text} (code {code})"),
        (Some(text), None) => format!("HEC answered {status}: {text}"),
        _ => {
            let body = String::from_utf8_lossy(body);
            let first_line = body.lines().next().unwrap_or("").trim();
            if first_line.is_empty() {
                format!("HEC answered {status}")
            } else {
                let snippet: String = first_line.chars().take(200).collect();
                format!("HEC answered {status}: {snippet}")
            }
        }
    }
}

/// The exported `deliver` interface.
struct SplunkHec;

impl Guest for SplunkHec {
    fn configure(settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = parse_settings(&settings)?;
        SETTINGS
            .set(settings)
            .map_err(|_| "already configured".to_string())
    }

    fn deliver(records: Vec<String>) -> Result<(), String> {
        let settings = SETTINGS.get().ok_or("not configured")?;
        if records.is_empty() {
            return Ok(());
        }
        let response = outbound::send(&request(settings, &records))
            .map_err(|why| format!("cannot reach HEC: {why}"))?;
        if (200..300).contains(&response.status) {
            Ok(())
        } else {
            Err(refusal(response.status, &response.body))
        }
    }
}

export!(SplunkHec);

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn minimal() -> Settings {
        parse_settings(&pairs(&[
            (
                "url",
                "https://splunk.example:8088/services/collector/event",
            ),
            ("token", "abc-123"),
        ]))
        .unwrap()
    }

    const RECORD: &str = r#"{"time":"2026-11-24T18:15:02.123456Z","id":"x","agent":"ci-bot"}"#;

    #[test]
    fn settings_defaults() {
        let settings = minimal();
        assert_eq!(
            settings.url,
            "https://splunk.example:8088/services/collector/event"
        );
        assert_eq!(settings.token, "abc-123");
        assert_eq!(settings.sourcetype, "portcullis:audit");
        assert_eq!(settings.source, "portcullis");
        assert_eq!(settings.index, None);
        assert_eq!(settings.host, None);
    }

    #[test]
    fn settings_all_keys() {
        let settings = parse_settings(&pairs(&[
            ("url", "http://localhost:8088/services/collector/event"),
            ("token", "t"),
            ("index", "audit"),
            ("sourcetype", "mcp"),
            ("source", "gw-1"),
            ("host", "gw-1.example"),
        ]))
        .unwrap();
        assert_eq!(settings.index.as_deref(), Some("audit"));
        assert_eq!(settings.sourcetype, "mcp");
        assert_eq!(settings.source, "gw-1");
        assert_eq!(settings.host.as_deref(), Some("gw-1.example"));
    }

    #[test]
    fn settings_errors() {
        let err = |list: &[(&str, &str)]| parse_settings(&pairs(list)).unwrap_err();
        let e = err(&[("url", "https://h/"), ("token", "t"), ("indx", "a")]);
        assert!(e.contains("unknown setting 'indx'"), "{e}");
        let e = err(&[("token", "t")]);
        assert!(e.contains("'url'") && e.contains("missing"), "{e}");
        let e = err(&[("url", "https://h/")]);
        assert!(e.contains("'token'") && e.contains("missing"), "{e}");
        let e = err(&[("url", "https://h/"), ("token", " ")]);
        assert!(e.contains("'token'") && e.contains("empty"), "{e}");
        let e = err(&[("url", "splunk:8088"), ("token", "t")]);
        assert!(e.contains("not an http"), "{e}");
        let e = err(&[("url", "https://h/"), ("token", "t"), ("token", "u")]);
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn event_shape_minimal() {
        let event = event(&minimal(), RECORD);
        let object = event.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["event", "source", "sourcetype", "time"]);
        assert_eq!(event["source"], "portcullis");
        assert_eq!(event["sourcetype"], "portcullis:audit");
        assert_eq!(event["time"].as_f64(), Some(1_795_544_102.123_456));
        assert_eq!(
            event["event"],
            serde_json::from_str::<Value>(RECORD).unwrap()
        );
    }

    #[test]
    fn event_shape_with_index_and_host() {
        let settings = Settings {
            index: Some("audit".into()),
            host: Some("gw-1".into()),
            ..minimal()
        };
        let event = event(&settings, RECORD);
        assert_eq!(event["index"], "audit");
        assert_eq!(event["host"], "gw-1");
        assert_eq!(event["event"]["agent"], "ci-bot");
    }

    #[test]
    fn event_without_parseable_time_has_no_time() {
        let settings = minimal();
        for record in [r#"{"id":"x"}"#, r#"{"time":"yesterday"}"#, r#"{"time":12}"#] {
            let event = event(&settings, record);
            assert!(event.get("time").is_none(), "{record}");
            assert_eq!(
                event["event"],
                serde_json::from_str::<Value>(record).unwrap()
            );
        }
    }

    #[test]
    fn non_json_record_becomes_a_string_event() {
        let event = event(&minimal(), "not {json");
        assert_eq!(event["event"], "not {json");
        assert!(event.get("time").is_none());
    }

    #[test]
    fn request_is_a_hec_batch() {
        let settings = minimal();
        let records = vec![RECORD.to_string(), "oops".to_string()];
        let request = request(&settings, &records);
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, settings.url);
        assert!(
            request
                .headers
                .contains(&("authorization".into(), "Splunk abc-123".into()))
        );
        assert!(
            request
                .headers
                .contains(&("content-type".into(), "application/json".into()))
        );
        let body = String::from_utf8(request.body).unwrap();
        assert!(body.ends_with('\n'));
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"]["id"], "x");
        assert_eq!(lines[1]["event"], "oops");
    }

    #[test]
    fn time_known_epoch_values() {
        assert_eq!(epoch_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(epoch_seconds("2026-11-24T00:00:00Z"), Some(1_795_478_400.0));
        assert_eq!(epoch_seconds("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(epoch_seconds("1969-12-31T23:59:59Z"), Some(-1.0));
    }

    #[test]
    fn time_leap_years() {
        // 2024-02-29 exists; 2023-02-29 and 1900-02-29 do not; 2000-02-29 does.
        assert_eq!(epoch_seconds("2024-02-29T12:00:00Z"), Some(1_709_208_000.0));
        assert_eq!(epoch_seconds("2024-03-01T00:00:00Z"), Some(1_709_251_200.0));
        assert_eq!(epoch_seconds("2000-02-29T00:00:00Z"), Some(951_782_400.0));
        assert_eq!(epoch_seconds("2023-02-29T00:00:00Z"), None);
        assert_eq!(epoch_seconds("1900-02-29T00:00:00Z"), None);
    }

    #[test]
    fn time_fractions_and_offsets() {
        let base = 1_795_544_102.0;
        assert_eq!(epoch_seconds("2026-11-24T18:15:02Z"), Some(base));
        assert_eq!(epoch_seconds("2026-11-24T18:15:02.5Z"), Some(base + 0.5));
        assert_eq!(
            epoch_seconds("2026-11-24T18:15:02.123456Z"),
            Some(1_795_544_102.123_456)
        );
        assert_eq!(
            epoch_seconds("2026-11-24T18:15:02.123456789Z"),
            Some(1_795_544_102.123_456)
        );
        assert_eq!(
            epoch_seconds("2026-11-24T18:15:02.123456+00:00"),
            Some(1_795_544_102.123_456)
        );
        assert_eq!(epoch_seconds("2026-11-24t18:15:02z"), Some(base));
        // Microseconds survive the trip through JSON.
        let json = Value::from(epoch_seconds("2026-11-24T18:15:02.000001Z").unwrap()).to_string();
        assert_eq!(json, "1795544102.000001");
    }

    #[test]
    fn time_rejects_everything_else() {
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24T18:15:02",
            "2026-11-24T18:15:02+01:00",
            "2026-11-24T18:15:02-00:00",
            "2026-11-24 18:15:02Z",
            "2026-11-24T18:15:02.Z",
            "2026-11-24T18:15:02.12a4Z",
            "2026-13-01T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T18:60:00Z",
            "2026-11-24T18:15:61Z",
            "26-11-24T18:15:02Z",
            "2026-11-24T18:15:02:00Z",
            "+2026-11-24T18:15:02Z",
            "２０２６-11-24T18:15:02Z",
        ] {
            assert_eq!(epoch_seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn days_from_civil_matches_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2026, 11, 24), 20_781);
        assert_eq!(days_from_civil(1600, 3, 1), -135_080);
    }

    #[test]
    fn refusal_reads_hec_answers() {
        assert_eq!(
            refusal(403, br#"{"text":"Invalid token","code":4}"#),
            "HEC answered 403: Invalid token (code 4)"
        );
        assert_eq!(
            refusal(
                400,
                br#"{"text":"Incorrect index","code":7,"invalid-event-number":1}"#
            ),
            "HEC answered 400: Incorrect index (code 7)"
        );
        assert_eq!(
            refusal(503, br#"{"text":"Server is busy"}"#),
            "HEC answered 503: Server is busy"
        );
        assert_eq!(refusal(502, b""), "HEC answered 502");
        assert_eq!(
            refusal(502, b"  Bad Gateway  \n<html>...</html>"),
            "HEC answered 502: Bad Gateway"
        );
        let long = "x".repeat(500);
        assert_eq!(
            refusal(500, long.as_bytes()).len(),
            "HEC answered 500: ".len() + 200
        );
    }
}
