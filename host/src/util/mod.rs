//! Small pieces every layer may use, with no knowledge of MCP or policies:
//! the clock, hex encoding, timing statistics, the outbound HTTP(S) client
//! and the process' metrics registry.

pub mod clock;
pub mod encode;
pub mod metrics;
pub mod outbound;
pub mod stats;
