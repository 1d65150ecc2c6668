//! Turning a config's `oci://` modules into verified local files: the tag
//! resolved to a digest (or the digest taken as pinned), the manifest and
//! blobs taken from the cache or pulled into it and checked against their
//! digests, and, under `[trust]`, the artifact's cosign signatures checked
//! against the trusted keys, every time. A digest-pinned module whose
//! content is cached needs no registry; signatures are asked for anew and
//! taken from the cache only when the registry cannot be reached.

use crate::config::{Config, ModuleSource, OciReference, Pulled};
use crate::registry::artifact::{self, Contents, MAX_MANIFEST_BYTES};
use crate::registry::cache::{Cache, Mismatch};
use crate::registry::client::{Failure, Registries};
use crate::registry::signature::{self, TrustedKey};
use anyhow::{Context, Result, bail};
use oci_client::manifest::OciDescriptor;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A registry module refused by `[trust]`: it is not validly signed by a
/// trusted key. The error carries what the audit event names.
#[derive(Debug)]
pub struct Refused {
    /// The module as configured.
    pub reference: String,
    /// The digest it resolved to.
    pub digest: String,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) is refused: {}",
            self.reference, self.digest, self.reason
        )
    }
}

impl std::error::Error for Refused {}

/// Where registry modules come from, and whom they must be signed by.
pub struct Sources {
    registries: Registries,
    cache: Cache,
    keys: Vec<TrustedKey>,
}

impl Sources {
    /// The sources `config` sets up: its registries, its cache, its trusted
    /// keys (each must load).
    pub fn new(config: &Config) -> Result<Self> {
        let keys = config
            .trust
            .keys
            .iter()
            .map(|path| TrustedKey::load(path).context("trust.keys"))
            .collect::<Result<_>>()?;
        Ok(Self {
            registries: Registries::new(config)?,
            cache: Cache::new(cache_dir(config)?),
            keys,
        })
    }

    /// Sources with no trusted keys and no configured credentials, for the
    /// commands that work on one reference.
    pub fn standalone(cache_dir: PathBuf) -> Result<Self> {
        Ok(Self {
            registries: Registries::unconfigured()?,
            cache: Cache::new(cache_dir),
            keys: Vec::new(),
        })
    }

    /// The registries.
    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// Whether signatures are required.
    pub fn trusting(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The digest `reference` names: its own, else its tag's now.
    pub fn digest(&self, reference: &OciReference) -> Result<String> {
        if let Some(digest) = &reference.digest {
            return Ok(digest.clone());
        }
        match self.registries.digest_of(reference) {
            Ok(digest) if crate::config::is_sha256_digest(&digest) => Ok(digest),
            Ok(digest) => bail!("the registry names {reference} by a digest that is not sha256: {digest}"),
            Err(Failure::Unreachable(e)) => Err(e.context(format!(
                "{reference} is named by its tag only, and its registry cannot be reached; pin a digest (…@sha256:…) to start from the cache"
            ))),
            Err(failure) => Err(failure.into_error()),
        }
    }

    /// Pulls (or finds in the cache) the module `reference` names, checks
    /// it, and under `[trust]` its signature.
    pub fn pull(&self, reference: &OciReference) -> Result<Pulled> {
        let digest = self.digest(reference)?;
        let refused = |e: anyhow::Error| Refused {
            reference: reference.to_string(),
            digest: digest.clone(),
            reason: format!("{e:#}"),
        };
        let tampered = |e: anyhow::Error| match e.downcast_ref::<Mismatch>() {
            Some(_) => refused(e).into(),
            None => e,
        };
        // Signatures first: nothing unsigned is downloaded under [trust].
        let signer = if self.trusting() {
            let stored = self.stored_signatures(reference, &digest)?;
            let signer = signature::signer(&self.keys, &digest, &stored, |layer| {
                self.blob_bytes(reference, layer, signature::MAX_PAYLOAD_BYTES)
            });
            Some(signer.map_err(refused)?)
        } else {
            None
        };
        let contents = self.contents(reference, &digest).map_err(tampered)?;
        let path = self
            .blob(reference, &contents.module, artifact::MAX_MODULE_BYTES)
            .map_err(tampered)?;
        let fixtures = contents
            .fixtures
            .iter()
            .map(|layer| self.blob(reference, layer, artifact::MAX_FIXTURE_BYTES))
            .collect::<Result<_>>()
            .map_err(tampered)?;
        Ok(Pulled {
            digest,
            path,
            component: contents.module.digest.clone(),
            fixtures,
            signer,
        })
    }

    /// The manifest `digest` of `reference`'s repository, read.
    pub fn contents(&self, reference: &OciReference, digest: &str) -> Result<Contents> {
        let bytes = self.manifest(reference, digest)?;
        Contents::read(&bytes).with_context(|| format!("{reference} ({digest})"))
    }

    /// The manifest bytes `digest`, from the cache or the registry.
    pub fn manifest(&self, reference: &OciReference, digest: &str) -> Result<Vec<u8>> {
        if let Some(bytes) = self.cache.get(digest)? {
            return Ok(bytes);
        }
        let (bytes, _) = self.registries.manifest(&reference.at_digest(digest))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            bail!(
                "the manifest of {reference} is {} bytes; at most {MAX_MANIFEST_BYTES} are read",
                bytes.len()
            );
        }
        self.cache
            .put(digest, &bytes)
            .with_context(|| format!("the registry's manifest for {reference}@{digest}"))?;
        Ok(bytes)
    }

    /// The cached file of the blob `layer`, pulled first if needed.
    fn blob(&self, reference: &OciReference, layer: &OciDescriptor, limit: u64) -> Result<PathBuf> {
        self.blob_bytes(reference, layer, limit)?;
        self.cache.blob_path(&layer.digest)
    }

    /// The bytes of the blob `layer`, from the cache or pulled into it.
    pub fn blob_bytes(
        &self,
        reference: &OciReference,
        layer: &OciDescriptor,
        limit: u64,
    ) -> Result<Vec<u8>> {
        artifact::check_size(layer, limit)?;
        if let Some(bytes) = self.cache.get(&layer.digest)? {
            return Ok(bytes);
        }
        let bytes = self.registries.blob(reference, &layer.digest, limit)?;
        if bytes.len() as i64 != layer.size {
            bail!(
                "blob {} of {reference} is {} bytes, not the {} its manifest says",
                layer.digest,
                bytes.len(),
                layer.size
            );
        }
        self.cache
            .put(&layer.digest, &bytes)
            .with_context(|| format!("blob {} of {reference}", layer.digest))?;
        Ok(bytes)
    }

    /// The signature manifest of the artifact `digest`: the registry's
    /// (recorded in the cache), or the cache's when the registry cannot be
    /// reached; `None` when it has none.
    pub fn signature_manifest(
        &self,
        reference: &OciReference,
        digest: &str,
    ) -> Result<Option<Vec<u8>>> {
        let signatures = reference.at_tag(&signature::signature_tag(digest));
        match self.registries.manifest(&signatures) {
            Ok((bytes, _)) if bytes.len() as u64 > MAX_MANIFEST_BYTES => {
                bail!(
                    "the signature manifest of {reference} is larger than {MAX_MANIFEST_BYTES} bytes"
                )
            }
            Ok((bytes, _)) => {
                self.cache.set_signatures(digest, Some(&bytes))?;
                Ok(Some(bytes))
            }
            Err(Failure::NotFound(_)) => {
                self.cache.set_signatures(digest, None)?;
                Ok(None)
            }
            Err(Failure::Unreachable(e)) => {
                let cached = self.cache.signatures(digest)?;
                tracing::warn!(
                    module = %reference,
                    "the registry cannot be reached; checking the signatures last seen ({}): {e:#}",
                    if cached.is_some() { "cached" } else { "none" }
                );
                Ok(cached)
            }
            Err(Failure::Other(e)) => Err(e),
        }
    }

    /// The first of `keys` that signed the artifact `digest`.
    pub fn signer(
        &self,
        keys: &[TrustedKey],
        reference: &OciReference,
        digest: &str,
    ) -> Result<String> {
        let stored = self.stored_signatures(reference, digest)?;
        signature::signer(keys, digest, &stored, |layer| {
            self.blob_bytes(reference, layer, signature::MAX_PAYLOAD_BYTES)
        })
    }

    /// The signatures stored for the artifact `digest` (none if it has no
    /// signature manifest).
    fn stored_signatures(
        &self,
        reference: &OciReference,
        digest: &str,
    ) -> Result<Vec<signature::Stored>> {
        let Some(bytes) = self.signature_manifest(reference, digest)? else {
            return Ok(Vec::new());
        };
        let manifest = artifact::read_manifest(&bytes).context("its signature manifest")?;
        Ok(signature::stored(&manifest))
    }

    /// Every signature of the artifact `digest`, with the payload each
    /// signs, for reports.
    pub fn signatures(
        &self,
        reference: &OciReference,
        digest: &str,
    ) -> Result<Vec<(signature::Stored, Vec<u8>)>> {
        self.stored_signatures(reference, digest)?
            .into_iter()
            .map(|stored| {
                let payload =
                    self.blob_bytes(reference, &stored.layer, signature::MAX_PAYLOAD_BYTES)?;
                Ok((stored, payload))
            })
            .collect()
    }
}

/// Where `config` caches registry modules: `[policy_sources] cache_dir`,
/// else `oci` beside the compile cache.
pub fn cache_dir(config: &Config) -> Result<PathBuf> {
    if let Some(dir) = &config.policy_sources.cache_dir {
        return Ok(dir.clone());
    }
    let compile_cache = config
        .engine
        .cache_dir
        .clone()
        .or_else(crate::config::default_cache_dir)
        .context(
            "no cache directory for registry modules: set [policy_sources] cache_dir (or HOME)",
        )?;
    Ok(compile_cache.join("oci"))
}

/// Pulls and checks every registry module `config` names (policies and
/// component sinks), each once, and records what was pulled in the config.
///
/// With the config `previous` generation ran: a tag that is not followed
/// keeps the digest it was resolved to then (tags are resolved at start);
/// a followed tag that now names a version refused by `[trust]` keeps the
/// version it ran, so the rest of the config still reloads. Those
/// refusals are returned, for the audit trail.
pub fn resolve(config: &mut Config, previous: Option<&Config>) -> Result<Vec<Refused>> {
    let wanted = wanted(config);
    if wanted.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    let sources = Sources::new(config)?;
    let mut pulled = BTreeMap::new();
    let mut refusals = Vec::new();
    for want in wanted.iter().flatten() {
        let std::collections::btree_map::Entry::Vacant(slot) = pulled.entry(want.clone()) else {
            continue;
        };
        let (reference, followed) = slot.key();
        let earlier = previous.and_then(|p| ran(p, reference, *followed));
        let module = match earlier {
            Some(digest) if !followed => sources.pull(&keep(reference, digest))?,
            Some(digest) => match sources.pull(reference) {
                Err(e) if e.downcast_ref::<Refused>().is_some() => {
                    let refused = e.downcast::<Refused>().expect("checked above");
                    tracing::warn!("{refused}; {} keeps serving", digest);
                    refusals.push(refused);
                    sources.pull(&keep(reference, digest))?
                }
                pulled => pulled?,
            },
            None => sources.pull(reference)?,
        };
        slot.insert(Box::new(module));
    }
    for (module, want) in config.modules_mut().zip(wanted) {
        if let (ModuleSource::Oci { pulled: slot, .. }, Some(want)) = (module, want) {
            *slot = pulled.get(&want).cloned();
        }
    }
    Ok(refusals)
}

/// Each module `config` names ([`Config::modules`] order): its registry
/// reference, and whether it follows the reference's tag. A module that
/// does not follow a tag keeps the version it ran, even where another
/// policy follows the same reference.
fn wanted(config: &Config) -> Vec<Option<(OciReference, bool)>> {
    let follows = config.policies.iter().map(|p| p.follow);
    config
        .modules()
        .zip(follows.chain(std::iter::repeat(false)))
        .map(|(module, follows)| Some((module.reference()?.clone(), follows)))
        .collect()
}

/// The digest `config` ran `reference` at for a module that follows its
/// tag (`followed`) or not, if it named it so.
fn ran<'c>(config: &'c Config, reference: &OciReference, followed: bool) -> Option<&'c str> {
    config
        .modules()
        .zip(wanted(config))
        .find(|(_, want)| {
            want.as_ref()
                .is_some_and(|(r, f)| r == reference && *f == followed)
        })
        .and_then(|(m, _)| m.pulled())
        .map(|p| p.digest.as_str())
}

/// `reference` held at `digest` (its tag kept, as a label).
fn keep(reference: &OciReference, digest: &str) -> OciReference {
    OciReference {
        digest: Some(digest.to_string()),
        ..reference.clone()
    }
}

/// A followed policy whose tag names another digest than the one it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Moved {
    /// The policy.
    pub policy: String,
    /// The digest it runs.
    pub from: String,
    /// The digest its tag names now.
    pub to: String,
    /// The digest of that one's signature manifest, if any: a module
    /// refused for want of a signature is worth trying again once signed.
    pub signatures: Option<String>,
}

/// The followed policies of `config` whose tag has moved. A registry that
/// cannot answer is logged and skipped; the others are still checked.
pub fn moved_tags(config: &Config) -> Result<Vec<Moved>> {
    let followed: Vec<_> = config.policies.iter().filter(|p| p.follow).collect();
    if followed.is_empty() {
        return Ok(Vec::new());
    }
    let registries = Registries::new(config)?;
    let mut moved = Vec::new();
    for policy in followed {
        let (Some(reference), Some(pulled)) = (policy.module.reference(), policy.module.pulled())
        else {
            continue;
        };
        match moved_tag(&registries, reference, &pulled.digest) {
            Ok(Some((to, signatures))) => moved.push(Moved {
                policy: policy.name.clone(),
                from: pulled.digest.clone(),
                to,
                signatures,
            }),
            Ok(None) => {}
            Err(e) => tracing::warn!(policy = policy.name, "cannot check its tag: {e:#}"),
        }
    }
    Ok(moved)
}

/// The digest `reference`'s tag names now and its signature manifest's
/// digest, when it is not `running`.
fn moved_tag(
    registries: &Registries,
    reference: &OciReference,
    running: &str,
) -> Result<Option<(String, Option<String>)>> {
    let now = registries.digest_of(reference)?;
    if !crate::config::is_sha256_digest(&now) {
        bail!("the registry names {reference} by a digest that is not sha256: {now}");
    }
    if now == running {
        return Ok(None);
    }
    let signatures = reference.at_tag(&signature::signature_tag(&now));
    let signatures = match registries.digest_of(&signatures) {
        Ok(digest) => Some(digest),
        Err(Failure::NotFound(_)) => None,
        Err(failure) => return Err(failure.into_error()),
    };
    Ok(Some((now, signatures)))
}
