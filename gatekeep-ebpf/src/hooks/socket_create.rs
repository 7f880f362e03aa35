//! Raw and packet sockets at `security_socket_create`: their packets carry
//! headers the workload writes (IP_HDRINCL, link-layer frames), so no
//! address rule can follow them. The policy's `raw_sockets` decides whether
//! a gated task may create one at all; the default is deny.
//!
//! Kernel: `security_socket_create()` is called from `__sock_create()`
//! (net/socket.c, v6.12) before the family's `create` (and so before its
//! `CAP_NET_RAW` check): refusing here leaves nothing behind, for root and
//! for anyone else.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::{EPERM, GATED_UNCLASSIFIED, action, counter, event_kind, request_kind};

use crate::{
    events::Caller,
    hooks::{
        connect::{AF_NETLINK, AF_PACKET, SOCK_RAW, emit_socket_denied},
        gating_candidate,
    },
    maps::{POLICIES, bump, gated_entry},
    pause::await_classification,
};

/// `SOCK_TYPE_MASK`: the type without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: i32 = 0xf;

/// Runs for every socket created on the host.
///
/// Tasks outside gated cgroups return after an array lookup (rarely, a hash
/// lookup too). A gated task's raw socket (`SOCK_RAW` in any family but
/// `AF_NETLINK`, whose sockets are `SOCK_RAW` by convention and talk to the
/// kernel) or packet socket (`AF_PACKET`, any type) gets the policy's
/// `raw_sockets` action: allow, or deny with `-EPERM` and a
/// `CONNECT_DENIED` event. Sockets the kernel makes for itself (`kern`) are
/// not gated.
#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_create, int family, int type, int protocol,
    //          int kern): the verdict of earlier BPF LSM programs on this
    // hook is the last argument.
    let cgroup_id = match gating_candidate(ctx.arg(4)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_socket_create(&ctx, cgroup_id)
}

#[inline(never)]
fn gated_socket_create(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    let sock_type = sock_type & SOCK_TYPE_MASK;
    let raw = family == i32::from(AF_PACKET)
        || (sock_type == SOCK_RAW as i32 && family != i32::from(AF_NETLINK));
    if !raw || kern != 0 {
        return 0;
    }
    let Some(gated) = gated_entry(cgroup_id) else {
        return 0;
    };
    let caller = Caller::current(cgroup_id, gated.policy_id);
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        return await_classification(&caller, request_kind::CONNECT);
    }
    let Some(policy) = POLICIES.get(gated.policy_id).copied() else {
        return EPERM;
    };
    if policy.raw_action == action::ALLOW {
        return 0;
    }
    let protocol: i32 = ctx.arg(2);
    // Audit mode reports the socket enforcement would refuse, and allows it.
    let (kind, verdict) = if policy.audit != 0 {
        (event_kind::CONNECT_AUDITED, 0)
    } else {
        bump(counter::CONNECT_DENIED);
        (event_kind::CONNECT_DENIED, EPERM)
    };
    emit_socket_denied(
        &caller,
        kind,
        family as u16,
        sock_type as u32,
        protocol as u16,
    );
    verdict
}
