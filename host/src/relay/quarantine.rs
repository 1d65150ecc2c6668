//! Quarantined servers: a server whose tools drifted from the lock file
//! under `on_drift = "quarantine"` gets every request refused until it is
//! pinned again. A quarantine holds for the lock it was found under (a new
//! lock lifts it). With shared state (`[state] redis`) a quarantine found by
//! one process holds in every process of the deployment, each asking Redis
//! at most once a second per server; when Redis cannot be asked, requests
//! to a pinned server are refused, since nothing can say it is not
//! quarantined elsewhere.

use crate::state::Shared;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long what Redis said of a server is taken as still true.
const FRESH: Duration = Duration::from_secs(1);

/// What Redis said of a server under a lock, and when it was asked.
struct Seen {
    at: Instant,
    why: Option<String>,
}

/// The quarantines this process knows of, and the deployment's.
#[derive(Default)]
pub struct Quarantines {
    /// Found here: server → (lock digest, why).
    here: Mutex<HashMap<String, (String, String)>>,
    shared: Option<Arc<Shared>>,
    /// What Redis last said, by (server, lock digest).
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl Quarantines {
    /// Quarantines shared through `shared`.
    pub fn shared(shared: Arc<Shared>) -> Self {
        Self {
            shared: Some(shared),
            ..Self::default()
        }
    }

    /// Why `server` is quarantined under the lock `digest`, if it is.
    pub fn why(&self, server: &str, digest: &str) -> Option<String> {
        let here = self.here.lock().expect("quarantine poisoned");
        if let Some((_, why)) = here.get(server).filter(|(under, _)| under == digest) {
            return Some(why.clone());
        }
        drop(here);
        let shared = self.shared.as_ref()?;
        let asked = (server.to_string(), digest.to_string());
        if let Some(seen) = self.seen.lock().expect("quarantine poisoned").get(&asked)
            && seen.at.elapsed() < FRESH
        {
            return seen.why.clone();
        }
        let key = shared.key(&["quarantine", digest, server]);
        let why = match shared.call(|c| redis::cmd("GET").arg(&key).query::<Option<String>>(c)) {
            Ok(why) => why,
            Err(unavailable) => {
                return Some(format!(
                    "Refused by Portcullis: whether server '{server}' is quarantined cannot be checked ({unavailable})"
                ));
            }
        };
        let mut seen = self.seen.lock().expect("quarantine poisoned");
        if seen.len() >= 10_000 {
            seen.clear();
        }
        let at = Instant::now();
        seen.insert(
            asked,
            Seen {
                at,
                why: why.clone(),
            },
        );
        why
    }

    /// Quarantines `server` under the lock `digest` for `why`, here and in
    /// the shared state; returns why it is quarantined (the first reason
    /// found stands).
    pub fn quarantine(&self, server: &str, digest: &str, why: String) -> String {
        let mut here = self.here.lock().expect("quarantine poisoned");
        if here.get(server).is_none_or(|(under, _)| under != digest) {
            tracing::error!(server, "{why}");
            here.insert(server.to_string(), (digest.to_string(), why.clone()));
            if let Some(shared) = &self.shared {
                let key = shared.key(&["quarantine", digest, server]);
                let set = shared.call(|c| {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&why)
                        .arg("NX")
                        .query::<Option<String>>(c)
                });
                if let Err(e) = set {
                    tracing::error!(server, "the quarantine holds here only: {e}");
                }
            }
        }
        here[server].1.clone()
    }
}
