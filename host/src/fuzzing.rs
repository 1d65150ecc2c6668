//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer) and
//! for the test that replays their committed corpus: each takes arbitrary
//! bytes, drives one input path that a peer controls, and panics only where
//! a property that must hold does not — most of all, that a message judged
//! as one thing is read as the same thing by the peer it goes to.

use crate::config::Config;
use crate::gateway::naming::Naming;
use crate::gateway::routing::{self, Route};
use crate::protocol::framing::{Frame, FrameReader};
use crate::protocol::jsonrpc::{self, Message};
use crate::protocol::parsed::Parsed;
use crate::protocol::strict_json;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// One fuzz target: it takes the fuzzer's bytes.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: what `fuzz/fuzz_targets/NAME.rs` runs, and
/// where its corpus lives (`fuzz/corpus/NAME`).
pub const TARGETS: &[(&str, Target)] = &[
    ("framing", framing),
    ("jsonrpc", jsonrpc),
    ("tool_call", tool_call),
    ("config", config),
    ("jwt", jwt),
    ("sse", sse),
    ("oci", oci),
];

/// Newline framing with a small cap: frames never exceed it, and an
/// oversized frame keeps bounded ends whose id, if found, is usable.
pub fn framing(data: &[u8]) {
    for max in [16, 1024] {
        let mut frames = FrameReader::new(data, max);
        while let Ok(Some(frame)) = frames.read_frame() {
            match frame {
                Frame::Line(line) => assert!(line.len() <= max),
                Frame::Oversized { prefix, suffix, .. } => {
                    assert!(prefix.len() <= 1024 && suffix.len() <= 256);
                    for id in [jsonrpc::leading_id(&prefix), jsonrpc::trailing_id(&suffix)]
                        .into_iter()
                        .flatten()
                    {
                        assert!(strict_json::check(id.get()).is_ok(), "{}", id.get());
                    }
                }
            }
        }
    }
}

/// A message as the relay reads it: classifying, the tool call, the ids of
/// a partial message. Whatever passes the strict check must read the same
/// to a last-member-wins parser (JavaScript's, Python's): the method, the
/// id and a tool call's name and arguments.
pub fn jsonrpc(data: &[u8]) {
    let _ = jsonrpc::leading_id(data);
    let _ = jsonrpc::trailing_id(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    agrees_with_a_lenient_reader(text);
}

/// A `tools/call` whose params are the input: the tool Portcullis judges is
/// the tool the server runs, or the call is refused.
pub fn tool_call(data: &[u8]) {
    let Ok(params) = std::str::from_utf8(data) else {
        return;
    };
    let text = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#);
    agrees_with_a_lenient_reader(&text);
}

fn agrees_with_a_lenient_reader(text: &str) {
    let Ok(message) = Message::parse(text) else {
        return;
    };
    let _ = message.kind();
    // serde_json's Value keeps the last of repeated names, as JavaScript does.
    let lenient: Value = serde_json::from_str(text).expect("strictly readable text is JSON");
    assert_eq!(message.method.as_deref(), lenient["method"].as_str());
    if let Some(id) = message.id {
        let id: Value = serde_json::from_str(id.get()).expect("the id is JSON");
        assert_eq!(id, lenient["id"]);
    }
    match message.tool_call() {
        Some(Ok(call)) => {
            assert_eq!(Some(call.name.as_str()), lenient["params"]["name"].as_str());
            let arguments = call
                .arguments
                .map(|a| serde_json::from_str::<Value>(a.get()).expect("arguments are JSON"));
            let seen = &lenient["params"]["arguments"];
            assert_eq!(arguments.as_ref().unwrap_or(&Value::Null), seen);
        }
        Some(Err(_)) => assert_eq!(lenient["method"], "tools/call"),
        None => assert_ne!(lenient["method"], "tools/call"),
    }
    spliced_members_read_as_swapped(text, &lenient);
}

/// What serve swaps in place — the id, a merged tool name — reads as
/// swapped to a lenient reader, every other member as it was, and the
/// result is still strictly readable.
fn spliced_members_read_as_swapped(text: &str, lenient: &Value) {
    let parsed = Parsed::parse(text.to_string()).expect("strictly readable text parses");
    let reread = |text: &str| -> Value {
        assert!(Parsed::parse(text.to_string()).is_ok(), "{text}");
        serde_json::from_str(text).expect("a spliced message is JSON")
    };
    let id = RawValue::from_string(r#""swapped""#.into()).expect("a JSON string");
    let mut expected = lenient.clone();
    expected["id"] = json!("swapped");
    assert_eq!(reread(&parsed.with_id(&id)), expected);

    // The id and a request's progress token, swapped together as serve does
    // upstream: the token the server reports under is the one swapped in.
    let token = RawValue::from_string(r#""token-swapped""#.into()).expect("a JSON string");
    let swapped = reread(&parsed.with_id_and_token(Some(&id), Some(&token)));
    let with_id = Parsed::parse(parsed.with_id(&id)).expect("an id added to a message");
    if with_id.progress_token().is_some() {
        expected["params"]["_meta"]["progressToken"] = json!("token-swapped");
    }
    assert_eq!(swapped, expected);
    let reported = Parsed::parse(swapped.to_string()).expect("strictly readable");
    let reported = reported.progress_token().map(|t| t.get().to_string());
    let wanted = with_id.progress_token().map(|_| token.get().to_string());
    assert_eq!(reported, wanted);

    // A real prefix, and none at all (the name is written anew in place).
    for (prefix, separator) in [("fs", "__"), ("", "")] {
        let naming = Naming::new(
            [("fs".to_string(), prefix.to_string())].into(),
            separator.into(),
        );
        let servers = ["fs".to_string()];
        let Ok(Route {
            renamed: Some(renamed),
            ..
        }) = routing::route(&naming, &servers, |_| None, &parsed)
        else {
            continue;
        };
        let merged = lenient["params"]["name"].as_str().expect("a routed name");
        let own = merged
            .strip_prefix(&format!("{prefix}{separator}"))
            .expect("the prefix");
        let mut expected = lenient.clone();
        expected["params"]["name"] = json!(own);
        assert_eq!(reread(&renamed), expected);
    }
}

/// A config file: loading it fails with an error or succeeds, never panics.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/nonexistent/fuzz/portcullis.toml"));
}

/// What a registry sends and a config names: an `oci://` reference reads
/// back as itself once written, a manifest or signature manifest is read
/// or refused (within its bounds), never a panic.
pub fn oci(data: &[u8]) {
    use crate::config::OciReference;
    use crate::registry::{artifact, signature};
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(reference) = text.parse::<OciReference>()
    {
        let again: OciReference = reference
            .to_string()
            .parse()
            .expect("a reference reads back");
        assert_eq!(again, reference, "{text}");
    }
    if let Ok(contents) = artifact::Contents::read(data) {
        assert!(contents.fixtures.len() <= artifact::MAX_FIXTURES);
        assert!(contents.module.size as u64 <= artifact::MAX_MODULE_BYTES);
    }
    if let Ok(manifest) = artifact::read_manifest(data) {
        assert!(signature::stored(&manifest).len() <= signature::MAX_SIGNATURES);
    }
    let _ = artifact::Description::of(data);
}

/// The HS256 secret of the `jwt` target's config.
const JWT_SECRET: &str = "fuzzing-secret-of-thirty-two-bytes-or-more";

/// A bearer credential: the input as a token, and the input as the claims
/// of a token signed with the configured secret (so the claim checks and
/// the agent they name are reached too).
pub fn jwt(data: &[u8]) {
    let text = format!(
        "[jwt]\nissuer = \"https://issuer\"\naudience = \"portcullis\"\nhs256_secret = \"{JWT_SECRET}\"\n\
         [jwt.groups]\nops = [\"*\"]\n[agents.bot]\napi_key_sha256 = \"{}\"\n",
        "0".repeat(64)
    );
    let config = Config::parse(&text, Path::new("/nonexistent/portcullis.toml"))
        .expect("the jwt target's config loads");
    let jwt = config.jwt.as_ref().expect("[jwt] is configured");
    let verifier =
        crate::identity::jwt::Verifier::new(jwt, Path::new("/")).expect("the secret is good");
    let lossy = String::from_utf8_lossy(data);
    let authenticate = |token: &str| {
        let header = format!("Bearer {token}");
        let checked =
            crate::identity::authenticate(&config, Some(&verifier), Some(&header), 1_000_000);
        ready(checked)
    };
    let _ = authenticate(&lossy);
    let _ = crate::identity::jwt::KeySet::from_jwks(&lossy);
    let signed = signed_token(data);
    let _ = authenticate(&signed);
}

/// A token whose payload is `claims`, signed with [`JWT_SECRET`].
fn signed_token(claims: &[u8]) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims);
    let signed = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// An SSE stream from a remote server, split into chunks at every `\x00`
/// of the input: decoding never panics, and an event Portcullis writes is
/// read back as the text it carried (line endings made LF).
pub fn sse(data: &[u8]) {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .split(|b| *b == 0)
        .map(|chunk| Ok(bytes::Bytes::copy_from_slice(chunk)))
        .collect();
    let stream = sse_stream::SseStream::from_bytes_stream(futures_util::stream::iter(chunks));
    let mut stream = pin!(stream);
    let mut context = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(Ok(_))) =
        futures_util::Stream::poll_next(stream.as_mut(), &mut context)
    {}
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let encoded = crate::http::sse_event("message", text);
    let stream =
        sse_stream::SseStream::from_bytes_stream(futures_util::stream::iter([Ok::<
            _,
            std::io::Error,
        >(encoded)]));
    let mut stream = pin!(stream);
    let Poll::Ready(Some(Ok(event))) =
        futures_util::Stream::poll_next(stream.as_mut(), &mut context)
    else {
        panic!("an encoded event does not decode");
    };
    let expected = text.replace("\r\n", "\n").replace('\r', "\n");
    assert_eq!(event.data.as_deref(), Some(expected.as_str()));
}

/// The output of a future that needs nothing to wait for.
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future waited on nothing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the committed corpus (`fuzz/corpus/TARGET/`) passes
    /// its target: what the fuzzers found stays fixed.
    #[test]
    fn the_committed_corpus_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let replay = std::panic::catch_unwind(|| target(&data));
                assert!(replay.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len(), "the corpus is empty");
    }

    #[test]
    fn the_known_attacks_pass_their_targets() {
        jsonrpc(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
        );
        jsonrpc("\"b\":é1}".as_bytes());
        tool_call(br#"{"name":"read","arguments":{"p":1e400}}"#);
        tool_call(br#"{"name":"read","n\u0061me":"write"}"#);
        sse(b"{\r\n \"a\": 1\r\n}\x00event: x\ndata: y\n\n");
        jwt(br#"{"sub":"bot","iss":"https://issuer","aud":"portcullis","exp":2000000000}"#);
        framing("{\"id\":1e400,\"x\":\"é\u{0}\"}\n".as_bytes());
    }
}
