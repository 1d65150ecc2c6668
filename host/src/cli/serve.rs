//! `portcullis serve`: the HTTP gateway — every configured server behind
//! one listener, agents authenticated, an admin listener beside it when
//! configured — until SIGTERM or SIGINT.

use crate::admin::{Admin, Deployment};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::gateway::http::Listener;
use crate::http;
use crate::relay::generation::{Current, Generation};
use crate::runtime::reload::Reloader;
use crate::runtime::status::Status;
use crate::upstream;
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::sync::Arc;

/// Runs the gateway until a signal stops it.
pub fn command(config_path: PathBuf, audit_file: Option<PathBuf>) -> Result<i32> {
    let config = Config::load(&config_path)?;
    if config.agents.is_empty() && config.jwt.is_none() {
        bail!(
            "{}: neither [agents.NAME] nor [jwt] is configured, so no agent could connect",
            config_path.display()
        );
    }
    let (engine, shared) = crate::cli::engine_and_state(&config)?;
    let generation = Generation::load(&engine, &config_path, audit_file.as_deref(), 1, None)?;
    let current = Arc::new(Current::shared(generation, shared));
    current.cancel_orphans();
    let runtime = http::runtime()?;
    let plans = upstream::plans(&config, None)?;
    let gateway = Arc::new(Gateway::new(
        &config,
        current.clone(),
        plans,
        runtime.handle(),
    )?);
    let reloader = Arc::new(Reloader::new(
        engine,
        current.clone(),
        config_path,
        audit_file,
        "serve",
    ));
    reloader.clone().start()?;
    // The status report follows the servers' health.
    let watched = gateway.clone();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(SERVERS_STATUS_INTERVAL);
        loop {
            ticks.tick().await;
            reloader.set_servers(watched.health());
        }
    });
    let listener = Arc::new(Listener::new(gateway.clone(), current.clone()));
    // Idle sessions expire, checked a few times per idle period.
    let sweeping = gateway.clone();
    let sweep = std::time::Duration::from_secs((config.serve.session_idle_secs / 4).clamp(1, 60));
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(sweep);
        loop {
            ticks.tick().await;
            let gateway = sweeping.clone();
            // Expiring cancels held calls and writes the trail: off the
            // async workers.
            let _ = tokio::task::spawn_blocking(move || gateway.expire_idle()).await;
        }
    });
    let guard = http::Guard::of(&config.serve);
    let served = runtime.block_on(async {
        let socket = http::bind(config.serve.listen).await?;
        if let Some(settings) = &config.admin {
            if config.approvers.is_empty() {
                tracing::warn!("[admin] is configured but no [approvers]: nobody can sign in");
            }
            let admin = Arc::new(Admin::new(&config, Deployment::Serving(current)));
            let socket = http::bind(settings.listen).await?;
            // It ends with the runtime, after the MCP listener.
            tokio::spawn(admin.run(socket, std::future::pending()));
        }
        // Calls held for a person cannot wait for one through the drain:
        // they are refused at once (their clients may ask again elsewhere),
        // and the drain lets every other call finish.
        let stopping = gateway.clone();
        let shutdown = async move {
            super::shutdown_signal().await;
            let cancel = move || stopping.cancel_held("Portcullis was stopped");
            let _ = tokio::task::spawn_blocking(cancel).await;
        };
        crate::gateway::http::run(listener, socket, guard, shutdown).await
    });
    // One held while the first were cancelled.
    gateway.cancel_held("Portcullis was stopped");
    gateway.stop();
    // No status update after the report is withdrawn; held calls, just
    // cancelled, see it within a poll.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    crate::audit::flush(super::AUDIT_FLUSH);
    Status::withdraw(std::process::id());
    served.map(|()| 0)
}

/// How long `serve` waits for its tasks when it stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often `serve` brings its servers' health up to date in the status
/// report.
const SERVERS_STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
