//! Where WebAssembly modules come from: a `module` is a file beside the
//! config or an `oci://` reference to a registry; `[trust]` names the keys
//! whose signatures registry modules must carry; `[registries."HOST"]`
//! holds credentials and transport per registry; `[policy_sources]` says
//! where pulled modules are cached and how often followed tags are checked.
//! The shapes only: pulling and verifying is `registry`'s.

use super::*;
use serde::de::Error as _;

/// The scheme of a registry reference.
pub const OCI_SCHEME: &str = "oci://";

/// Where a policy or sink component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A file: relative to the config in the file, absolute once loaded.
    File(PathBuf),
    /// An artifact in an OCI registry, and its local copy once pulled.
    Oci {
        /// What the config names.
        reference: OciReference,
        /// What was pulled and verified for it (set by `registry`).
        pulled: Option<Box<Pulled>>,
    },
}

/// A registry module as pulled into the cache and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The manifest's digest (`sha256:…`): what was verified and signed.
    pub digest: String,
    /// The component's file in the cache.
    pub path: PathBuf,
    /// The component's own digest (`sha256:…`), its layer's.
    pub component: String,
    /// Fixture files that travelled with it, in the cache.
    pub fixtures: Vec<PathBuf>,
    /// The `[trust]` key whose signature it carries, when `[trust]` is set.
    pub signer: Option<String>,
}

impl ModuleSource {
    /// The file to load the component from: the file itself, or the pulled
    /// copy of a registry module.
    pub fn path(&self) -> Result<&Path> {
        match self {
            ModuleSource::File(path) => Ok(path),
            ModuleSource::Oci {
                pulled: Some(pulled),
                ..
            } => Ok(&pulled.path),
            ModuleSource::Oci { reference, .. } => {
                bail!("{reference} has not been pulled from its registry")
            }
        }
    }

    /// The file, when the module is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ModuleSource::File(path) => Some(path),
            ModuleSource::Oci { .. } => None,
        }
    }

    /// The registry reference, when the module comes from one.
    pub fn reference(&self) -> Option<&OciReference> {
        match self {
            ModuleSource::Oci { reference, .. } => Some(reference),
            ModuleSource::File(_) => None,
        }
    }

    /// What was pulled for a registry module.
    pub fn pulled(&self) -> Option<&Pulled> {
        match self {
            ModuleSource::Oci { pulled, .. } => pulled.as_deref(),
            ModuleSource::File(_) => None,
        }
    }

    /// The file name without `.wasm`, or the reference's last path segment.
    pub fn stem(&self) -> String {
        match self {
            ModuleSource::File(path) => path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
            ModuleSource::Oci { reference, .. } => reference
                .repository
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }

    pub(super) fn resolve_against(&mut self, base: &Path) {
        if let ModuleSource::File(path) = self {
            *path = base.join(&*path);
        }
    }
}

impl std::fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSource::File(path) => write!(f, "{}", path.display()),
            ModuleSource::Oci { reference, .. } => write!(f, "{reference}"),
        }
    }
}

impl<'de> Deserialize<'de> for ModuleSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.starts_with(OCI_SCHEME) {
            let reference = text.parse().map_err(D::Error::custom)?;
            return Ok(ModuleSource::Oci {
                reference,
                pulled: None,
            });
        }
        if text.contains("://") {
            return Err(D::Error::custom(format!(
                "'{text}': a module is a file path or an oci:// reference"
            )));
        }
        Ok(ModuleSource::File(text.into()))
    }
}

/// `oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`, checked against the
/// distribution specification's grammar.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OciReference {
    /// Host, with its port when not the default.
    pub registry: String,
    /// Path of the repository in the registry.
    pub repository: String,
    /// The tag, when named.
    pub tag: Option<String>,
    /// `sha256:…`, when pinned.
    pub digest: Option<String>,
}

impl OciReference {
    /// The same repository at `digest` (no tag).
    pub fn at_digest(&self, digest: &str) -> Self {
        Self {
            digest: Some(digest.to_string()),
            tag: None,
            ..self.clone()
        }
    }

    /// The same repository at `tag` (no digest).
    pub fn at_tag(&self, tag: &str) -> Self {
        Self {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// Whether the registry is this machine's, where plain HTTP is safe.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => &self.registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for OciReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{OCI_SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for OciReference {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let rest = text
            .strip_prefix(OCI_SCHEME)
            .with_context(|| format!("'{text}' does not start with {OCI_SCHEME}"))?;
        let (name, digest) = match rest.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (rest, None),
        };
        let (registry, path) = name.split_once('/').with_context(|| {
            format!("'{text}': expected oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]")
        })?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) => (repository, Some(tag)),
            None => (path, None),
        };
        if !is_registry_host(registry) {
            bail!(
                "'{text}': '{registry}' is not a registry host (a name with a dot or a port, localhost, or an address)"
            );
        }
        if !is_repository(repository) {
            bail!(
                "'{text}': '{repository}' is not a repository name (lowercase letters, digits, and . _ - / between them)"
            );
        }
        if let Some(tag) = tag.filter(|t| !is_tag(t)) {
            bail!(
                "'{text}': '{tag}' is not a tag (up to 128 letters, digits, _ . -, not starting with . or -)"
            );
        }
        if let Some(digest) = digest.filter(|d| !is_sha256_digest(d)) {
            bail!("'{text}': '{digest}' is not a digest (sha256: and 64 lowercase hex digits)");
        }
        if tag.is_none() && digest.is_none() {
            bail!("'{text}': name a tag (:TAG), a digest (@sha256:…), or both");
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }
}

/// `sha256:` and 64 lowercase hex digits.
pub fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A registry host: it must look like one (a dot, a port, `localhost`, or
/// an address), so a repository path is never taken for a host.
fn is_registry_host(host: &str) -> bool {
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    valid && (host.contains('.') || host.contains(':') || host == "localhost")
}

/// A repository path: components of lowercase letters and digits joined by
/// `.`, `_`, `__` or dashes, separated by `/`.
fn is_repository(path: &str) -> bool {
    path.len() <= 255 && path.split('/').all(is_path_component)
}

fn is_path_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Separators between alphanumerics: `.`, `_`, `__`, or any run of `-`.
    let mut run = String::new();
    for &b in bytes {
        if alnum(b) {
            if !(run.is_empty()
                || run == "."
                || run == "_"
                || run == "__"
                || run.bytes().all(|c| c == b'-'))
            {
                return false;
            }
            run.clear();
        } else if matches!(b, b'.' | b'_' | b'-') {
            run.push(b as char);
        } else {
            return false;
        }
    }
    true
}

fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[trust]`: whose signatures registry modules must carry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Public keys (PEM, as `cosign generate-key-pair` or `portcullis
    /// policy keygen` write them), relative to the config. When any is set,
    /// every `oci://` module must carry a valid cosign signature by one of
    /// them, or it is refused. Keyless (Fulcio/Rekor) identities would sit
    /// beside these as another list.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
}

/// `[registries."HOST"]`: how to reach one registry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// User name for basic authentication (`${env:}` / `${file:}` allowed).
    pub username: Option<String>,
    /// Password for basic authentication (`${env:}` / `${file:}` allowed).
    pub password: Option<String>,
    /// A bearer token instead (`${env:}` / `${file:}` allowed).
    pub token: Option<String>,
    /// Plain HTTP to a registry that is not on this machine. Loopback
    /// registries always get plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// Token services elsewhere than the registry itself (the realms its
    /// challenge names, e.g. `https://auth.example.com/token`) that its
    /// credentials may be sent to; any other realm gets none.
    #[serde(default)]
    pub token_realms: Vec<String>,
}

/// `[policy_sources]`: the module cache and followed tags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySourcesConfig {
    /// Where pulled modules are kept, by digest (default: `oci` in the
    /// compile cache's directory); relative to the config.
    pub cache_dir: Option<PathBuf>,
    /// How often the tags of policies with `follow = true` are checked.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
}

impl Default for PolicySourcesConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            refresh_secs: default_refresh_secs(),
        }
    }
}

fn default_refresh_secs() -> u64 {
    60
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OciReference> {
        text.parse()
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn reads_tags_digests_and_both() {
        let tagged = parse("oci://localhost:5000/team/read-only:1.4.0").unwrap();
        assert_eq!(tagged.registry, "localhost:5000");
        assert_eq!(tagged.repository, "team/read-only");
        assert_eq!(tagged.tag.as_deref(), Some("1.4.0"));
        assert_eq!(tagged.digest, None);
        let pinned = parse(&format!("oci://registry.example.com/read-only@{DIGEST}")).unwrap();
        assert_eq!(pinned.tag, None);
        assert_eq!(pinned.digest.as_deref(), Some(DIGEST));
        let both = parse(&format!("oci://[::1]:5000/a/b:v1@{DIGEST}")).unwrap();
        assert_eq!(both.registry, "[::1]:5000");
        assert_eq!(
            (both.tag.as_deref(), both.digest.as_deref()),
            (Some("v1"), Some(DIGEST))
        );
        assert_eq!(
            both.to_string(),
            format!("oci://[::1]:5000/a/b:v1@{DIGEST}")
        );
        assert!(both.is_loopback());
        assert!(!pinned.is_loopback());
    }

    #[test]
    fn refuses_what_the_grammar_does_not_allow() {
        for bad in [
            "oci://read-only:1.0",                     // no registry host
            "oci://localhost:5000/Team/ro:1",          // uppercase repository
            "oci://localhost:5000/team//ro:1",         // empty component
            "oci://localhost:5000/team/ro",            // neither tag nor digest
            "oci://localhost:5000/team/ro:-x",         // tag starting with -
            "oci://localhost:5000/team/ro@sha256:ABC", // short, uppercase digest
            "oci://localhost:5000/team/ro@md5:0123",   // not sha256
            "oci://localhost:5000/../ro:1",            // a path trick
            "oci://user@localhost:5000/ro:1",          // credentials in the host
            "http://localhost:5000/ro:1",              // not oci://
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_module_is_a_path_or_a_reference() {
        #[derive(Deserialize)]
        struct One {
            module: ModuleSource,
        }
        let file: One = toml::from_str("module = \"ro.wasm\"").unwrap();
        assert_eq!(file.module, ModuleSource::File("ro.wasm".into()));
        let oci: One = toml::from_str("module = \"oci://localhost:5000/ro:1\"").unwrap();
        assert_eq!(oci.module.reference().unwrap().tag.as_deref(), Some("1"));
        assert!(oci.module.path().is_err());
        assert!(toml::from_str::<One>("module = \"https://example.com/ro.wasm\"").is_err());
    }
}
