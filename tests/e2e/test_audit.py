"""The audit trail as evidence: a chained, rotating JSON Lines file sink in
front of a server written with the official Python SDK. Killing Portcullis
with SIGKILL under load leaves a record of every call that reached the
server, the trail verifies across its rotated files, and an edited, removed
or swapped line makes `portcullis audit verify` fail at that record;
`portcullis audit query` and `tail` read it back. Each sink takes its own
records, redacted its own way."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from conftest import (POLICIES, PORTCULLIS, notes_calls, notes_server, policy, proxied_filesystem, read_audit,
                      read_messages, toml_value, write_config)
from test_serve import free_port

CALLS = 400


def audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PORTCULLIS), "audit", *args], capture_output=True, text=True, timeout=60)


def trail_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".jsonl")


def test_a_killed_proxy_leaves_a_verifiable_trail_of_every_forwarded_call(tmp_path: Path):
    trail = tmp_path / "trail"
    sink = f'[[audit.sinks]]\ntype = "file"\npath = "{trail / "audit.jsonl"}"\nchain = true\nrotate_bytes = 20000\n\n'
    config = write_config(tmp_path, [], sink + notes_server(tmp_path))
    proxy = subprocess.Popen([str(PORTCULLIS), "stdio", "--config", str(config), "--server", "notes"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    answers: list[dict] = []

    def read():
        for line in proxy.stdout:
            answers.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()

    def send(message: dict) -> None:
        proxy.stdin.write((json.dumps(message) + "\n").encode())
        proxy.stdin.flush()

    send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "load", "version": "0"}}})
    deadline = time.monotonic() + 60
    while not answers and time.monotonic() < deadline:
        time.sleep(0.05)
    send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def load():
        try:
            for n in range(1, CALLS + 1):
                send({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                      "params": {"name": "write_note", "arguments": {"text": f"note {n}"}}})
        except (BrokenPipeError, ValueError):
            pass  # killed mid-load

    threading.Thread(target=load, daemon=True).start()
    while len(answers) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    proxy.send_signal(signal.SIGKILL)
    proxy.wait(timeout=30)
    time.sleep(1)  # the server finishes what reached it

    reached = {call["arguments"]["text"] for call in notes_calls(tmp_path) if call["tool"] == "write_note"}
    files = trail_files(trail)
    records = [r for f in files for r in read_audit(f)]
    recorded = {r["arguments"]["text"] for r in records
                if r.get("tool") == "write_note" and r.get("kind") == "request" and r["outcome"] == "allow"}
    assert len(reached) >= 99 and len(reached) < CALLS, "killed under load"
    assert reached <= recorded, f"calls that ran without a record: {sorted(reached - recorded)[:5]}"
    assert len(files) > 2, "the trail was rotated"

    verified = audit("verify", *map(str, files))
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok: {len(records)} records"), verified.stdout

    queried = audit("query", "--config", str(config), "--tool", "write_*", "--outcome", "allow", "--json")
    assert queried.returncode == 0
    assert len(queried.stdout.splitlines()) == sum(
        1 for r in records if r.get("tool") == "write_note" and r.get("outcome") == "allow")
    tail = audit("tail", "--config", str(config), "-n", "3")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3

    oldest = files[0]
    lines = oldest.read_text().splitlines(keepends=True)
    seq = json.loads(lines[4])["chain"]["seq"]

    def broken(changed: list[str]) -> str:
        oldest.write_text("".join(changed))
        try:
            result = audit("verify", *map(str, files))
        finally:
            oldest.write_text("".join(lines))
        assert result.returncode == 1, result.stdout
        return result.stdout

    edited = lines.copy()
    edited[4] = edited[4].replace('"time":"2', '"time":"1', 1)
    assert f"{oldest.name}:5 (record {seq}): was altered" in broken(edited)
    removed = lines[:4] + lines[5:]
    assert f"{oldest.name}:5 (record {seq + 1}): record {seq} is missing here" in broken(removed)
    swapped = lines[:4] + [lines[5], lines[4]] + lines[6:]
    assert f"{oldest.name}:5 (record {seq + 1}): record {seq} is missing here (removed or moved)" in broken(swapped)
    assert audit("verify", *map(str, files)).returncode == 0, "restored"


def test_each_sink_takes_its_own_records_with_its_own_redactions(tmp_path: Path, sandbox: Path):
    everything, denials = tmp_path / "all.jsonl", tmp_path / "denials.jsonl"
    sinks = (f'\n[[audit.sinks]]\ntype = "file"\npath = "{everything}"\n'
             f'\n[[audit.sinks]]\ntype = "file"\npath = "{denials}"\nchain = true\nredact = ["arguments"]\n'
             'only = { outcomes = ["deny"] }\n')
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")], sinks)

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError) as refused:
                await session.call_tool("write_file", {"path": str(sandbox / "x.txt"), "content": "secret"})
            return refused.value

    refused = asyncio.run(scenario())
    assert "not declared read-only" in refused.message
    kept = [r for r in read_audit(everything) if r.get("tool")]
    assert {r["outcome"] for r in kept} >= {"allow", "deny"}
    assert any(r.get("arguments", {}).get("content") == "secret" for r in kept)
    # Event records pass a sink's outcome filter (it is about messages).
    denied = read_messages(denials)
    assert denied and all(r["outcome"] == "deny" for r in denied)
    assert not any("arguments" in r for r in denied), "redacted"
    assert "secret" not in denials.read_text()
    assert audit("verify", str(denials)).returncode == 0


class Receiver:
    """A webhook receiver that checks each batch's signature and keeps its
    records; it can be down (503) or hang until released."""

    def __init__(self, secret: str):
        self.secret = secret.encode()
        self.batches: list[list[dict]] = []
        self.bad_signatures = 0
        self.mode = "up"
        self.released = threading.Event()
        receiver = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.mode == "hang":
                    receiver.released.wait(60)
                if receiver.mode == "down":
                    self.send_response(503)
                    self.end_headers()
                    return
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(expected, self.headers.get("X-Portcullis-Signature", "")):
                    receiver.bad_signatures += 1
                receiver.batches.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/audit"

    def ids(self) -> list[str]:
        """Record ids in arrival order, each once."""
        seen: dict[str, None] = {}
        for batch in self.batches:
            for record in batch:
                seen.setdefault(record["id"], None)
        return list(seen)


def test_a_webhook_that_goes_down_gets_every_record_in_order_and_a_slow_one_holds_nothing_up(
        tmp_path: Path, sandbox: Path):
    receiver = Receiver("hook-secret-42")
    trail = tmp_path / "trail.jsonl"
    sinks = (f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\n'
             f'\n[[audit.sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret = "${{env:HOOK_SECRET}}"\n'
             'batch_records = 8\nbatch_ms = 50\n')
    config = write_config(tmp_path, [], sinks)
    hello = {"path": str(sandbox / "hello.txt")}

    async def calls(session, n: int) -> int:
        for _ in range(n):
            await session.call_tool("read_text_file", hello)
        return n

    async def scenario():
        env = {"HOOK_SECRET": "hook-secret-42"}
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox, env=env) as session:
            await calls(session, 10)
            receiver.mode = "down"
            await calls(session, 20)
            receiver.mode = "hang"
            before = len(receiver.ids())
            # Calls complete while the receiver holds the sink's request.
            done = await calls(session, 20)
            during = len(receiver.ids())
            receiver.mode = "up"
            receiver.released.set()
            await calls(session, 10)
            return done, before, during

    done, before, during = asyncio.run(scenario())
    written = [r["id"] for r in read_audit(trail)]
    deadline = time.monotonic() + 30
    while len(receiver.ids()) < len(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    receiver.server.shutdown()
    assert done == 20 and during == before, "the hot path never waited on the hung sink"
    assert receiver.bad_signatures == 0
    assert receiver.ids() == written, "every record, in order, once after de-duplication"


def otlp_collector(path: str, request_type, port: int = 0) -> tuple[ThreadingHTTPServer, list]:
    """An OTLP/HTTP collector taking `request_type` exports (protobuf) at
    `path` (on `port`, or a free one), and the list it keeps them in."""
    exports = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == path and self.headers["Content-Type"] == "application/x-protobuf"
            request = request_type()
            request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
            exports.append(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", port), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    return collector, exports


def test_an_otel_collector_gets_decisions_as_otlp_logs_with_their_fields_as_attributes(tmp_path: Path,
                                                                                       sandbox: Path):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    collector, exports = otlp_collector("/v1/logs", ExportLogsServiceRequest)
    sink = (f'\n[[audit.sinks]]\ntype = "webhook"\nformat = "otlp"\nbatch_ms = 50\n'
            f'url = "http://127.0.0.1:{collector.server_address[1]}/v1/logs"\n')
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")], sink)

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "trail.jsonl", sandbox) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError):
                await session.call_tool("write_file", {"path": str(sandbox / "x.txt"), "content": "x"})

    asyncio.run(scenario())

    def logs():
        for export in exports:
            for resource_logs in export.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        yield resource_logs.resource, scope_logs.scope, record

    def attributes(record) -> dict:
        values = {}
        for attribute in record.attributes:
            value = attribute.value
            values[attribute.key] = getattr(value, value.WhichOneof("value"))
        return values

    deadline = time.monotonic() + 30
    written = read_audit(tmp_path / "trail.jsonl")
    while len(list(logs())) < len(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    collector.shutdown()
    received = list(logs())
    assert [attributes(r)["portcullis.id"] for _, _, r in received] == [r["id"] for r in written]
    resource, scope, denied = next(entry for entry in received
                                   if attributes(entry[2]).get("portcullis.outcome") == "deny")
    fields = attributes(denied)
    assert {a.key: a.value.string_value for a in resource.attributes} == {"service.name": "portcullis"}
    assert scope.name == "portcullis.audit"
    assert fields["portcullis.tool"] == "write_file" and fields["portcullis.agent"] == "e2e-agent"
    assert fields["portcullis.decided_by"] == "read-only" and fields["portcullis.code"] == -32001
    assert denied.severity_text == "WARN" and denied.severity_number == 13
    assert denied.body.string_value.startswith("deny write_file agent=e2e-agent server=stdio")
    assert denied.time_unix_nano > 1_700_000_000 * 10**9
    assert json.loads(fields["portcullis.policies"])[0]["verdict"] == "deny"


def test_an_otel_collector_gets_a_span_per_decision_joining_the_agents_trace(tmp_path: Path, sandbox: Path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    collector, exports = otlp_collector("/v1/traces", ExportTraceServiceRequest)
    sink = (f'\n[[audit.sinks]]\ntype = "webhook"\nformat = "otlp-traces"\nbatch_ms = 50\n'
            f'url = "http://127.0.0.1:{collector.server_address[1]}/v1/traces"\n')
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")], sink)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "trail.jsonl", sandbox) as session:
            await session.list_tools()
            meta = {"traceparent": f"00-{trace_id}-{parent}-01"}
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")}, meta=meta)
            with pytest.raises(MCPError):
                await session.call_tool("write_file", {"path": str(sandbox / "x.txt"), "content": "x"})

    asyncio.run(scenario())
    written = [r for r in read_audit(tmp_path / "trail.jsonl") if "outcome" in r]

    def spans() -> list[Span]:
        return [span for export in exports for resource in export.resource_spans
                for scope in resource.scope_spans for span in scope.spans]

    def decisions() -> list[Span]:
        return [span for span in spans() if not span.name.startswith("policy ")]

    deadline = time.monotonic() + 30
    while len(decisions()) < len(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    collector.shutdown()
    attributes = {span.span_id: {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                  for span in spans()}
    assert [attributes[s.span_id]["portcullis.id"] for s in decisions()] == [r["id"] for r in written]
    call, answer = [s for s in decisions() if s.name == "tools/call read_text_file"]
    assert call.trace_id.hex() == trace_id and call.parent_span_id.hex() == parent, "the agent's trace"
    assert answer.trace_id.hex() == trace_id, "its answer's decision too"
    assert attributes[call.span_id]["mcp.method.name"] == "tools/call"
    assert attributes[call.span_id]["gen_ai.tool.name"] == "read_text_file"
    assert call.kind == Span.SPAN_KIND_INTERNAL and call.end_time_unix_nano >= call.start_time_unix_nano
    denied = next(s for s in decisions() if s.name == "tools/call write_file")
    record = next(r for r in written if r["id"] == attributes[denied.span_id]["portcullis.id"])
    assert denied.trace_id == bytes.fromhex(record["id"].replace("-", "")), "a trace of its own"
    assert denied.status.code == Status.STATUS_CODE_ERROR and "read-only" in denied.status.message
    assert denied.end_time_unix_nano - denied.start_time_unix_nano == record["latency_us"] * 1000
    policy_span = next(s for s in spans() if s.parent_span_id == denied.span_id)
    assert policy_span.name == "policy read-only" and policy_span.trace_id == denied.trace_id
    assert attributes[policy_span.span_id]["portcullis.verdict"] == "deny"


def test_an_otel_collector_over_grpc_gets_the_logs_after_it_comes_up_late(tmp_path: Path, sandbox: Path):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

    port = free_port()
    received: list[str] = []

    class Collector(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            for resource_logs in request.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        received.extend(a.value.string_value for a in record.attributes if a.key == "portcullis.id")
            return logs_service_pb2.ExportLogsServiceResponse()

    sink = (f'\n[[audit.sinks]]\ntype = "webhook"\nformat = "otlp"\nprotocol = "grpc"\nbatch_ms = 50\n'
            f'url = "http://127.0.0.1:{port}"\n')
    config = write_config(tmp_path, [], sink)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Collector(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "trail.jsonl", sandbox) as session:
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            await asyncio.sleep(0.5)  # nobody listens yet: the batch waits in the spool
            server.start()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})

    asyncio.run(scenario())
    written = [r["id"] for r in read_audit(tmp_path / "trail.jsonl")]
    deadline = time.monotonic() + 30
    while len(set(received)) < len(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop(0)
    assert list(dict.fromkeys(received)) == written, "every record, in order, over gRPC"


def test_one_trail_goes_to_a_file_a_webhook_and_a_collector_at_once_and_survives_their_outages(
        tmp_path: Path, sandbox: Path):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    webhook, collector_port = Receiver("fan-out"), free_port()
    webhook.mode = "down"
    trail = tmp_path / "trail.jsonl"
    sinks = (f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\nchain = true\n'
             f'\n[[audit.sinks]]\ntype = "webhook"\nurl = "{webhook.url}"\nsecret = "fan-out"\nbatch_ms = 50\n'
             f'\n[[audit.sinks]]\ntype = "webhook"\nformat = "otlp"\nbatch_ms = 50\n'
             f'url = "http://127.0.0.1:{collector_port}/v1/logs"\n')
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")], sinks)
    collected: list = []

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox) as session:
            await session.list_tools()
            for n in range(10):  # both receivers are down: nothing waits on them
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
                if n % 3 == 0:
                    with pytest.raises(MCPError):
                        await session.call_tool("write_file", {"path": str(sandbox / "x.txt"), "content": "x"})
            collector, exports = otlp_collector("/v1/logs", ExportLogsServiceRequest, collector_port)
            collected.append((collector, exports))
            webhook.mode = "up"
            for _ in range(5):
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})

    asyncio.run(scenario())
    collector, exports = collected[0]

    def otlp_ids() -> list[str]:
        ids = [attribute.value.string_value for export in exports for resource in export.resource_logs
               for scope in resource.scope_logs for record in scope.log_records
               for attribute in record.attributes if attribute.key == "portcullis.id"]
        return list(dict.fromkeys(ids))

    written = [r["id"] for r in read_audit(trail) if r.get("event") != "checkpoint"]
    deadline = time.monotonic() + 30
    while (webhook.ids() != written or otlp_ids() != written) and time.monotonic() < deadline:
        time.sleep(0.1)
    webhook.server.shutdown()
    collector.shutdown()
    assert len(written) > 30 and audit("verify", str(trail)).returncode == 0
    assert webhook.ids() == written and webhook.bad_signatures == 0, "the webhook: every decision, in order"
    assert otlp_ids() == written, "the collector: every decision, in order"


def test_a_stdio_proxy_serves_its_metrics_when_asked(tmp_path: Path, sandbox: Path):
    port = free_port()
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")])

    async def scenario():
        flags = ["--metrics-listen", f"127.0.0.1:{port}"]
        async with proxied_filesystem(config, tmp_path / "trail.jsonl", sandbox, flags=flags) as session:
            await session.list_tools()
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return response.read().decode().splitlines()

    metrics = dict(line.rsplit(" ", 1) for line in asyncio.run(scenario()) if not line.startswith("#"))
    # initialize, initialized, tools/list and its answer, the call and its answer
    assert int(metrics['portcullis_decisions_total{server="stdio",outcome="allow"}']) >= 4
    assert int(metrics['portcullis_policy_verdicts_total{policy="read-only",verdict="allow"}']) >= 4
    assert int(metrics["portcullis_chain_latency_microseconds_count"]) >= 5


def component_sink(name: str, module: str, **fields) -> str:
    """An `[[audit.sinks]]` entry for the sink component `module` (a file
    name in the components' build dir)."""
    entry = {"type": "component", "name": name, "module": str(POLICIES / module), **fields}
    return "\n[[audit.sinks]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items())


class Hec:
    """A Splunk HTTP Event Collector stand-in: takes a batch of events (JSON
    objects one after another) when the token is right, as Splunk does."""

    def __init__(self, token: str):
        self.token = token
        self.batches: list[list[dict]] = []
        self.requests = 0
        self.refused = 0
        hec = self

        class Collector(BaseHTTPRequestHandler):
            def do_POST(self):
                hec.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                if (self.path != "/services/collector/event"
                        or self.headers.get("Authorization") != f"Splunk {hec.token}"):
                    hec.refused += 1
                    return self.answer(403, {"text": "Invalid token", "code": 4})
                events, decoder, at = [], json.JSONDecoder(), 0
                while at < len(body):
                    event, at = decoder.raw_decode(body, at)
                    events.append(event)
                    at = len(body) - len(body[at:].lstrip())
                hec.batches.append(events)
                self.answer(200, {"text": "Success", "code": 0})

            def answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.address}/services/collector/event"

    def events(self) -> list[dict]:
        return [event for batch in self.batches for event in batch]


def test_a_wasm_sink_component_carries_batches_to_a_siem_and_reaches_only_the_hosts_granted(
        tmp_path: Path, sandbox: Path):
    splunk, elsewhere = Hec("hec-token-7"), Hec("hec-token-7")
    trail, stderr = tmp_path / "trail.jsonl", tmp_path / "stderr.log"
    sinks = (f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\n'
             + component_sink("splunk", "splunk_hec_sink.wasm", allow_hosts=[splunk.address],
                              batch_records=4, batch_ms=50,
                              settings={"url": splunk.url, "token": "${env:HEC_TOKEN}", "index": "mcp"})
             # The same grant, but it tries another host: refused before any connection.
             + component_sink("sneaky", "misbehave_sink.wasm", allow_hosts=[splunk.address], batch_ms=50,
                              settings={"mode": "connect", "url": elsewhere.url}))
    config = write_config(tmp_path, [policy("read-only", "read_only.wasm")], sinks)
    checked = subprocess.run([str(PORTCULLIS), "check", str(config)], capture_output=True,
                             text=True, env={"HEC_TOKEN": "hec-token-7"})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"audit    component splunk ({POLICIES / 'splunk_hec_sink.wasm'}), may reach: {splunk.address}" \
        in checked.stdout

    async def scenario():
        env = {"HEC_TOKEN": "hec-token-7"}
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox, stderr, env=env) as session:
            await session.list_tools()
            for _ in range(6):
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            with pytest.raises(MCPError):
                await session.call_tool("write_file", {"path": str(sandbox / "x.txt"), "content": "x"})

    asyncio.run(scenario())
    written = read_audit(trail)
    deadline = time.monotonic() + 30
    while len(splunk.events()) < len(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    splunk.server.shutdown()
    elsewhere.server.shutdown()
    events = splunk.events()
    assert [e["event"]["id"] for e in events] == [r["id"] for r in written], "every record, in order"
    assert splunk.refused == 0 and max(len(b) for b in splunk.batches) > 1
    assert all(len(batch) <= 4 for batch in splunk.batches)
    denied = next(e for e in events if e["event"].get("outcome") == "deny")
    assert denied["event"]["tool"] == "write_file" and denied["event"]["decided_by"] == "read-only"
    assert {(e["index"], e["sourcetype"], e["source"]) for e in events} == {("mcp", "portcullis:audit", "portcullis")}
    first = datetime.fromisoformat(written[0]["time"]).timestamp()
    assert abs(events[0]["time"] - first) < 1e-3, "the record's own time"
    assert elsewhere.requests == 0, "a host not granted is never reached"
    assert f"{elsewhere.address} is not granted to this sink" in stderr.read_text()


def test_a_sink_component_that_loops_traps_or_hoards_memory_holds_nothing_up_and_loses_nothing(
        tmp_path: Path, sandbox: Path):
    trail, stderr = tmp_path / "trail.jsonl", tmp_path / "stderr.log"
    sinks = f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\n' + "".join(
        component_sink(mode, "misbehave_sink.wasm", max_memory_mb=16, batch_ms=50, settings={"mode": mode})
        for mode in ["loop", "alloc", "trap"])
    config = write_config(tmp_path, [], sinks)

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox, stderr) as session:
            for _ in range(5):
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            # Let each sink fail at least once.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and stderr.read_text().count("audit delivery failed") < 3:
                await asyncio.sleep(0.1)
            return True

    assert asyncio.run(scenario()), "every call was answered"
    log = stderr.read_text()
    assert "ran out of fuel" in log
    assert "misbehave-sink was told to trap" in log
    assert "memory" in log or "allocation" in log, log
    ids = [r["id"] for r in read_audit(trail)]
    assert len(ids) >= 10
    spools = sorted((tmp_path / "portcullis.spool").glob("*/0/spool.jsonl"))
    assert len(spools) == 3
    for spool in spools:
        assert [r["id"] for r in read_audit(spool)] == ids, "every record waits in each sink's spool"


def test_a_changed_sink_component_config_is_swapped_in_and_delivers_what_waited(tmp_path: Path, sandbox: Path):
    bodies: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{receiver.server_address[1]}"
    trail = tmp_path / "trail.jsonl"

    def config(mode: str) -> Path:
        sink = component_sink("siem", "misbehave_sink.wasm", allow_hosts=[address], batch_ms=50,
                              settings={"mode": mode, "url": f"http://{address}/ingest"})
        return write_config(tmp_path, [], f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\n' + sink)

    def delivered() -> list[str]:
        return [json.loads(line)["id"] for body in bodies for line in body.splitlines()]

    async def scenario():
        async with proxied_filesystem(config("trap"), tmp_path / "extra.jsonl", sandbox) as session:
            for _ in range(3):
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            config("connect")  # the fix: the watcher reloads it
            deadline = time.monotonic() + 30
            while not any(r.get("event") == "reload" and r["result"] == "ok" for r in read_audit(trail)):
                assert time.monotonic() < deadline, "no reload"
                await asyncio.sleep(0.1)
            await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            written = [r["id"] for r in read_audit(trail)]
            while delivered()[-1:] != written[-1:] and time.monotonic() < deadline + 30:
                await asyncio.sleep(0.1)
            return written

    written = asyncio.run(scenario())
    receiver.shutdown()
    assert list(dict.fromkeys(delivered()))[:len(written)] == written, \
        "what waited while the sink trapped, then the rest, in order"


def test_a_bad_sink_component_or_settings_fail_the_config_with_a_clear_error(tmp_path: Path):
    corrupt = tmp_path / "corrupt.wasm"
    corrupt.write_bytes(b"\0asm\x0d\0\x01\0garbage")

    def check(sink: str) -> str:
        config = write_config(tmp_path, [], sink)
        result = subprocess.run([str(PORTCULLIS), "check", str(config)], capture_output=True, text=True)
        assert result.returncode == 1, result.stdout
        return result.stdout

    entry = f'\n[[audit.sinks]]\ntype = "component"\nmodule = "{corrupt}"\n'
    assert "is not a valid component" in check(entry)
    refused = check(component_sink("splunk", "splunk_hec_sink.wasm", settings={"url": "http://127.0.0.1:1/"}))
    assert "refused its settings" in refused and "token" in refused
    assert "does not export portcullis:sink/deliver" in check(component_sink("p", "read_only.wasm")), "a policy"


def test_records_go_to_stdout_where_it_is_free_and_stdio_mode_refuses_that(tmp_path: Path):
    port = free_port()
    sink = ('\n[[audit.sinks]]\ntype = "stdout"\nonly = { events = ["admin-credentials-refused"] }\n'
            f'\n[approvers.alice]\napi_key_sha256 = "{hashlib.sha256(b"alice-key").hexdigest()}"\n')
    config = write_config(tmp_path, [], sink)
    admin = subprocess.Popen([str(PORTCULLIS), "admin", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/me", timeout=5)
            except urllib.error.HTTPError as refused:
                assert refused.code == 401
                break
            except OSError:
                assert time.monotonic() < deadline, "the admin listener never came up"
                time.sleep(0.1)
        record = json.loads(admin.stdout.readline())
    finally:
        admin.terminate()
        admin.wait(10)
    assert record["event"] == "admin-credentials-refused" and record["endpoint"] == "/api/me"

    stdio = subprocess.run([str(PORTCULLIS), "stdio", "--config", str(config), "--", "true"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert stdio.returncode != 0 and stdio.stdout == ""
    assert "its stdout carries the MCP messages" in stdio.stderr


def test_a_head_a_siem_holds_catches_the_newest_records_rewritten_or_dropped(tmp_path: Path, sandbox: Path):
    receiver = Receiver("hook-secret-42")
    trail = tmp_path / "trail.jsonl"
    sinks = (f'\n[audit]\nhead_every = 1\n'
             f'\n[[audit.sinks]]\ntype = "file"\npath = "{trail}"\nchain = true\n'
             f'\n[[audit.sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret = "hook-secret-42"\n'
             'batch_records = 8\nbatch_ms = 50\n')
    config = write_config(tmp_path, [], sinks)

    async def scenario():
        async with proxied_filesystem(config, tmp_path / "extra.jsonl", sandbox) as session:
            for _ in range(5):
                await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})

    asyncio.run(scenario())
    lines = trail.read_text().splitlines(keepends=True)
    newest = json.loads(lines[-1])["chain"]["seq"]

    def heads() -> list[dict]:
        return [r for batch in receiver.batches for r in batch if r.get("event") == "chain-head"]

    deadline = time.monotonic() + 30
    while not any(h["head_seq"] == newest for h in heads()) and time.monotonic() < deadline:
        time.sleep(0.1)
    receiver.server.shutdown()
    held = next(h for h in heads() if h["head_seq"] == newest)
    anchor = f"{held['head_seq']}:{held['head']}"
    assert held["file"] == str(trail)
    # The head `audit head` prints is the one the SIEM holds.
    printed = audit("head", str(trail))
    assert printed.returncode == 0 and printed.stdout.strip() == anchor
    verified = audit("verify", str(trail), "--head", anchor)
    assert verified.returncode == 0 and "holds the head kept elsewhere" in verified.stdout

    def line_hash(line: str) -> str:
        return hashlib.sha256(line.rstrip("\n").encode()).hexdigest()

    # The newest record rewritten, and chained anew as the file sink would.
    forged = json.loads(lines[-1])
    forged["outcome"] = "deny"
    del forged["chain"]
    body = json.dumps(forged, separators=(",", ":"))
    chained = body[:-1] + f',"chain":{{"seq":{newest},"prev":"{line_hash(lines[-2])}"}}}}\n'
    trail.write_text("".join(lines[:-1]) + chained)
    assert audit("verify", str(trail)).returncode == 0, "the chain alone cannot tell"
    caught = audit("verify", str(trail), "--head", anchor)
    assert caught.returncode == 1
    assert f"{trail.name}:{len(lines)} (record {newest}): is not the record the head held elsewhere names" in caught.stdout
    # The newest two dropped.
    trail.write_text("".join(lines[:-2]))
    dropped = audit("verify", str(trail), "--head", anchor)
    assert dropped.returncode == 1
    assert f"records {newest - 1} to {newest} were removed" in dropped.stdout
    # A byte that is not UTF-8, and an edit further on: both named, the walk goes on.
    damaged = lines.copy()
    damaged[1] = damaged[1].replace('"time":"', '"time":"\udcff', 1)
    damaged[3] = damaged[3].replace('"time":"2', '"time":"1', 1)
    trail.write_bytes("".join(damaged).encode("utf-8", "surrogateescape"))
    broken = audit("verify", str(trail))
    assert broken.returncode == 1
    assert f"{trail.name}:2 (record 2): " in broken.stdout or f"{trail.name}:2: not UTF-8" in broken.stdout
    assert f"{trail.name}:4 (record 4): was altered" in broken.stdout
    assert f"{len(lines)} records checked" in broken.stdout or "break(s)" in broken.stdout
    queried = audit("query", str(trail), "--json")
    assert queried.returncode == 0 and f"{trail.name}:2: skipped: not UTF-8" in queried.stderr
    assert len(queried.stdout.splitlines()) == len(lines) - 1
