"""The whole protocol through `portcullis serve`: what servers send on their
own — sampling, elicitation and roots requests, progress, logging, resource
updates — reaches the agent session it concerns, judged and audited in both
directions, and cancellations reach the server. Driven by the official
TypeScript and Python SDK clients against the real server-everything, plus
the fault-injecting echo double where a server must misbehave."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from mcp import ClientSession, types
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import DOUBLES, POLICIES, read_audit
from test_serve import KEYS, Gateway, connect as connect_to, free_port, gateway, remote_mcp_server, sha256  # noqa: F401

PER_SESSION = 'isolation = "per-session"'
SECOND_AGENT = f"""
[agents.second]
api_key_sha256 = "{sha256('second-key-5d2e')}"
servers = ["everything"]
"""
KEYS = {**KEYS, "second": "second-key-5d2e"}


def ts_full_agent(gateway: Gateway, agent: str, scenario: str, path: str = "/servers/everything/mcp") -> dict:
    """What an agent written with the official TypeScript SDK, declaring
    sampling, elicitation and roots, saw in `scenario`."""
    script = Path(__file__).parent / "clients" / "ts_full_client.mjs"
    done = subprocess.run(["node", str(script), f"{gateway.url}{path}", KEYS[agent], scenario],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def exchanges(gateway: Gateway, method: str) -> list[tuple]:
    """The trail's records of `method` (and its answers): who, which way, what kind, the outcome."""
    return [(r.get("agent"), r["direction"], r["kind"], r["outcome"])
            for r in read_audit(gateway.audit) if r.get("method") == method]


def until(check, seconds: float = 15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture
def isolated(tmp_path: Path, sandbox: Path):
    """A gateway whose everything server runs once per client session."""
    running = Gateway(tmp_path, sandbox, extra=SECOND_AGENT, everything=PER_SESSION)
    yield running
    running.stop()


def test_a_typescript_agent_gets_the_whole_protocol_from_a_server_of_its_own(isolated: Gateway):
    report = ts_full_agent(isolated, "admin", "all")
    # Introduced with the client's capabilities, the server offers the tools that ask the client.
    assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= set(report["tools"])
    calls = report["calls"]
    assert "canned reply to 1 message(s)" in calls["sampling"]["result"]
    assert "Ada Lovelace" in calls["elicitation"]["result"]
    assert "file:///srv/agent-workspace" in calls["roots"]["result"]
    assert calls["progress"]["result"]["progress"] == [[1, 4], [2, 4], [3, 4], [4, 4]]
    assert calls["logging"]["result"] is True and report["logs"]
    assert calls["subscribe"]["result"]["updated"] is True
    assert "changed their mind" in calls["cancel"]["error"]["message"]
    asked = [(a["method"], a.get("mode")) for a in report["asked"]]
    assert asked.count(("sampling/createMessage", None)) == 1 and asked.count(("elicitation/create", "form")) == 1
    assert ("roots/list", None) in asked
    # URL mode: the request reaches the agent with its URL, and the -32042 error with its data.
    assert "trigger-url-elicitation" in report["tools"]
    urls = [a["url"] for a in report["asked"] if a.get("mode") == "url"]
    assert urls == ["https://consent.example.com/grant?flow=7"], report["asked"]
    assert "error" not in calls["url-elicitation"], calls["url-elicitation"]
    required = calls["url-elicitation-error"]["error"]
    assert required["code"] == -32042, required
    assert required["data"]["elicitations"][0]["url"] == "https://modelcontextprotocol.io"  # its prerequisite
    # Both directions of each server request are judged and audited, under the agent's name.
    for method in ("sampling/createMessage", "elicitation/create", "roots/list"):
        seen = exchanges(isolated, method)
        assert ("admin", "server-to-client", "request", "allow") in seen, (method, seen)
        assert ("admin", "client-to-server", "result", "allow") in seen, (method, seen)
    assert ("admin", "server-to-client", "notification", "allow") in exchanges(isolated, "notifications/progress")
    # The session ended, so did its server.
    assert until(lambda: isolated.health()["servers"]["everything"] == {"state": "per-session", "restarts": 0})
    assert until(lambda: isolated.status()["servers"]["everything"]["instances"] == 0)


def test_two_agents_each_get_only_their_own_server_requests_and_progress(isolated: Gateway):
    async def agent(name: str, steps: int) -> dict:
        seen = {"sampled": [], "progress": []}

        async def sampling(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            seen["sampled"].append(params.messages[0].content.text)
            return types.CreateMessageResult(role="assistant", model="m",
                                             content=types.TextContent(type="text", text=f"answered by {name}"))

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen["progress"].append(total)

        headers = {"Authorization": f"Bearer {KEYS[name]}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            url = f"{isolated.url}/servers/everything/mcp"
            async with streamable_http_client(url, http_client=http) as (read, write, *_):
                async with ClientSession(read, write, sampling_callback=sampling) as session:
                    await session.initialize()
                    sampled = await session.call_tool("trigger-sampling-request", {"prompt": f"from {name}"})
                    seen["result"] = sampled.content[0].text
                    await session.call_tool("trigger-long-running-operation", {"duration": 1, "steps": steps},
                                            progress_callback=progress)
        # The shared server (merged endpoint) keeps each caller's progress apart too.
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with streamable_http_client(f"{isolated.url}/mcp", http_client=http) as (read, write, *_):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    seen["shared"] = []

                    async def shared(done: float, total: float | None, message: str | None) -> None:
                        seen["shared"].append(total)

                    await session.call_tool("ev__trigger-long-running-operation", {"duration": 1, "steps": steps},
                                            progress_callback=shared)
        return seen

    async def both():
        return await asyncio.gather(agent("admin", 3), agent("second", 5))

    admin, second = asyncio.run(both())
    assert admin["sampled"] == ["Resource trigger-sampling-request context: from admin"]
    assert second["sampled"] == ["Resource trigger-sampling-request context: from second"]
    assert "answered by admin" in admin["result"] and "answered by second" not in admin["result"]
    assert "answered by second" in second["result"] and "answered by admin" not in second["result"]
    assert admin["progress"] == [3] * 3 and second["progress"] == [5] * 5
    assert admin["shared"] == [3] * 3 and second["shared"] == [5] * 5


def test_a_policy_refuses_a_servers_sampling_request_and_the_trail_has_both_sides(tmp_path: Path, sandbox: Path):
    no_sampling = f"""
[[policy]]
name = "no-sampling"
module = "{POLICIES / 'method_filter.wasm'}"
servers = ["everything"]
settings = {{ deny = ["sampling/*"] }}
"""
    gateway = Gateway(tmp_path, sandbox, extra=no_sampling, everything=PER_SESSION)
    try:
        report = ts_full_agent(gateway, "admin", "sampling,roots")
    finally:
        gateway.stop()
    # The client was never asked; the server got the refusal as its answer and failed the call.
    assert [a["method"] for a in report["asked"]] == ["roots/list"] * len(report["asked"])
    assert "canned reply" not in json.dumps(report["calls"]["sampling"])
    assert "workspace" in report["calls"]["roots"]["result"]
    assert exchanges(gateway, "sampling/createMessage") == [("admin", "server-to-client", "request", "deny")]
    call = [r for r in read_audit(gateway.audit) if r.get("tool") == "trigger-sampling-request"]
    assert [(r["direction"], r["kind"]) for r in call] == [("client-to-server", "request"),
                                                            ("server-to-client", "result")]


def session_post(gateway: Gateway, session: str | None, body: dict, timeout: float = 30,
                 path: str = "/servers/echo/mcp") -> tuple[int, bytes, str | None]:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {KEYS['admin']}"}
    if session:
        headers["Mcp-Session-Id"] = session
    request = urllib.request.Request(f"{gateway.url}{path}", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read(), response.headers.get("Mcp-Session-Id")


def echo_session(gateway: Gateway, capabilities: dict | None = None, path: str = "/servers/echo/mcp") -> str:
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": capabilities or {},
                             "clientInfo": {"name": "raw", "version": "1"}}}
    _, _, session = session_post(gateway, None, initialize, path=path)
    return session


def echo_log(gateway: Gateway) -> list[dict]:
    lines = gateway.echo_log.read_text().splitlines() if gateway.echo_log.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def test_a_cancelled_or_abandoned_call_is_cancelled_with_the_server_under_its_own_id(gateway: Gateway):
    session = echo_session(gateway)
    # The client gives up: its connection closes while the server works.
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        session_post(gateway, session, {"jsonrpc": "2.0", "id": "mine", "method": "test/slow"}, timeout=0.5)
    # The client cancels another call by the id it knows it by.
    answered = {}
    slow = threading.Thread(target=lambda: answered.update(
        done=session_post(gateway, session, {"jsonrpc": "2.0", "id": 7, "method": "test/slow"})))
    slow.start()
    # The double reads one message at a time: 7 is read once "mine" is done.
    assert until(lambda: sum(m.get("method") == "test/slow" for m in echo_log(gateway)) == 2)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "no"}}
    assert session_post(gateway, session, cancel)[0] == 202
    slow.join(timeout=30)
    assert answered["done"][0] == 202  # a cancelled request is not answered

    def cancellations():
        log = echo_log(gateway)
        slow_ids = [m["id"] for m in log if m.get("method") == "test/slow"]
        cancelled = [m["params"]["requestId"] for m in log if m.get("method") == "notifications/cancelled"]
        return slow_ids, cancelled

    assert until(lambda: len(cancellations()[1]) == 2, 20), echo_log(gateway)
    slow_ids, cancelled = cancellations()
    # The server was told under its own ids, never the clients' ("mine", 7).
    assert cancelled == slow_ids and "mine" not in slow_ids and 7 not in slow_ids


def test_a_server_request_nobody_can_answer_is_refused_at_once(tmp_path: Path, sandbox: Path):
    own_log = tmp_path / "own-echo.log"
    own_echo = f"""
[servers.own-echo]
command = "{sys.executable}"
args = ["{DOUBLES / 'echo_server.py'}"]
env = {{ ECHO_LOG = "{own_log}" }}
{PER_SESSION}
"""
    gateway = Gateway(tmp_path, sandbox, extra=own_echo)
    try:
        # On the server all agents share, nothing tells whose call a server's request belongs to: refused,
        # even with one call in flight (another agent's might have just ended).
        session = echo_session(gateway)
        status, body, _ = session_post(gateway, session, {"jsonrpc": "2.0", "id": 1, "method": "test/server-request"})
        assert status == 200 and json.loads(body)["result"]["method"] == "test/server-request"
        assert until(lambda: any(m.get("id") == "srv-1" and "error" in m for m in echo_log(gateway)))
        shared = next(m for m in echo_log(gateway) if m.get("id") == "srv-1")
        assert "shared by all agents" in shared["error"]["message"]
        # On a server of the session's own, a client that cannot sample is not asked to: the server
        # is told why at once, and the log message it sent about the call still reaches the client.
        session = echo_session(gateway, path="/servers/own-echo/mcp")
        status, body, _ = session_post(gateway, session, {"jsonrpc": "2.0", "id": 1, "method": "test/server-request"},
                                       path="/servers/own-echo/mcp")
        events = [json.loads(line[5:]) for line in body.decode().splitlines() if line.startswith("data:")]
        assert [e.get("method") for e in events] == ["notifications/message", None], events
        assert events[-1]["result"]["method"] == "test/server-request"
        own = lambda: [json.loads(line) for line in own_log.read_text().splitlines()]  # noqa: E731
        # The server reads the refusal in its own time.
        assert until(lambda: any(m.get("id") == "srv-1" for m in own()))
        refusal = next(m for m in own() if m.get("id") == "srv-1")
        assert "did not declare the 'sampling' capability" in refusal["error"]["message"]
    finally:
        gateway.stop()
    refused = [r for r in read_audit(gateway.audit) if r.get("event") == "server-request-refused"]
    assert [(r["agent"], r["endpoint"]) for r in refused] == [("admin", "/servers/own-echo/mcp")]
    assert "sampling/createMessage" in refused[0]["reason"]
    assert exchanges(gateway, "sampling/createMessage") == []  # refused before any relay: nothing relayed


def test_servers_of_sessions_own_are_bounded_per_agent_until_they_are_gone(tmp_path: Path, sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, everything=PER_SESSION, serve="max_server_instances_per_agent = 1")
    try:
        path = "/servers/everything/mcp"
        first = echo_session(gateway, path=path)
        initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                 "clientInfo": {"name": "raw", "version": "1"}}}
        with pytest.raises(urllib.error.HTTPError) as refused:
            session_post(gateway, None, initialize, path=path)
        assert refused.value.code == 429 and b"max_server_instances_per_agent" in refused.value.read()
        # The status report follows within its refresh interval.
        assert until(lambda: gateway.status().get("servers", {}).get("everything", {}).get("instances") == 1)
        # Its session ended, the server is stopped, and then its place is free.
        delete = urllib.request.Request(f"{gateway.url}{path}", method="DELETE", headers={
            "Authorization": f"Bearer {KEYS['admin']}", "Mcp-Session-Id": first})
        urllib.request.urlopen(delete, timeout=10).close()
        assert until(lambda: gateway.health()["servers"]["everything"].get("state") == "per-session"
                     and gateway.status()["servers"]["everything"].get("instances") == 0)
        assert echo_session(gateway, path=path)
    finally:
        gateway.stop()


def test_a_first_call_is_judged_by_annotations_portcullis_listed_itself(gateway: Gateway, sandbox: Path):
    # Portcullis lists each shared server's tools as soon as it is ready, and audits that it did.
    assert until(lambda: any(r.get("event") == "tools-surveyed" and r["endpoint"] == "/servers/files/mcp"
                             for r in read_audit(gateway.audit)))
    surveyed = next(r for r in read_audit(gateway.audit) if r.get("event") == "tools-surveyed")
    assert "tools" in surveyed["reason"] and len(surveyed["message_sha256"]) == 64
    # A 2026-07-28 agent (with a cached list) calls a read-only tool without ever listing: the read-only
    # policy knows its annotations.
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}

    def call(tool: str, arguments: dict) -> dict:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": arguments, "_meta": meta}}
        headers = {"Authorization": f"Bearer {KEYS['reader']}", "MCP-Protocol-Version": "2026-07-28",
                   "Mcp-Method": "tools/call", "Mcp-Name": tool}
        status, _, answer = gateway.post("/mcp", json.dumps(body).encode(), headers)
        assert status == 200, answer
        return json.loads(answer)

    listed = call("files__list_directory", {"path": str(sandbox)})
    assert "hello.txt" in listed["result"]["content"][0]["text"], listed
    written = call("files__write_file", {"path": str(sandbox / "no.txt"), "content": "x"})
    assert "not declared read-only" in json.dumps(written) and not (sandbox / "no.txt").exists()


def test_a_stateless_python_agent_answers_server_requests_through_input_required(isolated: Gateway):
    asked = []

    async def sampling(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append("sampling")
        return types.CreateMessageResult(role="assistant", model="m",
                                         content=types.TextContent(type="text", text="stateless reply"))

    async def elicitation(context, params) -> types.ElicitResult:
        if getattr(params, "mode", "form") == "url":
            asked.append(("url", params.url))
            return types.ElicitResult(action="accept")
        asked.append("elicitation")
        return types.ElicitResult(action="accept", content={"name": "Grace Hopper", "check": True})

    async def roots(context) -> types.ListRootsResult:
        asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/stateless", name="stateless")])

    async def scenario():
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            transport = streamable_http_client(f"{isolated.url}/servers/everything/mcp", http_client=http)
            async with Client(transport, sampling_callback=sampling, elicitation_callback=elicitation,
                              list_roots_callback=roots) as client:
                tools = [tool.name for tool in (await client.list_tools()).tools]
                sampled = await client.call_tool("trigger-sampling-request", {"prompt": "hi", "maxTokens": 20})
                elicited = await client.call_tool("trigger-elicitation-request", {})
                rooted = await client.call_tool("get-roots-list", {})
                consent = {"url": "https://consent.example.com/grant?flow=9", "elicitationId": "consent-9"}
                consented = await client.call_tool("trigger-url-elicitation", consent)
                return client.protocol_version, tools, sampled, elicited, rooted, consented

    version, tools, sampled, elicited, rooted, consented = asyncio.run(scenario())
    assert version == "2026-07-28"
    assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= set(tools)
    assert "stateless reply" in sampled.content[0].text
    assert "Grace Hopper" in " ".join(c.text for c in elicited.content)
    assert "file:///srv/stateless" in rooted.content[0].text
    assert {"sampling", "elicitation", "roots"} <= set(asked)
    # URL mode, through input_required too.
    assert ("url", "https://consent.example.com/grant?flow=9") in asked and not consented.is_error, consented
    for method in ("sampling/createMessage", "elicitation/create", "roots/list"):
        seen = exchanges(isolated, method)
        assert ("admin", "server-to-client", "request", "allow") in seen, (method, seen)
        assert ("admin", "client-to-server", "result", "allow") in seen, (method, seen)


def stateless_call(gateway: Gateway, agent: str, tool: str, arguments: dict, extra: dict | None = None,
                   path: str = "/servers/everything/mcp") -> dict:
    """A 2026-07-28 tools/call, written out by hand, from a client that can sample."""
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta, **(extra or {})}}
    headers = {"Authorization": f"Bearer {KEYS[agent]}", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": tool}
    status, _, answer = gateway.post(path, json.dumps(body).encode(), headers)
    return json.loads(answer)


def test_a_parked_calls_request_state_serves_its_own_agent_once(isolated: Gateway):
    asked = stateless_call(isolated, "admin", "trigger-sampling-request", {"prompt": "x"})["result"]
    assert asked["resultType"] == "input_required"
    [(key, request)] = asked["inputRequests"].items()
    assert request["method"] == "sampling/createMessage"
    state = asked["requestState"]
    reply = {"role": "assistant", "model": "m", "content": {"type": "text", "text": "parked reply"}}
    # Of what the agent sends back, only the answer to the request shown is taken.
    again = {"inputResponses": {str(n): reply for n in range(1000, 1200)} | {key: reply}, "requestState": state}
    # Another agent cannot take the call over, nor can a made-up state name one.
    stolen = stateless_call(isolated, "second", "trigger-sampling-request", {"prompt": "x"}, again)
    assert stolen["error"]["code"] == -32602 and "names no call of this agent" in stolen["error"]["message"]
    forged = {**again, "requestState": "pcp1." + "0" * 32}
    assert stateless_call(isolated, "admin", "trigger-sampling-request", {"prompt": "x"}, forged)["error"]["code"] == -32602
    # Its own agent resumes it, once.
    done = stateless_call(isolated, "admin", "trigger-sampling-request", {"prompt": "x"}, again)
    assert "parked reply" in done["result"]["content"][0]["text"], done
    replayed = stateless_call(isolated, "admin", "trigger-sampling-request", {"prompt": "x"}, again)
    assert replayed["error"]["code"] == -32602
    refused = [r for r in read_audit(isolated.audit) if r.get("event") == "message-refused"]
    assert not refused, "keys naming nothing wrote nothing to the trail"


def test_a_parked_call_nobody_comes_back_for_lets_its_session_and_server_go(tmp_path: Path, sandbox: Path):
    gateway = Gateway(tmp_path, sandbox, everything=PER_SESSION,
                      serve="request_timeout_secs = 2\nsession_idle_secs = 1")
    try:
        asked = stateless_call(gateway, "admin", "trigger-sampling-request", {"prompt": "x"})["result"]
        assert asked["resultType"] == "input_required"
        instances = lambda: gateway.status().get("servers", {}).get("everything", {}).get("instances")  # noqa: E731
        assert until(lambda: instances() == 1)
        # Given up on after the request timeout: the agent's standing session
        # expires, and the server it had of its own is stopped.
        assert until(lambda: instances() == 0, 30)
        expired = [r for r in read_audit(gateway.audit) if r.get("event") == "session-expired"]
        assert [r["agent"] for r in expired] == ["admin"]
    finally:
        gateway.stop()


def test_a_stateless_agent_hears_of_changes_through_subscriptions_listen(gateway: Gateway):
    async def scenario():
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with Client(streamable_http_client(f"{gateway.url}/mcp", http_client=http)) as client:
                discovered = client.server_capabilities
                async with client.listen(tools_list_changed=True, prompts_list_changed=True) as subscription:
                    honored = subscription.honored
                    poke = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "test/list-changed", "params": {
                        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                  "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
                    await asyncio.to_thread(gateway.post, "/servers/echo/mcp", poke, {
                        "Authorization": f"Bearer {KEYS['admin']}", "MCP-Protocol-Version": "2026-07-28",
                        "Mcp-Method": "test/list-changed"})
                    event = await asyncio.wait_for(subscription.__anext__(), 15)
                return client.protocol_version, discovered, honored, event

    version, discovered, honored, event = asyncio.run(scenario())
    assert version == "2026-07-28"
    assert discovered.tools.list_changed  # advertised on discover
    assert honored.tools_list_changed and honored.prompts_list_changed
    assert type(event).__name__ == "ToolsListChanged", event
    relayed = [r for r in read_audit(gateway.audit) if r.get("method") == "notifications/tools/list_changed"]
    assert ("admin", "echo", "server-to-client") in {(r["agent"], r["server"], r["direction"]) for r in relayed}


def test_a_remote_servers_own_stream_reaches_every_session_using_it(tmp_path: Path, sandbox: Path):
    with remote_mcp_server(tmp_path) as (url, headers_log):
        gateway = Gateway(tmp_path, sandbox, f'\n[servers.remote]\nurl = "{url}"\n')
        try:
            async def scenario():
                heard = []
                changed = asyncio.Event()

                async def listener(message) -> None:
                    method = getattr(message, "method", None) or getattr(getattr(message, "root", None), "method", None)
                    heard.append(method)
                    if method == "notifications/tools/list_changed":
                        changed.set()

                headers = {"Authorization": f"Bearer {KEYS['admin']}"}
                async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
                    async with streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (r, w, *_):
                        async with ClientSession(r, w, message_handler=listener) as listening:
                            await listening.initialize()
                            async with connect_to(gateway, "admin", "/servers/remote/mcp") as caller:
                                for _ in range(20):
                                    await caller.call_tool("announce", {})
                                    try:
                                        await asyncio.wait_for(changed.wait(), 0.5)
                                        break
                                    except asyncio.TimeoutError:
                                        pass
                return heard

            heard = asyncio.run(scenario())
        finally:
            gateway.stop()
        seen = [json.loads(line) for line in headers_log.read_text().splitlines()]
    assert "notifications/tools/list_changed" in heard
    # Portcullis listened on the server's own stream, in its session, with nothing of the agent's.
    listens = [h for h in seen if h[":method"] == "GET"]
    assert listens and all(h.get("mcp-session-id") and h["accept"] == "text/event-stream" for h in listens)
    relayed = [r for r in read_audit(gateway.audit) if r.get("method") == "notifications/tools/list_changed"]
    assert ("admin", "remote", "server-to-client") in {(r["agent"], r["server"], r["direction"]) for r in relayed}


def test_a_server_per_agent_is_shared_by_that_agents_sessions_only(tmp_path: Path, sandbox: Path):
    admin = free_port()
    gateway = Gateway(tmp_path, sandbox, extra=SECOND_AGENT + f'\n[admin]\nlisten = "127.0.0.1:{admin}"\n',
                      everything='isolation = "per-agent"')
    path = "/servers/everything/mcp"

    def running() -> int | None:
        status = gateway.status().get("servers", {}).get("everything", {}).get("instances")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
            gauge = re.search(r'^portcullis_server_instances\{server="everything"\} (\d+)$',
                              response.read().decode(), re.MULTILINE)
        # The status report may lag the gauge by its refresh interval.
        return status if gauge and int(gauge[1]) == status else None

    def end(session: str, agent: str) -> None:
        delete = urllib.request.Request(f"{gateway.url}{path}", method="DELETE", headers={
            "Authorization": f"Bearer {KEYS[agent]}", "Mcp-Session-Id": session})
        urllib.request.urlopen(delete, timeout=10).close()

    try:
        first = echo_session(gateway, path=path)
        second = echo_session(gateway, path=path)
        assert until(lambda: running() == 1), "the agent's two sessions share one server"
        initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                 "clientInfo": {"name": "raw", "version": "1"}}}
        request = urllib.request.Request(f"{gateway.url}{path}", data=json.dumps(initialize).encode(), headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {KEYS['second']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            other = response.headers["Mcp-Session-Id"]
        assert until(lambda: running() == 2), "another agent gets its own"
        end(first, "admin")
        time.sleep(1)
        assert running() == 2, "still held by the agent's other session"
        end(second, "admin")
        assert until(lambda: running() == 1), "the agent's last session ended: its server is gone"
        end(other, "second")
        assert until(lambda: running() == 0)
        assert gateway.health()["servers"]["everything"]["state"] == "per-agent"
    finally:
        gateway.stop()


def test_a_remote_server_of_a_sessions_own_is_let_go_when_the_session_ends(tmp_path: Path, sandbox: Path):
    # The server ignores the end of its session, and its own stream stays
    # open and quiet: that must not keep the stopped connection, and its
    # place, alive.
    with remote_mcp_server(tmp_path, KEEP_SESSIONS="1") as (url, headers_log):
        config = f'\n[servers.remote]\nurl = "{url}"\n{PER_SESSION}\n'
        gateway = Gateway(tmp_path, sandbox, config, serve="max_server_instances_per_agent = 1")
        path = "/servers/remote/mcp"
        try:
            first = echo_session(gateway, path=path)
            seen = lambda: [json.loads(line) for line in headers_log.read_text().splitlines()]  # noqa: E731
            assert until(lambda: any(h[":method"] == "GET" for h in seen())), "it listens on the server's stream"
            # The status report follows within its refresh interval.
            assert until(lambda: gateway.status().get("servers", {}).get("remote", {}).get("instances") == 1)
            delete = urllib.request.Request(f"{gateway.url}{path}", method="DELETE", headers={
                "Authorization": f"Bearer {KEYS['admin']}", "Mcp-Session-Id": first})
            urllib.request.urlopen(delete, timeout=10).close()
            assert until(lambda: gateway.status().get("servers", {}).get("remote", {}).get("instances") == 0)
            assert until(lambda: any(h[":method"] == "DELETE" for h in seen())), "its session with the server ended"
            assert echo_session(gateway, path=path), "its place is free for the agent's next session"
        finally:
            gateway.stop()


def listen_request(uris: list[str]) -> tuple[bytes, dict]:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": "l", "method": "subscriptions/listen",
            "params": {"notifications": {"toolsListChanged": True, "resourceSubscriptions": uris}, "_meta": meta}}
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "subscriptions/listen", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    return json.dumps(body).encode(), headers


def test_an_agent_keeps_a_few_listen_streams_and_their_subscriptions_end_with_them(gateway: Gateway):
    uri = "test://static/resource/1"
    # One URI named over and over is subscribed to once.
    body, headers = listen_request([uri] * 500)
    url = f"{gateway.url}/servers/everything/mcp"
    with httpx2.Client(timeout=30) as http:
        streams = [http.stream("POST", url, content=body, headers=headers) for _ in range(5)]
        opened, reading = [], []
        try:
            for stream in streams[:4]:
                response = stream.__enter__()
                opened.append(stream)
                assert response.status_code == 200
                lines = response.iter_lines()
                reading.append(lines)  # kept, or the stream is closed
                acknowledged = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
                assert acknowledged["params"]["notifications"]["resourceSubscriptions"] == [uri]
            refused = streams[4].__enter__()
            assert refused.status_code == 429 and b"at most" in refused.read()
            streams[4].__exit__(None, None, None)
        finally:
            for stream in opened:
                stream.__exit__(None, None, None)
    subscribed = exchanges(gateway, "resources/subscribe")
    assert subscribed.count(("admin", "client-to-server", "request", "allow")) == 1, subscribed
    # The last stream naming it closed: the server is told, once.
    assert until(lambda: exchanges(gateway, "resources/unsubscribe").count(
        ("admin", "client-to-server", "request", "allow")) == 1)
    events = [r["event"] for r in read_audit(gateway.audit) if r.get("event", "").startswith("listen-")]
    assert events.count("listen-opened") == 4 and events.count("listen-refused") == 1
    # Closed, they make room again.

    def opens() -> bool:
        with httpx2.Client(timeout=30) as http:
            with http.stream("POST", url, content=body, headers=headers) as response:
                return response.status_code == 200

    assert until(opens)
