//! State shared by the Portcullis processes of one deployment, in Redis
//! (`[state] redis`): a connection pool whose every call is bounded by
//! `[state] timeout_ms`, reconnecting on the next call after a failure. A
//! call that fails is the caller's to refuse on: nothing that depends on
//! shared state is allowed when it cannot be read (see `surface::ratelimit`
//! and `policy::kv`).

use crate::config::{Config, StateConfig};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Connections kept open: calls from more threads than this wait their turn.
const POOL: usize = 8;

/// Why shared state could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the shared state (Redis) is unavailable: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A Redis the deployment's processes share.
pub struct Shared {
    client: redis::Client,
    timeout: Duration,
    prefix: String,
    pool: Vec<Mutex<Option<redis::Connection>>>,
    next: AtomicUsize,
}

impl Shared {
    /// The shared state `config` names, if any. Nothing is connected yet:
    /// a Redis that is down at start is a Redis that is down later.
    pub fn open(config: &Config) -> Result<Option<Self>> {
        let Some(url) = &config.state.redis else {
            return Ok(None);
        };
        let base = config.path.parent().unwrap_or(Path::new("."));
        let url = crate::config::resolve_secret(url, base).context("state.redis")?;
        // rediss:// goes through rustls with the process' provider (ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = redis::Client::open(url.as_str())
            .map_err(|e| anyhow::anyhow!("state.redis: not a usable Redis URL ({:?})", e.kind()))?;
        Ok(Some(Self::with_client(client, &config.state)))
    }

    fn with_client(client: redis::Client, settings: &StateConfig) -> Self {
        Self {
            client,
            timeout: Duration::from_millis(settings.timeout_ms),
            prefix: settings.prefix.clone(),
            pool: (0..POOL).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// `PREFIX:` followed by `parts` joined by `:`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// Runs `work` on a pooled connection (opened if needed). A connection
    /// that failed is dropped; one kept from before that turns out closed
    /// (Redis restarted) is replaced and `work` tried once more on the new
    /// one, unless it may have reached Redis (a timeout).
    pub fn call<T>(
        &self,
        mut work: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, Unavailable> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
        let mut held = slot.lock().expect("redis pool poisoned");
        let mut kept = held.is_some();
        loop {
            if held.is_none() {
                *held = Some(self.connect()?);
            }
            let connection = held.as_mut().expect("connected above");
            match work(connection) {
                Ok(value) => return Ok(value),
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    *held = None;
                    if !kept || e.is_timeout() {
                        return Err(Unavailable(describe(&e)));
                    }
                    kept = false;
                }
                Err(e) => return Err(Unavailable(describe(&e))),
            }
        }
    }

    fn connect(&self) -> Result<redis::Connection, Unavailable> {
        let connection = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(|e| Unavailable(describe(&e)))?;
        let timeout = Some(self.timeout);
        connection
            .set_read_timeout(timeout)
            .and_then(|()| connection.set_write_timeout(timeout))
            .map_err(|e| Unavailable(describe(&e)))?;
        Ok(connection)
    }
}

/// A Redis error without what it might quote of the URL.
fn describe(error: &redis::RedisError) -> String {
    if error.is_timeout() {
        "it did not answer in time".into()
    } else if error.is_io_error() || error.is_connection_dropped() {
        "it cannot be reached".into()
    } else {
        format!(
            "{:?}: {}",
            error.kind(),
            error.detail().unwrap_or("no detail")
        )
    }
}
