//! `portcullis check`: validates a config file and loads every policy in it,
//! one by one so that one broken policy does not hide another, and prints a
//! report a person can act on. It starts no server and writes no audit record.

use crate::approval::store;
use crate::config::{
    Config, FailureMode, InstanceMode, Mode, ModuleSource, PolicyConfig, SinkConfig,
};
use crate::policy::engine::PolicyEngine;
use crate::policy::module::Policy;
use crate::registry::Sources;
use crate::surface::lock::Pins;
use std::path::Path;
use std::time::Instant;

/// Runs the check, prints the report, and returns the exit code (0 when
/// everything loaded).
pub fn run(path: &Path) -> i32 {
    let mut config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            println!("config   {}  INVALID\n  {e:#}", path.display());
            return 1;
        }
    };
    println!("config   {}  ok", path.display());
    println!("agent    {}", config.agent.id);
    for (name, server) in &config.servers {
        match (&server.command, &server.url) {
            (Some(command), _) => println!("server   {name}: {command} {}", server.args.join(" ")),
            (None, url) => println!("server   {name}: {}", url.as_deref().unwrap_or_default()),
        }
    }
    for (id, agent) in &config.agents {
        println!(
            "agent    {id} (serve): servers {}",
            agent.servers.join(", ")
        );
    }
    let engine = match PolicyEngine::new(&config.engine) {
        Ok(engine) => engine,
        Err(e) => {
            println!("engine   FAILED\n  {e:#}");
            return 1;
        }
    };
    let sources_ok = report_sources(&mut config);
    let failed = config
        .policies
        .iter()
        .filter(|p| !report_policy(&engine, &config, p))
        .count();
    let sinks_ok = report_sinks(&config);
    let lock_ok = report_lock(&config);
    if !config.rate_limits.is_empty() {
        println!("limits   {} rate limits", config.rate_limits.len());
    }
    report_approvals(&config);
    let total = config.policies.len();
    if !sources_ok {
        println!("result   FAILED: a registry module was refused or could not be pulled");
        1
    } else if !lock_ok {
        println!("result   FAILED: the lock file did not load");
        1
    } else if !sinks_ok {
        println!("result   FAILED: an audit sink did not load");
        1
    } else if failed == 0 {
        println!("result   ok: {total} policies loaded");
        0
    } else {
        println!("result   FAILED: {failed} of {total} policies did not load");
        1
    }
}

/// Prints the audit sinks; a component sink is compiled, started and
/// configured (nothing is sent). False when one did not load.
fn report_sinks(config: &Config) -> bool {
    let base = config.path.parent().unwrap_or(Path::new("."));
    let mut ok = true;
    for sink in &config.audit.sinks {
        match sink {
            SinkConfig::File { path, chain, .. } => println!(
                "audit    file {}{}",
                path.display(),
                if *chain { " (chained)" } else { "" }
            ),
            SinkConfig::Webhook { url, .. } => println!("audit    webhook {url}"),
            SinkConfig::Component {
                module,
                allow_hosts,
                ..
            } => {
                let name = sink.component_name().unwrap_or_default();
                match crate::audit::load_component(sink, base).map(drop) {
                    Ok(()) => println!(
                        "audit    component {name} ({module}), may reach: {}",
                        if allow_hosts.is_empty() {
                            "nothing".to_string()
                        } else {
                            allow_hosts.join(", ")
                        }
                    ),
                    Err(e) => {
                        ok = false;
                        println!("audit    component {name} FAILED\n  {e:#}");
                    }
                }
            }
            SinkConfig::Stdout { .. } => println!("audit    stdout (not in stdio mode)"),
            SinkConfig::Stderr { .. } => println!("audit    stderr"),
        }
    }
    ok
}

/// Where held calls wait (and the store's schema version, read without
/// changing it) and who may decide them.
fn report_approvals(config: &Config) {
    let approvals = &config.approvals;
    let location = config.approvals_store();
    let schema = match store::schema_version(&location) {
        Ok((Some(version), latest)) if version == latest => format!("schema version {version}"),
        Ok((Some(version), latest)) => {
            format!("schema version {version}, migrated to {latest} on first use")
        }
        Ok((None, latest)) => format!("not created yet: schema version {latest} on first use"),
        Err(e) => format!("WARNING: cannot be read: {e:#}"),
    };
    println!(
        "approve  store {location} ({schema}), {} rule(s), {} approver(s), {} webhook(s)",
        approvals.rules.len(),
        config.approvers.len(),
        approvals.notify.len()
    );
    if let Some(admin) = &config.admin {
        let warning = if config.approvers.is_empty() {
            "  (no [approvers]: nobody can sign in)"
        } else {
            ""
        };
        println!("admin    {}{warning}", admin.url());
    }
}

/// Loads the lock file, when `[pinning]` is configured, and prints what it
/// pins; true unless it failed to load.
fn report_lock(config: &Config) -> bool {
    let (Some(pinning), Some(path)) = (&config.pinning, config.lock_path()) else {
        return true;
    };
    match Pins::load(path) {
        Ok(pins) => {
            println!("lock     {}  ok", path.display());
            for name in config.servers.keys() {
                match pins.server(name) {
                    Some(p) => println!(
                        "pinned   {name}: {} tools, {} prompts, {} resource templates",
                        p.tools.len(),
                        p.prompts.len(),
                        p.resource_templates.len()
                    ),
                    None => println!("pinned   {name}: NOT PINNED (its tools are not governed)"),
                }
            }
            println!("drift    {} by default", pinning.on_drift.as_str());
            true
        }
        Err(e) => {
            println!("lock     {}  FAILED\n  {e:#}", path.display());
            false
        }
    }
}

/// Pulls every registry module (checking digests and, under `[trust]`,
/// signatures), prints each one's source, digest and signer, and warns of
/// references not pinned to a digest; false when one failed.
fn report_sources(config: &mut Config) -> bool {
    if config.modules().all(|m| m.reference().is_none()) {
        return true;
    }
    let sources = match Sources::new(config) {
        Ok(sources) => sources,
        Err(e) => {
            println!("sources  FAILED\n  {e:#}");
            return false;
        }
    };
    if sources.trusting() {
        let keys: Vec<_> = config
            .trust
            .keys
            .iter()
            .map(|k| k.display().to_string())
            .collect();
        println!(
            "trust    registry modules must be signed by one of: {}",
            keys.join(", ")
        );
    } else {
        println!(
            "trust    WARNING: no [trust] keys: registry modules are checked against their digests only"
        );
    }
    let mut ok = true;
    for module in config.modules_mut() {
        let ModuleSource::Oci { reference, pulled } = module else {
            continue;
        };
        match sources.pull(reference) {
            Ok(module) => {
                let signer = match &module.signer {
                    Some(key) => format!("signed by {key}"),
                    None => "signature not checked".into(),
                };
                println!(
                    "module   {reference}\n         digest {}  {signer}",
                    module.digest
                );
                if reference.digest.is_none() {
                    println!(
                        "         WARNING: named by tag only: pin it (…@{}) so every gateway runs these bytes",
                        module.digest
                    );
                }
                *pulled = Some(Box::new(module));
            }
            Err(e) => {
                ok = false;
                println!("module   {reference}  REFUSED\n  {e:#}");
            }
        }
    }
    ok
}

/// Loads one policy and prints its line; true if it loaded.
fn report_policy(engine: &PolicyEngine, config: &Config, p: &PolicyConfig) -> bool {
    if p.module.path().is_err() {
        println!(
            "policy   {:<16} FAILED  its module was not pulled (above)",
            p.name
        );
        return false;
    }
    let started = Instant::now();
    let mode = match p.mode {
        Mode::Enforce => "enforce",
        Mode::Monitor => "monitor",
    };
    let failure = match p.failure {
        FailureMode::Closed => "fail-closed",
        FailureMode::Open => "fail-open",
    };
    let instances = match p.instances {
        InstanceMode::Fresh => "fresh instances".to_string(),
        InstanceMode::Reuse => format!("reused instances (recycled after {})", p.recycle_after),
    };
    let scope = format!(
        "methods={} tools={} servers={} · {mode} · {failure} · {instances} · {} ms · {} MiB",
        p.methods.join(","),
        p.tools.join(","),
        p.servers.join(","),
        config.timeout_ms(p),
        config.memory_bytes(p) >> 20,
    );
    match Policy::load(engine, config, p) {
        Ok(policy) => {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            println!(
                "policy   {:<16} ok      sha256 {}  loaded in {ms:.1} ms  ({scope})",
                p.name,
                &policy.sha256[..12],
            );
            true
        }
        Err(e) => {
            println!("policy   {:<16} FAILED  {}\n  {e:#}", p.name, p.module);
            false
        }
    }
}
