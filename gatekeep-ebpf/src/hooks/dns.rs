//! DNS observation for host-name connect rules (issue 20, item 3): two
//! `cgroup_skb` programs the agent attaches to the gated cgroups whose
//! policy has host rules (never to the root cgroup, so ungated processes
//! run no program of ours on their packets), and the host-rule lookup of
//! the connect decision ([`host_action`]).
//!
//! - Egress: a UDP datagram to port 53 (a query) is copied to user space,
//!   which matches answers to the queries the workload really sent. A UDP
//!   datagram *from* port 53 is dropped: a gated socket never speaks as a
//!   DNS server, so a workload cannot forge answers to itself (or to a
//!   sibling) through the loopback, whatever address it binds.
//! - Ingress: a UDP datagram from port 53 (an answer) is copied to user
//!   space with the socket's cgroup, and the cgroup's `DNS_RECEIVED` count
//!   goes up *before* the datagram reaches the socket. A connect of that
//!   cgroup waits (stopped, [`EVENT_DNS_WAIT`]) until user space's
//!   `DNS_PROCESSED` count has caught up, so a workload connecting right
//!   after an answer meets the rules that answer brought.
//!
//! Kernel: `__cgroup_bpf_run_filter_skb()` (kernel/bpf/cgroup.c, v6.12)
//! runs these with `skb->data` at the network header, for the socket's
//! cgroup (`sock_cgroup_ptr(&sk->sk_cgrp_data)`) and every ancestor's
//! effective programs; returning 0 drops the packet.

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_ktime_get_boot_ns,
        generated::{bpf_skb_cgroup_id, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, map},
    maps::HashMap,
    programs::SkBuffContext,
};
use gatekeep_common::{
    DNS_PAYLOAD_LEN, DnsEvent, EVENT_DNS_PACKET, HostKey, HostRules, action, counter, dns_direction,
};

use crate::maps::{EVENTS, bump, gated_cgroup};

const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
/// A DNS header is 12 bytes: anything shorter is not a message.
const DNS_HEADER_LEN: u32 = 12;
/// Keep the packet (cgroup_skb: 1 passes, 0 drops).
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Queries the workload sends; drops datagrams it sends from port 53.
#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    match udp_of(&ctx) {
        Some(udp) if udp.sport == DNS_PORT => DROP,
        Some(udp) if udp.dport == DNS_PORT => {
            emit(&ctx, &udp, dns_direction::QUERY);
            PASS
        }
        _ => PASS,
    }
}

/// Answers the workload receives.
#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    if let Some(udp) = udp_of(&ctx)
        && udp.sport == DNS_PORT
    {
        emit(&ctx, &udp, dns_direction::ANSWER);
    }
    PASS
}

/// A UDP datagram's addresses (IPv4-mapped for IPv4), ports and payload.
struct Udp {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    /// Offset of the UDP payload from the network header.
    payload: u32,
}

/// Reads the IP and UDP headers; `None` for anything else, for IPv6 with
/// extension headers and for IPv4 fragments (whose ports are not there).
#[inline(always)]
fn udp_of(ctx: &SkBuffContext) -> Option<Udp> {
    let first: u8 = ctx.load(0).ok()?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let l4 = match first >> 4 {
        4 => {
            if ctx.load::<u8>(9).ok()? != IPPROTO_UDP {
                return None;
            }
            // Fragment offset or "more fragments".
            if u16::from_be(ctx.load::<u16>(6).ok()?) & 0x3fff != 0 {
                return None;
            }
            let s: [u8; 4] = ctx.load(12).ok()?;
            let d: [u8; 4] = ctx.load(16).ok()?;
            src[10] = 0xff;
            src[11] = 0xff;
            src[12..].copy_from_slice(&s);
            dst[10] = 0xff;
            dst[11] = 0xff;
            dst[12..].copy_from_slice(&d);
            u32::from(first & 0x0f) * 4
        }
        6 => {
            if ctx.load::<u8>(6).ok()? != IPPROTO_UDP {
                return None;
            }
            src = ctx.load(8).ok()?;
            dst = ctx.load(24).ok()?;
            40
        }
        _ => return None,
    };
    let sport = u16::from_be(ctx.load::<u16>(l4 as usize).ok()?);
    let dport = u16::from_be(ctx.load::<u16>(l4 as usize + 2).ok()?);
    Some(Udp {
        src,
        dst,
        sport,
        dport,
        payload: l4 + 8,
    })
}

/// Copies a DNS datagram to user space ([`DnsEvent`]); for an answer, the
/// socket's cgroup's `DNS_RECEIVED` count goes up once the record is
/// reserved (so every count has its record).
#[inline(always)]
fn emit(ctx: &SkBuffContext, udp: &Udp, direction: u32) {
    let raw = ctx.as_ptr();
    let total = ctx.len();
    if total < udp.payload + DNS_HEADER_LEN {
        return;
    }
    let mut len = total - udp.payload;
    if len > DNS_PAYLOAD_LEN as u32 {
        len = DNS_PAYLOAD_LEN as u32;
    }
    // SAFETY: helper reading the socket of the skb being filtered.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(raw.cast()) };
    let Some(mut entry) = EVENTS.reserve::<DnsEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let seq = if direction == dns_direction::ANSWER {
        count_answer(cgroup_id)
    } else {
        0
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; every
    // field is written (the payload past `len` zeroed first).
    unsafe {
        (*event).kind = EVENT_DNS_PACKET;
        (*event).direction = direction;
        (*event).cgroup_id = cgroup_id;
        (*event).seq = seq;
        (*event).ktime_ns = bpf_ktime_get_boot_ns();
        (*event).policy_id = gated_cgroup(cgroup_id).map_or(u32::MAX, |g| g.policy_id);
        (*event).src = udp.src;
        (*event).dst = udp.dst;
        (*event).sport = udp.sport;
        (*event).dport = udp.dport;
        (*event)._pad = 0;
        let payload = (*event).payload.as_mut_ptr();
        let mut i = 0;
        while i < DNS_PAYLOAD_LEN / 8 {
            payload.add(i * 8).cast::<u64>().write_unaligned(0);
            i += 1;
        }
        // `len` is within [DNS_HEADER_LEN, DNS_PAYLOAD_LEN] (a power of two),
        // so `size` equals it; written so the verifier sees 1..=1024 (a
        // compare alone, it may lose when the compiler moves it).
        let size = ((len - 1) & (DNS_PAYLOAD_LEN as u32 - 1)) + 1;
        let copied = bpf_skb_load_bytes(raw, udp.payload, payload.cast(), size) == 0;
        (*event).len = if copied { len } else { 0 };
    }
    entry.submit(0);
}

/// Adds one to `cgroup_id`'s `DNS_RECEIVED` count; returns the count after
/// (informational: concurrent answers may read the same value).
#[inline(always)]
fn count_answer(cgroup_id: u64) -> u64 {
    if let Some(count) = DNS_RECEIVED.get_ptr_mut(&cgroup_id) {
        // SAFETY: an aligned word of the map value, changed atomically only.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1);
            return *count;
        }
    }
    if DNS_RECEIVED
        .insert(&cgroup_id, &1, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return 1;
    }
    // Another CPU inserted it meanwhile.
    if let Some(count) = DNS_RECEIVED.get_ptr_mut(&cgroup_id) {
        // SAFETY: as above.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1);
            return *count;
        }
    }
    0
}

/// What the host rules say about a connect of `cgroup_id` to `addr` (IPv4
/// in the first 4 bytes when `v4`) port `port` at `now_ns`: `Ok(action)`
/// (`NONE`: no host rule applies), or `Err(())` when user space must catch
/// up first: answers of this cgroup not yet processed, or an entry past its
/// expiry that user space has not refreshed yet.
#[inline(always)]
pub fn host_action(
    cgroup_id: u64,
    addr: &[u8; 16],
    v4: bool,
    port: u16,
    now_ns: u64,
) -> Result<u32, ()> {
    // SAFETY: copied out immediately.
    let Some(received) = (unsafe { DNS_RECEIVED.get(&cgroup_id) }).copied() else {
        // This workload never received an answer we saw: no entry of its.
        return Ok(action::NONE);
    };
    // SAFETY: as above.
    let processed = unsafe { DNS_PROCESSED.get(&cgroup_id) }
        .copied()
        .unwrap_or(0);
    if received != processed {
        return Err(());
    }
    let mut key = HostKey {
        cgroup_id,
        addr: *addr,
    };
    if v4 {
        key.addr = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
        ];
    }
    let Some(entry) = HOST_RULES.get_ptr(&key) else {
        return Ok(action::NONE);
    };
    // SAFETY: a map value pointer from the lookup, read in place.
    let expires_ns = unsafe { (*entry).expires_ns };
    if now_ns >= expires_ns {
        return Err(());
    }
    let mut i = 0;
    while i < gatekeep_common::PORT_RULES {
        // SAFETY: as above; index bounded.
        let rule = unsafe { (*entry).rules.rules[i] };
        if rule.action == action::NONE {
            break;
        }
        if rule.port_lo <= port && port <= rule.port_hi {
            return Ok(rule.action);
        }
        i += 1;
    }
    Ok(action::NONE)
}

/// The stricter of two actions (`NONE` < allow < ask < deny).
#[inline(always)]
pub fn strictest(a: u32, b: u32) -> u32 {
    let rank = |x: u32| match x {
        action::ALLOW => 1,
        action::ASK => 2,
        action::DENY => 3,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

// The maps only this module uses. (At the end of the file, so that the line
// numbers in log records stay those of the code above.)

/// [`HostKey`] -> [`HostRules`], written by the agent from the answers
/// each workload received.
#[map]
pub static HOST_RULES: HashMap<HostKey, HostRules> = HashMap::with_max_entries(65536, 0);

/// cgroup id -> answers passed to user space (this module counts).
#[map]
pub static DNS_RECEIVED: HashMap<u64, u64> = HashMap::with_max_entries(16384, 0);

/// cgroup id -> answers user space has processed (user space counts).
#[map]
pub static DNS_PROCESSED: HashMap<u64, u64> = HashMap::with_max_entries(16384, 0);
