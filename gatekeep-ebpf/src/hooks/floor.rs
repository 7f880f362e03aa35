//! The benchmark's floor, never loaded by the agent: LSM programs on the hooks the
//! benchmark's loops reach that do nothing but pass the previous verdict on. Attached
//! alone, they measure what the kernel's BPF LSM trampoline costs an exec, a connect and a
//! signal before any program body runs
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
