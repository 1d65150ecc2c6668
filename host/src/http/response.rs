//! Building responses: whole bodies, JSON and plain text, and server-sent
//! event streams (encoded with the `sse-stream` crate) kept open by
//! keep-alive comments.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use sse_stream::Sse;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::mpsc;

/// The drain's signal, as a stream waits on it (behind a lock only so that
/// the body is `Sync`; the stream alone polls it).
type Drained = std::sync::Mutex<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>;

/// How often an idle event stream gets a comment line.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Every response body.
pub type Body = BoxBody<Bytes, Infallible>;

/// How an event stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// When its events end (a call's answer): a draining process lets it
    /// finish.
    WithEvents,
    /// When its events end, or when the process starts draining (a
    /// session's standing stream: its client reconnects elsewhere).
    WithEventsOrDrain,
    /// Only when the client goes away (notices nobody sends).
    Never,
}

/// A `text/event-stream` response of `events` (JSON texts), each an SSE
/// event named `name`, ending as `ending` says. `kept` lives as long as the
/// stream.
pub fn event_stream(
    name: &'static str,
    events: mpsc::Receiver<String>,
    kept: Option<Box<dyn Send + Sync>>,
    ending: Ending,
) -> Response<Body> {
    let drained = (ending == Ending::WithEventsOrDrain).then(|| {
        let future: Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(super::server::drained());
        std::sync::Mutex::new(future)
    });
    let stream = EventStream {
        name,
        notices: Some(events),
        ends: ending != Ending::Never,
        drained,
        _kept: kept,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE),
    };
    let mut response = Response::new(stream.boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// An SSE stream of notices; a comment line every [`KEEPALIVE`] keeps it
/// open through proxies, and finds out when the client has gone.
struct EventStream {
    name: &'static str,
    ends: bool,
    /// Completes when the process starts draining, for a stream that ends
    /// then.
    drained: Option<Drained>,
    _kept: Option<Box<dyn Send + Sync>>,
    notices: Option<mpsc::Receiver<String>>,
    keepalive: tokio::time::Interval,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(drained) = &mut this.drained {
            let drained = drained
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if drained.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if let Some(notices) = &mut this.notices {
            match notices.poll_recv(cx) {
                Poll::Ready(Some(notice)) => {
                    let event = sse_event(this.name, &notice);
                    return Poll::Ready(Some(Ok(Frame::data(event))));
                }
                Poll::Ready(None) if this.ends => return Poll::Ready(None),
                // No server sends notices: keep the stream, without them.
                Poll::Ready(None) => this.notices = None,
                Poll::Pending => {}
            }
        }
        match this.keepalive.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keepalive\n\n",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One JSON text as an SSE event named `name`. Each of its lines (a
/// pretty-printed JSON text has several) goes on a `data:` line of its own,
/// which the client joins back: the same JSON.
pub fn sse_event(name: &'static str, message: &str) -> Bytes {
    Sse::default()
        .event(name)
        .data(message)
        .encode()
        .unwrap_or_else(|e| {
            // Only an event name with a line break fails, and names are
            // constants.
            tracing::error!("cannot encode an SSE event: {e}");
            Bytes::new()
        })
}

/// A whole body.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

/// A JSON body with `status`.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A plain-text body with `status`.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_pretty_printed_answer_is_one_event_the_client_reads_back_whole() {
        let answer = "{\n  \"jsonrpc\": \"2.0\",\r\n  \"id\": 1,\r  \"result\": {}\n}";
        let event = sse_event("message", answer);
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.ends_with("\n\n") && !text.contains('\r'), "{text:?}");
        assert_eq!(text.matches("\n\n").count(), 1, "one event: {text:?}");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .collect();
        let read: Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(read, json!({"jsonrpc": "2.0", "id": 1, "result": {}}));
    }
}
