"""Portcullis demo: the official MCP Python SDK client talks to the real
@modelcontextprotocol/server-filesystem through `portcullis stdio` with the
policies of examples/filesystem-readonly.toml, then the audit trail is shown.

Run it with scripts/demo (which installs and builds everything first).
"""

import asyncio
import json
import shutil
from pathlib import Path

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

ROOT = Path(__file__).resolve().parents[1]
PORTCULLIS = ROOT / "target" / "release" / "portcullis"
CONFIG = ROOT / "examples" / "filesystem-readonly.toml"
SERVER = ROOT / "tests" / "node_modules" / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
WORK = ROOT / "target" / "demo"


def prepare() -> tuple[Path, Path]:
    shutil.rmtree(WORK, ignore_errors=True)
    sandbox = WORK / "sandbox"
    sandbox.mkdir(parents=True)
    (sandbox / "notes.txt").write_text("Quarterly plan: ship Portcullis.\n")
    (sandbox / "credentials.txt").write_text("aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n")
    return sandbox, WORK / "audit.jsonl"


async def agent(sandbox: Path, audit: Path) -> None:
    params = StdioServerParameters(
        command=str(PORTCULLIS),
        args=["stdio", "--config", str(CONFIG), "--audit-file", str(audit), "--", "node", str(SERVER), str(sandbox)],
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            info = await session.initialize()
            print(f"connected to {info.server_info.name} through Portcullis\n")

            tools = [t.name for t in (await session.list_tools()).tools]
            print(f"tools the agent can see ({len(tools)}): {', '.join(tools)}")

            notes = await session.call_tool("read_text_file", {"path": str(sandbox / "notes.txt")})
            print(f"\nread notes.txt        -> {notes.content[0].text.strip()!r}")

            creds = await session.call_tool("read_text_file", {"path": str(sandbox / "credentials.txt")})
            print(f"read credentials.txt  -> {creds.content[0].text.strip()!r}")

            target = sandbox / "pwned.txt"
            try:
                await session.call_tool("write_file", {"path": str(target), "content": "overwritten"})
                print("write_file            -> ALLOWED (unexpected!)")
            except MCPError as refused:
                print(f"write_file            -> refused: {refused.message}")
            print(f"pwned.txt exists?     -> {target.exists()}")


def show_audit(audit: Path) -> None:
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    print(f"\naudit trail: {len(records)} records in {audit.relative_to(ROOT)}")
    print(f"  {'direction':<17} {'kind':<13} {'method':<26} {'tool':<16} {'outcome':<8} reason")
    for r in records:
        print(
            f"  {r['direction']:<17} {r['kind']:<13} {r.get('method', '-'):<26} {r.get('tool', '-'):<16} "
            f"{r['outcome']:<8} {r.get('reason', '')}"
        )


def main() -> None:
    sandbox, audit = prepare()
    asyncio.run(agent(sandbox, audit))
    show_audit(audit)


if __name__ == "__main__":
    main()
