//! Where a request comes in to `portcullis serve`, as the trail sees it:
//! every refusal at the door (a bad origin, credentials, an unknown
//! session, a message no relay could read, an agent over its share) is an
//! access record. A flood of refusals must not fill the disk: the first
//! refusal of a kind from one peer address in a window of
//! [`WINDOW`] is written whole, the ones after it in that window are
//! counted, and the count is written as one record when the window ends
//! (`repeated`, with `since` the time of the first).

use crate::audit::AccessRecord;
use crate::identity::Identity;
use crate::relay::generation::Current;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a window of one peer's refusals of one kind lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How many peers' windows are kept at once; past it, the refusals of new
/// peers share one window per kind (peer `*`), so a flood from many
/// addresses is bounded too.
const MOST_WINDOWS: usize = 4096;

/// The refusals seen in one window.
struct Window {
    opened: Instant,
    /// When the first was written (RFC 3339).
    since: String,
    /// How many came after it.
    repeated: u64,
    /// The latest of them, to write with the count.
    latest: Option<AccessRecord>,
}

/// The refusals at one listener's door, by peer address and kind.
#[derive(Default)]
pub struct Refusals {
    windows: Mutex<HashMap<(Option<IpAddr>, &'static str), Window>>,
}

impl Refusals {
    /// Whether `record` is to be written now (the first of its window);
    /// otherwise it is counted. Windows that ended come back as the
    /// records that sum them up, to be written first.
    fn admit(
        &self,
        record: &AccessRecord,
        peer: IpAddr,
        now: Instant,
    ) -> (bool, Vec<AccessRecord>) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let ended = close_ended(&mut windows, now);
        let mut key = (Some(peer), record.event);
        if !windows.contains_key(&key) && windows.len() >= MOST_WINDOWS {
            key.0 = None;
        }
        match windows.get_mut(&key) {
            Some(window) => {
                window.repeated += 1;
                let mut latest = record.clone();
                if key.0.is_none() {
                    latest.peer = "*".into();
                }
                window.latest = Some(latest);
                (false, ended)
            }
            None => {
                let window = Window {
                    opened: now,
                    since: record.time.clone(),
                    repeated: 0,
                    latest: None,
                };
                windows.insert(key, window);
                (true, ended)
            }
        }
    }

    /// The summaries of the windows that ended by `now` (all of them with
    /// `all`), taken out.
    pub fn ended(&self, now: Instant, all: bool) -> Vec<AccessRecord> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if all {
            let summaries = windows.drain().filter_map(|(_, w)| summary(w)).collect();
            return summaries;
        }
        close_ended(&mut windows, now)
    }
}

/// Takes the windows that ended by `now` out of `windows`, as the records
/// summing them up (none for a window with one refusal, written already).
fn close_ended(
    windows: &mut HashMap<(Option<IpAddr>, &'static str), Window>,
    now: Instant,
) -> Vec<AccessRecord> {
    let ended: Vec<_> = windows
        .iter()
        .filter(|(_, w)| now.duration_since(w.opened) >= WINDOW)
        .map(|(key, _)| *key)
        .collect();
    ended
        .into_iter()
        .filter_map(|key| windows.remove(&key))
        .filter_map(summary)
        .collect()
}

/// The record summing `window` up: its latest refusal, with how many came
/// after the first and since when.
fn summary(window: Window) -> Option<AccessRecord> {
    let mut record = window.latest?;
    record.repeated = Some(window.repeated);
    record.since = Some(window.since);
    Some(record)
}

/// Where one request came in: its refusals are audited as access events.
pub struct Door {
    pub current: Arc<Current>,
    pub refusals: Arc<Refusals>,
    pub path: String,
    pub peer: SocketAddr,
}

impl Door {
    /// Writes `record` off the async workers (a sink may wait for the
    /// disk); the request is answered once it is written, so a flood of
    /// requests waits for the trail instead of queueing records.
    pub async fn record(&self, record: AccessRecord) {
        write(&self.current, vec![record]).await;
    }

    /// `record`, a refusal: written if it is the first of its kind from
    /// this peer in its window, counted otherwise.
    async fn refusal(&self, record: AccessRecord) {
        let (first, mut ended) = self.refusals.admit(&record, self.peer.ip(), Instant::now());
        if first {
            ended.push(record);
        }
        if !ended.is_empty() {
            write(&self.current, ended).await;
        }
    }

    /// A request turned away before it reached MCP (a path that is no
    /// endpoint, a method or header missing): audited as
    /// `request-refused`, answered `status` and `why`.
    pub async fn turned_away(
        &self,
        identity: Option<&Identity>,
        status: hyper::StatusCode,
        why: &'static str,
    ) -> hyper::Response<crate::http::Body> {
        let reason = format!("HTTP {}: {why}", status.as_u16());
        self.refused("request-refused", identity, reason).await;
        crate::http::plain(status, why)
    }

    /// `event` refused (by `identity`, once known), for `why`.
    pub async fn refused(&self, event: &'static str, identity: Option<&Identity>, why: String) {
        let agent = identity.map(|i| &i.agent);
        let mut record = AccessRecord::new(event, agent, &self.path, self.peer);
        record.reason = Some(why);
        self.refusal(record).await;
    }

    /// A session id this agent has no session by (another agent's, an
    /// expired or made-up one).
    pub async fn unknown_session(&self, identity: &Identity) {
        let why = "no session with this Mcp-Session-Id for this agent".into();
        self.refused("session-unknown", Some(identity), why).await;
    }

    /// A message refused before any relay judged it, with its code and the
    /// sha256 of its bytes when they were read.
    pub async fn message_refused(
        &self,
        identity: Option<&Identity>,
        code: i32,
        why: &str,
        bytes: Option<&[u8]>,
    ) {
        let agent = identity.map(|i| &i.agent);
        let mut record = AccessRecord::new("message-refused", agent, &self.path, self.peer);
        record.reason = Some(why.to_string());
        record.code = Some(code);
        record.message_sha256 = bytes.map(crate::audit::bytes_digest);
        self.refusal(record).await;
    }
}

/// Writes `records` with the generation in charge, off the async workers.
pub async fn write(current: &Arc<Current>, records: Vec<AccessRecord>) {
    let current = current.clone();
    let written = tokio::task::spawn_blocking(move || {
        let generation = current.get();
        for record in &records {
            if let Err(e) = generation.audit.write(record) {
                tracing::error!(event = record.event, "cannot audit an access: {e:#}");
            }
        }
    })
    .await;
    if let Err(e) = written {
        tracing::error!("auditing an access did not finish: {e}");
    }
}

/// Writes the summaries of the refusal windows as they end, every
/// [`WINDOW`], until `stop` completes; then those still open.
pub async fn summarize(
    current: Arc<Current>,
    refusals: Arc<Refusals>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(WINDOW);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let ended = refusals.ended(Instant::now(), false);
                if !ended.is_empty() {
                    write(&current, ended).await;
                }
            }
            () = &mut stop => break,
        }
    }
    let open = refusals.ended(Instant::now(), true);
    if !open.is_empty() {
        write(&current, open).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(event: &'static str, peer: &str) -> AccessRecord {
        let mut record = AccessRecord::new(event, None, "/mcp", peer.parse().unwrap());
        record.reason = Some("bad".into());
        record
    }

    #[test]
    fn repeated_refusals_from_one_peer_are_one_record_per_window_with_a_count() {
        let refusals = Refusals::default();
        let start = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = refusal("credentials-refused", "10.0.0.1:1000");
        let (written, ended) = refusals.admit(&first, ip, start);
        assert!(written && ended.is_empty(), "the first is written whole");
        for n in 1..=5u64 {
            let again = refusal("credentials-refused", "10.0.0.1:1001");
            let (written, ended) = refusals.admit(&again, ip, start + Duration::from_millis(n));
            assert!(!written && ended.is_empty(), "counted, not written");
        }
        // Another kind, or another peer, has a window of its own.
        let other = refusal("origin-refused", "10.0.0.1:1002");
        assert!(refusals.admit(&other, ip, start).0);
        let elsewhere = refusal("credentials-refused", "10.0.0.2:1000");
        assert!(
            refusals
                .admit(&elsewhere, "10.0.0.2".parse().unwrap(), start)
                .0
        );
        assert!(refusals.ended(start + WINDOW / 2, false).is_empty());
        let ended = refusals.ended(start + WINDOW, false);
        let [summary] = ended.try_into().unwrap();
        assert_eq!(summary.event, "credentials-refused");
        assert_eq!(summary.repeated, Some(5));
        assert_eq!(summary.since.as_deref(), Some(first.time.as_str()));
        assert_eq!(summary.peer, "10.0.0.1:1001");
        // The next refusal opens a new window, written whole.
        let later = refusal("credentials-refused", "10.0.0.1:1003");
        assert!(refusals.admit(&later, ip, start + WINDOW * 2).0);
    }

    #[test]
    fn past_so_many_peers_new_ones_share_a_window() {
        let refusals = Refusals::default();
        let now = Instant::now();
        for n in 0..MOST_WINDOWS as u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(n));
            let record = refusal("credentials-refused", &format!("{ip}:1"));
            assert!(refusals.admit(&record, ip, now).0);
        }
        let written: usize = (0..100u32)
            .map(|n| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(1_000_000 + n));
                let record = refusal("credentials-refused", &format!("{ip}:1"));
                usize::from(refusals.admit(&record, ip, now).0)
            })
            .sum();
        assert_eq!(written, 1, "one window for all the peers past the bound");
        let summaries = refusals.ended(now, true);
        let shared = summaries.iter().find(|r| r.peer == "*").unwrap();
        assert_eq!(shared.repeated, Some(99));
    }
}
