"""Rego, Cedar and CEL policies, each evaluated inside its shipped component:
the examples in examples/policy-languages pass the reference policy's
conformance suite and their own fixtures, guard the real filesystem server,
swap without a restart, and a policy text that does not parse is refused with
a clear message while the old one keeps serving."""

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PORTCULLIS, POLICIES, ROOT, proxied_filesystem, read_audit

EXAMPLES = ROOT / "examples" / "policy-languages"
LANGUAGES = ["rego", "cedar", "cel"]


def copy_example(language: str, directory: Path, root: Path) -> Path:
    """The example's files under `directory`, guarding `root` instead of
    /srv/data, with the module named absolutely and no fixtures (they are
    written for /srv/data)."""
    directory.mkdir(exist_ok=True)
    for file in (EXAMPLES / language).iterdir():
        text = file.read_text().replace("/srv/data", str(root))
        text = text.replace("../../../policies/target/wasm32-wasip2/release", str(POLICIES))
        text = re.sub(r"^fixtures = .*$", "", text, flags=re.M)
        (directory / file.name).write_text(text)
    cache = directory / "cache"
    config = directory / "portcullis.toml"
    config.write_text(f'[engine]\ncache_dir = "{cache}"\n' + config.read_text())
    return config


def check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PORTCULLIS), "check", str(config)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_example_passes_the_conformance_suite_and_its_fixtures(language: str):
    # A policy serves only once its fixtures pass; check loads it as serving would.
    result = check(EXAMPLES / language / "portcullis.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"policy   filesystem-{language}" in result.stdout and "result   ok: 1 policies loaded" in result.stdout


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_example_guards_the_filesystem_server(tmp_path: Path, sandbox: Path, language: str):
    config = copy_example(language, tmp_path, sandbox)
    audit = tmp_path / "audit.jsonl"

    async def refused(session, tool: str, arguments: dict) -> str:
        with pytest.raises(MCPError) as error:
            await session.call_tool(tool, arguments)
        assert error.value.code == -32001
        return error.value.message

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            await session.list_tools()
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            assert read.content[0].text == "hello from the sandbox\n"
            assert "not declared read-only" in await refused(
                session, "write_file", {"path": str(sandbox / "w.txt"), "content": "x"})
            assert "outside the allowed roots" in await refused(session, "read_text_file", {"path": "/etc/hostname"})
            assert "deny list" in await refused(session, "directory_tree", {"path": str(sandbox)})
            assert "'..'" in await refused(session, "read_text_file", {"path": f"{sandbox}/../../etc/hostname"})

    asyncio.run(scenario())
    assert not (sandbox / "w.txt").exists()
    calls = [r for r in read_audit(audit) if r.get("method") == "tools/call" and r["direction"] == "client-to-server"]
    assert [r["outcome"] for r in calls] == ["allow", "deny", "deny", "deny", "deny"]
    assert calls[0]["tags"] == ["checked"]
    assert [r["tags"] for r in calls[1:]] == [["write-refused"], ["bad-arguments"], ["tool-denied"],
                                              ["bad-arguments"]]


# An edit that refuses reading hello.txt, in each language, and one that does not parse.
EDITS = {
    "rego": ("filesystem.rego",
             lambda t: t + '\ndeny contains "hello is off limits" if endswith(input.arguments.path, "hello.txt")\n',
             lambda t: t + "\ndeny contains x if {\n"),
    "cedar": ("filesystem.cedar",
              lambda t: t + '\n@reason("hello is off limits")\nforbid (principal, action, resource)\n'
                            'when { context.arguments has path && context.arguments.path like "*hello.txt" };\n',
              lambda t: t + "\nforbid (principal, action, resource\n"),
    "cel": ("portcullis.toml",
            lambda t: t + '\n[[policy.settings.rules]]\ndeny_if = "has(input.arguments.path) && input.arguments.path.endsWith(\'hello.txt\')"\n'
                          'reason = "hello is off limits"\n',
            lambda t: t + '\n[[policy.settings.rules]]\ndeny_if = "input.tool =="\n'),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_an_edited_policy_swaps_in_and_a_broken_one_is_refused(tmp_path: Path, sandbox: Path, language: str):
    config = copy_example(language, tmp_path, sandbox)
    audit = tmp_path / "audit.jsonl"
    name, tighten, corrupt = EDITS[language]
    policy = tmp_path / name
    original = policy.read_text()

    async def read_hello(session) -> str:
        try:
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            return "allowed"
        except MCPError as error:
            assert "hello is off limits" in error.message, error.message
            return "denied"

    async def until(session, wanted: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await read_hello(session) != wanted:
            assert loop.time() < deadline, f"never saw '{wanted}'"
            await asyncio.sleep(0.1)

    def failures() -> list[dict]:
        return [r for r in read_audit(audit) if r.get("event") == "reload" and r["result"] == "failed"]

    def save(text: str) -> None:
        # As editors save: a whole new file renamed over the old one, so the
        # watcher never reads half a file.
        temporary = policy.with_name(f".{policy.name}.swp")
        temporary.write_text(text)
        os.replace(temporary, policy)

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            assert await read_hello(session) == "allowed"
            save(tighten(original))
            await until(session, "denied")
            save(corrupt(tighten(original)))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not failures():
                assert loop.time() < deadline, "no reload-failure event"
                await asyncio.sleep(0.1)
            assert await read_hello(session) == "denied", "the previous policy keeps serving"
            return failures()[-1]["error"]

    error = asyncio.run(scenario())
    assert "rejected its settings" in error, error


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_policy_that_does_not_parse_fails_check_with_where(tmp_path: Path, sandbox: Path, language: str):
    config = copy_example(language, tmp_path, sandbox)
    name, _, corrupt = EDITS[language]
    (tmp_path / name).write_text(corrupt((tmp_path / name).read_text()))
    result = check(config)
    assert result.returncode != 0
    message = result.stdout
    assert "filesystem-" + language in message and "rejected its settings" in message, message
    where = {"rego": "policy", "cedar": "policies:", "cel": "rule 7"}[language]
    assert where in message, message


def test_settings_files_must_exist_and_not_collide(tmp_path: Path):
    module = POLICIES / "rego.wasm"
    config = tmp_path / "portcullis.toml"
    config.write_text(f'[[policy]]\nname = "r"\nmodule = "{module}"\nsettings_files = {{ policy = "gone.rego" }}\n')
    result = check(config)
    assert result.returncode != 0 and "settings_files.policy" in result.stdout and "gone.rego" in result.stdout
    (tmp_path / "gone.rego").write_text("package mcp\n")
    config.write_text(config.read_text() + 'settings = { policy = "package x" }\n')
    result = check(config)
    assert result.returncode != 0 and "settings has a policy already" in result.stdout, result.stdout


def test_portcullis_test_reads_settings_files(tmp_path: Path):
    suite = ROOT / "examples" / "policies" / "conformance.json"
    rego = EXAMPLES / "rego" / "filesystem.rego"
    data = '{"data": {"roots": ["/srv/data"], "allow": ["list_allowed_directories"], "denied_tools": []}}'
    result = subprocess.run([str(PORTCULLIS), "test", str(POLICIES / "rego.wasm"), str(suite), "--settings", data,
                             "--settings-file", f"policy={rego}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fixtures: 8 passed, 0 failed" in result.stdout
    shutil.copyfile(rego, tmp_path / "a.rego")
    result = subprocess.run([str(PORTCULLIS), "test", str(POLICIES / "rego.wasm"), str(suite), "--settings", data,
                             "--settings-file", f"modules={tmp_path / 'a.rego'}",
                             "--settings-file", f"modules={tmp_path / 'a.rego'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "two files are named a.rego" in result.stderr, result.stderr
    result = subprocess.run([str(PORTCULLIS), "test", str(POLICIES / "rego.wasm"), str(suite), "--settings", data,
                             "--settings-file", f"modules[]={tmp_path / 'a.rego'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_settings_file_must_be_a_regular_file(tmp_path: Path):
    config = tmp_path / "portcullis.toml"
    config.write_text(f'[[policy]]\nname = "r"\nmodule = "{POLICIES / "rego.wasm"}"\n'
                      'settings_files = { policy = "/dev/zero" }\n')
    result = check(config)
    assert result.returncode != 0 and "/dev/zero is not a regular file" in result.stdout, result.stdout


def example_test_args(language: str) -> list[str]:
    """`portcullis test` arguments giving the example's settings and files."""
    import json
    import tomllib
    directory = EXAMPLES / language
    [policy] = tomllib.loads((directory / "portcullis.toml").read_text())["policy"]
    args = ["--settings", json.dumps(policy.get("settings", {}))]
    for key, name in policy.get("settings_files", {}).items():
        args += ["--settings-file", f"{key}={directory / name}"]
    return args


@pytest.mark.parametrize("language", LANGUAGES)
def test_coverage_names_the_rules_no_fixture_exercised(language: str):
    module = POLICIES / f"{language}.wasm"
    suite = ROOT / "examples" / "policies" / "conformance.json"

    def coverage(*fixtures: Path) -> str:
        result = subprocess.run([str(PORTCULLIS), "test", str(module), *map(str, fixtures), "--coverage",
                                 *example_test_args(language)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    suite_only = coverage(suite)
    exercised, total = map(int, re.search(r"coverage: (\d+) of (\d+) rules", suite_only).groups())
    assert 0 < exercised < total, suite_only
    # The conformance suite has no call to a denied tool; the examples' own fixtures do.
    missing = {"rego": "not exercised: policy.rego:", "cedar": "not exercised: deny-list",
               "cel": "not exercised: rule 1: the tool is on the deny list"}[language]
    assert missing in suite_only, suite_only
    both = coverage(suite, EXAMPLES / "fixtures.json")
    assert "deny-list" not in both and "deny list" not in both, both
    more = int(re.search(r"coverage: (\d+) of", both).group(1))
    assert more > exercised, both


def test_coverage_of_a_policy_that_does_not_report_it_is_a_clear_error():
    result = subprocess.run([str(PORTCULLIS), "test", str(POLICIES / "read_only.wasm"),
                             str(ROOT / "examples" / "policies" / "conformance.json"), "--coverage"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "only policies that report coverage" in result.stderr, result.stderr
