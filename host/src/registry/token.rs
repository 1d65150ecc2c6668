//! Registry credentials, kept to where the config sends them. A registry
//! answers `/v2/` with a challenge; for token authentication it names a
//! realm, and the credentials go there to get a token. A hostile or
//! misconfigured registry could name any realm, so Portcullis makes the
//! exchange itself: the credentials configured for a registry go only to
//! that registry's own origin or to a realm its `[registries."HOST"]
//! token_realms` names, and never over plain HTTP unless the registry
//! itself is reached so (loopback or `insecure`) and the realm is on the
//! same host. Every answer is read bounded, and tokens are kept until they
//! expire, so a followed tag's polls do not fetch one each time.

use crate::registry::client::Failure;
use crate::util::outbound::{self, HttpClient};
use anyhow::anyhow;
use base64::Engine;
use hyper::{Method, Uri};
use oci_client::secrets::RegistryAuth;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most of a challenge's or token's answer read.
const MAX_ANSWER: usize = 64 << 10;
/// How long a challenge or token request may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a token is kept when its answer does not say (the
/// distribution specification's default), and at most.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
const MOST_LIFETIME: Duration = Duration::from_secs(300);

/// What a request to the registry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Nothing: the registry asks for nothing (or nothing is configured).
    Anonymous,
    /// The configured user name and password, for a registry that asks for
    /// basic authentication itself.
    Basic(String, String),
    /// A bearer token: configured, or from the registry's token service.
    Bearer(String),
}

impl Authorization {
    /// The `Authorization` header's value, if any.
    pub fn header(&self) -> Option<String> {
        match self {
            Authorization::Anonymous => None,
            Authorization::Basic(user, password) => Some(basic(user, password)),
            Authorization::Bearer(token) => Some(format!("Bearer {token}")),
        }
    }

    /// The same, as `oci-client` takes it (pushes).
    pub fn for_oci(&self) -> RegistryAuth {
        match self {
            Authorization::Anonymous => RegistryAuth::Anonymous,
            Authorization::Basic(user, password) => {
                RegistryAuth::Basic(user.clone(), password.clone())
            }
            Authorization::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// Where a registry is, and what may be sent where for it.
pub struct Registry<'a> {
    /// `https://HOST` or `http://HOST` (HOST with its port, as configured).
    pub base: &'a str,
    /// The credentials configured for it (or the Docker config's).
    pub credentials: &'a RegistryAuth,
    /// `token_realms`: realms elsewhere its credentials may go to.
    pub realms: &'a [String],
}

/// The tokens fetched, by registry and scope, until they expire.
#[derive(Default)]
pub struct Tokens {
    kept: Mutex<HashMap<(String, String), (Authorization, Instant)>>,
}

impl Tokens {
    /// What requests to `registry` for `scope` (e.g.
    /// `repository:team/policy:pull`) carry: as its challenge asks, with
    /// its credentials sent only where [`allowed`] says.
    pub async fn authorize(
        &self,
        http: &HttpClient,
        registry: &Registry<'_>,
        scope: &str,
    ) -> Result<Authorization, Failure> {
        let key = (registry.base.to_string(), scope.to_string());
        if let Some((kept, until)) = self.kept().get(&key)
            && *until > Instant::now()
        {
            return Ok(kept.clone());
        }
        let (authorization, lifetime) = self.ask(http, registry, scope).await?;
        let mut kept = self.kept();
        kept.retain(|_, (_, until)| *until > Instant::now());
        kept.insert(key, (authorization.clone(), Instant::now() + lifetime));
        Ok(authorization)
    }

    /// Forgets what requests to `registry` carried (it refused them).
    pub fn forget(&self, base: &str) {
        self.kept().retain(|(kept, _), _| kept != base);
    }

    fn kept(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Authorization, Instant)>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn ask(
        &self,
        http: &HttpClient,
        registry: &Registry<'_>,
        scope: &str,
    ) -> Result<(Authorization, Duration), Failure> {
        let url = format!("{}/v2/", registry.base);
        let answer = outbound::fetch(http, Method::GET, &url, &[], MAX_ANSWER, TIMEOUT)
            .await
            .map_err(|e| Failure::of_request(e, format!("GET {url}")))?;
        let forever = MOST_LIFETIME;
        if answer.status.is_success() {
            return Ok((Authorization::Anonymous, forever));
        }
        let challenge = answer
            .headers
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(Challenge::parse);
        let configured = registry.credentials;
        match (challenge, configured) {
            (_, RegistryAuth::Bearer(token)) => Ok((Authorization::Bearer(token.clone()), forever)),
            (Some(Challenge::Basic), RegistryAuth::Basic(user, password)) => Ok((
                Authorization::Basic(user.clone(), password.clone()),
                forever,
            )),
            (Some(Challenge::Bearer { realm, service }), _) => {
                fetch_token(http, registry, &realm, service.as_deref(), scope).await
            }
            (Some(Challenge::Basic) | None, _) => Ok((Authorization::Anonymous, DEFAULT_LIFETIME)),
        }
    }
}

/// A `WWW-Authenticate` challenge of a registry.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// The first challenge of `header`; one Portcullis does not know reads
    /// as none.
    fn parse(header: &str) -> Self {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Challenge::Basic;
        }
        let parameters = parameters(rest);
        let find = |name: &str| {
            parameters
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.clone())
        };
        match find("realm") {
            Some(realm) => Challenge::Bearer {
                realm,
                service: find("service"),
            },
            None => Challenge::Basic,
        }
    }
}

/// The `key="value"` (or `key=token`) parameters of a challenge.
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((at, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = at + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            }
        };
        found.push((key, value));
        rest = next.trim_start().trim_start_matches(',');
    }
    found
}

/// Whether the credentials configured for `registry` may go to `realm`:
/// its own origin, or a realm `token_realms` names; over plain HTTP only
/// where the registry itself is reached so and the realm is on its host.
/// Otherwise why not, and how to allow it.
fn allowed(registry: &Registry<'_>, realm: &str, host: &str) -> Result<(), String> {
    let realm_uri: Uri = realm
        .parse()
        .map_err(|_| format!("its token realm '{realm}' is not a URL"))?;
    let base: Uri = registry
        .base
        .parse()
        .map_err(|_| "a bad registry URL".to_string())?;
    let scheme = realm_uri.scheme_str().unwrap_or_default();
    if !matches!(scheme, "http" | "https") || realm_uri.host().is_none() {
        return Err(format!("its token realm '{realm}' is not an http(s) URL"));
    }
    let origin = |uri: &Uri| {
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        (
            uri.scheme_str().map(str::to_ascii_lowercase),
            uri.host().map(str::to_ascii_lowercase),
            port,
        )
    };
    let same_origin = origin(&realm_uri) == origin(&base);
    let without_query = realm.split(['?', '#']).next().unwrap_or(realm);
    let listed = registry
        .realms
        .iter()
        .any(|r| r.trim_end_matches('/') == without_query.trim_end_matches('/'));
    if !same_origin && !listed {
        return Err(format!(
            "it sends its token requests to {without_query}, which is neither {host} itself nor in [registries.\"{host}\"] token_realms; its credentials are not sent there (add the realm to token_realms if it is the registry's own token service)"
        ));
    }
    let same_host =
        realm_uri.host().map(str::to_ascii_lowercase) == base.host().map(str::to_ascii_lowercase);
    if scheme == "http" && !(base.scheme_str() == Some("http") && same_host) {
        return Err(format!(
            "its token realm {without_query} is plain HTTP: credentials go over plain HTTP only to a loopback or insecure registry's own host"
        ));
    }
    Ok(())
}

/// A token for `scope` from the token service at `realm`, with the
/// registry's credentials where they may go.
async fn fetch_token(
    http: &HttpClient,
    registry: &Registry<'_>,
    realm: &str,
    service: Option<&str>,
    scope: &str,
) -> Result<(Authorization, Duration), Failure> {
    let host = registry
        .base
        .split_once("://")
        .map_or(registry.base, |(_, host)| host);
    let mut headers = Vec::new();
    if let RegistryAuth::Basic(user, password) = registry.credentials {
        allowed(registry, realm, host)
            .map_err(|why| Failure::Other(anyhow!("registry {host}: {why}")))?;
        headers.push(("authorization".to_string(), basic(user, password)));
    }
    let mut url = format!(
        "{realm}{}scope={}",
        if realm.contains('?') { '&' } else { '?' },
        encode(scope)
    );
    if let Some(service) = service {
        url.push_str(&format!("&service={}", encode(service)));
    }
    let answer = outbound::fetch(http, Method::GET, &url, &headers, MAX_ANSWER, TIMEOUT)
        .await
        .map_err(|e| Failure::of_request(e, format!("GET {realm}")))?;
    if answer.status == hyper::StatusCode::UNAUTHORIZED
        || answer.status == hyper::StatusCode::FORBIDDEN
    {
        return Err(Failure::Other(anyhow!(
            "registry {host}: its token service refused the credentials (authentication failed, HTTP {})",
            answer.status.as_u16()
        )));
    }
    if !answer.status.is_success() {
        return Err(Failure::Other(anyhow!(
            "registry {host}: its token service answered HTTP {}",
            answer.status.as_u16()
        )));
    }
    #[derive(serde::Deserialize)]
    struct Token {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let token: Token = serde_json::from_slice(&answer.body)
        .map_err(|e| Failure::Other(anyhow!("registry {host}: its token service's answer: {e}")))?;
    let expires_in = token.expires_in;
    let token = token
        .token
        .or(token.access_token)
        .filter(|t| !t.is_empty())
        .map(|t| (t, expires_in))
        .ok_or_else(|| {
            Failure::Other(anyhow!("registry {host}: its token service gave no token"))
        })?;
    Ok((Authorization::Bearer(token.0), token_lifetime(token.1)))
}

/// `text` as a URL query value.
fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// How long a token said to last `expires_in` seconds is kept: a little
/// less, and at most [`MOST_LIFETIME`].
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    let said = expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs);
    said.saturating_sub(Duration::from_secs(5))
        .min(MOST_LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry<'a>(
        base: &'a str,
        realms: &'a [String],
        credentials: &'a RegistryAuth,
    ) -> Registry<'a> {
        Registry {
            base,
            credentials,
            realms,
        }
    }

    #[test]
    fn a_challenge_reads_its_realm_and_service() {
        let header = r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a:pull""#;
        assert_eq!(
            Challenge::parse(header),
            Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into())
            }
        );
        assert_eq!(Challenge::parse(r#"Basic realm="test""#), Challenge::Basic);
        assert_eq!(
            Challenge::parse(r#"Bearer realm="https://a/t\"x""#),
            Challenge::Bearer {
                realm: "https://a/t\"x".into(),
                service: None
            }
        );
    }

    #[test]
    fn credentials_go_only_to_the_registry_or_a_realm_the_config_names() {
        let basic = RegistryAuth::Basic("u".into(), "p".into());
        let none: Vec<String> = Vec::new();
        let listed = vec!["https://auth.example.com/token".to_string()];
        let https = registry("https://registry.example.com", &none, &basic);
        assert!(
            allowed(
                &https,
                "https://registry.example.com/token?x=1",
                "registry.example.com"
            )
            .is_ok()
        );
        assert!(
            allowed(
                &https,
                "https://registry.example.com:443/token",
                "registry.example.com"
            )
            .is_ok()
        );
        let foreign = allowed(
            &https,
            "https://auth.example.com/token",
            "registry.example.com",
        )
        .unwrap_err();
        assert!(foreign.contains("token_realms"), "{foreign}");
        let named = registry("https://registry.example.com", &listed, &basic);
        assert!(
            allowed(
                &named,
                "https://auth.example.com/token",
                "registry.example.com"
            )
            .is_ok()
        );
        assert!(
            allowed(
                &named,
                "https://auth.example.com/other",
                "registry.example.com"
            )
            .is_err()
        );
        // Plain HTTP: never for an HTTPS registry, even a realm on its host.
        let plain_realm = allowed(
            &https,
            "http://registry.example.com/token",
            "registry.example.com",
        );
        assert!(plain_realm.is_err());
        let loopback = registry("https://127.0.0.1:5000", &none, &basic);
        let other_port =
            allowed(&loopback, "http://127.0.0.1:5001/token", "127.0.0.1:5000").unwrap_err();
        assert!(other_port.contains("token_realms"), "{other_port}");
        // A loopback registry reached over plain HTTP, its realm on its host.
        let listed_plain = vec!["http://127.0.0.1:5001/token".to_string()];
        let plain = registry("http://127.0.0.1:5000", &listed_plain, &basic);
        assert!(allowed(&plain, "http://127.0.0.1:5001/token", "127.0.0.1:5000").is_ok());
        assert!(allowed(&plain, "http://127.0.0.1:5000/token", "127.0.0.1:5000").is_ok());
        let elsewhere = registry("http://127.0.0.1:5000", &listed, &basic);
        assert!(allowed(&elsewhere, "http://10.0.0.1/token", "127.0.0.1:5000").is_err());
        assert!(allowed(&https, "file:///etc/passwd", "registry.example.com").is_err());
    }

    #[test]
    fn tokens_are_kept_a_little_less_than_they_last_and_five_minutes_at_most() {
        assert_eq!(token_lifetime(None), Duration::from_secs(55));
        assert_eq!(token_lifetime(Some(3600)), MOST_LIFETIME);
        assert_eq!(token_lifetime(Some(2)), Duration::ZERO);
    }
}
