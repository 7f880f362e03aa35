//! `connect` gating at `security_socket_connect`, and the connect decision
//! ([`decide`]) that every way of sending to an address shares
//! (`hooks/sendmsg.rs`).
//!
//! Kernel: `security_socket_connect()` is called from `__sys_connect_file()`
//! (net/socket.c, v6.12) before the protocol's connect, so refusing here
//! leaves the socket untouched and `-ERESTARTNOINTR` restarts the connect.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        generated::bpf_probe_read_kernel as probe_read_kernel_raw,
    },
    macros::lsm,
    maps::{HashMap, lpm_trie::Key},
    programs::LsmContext,
};
use aya_log_ebpf::{error, warn};
use gatekeep_common::{
    ConnectEvent, ConnectV4Key, ConnectV6Key, EPERM, ERESTARTNOINTR, EVENT_DNS_WAIT,
    GATED_UNCLASSIFIED, MAX_UNIX_RULES, PORT_RULES, PolicyDefaults, PortRules, SUN_PATH_LEN,
    ServiceListenerKey, SipHash13, UNIX_RULE_HASH_KEY, UnixRuleKey, action, connect_op, counter,
    event_kind, keep_bytes, protect, request_kind, until_nul,
};

use crate::{
    digest::Digest,
    events::{Caller, emit_task_event},
    hooks::{dns, gating_candidate, protect::refuse_gated},
    maps::{EVENTS, POLICIES, SERVICE_LISTENERS, bump, gated_entry, offsets},
    pause::{Asked, Request, ask, await_agent, await_classification},
};

pub const AF_UNSPEC: u16 = 0;
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;
pub const AF_PACKET: u16 = 17;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u16 = 1;
const IPPROTO_ICMPV6: u16 = 58;
/// `sizeof(struct sockaddr_in)` / `sizeof(struct sockaddr_in6)` /
/// `sizeof(struct sockaddr_nl)`.
const SOCKADDR_IN_LEN: i32 = 16;
const SOCKADDR_IN6_LEN: i32 = 24;
const SOCKADDR_NL_LEN: i32 = 12;
/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH_OFFSET: usize = 2;
/// 64-bit words covering `sun_path` (the last one half used).
const SUN_PATH_WORDS: usize = SUN_PATH_LEN.div_ceil(8);

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
/// lookup too). For gated tasks, [`decide`] applies the policy to the
/// destination. An `AF_UNSPEC` connect dissolves a socket's association
/// (it reaches nobody) and is not gated.
#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_connect, struct socket *sock,
    //          struct sockaddr *address, int addrlen): the verdict of earlier
    // BPF LSM programs on this hook is the last argument.
    let cgroup_id = match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    let unix_name = unix_name_digest(ctx.arg(1), ctx.arg(2), cgroup_id);
    match gated_connect(&ctx, cgroup_id, unix_name) {
        Ok(ret) | Err(ret) => verdict(&ctx, ret),
    }
}

/// [`decide`]'s `-EPERM` for a paused request refused because its thread is
/// traced or re-enters without stopping, which the hook logs.
const EPERM_REFUSED: i32 = -0x1_0001;
/// [`decide`]'s `-EPERM` for a request the pending map has no room for,
/// which the hook logs.
const EPERM_UNTRACKABLE: i32 = -0x1_0002;
/// [`decide`]'s "wait for the agent's DNS processing" ([`await_dns`]),
/// which the hook does in its own frame.
const DNS_WAIT: i32 = -0x1_0003;

/// The hook's return value for [`decide`]'s, logging the refusals that are
/// worth a line. Logged here, in the hook's frame: a log call from the
/// decision's frame would add its own to the decision's chain of calls,
/// beyond the 512 bytes of stack BPF allows a chain. Every value is a
/// constant, as the verifier wants an LSM program's return value bounded.
#[inline(always)]
pub fn verdict(ctx: &LsmContext, ret: i32) -> i32 {
    match ret {
        0 => 0,
        ERESTARTNOINTR => ERESTARTNOINTR,
        EPERM_REFUSED => {
            warn!(
                ctx,
                "gatekeep: connect by tid {} refused: traced, or re-entering without stopping",
                bpf_get_current_pid_tgid() as u32
            );
            EPERM
        }
        EPERM_UNTRACKABLE => {
            error!(
                ctx,
                "gatekeep: pending map full: connect by tid {} refused",
                bpf_get_current_pid_tgid() as u32
            );
            EPERM
        }
        DNS_WAIT => {
            if await_dns() == ERESTARTNOINTR {
                ERESTARTNOINTR
            } else {
                EPERM
            }
        }
        _ => EPERM,
    }
}

#[inline(never)]
fn gated_connect(ctx: &LsmContext, cgroup_id: u64, unix_name: u64) -> Result<i32, i32> {
    let Some(gated) = gated_entry(cgroup_id) else {
        return Ok(0);
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        let caller = Caller::current(cgroup_id, gated.policy_id);
        return Ok(await_classification(&caller, request_kind::CONNECT));
    }
    let address: *const u8 = ctx.arg(1);
    let addrlen: i32 = ctx.arg(2);
    // SAFETY: probe read of the kernel copy of the caller's sockaddr.
    let family: u16 = unsafe { bpf_probe_read_kernel(address.cast()) }.map_err(|_| EPERM)?;
    let target = Target {
        sock: ctx.arg(0),
        address,
        addrlen,
        family,
        op: connect_op::CONNECT,
        unix_name,
    };
    decide(cgroup_id, gated.policy_id, &target)
}

/// What a connect or a send goes to: the kernel's copy of the caller's
/// `sockaddr`, and the family to read it as.
pub struct Target {
    /// The `struct socket *`.
    pub sock: *const u8,
    /// The `struct sockaddr *` (kernel memory).
    pub address: *const u8,
    pub addrlen: i32,
    /// The family to read `address` as (its own, unless the caller resolved
    /// an `AF_UNSPEC`).
    pub family: u16,
    /// [`connect_op`].
    pub op: u16,
    /// For `AF_UNIX`, the digest of the socket's name and the action of the
    /// policy's rule on it ([`unix_name_digest`]).
    pub unix_name: u64,
}

/// The connect decision, for a connect and for a datagram sent to an
/// address (`hooks/sendmsg.rs`) alike:
/// IPv4/IPv6 destinations are matched against the policy's prefixes (most
/// specific first) and port rules, and against the host rules of the names
/// the workload resolved to the address ([`with_hosts`]: the strictest of
/// the two), else the policy default; IPv4-mapped IPv6
/// addresses match the IPv4 rules, and `0.0.0.0`/`::` match as the loopback
/// address they reach; `AF_UNIX` uses the policy's rule on its name, else its unix action; netlink to
/// the kernel is not gated; other families use the policy's action for
/// them. Allow proceeds, deny returns `-EPERM` (with a `CONNECT_DENIED`
/// event), ask pauses the thread until a verdict for this exact destination
/// arrives.
///
/// Inlined into each hook: its arguments do not fit a BPF call's five
/// registers, and it runs only on the gated path.
#[inline(always)]
pub fn decide(cgroup_id: u64, policy_id: u32, target: &Target) -> Result<i32, i32> {
    bump(counter::CONNECT_GATED);
    let Some(policy) = POLICIES.get(policy_id).copied() else {
        return Ok(EPERM);
    };
    let (family, address, addrlen) = (target.family, target.address, target.addrlen);

    let (destination, action) = match family {
        AF_INET if addrlen >= SOCKADDR_IN_LEN => {
            let destination = read_inet(address, family, target.sock).map_err(|_| EPERM)?;
            let rules = lookup_v4(policy_id, &destination.addr);
            let network = port_action(rules, destination.port, action::NONE);
            let Some(action) = with_hosts(cgroup_id, &policy, &destination, true, network) else {
                return Ok(DNS_WAIT);
            };
            (destination, action)
        }
        AF_INET6 if addrlen >= SOCKADDR_IN6_LEN => {
            let destination = read_inet(address, family, target.sock).map_err(|_| EPERM)?;
            let a = &destination.addr;
            let rules = if is_v4_mapped(a) {
                lookup_v4(
                    policy_id,
                    &[
                        a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                )
            } else {
                lookup_v6(policy_id, a)
            };
            let network = port_action(rules, destination.port, action::NONE);
            let Some(action) = with_hosts(cgroup_id, &policy, &destination, false, network) else {
                return Ok(DNS_WAIT);
            };
            (destination, action)
        }
        AF_UNIX => (
            Destination {
                family,
                port: 0,
                addr: [0; 16],
            },
            match (target.unix_name & UNIX_RULE_BITS) as u32 {
                action::NONE => policy.unix_action,
                ruled => ruled,
            },
        ),
        // Too short for its family (the kernel refuses it with EINVAL), or
        // `AF_UNSPEC`: a connect dissolving an association, or a send that
        // goes to the socket's connected peer.
        AF_INET | AF_INET6 | AF_UNSPEC => return Ok(0),
        _ => {
            let destination = read_other(address, family, addrlen).map_err(|_| EPERM)?;
            if family == AF_NETLINK && netlink_to_kernel(&destination, addrlen) {
                return Ok(0);
            }
            let action = if policy.other_action == action::NONE {
                policy.connect_default
            } else {
                policy.other_action
            };
            (destination, action)
        }
    };

    // Self-protection (issue 18): the decision service's listeners come
    // before any rule of the policy.
    if (family == AF_INET || family == AF_INET6) && is_service_listener(&destination) {
        return Ok(refuse_gated(policy_id, cgroup_id, protect::SERVICE_CONNECT));
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
    let caller = Caller::current(cgroup_id, policy_id);
    let sock_type = socket_type(target.sock);
    if policy.audit != 0 {
        // Audit mode: report what enforcement would do, let it through.
        emit_connect(
            &caller,
            event_kind::CONNECT_AUDITED,
            0,
            if action == action::DENY {
                action::DENY
            } else {
                action::ASK
            },
            &destination,
            sock_type,
            target,
        );
        return Ok(0);
    }
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
                target,
            );
            Ok(EPERM)
        }
        _ => {
            let digest = connect_digest(&destination, sock_type, target);
            let request = Request {
                tid: caller.tid,
                pid: caller.pid,
                policy_id: caller.policy_id,
                kind: request_kind::CONNECT,
                digest,
                now_ns: caller.now_ns,
                cgroup_id: caller.cgroup_id,
            };
            match ask(&request, true) {
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
                    emit_task_event(
                        &caller,
                        event_kind::REFUSED_SPINNING,
                        digest,
                        request_kind::CONNECT,
                        action::DENY,
                    );
                    Ok(EPERM_REFUSED)
                }
                Asked::Untrackable => Ok(EPERM_UNTRACKABLE),
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
                            target,
                        );
                    }
                    Ok(ERESTARTNOINTR)
                }
            }
        }
    }
}

/// The action for an IP destination whose most specific network rule gave
/// `network` (`NONE`: none matched): with the host rules of the names the
/// workload resolved to the address (`hooks/dns.rs`), the strictest of the
/// two; neither: the policy default. `None` when the agent must catch up
/// first (see [`dns::host_action`]); in audit mode, which pauses nothing,
/// the host rules then count as not applying.
#[inline(always)]
fn with_hosts(
    cgroup_id: u64,
    policy: &PolicyDefaults,
    destination: &Destination,
    v4: bool,
    network: u32,
) -> Option<u32> {
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_boot_ns() };
    let host = match dns::host_action(cgroup_id, &destination.addr, v4, destination.port, now_ns) {
        Ok(host) => host,
        Err(()) if policy.audit != 0 => action::NONE,
        Err(()) => return None,
    };
    let decided = dns::strictest(network, host);
    Some(if decided == action::NONE {
        policy.connect_default
    } else {
        decided
    })
}

/// A connect whose workload's DNS answers the agent has not processed yet
/// ([`DNS_WAIT`]): the thread stops until the agent has caught up and sends
/// SIGCONT ([`EVENT_DNS_WAIT`]); the restarted syscall is decided again.
/// Called from the hook's own frame ([`verdict`]): the event and the caller
/// do not fit beside the decision's frame in BPF's 512 bytes of stack.
#[inline(never)]
fn await_dns() -> i32 {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    let policy_id = gated_entry(cgroup_id).map_or(u32::MAX, |gated| gated.policy_id);
    let caller = Caller::current(cgroup_id, policy_id);
    await_agent(&caller, request_kind::CONNECT, EVENT_DNS_WAIT)
}

/// Whether `addr` is IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// Whether `destination` reaches a listener of the decision service: its
/// exact address and port, or, for a wildcard listener, a loopback or
/// unspecified address and that port (the agent adds the host's own
/// addresses as exact keys). IPv4-mapped IPv6 is looked up as IPv4.
#[inline(always)]
fn is_service_listener(destination: &Destination) -> bool {
    let a = &destination.addr;
    let v4_mapped = destination.family == AF_INET6 && is_v4_mapped(a);
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

/// Port (host order) and address of a `sockaddr_in`/`sockaddr_in6`, with
/// the unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) replaced by
/// the loopback address a connect or send to it reaches (`ip_route_connect`
/// and `ip6_datagram_connect`/`tcp_v6_connect` in v6.12 route it there), and
/// port 0 for ICMP and raw sockets, whose `sin_port` the kernel ignores.
#[inline(always)]
fn read_inet(address: *const u8, family: u16, sock: *const u8) -> Result<Destination, i64> {
    // SAFETY: probe reads within the sockaddr the kernel copied in (its
    // length was checked by the caller).
    let (port_be, mut addr) = unsafe {
        let port_be: u16 = bpf_probe_read_kernel(address.add(2).cast())?;
        let mut addr = [0u8; 16];
        if family == AF_INET {
            let v4: [u8; 4] = bpf_probe_read_kernel(address.add(4).cast())?;
            addr[..4].copy_from_slice(&v4);
        } else {
            // sin6_flowinfo (4 bytes) sits between the port and the address.
            addr = bpf_probe_read_kernel(address.add(8).cast())?;
        }
        (port_be, addr)
    };
    if family == AF_INET {
        if addr[..4] == [0; 4] {
            addr[0] = 127;
            addr[3] = 1;
        }
    } else if addr == [0; 16] {
        addr[15] = 1;
    } else if is_v4_mapped(&addr) && addr[12..] == [0; 4] {
        addr[12] = 127;
        addr[15] = 1;
    }
    let port = if portless(sock) {
        0
    } else {
        u16::from_be(port_be)
    };
    Ok(Destination { family, port, addr })
}

/// Whether the socket's datagrams have no port: raw sockets, and ICMP
/// "ping" sockets (`SOCK_DGRAM` with `IPPROTO_ICMP`/`IPPROTO_ICMPV6`).
#[inline(always)]
fn portless(sock: *const u8) -> bool {
    match socket_type(sock) {
        SOCK_RAW => true,
        SOCK_DGRAM => {
            let protocol = socket_protocol(sock);
            protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6
        }
        _ => false,
    }
}

/// An address of another family: the bytes after its family, as many as
/// the caller gave (the rest zero, so the digest never covers stale bytes
/// of the kernel's buffer).
#[inline(always)]
fn read_other(address: *const u8, family: u16, addrlen: i32) -> Result<Destination, i64> {
    // SAFETY: the kernel's sockaddr buffer is a `sockaddr_storage` (128
    // bytes), so these 16 bytes are within it whatever `addrlen` says.
    let mut addr: [u8; 16] = unsafe { bpf_probe_read_kernel(address.add(2).cast())? };
    let mut i = 0;
    while i < 16 {
        if i as i32 + 2 >= addrlen {
            addr[i] = 0;
        }
        i += 1;
    }
    Ok(Destination {
        family,
        port: 0,
        addr,
    })
}

/// Whether a netlink address (`sockaddr_nl`: pad, `nl_pid`, `nl_groups`
/// after the family) names the kernel alone: port id 0 and no multicast
/// group. Anything else reaches other processes, like any IPC.
#[inline(always)]
fn netlink_to_kernel(destination: &Destination, addrlen: i32) -> bool {
    // Shorter than `sockaddr_nl`: the kernel refuses it with EINVAL.
    addrlen < SOCKADDR_NL_LEN || destination.addr[2..10] == [0; 8]
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
pub fn socket_type(sock: *const u8) -> u32 {
    // SAFETY: probe read.
    unsafe { bpf_probe_read_kernel::<i16>(sock.add(offsets().socket_type as usize).cast()) }
        .map_or(0, |t| t as u32)
}

/// `socket::sk`, null if unreadable.
#[inline(always)]
fn socket_sock(sock: *const u8) -> *const u8 {
    // SAFETY: probe read.
    unsafe { bpf_probe_read_kernel::<*const u8>(sock.add(offsets().socket_sk as usize).cast()) }
        .unwrap_or(core::ptr::null())
}

/// `socket::sk->sk_protocol`; 0 if unreadable.
#[inline(always)]
fn socket_protocol(sock: *const u8) -> u16 {
    let sk = socket_sock(sock);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: probe read.
    unsafe { bpf_probe_read_kernel::<u16>(sk.add(offsets().sock_sk_protocol as usize).cast()) }
        .unwrap_or(0)
}

/// `socket::sk->sk_family` (`skc_family`); 0 (`AF_UNSPEC`) if unreadable.
#[inline(always)]
pub fn socket_family(sock: *const u8) -> u16 {
    let sk = socket_sock(sock);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: probe read.
    unsafe { bpf_probe_read_kernel::<u16>(sk.add(offsets().sock_skc_family as usize).cast()) }
        .unwrap_or(0)
}

/// The request digest of a destination: family, port, socket type and
/// address; for `AF_UNIX`, family, socket type and the digest of the
/// socket's name ([`unix_name_digest`]), so a grant or verdict for one
/// socket path (or abstract name) covers no other.
#[inline(always)]
fn connect_digest(destination: &Destination, sock_type: u32, target: &Target) -> u64 {
    let mut digest = Digest::new();
    digest.word(
        (u64::from(destination.family) << 48)
            | (u64::from(destination.port) << 32)
            | u64::from(sock_type),
    );
    if destination.family == AF_UNIX {
        digest.word(target.unix_name);
        return digest.finish();
    }
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

/// The bytes of an `AF_UNIX` name that requests cover: those of `sun_path`
/// within the caller's length (`addrlen`), zero past it, so stale bytes of
/// the kernel's copy never count. An abstract name (first byte NUL) is every
/// byte of its length; a pathname's bytes after its NUL, which the kernel
/// ignores (`unix_mkname_bsd`, net/unix/af_unix.c, v6.12), are covered too:
/// a caller that leaves garbage there makes another request, never the same.
#[inline(always)]
fn unix_name_len(addrlen: i32) -> usize {
    usize::try_from(addrlen)
        .unwrap_or(0)
        .saturating_sub(SUN_PATH_OFFSET)
        .min(SUN_PATH_LEN)
}

/// The low bits of [`unix_name_digest`] that hold the rule's action.
const UNIX_RULE_BITS: u64 = 0b11;
const _: () = assert!(action::NONE | action::ALLOW | action::DENY | action::ASK <= 3);

/// The digest of the name of the `AF_UNIX` destination at `address` (kernel
/// memory, `addrlen` bytes; see [`unix_name_len`]), its two low bits
/// replaced by the action of the rule of `cgroup_id`'s policy on that name
/// ([`unix_rule_action`], `action::NONE` without one); 0 for any other
/// family. The request digest therefore binds the name and what the policy
/// says of it.
///
/// The hooks take it before their gated path, in a call of its own: the
/// hashing state does not fit their frames beside the decision's (BPF
/// allows 512 bytes of stack over a chain of calls, and the decision's
/// frame leaves no room for a callee's), and in a frame beside theirs it
/// would add to every chain. The rule travels in the digest for the same
/// reason: one more value would grow the decision's frame.
#[inline(never)]
pub fn unix_name_digest(address: *const u8, addrlen: i32, cgroup_id: u64) -> u64 {
    // SAFETY: probe reads of the kernel's copy of the caller's address, a
    // `sockaddr_storage` (128 bytes): every word read stays inside it.
    let family = unsafe { bpf_probe_read_kernel::<u16>(address.cast()) }.unwrap_or(0);
    if family != AF_UNIX {
        return 0;
    }
    let len = unix_name_len(addrlen);
    let mut digest = Digest::new();
    let mut first_word = 0;
    for i in 0..SUN_PATH_WORDS {
        let within = len.saturating_sub(i * 8);
        let word = if within == 0 {
            0
        } else {
            // SAFETY: as above.
            let raw = unsafe {
                bpf_probe_read_kernel::<u64>(address.add(SUN_PATH_OFFSET + i * 8).cast())
            }
            .unwrap_or(0);
            keep_bytes(raw, within)
        };
        if i == 0 {
            first_word = word;
        }
        digest.word(word);
    }
    // An abstract name is every byte of its length, trailing NULs included:
    // `@a` and `@a\0` are two sockets, whose bytes above read the same.
    let abstract_name = len > 0 && first_word & 0xff == 0;
    digest.word(if abstract_name { len as u64 } else { 0 });
    (digest.finish() & !UNIX_RULE_BITS)
        | u64::from(unix_rule_action(address, addrlen, cgroup_id)) & UNIX_RULE_BITS
}

/// The [`gatekeep_common::unix_rule_hash`] of the `AF_UNIX` destination at
/// `address` (kernel memory, `addrlen` bytes; see [`unix_name_len`]), or 0
/// for any other family: a pathname up to its first NUL (the kernel ignores
/// what follows, so bytes there cannot dodge a rule), an abstract name
/// every byte of its length.
#[inline(always)]
fn unix_rule_name(address: *const u8, addrlen: i32) -> u64 {
    // SAFETY: probe reads of the kernel's copy of the caller's address, a
    // `sockaddr_storage` (128 bytes): every word read stays inside it.
    let family = unsafe { bpf_probe_read_kernel::<u16>(address.cast()) }.unwrap_or(0);
    if family != AF_UNIX {
        return 0;
    }
    let len = unix_name_len(addrlen);
    // SAFETY: as above.
    let first = unsafe { bpf_probe_read_kernel::<u8>(address.add(SUN_PATH_OFFSET)) }.unwrap_or(0);
    let abstract_name = len > 0 && first == 0;
    let mut hash = SipHash13::new(UNIX_RULE_HASH_KEY);
    hash.word(if abstract_name { len as u64 } else { 0 });
    let mut ended = false;
    for i in 0..SUN_PATH_WORDS {
        let within = len.saturating_sub(i * 8);
        let word = if within == 0 || ended {
            0
        } else {
            // SAFETY: as above.
            let raw = unsafe {
                bpf_probe_read_kernel::<u64>(address.add(SUN_PATH_OFFSET + i * 8).cast())
            }
            .unwrap_or(0);
            let kept = keep_bytes(raw, within);
            if abstract_name {
                kept
            } else {
                let (word, nul) = until_nul(kept);
                ended = nul;
                word
            }
        };
        hash.word(word);
    }
    hash.finish()
}

/// The action of the rule of `cgroup_id`'s policy on the `AF_UNIX`
/// destination at `address` ([`unix_rule_name`]); `NONE` when it has none,
/// or the cgroup is not gated (yet: an unclassified cgroup's connect waits
/// and is decided again).
#[inline(always)]
fn unix_rule_action(address: *const u8, addrlen: i32, cgroup_id: u64) -> u32 {
    let Some(gated) = gated_entry(cgroup_id) else {
        return action::NONE;
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        return action::NONE;
    }
    let key = UnixRuleKey {
        policy_id: gated.policy_id,
        _pad: 0,
        name: unix_rule_name(address, addrlen),
    };
    // SAFETY: the value is copied out at once.
    unsafe { UNIX_RULES.get(&key) }
        .copied()
        .unwrap_or(action::NONE)
}

/// Writes into an event's `unix_path` (108 bytes at `path`, 8-byte aligned)
/// exactly the bytes [`unix_name_digest`] covers. Both read the kernel's
/// copy of the caller's address, which lives on its own syscall's stack: no
/// other thread can change it between the two reads.
#[inline(always)]
fn fill_unix_name(path: *mut u8, address: *const u8, addrlen: i32) {
    let len = unix_name_len(addrlen);
    // SAFETY: `path` is the event's 108-byte `unix_path` in the reserved
    // record; the probe read fills it or fails (then it is zeroed below).
    unsafe {
        if probe_read_kernel_raw(
            path.cast::<c_void>(),
            SUN_PATH_LEN as u32,
            address.add(SUN_PATH_OFFSET).cast::<c_void>(),
        ) != 0
        {
            for i in 0..SUN_PATH_WORDS - 1 {
                path.add(i * 8).cast::<u64>().write_unaligned(0);
            }
            path.add((SUN_PATH_WORDS - 1) * 8)
                .cast::<u32>()
                .write_unaligned(0);
            return;
        }
        for i in 0..SUN_PATH_WORDS - 1 {
            let word = path.add(i * 8).cast::<u64>();
            word.write_unaligned(keep_bytes(word.read_unaligned(), len.saturating_sub(i * 8)));
        }
        let last = path.add((SUN_PATH_WORDS - 1) * 8).cast::<u32>();
        let kept = keep_bytes(
            u64::from(last.read_unaligned()),
            len.saturating_sub((SUN_PATH_WORDS - 1) * 8),
        );
        last.write_unaligned(kept as u32);
    }
}

#[inline(always)]
fn emit_connect(
    caller: &Caller,
    kind: u32,
    digest: u64,
    action: u32,
    destination: &Destination,
    sock_type: u32,
    target: &Target,
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
        (*event).op = target.op;
        (*event).action = action;
        (*event).addr = destination.addr;
        (*event).unix_len = 0;
        (*event).unix_path[0] = 0;
        if destination.family == AF_UNIX {
            (*event).unix_len = unix_name_len(target.addrlen) as u32;
            // Exactly the bytes the digest covers.
            fill_unix_name(
                (*event).unix_path.as_mut_ptr(),
                target.address,
                target.addrlen,
            );
        }
    }
    entry.submit(0);
}

/// Emits the `CONNECT_DENIED` (or, in audit mode, `CONNECT_AUDITED`) record of a refused raw or packet socket
/// (`hooks/socket_create.rs`): no address; `port` holds the protocol.
#[inline(always)]
pub fn emit_socket_denied(caller: &Caller, kind: u32, family: u16, sock_type: u32, protocol: u16) {
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size.
    unsafe {
        (*event).header = caller.header(kind, 0);
        (*event).family = u32::from(family);
        (*event).sock_type = sock_type;
        (*event).port = protocol;
        (*event).op = connect_op::SOCKET;
        (*event).action = action::DENY;
        (*event).addr = [0; 16];
        (*event).unix_len = 0;
        (*event).unix_path[0] = 0;
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

/// (policy, [`unix_rule_name`]) -> the action of its `unix:` rule.
#[aya_ebpf::macros::map]
pub static UNIX_RULES: HashMap<UnixRuleKey, u32> = HashMap::with_max_entries(MAX_UNIX_RULES, 0);
