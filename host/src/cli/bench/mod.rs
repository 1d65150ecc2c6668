//! `portcullis bench`: measures what Portcullis adds to a call, in one run —
//! the policy chain on one `tools/call` with fresh and with reused instances,
//! and the stdio relay's round trip against the same server spoken to
//! directly, or ([`gateway`]) `portcullis serve` against the same HTTP server,
//! or ([`replicas`]) several `serve` processes behind a balancer — and prints
//! medians, percentiles and ratios; and ([`soak`]) a long run through `serve`
//! that must leave memory flat and the trail verifiable.

mod audit;
mod evaluators;
mod gateway;
mod replicas;
mod soak;

use crate::config::{Config, EngineConfig, InstanceMode};
use crate::contract::{Agent, Direction, Exchange, MessageKind, ToolAnnotations};
use crate::policy::chain::{Decided, Guard};
use crate::policy::engine::PolicyEngine;
use crate::policy::fixtures::time_calls;
use crate::policy::fixtures::{self};
use crate::policy::module::Hook;
use crate::protocol::framing::Frame;
use crate::relay::Relay;
use crate::relay::generation::{Current, Generation};
use crate::relay::session::Session;
use crate::runtime::reload::Reloader;
use crate::runtime::status::Status;
use crate::util::stats::{Stats, micros};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `portcullis bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A policy module to measure on its own, per call, on fresh and on
    /// reused instances (with `--message`).
    policy: Option<PathBuf>,
    /// For a policy module: the message, an exchange written as in a fixture.
    #[arg(long, requires = "policy")]
    message: Option<PathBuf>,
    /// For a policy module: its settings, as JSON.
    #[arg(long, default_value = "{}")]
    settings: String,
    /// Config whose policy chain is measured (and used for the relay).
    #[arg(long, required_unless_present_any = ["reload", "policy", "audit", "evaluators"])]
    config: Option<PathBuf>,
    /// Two policy modules, given twice: one that allows the sample call and
    /// one that refuses it. Measures the time from writing a module to the
    /// first verdict by the new version, alternating between the two.
    #[arg(long, num_args = 1, value_name = "MODULE")]
    reload: Vec<PathBuf>,
    /// How many reloads to time.
    #[arg(long, default_value_t = 40)]
    reloads: usize,
    /// Chain evaluations per instance mode.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Round trips per relay measurement.
    #[arg(long, default_value_t = 2_000)]
    calls: usize,
    /// Tool named in the sample `tools/call`.
    #[arg(long, default_value = "read_text_file")]
    tool: String,
    /// Arguments of the sample call, as JSON.
    #[arg(long, default_value = "{}")]
    arguments: String,
    /// Measure `portcullis serve` with the config's chain in front of an
    /// in-process HTTP MCP server, against that server called directly.
    #[arg(long, requires = "config")]
    gateway: bool,
    /// With `--gateway`: also measure 1 to this many `portcullis serve`
    /// processes behind HAProxy (round robin) sharing rate buckets in
    /// Redis, against one keeping them in memory (needs Debian's haproxy
    /// and redis-server).
    #[arg(long, requires = "gateway", value_name = "N")]
    replicas: Option<usize>,
    /// With `--gateway` or `--soak`: concurrent sessions.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// A soak run of this many calls through `portcullis serve` with the
    /// config's chain and audit sinks (one must be a chained file):
    /// resident memory after the warm-up and at the end, errors, and
    /// whether the trail verifies.
    #[arg(long, requires = "config", value_name = "CALLS")]
    soak: Option<u64>,
    /// Measure what auditing costs per record (file sink, plain and
    /// chained) and the records per second it sustains.
    #[arg(long)]
    audit: bool,
    /// Measure the Rego, Cedar and CEL evaluator components on the examples
    /// in this directory against the same crates evaluating natively (in a
    /// build with the `native-evaluators` feature) and the Rust reference
    /// policy.
    #[arg(long, value_name = "DIR")]
    evaluators: Option<PathBuf>,
    /// With `--evaluators`: the Rust reference policy's module.
    #[arg(
        long,
        requires = "evaluators",
        default_value = "examples/policies/rust/dist/policy.wasm"
    )]
    reference: PathBuf,
    /// With `--audit`: records per variant.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// An MCP server command: when given, the relay is measured against it.
    #[arg(last = true)]
    server: Vec<String>,
}

/// Runs every measurement the arguments ask for and prints the results.
pub fn run(args: &BenchArgs) -> Result<()> {
    let arguments: serde_json::Value =
        serde_json::from_str(&args.arguments).context("--arguments is not JSON")?;
    let params = serde_json::json!({ "name": args.tool, "arguments": arguments }).to_string();
    if let Some(module) = &args.policy {
        let message = args
            .message
            .as_deref()
            .context("--message names the message to judge")?;
        let settings = serde_json::from_str(&args.settings).context("--settings is not JSON")?;
        policy_cost(module, message, &settings, args.iterations)?;
    }
    if args.audit {
        audit::run(args.records)?;
    }
    if let Some(dir) = &args.evaluators {
        evaluators::run(dir, &args.reference, args.iterations)?;
    }
    if !args.reload.is_empty() {
        let [allows, refuses] = args.reload.as_slice() else {
            bail!("--reload takes two modules: one allowing the sample call, one refusing it");
        };
        reload_latency(allows, refuses, &params, args.reloads)?;
    }
    let Some(config_path) = &args.config else {
        return Ok(());
    };
    if let Some(calls) = args.soak {
        return soak::run(config_path, &args.tool, &arguments, calls, args.clients);
    }
    if let Some(replicas) = args.replicas {
        return replicas::run(
            config_path,
            &args.tool,
            &arguments,
            args.calls,
            args.clients,
            replicas,
        );
    }
    if args.gateway {
        return gateway::run(
            config_path,
            &args.tool,
            &arguments,
            args.calls,
            args.clients,
        );
    }
    let config = Config::load(config_path)?;
    let names: Vec<&str> = config.policies.iter().map(|p| p.name.as_str()).collect();
    println!(
        "policy chain [{}] on tools/call '{}', {} evaluations per mode",
        names.join(", "),
        args.tool,
        args.iterations
    );
    let fresh = chain(
        config_path,
        InstanceMode::Fresh,
        &args.tool,
        &params,
        args.iterations,
    )?;
    let reused = chain(
        config_path,
        InstanceMode::Reuse,
        &args.tool,
        &params,
        args.iterations,
    )?;
    println!("{}", fresh.line("fresh instances"));
    println!("{}", reused.line("reused instances"));
    println!(
        "  reused / fresh p50     {:.2}×",
        reused.p50.as_secs_f64() / fresh.p50.as_secs_f64()
    );
    if args.server.is_empty() {
        return Ok(());
    }
    let call = format!(r#"{{"jsonrpc":"2.0","id":ID,"method":"tools/call","params":{params}}}"#);
    println!(
        "\nrelay round trip, {} calls of '{}' to `{}`",
        args.calls,
        args.tool,
        args.server.join(" ")
    );
    let audit = std::env::temp_dir().join(format!("portcullis-bench-{}.jsonl", std::process::id()));
    let mut proxied_cmd = vec![
        std::env::current_exe()?.display().to_string(),
        "stdio".into(),
        "--config".into(),
        config_path.display().to_string(),
        "--audit-file".into(),
        audit.display().to_string(),
        "--".into(),
    ];
    proxied_cmd.extend(args.server.iter().cloned());
    let mut direct = McpClient::start(&args.server)?;
    let mut proxied = McpClient::start(&proxied_cmd)?;
    // Alternate the two so that drift in the machine's load hits both alike.
    let (mut direct_samples, mut proxied_samples) = (Vec::new(), Vec::new());
    let warmup = args.calls / 10;
    for id in 1..=warmup + args.calls {
        let line = call.replace("ID", &id.to_string());
        let (d, p) = (direct.call(id, &line)?, proxied.call(id, &line)?);
        if id > warmup {
            direct_samples.push(d);
            proxied_samples.push(p);
        }
    }
    direct.stop()?;
    proxied.stop()?;
    let _ = std::fs::remove_file(&audit);
    let (direct, proxied) = (
        Stats::of(&mut direct_samples),
        Stats::of(&mut proxied_samples),
    );
    println!("{}", direct.line("direct"));
    println!("{}", proxied.line("through portcullis"));
    println!(
        "  added p50              {}  ({:.2}× direct)",
        micros(proxied.p50.saturating_sub(direct.p50)),
        proxied.p50.as_secs_f64() / direct.p50.as_secs_f64()
    );
    Ok(())
}

/// Times one policy module judging `message`, per call, on a fresh instance
/// each time and on a reused one.
fn policy_cost(
    module: &Path,
    message: &Path,
    settings: &serde_json::Value,
    iterations: usize,
) -> Result<()> {
    let sample = fixtures::read_exchange(message)?;
    let hook = Hook::for_direction(sample.exchange.direction);
    let engine = PolicyEngine::new(&EngineConfig::default())?;
    println!(
        "policy {} on {}, {iterations} calls per mode",
        module.display(),
        message.display()
    );
    for (label, mode) in [
        ("fresh instances", InstanceMode::Fresh),
        ("reused instances", InstanceMode::Reuse),
    ] {
        let policy = fixtures::standalone(&engine, module, settings, mode)?;
        if let Err(failure) = policy
            .evaluate(hook, &sample.exchange, &sample.drift)
            .result
        {
            bail!("the policy {failure}");
        }
        let mut samples = time_calls(&policy, hook, &sample, iterations);
        println!("{}", Stats::of(&mut samples).line(label));
    }
    println!();
    Ok(())
}

/// Times hot reloads in process: a watched module is rewritten, alternately
/// with `allows` and `refuses`, and a sample call is judged in a loop until
/// the new version answers. Also compares the latency of those calls (made
/// while a reload is under way) with calls made while nothing reloads.
fn reload_latency(allows: &Path, refuses: &Path, params: &str, rounds: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("portcullis-reload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let module = dir.join("policy.wasm");
    std::fs::copy(allows, &module)?;
    let config = dir.join("bench.toml");
    let text = "[engine]\ncache_dir = \"cache\"\n[[policy]]\nname = \"policy\"\nmodule = \"policy.wasm\"\n";
    std::fs::write(&config, text)?;
    let engine = Arc::new(PolicyEngine::new(&Config::load(&config)?.engine)?);
    let generation = Generation::load(&engine, &config, None, 1, None)?;
    let agent = Agent {
        id: "bench-agent".into(),
        attributes: vec![],
    };
    let current = Arc::new(Current::new(generation));
    let relay = Relay::new(current.clone(), Session::new("bench".into(), agent));
    Arc::new(Reloader::new(engine, current, config, None, "bench")).start()?;
    let call = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#);
    let allowed = || {
        let started = Instant::now();
        let delivery = relay.handle(
            Direction::ClientToServer,
            Frame::Line(call.clone().into_bytes()),
        );
        (delivery.forward.is_some(), started.elapsed())
    };
    // Calls are paced alike while idle and while reloading, so caches and
    // scheduling treat both the same.
    let pause = Duration::from_micros(100);
    let mut idle = Vec::new();
    for _ in 0..2_000 {
        idle.push(allowed().1);
        std::thread::sleep(pause);
    }
    let (mut latencies, mut during) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (source, want) = if round % 2 == 0 {
            (refuses, false)
        } else {
            (allows, true)
        };
        let written = Instant::now();
        std::fs::write(&module, std::fs::read(source)?)?;
        loop {
            let (verdict, took) = allowed();
            during.push(took);
            if verdict == want {
                break;
            }
            if written.elapsed() > Duration::from_secs(10) {
                bail!(
                    "no new verdict 10 s after writing {}: do the two modules judge the sample call differently?",
                    source.display()
                );
            }
            std::thread::sleep(pause);
        }
        latencies.push(written.elapsed());
    }
    Status::withdraw(std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    let max = latencies.iter().copied().max().unwrap_or_default();
    let reload = Stats::of(&mut latencies);
    println!("hot reload: write to first verdict by the new version, {rounds} reloads");
    println!(
        "{}  max {:>9}",
        reload.line("write → new verdict"),
        micros(max)
    );
    println!("{}", Stats::of(&mut idle).line("calls, no reload"));
    println!("{}\n", Stats::of(&mut during).line("calls during reloads"));
    Ok(())
}

/// Times `guard.decide` on a sample call with every policy in `mode`.
fn chain(
    path: &std::path::Path,
    mode: InstanceMode,
    tool: &str,
    params: &str,
    iterations: usize,
) -> Result<Stats> {
    let mut config = Config::load(path)?;
    for policy in &mut config.policies {
        policy.instances = mode;
    }
    let engine = PolicyEngine::new(&config.engine)?;
    let guard = Guard::load(&engine, &config)?;
    let sample = Exchange {
        direction: Direction::ClientToServer,
        kind: MessageKind::Request,
        server: "bench".into(),
        agent: Agent {
            id: "bench-agent".into(),
            attributes: vec![],
        },
        method: "tools/call".into(),
        tool: Some(tool.into()),
        annotations: Some(ToolAnnotations {
            title: None,
            read_only_hint: Some(true),
            destructive_hint: Some(false),
            idempotent_hint: None,
            open_world_hint: None,
        }),
        params: Some(params.into()),
        result: None,
    };
    let verdict = guard.decide(&mut sample.clone(), &[]);
    if let Decided::Deny(refusal) = &verdict.outcome {
        bail!(
            "the chain denies the sample call, so it measures nothing useful: {}",
            refusal.message()
        );
    }
    let warmup = iterations / 10;
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let mut exchange = sample.clone();
        let started = Instant::now();
        let decision = guard.decide(&mut exchange, &[]);
        let elapsed = started.elapsed();
        std::hint::black_box(decision);
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    Ok(Stats::of(&mut samples))
}

/// A minimal MCP client over a child's stdio, for timing round trips.
struct McpClient {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl McpClient {
    /// Starts `command` and initializes it; like a real client it lists the
    /// tools (and so their annotations) before calling any.
    fn start(command: &[String]) -> Result<Self> {
        let (program, args) = command.split_first().context("empty server command")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let input = child.stdin.take().context("no stdin")?;
        let output = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut client = Self {
            child,
            input,
            output,
        };
        let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"portcullis-bench","version":"0"}}}"#;
        client.call(0, init)?;
        writeln!(
            client.input,
            r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#
        )?;
        client.call(0, r#"{"jsonrpc":"2.0","id":0,"method":"tools/list"}"#)?;
        Ok(client)
    }

    /// Sends one request and waits for the answer with its id.
    fn call(&mut self, id: usize, line: &str) -> Result<Duration> {
        let started = Instant::now();
        writeln!(self.input, "{line}")?;
        self.input.flush()?;
        let mut answer = String::new();
        loop {
            answer.clear();
            if self.output.read_line(&mut answer)? == 0 {
                bail!("the server closed its output");
            }
            let message: serde_json::Value = serde_json::from_str(&answer)?;
            if message.get("id").and_then(serde_json::Value::as_u64) != Some(id as u64) {
                continue;
            }
            if let Some(error) = message.get("error") {
                bail!("request {id} was refused, so there is nothing to time: {error}");
            }
            return Ok(started.elapsed());
        }
    }

    /// Closes the server's stdin and waits for it to exit.
    fn stop(self) -> Result<()> {
        let Self {
            mut child, input, ..
        } = self;
        drop(input);
        child.wait()?;
        Ok(())
    }
}
