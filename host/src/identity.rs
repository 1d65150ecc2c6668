//! Who is calling `portcullis serve`: the agents of the config, each
//! authenticated by its own API key (only the key's sha256 is configured)
//! and limited to the servers it was granted.

use crate::bindings::Agent;
use crate::config::AgentEntry;
use crate::engine::hex;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use wildmatch::WildMatch;

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The agent as policies and audit records see it.
    pub agent: Agent,
    servers: Vec<WildMatch>,
}

impl Identity {
    /// Whether the agent may see and call `server`.
    pub fn may_use(&self, server: &str) -> bool {
        self.servers.iter().any(|glob| glob.matches(server))
    }
}

/// Why a request was not authenticated (HTTP 401).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A key no agent has.
    Unknown,
}

impl Refusal {
    /// The `error` of the `WWW-Authenticate` challenge (RFC 6750).
    pub fn challenge(&self) -> &'static str {
        match self {
            Refusal::Missing => r#"Bearer realm="portcullis""#,
            Refusal::Unknown => r#"Bearer realm="portcullis", error="invalid_token""#,
        }
    }
}

/// The sha256 of an API key, as configured in `api_key_sha256`.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Finds the agent whose key is in the `Authorization` header value.
pub fn authenticate(
    agents: &BTreeMap<String, AgentEntry>,
    authorization: Option<&str>,
) -> Result<Identity, Refusal> {
    let key = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or(Refusal::Missing)?;
    let hash = key_hash(key);
    // Every entry is compared in full, so the time taken does not tell how
    // much of a guess matched.
    let mut found = None;
    for (id, entry) in agents {
        if same(
            hash.as_bytes(),
            entry.api_key_sha256.to_ascii_lowercase().as_bytes(),
        ) {
            found = Some((id, entry));
        }
    }
    let (id, entry) = found.ok_or(Refusal::Unknown)?;
    Ok(Identity {
        agent: Agent {
            id: id.clone(),
            attributes: entry.attributes.clone().into_iter().collect(),
        },
        servers: entry.servers.iter().map(|g| WildMatch::new(g)).collect(),
    })
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents() -> BTreeMap<String, AgentEntry> {
        let entry = |key: &str, servers: &[&str]| AgentEntry {
            api_key_sha256: key_hash(key),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            attributes: BTreeMap::from([("team".into(), "qa".into())]),
        };
        BTreeMap::from([
            ("reader".to_string(), entry("reader-key", &["files"])),
            ("admin".to_string(), entry("admin-key", &["*"])),
        ])
    }

    #[test]
    fn a_known_key_names_its_agent_and_its_servers() {
        let reader = authenticate(&agents(), Some("Bearer reader-key")).unwrap();
        assert_eq!(reader.agent.id, "reader");
        assert_eq!(reader.agent.attributes, vec![("team".into(), "qa".into())]);
        assert!(reader.may_use("files") && !reader.may_use("everything"));
        let admin = authenticate(&agents(), Some("Bearer admin-key")).unwrap();
        assert!(admin.may_use("everything"));
    }

    #[test]
    fn missing_and_unknown_keys_are_refused() {
        let refused = |header| authenticate(&agents(), header).unwrap_err();
        assert_eq!(refused(None), Refusal::Missing);
        assert_eq!(refused(Some("Basic cmVhZGVyOng=")), Refusal::Missing);
        assert_eq!(refused(Some("Bearer ")), Refusal::Missing);
        assert_eq!(refused(Some("Bearer reader-key2")), Refusal::Unknown);
        assert_eq!(refused(Some("Bearer READER-KEY")), Refusal::Unknown);
    }
}
