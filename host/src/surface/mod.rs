//! What a server offers and how far a caller may use it: the lock file of
//! pinned tool definitions and its drift, input schemas compiled from
//! listings, and rate limits.

pub mod drift;
pub mod lock;
pub mod ratelimit;
pub mod schema;
