//! Rate limits at the boundary: the configured rules compiled once per
//! generation ([`RateRules`]), and token buckets ([`Buckets`]) that outlive
//! reloads, so changing an unrelated setting does not hand every agent a
//! fresh allowance. A request passes only if every rule that applies to it
//! has a token; a refusal says when to retry. With `[state] redis` the
//! buckets live in Redis, taken and refilled atomically by one script on
//! Redis' own clock, so a limit holds across every process of a deployment;
//! when Redis cannot be reached, a request that a rule applies to is
//! refused (fail closed).

use crate::config::{RateDimension, RateLimitConfig};
use crate::state::{Shared, Unavailable};
use crate::util::encode::hex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use wildmatch::WildMatch;

/// Buckets kept before full ones are forgotten (a full bucket is the same
/// as none).
const MAX_BUCKETS: usize = 100_000;

/// The rate limits of one generation.
#[derive(Default)]
pub struct RateRules(Vec<Rule>);

struct Rule {
    /// Identifies the rule's buckets across reloads: what it counts (its
    /// agents, servers, tools, methods and `by`), not how much it allows,
    /// so a limit raised or lowered keeps every bucket's state.
    id: String,
    agents: Vec<WildMatch>,
    servers: Vec<WildMatch>,
    tools: Vec<WildMatch>,
    methods: Vec<WildMatch>,
    by: Vec<RateDimension>,
    capacity: f64,
    per_second: f64,
    calls: u32,
    per_secs: u64,
}

/// A request refused for its rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// When a token will be there.
    pub retry_after: Duration,
    /// The limit, as a person reads it.
    pub limit: String,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A bucket was empty.
    Limited(Limited),
    /// The shared buckets could not be read: refused, as nothing can say
    /// it is within its limits.
    Unavailable(Unavailable),
}

/// What a request is counted as.
pub struct Caller<'a> {
    /// The agent.
    pub agent: &'a str,
    /// The server.
    pub server: &'a str,
    /// The method.
    pub method: &'a str,
    /// The tool, for `tools/call`.
    pub tool: Option<&'a str>,
}

impl RateRules {
    /// Compiles the configured rules.
    pub fn new(rules: &[RateLimitConfig]) -> Self {
        let globs = |patterns: &[String]| patterns.iter().map(|g| WildMatch::new(g)).collect();
        let mut seen: HashMap<String, usize> = HashMap::new();
        Self(
            rules
                .iter()
                .map(|r| Rule {
                    id: {
                        // Two rules counting the same (a burst and a
                        // sustained rate, say) keep buckets of their own.
                        let scope = scope(r);
                        let nth = seen.entry(scope.clone()).or_default();
                        *nth += 1;
                        format!("{scope}#{nth}")
                    },
                    agents: globs(&r.agents),
                    servers: globs(&r.servers),
                    tools: globs(&r.tools),
                    methods: globs(&r.methods),
                    by: r.by.clone(),
                    capacity: f64::from(r.burst.unwrap_or(r.calls)),
                    per_second: f64::from(r.calls) / r.per_secs as f64,
                    calls: r.calls,
                    per_secs: r.per_secs,
                })
                .collect(),
        )
    }

    /// True when no rule is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What `rule` counts, whatever order its lists are written in.
fn scope(rule: &RateLimitConfig) -> String {
    let set = |list: &[String]| {
        let mut list = list.to_vec();
        list.sort();
        list.dedup();
        list
    };
    let mut by: Vec<String> = rule.by.iter().map(|d| format!("{d:?}")).collect();
    by.sort();
    by.dedup();
    serde_json::json!([
        set(&rule.agents),
        set(&rule.servers),
        set(&rule.tools),
        set(&rule.methods),
        by
    ])
    .to_string()
}

impl Rule {
    fn applies(&self, caller: &Caller) -> bool {
        let any = |globs: &[WildMatch], name: &str| globs.iter().any(|g| g.matches(name));
        any(&self.agents, caller.agent)
            && any(&self.servers, caller.server)
            && any(&self.methods, caller.method)
            && any(&self.tools, caller.tool.unwrap_or(""))
    }

    fn bucket(&self, caller: &Caller) -> String {
        let mut key = self.id.clone();
        for dimension in &self.by {
            key.push('\u{1f}');
            key.push_str(match dimension {
                RateDimension::Agent => caller.agent,
                RateDimension::Server => caller.server,
                RateDimension::Tool => caller.tool.unwrap_or(""),
            });
        }
        key
    }

    fn describe(&self, caller: &Caller) -> String {
        let whose: Vec<String> = self
            .by
            .iter()
            .map(|d| match d {
                RateDimension::Agent => format!("agent '{}'", caller.agent),
                RateDimension::Server => format!("server '{}'", caller.server),
                RateDimension::Tool => format!("tool '{}'", caller.tool.unwrap_or("")),
            })
            .collect();
        format!(
            "{} calls per {} s for {}",
            self.calls,
            self.per_secs,
            whose.join(", ")
        )
    }
}

/// Token buckets: this process' own, for its life, or shared in Redis.
pub enum Buckets {
    /// In this process' memory.
    Memory(Mutex<HashMap<String, Bucket>>),
    /// In the deployment's Redis.
    Shared(Arc<Shared>),
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets::Memory(Mutex::default())
    }
}

/// One bucket kept in memory.
#[derive(Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
    /// When it will be full again, and so can be forgotten.
    full_at: Instant,
}

impl Bucket {
    fn refilled(self, rule: &Rule, now: Instant) -> Self {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * rule.per_second;
        Self {
            tokens: (self.tokens + earned).min(rule.capacity),
            at: now,
            full_at: self.full_at,
        }
    }
}

impl Buckets {
    /// Takes a token from every bucket of every rule that applies, or none
    /// if one is empty (or, shared, cannot be read).
    pub fn admit(&self, rules: &RateRules, caller: &Caller, now: Instant) -> Result<(), Refusal> {
        let applying: Vec<&Rule> = rules.0.iter().filter(|r| r.applies(caller)).collect();
        if applying.is_empty() {
            return Ok(());
        }
        match self {
            Buckets::Memory(buckets) => admit_here(buckets, &applying, caller, now),
            Buckets::Shared(shared) => admit_shared(shared, &applying, caller),
        }
    }
}

fn admit_here(
    buckets: &Mutex<HashMap<String, Bucket>>,
    applying: &[&Rule],
    caller: &Caller,
    now: Instant,
) -> Result<(), Refusal> {
    let mut buckets = buckets.lock().expect("rate buckets poisoned");
    let mut taken = Vec::with_capacity(applying.len());
    for &rule in applying {
        let key = rule.bucket(caller);
        let full = Bucket {
            tokens: rule.capacity,
            at: now,
            full_at: now,
        };
        let bucket = buckets.get(&key).map_or(full, |b| b.refilled(rule, now));
        if bucket.tokens < 1.0 {
            let wait = (1.0 - bucket.tokens) / rule.per_second;
            return Err(Refusal::Limited(Limited {
                retry_after: Duration::from_secs_f64(wait),
                limit: rule.describe(caller),
            }));
        }
        taken.push((key, rule, bucket));
    }
    if buckets.len() >= MAX_BUCKETS {
        buckets.retain(|_, b| b.full_at > now);
    }
    for (key, rule, bucket) in taken {
        let tokens = bucket.tokens - 1.0;
        let full_at = now + Duration::from_secs_f64((rule.capacity - tokens) / rule.per_second);
        buckets.insert(
            key,
            Bucket {
                tokens,
                at: now,
                full_at,
            },
        );
    }
    Ok(())
}

/// Takes a token from each bucket in `KEYS` (capacity and tokens per
/// millisecond in `ARGV`, two per key), all or none, on Redis' clock.
/// Returns `{0, "0"}`, or the 1-based index of an empty bucket and the
/// milliseconds until it has a token. A bucket expires once it would be
/// full again.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local tokens = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  local held = redis.call('HMGET', key, 'tokens', 'at')
  local left = tonumber(held[1]) or capacity
  local at = tonumber(held[2]) or now
  left = math.min(capacity, left + math.max(0, now - at) * rate)
  if left < 1 then
    return {i, tostring((1 - left) / rate)}
  end
  tokens[i] = left - 1
end
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'tokens', tostring(tokens[i]), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((capacity - tokens[i]) / rate) + 1000)
end
return {0, '0'}
"#,
    )
});

fn admit_shared(shared: &Shared, applying: &[&Rule], caller: &Caller) -> Result<(), Refusal> {
    let mut take = TAKE.prepare_invoke();
    for rule in applying {
        let bucket = hex(&Sha256::digest(rule.bucket(caller).as_bytes()));
        take.key(shared.key(&["rate", &bucket[..32]]));
        take.arg(rule.capacity).arg(rule.per_second / 1000.0);
    }
    let (empty, wait_ms): (usize, String) = shared
        .call(|connection| take.invoke(connection))
        .map_err(Refusal::Unavailable)?;
    let Some(rule) = empty.checked_sub(1).and_then(|i| applying.get(i)) else {
        return Ok(());
    };
    let wait_ms: f64 = wait_ms.parse().unwrap_or(1000.0);
    Err(Refusal::Limited(Limited {
        retry_after: Duration::from_secs_f64(wait_ms.max(0.0) / 1000.0),
        limit: rule.describe(caller),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> RateRules {
        let config = crate::config::Config::parse(toml, std::path::Path::new("t.toml")).unwrap();
        RateRules::new(&config.rate_limits)
    }

    fn call<'a>(agent: &'a str, tool: &'a str) -> Caller<'a> {
        Caller {
            agent,
            server: "fs",
            method: "tools/call",
            tool: Some(tool),
        }
    }

    #[test]
    fn a_burst_over_the_limit_is_refused_with_a_retry_hint() {
        let rules = rules("[[rate_limits]]\ncalls = 3\nper_secs = 60\n");
        let buckets = Buckets::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert!(buckets.admit(&rules, &call("a", "write"), now).is_ok());
        }
        let Err(Refusal::Limited(refused)) = buckets.admit(&rules, &call("a", "write"), now) else {
            panic!("not refused for its rate");
        };
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        assert_eq!(
            refused.limit,
            "3 calls per 60 s for agent 'a', server 'fs', tool 'write'"
        );
        assert!(
            buckets.admit(&rules, &call("b", "write"), now).is_ok(),
            "another agent"
        );
        assert!(
            buckets.admit(&rules, &call("a", "read"), now).is_ok(),
            "another tool"
        );
        let later = now + Duration::from_secs(20);
        assert!(
            buckets.admit(&rules, &call("a", "write"), later).is_ok(),
            "refilled"
        );
    }

    #[test]
    fn a_rule_whose_limit_is_edited_keeps_its_buckets() {
        let buckets = Buckets::default();
        let now = Instant::now();
        let before = rules("[[rate_limits]]\ncalls = 2\nper_secs = 60\ntools = [\"a\", \"b\"]\n");
        for _ in 0..2 {
            assert!(buckets.admit(&before, &call("x", "a"), now).is_ok());
        }
        // Raised, with its lists reordered: the spent tokens stay spent.
        let raised = rules("[[rate_limits]]\ncalls = 3\nper_secs = 60\ntools = [\"b\", \"a\"]\n");
        assert!(buckets.admit(&raised, &call("x", "a"), now).is_err());
        // What it counts changed: a new bucket.
        let other = rules("[[rate_limits]]\ncalls = 3\nper_secs = 60\ntools = [\"a\"]\n");
        assert!(buckets.admit(&other, &call("x", "a"), now).is_ok());
        // Two rules counting the same keep buckets of their own.
        let twice = rules(
            "[[rate_limits]]\ncalls = 1\nper_secs = 60\ntools = [\"c\"]\n\
             [[rate_limits]]\ncalls = 5\nper_secs = 60\ntools = [\"c\"]\n",
        );
        assert!(buckets.admit(&twice, &call("x", "c"), now).is_ok());
        let Err(Refusal::Limited(refused)) = buckets.admit(&twice, &call("x", "c"), now) else {
            panic!("the first rule's one call is spent");
        };
        assert!(refused.limit.starts_with("1 calls"), "{}", refused.limit);
    }

    #[test]
    fn a_refusal_by_one_rule_takes_no_token_from_another() {
        let rules = rules(
            "[[rate_limits]]\ncalls = 100\nper_secs = 60\nby = [\"agent\"]\n\
             [[rate_limits]]\ntools = [\"delete_*\"]\ncalls = 1\nper_secs = 60\n",
        );
        let buckets = Buckets::default();
        let now = Instant::now();
        assert!(buckets.admit(&rules, &call("a", "delete_all"), now).is_ok());
        for _ in 0..10 {
            assert!(
                buckets
                    .admit(&rules, &call("a", "delete_all"), now)
                    .is_err()
            );
        }
        for _ in 0..99 {
            assert!(buckets.admit(&rules, &call("a", "read"), now).is_ok());
        }
        assert!(buckets.admit(&rules, &call("a", "read"), now).is_err());
    }

    #[test]
    fn other_methods_are_not_counted_unless_named() {
        let rules = rules("[[rate_limits]]\ncalls = 1\nper_secs = 60\n");
        let buckets = Buckets::default();
        let list = Caller {
            agent: "a",
            server: "fs",
            method: "tools/list",
            tool: None,
        };
        for _ in 0..5 {
            assert!(buckets.admit(&rules, &list, Instant::now()).is_ok());
        }
    }
}
