//! Datagrams sent to an address (`sendto`, `sendmsg`, `sendmmsg` with a
//! destination on an unconnected socket: UDP, ICMP "ping" sockets, raw
//! sockets) and TCP Fast Open (`sendto` with `MSG_FASTOPEN`, which connects
//! inside the send) at `security_socket_sendmsg`. They get the connect
//! decision for their destination ([`connect::decide`]); a message without
//! a destination goes to the peer its socket's connect was decided for.
//!
//! Kernel: `security_socket_sendmsg()` is called from `__sock_sendmsg()`
//! (net/socket.c, v6.12) before the protocol's `sendmsg`, after
//! `__sys_sendto`/`____sys_sendmsg` copied the destination into kernel
//! memory (`move_addr_to_kernel`), so it is read once, where the protocol
//! reads it. `-ERESTARTNOINTR` restarts the send; `sendmmsg` skips the hook
//! for a message to the address the previous message went to (that one was
//! decided already).

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::lsm, programs::LsmContext};
use gatekeep_common::{EPERM, GATED_UNCLASSIFIED, connect_op, request_kind};

use crate::{
    events::Caller,
    hooks::{
        connect::{self, AF_INET, AF_INET6, AF_PACKET, AF_UNSPEC, Target, socket_family},
        gating_candidate,
    },
    maps::{gated_entry, offsets},
    pause::await_classification,
};

/// Runs for every send on the host.
///
/// Tasks outside gated cgroups return after an array lookup (rarely, a hash
/// lookup too). For gated tasks, a message without a destination returns at
/// once; one with a destination gets the connect decision for it (allow,
/// deny with `-EPERM` and a `CONNECT_DENIED` event, or ask: the thread
/// pauses until a verdict for this exact destination arrives). Packet
/// sockets were decided when they were created (`raw_sockets`), and their
/// link-layer addresses match no connect rule: not gated here.
#[lsm(hook = "socket_sendmsg")]
pub fn socket_sendmsg(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_sendmsg, struct socket *sock,
    //          struct msghdr *msg, int size): the verdict of earlier BPF LSM
    // programs on this hook is the last argument.
    let cgroup_id = match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    let msg: *const u8 = ctx.arg(1);
    let off = offsets();
    // SAFETY: probe reads of the kernel's `struct msghdr`.
    let Ok(name) = (unsafe {
        bpf_probe_read_kernel::<*const u8>(msg.add(off.msghdr_msg_name as usize).cast())
    }) else {
        return EPERM;
    };
    if name.is_null() {
        return 0;
    }
    // SAFETY: as above.
    let Ok(namelen) =
        (unsafe { bpf_probe_read_kernel::<i32>(msg.add(off.msghdr_msg_namelen as usize).cast()) })
    else {
        return EPERM;
    };
    // Not even a family: every protocol refuses it (EINVAL) or sends to the
    // connected peer.
    if namelen < 2 {
        return 0;
    }
    let unix_name = connect::unix_name_digest(name, namelen, cgroup_id);
    connect::verdict(
        &ctx,
        gated_sendmsg(&ctx, cgroup_id, name, namelen, unix_name),
    )
}

/// The gated path, returning its verdict in a register: a `Result` returned
/// through the stack reaches the program's exit as a zero-extended word,
/// which the verifier (v6.12 checks that an LSM program returns 0 or an
/// errno) cannot bound.
#[inline(never)]
fn gated_sendmsg(
    ctx: &LsmContext,
    cgroup_id: u64,
    name: *const u8,
    namelen: i32,
    unix_name: u64,
) -> i32 {
    match sendmsg_decision(ctx, cgroup_id, name, namelen, unix_name) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[inline(always)]
fn sendmsg_decision(
    ctx: &LsmContext,
    cgroup_id: u64,
    name: *const u8,
    namelen: i32,
    unix_name: u64,
) -> Result<i32, i32> {
    let Some(gated) = gated_entry(cgroup_id) else {
        return Ok(0);
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        let caller = Caller::current(cgroup_id, gated.policy_id);
        return Ok(await_classification(&caller, request_kind::CONNECT));
    }
    let sock: *const u8 = ctx.arg(0);
    let socket_family = socket_family(sock);
    if socket_family == AF_PACKET {
        return Ok(0);
    }
    // SAFETY: probe read of the kernel copy of the destination.
    let mut family: u16 = unsafe { bpf_probe_read_kernel(name.cast()) }.map_err(|_| EPERM)?;
    // IPv4 UDP and raw sockets (`udp_sendmsg`, `raw_sendmsg`) and IPv6 raw
    // sockets send to an `AF_UNSPEC` destination as to their own family's.
    if family == AF_UNSPEC && (socket_family == AF_INET || socket_family == AF_INET6) {
        family = socket_family;
    }
    let target = Target {
        sock,
        address: name,
        addrlen: namelen,
        family,
        op: connect_op::SENDMSG,
        unix_name,
    };
    connect::decide(cgroup_id, gated.policy_id, &target)
}
