//! What Portcullis knows about one client↔server connection: the requests in
//! flight in each direction, so an answer is judged knowing what it answers,
//! and each tool as the server's latest `tools/list` result described it —
//! annotations, input schema, and the definition compared with the lock
//! file. It turns a
//! parsed message into the [`Exchange`] a policy sees.

use crate::contract::{Agent, Direction, Exchange, MessageKind, ToolAnnotations};
use crate::protocol::jsonrpc::{self, Message};
use crate::surface::drift::{self, ToolDrift};
use crate::surface::lock::{Listing, Pinned};
use crate::surface::schema::{Schema, Schemas};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;

/// Requests that may be in flight at once; past it, more are refused.
const MAX_PENDING: usize = 65_536;
/// The most bytes of params the remembered requests may hold together.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// A request forwarded and not yet answered.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its method.
    pub method: String,
    /// For `tools/call`, the tool.
    pub tool: Option<String>,
    /// Its params as forwarded, as JSON text.
    pub params: Option<String>,
    /// The agent it concerns: its answer is judged as concerning the same.
    pub agent: Agent,
}

impl Pending {
    fn size(&self) -> usize {
        self.params.as_ref().map_or(0, String::len)
    }
}

/// Per-connection state.
pub struct Session {
    server: String,
    agent: Agent,
    pending: HashMap<(&'static str, String), Pending>,
    /// Bytes of params the pending requests hold.
    pending_bytes: usize,
    tools: HashMap<String, KnownTool>,
}

/// A tool as the server's latest `tools/list` result described it.
struct KnownTool {
    annotations: ToolAnnotations,
    /// Its input schema, compiled.
    schema: Option<Arc<Schema>>,
    /// Its definition as the lock file would pin it.
    definition: Value,
}

impl Session {
    /// A session between `agent` and `server`.
    pub fn new(server: String, agent: Agent) -> Self {
        Self {
            server,
            agent,
            pending: HashMap::new(),
            pending_bytes: 0,
            tools: HashMap::new(),
        }
    }

    /// The server's configured name.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The agent its latest client message came from (the connection's
    /// own, where one agent holds it): what the server sends of its own
    /// accord is judged as concerning this agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Takes `agent` as the sender of the latest client message.
    pub fn acting_for(&mut self, agent: &Agent) {
        self.agent = agent.clone();
    }

    /// The exchange for a request or notification travelling `direction`;
    /// `tool` is the tool of a `tools/call` ([`Message::tool_call`]).
    pub fn exchange(
        &self,
        direction: Direction,
        kind: MessageKind,
        message: &Message,
        tool: Option<String>,
    ) -> Exchange {
        self.build(
            direction,
            kind,
            message.method.as_deref().unwrap_or_default().to_string(),
            tool,
            message.params.map(|p| p.get().to_string()),
            None,
        )
    }

    /// The exchange for an answer travelling `direction`, given the request
    /// it answers (if Portcullis saw it).
    pub fn answer_exchange(
        &self,
        direction: Direction,
        kind: MessageKind,
        answered: Option<&Pending>,
        payload: Option<&RawValue>,
    ) -> Exchange {
        let mut exchange = self.build(
            direction,
            kind,
            answered.map(|p| p.method.clone()).unwrap_or_default(),
            answered.and_then(|p| p.tool.clone()),
            answered.and_then(|p| p.params.clone()),
            payload.map(|r| r.get().to_string()),
        );
        if let Some(asked) = answered {
            exchange.agent = asked.agent.clone();
        }
        exchange
    }

    fn build(
        &self,
        direction: Direction,
        kind: MessageKind,
        method: String,
        tool: Option<String>,
        params: Option<String>,
        result: Option<String>,
    ) -> Exchange {
        let annotations = tool
            .as_ref()
            .and_then(|t| Some(self.tools.get(t)?.annotations.clone()));
        Exchange {
            direction,
            kind,
            server: self.server.clone(),
            agent: self.agent.clone(),
            method,
            tool,
            annotations,
            params,
            result,
        }
    }

    /// Remembers a request forwarded in `direction` under `key` (its id,
    /// canonical: [`crate::protocol::jsonrpc::id_key`]).
    pub fn forwarded(&mut self, direction: Direction, key: &str, exchange: &Exchange) {
        let size = exchange.params.as_ref().map_or(0, String::len);
        let pending = Pending {
            method: exchange.method.clone(),
            tool: exchange.tool.clone(),
            params: exchange.params.clone(),
            agent: exchange.agent.clone(),
        };
        self.pending_bytes += size;
        let replaced = self
            .pending
            .insert((direction.as_str(), key.to_string()), pending);
        self.pending_bytes -= replaced.map_or(0, |p| p.size());
    }

    /// Whether one more request, with `params` bytes of params, may be in
    /// flight: a session remembers every request until it is answered (an
    /// answer is only judged knowing what it answers), so their number and
    /// size are bounded instead.
    pub fn has_room(&self, params: usize) -> bool {
        self.pending.len() < MAX_PENDING && self.pending_bytes + params <= MAX_PENDING_BYTES
    }

    /// Forgets the request forwarded in `direction` under `key` (its sender
    /// cancelled it: an answer that still comes is dropped).
    pub fn forget(&mut self, direction: Direction, key: &str) {
        if let Some(forgotten) = self.pending.remove(&(direction.as_str(), key.to_string())) {
            self.pending_bytes -= forgotten.size();
        }
    }

    /// Takes the request an answer travelling `direction` answers (under
    /// `key`): it was forwarded the other way.
    pub fn answered(&mut self, direction: Direction, key: Option<&str>) -> Option<Pending> {
        let answered = self
            .pending
            .remove(&(opposite(direction).as_str(), key?.to_string()))?;
        self.pending_bytes -= answered.size();
        Some(answered)
    }

    /// Whether a request forwarded in `direction` under `key` is still
    /// unanswered.
    pub fn in_flight(&self, direction: Direction, key: &str) -> bool {
        self.pending
            .contains_key(&(direction.as_str(), key.to_string()))
    }

    /// The input schema `tool` was listed with.
    pub fn tool_schema(&self, tool: &str) -> Option<Arc<Schema>> {
        self.tools.get(tool)?.schema.clone()
    }

    /// `tool` as last listed, in the form the lock file pins.
    pub fn tool_definition(&self, tool: &str) -> Option<&Value> {
        self.tools.get(tool).map(|t| &t.definition)
    }

    /// Learns the tools of a server's `tools/list` result, and returns how
    /// they drifted from `pinned` (the server's entry in the lock file). A
    /// first page (no cursor in the request) replaces what was known.
    pub fn learn_tools(
        &mut self,
        request: &Pending,
        result: &RawValue,
        pinned: Option<&Pinned>,
        schemas: &Schemas,
    ) -> Vec<ToolDrift> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ToolList {
            #[serde(default)]
            tools: Vec<Value>,
            next_cursor: Option<String>,
        }
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct Annotations {
            title: Option<String>,
            read_only_hint: Option<bool>,
            destructive_hint: Option<bool>,
            idempotent_hint: Option<bool>,
            open_world_hint: Option<bool>,
        }
        let Some(list) = jsonrpc::from_object::<ToolList>(result) else {
            tracing::warn!(server = %self.server, "tools/list result is not a tool list");
            return Vec::new();
        };
        let first_page = request
            .params
            .as_deref()
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .is_none_or(|p| p.get("cursor").is_none());
        if first_page {
            self.tools.clear();
        }
        let listed = Listing::Tools.definitions(&list.tools);
        let drifts = pinned.map_or_else(Vec::new, |pinned| {
            let complete = first_page && list.next_cursor.is_none();
            drift::compare(&self.server, &pinned.tools, &listed, complete)
        });
        for tool in &list.tools {
            let Some((name, definition)) = tool["name"]
                .as_str()
                .and_then(|name| listed.get_key_value(name))
            else {
                continue;
            };
            // Annotations written as an array are no annotations to a client.
            let a: Annotations = Some(&tool["annotations"])
                .filter(|a| a.is_object())
                .and_then(|a| serde_json::from_value(a.clone()).ok())
                .unwrap_or_default();
            let known = KnownTool {
                annotations: ToolAnnotations {
                    title: a.title,
                    read_only_hint: a.read_only_hint,
                    destructive_hint: a.destructive_hint,
                    idempotent_hint: a.idempotent_hint,
                    open_world_hint: a.open_world_hint,
                },
                schema: tool.get("inputSchema").and_then(|s| schemas.get(s)),
                definition: definition.clone(),
            };
            self.tools.insert(name.clone(), known);
        }
        drifts
    }
}

/// The other direction.
fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::ClientToServer => Direction::ServerToClient,
        Direction::ServerToClient => Direction::ClientToServer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let agent = Agent {
            id: "a".into(),
            attributes: vec![],
        };
        Session::new("fs".into(), agent)
    }

    #[test]
    fn listings_and_annotations_are_read_only_as_objects() {
        let mut s = session();
        let list_req = Message::parse(r#"{"id":1,"method":"tools/list"}"#).unwrap();
        let learn = |s: &mut Session, id: &str, result: &str| {
            let ex = s.exchange(
                Direction::ClientToServer,
                MessageKind::Request,
                &list_req,
                None,
            );
            s.forwarded(Direction::ClientToServer, id, &ex);
            let pending = s.answered(Direction::ServerToClient, Some(id)).unwrap();
            let result = RawValue::from_string(result.into()).unwrap();
            s.learn_tools(&pending, &result, None, &Schemas::default());
        };
        learn(&mut s, "1", r#"[[{"name":"w"}],null]"#);
        assert!(s.tools.is_empty(), "a listing by position is no listing");
        learn(
            &mut s,
            "2",
            r#"{"tools":[{"name":"w","annotations":["t",true]}]}"#,
        );
        let known = s.tools.get("w").expect("the object listing is learned");
        assert_eq!(
            known.annotations.read_only_hint, None,
            "array annotations are not read"
        );
    }

    #[test]
    fn answers_carry_the_method_tool_and_annotations_of_their_request() {
        let mut s = session();
        let list_req = Message::parse(r#"{"id":1,"method":"tools/list"}"#).unwrap();
        let ex = s.exchange(
            Direction::ClientToServer,
            MessageKind::Request,
            &list_req,
            list_req
                .tool_call()
                .and_then(Result::ok)
                .map(|call| call.name),
        );
        s.forwarded(Direction::ClientToServer, "1", &ex);
        assert!(s.in_flight(Direction::ClientToServer, "1"));

        let list = Message::parse(r#"{"id":1,"result":{"tools":[{"name":"read_file","annotations":{"readOnlyHint":true}},{"name":"write_file"}]}}"#).unwrap();
        let pending = s.answered(Direction::ServerToClient, Some("1")).unwrap();
        assert!(!s.in_flight(Direction::ClientToServer, "1"));
        assert_eq!(pending.method, "tools/list");
        s.learn_tools(&pending, list.result.unwrap(), None, &Schemas::default());

        let call = Message::parse(
            r#"{"id":"c","method":"tools/call","params":{"name":"read_file","arguments":{}}}"#,
        )
        .unwrap();
        let ex = s.exchange(
            Direction::ClientToServer,
            MessageKind::Request,
            &call,
            call.tool_call().and_then(Result::ok).map(|call| call.name),
        );
        assert_eq!(ex.tool.as_deref(), Some("read_file"));
        assert_eq!(ex.annotations.as_ref().unwrap().read_only_hint, Some(true));
        s.forwarded(Direction::ClientToServer, r#""c""#, &ex);

        let result = Message::parse(r#"{"id":"c","result":{"content":[]}}"#).unwrap();
        let pending = s.answered(Direction::ServerToClient, Some(r#""c""#));
        let ex = s.answer_exchange(
            Direction::ServerToClient,
            MessageKind::Result,
            pending.as_ref(),
            result.result,
        );
        assert_eq!(ex.method, "tools/call");
        assert_eq!(ex.tool.as_deref(), Some("read_file"));
        assert_eq!(
            ex.params.as_deref(),
            Some(r#"{"name":"read_file","arguments":{}}"#)
        );
        assert_eq!(ex.result.as_deref(), Some(r#"{"content":[]}"#));
        assert!(
            s.answered(Direction::ServerToClient, Some(r#""c""#))
                .is_none(),
            "answered once"
        );
    }

    #[test]
    fn ids_are_scoped_by_direction() {
        let mut s = session();
        let from_server = Message::parse(r#"{"id":1,"method":"roots/list"}"#).unwrap();
        let ex = s.exchange(
            Direction::ServerToClient,
            MessageKind::Request,
            &from_server,
            from_server
                .tool_call()
                .and_then(Result::ok)
                .map(|call| call.name),
        );
        s.forwarded(Direction::ServerToClient, "1", &ex);
        assert!(s.answered(Direction::ServerToClient, Some("1")).is_none());
        assert_eq!(
            s.answered(Direction::ClientToServer, Some("1"))
                .unwrap()
                .method,
            "roots/list"
        );
    }
}
