"""Relay behaviour the SDK clients will not exercise: malformed and oversized
input, byte-for-byte relaying across protocol revisions, batches, messages the
server sends the client, and the child's lifecycle. Uses the real filesystem
server where it can and a fault-injecting double (doubles/echo_server.py)
where the test needs to see or provoke exact bytes."""

import json
import signal
import sys
import time
from pathlib import Path

from conftest import DOUBLES, FS_SERVER, RawProxy, initialize, policy, read_audit, write_config

ECHO = [sys.executable, str(DOUBLES / "echo_server.py")]


def echo_proxy(tmp_path: Path, policies: list[dict], monkeypatch, extra: str = "", **env) -> RawProxy:
    monkeypatch.setenv("ECHO_LOG", str(tmp_path / "received.log"))
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return RawProxy(write_config(tmp_path, policies, extra), tmp_path / "audit.jsonl", ECHO)


def test_malformed_json_gets_a_parse_error_and_the_proxy_keeps_serving(tmp_path: Path, sandbox: Path):
    proxy = RawProxy(write_config(tmp_path, []), tmp_path / "audit.jsonl", ["node", str(FS_SERVER), str(sandbox)])
    error = proxy.request("{this is not json")
    assert error["id"] is None and error["error"]["code"] == -32700
    invalid = proxy.request('{"jsonrpc":"2.0","id":7,"result":{},"error":{"code":1,"message":"both"}}')
    assert invalid["id"] == 7 and invalid["error"]["code"] == -32600
    answer = proxy.request(initialize())
    assert answer["result"]["serverInfo"]["name"]
    code, _ = proxy.close()
    assert code == 0
    kinds = [(r["kind"], r["outcome"]) for r in read_audit(tmp_path / "audit.jsonl")]
    assert kinds[:2] == [("invalid", "deny"), ("invalid", "deny")]


def test_oversized_messages_are_refused_both_ways_and_serving_continues(tmp_path: Path, monkeypatch):
    proxy = echo_proxy(tmp_path, [], monkeypatch, "\n[limits]\nmax_message_bytes = 4096\n", ECHO_HUGE=10_000)
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"blob": "y" * 10_000}})
    refused = proxy.request(big)
    assert refused["id"] == 1 and refused["error"]["code"] == -32600
    assert "exceeds the size limit" in refused["error"]["message"]
    too_big_answer = proxy.request('{"jsonrpc":"2.0","id":2,"method":"test/huge"}')
    assert too_big_answer["id"] == 2 and too_big_answer["error"]["code"] == -32603
    id_last = proxy.request('{"jsonrpc":"2.0","id":"last","method":"test/huge-id-last"}')
    assert id_last["id"] == "last" and id_last["error"]["code"] == -32603
    assert proxy.request('{"jsonrpc":"2.0","id":3,"method":"ping"}')["result"]["method"] == "ping"
    proxy.close()
    received = (tmp_path / "received.log").read_text()
    assert "y" * 100 not in received, "the oversized request never reached the server"


def test_unchanged_messages_are_relayed_byte_for_byte_in_every_revision(tmp_path: Path, monkeypatch):
    proxy = echo_proxy(tmp_path, [policy("read-only", "read_only.wasm", methods=["tools/call"])], monkeypatch)
    lines = [
        # 2025-06-18 and 2025-11-25: initialize handshake, session-scoped.
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"a","version":"1"}}}',
        '{ "jsonrpc" : "2.0", "id" : "x-2", "method" : "initialize", "params" : {"protocolVersion":"2025-11-25","capabilities":{"elicitation":{}},"clientInfo":{"name":"b","version":"2"}} }',
        # 2026-07-28: stateless, protocol version in _meta, unknown members kept.
        '{"jsonrpc":"2.0","id":3,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}},"x-extra":[1,2.50,"\\u00e9"]}',
        '{"jsonrpc":"2.0","id":4,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}',
        '{"jsonrpc":"2.0","method":"notifications/initialized"}',
    ]
    for line in lines:
        proxy.send(line)
    answers = [proxy.receive() for _ in range(4)]
    assert [a["id"] for a in answers] == [1, "x-2", 3, 4]
    proxy.close()
    received = (tmp_path / "received.log").read_bytes().decode().splitlines()
    # Besides Portcullis' own tools/list after notifications/initialized.
    assert [line for line in received if '"id":"portcullis-' not in line] == lines


def test_batches_are_judged_member_by_member(tmp_path: Path, monkeypatch):
    proxy = echo_proxy(tmp_path, [policy("method-filter", "method_filter.wasm", settings={"deny": ["danger/*"]})],
                       monkeypatch)
    batch = '[{"jsonrpc":"2.0","id":1,"method":"safe/a"},{"jsonrpc":"2.0","id":2,"method":"danger/b"}]'
    refusals = proxy.request(batch)
    assert [r["id"] for r in refusals] == [2] and "danger/b" in refusals[0]["error"]["message"]
    assert [a["result"]["method"] for a in proxy.receive()] == ["safe/a"], "the server answers its part"
    untouched = '[{"jsonrpc":"2.0","id":3,"method":"safe/c"}]'
    proxy.send(untouched)
    assert [a["id"] for a in proxy.receive()] == [3]
    proxy.close()
    received = (tmp_path / "received.log").read_text().splitlines()
    assert received == ['[{"jsonrpc":"2.0","id":1,"method":"safe/a"}]', untouched]


def test_server_requests_and_notifications_go_through_the_chain(tmp_path: Path, monkeypatch):
    no_sampling = policy("method-filter", "method_filter.wasm", settings={"deny": ["sampling/*"]})
    proxy = echo_proxy(tmp_path, [no_sampling], monkeypatch)
    proxy.send('{"jsonrpc":"2.0","id":1,"method":"test/server-request"}')
    first, second = proxy.receive(), proxy.receive()
    assert first["method"] == "notifications/message", "the notification passes"
    assert second["id"] == 1, "the sampling request never reached the client"
    code, _ = proxy.close()
    assert code == 0
    refusal = [json.loads(line) for line in (tmp_path / "received.log").read_text().splitlines()][1]
    assert refusal["id"] == "srv-1" and refusal["error"]["code"] == -32001
    assert "sampling/createMessage" in refusal["error"]["message"]
    records = read_audit(tmp_path / "audit.jsonl")
    from_server = [(r["kind"], r.get("method"), r["outcome"]) for r in records if r["direction"] == "server-to-client"]
    assert ("request", "sampling/createMessage", "deny") in from_server
    assert ("notification", "notifications/message", "allow") in from_server


def test_the_servers_exit_status_and_stderr_pass_through(tmp_path: Path, monkeypatch):
    proxy = echo_proxy(tmp_path, [], monkeypatch, ECHO_EXIT_CODE=7)
    proxy.send('{"jsonrpc":"2.0","id":1,"method":"test/exit"}')
    code = proxy.process.wait(timeout=30)
    assert code == 7
    assert "echo server: exiting on request" in proxy.process.stderr.read().decode()


def test_client_eof_shuts_the_server_down_cleanly(tmp_path: Path, sandbox: Path):
    proxy = RawProxy(write_config(tmp_path, []), tmp_path / "audit.jsonl", ["node", str(FS_SERVER), str(sandbox)])
    assert proxy.request(initialize("2025-11-25"))["result"]["protocolVersion"] == "2025-11-25"
    code, stderr = proxy.close()
    assert code == 0
    assert "Secure MCP Filesystem Server running on stdio" in stderr, "the server's stderr passes through"


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_server_that_ignores_eof_is_killed_after_the_grace_period(tmp_path: Path, monkeypatch):
    pid_file = tmp_path / "server.pid"
    proxy = echo_proxy(tmp_path, [], monkeypatch, ECHO_IGNORE_EOF=1, ECHO_PID_FILE=pid_file)
    assert proxy.request('{"jsonrpc":"2.0","id":1,"method":"ping"}')["id"] == 1
    server = int(pid_file.read_text())
    code, stderr = proxy.close()
    assert code == 128 + signal.SIGKILL
    assert "did not exit" in stderr
    assert not alive(server), "the server was reaped"


def test_sigterm_closes_the_servers_stdin_and_exits_with_its_status(tmp_path: Path, monkeypatch):
    pid_file = tmp_path / "server.pid"
    proxy = echo_proxy(tmp_path, [], monkeypatch, ECHO_EXIT_CODE=3, ECHO_PID_FILE=pid_file)
    assert proxy.request('{"jsonrpc":"2.0","id":1,"method":"ping"}')["id"] == 1
    server = int(pid_file.read_text())
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=30) == 3
    deadline = time.monotonic() + 10
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server)


def test_answers_sent_before_the_server_exits_still_reach_the_client(tmp_path: Path, monkeypatch):
    # Each answer spends 30 ms in a (fail-open) policy on its way back, so the
    # server has long exited while its answers are still being relayed.
    slow = policy("slow", "misbehave.wasm", methods=["tools/call"], timeout_ms=30, failure="open",
                  settings={"mode": "loop", "tool": "slow"})
    proxy = echo_proxy(tmp_path, [slow], monkeypatch)
    for i in range(5):
        proxy.send(f'{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"slow"}}}}')
    proxy.process.stdin.close()  # hang up at once; the server answers, then exits on EOF
    assert proxy.process.wait(timeout=30) == 0
    answers = []
    while (line := proxy.lines.get(timeout=30)) != b"":
        answers.append(json.loads(line)["id"])
    assert answers == [0, 1, 2, 3, 4]


def test_policy_logs_go_into_audit_records_when_asked(tmp_path: Path, monkeypatch):
    chatty = policy("chatty", "misbehave.wasm", methods=["tools/call"], settings={"mode": "log", "tool": "x"})
    proxy = echo_proxy(tmp_path, [chatty], monkeypatch, "\n[audit]\ninclude_policy_logs = true\n")
    assert proxy.request('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}')["id"] == 1
    proxy.close()
    call = [r for r in read_audit(tmp_path / "audit.jsonl") if r["kind"] == "request"][0]
    assert call["policies"][0]["logs"] == [{"level": "info", "message": "misbehave: hello from the policy"}]

    (tmp_path / "audit.jsonl").unlink()
    quiet = echo_proxy(tmp_path, [chatty], monkeypatch)
    assert quiet.request('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}')["id"] == 1
    quiet.close()
    call = [r for r in read_audit(tmp_path / "audit.jsonl") if r["kind"] == "request"][0]
    assert "logs" not in call["policies"][0], "policy logs stay out of the trail by default"
