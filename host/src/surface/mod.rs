//! What a server offers and how far a caller may use it: the lock file of
//! pinned tool definitions and its drift, Portcullis' own listings of a
//! server's tools, input schemas compiled from listings, and rate limits.

pub mod drift;
pub mod listing;
pub mod lock;
pub mod ratelimit;
pub mod schema;
