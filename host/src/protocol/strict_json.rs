//! The one reading of a JSON text: Portcullis relays a message only if every
//! conforming peer reads it the way Portcullis judged it. JSON's grammar
//! leaves room for texts that parsers read differently — a member name given
//! twice (JavaScript and Python keep the last, a strict reader refuses),
//! a `\u` escape of half a surrogate pair (JavaScript keeps it, Rust cannot
//! hold it), a number beyond what a double holds (`1e400` is Infinity to
//! JavaScript, an error to Rust), or an integer a double does not hold
//! exactly (past 2^53: Rust and Python read `9007199254740993` exactly,
//! JavaScript reads `9007199254740992`, so a policy would judge one number
//! and a JavaScript server act on another). [`check`] walks a whole text
//! once and refuses all of these, so that the policies, the audit trail and the
//! server all see one message. It builds nothing: strings without escapes are
//! borrowed, and only the member names of one object at a time are kept.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

/// The smallest magnitude a 64-bit integer cannot hold (2^63).
const BEYOND_64_BITS: f64 = 9_223_372_036_854_775_808.0;

/// Every integer up to this magnitude (2^53) is a double exactly.
const EXACT_IN_A_DOUBLE: u64 = 1 << 53;

/// Objects with more members than this find duplicates with a hash set;
/// smaller ones by comparing names (faster, and what messages hold).
const SMALL_OBJECT: usize = 16;

/// Why a JSON text is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Whether the text is not JSON at all (a parse error) rather than JSON
    /// that peers could read differently.
    pub syntax: bool,
    /// What is wrong, and where.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refusal {}

/// Checks that `text` is one JSON value that every conforming parser reads
/// alike: no member name twice in an object (compared after unescaping), no
/// unpaired surrogate escape, no number out of a double's range, no
/// integer a double does not hold exactly, nesting within serde_json's
/// limit (128).
pub fn check(text: &str) -> Result<(), Refusal> {
    let path = RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let checked = Value { path: &path }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    checked.map_err(|e| {
        let reason = e.to_string();
        let syntax = !reason.starts_with(AMBIGUOUS);
        Refusal { syntax, reason }
    })
}

/// The start of the message of a refusal of JSON that parses, but that
/// peers read differently.
const AMBIGUOUS: &str = "ambiguous JSON:";

/// Where in the text the walk is: member names and array indices.
type Path<'de> = RefCell<Vec<Step<'de>>>;

enum Step<'de> {
    Member(Cow<'de, str>),
    Index(usize),
}

fn describe(path: &[Step], name: &str) -> String {
    let within = within(path);
    format!("{AMBIGUOUS} member '{name}' appears more than once in {within}")
}

fn within(path: &[Step]) -> String {
    let mut at = String::new();
    for step in path {
        match step {
            Step::Member(name) => {
                if !at.is_empty() {
                    at.push('.');
                }
                at.push_str(name);
            }
            Step::Index(i) => at.push_str(&format!("[{i}]")),
        }
    }
    if at.is_empty() {
        "the message".to_string()
    } else {
        format!("'{at}'")
    }
}

/// One value, checked.
struct Value<'p, 'de> {
    path: &'p Path<'de>,
}

impl Value<'_, '_> {
    /// Refuses an integer of `magnitude` (negative or not) that a double
    /// does not hold exactly.
    fn exact<E: de::Error>(&self, magnitude: u64, negative: bool) -> Result<(), E> {
        let double = magnitude as f64;
        if magnitude <= EXACT_IN_A_DOUBLE || double as u128 == u128::from(magnitude) {
            return Ok(());
        }
        let sign = if negative { "-" } else { "" };
        Err(E::custom(format!(
            "{AMBIGUOUS} the integer {sign}{magnitude} in {} is beyond what a double holds exactly (2^53): JavaScript peers read {sign}{double:.0} (send it as a string)",
            within(&self.path.borrow()),
        )))
    }
}

impl<'de> DeserializeSeed<'de> for Value<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.exact(v.unsigned_abs(), v < 0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.exact(v, false)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json refuses overflow itself; this keeps the rule explicit.
        if !v.is_finite() {
            return Err(E::custom("number out of range"));
        }
        // An integer too large for 64 bits reaches here rounded: a peer
        // that reads integers exactly (Python) would read another number.
        if v.fract() == 0.0 && v.abs() >= BEYOND_64_BITS {
            return Err(E::custom(
                "number out of range: an integer beyond 64 bits is read differently by different peers",
            ));
        }
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            self.path.borrow_mut().push(Step::Index(index));
            let next = seq.next_element_seed(Value { path: self.path });
            self.path.borrow_mut().pop();
            if next?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names: Vec<Cow<'de, str>> = Vec::new();
        let mut large: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(Name(name)) = map.next_key()? {
            let seen = match &mut large {
                Some(set) => !set.insert(name.clone()),
                None if names.contains(&name) => true,
                None => {
                    names.push(name.clone());
                    if names.len() > SMALL_OBJECT {
                        large = Some(names.drain(..).collect());
                    }
                    false
                }
            };
            if seen {
                let why = describe(&self.path.borrow(), &name);
                return Err(de::Error::custom(why));
            }
            self.path.borrow_mut().push(Step::Member(name));
            let value = map.next_value_seed(Value { path: self.path });
            self.path.borrow_mut().pop();
            value?;
        }
        Ok(())
    }
}

/// A member name, unescaped; borrowed from the text when it has no escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> Refusal {
        check(text).expect_err(text)
    }

    #[test]
    fn ordinary_messages_pass() {
        for text in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/a","n":[1,2.5e10,-0,null,true]}}}"#,
            r#"[{"a":1},{"a":2}]"#,
            r#""\ud83d\ude00 paired surrogates are one character""#,
            r#"{"a":{"x":1},"b":{"x":2}}"#,
            "1.5e-300",
            "9007199254740993.5",
            "9007199254740992",
            "-9007199254740992",
            "18446744073709549568",
            "-9223372036854775808",
            "0.1",
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn a_member_named_twice_is_refused_wherever_it_is() {
        let call = refused(
            r#"{"id":1,"method":"tools/call","params":{"name":"read_file","arguments":{},"name":"write_file"}}"#,
        );
        assert!(!call.syntax);
        assert!(
            call.reason
                .contains("'name' appears more than once in 'params'"),
            "{call}"
        );
        let top = refused(r#"{"id":1,"id":2}"#);
        assert!(top.reason.contains("in the message"), "{top}");
        let deep = refused(r#"{"params":{"arguments":{"list":[{"p":1,"p":2}]}}}"#);
        assert!(deep.reason.contains("'params.arguments.list[0]'"), "{deep}");
    }

    #[test]
    fn names_are_compared_as_peers_read_them() {
        let escaped = refused(r#"{"params":{"name":"a","n\u0061me":"b"}}"#);
        assert!(escaped.reason.contains("'name'"), "{escaped}");
        let mut many = String::from("{");
        for i in 0..100 {
            many.push_str(&format!(r#""k{i}":{i},"#));
        }
        many.push_str(r#""k7":0}"#);
        assert!(refused(&many).reason.contains("'k7'"));
    }

    #[test]
    fn what_one_parser_cannot_hold_is_refused() {
        for text in [
            r#"{"pad":1e400}"#,
            r#"{"pad":-1e400}"#,
            r#"{"s":"\ud800"}"#,
            r#"{"s":"\udc00x"}"#,
            r#"{"s":"\ud800\u0041"}"#,
            r#"{"n":12345678901234567890123}"#,
            r#"{"n":-9223372036854775809}"#,
            r#"{"n":1e19}"#,
        ] {
            assert!(refused(text).syntax, "{text}");
        }
    }

    #[test]
    fn an_integer_a_double_rounds_is_refused_where_it_is() {
        let call = refused(r#"{"params":{"arguments":{"account":9007199254740993}}}"#);
        assert!(!call.syntax, "valid JSON, read differently: {call}");
        assert!(
            call.reason
                .contains("9007199254740993 in 'params.arguments.account'")
                && call
                    .reason
                    .contains("JavaScript peers read 9007199254740992"),
            "{call}"
        );
        for text in [
            "18446744073709551615",
            "-9007199254740993",
            r#"[1,{"n":9223372036854775807}]"#,
        ] {
            assert!(!refused(text).syntax, "{text}");
        }
        assert!(
            refused("-9007199254740993")
                .reason
                .contains("read -9007199254740992")
        );
    }

    #[test]
    fn nesting_is_bounded_and_trailing_text_refused() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(refused(&deep).reason.contains("recursion limit"));
        assert!(refused(r#"{"a":1} {"b":2}"#).syntax);
        assert!(refused("").syntax);
    }
}
