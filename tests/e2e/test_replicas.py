"""Replicas behind a plain round-robin balancer, as users run them: two
`portcullis serve` processes sharing one Redis (`[state]`), one PostgreSQL
approvals store and session keys, behind Debian's HAProxy on loopback,
which sends each request to the next replica in turn. A TypeScript SDK
session (2025-11-25) and stateless Python SDK calls (2026-07-28) work while
their requests alternate replicas; a per-agent limit and the `quota` policy
hold exactly across them; a call held on one replica is approved on the
other's admin API and runs once; and a replica killed under load costs only
the calls it had, with every call that reached a server in a trail."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conftest import POLICIES, read_audit
from test_approvals import APPROVERS, Admin, admin_config, wait_ready
from test_serve import KEYS, Gateway, free_port, ts_agent
from test_shared_approvals import database, postgres_server  # noqa: F401 (a fixture)
from test_state import Redis, redis  # noqa: F401 (a fixture)

SESSION_KEY = "a-session-key-of-at-least-32-characters-0f9c"


class Balancer:
    """HAProxy on a loopback port, round robin over the replicas' ports,
    checking each one's /healthz and sending a request whose replica refused
    the connection to the next one (each request on a connection of its
    own, as examples/replicas/haproxy.cfg says why)."""

    def __init__(self, directory: Path, ports: list[int]):
        self.port = free_port()
        config = directory / "haproxy.cfg"
        servers = "".join(f"    server r{i} 127.0.0.1:{port}\n" for i, port in enumerate(ports))
        config.write_text(f"""global
    maxconn 1024
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    retries 3
    option redispatch 1
    http-reuse never
frontend mcp
    bind 127.0.0.1:{self.port}
    stats enable
    stats uri /haproxy-stats
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /healthz
    default-server check inter 500ms fall 2 rise 2
{servers}""")
        self.log = open(directory / "haproxy.log", "w")
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.process.poll() is None, (directory / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_down(self, server: str) -> None:
        """Waits until HAProxy's health check has taken `server` out."""
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{self.url}/haproxy-stats;csv", timeout=10) as response:
                rows = response.read().decode().splitlines()
            header = rows[0].lstrip("# ").split(",")
            states = {row.split(",")[header.index("svname")]: row.split(",")[header.index("status")]
                      for row in rows[1:] if row.startswith("replicas,")}
            if states.get(server, "").startswith("DOWN"):
                return
            assert time.monotonic() < deadline, f"HAProxy never took {server} out: {states}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


class Deployment:
    """Two replicas behind the balancer, sharing Redis, PostgreSQL and
    session keys."""

    def __init__(self, tmp_path: Path, sandbox: Path, redis_port: int, store: str):
        self.admins: list[Admin] = []
        self.replicas: list[Gateway] = []
        prefix = f"replicas-{os.urandom(4).hex()}"
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            admin_port = free_port()
            extra = admin_config(admin_port, f"""
[state]
redis = "redis://127.0.0.1:{redis_port}/0"
prefix = "{prefix}"
replica = "replica-{name}"

[approvals]
store = "{store}"

[[policy]]
name = "quota"
module = "{POLICIES / 'quota.wasm'}"
servers = ["files"]
tools = ["get_file_info"]
settings = {{ calls = 3, window_secs = 3600 }}

[[rate_limits]]
servers = ["files"]
tools = ["list_allowed_directories"]
calls = 5
per_secs = 3600
by = ["agent"]
""", servers='["files"]')
            # A drain longer than any test waits: what ends sooner ended on its own.
            serve = f'session_keys = ["{SESSION_KEY}"]\ndrain_secs = 600'
            replica = Gateway(tmp_path / name, sandbox, extra, serve=serve)
            self.replicas.append(replica)
            wait_ready(f"http://127.0.0.1:{admin_port}")
            self.admins.append(Admin(admin_port))
        self.balancer = Balancer(tmp_path, [r.port for r in self.replicas])

    @property
    def url(self) -> str:
        return self.balancer.url

    def trails(self) -> list[list[dict]]:
        return [read_audit(r.audit) for r in self.replicas]

    def stop(self) -> None:
        self.balancer.stop()
        for replica in self.replicas:
            replica.stop()


@pytest.fixture
def deployment(tmp_path: Path, sandbox: Path, redis: Redis, postgres_server: str):  # noqa: F811
    running = Deployment(tmp_path, sandbox, redis.port, database(postgres_server))
    yield running
    running.stop()


def stateless_call(url: str, tool: str, arguments: dict, server: str = "files", timeout: float = 60) -> dict:
    """A 2026-07-28 tools/call by the agent `admin`, written out by hand."""
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta}}
    request = urllib.request.Request(f"{url}/servers/{server}/mcp", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEYS['admin']}", "MCP-Protocol-Version":
                                              "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool,
                                              "Content-Type": "application/json",
                                              "Accept": "application/json, text/event-stream"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def served_by(trails: list[list[dict]], tool: str) -> list[int]:
    """How many calls of `tool` each replica judged."""
    return [sum(1 for r in trail if r.get("tool") == tool and r.get("direction") == "client-to-server")
            for trail in trails]


def test_sessions_and_stateless_clients_work_while_requests_alternate_replicas(deployment: Deployment,
                                                                               sandbox: Path):
    hello = str(sandbox / "hello.txt")
    reads = [{"name": "read_text_file", "arguments": {"path": hello}} for _ in range(4)]
    report = ts_agent(deployment, "admin", reads, "/servers/files/mcp")

    async def python_agent():
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=60) as http:
            transport = streamable_http_client(f"{deployment.url}/servers/files/mcp", http_client=http)
            async with Client(transport) as client:
                outcomes = []
                for tool, arguments in [("list_allowed_directories", {})] * 8 + [("get_file_info", {"path": hello})] * 5:
                    try:
                        result = await client.call_tool(tool, arguments)
                        outcomes.append((tool, "error" if result.is_error else "ok"))
                    except MCPError as refused:
                        outcomes.append((tool, f"refused: {refused.message}"))
                return client.protocol_version, outcomes

    version, outcomes = asyncio.run(python_agent())
    trails = deployment.trails()

    # The 2025 session: opened on one replica, resumed on the other from
    # its sealed id, every call answered.
    assert report["protocolVersion"] == "2025-11-25", report
    assert all("result" in call and not call["result"].get("isError") for call in report["calls"]), report
    assert "read_text_file" in report["tools"]
    events = [[r.get("event") for r in trail] for trail in trails]
    assert sum(e.count("session-opened") for e in events) == 1, events
    assert sum(e.count("session-resumed") for e in events) >= 1, events
    assert all(n > 0 for n in served_by(trails, "read_text_file")), served_by(trails, "read_text_file")

    # Stateless calls alternate too; the limit of 5 and the quota of 3 hold
    # exactly across both replicas.
    assert version == "2026-07-28"
    listed = [o for t, o in outcomes if t == "list_allowed_directories"]
    assert listed[:5] == ["ok"] * 5 and all(o.startswith("refused") for o in listed[5:]), listed
    infos = [o for t, o in outcomes if t == "get_file_info"]
    assert infos[:3] == ["ok"] * 3 and all(o != "ok" for o in infos[3:]), infos
    assert all(n > 0 for n in served_by(trails, "list_allowed_directories"))


def test_a_call_held_through_the_balancer_is_approved_on_the_other_replica_and_runs_once(
        deployment: Deployment, sandbox: Path):
    report = sandbox / "approved.txt"

    async def scenario():
        write = asyncio.create_task(asyncio.to_thread(
            stateless_call, deployment.url, "write_file", {"path": str(report), "content": "once\n"}))
        [held] = await asyncio.to_thread(deployment.admins[0].pending)
        holder = next(i for i, replica in enumerate(deployment.replicas)
                      if any(r.get("outcome") == "hold" for r in read_audit(replica.audit)))
        other = deployment.admins[1 - holder]
        decided = other.decide(held["id"], "approve", "alice", "from the other replica")
        return holder, decided, await write

    holder, decided, written = asyncio.run(scenario())
    assert decided[0] == 200 and decided[1]["state"] == "approved", decided
    assert "result" in written and not written["result"].get("isError"), written
    assert report.read_text() == "once\n"
    trails = deployment.trails()
    forwarded = [[r for r in trail if r.get("tool") == "write_file" and r.get("direction") == "server-to-client"]
                 for trail in trails]
    assert len(forwarded[holder]) == 1 and not forwarded[1 - holder], "it ran once, where it was held"


def test_a_replica_killed_under_load_costs_only_the_calls_it_had(deployment: Deployment):
    workers, per_worker = 4, 30
    results: dict[str, str] = {}
    killed = threading.Event()

    def call(note: str) -> str:
        try:
            answer = stateless_call(deployment.url, "note", {"n": note}, server="echo", timeout=30)
            return "ok" if "result" in answer else f"error: {answer}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as failed:
            return f"failed: {failed}"

    def worker(w: int) -> None:
        for i in range(per_worker):
            results[f"w{w}-{i}"] = call(f"w{w}-{i}")
            if w == 0 and i == per_worker // 3:
                deployment.replicas[0].process.send_signal(signal.SIGKILL)
                killed.set()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert killed.is_set() and len(results) == workers * per_worker
    # Once the balancer's health check has taken the dead replica out, no
    # call fails at all.
    deployment.balancer.wait_down("r0")
    after = {f"after-{i}": call(f"after-{i}") for i in range(20)}

    # What failed was sent to the dying replica — the calls it had, and
    # requests that reached its socket while it died — and the balancer
    # said so (502); none was a wrong answer, and none reached the other.
    failed = {note: outcome for note, outcome in results.items() if outcome != "ok"}
    assert all(outcome.startswith("failed: HTTP Error 502") for outcome in failed.values()), failed
    assert all(outcome == "ok" for outcome in after.values()), after
    # Every call that reached a replica's server has its decision in that
    # replica's trail, the killed one's included (written before the call
    # was forwarded).
    reached_anywhere = set()
    for replica in deployment.replicas:
        lines = replica.echo_log.read_text().splitlines() if replica.echo_log.exists() else []
        reached = {m["params"]["arguments"]["n"] for m in map(json.loads, lines)
                   if m.get("method") == "tools/call"}
        judged = {r["arguments"]["n"] for r in read_audit(replica.audit) if r.get("tool") == "note"
                  and r.get("direction") == "client-to-server" and r.get("outcome") == "allow"}
        assert reached <= judged, sorted(reached - judged)
        reached_anywhere |= reached
    survivor = deployment.replicas[1]
    survived = {r["arguments"]["n"] for r in read_audit(survivor.audit)
                if r.get("tool") == "note" and r.get("direction") == "client-to-server"}
    assert not set(failed) & survived
    ok = {note for note, outcome in {**results, **after}.items() if outcome == "ok"}
    assert ok <= reached_anywhere
    assert all(n > 0 for n in served_by([read_audit(r.audit) for r in deployment.replicas], "note"))


def test_a_replica_told_to_stop_finishes_its_calls_while_the_other_serves(deployment: Deployment):
    leaving = deployment.replicas[0]
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    slow = {"jsonrpc": "2.0", "id": 7, "method": "test/slow", "params": {"_meta": meta}}
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "test/slow"}
    # A 2025 session's event stream stands open on the leaving replica.
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    _, opened, _ = leaving.post("/servers/echo/mcp", json.dumps(initialize).encode(),
                                {"Authorization": f"Bearer {KEYS['admin']}"})
    stream = urllib.request.urlopen(urllib.request.Request(f"{leaving.url}/servers/echo/mcp", headers={
        "Authorization": f"Bearer {KEYS['admin']}", "Accept": "text/event-stream",
        "Mcp-Session-Id": opened["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}), timeout=120)
    streamed: list = []
    reading = threading.Thread(target=lambda: streamed.append(stream.read()))
    reading.start()
    answers: list = []
    under_way = threading.Thread(target=lambda: answers.append(
        leaving.post("/servers/echo/mcp", json.dumps(slow).encode(), headers)))
    under_way.start()
    deadline = time.monotonic() + 30
    while not (leaving.echo_log.exists() and b"test/slow" in leaving.echo_log.read_bytes()):
        assert time.monotonic() < deadline, "the slow call never reached the server"
        time.sleep(0.05)
    leaving.process.send_signal(signal.SIGTERM)
    # Once it has closed its listener (a call sent before that is its to
    # finish), the balancer sends every call to the other replica.
    port = int(leaving.url.rsplit(":", 1)[1])
    closing = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < closing, "the leaving replica kept listening"
        time.sleep(0.02)
    meanwhile = [stateless_call(deployment.url, "note", {"n": f"m{i}"}, server="echo") for i in range(10)]
    under_way.join(timeout=60)
    reading.join(timeout=60)
    # Far sooner than its drain: the stream ended as it began, and the call
    # under way finished.
    assert leaving.process.wait(timeout=60) == 0
    assert streamed, "the standing event stream ended when the replica began to drain"

    [(status, _, body)] = answers
    assert status == 200, body
    assert json.loads(body)["result"]["method"] == "test/slow", "the call under way finished"
    assert all("result" in answer for answer in meanwhile), meanwhile
    assert served_by([read_audit(r.audit) for r in deployment.replicas], "note")[1] == 10


def test_a_session_its_client_ended_on_one_replica_is_not_resumed_on_another(deployment: Deployment):
    a, b = deployment.replicas
    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    initialize = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}).encode()
    listing = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()

    def opened_on(replica: Gateway) -> dict[str, str]:
        _, headers, _ = replica.post("/servers/echo/mcp", initialize, auth)
        return {**auth, "Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}

    def end_on(replica: Gateway, session: dict[str, str]) -> int:
        request = urllib.request.Request(f"{replica.url}/servers/echo/mcp", method="DELETE", headers=session)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    kept, ended = opened_on(a), opened_on(a)
    ended_status = end_on(b, ended)
    resumed, _, _ = b.post("/servers/echo/mcp", listing, kept)
    refused, _, _ = b.post("/servers/echo/mcp", listing, ended)

    assert ended_status == 200, "ended on a replica that never had it"
    assert resumed == 200, "a live session is resumed on the other replica"
    assert refused == 404, "an ended one is not, whichever replica its client ended it on"
    events = [r.get("event") for r in read_audit(b.audit)]
    assert events.count("session-resumed") == 1 and "session-unknown" in events
