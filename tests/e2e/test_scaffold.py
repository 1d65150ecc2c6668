"""`portcullis new` in every language: the project it writes builds with its
own script, passes its own fixtures, and guards the real filesystem server
with the config it ships."""

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, ROOT, proxied_filesystem, read_audit

LANGUAGES = ["rust", "js", "python", "c"]


def scaffold(tmp_path: Path, language: str) -> Path:
    project = tmp_path / f"guard-{language}"
    made = subprocess.run([str(PORTCULLIS), "new", project.name, "--lang", language, "--dir", str(project)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert f"created {project}" in made.stdout
    # Rust builds share one target directory so that a rerun is incremental.
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "scaffold")}
    built = subprocess.run([str(project / "build")], capture_output=True, text=True, timeout=900, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (project / "dist" / "policy.wasm").is_file()
    return project


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_new_project_builds_passes_its_fixtures_and_guards_a_real_server(tmp_path: Path, sandbox: Path,
                                                                           language: str):
    project = scaffold(tmp_path, language)
    tested = subprocess.run([str(PORTCULLIS), "test", "dist/policy.wasm", "fixtures/sample.json"], cwd=project,
                            capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "fixtures: 4 passed, 0 failed" in tested.stdout

    async def scenario():
        async with proxied_filesystem(project / "portcullis.toml", tmp_path / "audit.jsonl", sandbox) as session:
            await session.list_tools()
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError) as write:
                await session.call_tool("write_file", {"path": str(sandbox / "w.txt"), "content": "x"})
            return read, write.value

    read, write = asyncio.run(scenario())
    assert read.content[0].text == "hello from the sandbox\n"
    assert "tool 'write_file' is destructive" in write.message and not (sandbox / "w.txt").exists()
    # The shipped config also writes the trail beside itself.
    calls = [r for r in read_audit(project / "audit.jsonl") if r.get("tool") and r["kind"] == "request"]
    assert [(r["tool"], r["outcome"], r.get("tags")) for r in calls] == [
        ("read_text_file", "allow", ["checked"]), ("write_file", "deny", ["destructive"])]


def test_new_refuses_a_bad_name_and_a_directory_in_use(tmp_path: Path):
    bad = subprocess.run([str(PORTCULLIS), "new", "Bad_Name", "--lang", "c", "--dir", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lowercase letters" in bad.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    used = subprocess.run([str(PORTCULLIS), "new", "guard", "--lang", "python", "--dir", str(tmp_path / "used")],
                          capture_output=True, text=True, timeout=60)
    assert used.returncode == 2 and "not empty" in used.stderr
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
