"""The door of `portcullis serve` under flood: one agent holding hundreds of
connections (each with a call the approval gate holds, or refused past the
agent's pending limit) takes only its share, so another agent's call and
`/healthz` still answer; every refusal at the door is in the trail, and a
flood of them from one peer is summed into one record per window rather
than one per request."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

from conftest import POLICIES, read_audit
from test_approvals import APPROVERS, Admin, wait_ready
from test_serve import Gateway, connect, free_port, gateway, sha256  # noqa: F401 (a fixture)

FLOOD_KEY = "flood-key-90ad"
OTHER_KEY = "other-key-2f41"


def test_one_agent_holding_hundreds_of_connections_does_not_starve_another(tmp_path: Path, sandbox: Path):
    port = free_port()
    approvers = "".join(f'\n[approvers.{name}]\napi_key_sha256 = "{sha256(key)}"\n' for name, key in APPROVERS.items())
    # Idle connections are kept long: only the shares can make room.
    extra = f"""
[agents.flood]
api_key_sha256 = "{sha256(FLOOD_KEY)}"

[agents.other]
api_key_sha256 = "{sha256(OTHER_KEY)}"

[[policy]]
name = "approval-gate"
module = "{POLICIES / 'approval_gate.wasm'}"
agents = ["flood"]
methods = ["tools/call"]
settings = {{ tools = ["echo"] }}

[admin]
listen = "127.0.0.1:{port}"
{approvers}
"""
    gateway = Gateway(tmp_path, sandbox, extra, serve="header_timeout_secs = 300")
    wait_ready(f"http://127.0.0.1:{port}")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"message": "flood"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
    request = (f"POST /servers/everything/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {FLOOD_KEY}\r\nContent-Type: application/json\r\n"
               f"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2026-07-28\r\n"
               f"Mcp-Method: tools/call\r\nMcp-Name: echo\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    flood: list[socket.socket] = []
    try:
        for _ in range(600):
            try:
                connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
                connection.sendall(request)
                flood.append(connection)
            except OSError:
                pass  # closed at the door: past the share of its address
        held = Admin(port).pending(16)

        async def other_agent():
            async with connect(gateway, "", "/servers/everything/mcp", token=OTHER_KEY) as session:
                return await session.call_tool("echo", {"message": "still served"})

        echoed = asyncio.run(asyncio.wait_for(other_agent(), 30))
        with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=30) as response:
            health = json.load(response)
        status = gateway.status()
    finally:
        for connection in flood:
            connection.close()
        gateway.stop()
    assert len(held) == 16, "the agent's pending limit"
    assert echoed.content[0].text == "Echo: still served"
    assert health["servers"]["everything"]["state"] == "ready"
    records = read_audit(gateway.audit)
    over = [r for r in records if r.get("event") == "connection-refused"]
    assert over and all(r["agent"] == "flood" for r in over)
    assert "max_connections_per_agent" in over[0]["reason"]
    # Summed up, not one record per refused connection.
    assert len(over) <= 2 and sum(r.get("repeated", 0) + 1 for r in over) > 1
    assert status, "the gateway kept running"


def test_every_refusal_at_the_door_is_in_the_trail_and_a_flood_of_them_is_summed(gateway: Gateway):
    key = {"Authorization": "Bearer admin-key-77c1"}
    bad_id = b'{"jsonrpc":"2.0","id":1e400,"method":"initialize","params":{}}'
    assert gateway.post("/mcp", bad_id, key)[0] == 400
    for _ in range(50):
        assert gateway.post("/mcp", b"{}", {"Authorization": "Bearer wrong"})[0] == 401
    assert gateway.post("/nowhere", b"{}", key)[0] == 404
    listing = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).encode()
    assert gateway.post("/mcp", listing, key)[0] == 400  # no session
    gateway.stop()  # the windows still open reach the trail as it stops
    refused = [r for r in read_audit(gateway.audit) if r.get("event", "").endswith("-refused")]
    kinds = [(r["event"], r.get("repeated")) for r in refused]
    assert ("message-refused", None) in kinds
    credentials = [r for r in refused if r["event"] == "credentials-refused"]
    assert [r.get("repeated") for r in credentials] == [None, 49], "the first whole, then the count"
    assert credentials[1]["since"] == credentials[0]["time"]
    [bad] = [r for r in refused if r["event"] == "message-refused"]
    assert "number out of range" in bad["reason"] and bad["code"] == -32700 and bad["message_sha256"]
    requests = [r["reason"] for r in refused if r["event"] == "request-refused"]
    assert requests == ["HTTP 404: no MCP endpoint here", "HTTP 400: Mcp-Session-Id header is required (initialize first)"]


def test_one_address_holding_idle_connections_leaves_room_for_another(tmp_path: Path, sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, serve="max_connections = 64\nheader_timeout_secs = 300")
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            # Connections that never send a request, from 127.0.0.1.
            connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            connection.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")
            idle.append(connection)
        closed = 0
        for connection in idle:
            connection.settimeout(0.5)
            try:
                closed += connection.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        # Another address finds a free connection at once.
        other = socket.create_connection(("127.0.0.1", gateway.port), timeout=30, source_address=("127.0.0.2", 0))
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := other.recv(65536):
            answer += chunk
        other.close()
    finally:
        for connection in idle:
            connection.close()
        gateway.stop()
    # An eighth of 64 stay open; the rest were closed as they came.
    assert closed == 100 - 8
    assert answer.startswith(b"HTTP/1.1 200") and b'"servers"' in answer
