//! `portcullis policy`: sharing policy modules through OCI registries —
//! `keygen` (a cosign key pair), `push` (a component and its fixtures as a
//! WASM artifact), `sign` and `verify` (cosign signatures), `pull` (into
//! the cache a gateway starts from) and `inspect`. Results go to stdout,
//! progress to stderr. Registry credentials come from `--config`'s
//! `[registries]`, else the Docker config file.

use crate::config::{Config, OciReference};
use crate::registry::Sources;
use crate::registry::artifact::{self, Artifact, Description};
use crate::registry::client::Failure;
use crate::registry::signature::{self, SigningKey, TrustedKey};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Write a cosign key pair: PREFIX.key (encrypted with the passphrase in
    /// PORTCULLIS_KEY_PASSWORD, or asked for) and PREFIX.pub.
    Keygen {
        /// Where to write them, without the extension.
        #[arg(long)]
        output_prefix: PathBuf,
    },
    /// Push a policy component (and fixtures that travel with it) to a
    /// registry; prints the pushed reference, pinned to its digest.
    Push {
        /// The component.
        module: PathBuf,
        /// Where: oci://REGISTRY/REPOSITORY:TAG.
        reference: String,
        /// Fixture files to push with it, run by `portcullis check` and at
        /// every load.
        #[arg(long = "fixtures")]
        fixtures: Vec<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Sign a pushed module with a cosign private key.
    Sign {
        /// The module: oci://… by tag or digest.
        reference: String,
        /// The private key (cosign's encrypted format).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Check that a module carries a valid signature by a public key (exit
    /// status 0 only then).
    Verify {
        /// The module: oci://… by tag or digest.
        reference: String,
        /// The public key (PEM).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Pull a module into the cache; prints its digest.
    Pull {
        /// The module: oci://… by tag or digest.
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show a module's manifest, annotations, digest and signatures.
    Inspect {
        /// The module: oci://… by tag or digest.
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// How registries are reached.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// A config whose [registries] credentials and [policy_sources]
    /// cache to use.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl RegistryArgs {
    fn sources(&self) -> Result<Sources> {
        match &self.config {
            Some(path) => {
                let mut config = Config::load(path)?;
                // These commands name their own keys.
                config.trust.keys.clear();
                Sources::new(&config)
            }
            None => {
                let dir = crate::config::default_cache_dir()
                    .context("no cache directory: set HOME or XDG_CACHE_HOME, or pass --config")?;
                Sources::standalone(dir.join("oci"))
            }
        }
    }
}

/// Runs `action`; the exit code.
pub fn run(action: &Action) -> Result<i32> {
    match action {
        Action::Keygen { output_prefix } => keygen(output_prefix),
        Action::Push {
            module,
            reference,
            fixtures,
            registry,
        } => push(&registry.sources()?, module, &reference.parse()?, fixtures),
        Action::Sign {
            reference,
            key,
            registry,
        } => sign(&registry.sources()?, &reference.parse()?, key),
        Action::Verify {
            reference,
            key,
            registry,
        } => verify(&registry.sources()?, &reference.parse()?, key),
        Action::Pull {
            reference,
            registry,
        } => pull(&registry.sources()?, &reference.parse()?),
        Action::Inspect {
            reference,
            registry,
        } => inspect(&registry.sources()?, &reference.parse()?),
    }
}

fn keygen(prefix: &Path) -> Result<i32> {
    let (private_path, public_path) = signature::key_paths(prefix);
    for path in [&private_path, &public_path] {
        if path.exists() {
            bail!(
                "{} exists; remove it or choose another --output-prefix",
                path.display()
            );
        }
    }
    let password = signature::password(true)?;
    let key = SigningKey::generate()?;
    let (private, public) = key.to_pem(&password)?;
    write_private(&private_path, private.as_bytes())?;
    std::fs::write(&public_path, public)
        .with_context(|| format!("cannot write {}", public_path.display()))?;
    eprintln!("Private key written to {}", private_path.display());
    println!("{}", public_path.display());
    Ok(0)
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn push(
    sources: &Sources,
    module: &Path,
    reference: &OciReference,
    fixtures: &[PathBuf],
) -> Result<i32> {
    if reference.tag.is_none() || reference.digest.is_some() {
        bail!("push to a tag: oci://REGISTRY/REPOSITORY:TAG (the digest is printed once pushed)");
    }
    let wasm =
        std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    let fixtures = fixtures
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok((file_name(path), bytes))
        })
        .collect::<Result<_>>()?;
    let artifact = Artifact::build(wasm, &file_name(module), fixtures)
        .with_context(|| format!("{} is not a policy component", module.display()))?;
    let registries = sources.registries();
    for blob in &artifact.blobs {
        registries.push_blob(reference, &blob.bytes, &blob.descriptor.digest)?;
    }
    registries.push_manifest(reference, &artifact.manifest)?;
    let digest = crate::registry::cache::digest_of(&artifact.manifest);
    describe(&artifact.description);
    println!("{}", reference.at_digest(&digest));
    Ok(0)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn describe(description: &Description) {
    if let Some(world) = &description.world {
        eprintln!("world    {world}");
    }
    eprintln!("exports  {}", description.exports.join(", "));
    eprintln!("imports  {}", description.imports.join(", "));
}

fn sign(sources: &Sources, reference: &OciReference, key: &Path) -> Result<i32> {
    let password = signature::password(false)?;
    let key = SigningKey::load(key, &password)?;
    let digest = sources.digest(reference)?;
    // Only what is there is signed: the manifest must exist and read.
    sources.contents(reference, &digest)?;
    let payload = signature::payload(reference, &digest);
    let signed = key.sign(&payload)?;
    let registries = sources.registries();
    let tag = reference.at_tag(&signature::signature_tag(&digest));
    let existing = match registries.manifest(&tag) {
        Ok((bytes, _)) => {
            Some(artifact::read_manifest(&bytes).context("the existing signature manifest")?)
        }
        Err(Failure::NotFound(_)) => None,
        Err(failure) => return Err(failure.into_error()),
    };
    let signatures = signature::add_signature(existing.as_ref(), &payload, &signed)?;
    for (digest, bytes) in &signatures.blobs {
        registries.push_blob(reference, bytes, digest)?;
    }
    registries.push_manifest(&tag, &signatures.manifest)?;
    println!("signed {}", reference.at_digest(&digest));
    Ok(0)
}

fn verify(sources: &Sources, reference: &OciReference, key: &Path) -> Result<i32> {
    let key = TrustedKey::load(key)?;
    let digest = sources.digest(reference)?;
    let pinned = reference.at_digest(&digest);
    match sources.signer(std::slice::from_ref(&key), reference, &digest) {
        Ok(signer) => {
            println!("{pinned} is signed by {signer}");
            Ok(0)
        }
        Err(e) => {
            println!("{pinned} FAILED verification: {e:#}");
            Ok(1)
        }
    }
}

fn pull(sources: &Sources, reference: &OciReference) -> Result<i32> {
    let pulled = sources.pull(reference)?;
    eprintln!("cached   {}", pulled.path.display());
    for fixture in &pulled.fixtures {
        eprintln!("fixtures {}", fixture.display());
    }
    println!("{}", pulled.digest);
    Ok(0)
}

/// `text` from a registry, with control characters (terminal escapes)
/// shown escaped.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn inspect(sources: &Sources, reference: &OciReference) -> Result<i32> {
    let digest = sources.digest(reference)?;
    let manifest = sources.manifest(reference, &digest)?;
    let contents = sources.contents(reference, &digest)?;
    println!("reference   {}", reference.at_digest(&digest));
    println!("digest      {digest}");
    println!(
        "config      {} ({})",
        printable(&contents.manifest.config.media_type),
        contents.manifest.config.digest
    );
    println!(
        "module      {} {} bytes ({})",
        printable(&artifact::title(&contents.module)),
        contents.module.size,
        contents.module.digest
    );
    for fixture in &contents.fixtures {
        println!(
            "fixtures    {} {} bytes ({})",
            printable(&artifact::title(fixture)),
            fixture.size,
            fixture.digest
        );
    }
    for (key, value) in contents.manifest.annotations.iter().flatten() {
        println!("annotation  {} = {}", printable(key), printable(value));
    }
    let signatures = sources.signatures(reference, &digest)?;
    if signatures.is_empty() {
        println!("signatures  none");
    }
    for (stored, payload) in &signatures {
        let signed: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        println!(
            "signature   {}… for {} (payload {})",
            printable(&stored.signature.chars().take(24).collect::<String>()),
            printable(
                signed["critical"]["image"]["docker-manifest-digest"]
                    .as_str()
                    .unwrap_or("?")
            ),
            stored.layer.digest
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    println!("manifest\n{}", serde_json::to_string_pretty(&manifest)?);
    Ok(0)
}
