//! The Portcullis config file: its TOML shape, defaults, resolution of
//! relative paths against the file's directory, and validation whose errors
//! name the file and the field. It never loads policies or starts processes.
//! Each section's shape lives in a file of its own; this one holds the whole
//! [`Config`], its loading and its validation.

mod agents;
mod approvals;
mod audit;
mod modules;
mod policies;
mod secrets;
mod serve;
mod servers;
mod state;
mod surface;

pub use agents::*;
pub use approvals::*;
pub use audit::*;
pub use modules::*;
pub use policies::*;
pub use secrets::*;
pub use serve::*;
pub use servers::*;
pub use state::*;
pub use surface::*;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent identity used in stdio mode.
    #[serde(default)]
    pub agent: AgentConfig,
    /// MCP servers by name: in `serve` mode, the only servers agents can reach.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    /// The agents allowed to connect in `serve` mode, by id.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentEntry>,
    /// JWT bearer tokens as agent credentials, next to API keys.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// The HTTP listener of `portcullis serve`.
    #[serde(default)]
    pub serve: ServeConfig,
    /// The ordered policy chain.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyConfig>,
    /// Where audit records go.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The WebAssembly engine's limits and cache.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Limits on the traffic itself.
    #[serde(default)]
    pub limits: Limits,
    /// Tool definitions pinned in a lock file, and what drift from it means.
    #[serde(default)]
    pub pinning: Option<PinningConfig>,
    /// Checks of tool-call arguments at the boundary.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Call rates allowed, per agent, server and tool.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Where held calls wait for a person, who may decide them, and for how
    /// long.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The people who may decide held calls over the admin API and page.
    #[serde(default)]
    pub approvers: BTreeMap<String, ApproverEntry>,
    /// The admin listener: the approvals API and page.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The keys whose signatures registry modules must carry.
    #[serde(default)]
    pub trust: TrustConfig,
    /// How to reach registries, by host (with port when not the default).
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// The cache of registry modules and how often followed tags are checked.
    #[serde(default)]
    pub policy_sources: PolicySourcesConfig,
    /// Shared state (Redis), for several processes enforcing as one.
    #[serde(default)]
    pub state: StateConfig,
    /// The file this config was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

fn everything() -> Vec<String> {
    vec!["*".into()]
}

fn yes() -> bool {
    true
}

fn is_http_url(url: &str) -> bool {
    let uri = url.parse::<hyper::Uri>().ok();
    crate::util::outbound::supports(uri.as_ref().and_then(|u| u.scheme_str()))
}

/// Whether `grant` is a host name or address, with an optional port.
fn is_host_grant(grant: &str) -> bool {
    let authority = grant.parse::<hyper::http::uri::Authority>().ok();
    authority.is_some_and(|a| !a.host().is_empty() && !grant.contains('@'))
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn one() -> u32 {
    1
}

/// Limits on traffic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest JSON-RPC message accepted from either side, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}

impl Config {
    /// Reads, parses, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        for (i, policy) in config.policies.iter_mut().enumerate() {
            let name = policy.name.clone();
            policy
                .read_settings_files()
                .map_err(|e| anyhow::anyhow!("{}: policy[{i}] ('{name}').{e:#}", path.display()))?;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Every module it names: the policies', then the component sinks'.
    pub fn modules(&self) -> impl Iterator<Item = &ModuleSource> {
        let policies = self.policies.iter().map(|p| &p.module);
        policies.chain(self.audit.sink_modules())
    }

    /// Every module it names, to record what was pulled for them.
    pub fn modules_mut(&mut self) -> impl Iterator<Item = &mut ModuleSource> {
        let policies = self.policies.iter_mut().map(|p| &mut p.module);
        let sinks = self.audit.sinks.iter_mut().filter_map(|sink| match sink {
            SinkConfig::Component { module, .. } => Some(module),
            _ => None,
        });
        policies.chain(sinks)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for policy in &mut self.policies {
            policy.resolve_paths(base);
        }
        let default_spool = self.beside("spool");
        let spool = |dir: &mut Option<PathBuf>| {
            *dir = Some(dir.as_ref().map_or(default_spool.clone(), |d| base.join(d)));
        };
        for sink in &mut self.audit.sinks {
            match sink {
                SinkConfig::File { path, .. } => *path = base.join(&*path),
                SinkConfig::Webhook { spool_dir, .. } => spool(spool_dir),
                SinkConfig::Component {
                    module, spool_dir, ..
                } => {
                    module.resolve_against(base);
                    spool(spool_dir);
                }
                SinkConfig::Stdout { .. } | SinkConfig::Stderr { .. } => {}
            }
        }
        if let Some(file) = self.jwt.as_mut().and_then(|jwt| jwt.jwks_file.as_mut()) {
            *file = base.join(&*file);
        }
        if let Some(dir) = &mut self.engine.cache_dir {
            *dir = base.join(&*dir);
        }
        if let Some(dir) = &mut self.policy_sources.cache_dir {
            *dir = base.join(&*dir);
        }
        for key in &mut self.trust.keys {
            *key = base.join(&*key);
        }
        let default_lock = self.default_lock();
        if let Some(pinning) = &mut self.pinning {
            let lock = pinning.lock.as_ref().map_or(default_lock, |l| base.join(l));
            pinning.lock = Some(lock);
        }
    }

    /// Where the lock file is when `[pinning]` does not say: beside the
    /// config, `NAME.lock.json` for `NAME.toml`.
    fn default_lock(&self) -> PathBuf {
        self.beside("lock.json")
    }

    /// `NAME.EXTENSION` beside the config file `NAME.toml`.
    fn beside(&self, extension: &str) -> PathBuf {
        let stem = self.path.file_stem().unwrap_or_default().to_string_lossy();
        self.path.with_file_name(format!("{stem}.{extension}"))
    }

    /// The approvals store.
    pub fn approvals_store(&self) -> StoreLocation {
        match &self.approvals.store {
            Some(store) => StoreLocation::of(store, self.path.parent().unwrap_or(Path::new("."))),
            None => StoreLocation::File(self.beside("approvals.db")),
        }
    }

    /// The lock file of `[pinning]`, if pinning is configured.
    pub fn lock_path(&self) -> Option<&Path> {
        self.pinning.as_ref().and_then(|p| p.lock.as_deref())
    }

    /// The lock file `portcullis pin` writes: `[pinning] lock`, or the
    /// default beside the config.
    pub fn lock_file(&self) -> PathBuf {
        self.lock_path()
            .map_or_else(|| self.default_lock(), Path::to_path_buf)
    }

    fn validate_state(&self) -> Result<()> {
        if self.state.timeout_ms == 0 {
            bail!("state.timeout_ms: must be at least 1");
        }
        if self.state.prefix.is_empty() || self.state.prefix.contains(char::is_whitespace) {
            bail!("state.prefix: must be a word without spaces");
        }
        // A reference naming the whole URL is checked once resolved, at start.
        if let Some(url) = &self.state.redis
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("${"))
        {
            bail!("state.redis: not a redis:// or rediss:// URL");
        }
        if let Some(store) = &self.approvals.store
            && store.starts_with("${")
        {
            let base = self.path.parent().unwrap_or(Path::new("."));
            resolve_secret(store, base).map_err(|e| anyhow::anyhow!("approvals.store: {e:#}"))?;
        }
        Ok(())
    }

    fn validate_sources(&self) -> Result<()> {
        if self.policy_sources.refresh_secs == 0 {
            bail!("policy_sources.refresh_secs: must be at least 1");
        }
        for (host, registry) in &self.registries {
            if host.contains('/') || host.is_empty() {
                bail!(
                    "registries.\"{host}\": a registry is named by its host (and port), e.g. registries.\"ghcr.io\""
                );
            }
            if registry.token.is_some()
                && (registry.username.is_some() || registry.password.is_some())
            {
                bail!("registries.\"{host}\": give a token or a username and password, not both");
            }
            if registry.username.is_some() != registry.password.is_some() {
                bail!("registries.\"{host}\": username and password go together");
            }
        }
        Ok(())
    }

    fn validate_approvals(&self) -> Result<()> {
        if self.approvals.expiry_secs == 0 {
            bail!("approvals.expiry_secs: must be at least 1");
        }
        for (name, approver) in &self.approvers {
            if !is_sha256_hex(&approver.api_key_sha256) {
                bail!("approvers.{name}.api_key_sha256: must be 64 hex digits (the key's sha256)");
            }
        }
        for (i, rule) in self.approvals.rules.iter().enumerate() {
            if rule.required == 0 || rule.expiry_secs == Some(0) {
                bail!("approvals.rules[{i}]: required and expiry_secs must be at least 1");
            }
            if rule.elicit && (rule.required > 1 || !rule.approvers.is_empty()) {
                bail!(
                    "approvals.rules[{i}]: elicit lets the client's user decide alone, so it cannot go with required > 1 or named approvers"
                );
            }
            if let Some(unknown) = rule
                .approvers
                .iter()
                .find(|a| !self.approvers.contains_key(*a))
            {
                bail!("approvals.rules[{i}]: approver '{unknown}' is not in [approvers]");
            }
            let eligible = if rule.approvers.is_empty() {
                self.approvers.len()
            } else {
                rule.approvers.len()
            };
            if rule.required > 1 && (rule.required as usize) > eligible {
                bail!(
                    "approvals.rules[{i}]: required = {} but only {eligible} approver(s) may decide",
                    rule.required
                );
            }
        }
        for url in &self.approvals.notify {
            if !is_http_url(url) {
                bail!("approvals.notify: '{url}' is not an http(s) URL");
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let mut components = HashSet::new();
        for (i, sink) in self.audit.sinks.iter().enumerate() {
            match sink {
                SinkConfig::Webhook { url, .. } if !is_http_url(url) => {
                    bail!("audit.sinks[{i}]: '{url}' is not an http(s) URL");
                }
                SinkConfig::Webhook {
                    url,
                    format,
                    protocol: Protocol::Grpc,
                    ..
                } => {
                    if *format == BatchFormat::Json {
                        bail!(
                            "audit.sinks[{i}]: protocol = \"grpc\" needs format = \"otlp\" or \"otlp-traces\""
                        );
                    }
                    if !matches!(url.parse::<hyper::Uri>().map(|u| u.path().len()), Ok(0 | 1)) {
                        bail!(
                            "audit.sinks[{i}]: for gRPC, url is the collector's address without a path (e.g. http://collector:4317), not '{url}'"
                        );
                    }
                }
                SinkConfig::Component { allow_hosts, .. } => {
                    let name = sink.component_name().unwrap_or_default();
                    if !components.insert(name.clone()) {
                        bail!(
                            "audit.sinks[{i}]: another component sink is named '{name}'; give each its own `name`"
                        );
                    }
                    if let Some(bad) = allow_hosts.iter().find(|h| !is_host_grant(h)) {
                        bail!("audit.sinks[{i}].allow_hosts: '{bad}' is not `host` or `host:port`");
                    }
                }
                _ => {}
            }
        }
        let engine = &self.engine;
        if engine.timeout_ms == 0 {
            bail!("engine.timeout_ms: must be at least 1");
        }
        self.validate_approvals()?;
        if engine.memory_mb > engine.max_memory_mb {
            bail!(
                "engine.memory_mb: {} exceeds engine.max_memory_mb ({})",
                engine.memory_mb,
                engine.max_memory_mb
            );
        }
        if self.limits.max_message_bytes < 1024 {
            bail!("limits.max_message_bytes: must be at least 1024");
        }
        if self.agent.id.trim().is_empty() {
            bail!("agent.id: must not be empty");
        }
        for (id, agent) in &self.agents {
            if let Some(hash) = &agent.api_key_sha256
                && !is_sha256_hex(hash)
            {
                bail!("agents.{id}.api_key_sha256: must be 64 hex digits (the key's sha256)");
            }
        }
        if let Some(jwt) = &self.jwt {
            if jwt.issuer.trim().is_empty() || jwt.audience.trim().is_empty() {
                bail!("jwt: issuer and audience must not be empty");
            }
            let sources = [
                jwt.jwks_file.is_some(),
                jwt.jwks_url.is_some(),
                jwt.hs256_secret.is_some(),
            ];
            if sources.iter().filter(|given| **given).count() != 1 {
                bail!("jwt: give exactly one of jwks_file, jwks_url and hs256_secret");
            }
        }
        if let Some(why) = ambiguous_prefixes(&self.servers, &self.serve.separator) {
            bail!(why);
        }
        for (name, server) in &self.servers {
            if server.command.is_some() == server.url.is_some() {
                bail!(
                    "servers.{name}: give either command (a stdio server) or url (a Streamable HTTP server)"
                );
            }
        }
        for (i, limit) in self.rate_limits.iter().enumerate() {
            if limit.calls == 0 || limit.per_secs == 0 || limit.burst == Some(0) {
                bail!("rate_limits[{i}]: calls, per_secs and burst must be at least 1");
            }
            if limit.by.is_empty() {
                bail!("rate_limits[{i}].by: name at least one of agent, server and tool");
            }
        }
        if self.serve.separator.is_empty() {
            bail!("serve.separator: must not be empty");
        }
        let serve = &self.serve;
        for (name, value) in [
            ("session_idle_secs", serve.session_idle_secs),
            ("max_connections", serve.max_connections as u64),
            ("header_timeout_secs", serve.header_timeout_secs),
            ("body_timeout_secs", serve.body_timeout_secs),
        ] {
            if value == 0 {
                bail!("serve.{name}: must be at least 1");
            }
        }
        if serve.max_connections > MAX_CONNECTIONS {
            bail!("serve.max_connections: must be at most {MAX_CONNECTIONS}");
        }
        self.validate_sources()?;
        self.validate_state()?;
        let mut names = std::collections::HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let at = format!("policy[{i}]");
            if policy.name.trim().is_empty() {
                bail!("{at}.name: must not be empty");
            }
            if !names.insert(policy.name.as_str()) {
                bail!("{at}.name: '{}' is used by another policy", policy.name);
            }
            let at = format!("{at} ('{}')", policy.name);
            if !policy.settings.is_object() {
                bail!("{at}.settings: must be a table");
            }
            if policy.recycle_after == 0 {
                bail!("{at}.recycle_after: must be at least 1");
            }
            if policy.follow
                && policy
                    .module
                    .reference()
                    .is_none_or(|r| r.tag.is_none() || r.digest.is_some())
            {
                bail!(
                    "{at}.follow: only a module named by an oci:// tag without a digest can be followed"
                );
            }
            if policy.timeout_ms == Some(0) {
                bail!("{at}.timeout_ms: must be at least 1");
            }
            if let Some(mb) = policy.memory_mb
                && mb > engine.max_memory_mb
            {
                bail!(
                    "{at}.memory_mb: {mb} exceeds engine.max_memory_mb ({})",
                    engine.max_memory_mb
                );
            }
            for (field, globs) in [
                ("servers", &policy.servers),
                ("methods", &policy.methods),
                ("tools", &policy.tools),
            ] {
                if globs.is_empty() {
                    bail!("{at}.{field}: must name at least one pattern (use \"*\" for all)");
                }
            }
        }
        for (name, server) in &self.servers {
            if server
                .command
                .as_deref()
                .is_some_and(|c| c.trim().is_empty())
            {
                bail!("servers.{name}.command: must not be empty");
            }
        }
        Ok(())
    }

    /// The policy's deadline per evaluation.
    pub fn timeout_ms(&self, policy: &PolicyConfig) -> u64 {
        policy.timeout_ms.unwrap_or(self.engine.timeout_ms)
    }

    /// The policy's memory cap in bytes.
    pub fn memory_bytes(&self, policy: &PolicyConfig) -> u64 {
        policy.memory_mb.unwrap_or(self.engine.memory_mb) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/portcullis/gw.toml"))
    }

    #[test]
    fn resolves_relative_paths_against_the_config_file() {
        let config = parse(
            r#"
            [[policy]]
            name = "ro"
            module = "policies/ro.wasm"
            [[audit.sinks]]
            type = "file"
            path = "/var/log/audit.jsonl"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.policies[0].module,
            ModuleSource::File("/etc/portcullis/policies/ro.wasm".into())
        );
        assert!(
            matches!(&config.audit.sinks[0], SinkConfig::File { path, .. } if path == Path::new("/var/log/audit.jsonl"))
        );
        assert_eq!(config.policies[0].failure, FailureMode::Closed);
        assert_eq!(config.policies[0].mode, Mode::Enforce);
    }

    #[test]
    fn the_approvals_store_is_a_file_or_a_postgres_url_and_its_password_is_never_shown() {
        let base = Path::new("/etc/portcullis");
        assert_eq!(
            StoreLocation::of("state/approvals.db", base),
            StoreLocation::File("/etc/portcullis/state/approvals.db".into())
        );
        let url = "postgres://portcullis:${env:PGPASSWORD}@db:5432/gw";
        assert!(matches!(
            StoreLocation::of(url, base),
            StoreLocation::Postgres { .. }
        ));
        // SAFETY: the test sets a variable no other test reads.
        unsafe {
            std::env::set_var(
                "PORTCULLIS_TEST_APPROVALS_URL",
                "postgresql://u:hunter2@db/gw",
            )
        };
        let whole = StoreLocation::of("${env:PORTCULLIS_TEST_APPROVALS_URL}", base);
        assert!(matches!(whole, StoreLocation::Postgres { .. }), "{whole:?}");
        for (url, shown) in [
            (
                "postgres://u:hunter2@db:5432/gw?sslmode=require",
                "postgres://u@db:5432/gw",
            ),
            ("postgres://u@db:5432/gw", "postgres://u@db:5432/gw"),
            ("postgres://u:ab/cd@db/gw", "postgres://u@db:5432/gw"),
            (
                "postgres://db/gw?user=u&password=hunter2",
                "postgres://u@db:5432/gw",
            ),
            (
                "postgres://db/gw?user=u&pass%77ord=hunter2",
                "postgres://u@db:5432/gw",
            ),
            ("postgresql://u:p@a:1,b:2/gw", "postgres://u@a:1,b:2/gw"),
            ("not a url: hunter2", "postgres://(not a PostgreSQL URL)"),
        ] {
            let redacted = StoreLocation::redacted(url);
            assert!(
                !redacted.contains("hunter2") && !redacted.contains("cd@"),
                "{url}"
            );
            assert_eq!(redacted, shown, "{url}");
        }
        assert_eq!(
            whole.to_string(),
            "postgres://u@db:5432/gw",
            "shown resolved, its password hidden"
        );
        let unset = parse("[approvals]\nstore = \"${env:PORTCULLIS_TEST_UNSET_STORE}\"\n");
        assert!(format!("{:#}", unset.unwrap_err()).contains("PORTCULLIS_TEST_UNSET_STORE"));
    }

    #[test]
    fn merged_names_must_name_one_server() {
        let servers = |a: &str, b: &str, separator: &str| {
            parse(&format!(
                "[serve]\nseparator = \"{separator}\"\n\
                 [servers.{a}]\ncommand = \"x\"\n[servers.{b}]\ncommand = \"x\"\n"
            ))
        };
        let clash = servers("a", "\"a__b\"", "__").unwrap_err().to_string();
        assert!(
            clash.contains("servers.a__b") && clash.contains("servers.a's"),
            "{clash}"
        );
        assert!(
            servers("a", "ab", "").is_err(),
            "no separator: 'a' begins 'ab'"
        );
        assert!(servers("a", "ab", "__").is_ok());
        assert!(servers("files", "files2", "__").is_ok());
        let renamed = parse(
            "[servers.a]\ncommand = \"x\"\n[servers.\"a__b\"]\ncommand = \"x\"\nprefix = \"ab\"\n",
        );
        assert!(renamed.is_ok(), "{renamed:?}");
    }

    #[test]
    fn jwt_needs_exactly_one_key_source() {
        let jwt = |keys: &str| {
            parse(&format!(
                "[jwt]\nissuer = \"https://idp\"\naudience = \"p\"\n{keys}"
            ))
        };
        let none = jwt("").unwrap_err().to_string();
        assert!(
            none.contains("exactly one of jwks_file, jwks_url and hs256_secret"),
            "{none}"
        );
        assert!(jwt("jwks_file = \"a.json\"\njwks_url = \"https://idp/jwks\"\n").is_err());
        let config = jwt("jwks_file = \"keys/jwks.json\"\n").unwrap();
        let jwt = config.jwt.unwrap();
        assert_eq!(
            jwt.jwks_file.unwrap(),
            Path::new("/etc/portcullis/keys/jwks.json")
        );
        assert_eq!((jwt.agent_claim.as_str(), jwt.leeway_secs), ("sub", 60));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\nfailure = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/portcullis/gw.toml"), "{err}");
        assert!(err.contains("failure"), "{err}");

        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\n[[policy]]\nname = \"a\"\nmodule = \"b.wasm\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy[1].name: 'a' is used by another policy"),
            "{err}"
        );

        let err = parse("[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\nmemory_mb = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy[0] ('a').memory_mb"), "{err}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = parse("[engine]\ntimeout = 5\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn server_credentials_come_from_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-file\n").unwrap();
        // SAFETY: the variable is unique to this test; nothing else reads it.
        unsafe { std::env::set_var("PORTCULLIS_TEST_TOKEN", "from-env") };
        let server = |value: &str| ServerConfig {
            command: Some("server".into()),
            url: None,
            headers: BTreeMap::new(),
            args: vec![],
            env: BTreeMap::from([("TOKEN".into(), value.into())]),
            prefix: None,
            isolation: Isolation::Shared,
        };
        let token = |value: &str| {
            server(value)
                .resolved_env(dir.path())
                .map(|env| env["TOKEN"].clone())
        };
        assert_eq!(token("plain").unwrap(), "plain");
        assert_eq!(token("${env:PORTCULLIS_TEST_TOKEN}").unwrap(), "from-env");
        assert_eq!(token("${file:token}").unwrap(), "from-file");
        assert_eq!(
            token("Bearer ${env:PORTCULLIS_TEST_TOKEN}/${file:token}").unwrap(),
            "Bearer from-env/from-file"
        );
        assert!(format!("{:#}", token("${env:X").unwrap_err()).contains("unclosed"));
        let missing = token("${env:PORTCULLIS_TEST_UNSET}").unwrap_err();
        assert!(format!("{missing:#}").contains("PORTCULLIS_TEST_UNSET is not set"));
        assert!(format!("{:#}", token("${vault:x}").unwrap_err()).contains("unknown reference"));
    }

    #[test]
    fn agent_keys_must_be_sha256_digests() {
        let err = parse("[agents.bot]\napi_key_sha256 = \"secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agents.bot.api_key_sha256: must be 64 hex digits"),
            "{err}"
        );
        let hash = "a".repeat(64);
        let config = parse(&format!("[agents.bot]\napi_key_sha256 = \"{hash}\"\n")).unwrap();
        assert_eq!(config.agents["bot"].servers, vec!["*"]);
        assert_eq!(config.serve.listen.to_string(), "127.0.0.1:8808");
    }

    #[test]
    fn a_delivering_sink_needs_an_http_url_and_a_known_field() {
        let err = parse("[[audit.sinks]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.sinks[0]: 'ftp://x' is not an http(s) URL"),
            "{err}"
        );
        let err = parse("[[audit.sinks]]\ntype = \"stderr\"\nonly = { outcome = [\"deny\"] }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `outcome`"), "{err}");
    }

    #[test]
    fn grpc_is_for_otlp_to_a_collectors_address_and_components_are_named_apart() {
        let sink = |fields: &str| {
            parse(&format!("[[audit.sinks]]\ntype = \"webhook\"\n{fields}"))
                .err()
                .map(|e| e.to_string())
        };
        let grpc = "protocol = \"grpc\"\n";
        let json = sink(&format!("url = \"http://c:4317\"\n{grpc}")).unwrap();
        assert!(json.contains("needs format = \"otlp\""), "{json}");
        let otlp = "format = \"otlp-traces\"\n";
        let path = sink(&format!("url = \"http://c:4317/v1/traces\"\n{grpc}{otlp}")).unwrap();
        assert!(path.contains("without a path"), "{path}");
        assert_eq!(
            sink(&format!("url = \"http://c:4317\"\n{grpc}{otlp}")),
            None
        );

        let component = "[[audit.sinks]]\ntype = \"component\"\nmodule = \"sinks/hec.wasm\"\n";
        let twice = parse(&format!("{component}{component}"))
            .unwrap_err()
            .to_string();
        assert!(
            twice.contains("another component sink is named 'hec'"),
            "{twice}"
        );
        let granted = format!("{component}allow_hosts = [\"https://siem\"]\n");
        let err = parse(&granted).unwrap_err().to_string();
        assert!(err.contains("is not `host` or `host:port`"), "{err}");
    }
}
