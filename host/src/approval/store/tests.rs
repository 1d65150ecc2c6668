//! The approvals store against a real SQLite file.

use super::sqlite::SCHEMA;
use super::*;
use rusqlite::Connection;

/// A pending approval, as stored.
pub(crate) fn approval() -> Approval {
    let request = request("0192-test", Duration::from_secs(60));
    Approval {
        id: request.id,
        created_ms: 1,
        expires_ms: 60_001,
        call: request.call,
        terms: request.terms,
        votes: Vec::new(),
        state: State::Pending,
        decided_by: None,
        decided_ms: None,
        comment: None,
        holder: request.holder,
        elicit: false,
        used_ms: None,
    }
}

/// A request to hold a destructive call, expiring in `expires_in`.
pub(crate) fn request(id: &str, expires_in: Duration) -> Request {
    Request {
        id: id.into(),
        call: Call {
            agent: "bot".into(),
            server: "fs".into(),
            method: "tools/call".into(),
            tool: Some("delete".into()),
            arguments_sha256: "ab".into(),
            arguments: r#"{"path":"/x"}"#.into(),
            policy: "gate".into(),
            reason: "destructive".into(),
            tags: vec!["risk:destructive".into()],
        },
        terms: Terms::default(),
        expires_in,
        holder: "host-1".into(),
        elicit: false,
        max_pending: 0,
    }
}

/// The stores the tests run against, each new and empty: an SQLite file
/// and, where `PORTCULLIS_TEST_POSTGRES` names a PostgreSQL server
/// (`postgres://USER@HOST:PORT`, which `scripts/test` starts), a database
/// of its own on that server.
pub(crate) fn locations() -> Vec<(tempfile::TempDir, StoreLocation)> {
    let dir = tempfile::tempdir().unwrap();
    let file = StoreLocation::File(dir.path().join("state/approvals.db"));
    let mut locations = vec![(dir, file)];
    if let Ok(server) = std::env::var("PORTCULLIS_TEST_POSTGRES") {
        let name = format!("approvals_{:016x}", rand::random::<u64>());
        let mut admin =
            ::postgres::Client::connect(&format!("{server}/postgres"), ::postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = format!("{server}/{name}");
        let base = std::path::PathBuf::from("/");
        locations.push((
            tempfile::tempdir().unwrap(),
            StoreLocation::Postgres { url, base },
        ));
    }
    locations
}

/// Each store of [`locations`], opened.
fn stores() -> Vec<(tempfile::TempDir, Approvals)> {
    locations()
        .into_iter()
        .map(|(dir, location)| (dir, Approvals::open(&location).unwrap()))
        .collect()
}

#[test]
fn an_approval_is_decided_once() {
    for (_dir, store) in stores() {
        let pending = store
            .request(&request("0192-aaaa", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(pending.state, State::Pending);
        assert_eq!(pending.call.tags, ["risk:destructive"]);
        let approved = store
            .settle("0192-aaaa", State::Approved, "alice", Some("ok"))
            .unwrap();
        assert_eq!(approved.state, State::Approved);
        assert_eq!(approved.decided_by.as_deref(), Some("alice"));
        let again = store
            .settle("0192-aaaa", State::Denied, "bob", None)
            .unwrap();
        assert_eq!(again.state, State::Approved, "a decision is final");
        assert_eq!(store.list(Some(State::Pending), 10).unwrap(), vec![]);
    }
}

#[test]
fn a_late_decision_expires_the_approval_instead() {
    for (_dir, store) in stores() {
        store.request(&request("late-1", Duration::ZERO)).unwrap();
        let settled = store
            .settle("late-1", State::Approved, "alice", None)
            .unwrap();
        assert_eq!(settled.state, State::Expired);
        assert_eq!(settled.decided_by.as_deref(), Some("portcullis"));
    }
}

#[test]
fn orphans_are_cancelled_and_ambiguous_prefixes_refused() {
    for (_dir, store) in stores() {
        store
            .request(&request("same-1", Duration::from_secs(60)))
            .unwrap();
        let mut other = request("same-2", Duration::from_secs(60));
        other.holder = "host-2".into();
        store.request(&other).unwrap();
        let ambiguous = store.find("same").unwrap_err();
        assert!(
            ambiguous.downcast_ref::<Ambiguous>().is_some(),
            "{ambiguous}"
        );
        assert!(ambiguous.to_string().contains("more than one"));
        assert!(
            store.get("same").unwrap().is_none(),
            "get takes exact ids only"
        );
        let refused = store.decide("same", Verdict::Approve, "alice", None);
        assert!(matches!(refused, Err(Refused::Ambiguous(_))), "{refused:?}");
        let cancelled = store.cancel_orphans(|holder| holder == "host-2").unwrap();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(cancelled[0].id, "same-1");
        assert_eq!(cancelled[0].state, State::Cancelled);
        let pending = store.list(Some(State::Pending), 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, "same-2");
    }
}

#[test]
fn a_two_person_rule_needs_two_distinct_named_approvers() {
    for (_dir, store) in stores() {
        let mut two = request("two-1", Duration::from_secs(60));
        two.terms = Terms {
            approvers: Some(vec!["alice".into(), "bob".into(), "carol".into()]),
            required: 2,
            reuse_ms: 0,
        };
        store.request(&two).unwrap();
        let refused = store.decide("two-1", Verdict::Approve, "mallory", None);
        assert!(
            matches!(refused, Err(Refused::NotAllowed { .. })),
            "{refused:?}"
        );
        let first = store
            .decide("two-1", Verdict::Approve, "alice", Some("fine"))
            .unwrap();
        assert_eq!(first.state, State::Pending, "one of two approvals");
        assert_eq!(first.votes.len(), 1);
        let again = store.decide("two-1", Verdict::Approve, "alice", None);
        assert!(
            matches!(again, Err(Refused::AlreadyApproved(_))),
            "{again:?}"
        );
        let second = store
            .decide("two-1", Verdict::Approve, "bob", None)
            .unwrap();
        assert_eq!(second.state, State::Approved);
        assert_eq!(second.decided_by.as_deref(), Some("alice, bob"));
        let late = store.decide("two-1", Verdict::Deny, "carol", None);
        assert!(matches!(late, Err(Refused::Ended(_))), "{late:?}");
    }
}

#[test]
fn one_deny_ends_a_two_person_approval() {
    for (_dir, store) in stores() {
        let mut two = request("deny-1", Duration::from_secs(60));
        two.terms.required = 2;
        store.request(&two).unwrap();
        store
            .decide("deny-1", Verdict::Approve, "alice", None)
            .unwrap();
        let denied = store
            .decide("deny-1", Verdict::Deny, "bob", Some("not today"))
            .unwrap();
        assert_eq!(denied.state, State::Denied);
        assert_eq!(denied.decided_by.as_deref(), Some("bob"));
    }
}

#[test]
fn an_approval_is_reused_only_for_the_same_call_within_its_window() {
    for (_dir, store) in stores() {
        let mut reused = request("reuse-1", Duration::from_secs(60));
        reused.terms.reuse_ms = 60_000;
        store.request(&reused).unwrap();
        let call = reused.call.clone();
        assert!(
            store.reusable(&call, now_ms()).unwrap().is_none(),
            "pending"
        );
        store
            .decide("reuse-1", Verdict::Approve, "alice", None)
            .unwrap();
        let found = store.reusable(&call, now_ms()).unwrap().unwrap();
        assert_eq!(found.id, "reuse-1");
        let other = Call {
            arguments_sha256: "cd".into(),
            ..call.clone()
        };
        assert!(store.reusable(&other, now_ms()).unwrap().is_none());
        let later = now_ms() + 61_000;
        assert!(
            store.reusable(&call, later).unwrap().is_none(),
            "window over"
        );
    }
}

#[test]
fn a_store_of_the_first_schema_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let old = Connection::open(&path).unwrap();
    old.execute_batch(SCHEMA).unwrap();
    old.execute(
        &format!(
            "INSERT INTO approvals ({}) VALUES ('old-1', 1, 2, 'bot', 'fs', 'tools/call', NULL, \
             'ab', '{{}}', 'gate', 'why', '[]', 'expired', 'portcullis', 2, NULL, 'h')",
            COLUMNS.split(", approvers").next().unwrap()
        ),
        [],
    )
    .unwrap();
    drop(old);
    let store = Approvals::open(&StoreLocation::File(path.clone())).unwrap();
    let old = store.get("old-1").unwrap().unwrap();
    assert_eq!(old.terms, Terms::default());
    Approvals::open(&StoreLocation::File(path.clone())).unwrap();
}

#[test]
fn a_receipt_runs_its_call_once() {
    for (_dir, store) in stores() {
        store
            .request(&request("once-1", Duration::from_secs(60)))
            .unwrap();
        assert!(!store.consume("once-1").unwrap(), "pending: nothing to use");
        store
            .settle("once-1", State::Approved, "alice", None)
            .unwrap();
        assert!(store.consume("once-1").unwrap());
        assert!(!store.consume("once-1").unwrap(), "used once already");
        assert!(store.get("once-1").unwrap().unwrap().used_ms.is_some());
    }
}

#[test]
fn an_agent_may_have_only_so_many_pending() {
    for (_dir, store) in stores() {
        for i in 0..3 {
            let mut held = request(&format!("cap-{i}"), Duration::from_secs(60));
            held.max_pending = 3;
            store.request(&held).unwrap();
        }
        let mut fourth = request("cap-3", Duration::from_secs(60));
        fourth.max_pending = 3;
        let refused = store.request(&fourth).unwrap_err();
        assert!(
            refused.downcast_ref::<TooManyPending>().is_some(),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("already has 3 calls waiting"),
            "the refusal speaks for itself: {refused}"
        );
        let mut other = fourth.clone();
        other.id = "cap-other".into();
        other.call.agent = "another-bot".into();
        store
            .request(&other)
            .expect("another agent has its own count");
        store.settle("cap-0", State::Denied, "alice", None).unwrap();
        store.request(&fourth).expect("one ended, so there is room");
        let mut expired = request("cap-x", Duration::ZERO);
        expired.call.agent = "third-bot".into();
        expired.max_pending = 1;
        store.request(&expired).unwrap();
        let mut after = request("cap-y", Duration::from_secs(60));
        after.call.agent = "third-bot".into();
        after.max_pending = 1;
        store
            .request(&after)
            .expect("an expired approval does not count");
    }
}

#[test]
fn the_clients_user_decides_only_where_the_rule_lets_it() {
    for (_dir, store) in stores() {
        store
            .request(&request("plain-1", Duration::from_secs(60)))
            .unwrap();
        let refused = store.answer_by_user("plain-1", State::Approved, "user", None);
        assert!(
            matches!(refused, Err(Refused::NotAskable(_))),
            "{refused:?}"
        );
        let mut named = request("named-1", Duration::from_secs(60));
        named.elicit = true;
        named.terms.approvers = Some(vec!["alice".into()]);
        store.request(&named).unwrap();
        let refused = store.answer_by_user("named-1", State::Approved, "user", None);
        assert!(
            matches!(refused, Err(Refused::NotAskable(_))),
            "{refused:?}"
        );
        let mut two = request("two-2", Duration::from_secs(60));
        two.elicit = true;
        two.terms.required = 2;
        store.request(&two).unwrap();
        assert!(
            store
                .answer_by_user("two-2", State::Approved, "user", None)
                .is_err()
        );
        let mut asked = request("asked-1", Duration::from_secs(60));
        asked.elicit = true;
        store.request(&asked).unwrap();
        let approved = store
            .answer_by_user("asked-1", State::Approved, "user", None)
            .unwrap();
        assert_eq!(approved.state, State::Approved);
        assert_eq!(
            store.get("named-1").unwrap().unwrap().state,
            State::Pending,
            "untouched"
        );
    }
}

#[test]
fn waiting_approvals_that_ended_are_found_together() {
    for (_dir, store) in stores() {
        for id in ["w-1", "w-2", "w-3"] {
            store
                .request(&request(id, Duration::from_secs(60)))
                .unwrap();
        }
        store.settle("w-2", State::Denied, "bob", None).unwrap();
        let ids = ["w-1", "w-2", "w-3", "w-4"].map(String::from);
        let ended = store.ended_among(&ids).unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, "w-2");
    }
}

#[test]
fn the_store_is_shared_between_handles_and_private() {
    use std::os::unix::fs::PermissionsExt;
    for (_dir, location) in locations() {
        let store = Approvals::open(&location).unwrap();
        store
            .request(&request("shared-1", Duration::from_secs(60)))
            .unwrap();
        let other = Approvals::open(&location).unwrap();
        assert_eq!(
            other.receipt_key(),
            store.receipt_key(),
            "receipts are honoured by every process sharing the store"
        );
        let (told, heard) = std::sync::mpsc::channel();
        let told = std::sync::Mutex::new(told);
        store.on_change(move || {
            let _ = told.lock().unwrap().send(());
        });
        while heard.try_recv().is_ok() {}
        other
            .settle("shared-1", State::Denied, "bob", Some("no"))
            .unwrap();
        assert_eq!(store.get("shared-1").unwrap().unwrap().state, State::Denied);
        match &location {
            StoreLocation::File(path) => {
                let mode = std::fs::metadata(path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
                assert_eq!(
                    store.poll_interval(),
                    POLL,
                    "nothing tells of changes elsewhere"
                );
            }
            StoreLocation::Postgres { .. } => {
                heard
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a change by another handle is notified");
                assert_eq!(store.poll_interval(), BACKSTOP);
            }
        }
    }
}

#[test]
fn a_store_reports_its_schema_version_without_changing_it() {
    for (_dir, location) in locations() {
        let latest = match &location {
            StoreLocation::File(_) => sqlite::LATEST,
            StoreLocation::Postgres { .. } => postgres::LATEST,
        };
        assert_eq!(
            schema_version(&location).unwrap(),
            (None, latest),
            "{location}"
        );
        Approvals::open(&location).unwrap();
        assert_eq!(schema_version(&location).unwrap(), (Some(latest), latest));
    }
}
