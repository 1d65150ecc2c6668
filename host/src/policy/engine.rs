//! The WebAssembly engine shared by every policy: one wasmtime `Engine`
//! configured for the component model, the pooling allocator and epoch
//! interruption; the ticker thread that advances epochs so deadlines fire; the
//! `Linker` that grants policies their imports (log, tool drift, the
//! key-value store, and WASI with nothing granted unless the config says so);
//! and the on-disk cache of compiled components. It never evaluates a message.

use crate::config::{EngineConfig, Grant};
use crate::contract;
use crate::policy::kv::{KeyValue, MemoryStore};
use crate::util::encode::hex;
use anyhow::{Context, Result, anyhow};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the engine's epoch advances: the resolution of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bytes of each pooled memory and table kept resident between instances.
const KEEP_RESIDENT: usize = 1 << 20;

/// Longest log line a policy may write; longer ones are truncated.
const MAX_LOG_LINE: usize = 4096;

/// Most log lines kept per evaluation (all still go to the host's log).
const MAX_LOG_LINES: usize = 32;

/// Most table elements a policy instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The engine, linker and compile cache shared by all policies.
pub struct PolicyEngine {
    engine: wasmtime::Engine,
    linker: Linker<PolicyState>,
    cache_dir: Option<PathBuf>,
    ticker: Arc<EpochTicker>,
    prepared: Mutex<HashMap<Arc<str>, PreparedModule>>,
    store: Arc<dyn KeyValue>,
}

/// A policy module compiled and linked, ready to instantiate.
#[derive(Clone)]
pub struct PreparedModule {
    /// Hex sha256 of the module file.
    pub sha256: Arc<str>,
    /// The linked component.
    pub pre: contract::PolicyPre<PolicyState>,
}

impl PolicyEngine {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(config: &EngineConfig) -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(4))
            .total_memories(config.max_instances.saturating_mul(2))
            .total_tables(config.max_instances.saturating_mul(4))
            .total_stacks(config.max_instances)
            .max_memory_size(usize::try_from(config.max_memory_mb << 20)?)
            // Reset the low pages of a returned slot in place instead of
            // unmapping them: fresh instances then start without page faults.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(Enabled::Auto);
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&wasm)
            .map_err(anyhow::Error::from)
            .context("cannot configure the wasm engine")?;
        let ticker = EpochTicker::start(&engine)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI")?;
        contract::Policy::add_to_linker::<_, HasSelf<PolicyState>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("cannot link the policy imports")?;

        let cache_dir = config
            .cache
            .then(|| {
                config
                    .cache_dir
                    .clone()
                    .or_else(crate::config::default_cache_dir)
            })
            .flatten();
        Ok(Self {
            engine,
            linker,
            cache_dir,
            ticker,
            prepared: Mutex::new(HashMap::new()),
            store: Arc::new(MemoryStore::default()),
        })
    }

    /// The engine with `store` for the policies' counters instead of this
    /// process' memory.
    pub fn with_store(mut self, store: Arc<dyn KeyValue>) -> Self {
        self.store = store;
        self
    }

    /// The key-value store policies keep their counters in, for the life of
    /// the process.
    pub fn store(&self) -> Arc<dyn KeyValue> {
        self.store.clone()
    }

    /// The ticker that makes deadlines fire; hold [`EpochTicker::running`]
    /// while wasm runs.
    pub fn ticker(&self) -> Arc<EpochTicker> {
        self.ticker.clone()
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Reads a policy module and returns it compiled and linked. A module
    /// (by digest) is compiled and linked once per engine, whichever policies
    /// use it; compiling goes through the on-disk cache.
    pub fn prepare(&self, path: &Path) -> Result<PreparedModule> {
        let wasm = std::fs::read(path)
            .with_context(|| format!("cannot read policy module {}", path.display()))?;
        let sha256: Arc<str> = hex(&Sha256::digest(&wasm)).into();
        if let Some(prepared) = self
            .prepared
            .lock()
            .expect("module table poisoned")
            .get(&sha256)
        {
            return Ok(prepared.clone());
        }
        let component = match &self.cache_dir {
            Some(dir) => self.compile_cached(&wasm, &sha256, dir),
            None => Component::new(&self.engine, &wasm).map_err(anyhow::Error::from),
        }
        .map_err(|e| anyhow!("{} is not a valid policy component: {e:#}", path.display()))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("the module needs imports Portcullis does not provide")?;
        let pre = contract::PolicyPre::new(pre)
            .map_err(anyhow::Error::from)
            .context("the module does not export portcullis:policy/hooks@0.1.0")?;
        let prepared = PreparedModule { sha256, pre };
        self.prepared
            .lock()
            .expect("module table poisoned")
            .insert(prepared.sha256.clone(), prepared.clone());
        Ok(prepared)
    }

    /// Returns the cached artifact for `sha256` if it is intact, else compiles
    /// and stores one. A damaged cache entry is replaced, never trusted.
    fn compile_cached(&self, wasm: &[u8], sha256: &str, dir: &Path) -> Result<Component> {
        let artifact = dir.join(format!("{sha256}-{:016x}.cwasm", self.compatibility()));
        let checksum = artifact.with_extension("cwasm.sha256");
        if let Some(component) = self.load_artifact(&artifact, &checksum) {
            return Ok(component);
        }
        let compiled = self.engine.precompile_component(wasm)?;
        if let Err(e) = store_artifact(dir, &artifact, &checksum, &compiled) {
            tracing::warn!(dir = %dir.display(), "cannot write the compile cache: {e:#}");
        }
        // SAFETY: the bytes were produced by this engine a moment ago.
        Ok(unsafe { Component::deserialize(&self.engine, &compiled) }?)
    }

    fn load_artifact(&self, artifact: &Path, checksum: &Path) -> Option<Component> {
        let bytes = std::fs::read(artifact).ok()?;
        let expected = std::fs::read_to_string(checksum).ok()?;
        if hex(&Sha256::digest(&bytes)) != expected.trim() {
            tracing::warn!(artifact = %artifact.display(), "compile cache entry is damaged; recompiling");
            return None;
        }
        // SAFETY: the artifact was written by an engine with the same
        // compatibility hash (it is in the file name) and its checksum
        // matches what was written with it. The cache directory must be
        // writable only by the operator (see README).
        unsafe { Component::deserialize(&self.engine, &bytes) }
            .inspect_err(|e| tracing::warn!(artifact = %artifact.display(), "unusable compile cache entry: {e:#}"))
            .ok()
    }

    fn compatibility(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hasher.finish()
    }
}

fn store_artifact(dir: &Path, artifact: &Path, checksum: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = artifact.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, artifact)?;
    std::fs::write(checksum, hex(&Sha256::digest(bytes)))?;
    Ok(())
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while policies run, and
/// for [`IDLE_TICKS`] after the last one stopped; then sleeps until one
/// starts, so an idle Portcullis costs no CPU. Under steady traffic it never
/// sleeps, so starting an evaluation wakes no thread. The epoch stands still
/// while it sleeps, which deadlines (counted from when an evaluation starts)
/// do not notice.
pub struct EpochTicker {
    running: AtomicUsize,
    /// Whether the ticker sleeps (or is about to): the next evaluation to
    /// start wakes it.
    asleep: AtomicBool,
    thread: std::thread::Thread,
}

/// Ticks the ticker goes on for after the last evaluation stopped.
const IDLE_TICKS: u32 = 200;

/// Proof that wasm is running; the ticker ticks until every one is dropped.
pub struct Running<'a>(&'a EpochTicker);

impl EpochTicker {
    fn start(engine: &wasmtime::Engine) -> Result<Arc<Self>> {
        let weak = engine.weak();
        let (sender, receiver) = std::sync::mpsc::channel::<Arc<EpochTicker>>();
        let thread = std::thread::Builder::new()
            .name("portcullis-epoch".into())
            .spawn(move || {
                let Ok(ticker) = receiver.recv() else { return };
                let mut idle = 0;
                while let Some(engine) = weak.upgrade() {
                    if ticker.running.load(Ordering::SeqCst) > 0 {
                        idle = 0;
                    } else if idle < IDLE_TICKS {
                        idle += 1;
                    } else {
                        drop(engine);
                        ticker.sleep();
                        idle = 0;
                        continue;
                    }
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .context("cannot start the epoch ticker thread")?;
        let ticker = Arc::new(Self {
            running: AtomicUsize::new(0),
            asleep: AtomicBool::new(false),
            thread: thread.thread().clone(),
        });
        sender
            .send(ticker.clone())
            .context("the epoch ticker thread died")?;
        Ok(ticker)
    }

    /// The ticker's sleep while nothing runs. An evaluation that starts
    /// meanwhile either is seen here or sees `asleep` and wakes it: both
    /// sides write, then read the other's flag, all sequentially consistent.
    fn sleep(&self) {
        self.asleep.store(true, Ordering::SeqCst);
        if self.running.load(Ordering::SeqCst) == 0 {
            std::thread::park_timeout(Duration::from_secs(1));
        }
        self.asleep.store(false, Ordering::SeqCst);
    }

    /// Marks wasm as running until the returned guard is dropped.
    pub fn running(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        Running(self)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The per-store state of one policy instance: its WASI context (nothing
/// granted by default), its memory limit, what it logged, its key-value
/// store and the tool drift of the message being judged.
pub struct PolicyState {
    wasi: WasiCtx,
    table: ResourceTable,
    policy: Arc<str>,
    memory_limit: usize,
    memory_exceeded: bool,
    stderr: Option<MemoryOutputPipe>,
    logs: Vec<LogLine>,
    store: Arc<dyn KeyValue>,
    /// What `surface.drift` answers during the current evaluation.
    pub drift: Vec<contract::ToolDrift>,
}

/// A line a policy logged through the `log` import.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The message, truncated to a bounded length.
    pub message: String,
}

impl PolicyState {
    /// A fresh state for `policy` with the given limit, grants and store.
    pub fn new(
        policy: Arc<str>,
        memory_limit: usize,
        grants: &[Grant],
        store: Arc<dyn KeyValue>,
    ) -> Self {
        let mut wasi = WasiCtxBuilder::new();
        if !grants.contains(&Grant::Clock) {
            wasi.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
        }
        if !grants.contains(&Grant::Random) {
            wasi.secure_random(rand::rngs::StdRng::seed_from_u64(0))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(0))
                .insecure_random_seed(0);
        }
        let stderr = if grants.contains(&Grant::Stderr) {
            wasi.inherit_stderr();
            None
        } else {
            let pipe = MemoryOutputPipe::new(MAX_LOG_LINE);
            wasi.stderr(pipe.clone());
            Some(pipe)
        };
        Self {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            policy,
            memory_limit,
            memory_exceeded: false,
            stderr,
            logs: Vec::new(),
            store,
            drift: Vec::new(),
        }
    }

    /// What the policy wrote to its captured stderr, on one line and without
    /// runtime hints — e.g. a Rust panic message before the trap it causes.
    pub fn stderr_text(&self) -> Option<String> {
        stderr_summary(&self.stderr.as_ref()?.contents())
    }

    /// The lines logged since the last call, leaving none.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.logs)
    }

    /// True once the instance tried to grow past its memory limit.
    pub fn memory_exceeded(&self) -> bool {
        self.memory_exceeded
    }
}

impl WasiView for PolicyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for PolicyState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            wasmtime::bail!("memory limit of {} MiB exceeded", self.memory_limit >> 20);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl contract::portcullis::policy::types::Host for PolicyState {}

impl contract::portcullis::policy::log::Host for PolicyState {
    fn log(&mut self, level: contract::Level, message: String) {
        let message = truncate(&message, MAX_LOG_LINE);
        let policy = &*self.policy;
        let name = match level {
            contract::Level::Trace => {
                tracing::trace!(policy, "{message}");
                "trace"
            }
            contract::Level::Debug => {
                tracing::debug!(policy, "{message}");
                "debug"
            }
            contract::Level::Info => {
                tracing::info!(policy, "{message}");
                "info"
            }
            contract::Level::Warn => {
                tracing::warn!(policy, "{message}");
                "warn"
            }
            contract::Level::Error => {
                tracing::error!(policy, "{message}");
                "error"
            }
        };
        if self.logs.len() < MAX_LOG_LINES {
            self.logs.push(LogLine {
                level: name,
                message: message.to_string(),
            });
        }
    }
}

impl contract::portcullis::policy::surface::Host for PolicyState {
    fn drift(&mut self) -> Vec<contract::ToolDrift> {
        self.drift.clone()
    }
}

impl contract::portcullis::policy::store::Host for PolicyState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.store.get(&self.policy, &key)?)
    }

    fn set(&mut self, key: String, value: String, ttl_ms: Option<u64>) -> wasmtime::Result<()> {
        let ttl = ttl_ms.map(Duration::from_millis);
        Ok(self.store.set(&self.policy, &key, value, ttl)?)
    }

    fn increment(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> wasmtime::Result<i64> {
        let ttl = ttl_ms.map(Duration::from_millis);
        Ok(self.store.increment(&self.policy, &key, delta, ttl)?)
    }
}

/// What a guest wrote to stderr, on one line and without runtime hints
/// (`None` if nothing).
pub fn stderr_summary(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    (!lines.is_empty()).then(|| lines.join(" "))
}

/// The longest prefix of `text` of at most `max` bytes on a char boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let end = (0..=max)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[..end]
}

/// A clock that always reads zero: what a policy sees without the clock grant.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
