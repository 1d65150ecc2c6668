"""State shared by replicas in a real Redis (Debian's `redis-server`, started
here on loopback): two `portcullis serve` processes with one `[state] redis`
enforce a per-agent rate limit and the shipped `quota` policy as one, while
the official Python SDK client's calls alternate between them; with Redis
down, what depends on it is refused and audited, and it heals when Redis is
back."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import POLICIES, read_audit
from test_serve import Gateway, connect, free_port


class Redis:
    """redis-server on a loopback port, keeping nothing on disk."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.start()

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "Debian's redis-server is not installed (scripts/setup installs it)"
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def redis(tmp_path: Path):
    served = Redis(tmp_path)
    yield served
    if served.process.poll() is None:
        served.stop()


def shared(redis: Redis, prefix: str) -> str:
    """The config both replicas add: one Redis, one limit, one quota."""
    return f"""
[state]
redis = "redis://127.0.0.1:{redis.port}/0"
prefix = "{prefix}"

[[policy]]
name = "quota"
module = "{POLICIES / 'quota.wasm'}"
servers = ["everything"]
tools = ["echo"]
settings = {{ calls = 3, window_secs = 3600 }}

[[rate_limits]]
servers = ["files"]
tools = ["list_allowed_directories"]
calls = 5
per_secs = 3600
by = ["agent"]
"""


async def outcome(session, tool: str, arguments: dict) -> str:
    try:
        result = await session.call_tool(tool, arguments)
    except MCPError as error:
        return f"refused: {error.message}"
    assert not result.is_error, result
    return "ok"


def test_two_replicas_enforce_one_rate_limit_and_one_quota_and_fail_closed_without_redis(
        tmp_path: Path, sandbox: Path, redis: Redis):
    extra = shared(redis, f"e2e-{uuid.uuid4().hex[:8]}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replicas = [Gateway(tmp_path / "a", sandbox, extra), Gateway(tmp_path / "b", sandbox, extra)]
    try:
        async def scenario():
            async with connect(replicas[0], "admin") as first, connect(replicas[1], "admin") as second:
                sessions = [first, second]
                listed = [await outcome(sessions[i % 2], "files__list_allowed_directories", {}) for i in range(10)]
                echoed = [await outcome(sessions[i % 2], "ev__echo", {"message": f"m{i}"}) for i in range(6)]
                redis.stop()
                down = [await outcome(sessions[i % 2], "files__list_allowed_directories", {}) for i in range(2)]
                down += [await outcome(sessions[i % 2], "ev__echo", {"message": "x"}) for i in range(2)]
                redis.start()  # empty again: the limit starts over
                healed = await outcome(first, "files__list_allowed_directories", {})
                return listed, echoed, down, healed

        listed, echoed, down, healed = asyncio.run(scenario())
    finally:
        for replica in replicas:
            replica.stop()

    # Exactly the limit across both replicas, whichever served each call.
    assert [o == "ok" for o in listed] == [True] * 5 + [False] * 5, listed
    assert all("Rate limit exceeded: at most 5 calls per 3600 s for agent 'admin'" in o for o in listed[5:])
    assert [o == "ok" for o in echoed] == [True] * 3 + [False] * 3, echoed
    assert all("quota of 3 calls per 3600 s used up" in o for o in echoed[3:])

    # Redis down: nothing that depends on it is let through, and each says why.
    assert all(o.startswith("refused:") for o in down), down
    assert all("Rate limits cannot be checked" in o and "Redis" in o for o in down[:2]), down
    assert all("quota" in o for o in down[2:]), down
    assert healed == "ok"

    records = read_audit(replicas[0].audit) + read_audit(replicas[1].audit)
    unavailable = [r for r in records if "rate-limit-unavailable" in r.get("tags", [])]
    assert len(unavailable) == 2 and all(r["outcome"] == "deny" for r in unavailable)
    quota_down = [r for r in records if r.get("tool") == "echo" and r.get("kind") == "request"
                  and r.get("outcome") == "deny" and r.get("decided_by") == "quota"]
    assert len(quota_down) == 5  # three over the quota, two with Redis down


def test_a_quarantine_found_by_one_replica_holds_on_the_other(tmp_path: Path, sandbox: Path, redis: Redis):
    from conftest import notes_server, pin, write_config
    notes = [tmp_path / "notes-a", tmp_path / "notes-b"]
    for directory in notes:
        directory.mkdir()
    pinned = pin(write_config(notes[0], [], notes_server(notes[0])))
    assert pinned.returncode == 0, pinned.stderr
    lock = notes[0] / "portcullis.lock.json"
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"

    def extra(directory: Path) -> str:
        return notes_server(directory) + f"""
[state]
redis = "redis://127.0.0.1:{redis.port}/0"
prefix = "{prefix}"

[pinning]
lock = "{lock}"
on_drift = "hide"
[pinning.on]
description = "deny-server"
"""

    replicas = []
    for name, directory in zip("ab", notes):
        (tmp_path / name).mkdir()
        replicas.append(Gateway(tmp_path / name, sandbox, extra(directory)))
    try:
        async def scenario():
            async with connect(replicas[0], "admin") as first, connect(replicas[1], "admin") as second:
                before = await outcome(second, "notes__write_note", {"text": "before"})
                for _ in range(3):  # the third stage poisons search's description, on replica a's server only
                    await first.call_tool("notes__advance", {})
                await first.list_tools()  # replica a sees the drift: the server is quarantined
                listed = await outcome(first, "notes__write_note", {"text": "on a"})
                # Replica b's own server never changed; the quarantine holds there within a second.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while (after := await outcome(second, "notes__write_note", {"text": "after"})) == "ok":
                    assert loop.time() < deadline, "the quarantine never reached replica b"
                    await asyncio.sleep(0.2)
                redis.stop()
                await asyncio.sleep(1.5)  # past the second for which what Redis said stands
                down = await outcome(second, "notes__write_note", {"text": "down"})
                return before, listed, after, down

        before, listed, after, down = asyncio.run(scenario())
    finally:
        for replica in replicas:
            replica.stop()
    assert before == "ok"
    assert "quarantined" in listed, listed
    assert "server 'notes' is quarantined" in after, after
    assert "cannot be checked" in down and "Redis" in down, down


def test_each_replica_names_itself_in_its_chained_trail_and_status_and_each_trail_verifies(
        tmp_path: Path, sandbox: Path):
    import json
    import os
    from conftest import PORTCULLIS
    trails = {name: tmp_path / f"trail-{name}.jsonl" for name in "ab"}
    replicas = {}
    for name in "ab":
        (tmp_path / name).mkdir()
        extra = f"""
[state]
replica = "${{env:REPLICA_NAME}}"

[[audit.sinks]]
type = "file"
path = "{trails[name]}"
chain = true
"""
        replicas[name] = Gateway(tmp_path / name, sandbox, extra, env={"REPLICA_NAME": f"replica-{name}"})
    try:
        async def scenario():
            for gateway in replicas.values():
                async with connect(gateway, "admin") as session:
                    for _ in range(3):
                        assert await outcome(session, "files__list_allowed_directories", {}) == "ok"

        asyncio.run(scenario())
        statuses = {name: gateway.status() for name, gateway in replicas.items()}
    finally:
        for gateway in replicas.values():
            gateway.stop()
    assert {name: s.get("replica") for name, s in statuses.items()} == {"a": "replica-a", "b": "replica-b"}
    for name, trail in trails.items():
        records = read_audit(trail)
        assert records and all(r["replica"] == f"replica-{name}" for r in records)

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([str(PORTCULLIS), "audit", "verify", str(trails["a"]), str(trails["b"])],
                              capture_output=True, text=True, env=os.environ)

    verified = verify()
    assert verified.returncode == 0, verified.stdout
    assert [line.split(":")[0] for line in verified.stdout.splitlines()] == ["replica replica-a",
                                                                               "replica replica-b"]
    lines = trails["b"].read_text().splitlines()
    altered = json.loads(lines[1])
    altered["agent"] = "someone-else"
    lines[1] = json.dumps(altered, separators=(",", ":"))
    trails["b"].write_text("\n".join(lines) + "\n")
    broken = verify()
    assert broken.returncode == 1
    assert "replica replica-a: ok" in broken.stdout and "replica replica-b: BROKEN" in broken.stdout, broken.stdout
