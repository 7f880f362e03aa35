//! The benchmark's floor, never loaded by the agent: LSM programs on the hooks the
//! benchmark's loops reach that do nothing but pass the previous verdict on. Attached
//! alone, they measure what the kernel's BPF LSM trampoline costs an exec, a connect, a
//! signal, a fork and an open or read before any program body runs
//! (`cargo xtask bench`, setup `floor`).

use aya_ebpf::{macros::lsm, programs::LsmContext};

/// `LSM_HOOK(int, 0, bprm_check_security, struct linux_binprm *bprm)`: the previous
/// verdict is argument 1.
#[lsm(hook = "bprm_check_security")]
pub fn floor_bprm_check_security(ctx: LsmContext) -> i32 {
    ctx.arg(1)
}

/// `LSM_HOOK(int, 0, socket_connect, struct socket *sock, struct sockaddr *address,
/// int addrlen)`: the previous verdict is argument 3.
#[lsm(hook = "socket_connect")]
pub fn floor_socket_connect(ctx: LsmContext) -> i32 {
    ctx.arg(3)
}

/// `LSM_HOOK(int, 0, task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
/// const struct cred *cred)`: the previous verdict is argument 4.
#[lsm(hook = "task_kill")]
pub fn floor_task_kill(ctx: LsmContext) -> i32 {
    ctx.arg(4)
}

/// `LSM_HOOK(int, 0, task_alloc, struct task_struct *task, unsigned long clone_flags)`:
/// the previous verdict is argument 2.
#[lsm(hook = "task_alloc")]
pub fn floor_task_alloc(ctx: LsmContext) -> i32 {
    ctx.arg(2)
}

/// `LSM_HOOK(int, 0, file_open, struct file *file)`: the previous verdict is argument 1.
#[lsm(hook = "file_open")]
pub fn floor_file_open(ctx: LsmContext) -> i32 {
    ctx.arg(1)
}

/// `LSM_HOOK(int, 0, file_permission, struct file *file, int mask)`: the previous verdict
/// is argument 2.
#[lsm(hook = "file_permission")]
pub fn floor_file_permission(ctx: LsmContext) -> i32 {
    ctx.arg(2)
}

/// `LSM_HOOK(int, 0, socket_sendmsg, struct socket *sock, struct msghdr *msg, int size)`:
/// the previous verdict is argument 3.
#[lsm(hook = "socket_sendmsg")]
pub fn floor_socket_sendmsg(ctx: LsmContext) -> i32 {
    ctx.arg(3)
}

/// `LSM_HOOK(int, 0, mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
/// unsigned long flags)`: the previous verdict is argument 4.
#[lsm(hook = "mmap_file")]
pub fn floor_mmap_file(ctx: LsmContext) -> i32 {
    ctx.arg(4)
}
