//! Merged names on serve's aggregated endpoint (`/mcp`): each server's tools
//! and prompts are listed as its prefix, the separator and their own name,
//! and a merged name a client calls is split back into the server and the
//! name that server knows. The config refuses prefixes that would make a
//! merged name belong to two servers.

use std::collections::BTreeMap;

/// Each server's prefix, and the separator.
pub struct Naming {
    prefixes: BTreeMap<String, String>,
    separator: String,
}

impl Naming {
    /// Names with `prefixes` (server → prefix) joined by `separator`.
    pub fn new(prefixes: BTreeMap<String, String>, separator: String) -> Self {
        Self {
            prefixes,
            separator,
        }
    }

    /// The separator.
    pub fn separator(&self) -> &str {
        &self.separator
    }

    /// What `server`'s `name` is called on the aggregated endpoint.
    pub fn merged(&self, server: &str, name: &str) -> String {
        format!("{}{}{name}", self.prefix(server), self.separator)
    }

    /// The server (one of `servers`, those the session reaches) and its own
    /// name behind `merged`; `None` if it names none of them.
    pub fn split<'s>(
        &self,
        servers: impl IntoIterator<Item = &'s String>,
        merged: &str,
    ) -> Option<(String, String)> {
        servers.into_iter().find_map(|server| {
            let rest = merged.strip_prefix(self.prefix(server))?;
            let name = rest.strip_prefix(self.separator.as_str())?;
            Some((server.clone(), name.to_string()))
        })
    }

    fn prefix<'a>(&'a self, server: &'a str) -> &'a str {
        self.prefixes.get(server).map_or(server, String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> Naming {
        let prefixes =
            [("files", "files"), ("everything", "ev")].map(|(s, p)| (s.to_string(), p.to_string()));
        Naming::new(prefixes.into_iter().collect(), "__".into())
    }

    fn servers(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_merged_name_splits_back_into_its_server_and_name() {
        let naming = naming();
        let all = servers(&["everything", "files"]);
        for (server, name) in [
            ("files", "read_file"),
            ("everything", "echo"),
            ("files", "a__b"),
        ] {
            let merged = naming.merged(server, name);
            assert_eq!(
                naming.split(&all, &merged),
                Some((server.to_string(), name.to_string())),
                "{merged}"
            );
        }
        assert_eq!(naming.merged("everything", "echo"), "ev__echo");
    }

    #[test]
    fn a_name_of_a_server_the_session_does_not_reach_names_nothing() {
        let naming = naming();
        let files_only = servers(&["files"]);
        assert_eq!(naming.split(&files_only, "ev__echo"), None);
        assert_eq!(naming.split(&files_only, "read_file"), None, "no prefix");
        assert_eq!(
            naming.split(&files_only, "filesread_file"),
            None,
            "no separator"
        );
        assert_eq!(
            naming.split(&files_only, "everything__echo"),
            None,
            "the prefix, not the name"
        );
    }
}
