// An agent written with the official TypeScript SDK (@modelcontextprotocol/sdk)
// for the gateway tests. It connects over Streamable HTTP with a bearer
// credential, lists the tools, makes the given calls, ends its session, and
// prints what happened as JSON.
//
// Usage: node ts_client.mjs URL TOKEN '[{"name": "...", "arguments": {...}}, ...]'

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, calls = "[]"] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "portcullis-ts-agent", version: "1.0.0" });
await client.connect(transport);

const report = {
  server: client.getServerVersion(),
  protocolVersion: transport.protocolVersion,
  tools: (await client.listTools()).tools.map((tool) => tool.name),
  calls: [],
};
for (const call of JSON.parse(calls)) {
  try {
    report.calls.push({ result: await client.callTool(call) });
  } catch (error) {
    report.calls.push({ error: { code: error.code, message: error.message } });
  }
}
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(report));
