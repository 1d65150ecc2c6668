//! Reading from an OCI registry (the distribution specification's pull
//! side): a manifest by tag or digest, the digest a tag names now, a blob.
//! Every answer is read up to a bound and no further (a manifest, a
//! module's size, an error's text), and the registry's credentials go only
//! to the registry itself: a blob redirected to another host (object
//! storage) is fetched there without them.

use crate::registry::client::{Failure, MANIFEST_MEDIA_TYPE};
use crate::registry::token::Authorization;
use crate::util::encode::hex;
use crate::util::outbound::{self, HttpClient};
use anyhow::anyhow;
use hyper::{Method, StatusCode, Uri};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// How long one answer may take.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The most of an error's text read.
const MAX_ERROR: usize = 16 << 10;
/// Redirects followed for one blob.
const MOST_REDIRECTS: usize = 5;

/// One repository of one registry, as a call reaches it.
pub struct Repository<'a> {
    /// The HTTP client.
    pub http: &'a HttpClient,
    /// `https://HOST` or `http://HOST`.
    pub base: String,
    /// The repository's name.
    pub name: &'a str,
    /// What requests to the registry carry.
    pub authorization: Authorization,
}

impl Repository<'_> {
    /// The manifest `reference` (a tag or a digest) names, at most `max`
    /// bytes, and its digest.
    pub async fn manifest(
        &self,
        reference: &str,
        max: usize,
    ) -> Result<(Vec<u8>, String), Failure> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.name);
        let answer = self.get(Method::GET, &url, max).await?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&answer.body)));
        if reference.starts_with("sha256:") && reference != digest {
            let mismatch =
                crate::registry::cache::Mismatch(format!("expected {reference}, got {digest}"));
            return Err(Failure::Other(
                anyhow!(mismatch).context(format!("the manifest {url}")),
            ));
        }
        Ok((answer.body.to_vec(), digest))
    }

    /// The digest `tag` names now.
    pub async fn digest(&self, tag: &str, max: usize) -> Result<String, Failure> {
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.name);
        let answer = self.get(Method::HEAD, &url, 0).await?;
        let header = answer
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:"));
        match header {
            Some(digest) => Ok(digest.to_string()),
            // No digest header: the manifest itself, hashed.
            None => Ok(self.manifest(tag, max).await?.1),
        }
    }

    /// The blob `digest`, refused when longer than `limit` bytes.
    pub async fn blob(&self, digest: &str, limit: usize) -> Result<Vec<u8>, Failure> {
        let mut url = format!("{}/v2/{}/blobs/{digest}", self.base, self.name);
        for _ in 0..=MOST_REDIRECTS {
            let answer = self.send(Method::GET, &url, limit).await?;
            if answer.status.is_redirection() {
                url = redirected(&url, &answer)?;
                continue;
            }
            return self
                .settled(answer, &url)
                .map(|answer| answer.body.to_vec());
        }
        Err(Failure::Other(anyhow!(
            "{url}: more than {MOST_REDIRECTS} redirects"
        )))
    }

    /// `method` on `url` (of the registry), its answer's body at most `max`
    /// bytes; an error status is a failure.
    async fn get(
        &self,
        method: Method,
        url: &str,
        max: usize,
    ) -> Result<outbound::Answer, Failure> {
        let answer = self.send(method, url, max).await?;
        self.settled(answer, url)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        max: usize,
    ) -> Result<outbound::Answer, Failure> {
        let mut headers = vec![("accept".to_string(), MANIFEST_MEDIA_TYPE.to_string())];
        // Credentials for the registry's own origin only.
        if url.starts_with(&format!("{}/", self.base))
            && let Some(value) = self.authorization.header()
        {
            headers.push(("authorization".into(), value));
        }
        // An error's text is read, a little of it, whatever the bound.
        let bound = max.max(MAX_ERROR);
        outbound::fetch(self.http, method.clone(), url, &headers, bound, TIMEOUT)
            .await
            .map_err(|e| Failure::of_request(e, format!("{method} {url}")))
    }

    /// `answer`, unless its status says the call failed.
    fn settled(&self, answer: outbound::Answer, url: &str) -> Result<outbound::Answer, Failure> {
        if answer.status.is_success() {
            return Ok(answer);
        }
        let text =
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(MAX_ERROR)]).into_owned();
        let why = anyhow!("{url}: HTTP {}: {}", answer.status.as_u16(), text.trim());
        Err(match answer.status {
            StatusCode::NOT_FOUND => Failure::NotFound(why),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Failure::Other(why.context("the registry refused the request (authentication required, or the credentials are refused)"))
            }
            _ => Failure::Other(why),
        })
    }
}

/// Where a redirect `answer` to a request for `url` points.
fn redirected(url: &str, answer: &outbound::Answer) -> Result<String, Failure> {
    let location = answer
        .headers
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Failure::Other(anyhow!("{url}: a redirect without a Location")))?;
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(location.to_string());
    }
    let from: Uri = url
        .parse()
        .map_err(|_| Failure::Other(anyhow!("{url} is not a URL")))?;
    let origin = format!(
        "{}://{}",
        from.scheme_str().unwrap_or("https"),
        from.authority().map_or("", |a| a.as_str())
    );
    match location.strip_prefix('/') {
        Some(path) => Ok(format!("{origin}/{path}")),
        None => Err(Failure::Other(anyhow!("{url}: a redirect to '{location}'"))),
    }
}
