//! Session ids any replica can resume (`[serve] session_keys`): what a
//! 2025-revision session was opened with — its agent, what it reaches, the
//! revision, the client's capabilities and who it is — sealed with
//! AES-256-GCM into its `Mcp-Session-Id`. A replica that never saw the
//! session opens the id with the same keys and opens the session again, for
//! the same agent only, so a round-robin balancer needs no stickiness for
//! requests and answers. Only what `initialize` settled travels; what a
//! session learns later (resource routes, subscriptions, servers' questions
//! in flight) stays with the replica that learned it. The first key seals;
//! every key opens, so keys can be rotated. A session its client ended is
//! remembered in the deployment's shared state (`[state] redis`), so that
//! no replica resumes it again.

use crate::gateway::sessions::Scope;
use crate::state::{Shared, Unavailable};
use anyhow::{Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What a sealed id starts with: its format's version.
const PREFIX: &str = "ps1.";

/// Bound into every seal, so a sealed id is good for nothing else.
const AAD: &[u8] = b"portcullis session id v1";

/// How long after it was opened a session may be resumed from its id:
/// past it, its client initializes again.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The shortest key text accepted.
pub const MIN_KEY_LEN: usize = 32;

/// The longest sealed id made: past it the session gets a plain id (and
/// cannot be resumed elsewhere), since balancers and clients limit header
/// sizes.
const MAX_SEALED_LEN: usize = 4096;

/// What a session was opened with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    /// The agent that opened it.
    pub agent: String,
    /// The one server it reaches, or none: every server its agent may use.
    pub server: Option<String>,
    /// The revision it settled on.
    pub protocol: String,
    /// The capabilities its client declared.
    pub capabilities: Value,
    /// Its client's `clientInfo`.
    pub client_info: Value,
    /// When it was opened, in ms since the epoch.
    pub opened_ms: u64,
}

impl Opened {
    /// What it reaches.
    pub fn scope(&self) -> Scope {
        self.server.clone().map_or(Scope::All, Scope::Server)
    }
}

/// The keys session ids are sealed and opened with.
pub struct Seals {
    keys: Vec<LessSafeKey>,
}

impl Seals {
    /// Keys from `texts` (each at least [`MIN_KEY_LEN`] characters of a
    /// secret): the first seals, all open.
    pub fn new(texts: &[String]) -> Result<Self> {
        if texts.is_empty() {
            bail!("serve.session_keys: no keys");
        }
        let keys = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                if text.trim().len() < MIN_KEY_LEN {
                    bail!(
                        "serve.session_keys[{i}]: a key must be at least {MIN_KEY_LEN} characters \
                         (e.g. `openssl rand -base64 32`)"
                    );
                }
                let digest = Sha256::new()
                    .chain_update(AAD)
                    .chain_update(text.trim().as_bytes())
                    .finalize();
                let key = UnboundKey::new(&AES_256_GCM, &digest)
                    .map_err(|_| anyhow::anyhow!("serve.session_keys[{i}]: unusable key"))?;
                Ok(LessSafeKey::new(key))
            })
            .collect::<Result<_>>()?;
        Ok(Self { keys })
    }

    /// `opened` sealed into a session id; `None` when it would be too long
    /// for a header.
    pub fn seal(&self, opened: &Opened) -> Option<String> {
        let mut sealed = serde_json::to_vec(opened).ok()?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        self.keys[0]
            .seal_in_place_append_tag(nonce, Aad::from(AAD), &mut sealed)
            .ok()?;
        let mut whole = nonce_bytes.to_vec();
        whole.extend_from_slice(&sealed);
        let id = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(whole));
        (id.len() <= MAX_SEALED_LEN).then_some(id)
    }

    /// What the session id `id` was sealed with, if one of the keys sealed
    /// it and nobody altered it.
    pub fn open(&self, id: &str) -> Option<Opened> {
        let encoded = id.strip_prefix(PREFIX)?;
        if encoded.len() > MAX_SEALED_LEN {
            return None;
        }
        let whole = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        if whole.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = whole.split_at(NONCE_LEN);
        self.keys.iter().find_map(|key| {
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut sealed = sealed.to_vec();
            let plain = key.open_in_place(nonce, Aad::from(AAD), &mut sealed).ok()?;
            serde_json::from_slice(plain).ok()
        })
    }
}

/// Remembers that session `id` ended, for as long as it could otherwise be
/// resumed ([`MAX_AGE`]).
pub fn revoke(state: &Shared, id: &str) -> Result<(), Unavailable> {
    let key = ended_key(state, id);
    let ttl = MAX_AGE.as_millis() as u64;
    state.call(|c| {
        redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .query::<()>(c)
    })
}

/// Whether session `id` was ended by its client on any replica.
pub fn revoked(state: &Shared, id: &str) -> Result<bool, Unavailable> {
    let key = ended_key(state, id);
    state.call(|c| redis::cmd("EXISTS").arg(&key).query::<bool>(c))
}

/// The key an ended session is remembered under: its id's digest (ids are
/// long, and say nothing once they are digested).
fn ended_key(state: &Shared, id: &str) -> String {
    let digest = crate::util::encode::hex(&Sha256::digest(id.as_bytes()));
    state.key(&["session-ended", &digest])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opened() -> Opened {
        Opened {
            agent: "bot".into(),
            server: Some("files".into()),
            protocol: "2025-11-25".into(),
            capabilities: json!({"elicitation": {}}),
            client_info: json!({"name": "test", "version": "1"}),
            opened_ms: 1,
        }
    }

    fn key(c: char) -> String {
        std::iter::repeat_n(c, 40).collect()
    }

    #[test]
    fn a_sealed_id_opens_with_its_key_and_after_rotation() {
        let seals = Seals::new(&[key('a')]).unwrap();
        let id = seals.seal(&opened()).unwrap();
        assert!(id.starts_with(PREFIX) && id.is_ascii());
        assert_eq!(seals.open(&id), Some(opened()));
        assert_ne!(
            seals.seal(&opened()),
            Some(id.clone()),
            "a fresh nonce each time"
        );
        let rotated = Seals::new(&[key('b'), key('a')]).unwrap();
        assert_eq!(rotated.open(&id), Some(opened()), "an old key still opens");
        let other = Seals::new(&[key('c')]).unwrap();
        assert_eq!(other.open(&id), None, "another deployment's key does not");
    }

    #[test]
    fn an_altered_or_forged_id_does_not_open() {
        let seals = Seals::new(&[key('a')]).unwrap();
        let id = seals.seal(&opened()).unwrap();
        let mut bytes = id.clone().into_bytes();
        let last = bytes.len() - 5;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(bytes).unwrap();
        assert_eq!(seals.open(&altered), None);
        for forged in [
            "",
            "ps1.",
            "ps1.AAAA",
            "0123456789abcdef0123456789abcdef",
            &format!("ps1.{}", "A".repeat(10_000)),
            &id[..id.len() - 1],
        ] {
            assert_eq!(seals.open(forged), None, "{forged:.40}");
        }
    }

    #[test]
    fn short_keys_and_oversized_sessions_are_refused() {
        assert!(Seals::new(&["short".into()]).is_err());
        assert!(Seals::new(&[]).is_err());
        let seals = Seals::new(&[key('a')]).unwrap();
        let mut big = opened();
        big.capabilities = json!({"x": "y".repeat(MAX_SEALED_LEN)});
        assert_eq!(seals.seal(&big), None);
    }
}
