//! Routing on serve's aggregated endpoint (`/mcp`): which server a request
//! goes to, by the merged tool or prompt name it calls (rewritten in place
//! to the name that server knows) or by the resource URI a server listed;
//! and each server's part of a merged list, named as the endpoint lists it.

use crate::gateway::naming::Naming;
use crate::protocol::jsonrpc::{self, INVALID_PARAMS, METHOD_NOT_FOUND};
use crate::protocol::parsed::{Parsed, splice};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::borrow::Cow;

/// One list the aggregated endpoint merges.
#[derive(Debug, PartialEq, Eq)]
pub struct Listing {
    /// The server capability that offers it.
    pub capability: &'static str,
    /// The member of the result holding the items.
    pub member: &'static str,
    /// Whether item names are prefixed.
    pub renamed: bool,
}

/// The lists merged, by method.
pub const LISTINGS: &[(&str, Listing)] = &[
    (
        "tools/list",
        Listing {
            capability: "tools",
            member: "tools",
            renamed: true,
        },
    ),
    (
        "prompts/list",
        Listing {
            capability: "prompts",
            member: "prompts",
            renamed: true,
        },
    ),
    (
        "resources/list",
        Listing {
            capability: "resources",
            member: "resources",
            renamed: false,
        },
    ),
    (
        "resources/templates/list",
        Listing {
            capability: "resources",
            member: "resourceTemplates",
            renamed: false,
        },
    ),
];

/// The list `method` asks for, if it asks for one.
pub fn listing(method: &str) -> Option<&'static Listing> {
    LISTINGS
        .iter()
        .find_map(|(m, listing)| (*m == method).then_some(listing))
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    /// The server.
    pub server: String,
    /// The request as that server is sent it, when a name in it was
    /// rewritten; else it goes as it came.
    pub renamed: Option<String>,
}

/// Why a request goes nowhere: the JSON-RPC error code and message.
pub type NoRoute = (i32, String);

/// Where `request` (not a list request) goes among `servers`, the session's;
/// `resource` tells which server listed a URI.
pub fn route<'s>(
    naming: &Naming,
    servers: impl IntoIterator<Item = &'s String>,
    resource: impl FnOnce(&str) -> Option<String>,
    request: &Parsed,
) -> Result<Route, NoRoute> {
    #[derive(Default, Deserialize)]
    struct Target<'a> {
        #[serde(borrow, default)]
        name: Option<&'a RawValue>,
        #[serde(borrow, default)]
        uri: Option<&'a RawValue>,
    }
    let message = request.message();
    let method = message.method.as_deref().unwrap_or_default();
    let target: Target = message
        .params
        .and_then(jsonrpc::from_object)
        .unwrap_or_default();
    let unknown = |what: &str| {
        (
            INVALID_PARAMS,
            format!("Unknown name or resource: '{what}'"),
        )
    };
    match method {
        "tools/call" | "prompts/get" => {
            let raw = target.name;
            let name: Option<Cow<str>> = raw.and_then(|raw| serde_json::from_str(raw.get()).ok());
            let (Some(raw), Some(name)) = (raw, name) else {
                return Err(unknown(""));
            };
            let (server, own) = naming.split(servers, &name).ok_or_else(|| unknown(&name))?;
            // The name's own bytes are swapped; the rest goes as written.
            let own = serde_json::to_string(&own).expect("a string serializes");
            let renamed = splice(request.text(), raw.get(), &own);
            Ok(Route {
                server,
                renamed: Some(renamed),
            })
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            let uri: Cow<str> = target
                .uri
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .unwrap_or_default();
            let server = resource(&uri).ok_or_else(|| unknown(&uri))?;
            Ok(Route {
                server,
                renamed: None,
            })
        }
        _ => Err((METHOD_NOT_FOUND, format!("Method not found: {method}"))),
    }
}

/// `server`'s items of `listing`, from its `answer` to the list request,
/// named as the aggregated endpoint lists them; or why there are none (the
/// error it answered).
pub fn listed_items(
    naming: &Naming,
    server: &str,
    listing: &Listing,
    answer: &str,
) -> Result<Vec<Value>, String> {
    let mut answer: Value = serde_json::from_str(answer).unwrap_or_default();
    let Some(list) = answer["result"][listing.member].as_array_mut() else {
        return Err(answer["error"].to_string());
    };
    let mut items = std::mem::take(list);
    if listing.renamed {
        for item in &mut items {
            if let Some(name) = item["name"].as_str() {
                item["name"] = json!(naming.merged(server, name));
            }
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn naming() -> Naming {
        let prefixes = [("files", "fs"), ("everything", "ev")]
            .map(|(s, p)| (s.to_string(), p.to_string()))
            .into_iter()
            .collect();
        Naming::new(prefixes, "__".into())
    }

    fn servers() -> Vec<String> {
        vec!["everything".into(), "files".into()]
    }

    fn route_of(text: &str) -> Result<Route, NoRoute> {
        let resources = HashMap::from([("file:///a".to_string(), "files".to_string())]);
        let request = Parsed::parse(text.into()).unwrap();
        route(
            &naming(),
            &servers(),
            |uri| resources.get(uri).cloned(),
            &request,
        )
    }

    #[test]
    fn a_tool_call_goes_to_its_server_under_the_servers_own_name() {
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fs__read_file","arguments":{"path":"/tmp/x","n":1.50}}}"#;
        let route = route_of(text).unwrap();
        assert_eq!(route.server, "files");
        // Only the name changed: the arguments are byte for byte as sent.
        assert_eq!(
            route.renamed.unwrap(),
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/tmp/x","n":1.50}}}"#
        );
    }

    #[test]
    fn a_member_the_route_does_not_use_does_not_spoil_it() {
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fs__read_file","uri":5}}"#;
        assert_eq!(route_of(text).unwrap().server, "files");
    }

    #[test]
    fn an_escaped_name_is_read_as_a_peer_reads_it() {
        // "ev__say\u005fhi" is ev__say_hi.
        let text = r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"ev__say\u005fhi"}}"#;
        let route = route_of(text).unwrap();
        assert_eq!(route.server, "everything");
        let renamed = Parsed::parse(route.renamed.unwrap()).unwrap();
        let params: Value = serde_json::from_str(renamed.message().params.unwrap().get()).unwrap();
        assert_eq!(params["name"], "say_hi");
    }

    #[test]
    fn a_resource_goes_to_the_server_that_listed_it() {
        let text =
            r#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///a"}}"#;
        assert_eq!(
            route_of(text).unwrap(),
            Route {
                server: "files".into(),
                renamed: None
            }
        );
    }

    #[test]
    fn what_names_no_server_is_refused_with_the_name() {
        for (text, code, why) in [
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"xx__rm"}}"#,
                INVALID_PARAMS,
                "Unknown name or resource: 'xx__rm'",
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":7}}"#,
                INVALID_PARAMS,
                "Unknown name or resource: ''",
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":["fs__read_file"]}"#,
                INVALID_PARAMS,
                "Unknown name or resource: ''",
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"file:///b"}}"#,
                INVALID_PARAMS,
                "Unknown name or resource: 'file:///b'",
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"sampling/createMessage","params":{}}"#,
                METHOD_NOT_FOUND,
                "Method not found: sampling/createMessage",
            ),
        ] {
            assert_eq!(route_of(text), Err((code, why.to_string())), "{text}");
        }
    }

    #[test]
    fn listed_items_are_named_as_the_endpoint_lists_them() {
        let tools = listing("tools/list").unwrap();
        let answer =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"},{"name":"add"}]}}"#;
        let items = listed_items(&naming(), "everything", tools, answer).unwrap();
        let names: Vec<_> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["ev__echo", "ev__add"]);

        let resources = listing("resources/list").unwrap();
        let answer =
            r#"{"jsonrpc":"2.0","id":1,"result":{"resources":[{"name":"a","uri":"file:///a"}]}}"#;
        let items = listed_items(&naming(), "files", resources, answer).unwrap();
        assert_eq!(items[0]["name"], "a", "resources keep their names");

        let failed = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#;
        let why = listed_items(&naming(), "files", tools, failed).unwrap_err();
        assert!(why.contains("-32601"), "{why}");
    }
}
