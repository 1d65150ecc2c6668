//! One message as it was read, parsed once: its text together with the
//! [`Message`] view of it that routing, the chain and the audit record all
//! use. Serve carries this, not text, from the HTTP front through the relay
//! to the upstream, so no step parses the message again. Where Portcullis
//! changes a message's id or a name it reads from it, the text is spliced at
//! the member's own bytes, which the view locates.

use crate::protocol::jsonrpc::{self, Message, Unreadable};
use serde_json::value::RawValue;
use yoke::Yoke;

/// A message's text and its view, read with [`Message::parse`].
pub struct Parsed(Yoke<Message<'static>, String>);

/// Text that is not one message Portcullis reads as every peer does.
#[derive(Debug)]
pub struct NotParsed {
    /// The text, as it came.
    pub text: String,
    /// Why it cannot be read, and the error to answer with.
    pub why: Unreadable,
}

impl Parsed {
    /// Reads `text` as one message (not a batch).
    pub fn parse(text: String) -> Result<Self, NotParsed> {
        Yoke::try_attach_to_cart(text, |text: &str| {
            Message::parse(text).map_err(|why| NotParsed {
                text: text.to_owned(),
                why,
            })
        })
        .map(Self)
    }

    /// The view of the message.
    pub fn message(&self) -> &Message<'_> {
        self.0.get()
    }

    /// The text, as read.
    pub fn text(&self) -> &str {
        self.0.backing_cart()
    }

    /// The text, as read.
    pub fn into_text(self) -> String {
        self.0.into_backing_cart()
    }

    /// The text with its `id` replaced by `id` (JSON text): the id's own
    /// bytes are swapped, everything else is left as the sender wrote it.
    /// A message without an id gets one added.
    pub fn with_id(&self, id: &RawValue) -> String {
        match self.message().id {
            Some(current) => splice(self.text(), current.get(), id.get()),
            None => jsonrpc::replace_member(self.text(), "id", id.get())
                .expect("a parsed message is a JSON object"),
        }
    }

    /// The `progressToken` a request asks its progress to be reported
    /// under (`params._meta.progressToken`), or the one a progress
    /// notification reports under (`params.progressToken`): the token's own
    /// bytes in the text.
    pub fn progress_token(&self) -> Option<&RawValue> {
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(borrow, rename = "_meta")]
            meta: Option<Meta<'a>>,
            #[serde(borrow, rename = "progressToken")]
            token: Option<&'a RawValue>,
        }
        #[derive(serde::Deserialize)]
        struct Meta<'a> {
            #[serde(borrow, rename = "progressToken")]
            token: Option<&'a RawValue>,
        }
        let message = self.message();
        let params: Params = jsonrpc::from_object(message.params?)?;
        match message.id {
            Some(_) => params.meta?.token,
            None => params.token,
        }
    }

    /// The text with its `id` (if `id` is given) and its progress token (if
    /// `token` is given and it has one) replaced: only those members' bytes
    /// are swapped.
    pub fn with_id_and_token(&self, id: Option<&RawValue>, token: Option<&RawValue>) -> String {
        let mut parts = Vec::new();
        if let (Some(id), Some(current)) = (id, self.message().id) {
            parts.push((current.get(), id.get()));
        }
        if let (Some(token), Some(current)) = (token, self.progress_token()) {
            parts.push((current.get(), token.get()));
        }
        match (id, self.message().id) {
            (Some(id), None) => {
                let added = Parsed::parse(self.with_id(id)).expect("an id added to a message");
                added.with_id_and_token(None, token)
            }
            _ => splice_all(self.text(), parts),
        }
    }

    /// The view of the message as it reads under another `id`: the view of
    /// [`Parsed::with_id`]'s text, without parsing that text again.
    pub fn view_with_id<'b>(&'b self, id: &'b RawValue) -> Message<'b> {
        let mut view = self.message().clone();
        view.id = Some(id);
        view
    }
}

impl std::fmt::Display for NotParsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.why.fmt(f)
    }
}

impl std::error::Error for NotParsed {}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Parsed").field(&self.text()).finish()
    }
}

/// `text` with each part (a slice of `text` itself, none overlapping)
/// replaced by its own.
pub fn splice_all(text: &str, mut parts: Vec<(&str, &str)>) -> String {
    let offset = |part: &str| {
        (part.as_ptr() as usize)
            .checked_sub(text.as_ptr() as usize)
            .filter(|start| start + part.len() <= text.len())
            .expect("the part spliced is a slice of the text")
    };
    parts.sort_by_key(|(part, _)| offset(part));
    let mut spliced = String::with_capacity(text.len());
    let mut done = 0;
    for (part, with) in parts {
        let start = offset(part);
        assert!(start >= done, "the parts spliced do not overlap");
        spliced.push_str(&text[done..start]);
        spliced.push_str(with);
        done = start + part.len();
    }
    spliced.push_str(&text[done..]);
    spliced
}

/// `text` with `part` (a slice of `text` itself) replaced by `with`.
pub fn splice(text: &str, part: &str, with: &str) -> String {
    splice_all(text, vec![(part, with)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.into()).unwrap()
    }

    #[test]
    fn a_progress_token_is_found_and_swapped_where_it_is_written() {
        let request = r#"{"params":{"_meta":{"progressToken": "abc"},"name":"x"},"jsonrpc":"2.0","id":7,"method":"tools/call"}"#;
        let parsed = Parsed::parse(request.into()).unwrap();
        assert_eq!(parsed.progress_token().unwrap().get(), r#""abc""#);
        let swapped = parsed.with_id_and_token(Some(&raw("12")), Some(&raw("12")));
        assert_eq!(
            swapped,
            r#"{"params":{"_meta":{"progressToken": 12},"name":"x"},"jsonrpc":"2.0","id":12,"method":"tools/call"}"#
        );
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":12,"progress":1}}"#;
        let parsed = Parsed::parse(progress.into()).unwrap();
        assert_eq!(parsed.progress_token().unwrap().get(), "12");
        assert_eq!(
            parsed.with_id_and_token(None, Some(&raw(r#""abc""#))),
            progress.replace("12", r#""abc""#)
        );
        let plain = Parsed::parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into());
        assert!(plain.unwrap().progress_token().is_none());
    }

    #[test]
    fn the_view_and_the_text_are_one_read() {
        let text = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}"#;
        let parsed = Parsed::parse(text.into()).unwrap();
        assert_eq!(parsed.text(), text);
        assert_eq!(parsed.message().method.as_deref(), Some("tools/call"));
        assert_eq!(parsed.message().params.unwrap().get(), r#"{"name":"x"}"#);
        assert_eq!(parsed.into_text(), text);
    }

    #[test]
    fn unreadable_text_comes_back_with_why() {
        let text = r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#;
        let refused = Parsed::parse(text.into()).unwrap_err();
        assert_eq!(refused.text, text);
        assert_eq!(refused.why.code, jsonrpc::INVALID_REQUEST);
    }

    #[test]
    fn an_id_is_swapped_in_place_and_nothing_else_moves() {
        // Spacing, member order and a number serde would rewrite stay as sent.
        let text = r#"{ "result": {"n": 1.50, "id": 3}, "id" : 3 ,"jsonrpc":"2.0"}"#;
        let parsed = Parsed::parse(text.into()).unwrap();
        let swapped = parsed.with_id(&raw(r#""client-9""#));
        assert_eq!(
            swapped,
            r#"{ "result": {"n": 1.50, "id": 3}, "id" : "client-9" ,"jsonrpc":"2.0"}"#
        );
        let reread = Parsed::parse(swapped).unwrap();
        assert_eq!(reread.message().id.unwrap().get(), r#""client-9""#);
    }

    #[test]
    fn the_view_under_another_id_is_the_view_of_the_spliced_text() {
        let text =
            r#"{"jsonrpc":"2.0","id":12,"result":{"content":[{"type":"text","text":"hi"}]}}"#;
        let parsed = Parsed::parse(text.into()).unwrap();
        let id = raw(r#""abc""#);
        let view = parsed.view_with_id(&id);
        let reread = Parsed::parse(parsed.with_id(&id)).unwrap();
        let fresh = reread.message();
        assert_eq!(view.id.map(RawValue::get), fresh.id.map(RawValue::get));
        assert_eq!(
            view.result.map(RawValue::get),
            fresh.result.map(RawValue::get)
        );
        assert_eq!(view.kind(), fresh.kind());
    }

    #[test]
    fn a_message_without_an_id_gets_one() {
        let parsed = Parsed::parse(r#"{"jsonrpc":"2.0","method":"ping"}"#.into()).unwrap();
        let with = Parsed::parse(parsed.with_id(&raw("4"))).unwrap();
        assert_eq!(with.message().id.unwrap().get(), "4");
    }

    #[test]
    #[should_panic(expected = "a slice of the text")]
    fn splicing_a_foreign_slice_is_a_bug() {
        splice("abc", "other", "x");
    }
}
