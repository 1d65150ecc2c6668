"""A fault-injecting MCP server double for Portcullis' relay tests.

It appends every line it receives, byte for byte, to the file named by
ECHO_LOG, and answers each request with `{"method": <method>, "params": ...}`.
A batch is answered with a batch. Special methods make it misbehave on purpose:
  test/server-request  -> sends the client a `sampling/createMessage` request
                          and a `notifications/message`, then answers;
  test/list-changed    -> tells its clients its tool list changed, logs a
                          message (for its own client only), then answers;
  test/huge            -> answers with a result of ECHO_HUGE bytes, id first;
  test/huge-id-last    -> the same with the id last (and an inner "id");
  test/slow            -> answers after ECHO_SLOW seconds (default 3), reading
                          nothing meanwhile;
  test/exit            -> writes to stderr and exits with code ECHO_EXIT_CODE.
On EOF it exits with code ECHO_EXIT_CODE (default 0), or, with
ECHO_IGNORE_EOF set, writes its pid to ECHO_PID_FILE and never exits.
"""

import json
import os
import sys
import time

log = open(os.environ["ECHO_LOG"], "ab")
if "ECHO_PID_FILE" in os.environ:
    with open(os.environ["ECHO_PID_FILE"], "w") as pid_file:
        pid_file.write(str(os.getpid()))
exit_code = int(os.environ.get("ECHO_EXIT_CODE", "0"))


def send(message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def answer(message) -> dict | None:
    """The answer to one request (None for anything else)."""
    if not isinstance(message, dict) or "method" not in message or "id" not in message:
        return None
    return {"jsonrpc": "2.0", "id": message["id"], "result": {"method": message["method"], "params": message.get("params")}}


for raw in sys.stdin.buffer:
    log.write(raw)
    log.flush()
    try:
        message = json.loads(raw)
    except ValueError:
        continue
    if isinstance(message, list):
        answers = [a for a in map(answer, message) if a]
        if answers:
            send(answers)
        continue
    if answer(message) is None:
        continue
    method, rid = message["method"], message["id"]
    if method == "test/server-request":
        send({"jsonrpc": "2.0", "id": "srv-1", "method": "sampling/createMessage", "params": {"messages": []}})
        send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}})
    if method == "test/list-changed":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "private"}})
    if method == "test/huge":  # id first, as Python writes it
        send({"jsonrpc": "2.0", "id": rid, "result": {"blob": "x" * int(os.environ["ECHO_HUGE"])}})
        continue
    if method == "test/huge-id-last":  # id last, as the TypeScript SDK writes it
        send({"result": {"blob": "x" * int(os.environ["ECHO_HUGE"]), "id": "inner"}, "jsonrpc": "2.0", "id": rid})
        continue
    if method == "test/slow":
        time.sleep(float(os.environ.get("ECHO_SLOW", "3")))
    if method == "test/exit":
        sys.stderr.write("echo server: exiting on request\n")
        sys.stderr.flush()
        sys.exit(exit_code)
    send(answer(message))

if os.environ.get("ECHO_IGNORE_EOF"):
    while True:
        time.sleep(60)
sys.exit(exit_code)
