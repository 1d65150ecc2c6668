//! The Model Context Protocol's wire: JSON-RPC 2.0 messages read strictly
//! (what Portcullis judges is what every peer reads) and classified, and
//! newline-delimited framing with its size cap.

pub mod framing;
pub mod jsonrpc;
pub mod strict_json;
