//! Portcullis: a WebAssembly policy host for the Model Context Protocol.
//!
//! Every JSON-RPC message between an MCP client and server is read once,
//! strictly ([`protocol`]), becomes an [`Exchange`](contract::Exchange) view,
//! passes the checks of the [`surface`] (pinning, schemas, rate limits) and
//! the chain of sandboxed policy components ([`policy`], pulled from OCI
//! registries and checked against their signatures by [`registry`] when
//! named `oci://`), may wait for a
//! person ([`approval`]), and leaves one record in the [`audit`] trail. The
//! [`relay`] ties those together independently of the transport; the
//! [`upstream`] module reaches the servers; the fronts are `portcullis stdio`
//! ([`cli::stdio`]) and the HTTP [`gateway`] of `portcullis serve`, with the
//! [`admin`] listener beside it; [`runtime`] reloads and reports.
//!
//! The modules are layered, each using only those listed before it
//! (`scripts/check-layers` enforces it; ARCHITECTURE.md draws it):
//! util, config → contract → protocol → policy, registry → identity, surface,
//! approval → audit → relay → upstream → runtime → http → gateway, admin →
//! cli, fuzzing.

pub mod admin;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod config;
pub mod contract;
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod policy;
pub mod protocol;
pub mod registry;
pub mod relay;
pub mod runtime;
pub mod state;
pub mod surface;
pub mod upstream;
pub mod util;
