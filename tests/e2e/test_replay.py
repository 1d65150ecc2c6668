"""`portcullis replay`: a trail recorded in front of the real filesystem server
under one config is re-judged with another, and the report says exactly
which decisions would change, and why some records cannot be replayed."""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, POLICIES, proxied_filesystem, read_audit
from test_policy_languages import copy_example


def replay(config: Path, *trails: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([str(PORTCULLIS), "replay", *map(str, trails), "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=300)


def permissive(directory: Path, extra: str = "") -> Path:
    """A config whose one policy lets everything through."""
    config = directory / "permissive.toml"
    config.write_text(f'[engine]\ncache_dir = "{directory / "cache"}"\n{extra}\n[[policy]]\nname = "open"\n'
                      f'module = "{POLICIES / "method_filter.wasm"}"\n')
    return config


def record_traffic(config: Path, audit: Path, sandbox: Path) -> None:
    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            await session.call_tool("write_file", {"path": str(sandbox / "w.txt"), "content": "x"})
            await session.call_tool("create_directory", {"path": str(sandbox / "made")})
            try:
                await session.call_tool("read_text_file", {"path": "/etc/hostname"})
            except MCPError:
                pass  # the server refuses it itself; the trail still has the call

    asyncio.run(scenario())


@pytest.fixture
def recorded(tmp_path: Path, sandbox: Path) -> Path:
    audit = tmp_path / "recorded.jsonl"
    record_traffic(permissive(tmp_path), audit, sandbox)
    return audit


def test_a_stricter_policy_shows_the_calls_it_would_refuse(tmp_path: Path, sandbox: Path, recorded: Path):
    stricter = copy_example("rego", tmp_path / "rego", sandbox)
    result = replay(stricter, recorded)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    calls = [r for r in read_audit(recorded) if r.get("method") == "tools/call" and r["kind"] == "request"]
    assert len(calls) == 4 and all(r["outcome"] == "allow" for r in calls)
    assert calls[1]["annotations"]["readOnlyHint"] is False, "records carry the tool's annotations"
    assert "changed: 3\n" in out, out
    assert "allow -> deny" in out and "filesystem-rego" in out and "write_file" in out, out
    assert "not replayed:" in out and "answers" in out, out

    changes = json.loads(replay(stricter, recorded, flags=("--json",)).stdout)
    changed = {(c["tool"], c["before"]["outcome"], c["after"]["outcome"]) for c in changes["changed"]}
    assert changed == {("write_file", "allow", "deny"), ("create_directory", "allow", "deny"),
                       ("read_text_file", "allow", "deny")}
    outside = next(c for c in changes["changed"] if c["tool"] == "read_text_file")
    assert "outside the allowed roots" in outside["after"]["reason"]
    assert outside["after"]["decided_by"] == "filesystem-rego" and outside["after"]["tags"] == ["bad-arguments"]
    assert changes["replayed"] > 4 and changes["skipped"]["answer"] > 0

    assert replay(stricter, recorded, flags=("--fail-on", "allow-to-deny")).returncode == 1
    assert replay(stricter, recorded, flags=("--fail-on", "deny-to-allow")).returncode == 0
    assert replay(stricter, recorded, flags=("--fail-on", "any")).returncode == 1
    bad = replay(stricter, recorded, flags=("--fail-on", "allow-to-allow"))
    assert bad.returncode == 2 and "FROM-to-TO" in bad.stderr


def test_the_same_config_replays_to_the_same_decisions(tmp_path: Path, sandbox: Path):
    # Recorded under the Cedar example: its refusals depend on annotations
    # and arguments, which the replay takes from the trail.
    config = copy_example("cedar", tmp_path / "cedar", sandbox)
    audit = tmp_path / "cedar.jsonl"
    record_traffic_allowing_refusals(config, audit, sandbox)
    outcomes = [r["outcome"] for r in read_audit(audit) if r.get("method") == "tools/call" and r["kind"] == "request"]
    assert outcomes == ["allow", "deny", "deny", "deny"]
    result = replay(config, audit)
    assert result.returncode == 0 and "changed: 0\n" in result.stdout, result.stdout + result.stderr
    # Loosened: the refusals would now pass.
    permissive_config = permissive(tmp_path)
    loosened = replay(permissive_config, audit, flags=("--json", "--fail-on", "deny-to-allow"))
    assert loosened.returncode == 1
    assert {c["before"]["decided_by"] for c in json.loads(loosened.stdout)["changed"]} == {"filesystem-cedar"}


def record_traffic_allowing_refusals(config: Path, audit: Path, sandbox: Path) -> None:
    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            for tool, arguments in [("write_file", {"path": str(sandbox / "w.txt"), "content": "x"}),
                                    ("create_directory", {"path": str(sandbox / "made")}),
                                    ("read_text_file", {"path": "/etc/hostname"})]:
                with pytest.raises(MCPError):
                    await session.call_tool(tool, arguments)

    asyncio.run(scenario())


def test_records_without_arguments_are_counted_not_guessed(tmp_path: Path, sandbox: Path):
    audit = tmp_path / "bare.jsonl"
    record_traffic(permissive(tmp_path, "[audit]\ninclude_arguments = false"), audit, sandbox)
    stricter = copy_example("rego", tmp_path / "rego", sandbox)
    report = json.loads(replay(stricter, audit, flags=("--json",)).stdout)
    assert report["skipped"]["no-arguments"] >= 4
    assert report["changed"] == [], "nothing is judged on arguments it does not have"
    text = replay(stricter, audit).stdout
    assert "recorded without arguments (audit.include_arguments = false)" in text, text


def test_a_missing_trail_or_bad_config_is_a_clear_error(tmp_path: Path, recorded: Path):
    missing = replay(permissive(tmp_path), tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[[policy]]\nname = 1\n")
    result = replay(broken, recorded)
    assert result.returncode == 2 and "broken.toml" in result.stderr


def test_answers_recorded_with_their_results_are_replayed(tmp_path: Path, sandbox: Path):
    (sandbox / "keys.txt").write_text("aws AKIAIOSFODNN7EXAMPLE\n")
    audit = tmp_path / "answers.jsonl"
    config = permissive(tmp_path, "[audit]\ninclude_results = true")

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "keys.txt")})

    asyncio.run(scenario())
    [answer] = [r for r in read_audit(audit) if r.get("tool") == "read_text_file" and r["kind"] == "result"]
    assert "AKIAIOSFODNN7EXAMPLE" in json.dumps(answer["result"])
    assert answer["arguments"] == {"path": str(sandbox / "keys.txt")}, "with the request's arguments"

    redacting = tmp_path / "redacting.toml"
    redacting.write_text(f'[engine]\ncache_dir = "{tmp_path / "cache"}"\n[[policy]]\nname = "redact"\n'
                         f'module = "{POLICIES / "redact_secrets.wasm"}"\nmethods = ["tools/call"]\n')
    report = json.loads(replay(redacting, audit, flags=("--json",)).stdout)
    assert "answer" not in report["skipped"], report["skipped"]
    [change] = report["changed"]
    assert (change["tool"], change["before"]["outcome"], change["after"]["outcome"]) == \
        ("read_text_file", "allow", "modify")
    assert change["after"]["tags"] == ["redacted"]
