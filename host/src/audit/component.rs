//! The WebAssembly sink transport: a delivering sink whose batches go to a
//! component written against `wit/sink` (world `sink`) — a team's adapter
//! for its own SIEM, in any language. The component reaches the outside
//! world only through `outbound.send`: HTTP(S) requests to the hosts its
//! config grants (`allow_hosts`). WASI gives it clocks and random numbers,
//! and no files, environment, sockets or stdin. Each call runs on a fuel
//! budget and the instance under a memory limit; an instance that traps is
//! replaced by a fresh one, configured again, for the next attempt.

mod bindings {
    wasmtime::component::bindgen!({ path: "../wit/sink", world: "sink" });
}

use super::delivery::Transport;
use crate::util::outbound::{self, HttpClient};
use anyhow::{Context, Result, anyhow, bail};
use bindings::portcullis::sink::outbound::{Request, Response};
use hyper::http::uri::Authority;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Fuel (about one unit per wasm instruction) for `configure`.
const CONFIGURE_FUEL: u64 = 1_000_000_000;
/// Fuel for a `deliver` call: this much, plus [`FUEL_PER_RECORD`] per
/// record — room for any honest encoding, a bound on a loop.
const DELIVER_FUEL: u64 = 1_000_000_000;
/// Fuel per record of a batch.
const FUEL_PER_RECORD: u64 = 10_000_000;
/// How long one outbound request may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a call's stderr kept to explain its failure: the end of it.
const MAX_STDERR: usize = 4096;

/// What a sink component is and may do.
#[derive(Debug, Clone)]
pub struct ComponentOptions {
    /// The component file.
    pub module: PathBuf,
    /// For a registry module: the digest (`sha256:…`) its bytes must have,
    /// checked on the bytes compiled.
    pub digest: Option<String>,
    /// The hosts it may send requests to (`host` or `host:port`).
    pub allow_hosts: Vec<String>,
    /// Its settings, references resolved.
    pub settings: Vec<(String, String)>,
    /// The most memory it may use, in bytes.
    pub max_memory: usize,
}

/// A sink component, compiled, with its live instance.
pub struct ComponentSink {
    pre: bindings::SinkPre<SinkState>,
    options: ComponentOptions,
    live: Option<Live>,
}

/// A configured instance.
struct Live {
    store: Store<SinkState>,
    sink: bindings::Sink,
}

/// The engine sink components run on: fuel-metered, instances allocated on
/// demand (a few per process).
fn engine() -> Result<&'static wasmtime::Engine> {
    static ENGINE: OnceLock<Result<wasmtime::Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.wasm_component_model(true).consume_fuel(true);
            wasmtime::Engine::new(&config).map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("cannot configure the sink engine: {e}"))
}

impl ComponentSink {
    /// Compiles the component at `options.module`, links it, and starts and
    /// configures an instance, so a bad module or settings fail now.
    pub fn load(options: ComponentOptions) -> Result<Self> {
        let engine = engine()?;
        let wasm = std::fs::read(&options.module).context("cannot read the module")?;
        if let Some(expected) = &options.digest {
            let actual = crate::audit::bytes_digest(&wasm);
            if expected.strip_prefix("sha256:") != Some(actual.as_str()) {
                bail!("it changed in the cache after it was verified (expected {expected})");
            }
        }
        let component = Component::new(engine, &wasm)
            .map_err(|e| anyhow!("it is not a valid component: {e:#}"))?;
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI")?;
        bindings::Sink::add_to_linker::<_, HasSelf<SinkState>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("cannot link the sink imports")?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("it needs imports Portcullis does not give sinks: {e:#}"))?;
        let pre = bindings::SinkPre::new(pre)
            .map_err(|e| anyhow!("it does not export portcullis:sink/deliver@0.1.0: {e:#}"))?;
        let mut sink = Self {
            pre,
            options,
            live: None,
        };
        sink.live()?;
        Ok(sink)
    }

    /// The configured instance, started if there is none.
    fn live(&mut self) -> Result<&mut Live> {
        if self.live.is_none() {
            self.live = Some(self.start()?);
        }
        Ok(self.live.as_mut().expect("just started"))
    }

    /// A new instance, configured.
    fn start(&self) -> Result<Live> {
        let mut store = Store::new(engine()?, SinkState::new(&self.options));
        store.limiter(|state| &mut state.limits);
        store.set_fuel(CONFIGURE_FUEL)?;
        let sink = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| anyhow!("the sink component cannot start: {e:#}"))?;
        let settings = &self.options.settings;
        match sink
            .portcullis_sink_deliver()
            .call_configure(&mut store, settings)
        {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => bail!("the sink component refused its settings: {reason}"),
            Err(trap) => bail!(
                "the sink component failed to configure: {}",
                failure(&store, &trap)
            ),
        }
        Ok(Live { store, sink })
    }
}

impl Transport for ComponentSink {
    fn send(&mut self, batch: &[String]) -> Result<()> {
        let live = self.live()?;
        live.store.data().stderr.clear();
        let fuel = DELIVER_FUEL.saturating_add(FUEL_PER_RECORD.saturating_mul(batch.len() as u64));
        live.store.set_fuel(fuel)?;
        let delivered = live
            .sink
            .portcullis_sink_deliver()
            .call_deliver(&mut live.store, batch);
        match delivered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => bail!("the sink component did not deliver: {reason}"),
            Err(trap) => {
                let why = failure(&live.store, &trap);
                // A trapped instance is not called again.
                self.live = None;
                bail!("the sink component failed: {why}")
            }
        }
    }
}

/// Why a call trapped, on one line, with the end of what the component
/// wrote to stderr during the call.
fn failure(store: &Store<SinkState>, trap: &wasmtime::Error) -> String {
    let why = match trap.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => "it ran out of fuel (a loop?)".to_string(),
        Some(trap) => trap.to_string(),
        None => format!("{trap:#}")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    };
    match crate::policy::engine::stderr_summary(&store.data().stderr.tail()) {
        Some(stderr) => format!("{why} (stderr: {stderr})"),
        None => why,
    }
}

/// One instance's state: WASI with clocks and random only, its memory
/// limit, its captured stderr, and what it may reach.
struct SinkState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stderr: Stderr,
    allow_hosts: Vec<String>,
    /// Made at the first request.
    sender: Option<(tokio::runtime::Runtime, HttpClient)>,
}

impl SinkState {
    fn new(options: &ComponentOptions) -> Self {
        let stderr = Stderr::default();
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(options.max_memory)
                .build(),
            stderr,
            allow_hosts: options.allow_hosts.clone(),
            sender: None,
        }
    }

    /// Sends `request` if its host is granted.
    fn forward(&mut self, request: Request) -> Result<Response> {
        let uri = request.url.parse::<hyper::Uri>().ok();
        let scheme = uri.as_ref().and_then(|u| u.scheme_str());
        let (Some(uri), true) = (&uri, outbound::supports(scheme)) else {
            bail!("'{}' is not an http(s) URL", request.url);
        };
        let authority = uri.authority().context("the URL has no host")?;
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == Some("https") { 443 } else { 80 });
        if !granted(&self.allow_hosts, authority.host(), port) {
            bail!("{authority} is not granted to this sink (allow_hosts)");
        }
        if request
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            bail!("a sink may not set the Host header");
        }
        let method = hyper::Method::from_bytes(request.method.as_bytes())
            .with_context(|| format!("'{}' is not an HTTP method", request.method))?;
        let (runtime, client) = match &mut self.sender {
            Some(sender) => sender,
            none => none.insert(outbound::sender()?),
        };
        let answer = runtime.block_on(outbound::send(
            client,
            method,
            &request.url,
            &request.headers,
            request.body,
            SEND_TIMEOUT,
        ))?;
        Ok(Response {
            status: answer.status.as_u16(),
            headers: answer
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.to_string(), value)
                })
                .collect(),
            body: answer.body.to_vec(),
        })
    }
}

/// A sink's stderr: keeps the last [`MAX_STDERR`] bytes written since it
/// was cleared, and never refuses a write — an instance lives for many
/// calls, and a full pipe would make its every later write (a Rust
/// `eprintln!`, say) fail.
#[derive(Clone, Default)]
struct Stderr(Arc<Mutex<Vec<u8>>>);

impl Stderr {
    fn keep(&self, bytes: &[u8]) {
        let mut kept = self.0.lock().expect("stderr poisoned");
        kept.extend_from_slice(bytes);
        let over = kept.len().saturating_sub(MAX_STDERR);
        kept.drain(..over);
    }

    fn tail(&self) -> Vec<u8> {
        self.0.lock().expect("stderr poisoned").clone()
    }

    fn clear(&self) {
        self.0.lock().expect("stderr poisoned").clear();
    }
}

impl IsTerminal for Stderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Stderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for Stderr {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(MAX_STDERR)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Stderr {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Stderr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Whether `host:port` is one of `grants` (`host` grants any port).
fn granted(grants: &[String], host: &str, port: u16) -> bool {
    grants.iter().any(|grant| {
        grant.parse::<Authority>().is_ok_and(|g| {
            g.host().eq_ignore_ascii_case(host) && g.port_u16().is_none_or(|p| p == port)
        })
    })
}

impl bindings::portcullis::sink::outbound::Host for SinkState {
    fn send(&mut self, request: Request) -> Result<Response, String> {
        self.forward(request).map_err(|e| format!("{e:#}"))
    }
}

impl WasiView for SinkState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_hosts_and_ports_are_reached() {
        let grants = ["siem.example.com".to_string(), "127.0.0.1:8088".into()];
        assert!(granted(&grants, "siem.example.com", 443));
        assert!(granted(&grants, "SIEM.example.com", 8088), "any port");
        assert!(granted(&grants, "127.0.0.1", 8088));
        assert!(!granted(&grants, "127.0.0.1", 80), "another port");
        assert!(!granted(&grants, "evil.example.com", 443));
        assert!(!granted(&grants, "siem.example.com.evil.net", 443));
        assert!(!granted(&[], "siem.example.com", 443), "nothing by default");
    }

    #[test]
    fn a_chatty_sink_keeps_writing_to_stderr_and_its_failure_shows_the_end() {
        let mut stderr = Stderr::default();
        for n in 0..100 {
            let line = format!("batch {n}: {}\n", "x".repeat(100));
            assert!(stderr.check_write().unwrap() > 0);
            OutputStream::write(&mut stderr, line.into()).unwrap();
        }
        let tail = String::from_utf8(stderr.tail()).unwrap();
        assert_eq!(tail.len(), MAX_STDERR);
        assert!(tail.ends_with(&format!("batch 99: {}\n", "x".repeat(100))));
        stderr.clear();
        assert!(stderr.tail().is_empty());
    }

    fn state(grants: &[&str]) -> SinkState {
        SinkState::new(&ComponentOptions {
            module: PathBuf::new(),
            digest: None,
            allow_hosts: grants.iter().map(|g| g.to_string()).collect(),
            settings: Vec::new(),
            max_memory: 1 << 20,
        })
    }

    fn request(url: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: "POST".into(),
            url: url.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        }
    }

    #[test]
    fn requests_outside_the_grant_are_refused_before_any_connection() {
        let mut state = state(&["siem.example.com:443"]);
        let refused = |state: &mut SinkState, url: &str, headers: &[(&str, &str)]| {
            state
                .forward(request(url, headers))
                .err()
                .unwrap()
                .to_string()
        };
        let e = refused(&mut state, "https://other.example.com/x", &[]);
        assert!(e.contains("not granted"), "{e}");
        let e = refused(&mut state, "http://siem.example.com/x", &[]);
        assert!(e.contains("not granted"), "port 80 is not 443: {e}");
        let e = refused(&mut state, "file:///etc/passwd", &[]);
        assert!(e.contains("not an http(s) URL"), "{e}");
        let host = [("Host", "other.example.com")];
        let e = refused(&mut state, "https://siem.example.com/x", &host);
        assert!(e.contains("Host header"), "{e}");
        assert!(state.sender.is_none(), "nothing was sent");
    }
}
