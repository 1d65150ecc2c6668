//! A person's approval of a held call: the approvals store (SQLite), the
//! rules that decide which calls are held and who may decide, the one
//! watcher that wakes held calls when they are decided, elicitation of the
//! client's user, single-use receipts for the 2026-07-28 revision, and the
//! notices sent when a call starts waiting.

pub mod elicit;
pub mod hold;
pub mod notify;
pub mod receipt;
pub mod store;
pub mod waiting;
