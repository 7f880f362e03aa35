//! One module per LSM hook.

pub mod exec;
