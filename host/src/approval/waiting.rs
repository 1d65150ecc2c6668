//! Waiting for decisions without a thread per held call: one watcher thread
//! per process looks at the approvals store for every call this process
//! holds — at once when this process changed the store (an approver on its
//! admin listener, a cancelled call, or, where the store notifies, a
//! decision on another replica), else every
//! [`Approvals::poll_interval`] for decisions made elsewhere (the CLI,
//! another process) — expires the overdue ones,
//! and hands each ended approval to what its holder said to do then. A held
//! call costs an entry in a map, never a blocked thread, so calls held by one
//! agent cannot starve anybody else's.

use crate::approval::store::{Approval, Approvals, EXPIRED, State};
use crate::util::clock::now_ms;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// What to do once an approval has ended (or could not be read).
pub type Then = Box<dyn FnOnce(Result<Approval>) + Send>;

struct Waiter {
    expires_ms: u64,
    then: Then,
}

#[derive(Default)]
struct Waiters {
    by_approval: HashMap<String, Vec<Waiter>>,
    /// Set when the store changed here: look now.
    changed: bool,
}

/// The calls this process holds, waiting for their approvals to end.
pub struct Awaiting {
    store: Arc<Approvals>,
    waiters: Mutex<Waiters>,
    wake: Condvar,
}

impl Awaiting {
    /// Starts watching `store` on a thread of its own (which sleeps while
    /// nothing waits).
    pub fn start(store: Arc<Approvals>) -> Result<Arc<Self>> {
        let awaiting = Arc::new(Self {
            store: store.clone(),
            waiters: Mutex::new(Waiters::default()),
            wake: Condvar::new(),
        });
        let watched = Arc::downgrade(&awaiting);
        store.on_change(move || {
            if let Some(awaiting) = watched.upgrade() {
                awaiting.look_now();
            }
        });
        let watcher = Arc::downgrade(&awaiting);
        std::thread::Builder::new()
            .name("portcullis-approvals".into())
            .spawn(move || watch(&watcher))
            .context("cannot start the approvals watcher")?;
        Ok(awaiting)
    }

    /// Calls `then` once approval `id` (expiring at `expires_ms`) has
    /// ended: decided, expired (this process expires it when its time is
    /// up) or cancelled.
    pub fn on_end(&self, id: &str, expires_ms: u64, then: Then) {
        let mut waiters = self.lock();
        waiters
            .by_approval
            .entry(id.to_string())
            .or_default()
            .push(Waiter { expires_ms, then });
        waiters.changed = true;
        self.wake.notify_one();
    }

    /// How many approvals this process waits on.
    pub fn waiting(&self) -> usize {
        self.lock().by_approval.len()
    }

    fn look_now(&self) {
        self.lock().changed = true;
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until there is something to look at; the approvals waited on
    /// and which of them are overdue.
    fn next_round(&self) -> (Vec<String>, Vec<String>) {
        let mut waiters = self.lock();
        loop {
            if waiters.by_approval.is_empty() {
                waiters.changed = false;
                waiters = self
                    .wake
                    .wait(waiters)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            let now = now_ms();
            let soonest = waiters
                .by_approval
                .values()
                .flatten()
                .map(|w| w.expires_ms)
                .min()
                .unwrap_or(u64::MAX);
            if !waiters.changed && soonest > now {
                let nap = Duration::from_millis(soonest - now).min(self.store.poll_interval());
                let (woken, _) = self
                    .wake
                    .wait_timeout(waiters, nap)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                waiters = woken;
            }
            waiters.changed = false;
            let now = now_ms();
            let ids: Vec<String> = waiters.by_approval.keys().cloned().collect();
            let overdue = waiters
                .by_approval
                .iter()
                .filter(|(_, ws)| ws.iter().any(|w| w.expires_ms <= now))
                .map(|(id, _)| id.clone())
                .collect();
            return (ids, overdue);
        }
    }

    /// Hands `ended` to those waiting on it. One that fails (a bug) is
    /// logged, and the others are still told.
    fn deliver(&self, id: &str, ended: impl Fn() -> Result<Approval>) {
        let waiting = self.lock().by_approval.remove(id).unwrap_or_default();
        for waiter in waiting {
            let ending = ended();
            let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (waiter.then)(ending);
            }));
            if told.is_err() {
                tracing::error!(
                    approval = id,
                    "settling a held call failed inside Portcullis"
                );
            }
        }
    }

    /// One look at the store: overdue approvals expire, ended ones are
    /// delivered.
    fn look(&self, ids: &[String], overdue: &[String]) {
        for id in overdue {
            let expired = self
                .store
                .settle(id, State::Expired, "portcullis", Some(EXPIRED));
            let shared = expired.map_err(|e| format!("{e:#}"));
            self.deliver(id, || shared.clone().map_err(|e| anyhow::anyhow!(e)));
        }
        match self.store.ended_among(ids) {
            Ok(ended) => {
                for approval in ended {
                    self.deliver(&approval.id.clone(), || Ok(approval.clone()));
                }
            }
            Err(e) => tracing::error!("cannot look for decisions in the approvals store: {e:#}"),
        }
    }
}

/// The watcher's loop, until the process lets go of its [`Awaiting`].
fn watch(awaiting: &Weak<Awaiting>) {
    loop {
        let Some(awaiting) = awaiting.upgrade() else {
            return;
        };
        let (ids, overdue) = awaiting.next_round();
        awaiting.look(&ids, &overdue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::store::tests::{locations, request};
    use crate::config::StoreLocation;
    use std::sync::mpsc;

    fn waiting(awaiting: &Awaiting, approval: &Approval) -> mpsc::Receiver<Result<Approval>> {
        let (sender, receiver) = mpsc::channel();
        awaiting.on_end(
            &approval.id,
            approval.expires_ms,
            Box::new(move |ended| {
                let _ = sender.send(ended);
            }),
        );
        receiver
    }

    #[test]
    fn many_held_calls_share_one_watcher_and_each_gets_its_ending() {
        for (_dir, location) in locations() {
            many_held_calls_end_in(&location);
        }
    }

    fn many_held_calls_end_in(location: &StoreLocation) {
        let store = Arc::new(Approvals::open(location).unwrap());
        let awaiting = Awaiting::start(store.clone()).unwrap();
        let mut endings = Vec::new();
        for i in 0..200 {
            let approval = store
                .request(&request(&format!("a-{i}"), Duration::from_secs(60)))
                .unwrap();
            endings.push(waiting(&awaiting, &approval));
        }
        assert_eq!(awaiting.waiting(), 200);
        // Decided here (wakes the watcher at once) and by another handle,
        // as another process would (notified by PostgreSQL, found by
        // polling an SQLite file).
        store.settle("a-7", State::Denied, "alice", None).unwrap();
        let elsewhere = Approvals::open(location).unwrap();
        elsewhere
            .settle("a-9", State::Approved, "bob", None)
            .unwrap();
        let timeout = Duration::from_secs(30);
        let denied = endings[7].recv_timeout(timeout).unwrap().unwrap();
        assert_eq!(denied.state, State::Denied);
        let approved = endings[9].recv_timeout(timeout).unwrap().unwrap();
        assert_eq!(approved.state, State::Approved);
        assert!(endings[8].try_recv().is_err(), "still pending");
        assert_eq!(awaiting.waiting(), 198);
    }

    #[test]
    fn an_overdue_approval_is_expired_by_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Approvals::open(&StoreLocation::File(dir.path().join("a.db"))).unwrap());
        let awaiting = Awaiting::start(store.clone()).unwrap();
        let approval = store
            .request(&request("soon", Duration::from_millis(50)))
            .unwrap();
        let ending = waiting(&awaiting, &approval);
        let expired = ending
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert_eq!(expired.state, State::Expired);
        assert_eq!(
            store.get("soon").unwrap().unwrap().state,
            State::Expired,
            "recorded in the store"
        );
    }
}
