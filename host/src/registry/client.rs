//! Talking to OCI registries: HTTPS with the platform's roots (a registry
//! on this machine is tried over HTTPS, then plain HTTP, as Docker does;
//! one marked `insecure` gets plain HTTP), credentials from the config's
//! `[registries."HOST"]` or else the Docker config file, sent only where
//! `token.rs` allows. Pulls are Portcullis' own (`pull.rs`, every answer
//! bounded); pushes (the CLI's) go through `oci-client`, with the
//! authorization Portcullis got. Calls block the calling thread on a
//! runtime of the registry's own, so reload and the CLI can use them as
//! they are.

use crate::config::{Config, OciReference, RegistryConfig};
use crate::registry::{pull, token};
use anyhow::{Context, Result, anyhow, bail};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long connecting to a registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a registry may leave a response unfinished between reads.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one call (a manifest, a blob, an upload) may take in all.
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// The most of a manifest read.
const MAX_MANIFEST: usize = crate::registry::artifact::MAX_MANIFEST_BYTES as usize;

/// Manifests Portcullis reads: OCI image manifests.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// How one registry is reached.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `[registries."HOST"]` credentials, resolved.
    auth: Option<RegistryAuth>,
    /// Plain HTTP allowed though not on loopback.
    insecure: bool,
    /// Token realms elsewhere its credentials may go to.
    token_realms: Vec<String>,
}

/// What a call does at the registry: the scope its token must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Reads.
    Pull,
    /// Writes (and reads).
    Push,
}

/// One call's way into the registry.
pub struct Link<'a> {
    /// Its repository, for pulls.
    pub repository: pull::Repository<'a>,
    /// `oci-client`, for pushes.
    pub oci: Arc<Client>,
    /// The reference, as `oci-client` names it.
    pub target: Reference,
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

    /// A request to `what` that failed with `error`: unreachable if it
    /// could not connect or timed out, another failure otherwise.
    pub fn of_request(error: anyhow::Error, what: String) -> Self {
        let connect = error
            .chain()
            .filter_map(|c| c.downcast_ref::<hyper_util::client::legacy::Error>())
            .any(|e| e.is_connect());
        let timed_out = format!("{error:#}").contains("timed out");
        let error = error.context(what);
        if connect || timed_out {
            Failure::Unreachable(error)
        } else {
            Failure::Other(error)
        }
    }

    /// The same failure, with `what` was being done.
    fn context(self, what: &str) -> Self {
        match self {
            Failure::Unreachable(e) => Failure::Unreachable(e.context(what.to_string())),
            Failure::NotFound(e) => Failure::NotFound(e.context(what.to_string())),
            Failure::Other(e) => Failure::Other(e.context(what.to_string())),
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
    /// The HTTP client pulls and token requests go through.
    http: crate::util::outbound::HttpClient,
    /// The tokens registries gave, until they expire.
    tokens: token::Tokens,
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
        let runtime = crate::util::outbound::runtime()?;
        // The client's connection pool lives on the runtime that uses it.
        let http = {
            let _inside = runtime.enter();
            crate::util::outbound::client()?
        };
        Ok(Self {
            runtime,
            http,
            tokens: token::Tokens::default(),
            access,
            clients: Mutex::new(HashMap::new()),
            plain: Mutex::default(),
            docker: Mutex::default(),
        })
    }

    /// Runs `work` against the registry of `reference`, for `operation`:
    /// over HTTPS, or plain HTTP where allowed and HTTPS cannot be reached.
    pub fn call<T>(
        &self,
        reference: &OciReference,
        operation: Operation,
        work: impl AsyncFn(&Link) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let host = &reference.registry;
        let access = self.access.get(host).cloned().unwrap_or_default();
        let auth = match &access.auth {
            Some(auth) => auth.clone(),
            None => self.docker_auth(host).map_err(Failure::Other)?,
        };
        let scope = match operation {
            Operation::Pull => format!("repository:{}:pull", reference.repository),
            Operation::Push => format!("repository:{}:pull,push", reference.repository),
        };
        let known_plain = self
            .plain
            .lock()
            .expect("plain hosts poisoned")
            .contains(host);
        let attempt = |plain: bool| {
            let base = format!("{}://{host}", if plain { "http" } else { "https" });
            let bounded = async {
                let registry = token::Registry {
                    base: &base,
                    credentials: &auth,
                    realms: &access.token_realms,
                };
                let authorization = self.tokens.authorize(&self.http, &registry, &scope).await?;
                let link = Link {
                    repository: pull::Repository {
                        http: &self.http,
                        base: base.clone(),
                        name: &reference.repository,
                        authorization,
                    },
                    oci: self.client(host, plain),
                    target: oci_reference(reference),
                };
                let answer = work(&link).await;
                if answer.is_err() {
                    // A token the registry no longer takes is fetched anew.
                    self.tokens.forget(&base);
                }
                answer
            };
            self.runtime
                .block_on(async { tokio::time::timeout(CALL_DEADLINE, bounded).await })
                .unwrap_or_else(|_| {
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

    /// The manifest `reference` names, as the registry sent it (at most
    /// [`MAX_MANIFEST`] bytes), and its digest (checked against the
    /// reference's digest when it has one).
    pub fn manifest(&self, reference: &OciReference) -> Result<(Vec<u8>, String), Failure> {
        let named = reference_name(reference);
        self.call(reference, Operation::Pull, async |link| {
            link.repository
                .manifest(&named, MAX_MANIFEST)
                .await
                .map_err(|f| f.context(&format!("cannot get the manifest of {reference}")))
        })
    }

    /// The digest the registry has for `reference`'s tag now.
    pub fn digest_of(&self, reference: &OciReference) -> Result<String, Failure> {
        let named = reference_name(reference);
        self.call(reference, Operation::Pull, async |link| {
            link.repository
                .digest(&named, MAX_MANIFEST)
                .await
                .map_err(|f| f.context(&format!("cannot resolve {reference}")))
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
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.call(reference, Operation::Pull, async |link| {
            link.repository
                .blob(digest, limit)
                .await
                .map_err(|f| f.context(&format!("cannot get blob {digest} of {reference}")))
        })
    }

    /// Uploads `data` as a blob of `reference`'s repository, unless there.
    pub fn push_blob(
        &self,
        reference: &OciReference,
        data: &[u8],
        digest: &str,
    ) -> Result<(), Failure> {
        self.call(reference, Operation::Push, async |link| {
            let (client, target) = (&link.oci, &link.target);
            let auth = &link.repository.authorization.for_oci();
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
        self.call(reference, Operation::Push, async |link| {
            let (client, target) = (&link.oci, &link.target);
            let auth = &link.repository.authorization.for_oci();
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
        token_realms: settings.token_realms.clone(),
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

/// What `reference` names in its repository: its digest, else its tag.
fn reference_name(reference: &OciReference) -> String {
    let target = oci_reference(reference);
    let name = target.digest().or(target.tag());
    name.expect("a reference has a digest or a tag").to_string()
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
