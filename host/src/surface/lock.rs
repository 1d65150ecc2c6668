//! The lock file: each pinned server's tools, prompts and resource templates
//! as they were when an operator ran `portcullis pin` — the parts a model
//! reads or a call depends on (descriptions, schemas, annotations). It is
//! JSON with sorted keys, one field per line, so it diffs well in review.
//! [`Pins`] is the loaded lock with the pinned input schemas compiled.

use crate::surface::schema::Schema;
use crate::util::encode::hex;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// The lock file format's version.
const FORMAT: u32 = 1;

/// The whole lock file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// The format version (1).
    pub portcullis_lock: u32,
    /// Pinned servers by configured name.
    pub servers: BTreeMap<String, Pinned>,
}

/// What one server offered when it was pinned, by name (resource templates
/// by URI template).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    /// Tools.
    #[serde(default)]
    pub tools: BTreeMap<String, Value>,
    /// Prompts.
    #[serde(default)]
    pub prompts: BTreeMap<String, Value>,
    /// Resource templates.
    #[serde(default)]
    pub resource_templates: BTreeMap<String, Value>,
}

/// A list a server offers, and the parts of its items that are pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `tools/list`.
    Tools,
    /// `prompts/list`.
    Prompts,
    /// `resources/templates/list`.
    ResourceTemplates,
}

impl Listing {
    /// Every list, in lock-file order.
    pub const ALL: [Listing; 3] = [Listing::Tools, Listing::Prompts, Listing::ResourceTemplates];

    /// The request that lists it.
    pub fn method(self) -> &'static str {
        match self {
            Listing::Tools => "tools/list",
            Listing::Prompts => "prompts/list",
            Listing::ResourceTemplates => "resources/templates/list",
        }
    }

    /// The member of the result holding the items.
    pub fn member(self) -> &'static str {
        match self {
            Listing::Tools => "tools",
            Listing::Prompts => "prompts",
            Listing::ResourceTemplates => "resourceTemplates",
        }
    }

    /// The server capability that offers it.
    pub fn capability(self) -> &'static str {
        match self {
            Listing::Tools => "tools",
            Listing::Prompts => "prompts",
            Listing::ResourceTemplates => "resources",
        }
    }

    /// The field naming an item.
    fn key(self) -> &'static str {
        match self {
            Listing::Tools | Listing::Prompts => "name",
            Listing::ResourceTemplates => "uriTemplate",
        }
    }

    /// The fields of an item that are pinned.
    fn pinned_fields(self) -> &'static [&'static str] {
        match self {
            Listing::Tools => &[
                "title",
                "description",
                "inputSchema",
                "outputSchema",
                "annotations",
            ],
            Listing::Prompts => &["title", "description", "arguments"],
            Listing::ResourceTemplates => &["name", "title", "description", "mimeType"],
        }
    }

    /// An item's name and its pinned fields; `None` for an item without a
    /// name.
    pub fn definition(self, item: &Value) -> Option<(String, Value)> {
        let name = item.get(self.key())?.as_str()?.to_string();
        let fields: Map<String, Value> = self
            .pinned_fields()
            .iter()
            .filter_map(|field| Some((field.to_string(), item.get(*field)?.clone())))
            .collect();
        Some((name, Value::Object(fields)))
    }

    /// The items of a list result by name, with their pinned fields.
    pub fn definitions(self, items: &[Value]) -> BTreeMap<String, Value> {
        items.iter().filter_map(|i| self.definition(i)).collect()
    }
}

impl Pinned {
    /// The pinned items of `listing`.
    pub fn items(&self, listing: Listing) -> &BTreeMap<String, Value> {
        match listing {
            Listing::Tools => &self.tools,
            Listing::Prompts => &self.prompts,
            Listing::ResourceTemplates => &self.resource_templates,
        }
    }

    /// The pinned items of `listing`, to change.
    pub fn items_mut(&mut self, listing: Listing) -> &mut BTreeMap<String, Value> {
        match listing {
            Listing::Tools => &mut self.tools,
            Listing::Prompts => &mut self.prompts,
            Listing::ResourceTemplates => &mut self.resource_templates,
        }
    }
}

impl Lock {
    /// An empty lock.
    pub fn new() -> Self {
        Self {
            portcullis_lock: FORMAT,
            servers: BTreeMap::new(),
        }
    }

    /// Reads the lock file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the lock file {} (write it with `portcullis pin`)",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("lock file {}", path.display()))
    }

    /// Parses lock file text.
    pub fn parse(text: &str) -> Result<Self> {
        let lock: Lock = serde_json::from_str(text)?;
        if lock.portcullis_lock != FORMAT {
            bail!(
                "format {} is not supported (this Portcullis reads format {FORMAT})",
                lock.portcullis_lock
            );
        }
        Ok(lock)
    }

    /// The lock as written to disk: pretty JSON, keys sorted, final newline.
    pub fn to_text(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a lock is always JSON");
        text.push('\n');
        text
    }

    /// Writes the lock to `path`, atomically (a reader sees the old lock or
    /// the new one, never half of one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, self.to_text())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The lock in force: what each server's tools must look like, with the
/// pinned input schemas compiled for argument validation.
pub struct Pins {
    /// The lock.
    pub lock: Lock,
    /// sha256 of the lock file: drift decisions (a quarantine) hold until it
    /// changes.
    pub digest: String,
    schemas: HashMap<(String, String), Arc<Schema>>,
}

impl Pins {
    /// Loads the lock at `path`; a pinned schema that does not compile is
    /// logged and not used (the server's own checks still apply).
    pub fn load(path: &Path) -> Result<Self> {
        let lock = Lock::load(path)?;
        let digest = hex(&Sha256::digest(lock.to_text().as_bytes()));
        let mut schemas = HashMap::new();
        for (server, pinned) in &lock.servers {
            for (tool, definition) in &pinned.tools {
                let Some(schema) = definition.get("inputSchema") else {
                    continue;
                };
                match Schema::compile(schema) {
                    Ok(schema) => {
                        schemas.insert((server.clone(), tool.clone()), Arc::new(schema));
                    }
                    Err(e) => tracing::warn!(
                        server,
                        tool,
                        "the pinned input schema is not valid JSON Schema, so arguments are not checked against it: {e}"
                    ),
                }
            }
        }
        Ok(Self {
            lock,
            digest,
            schemas,
        })
    }

    /// What `server` offered when pinned, if it was.
    pub fn server(&self, server: &str) -> Option<&Pinned> {
        self.lock.servers.get(server)
    }

    /// The pinned input schema of `tool` on `server`.
    pub fn schema(&self, server: &str, tool: &str) -> Option<&Arc<Schema>> {
        self.schemas.get(&(server.to_string(), tool.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_keep_what_is_pinned_and_drop_the_rest() {
        let items = [
            json!({"name": "read", "description": "Reads", "inputSchema": {"type": "object"},
                   "annotations": {"readOnlyHint": true}, "_meta": {"volatile": 1}, "icons": []}),
            json!({"description": "no name"}),
        ];
        let defs = Listing::Tools.definitions(&items);
        assert_eq!(defs.len(), 1);
        assert_eq!(
            defs["read"],
            json!({"description": "Reads", "inputSchema": {"type": "object"},
                   "annotations": {"readOnlyHint": true}})
        );
        let template =
            json!({"uriTemplate": "file:///{path}", "name": "file", "mimeType": "text/plain"});
        let (key, _) = Listing::ResourceTemplates.definition(&template).unwrap();
        assert_eq!(key, "file:///{path}");
    }

    #[test]
    fn the_file_round_trips_with_sorted_keys() {
        let mut lock = Lock::new();
        let mut pinned = Pinned::default();
        pinned.tools.insert(
            "b".into(),
            json!({"inputSchema": {"type": "object"}, "description": "B"}),
        );
        pinned.tools.insert("a".into(), json!({"description": "A"}));
        lock.servers.insert("fs".into(), pinned);
        let text = lock.to_text();
        assert!(text.find("\"a\"").unwrap() < text.find("\"b\"").unwrap());
        assert!(
            text.find("\"description\": \"B\"").unwrap() < text.find("\"inputSchema\"").unwrap()
        );
        assert_eq!(Lock::parse(&text).unwrap(), lock);
        let future = text.replace("\"portcullis_lock\": 1", "\"portcullis_lock\": 9");
        let err = Lock::parse(&future).unwrap_err().to_string();
        assert!(err.contains("format 9 is not supported"), "{err}");
    }
}
