//! The key-value store behind the policies' `store` import: counters and
//! values with an optional time to live, kept for the life of the process
//! and shared by every instance and generation of a policy. Each policy has
//! its own keyspace. [`KeyValue`] is the seam where a store shared between
//! Portcullis processes can replace the in-memory one.

use std::collections::HashMap;
use std::sync::Mutex;
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
    fn get(&self, policy: &str, key: &str) -> Option<String>;
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
    fn get(&self, policy: &str, key: &str) -> Option<String> {
        let now = Instant::now();
        self.with(policy, |space| {
            space.live(key, now).map(|e| e.value.clone())
        })
    }

    fn set(
        &self,
        policy: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError(format!(
                "store value of {} bytes exceeds {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_within_their_window_and_start_again_after_it() {
        let store = MemoryStore::default();
        let window = Some(Duration::from_millis(30));
        assert_eq!(store.increment("quota", "bot", 1, window).unwrap(), 1);
        assert_eq!(store.increment("quota", "bot", 2, window).unwrap(), 3);
        assert_eq!(store.get("quota", "bot").as_deref(), Some("3"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(store.get("quota", "bot"), None, "expired");
        assert_eq!(store.increment("quota", "bot", 1, window).unwrap(), 1);
    }

    #[test]
    fn policies_have_their_own_keys() {
        let store = MemoryStore::default();
        store.set("a", "k", "from a".into(), None).unwrap();
        assert_eq!(store.get("b", "k"), None);
        assert_eq!(store.increment("b", "k", 5, None).unwrap(), 5);
        assert_eq!(store.get("a", "k").as_deref(), Some("from a"));
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
