//! One module per hook: its program(s), and the maps only it uses.

pub mod cgroup;
pub mod cgroup_escape;
pub mod connect;
// Host-name connect rules (issue 20, item 3): DNS answers observed.
pub mod dns;
pub mod exec;
pub mod exit;
pub mod floor;
// Code that runs without an exec (issue 19, item 2).
pub mod mmap;
// Egress beyond connect (issue 19, item 6).
pub mod sendmsg;
pub mod socket_create;
// Self-protection (issue 18).
pub mod bpf;
pub mod file_open;
pub mod kernel;
pub mod mount;
pub mod protect;
pub mod protect_files;
pub mod ptrace;
pub mod signal;

use aya_ebpf::helpers::bpf_get_current_cgroup_id;

use crate::maps::may_be_gated;

/// The part of the gating hooks that every exec, connect, send... on the
/// host runs: an earlier program's refusal (`previous`) stands, and a task
/// whose cgroup cannot be gated gets 0 at once (`Err`, the verdict); any
/// other gets its cgroup id (`Ok`) for the hook's gated path. The hooks keep
/// that path in a function of their own, so that this part stays a few
/// instructions on one page of code (under emulation, every page an op
/// touches costs it).
#[inline(always)]
pub fn gating_candidate(previous: i32) -> Result<u64, i32> {
    if previous != 0 {
        return Err(previous);
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if may_be_gated(cgroup_id) {
        Ok(cgroup_id)
    } else {
        Err(0)
    }
}
