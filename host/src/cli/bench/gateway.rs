//! `portcullis bench --config FILE --gateway`: `tools/call` through
//! `portcullis serve` (the config's policy chain, one agent, one remote
//! server) against the same server called directly, in one run — latency
//! percentiles from alternating sequential calls, and throughput with
//! concurrent sessions. The server is an in-process Streamable HTTP MCP
//! server that answers at once, so the difference is Portcullis' own cost.

use crate::config::{AgentEntry, ServerConfig};
use crate::gateway::Gateway;
use crate::gateway::http::Listener;
use crate::http;
use crate::identity::key_hash;
use crate::relay::generation::{Current, Generation};
use crate::upstream;
use crate::util::stats::{Stats, micros};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const KEY: &str = "bench-agent-key";
/// How long each throughput measurement runs.
pub(super) const THROUGHPUT_RUN: Duration = Duration::from_secs(3);

/// Measures and prints: `calls` sequential calls per path, then throughput
/// with `clients` concurrent sessions per path.
pub fn run(
    config: &Path,
    tool: &str,
    arguments: &Value,
    calls: usize,
    clients: usize,
) -> Result<()> {
    let runtime = crate::http::runtime()?;
    runtime.block_on(measure(config, tool, arguments, calls, clients))
}

/// An in-process fast server and `portcullis serve` in front of it.
pub(super) struct Started {
    /// The server, called directly.
    pub server_url: String,
    /// The server through the gateway.
    pub gateway_url: String,
    /// The generation in charge of the gateway.
    pub current: Arc<Current>,
    /// The gateway.
    pub gateway: Arc<Gateway>,
}

/// Starts the fast server offering `tool`, and the gateway in front of it
/// with the chain and audit sinks of the config at `config_path` and one
/// agent (key [`KEY`]).
pub(super) async fn start(config_path: &Path, tool: &str) -> Result<Started> {
    let server = bind().await?;
    let server_url = format!("http://{}/mcp", server.local_addr()?);
    tokio::spawn(serve_fast(server, tool.to_string()));

    let (engine, shared) =
        crate::cli::engine_and_state(&crate::config::Config::load(config_path)?)?;
    let mut generation = Generation::load(&engine, config_path, None, 1, None)?;
    let remote = ServerConfig {
        command: None,
        url: Some(server_url.clone()),
        headers: BTreeMap::new(),
        args: Vec::new(),
        env: BTreeMap::new(),
        prefix: None,
        isolation: Default::default(),
    };
    let agent = AgentEntry {
        api_key_sha256: Some(key_hash(KEY)),
        servers: vec!["*".into()],
        attributes: BTreeMap::new(),
    };
    generation.config.servers = BTreeMap::from([("fast".to_string(), remote)]);
    generation.config.agents = BTreeMap::from([("bench-agent".to_string(), agent)]);
    let current = Arc::new(Current::shared(generation, shared));
    let generation = current.get();
    let names: Vec<&str> = generation
        .config
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    println!(
        "gateway: tools/call '{tool}' through portcullis serve with [{}], against the same server directly",
        names.join(", ")
    );
    let plans = upstream::plans(&generation.config, None)?;
    let runtime = tokio::runtime::Handle::current();
    let gateway = Arc::new(Gateway::new(
        &generation.config,
        current.clone(),
        plans,
        &runtime,
    )?);
    let socket = bind().await?;
    let gateway_url = format!("http://{}/servers/fast/mcp", socket.local_addr()?);
    let guard = http::Guard::of(&generation.config.serve);
    let listener = Arc::new(Listener::new(gateway.clone(), current.clone()));
    tokio::spawn(crate::gateway::http::run(
        listener,
        socket,
        guard,
        std::future::pending(),
    ));
    Ok(Started {
        server_url,
        gateway_url,
        current,
        gateway,
    })
}

async fn measure(
    config_path: &Path,
    tool: &str,
    arguments: &Value,
    calls: usize,
    clients: usize,
) -> Result<()> {
    let Started {
        server_url,
        gateway_url,
        ..
    } = start(config_path, tool).await?;

    let call = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": { "name": tool, "arguments": arguments } })
    .to_string();
    let direct = Session::open(&server_url, None).await?;
    let proxied = Session::open(&gateway_url, Some(KEY)).await?;
    // Alternate the two so that drift in the machine's load hits both alike.
    let (mut direct_samples, mut proxied_samples) = (Vec::new(), Vec::new());
    for i in 0..calls + calls / 10 {
        let (d, p) = (direct.time(&call).await?, proxied.time(&call).await?);
        if i >= calls / 10 {
            direct_samples.push(d);
            proxied_samples.push(p);
        }
    }
    let (d, p) = (
        Stats::of(&mut direct_samples),
        Stats::of(&mut proxied_samples),
    );
    println!("  {calls} sequential calls each, alternating:");
    println!("{}", d.line("direct"));
    println!("{}", p.line("through the gateway"));
    println!(
        "  added p50              {}  ({:.2}× direct)",
        micros(p.p50.saturating_sub(d.p50)),
        p.p50.as_secs_f64() / d.p50.as_secs_f64()
    );
    let direct_rate = throughput(&server_url, None, &call, clients).await?;
    let proxied_rate = throughput(&gateway_url, Some(KEY), &call, clients).await?;
    println!(
        "  throughput, {clients} concurrent sessions, {}s each: direct {direct_rate:.0} calls/s, \
         through the gateway {proxied_rate:.0} calls/s ({:.2}× direct)",
        THROUGHPUT_RUN.as_secs(),
        proxied_rate / direct_rate
    );
    Ok(())
}

pub(super) async fn bind() -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("binding a local port")
}

/// Calls per second with `clients` sessions calling back to back.
pub(super) async fn throughput(
    url: &str,
    key: Option<&str>,
    call: &str,
    clients: usize,
) -> Result<f64> {
    let mut sessions = Vec::new();
    for _ in 0..clients {
        sessions.push(Session::open(url, key).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|session| {
            let call = call.to_string();
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < THROUGHPUT_RUN {
                    session.time(&call).await?;
                    done += 1;
                }
                Ok::<_, anyhow::Error>(done)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// One MCP session over Streamable HTTP, as a bench client.
pub(super) struct Session {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    key: Option<String>,
    session: Option<String>,
}

impl Session {
    pub(super) async fn open(url: &str, key: Option<&str>) -> Result<Self> {
        let mut session = Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url: url.to_string(),
            key: key.map(str::to_string),
            session: None,
        };
        let initialize = json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "portcullis-bench", "version": "1" } } });
        let response = session.post(&initialize.to_string()).await?;
        session.session = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The tool's annotations reach the policies through tools/list.
        let list = r#"{"jsonrpc":"2.0","id":0,"method":"tools/list"}"#;
        session.post(list).await?.into_body().collect().await?;
        Ok(session)
    }

    async fn post(&self, body: &str) -> Result<Response<Incoming>> {
        let mut request = Request::post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        let response = self
            .client
            .request(request.body(Full::new(Bytes::from(body.to_string())))?)
            .await?;
        if !response.status().is_success() {
            bail!("{} answered HTTP {}", self.url, response.status());
        }
        Ok(response)
    }

    /// Ends the session (DELETE).
    pub(super) async fn end(&self) -> Result<()> {
        let mut request = Request::delete(&self.url);
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        let response = self
            .client
            .request(request.body(Full::new(Bytes::new()))?)
            .await?;
        if !response.status().is_success() {
            bail!("ending the session answered HTTP {}", response.status());
        }
        Ok(())
    }

    /// One call and its answer, timed; an error answer fails the bench.
    pub(super) async fn time(&self, call: &str) -> Result<Duration> {
        let started = Instant::now();
        let body = self
            .post(call)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        let took = started.elapsed();
        let answer: Value = serde_json::from_slice(&body)?;
        if answer.get("result").is_none() {
            bail!("the call was not answered with a result: {answer}");
        }
        Ok(took)
    }
}

/// A Streamable HTTP MCP server that answers at once: one read-only tool.
pub(super) async fn serve_fast(socket: tokio::net::TcpListener, tool: String) {
    let tool = Arc::new(tool);
    while let Ok((stream, _)) = socket.accept().await {
        let tool = tool.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let tool = tool.clone();
                async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(fast_answer(&body, &tool))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn fast_answer(body: &[u8], tool: &str) -> Response<Full<Bytes>> {
    let message: Value = serde_json::from_slice(body).unwrap_or_default();
    let result = match message["method"].as_str() {
        _ if message.get("id").is_none() => None,
        Some("initialize") => Some(json!({ "protocolVersion": "2025-06-18",
            "capabilities": { "tools": {} }, "serverInfo": { "name": "fast", "version": "1" } })),
        Some("tools/list") => Some(
            json!({ "tools": [{ "name": tool, "inputSchema": { "type": "object" },
            "annotations": { "readOnlyHint": true } }] }),
        ),
        _ => Some(json!({ "content": [{ "type": "text", "text": "ok" }] })),
    };
    let mut response = match result {
        Some(result) => {
            let answer = json!({ "jsonrpc": "2.0", "id": message["id"], "result": result });
            Response::new(Full::new(Bytes::from(answer.to_string())))
        }
        None => {
            let mut empty = Response::new(Full::new(Bytes::new()));
            *empty.status_mut() = hyper::StatusCode::ACCEPTED;
            empty
        }
    };
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().expect("valid"));
    headers.insert("mcp-session-id", "fast".parse().expect("valid"));
    response
}
