//! A deliberately broken policy for Portcullis' own tests: on calls to the
//! configured tool, and on their answers, it loops forever, allocates without
//! end, traps, or returns a malformed verdict — or just logs a line, or
//! counts its calls, and allows. Never ship it.

use portcullis_policy::{Exchange, Level, Outcome, Policy, Verdict, log};
use serde::Deserialize;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Loop,
    Alloc,
    Trap,
    Garbage,
    Log,
    Count,
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
        Mode::Count => {
            // State that survives between calls exactly as long as the instance does.
            static CALLS: AtomicU32 = AtomicU32::new(0);
            let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
            Verdict::allow().tag(format!("call-{call}"))
        }
        Mode::Log => {
            log(Level::Info, "misbehave: hello from the policy");
            Verdict::allow().tag("logged")
        }
    }
}

portcullis_policy::export!(Misbehave);
