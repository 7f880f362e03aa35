//! gatekeep host agent.
//!
//! The binary (`main.rs`) is a thin clap front end over these modules so the
//! in-VM integration tests can drive the same code.

pub mod ebpf;
pub mod preflight;
pub mod kernel_btf;
