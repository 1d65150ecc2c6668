"""`portcullis check` and start-up errors: a bad config, a corrupt module and
rejected settings each get a clear report naming what is wrong."""

import json
import subprocess
from pathlib import Path

from conftest import POLICIES, PORTCULLIS, ROOT, policy, write_config


def check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PORTCULLIS), "check", str(config)], capture_output=True, text=True, timeout=120)


def test_check_loads_every_policy_and_reports_it(tmp_path: Path):
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm", tools=["Write_*"], mode="monitor"),
                                     policy("redact", "redact_secrets.wasm", failure="open", instances="fresh")])
    result = check(config)
    assert result.returncode == 0, result.stdout
    assert "tools=Write_* servers=* · monitor · fail-closed · reused instances (recycled after 10000)" in result.stdout
    assert "· enforce · fail-open · fresh instances · 50 ms · 16 MiB" in result.stdout
    assert "result   ok: 2 policies loaded" in result.stdout


def test_check_names_the_file_and_field_of_a_config_error(tmp_path: Path):
    config = write_config(tmp_path, [policy("p", "read_only.wasm", failure="sometimes")])
    result = check(config)
    assert result.returncode == 1
    assert str(config) in result.stdout and "failure" in result.stdout and "sometimes" in result.stdout


def test_a_corrupt_module_and_rejected_settings_fail_clearly(tmp_path: Path):
    corrupt = tmp_path / "corrupt.wasm"
    corrupt.write_bytes(b"\0asm\x0d\0\x01\0garbage")
    config = write_config(tmp_path, [
        {"name": "corrupt", "module": str(corrupt)},
        policy("bad-settings", "argument_guard.wasm", settings={"roots": ["relative/path"]}),
        policy("good", "read_only.wasm"),
    ])
    result = check(config)
    assert result.returncode == 1
    assert "corrupt" in result.stdout and "not a valid policy component" in result.stdout
    assert "rejected its settings: root 'relative/path' must be an absolute path" in result.stdout
    assert "FAILED: 2 of 3 policies did not load" in result.stdout

    proxy = subprocess.run([str(PORTCULLIS), "stdio", "--config", str(config), "--", "true"],
                           capture_output=True, text=True, timeout=120)
    assert proxy.returncode == 2
    assert "policy 'corrupt'" in proxy.stderr


def test_a_damaged_compile_cache_entry_is_replaced_not_trusted(tmp_path: Path):
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")])
    assert check(config).returncode == 0
    artifacts = list((tmp_path / "cache").glob("*.cwasm"))
    assert len(artifacts) == 1
    artifacts[0].write_bytes(artifacts[0].read_bytes()[:-64] + b"\0" * 64)
    again = check(config)
    assert again.returncode == 0, again.stdout


def test_portcullis_test_reports_each_fixture_and_fails_on_a_mismatch(tmp_path: Path):
    fixtures = tmp_path / "redact.fixtures.json"
    fixtures.write_text(json.dumps([
        {"name": "keys are masked",
         "exchange": {"direction": "server-to-client", "kind": "result", "method": "tools/call",
                      "result": {"content": [{"type": "text", "text": "AKIAIOSFODNN7EXAMPLE"}]}},
         "expect": "modify",
         "modified": {"content": [{"type": "text", "text": "[REDACTED:aws-access-key-id]"}]}},
        {"name": "plain text passes", "expect": "allow",
         "exchange": {"direction": "server-to-client", "kind": "result", "method": "tools/call",
                      "result": {"content": [{"type": "text", "text": "hello"}]}}},
    ]))
    module = str(POLICIES / "redact_secrets.wasm")
    ok = subprocess.run([str(PORTCULLIS), "test", module, str(fixtures)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout
    assert "PASS  keys are masked" in ok.stdout and "fixtures: 2 passed, 0 failed" in ok.stdout

    wrong = tmp_path / "wrong.fixtures.json"
    wrong.write_text(json.dumps([{"name": "expects the key kept", "expect": "allow",
                                  "exchange": {"direction": "server-to-client", "kind": "result",
                                               "method": "tools/call", "result": {"k": "AKIAIOSFODNN7EXAMPLE"}}}]))
    bad = subprocess.run([str(PORTCULLIS), "test", module, str(fixtures), str(wrong)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "FAIL  expects the key kept" in bad.stdout and "expected allow, got modify: {\"k\":\"[REDACTED:aws-access-key-id]\"}" in bad.stdout
    assert "fixtures: 2 passed, 1 failed" in bad.stdout


def test_portcullis_eval_prints_the_verdict_the_logs_and_the_time(tmp_path: Path):
    message = tmp_path / "call.json"
    message.write_text(json.dumps({"method": "tools/call", "tool": "x", "params": {"name": "x", "arguments": {}}}))
    out = subprocess.run([str(PORTCULLIS), "eval", str(POLICIES / "misbehave.wasm"), "--message", str(message),
                          "--settings", '{"mode": "log", "tool": "x"}'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "verdict  allow" in out.stdout and "tags     logged" in out.stdout
    assert "log      info  misbehave: hello from the policy" in out.stdout
    assert "µs on a fresh instance" in out.stdout and "median on a reused one" in out.stdout

    trap = subprocess.run([str(PORTCULLIS), "eval", str(POLICIES / "misbehave.wasm"), "--message", str(message),
                           "--settings", '{"mode": "trap", "tool": "x"}'], capture_output=True, text=True, timeout=120)
    assert trap.returncode == 1
    assert "failure  the policy trapped" in trap.stdout and "misbehave: deliberate trap" in trap.stdout


def test_portcullis_bench_measures_one_policy_fresh_and_reused(tmp_path: Path):
    message = tmp_path / "call.json"
    message.write_text(json.dumps({"method": "tools/call", "tool": "read_file", "annotations": {"readOnlyHint": True},
                                   "params": {"name": "read_file", "arguments": {"path": "/srv/x"}}}))
    out = subprocess.run([str(PORTCULLIS), "bench", str(POLICIES / "read_only.wasm"), "--message", str(message),
                          "--iterations", "50"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for label in ("fresh instances", "reused instances"):
        line = next(line for line in out.stdout.splitlines() if label in line)
        assert "p50" in line and "p99" in line
    refused = subprocess.run([str(PORTCULLIS), "bench", str(POLICIES / "misbehave.wasm"), "--message", str(message),
                              "--settings", '{"mode": "trap", "tool": "read_file"}', "--iterations", "5"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "trapped" in refused.stderr, "a failing policy is not timed"


def test_portcullis_bench_measures_the_gateway_against_the_server_directly():
    out = subprocess.run([str(PORTCULLIS), "bench", "--config", str(ROOT / "examples" / "bench.toml"), "--gateway",
                          "--arguments", '{"path": "/tmp/x"}', "--calls", "50", "--clients", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for label in ("direct", "through the gateway", "added p50"):
        assert any(line.strip().startswith(label) for line in out.stdout.splitlines()), out.stdout
    assert "calls/s" in out.stdout
