//! gatekeep host agent.
//!
//! The binary (`main.rs`) is a thin clap front end over these modules so the
//! in-VM integration tests can drive the same code. The modules are grouped
//! by concern (see `docs/architecture.md`):
//!
//! - [`bpf`]: the kernel programs and maps: loading, pinning, the task that
//!   owns the maps, the BTF reader, the ring buffer, the programs' own log;
//! - [`pause`]: the request state machine, resuming paused tasks and
//!   reconciling them with the kernel;
//! - [`decision`]: who decides (local, embedded or remote service) and the
//!   grants a decision leaves behind;
//! - [`hooks`]: one module per kernel hook (its requests, how policy
//!   compiles into its maps, how a reviewer reads it);
//! - [`policy`]: policy sets compiled into the kernel's maps;
//! - [`audit`]: the agent's local audit log;
//! - [`preflight`]: can this host run gatekeep, and if not, why;
//! - [`config`], [`paths`], [`daemon`] (the wiring of `run`) and [`admin`]
//!   (the other subcommands).

pub mod admin;
pub mod audit;
pub mod audit_health;
pub mod audit_ship;
pub mod bpf;
pub mod bursts;
pub mod config;
pub mod daemon;
pub mod decision;
pub mod deps;
// Host-name connect rules (issue 20, item 3).
pub mod dns;
pub mod hooks;
pub mod metrics;
pub mod paths;
pub mod pause;
pub mod policy;
pub mod preflight;
pub mod protect;
