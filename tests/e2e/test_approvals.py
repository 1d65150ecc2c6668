"""Human approval through the admin listener: a destructive call an agent
makes with the official Python SDK through `portcullis serve` is held until
an approver decides over the admin API or on the page (driven in Debian's
chromium by Playwright); approval rules say who may decide, demand two
people, or let an approved call run again for a while; a webhook hears of
each pending call; a client that goes away leaves nothing to approve; and
`portcullis admin` serves the same for stdio proxies."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import ElicitResult

from conftest import PORTCULLIS, POLICIES, policy, proxied_filesystem, read_audit, write_config
from test_serve import KEYS, Gateway, connect, free_port, sha256

APPROVERS = {"alice": "alice-key-51d0", "bob": "bob-key-8e22", "carol": "carol-key-c4a7"}


def admin_config(port: int, extra: str = "", servers: str = '["*"]') -> str:
    """The approval gate (on the servers `servers` names), three approvers,
    and the admin listener on `port`."""
    approvers = "".join(f'\n[approvers.{name}]\napi_key_sha256 = "{sha256(key)}"\n' for name, key in APPROVERS.items())
    return f"""
[[policy]]
name = "approval-gate"
module = "{POLICIES / 'approval_gate.wasm'}"
methods = ["tools/call"]
servers = {servers}
settings = {{ tools = ["write_file", "create_directory"] }}

[admin]
listen = "127.0.0.1:{port}"
{approvers}
{extra}"""


class Admin:
    """The admin API of a running Portcullis."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, key: str | None = None, body: dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={**({"Authorization": f"Bearer {key}"} if key else {}),
                                                  "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def pending(self, count: int = 1, key: str = APPROVERS["alice"]) -> list[dict]:
        """Waits until `count` approvals are pending and returns them."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, listed = self.call("GET", "/api/approvals", key)
            assert status == 200, listed
            if len(listed) >= count:
                return listed
            time.sleep(0.1)
        raise AssertionError(f"{count} approval(s) never became pending")

    def decide(self, approval: str, verdict: str, approver: str, comment: str | None = None):
        return self.call("POST", f"/api/approvals/{approval}/{verdict}", APPROVERS[approver],
                         {"comment": comment} if comment else {})


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never came up")


# Only alice decides write_file; create_directory needs two of the three
# and stays approved for a minute.
RULES = """
[[approvals.rules]]
tools = ["write_file"]
approvers = ["alice"]

[[approvals.rules]]
tools = ["create_directory"]
required = 2
reuse_secs = 60
"""


@pytest.fixture
def approving(tmp_path: Path, sandbox: Path):
    """`portcullis serve` with the approval gate, approvers, an admin
    listener and the approval [`RULES`]."""
    port = free_port()
    gateway = Gateway(tmp_path, sandbox, admin_config(port, RULES))
    wait_ready(f"http://127.0.0.1:{port}")
    yield gateway, Admin(port)
    gateway.stop()


async def call_tool(gateway: Gateway, name: str, arguments: dict):
    """The result of the agent `admin`'s call, or the MCPError it got."""
    async with connect(gateway, "admin", "/servers/files/mcp") as session:
        try:
            return await session.call_tool(name, arguments)
        except MCPError as refused:
            return refused


def test_a_held_call_is_approved_over_the_admin_api_only_by_whom_its_rule_names(approving, sandbox: Path):
    gateway, admin = approving
    arguments = {"path": str(sandbox / "report.txt"), "content": "quarterly figures\n"}

    async def scenario():
        write = asyncio.create_task(call_tool(gateway, "write_file", arguments))
        [held] = await asyncio.to_thread(admin.pending)
        refusals = {
            "no key": admin.call("POST", f"/api/approvals/{held['id']}/approve"),
            "an agent's key": admin.call("POST", f"/api/approvals/{held['id']}/approve", KEYS["admin"]),
            "another page": admin.call("POST", f"/api/approvals/{held['id']}/approve", APPROVERS["alice"],
                                       headers={"Origin": "https://evil.example"}),
            "bob": admin.decide(held["id"], "approve", "bob"),
        }
        still = admin.call("GET", f"/api/approvals/{held['id']}", APPROVERS["alice"])
        decided = admin.decide(held["id"][:13], "approve", "alice", "numbers checked")
        return held, refusals, still, decided, await write

    held, refusals, still, decided, written = asyncio.run(scenario())
    assert held["tool"] == "write_file" and held["agent"] == "admin" and held["server"] == "files"
    assert json.loads(held["arguments"]) == arguments and held["approvers"] == ["alice"]
    assert "risk:destructive" in held["tags"] and held["may_decide"] is True
    assert refusals["no key"][0] == 401 and refusals["an agent's key"][0] == 401
    assert refusals["another page"][0] == 403
    assert refusals["bob"] == (403, {"error": "bob may not decide this call (its rule names alice)"})
    assert still[0] == 200 and still[1]["state"] == "pending", "refused decisions change nothing"
    assert decided[0] == 200 and decided[1]["state"] == "approved" and decided[1]["decided_by"] == "alice"
    assert not written.is_error
    assert (sandbox / "report.txt").read_text() == "quarterly figures\n", "it ran exactly as approved"

    again = admin.decide(held["id"], "deny", "alice")
    assert again[0] == 409 and "already approved (by alice)" in again[1]["error"]
    records = read_audit(gateway.audit)
    [event] = [r for r in records if r.get("event") == "approval"]
    assert (event["approval"], event["state"], event["decided_by"], event["comment"]) == (
        held["id"], "approved", "alice", "numbers checked")
    refused = [r for r in records if r.get("event") == "admin-credentials-refused"]
    assert len(refused) == 2 and all(r["endpoint"].endswith("/approve") for r in refused)

    # The same listener serves Prometheus metrics of the gateway.
    with urllib.request.urlopen(f"{admin.url}/metrics", timeout=10) as response:
        metrics = response.read().decode().splitlines()
    for line in ['portcullis_decisions_total{server="files",outcome="hold"} 1',
                 'portcullis_policy_verdicts_total{policy="approval-gate",verdict="require-approval"} 1',
                 'portcullis_approvals_total{state="approved"} 1',
                 "portcullis_approvals_pending 0"]:
        assert line in metrics, line
    assert any(line.startswith("portcullis_chain_latency_microseconds_count ") for line in metrics)


def test_two_people_must_approve_and_an_approved_call_may_run_again_for_a_while(approving, sandbox: Path):
    gateway, admin = approving
    target = {"path": str(sandbox / "releases")}

    async def scenario():
        create = asyncio.create_task(call_tool(gateway, "create_directory", target))
        [held] = await asyncio.to_thread(admin.pending)
        first = admin.decide(held["id"], "approve", "alice", "fine by me")
        twice = admin.decide(held["id"], "approve", "alice")
        waiting = create.done()
        second = admin.decide(held["id"], "approve", "bob")
        created = await create
        # The same call again, within the reuse window: it runs at once.
        reused = await call_tool(gateway, "create_directory", target)
        # Other arguments are another call: held, and one deny refuses it.
        other = asyncio.create_task(call_tool(gateway, "create_directory", {"path": str(sandbox / "other")}))
        [held_other] = await asyncio.to_thread(admin.pending)
        admin.decide(held_other["id"], "approve", "bob")
        denied = admin.decide(held_other["id"], "deny", "carol", "not this one")
        return held, first, twice, waiting, second, created, reused, denied, await other

    held, first, twice, waiting, second, created, reused, denied, refused = asyncio.run(scenario())
    assert held["required"] == 2 and held["approvers"] is None
    assert first[0] == 200 and first[1]["state"] == "pending" and [v["approver"] for v in first[1]["votes"]] == ["alice"]
    assert twice[0] == 409 and "needs 1 more" in twice[1]["error"]
    assert not waiting, "one approval of two does not release the call"
    assert second[1]["state"] == "approved" and second[1]["decided_by"] == "alice, bob"
    assert not created.is_error and not reused.is_error and (sandbox / "releases").is_dir()
    assert denied[1]["state"] == "denied" and denied[1]["decided_by"] == "carol"
    assert refused.message == "Approval denied by carol: not this one"
    assert not (sandbox / "other").exists()

    records = read_audit(gateway.audit)
    calls = [r for r in records if r.get("tool") == "create_directory" and r.get("direction") == "client-to-server"]
    assert [r["outcome"] for r in calls] == ["hold", "allow", "hold"]
    assert calls[1]["approval"] == held["id"] and "approval:reused" in calls[1]["tags"]
    [approved, refused_event] = [r for r in records if r.get("event") == "approval"]
    assert [v["approver"] for v in approved["votes"]] == ["alice", "bob"]
    assert approved["votes"][0]["comment"] == "fine by me"
    assert refused_event["state"] == "denied"


def test_a_held_call_whose_client_disconnects_or_ends_its_session_is_cancelled(approving, sandbox: Path):
    gateway, admin = approving
    headers = {"Authorization": f"Bearer {KEYS['admin']}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-06-18"}
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}

    def write(n: int) -> dict:
        return {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                "params": {"name": "write_file", "arguments": {"path": str(sandbox / f"gone-{n}.txt"), "content": "x"}}}

    async def scenario():
        url = f"{gateway.url}/servers/files/mcp"
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            opened = await http.post(url, json=initialize)
            session = {"Mcp-Session-Id": opened.headers["mcp-session-id"]}
            await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            # One client gives up on its request: the connection closes.
            giving_up = asyncio.create_task(http.post(url, json=write(1), headers=session))
            [dropped] = await asyncio.to_thread(admin.pending)
            giving_up.cancel()
            cancelled = await asyncio.to_thread(wait_for_state, admin, dropped["id"], "cancelled")
            # Another ends its session while its call is held.
            held = asyncio.create_task(http.post(url, json=write(2), headers=session))
            [ended] = await asyncio.to_thread(admin.pending)
            await http.delete(url, headers=session)
            ended_state = await asyncio.to_thread(wait_for_state, admin, ended["id"], "cancelled")
            held.cancel()
            late = admin.decide(ended["id"], "approve", "alice")
            # Portcullis stops while a third call is held: it cancels it and exits.
            again = await http.post(url, json=initialize)
            session = {"Mcp-Session-Id": again.headers["mcp-session-id"]}
            stopping = asyncio.create_task(http.post(url, json=write(3), headers=session))
            [stopped] = await asyncio.to_thread(admin.pending)
            await asyncio.to_thread(gateway.stop)
            stopping.cancel()
        shown = subprocess.run([str(PORTCULLIS), "approvals", "show", stopped["id"], "--json", "--config",
                                str(gateway.config)], capture_output=True, text=True, timeout=60)
        return cancelled, ended_state, late, json.loads(shown.stdout)

    cancelled, ended_state, late, stopped = asyncio.run(scenario())
    assert cancelled["decided_by"] == "client" and "disconnected" in cancelled["comment"]
    assert ended_state["decided_by"] == "client" and "ended its session" in ended_state["comment"]
    assert late[0] == 409 and "already cancelled" in late[1]["error"]
    assert (stopped["state"], stopped["comment"]) == ("cancelled", "Portcullis was stopped")
    assert not list(sandbox.glob("gone-*")), "nothing the client left behind ran"
    events = [r for r in read_audit(gateway.audit) if r.get("event") == "approval"]
    assert [e["state"] for e in events] == ["cancelled", "cancelled", "cancelled"]


def wait_for_state(admin: Admin, approval: str, state: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, found = admin.call("GET", f"/api/approvals/{approval}", APPROVERS["alice"])
        if status == 200 and found["state"] == state:
            return found
        time.sleep(0.1)
    raise AssertionError(f"approval {approval} never became {state}")


@contextmanager
def webhook_receiver(fail_first: int = 0):
    """A webhook that records what it is sent; it answers 503 to the first
    `fail_first` posts."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body)
            self.send_response(503 if len(received) <= fail_first else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


def test_stdio_proxies_are_decided_on_portcullis_admin_and_a_webhook_hears_of_each_call(tmp_path: Path,
                                                                                       sandbox: Path):
    port = free_port()
    with webhook_receiver(fail_first=1) as (hook, received):
        gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"])
        extra = admin_config(port).split("[admin]", 1)[1]
        config = write_config(tmp_path, [gate], f'\n[approvals]\nnotify = ["{hook}"]\n\n[admin]{extra}')
        served = subprocess.Popen([str(PORTCULLIS), "admin", "--config", str(config)],
                                  stderr=open(tmp_path / "admin.log", "w"))
        try:
            wait_ready(f"http://127.0.0.1:{port}")
            admin = Admin(port)
            arguments = {"path": str(sandbox / "from-stdio.txt"), "content": "via the page's API"}

            async def scenario():
                async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
                    write = asyncio.create_task(session.call_tool("write_file", arguments))
                    [held] = await asyncio.to_thread(admin.pending, 1, APPROVERS["carol"])
                    decided = admin.decide(held["id"], "approve", "carol")
                    written = await write
                    # The notice is retried while the proxy runs.
                    deadline = time.monotonic() + 30
                    while len(received) < 2 and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    return held, decided, written

            held, decided, written = asyncio.run(scenario())
        finally:
            served.terminate()
            served.wait(timeout=30)
    assert decided[0] == 200 and decided[1]["state"] == "approved"
    assert not written.is_error and (sandbox / "from-stdio.txt").read_text() == "via the page's API"
    assert len(received) == 2, "one notice, delivered again after the webhook failed once"
    notice = received[1]
    assert notice["approval"]["id"] == held["id"] and notice["link"] == f"http://127.0.0.1:{port}/#{held['id']}"
    assert "agent e2e-agent wants to call stdio/write_file" in notice["text"] and notice["link"] in notice["text"]


def test_the_page_shows_a_pending_call_and_a_click_approves_it(approving, sandbox: Path, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    gateway, admin = approving
    arguments = {"path": str(sandbox / "clicked.txt"), "content": "approved in a browser\n"}
    outcome: dict = {}

    def agent():
        outcome["result"] = asyncio.run(call_tool(gateway, "write_file", arguments))

    calling = threading.Thread(target=agent)
    calling.start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(admin.url)
        page.get_by_label("API key").fill(APPROVERS["alice"])
        page.get_by_role("button", name="Sign in").click()
        card = page.get_by_test_id("pending")
        expect(card).to_have_count(1, timeout=30_000)
        expect(card).to_contain_text("files / write_file")
        expect(card.get_by_test_id("arguments")).to_contain_text('"content": "approved in a browser\\n"')
        expect(card).to_contain_text("risk:destructive")
        expect(page.locator("#who")).to_have_text("signed in as alice")
        card.get_by_test_id("comment").fill("checked on the page")
        page.screenshot(path=str(tmp_path / "approvals-page.png"))
        card.get_by_test_id("approve").click()
        calling.join(timeout=60)
        decision = page.get_by_test_id("decision").first
        expect(decision).to_contain_text("approved", timeout=30_000)
        expect(decision).to_contain_text("by alice")
        expect(page.get_by_test_id("pending")).to_have_count(0)
        browser.close()
    assert not calling.is_alive() and not outcome["result"].is_error
    assert (sandbox / "clicked.txt").read_text() == "approved in a browser\n"
    [event] = [r for r in read_audit(gateway.audit) if r.get("event") == "approval"]
    assert (event["decided_by"], event["comment"]) == ("alice", "checked on the page")


def answering_user(asked: list[str], comment: str):
    """A client's user (an elicitation callback) who approves writing
    yes.txt, with `comment`, declines anything else, and keeps each question
    in `asked`."""

    async def user(context, params):
        asked.append(params.message)
        if "yes.txt" in params.message:
            return ElicitResult(action="accept", content={"approve": True, "comment": comment})
        return ElicitResult(action="decline")

    return user


def test_the_clients_own_user_decides_where_the_rule_asks_them(tmp_path: Path, sandbox: Path):
    gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"],
                  settings={"tools": ["write_file", "create_directory"]})
    rules = '\n[[approvals.rules]]\ntools = ["write_file"]\npolicies = ["approval-gate"]\nelicit = true\n'
    config = write_config(tmp_path, [gate], rules)
    audit = tmp_path / "audit.jsonl"
    asked: list[str] = []
    user = answering_user(asked, "I asked for this")

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox, elicitation_callback=user) as session:
            approved = await session.call_tool("write_file", {"path": str(sandbox / "yes.txt"), "content": "y"})
            with pytest.raises(MCPError) as declined:
                await session.call_tool("write_file", {"path": str(sandbox / "no.txt"), "content": "n"})
            # A call the rule does not cover is not put to the client's user.
            other = asyncio.create_task(session.call_tool("create_directory", {"path": str(sandbox / "d")}))
            await asyncio.sleep(1)
            assert not other.done() and len(asked) == 2
            other.cancel()
            return approved, declined.value

    approved, declined = asyncio.run(scenario())
    assert "e2e-agent wants to call write_file on stdio" in asked[0] and '"content":"y"' in asked[0]
    assert not approved.is_error and (sandbox / "yes.txt").read_text() == "y"
    assert declined.message == "Approval denied by user of e2e-agent (elicitation): declined"
    assert not (sandbox / "no.txt").exists()
    events = [(e["state"], e["decided_by"], e.get("comment")) for e in read_audit(audit) if e.get("event") == "approval"]
    assert events[:2] == [("approved", "user of e2e-agent (elicitation)", "I asked for this"),
                          ("denied", "user of e2e-agent (elicitation)", "declined")]


def test_a_stateless_client_is_answered_input_required_and_its_user_decides(tmp_path: Path, sandbox: Path):
    port = free_port()
    gateway = Gateway(tmp_path, sandbox, admin_config(port, '\n[[approvals.rules]]\ntools = ["write_file"]\nelicit = true\n'))
    asked: list[str] = []
    user = answering_user(asked, "mine")

    async def scenario():
        headers = {"Authorization": f"Bearer {KEYS['admin']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            transport = streamable_http_client(f"{gateway.url}/servers/files/mcp", http_client=http)
            async with Client(transport, elicitation_callback=user) as client:
                approved = await client.call_tool("write_file", {"path": str(sandbox / "yes.txt"), "content": "y"})
                with pytest.raises(MCPError) as declined:
                    await client.call_tool("write_file", {"path": str(sandbox / "no.txt"), "content": "n"})
                return client.protocol_version, approved, declined.value

    try:
        version, approved, declined = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert version == "2026-07-28" and len(asked) == 2 and "admin wants to call write_file on files" in asked[0]
    assert not approved.is_error and (sandbox / "yes.txt").read_text() == "y"
    assert declined.message == "Approval denied by user of admin (elicitation): declined"
    assert not (sandbox / "no.txt").exists()
    records = read_audit(gateway.audit)
    calls = [r for r in records if r.get("tool") == "write_file" and r.get("direction") == "client-to-server"]
    assert [r["outcome"] for r in calls] == ["hold", "allow", "hold", "deny"]
    assert calls[1]["approval"] == calls[0]["id"] and "approval:input" in calls[1]["tags"]
    assert "requestState" not in json.dumps(calls[1].get("arguments")), "the server gets the call as approved"
    events = [(e["state"], e["decided_by"], e.get("comment")) for e in records if e.get("event") == "approval"]
    assert events == [("approved", "user of admin (elicitation)", "mine"),
                      ("denied", "user of admin (elicitation)", "declined")]
