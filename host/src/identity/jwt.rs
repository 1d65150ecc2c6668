//! JWT bearer tokens (RFC 7519) as agent credentials: a compact JWS is
//! checked against the configured keys — a JWKS file or URL (RS256, ES256)
//! or an HS256 shared secret — and then its `exp`, `nbf`, `iss` and `aud`
//! claims. The algorithm must match the key's type, so a public key is never
//! taken for an HMAC secret, and `none` is never accepted.

use crate::config::JwtConfig;
use crate::util::outbound::{self, HttpClient};
use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Uri, header};
use ring::{hmac, signature};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A verified token's claims.
pub type Claims = Map<String, Value>;

/// The shortest wait before a JWKS URL is fetched again because a token
/// names a key it does not have (or the last fetch failed).
const REFETCH_GAP: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Checks tokens for one `[jwt]` section.
pub struct Verifier {
    issuer: String,
    audience: String,
    leeway: u64,
    keys: Keys,
}

enum Keys {
    Fixed(Arc<KeySet>),
    Remote(Box<RemoteKeys>),
}

/// The keys a token may be signed with.
#[derive(Default)]
pub struct KeySet(Vec<Key>);

struct Key {
    kid: Option<String>,
    material: Material,
}

enum Material {
    Hmac(hmac::Key),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point (0x04, x, y).
    P256(Vec<u8>),
}

impl Material {
    /// The one algorithm this key verifies.
    fn alg(&self) -> &'static str {
        match self {
            Material::Hmac(_) => "HS256",
            Material::Rsa { .. } => "RS256",
            Material::P256(_) => "ES256",
        }
    }

    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        match self {
            Material::Hmac(key) => hmac::verify(key, message, sig).is_ok(),
            Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Material::P256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }
}

impl KeySet {
    /// The signing keys of a JWKS document (RFC 7517). Keys for encryption,
    /// other curves or other algorithms are skipped.
    pub fn from_jwks(text: &str) -> Result<Self> {
        let jwks: Value = serde_json::from_str(text).context("not JSON")?;
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .context("no \"keys\" array")?;
        let mut set = Vec::new();
        for (i, jwk) in keys.iter().enumerate() {
            if let Some(key) = parse_jwk(jwk).with_context(|| format!("keys[{i}]"))? {
                set.push(key);
            }
        }
        ensure!(!set.is_empty(), "no RS256 or ES256 signing key");
        Ok(Self(set))
    }

    /// One HS256 secret.
    pub fn secret(secret: &[u8]) -> Result<Self> {
        ensure!(
            secret.len() >= 32,
            "an HS256 secret must be at least 32 bytes"
        );
        Ok(Self(vec![Key {
            kid: None,
            material: Material::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret)),
        }]))
    }

    fn has(&self, kid: &str) -> bool {
        self.0.iter().any(|key| key.kid.as_deref() == Some(kid))
    }

    /// Whether a key that fits the token's `alg` and `kid` verifies it.
    fn verifies(&self, alg: &str, kid: Option<&str>, message: &[u8], sig: &[u8]) -> bool {
        self.0
            .iter()
            .filter(|key| key.material.alg() == alg)
            .filter(|key| kid.is_none() || key.kid.is_none() || key.kid.as_deref() == kid)
            .any(|key| key.material.verifies(message, sig))
    }
}

fn parse_jwk(jwk: &Value) -> Result<Option<Key>> {
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    if text("use").is_some_and(|usage| usage != "sig") {
        return Ok(None);
    }
    let bytes = |name: &str| -> Result<Vec<u8>> {
        let value = text(name).with_context(|| format!("no \"{name}\""))?;
        URL_SAFE_NO_PAD
            .decode(value)
            .with_context(|| format!("\"{name}\" is not base64url"))
    };
    let material = match text("kty") {
        Some("RSA") => Material::Rsa {
            n: unsigned(bytes("n")?),
            e: unsigned(bytes("e")?),
        },
        Some("EC") if text("crv") == Some("P-256") => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            ensure!(
                x.len() == 32 && y.len() == 32,
                "P-256 coordinates must be 32 bytes"
            );
            Material::P256([&[4u8][..], &x, &y].concat())
        }
        _ => return Ok(None),
    };
    if text("alg").is_some_and(|alg| alg != material.alg()) {
        return Ok(None);
    }
    Ok(Some(Key {
        kid: text("kid").map(str::to_string),
        material,
    }))
}

/// A big-endian integer without leading zero bytes.
fn unsigned(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

impl Verifier {
    /// The verifier for `config`; a JWKS file is read and a secret resolved
    /// now, so a bad one fails the config, not the first token.
    pub fn new(config: &JwtConfig, base: &Path) -> Result<Self> {
        let keys = if let Some(file) = &config.jwks_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("jwt.jwks_file: cannot read {}", file.display()))?;
            let set = KeySet::from_jwks(&text)
                .with_context(|| format!("jwt.jwks_file {}", file.display()))?;
            Keys::Fixed(Arc::new(set))
        } else if let Some(url) = &config.jwks_url {
            Keys::Remote(Box::new(
                RemoteKeys::new(url, Duration::from_secs(config.jwks_refresh_secs))
                    .with_context(|| format!("jwt.jwks_url '{url}'"))?,
            ))
        } else {
            let secret = config.resolved_secret(base)?.unwrap_or_default();
            Keys::Fixed(Arc::new(
                KeySet::secret(secret.as_bytes()).context("jwt.hs256_secret")?,
            ))
        };
        Ok(Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway_secs,
            keys,
        })
    }

    /// The claims of `token` if it is signed by a configured key and valid
    /// at `now` (seconds since the epoch); otherwise why not.
    pub async fn verify(&self, token: &str, now: u64) -> Result<Claims> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("not a compact JWS (three dot-separated parts)");
        };
        let head = decode_object(header).context("header")?;
        let alg = head
            .get("alg")
            .and_then(Value::as_str)
            .context("header has no alg")?;
        ensure!(
            matches!(alg, "HS256" | "RS256" | "ES256"),
            "algorithm {alg} is not accepted"
        );
        let kid = head.get("kid").and_then(Value::as_str);
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .context("signature is not base64url")?;
        let keys = match &self.keys {
            Keys::Fixed(keys) => keys.clone(),
            Keys::Remote(remote) => remote.current(kid).await?,
        };
        let signed = &token[..header.len() + 1 + payload.len()];
        ensure!(
            keys.verifies(alg, kid, signed.as_bytes(), &sig),
            "the signature does not verify with any configured {alg} key"
        );
        let claims = decode_object(payload).context("payload")?;
        self.check(&claims, now)?;
        Ok(claims)
    }

    /// Whether verified `claims` are still valid at `now`: not expired, and
    /// from the issuer and for the audience this checker requires.
    pub fn check(&self, claims: &Claims, now: u64) -> Result<()> {
        let (now, leeway) = (now as f64, self.leeway as f64);
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .context("no numeric exp claim")?;
        ensure!(now <= exp + leeway, "the token expired");
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_f64().context("nbf is not a number")?;
            ensure!(now + leeway >= nbf, "the token is not valid yet (nbf)");
        }
        ensure!(
            claims.get("iss").and_then(Value::as_str) == Some(self.issuer.as_str()),
            "the issuer is not '{}'",
            self.issuer
        );
        let audience = Some(self.audience.as_str());
        let for_us = match claims.get("aud") {
            Some(Value::Array(list)) => list.iter().any(|aud| aud.as_str() == audience),
            Some(aud) => aud.as_str() == audience,
            None => false,
        };
        ensure!(for_us, "the audience is not '{}'", self.audience);
        Ok(())
    }
}

fn decode_object(part: &str) -> Result<Claims> {
    let bytes = URL_SAFE_NO_PAD.decode(part).context("not base64url")?;
    serde_json::from_slice(&bytes).context("not a JSON object")
}

/// The keys at a JWKS URL: fetched on first use, again every `refresh`,
/// and sooner when a token names a key not seen yet. A failed fetch keeps
/// the keys fetched before.
struct RemoteKeys {
    url: Uri,
    refresh: Duration,
    client: HttpClient,
    state: tokio::sync::Mutex<Fetched>,
}

#[derive(Default)]
struct Fetched {
    keys: Arc<KeySet>,
    at: Option<Instant>,
    failed: bool,
}

impl RemoteKeys {
    fn new(url: &str, refresh: Duration) -> Result<Self> {
        let url: Uri = url.parse().context("not a URL")?;
        ensure!(
            outbound::supports(url.scheme_str()),
            "use an http:// or https:// URL"
        );
        Ok(Self {
            url,
            refresh,
            client: outbound::client()?,
            state: Default::default(),
        })
    }

    async fn current(&self, kid: Option<&str>) -> Result<Arc<KeySet>> {
        let mut state = self.state.lock().await;
        let due = state.at.is_none_or(|at| {
            let age = at.elapsed();
            let missing = kid.is_some_and(|kid| !state.keys.has(kid));
            age >= self.refresh || (age >= REFETCH_GAP && (missing || state.failed))
        });
        if due {
            state.at = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    state.keys = Arc::new(keys);
                    state.failed = false;
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, "cannot fetch the JWKS: {e:#}");
                    state.failed = true;
                }
            }
        }
        ensure!(
            !state.keys.0.is_empty(),
            "no keys fetched from {} yet",
            self.url
        );
        Ok(state.keys.clone())
    }

    async fn fetch(&self) -> Result<KeySet> {
        let request = Request::get(self.url.clone())
            .header(header::ACCEPT, "application/json")
            .body(Full::default())?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(request))
            .await
            .context("timed out")??;
        let status = response.status();
        ensure!(status.is_success(), "HTTP {status}");
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        KeySet::from_jwks(std::str::from_utf8(&body).context("not UTF-8")?)
    }
}

/// An HS256 token with `claims`, for tests.
#[cfg(test)]
pub(crate) fn hs256_token(secret: &[u8], claims: &Value) -> String {
    let encode = |value: Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let body = format!(
        "{}.{}",
        encode(serde_json::json!({"alg": "HS256", "typ": "JWT"})),
        encode(claims.clone())
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let sig = URL_SAFE_NO_PAD.encode(hmac::sign(&key, body.as_bytes()));
    format!("{body}.{sig}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unsigned_token(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    }

    fn hs256(claims: &Value) -> String {
        hs256_token(SECRET, claims)
    }

    fn claims() -> Value {
        json!({"sub": "bot", "iss": "https://idp", "aud": ["x", "portcullis"], "exp": NOW + 60})
    }

    fn verifier(keys: KeySet) -> Verifier {
        Verifier {
            issuer: "https://idp".into(),
            audience: "portcullis".into(),
            leeway: 30,
            keys: Keys::Fixed(Arc::new(keys)),
        }
    }

    fn verify(verifier: &Verifier, token: &str) -> Result<Claims> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(verifier.verify(token, NOW))
    }

    fn refusal(verifier: &Verifier, token: &str) -> String {
        format!("{:#}", verify(verifier, token).unwrap_err())
    }

    #[test]
    fn an_hs256_token_with_good_claims_is_accepted() {
        let v = verifier(KeySet::secret(SECRET).unwrap());
        let claims = verify(&v, &hs256(&claims())).unwrap();
        assert_eq!(claims["sub"], "bot");
    }

    #[test]
    fn claims_are_checked() {
        let v = verifier(KeySet::secret(SECRET).unwrap());
        let with = |key: &str, value: Value| {
            let mut claims = claims();
            claims[key] = value;
            refusal(&v, &hs256(&claims))
        };
        assert!(with("exp", json!(NOW - 31)).contains("expired"));
        assert!(with("nbf", json!(NOW + 31)).contains("not valid yet"));
        assert!(with("iss", json!("https://evil")).contains("issuer"));
        assert!(with("aud", json!("other")).contains("audience"));
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(refusal(&v, &hs256(&no_exp)).contains("no numeric exp"));
        let mut lately_expired = claims();
        lately_expired["exp"] = json!(NOW - 29);
        assert!(
            verify(&v, &hs256(&lately_expired)).is_ok(),
            "within the leeway"
        );
    }

    #[test]
    fn tampered_unsigned_and_foreign_tokens_are_refused() {
        let v = verifier(KeySet::secret(SECRET).unwrap());
        let token = hs256(&claims());
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let (header, _) = signed.split_once('.').unwrap();
        let forged = format!("{header}.{}.{sig}", b64(br#"{"sub":"admin"}"#));
        assert!(refusal(&v, &forged).contains("signature does not verify"));
        let none = unsigned_token(&json!({"alg": "none"}), &claims()) + ".";
        assert!(refusal(&v, &none).contains("algorithm none is not accepted"));
        assert!(refusal(&v, "abc").contains("three dot-separated parts"));
        let other = verifier(KeySet::secret(&[7u8; 32]).unwrap());
        assert!(refusal(&other, &token).contains("signature"));
    }

    #[test]
    fn an_es256_token_verifies_with_its_jwk_and_not_as_hmac() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let jwks = json!({"keys": [
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "x": "", "y": ""},
            {"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
             "x": b64(&point[1..33]), "y": b64(&point[33..])}
        ]});
        let v = verifier(KeySet::from_jwks(&jwks.to_string()).unwrap());
        let body = unsigned_token(&json!({"alg": "ES256", "kid": "k1"}), &claims());
        let sig = pair.sign(&rng, body.as_bytes()).unwrap();
        assert_eq!(
            verify(&v, &format!("{body}.{}", b64(sig.as_ref()))).unwrap()["sub"],
            "bot"
        );
        let wrong_kid = unsigned_token(&json!({"alg": "ES256", "kid": "k2"}), &claims());
        let sig = pair.sign(&rng, wrong_kid.as_bytes()).unwrap();
        assert!(verify(&v, &format!("{wrong_kid}.{}", b64(sig.as_ref()))).is_err());
        // The public key's bytes used as an HMAC secret: algorithm confusion.
        let body = unsigned_token(&json!({"alg": "HS256"}), &claims());
        let key = hmac::Key::new(hmac::HMAC_SHA256, point);
        let sig = hmac::sign(&key, body.as_bytes());
        assert!(verify(&v, &format!("{body}.{}", b64(sig.as_ref()))).is_err());
    }

    #[test]
    fn bad_key_material_is_reported() {
        assert!(KeySet::secret(b"short").is_err());
        let refused = |jwks: &str| match KeySet::from_jwks(jwks) {
            Ok(_) => panic!("{jwks} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        let oct = refused(r#"{"keys": [{"kty": "oct", "k": "AA"}]}"#);
        assert!(oct.contains("no RS256 or ES256 signing key"), "{oct}");
        let bad = refused(r#"{"keys": [{"kty": "RSA", "n": "!"}]}"#);
        assert!(bad.contains("keys[0]"), "{bad}");
    }
}
