//! A server's tools as Portcullis lists them itself, page by page: the
//! `tools/list` request for each page, and every page's tools gathered into
//! one listing (`{"tools": [...]}`), bounded in pages and bytes against a
//! hostile server.
//! The transports send the requests and hand back the results.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;

/// The most pages of tools one listing reads.
const MOST_PAGES: usize = 64;
/// The most bytes of results one listing keeps.
const MOST_BYTES: usize = 16 << 20;

/// One listing in progress.
#[derive(Debug, Default)]
pub struct ToolPages {
    tools: Vec<Value>,
    /// The cursor of the next page, once one is read.
    cursor: Option<String>,
    pages: usize,
    /// Bytes of the results read so far.
    bytes: usize,
}

/// What a page read means.
#[derive(Debug)]
pub enum Paged {
    /// Another page is to be asked for.
    More,
    /// The listing is complete.
    Done(Arc<RawValue>),
}

impl ToolPages {
    /// The `tools/list` request for the next page, under `id` (JSON text).
    pub fn request(&self, id: &str) -> String {
        let params = match &self.cursor {
            Some(cursor) => json!({ "cursor": cursor }),
            None => json!({}),
        };
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list","params":{params}}}"#)
    }

    /// Takes the `result` of the latest page's request: more to ask for,
    /// or the whole listing. A cursor that does not move ends it (a server
    /// cannot keep it paging forever), and so does [`MOST_PAGES`].
    pub fn add(&mut self, result: &RawValue) -> Result<Paged> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            tools: Vec<Value>,
            next_cursor: Option<String>,
        }
        self.bytes += result.get().len();
        if self.bytes > MOST_BYTES {
            bail!("the server's tools take more than {} MiB", MOST_BYTES >> 20);
        }
        let page: Page = serde_json::from_str(result.get()).context("a tools/list result")?;
        self.pages += 1;
        self.tools.extend(page.tools);
        match page.next_cursor {
            Some(next) if Some(&next) != self.cursor.as_ref() => {
                if self.pages == MOST_PAGES {
                    bail!("the server's tools span more than {MOST_PAGES} pages");
                }
                self.cursor = Some(next);
                Ok(Paged::More)
            }
            _ => {
                let listing = json!({ "tools": std::mem::take(&mut self.tools) }).to_string();
                Ok(Paged::Done(Arc::from(RawValue::from_string(listing)?)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(value: Value) -> Box<RawValue> {
        RawValue::from_string(value.to_string()).unwrap()
    }

    #[test]
    fn pages_are_asked_for_by_cursor_and_gathered_into_one_listing() {
        let mut pages = ToolPages::default();
        let first: Value = serde_json::from_str(&pages.request("\"s-1\"")).unwrap();
        assert_eq!(first["params"], json!({}));
        let page = json!({"tools": [{"name": "a"}], "nextCursor": "2"});
        assert!(matches!(pages.add(&raw(page)).unwrap(), Paged::More));
        let second: Value = serde_json::from_str(&pages.request("7")).unwrap();
        assert_eq!(
            (second["id"].clone(), second["params"]["cursor"].clone()),
            (json!(7), json!("2"))
        );
        let Paged::Done(listing) = pages.add(&raw(json!({"tools": [{"name": "b"}]}))).unwrap()
        else {
            panic!("the last page ends it");
        };
        let listing: Value = serde_json::from_str(listing.get()).unwrap();
        assert_eq!(listing, json!({"tools": [{"name": "a"}, {"name": "b"}]}));
    }

    #[test]
    fn a_server_cannot_keep_it_paging() {
        let mut stuck = ToolPages::default();
        let same = json!({"tools": [], "nextCursor": "x"});
        assert!(matches!(
            stuck.add(&raw(same.clone())).unwrap(),
            Paged::More
        ));
        assert!(
            matches!(stuck.add(&raw(same)).unwrap(), Paged::Done(_)),
            "a cursor that does not move"
        );
        let mut endless = ToolPages::default();
        let outcome = (0..MOST_PAGES).try_for_each(|n| {
            endless
                .add(&raw(json!({"tools": [], "nextCursor": n.to_string()})))
                .map(|_| ())
        });
        assert!(outcome.unwrap_err().to_string().contains("pages"));
        assert!(ToolPages::default().add(&raw(json!({"tools": 3}))).is_err());
        let mut huge = ToolPages::default();
        let name = "x".repeat(1 << 20);
        let over = (0..17).try_for_each(|n| {
            let page = raw(json!({"tools": [{"name": name}], "nextCursor": n.to_string()}));
            huge.add(&page).map(|_| ())
        });
        assert!(over.unwrap_err().to_string().contains("MiB"));
    }
}
