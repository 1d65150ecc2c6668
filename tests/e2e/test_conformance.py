"""One contract, several languages: the reference policy in each language in
examples/policies passes the same fixture suite, and runs in front of the real
filesystem server."""

import asyncio
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, ROOT, proxied_filesystem, toml_value

REFERENCE = ROOT / "examples" / "policies"
LANGUAGES = ["rust", "js", "python", "c"]
SETTINGS = '{"allow": ["list_allowed_directories"], "roots": ["/srv/data"]}'


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_language_passes_the_conformance_suite(language: str):
    module = REFERENCE / language / "dist" / "policy.wasm"
    result = subprocess.run([str(PORTCULLIS), "test", str(module), str(REFERENCE / "conformance.json"),
                             "--settings", SETTINGS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fixtures: 8 passed, 0 failed" in result.stdout


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_reference_policy_guards_the_filesystem_server(tmp_path: Path, sandbox: Path, language: str):
    config = tmp_path / "portcullis.toml"
    config.write_text(
        f'[engine]\ncache_dir = "{tmp_path / "cache"}"\n[[policy]]\nname = "reference"\n'
        f'module = "{REFERENCE / language / "dist" / "policy.wasm"}"\nmethods = ["tools/call"]\n'
        f'settings = {toml_value({"allow": [], "roots": [str(sandbox)]})}\n')

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
            await session.list_tools()
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError) as write:
                await session.call_tool("write_file", {"path": str(sandbox / "w.txt"), "content": "x"})
            with pytest.raises(MCPError) as outside:
                await session.call_tool("read_text_file", {"path": "/etc/hostname"})
            return read, write.value, outside.value

    read, write, outside = asyncio.run(scenario())
    assert read.content[0].text == "hello from the sandbox\n"
    assert "not declared read-only" in write.message and not (sandbox / "w.txt").exists()
    assert "outside the allowed roots" in outside.message


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_language_rejects_bad_settings_with_its_own_message(language: str):
    module = REFERENCE / language / "dist" / "policy.wasm"
    result = subprocess.run([str(PORTCULLIS), "test", str(module), str(REFERENCE / "conformance.json"),
                             "--settings", '{"allow": 5}'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "rejected its settings" in result.stderr and ("allow must be a list" in result.stderr
                                                         or "expected a sequence" in result.stderr)
