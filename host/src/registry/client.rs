//! Talking to OCI registries (the distribution protocol is `oci-client`'s):
//! one client per registry host and scheme, HTTPS with the platform's roots
//! (a registry on this machine is tried over HTTPS, then plain HTTP, as
//! Docker does; one marked `insecure` gets plain HTTP), credentials from the
//! config's `[registries."HOST"]` or else the Docker config file, and every
//! download capped in size. Calls block the calling thread on a runtime of
//! the registry's own, so reload and the CLI can use them as they are.

use crate::config::{Config, OciReference, RegistryConfig};
use anyhow::{Context, Result, anyhow, bail};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

/// How long connecting to a registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a registry may leave a response unfinished between reads.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one call (a manifest, a blob, an upload) may take in all.
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// Manifests Portcullis reads: OCI image manifests.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// How one registry is reached.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `[registries."HOST"]` credentials, resolved.
    auth: Option<RegistryAuth>,
    /// Plain HTTP allowed though not on loopback.
    insecure: bool,
}

/// Why a registry call failed, as far as what to do next depends on it.
#[derive(Debug)]
pub enum Failure {
    /// The registry could not be reached (or did not answer in time).
    Unreachable(anyhow::Error),
    /// The registry has no such manifest or blob.
    NotFound(anyhow::Error),
    /// Anything else: refused credentials, a malformed answer, …
    Other(anyhow::Error),
}

impl Failure {
    fn from_oci(what: &str, error: OciDistributionError) -> Self {
        let unreachable = match &error {
            OciDistributionError::RequestError(e) => e.is_connect() || e.is_timeout(),
            _ => false,
        };
        let not_found = match &error {
            OciDistributionError::ImageManifestNotFoundError(_) => true,
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|e| {
                    use oci_client::errors::OciErrorCode::*;
                    matches!(e.code, ManifestUnknown | BlobUnknown | NameUnknown)
                })
            }
            OciDistributionError::ServerError { code, .. } => *code == 404,
            _ => false,
        };
        if let OciDistributionError::DigestError(mismatch) = &error {
            let mismatch = crate::registry::cache::Mismatch(mismatch.to_string());
            return Failure::Other(anyhow!(mismatch).context(what.to_string()));
        }
        let error = anyhow!(error).context(what.to_string());
        if unreachable {
            Failure::Unreachable(error)
        } else if not_found {
            Failure::NotFound(error)
        } else {
            Failure::Other(error)
        }
    }

    /// The error, whatever kind.
    pub fn into_error(self) -> anyhow::Error {
        match self {
            Failure::Unreachable(e) => e.context("the registry is unreachable"),
            Failure::NotFound(e) | Failure::Other(e) => e,
        }
    }
}

impl From<Failure> for anyhow::Error {
    fn from(failure: Failure) -> Self {
        failure.into_error()
    }
}

/// Registries, reached as the config says.
pub struct Registries {
    runtime: tokio::runtime::Runtime,
    access: BTreeMap<String, Access>,
    /// By host and whether plain HTTP.
    clients: Mutex<HashMap<(String, bool), Arc<Client>>>,
    /// Loopback hosts found to speak plain HTTP.
    plain: Mutex<std::collections::HashSet<String>>,
    /// The Docker config file's credentials, by host, read once (a
    /// credential helper is a process to run).
    docker: Mutex<HashMap<String, RegistryAuth>>,
}

impl Registries {
    /// Registries as `config`'s `[registries]` says (secret references
    /// resolved now, so a missing one fails here).
    pub fn new(config: &Config) -> Result<Self> {
        let base = config.path.parent().unwrap_or(Path::new("."));
        let access = config
            .registries
            .iter()
            .map(|(host, settings)| {
                let access =
                    access(settings, base).with_context(|| format!("registries.\"{host}\""))?;
                Ok((host.clone(), access))
            })
            .collect::<Result<_>>()?;
        Self::with_access(access)
    }

    /// Registries reached with no configured credentials: the Docker config
    /// file's, or none.
    pub fn unconfigured() -> Result<Self> {
        Self::with_access(BTreeMap::new())
    }

    fn with_access(access: BTreeMap<String, Access>) -> Result<Self> {
        // reqwest is built without a TLS provider of its own: it takes the
        // process' (ring, which the rest of Portcullis' TLS uses too).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            runtime: crate::util::outbound::runtime()?,
            access,
            clients: Mutex::new(HashMap::new()),
            plain: Mutex::default(),
            docker: Mutex::default(),
        })
    }

    /// Runs `work` against the registry of `reference`: over HTTPS, or
    /// plain HTTP where allowed and HTTPS cannot be reached.
    pub fn call<T>(
        &self,
        reference: &OciReference,
        work: impl AsyncFn(&Client, &Reference, &RegistryAuth) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let host = &reference.registry;
        let access = self.access.get(host).cloned().unwrap_or_default();
        let auth = match &access.auth {
            Some(auth) => auth.clone(),
            None => self.docker_auth(host).map_err(Failure::Other)?,
        };
        let target = oci_reference(reference);
        let known_plain = self
            .plain
            .lock()
            .expect("plain hosts poisoned")
            .contains(host);
        let attempt = |plain: bool| {
            let client = self.client(host, plain);
            let bounded = async {
                // The timer needs the runtime: made inside it.
                tokio::time::timeout(CALL_DEADLINE, work(&client, &target, &auth)).await
            };
            self.runtime.block_on(bounded).unwrap_or_else(|_| {
                Err(Failure::Unreachable(anyhow!(
                    "{host} did not answer within {} s",
                    CALL_DEADLINE.as_secs()
                )))
            })
        };
        if access.insecure || known_plain {
            return attempt(true);
        }
        match attempt(false) {
            Err(Failure::Unreachable(e)) if reference.is_loopback() => {
                // Credentials never go over the fallback: a local user could
                // listen on a registry's port while it is down.
                if !matches!(auth, RegistryAuth::Anonymous) {
                    return Err(Failure::Unreachable(e.context(format!(
                        "credentials for {host} are not sent over plain HTTP (set insecure = true in [registries.\"{host}\"] to allow it)"
                    ))));
                }
                let answer = attempt(true);
                if !matches!(answer, Err(Failure::Unreachable(_))) {
                    self.plain
                        .lock()
                        .expect("plain hosts poisoned")
                        .insert(host.clone());
                }
                answer
            }
            answer => answer,
        }
    }

    /// The Docker config file's credentials for `host`, read the first time
    /// they are needed.
    fn docker_auth(&self, host: &str) -> Result<RegistryAuth> {
        let mut known = self.docker.lock().expect("docker credentials poisoned");
        if let Some(auth) = known.get(host) {
            return Ok(auth.clone());
        }
        let auth = docker_config_auth(host)?;
        known.insert(host.to_string(), auth.clone());
        Ok(auth)
    }

    /// The client for `host` over HTTPS or plain HTTP.
    fn client(&self, host: &str, plain: bool) -> Arc<Client> {
        let mut clients = self.clients.lock().expect("registry clients poisoned");
        let key = (host.to_string(), plain);
        if let Some(client) = clients.get(&key) {
            return client.clone();
        }
        let protocol = if plain {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Arc::new(Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            // One call at a time: a registry module is one small blob.
            max_concurrent_download: 1,
            max_concurrent_upload: 1,
            platform_resolver: None,
            user_agent: concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        }));
        clients.insert(key, client.clone());
        client
    }

    /// The manifest `reference` names, as the registry sent it, and its
    /// digest (checked against the reference's digest when it has one).
    pub fn manifest(&self, reference: &OciReference) -> Result<(Vec<u8>, String), Failure> {
        self.call(reference, async |client, target, auth| {
            let (bytes, digest) = client
                .pull_manifest_raw(target, auth, &[MANIFEST_MEDIA_TYPE])
                .await
                .map_err(|e| {
                    Failure::from_oci(&format!("cannot get the manifest of {reference}"), e)
                })?;
            Ok((bytes.to_vec(), digest))
        })
    }

    /// The digest the registry has for `reference`'s tag now.
    pub fn digest_of(&self, reference: &OciReference) -> Result<String, Failure> {
        self.call(reference, async |client, target, auth| {
            client
                .fetch_manifest_digest(target, auth)
                .await
                .map_err(|e| Failure::from_oci(&format!("cannot resolve {reference}"), e))
        })
    }

    /// The blob `digest` of `reference`'s repository, refused when larger
    /// than `limit` bytes.
    pub fn blob(
        &self,
        reference: &OciReference,
        digest: &str,
        limit: u64,
    ) -> Result<Vec<u8>, Failure> {
        self.call(reference, async |client, target, auth| {
            // Pulling a manifest authenticates; a bare blob pull must too.
            client
                .store_auth_if_needed(target.resolve_registry(), auth)
                .await;
            let mut out = Capped::new(limit);
            client
                .pull_blob(target, digest, &mut out)
                .await
                .map_err(|e| {
                    Failure::from_oci(&format!("cannot get blob {digest} of {reference}"), e)
                })?;
            Ok(out.bytes)
        })
    }

    /// Uploads `data` as a blob of `reference`'s repository, unless there.
    pub fn push_blob(
        &self,
        reference: &OciReference,
        data: &[u8],
        digest: &str,
    ) -> Result<(), Failure> {
        self.call(reference, async |client, target, auth| {
            let what = || format!("cannot push blob {digest} to {reference}");
            client
                .auth(target, auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| Failure::from_oci(&what(), e))?;
            if client
                .blob_exists(target, digest)
                .await
                .map_err(|e| Failure::from_oci(&what(), e))?
            {
                return Ok(());
            }
            client
                .push_blob(target, data.to_vec(), digest)
                .await
                .map_err(|e| Failure::from_oci(&what(), e))?;
            Ok(())
        })
    }

    /// Stores `manifest` under `reference` (its tag, or its digest).
    pub fn push_manifest(&self, reference: &OciReference, manifest: &[u8]) -> Result<(), Failure> {
        self.call(reference, async |client, target, auth| {
            let what = || format!("cannot push the manifest of {reference}");
            client
                .auth(target, auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| Failure::from_oci(&what(), e))?;
            client
                .push_manifest_raw(
                    target,
                    manifest.to_vec(),
                    MANIFEST_MEDIA_TYPE.parse().expect("a valid header value"),
                )
                .await
                .map_err(|e| Failure::from_oci(&what(), e))?;
            Ok(())
        })
    }
}

/// `settings` with its secret references resolved.
fn access(settings: &RegistryConfig, base: &Path) -> Result<Access> {
    let resolve = |v: &String| crate::config::resolve_secret(v, base);
    let auth = match (&settings.username, &settings.password, &settings.token) {
        (Some(user), Some(password), None) => {
            Some(RegistryAuth::Basic(resolve(user)?, resolve(password)?))
        }
        (None, None, Some(token)) => Some(RegistryAuth::Bearer(resolve(token)?)),
        _ => None,
    };
    Ok(Access {
        auth,
        insecure: settings.insecure,
    })
}

/// The Docker config file's credentials for `host` (`DOCKER_CONFIG`, else
/// `~/.docker/config.json`, credential helpers included); anonymous when it
/// has none.
fn docker_config_auth(host: &str) -> Result<RegistryAuth> {
    use docker_credential::{CredentialRetrievalError as Missing, DockerCredential};
    match docker_credential::get_credential(host) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        Ok(DockerCredential::IdentityToken(_)) => bail!(
            "the Docker config holds an identity token for {host}, which Portcullis cannot exchange; give a username and password in [registries.\"{host}\"]"
        ),
        Err(
            Missing::ConfigNotFound | Missing::ConfigReadError | Missing::NoCredentialConfigured,
        ) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(anyhow!("{e}"))
            .with_context(|| format!("the Docker config's credentials for {host}")),
    }
}

/// `reference` as `oci-client` names it.
fn oci_reference(reference: &OciReference) -> Reference {
    let (registry, repository) = (reference.registry.clone(), reference.repository.clone());
    match (&reference.tag, &reference.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.clone(), digest.clone())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.clone()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag.clone()),
        (None, None) => Reference::with_tag(registry, repository, "latest".into()),
    }
}

/// A download buffer that refuses to grow past its limit.
struct Capped {
    bytes: Vec<u8>,
    limit: u64,
}

impl Capped {
    fn new(limit: u64) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
        }
    }
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if (this.bytes.len() + buf.len()) as u64 > this.limit {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "the blob is larger than {} bytes",
                this.limit
            ))));
        }
        this.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
