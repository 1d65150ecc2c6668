//! A deliberately broken policy for Portcullis' own tests: on calls to the
//! configured tool, and on their answers, it loops forever, allocates without
//! end, traps, or returns a malformed verdict — or just logs a line and
//! allows. Never ship it.

use portcullis_policy::{Exchange, Level, Outcome, Policy, Verdict, log};
use serde::Deserialize;
use std::hint::black_box;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Loop,
    Alloc,
    Trap,
    Garbage,
    Log,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    mode: Mode,
    tool: String,
}

struct Misbehave;

impl Policy for Misbehave {
    type Settings = Settings;

    fn on_request(settings: &Settings, exchange: &Exchange) -> Verdict {
        misbehave(settings, exchange)
    }

    fn on_response(settings: &Settings, exchange: &Exchange) -> Verdict {
        misbehave(settings, exchange)
    }
}

fn misbehave(settings: &Settings, exchange: &Exchange) -> Verdict {
    if exchange.method != "tools/call" || exchange.tool.as_deref() != Some(settings.tool.as_str()) {
        return Verdict::allow();
    }
    match settings.mode {
        Mode::Loop => loop {
            black_box(());
        },
        Mode::Alloc => {
            let mut hoard = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        Mode::Trap => panic!("misbehave: deliberate trap"),
        Mode::Garbage => Verdict::from(Outcome::Modify("{this is not json".into())),
        Mode::Log => {
            log(Level::Info, "misbehave: hello from the policy");
            Verdict::allow().tag("logged")
        }
    }
}

portcullis_policy::export!(Misbehave);
