//! Who is calling `portcullis serve`: an agent of the config, known by its
//! own API key (only the key's sha256 is configured) or by a JWT from the
//! configured issuer, and limited to the servers it was granted. An
//! identity remembers the credential it was read from, so what it may do
//! can be asked again under a later config ([`Identity::now`]): a stream or
//! a held call outlives the request that authenticated it, and a reload or
//! an expiry must reach it too.

pub mod jwt;

use crate::config::{AgentEntry, ApproverEntry, Config, JwtConfig};
use crate::contract::Agent;
use crate::identity::jwt::{Claims, Verifier};
use crate::util::encode::hex;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use wildmatch::WildMatch;

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The agent as policies and audit records see it.
    pub agent: Agent,
    servers: Vec<WildMatch>,
    credential: Credential,
}

/// What an identity was read from.
#[derive(Debug, Clone)]
enum Credential {
    /// An API key, by its sha256.
    Key(String),
    /// A verified JWT's claims.
    Token(std::sync::Arc<Claims>),
}

impl Identity {
    fn new(
        id: String,
        attributes: BTreeMap<String, String>,
        servers: &[String],
        credential: Credential,
    ) -> Self {
        Self {
            agent: Agent {
                id,
                attributes: attributes.into_iter().collect(),
            },
            servers: servers.iter().map(|g| WildMatch::new(g)).collect(),
            credential,
        }
    }

    /// An agent `id` granted `servers`, known by a key, for tests.
    #[cfg(test)]
    pub fn for_tests_with(id: &str, servers: &[&str]) -> Self {
        let servers: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        Self::new(
            id.into(),
            BTreeMap::new(),
            &servers,
            Credential::Key(key_hash(id)),
        )
    }

    /// An agent `id` granted every server, for tests.
    #[cfg(test)]
    pub fn for_tests(id: &str) -> Self {
        Self::for_tests_with(id, &["*"])
    }

    /// Whether the agent may see and call `server`.
    pub fn may_use(&self, server: &str) -> bool {
        self.servers.iter().any(|glob| glob.matches(server))
    }

    /// This identity as its credential reads under `config` (and its `jwt`
    /// checker) at `now`: the key must still name the same agent, the
    /// token must still be valid (not expired, from the issuer and for the
    /// audience configured) and name the same agent; the servers and
    /// attributes are the ones `config` gives now. `None` when the
    /// credential no longer authenticates this agent.
    pub fn now(&self, config: &Config, jwt: Option<&Verifier>, now: u64) -> Option<Identity> {
        let again = match &self.credential {
            Credential::Key(hash) => by_key_hash(&config.agents, hash)?,
            Credential::Token(claims) => {
                let (verifier, settings) = (jwt?, config.jwt.as_ref()?);
                verifier.check(claims, now).ok()?;
                by_claims(&config.agents, settings, claims)?
            }
        };
        (again.agent.id == self.agent.id).then_some(again)
    }
}

/// Why a request was not authenticated (HTTP 401).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A key no agent has, or a token that does not verify.
    Invalid,
}

impl Refusal {
    /// The `WWW-Authenticate` challenge (RFC 6750).
    pub fn challenge(&self) -> &'static str {
        match self {
            Refusal::Missing => r#"Bearer realm="portcullis""#,
            Refusal::Invalid => r#"Bearer realm="portcullis", error="invalid_token""#,
        }
    }

    /// The body of the 401 answer.
    pub fn explanation(&self) -> &'static str {
        match self {
            Refusal::Missing => "an agent API key or JWT is required (Authorization: Bearer)",
            Refusal::Invalid => "the bearer credential is not valid",
        }
    }
}

/// The sha256 of an API key, as configured in `api_key_sha256`.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// The agent named by the `Authorization` header value: an API key of
/// `[agents]`, else a JWT checked by `jwt` at `now` (seconds since the epoch).
pub async fn authenticate(
    config: &Config,
    jwt: Option<&Verifier>,
    authorization: Option<&str>,
    now: u64,
) -> Result<Identity, Refusal> {
    let token = bearer(authorization).ok_or(Refusal::Missing)?;
    if let Some(identity) = by_key_hash(&config.agents, &key_hash(token)) {
        return Ok(identity);
    }
    let (Some(verifier), Some(settings)) = (jwt, &config.jwt) else {
        return Err(Refusal::Invalid);
    };
    let claims = verifier.verify(token, now).await.map_err(|e| {
        tracing::info!("bearer token refused: {e:#}");
        Refusal::Invalid
    })?;
    by_claims(&config.agents, settings, &std::sync::Arc::new(claims)).ok_or_else(|| {
        let claim = &settings.agent_claim;
        tracing::info!("bearer token refused: no string '{claim}' claim names the agent");
        Refusal::Invalid
    })
}

/// The approver whose API key the `Authorization` header value carries.
pub fn approver(
    approvers: &BTreeMap<String, ApproverEntry>,
    authorization: Option<&str>,
) -> Option<String> {
    let key = bearer(authorization)?;
    let hash = key_hash(key);
    let mut found = None;
    for (name, entry) in approvers {
        if same(
            hash.as_bytes(),
            entry.api_key_sha256.to_ascii_lowercase().as_bytes(),
        ) {
            found = Some(name.clone());
        }
    }
    found
}

/// The token of a `Bearer` authorization.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The agent whose key hashes to `hash`.
fn by_key_hash(agents: &BTreeMap<String, AgentEntry>, hash: &str) -> Option<Identity> {
    // Every entry is compared in full, so the time taken does not tell how
    // much of a guess matched.
    let mut found = None;
    for (id, entry) in agents {
        if let Some(expected) = &entry.api_key_sha256
            && same(hash.as_bytes(), expected.to_ascii_lowercase().as_bytes())
        {
            found = Some((id, entry));
        }
    }
    let (id, entry) = found?;
    Some(Identity::new(
        id.clone(),
        entry.attributes.clone(),
        &entry.servers,
        Credential::Key(hash.to_string()),
    ))
}

/// The agent a verified token names: its `[agents.ID]` entry (if any) and
/// its groups grant servers; every claim becomes a `jwt.NAME` attribute.
fn by_claims(
    agents: &BTreeMap<String, AgentEntry>,
    settings: &JwtConfig,
    claims: &std::sync::Arc<Claims>,
) -> Option<Identity> {
    let id = claims.get(&settings.agent_claim)?.as_str()?.to_string();
    let entry = agents.get(&id);
    let mut servers = entry.map(|e| e.servers.clone()).unwrap_or_default();
    let groups = match claims.get(&settings.groups_claim) {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(group)) => vec![group.as_str()],
        _ => Vec::new(),
    };
    for group in groups {
        servers.extend(settings.groups.get(group).cloned().unwrap_or_default());
    }
    let mut attributes = entry.map(|e| e.attributes.clone()).unwrap_or_default();
    for (name, value) in claims.iter() {
        attributes.insert(format!("jwt.{name}"), claim_text(value));
    }
    let credential = Credential::Token(claims.clone());
    Some(Identity::new(id, attributes, &servers, credential))
}

/// A claim as an attribute value: strings as they are, lists of strings
/// joined by commas, anything else as JSON.
fn claim_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(list) if list.iter().all(Value::is_string) => list
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::jwt::hs256_token;
    use serde_json::json;
    use std::path::Path;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn config() -> Config {
        Config::parse(&config_text(), Path::new("/etc/portcullis.toml")).unwrap()
    }

    fn config_text() -> String {
        format!(
            r#"
            [agents.reader]
            api_key_sha256 = "{reader}"
            servers = ["files"]
            attributes = {{ team = "qa" }}
            [agents.admin]
            api_key_sha256 = "{admin}"
            [agents.ci]
            servers = ["build"]
            [jwt]
            issuer = "https://idp"
            audience = "portcullis"
            hs256_secret = "{SECRET}"
            [jwt.groups]
            ops = ["metrics", "logs"]
            "#,
            reader = key_hash("reader-key"),
            admin = key_hash("admin-key"),
        )
    }

    fn login(header: Option<&str>) -> Result<Identity, Refusal> {
        let config = config();
        let verifier = Verifier::new(config.jwt.as_ref().unwrap(), Path::new("/etc")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(authenticate(&config, Some(&verifier), header, NOW))
    }

    fn token(claims: serde_json::Value) -> String {
        let mut all = json!({"iss": "https://idp", "aud": "portcullis", "exp": NOW + 60});
        all.as_object_mut()
            .unwrap()
            .extend(claims.as_object().unwrap().clone());
        format!("Bearer {}", hs256_token(SECRET.as_bytes(), &all))
    }

    #[test]
    fn a_known_key_names_its_agent_and_its_servers() {
        let reader = login(Some("Bearer reader-key")).unwrap();
        assert_eq!(reader.agent.id, "reader");
        assert_eq!(reader.agent.attributes, vec![("team".into(), "qa".into())]);
        assert!(reader.may_use("files") && !reader.may_use("everything"));
        let admin = login(Some("Bearer admin-key")).unwrap();
        assert!(admin.may_use("everything"));
    }

    #[test]
    fn missing_and_unknown_keys_are_refused() {
        let refused = |header| login(header).unwrap_err();
        assert_eq!(refused(None), Refusal::Missing);
        assert_eq!(refused(Some("Basic cmVhZGVyOng=")), Refusal::Missing);
        assert_eq!(refused(Some("Bearer ")), Refusal::Missing);
        assert_eq!(refused(Some("Bearer reader-key2")), Refusal::Invalid);
        assert_eq!(refused(Some("Bearer READER-KEY")), Refusal::Invalid);
    }

    #[test]
    fn a_token_names_its_agent_with_the_servers_of_its_entry_and_groups() {
        let ci = login(Some(&token(json!({"sub": "ci", "groups": ["ops", "x"]})))).unwrap();
        assert_eq!(ci.agent.id, "ci");
        assert!(ci.may_use("build") && ci.may_use("logs") && !ci.may_use("files"));
        let attributes: BTreeMap<_, _> = ci.agent.attributes.into_iter().collect();
        assert_eq!(attributes["jwt.groups"], "ops,x");
        assert_eq!(attributes["jwt.exp"], (NOW + 60).to_string());
        // An agent without an entry gets only what its groups grant.
        let stranger = login(Some(&token(json!({"sub": "stranger"})))).unwrap();
        assert!(!stranger.may_use("build") && !stranger.may_use("files"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let expired = token(json!({"sub": "ci", "exp": NOW - 3600}));
        assert_eq!(login(Some(&expired)).unwrap_err(), Refusal::Invalid);
        let nameless = token(json!({"email": "ci@example.com"}));
        assert_eq!(login(Some(&nameless)).unwrap_err(), Refusal::Invalid);
    }

    #[test]
    fn an_identity_asked_again_reads_its_credential_under_the_config_in_force() {
        let reader = login(Some("Bearer reader-key")).unwrap();
        let ci = login(Some(&token(json!({"sub": "ci", "groups": ["ops"]})))).unwrap();
        let config = config();
        let verifier = Verifier::new(config.jwt.as_ref().unwrap(), Path::new("/etc")).unwrap();
        let again = reader.now(&config, Some(&verifier), NOW).unwrap();
        assert!(again.may_use("files"));
        // The operator narrows the grants: the reader loses its server, ops
        // loses logs.
        let narrowed = config_text()
            .replace(r#"servers = ["files"]"#, "servers = []")
            .replace(r#"ops = ["metrics", "logs"]"#, r#"ops = ["metrics"]"#);
        let narrowed = Config::parse(&narrowed, Path::new("/etc/portcullis.toml")).unwrap();
        let reader_now = reader.now(&narrowed, Some(&verifier), NOW).unwrap();
        assert!(!reader_now.may_use("files"));
        let ci_now = ci.now(&narrowed, Some(&verifier), NOW).unwrap();
        assert!(ci_now.may_use("metrics") && !ci_now.may_use("logs"));
        // A key taken away, a token past its expiry, or no [jwt] any more:
        // the credential no longer authenticates anyone.
        let rotated = config_text().replace(&key_hash("reader-key"), &key_hash("new-key"));
        let rotated = Config::parse(&rotated, Path::new("/etc/portcullis.toml")).unwrap();
        assert!(reader.now(&rotated, Some(&verifier), NOW).is_none());
        assert!(ci.now(&config, Some(&verifier), NOW + 3600).is_none());
        assert!(ci.now(&config, None, NOW).is_none());
    }
}
