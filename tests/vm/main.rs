//! In-VM integration tests: run by `cargo xtask vm-test` inside a VM with a
//! real kernel (BPF LSM enabled), one at a time (`--test-threads=1`: they
//! share kernel state).

mod argv_race;
mod audit;
mod audit_full;
mod audit_mode;
mod cgroup_escape;
mod commands;
mod connect;
mod content;
mod e2e;
mod egress;
mod escape;
mod exec;
mod execenv;
mod faults;
mod grants;
mod host_audit;
mod hosts;
mod mapped;
mod mass_pause;
mod metrics;
mod pause;
mod pending;
mod policy_cases;
mod preflight;
mod protect_files;
mod restart;
mod self_protect;
mod smoke;
mod truncated;
mod truth;
mod workload;
