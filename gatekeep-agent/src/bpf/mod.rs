//! Everything that touches the kernel programs and their maps.
//!
//! - [`programs`]: the embedded object, the list of programs and where each
//!   attaches, loading and attaching one;
//! - [`pinning`]: loading so the programs outlive the agent, or adopting
//!   the ones already pinned;
//! - [`kernel`]: the one task that owns the maps, and the handle everyone
//!   else uses to reach it;
//! - [`btf`]: kernel struct member offsets from the running kernel's BTF;
//! - [`events`]: records from the `EVENTS` ring buffer, and their reader;
//! - [`kernel_log`]: the programs' own diagnostics, drained into tracing.

pub mod btf;
pub mod events;
pub mod kernel;
pub mod kernel_log;
pub mod pinning;
pub mod programs;
#[cfg(test)]
pub(crate) mod testing;
