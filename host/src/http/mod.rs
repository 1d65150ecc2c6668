//! HTTP plumbing the gateway and the admin listener share: serving
//! connections safely ([`server`]), each peer and agent to its share of
//! them ([`seats`]), and building responses ([`response`]).
//! Nothing here knows MCP.

pub mod response;
pub mod seats;
pub mod server;

pub use response::{Body, Ending, event_stream, full, json_response, plain, sse_event};
pub use server::{BodyError, Guard, Peer, bind, read_body, runtime, serve};
