//! One module per hook.

pub mod argv;
pub mod cgroup;
pub mod connect;
pub mod exec;
pub mod exit;
pub mod floor;
