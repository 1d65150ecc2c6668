"""Hot reload with the real filesystem server behind the proxy and the
official Python SDK client calling it: policies and config are replaced while
calls flow, and every call is answered by the old or the new rule — never an
error — while broken versions change nothing but the report."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, POLICIES, proxied_filesystem, read_audit

ALLOWS = POLICIES / "method_filter.wasm"  # with `{}` settings: allows every call
DENIES = POLICIES / "read_only.wasm"  # with `{}` settings: refuses create_directory


def write_in_place(target: Path, source: Path) -> None:
    target.write_bytes(source.read_bytes())


def save_by_rename(target: Path, source: Path) -> None:
    """What editors do: write a temporary file, then rename it over the target."""
    temporary = target.with_name(f".{target.name}.swp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def delete_and_recreate(target: Path, source: Path) -> None:
    target.unlink()
    shutil.copyfile(source, target)


def gate_config(directory: Path, module: Path, extra: str = "") -> Path:
    config = directory / "portcullis.toml"
    config.write_text(f'[engine]\ncache_dir = "{directory / "cache"}"\n[[policy]]\nname = "gate"\nmodule = "{module}"\n'
                      f'methods = ["tools/call"]\n{extra}')
    return config


async def outcome(session, sandbox: Path) -> str:
    """'allowed' or 'denied'; anything else fails the test."""
    try:
        result = await session.call_tool("create_directory", {"path": str(sandbox / "made")})
    except MCPError as error:
        assert error.code == -32001 and "Denied by policy 'gate'" in error.message, error.message
        return "denied"
    assert not result.is_error, result
    return "allowed"


async def until(session, sandbox: Path, wanted: str, limit: float = 20.0) -> None:
    """Polls until the rule in force gives `wanted` (a hang guard, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while await outcome(session, sandbox) != wanted:
        assert loop.time() < deadline, f"never saw '{wanted}'"


def status(status_dir: Path) -> list[dict]:
    out = subprocess.run([str(PORTCULLIS), "status", "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PORTCULLIS_STATUS_DIR": str(status_dir)})
    return json.loads(out.stdout)


def test_a_policy_swapped_fifty_times_under_load_answers_every_call(tmp_path: Path, sandbox: Path):
    module = tmp_path / "gate.wasm"
    write_in_place(module, ALLOWS)
    config = gate_config(tmp_path, module)
    audit = tmp_path / "audit.jsonl"
    env = {"PORTCULLIS_STATUS_DIR": str(tmp_path / "status")}
    seen: list[str] = []

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox, env=env) as session:
            await until(session, sandbox, "allowed")
            done = asyncio.Event()

            async def hammer():  # a second stream of calls that never pauses
                while not done.is_set():
                    seen.append(await outcome(session, sandbox))

            background = asyncio.create_task(hammer())
            for swap in range(50):
                version, wanted = (DENIES, "denied") if swap % 2 == 0 else (ALLOWS, "allowed")
                [write_in_place, save_by_rename, delete_and_recreate][swap % 3](module, version)
                await until(session, sandbox, wanted)
            done.set()
            await background

    asyncio.run(scenario())
    assert set(seen) <= {"allowed", "denied"} and len(seen) > 50
    reloads = [r for r in read_audit(audit) if r.get("event") == "reload"]
    swaps = [r for r in reloads if r["result"] == "ok"]
    assert len(swaps) >= 50
    assert {r["policies"][0]["sha256"] for r in swaps} == {
        __import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in (ALLOWS, DENIES)}
    assert all(r["policies"][0]["previous_sha256"] != r["policies"][0]["sha256"] for r in swaps)


def test_broken_versions_leave_the_previous_policies_serving(tmp_path: Path, sandbox: Path):
    module = tmp_path / "gate.wasm"
    write_in_place(module, DENIES)
    config = gate_config(tmp_path, module)
    audit = tmp_path / "audit.jsonl"
    status_dir = tmp_path / "status"

    async def failures_seen(count: int) -> list[dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            failed = [r for r in read_audit(audit) if r.get("event") == "reload" and r["result"] == "failed"]
            if len(failed) >= count:
                return failed
            assert loop.time() < deadline, "no reload-failure event"
            await asyncio.sleep(0.05)

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox, env={"PORTCULLIS_STATUS_DIR": str(status_dir)}) as s:
            assert await outcome(s, sandbox) == "denied"
            module.write_bytes(b"\0asm\x0d\0\x01\0 this is no component")  # corrupt module
            failed = await failures_seen(1)
            assert "not a valid policy component" in failed[-1]["error"]
            assert await outcome(s, sandbox) == "denied", "the old module keeps serving"
            [report] = status(status_dir)
            assert report["last_reload"]["result"] == "failed"
            assert "not a valid policy component" in report["last_reload"]["error"]
            assert report["policies"][0]["sha256"] == __import__("hashlib").sha256(DENIES.read_bytes()).hexdigest()

            write_in_place(module, DENIES)  # repaired: nothing changed, nothing to swap
            shutil.copyfile(ALLOWS, tmp_path / "allows.wasm")
            good = config.read_text()
            config.write_text(good.replace(str(module), str(tmp_path / "allows.wasm")) + "\nthis is = = not toml\n")
            failed = await failures_seen(2)
            assert str(config) in failed[-1]["error"]
            assert await outcome(s, sandbox) == "denied", "a broken config changes nothing"

            bad_settings = good.replace(str(module), str(POLICIES / "argument_guard.wasm")) + \
                '[policy.settings]\nroots = ["relative"]\n'
            config.write_text(bad_settings)
            failed = await failures_seen(3)
            assert "rejected its settings" in failed[-1]["error"]
            assert await outcome(s, sandbox) == "denied"

            config.write_text(good.replace(str(module), str(tmp_path / "allows.wasm")))
            await until(s, sandbox, "allowed")

    asyncio.run(scenario())


def test_config_changes_reorder_and_add_policies_and_sighup_reloads(tmp_path: Path, sandbox: Path):
    config = gate_config(tmp_path, ALLOWS)
    audit = tmp_path / "audit.jsonl"
    status_dir = tmp_path / "status"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox, env={"PORTCULLIS_STATUS_DIR": str(status_dir)}) as s:
            assert await outcome(s, sandbox) == "allowed"
            added = config.read_text() + (f'[[policy]]\nname = "guard"\nmodule = "{POLICIES / "argument_guard.wasm"}"\n'
                                          f'[policy.settings]\nroots = ["{tmp_path / "elsewhere"}"]\n'
                                          f'[[audit.sinks]]\ntype = "file"\npath = "{tmp_path / "second.jsonl"}"\n')
            temporary = tmp_path / "new.toml"
            temporary.write_text(added)
            os.replace(temporary, config)  # save-by-rename of the config
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                try:
                    await s.call_tool("create_directory", {"path": str(sandbox / "made")})
                except MCPError as error:
                    assert "Denied by policy 'guard'" in error.message
                    break
                assert loop.time() < deadline, "the added policy never took effect"

            [report] = status(status_dir)
            assert [p["name"] for p in report["policies"]] == ["gate", "guard"]
            second = read_audit(tmp_path / "second.jsonl")
            assert second[0]["event"] == "reload" and second[0]["result"] == "ok", "the new sink records the reload"
            assert any(r.get("decided_by") == "guard" for r in second), "and the decisions after it"
            pid = report["pid"]
            os.kill(pid, signal.SIGHUP)
            deadline = loop.time() + 20
            while status(status_dir)[0]["last_reload"]["trigger"] != "signal":
                assert loop.time() < deadline, "SIGHUP did not reload"
                await asyncio.sleep(0.05)
            assert status(status_dir)[0]["last_reload"]["result"] == "unchanged"

    asyncio.run(scenario())
    assert status(status_dir) == [], "the status file goes away with the process"


@pytest.mark.parametrize("fixture_ok", [True, False])
def test_fixtures_must_pass_before_a_policy_serves(tmp_path: Path, sandbox: Path, fixture_ok: bool):
    fixtures = tmp_path / "gate.fixtures.json"
    fixtures.write_text(json.dumps([{
        "name": "create_directory is refused",
        "exchange": {"method": "tools/call", "tool": "create_directory", "annotations": {"readOnlyHint": False},
                     "params": {"name": "create_directory", "arguments": {"path": "/x"}}},
        "expect": "deny" if fixture_ok else "allow",
    }]))
    config = gate_config(tmp_path, DENIES, f'fixtures = ["{fixtures}"]\n')
    result = subprocess.run([str(PORTCULLIS), "check", str(config)], capture_output=True, text=True, timeout=120)
    if fixture_ok:
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode == 1
        assert "fixture 'create_directory is refused'" in result.stdout and "expected allow, got deny (-32001): tool 'create_directory' is not declared read-only" in result.stdout
