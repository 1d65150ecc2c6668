//! The Model Context Protocol's wire: JSON-RPC 2.0 messages read strictly
//! (what Portcullis judges is what every peer reads) and classified, and
//! newline-delimited framing with its size cap, and a message carried with
//! the view of it parsed once.

pub mod framing;
pub mod jsonrpc;
pub mod parsed;
pub mod strict_json;
