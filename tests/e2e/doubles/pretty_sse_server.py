"""A remote Streamable HTTP MCP server double, for fault injection: it answers
every request with an SSE stream whose lines end in CRLF and whose one event
carries the answer pretty-printed over several `data:` lines — legal SSE that
a reader splitting on "\\n\\n" gets wrong. After the answer it keeps the stream
open for a while, as a server sending later events may.

Two tool calls misbehave on purpose: `echo` of "which-id" answers with the
id the request came under (so a test can see which id Portcullis used
upstream), and `echo` of "not-an-answer" is replied to with a notification,
as a JSON body, in place of the answer.

Usage: pretty_sse_server.py PORT   (RECEIVED_LOG: a file each message's method
is appended to, one per line)
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOLS = [{"name": "echo", "description": "Echoes its text,\nover two lines.",
          "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
          "annotations": {"readOnlyHint": True}}]


def answer(message: dict) -> dict | None:
    method, id = message.get("method"), message.get("id")
    if id is None:
        return None
    if method == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "pretty-sse", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        text = message["params"]["arguments"]["text"]
        if text == "which-id":
            text = f"upstream id {json.dumps(id)}"
        result = {"content": [{"type": "text", "text": f"echo: {text}\nsecond line"}]}
    else:
        return {"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": f"no {method}"}}
    return {"jsonrpc": "2.0", "id": id, "result": result}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = json.loads(body)
        if os.environ.get("RECEIVED_LOG"):
            with open(os.environ["RECEIVED_LOG"], "a") as log:
                log.write(f"{message.get('method')}\n")
        if message.get("params", {}).get("arguments", {}).get("text") == "not-an-answer":
            impostor = json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                                   "params": {"level": "info", "data": "no answer here"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(impostor)))
            self.end_headers()
            self.wfile.write(impostor)
            return
        reply = answer(message)
        if reply is None:
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Mcp-Session-Id", "pretty-session")
        self.send_header("Connection", "close")
        self.end_headers()
        progress = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
        lines = [": a comment first", "event: message"]
        lines += [f"data: {line}" for line in json.dumps(progress, indent=2).splitlines()]
        lines += ["", "id: 1", "event: message"]
        lines += [f"data: {line}" for line in json.dumps(reply, indent=2).splitlines()]
        lines += ["", ""]
        self.wfile.write("\r\n".join(lines).encode())
        self.wfile.flush()
        # The stream stays open after the answer, as a server with more to say keeps it.
        time.sleep(2)
        self.close_connection = True

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
