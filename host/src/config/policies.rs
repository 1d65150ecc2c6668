//! `[[policies]]` and `[engine]`: which policy components run, on what,
//! with what settings, grants and limits.

use super::*;

/// One policy in the chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Unique name, used in errors, logs and audit records.
    pub name: String,
    /// The `.wasm` component: a path relative to the config file, or an
    /// `oci://` reference to a registry.
    pub module: ModuleSource,
    /// For a module named by tag: check the registry every
    /// `[policy_sources] refresh_secs` and reload when the tag moves.
    #[serde(default)]
    pub follow: bool,
    /// Settings handed to the policy's `configure` as JSON.
    #[serde(default = "empty_settings")]
    pub settings: serde_json::Value,
    /// Settings read from files beside the config, for policy texts too
    /// long to write inline (Rego modules, Cedar policies): each key becomes
    /// a settings key whose value is the file's text, or for a list of
    /// files, a table of their texts by file name. Portcullis reads them and
    /// watches them for reloads; the policy still gets no filesystem.
    #[serde(default)]
    pub settings_files: BTreeMap<String, SettingsFiles>,
    /// Agent ids (globs) the policy applies to.
    #[serde(default = "everything")]
    pub agents: Vec<String>,
    /// Server names (globs) the policy applies to.
    #[serde(default = "everything")]
    pub servers: Vec<String>,
    /// JSON-RPC methods (globs) the policy applies to.
    #[serde(default = "everything")]
    pub methods: Vec<String>,
    /// Tool names (globs) the policy applies to; messages without a tool
    /// match only when this contains `*`.
    #[serde(default = "everything")]
    pub tools: Vec<String>,
    /// What a failure of the policy means.
    #[serde(default)]
    pub failure: FailureMode,
    /// Whether the verdict is enforced or only recorded.
    #[serde(default)]
    pub mode: Mode,
    /// Instance lifecycle.
    #[serde(default)]
    pub instances: InstanceMode,
    /// With `instances = "reuse"`: an instance is replaced after this many
    /// evaluations, bounding what state can build up in it.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u64,
    /// Wall-clock deadline per evaluation (default: `engine.timeout_ms`).
    pub timeout_ms: Option<u64>,
    /// Linear-memory cap per instance (default: `engine.memory_mb`).
    pub memory_mb: Option<u64>,
    /// WASI capabilities granted to the policy (none by default).
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Fixture files the policy must pass before it serves (at start and at
    /// every reload); relative to the config file.
    #[serde(default)]
    pub fixtures: Vec<PathBuf>,
}

/// One key of `settings_files`: a file, or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SettingsFiles {
    /// The value is this file's text.
    One(PathBuf),
    /// The value is a table of these files' texts by file name.
    Many(Vec<PathBuf>),
}

impl SettingsFiles {
    /// The files it names.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            SettingsFiles::One(path) => std::slice::from_ref(path),
            SettingsFiles::Many(paths) => paths,
        }
    }

    fn resolve_against(&mut self, base: &Path) {
        match self {
            SettingsFiles::One(path) => *path = base.join(&*path),
            SettingsFiles::Many(paths) => paths.iter_mut().for_each(|p| *p = base.join(&*p)),
        }
    }

    /// The settings value it stands for: the text of its file, or a table
    /// of its files' texts by file name.
    pub fn read(&self) -> Result<serde_json::Value> {
        let read = |path: &Path| -> Result<String> {
            use std::io::Read;
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if !file.metadata().is_ok_and(|m| m.is_file()) {
                bail!("{} is not a regular file", path.display());
            }
            let mut bytes = Vec::new();
            file.take(MAX_SETTINGS_FILE_BYTES + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.len() as u64 > MAX_SETTINGS_FILE_BYTES {
                bail!(
                    "{} is larger than the {MAX_SETTINGS_FILE_BYTES} bytes a settings file may hold",
                    path.display()
                );
            }
            String::from_utf8(bytes)
                .with_context(|| format!("{} is not UTF-8 text", path.display()))
        };
        Ok(match self {
            SettingsFiles::One(path) => serde_json::Value::String(read(path)?),
            SettingsFiles::Many(paths) => {
                let mut texts = serde_json::Map::new();
                for path in paths {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let name = name.with_context(|| format!("{} names no file", path.display()))?;
                    if texts.insert(name.clone(), read(path)?.into()).is_some() {
                        bail!("two files are named {name}");
                    }
                }
                serde_json::Value::Object(texts)
            }
        })
    }
}

/// The largest settings file Portcullis reads (4 MiB).
pub const MAX_SETTINGS_FILE_BYTES: u64 = 4 << 20;

impl PolicyConfig {
    /// Resolves its paths against the config file's directory.
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        self.module.resolve_against(base);
        for fixture in &mut self.fixtures {
            *fixture = base.join(&*fixture);
        }
        for files in self.settings_files.values_mut() {
            files.resolve_against(base);
        }
    }

    /// Puts the texts of `settings_files` into `settings`.
    pub(super) fn read_settings_files(&mut self) -> Result<()> {
        for (key, files) in &self.settings_files {
            let value = files
                .read()
                .with_context(|| format!("settings_files.{key}"))?;
            let Some(settings) = self.settings.as_object_mut() else {
                bail!("settings: must be a table");
            };
            if settings.insert(key.clone(), value).is_some() {
                bail!("settings_files.{key}: settings has a {key} already");
            }
        }
        Ok(())
    }

    /// The fixtures it must pass: the config's, then those that travelled
    /// with its registry module.
    pub fn all_fixtures(&self) -> impl Iterator<Item = &PathBuf> {
        let pulled = self.module.pulled().into_iter();
        self.fixtures.iter().chain(pulled.flat_map(|p| &p.fixtures))
    }
}

fn default_recycle_after() -> u64 {
    10_000
}

fn empty_settings() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// What happens when a policy traps, times out, runs out of memory or
/// returns malformed output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Deny the message (the default).
    #[default]
    Closed,
    /// Let the message through; the failure is still recorded.
    Open,
}

/// Whether a policy's verdict counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The verdict is enforced (the default).
    #[default]
    Enforce,
    /// The verdict is recorded in the audit trail but never enforced.
    Monitor,
}

/// How policy instances are used across evaluations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// A new instance for every evaluation: no state can survive from one
    /// call to the next, at the price of instantiating each time (about
    /// 10 µs for a Rust policy).
    Fresh,
    /// Instances are kept and reused (the default): a call costs about 2 µs.
    /// Memory and globals survive between calls; an instance is discarded
    /// after any failure.
    #[default]
    Reuse,
}

/// A WASI capability a policy may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// The real wall and monotonic clocks (otherwise they read zero).
    Clock,
    /// Real randomness (otherwise a fixed-seed generator, so verdicts are
    /// reproducible).
    Random,
    /// The policy's stderr goes to Portcullis' stderr (otherwise discarded).
    Stderr,
}

/// Engine-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Default deadline per evaluation, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Default linear-memory cap per instance, in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// The largest memory cap any policy may be given, in MiB (sizes the
    /// pooling allocator's slots).
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    /// How many policy instances may be alive at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Where compiled policies are cached (default: the user's cache
    /// directory); relative to the config file.
    pub cache_dir: Option<PathBuf>,
    /// Set to false to compile every policy at every start.
    #[serde(default = "yes")]
    pub cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            timeout_ms: default_timeout_ms(),
            memory_mb: default_memory_mb(),
            max_memory_mb: default_max_memory_mb(),
            max_instances: default_max_instances(),
            cache_dir: None,
            cache: true,
        }
    }
}

/// Portcullis' cache directory when the config names none:
/// `$XDG_CACHE_HOME/portcullis`, else `~/.cache/portcullis`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("portcullis"))
}

fn default_timeout_ms() -> u64 {
    50
}
fn default_memory_mb() -> u64 {
    16
}
fn default_max_memory_mb() -> u64 {
    256
}
fn default_max_instances() -> u32 {
    256
}
