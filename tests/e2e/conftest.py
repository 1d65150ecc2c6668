"""Shared helpers for Portcullis' end-to-end tests.

The tests run the release `portcullis` binary in front of real MCP servers
from npm (pinned in tests/package.json) and drive it with the official Python
MCP SDK client (pinned in tests/requirements.txt). `scripts/setup` builds and
installs everything they use.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

ROOT = Path(__file__).resolve().parents[2]
PORTCULLIS = ROOT / "target" / "release" / "portcullis"
POLICIES = ROOT / "policies" / "target" / "wasm32-wasip2" / "release"
FS_SERVER = ROOT / "tests" / "node_modules" / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
DOUBLES = Path(__file__).resolve().parent / "doubles"


def policy(name: str, module: str, **fields) -> dict:
    """One [[policy]] entry; `module` is a file name in the policies build dir."""
    return {"name": name, "module": str(POLICIES / module), **fields}


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(directory: Path, policies: list[dict], extra: str = "") -> Path:
    """Writes a config with the given policy chain and returns its path."""
    lines = ['[agent]', 'id = "e2e-agent"', 'attributes = { team = "qa" }', "", "[engine]",
             f'cache_dir = "{directory / "cache"}"', ""]
    for entry in policies:
        lines.append("[[policy]]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in entry.items())
        lines.append("")
    path = directory / "portcullis.toml"
    path.write_text("\n".join(lines) + extra)
    return path


def notes_server(directory: Path) -> str:
    """The TOML table of the notes server double (doubles/notes_server.py),
    keeping its stage and its log of calls in `directory`."""
    env = {"NOTES_STAGE": str(directory / "stage"), "NOTES_CALLS": str(directory / "calls.jsonl")}
    return "\n".join([
        "[servers.notes]", f"command = {json.dumps(str(ROOT / '.venv' / 'bin' / 'python'))}",
        f"args = [{json.dumps(str(DOUBLES / 'notes_server.py'))}]", f"env = {toml_value(env)}", "", "",
    ])


def notes_calls(directory: Path) -> list[dict]:
    """The tool calls that reached the notes server kept in `directory`."""
    log = directory / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pin(config: Path, *flags: str) -> subprocess.CompletedProcess:
    """Runs `portcullis pin` on `config`."""
    return subprocess.run([str(PORTCULLIS), "pin", "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=120)


def read_audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_messages(path: Path) -> list[dict]:
    """The trail's message records: without its event records (a session
    opened, a reload, Portcullis' own listing of a server's tools, …)."""
    return [r for r in read_audit(path) if "event" not in r]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A directory for the filesystem server to serve, with one file in it."""
    root = tmp_path / "sandbox"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the sandbox\n")
    return root


@asynccontextmanager
async def proxied_filesystem(config: Path, audit: Path, root: Path, stderr_path: Path | None = None,
                             env: dict[str, str] | None = None, elicitation_callback=None,
                             flags: list[str] | None = None):
    """An initialized official-SDK client session to the filesystem server
    through `portcullis stdio` (one that can ask its user, given an
    `elicitation_callback`), `flags` given to `portcullis stdio`."""
    params = StdioServerParameters(
        command=str(PORTCULLIS),
        args=["stdio", "--config", str(config), "--audit-file", str(audit), *(flags or []), "--", "node",
              str(FS_SERVER), str(root)],
        env={"PORTCULLIS_LOG": "info", **(env or {})},
    )
    errlog = open(stderr_path or os.devnull, "w")
    try:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write, elicitation_callback=elicitation_callback) as session:
                await session.initialize()
                yield session
    finally:
        errlog.close()


class RawProxy:
    """`portcullis stdio` driven line by line, for what an SDK client will not send."""

    def __init__(self, config: Path, audit: Path, server: list[str]):
        self.process = subprocess.Popen(
            [str(PORTCULLIS), "stdio", "--config", str(config), "--audit-file", str(audit), "--", *server],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.process.stdin.write(data + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = 30) -> dict:
        line = self.lines.get(timeout=timeout)
        assert line, "portcullis closed stdout"
        return json.loads(line)

    def request(self, line: str | bytes) -> dict:
        self.send(line)
        return self.receive()

    def close(self) -> tuple[int, str]:
        self.process.stdin.close()
        code = self.process.wait(timeout=30)
        assert self.lines.get(timeout=30) == b"", "no output after EOF"
        return code, self.process.stderr.read().decode()


def initialize(version: str = "2025-06-18") -> str:
    return json.dumps({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
    })
