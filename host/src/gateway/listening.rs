//! `subscriptions/listen` for agents of the stateless 2026-07-28 revision:
//! one long-lived stream of the changes an agent asked for — list changes
//! of its servers' tools, prompts and resources, and updates of the
//! resources it names — in place of the older revisions' `GET` stream and
//! `resources/subscribe`. The stream opens with the acknowledgement of what
//! Portcullis will honour (the list types some server of the session
//! offers, the resources a server accepted a subscription to); every
//! notification on it is judged and audited for the agent, and carries the
//! subscription's id in `_meta`, as the revision asks. An agent keeps a
//! few streams open at most; each names a bounded set of resources, held
//! subscribed for the agent while some stream of its names them, and
//! unsubscribed from when the last such stream closes.

use crate::contract::Direction;
use crate::gateway::judging::{Pass, judge};
use crate::gateway::sessions::{ClientSession, Scope};
use crate::gateway::{Asked, Gateway};
use crate::identity::Identity;
use crate::protocol::parsed::Parsed;
use crate::relay::{Arrival, Asking};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use tokio::sync::{broadcast, mpsc};

/// The `_meta` key naming the subscription a message belongs to.
const SUBSCRIPTION_KEY: &str = "io.modelcontextprotocol/subscriptionId";
/// The most resources one stream may name.
const MOST_RESOURCES: usize = 64;
/// The most streams one session may keep open: a stateless agent's
/// streams all belong to its standing session.
const MOST_STREAMS: usize = 4;
/// The list types, as the filter names them, the capability offering them,
/// and the notification announcing a change.
const LISTS: &[(&str, &str, &str)] = &[
    (
        "toolsListChanged",
        "tools",
        "notifications/tools/list_changed",
    ),
    (
        "promptsListChanged",
        "prompts",
        "notifications/prompts/list_changed",
    ),
    (
        "resourcesListChanged",
        "resources",
        "notifications/resources/list_changed",
    ),
];

/// What one stream carries.
#[derive(Debug, Default, Clone, PartialEq)]
struct Honoured {
    /// Notifications of list changes, by method.
    lists: Vec<&'static str>,
    /// Resources whose updates it carries.
    resources: Vec<String>,
}

/// A session's open streams, and the resources they keep it subscribed to
/// (each with how many of its streams name it).
#[derive(Default)]
pub struct Listens {
    open: usize,
    held: HashMap<(String, String), usize>,
    /// Held while its streams subscribe or unsubscribe, so that the server
    /// gets them in the order they were decided.
    order: Arc<tokio::sync::Mutex<()>>,
}

/// One open stream: while it lives it counts against the session's
/// [`MOST_STREAMS`]; dropped (closed, or its request given up on), it lets
/// go of its resources.
struct Opened {
    gateway: Arc<Gateway>,
    session: Arc<ClientSession>,
    /// The resources it holds, by server.
    resources: Vec<(String, String)>,
}

impl Opened {
    /// A stream of `session`'s, unless it has [`MOST_STREAMS`] open.
    fn new(gateway: &Arc<Gateway>, session: &Arc<ClientSession>) -> Option<Self> {
        let mut listens = listens(session);
        if listens.open >= MOST_STREAMS {
            return None;
        }
        listens.open += 1;
        Some(Self {
            gateway: gateway.clone(),
            session: session.clone(),
            resources: Vec::new(),
        })
    }

    /// Holds resource `uri` for the stream: the session subscribes to it
    /// with the server that serves it, unless one of its streams holds it
    /// already. Whether it is held.
    async fn hold(&mut self, uri: &str, caller: &Identity) -> bool {
        let Some(server) = server_of(&self.session, uri) else {
            return false;
        };
        let key = (server.clone(), uri.to_string());
        let order = listens(&self.session).order.clone();
        let _in_order = order.lock().await;
        let first = {
            let mut listens = listens(&self.session);
            let count = listens.held.entry(key.clone()).or_default();
            *count += 1;
            *count == 1
        };
        // Counted from here, so that it is let go of whatever happens next.
        self.resources.push(key);
        let (gateway, session) = (&self.gateway, &self.session);
        let asked = Asked::by(caller, Asking::Connection);
        if first && !subscription(gateway, session, &server, uri, asked).await {
            if let Some(key) = self.resources.pop() {
                release(&mut listens(&self.session), &key);
            }
            return false;
        }
        true
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        let last: Vec<_> = {
            let mut listens = listens(&self.session);
            listens.open = listens.open.saturating_sub(1);
            let resources = std::mem::take(&mut self.resources);
            resources
                .into_iter()
                .filter(|key| release(&mut listens, key))
                .collect()
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if last.is_empty() {
            return;
        }
        let (gateway, session) = (self.gateway.clone(), self.session.clone());
        // The resources no stream of the session holds any longer are
        // unsubscribed from, within one request timeout in all.
        runtime.spawn(async move {
            let order = listens(&session).order.clone();
            let _in_order = order.lock().await;
            let unsubscribing = async {
                for (server, uri) in last {
                    // A stream that named it since holds it again.
                    let held = listens(&session)
                        .held
                        .contains_key(&(server.clone(), uri.clone()));
                    if !held {
                        let asked = Asked {
                            caller: None,
                            asking: Asking::Connection,
                        };
                        subscription(&gateway, &session, &server, &uri, asked).await;
                    }
                }
            };
            let _ = tokio::time::timeout(gateway.timeout(), unsubscribing).await;
        });
    }
}

/// Counts one stream fewer holding `key`; whether none holds it now.
fn release(listens: &mut Listens, key: &(String, String)) -> bool {
    let Some(count) = listens.held.get_mut(key) else {
        return false;
    };
    *count = count.saturating_sub(1);
    let last = *count == 0;
    if last {
        listens.held.remove(key);
    }
    last
}

fn listens(session: &ClientSession) -> std::sync::MutexGuard<'_, Listens> {
    session
        .listens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Opens the stream `session`'s agent (`caller`) asked for with `params`
/// (request `id`): subscribes to the resources it names, and returns the
/// stream's events, the acknowledgement first. It carries only what the
/// servers its caller may still use send. It ends when the client stops
/// reading or the session ends, and then lets go of its resources. Refused,
/// with why, if the session has [`MOST_STREAMS`] open.
pub async fn listen(
    gateway: &Arc<Gateway>,
    session: Arc<ClientSession>,
    caller: &Identity,
    id: &RawValue,
    params: &Value,
) -> Result<mpsc::Receiver<String>, String> {
    let mut opened = Opened::new(gateway, &session).ok_or_else(|| {
        format!("an agent may keep {MOST_STREAMS} subscriptions/listen streams open at most")
    })?;
    let filter = &params["notifications"];
    let mut honoured = Honoured::default();
    for (key, capability, method) in LISTS {
        let offered = async {
            let granted = session
                .upstreams
                .iter()
                .filter(|(server, _)| caller.may_use(server));
            for (_, upstream) in granted {
                if let Ok(init) = upstream.initialized(gateway.timeout()).await
                    && init["capabilities"].get(*capability).is_some()
                {
                    return true;
                }
            }
            false
        };
        if filter[*key] == json!(true) && offered.await {
            honoured.lists.push(method);
        }
    }
    // However many it names, subscribing takes one request timeout at most.
    let deadline = tokio::time::Instant::now() + gateway.timeout();
    for uri in wanted(filter) {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if opened.hold(&uri, caller).await {
            honoured.resources.push(uri);
        }
    }
    let (sender, events) = mpsc::channel(16);
    let acknowledged = json!({
        "jsonrpc": "2.0",
        "method": "notifications/subscriptions/acknowledged",
        "params": {
            "notifications": acknowledgement(filter, &honoured),
            "_meta": { SUBSCRIPTION_KEY: serde_json::from_str::<Value>(id.get()).unwrap_or(Value::Null) },
        }
    });
    let _ = sender.try_send(acknowledged.to_string());
    let granted = session
        .upstreams
        .iter()
        .filter(|(server, _)| caller.may_use(server));
    for (server, upstream) in granted {
        let notices = upstream.notices();
        let (session, server, sender) = (session.clone(), server.clone(), sender.clone());
        let (honoured, id) = (honoured.clone(), id.to_owned());
        tokio::spawn(relay(session, server, notices, honoured, id, sender));
    }
    tokio::spawn(async move {
        tokio::select! {
            () = sender.closed() => {}
            () = session.ended() => {}
        }
        drop(opened);
    });
    Ok(events)
}

/// The resources `filter` names, each once, [`MOST_RESOURCES`] at most.
fn wanted(filter: &Value) -> Vec<String> {
    let mut wanted: Vec<String> = Vec::new();
    let named = filter["resourceSubscriptions"]
        .as_array()
        .into_iter()
        .flatten();
    for uri in named.filter_map(Value::as_str) {
        if wanted.len() == MOST_RESOURCES {
            break;
        }
        if !wanted.iter().any(|w| w == uri) {
            wanted.push(uri.to_string());
        }
    }
    wanted
}

/// The server that serves resource `uri` to `session`: its one server, or
/// the one that listed it.
fn server_of(session: &ClientSession, uri: &str) -> Option<String> {
    match &session.scope {
        Scope::Server(server) => Some(server.clone()),
        Scope::All => {
            let resources = session
                .resources
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            resources.get(uri).cloned()
        }
    }
}

/// Subscribes `session` to resource `uri` with `server` (a request of its
/// caller's), or unsubscribes it (Portcullis' own, letting go): judged and
/// audited. Whether the server accepted.
async fn subscription(
    gateway: &Gateway,
    session: &ClientSession,
    server: &str,
    uri: &str,
    asked: Asked<'_>,
) -> bool {
    let method = if asked.caller.is_some() {
        "resources/subscribe"
    } else {
        "resources/unsubscribe"
    };
    let request = json!({
        "jsonrpc": "2.0", "id": "portcullis-listen", "method": method,
        "params": { "uri": uri }
    });
    let Ok(request) = Parsed::parse(request.to_string()) else {
        return false;
    };
    let answer = gateway.forward(session, server, request, asked, None).await;
    answer
        .and_then(|answer| serde_json::from_str::<Value>(&answer).ok())
        .is_some_and(|answer| answer.get("result").is_some())
}

/// The filter as honoured, in the filter's own terms.
fn acknowledgement(filter: &Value, honoured: &Honoured) -> Value {
    let mut acknowledged = serde_json::Map::new();
    for (key, _, method) in LISTS {
        if honoured.lists.contains(method) {
            acknowledged.insert((*key).to_string(), json!(true));
        }
    }
    if filter.get("resourceSubscriptions").is_some() {
        acknowledged.insert("resourceSubscriptions".into(), json!(honoured.resources));
    }
    Value::Object(acknowledged)
}

/// Relays what `server` sends all its clients that the stream carries,
/// judged, while the session's caller may still use the server, until the
/// stream closes or the session ends.
async fn relay(
    session: Arc<ClientSession>,
    server: String,
    mut notices: broadcast::Receiver<Arc<Parsed>>,
    honoured: Honoured,
    id: Box<RawValue>,
    sender: mpsc::Sender<String>,
) {
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => match notice {
                Ok(notice) => notice,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = sender.closed() => return,
            () = session.ended() => return,
        };
        if !carries(&honoured, &notice) {
            continue;
        }
        let Some(relay) = session.relays.get(&server).cloned() else {
            return;
        };
        if !session.grants(&server, &relay.current()) {
            continue;
        }
        let s2c = Direction::ServerToClient;
        let judged = judge(relay, s2c, notice, Arrival::default()).await;
        let text = match judged.forward {
            Some(Pass::AsItCame(notice)) => notice.text().to_string(),
            Some(Pass::Changed(text)) => text,
            None => continue,
        };
        if let Some(tagged) = tagged(&text, &id)
            && sender.send(tagged).await.is_err()
        {
            return;
        }
    }
}

/// Whether the stream carries `notice`.
fn carries(honoured: &Honoured, notice: &Parsed) -> bool {
    let message = notice.message();
    let Some(method) = message.method.as_deref() else {
        return false;
    };
    if method == "notifications/resources/updated" {
        let uri = message.params_value()["uri"].as_str().map(str::to_string);
        return uri.is_some_and(|uri| honoured.resources.contains(&uri));
    }
    honoured.lists.contains(&method)
}

/// `notification` with the subscription's `id` in its `_meta`.
fn tagged(notification: &str, id: &RawValue) -> Option<String> {
    let mut message: Value = serde_json::from_str(notification).ok()?;
    let id: Value = serde_json::from_str(id.get()).ok()?;
    let params = message
        .as_object_mut()?
        .entry("params")
        .or_insert_with(|| json!({}));
    let meta = params
        .as_object_mut()?
        .entry("_meta")
        .or_insert_with(|| json!({}));
    meta.as_object_mut()?.insert(SUBSCRIPTION_KEY.into(), id);
    Some(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_carries_only_what_it_honours_tagged_with_its_id() {
        let honoured = Honoured {
            lists: vec!["notifications/tools/list_changed"],
            resources: vec!["a://1".into()],
        };
        let parsed = |text: &str| Parsed::parse(text.into()).unwrap();
        let tools = r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#;
        assert!(carries(&honoured, &parsed(tools)));
        let prompts = r#"{"jsonrpc":"2.0","method":"notifications/prompts/list_changed"}"#;
        assert!(!carries(&honoured, &parsed(prompts)));
        let updated = |uri: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{{"uri":"{uri}"}}}}"#
            )
        };
        assert!(carries(&honoured, &parsed(&updated("a://1"))));
        assert!(!carries(&honoured, &parsed(&updated("a://2"))));
        let id = RawValue::from_string("7".into()).unwrap();
        let tagged: Value = serde_json::from_str(&tagged(tools, &id).unwrap()).unwrap();
        assert_eq!(tagged["params"]["_meta"][SUBSCRIPTION_KEY], 7);
        let filter = json!({"toolsListChanged": true, "promptsListChanged": true, "resourceSubscriptions": ["a://1", "a://2"]});
        assert_eq!(
            acknowledgement(&filter, &honoured),
            json!({"toolsListChanged": true, "resourceSubscriptions": ["a://1"]})
        );
    }
}
