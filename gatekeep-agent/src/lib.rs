//! gatekeep host agent.
//!
//! The binary (`main.rs`) is a thin clap front end over these modules so the
//! in-VM integration tests can drive the same code.

pub mod admin;
pub mod audit;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod decide;
pub mod ebpf;
pub mod embedded;
pub mod enrich;
pub mod events;
pub mod grants;
pub mod kernel;
pub mod kernel_btf;
pub mod kernel_log;
pub mod paths;
pub mod pause;
pub mod pinning;
pub mod policy_maps;
pub mod preflight;
pub mod protect_files;
pub mod remote;
pub mod service;
#[cfg(test)]
mod testing;
