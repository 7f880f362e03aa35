//! Loading code into the kernel (protection `KERNEL`): modules, module
//! auto-loading, kexec, IMA policies and keys. Firmware loads are left
//! alone: a driver may load firmware in any task's context.
//!
//! Kernel (v6.12): `init_module` and `kexec_load` call
//! `security_kernel_load_data()` (kernel/module/main.c, kernel/kexec.c)
//! before reading the image; `finit_module` and `kexec_file_load` call
//! `security_kernel_read_file()` (fs/kernel_read_file.c) before reading the
//! file; `request_module()` calls `security_kernel_module_request()`
//! (kernel/module/kmod.c) in the requesting task's context (a socket of an
//! unloaded family, a missing filesystem type, ...).

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::protect;

use crate::hooks::{gating_candidate, protect::refuse};

/// `READING_FIRMWARE` and `LOADING_FIRMWARE`: value 1 of both
/// `enum kernel_read_file_id` and `enum kernel_load_data_id`
/// (include/linux/kernel_read_file.h: UNKNOWN, FIRMWARE, MODULE,
/// KEXEC_IMAGE, KEXEC_INITRAMFS, POLICY, X509_CERTIFICATE).
const FIRMWARE: u32 = 1;

/// `init_module`, `kexec_load`, loading an IMA policy or key from memory:
/// `-EPERM` for gated tasks unless their policy relaxes `kernel`.
#[lsm(hook = "kernel_load_data")]
pub fn kernel_load_data(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, kernel_load_data, enum kernel_load_data_id id,
    //          bool contents)
    let cgroup_id = match gating_candidate(ctx.arg(2)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    let id: u32 = ctx.arg(0);
    gated_kernel_load(cgroup_id, id)
}

/// `finit_module`, `kexec_file_load`, reading an IMA policy or key from a
/// file: `-EPERM` for gated tasks unless their policy relaxes `kernel`.
#[lsm(hook = "kernel_read_file")]
pub fn kernel_read_file(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, kernel_read_file, struct file *file,
    //          enum kernel_read_file_id id, bool contents)
    let cgroup_id = match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    let id: u32 = ctx.arg(1);
    gated_kernel_load(cgroup_id, id)
}

/// A module auto-load a gated task triggers: refused (the caller sees the
/// module as unavailable) unless its policy relaxes `kernel`.
#[lsm(hook = "kernel_module_request")]
pub fn kernel_module_request(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, kernel_module_request, char *kmod_name)
    let cgroup_id = match gating_candidate(ctx.arg(1)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_kernel_load(cgroup_id, 0)
}

#[inline(never)]
fn gated_kernel_load(cgroup_id: u64, id: u32) -> i32 {
    if id == FIRMWARE {
        0
    } else {
        refuse(cgroup_id, protect::KERNEL)
    }
}
