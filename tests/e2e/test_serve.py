"""`portcullis serve`: one Streamable HTTP door in front of several real MCP
servers (filesystem and everything from npm, plus the fault-injecting echo
double), driven by the official Python and TypeScript SDK clients. Agents
with their own keys or JWTs see and may do different things; every call is audited under the
agent's name; the upstream servers get their own credentials, never the
agent's; a crashing upstream is restarted and reported; a pinned server is
held to its lock file and each agent to its own rate."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import ssl
import threading
from contextlib import asynccontextmanager, contextmanager
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from mcp import ClientSession
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from pki import Issuer, tls_files
from conftest import (DOUBLES, FS_SERVER, PORTCULLIS, POLICIES, ROOT, notes_calls, notes_server, pin, read_audit,
                      write_config)

EVERYTHING = ROOT / "tests" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
KEYS = {"reader": "reader-key-3f9a", "admin": "admin-key-77c1"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A running `portcullis serve` and what it was given."""

    def __init__(self, tmp_path: Path, sandbox: Path, extra: str = "", env: dict[str, str] | None = None,
                 serve: str = "", everything: str = ""):
        self.port = free_port()
        self.audit = tmp_path / "audit.jsonl"
        self.echo_log = tmp_path / "echo.log"
        (tmp_path / "everything-token").write_text("token-from-a-file\n")
        config = self.config = tmp_path / "gateway.toml"
        config.write_text(f"""
[serve]
listen = "127.0.0.1:{self.port}"
allowed_origins = ["http://localhost:6274"]
{serve}

[agents.reader]
api_key_sha256 = "{sha256(KEYS['reader'])}"
servers = ["files"]
attributes = {{ team = "analytics" }}

[agents.admin]
api_key_sha256 = "{sha256(KEYS['admin'])}"

[servers.files]
command = "node"
args = ["{FS_SERVER}", "{sandbox}"]

[servers.everything]
command = "node"
args = ["{EVERYTHING}"]
prefix = "ev"
env = {{ UPSTREAM_TOKEN = "${{file:everything-token}}" }}
{everything}

[servers.echo]
command = "{sys.executable}"
args = ["{DOUBLES / 'echo_server.py'}"]
env = {{ ECHO_LOG = "{self.echo_log}", ECHO_EXIT_CODE = "3" }}

[engine]
cache_dir = "{tmp_path / 'cache'}"

[[policy]]
name = "read-only"
module = "{POLICIES / 'read_only.wasm'}"
agents = ["reader"]
servers = ["files"]
{extra}""")
        self.log = tmp_path / "serve.log"
        self.env = {**os.environ, "PORTCULLIS_STATUS_DIR": str(tmp_path / "status"), **(env or {})}
        self.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None and f"cannot listen on 127.0.0.1:{self.port}" in self.log.read_text():
                # The free port was taken meanwhile (say, as another
                # connection's own end): another one.
                self.stderr.close()
                taken, self.port = self.port, free_port()
                config.write_text(config.read_text().replace(f'listen = "127.0.0.1:{taken}"',
                                                             f'listen = "127.0.0.1:{self.port}"', 1))
                self.start()
                continue
            try:
                health = self.health()
                # A server named broken* is expected never to come up.
                if all(s["state"] in ("ready", "per-session", "per-agent") for n, s in health["servers"].items()
                       if not n.startswith("broken")):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready: {(tmp_path / 'serve.log').read_text()}")

    def start(self) -> None:
        self.stderr = open(self.log, "w")
        self.process = subprocess.Popen([str(PORTCULLIS), "serve", "--config", str(self.config), "--audit-file",
                                         str(self.audit)], stderr=self.stderr, env=self.env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        """This gateway's report in `portcullis status --json`."""
        done = subprocess.run([str(PORTCULLIS), "status", "--json"], env=self.env, capture_output=True, text=True)
        return next((r for r in json.loads(done.stdout or "[]") if r.get("pid") == self.process.pid), {})

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
            return json.load(response)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Message, bytes]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.stderr.close()


@pytest.fixture
def gateway(tmp_path: Path, sandbox: Path):
    running = Gateway(tmp_path, sandbox)
    yield running
    running.stop()


@asynccontextmanager
async def connect(gateway: Gateway, agent: str, path: str = "/mcp", token: str | None = None):
    """An SDK client session as `agent` (its API key), or with a bearer `token`."""
    headers = {"Authorization": f"Bearer {token or KEYS[agent]}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        async with streamable_http_client(f"{gateway.url}{path}", http_client=http) as (read, write, *_):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def names(listing) -> list[str]:
    return [tool.name for tool in listing.tools]


def test_each_agent_sees_and_may_do_only_what_it_was_granted(gateway: Gateway, sandbox: Path):
    async def scenario():
        async with connect(gateway, "reader") as reader:
            reader_tools = names(await reader.list_tools())
            read = await reader.call_tool("files__read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError) as write:
                await reader.call_tool("files__write_file", {"path": str(sandbox / "r.txt"), "content": "x"})
            with pytest.raises(MCPError) as hidden:
                await reader.call_tool("ev__echo", {"message": "hi"})
        async with connect(gateway, "admin") as admin:
            admin_tools = names(await admin.list_tools())
            echoed = await admin.call_tool("ev__echo", {"message": "hi"})
            wrote = await admin.call_tool("files__write_file", {"path": str(sandbox / "a.txt"), "content": "x"})
        return reader_tools, read, write.value, hidden.value, admin_tools, echoed, wrote

    reader_tools, read, write, hidden, admin_tools, echoed, wrote = asyncio.run(scenario())
    assert reader_tools and all(name.startswith("files__") for name in reader_tools)
    # The read-only policy applies to the reader only: it hides write tools from it.
    assert "files__read_text_file" in reader_tools and "files__write_file" not in reader_tools
    assert read.content[0].text == "hello from the sandbox\n"
    assert "not declared read-only" in write.message and not (sandbox / "r.txt").exists()
    assert "Unknown name" in hidden.message
    assert {"ev__echo", "files__write_file", "files__read_text_file"} <= set(admin_tools)
    assert echoed.content[0].text == "Echo: hi"
    assert not wrote.is_error and (sandbox / "a.txt").read_text() == "x"

    calls = [r for r in read_audit(gateway.audit) if r.get("kind") == "request" and r.get("method") == "tools/call"]
    summary = [(r["agent"], r["server"], r["tool"], r["outcome"]) for r in calls]
    # Policies and the trail see real server and tool names, under each agent's own name.
    assert summary == [("reader", "files", "read_text_file", "allow"), ("reader", "files", "write_file", "deny"),
                       ("admin", "everything", "echo", "allow"), ("admin", "files", "write_file", "allow")]
    assert calls[0]["agent_attributes"] == {"team": "analytics"}


def ts_agent(gateway: Gateway, agent: str, calls: list[dict], path: str = "/mcp") -> dict:
    """What an agent written with the official TypeScript SDK saw."""
    script = Path(__file__).parent / "clients" / "ts_client.mjs"
    done = subprocess.run(["node", str(script), f"{gateway.url}{path}", KEYS[agent], json.dumps(calls)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_typescript_sdk_agents_get_their_own_grants(gateway: Gateway, sandbox: Path):
    write = {"name": "files__write_file", "arguments": {"path": str(sandbox / "ts.txt"), "content": "ts"}}
    reader = ts_agent(gateway, "reader", [
        {"name": "files__read_text_file", "arguments": {"path": str(sandbox / "hello.txt")}}, write])
    admin = ts_agent(gateway, "admin", [{"name": "ev__echo", "arguments": {"message": "from ts"}}])
    direct = ts_agent(gateway, "admin", [{"name": "echo", "arguments": {"message": "direct"}}],
                      "/servers/everything/mcp")
    assert reader["server"]["name"] == "portcullis" and reader["protocolVersion"] == "2025-11-25"
    assert reader["tools"] and all(name.startswith("files__") for name in reader["tools"])
    read, denied = reader["calls"]
    assert read["result"]["content"][0]["text"] == "hello from the sandbox\n"
    assert "not declared read-only" in denied["error"]["message"] and not (sandbox / "ts.txt").exists()
    assert "ev__echo" in admin["tools"]
    assert admin["calls"][0]["result"]["content"][0]["text"] == "Echo: from ts"
    assert direct["calls"][0]["result"]["content"][0]["text"] == "Echo: direct"
    calls = [(r["agent"], r["server"], r["tool"], r["outcome"]) for r in read_audit(gateway.audit)
             if r.get("kind") == "request" and r.get("method") == "tools/call"]
    assert calls == [("reader", "files", "read_text_file", "allow"), ("reader", "files", "write_file", "deny"),
                     ("admin", "everything", "echo", "allow"), ("admin", "everything", "echo", "allow")]
    # Each agent's session is in the trail from the moment it opened to its DELETE.
    sessions = [(r["event"], r["agent"], r["endpoint"], r.get("client"), r.get("protocol_version"))
                for r in read_audit(gateway.audit) if r.get("event", "").startswith("session-")]
    ts = "portcullis-ts-agent/1.0.0"
    assert sessions == [("session-opened", "reader", "/mcp", ts, "2025-11-25"), ("session-ended", "reader", "/mcp", None, None),
                        ("session-opened", "admin", "/mcp", ts, "2025-11-25"), ("session-ended", "admin", "/mcp", None, None),
                        ("session-opened", "admin", "/servers/everything/mcp", ts, "2025-11-25"),
                        ("session-ended", "admin", "/servers/everything/mcp", None, None)]


def test_the_stateless_revision_is_chosen_by_a_client_that_speaks_it(gateway: Gateway, sandbox: Path):
    async def agent(name: str, path: str, work):
        headers = {"Authorization": f"Bearer {KEYS[name]}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            # mode="auto": the SDK probes server/discover, then speaks 2026-07-28 without a session.
            async with Client(streamable_http_client(f"{gateway.url}{path}", http_client=http)) as client:
                return client.protocol_version, client.server_info, await work(client)

    async def reader_work(client):
        tools = names(await client.list_tools())
        read = await client.call_tool("files__read_text_file", {"path": str(sandbox / "hello.txt")})
        with pytest.raises(MCPError) as write:
            await client.call_tool("files__write_file", {"path": str(sandbox / "s.txt"), "content": "x"})
        return tools, read, write.value

    async def admin_work(client):
        return (await client.call_tool("ev__echo", {"message": "stateless"})).content[0].text

    async def direct_work(client):
        return (await client.call_tool("echo", {"message": "direct"})).content[0].text

    version, info, (tools, read, write) = asyncio.run(agent("reader", "/mcp", reader_work))
    assert version == "2026-07-28" and info.name == "portcullis"
    assert tools and all(name.startswith("files__") for name in tools) and "files__write_file" not in tools
    assert read.content[0].text == "hello from the sandbox\n"
    assert "not declared read-only" in write.message and not (sandbox / "s.txt").exists()
    assert asyncio.run(agent("admin", "/mcp", admin_work))[2] == "Echo: stateless"
    version, info, echoed = asyncio.run(agent("admin", "/servers/everything/mcp", direct_work))
    assert version == "2026-07-28" and info.name != "portcullis" and echoed == "Echo: direct"
    calls = [(r["agent"], r["server"], r["tool"], r["outcome"]) for r in read_audit(gateway.audit)
             if r.get("kind") == "request" and r.get("method") == "tools/call"]
    assert calls == [("reader", "files", "read_text_file", "allow"), ("reader", "files", "write_file", "deny"),
                     ("admin", "everything", "echo", "allow"), ("admin", "everything", "echo", "allow")]


def test_stateless_requests_must_carry_an_envelope_that_agrees_with_them(gateway: Gateway):
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}

    def call(method: str, params: dict, headers: dict[str, str], path: str = "/servers/echo/mcp"):
        body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode()
        status, _, answer = gateway.post(path, body, {**admin, **headers})
        return status, json.loads(answer)

    envelope = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "test/params"}
    status, answer = call("test/params", {"x": 1, "_meta": {**meta, "progressToken": 3}}, envelope)
    # The echo server (an older revision) gets the params without the client's envelope; the progress
    # token is swapped for one unique on the connection all agents share (the server echoes it back).
    assert status == 200 and answer["result"]["params"]["x"] == 1
    upstream_token = answer["result"]["params"]["_meta"]["progressToken"]
    assert answer["result"]["params"] == {"x": 1, "_meta": {"progressToken": upstream_token}}
    assert isinstance(upstream_token, int) and f'"progressToken":{upstream_token}' in gateway.echo_log.read_text()
    assert answer["result"]["resultType"] == "complete"
    assert call("test/params", {"x": 1}, envelope)[1]["error"]["code"] == -32602
    assert call("test/params", {"_meta": meta}, {**envelope, "Mcp-Method": "tools/list"})[1]["error"]["code"] == -32020
    status, answer = call("tools/call", {"name": "echo", "_meta": meta},
                          {**envelope, "Mcp-Method": "tools/call", "Mcp-Name": "rm"}, "/mcp")
    assert (status, answer["error"]["code"]) == (400, -32020)
    future = {**meta, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    status, answer = call("test/params", {"_meta": future}, {**envelope, "MCP-Protocol-Version": "2099-01-01"})
    assert (status, answer["error"]["code"]) == (400, -32022)
    assert "2026-07-28" in answer["error"]["data"]["supported"]
    status, answer = call("ping", {"_meta": meta}, {**envelope, "Mcp-Method": "ping"})
    assert (status, answer["error"]["code"]) == (404, -32601)
    status, answer = call("server/discover", {"_meta": meta}, {**envelope, "Mcp-Method": "server/discover"}, "/mcp")
    assert status == 200 and answer["result"]["supportedVersions"] == ["2026-07-28"]
    assert {"tools", "prompts", "resources"} <= set(answer["result"]["capabilities"])
    assert answer["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "portcullis"
    assert answer["result"]["ttlMs"] == 0 and answer["result"]["cacheScope"] == "private"
    # Refused envelopes never reached the server.
    assert gateway.echo_log.read_text().count('"test/params"') == 1


def test_list_changes_reach_the_agents_of_the_server_on_the_get_stream(gateway: Gateway):
    async def scenario():
        heard: dict[str, list] = {"admin": [], "reader": []}
        changed = asyncio.Event()

        def listener(agent: str):
            async def handle(message) -> None:
                method = getattr(message, "method", None) or getattr(getattr(message, "root", None), "method", None)
                heard[agent].append(method)
                if method == "notifications/tools/list_changed":
                    changed.set()
            return handle

        sessions = {}
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=60) as a_http, \
                httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEYS['reader']}"}, timeout=60) as r_http:
            async with streamable_http_client(f"{gateway.url}/mcp", http_client=a_http) as (ar, aw, *_), \
                    streamable_http_client(f"{gateway.url}/mcp", http_client=r_http) as (rr, rw, *_):
                async with ClientSession(ar, aw, message_handler=listener("admin")) as admin, \
                        ClientSession(rr, rw, message_handler=listener("reader")) as reader:
                    sessions["admin"] = await admin.initialize()
                    sessions["reader"] = await reader.initialize()
                    # Both agents' GET streams are open once the gateway has a
                    # stream per session; poke the server until the change arrives.
                    for _ in range(100):
                        poke = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "test/list-changed", "params": {
                            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                      "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
                        await asyncio.to_thread(gateway.post, "/servers/echo/mcp", poke, {
                            "Authorization": f"Bearer {KEYS['admin']}", "MCP-Protocol-Version": "2026-07-28",
                            "Mcp-Method": "test/list-changed"})
                        try:
                            await asyncio.wait_for(changed.wait(), 0.5)
                            break
                        except asyncio.TimeoutError:
                            pass
                    tools = names(await admin.list_tools())
        return sessions, heard, tools

    sessions, heard, tools = asyncio.run(scenario())
    assert sessions["admin"].capabilities.tools.list_changed
    assert "notifications/tools/list_changed" in heard["admin"]
    # Only notifications for every client are relayed: the server's log line stays with its own client.
    assert "notifications/message" not in heard["admin"]
    assert "ev__echo" in tools
    relayed = [r for r in read_audit(gateway.audit) if r.get("method") == "notifications/tools/list_changed"]
    assert relayed and {(r["agent"], r["server"], r["direction"]) for r in relayed} == {
        ("admin", "echo", "server-to-client")}
    assert heard["reader"] == []  # the reader may not use the echo server


def test_merged_names_are_stable_and_each_server_has_its_own_path(gateway: Gateway):
    async def scenario():
        async with connect(gateway, "admin") as first:
            once = names(await first.list_tools())
            twice = names(await first.list_tools())
        async with connect(gateway, "admin") as second:
            again = names(await second.list_tools())
        async with connect(gateway, "admin", "/servers/everything/mcp") as direct:
            plain = names(await direct.list_tools())
            echoed = await direct.call_tool("echo", {"message": "direct"})
        return once, twice, again, plain, echoed

    once, twice, again, plain, echoed = asyncio.run(scenario())
    assert once == twice == again
    assert [n for n in once if n.startswith("ev__")] == [f"ev__{n}" for n in plain]
    assert echoed.content[0].text == "Echo: direct"


def test_servers_get_their_own_credentials_never_the_agents(gateway: Gateway):
    async def scenario():
        async with connect(gateway, "admin") as admin:
            env = await admin.call_tool("ev__get-env", {})
            return json.loads(env.content[0].text)

    env = asyncio.run(scenario())
    assert env["UPSTREAM_TOKEN"] == "token-from-a-file"
    assert not any(KEYS["admin"] in value for value in env.values())
    for record in read_audit(gateway.audit):
        assert KEYS["admin"] not in json.dumps(record) and "token-from-a-file" not in json.dumps(record)


def test_bad_credentials_origins_and_sessions_are_refused(gateway: Gateway):
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}).encode()
    status, headers, _ = gateway.post("/mcp", initialize, {})
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="portcullis"'
    status, headers, _ = gateway.post("/mcp", initialize, {"Authorization": "Bearer not-a-key"})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    status, _, _ = gateway.post("/mcp", initialize, {**admin, "Origin": "http://evil.example"})
    assert status == 403
    status, headers, body = gateway.post("/mcp", initialize, {**admin, "Origin": "http://localhost:6274"})
    assert status == 200 and json.loads(body)["result"]["protocolVersion"] == "2025-06-18"
    session = headers["mcp-session-id"]
    listing = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).encode()
    assert gateway.post("/mcp", listing, admin)[0] == 400  # no session
    assert gateway.post("/mcp", listing, {**admin, "Mcp-Session-Id": "f" * 32})[0] == 404
    reader = {"Authorization": f"Bearer {KEYS['reader']}"}
    assert gateway.post("/mcp", listing, {**reader, "Mcp-Session-Id": session})[0] == 404  # not its session
    assert gateway.post("/servers/everything/mcp", initialize, reader)[0] == 404  # not its server
    status, _, body = gateway.post("/mcp", listing, {**admin, "Mcp-Session-Id": session})
    assert status == 200 and json.loads(body)["result"]["tools"]
    # The session negotiated 2025-06-18; another revision's header is refused.
    other_revision = {**admin, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    assert gateway.post("/mcp", listing, other_revision)[0] == 400
    status, _, body = gateway.post("/mcp", b"{not json", {**admin, "Mcp-Session-Id": session})
    assert status == 400 and json.loads(body)["error"]["code"] == -32700
    huge = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"x": "y" * 17_000_000}})
    assert gateway.post("/mcp", huge.encode(), {**admin, "Mcp-Session-Id": session})[0] == 413
    status, _, _ = gateway.post("/mcp", listing, {**admin, "Mcp-Session-Id": session})
    assert status == 200  # the gateway kept serving
    gateway.stop()  # the refusals still being counted reach the trail
    access = [r for r in read_audit(gateway.audit) if "event" in r]
    refused = [r for r in access if r["event"] == "credentials-refused"]
    # The first of a window is written whole, the next counted in one record.
    assert [(r["endpoint"], r["reason"].split(" ")[0], r.get("repeated")) for r in refused] == [
        ("/mcp", "an", None), ("/mcp", "the", 1)]
    assert all(r["peer"].startswith("127.0.0.1:") and "agent" not in r for r in refused)
    assert "not-a-key" not in gateway.audit.read_text()
    opened = [(r["agent"], r["endpoint"], r["client"]) for r in access if r["event"] == "session-opened"]
    assert opened == [("admin", "/mcp", "raw/1")]


def test_a_crashing_upstream_is_restarted_and_reported(gateway: Gateway):
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}).encode()
    _, headers, _ = gateway.post("/servers/echo/mcp", initialize, admin)
    session = {**admin, "Mcp-Session-Id": headers["mcp-session-id"]}
    crash = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "test/exit"}).encode()
    status, _, body = gateway.post("/servers/echo/mcp", crash, session)
    assert status == 200 and "stopped before answering" in json.loads(body)["error"]["message"]
    ping = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "test/after-restart"}).encode()
    status, _, body = gateway.post("/servers/echo/mcp", ping, session)
    assert status == 200 and json.loads(body)["result"]["method"] == "test/after-restart"
    echo = gateway.health()["servers"]["echo"]
    # /healthz needs no key: state and restarts, nothing more.
    assert echo == {"state": "ready", "restarts": echo["restarts"]} and echo["restarts"] >= 1
    # `portcullis status` reports why, once the report catches up.
    report = gateway.status()
    for _ in range(100):
        if report.get("servers", {}).get("echo", {}).get("restarts", 0) >= 1:
            break
        time.sleep(0.2)
        report = gateway.status()
    assert report["pid"] == gateway.process.pid and report["servers"]["echo"]["state"] == "ready"
    assert "exit status: 3" in report["servers"]["echo"]["last_error"]
    assert "exit status: 3" in report["servers"]["echo"]["last_error"]
    text = subprocess.run([str(PORTCULLIS), "status"], env=gateway.env, capture_output=True, text=True).stdout
    assert "server echo" in text and "restarts 1" in text
    # The echo server saw Portcullis' own handshake twice, and never an agent key.
    log = gateway.echo_log.read_text()
    assert log.count('"method":"initialize"') == 2 and KEYS["admin"] not in log


@contextmanager
def remote_mcp_server(tmp_path: Path, tls: tuple[Path, Path] | None = None, **settings: str):
    """The official SDK's Streamable HTTP server (HTTPS with `tls`, a
    certificate and its key; `settings` as the double's environment),
    recording the headers it gets."""
    port, headers = free_port(), tmp_path / "remote-headers.jsonl"
    env = {**os.environ, "HEADERS_LOG": str(headers), **settings}
    if tls:
        env.update(TLS_CERT=str(tls[0]), TLS_KEY=str(tls[1]))
    process = subprocess.Popen([sys.executable, str(DOUBLES / "http_server.py"), str(port)],
                               env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/mcp", headers
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def remote_server(tmp_path: Path):
    with remote_mcp_server(tmp_path) as server:
        yield server


def test_a_remote_http_server_is_reached_with_its_own_credentials(tmp_path: Path, sandbox: Path, remote_server):
    url, headers_log = remote_server
    extra = f"""
[servers.remote]
url = "{url}"
headers = {{ Authorization = "Bearer ${{env:REMOTE_TOKEN}}", X-Tenant = "portcullis-tests" }}
"""
    gateway = Gateway(tmp_path, sandbox, extra,
                      env={"REMOTE_TOKEN": "remote-secret"})
    try:
        async def scenario():
            async with connect(gateway, "admin") as admin:
                tools = names(await admin.list_tools())
                added = await admin.call_tool("remote__add", {"a": 2, "b": 3})
            async with connect(gateway, "reader") as reader:
                with pytest.raises(MCPError) as hidden:
                    await reader.call_tool("remote__add", {"a": 1, "b": 1})
            return tools, added, hidden.value

        tools, added, hidden = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert {"remote__add", "remote__reset"} <= set(tools)
    assert added.content[0].text == "5"
    assert "Unknown name" in hidden.message
    seen = [json.loads(line) for line in headers_log.read_text().splitlines()]
    assert seen and all(h["authorization"] == "Bearer remote-secret" for h in seen)
    assert all(h["x-tenant"] == "portcullis-tests" for h in seen)
    assert not any(KEYS["admin"] in json.dumps(h) for h in seen)
    # One handshake, then every request in the server's session.
    assert all(h.get("mcp-session-id") for h in seen[1:])
    calls = [r for r in read_audit(gateway.audit) if r.get("tool") == "add" and r.get("kind") == "request"]
    assert [(r["agent"], r["server"], r["outcome"]) for r in calls] == [("admin", "remote", "allow")]


@contextmanager
def jwks_server(document: str, cert: Path, key: Path):
    """An identity provider's JWKS over HTTPS; yields its URL and a list of
    the fetches it answered."""
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            fetches.append(self.path)
            body = document.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", fetches
    finally:
        server.shutdown()
        server.server_close()


def test_agents_with_jwts_from_a_jwks_url_reach_an_https_server(tmp_path: Path, sandbox: Path):
    ca, cert, key = tls_files(tmp_path)
    idp = Issuer("https://idp.example", "portcullis-tests")
    with jwks_server(idp.jwks(), cert, key) as (jwks_url, fetches), \
            remote_mcp_server(tmp_path, tls=(cert, key)) as (remote_url, headers_log):
        extra = f"""
[jwt]
issuer = "https://idp.example"
audience = "portcullis-tests"
jwks_url = "{jwks_url}"

[jwt.groups]
analysts = ["remote"]

[servers.remote]
url = "{remote_url}"
headers = {{ Authorization = "Bearer remote-secret" }}
"""
        # The private CA is trusted the way operators trust theirs.
        gateway = Gateway(tmp_path, sandbox, extra, env={"SSL_CERT_FILE": str(ca)})
        service = idp.token(sub="svc-reporting", groups=["analysts"])
        try:
            async def scenario():
                async with connect(gateway, "", token=service) as svc:
                    svc_tools = names(await svc.list_tools())
                    added = await svc.call_tool("remote__add", {"a": 2, "b": 3})
                # An ES256 token for a configured agent gets that agent's rights and policies.
                async with connect(gateway, "", token=idp.token("ec-1", sub="reader")) as reader:
                    reader_tools = names(await reader.list_tools())
                return svc_tools, added, reader_tools

            svc_tools, added, reader_tools = asyncio.run(scenario())
            initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"}}}).encode()
            stranger = Issuer("https://idp.example", "portcullis-tests")
            refused = {
                "expired": idp.token(sub="svc-reporting", lifetime=-600),
                "audience": idp.token(sub="svc-reporting", aud="someone-else"),
                "issuer": Issuer("https://evil.example", "portcullis-tests").token(sub="svc-reporting"),
                "foreign key": stranger.token(sub="svc-reporting"),
                "tampered": service[:-4] + ("AAAA" if not service.endswith("AAAA") else "BBBB"),
            }
            statuses = {why: gateway.post("/mcp", initialize, {"Authorization": f"Bearer {token}"})
                        for why, token in refused.items()}
        finally:
            gateway.stop()
    assert svc_tools and all(name.startswith("remote__") for name in svc_tools)
    assert added.content[0].text == "5"
    assert reader_tools and all(name.startswith("files__") for name in reader_tools)
    assert "files__write_file" not in reader_tools  # the reader's read-only policy
    for why, (status, headers, _) in statuses.items():
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], why
    # Fetched at the first token and kept: a bad signature under a known key id fetches nothing.
    assert fetches == ["/.well-known/jwks.json"]
    seen = [json.loads(line) for line in headers_log.read_text().splitlines()]
    assert seen and all(h["authorization"] == "Bearer remote-secret" for h in seen)
    calls = [r for r in read_audit(gateway.audit) if r.get("tool") == "add" and r.get("kind") == "request"]
    assert [(r["agent"], r["server"], r["outcome"]) for r in calls] == [("svc-reporting", "remote", "allow")]
    attributes = calls[0]["agent_attributes"]
    assert attributes["jwt.groups"] == "analysts" and attributes["jwt.iss"] == "https://idp.example"
    log = (tmp_path / "serve.log").read_text() + gateway.audit.read_text()
    assert service not in log and "remote-secret" not in log


def test_a_policy_that_traps_is_reported_and_the_gateway_keeps_serving(tmp_path: Path, sandbox: Path):
    # The trap's panic message goes to the guest's stderr (WASI), which must
    # work on the gateway's evaluation threads too.
    extra = f"""
[[policy]]
name = "misbehave"
module = "{POLICIES / 'misbehave.wasm'}"
servers = ["everything"]
settings = {{ mode = "trap", tool = "echo" }}
"""
    gateway = Gateway(tmp_path, sandbox, extra)
    try:
        async def scenario():
            async with connect(gateway, "admin") as admin:
                with pytest.raises(MCPError) as trapped:
                    await admin.call_tool("ev__echo", {"message": "hi"})
                added = await admin.call_tool("ev__get-sum", {"a": 1, "b": 2})
                return trapped.value, added

        trapped, added = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert trapped.code == -32002 and "misbehave" in trapped.message and "deliberate trap" in trapped.message
    assert "3" in added.content[0].text


def test_a_server_that_cannot_start_is_left_out_of_the_merged_view(tmp_path: Path, sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, '\n[servers.broken]\ncommand = "/nonexistent/mcp-server"\n')
    try:
        async def scenario():
            async with connect(gateway, "admin") as admin:
                return names(await admin.list_tools())

        tools = asyncio.run(scenario())
        broken = gateway.health()["servers"]["broken"]
        for _ in range(100):
            reported = gateway.status().get("servers", {}).get("broken", {})
            if reported.get("last_error"):
                break
            time.sleep(0.2)
    finally:
        gateway.stop()
    assert "ev__echo" in tools and "files__read_text_file" in tools
    assert not any(name.startswith("broken__") for name in tools)
    assert broken["state"] in ("starting", "restarting") and "cannot start" in reported["last_error"]


def test_a_pinned_server_is_held_to_its_lock_and_each_agent_has_its_own_rate(tmp_path: Path, sandbox: Path):
    # The notes server is pinned on its own; the gateway's other servers are
    # not in the lock file and stay ungoverned by it.
    notes = tmp_path / "notes"
    notes.mkdir()
    pinned = pin(write_config(notes, [], notes_server(notes)))
    assert pinned.returncode == 0, pinned.stderr
    extra = notes_server(notes) + f"""
[agents.looper]
api_key_sha256 = "{sha256('looper-key-51d0')}"

[pinning]
lock = "{notes / 'portcullis.lock.json'}"

[[rate_limits]]
servers = ["notes"]
tools = ["search"]
calls = 2
per_secs = 3600
by = ["agent"]
"""
    gateway = Gateway(tmp_path, sandbox, extra)
    try:
        async def scenario():
            async with connect(gateway, "admin") as admin, \
                    connect(gateway, "looper", token="looper-key-51d0") as looper:
                searches = []
                for query in ("a", "b", "c"):
                    try:
                        searches.append(await admin.call_tool("notes__search", {"query": query}))
                    except MCPError as error:
                        searches.append(error)
                other = await looper.call_tool("notes__search", {"query": "d"})
                await looper.call_tool("notes__advance", {})  # the server gains delete_everything
                listed = names(await admin.list_tools())
                with pytest.raises(MCPError) as delete:
                    await admin.call_tool("notes__delete_everything", {})
                echoed = await admin.call_tool("ev__echo", {"message": "unpinned"})
                return searches, other, listed, delete.value, echoed

        searches, other, listed, delete, echoed = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert [isinstance(s, MCPError) for s in searches] == [False, False, True]
    assert searches[2].code == -32004 and "agent 'admin'" in searches[2].message
    assert searches[2].data["retryAfter"] >= 1
    assert not other.is_error, "another agent has its own bucket"
    assert "notes__search" in listed and "notes__delete_everything" not in listed
    assert delete.code == -32001 and delete.data["policy"] == "portcullis:pinning"
    assert echoed.content[0].text == "Echo: unpinned"
    assert [c["tool"] for c in notes_calls(notes)] == ["search", "search", "search", "advance"]

    records = read_audit(gateway.audit)
    refused = {(r["agent"], r["tool"], r["decided_by"]) for r in records
               if r.get("kind") == "request" and r.get("outcome") == "deny"}
    assert refused == {("admin", "search", "portcullis:rate-limit"),
                       ("admin", "delete_everything", "portcullis:pinning")}
    assert any("drift:added" in r.get("tags", []) for r in records if r.get("method") == "tools/list")


def test_the_readme_serve_quickstart_runs_as_written(tmp_path: Path, sandbox: Path):
    """examples/serve-filesystem.toml with the README's request and key; only
    the port, the server's command (no npx download) and the module's
    directory are changed."""
    port = free_port()
    text = (ROOT / "examples" / "serve-filesystem.toml").read_text()
    text = text.replace('listen = "127.0.0.1:8808"', f'listen = "127.0.0.1:{port}"')
    text = text.replace('command = "npx"\nargs = ["-y", "@modelcontextprotocol/server-filesystem", "."]',
                        f'command = "node"\nargs = ["{FS_SERVER}", "{sandbox}"]')
    text = text.replace('"../policies/target/wasm32-wasip2/release/', f'"{POLICIES}/')
    assert str(FS_SERVER) in text and str(POLICIES) in text and str(port) in text
    config = tmp_path / "serve-filesystem.toml"
    config.write_text(text)
    audit = tmp_path / "audit.jsonl"
    env = {**os.environ, "PORTCULLIS_STATUS_DIR": str(tmp_path / "status")}
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen([str(PORTCULLIS), "serve", "--config", str(config), "--audit-file", str(audit)],
                                   stderr=log, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                    if json.load(response)["servers"]["filesystem"]["state"] == "ready":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        # The README's curl request.
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
        request = urllib.request.Request(f"{url}/mcp", data=body, method="POST", headers={
            "Authorization": "Bearer ci-bot-key", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "server/discover"})
        with urllib.request.urlopen(request, timeout=30) as response:
            discovered = json.load(response)
        assert "2026-07-28" in discovered["result"]["supportedVersions"], discovered

        async def agent():
            headers = {"Authorization": "Bearer ci-bot-key"}
            async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
                async with streamable_http_client(f"{url}/mcp", http_client=http) as (read, write, *_):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        tools = names(await session.list_tools())
                        try:
                            await session.call_tool(
                                "filesystem__write_file", {"path": str(sandbox / "x.txt"), "content": "x"})
                            return tools, None
                        except MCPError as refused:
                            return tools, str(refused)

        tools, refused = asyncio.run(agent())
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "filesystem__read_text_file" in tools and "filesystem__write_file" not in tools, tools
    assert refused and "Denied by policy 'read-only'" in refused and not (sandbox / "x.txt").exists()
    assert any(r.get("tool") == "write_file" and r["outcome"] == "deny" for r in read_audit(audit))
