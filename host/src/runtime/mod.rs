//! The running process: reloading the config and policies without a restart
//! (watching files, building the next generation off the message path,
//! swapping it in), and the status report `portcullis status` reads.

pub mod reload;
pub mod status;
