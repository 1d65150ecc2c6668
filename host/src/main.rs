//! The `portcullis` command line: parses arguments and hands each
//! subcommand to the library. No policy or protocol logic lives here.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use portcullis::admin::{Admin, ConfigFile, Deployment};
use portcullis::bindings::Agent;
use portcullis::config::Config;
use portcullis::engine::PolicyEngine;
use portcullis::gateway::Gateway;
use portcullis::http::{self, Listener};
use portcullis::relay::Relay;
use portcullis::reload::{Current, Generation, Reloader};
use portcullis::session::Session;
use portcullis::status::{self, Status};
use portcullis::stdio::{self, ServerCommand};
use portcullis::upstream;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// A WebAssembly policy host for the Model Context Protocol.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Wrap a stdio MCP server: every message both ways is judged by the
    /// policy chain and audited. Put this in an MCP client's `command`.
    Stdio {
        /// The config file (watched: changes are applied without a restart).
        #[arg(long)]
        config: PathBuf,
        /// Also append audit records to this JSON Lines file.
        #[arg(long)]
        audit_file: Option<PathBuf>,
        /// Which configured server this is (default: the only one, or
        /// `stdio` when the command is given after `--`).
        #[arg(long)]
        server: Option<String>,
        /// Serve this process' Prometheus metrics at `/metrics` here.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// The server command and its arguments (default: from the config).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Serve MCP over Streamable HTTP in front of the configured servers:
    /// agents authenticate with their own keys and reach only the servers
    /// they were granted, every message judged and audited.
    Serve {
        /// The config file (watched: changes are applied without a restart).
        #[arg(long)]
        config: PathBuf,
        /// Also append audit records to this JSON Lines file.
        #[arg(long)]
        audit_file: Option<PathBuf>,
    },
    /// Record what the configured servers offer (tools, prompts, resource
    /// templates) in the lock file beside the config, or with --check report
    /// how they drifted from it (exit status 1 on drift).
    Pin {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Only this server (the others keep their entries in the lock).
        #[arg(long)]
        server: Option<String>,
        /// Report drift without writing the lock file.
        #[arg(long)]
        check: bool,
    },
    /// Serve the approvals page and API of a config's deployment on its
    /// `[admin]` listener, for stdio deployments (`serve` runs it itself).
    Admin {
        /// The config file (its approvers and approvals store).
        #[arg(long)]
        config: PathBuf,
        /// Listen here instead of `[admin] listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Calls held for a person's approval: list, show, approve, deny.
    Approvals {
        /// The config file (its approvals store is the one acted on).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Who decides, as recorded (default: the login name).
        #[arg(long = "as", global = true)]
        approver: Option<String>,
        #[command(subcommand)]
        action: portcullis::approve::Action,
    },
    /// Read the audit trail: verify its chain, tail it, query it.
    Audit {
        #[command(subcommand)]
        action: portcullis::trail::Action,
    },
    /// Validate a config file and load every policy in it.
    Check {
        /// The config file.
        config: PathBuf,
    },
    /// Run fixture files against a policy module and report each case;
    /// exits non-zero if any case fails.
    Test {
        /// The policy module (.wasm component).
        module: PathBuf,
        /// Fixture files (JSON arrays of cases).
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
        /// The policy's settings, as JSON.
        #[arg(long, default_value = "{}")]
        settings: String,
    },
    /// Judge one message with a policy module and print the verdict, the
    /// policy's log lines and the time it took.
    Eval {
        /// The policy module (.wasm component).
        module: PathBuf,
        /// The message: an exchange written as in a fixture file.
        #[arg(long)]
        message: PathBuf,
        /// The policy's settings, as JSON.
        #[arg(long, default_value = "{}")]
        settings: String,
    },
    /// Scaffold a policy project that builds and passes its own sample
    /// fixtures out of the box.
    New {
        /// The policy's name (lowercase letters, digits and '-').
        name: String,
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: portcullis::scaffold::Language,
        /// Where to write it (default: a directory named after the policy).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show every running Portcullis process: its policies with their
    /// digests and load times, and its last reload.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure the policy chain and the relay's added latency.
    Bench(portcullis::bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    // The proxy reports what it does; the tools print their own results.
    let default_level = match cli.command {
        Commands::Stdio { .. } | Commands::Serve { .. } | Commands::Admin { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            2
        }
    };
    // Exit without waiting for a stdin reader thread still blocked in read.
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Commands::Stdio {
            config,
            audit_file,
            server,
            metrics_listen,
            command,
        } => {
            if let Some(addr) = metrics_listen {
                portcullis::admin::serve_metrics(addr)?;
            }
            run_stdio(config, audit_file, server, command)
        }
        Commands::Serve { config, audit_file } => run_serve(config, audit_file),
        Commands::Admin { config, listen } => run_admin(&config, listen),
        Commands::Check { config } => Ok(portcullis::check::run(&config)),
        Commands::Audit { action } => portcullis::trail::run(&action),
        Commands::Approvals {
            config,
            approver,
            action,
        } => {
            let config = config.context("--config names the config whose approvals to act on")?;
            portcullis::approve::run(&config, approver.as_deref(), &action)
        }
        Commands::Pin {
            config,
            server,
            check,
        } => portcullis::pin::run(&config, server.as_deref(), check),
        Commands::Status { json } => status::print(json).map(|()| 0),
        Commands::Test {
            module,
            fixtures,
            settings,
        } => {
            let settings = serde_json::from_str(&settings).context("--settings is not JSON")?;
            portcullis::fixtures::test(&module, settings, &fixtures)
        }
        Commands::Eval {
            module,
            message,
            settings,
        } => {
            let settings = serde_json::from_str(&settings).context("--settings is not JSON")?;
            portcullis::fixtures::eval(&module, settings, &message)
        }
        Commands::New { name, lang, dir } => {
            portcullis::scaffold::run(&name, lang, dir.as_deref()).map(|()| 0)
        }
        Commands::Bench(args) => portcullis::bench::run(&args).map(|()| 0),
    }
}

fn run_stdio(
    config_path: PathBuf,
    audit_file: Option<PathBuf>,
    server: Option<String>,
    command: Vec<String>,
) -> Result<i32> {
    let config = Config::load(&config_path)?;
    portcullis::audit::stdout_carries_mcp();
    let (name, server) = pick_server(&config, server, command)?;
    let engine = Arc::new(PolicyEngine::new(&config.engine)?);
    let generation = Generation::load(&engine, &config_path, audit_file.as_deref(), 1)?;
    let agent = Agent {
        id: config.agent.id.clone(),
        attributes: config.agent.attributes.clone().into_iter().collect(),
    };
    tracing::info!(
        server = %name,
        agent = %agent.id,
        policies = generation.guard.policies().count(),
        "portcullis relaying"
    );
    let current = Arc::new(Current::new(generation));
    current.cancel_orphans();
    let relay = Arc::new(Relay::new(
        current.clone(),
        Session::new(name.clone(), agent),
    ));
    let reloader = Reloader::new(engine, current, config_path, audit_file, &name);
    Arc::new(reloader).start()?;
    let code = stdio::run(relay, &server, config.limits.max_message_bytes);
    portcullis::audit::flush(AUDIT_FLUSH);
    Status::withdraw(std::process::id());
    code
}

fn run_serve(config_path: PathBuf, audit_file: Option<PathBuf>) -> Result<i32> {
    let config = Config::load(&config_path)?;
    if config.agents.is_empty() && config.jwt.is_none() {
        bail!(
            "{}: neither [agents.NAME] nor [jwt] is configured, so no agent could connect",
            config_path.display()
        );
    }
    let engine = Arc::new(PolicyEngine::new(&config.engine)?);
    let generation = Generation::load(&engine, &config_path, audit_file.as_deref(), 1)?;
    let current = Arc::new(Current::new(generation));
    current.cancel_orphans();
    let runtime = http::runtime()?;
    let upstreams = upstream::start_all(&config, None, runtime.handle())?;
    let gateway = Arc::new(Gateway::new(&config, current.clone(), upstreams));
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
    let listener = Arc::new(Listener {
        gateway: gateway.clone(),
        current: current.clone(),
    });
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
        http::run(listener, socket, guard, shutdown_signal()).await
    });
    gateway.cancel_held("Portcullis was stopped");
    for upstream in gateway.upstreams().values() {
        upstream.stop();
    }
    // No status update after the report is withdrawn; held calls, just
    // cancelled, see it within a poll.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    portcullis::audit::flush(AUDIT_FLUSH);
    Status::withdraw(std::process::id());
    served.map(|()| 0)
}

/// `portcullis admin`: the approvals page and API of a stdio deployment.
fn run_admin(config_path: &std::path::Path, listen: Option<std::net::SocketAddr>) -> Result<i32> {
    let config = Config::load(config_path)?;
    if config.approvers.is_empty() {
        bail!(
            "{}: no [approvers.NAME] is configured, so nobody could sign in",
            config_path.display()
        );
    }
    let Some(listen) = listen.or(config.admin.as_ref().map(|a| a.listen)) else {
        bail!(
            "{}: give [admin] listen, or --listen",
            config_path.display()
        );
    };
    let admin = Arc::new(Admin::new(
        &config,
        Deployment::File(ConfigFile::open(config_path)?),
    ));
    let runtime = http::runtime()?;
    runtime.block_on(async {
        let socket = http::bind(listen).await?;
        admin.run(socket, shutdown_signal()).await
    })?;
    Ok(0)
}

/// How long a stopping Portcullis waits for its delivering audit sinks.
const AUDIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `serve` waits for its tasks when it stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often `serve` brings its servers' health up to date in the status
/// report.
const SERVERS_STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

/// The server to run: the command after `--` if given, else the configured
/// server named by `--server`, or the only configured server.
fn pick_server(
    config: &Config,
    name: Option<String>,
    command: Vec<String>,
) -> Result<(String, ServerCommand)> {
    let only = || {
        (config.servers.len() == 1)
            .then(|| config.servers.keys().next().cloned())
            .flatten()
    };
    if let Some((program, args)) = command.split_first() {
        let name = name.or_else(only).unwrap_or_else(|| "stdio".into());
        let env = match config.servers.get(&name) {
            Some(server) => server.resolved_env(base(config))?,
            None => Default::default(),
        };
        let server = ServerCommand {
            program: program.clone(),
            args: args.to_vec(),
            env,
        };
        return Ok((name, server));
    }
    let Some(name) = name.or_else(only) else {
        bail!(
            "{}: name the server with --server, or give its command after --",
            config.path.display()
        );
    };
    let server = config.servers.get(&name).with_context(|| {
        format!(
            "{}: no server named '{name}' in [servers]",
            config.path.display()
        )
    })?;
    let Some(program) = &server.command else {
        bail!(
            "{}: servers.{name} is a remote server; stdio mode needs a command",
            config.path.display()
        );
    };
    Ok((
        name,
        ServerCommand {
            program: program.clone(),
            args: server.args.clone(),
            env: server.resolved_env(base(config))?,
        },
    ))
}

/// The directory config-relative paths start from.
fn base(config: &Config) -> &std::path::Path {
    config.path.parent().unwrap_or(std::path::Path::new("."))
}
