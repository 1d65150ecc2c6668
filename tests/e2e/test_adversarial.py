"""Portcullis tried as an attacker would: a hostile agent, a hostile server
and a hostile network peer against `portcullis stdio` and `portcullis
serve`, in front of the real filesystem server and driven by the official
Python SDK where MCP behaviour is involved, by raw lines and sockets where an
SDK would not send the attack. Each test judges behaviour — did the write
happen, did the other agent get its answer, is the process alive, does
`audit verify` pass — never how long anything took.

What the attacks are: a parser differential (a tool named twice, numbers and
escapes one parser cannot hold), replayed and forged approval receipts, one
message that used to panic a relay thread, calls held for approval to starve
everybody else, sessions and connections that pile up, an SSE stream split
in ways the standard allows, and ids that broke the trail's chain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest

from conftest import DOUBLES, FS_SERVER, PORTCULLIS, POLICIES, RawProxy, policy, read_audit, write_config
from test_approvals import APPROVERS, Admin, admin_config, wait_ready
from test_serve import KEYS, Gateway, connect, free_port

INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "attacker", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def line(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


def started(proxy: RawProxy) -> RawProxy:
    """`proxy` after the MCP handshake (and nothing else: no tools/list)."""
    assert "result" in proxy.request(line(INITIALIZE))
    proxy.send(line(INITIALIZED))
    return proxy


def alive(proxy: RawProxy, id: int = 99) -> None:
    """The proxy still answers."""
    answer = proxy.request(line({"jsonrpc": "2.0", "id": id, "method": "ping"}))
    assert answer["id"] == id and "result" in answer, answer


# --- 1. and 2.: what is judged is what runs -----------------------------------------------------------------------

def test_a_tool_named_twice_is_refused_not_run_as_the_last_name(tmp_path: Path, sandbox: Path):
    # The gate holds write_file for a person; the read-only policy refuses it
    # anyway. A call naming read_text_file first and write_file last used to
    # be judged as a call of no tool, while the server ran write_file.
    gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"], settings={"tools": ["write_file"]})
    config = write_config(tmp_path, [gate, policy("read-only", "read_only.wasm")])
    audit = tmp_path / "audit.jsonl"
    target = sandbox / "written.txt"
    proxy = started(RawProxy(config, audit, ["node", str(FS_SERVER), str(sandbox)]))
    try:
        for id, name in [(1, '"name"'), (2, '"n\\u0061me"')]:
            attack = (f'{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"read_text_file",'
                      f'"arguments":{{"path":"{target}","content":"pwned"}},{name}:"write_file"}}}}')
            answer = proxy.request(attack)
            assert answer["id"] == id and answer["error"]["code"] == -32600, answer
            assert "'name' appears more than once" in answer["error"]["message"]
        alive(proxy)
    finally:
        proxy.close()
    assert not target.exists(), "the server never saw the call"
    refused = [r for r in read_audit(audit) if r.get("jsonrpc_id") in (1, 2)]
    assert [(r["outcome"], r["code"]) for r in refused] == [("deny", -32600), ("deny", -32600)]
    assert all(len(r["message_sha256"]) == 64 for r in refused)


def test_arguments_another_parser_reads_differently_are_refused(tmp_path: Path, sandbox: Path):
    # argument-guard keeps writes inside the sandbox. Arguments serde_json
    # cannot hold but Node can (1e400, half a surrogate pair) used to reach
    # the guard as no arguments at all, and the server as a write outside.
    outside = tmp_path / "outside"
    outside.mkdir()
    guard = policy("argument-guard", "argument_guard.wasm", methods=["tools/call"], settings={"roots": [str(sandbox)]})
    config = write_config(tmp_path, [guard])
    audit = tmp_path / "audit.jsonl"
    proxy = started(RawProxy(config, audit, ["node", str(FS_SERVER), str(sandbox), str(outside)]))
    try:
        for id, extra in [(1, '"pad":1e400'), (2, '"pad":"\\ud800"'), (3, '"pad":-1e999')]:
            attack = (f'{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"write_file",'
                      f'"arguments":{{"path":"{outside / f"{id}.txt"}","content":"pwned",{extra}}}}}}}')
            answer = proxy.request(attack)
            assert answer["id"] == id and answer["error"]["code"] == -32700, answer
        # The same write, readable, is judged and refused by the guard.
        plain = line({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                      "params": {"name": "write_file", "arguments": {"path": str(outside / "4.txt"), "content": "x"}}})
        assert "outside the allowed roots" in proxy.request(plain)["error"]["message"]
        alive(proxy)
    finally:
        proxy.close()
    assert list(outside.iterdir()) == [], "no write happened outside the root"
    records = {r.get("jsonrpc_id"): r for r in read_audit(audit) if r.get("direction") == "client-to-server"}
    assert all(records[i]["outcome"] == "deny" and "message_sha256" in records[i] for i in (1, 2, 3))
    assert records[4]["tool"] == "write_file" and records[4]["decided_by"] == "argument-guard"


def test_an_integer_javascript_reads_rounded_is_refused_rather_than_judged_exactly(tmp_path: Path):
    # Policies read 9007199254740993 exactly (Rust, Python); the Node server
    # reads 9007199254740992. A deny-list of one account would be judged
    # against one number and the server would act on the other.
    from test_serve import EVERYTHING
    config = write_config(tmp_path, [policy("methods", "method_filter.wasm")])
    audit = tmp_path / "audit.jsonl"
    proxy = started(RawProxy(config, audit, ["node", str(EVERYTHING)]))

    def summed(id: int, a: str) -> dict:
        proxy.send(f'{{"jsonrpc":"2.0","id":{id},"method":"tools/call",'
                   f'"params":{{"name":"get-sum","arguments":{{"a":{a},"b":0}}}}}}')
        while "id" not in (answer := proxy.receive()) or "method" in answer:
            pass  # the server's notices and requests (logging, roots) on the way
        return answer
    try:
        exact = summed(1, "9007199254740992")
        assert "9007199254740992" in json.dumps(exact["result"]), exact
        rounded = summed(2, "9007199254740993")
        assert rounded["id"] == 2 and rounded["error"]["code"] == -32600, rounded
        message = rounded["error"]["message"]
        assert "'params.arguments.a'" in message and "JavaScript peers read 9007199254740992" in message, message
        assert "result" in summed(3, "2"), "the proxy still serves"
    finally:
        proxy.process.stdin.close()
        proxy.process.wait(timeout=30)
    refused = [r for r in read_audit(audit) if r.get("jsonrpc_id") == 2]
    assert [(r["outcome"], r["code"]) for r in refused] == [("deny", -32600)]


def test_serve_refuses_an_ambiguous_call_on_a_servers_own_path(tmp_path: Path, sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, admin_config(free_port()))
    target = sandbox / "gated.txt"
    try:
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        _, answered, _ = gateway.post("/servers/files/mcp", line(INITIALIZE).encode(), headers)
        session = {**headers, "Mcp-Session-Id": answered["mcp-session-id"]}
        attack = (f'{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"read_text_file",'
                  f'"arguments":{{"path":"{target}","content":"pwned"}},"name":"write_file"}}}}')
        status, _, body = gateway.post("/servers/files/mcp", attack.encode(), session)
    finally:
        gateway.stop()
    assert status == 400 and json.loads(body)["error"]["code"] == -32600
    assert json.loads(body)["id"] == 7
    assert not target.exists()
    refused = [r for r in read_audit(gateway.audit) if r.get("event") == "message-refused"]
    assert refused and refused[0]["agent"] == "admin" and refused[0]["code"] == -32600


# --- 3.: approvals carried by the client are sealed, bound and used once ------------------------------------------

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}}


def stateless_call(gateway: Gateway, tool: str, arguments: dict, **extra) -> tuple[int, dict]:
    """A 2026-07-28 tools/call as the agent `admin`, with `extra` params."""
    params = {"name": tool, "arguments": arguments, "_meta": META, **extra}
    body = line({"jsonrpc": "2.0", "id": 11, "method": "tools/call", "params": params}).encode()
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "Mcp-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": tool}
    status, _, text = gateway.post("/servers/files/mcp", body, headers)
    return status, json.loads(text)


APPROVE = {"portcullis-approval": {"action": "accept", "content": {"approve": True}}}


def test_a_receipt_runs_its_call_once_and_a_forged_one_runs_nothing(tmp_path: Path, sandbox: Path):
    port = free_port()
    rules = '\n[[approvals.rules]]\ntools = ["write_file"]\nelicit = true\n'
    gateway = Gateway(tmp_path, sandbox, admin_config(port, rules))
    target = sandbox / "once.txt"
    try:
        arguments = {"path": str(target), "content": "approved once"}
        _, asked = stateless_call(gateway, "write_file", arguments)
        receipt = asked["result"]["requestState"]
        assert asked["result"]["resultType"] == "input_required" and receipt.startswith("pcr1.")
        _, ran = stateless_call(gateway, "write_file", arguments, requestState=receipt, inputResponses=APPROVE)
        assert "error" not in ran and target.read_text() == "approved once"
        target.write_text("changed since")
        # The same request again, as often as an agent likes: refused.
        for _ in range(3):
            _, again = stateless_call(gateway, "write_file", arguments, requestState=receipt, inputResponses=APPROVE)
            assert "used already" in again["error"]["message"], again
        # A receipt for one call does not carry another.
        other = {"path": str(sandbox / "other.txt"), "content": "x"}
        _, moved = stateless_call(gateway, "write_file", other, requestState=receipt, inputResponses=APPROVE)
        # A bare approval id (what requestState used to be), or an altered receipt.
        approval = [r for r in read_audit(gateway.audit) if r.get("outcome") == "hold"][0]["id"]
        _, bare = stateless_call(gateway, "write_file", arguments, requestState=approval, inputResponses=APPROVE)
        altered = receipt[:-4] + ("AAAA" if not receipt.endswith("AAAA") else "BBBB")
        _, forged = stateless_call(gateway, "write_file", arguments, requestState=altered, inputResponses=APPROVE)
    finally:
        gateway.stop()
    assert target.read_text() == "changed since", "the approved call ran once"
    assert not (sandbox / "other.txt").exists()
    for refused in (moved, bare, forged):
        assert refused["error"]["code"] == -32602 and "requestState" in refused["error"]["message"], refused
    results = [r for r in read_audit(gateway.audit)
               if r.get("tool") == "write_file" and r.get("direction") == "server-to-client"]
    assert len(results) == 1, "the server was called once"


def test_an_agent_cannot_approve_a_two_person_call_through_its_own_client(tmp_path: Path, sandbox: Path):
    port = free_port()
    rules = '\n[[approvals.rules]]\ntools = ["create_directory"]\napprovers = ["alice", "bob"]\nrequired = 2\n'
    gateway = Gateway(tmp_path, sandbox, admin_config(port, rules))
    admin = Admin(port)
    directory = sandbox / "two-person"
    arguments = {"path": str(directory)}
    held: dict = {}

    def hold_the_call():
        async def scenario():
            async with connect(gateway, "admin", "/servers/files/mcp") as session:
                held["result"] = await session.call_tool("create_directory", arguments)
        try:
            asyncio.run(scenario())
        except Exception as e:  # the call is cancelled when the gateway stops
            held["error"] = e

    waiting = threading.Thread(target=hold_the_call, daemon=True)
    waiting.start()
    try:
        [pending] = admin.pending()
        # The agent learns the approval's id and answers it as its user.
        status, answered = stateless_call(gateway, "create_directory", arguments,
                                          requestState=pending["id"], inputResponses=APPROVE)
        _, still = admin.call("GET", f"/api/approvals/{pending['id']}", APPROVERS["alice"])
    finally:
        gateway.stop()
        waiting.join(timeout=30)
    assert answered["error"]["code"] == -32602, answered
    assert still["state"] == "pending" and still["votes"] == []
    assert not directory.exists()
    assert "result" not in held


# --- 4.: one message must not knock a relay thread over -----------------------------------------------------------

def test_an_oversized_line_ending_in_a_multibyte_character_is_answered_and_the_proxy_goes_on(tmp_path: Path,
                                                                                             sandbox: Path):
    config = write_config(tmp_path, [], "\n[limits]\nmax_message_bytes = 1024\n")
    audit = tmp_path / "audit.jsonl"
    proxy = started(RawProxy(config, audit, ["node", str(FS_SERVER), str(sandbox)]))
    try:
        # The character just before the closing brace is two bytes long: the
        # old pump sliced the line between them and died.
        proxy.send('{"jsonrpc":"2.0","method":"x","params":{"a":"' + "z" * 4000 + '"},"b":é1}')
        refused = proxy.receive()
        assert refused["error"]["code"] == -32600 and "exceeds the size limit" in refused["error"]["message"]
        alive(proxy)
        code, _ = proxy.close()
    finally:
        if proxy.process.poll() is None:
            proxy.process.kill()
    assert code == 0, "stdin closed: the proxy ended, as it should, and did not linger"
    assert any("exceeds the size limit" in (r.get("reason") or "") for r in read_audit(audit))


# --- 5.: held calls cost no thread, and one agent can hold only so many -------------------------------------------

async def hold_calls(url: str, session_headers: dict[str, str], count: int, sandbox: Path) -> list:
    """`count` write_file calls in flight at once, each on its own connection,
    left waiting; returns the open connections."""
    held = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        body = line({"jsonrpc": "2.0", "id": 1000 + i, "method": "tools/call", "params": {
            "name": "write_file", "arguments": {"path": str(sandbox / f"held-{i}.txt"), "content": "x"}}}).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in {**session_headers, "Content-Type": "application/json",
                                                     "Accept": "application/json, text/event-stream",
                                                     "Content-Length": str(len(body))}.items())
        writer.write(f"POST /servers/files/mcp HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        await writer.drain()
        held.append((reader, writer))
    return held


async def read_answer(reader: asyncio.StreamReader) -> str:
    """What came back on a held call's connection, once its answer did."""
    received = b""
    while b"jsonrpc" not in received or not received.rstrip().endswith(b"}"):
        chunk = await asyncio.wait_for(reader.read(65536), timeout=30)
        if not chunk:
            break
        received += chunk
    return received.decode()


def test_six_hundred_held_calls_do_not_starve_another_agent_or_the_approvers(tmp_path: Path, sandbox: Path):
    port = free_port()
    # No share per agent or address: what is tested is that 600 held calls
    # cost no thread (test_door.py tests the shares).
    gateway = Gateway(tmp_path, sandbox, admin_config(port, "\n[approvals]\nmax_pending_per_agent = 0\n"),
                      serve="max_connections = 2000\nmax_connections_per_agent = 0\nmax_connections_per_peer = 0")
    admin = Admin(port)
    wait_ready(admin.url)
    try:
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        _, answered, _ = gateway.post("/servers/files/mcp", line(INITIALIZE).encode(), headers)
        session = {**headers, "Mcp-Session-Id": answered["mcp-session-id"]}

        async def scenario():
            held = await hold_calls(gateway.url, session, 600, sandbox)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"{admin.url}/metrics", timeout=30) as response:
                    metrics = response.read().decode()
                if "portcullis_approvals_pending 600" in metrics:
                    break
                await asyncio.sleep(0.5)
            # Another agent's allowed call is answered meanwhile.
            async with connect(gateway, "reader") as reader:
                await reader.list_tools()
                read = await reader.call_tool("files__read_text_file", {"path": str(sandbox / "hello.txt")})
            # The approvers can still see and decide: one call is denied, and
            # its caller hears so.
            status, listed = admin.call("GET", "/api/approvals", APPROVERS["alice"])
            first = min(listed, key=lambda a: a["created_ms"])
            decided, _ = admin.decide(first["id"], "deny", "alice", "no")
            which = int(json.loads(first["arguments"])["path"].rsplit("held-", 1)[1].split(".")[0])
            denied = await read_answer(held[which][0])
            for _, writer in held:
                writer.close()
            return metrics, read, status, len(listed), decided, denied

        metrics, read, status, listed, decided, denied = asyncio.run(scenario())
        # Closing the 600 connections cancels their calls.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, pending = admin.call("GET", "/api/approvals", APPROVERS["alice"])
            if not pending:
                break
            time.sleep(0.2)
    finally:
        gateway.stop()
    assert "portcullis_approvals_pending 600" in metrics
    assert read.content[0].text == "hello from the sandbox\n"
    assert status == 200 and listed == 200 and decided == 200
    assert denied and "Approval denied by alice" in denied, denied
    assert pending == [], "every abandoned call was cancelled"
    assert not list(sandbox.glob("held-*.txt")), "no held call ran"


def test_one_agent_may_hold_only_so_many_calls(tmp_path: Path, sandbox: Path):
    port = free_port()
    gateway = Gateway(tmp_path, sandbox, admin_config(port, "\n[approvals]\nmax_pending_per_agent = 3\n"))
    admin = Admin(port)
    try:
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        _, answered, _ = gateway.post("/servers/files/mcp", line(INITIALIZE).encode(), headers)
        session = {**headers, "Mcp-Session-Id": answered["mcp-session-id"]}

        async def scenario():
            held = await hold_calls(gateway.url, session, 3, sandbox)
            admin.pending(count=3)
            fourth = await hold_calls(gateway.url, session, 1, sandbox)
            answer = await read_answer(fourth[0][0])
            for _, writer in held + fourth:
                writer.close()
            return answer

        answer = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert "already has 3 calls waiting for approval" in answer, answer
    records = [r for r in read_audit(gateway.audit) if "approval:too-many" in r.get("tags", [])]
    assert len(records) == 1 and records[0]["outcome"] == "deny"


# --- 6. and 7.: sessions and connections do not pile up, and the listener survives --------------------------------

class Serve:
    """`portcullis serve` on a config text, with one echo server."""

    def __init__(self, tmp_path: Path, serve: str, extra: str = "", limit_files: int | None = None,
                 ready: tuple[str, ...] | None = None):
        self.port = free_port()
        self.audit = tmp_path / "audit.jsonl"
        self.config = tmp_path / "serve.toml"
        self.config.write_text(f"""
[serve]
listen = "127.0.0.1:{self.port}"
{serve}

[agents.admin]
api_key_sha256 = "{__import__('hashlib').sha256(KEYS['admin'].encode()).hexdigest()}"

[servers.echo]
command = "{sys.executable}"
args = ["{DOUBLES / 'echo_server.py'}"]
env = {{ ECHO_LOG = "{tmp_path / 'echo.log'}" }}

[engine]
cache_dir = "{tmp_path / 'cache'}"
{extra}""")
        limit = None
        if limit_files:
            def limit():
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))
        self.log = open(tmp_path / "serve.log", "w")
        self.process = subprocess.Popen([str(PORTCULLIS), "serve", "--config", str(self.config),
                                         "--audit-file", str(self.audit)], stderr=self.log, preexec_fn=limit)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                    # Every server up (or those named), a remote one
                    # included: one still starting would refuse the test's
                    # first request.
                    servers = json.load(response)["servers"]
                    if all(s["state"] == "ready" for n, s in servers.items() if ready is None or n in ready):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError((tmp_path / "serve.log").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, str]:
        request = urllib.request.Request(f"{self.url}/servers/echo/mcp", data=line(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {KEYS['admin']}",
                                                  "Content-Type": "application/json",
                                                  "Accept": "application/json, text/event-stream", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def initialize(self) -> str:
        status, headers, _ = self.post(INITIALIZE)
        assert status == 200
        return headers["mcp-session-id"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()


def test_sessions_are_capped_per_agent_and_idle_ones_expire(tmp_path: Path):
    serve = Serve(tmp_path, "max_sessions_per_agent = 3\nsession_idle_secs = 2")
    try:
        sessions = [serve.initialize() for _ in range(3)]
        status, _, body = serve.post(INITIALIZE)
        assert status == 429 and "already has 3 open sessions" in json.loads(body)["error"]["message"]
        # Kept in use, the first stays; the others go idle and expire.
        ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert serve.post(ping, {"Mcp-Session-Id": sessions[0]})[0] == 200
            expired = [r for r in read_audit(serve.audit) if r.get("event") == "session-expired"]
            if len(expired) == 2:
                break
            time.sleep(0.5)
        assert serve.post(ping, {"Mcp-Session-Id": sessions[1]})[0] == 404
        assert serve.post(ping, {"Mcp-Session-Id": sessions[2]})[0] == 404
        assert serve.post(ping, {"Mcp-Session-Id": sessions[0]})[0] == 200
        # Room again for new ones.
        serve.initialize()
    finally:
        serve.stop()
    events = [r["event"] for r in read_audit(serve.audit) if "event" in r]
    assert events.count("session-refused") == 1 and events.count("session-expired") == 2
    assert events.count("session-unknown") >= 2


def test_a_session_has_one_event_stream(tmp_path: Path):
    serve = Serve(tmp_path, "")
    try:
        session = serve.initialize()
        get = (f"GET /servers/echo/mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['admin']}\r\n"
               f"Accept: text/event-stream\r\nMcp-Session-Id: {session}\r\n\r\n").encode()
        first = socket.create_connection(("127.0.0.1", serve.port))
        first.sendall(get)
        first.settimeout(30)
        opened = first.recv(4096)
        second = socket.create_connection(("127.0.0.1", serve.port))
        second.sendall(get)
        second.settimeout(30)
        refused = second.recv(4096)
        second.close()
        first.close()
        # Closed, the session may stream again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            third = socket.create_connection(("127.0.0.1", serve.port))
            third.sendall(get)
            third.settimeout(30)
            again = third.recv(4096)
            third.close()
            if again.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.2)
    finally:
        serve.stop()
    assert opened.startswith(b"HTTP/1.1 200") and b"text/event-stream" in opened
    assert refused.startswith(b"HTTP/1.1 409"), refused
    assert again.startswith(b"HTTP/1.1 200")


def test_slow_and_idle_connections_time_out_and_the_listener_keeps_serving(tmp_path: Path):
    # The slow clients share the real one's address and agent: no shares,
    # so it is the timeouts that make room (test_door.py tests the shares).
    serve = Serve(tmp_path, "max_connections = 20\nheader_timeout_secs = 1\nbody_timeout_secs = 1\n"
                  "max_connections_per_peer = 0\nmax_connections_per_agent = 0")
    try:
        # 100 clients that never finish their headers, 20 that never send
        # the body they announced.
        slow = []
        for i in range(120):
            conn = socket.create_connection(("127.0.0.1", serve.port))
            if i < 100:
                conn.sendall(b"POST /servers/echo/mcp HTTP/1.1\r\nHost: x\r\n")
            else:
                conn.sendall(b"POST /servers/echo/mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + KEYS["admin"].encode() + b"\r\nContent-Length: 100\r\n\r\n{")
            slow.append(conn)
        # A real client gets through as the slow ones are dropped.
        session = serve.initialize()
        status, _, _ = serve.post({"jsonrpc": "2.0", "id": 2, "method": "ping"}, {"Mcp-Session-Id": session})
        assert status == 200
        dropped = 0
        for conn in slow:
            conn.settimeout(30)
            try:
                data = conn.recv(65536)
                dropped += 1 if data == b"" or b"408" in data or data.startswith(b"HTTP/1.1") else 0
            except OSError:
                dropped += 1
            conn.close()
    finally:
        serve.stop()
    assert dropped == 120, "every slow client was dropped or answered"
    assert serve.process.returncode == 0
    refused = [r for r in read_audit(serve.audit) if r.get("event") == "message-refused"]
    assert any("not sent within" in r["reason"] for r in refused)


def test_running_out_of_file_descriptors_does_not_stop_serve(tmp_path: Path):
    serve = Serve(tmp_path, "max_connections = 1000", limit_files=64)
    try:
        flood = []
        for _ in range(100):
            try:
                flood.append(socket.create_connection(("127.0.0.1", serve.port), timeout=5))
            except OSError:
                break
        time.sleep(2)
        assert serve.process.poll() is None, "serve is still running"
        for conn in flood:
            conn.close()
        # Serving again once descriptors are free.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                serve.initialize()
                break
            except (OSError, AssertionError):
                time.sleep(0.5)
        else:
            raise AssertionError("serve never answered again")
    finally:
        serve.stop()
    assert "cannot accept a connection" in (tmp_path / "serve.log").read_text()


# --- 8.: SSE in both directions, as the standard says -------------------------------------------------------------

def sse_events(text: str) -> list[str]:
    """The data of each event of an SSE body, per the standard's rules."""
    events, data = [], []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif raw.startswith("data:"):
            data.append(raw[5:][1:] if raw[5:].startswith(" ") else raw[5:])
    return events


def test_a_remote_server_that_comes_up_late_is_reached_without_waiting_for_an_agent(tmp_path: Path):
    port = free_port()
    serve = Serve(tmp_path, "", f'\n[servers.late]\nurl = "http://127.0.0.1:{port}/mcp"\n', ready=("echo",))
    server = None
    try:
        health = lambda: json.load(urllib.request.urlopen(f"{serve.url}/healthz", timeout=5))["servers"]["late"]
        assert health()["state"] != "ready"
        server = subprocess.Popen([sys.executable, str(DOUBLES / "pretty_sse_server.py"), str(port)])
        deadline = time.monotonic() + 30
        while health()["state"] != "ready":
            assert time.monotonic() < deadline, health()
            time.sleep(0.2)
    finally:
        serve.stop()
        if server:
            server.kill()


def test_pretty_printed_answers_over_sse_reach_an_sse_only_client_whole(tmp_path: Path):
    port = free_port()
    server = subprocess.Popen([sys.executable, str(DOUBLES / "pretty_sse_server.py"), str(port)])
    serve = None
    try:
        serve = Serve(tmp_path, "", f'\n[servers.pretty]\nurl = "http://127.0.0.1:{port}/mcp"\n')
        request = urllib.request.Request(
            f"{serve.url}/servers/pretty/mcp", data=line(INITIALIZE).encode(), method="POST",
            headers={"Authorization": f"Bearer {KEYS['admin']}", "Content-Type": "application/json",
                     "Accept": "text/event-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            session = response.headers["mcp-session-id"]
            initialized = sse_events(response.read().decode())
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}
        request = urllib.request.Request(
            f"{serve.url}/servers/pretty/mcp", data=line(call).encode(), method="POST",
            headers={"Authorization": f"Bearer {KEYS['admin']}", "Content-Type": "application/json",
                     "Accept": "text/event-stream", "Mcp-Session-Id": session})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["content-type"] == "text/event-stream"
            answered = sse_events(response.read().decode())
    finally:
        server.kill()
        if serve:
            serve.stop()
    assert len(initialized) == 1 and json.loads(initialized[0])["result"]["serverInfo"]["name"] == "pretty-sse"
    # What the server logged about the call on its stream comes first, then the answer.
    *logged, event = answered
    assert [json.loads(notice)["method"] for notice in logged] == ["notifications/message"]
    assert json.loads(event)["result"]["content"][0]["text"] == "echo: hi\nsecond line"


@contextlib.contextmanager
def behind_pretty_server(tmp_path: Path, **env: str):
    """`portcullis serve` in front of the fault-injecting SSE server double; yields its endpoint."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(DOUBLES / "pretty_sse_server.py"), str(port)],
                              env={**os.environ, **env})
    serve = None
    try:
        serve = Serve(tmp_path, "", f'\n[servers.pretty]\nurl = "http://127.0.0.1:{port}/mcp"\n')
        yield f"{serve.url}/servers/pretty/mcp"
    finally:
        server.kill()
        if serve:
            serve.stop()


def post_sse(url: str, message: dict, session: str | None = None) -> tuple[str | None, list[dict]]:
    """POSTs `message` as an SSE-only client with the admin key; the session id and the answers among the
    events (the double's server logs about each call on its stream first, which is relayed too)."""
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "Content-Type": "application/json",
               "Accept": "text/event-stream"}
    if session:
        headers["Mcp-Session-Id"] = session
    request = urllib.request.Request(url, data=line(message).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [json.loads(e) for e in sse_events(response.read().decode())]
        return response.headers["mcp-session-id"], [e for e in events if "method" not in e]


def echo(id, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}}


def test_clients_sharing_a_remote_server_never_share_an_id_on_it(tmp_path: Path):
    with behind_pretty_server(tmp_path) as url:
        first, _ = post_sse(url, INITIALIZE)
        second, _ = post_sse(url, INITIALIZE)
        answers = [post_sse(url, echo(3, "which-id"), session)[1] for session in (first, second)]
    texts = []
    for [answer] in answers:
        assert answer["id"] == 3, "each client gets its answer under its own id"
        texts.append(answer["result"]["content"][0]["text"])
    assert texts[0] != texts[1], f"both requests went upstream under one id: {texts}"


def test_a_reply_that_is_not_an_answer_is_refused_not_relayed_as_one(tmp_path: Path):
    with behind_pretty_server(tmp_path) as url:
        session, _ = post_sse(url, INITIALIZE)
        _, [refused] = post_sse(url, echo(4, "not-an-answer"), session)
        _, [after] = post_sse(url, echo(5, "still here"), session)
    assert refused["id"] == 4 and "method" not in refused
    assert refused["error"]["code"] == -32603
    assert "unusable answer" in refused["error"]["message"]
    assert after["result"]["content"][0]["text"] == "echo: still here\nsecond line"


def test_an_agents_cancellation_never_reaches_a_shared_server(tmp_path: Path):
    received = tmp_path / "received.log"
    with behind_pretty_server(tmp_path, RECEIVED_LOG=str(received)) as url:
        session, _ = post_sse(url, INITIALIZE)
        # Id 1 on the shared connection is another agent's (here: the first call's) request.
        post_sse(url, echo(7, "first"), session)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
        headers = {"Authorization": f"Bearer {KEYS['admin']}", "Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream", "Mcp-Session-Id": session}
        request = urllib.request.Request(url, data=line(cancel).encode(), method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
        _, [after] = post_sse(url, echo(8, "second"), session)
    methods = received.read_text().split()
    assert "notifications/initialized" in methods and "tools/call" in methods
    assert "notifications/cancelled" not in methods
    assert after["result"]["content"][0]["text"] == "echo: second\nsecond line"


# --- 9.: every record reads back, and what the door refuses is on the trail ---------------------------------------

def test_ids_no_parser_can_hold_do_not_break_the_chain(tmp_path: Path, sandbox: Path):
    trail = tmp_path / "trail.jsonl"
    config = write_config(tmp_path, [], f'\n[limits]\nmax_message_bytes = 1024\n[[audit.sinks]]\ntype = "file"\n'
                                        f'path = "{trail}"\nchain = true\n')
    proxy = started(RawProxy(config, tmp_path / "audit.jsonl", ["node", str(FS_SERVER), str(sandbox)]))
    try:
        proxy.request('{"jsonrpc":"2.0","id":1e400,"method":"ping"}')
        proxy.request('{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}')
        proxy.request('{"jsonrpc":"2.0","id":1e400,"method":"x","params":"' + "a" * 3000 + '"}')
        alive(proxy)
    finally:
        proxy.close()
    verified = subprocess.run([str(PORTCULLIS), "audit", "verify", str(trail)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert all("jsonrpc_id" not in r or r["jsonrpc_id"] in (0, 99) for r in read_audit(trail))


def test_what_the_door_refuses_is_audited(tmp_path: Path, sandbox: Path):
    admin_port = free_port()
    gateway = Gateway(tmp_path, sandbox, admin_config(admin_port) + "\n[limits]\nmax_message_bytes = 4096\n")
    admin = Admin(admin_port)
    wait_ready(admin.url)
    try:
        key = {"Authorization": f"Bearer {KEYS['admin']}"}
        big = line({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 10000}}).encode()
        too_large, _, _ = gateway.post("/mcp", big, key)
        evil, _, _ = gateway.post("/mcp", line(INITIALIZE).encode(), {**key, "Origin": "https://evil.example"})
        _, opened, _ = gateway.post("/servers/files/mcp", line(INITIALIZE).encode(), key)
        theirs = {"Authorization": f"Bearer {KEYS['reader']}", "Mcp-Session-Id": opened["mcp-session-id"]}
        ping = line({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode()
        cross, _, _ = gateway.post("/servers/files/mcp", ping, theirs)
        cross_admin, _ = admin.call("GET", "/api/approvals", APPROVERS["alice"], headers={"Origin": "https://evil"})
        with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=5) as response:
            health = json.load(response)
    finally:
        gateway.stop()
    assert (too_large, evil, cross, cross_admin) == (413, 403, 404, 403)
    events = {r["event"]: r for r in read_audit(gateway.audit) if "event" in r}
    assert events["message-refused"]["agent"] == "admin" and "size limit" in events["message-refused"]["reason"]
    assert "evil.example" in events["origin-refused"]["reason"]
    assert events["session-unknown"]["agent"] == "reader"
    assert events["admin-origin-refused"]["endpoint"] == "/api/approvals"
    assert all(set(server) == {"state", "restarts"} for server in health["servers"].values()), health


def test_an_ambiguous_approval_id_is_a_client_error(approving_two_pending):
    admin, ids, prefix = approving_two_pending
    status, body = admin.call("GET", f"/api/approvals/{prefix}", APPROVERS["alice"])
    assert status == 400 and "more than one approval" in body["error"], body
    status, body = admin.decide(prefix, "approve", "alice")
    assert status == 400 and "more than one approval" in body["error"], body
    status, body = admin.call("GET", f"/api/approvals/{ids[0]}", APPROVERS["alice"])
    assert status == 200 and body["state"] == "pending"


@pytest.fixture
def approving_two_pending(tmp_path: Path, sandbox: Path):
    """Two pending approvals whose ids share a prefix (they are UUIDv7s made
    within the same second)."""
    port = free_port()
    gateway = Gateway(tmp_path, sandbox, admin_config(port))
    admin = Admin(port)
    headers = {"Authorization": f"Bearer {KEYS['admin']}"}
    _, answered, _ = gateway.post("/servers/files/mcp", line(INITIALIZE).encode(), headers)
    session = {**headers, "Mcp-Session-Id": answered["mcp-session-id"]}
    loop = asyncio.new_event_loop()
    held = loop.run_until_complete(hold_calls(gateway.url, session, 2, sandbox))
    pending = admin.pending(count=2)
    ids = [a["id"] for a in pending]
    common = 0
    while common < min(map(len, ids)) and ids[0][common] == ids[1][common]:
        common += 1
    yield admin, ids, ids[0][:common]
    for _, writer in held:
        writer.close()
    loop.close()
    gateway.stop()
