"""Approvals shared by replicas in a real PostgreSQL (Debian's, started on
loopback by `scripts/postgres`): two `portcullis serve` processes with one
`[approvals] store = "postgres://…"`. A call held on one replica is decided
on the other's admin API and runs once, at once; a two-person rule takes
one approver on each replica, and its approval is reused on either; the CLI
and `check` work on the same store. With PostgreSQL down, a call that needs
a person is refused and audited, other calls flow, and holding heals when
it is back."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import PORTCULLIS, ROOT, read_audit
from test_approvals import APPROVERS, RULES, Admin, admin_config, call_tool, wait_ready
from test_serve import Gateway, free_port


class Postgres:
    """A PostgreSQL server of the tests' own (scripts/postgres), its cluster
    in a folder of /tmp that the server's user can reach."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="portcullis-pg-"))
        self.port = free_port()
        self.start()

    def start(self) -> None:
        self.url = subprocess.run([str(ROOT / "scripts" / "postgres"), "start", str(self.directory), str(self.port)],
                                  check=True, capture_output=True, text=True).stdout.strip()

    def stop(self) -> None:
        subprocess.run([str(ROOT / "scripts" / "postgres"), "stop", str(self.directory)], check=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The server scripts/test started (PORTCULLIS_TEST_POSTGRES), or one of
    this session's own."""
    if url := os.environ.get("PORTCULLIS_TEST_POSTGRES"):
        yield url
        return
    server = Postgres()
    yield server.url
    server.remove()


@pytest.fixture
def own_postgres():
    """A server of this test's own, to stop and start."""
    server = Postgres()
    yield server
    server.remove()


def database(server: str) -> str:
    """A new, empty database on `server`: its URL."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", f"{server}/postgres", "-qc", f"CREATE DATABASE {name}"], check=True)
    return f"{server}/{name}"


def replica(directory: Path, sandbox: Path, store: str) -> tuple[Gateway, Admin]:
    directory.mkdir()
    port = free_port()
    gateway = Gateway(directory, sandbox, admin_config(port, f'[approvals]\nstore = "{store}"\n{RULES}'))
    wait_ready(f"http://127.0.0.1:{port}")
    return gateway, Admin(port)


def portcullis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PORTCULLIS), *args], capture_output=True, text=True, timeout=60)


def test_a_call_held_on_one_replica_is_decided_on_another_and_runs_once(tmp_path: Path, sandbox: Path,
                                                                         postgres_server: str):
    store = database(postgres_server)
    (a, admin_a), (b, admin_b) = (replica(tmp_path / "a", sandbox, store), replica(tmp_path / "b", sandbox, store))
    report = sandbox / "report.txt"
    releases = {"path": str(sandbox / "releases")}
    try:
        async def scenario():
            # Held on A, seen and approved on B: A's call runs at once.
            write = asyncio.create_task(call_tool(a, "write_file", {"path": str(report), "content": "figures\n"}))
            [held] = await asyncio.to_thread(admin_b.pending)
            decided = admin_b.decide(held["id"], "approve", "alice", "checked on b")
            written = await write
            # Two people, one on each replica; then the same call is reused
            # on the other replica without asking.
            create = asyncio.create_task(call_tool(b, "create_directory", releases))
            [two] = await asyncio.to_thread(admin_a.pending)
            first = admin_a.decide(two["id"], "approve", "alice")
            second = admin_b.decide(two["id"], "approve", "bob")
            created = await create
            reused = await call_tool(a, "create_directory", releases)
            return held, decided, written, two, first, second, created, reused

        held, decided, written, two, first, second, created, reused = asyncio.run(scenario())
    finally:
        a.stop()
        b.stop()

    assert held["agent"] == "admin" and held["tool"] == "write_file"
    assert decided[0] == 200 and decided[1]["state"] == "approved"
    assert not written.is_error and report.read_text() == "figures\n"
    assert first[1]["state"] == "pending" and second[1]["state"] == "approved"
    assert second[1]["decided_by"] == "alice, bob"
    assert not created.is_error and not reused.is_error and (sandbox / "releases").is_dir()

    # The call held on A ran there once, and A's trail says who approved it
    # on B; B never forwarded it.
    trail_a, trail_b = read_audit(a.audit), read_audit(b.audit)
    writes = [r for r in trail_a if r.get("tool") == "write_file" and r.get("direction") == "client-to-server"]
    assert [r["outcome"] for r in writes] == ["hold"]
    answers = [r for r in trail_a if r.get("direction") == "server-to-client" and r.get("tool") == "write_file"]
    assert len(answers) == 1 and answers[0]["jsonrpc_id"] == writes[0]["jsonrpc_id"], answers
    [event] = [r for r in trail_a if r.get("event") == "approval" and r.get("approval") == held["id"]]
    assert (event["state"], event["decided_by"], event["comment"]) == ("approved", "alice", "checked on b")
    assert not [r for r in trail_b if r.get("tool") == "write_file"]
    reuse = [r for r in trail_a if r.get("tool") == "create_directory" and r.get("direction") == "client-to-server"]
    assert reuse[-1]["outcome"] == "allow" and "approval:reused" in reuse[-1]["tags"]

    # The CLI and check work on the same store.
    listed = portcullis("approvals", "--config", str(a.config), "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {x["id"]: x["state"] for x in json.loads(listed.stdout)} == {held["id"]: "approved", two["id"]: "approved"}
    checked = portcullis("check", str(b.config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "(schema version 1)" in checked.stdout, checked.stdout
    assert "postgres://postgres@127.0.0.1" in checked.stdout


def test_without_postgres_a_call_that_needs_a_person_is_refused_and_the_rest_flows(tmp_path: Path, sandbox: Path,
                                                                                   own_postgres: Postgres):
    server = own_postgres
    store = database(server.url)
    gateway, admin = replica(tmp_path / "a", sandbox, store)
    try:
        async def scenario():
            first = asyncio.create_task(call_tool(gateway, "write_file", {"path": str(sandbox / "1"), "content": "1"}))
            [held] = await asyncio.to_thread(admin.pending)
            admin.decide(held["id"], "approve", "alice")
            before = await first
            server.stop()
            down = await call_tool(gateway, "write_file", {"path": str(sandbox / "2"), "content": "2"})
            read = await call_tool(gateway, "read_text_file", {"path": str(sandbox / "hello.txt")})
            listing = admin.call("GET", "/api/approvals", APPROVERS["alice"])
            server.start()
            healed = asyncio.create_task(call_tool(gateway, "write_file", {"path": str(sandbox / "3"), "content": "3"}))
            [again] = await asyncio.to_thread(admin.pending)
            admin.decide(again["id"], "approve", "alice")
            return before, down, read, listing, await healed

        before, down, read, listing, healed = asyncio.run(scenario())
    finally:
        gateway.stop()

    assert not before.is_error and (sandbox / "1").read_text() == "1"
    # Nobody can be asked, so the call is refused, never let through.
    assert not hasattr(down, "is_error"), down
    assert "approval" in down.message.lower(), down.message
    assert not (sandbox / "2").exists()
    assert not read.is_error, "calls that need no person flow"
    assert listing[0] == 500 and "approvals store" in json_text(listing[1])
    assert not healed.is_error and (sandbox / "3").read_text() == "3"
    trail = read_audit(gateway.audit)
    writes = [r for r in trail if r.get("tool") == "write_file" and r.get("direction") == "client-to-server"]
    assert [r["outcome"] for r in writes] == ["hold", "deny", "hold"], writes
    assert "approval:unavailable" in writes[1]["tags"]


def json_text(value) -> str:
    return value if isinstance(value, str) else str(value)
