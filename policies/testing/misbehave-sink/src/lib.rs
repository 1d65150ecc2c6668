//! A deliberately broken audit sink for Portcullis' own tests: given
//! `mode = "loop"`, `"alloc"` or `"trap"` it loops forever, allocates
//! without end or panics in every `deliver`; given `"connect"` it sends
//! each batch to the `url` setting (to show which hosts the grant lets it
//! reach) and fails unless answered 2xx. Never ship it.

use std::hint::black_box;
use std::sync::OnceLock;

wit_bindgen::generate!({
    path: "../../../wit/sink",
    world: "sink",
});

use exports::portcullis::sink::deliver::Guest;
use portcullis::sink::outbound::{Request, send};

static SETTINGS: OnceLock<(String, String)> = OnceLock::new();

struct Misbehave;

impl Guest for Misbehave {
    fn configure(settings: Vec<(String, String)>) -> Result<(), String> {
        let get = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let mode = get("mode").ok_or("the `mode` setting is required")?;
        SETTINGS
            .set((mode, get("url").unwrap_or_default()))
            .map_err(|_| "configured twice".to_string())
    }

    fn deliver(records: Vec<String>) -> Result<(), String> {
        let (mode, url) = SETTINGS.get().ok_or("not configured")?;
        match mode.as_str() {
            "loop" => loop {
                black_box(&records);
            },
            "alloc" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "trap" => panic!("misbehave-sink was told to trap"),
            "connect" => {
                let request = Request {
                    method: "POST".into(),
                    url: url.clone(),
                    headers: Vec::new(),
                    body: records.join("\n").into_bytes(),
                };
                let answer = send(&request)?;
                match answer.status {
                    200..=299 => Ok(()),
                    status => Err(format!("answered {status}")),
                }
            }
            other => Err(format!("unknown mode '{other}'")),
        }
    }
}

export!(Misbehave);
