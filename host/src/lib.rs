//! Portcullis: a WebAssembly policy host for the Model Context Protocol.
//!
//! Every JSON-RPC message between an MCP client and server becomes an
//! [`exchange`](session::Session) view, is judged by the [`guard`] chain of
//! sandboxed policy components run by the [`engine`], and leaves one record in
//! the [`audit`] trail. [`relay`] ties those together independently of the
//! transport; [`stdio`] is the first transport.

pub mod admin;
pub mod approvals;
pub mod approve;
pub mod audit;
pub mod awaiting;
pub mod bench;
pub mod bindings;
pub mod boundary;
pub mod check;
pub mod config;
pub mod drift;
pub mod elicit;
pub mod engine;
pub mod fixtures;
pub mod framing;
pub mod fuzzing;
pub mod gateway;
pub mod guard;
pub mod hold;
pub mod http;
pub mod identity;
pub mod jsonrpc;
pub mod jwt;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod pin;
pub mod policy;
pub mod ratelimit;
pub mod receipt;
pub mod relay;
pub mod reload;
pub mod scaffold;
pub mod schema;
pub mod session;
pub mod sessions;
pub mod stateless;
pub mod status;
pub mod stdio;
pub mod store;
pub mod strict_json;
pub mod trail;
pub mod upstream;
