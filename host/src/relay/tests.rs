//! The relay's decision path, driven without a transport.

use super::*;
use crate::contract::Agent;
use crate::policy::engine::PolicyEngine;
use serde_json::Value;

/// A relay with no policies whose trail is a file in `dir`.
fn relay(dir: &std::path::Path, limits: &str) -> Relay {
    let config = dir.join("portcullis.toml");
    let text = format!("[engine]\ncache_dir = \"cache\"\n{limits}");
    std::fs::write(&config, text).unwrap();
    let loaded = crate::config::Config::load(&config).unwrap();
    let engine = PolicyEngine::new(&loaded.engine).unwrap();
    let trail = dir.join("audit.jsonl");
    let generation = Generation::load(&engine, &config, Some(&trail), 1, None).unwrap();
    let agent = Agent {
        id: "bot".into(),
        attributes: vec![],
    };
    Relay::new(
        Arc::new(Current::new(generation)),
        Session::new("fs".into(), agent),
    )
}

fn trail(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every record reads back"))
        .collect()
}

fn from_client(relay: &Relay, text: &str) -> Delivery {
    relay.handle(
        Direction::ClientToServer,
        Frame::Line(text.as_bytes().to_vec()),
    )
}

fn reply(delivery: &Delivery) -> Value {
    serde_json::from_slice(delivery.reply.as_deref().expect("a reply")).unwrap()
}

#[test]
fn a_call_naming_its_tool_twice_is_refused_not_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let twice = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"read_text_file","arguments":{"path":"/a"},"name":"write_file"}}"#;
    let delivery = from_client(&relay, twice);
    assert!(delivery.forward.is_none(), "never reaches the server");
    let answer = reply(&delivery);
    assert_eq!(answer["id"], 5);
    assert_eq!(answer["error"]["code"], INVALID_REQUEST);
    let [record] = trail(dir.path()).try_into().unwrap();
    assert_eq!(record["outcome"], "deny");
    assert_eq!(record["jsonrpc_id"], 5);
    assert_eq!(
        record["message_sha256"],
        crate::audit::bytes_digest(twice.as_bytes())
    );
}

#[test]
fn arguments_another_parser_reads_differently_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    for arguments in [
        r#"{"path":"/x","pad":1e400}"#,
        r#"{"path":"/x","content":"\ud800"}"#,
    ] {
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"write_file","arguments":{arguments}}}}}"#
        );
        let delivery = from_client(&relay, &call);
        assert!(delivery.forward.is_none(), "{call}");
        assert_eq!(reply(&delivery)["error"]["code"], PARSE_ERROR);
    }
    let toolless =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":["write_file"]}}"#;
    let delivery = from_client(&relay, toolless);
    assert!(delivery.forward.is_none());
    assert_eq!(reply(&delivery)["error"]["code"], INVALID_PARAMS);
    let records = trail(dir.path());
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["outcome"] == "deny"));
    assert_eq!(records[2]["method"], "tools/call");
}

#[test]
fn an_unreadable_id_never_reaches_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "[limits]\nmax_message_bytes = 1024\n");
    from_client(&relay, r#"{"jsonrpc":"2.0","id":1e400,"method":"ping"}"#);
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1e400,"method":"x","params":"{}"}}"#,
        "a".repeat(2000)
    );
    let oversized = crate::protocol::framing::FrameReader::new(big.as_bytes(), 1024)
        .read_frame()
        .unwrap()
        .unwrap();
    relay.handle(Direction::ClientToServer, oversized);
    let records = trail(dir.path());
    assert_eq!(records.len(), 2);
    assert!(
        records.iter().all(|r| r.get("jsonrpc_id").is_none()),
        "{records:?}"
    );
}

#[test]
fn an_oversized_line_ending_in_a_multibyte_character_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "[limits]\nmax_message_bytes = 1024\n");
    let mut line = format!(
        r#"{{"jsonrpc":"2.0","method":"x","params":{{"a":"{}","#,
        "z".repeat(2000)
    );
    line.push_str(r#""b":é1}}"#);
    let frame = crate::protocol::framing::FrameReader::new(line.as_bytes(), 1024)
        .read_frame()
        .unwrap()
        .unwrap();
    let delivery = relay.handle(Direction::ClientToServer, frame);
    assert_eq!(reply(&delivery)["error"]["code"], INVALID_REQUEST);
    // The relay goes on judging.
    let ping = from_client(&relay, r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
    assert!(ping.forward.is_some());
}

#[test]
fn a_failure_inside_portcullis_refuses_the_message_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let refused = relay.failed(Direction::ClientToServer, &"index out of bounds", None);
    assert!(refused.forward.is_none());
    let error: Value = serde_json::from_str(&refused.reply.unwrap()).unwrap();
    assert_eq!(error["error"]["code"], INTERNAL_ERROR);
    let answer = relay.failed(Direction::ServerToClient, &"index out of bounds", None);
    let error: Value = serde_json::from_str(&answer.forward.unwrap()).unwrap();
    assert_eq!(
        error["error"]["code"], INTERNAL_ERROR,
        "whoever waits learns of it"
    );
    let records = trail(dir.path());
    assert_eq!(records.len(), 2);
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("index out of bounds")
    );
    assert_eq!(
        panic_message(&*std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err()),
        "boom 7"
    );
}

fn from_server(relay: &Relay, text: &str) -> Delivery {
    relay.handle(
        Direction::ServerToClient,
        Frame::Line(text.as_bytes().to_vec()),
    )
}

#[test]
fn an_answer_is_judged_as_the_answer_to_its_own_request_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{}}}"#;
    assert!(from_client(&relay, call).forward.is_some());
    // The same id again while the first is in flight: whose would the
    // answer be?
    let again =
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let refused = from_client(&relay, again);
    assert!(refused.forward.is_none());
    assert!(
        reply(&refused)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already in use")
    );
    // An answer nobody asked for is dropped, never judged as no one's.
    let stray = from_server(&relay, r#"{"jsonrpc":"2.0","id":8,"result":{}}"#);
    assert!(stray.forward.is_none() && stray.reply.is_none());
    // The answer to 7, however the server spells its id, is read_file's.
    let answer = from_server(
        &relay,
        r#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#,
    );
    assert!(answer.forward.is_some());
    let records = trail(dir.path());
    let answered = records.last().unwrap();
    assert_eq!(answered["tool"], "read_file");
    assert_eq!(answered["direction"], "server-to-client");
    // Answered, the id is free again; a cancelled request's answer is
    // dropped.
    assert!(from_client(&relay, again).forward.is_some());
    from_client(
        &relay,
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}"#,
    );
    let late = from_server(&relay, r#"{"jsonrpc":"2.0","id":7,"result":{}}"#);
    assert!(late.forward.is_none());
}

#[test]
fn requests_and_answers_paired_by_their_transport_may_share_an_id() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let first = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{}}}"#;
    let second =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let judge = |direction, text: &str, pair| {
        let message = Message::parse(text).unwrap();
        let arrival = Arrival::paired(Some(pair));
        let step = relay.judge_read(direction, text, Read::View(&message), &arrival);
        step.forward.is_some()
    };
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    assert!(judge(c2s, first, 10));
    assert!(judge(c2s, second, 11));
    let answer = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
    assert!(judge(s2c, answer, 11));
    assert!(judge(s2c, answer, 10));
    let tools: Vec<Value> = trail(dir.path())
        .into_iter()
        .filter(|r| r["direction"] == "server-to-client")
        .map(|r| r["tool"].clone())
        .collect();
    assert_eq!(tools, ["echo", "read_file"]);
}

#[test]
fn an_unreadable_answer_is_refused_under_the_id_its_transport_gives() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let request = r#"{"jsonrpc":"2.0","id":"client-1","method":"ping"}"#;
    let message = Message::parse(request).unwrap();
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    let arrival = Arrival::paired(Some(4));
    let sent = relay.judge_read(c2s, request, Read::View(&message), &arrival);
    assert!(sent.forward.is_some());
    // The server answered under the id of its own connection, ambiguously.
    let answer = r#"{"jsonrpc":"2.0","id":17,"result":{"a":1,"a":2}}"#;
    let why = Message::parse(answer).unwrap_err();
    let client = RawValue::from_string(r#""client-1""#.into()).unwrap();
    let read = Read::Unreadable(&why, Some(&client));
    let refused = relay.judge_read(s2c, answer, read, &arrival);
    let error: Value = serde_json::from_str(&refused.forward.unwrap()).unwrap();
    assert_eq!(error["id"], "client-1");
    assert_eq!(error["error"]["code"], INTERNAL_ERROR);
    let why = error["error"]["message"].as_str().unwrap();
    assert!(why.contains("unusable answer"), "{why}");
}

#[test]
fn a_client_message_is_judged_as_its_callers_and_reaches_only_a_granted_server() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path(), "");
    let call =
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let judge = |direction, text: &str, caller: Option<Identity>, pair| {
        let message = Message::parse(text).unwrap();
        let arrival = Arrival {
            caller,
            pair: Some(pair),
            ..Arrival::default()
        };
        let step = relay.judge_read(direction, text, Read::View(&message), &arrival);
        (step.forward.map(Cow::into_owned), step.reply)
    };
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    // Granted: relayed, and judged as the caller's (not the session's first
    // agent), its answer too.
    let granted = Identity::for_tests_with("ops-bot", &["fs"]);
    let (sent, _) = judge(c2s, call, Some(granted), 1);
    assert!(sent.is_some());
    let (answered, _) = judge(s2c, r#"{"jsonrpc":"2.0","id":3,"result":{}}"#, None, 1);
    assert!(answered.is_some());
    // Its grant no longer includes the server: refused, never relayed.
    let narrowed = Identity::for_tests_with("ops-bot", &["other"]);
    let (sent, refused) = judge(c2s, call, Some(narrowed), 2);
    assert!(
        sent.is_none(),
        "a server outside the grant is never reached"
    );
    let refused: Value = serde_json::from_str(&refused.unwrap()).unwrap();
    assert_eq!(refused["error"]["code"], DENIED);
    let why = refused["error"]["message"].as_str().unwrap();
    assert!(why.contains("may not use server 'fs'"), "{why}");
    let records = trail(dir.path());
    let agents: Vec<&Value> = records.iter().map(|r| &r["agent"]).collect();
    assert_eq!(agents, ["ops-bot", "ops-bot", "ops-bot"]);
    let denied = &records[2];
    assert_eq!(denied["outcome"], "deny");
    assert_eq!(denied["decided_by"], boundary::GRANT);
    assert!(
        denied["tags"]
            .as_array()
            .unwrap()
            .contains(&"grant:refused".into())
    );
}
