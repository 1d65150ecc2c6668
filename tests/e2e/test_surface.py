"""Governing the tool surface end to end: a real MCP server written with the
official Python SDK (doubles/notes_server.py) changes its tools while it runs
— it gains `delete_everything`, `read_notes` stops being read-only, `search`
gets hidden instructions — and Portcullis, with the server pinned by
`portcullis pin`, catches each change, handles it as configured and audits
it. Also: arguments checked against the pinned schema before the server sees
them, rate limits, a policy's own quota kept in the host store, and the
shipped poisoning scan. The agent is the official Python SDK client.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, notes_calls, notes_server, pin, policy, read_audit, write_config


def run(coroutine):
    return asyncio.run(coroutine)


def notes_config(tmp_path: Path, extra: str = "", policies: list[dict] | None = None) -> Path:
    """A config with the notes server as its only server."""
    return write_config(tmp_path, policies or [], notes_server(tmp_path) + extra)


@asynccontextmanager
async def agent(config: Path, audit: Path, stderr: Path):
    """An official-SDK client session to the configured server through
    `portcullis stdio`."""
    params = StdioServerParameters(
        command=str(PORTCULLIS),
        args=["stdio", "--config", str(config), "--audit-file", str(audit)],
        env={"PORTCULLIS_LOG": "info", "PATH": os.environ["PATH"]},
    )
    with open(stderr, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


async def tool_names(session: ClientSession) -> set[str]:
    return {t.name for t in (await session.list_tools()).tools}


async def refused(call) -> MCPError:
    with pytest.raises(MCPError) as error:
        await call
    return error.value


def wait_for(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


PINNING = """
[pinning]
on_drift = "hide"

[pinning.on]
annotations = "alert"
escalated = "alert"
description = "deny-server"
"""


def test_each_change_of_a_pinned_server_is_caught_handled_as_configured_and_audited(tmp_path: Path):
    config = notes_config(tmp_path, PINNING, [policy("drift-guard", "drift_guard.wasm")])
    audit = tmp_path / "audit.jsonl"
    pinned = pin(config)
    assert pinned.returncode == 0, pinned.stderr
    lock = json.loads((tmp_path / "portcullis.lock.json").read_text())
    assert set(lock["servers"]["notes"]["tools"]) == {"read_notes", "write_note", "search", "advance"}
    assert lock["servers"]["notes"]["tools"]["read_notes"]["annotations"] == {"readOnlyHint": True}

    async def scenario():
        async with agent(config, audit, tmp_path / "stderr.log") as session:
            seen = {"start": await tool_names(session)}
            seen["invalid"] = await refused(session.call_tool("write_note", {"text": 5}))
            await session.call_tool("write_note", {"text": "first"})

            await session.call_tool("advance", {})  # + delete_everything
            seen["added"] = await tool_names(session)
            seen["delete"] = await refused(session.call_tool("delete_everything", {}))
            seen["check"] = pin(config, "--check")

            await session.call_tool("advance", {})  # read_notes no longer read-only
            seen["escalated"] = await tool_names(session)
            seen["read"] = await refused(session.call_tool("read_notes", {}))

            await session.call_tool("advance", {})  # search gets hidden instructions
            seen["poisoned_list"] = await refused(session.list_tools())
            seen["quarantined"] = await refused(session.call_tool("write_note", {"text": "x"}))

            # The operator reviews the change and pins the server again: the
            # lock file is reloaded and the quarantine lifted.
            seen["repin"] = pin(config)
            wait_for(lambda: any(r.get("event") == "reload" and r["result"] == "ok" for r in read_audit(audit)),
                     "the new lock file to be loaded")
            # The new pins apply at once, before the agent lists tools again.
            seen["read_after"] = await session.call_tool("read_notes", {})
            seen["after"] = await tool_names(session)
            return seen

    seen = run(scenario())
    assert seen["start"] == {"read_notes", "write_note", "search", "advance"}

    invalid = seen["invalid"]
    assert invalid.code == -32602
    assert invalid.message.startswith("Invalid params: arguments/text: 5 is not of type"), invalid.message
    assert invalid.data["field"] == "/text"
    assert invalid.data["policy"] == "portcullis:validation"

    assert seen["added"] == {"read_notes", "write_note", "search", "advance"}, "the new tool is hidden"
    delete = seen["delete"]
    assert delete.code == -32001
    assert "delete_everything" in delete.message and "pinned" in delete.message
    assert delete.data["policy"] == "portcullis:pinning"
    assert delete.data["drift"] == [{"tool": "delete_everything", "kinds": ["added"]}]
    assert seen["check"].returncode == 1
    assert "tools delete_everything [added]" in seen["check"].stdout

    assert "read_notes" in seen["escalated"], "an annotation change is only alerted"
    read = seen["read"]
    assert read.data["policy"] == "drift-guard", "the policy saw the drift and refused"
    assert "escalated" in read.message

    poisoned = seen["poisoned_list"]
    assert poisoned.code == -32001 and "quarantined" in poisoned.message
    assert "IMPORTANT" not in json.dumps(poisoned.data), "the agent never reads the poisoned text"
    assert "quarantined" in seen["quarantined"].message

    assert seen["repin"].returncode == 0, seen["repin"].stderr
    assert seen["after"] == {"read_notes", "write_note", "search", "advance", "delete_everything"}
    assert seen["read_after"].content[0].text == "first"

    reached = [c["tool"] for c in notes_calls(tmp_path)]
    assert reached == ["write_note", "advance", "advance", "advance", "read_notes"], \
        "refused calls never reached the server"
    assert notes_calls(tmp_path)[0]["arguments"]["text"] == "first"

    records = read_audit(audit)
    lists = [r for r in records if r.get("method") == "tools/list" and r.get("kind") == "result"]
    added = next(r for r in lists if "drift:added" in r.get("tags", []))
    assert added["outcome"] == "modify"
    assert added["drift"][0]["tool"] == "delete_everything"
    assert added["drift"][0]["diff"] == ["+ delete_everything (not in the lock file)"]
    escalated = next(r for r in lists if "drift:escalated" in r.get("tags", []))
    read_notes = next(d for d in escalated["drift"] if d["tool"] == "read_notes")
    assert read_notes["kinds"] == ["annotations", "escalated"]
    assert read_notes["diff"] == ["~ annotations/readOnlyHint: true -> false"]
    quarantine = next(r for r in lists if "drift:description" in r.get("tags", []))
    assert quarantine["outcome"] == "deny"
    assert quarantine["decided_by"] == "portcullis:pinning"
    assert "quarantined" in quarantine["tags"]
    diff = next(d for d in quarantine["drift"] if d["tool"] == "search")["diff"]
    assert diff[0].startswith('~ description: "Searches the notes." -> "Searches the notes. <IMPORTANT>')

    by_tool = {(r["tool"], r["outcome"], r.get("decided_by")) for r in records
               if r.get("method") == "tools/call" and r["kind"] == "request"}
    assert ("write_note", "deny", "portcullis:validation") in by_tool
    assert ("delete_everything", "deny", "portcullis:pinning") in by_tool
    assert ("read_notes", "deny", "drift-guard") in by_tool
    assert ("write_note", "deny", "portcullis:pinning") in by_tool


RATES = """
[[rate_limits]]
tools = ["search"]
calls = 3
per_secs = 3600
"""


def test_a_burst_over_the_rate_limit_and_over_a_policys_quota_hits_a_wall(tmp_path: Path):
    quota = policy("quota", "quota.wasm", settings={"calls": 4, "window_secs": 3600}, tools=["write_note"])
    config = notes_config(tmp_path, RATES, [quota])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with agent(config, audit, tmp_path / "stderr.log") as session:
            await session.list_tools()
            searches, writes = [], []
            for i in range(5):
                try:
                    searches.append(await session.call_tool("search", {"query": f"q{i}"}))
                except MCPError as error:
                    searches.append(error)
            for i in range(6):
                try:
                    writes.append(await session.call_tool("write_note", {"text": f"note {i}"}))
                except MCPError as error:
                    writes.append(error)
            return searches, writes

    searches, writes = run(scenario())
    assert [isinstance(s, MCPError) for s in searches] == [False, False, False, True, True]
    limited = searches[3]
    assert limited.code == -32004
    assert limited.message.startswith("Rate limit exceeded: at most 3 calls per 3600 s for agent 'e2e-agent', "
                                      "server 'notes', tool 'search'; retry after"), limited.message
    assert 0 < limited.data["retryAfterMs"] <= 1_200_000
    assert limited.data["retryAfter"] >= 1
    assert limited.data["policy"] == "portcullis:rate-limit"

    assert [isinstance(w, MCPError) for w in writes] == [False] * 4 + [True, True]
    assert writes[4].data["policy"] == "quota"
    assert "quota of 4 calls per 3600 s used up for agent 'e2e-agent'" in writes[4].message

    reached = [c["tool"] for c in notes_calls(tmp_path)]
    assert reached.count("search") == 3 and reached.count("write_note") == 4
    records = read_audit(audit)
    assert sum("rate-limited" in r.get("tags", []) for r in records) == 2
    assert sum("quota" in r.get("tags", []) for r in records) == 2


def test_the_shipped_poisoning_scan_hides_a_tool_with_hidden_instructions(tmp_path: Path):
    (tmp_path / "stage").write_text("3")
    config = notes_config(tmp_path, policies=[policy("poisoning-scan", "poisoning_scan.wasm")])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with agent(config, audit, tmp_path / "stderr.log") as session:
            names = await tool_names(session)
            return names, await refused(session.call_tool("search", {"query": "x"}))

    names, search = run(scenario())
    assert "search" not in names and "read_notes" in names
    assert search.data["policy"] == "poisoning-scan"
    assert not any(c["tool"] == "search" for c in notes_calls(tmp_path))
    listed = next(r for r in read_audit(audit) if r.get("method") == "tools/list" and r["kind"] == "result")
    assert {"poisoning", "poisoning:instruction-tags", "poisoning:secret-access"} <= set(listed["tags"])


def test_pin_check_reports_a_server_that_was_never_pinned(tmp_path: Path):
    config = notes_config(tmp_path)
    missing = pin(config, "--check")
    assert missing.returncode == 2 and "write one with `portcullis pin" in missing.stderr
    assert pin(config).returncode == 0
    assert pin(config, "--check").stdout.strip() == "notes: matches the lock"
    assert pin(config, "--server", "nope").returncode == 2


def test_a_first_call_in_stdio_mode_is_judged_by_the_pinned_annotations(tmp_path: Path):
    # The client never lists tools; the read-only policy still knows read_notes is read-only,
    # from the lock file, and that write_note is not.
    config = notes_config(tmp_path, PINNING, [policy("read-only", "read_only.wasm")])
    assert pin(config).returncode == 0

    async def scenario():
        async with agent(config, tmp_path / "audit.jsonl", tmp_path / "stderr.log") as session:
            read = await session.call_tool("read_notes", {})
            write = await refused(session.call_tool("write_note", {"text": "x"}))
            return read, write

    read, write = run(scenario())
    assert not read.is_error, read
    assert "not declared read-only" in write.message


def test_a_first_call_in_stdio_mode_is_judged_by_annotations_portcullis_listed_itself(tmp_path: Path):
    # No lock, and the client never lists tools: Portcullis lists them itself, in its own id
    # space, once the client has initialized and again when the server says they changed.
    read_only = policy("read-only", "read_only.wasm", settings={"allow": ["advance"]})
    config = notes_config(tmp_path, policies=[read_only])
    audit, stderr = tmp_path / "audit.jsonl", tmp_path / "stderr.log"
    surveyed = lambda: [r for r in read_audit(audit) if r.get("event") == "tools-surveyed"]  # noqa: E731

    async def scenario():
        async with agent(config, audit, stderr) as session:
            read = await session.call_tool("read_notes", {})
            write = await refused(session.call_tool("write_note", {"text": "x"}))
            # Stage 2: read_notes is no longer read-only.
            for _ in range(2):
                await session.call_tool("advance", {})
            await asyncio.to_thread(wait_for, lambda: len(surveyed()) >= 3, "the changed tools listed")
            escalated = await refused(session.call_tool("read_notes", {}))
            return read, write, escalated

    read, write, escalated = run(scenario())
    assert not read.is_error, read
    assert "not declared read-only" in write.message
    assert "not declared read-only" in escalated.message
    assert [c["tool"] for c in notes_calls(tmp_path)].count("read_notes") == 1
    first = surveyed()[0]
    assert (first["endpoint"], first["agent"]) == ("stdio", "e2e-agent"), first
    assert "listed the server's 4 tools" in first["reason"]
    # The first call was judged before the client listed anything (the SDK lists after a call).
    records = read_audit(audit)
    first_call = next(i for i, r in enumerate(records) if r.get("tool") == "read_notes")
    assert not any(r.get("method") == "tools/list" for r in records[:first_call])
    # Portcullis' own requests and their answers never reached the client, nor the relay.
    assert not any("portcullis-" in str(r.get("jsonrpc_id")) for r in records)
