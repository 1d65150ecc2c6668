"""A remote Streamable HTTP MCP server for the gateway tests, written with
the official Python SDK (`MCPServer`, served by uvicorn). It appends the
headers of every HTTP request it receives to HEADERS_LOG, one JSON object per
line (with the request's method), so a test can see exactly what Portcullis
sent it. Its `announce` tool tells every client its tools changed, on the
server's own stream (GET), not on the call's.

Usage: http_server.py PORT   (JSON_RESPONSE=1 answers with JSON instead of SSE;
TLS_CERT and TLS_KEY, PEM files, serve HTTPS; KEEP_SESSIONS=1 ignores DELETE,
keeping the session and its quiet stream open, as a hostile server would)
"""

import json
import os
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("remote-calculator")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def reset() -> str:
    """Forgets everything."""
    return "reset"


@server.tool()
async def announce(ctx: Context) -> str:
    """Tells its clients its tools changed."""
    await ctx.session.send_tool_list_changed()
    return "announced"


app = server.streamable_http_app(json_response=os.environ.get("JSON_RESPONSE") == "1")


async def recording(scope, receive, send):
    if scope["type"] == "http":
        with open(os.environ["HEADERS_LOG"], "a") as log:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            log.write(json.dumps({**headers, ":method": scope["method"]}) + "\n")
        if scope["method"] == "DELETE" and os.environ.get("KEEP_SESSIONS") == "1":
            # Says the session ended, and keeps it (and its stream) open.
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
    await app(scope, receive, send)


uvicorn.run(recording, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            ssl_certfile=os.environ.get("TLS_CERT"), ssl_keyfile=os.environ.get("TLS_KEY"))
