"""Taking a permission away takes it away, on every path at once. An agent's
grant is decided per request, by the credentials that request carries and
the config in force: a reload that narrows it, or a token without the group
that granted a server, stops the next request of an open session (on `/mcp`
and on `/servers/NAME/mcp`), the merged lists stop offering the server's
tools, policies judge the attributes of the request's own token, a held
call is not released onto a server its agent lost, and a refreshed token
keeps a stateless agent's calls in flight. Driven by the official Python
SDK client and raw HTTP, against the real `server-everything`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import POLICIES, read_audit
from pki import Issuer
from test_approvals import APPROVERS, Admin, wait_ready
from test_serve import Gateway, connect, free_port, names, sha256

OPS_KEY = "ops-key-1b7e"
ISSUER = "https://idp.grants.test"
AUDIENCE = "portcullis-grants"

# Agent `ops` (an API key) may use files and everything; agent `svc` (JWTs
# only) gets files from its entry and everything from the group `ops`.
AGENTS = f"""
[agents.ops]
api_key_sha256 = "{sha256(OPS_KEY)}"
servers = ["files", "everything"]

[agents.svc]
servers = ["files"]
"""


def jwt_config(tmp_path: Path, idp: Issuer) -> str:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(idp.jwks())
    return f"""
[jwt]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"

[jwt.groups]
ops = ["everything"]
"""


def narrow(gateway: Gateway) -> None:
    """The operator takes `everything` away from `ops`, and the reload is
    audited ok."""
    text = gateway.config.read_text()
    gateway.config.write_text(text.replace('servers = ["files", "everything"]', 'servers = ["files"]'))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(r.get("event") == "reload" and r["result"] == "ok" for r in read_audit(gateway.audit)):
            return
        time.sleep(0.1)
    raise AssertionError("the narrowed config was never reloaded")


class Raw:
    """A 2025-11-25 session driven request by request, each with the token
    it is given."""

    def __init__(self, gateway: Gateway, path: str, token: str):
        self.gateway, self.path = gateway, path
        self.next_id = 1
        initialize = {"protocolVersion": "2025-11-25", "capabilities": {},
                      "clientInfo": {"name": "raw-grants", "version": "1"}}
        status, headers, _ = self.send("initialize", initialize, token, session=False)
        assert status == 200
        self.session = headers["mcp-session-id"]

    def send(self, method: str, params: dict | None, token: str, session: bool = True):
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        self.next_id += 1
        if params is not None:
            message["params"] = params
        headers = {"Authorization": f"Bearer {token}"}
        if session:
            headers["Mcp-Session-Id"] = self.session
        return self.gateway.post(self.path, json.dumps(message).encode(), headers)

    def answer(self, method: str, params: dict | None, token: str) -> dict:
        status, _, body = self.send(method, params, token)
        assert status == 200, (status, body)
        return json.loads(body)


def test_a_reload_that_narrows_a_grant_stops_the_next_request_of_every_open_session(tmp_path: Path,
                                                                                  sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, AGENTS)
    try:
        direct = Raw(gateway, "/servers/everything/mcp", OPS_KEY)
        assert "result" in direct.answer("tools/list", None, OPS_KEY)

        async def scenario():
            async with connect(gateway, "", token=OPS_KEY) as session:
                before = names(await session.list_tools())
                echoed = await session.call_tool("ev__echo", {"message": "granted"})
                await asyncio.to_thread(narrow, gateway)
                after = names(await session.list_tools())
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("ev__echo", {"message": "revoked"})
                read = await session.call_tool("files__read_text_file", {"path": str(sandbox / "hello.txt")})
            async with connect(gateway, "", token=OPS_KEY) as fresh:
                fresh_tools = names(await fresh.list_tools())
            return before, echoed, after, refused.value, read, fresh_tools

        before, echoed, after, refused, read, fresh_tools = asyncio.run(scenario())
        # The session opened on the server's own path is refused there too.
        status, _, _ = direct.send("tools/call", {"name": "echo", "arguments": {"message": "x"}}, OPS_KEY)
    finally:
        gateway.stop()
    assert "ev__echo" in before and echoed.content[0].text == "Echo: granted"
    assert after and not [n for n in after if n.startswith("ev__")], "the merged list no longer offers them"
    assert "files__read_text_file" in after and read.content[0].text == "hello from the sandbox\n"
    assert "may not use server 'everything'" in refused.message
    assert not [n for n in fresh_tools if n.startswith("ev__")]
    assert status == 404
    records = read_audit(gateway.audit)
    echo_calls = [(r["outcome"], r.get("decided_by")) for r in records
                  if r.get("tool") == "echo" and r.get("kind") == "request"]
    assert echo_calls == [("allow", None), ("deny", "portcullis:grant")]
    denied = [r for r in records if r.get("decided_by") == "portcullis:grant"]
    assert denied[0]["agent"] == "ops" and "grant:refused" in denied[0]["tags"]
    # What the server answered is in the trail only for the call it got.
    answered = [r for r in records if r.get("tool") == "echo" and r.get("direction") == "server-to-client"]
    assert len(answered) == 1
    assert any(r.get("event") == "server-refused" and r["endpoint"] == "/servers/everything/mcp" for r in records)


def test_a_request_is_authorized_and_judged_by_its_own_token(tmp_path: Path, sandbox: Path):
    idp = Issuer(ISSUER, AUDIENCE)
    # Only agents of the group `ops` may call tools, says a Rego policy over
    # the token's claims.
    rego = tmp_path / "ops-only.rego"
    rego.write_text("""package mcp
deny contains "only ops may call tools" if {
  input.direction == "client-to-server"
  input.method == "tools/call"
  not contains(input.agent.attributes["jwt.groups"], "ops")
}
""")
    policy = f"""
[[policy]]
name = "ops-only"
module = "{POLICIES / 'rego.wasm'}"
agents = ["svc"]
settings_files = {{ policy = "{rego}" }}
settings = {{ query = "data.mcp" }}
"""
    gateway = Gateway(tmp_path, sandbox, AGENTS + jwt_config(tmp_path, idp) + policy)
    with_ops = idp.token(sub="svc", groups=["ops", "readers"])
    without = idp.token(sub="svc", groups=["readers"])
    read = {"name": "files__read_text_file", "arguments": {"path": str(sandbox / "hello.txt")}}
    echo = {"name": "ev__echo", "arguments": {"message": "hi"}}
    try:
        session = Raw(gateway, "/mcp", with_ops)
        listed = [t["name"] for t in session.answer("tools/list", None, with_ops)["result"]["tools"]]
        granted = session.answer("tools/call", echo, with_ops)
        # The same session, the same agent, a token without the group.
        relisted = [t["name"] for t in session.answer("tools/list", None, without)["result"]["tools"]]
        refused = session.answer("tools/call", echo, without)
        judged = session.answer("tools/call", read, without)
        again = session.answer("tools/call", read, with_ops)
        alone, _, _ = session.send("tools/list", None, without, session=False)
        initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}).encode()
        direct = gateway.post("/servers/everything/mcp", initialize, {"Authorization": f"Bearer {without}"})[0]
    finally:
        gateway.stop()
    assert "ev__echo" in listed and granted["result"]["content"][0]["text"] == "Echo: hi"
    assert relisted and not [n for n in relisted if n.startswith("ev__")]
    assert "may not use server 'everything'" in refused["error"]["message"]
    assert "only ops may call tools" in judged["error"]["message"]
    assert again["result"]["content"][0]["text"] == "hello from the sandbox\n"
    assert alone == 400 and direct == 404
    calls = [(r["tool"], r["outcome"], r["agent_attributes"]["jwt.groups"]) for r in read_audit(gateway.audit)
             if r.get("kind") == "request" and r.get("method") == "tools/call"]
    assert calls == [("echo", "allow", "ops,readers"), ("echo", "deny", "readers"),
                     ("read_text_file", "deny", "readers"), ("read_text_file", "allow", "ops,readers")]


def test_a_held_call_on_a_server_its_agent_lost_is_not_released_by_an_approval(tmp_path: Path, sandbox: Path):
    port = free_port()
    approvers = "".join(f'\n[approvers.{name}]\napi_key_sha256 = "{sha256(key)}"\n' for name, key in APPROVERS.items())
    gate = f"""
[[policy]]
name = "approval-gate"
module = "{POLICIES / 'approval_gate.wasm'}"
methods = ["tools/call"]
servers = ["everything"]
settings = {{ tools = ["echo"] }}

[admin]
listen = "127.0.0.1:{port}"
{approvers}
"""
    gateway = Gateway(tmp_path, sandbox, AGENTS + gate)
    wait_ready(f"http://127.0.0.1:{port}")
    admin = Admin(port)
    answers: list[dict] = []
    try:
        session = Raw(gateway, "/mcp", OPS_KEY)
        call = {"name": "ev__echo", "arguments": {"message": "held"}}
        caller = threading.Thread(target=lambda: answers.append(session.answer("tools/call", call, OPS_KEY)))
        caller.start()
        [held] = admin.pending()
        narrow(gateway)
        status, decided = admin.decide(held["id"], "approve", "alice")
        caller.join(30)
    finally:
        gateway.stop()
    assert status == 200 and decided["state"] == "approved"
    [answer] = answers
    message = answer["error"]["message"]
    assert "not relayed" in message and "may not use server 'everything'" in message
    records = read_audit(gateway.audit)
    [ending] = [r for r in records if r.get("event") == "approval"]
    assert ending["state"] == "approved" and "may not use server 'everything'" in ending["withheld"]
    # The server never got the call.
    assert not [r for r in records if r.get("tool") == "echo" and r.get("direction") == "server-to-client"]


def test_a_refreshed_token_keeps_a_stateless_agents_calls_in_flight(tmp_path: Path, sandbox: Path):
    idp = Issuer(ISSUER, AUDIENCE)
    gateway = Gateway(tmp_path, sandbox, AGENTS + jwt_config(tmp_path, idp).replace(
        'ops = ["everything"]', 'ops = ["everything", "echo"]'))
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}

    def call(method: str, token: str, rid: int) -> tuple[int, dict]:
        body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": {"_meta": meta}}).encode()
        status, _, answer = gateway.post("/servers/echo/mcp", body, {
            "Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method})
        return status, json.loads(answer)

    first = idp.token(sub="svc", groups=["ops"], lifetime=300)
    answers: dict[str, tuple[int, dict]] = {}
    try:
        slow = threading.Thread(target=lambda: answers.__setitem__("slow", call("test/slow", first, 1)))
        slow.start()
        deadline = time.monotonic() + 10
        while '"test/slow"' not in gateway.echo_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The agent's token is refreshed (new iat and exp) while the call runs.
        time.sleep(1.1)
        refreshed = idp.token(sub="svc", groups=["ops"], lifetime=600)
        assert refreshed != first
        answers["quick"] = call("test/params", refreshed, 2)
        slow.join(30)
    finally:
        gateway.stop()
    assert answers["quick"][0] == 200 and answers["quick"][1]["result"]["method"] == "test/params"
    status, answer = answers["slow"]
    assert status == 200 and answer["result"]["method"] == "test/slow", answer
