//! `connect` gating at `security_socket_connect`.
//!
//! Kernel: `security_socket_connect()` is called from `__sys_connect_file()`
//! (net/socket.c, v6.12) before the protocol's connect, so refusing here
//! leaves the socket untouched and `-ERESTARTNOINTR` restarts the connect.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read_kernel_raw},
    macros::lsm,
    maps::lpm_trie::Key,
    programs::LsmContext,
};
use aya_log_ebpf::{error, warn};
use gatekeep_common::{
    ConnectEvent, ConnectV4Key, ConnectV6Key, EPERM, ERESTARTNOINTR, GATED_UNCLASSIFIED,
    PORT_RULES, PortRules, ServiceListenerKey, action, counter, event_kind, protect, request_kind,
};

use crate::{
    digest::Digest,
    events::{Caller, emit_task_event},
    hooks::{gating_candidate, protect::refuse_gated},
    maps::{EVENTS, POLICIES, SERVICE_LISTENERS, bump, gated_entry, offsets},
    pause::{Asked, Request, ask, await_classification},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `sizeof(struct sockaddr_in)` / `sizeof(struct sockaddr_in6)`.
const SOCKADDR_IN_LEN: i32 = 16;
const SOCKADDR_IN6_LEN: i32 = 24;
/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH_OFFSET: usize = 2;

/// What is being connected to, read from the caller's `sockaddr`.
#[derive(Clone, Copy)]
struct Destination {
    family: u16,
    port: u16,
    /// IPv4 in the first 4 bytes, or IPv6 (network order).
    addr: [u8; 16],
}

/// Runs for every connect on the host.
///
/// Tasks outside gated cgroups return after an array lookup (rarely, a hash
/// lookup too). For gated tasks:
/// IPv4/IPv6 destinations are matched against the policy's prefixes (most
/// specific first) and port rules, else the policy default; IPv4-mapped IPv6
/// addresses match the IPv4 rules; `AF_UNIX` uses the policy's unix action;
/// other families are not gated. Allow proceeds, deny returns `-EPERM` (with
/// a `CONNECT_DENIED` event), ask pauses the thread until a verdict for this
/// exact destination arrives.
#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_connect, struct socket *sock,
    //          struct sockaddr *address, int addrlen): the verdict of earlier
    // BPF LSM programs on this hook is the last argument.
    let cgroup_id = match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    match gated_connect(&ctx, cgroup_id) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[inline(never)]
fn gated_connect(ctx: &LsmContext, cgroup_id: u64) -> Result<i32, i32> {
    let Some(gated) = gated_entry(cgroup_id) else {
        return Ok(0);
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        let caller = Caller::current(cgroup_id, gated.policy_id);
        return Ok(await_classification(&caller, request_kind::CONNECT));
    }
    bump(counter::CONNECT_GATED);

    let sock: *const u8 = ctx.arg(0);
    let address: *const u8 = ctx.arg(1);
    let addrlen: i32 = ctx.arg(2);
    // SAFETY: probe read of the kernel copy of the caller's sockaddr.
    let family: u16 = unsafe { bpf_probe_read_kernel(address.cast()) }.map_err(|_| EPERM)?;
    let Some(policy) = POLICIES.get(gated.policy_id).copied() else {
        return Ok(EPERM);
    };

    let (destination, action) = match family {
        AF_INET if addrlen >= SOCKADDR_IN_LEN => {
            let destination = read_inet(address, family).map_err(|_| EPERM)?;
            let rules = lookup_v4(gated.policy_id, &destination.addr);
            (
                destination,
                port_action(rules, destination.port, policy.connect_default),
            )
        }
        AF_INET6 if addrlen >= SOCKADDR_IN6_LEN => {
            let destination = read_inet(address, family).map_err(|_| EPERM)?;
            let a = &destination.addr;
            let v4_mapped = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
            let rules = if v4_mapped {
                lookup_v4(
                    gated.policy_id,
                    &[
                        a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                )
            } else {
                lookup_v6(gated.policy_id, a)
            };
            (
                destination,
                port_action(rules, destination.port, policy.connect_default),
            )
        }
        AF_UNIX => (
            Destination {
                family,
                port: 0,
                addr: [0; 16],
            },
            policy.unix_action,
        ),
        // Too short for its family (the kernel rejects it with EINVAL) or a
        // family we do not gate.
        _ => return Ok(0),
    };

    // Self-protection (issue 18): the decision service's listeners come
    // before any rule of the policy.
    if family != AF_UNIX && is_service_listener(&destination) {
        return Ok(refuse_gated(
            gated.policy_id,
            cgroup_id,
            protect::SERVICE_CONNECT,
        ));
    }
    match action {
        action::ALLOW | action::NONE if family == AF_UNIX => return Ok(0),
        action::ALLOW => {
            bump(counter::CONNECT_ALLOWED);
            return Ok(0);
        }
        _ => {}
    }
    // Who is asking, and with which socket, matters only off the allow path.
    let caller = Caller::current(cgroup_id, gated.policy_id);
    let sock_type = socket_type(sock);
    match action {
        action::DENY => {
            bump(counter::CONNECT_DENIED);
            emit_connect(
                &caller,
                event_kind::CONNECT_DENIED,
                0,
                action::DENY,
                &destination,
                sock_type,
                address,
            );
            Ok(EPERM)
        }
        _ => {
            let digest = connect_digest(&destination, sock_type);
            let request = Request {
                tid: caller.tid,
                pid: caller.pid,
                policy_id: caller.policy_id,
                kind: request_kind::CONNECT,
                digest,
                now_ns: caller.now_ns,
                cgroup_id: caller.cgroup_id,
            };
            match ask(&request) {
                Asked::Granted => Ok(0),
                Asked::Allow => {
                    emit_task_event(
                        &caller,
                        event_kind::VERDICT_APPLIED,
                        digest,
                        request_kind::CONNECT,
                        action::ALLOW,
                    );
                    Ok(0)
                }
                Asked::Deny => {
                    emit_task_event(
                        &caller,
                        event_kind::VERDICT_APPLIED,
                        digest,
                        request_kind::CONNECT,
                        action::DENY,
                    );
                    Ok(EPERM)
                }
                Asked::Refused => {
                    warn!(
                        ctx,
                        "gatekeep: connect by tid {} refused: traced, or re-entering without stopping",
                        caller.tid
                    );
                    emit_task_event(
                        &caller,
                        event_kind::REFUSED_SPINNING,
                        digest,
                        request_kind::CONNECT,
                        action::DENY,
                    );
                    Ok(EPERM)
                }
                Asked::Untrackable => {
                    error!(
                        ctx,
                        "gatekeep: pending map full: connect by tid {} refused", caller.tid
                    );
                    Ok(EPERM)
                }
                Asked::Paused { new } => {
                    if new {
                        bump(counter::CONNECT_ASKED);
                        emit_connect(
                            &caller,
                            event_kind::CONNECT_ASK,
                            digest,
                            action::ASK,
                            &destination,
                            sock_type,
                            address,
                        );
                    }
                    Ok(ERESTARTNOINTR)
                }
            }
        }
    }
}

/// Whether `destination` reaches a listener of the decision service: its
/// exact address and port, or, for a wildcard listener, a loopback or
/// unspecified address and that port (the agent adds the host's own
/// addresses as exact keys). IPv4-mapped IPv6 is looked up as IPv4.
#[inline(always)]
fn is_service_listener(destination: &Destination) -> bool {
    let a = &destination.addr;
    let v4_mapped = destination.family == AF_INET6
        && a[..10].iter().all(|b| *b == 0)
        && a[10] == 0xff
        && a[11] == 0xff;
    let mut key = ServiceListenerKey {
        family: destination.family,
        port: destination.port,
        _pad: 0,
        addr: *a,
    };
    if v4_mapped {
        key.family = AF_INET;
        key.addr = [
            a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
    }
    // SAFETY: presence checks only.
    if unsafe { SERVICE_LISTENERS.get(&key) }.is_some() {
        return true;
    }
    let loopback = if key.family == AF_INET {
        key.addr[0] == 127
    } else {
        // ::1
        key.addr[..15].iter().all(|b| *b == 0) && key.addr[15] == 1
    };
    if !loopback {
        return false;
    }
    key.addr = [0; 16];
    // SAFETY: as above.
    unsafe { SERVICE_LISTENERS.get(&key) }.is_some()
}

/// Port (host order) and address of a `sockaddr_in`/`sockaddr_in6`.
#[inline(always)]
fn read_inet(address: *const u8, family: u16) -> Result<Destination, i64> {
    // SAFETY: probe reads within the sockaddr the kernel copied in (its
    // length was checked by the caller).
    unsafe {
        let port_be: u16 = bpf_probe_read_kernel(address.add(2).cast())?;
        let mut addr = [0u8; 16];
        if family == AF_INET {
            let v4: [u8; 4] = bpf_probe_read_kernel(address.add(4).cast())?;
            addr[..4].copy_from_slice(&v4);
        } else {
            // sin6_flowinfo (4 bytes) sits between the port and the address.
            addr = bpf_probe_read_kernel(address.add(8).cast())?;
        }
        Ok(Destination {
            family,
            port: u16::from_be(port_be),
            addr,
        })
    }
}

#[inline(always)]
fn lookup_v4(policy_id: u32, addr: &[u8; 16]) -> Option<*const PortRules> {
    let key = Key::new(
        64,
        ConnectV4Key {
            policy_id_be: policy_id.to_be_bytes(),
            addr: [addr[0], addr[1], addr[2], addr[3]],
        },
    );
    CONNECT_V4.get(&key).map(core::ptr::from_ref)
}

#[inline(always)]
fn lookup_v6(policy_id: u32, addr: &[u8; 16]) -> Option<*const PortRules> {
    let key = Key::new(
        160,
        ConnectV6Key {
            policy_id_be: policy_id.to_be_bytes(),
            addr: *addr,
        },
    );
    CONNECT_V6.get(&key).map(core::ptr::from_ref)
}

/// The first rule whose range holds `port`, else `default`. Reads the rules
/// in place: copying them would not fit the 512-byte stack.
#[inline(always)]
fn port_action(rules: Option<*const PortRules>, port: u16, default: u32) -> u32 {
    let Some(rules) = rules else {
        return default;
    };
    let mut i = 0;
    while i < PORT_RULES {
        // SAFETY: a map value pointer from the lookup; index bounded.
        let rule = unsafe { (*rules).rules[i] };
        if rule.action == action::NONE {
            break;
        }
        if rule.port_lo <= port && port <= rule.port_hi {
            return rule.action;
        }
        i += 1;
    }
    default
}

/// `socket::type` (`SOCK_STREAM`, ...); 0 if unreadable.
#[inline(always)]
fn socket_type(sock: *const u8) -> u32 {
    // SAFETY: probe read.
    unsafe { bpf_probe_read_kernel::<i16>(sock.add(offsets().socket_type as usize).cast()) }
        .map_or(0, |t| t as u32)
}

#[inline(always)]
fn connect_digest(destination: &Destination, sock_type: u32) -> u64 {
    let mut digest = Digest::new();
    digest.word(
        (u64::from(destination.family) << 48)
            | (u64::from(destination.port) << 32)
            | u64::from(sock_type),
    );
    digest.word(u64::from_ne_bytes([
        destination.addr[0],
        destination.addr[1],
        destination.addr[2],
        destination.addr[3],
        destination.addr[4],
        destination.addr[5],
        destination.addr[6],
        destination.addr[7],
    ]));
    digest.word(u64::from_ne_bytes([
        destination.addr[8],
        destination.addr[9],
        destination.addr[10],
        destination.addr[11],
        destination.addr[12],
        destination.addr[13],
        destination.addr[14],
        destination.addr[15],
    ]));
    digest.finish()
}

#[inline(always)]
fn emit_connect(
    caller: &Caller,
    kind: u32,
    digest: u64,
    action: u32,
    destination: &Destination,
    sock_type: u32,
    address: *const u8,
) {
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size.
    unsafe {
        (*event).header = caller.header(kind, digest);
        (*event).family = u32::from(destination.family);
        (*event).sock_type = sock_type;
        (*event).port = destination.port;
        (*event)._pad = 0;
        (*event).action = action;
        (*event).addr = destination.addr;
        (*event)._pad2 = 0;
        (*event).unix_path[0] = 0;
        if destination.family == AF_UNIX {
            // sun_path may hold an abstract name (leading NUL): copy bytes.
            probe_read_kernel_raw(
                (*event).unix_path.as_mut_ptr().cast::<c_void>(),
                (*event).unix_path.len() as u32,
                address.add(SUN_PATH_OFFSET).cast::<c_void>(),
            );
        }
    }
    entry.submit(0);
}

// The maps only this hook uses. (At the end of the file, so that the line
// numbers in the hook's log records stay those of the code above.)

/// (policy, IPv4 prefix) -> port rules.
#[aya_ebpf::macros::map]
pub static CONNECT_V4: aya_ebpf::maps::LpmTrie<ConnectV4Key, PortRules> =
    aya_ebpf::maps::LpmTrie::with_max_entries(65536, 0);

/// (policy, IPv6 prefix) -> port rules.
#[aya_ebpf::macros::map]
pub static CONNECT_V6: aya_ebpf::maps::LpmTrie<ConnectV6Key, PortRules> =
    aya_ebpf::maps::LpmTrie::with_max_entries(65536, 0);
