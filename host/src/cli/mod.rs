//! The `portcullis` command line: parses arguments and hands each
//! subcommand to its module here (one file per subcommand, or per family
//! of them), which wires the library's parts together. No policy or
//! protocol logic lives in this folder.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod bench;
pub mod check;
pub mod pin;
pub mod policy;
pub mod replay;
pub mod scaffold;
pub mod serve;
pub mod stdio;

use crate::runtime::status::{self};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

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
        action: crate::cli::approvals::Action,
    },
    /// Read the audit trail: verify its chain, tail it, query it.
    Audit {
        #[command(subcommand)]
        action: crate::cli::audit::Action,
    },
    /// Share policy modules through OCI registries: keygen, push, sign,
    /// verify, pull, inspect.
    Policy {
        #[command(subcommand)]
        action: crate::cli::policy::Action,
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
        /// Report which of the policy's rules the cases exercised, and name
        /// those none did (the rego, cedar and cel components report it).
        #[arg(long)]
        coverage: bool,
        /// The policy's settings, as JSON.
        #[arg(long, default_value = "{}")]
        settings: String,
        /// A settings key whose value is a file's text, as KEY=PATH (as
        /// `settings_files` in the config); a key given several files, or
        /// written KEY[]=PATH, gets a table of their texts by file name.
        #[arg(long = "settings-file", value_name = "KEY=PATH")]
        settings_files: Vec<String>,
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
        /// A settings key whose value is a file's text, as KEY=PATH (as
        /// `settings_files` in the config); a key given several files, or
        /// written KEY[]=PATH, gets a table of their texts by file name.
        #[arg(long = "settings-file", value_name = "KEY=PATH")]
        settings_files: Vec<String>,
    },
    /// Scaffold a policy project that builds and passes its own sample
    /// fixtures out of the box.
    New {
        /// The policy's name (lowercase letters, digits and '-').
        name: String,
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: crate::cli::scaffold::Language,
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
    Bench(crate::cli::bench::BenchArgs),
    /// Re-judge the messages recorded in audit trails with another config's
    /// policies, and report which decisions would change (nothing is sent
    /// anywhere).
    Replay(crate::cli::replay::ReplayArgs),
}

pub fn main() -> ! {
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
                crate::admin::serve_metrics(addr)?;
            }
            stdio::command(config, audit_file, server, command)
        }
        Commands::Serve { config, audit_file } => serve::command(config, audit_file),
        Commands::Admin { config, listen } => admin::command(&config, listen),
        Commands::Check { config } => Ok(crate::cli::check::run(&config)),
        Commands::Policy { action } => crate::cli::policy::run(&action),
        Commands::Audit { action } => crate::cli::audit::run(&action),
        Commands::Approvals {
            config,
            approver,
            action,
        } => {
            let config = config.context("--config names the config whose approvals to act on")?;
            crate::cli::approvals::run(&config, approver.as_deref(), &action)
        }
        Commands::Pin {
            config,
            server,
            check,
        } => crate::cli::pin::run(&config, server.as_deref(), check),
        Commands::Status { json } => status::print(json).map(|()| 0),
        Commands::Test {
            module,
            fixtures,
            coverage,
            settings,
            settings_files,
        } => {
            let settings = policy_settings(&settings, &settings_files)?;
            crate::policy::fixtures::test(&module, settings, &fixtures, coverage)
        }
        Commands::Eval {
            module,
            message,
            settings,
            settings_files,
        } => {
            let settings = policy_settings(&settings, &settings_files)?;
            crate::policy::fixtures::eval(&module, settings, &message)
        }
        Commands::New { name, lang, dir } => {
            crate::cli::scaffold::run(&name, lang, dir.as_deref()).map(|()| 0)
        }
        Commands::Bench(args) => crate::cli::bench::run(&args).map(|()| 0),
        Commands::Replay(args) => crate::cli::replay::run(&args),
    }
}

/// A standalone policy's settings: `--settings` JSON with the texts of
/// each `--settings-file KEY=PATH` put in.
fn policy_settings(json: &str, files: &[String]) -> Result<serde_json::Value> {
    let mut settings: serde_json::Value =
        serde_json::from_str(json).context("--settings is not JSON")?;
    let mut named: std::collections::BTreeMap<&str, (bool, Vec<PathBuf>)> = Default::default();
    for file in files {
        let (key, path) = file
            .split_once('=')
            .with_context(|| format!("--settings-file {file}: write it as KEY=PATH"))?;
        let (key, table) = match key.strip_suffix("[]") {
            Some(key) => (key, true),
            None => (key, false),
        };
        let entry = named.entry(key).or_default();
        entry.0 |= table;
        entry.1.push(PathBuf::from(path));
    }
    for (key, (table, mut paths)) in named {
        let files = match (table, paths.len()) {
            (false, 1) => crate::config::SettingsFiles::One(paths.remove(0)),
            _ => crate::config::SettingsFiles::Many(paths),
        };
        let value = files
            .read()
            .with_context(|| format!("--settings-file {key}"))?;
        let table = settings
            .as_object_mut()
            .context("--settings must be a JSON object")?;
        if table.insert(key.to_string(), value).is_some() {
            bail!("--settings-file {key}: --settings has a {key} already");
        }
    }
    Ok(settings)
}

/// The policy engine and shared state `config` sets up: with `[state]
/// redis`, the policies' store is the deployment's, and so are the rate
/// buckets of the [`Current`](crate::relay::generation::Current) built with
/// the state returned.
fn engine_and_state(
    config: &crate::config::Config,
) -> Result<(
    std::sync::Arc<crate::policy::engine::PolicyEngine>,
    Option<std::sync::Arc<crate::state::Shared>>,
)> {
    use std::sync::Arc;
    let shared = crate::state::Shared::open(config)?.map(Arc::new);
    let engine = crate::policy::engine::PolicyEngine::new(&config.engine)?;
    let engine = match &shared {
        Some(shared) => engine.with_store(Arc::new(crate::policy::kv::SharedStore(shared.clone()))),
        None => engine,
    };
    Ok((Arc::new(engine), shared))
}

/// How long a stopping Portcullis waits for its delivering audit sinks.
const AUDIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

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
