// An agent written with the official TypeScript SDK that declares sampling,
// elicitation and roots, for the tests of the whole protocol through
// `portcullis serve`. It answers the server's requests as a user's client
// would (a canned model reply, an accepted form, one root), then exercises
// server-everything's tools that ask the client, report progress, log and
// update a subscribed resource, cancels a long call, and prints what
// happened as JSON.
//
// Usage: node ts_full_client.mjs URL TOKEN SCENARIO
//   SCENARIO: "all", or a comma-separated list of: sampling, elicitation,
//   url-elicitation (URL mode, by request and by the -32042 error), roots,
//   progress, logging, subscribe, cancel

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  ListRootsRequestSchema,
  LoggingMessageNotificationSchema,
  ResourceUpdatedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const [url, token, scenario = "all"] = process.argv.slice(2);
const wanted = (step) => scenario === "all" || scenario.split(",").includes(step);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client(
  { name: "portcullis-ts-full-agent", version: "1.0.0" },
  { capabilities: { sampling: {}, elicitation: { form: {}, url: {} }, roots: { listChanged: true } } },
);

const report = { asked: [], logs: [], updates: [], calls: {} };
client.setRequestHandler(CreateMessageRequestSchema, async (request) => {
  report.asked.push({ method: "sampling/createMessage", maxTokens: request.params.maxTokens });
  return {
    model: "canned-model",
    role: "assistant",
    content: { type: "text", text: `canned reply to ${request.params.messages.length} message(s)` },
  };
});
client.setRequestHandler(ElicitRequestSchema, async (request) => {
  const mode = request.params.mode ?? "form";
  report.asked.push({ method: "elicitation/create", mode, message: request.params.message, url: request.params.url });
  if (mode === "url") return { action: "accept" };
  return { action: "accept", content: { name: "Ada Lovelace", check: true, integer: 7 } };
});
client.setRequestHandler(ListRootsRequestSchema, async () => {
  report.asked.push({ method: "roots/list" });
  return { roots: [{ uri: "file:///srv/agent-workspace", name: "workspace" }] };
});
client.setNotificationHandler(LoggingMessageNotificationSchema, (notice) => {
  report.logs.push(notice.params.level);
});
client.setNotificationHandler(ResourceUpdatedNotificationSchema, (notice) => {
  report.updates.push(notice.params.uri);
});

const text = (result) => result.content.map((c) => c.text ?? "").join("\n");
const until = async (check, ms) => {
  const end = Date.now() + ms;
  while (!check() && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
  return check();
};
const attempt = async (name, run) => {
  try {
    report.calls[name] = { result: await run() };
  } catch (error) {
    report.calls[name] = { error: { code: error.code, message: error.message, data: error.data } };
  }
};

await client.connect(transport);
report.protocolVersion = transport.protocolVersion;
report.tools = (await client.listTools()).tools.map((tool) => tool.name);

if (wanted("sampling")) {
  await attempt("sampling", async () =>
    text(await client.callTool({ name: "trigger-sampling-request", arguments: { prompt: "hello", maxTokens: 40 } })));
}
if (wanted("elicitation")) {
  await attempt("elicitation", async () =>
    text(await client.callTool({ name: "trigger-elicitation-request", arguments: {} })));
}
if (wanted("url-elicitation")) {
  const consent = { url: "https://consent.example.com/grant?flow=7", elicitationId: "consent-7" };
  await attempt("url-elicitation", async () =>
    text(await client.callTool({ name: "trigger-url-elicitation", arguments: consent })));
  await attempt("url-elicitation-error", async () =>
    text(await client.callTool({
      name: "trigger-url-elicitation",
      arguments: { url: "https://consent.example.com/grant?flow=8", elicitationId: "consent-8", errorPath: true },
    })));
}
if (wanted("roots")) {
  await attempt("roots", async () => text(await client.callTool({ name: "get-roots-list", arguments: {} })));
}
if (wanted("progress")) {
  const progress = [];
  await attempt("progress", async () => {
    const result = await client.callTool(
      { name: "trigger-long-running-operation", arguments: { duration: 1, steps: 4 } },
      undefined,
      { onprogress: (p) => progress.push([p.progress, p.total]) },
    );
    return { text: text(result), progress };
  });
}
if (wanted("logging")) {
  await attempt("logging", async () => {
    await client.callTool({ name: "toggle-simulated-logging", arguments: {} });
    return await until(() => report.logs.length > 0, 12000);
  });
}
if (wanted("subscribe")) {
  await attempt("subscribe", async () => {
    const { resources } = await client.listResources();
    const uri = resources[0].uri;
    await client.subscribeResource({ uri });
    await client.callTool({ name: "toggle-subscriber-updates", arguments: {} });
    const updated = await until(() => report.updates.includes(uri), 12000);
    return { uri, updated };
  });
}
if (wanted("cancel")) {
  await attempt("cancel", async () => {
    const controller = new AbortController();
    setTimeout(() => controller.abort("the user changed their mind"), 1000);
    await client.callTool(
      { name: "trigger-long-running-operation", arguments: { duration: 30, steps: 30 } },
      undefined,
      { signal: controller.signal, onprogress: () => {} },
    );
    return "not cancelled";
  });
}

await transport.terminateSession();
await client.close();
console.log(JSON.stringify(report));
