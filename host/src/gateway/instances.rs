//! How many server connections of sessions' own (`isolation =
//! "per-session"`) run: in all, per agent and per server. A [`Place`] is
//! taken before one starts and held by the connection itself until it is
//! gone (a process reaped, a remote session dropped), so the limits bound
//! what really runs, not what sessions still refer to. Each server's count
//! is the `portcullis_server_instances` gauge.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

/// The limits on connections of sessions' own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// In all.
    pub total: usize,
    /// Per agent.
    pub per_agent: usize,
}

/// Why no place is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    /// As many run in all as may.
    Total(usize),
    /// As many run for this agent as may.
    Agent(String, usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(limit) => write!(
                f,
                "{limit} server connections of sessions' own are running \
                 (serve.max_server_instances); try again when a session ends"
            ),
            Full::Agent(agent, limit) => write!(
                f,
                "agent '{agent}' has {limit} server connections of its sessions' own running \
                 (serve.max_server_instances_per_agent); end a session (HTTP DELETE) first"
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_agent: HashMap<String, usize>,
    per_server: BTreeMap<String, usize>,
}

/// The connections of sessions' own that run.
#[derive(Default, Clone)]
pub struct Instances(Arc<Mutex<Counts>>);

impl Instances {
    /// A place for one more connection of `agent`'s to `server`, within
    /// `limits`.
    pub fn take(&self, agent: &str, server: &str, limits: Limits) -> Result<Place, Full> {
        let mut counts = self.counts();
        if counts.total >= limits.total {
            return Err(Full::Total(limits.total));
        }
        let agents = counts.per_agent.get(agent).copied().unwrap_or(0);
        if agents >= limits.per_agent {
            return Err(Full::Agent(agent.to_string(), limits.per_agent));
        }
        counts.total += 1;
        *counts.per_agent.entry(agent.to_string()).or_default() += 1;
        let running = counts.per_server.entry(server.to_string()).or_default();
        *running += 1;
        crate::util::metrics::global().server_instances(server, *running as u64);
        Ok(Place {
            instances: self.clone(),
            agent: agent.to_string(),
            server: server.to_string(),
        })
    }

    /// How many run for `server`.
    pub fn of_server(&self, server: &str) -> usize {
        self.counts().per_server.get(server).copied().unwrap_or(0)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's place, given back when dropped.
pub struct Place {
    instances: Instances,
    agent: String,
    server: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = self.instances.counts();
        counts.total -= 1;
        if let Some(n) = counts.per_agent.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                counts.per_agent.remove(&self.agent);
            }
        }
        if let Some(n) = counts.per_server.get_mut(&self.server) {
            *n -= 1;
            crate::util::metrics::global().server_instances(&self.server, *n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_in_all_and_per_agent_and_given_back() {
        let instances = Instances::default();
        let limits = Limits {
            total: 3,
            per_agent: 2,
        };
        let a1 = instances.take("a", "s", limits).unwrap();
        let _a2 = instances.take("a", "s", limits).unwrap();
        assert_eq!(
            instances.take("a", "s", limits).err(),
            Some(Full::Agent("a".into(), 2))
        );
        let _b1 = instances.take("b", "t", limits).unwrap();
        assert_eq!(instances.take("c", "s", limits).err(), Some(Full::Total(3)));
        assert_eq!((instances.of_server("s"), instances.of_server("t")), (2, 1));
        drop(a1);
        assert_eq!(instances.of_server("s"), 1);
        assert!(
            instances.take("a", "s", limits).is_ok(),
            "a place was given back"
        );
    }
}
