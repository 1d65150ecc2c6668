//! `portcullis bench --config FILE --gateway --replicas N`: the deployment
//! as users run it, measured in one run — 1 to N `portcullis serve`
//! processes with the config's chain behind Debian's HAProxy (round robin),
//! sharing rate buckets in a `redis-server` of the bench's own, in front of
//! the in-process fast server; and one replica keeping its buckets in
//! memory, the baseline the shared state's cost is a ratio to. For each:
//! latency alternating with the server called directly, throughput with
//! concurrent sessions (whose requests alternate replicas: their ids are
//! sealed), and the CPU each replica, HAProxy and Redis spent per call —
//! the figure that predicts scaling on a machine with more cores.

use super::gateway::{KEY, Session, THROUGHPUT_RUN, bind, serve_fast, throughput};
use crate::identity::key_hash;
use crate::util::stats::{Stats, micros};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The session key every replica seals ids with.
const SESSION_KEY: &str = "portcullis-bench-session-key-0123456789abcdef";

/// One deployment measured.
struct Variant {
    replicas: usize,
    shared: bool,
}

impl Variant {
    fn label(&self) -> String {
        let state = if self.shared { "Redis" } else { "memory" };
        format!("{} replica(s), buckets in {state}", self.replicas)
    }
}

/// What one deployment gave.
struct Measured {
    gateway: Stats,
    direct: Stats,
    rate: f64,
    direct_rate: f64,
    /// CPU per call, µs: each replica's, summed; HAProxy's; Redis'.
    cpu_replicas: f64,
    cpu_balancer: f64,
    cpu_redis: f64,
}

/// Measures and prints every variant up to `replicas` replicas.
pub fn run(
    config: &Path,
    tool: &str,
    arguments: &Value,
    calls: usize,
    clients: usize,
    replicas: usize,
) -> Result<()> {
    for program in ["haproxy", "redis-server"] {
        which(program).with_context(|| {
            format!("--replicas runs Debian's {program}; install it (scripts/setup does)")
        })?;
    }
    let work = tempfile_dir()?;
    let runtime = crate::http::runtime()?;
    let result = runtime.block_on(async {
        let server = bind().await?;
        let server_url = format!("http://{}/mcp", server.local_addr()?);
        tokio::spawn(serve_fast(server, tool.to_string()));
        let redis = Redis::start(&work)?;
        let call = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": { "name": tool, "arguments": arguments } })
        .to_string();
        println!(
            "replicas: tools/call '{tool}' through 1..{replicas} portcullis serve processes behind \
             HAProxy (round robin), {calls} sequential calls alternating with the server directly, \
             then {clients} sessions for {}s",
            THROUGHPUT_RUN.as_secs()
        );
        let mut variants = vec![Variant {
            replicas: 1,
            shared: false,
        }];
        variants.extend((1..=replicas).map(|replicas| Variant {
            replicas,
            shared: true,
        }));
        let mut baseline = None;
        for variant in variants {
            let measured = measure(
                &variant,
                config,
                &work,
                &server_url,
                &redis,
                &call,
                calls,
                clients,
            )
            .await
            .with_context(|| variant.label())?;
            report(&variant, &measured, baseline.as_ref());
            if baseline.is_none() {
                baseline = Some(measured);
            }
        }
        drop(redis);
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    variant: &Variant,
    config: &Path,
    work: &Path,
    server_url: &str,
    redis: &Redis,
    call: &str,
    calls: usize,
    clients: usize,
) -> Result<Measured> {
    let mut replicas = Vec::new();
    for i in 0..variant.replicas {
        let redis = variant.shared.then_some(redis.url.as_str());
        replicas.push(Replica::start(config, work, i, server_url, redis)?);
    }
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let balancer = Balancer::start(work, &ports)?;
    let url = format!("http://127.0.0.1:{}/servers/fast/mcp", balancer.port);

    let direct = Session::open(server_url, None).await?;
    let proxied = Session::open(&url, Some(KEY)).await?;
    let (mut direct_samples, mut gateway_samples) = (Vec::new(), Vec::new());
    for i in 0..calls + calls / 10 {
        let (d, g) = (direct.time(call).await?, proxied.time(call).await?);
        if i >= calls / 10 {
            direct_samples.push(d);
            gateway_samples.push(g);
        }
    }
    let direct_rate = throughput(server_url, None, call, clients).await?;
    // The CPU each tier has used: the replicas together, HAProxy, Redis.
    let used = || -> Result<(Duration, Duration, Duration)> {
        let replicas: Result<Duration> = replicas.iter().map(|r| cpu(r.child.id())).sum();
        Ok((
            replicas?,
            cpu(balancer.process.0.id())?,
            cpu(redis.process.0.id())?,
        ))
    };
    let before = used()?;
    let started = Instant::now();
    let rate = throughput(&url, Some(KEY), call, clients).await?;
    let done = rate * started.elapsed().as_secs_f64();
    let after = used()?;
    let per_call = |from: Duration, to: Duration| (to - from).as_secs_f64() * 1e6 / done;
    let measured = Measured {
        gateway: Stats::of(&mut gateway_samples),
        direct: Stats::of(&mut direct_samples),
        rate,
        direct_rate,
        cpu_replicas: per_call(before.0, after.0),
        cpu_balancer: per_call(before.1, after.1),
        cpu_redis: per_call(before.2, after.2),
    };
    drop(balancer);
    drop(replicas);
    Ok(measured)
}

fn report(variant: &Variant, m: &Measured, baseline: Option<&Measured>) {
    println!("\n  {}:", variant.label());
    println!("{}", m.direct.line("direct"));
    println!("{}", m.gateway.line("through the balancer"));
    println!(
        "  added p50 {}, p99 {}  ({:.2}× direct at p50)",
        micros(m.gateway.p50.saturating_sub(m.direct.p50)),
        micros(m.gateway.p99.saturating_sub(m.direct.p99)),
        m.gateway.p50.as_secs_f64() / m.direct.p50.as_secs_f64()
    );
    println!(
        "  throughput {:.0} calls/s ({:.2}× direct's {:.0})",
        m.rate,
        m.rate / m.direct_rate,
        m.direct_rate
    );
    println!(
        "  CPU per call: replicas {:.0} µs, HAProxy {:.0} µs, Redis {:.0} µs",
        m.cpu_replicas, m.cpu_balancer, m.cpu_redis
    );
    if let Some(base) = baseline {
        println!(
            "  against 1 replica in memory: added p50 {:.2}×, throughput {:.2}×, replica CPU per call {:.2}×",
            (m.gateway.p50.saturating_sub(m.direct.p50)).as_secs_f64()
                / (base.gateway.p50.saturating_sub(base.direct.p50)).as_secs_f64(),
            m.rate / base.rate,
            m.cpu_replicas / base.cpu_replicas
        );
    }
}

/// A `portcullis serve` process with the chain of `config`, in front of
/// `server_url`.
struct Replica {
    child: Child,
    port: u16,
}

impl Replica {
    fn start(
        config: &Path,
        work: &Path,
        index: usize,
        server_url: &str,
        redis: Option<&str>,
    ) -> Result<Self> {
        let port = free_port()?;
        let path = work.join(format!("replica-{index}.toml"));
        let text = replica_config(config, port, index, server_url, redis)?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let log = std::fs::File::create(work.join(format!("replica-{index}.log")))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .arg("--audit-file")
            .arg(work.join(format!("replica-{index}.jsonl")))
            .env("PORTCULLIS_STATUS_DIR", work.join("status"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start a replica")?;
        let mut replica = Self { child, port };
        if let Err(e) = wait_healthy(port, &mut replica.child) {
            drop(replica);
            let log = std::fs::read_to_string(work.join(format!("replica-{index}.log")))
                .unwrap_or_default();
            bail!("{e}: {log}");
        }
        Ok(replica)
    }
}

/// A replica is stopped with SIGTERM, so that it drains and exits as in
/// production, whichever way the bench ends.
impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

/// The config a replica runs: the chain (and everything else) of `config`,
/// module paths made absolute, with the fast server, the bench's agent,
/// sealed sessions, this replica's port and name, one rate limit every call
/// passes (so every call takes a token) and, when given, buckets in Redis.
fn replica_config(
    config: &Path,
    port: u16,
    index: usize,
    server_url: &str,
    redis: Option<&str>,
) -> Result<String> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", config.display()))?;
    let base = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .canonicalize()?;
    if let Some(policies) = table.get_mut("policy").and_then(|p| p.as_array_mut()) {
        for policy in policies.iter_mut().filter_map(|p| p.as_table_mut()) {
            absolute(policy.get_mut("module"), &base);
            for fixture in policy
                .get_mut("fixtures")
                .and_then(|f| f.as_array_mut())
                .into_iter()
                .flatten()
            {
                absolute(Some(fixture), &base);
            }
        }
    }
    for taken in [
        "agent", "agents", "servers", "serve", "state", "admin", "audit",
    ] {
        table.remove(taken);
    }
    let mut added: toml::Table = toml::from_str(&format!(
        r#"
        [serve]
        listen = "127.0.0.1:{port}"
        session_keys = ["{SESSION_KEY}"]
        max_sessions_per_agent = 0
        max_connections = 4096

        [servers.fast]
        url = "{server_url}"

        [agents.bench-agent]
        api_key_sha256 = "{}"

        [[rate_limits]]
        servers = ["fast"]
        calls = 100000000
        per_secs = 1
        by = ["agent"]
        "#,
        key_hash(KEY)
    ))?;
    if let Some(redis) = redis {
        let state: toml::Table = toml::from_str(&format!(
            "redis = \"{redis}\"\nprefix = \"bench-{}\"\nreplica = \"replica-{index}\"",
            std::process::id()
        ))?;
        added.insert("state".into(), state.into());
    }
    if let Some(limits) = table.remove("rate_limits") {
        let mut all = limits.as_array().cloned().unwrap_or_default();
        all.extend(
            added
                .remove("rate_limits")
                .and_then(|l| l.as_array().cloned())
                .unwrap_or_default(),
        );
        added.insert("rate_limits".into(), all.into());
    }
    table.extend(added);
    Ok(toml::to_string(&table)?)
}

/// Makes the path `value` names absolute against `base`.
fn absolute(value: Option<&mut toml::Value>, base: &Path) {
    if let Some(toml::Value::String(path)) = value
        && !path.starts_with("oci://")
    {
        *path = base.join(&*path).display().to_string();
    }
}

/// A child process, killed when dropped, whichever way the bench ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy, round robin over `ports`.
struct Balancer {
    process: Process,
    port: u16,
}

impl Balancer {
    fn start(work: &Path, ports: &[u16]) -> Result<Self> {
        let port = free_port()?;
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p}\n"))
            .collect();
        let path = work.join("haproxy.cfg");
        std::fs::write(
            &path,
            format!(
                "global\n    maxconn 8192\ndefaults\n    mode http\n    timeout connect 5s\n    \
                 timeout client 60s\n    timeout server 60s\nfrontend mcp\n    bind 127.0.0.1:{port}\n    \
                 default_backend replicas\nbackend replicas\n    balance roundrobin\n{servers}"
            ),
        )?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start haproxy")?;
        let mut process = Process(child);
        wait_listening(port, &mut process.0).context("haproxy did not start")?;
        Ok(Self { process, port })
    }
}

/// `redis-server` on a loopback port, keeping nothing on disk.
struct Redis {
    process: Process,
    url: String,
}

impl Redis {
    fn start(work: &Path) -> Result<Self> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        let mut process = Process(child);
        wait_listening(port, &mut process.0).context("redis-server did not start")?;
        Ok(Self {
            process,
            url: format!("redis://127.0.0.1:{port}/0"),
        })
    }
}

/// The CPU time process `pid` has used, user and system.
fn cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read process {pid}'s CPU time"))?;
    let after_name = &stat[stat.rfind(')').context("a /proc stat line")? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn wait_healthy(port: u16, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the replica exited ({status})");
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let asked =
                stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            if asked.is_ok()
                && stream.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the replica did not become healthy in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_listening(port: u16, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("it exited ({status})");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    let socket = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding a local port")?;
    Ok(socket.local_addr()?.port())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// A new folder of the bench's own for configs, logs and trails (made
/// here, so nobody else's).
fn tempfile_dir() -> Result<PathBuf> {
    let suffix: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!("portcullis-bench-replicas-{suffix:016x}"));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
