"""The real @modelcontextprotocol/server-filesystem behind `portcullis stdio`,
driven by the official Python MCP SDK client."""

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, POLICIES, policy, proxied_filesystem, read_audit, read_messages, write_config

READ_ONLY = policy("read-only", "read_only.wasm", methods=["tools/call", "tools/list"])
REQUIRED_FIELDS = {"time", "id", "agent", "server", "direction", "kind", "outcome", "policies", "latency_us"}


def run(coroutine):
    return asyncio.run(coroutine)


def test_reads_pass_writes_are_refused_and_never_reach_the_server(tmp_path: Path, sandbox: Path):
    config = write_config(tmp_path, [READ_ONLY])
    audit = tmp_path / "audit.jsonl"
    target = sandbox / "created.txt"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            tools = {t.name for t in (await session.list_tools()).tools}
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError) as refused:
                await session.call_tool("write_file", {"path": str(target), "content": "pwned"})
            return tools, read, refused.value

    tools, read, refused = run(scenario())
    assert "read_text_file" in tools
    assert not {"write_file", "edit_file", "move_file", "create_directory"} & tools, "write tools are hidden"
    assert read.content[0].text == "hello from the sandbox\n"
    assert refused.code == -32001
    assert "Denied by policy 'read-only'" in refused.message
    assert "write_file" in refused.message
    assert refused.data["policy"] == "read-only"
    assert not target.exists(), "the denied write must not reach the server"

    records = read_messages(audit)
    denied = [r for r in records if r["outcome"] == "deny"]
    assert len(denied) == 1
    assert denied[0]["tool"] == "write_file"
    assert denied[0]["decided_by"] == "read-only"
    assert denied[0]["id"] == refused.data["decision"], "the client's error names the audit record"
    assert denied[0]["arguments"] == {"path": str(target), "content": "pwned"}
    assert len(denied[0]["arguments_sha256"]) == 64
    module = (POLICIES / "read_only.wasm").read_bytes()
    assert denied[0]["policies"][0]["sha256"] == hashlib.sha256(module).hexdigest()


def test_audit_holds_exactly_one_record_per_message(tmp_path: Path, sandbox: Path):
    config = write_config(tmp_path, [READ_ONLY])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            for _ in range(3):
                await session.call_tool("list_allowed_directories", {})
            with pytest.raises(MCPError):
                await session.call_tool("create_directory", {"path": str(sandbox / "d")})

    run(scenario())
    records = read_messages(audit)
    for record in records:
        assert REQUIRED_FIELDS <= record.keys(), record
        assert record["agent"] == "e2e-agent"
        assert record["agent_attributes"] == {"team": "qa"}
        assert record["server"] == "stdio"
        for verdict in record["policies"]:
            assert {"policy", "sha256", "verdict", "enforced", "latency_us"} <= verdict.keys()
    requests = [r for r in records if r["direction"] == "client-to-server" and r["kind"] == "request"]
    answers = [r for r in records if r["direction"] == "server-to-client" and r["kind"] in ("result", "error")]
    request_ids = [r["jsonrpc_id"] for r in requests]
    assert len(request_ids) == len(set(request_ids)), "one record per request"
    # initialize, tools/list, 3 calls, 1 denied call
    assert [r["method"] for r in requests] == ["initialize", "tools/list"] + ["tools/call"] * 4
    # every forwarded request has exactly one answer record; the denied one has none
    forwarded = [r["jsonrpc_id"] for r in requests if r["outcome"] == "allow"]
    assert sorted(a["jsonrpc_id"] for a in answers) == sorted(forwarded)
    calls = [r for r in requests if r["method"] == "tools/call"]
    assert [c["outcome"] for c in calls] == ["allow"] * 3 + ["deny"]
    assert all(c["policies"][0]["policy"] == "read-only" for c in calls)
    notifications = [r for r in records if r["kind"] == "notification"]
    assert "notifications/initialized" in [n["method"] for n in notifications]


def test_tool_filter_hides_and_refuses_tools_by_glob(tmp_path: Path, sandbox: Path):
    tool_filter = policy(
        "tool-filter", "tool_filter.wasm", methods=["tools/call", "tools/list"],
        settings={"rules": [{"allow": ["list_*", "read_text_file"], "deny": ["list_directory_with_sizes"]}]},
    )
    config = write_config(tmp_path, [tool_filter])

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
            tools = {t.name for t in (await session.list_tools()).tools}
            with pytest.raises(MCPError) as refused:
                await session.call_tool("search_files", {"path": str(sandbox), "pattern": "*"})
            listed = await session.call_tool("list_directory", {"path": str(sandbox)})
            return tools, refused.value, listed

    tools, refused, listed = run(scenario())
    assert tools == {"list_directory", "list_allowed_directories", "read_text_file"}
    assert "tool 'search_files' is not allowed on server 'stdio'" in refused.message
    assert "hello.txt" in listed.content[0].text


def test_argument_guard_refuses_paths_outside_the_root_and_secrets(tmp_path: Path, sandbox: Path):
    guard = policy("argument-guard", "argument_guard.wasm", methods=["tools/call"], settings={"roots": [str(sandbox)]})
    config = write_config(tmp_path, [guard])
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
            with pytest.raises(MCPError) as escaped:
                await session.call_tool("read_text_file", {"path": str(sandbox / ".." / "outside.txt")})
            with pytest.raises(MCPError) as leaked:
                await session.call_tool(
                    "write_file", {"path": str(sandbox / "k.txt"), "content": "key AKIAIOSFODNN7EXAMPLE"})
            inside = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            return escaped.value, leaked.value, inside

    escaped, leaked, inside = run(scenario())
    assert "outside the allowed roots" in escaped.message
    assert "aws-access-key-id" in leaked.message
    assert not (sandbox / "k.txt").exists()
    assert inside.content[0].text == "hello from the sandbox\n"


def test_secrets_in_results_are_redacted(tmp_path: Path, sandbox: Path):
    (sandbox / "creds.txt").write_text("aws = AKIAIOSFODNN7EXAMPLE\n")
    redact = policy("redact-secrets", "redact_secrets.wasm", methods=["tools/call"])
    config = write_config(tmp_path, [redact])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            return await session.call_tool("read_text_file", {"path": str(sandbox / "creds.txt")})

    result = run(scenario())
    assert result.content[0].text == "aws = [REDACTED:aws-access-key-id]\n"
    modified = [r for r in read_messages(audit) if r["outcome"] == "modify"]
    assert len(modified) == 1 and modified[0]["tags"] == ["redacted"]


def approvals(config: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs `portcullis approvals ARGS --config CONFIG`."""
    return subprocess.run([str(PORTCULLIS), "approvals", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


async def pending_approval(config: Path) -> dict:
    """Waits for the one pending approval under `config` and returns it."""
    for _ in range(300):
        listed = await asyncio.to_thread(approvals, config, "list", "--json")
        pending = json.loads(listed.stdout) if listed.returncode == 0 else []
        if pending:
            assert len(pending) == 1, pending
            return pending[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no call was held")


def test_a_held_call_runs_exactly_as_approved_and_a_denied_one_never_reaches_the_server(
        tmp_path: Path, sandbox: Path):
    gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"])
    config = write_config(tmp_path, [gate])
    audit = tmp_path / "audit.jsonl"
    approved_args = {"path": str(sandbox / "approved.txt"), "content": "approved content"}

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            write = asyncio.create_task(session.call_tool("write_file", approved_args))
            held = await pending_approval(config)
            # Traffic behind a held call flows.
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            shown = await asyncio.to_thread(approvals, config, "show", held["id"][:8])
            decided = await asyncio.to_thread(approvals, config, "approve", held["id"], "--as", "alice",
                                              "--reason", "looked fine")
            written = await write

            refused_write = asyncio.create_task(
                session.call_tool("write_file", {"path": str(sandbox / "denied.txt"), "content": "x"}))
            second = await pending_approval(config)
            await asyncio.to_thread(approvals, config, "deny", second["id"], "--as", "bob", "--reason", "not today")
            with pytest.raises(MCPError) as denied:
                await refused_write
            again = await asyncio.to_thread(approvals, config, "approve", second["id"], "--as", "alice")
            return held, read, shown, decided, written, denied.value, again

    held, read, shown, decided, written, denied, again = run(scenario())
    assert held["tool"] == "write_file" and held["agent"] == "e2e-agent" and held["policy"] == "approval-gate"
    assert json.loads(held["arguments"]) == approved_args
    assert not read.is_error
    assert shown.returncode == 0 and "approved content" in shown.stdout and "risk:destructive" in shown.stdout
    assert decided.returncode == 0 and "approved by alice" in decided.stdout
    assert not written.is_error
    assert (sandbox / "approved.txt").read_text() == "approved content"

    assert denied.message == "Approval denied by bob: not today"
    assert denied.data["state"] == "denied"
    assert not (sandbox / "denied.txt").exists()
    assert again.returncode == 1 and "is already denied (by bob)" in again.stdout, "a decision is final"

    records = read_audit(audit)
    holds = [r for r in records if r.get("outcome") == "hold"]
    assert len(holds) == 2 and holds[0]["id"] == held["id"], "the approval is named by the held call's record"
    assert holds[0]["decided_by"] == "approval-gate" and holds[0]["tool"] == "write_file"
    events = [(e["approval"], e["state"], e["decided_by"]) for e in records if e.get("event") == "approval"]
    assert events == [(held["id"], "approved", "alice"), (holds[1]["id"], "denied", "bob")]
    assert next(e for e in records if e.get("event") == "approval")["comment"] == "looked fine"


def test_a_held_call_whose_client_leaves_is_cancelled_and_never_runs(tmp_path: Path, sandbox: Path):
    gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"])
    config = write_config(tmp_path, [gate])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            write = asyncio.create_task(
                session.call_tool("write_file", {"path": str(sandbox / "left.txt"), "content": "x"}))
            held = await pending_approval(config)
            write.cancel()
        return held

    held = run(scenario())
    # The client is gone: approving now runs nothing.
    late = approvals(config, "approve", held["id"], "--as", "alice")
    assert late.returncode == 1 and "is already cancelled" in late.stdout
    assert not (sandbox / "left.txt").exists()
    events = [e for e in read_audit(audit) if e.get("event") == "approval"]
    assert [(e["approval"], e["state"], e["decided_by"]) for e in events] == [(held["id"], "cancelled", "client")]


def test_a_held_call_nobody_decides_expires_and_never_runs(tmp_path: Path, sandbox: Path):
    gate = policy("approval-gate", "approval_gate.wasm", methods=["tools/call"])
    config = write_config(tmp_path, [gate], "\n[approvals]\nexpiry_secs = 1\n")
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            with pytest.raises(MCPError) as expired:
                await session.call_tool("write_file", {"path": str(sandbox / "late.txt"), "content": "x"})
            return expired.value

    expired = run(scenario())
    assert expired.message.startswith("Approval expired"), expired.message
    assert not (sandbox / "late.txt").exists()
    events = [e for e in read_audit(audit) if e.get("event") == "approval"]
    assert [(e["state"], e["decided_by"]) for e in events] == [("expired", "portcullis")]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("loop", "exceeded its deadline of 50 ms"),
        ("alloc", "exceeded its memory limit of 16 MiB"),
        ("trap", "trapped"),
        ("garbage", "malformed output"),
    ],
)
def test_a_misbehaving_policy_denies_and_the_proxy_keeps_serving(tmp_path: Path, sandbox: Path, mode, expected):
    broken = policy("misbehave", "misbehave.wasm", methods=["tools/call"],
                    settings={"mode": mode, "tool": "get_file_info"})
    config = write_config(tmp_path, [broken])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            failures = []
            for _ in range(2):
                with pytest.raises(MCPError) as failed:
                    await session.call_tool("get_file_info", {"path": str(sandbox / "hello.txt")})
                failures.append(failed.value)
            later = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            return failures, later

    failures, later = run(scenario())
    for failure in failures:
        assert failure.code == -32002
        assert "Denied by policy 'misbehave'" in failure.message
        assert expected in failure.message
        assert "fail-closed" in failure.message
        assert "backtrace" not in failure.message and "0x" not in failure.message
    assert later.content[0].text == "hello from the sandbox\n"
    errors = [r for r in read_messages(audit) if r["outcome"] == "deny"]
    assert len(errors) == 2
    assert all(r["policies"][0]["verdict"] == "error" and expected in r["reason"] for r in errors)


def test_fail_open_and_monitor_mode_let_calls_through_but_record_the_verdict(tmp_path: Path, sandbox: Path):
    broken = policy("misbehave", "misbehave.wasm", methods=["tools/call"], failure="open",
                    settings={"mode": "trap", "tool": "read_text_file"})
    watcher = policy("read-only", "read_only.wasm", methods=["tools/call"], mode="monitor")
    config = write_config(tmp_path, [broken, watcher])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            await session.call_tool("write_file", {"path": str(sandbox / "m.txt"), "content": "monitored"})

    run(scenario())
    assert (sandbox / "m.txt").read_text() == "monitored", "monitor mode never enforces"
    calls = [r for r in read_audit(audit) if r.get("method") == "tools/call" and r["kind"] == "request"]
    assert [c["outcome"] for c in calls] == ["allow", "allow"]
    assert calls[0]["policies"][0]["verdict"] == "error" and calls[0]["policies"][0]["enforced"] is True
    write_verdict = calls[1]["policies"][-1]
    assert write_verdict == {**write_verdict, "policy": "read-only", "verdict": "deny", "enforced": False}


def test_an_oversized_answer_from_the_real_server_becomes_an_error_not_a_hang(tmp_path: Path, sandbox: Path):
    # The TypeScript SDK writes the id last; with a 4 KiB limit its tools/list answer is too large.
    config = write_config(tmp_path, [], "\n[limits]\nmax_message_bytes = 4096\n")

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
            with pytest.raises(MCPError) as too_big:
                await asyncio.wait_for(session.list_tools(), timeout=30)
            # (call_tool would list the tools again, so show the session lives on with a ping)
            await session.send_ping()
            return too_big.value

    too_big = run(scenario())
    assert too_big.code == -32603 and "exceeds the size limit" in too_big.message
