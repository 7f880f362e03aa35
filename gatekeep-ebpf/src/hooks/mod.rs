//! One module per hook.

pub mod argv;
pub mod connect;
pub mod exec;
pub mod exit;
