//! The key-value store behind the policies' `store` import: counters and
//! values with an optional time to live, kept for the life of the process
//! and shared by every instance and generation of a policy. Each policy has
//! its own keyspace. [`MemoryStore`] is one process'; [`SharedStore`], in
//! the deployment's Redis (`[state] redis`), is every process' at once. A
//! store that cannot answer fails the policy's call (a trap), so the policy
//! fails as configured (closed, by default).

use crate::state::Shared;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Longest key a policy may use, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest value a policy may store, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most live keys one policy may hold.
pub const MAX_KEYS_PER_POLICY: usize = 100_000;

/// Why a store operation was refused (the policy then fails: a trap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// A store of string values by (policy, key).
pub trait KeyValue: Send + Sync {
    /// The value, unless unset or expired.
    fn get(&self, policy: &str, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets the value, expiring after `ttl` (never when `None`).
    fn set(
        &self,
        policy: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError>;
    /// Adds `delta` to the integer value (unset, expired or not an integer:
    /// 0) and returns the sum; a key this creates expires after `ttl`.
    fn increment(
        &self,
        policy: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError>;
}

/// The in-memory store of one Portcullis process.
#[derive(Default)]
pub struct MemoryStore {
    policies: Mutex<HashMap<String, Keyspace>>,
}

#[derive(Default)]
struct Keyspace {
    entries: HashMap<String, Entry>,
}

struct Entry {
    value: String,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

impl Keyspace {
    fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        self.entries.get(key).filter(|e| e.live(now))
    }

    /// Makes room for `key`: expired entries go first; a full keyspace is an
    /// error rather than an unbounded one.
    fn room_for(&mut self, key: &str, now: Instant) -> Result<(), StoreError> {
        if self.entries.contains_key(key) || self.entries.len() < MAX_KEYS_PER_POLICY {
            return Ok(());
        }
        self.entries.retain(|_, e| e.live(now));
        if self.entries.len() < MAX_KEYS_PER_POLICY {
            return Ok(());
        }
        Err(StoreError(format!(
            "the policy's store is full ({MAX_KEYS_PER_POLICY} live keys)"
        )))
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError(format!(
            "store key of {} bytes exceeds {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Refuses a key or a value over its size limit.
fn check_entry(key: &str, value: &str) -> Result<(), StoreError> {
    check_key(key)?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError(format!(
            "store value of {} bytes exceeds {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

impl MemoryStore {
    fn with<T>(&self, policy: &str, f: impl FnOnce(&mut Keyspace) -> T) -> T {
        let mut policies = self.policies.lock().expect("store lock poisoned");
        if !policies.contains_key(policy) {
            policies.insert(policy.to_string(), Keyspace::default());
        }
        f(policies.get_mut(policy).expect("keyspace just inserted"))
    }
}

impl KeyValue for MemoryStore {
    fn get(&self, policy: &str, key: &str) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        Ok(self.with(policy, |space| {
            space.live(key, now).map(|e| e.value.clone())
        }))
    }

    fn set(
        &self,
        policy: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        check_entry(key, &value)?;
        let now = Instant::now();
        self.with(policy, |space| {
            space.room_for(key, now)?;
            let expires = ttl.map(|ttl| now + ttl);
            space
                .entries
                .insert(key.to_string(), Entry { value, expires });
            Ok(())
        })
    }

    fn increment(
        &self,
        policy: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError> {
        check_key(key)?;
        let now = Instant::now();
        self.with(policy, |space| {
            space.room_for(key, now)?;
            let (current, expires) = match space.live(key, now) {
                Some(entry) => (entry.value.parse::<i64>().unwrap_or(0), entry.expires),
                None => (0, ttl.map(|ttl| now + ttl)),
            };
            let sum = current.saturating_add(delta);
            let value = sum.to_string();
            space
                .entries
                .insert(key.to_string(), Entry { value, expires });
            Ok(sum)
        })
    }
}

/// The store in the deployment's Redis: `PREFIX:kv:LEN:POLICY:KEY`, the
/// policy's name length-prefixed so no two policies' keys meet. The size
/// limits are this process' to check; the number of keys is Redis' to bound
/// (its `maxmemory`).
pub struct SharedStore(pub Arc<Shared>);

/// `increment`: an integer is incremented (its expiry kept); a value that
/// is not one counts as 0 (its expiry kept); a missing key is created with
/// the TTL in `ARGV[2]` (none when empty).
static INCREMENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^-?%d+$') then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
local ttl = ARGV[2]
if held then
  local left = redis.call('PTTL', KEYS[1])
  ttl = left > 0 and tostring(left) or ''
end
if ttl ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('INCRBY', KEYS[1], 0)
"#,
    )
});

impl SharedStore {
    fn key(&self, policy: &str, key: &str) -> String {
        self.0.key(&["kv", &policy.len().to_string(), policy, key])
    }
}

fn unavailable(e: crate::state::Unavailable) -> StoreError {
    StoreError(e.to_string())
}

/// Milliseconds of `ttl`, at least 1 (Redis refuses 0).
fn millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

impl KeyValue for SharedStore {
    fn get(&self, policy: &str, key: &str) -> Result<Option<String>, StoreError> {
        let key = self.key(policy, key);
        self.0
            .call(|c| redis::cmd("GET").arg(&key).query(c))
            .map_err(unavailable)
    }

    fn set(
        &self,
        policy: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        check_entry(key, &value)?;
        let key = self.key(policy, key);
        self.0
            .call(|c| {
                let mut set = redis::cmd("SET");
                set.arg(&key).arg(&value);
                if let Some(ttl) = ttl {
                    set.arg("PX").arg(millis(ttl));
                }
                set.query::<()>(c)
            })
            .map_err(unavailable)
    }

    fn increment(
        &self,
        policy: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError> {
        check_key(key)?;
        let key = self.key(policy, key);
        let ttl = ttl.map(|t| millis(t).to_string()).unwrap_or_default();
        self.0
            .call(|c| INCREMENT.key(&key).arg(delta).arg(&ttl).invoke(c))
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_within_their_window_and_start_again_after_it() {
        let store = MemoryStore::default();
        let window = Some(Duration::from_millis(30));
        assert_eq!(store.increment("quota", "bot", 1, window).unwrap(), 1);
        assert_eq!(store.increment("quota", "bot", 2, window).unwrap(), 3);
        assert_eq!(store.get("quota", "bot").unwrap().as_deref(), Some("3"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(store.get("quota", "bot").unwrap(), None, "expired");
        assert_eq!(store.increment("quota", "bot", 1, window).unwrap(), 1);
    }

    #[test]
    fn policies_have_their_own_keys() {
        let store = MemoryStore::default();
        store.set("a", "k", "from a".into(), None).unwrap();
        assert_eq!(store.get("b", "k").unwrap(), None);
        assert_eq!(store.increment("b", "k", 5, None).unwrap(), 5);
        assert_eq!(store.get("a", "k").unwrap().as_deref(), Some("from a"));
        assert_eq!(
            store.increment("a", "k", 1, None).unwrap(),
            1,
            "not an integer"
        );
    }

    #[test]
    fn oversized_keys_and_values_are_refused() {
        let store = MemoryStore::default();
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(store.increment("p", &long, 1, None).is_err());
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        let err = store.set("p", "k", big, None).unwrap_err();
        assert!(err.0.contains("exceeds"), "{err}");
    }
}
