//! Fair shares of a listener's connections. A listener serves so many
//! connections at once (`serve.max_connections`); a limit shared by all is
//! one the first comer could take whole, so each connection also holds a
//! seat: counted against its peer's address until a request on it
//! authenticates, then against its agent. One peer address may hold only
//! so many connections nobody has authenticated on
//! (`serve.max_connections_per_peer`), and one agent only so many
//! (`serve.max_connections_per_agent`), whatever addresses they come from;
//! the rest stay for everyone else, `/healthz` included.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Who holds the seats of one listener.
#[derive(Debug, Default)]
pub struct Seats {
    counts: Mutex<Counts>,
    /// Connections one peer address may hold before any request on them
    /// authenticates (0: no limit).
    per_peer: usize,
}

#[derive(Debug, Default)]
struct Counts {
    /// Connections not (yet) claimed by an agent, by peer address.
    peers: HashMap<IpAddr, usize>,
    /// Connections claimed, by agent.
    agents: HashMap<String, usize>,
}

impl Counts {
    fn count(&mut self, holder: &Holder, delta: isize) {
        let counted = match holder {
            Holder::Peer(ip) => self.peers.entry(*ip).or_default(),
            Holder::Agent(agent) => self.agents.entry(agent.clone()).or_default(),
        };
        *counted = counted.saturating_add_signed(delta);
        if *counted == 0 {
            match holder {
                Holder::Peer(ip) => self.peers.remove(ip),
                Holder::Agent(agent) => self.agents.remove(agent),
            };
        }
    }

    fn of(&self, holder: &Holder) -> usize {
        match holder {
            Holder::Peer(ip) => self.peers.get(ip).copied().unwrap_or(0),
            Holder::Agent(agent) => self.agents.get(agent).copied().unwrap_or(0),
        }
    }
}

/// Whom a seat is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Peer(IpAddr),
    Agent(String),
}

/// One connection's seat; given back when dropped.
#[derive(Debug)]
pub struct Seat {
    seats: Arc<Seats>,
    holder: Mutex<Holder>,
}

/// A peer or agent that holds its whole share of connections already.
#[derive(Debug, PartialEq, Eq)]
pub struct OverShare {
    /// Whose share: an address, or `agent 'ID'`.
    pub whose: String,
    /// The share.
    pub limit: usize,
}

impl std::fmt::Display for OverShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} already holds {} connections, its share of this listener",
            self.whose, self.limit
        )
    }
}

impl Seats {
    /// Seats where one peer address may hold `per_peer` connections nobody
    /// authenticated on (0: no limit).
    pub fn new(per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            per_peer,
            ..Self::default()
        })
    }

    /// A seat for a new connection from `peer`, unless that address holds
    /// its share of unclaimed ones already.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Seat, OverShare> {
        let holder = Holder::Peer(peer);
        let mut counts = self.counts();
        if self.per_peer > 0 && counts.of(&holder) >= self.per_peer {
            return Err(OverShare {
                whose: peer.to_string(),
                limit: self.per_peer,
            });
        }
        counts.count(&holder, 1);
        Ok(Seat {
            seats: self.clone(),
            holder: Mutex::new(holder),
        })
    }

    /// How many connections `agent` holds.
    pub fn of_agent(&self, agent: &str) -> usize {
        self.counts().of(&Holder::Agent(agent.to_string()))
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Seat {
    /// Counts the connection against `agent` (a request on it authenticated
    /// as that agent), unless the agent holds `limit` others already (0: no
    /// limit). A connection stays its agent's once claimed; another agent's
    /// request on it moves it.
    pub fn claim(&self, agent: &str, limit: usize) -> Result<(), OverShare> {
        let claimed = Holder::Agent(agent.to_string());
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        if *holder == claimed {
            return Ok(());
        }
        let mut counts = self.seats.counts();
        if limit > 0 && counts.of(&claimed) >= limit {
            return Err(OverShare {
                whose: format!("agent '{agent}'"),
                limit,
            });
        }
        counts.count(&holder, -1);
        counts.count(&claimed, 1);
        *holder = claimed;
        Ok(())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let holder = self
            .holder
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        self.seats.counts().count(holder, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_peer_holds_its_share_of_unclaimed_connections() {
        let seats = Seats::new(2);
        let first = seats.take(PEER).unwrap();
        let _second = seats.take(PEER).unwrap();
        assert_eq!(
            seats.take(PEER).unwrap_err(),
            OverShare {
                whose: "127.0.0.1".into(),
                limit: 2
            }
        );
        // Claimed by an agent, a connection no longer counts as the peer's.
        first.claim("bot", 0).unwrap();
        let _third = seats.take(PEER).unwrap();
        assert!(seats.take(PEER).is_err());
    }

    #[test]
    fn an_agent_holds_its_share_wherever_it_comes_from_and_gives_seats_back() {
        let seats = Seats::new(0);
        let mut held: Vec<Seat> = (0..3).map(|_| seats.take(PEER).unwrap()).collect();
        held[0].claim("flood", 2).unwrap();
        held[1].claim("flood", 2).unwrap();
        assert!(
            held[1].claim("flood", 2).is_ok(),
            "claiming twice costs nothing"
        );
        let refused = held[2].claim("flood", 2).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "agent 'flood' already holds 2 connections, its share of this listener"
        );
        held[2]
            .claim("other", 2)
            .expect("another agent has its own share");
        assert_eq!(seats.of_agent("flood"), 2);
        held.remove(0);
        assert_eq!(seats.of_agent("flood"), 1);
        drop(held);
        assert_eq!(seats.of_agent("flood"), 0);
        assert!(seats.counts().peers.is_empty() && seats.counts().agents.is_empty());
    }
}
