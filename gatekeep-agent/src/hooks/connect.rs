//! The connect hook (`socket_connect`; kernel half:
//! `gatekeep-ebpf/src/hooks/connect.rs`): its requests, and
//! `[policy.connect]` compiled into `CONNECT_V4`/`CONNECT_V6`, and its
//! `unix:` rules into `UNIX_RULES`.
//!
//! The kernel's other egress hooks share its decision and its records, so
//! their requests are connect requests too, told apart by [`Via`]:
//! `socket_sendmsg` (`gatekeep-ebpf/src/hooks/sendmsg.rs`: datagrams sent
//! to an address, TCP Fast Open) and `socket_create`
//! (`gatekeep-ebpf/src/hooks/socket_create.rs`: raw and packet sockets,
//! `raw_sockets`).
//!
//! Connect rules: one LPM entry per distinct network of a policy, holding
//! the rules of that network and, after them, the rules of every less
//! specific network of the same policy that contains it (an LPM lookup
//! returns only the longest match). The list is ordered like
//! [`gatekeep_policy::ConnectPolicy::action_for`] decides: longer prefix
//! first, at the same prefix port-specific before all-ports and narrower
//! before wider.
//!
//! `AF_UNIX` rules: one `UNIX_RULES` entry per rule, keyed by the policy
//! and [`gatekeep_common::unix_rule_hash`] of its name, which the kernel
//! computes of each destination the same way; a destination without an
//! entry gets the policy's `unix` action.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{
    HashMap, Map, MapError,
    lpm_trie::{Key, LpmTrie},
};
use gatekeep_common::{
    ConnectEvent, ConnectV4Key, ConnectV6Key, PORT_RULES, PortRule, PortRules, UnixRuleKey,
    connect_op, event_kind, map_names, request_kind,
};
use gatekeep_policy::{ConnectRule, Policy};
use gatekeep_proto::{
    audit::KernelFacts,
    limits,
    model::{self, ConnectTarget, Family, SocketType, Target},
};
use ipnet::IpNet;

use super::{Compiling, Hook, RuleKey, absent_is_ok, kernel_action};
use crate::{
    bpf::record::{Origin, ParseError, c_string, origin, read},
    pause::{enrich::Enricher, request},
    policy::error::PolicyMapsError,
};

/// `AF_UNIX`, `AF_INET`, `AF_INET6` (Linux values).
pub(crate) const AF_UNIX: u32 = 1;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;

/// Where a connect goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `0.0.0.0` and `::` arrive as the loopback address they reach.
    Ip { addr: IpAddr, port: u16 },
    Unix {
        /// As reviewers read it ([`unix_name`]).
        path: String,
        /// `sun_path` as the kernel's record holds it: the bytes within the
        /// caller's length, zero past it.
        name: Vec<u8>,
    },
    /// Another address family (`other_families`).
    Other { family: u32 },
    /// A raw or packet socket being created (`raw_sockets`): no address.
    RawSocket { family: u32, protocol: u16 },
}

/// Which call the kernel decided ([`gatekeep_common::connect_op`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Connect,
    /// A datagram sent to an address, or TCP Fast Open.
    Sendmsg,
    /// A raw or packet socket's creation.
    Socket,
}

impl Via {
    /// `connect`, `sendmsg` or `socket` (audit records' `kernel.call`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Connect => "connect",
            Via::Sendmsg => "sendmsg",
            Via::Socket => "socket",
        }
    }
}

/// A connect as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub origin: Origin,
    pub destination: Destination,
    /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2), ...
    pub sock_type: u32,
    pub via: Via,
    /// The host names the workload resolved to an IP destination (fresh
    /// DNS answers it received, `crate::dns`): shown to reviewers, and the
    /// host rules they match decided the request with the network rules.
    pub resolved: Vec<String>,
}

/// The connect hook.
pub struct Connect;

impl Hook for Connect {
    const NAME: &'static str = "connect";
    const MODEL_KIND: model::Kind = model::Kind::Connect;
    const KIND: u32 = request_kind::CONNECT;
    const ASK: (u32, &'static str) = (event_kind::CONNECT_ASK, "connect_ask");
    const DENIED: (u32, &'static str) = (event_kind::CONNECT_DENIED, "connect_denied");
    const AUDITED: (u32, &'static str) = (event_kind::CONNECT_AUDITED, "connect_audited");
    const RULE_MAPS: &'static [&'static str] = &[
        map_names::CONNECT_V4,
        map_names::CONNECT_V6,
        map_names::UNIX_RULES,
    ];

    type Request = ConnectRequest;
    type Loaded = ();

    fn reported_action(kind: u32, bytes: &[u8]) -> Result<u32, ParseError> {
        let raw: ConnectEvent = read(bytes, kind)?;
        Ok(raw.action)
    }

    fn parse(kind: u32, bytes: &[u8]) -> Result<ConnectRequest, ParseError> {
        let raw: ConnectEvent = read(bytes, kind)?;
        Ok(connect_request(&raw))
    }

    fn origin(request: &ConnectRequest) -> &Origin {
        &request.origin
    }

    fn compile(
        policy: &Policy,
        out: &mut Compiling<'_>,
        (): &mut (),
    ) -> Result<(), PolicyMapsError> {
        out.defaults.connect_default = kernel_action(policy.connect.default);
        out.defaults.unix_action = kernel_action(policy.connect.unix);
        out.defaults.raw_action = kernel_action(policy.connect.raw_sockets);
        out.defaults.other_action = kernel_action(policy.connect.other_families);
        for rule in &policy.connect.unix_rules {
            out.rules.insert(
                unix_rule_key(out.id, gatekeep_policy::unix_rule_hash(&rule.name)),
                kernel_action(rule.action).to_ne_bytes().to_vec(),
            );
        }
        let nets: BTreeSet<IpNet> = policy.connect.rules.iter().map(|r| r.net).collect();
        for net in nets {
            let mut covering: Vec<&ConnectRule> = policy
                .connect
                .rules
                .iter()
                .filter(|rule| rule.net.contains(&net))
                .collect();
            covering.sort_by_key(|rule| rule_order(rule));
            // Nothing after an all-ports rule can ever be reached.
            if let Some(cut) = covering.iter().position(|rule| rule.ports.is_all()) {
                covering.truncate(cut + 1);
            }
            if covering.len() > PORT_RULES {
                return Err(PolicyMapsError::TooManyPortRules {
                    policy: policy.name.clone(),
                    net,
                    count: covering.len(),
                    max: PORT_RULES,
                });
            }
            let mut rules = PortRules::default();
            for (slot, rule) in rules.rules.iter_mut().zip(&covering) {
                *slot = PortRule {
                    port_lo: rule.ports.0,
                    port_hi: rule.ports.1,
                    action: kernel_action(rule.action),
                };
            }
            let prefix = 32 + u32::from(net.prefix_len());
            let (map, addr) = match net {
                IpNet::V4(v4) => (map_names::CONNECT_V4, v4.network().octets().to_vec()),
                IpNet::V6(v6) => (map_names::CONNECT_V6, v6.network().octets().to_vec()),
            };
            out.rules
                .insert(rule_key(map, out.id, prefix, &addr), encode_rules(&rules));
        }
        Ok(())
    }

    fn read_map(name: &'static str, map: &Map) -> Result<Vec<(RuleKey, Vec<u8>)>, MapError> {
        if name == map_names::UNIX_RULES {
            let rules = HashMap::<_, UnixRuleKey, u32>::try_from(map)?;
            rules
                .iter()
                .map(|entry| {
                    entry.map(|(key, action)| {
                        (
                            unix_rule_key(key.policy_id, key.name),
                            action.to_ne_bytes().to_vec(),
                        )
                    })
                })
                .collect()
        } else if name == map_names::CONNECT_V6 {
            let trie = LpmTrie::<_, ConnectV6Key, PortRules>::try_from(map)?;
            trie.iter()
                .map(|entry| {
                    entry.map(|(key, rules)| {
                        let data = key.data();
                        let id = u32::from_be_bytes(data.policy_id_be);
                        let key = rule_key(name, id, key.prefix_len(), &data.addr);
                        (key, encode_rules(&rules))
                    })
                })
                .collect()
        } else {
            let trie = LpmTrie::<_, ConnectV4Key, PortRules>::try_from(map)?;
            trie.iter()
                .map(|entry| {
                    entry.map(|(key, rules)| {
                        let data = key.data();
                        let id = u32::from_be_bytes(data.policy_id_be);
                        let key = rule_key(name, id, key.prefix_len(), &data.addr);
                        (key, encode_rules(&rules))
                    })
                })
                .collect()
        }
    }

    fn write_map(map: &mut Map, key: &RuleKey, value: Option<&[u8]>) -> Result<(), MapError> {
        if key.map == map_names::UNIX_RULES {
            let mut rules = HashMap::<_, UnixRuleKey, u32>::try_from(map)?;
            let kernel_key = UnixRuleKey {
                policy_id: key.policy_id,
                _pad: 0,
                name: u64::from_be_bytes(
                    key.key
                        .get(..8)
                        .and_then(|k| k.try_into().ok())
                        .unwrap_or_default(),
                ),
            };
            return match value {
                Some(value) => {
                    let action = value
                        .get(..4)
                        .and_then(|v| v.try_into().ok())
                        .map_or(0, u32::from_ne_bytes);
                    rules.insert(kernel_key, action, 0)
                }
                None => absent_is_ok(rules.remove(&kernel_key)),
            };
        }
        let (prefix, addr) = split_key(&key.key);
        let policy_id_be = key.policy_id.to_be_bytes();
        if key.map == map_names::CONNECT_V6 {
            let mut trie = LpmTrie::<_, ConnectV6Key, PortRules>::try_from(map)?;
            let mut data = ConnectV6Key {
                policy_id_be,
                addr: [0; 16],
            };
            let len = addr.len().min(16);
            data.addr[..len].copy_from_slice(&addr[..len]);
            let kernel_key = Key::new(prefix, data);
            match value {
                Some(value) => trie.insert(&kernel_key, decode_rules(value), 0),
                None => absent_is_ok(trie.remove(&kernel_key)),
            }
        } else {
            let mut trie = LpmTrie::<_, ConnectV4Key, PortRules>::try_from(map)?;
            let mut data = ConnectV4Key {
                policy_id_be,
                addr: [0; 4],
            };
            let len = addr.len().min(4);
            data.addr[..len].copy_from_slice(&addr[..len]);
            let kernel_key = Key::new(prefix, data);
            match value {
                Some(value) => trie.insert(&kernel_key, decode_rules(value), 0),
                None => absent_is_ok(trie.remove(&kernel_key)),
            }
        }
    }

    fn rule(policy: &Policy, (): &(), request: &ConnectRequest) -> String {
        let connect = &policy.connect;
        match &request.destination {
            Destination::Ip { addr, port } if !request.resolved.is_empty() => {
                let names: Vec<&str> = request.resolved.iter().map(String::as_str).collect();
                connect.decide_resolved(*addr, *port, &names).to_string()
            }
            Destination::Ip { addr, port } => connect_rule(policy, *addr, *port),
            Destination::Unix { name, .. } => connect.decide_unix(name).1,
            Destination::Other { .. } => {
                format!("connect other_families {}", connect.other_families)
            }
            Destination::RawSocket { .. } => {
                format!("connect raw_sockets {}", connect.raw_sockets)
            }
        }
    }

    fn target(request: &ConnectRequest, _enricher: &Enricher) -> model::Target {
        connect_target(&request.destination, request.sock_type, &request.resolved)
    }

    fn kernel_facts(request: &ConnectRequest) -> KernelFacts {
        let mut facts = request::kernel_facts(&request.origin, None, Some(request.sock_type));
        facts.call = Some(request.via.as_str().to_owned());
        facts
    }
}

/// The rule that decided a connect to `addr:port`.
#[must_use]
pub fn connect_rule(policy: &Policy, addr: IpAddr, port: u16) -> String {
    let addr = addr.to_canonical();
    let best = policy
        .connect
        .rules
        .iter()
        .filter(|rule| rule.net.contains(&addr) && rule.ports.contains(port))
        .min_by_key(|rule| rule_order(rule));
    match best {
        Some(rule) => format!("connect {rule}"),
        None => format!("connect default {}", policy.connect.default),
    }
}

/// Sort key of a connect rule: the first in this order that matches decides.
fn rule_order(rule: &ConnectRule) -> (std::cmp::Reverse<u8>, bool, u32) {
    (
        std::cmp::Reverse(rule.net.prefix_len()),
        rule.ports.is_all(),
        rule.ports.len(),
    )
}

/// The [`RuleKey`] of a `UNIX_RULES` entry: the name's hash, big endian
/// (keys order and compare as bytes).
#[must_use]
pub fn unix_rule_key(policy_id: u32, name: u64) -> RuleKey {
    RuleKey {
        map: map_names::UNIX_RULES,
        policy_id,
        key: name.to_be_bytes().to_vec(),
    }
}

/// The [`RuleKey`] of a connect entry: the LPM prefix length (including the
/// 32 policy bits), then the network's address.
#[must_use]
pub fn rule_key(map: &'static str, policy_id: u32, prefix: u32, addr: &[u8]) -> RuleKey {
    let mut key = Vec::with_capacity(4 + addr.len());
    key.extend_from_slice(&prefix.to_be_bytes());
    key.extend_from_slice(addr);
    RuleKey {
        map,
        policy_id,
        key,
    }
}

/// (prefix length, address) of a [`rule_key`].
#[must_use]
pub fn split_key(key: &[u8]) -> (u32, &[u8]) {
    let mut prefix = [0; 4];
    if let Some(bytes) = key.get(..4) {
        prefix.copy_from_slice(bytes);
    }
    (u32::from_be_bytes(prefix), key.get(4..).unwrap_or_default())
}

/// Encodes a `PortRules` value: per rule `port_lo`, `port_hi` (u16) and
/// `action` (u32), native endian.
#[must_use]
pub fn encode_rules(rules: &PortRules) -> Vec<u8> {
    let mut out = Vec::with_capacity(PORT_RULES * 8);
    for rule in &rules.rules {
        out.extend_from_slice(&rule.port_lo.to_ne_bytes());
        out.extend_from_slice(&rule.port_hi.to_ne_bytes());
        out.extend_from_slice(&rule.action.to_ne_bytes());
    }
    out
}

/// The inverse of [`encode_rules`] (missing bytes read as zero: no rule).
#[must_use]
pub fn decode_rules(bytes: &[u8]) -> PortRules {
    let mut rules = PortRules::default();
    for (slot, chunk) in rules.rules.iter_mut().zip(bytes.chunks_exact(8)) {
        *slot = PortRule {
            port_lo: u16::from_ne_bytes([chunk[0], chunk[1]]),
            port_hi: u16::from_ne_bytes([chunk[2], chunk[3]]),
            action: u32::from_ne_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
        };
    }
    rules
}

/// How reviewers see an `AF_UNIX` name (exactly the bytes within the
/// caller's length, those the kernel's digest covers): a pathname up to its
/// NUL, as the kernel resolves it (bytes after the NUL are hashed but
/// ignored by the kernel, so names differing only there read the same and
/// are two requests); an abstract name (leading NUL) as `@name`, every byte
/// of its length, where a NUL reads `\x00` (trailing ones too: `@a` and
/// `@a\x00` are two sockets), a byte that is not UTF-8 `\xNN` and a
/// backslash `\\`, so two names the digest tells apart read differently.
fn unix_name(raw: &[u8]) -> String {
    if raw.first() != Some(&0) {
        return c_string(raw);
    }
    let mut shown = String::from("@");
    for chunk in raw[1..].utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\0' => shown.push_str("\\x00"),
                '\\' => shown.push_str("\\\\"),
                c => shown.push(c),
            }
        }
        for byte in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(shown, "\\x{byte:02x}");
        }
    }
    shown
}

fn connect_request(raw: &ConnectEvent) -> ConnectRequest {
    let destination = match raw.family {
        AF_INET => Destination::Ip {
            addr: IpAddr::V4(Ipv4Addr::new(
                raw.addr[0],
                raw.addr[1],
                raw.addr[2],
                raw.addr[3],
            )),
            port: raw.port,
        },
        AF_INET6 => Destination::Ip {
            addr: IpAddr::V6(Ipv6Addr::from(raw.addr)),
            port: raw.port,
        },
        AF_UNIX => {
            // The kernel's length, bounded by the buffer whatever a record says.
            let len = usize::try_from(raw.unix_len).map_or(0, |len| len.min(raw.unix_path.len()));
            let name = &raw.unix_path[..len];
            Destination::Unix {
                path: unix_name(name),
                name: name.to_vec(),
            }
        }
        family => Destination::Other { family },
    };
    let (via, destination) = match raw.op {
        connect_op::SENDMSG => (Via::Sendmsg, destination),
        connect_op::SOCKET => (
            Via::Socket,
            Destination::RawSocket {
                family: raw.family,
                protocol: raw.port,
            },
        ),
        _ => (Via::Connect, destination),
    };
    // The kernel decided after the agent had processed every DNS answer of
    // this workload (it waits otherwise), so these are the names it used.
    let resolved = match &destination {
        Destination::Ip { addr, .. } => crate::dns::names_for(raw.header.cgroup_id, *addr)
            .into_iter()
            .take(limits::MAX_RESOLVED)
            .map(|name| request::bounded(&name, limits::MAX_HOST_NAME))
            .collect(),
        _ => Vec::new(),
    };
    ConnectRequest {
        origin: origin(&raw.header),
        destination,
        sock_type: raw.sock_type,
        via,
        resolved,
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Ip {
                addr: IpAddr::V4(addr),
                port,
            } => write!(f, "{addr}:{port}"),
            Destination::Ip {
                addr: IpAddr::V6(addr),
                port,
            } => write!(f, "[{addr}]:{port}"),
            Destination::Unix { path, .. } => write!(f, "unix:{path}"),
            Destination::Other { family } => write!(f, "family {family}"),
            Destination::RawSocket { family, protocol } => {
                write!(f, "raw socket (family {family}, protocol {protocol})")
            }
        }
    }
}

/// A connect's target.
#[must_use]
pub fn connect_target(destination: &Destination, sock_type: u32, resolved: &[String]) -> Target {
    let socket_type = match sock_type {
        1 => SocketType::Stream,
        2 => SocketType::Dgram,
        3 => SocketType::Raw,
        5 => SocketType::Seqpacket,
        _ => SocketType::Other,
    };
    Target::Connect(match destination {
        Destination::Ip { addr, port } => ConnectTarget {
            family: if addr.is_ipv4() {
                Family::Inet
            } else {
                Family::Inet6
            },
            address: addr.to_string(),
            port: *port,
            socket_type,
            resolved: resolved.to_vec(),
        },
        Destination::Unix { path, .. } => ConnectTarget {
            family: Family::Unix,
            address: if path.is_empty() {
                "(unnamed)".to_owned()
            } else {
                request::bounded(&path.replace('\0', "@"), limits::MAX_PATH)
            },
            port: 0,
            socket_type,
            resolved: Vec::new(),
        },
        Destination::Other { family } => ConnectTarget {
            family: Family::Unix,
            address: format!("(address family {family})"),
            port: 0,
            socket_type,
            resolved: Vec::new(),
        },
        Destination::RawSocket { family, protocol } => ConnectTarget {
            family: match *family {
                2 => Family::Inet,
                10 => Family::Inet6,
                _ => Family::Unix,
            },
            address: format!("(new raw socket: address family {family}, protocol {protocol})"),
            port: 0,
            socket_type,
            resolved: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use gatekeep_common::action;

    use super::*;

    #[test]
    fn unix_names_read_as_the_kernel_hashes_them() {
        let mut raw = [0u8; 108];
        raw[..9].copy_from_slice(b"/run/sock");
        assert_eq!(unix_name(&raw), "/run/sock");
        // Abstract: leading NUL; interior NULs and backslashes kept apart.
        assert_eq!(unix_name(b"\0a\0b\\c"), "@a\\x00b\\\\c");
        let mut raw = *b"\0name";
        assert_eq!(unix_name(&raw), "@name");
        raw[1] = 0xff;
        assert_eq!(unix_name(&raw), "@\\xffame");
        assert_eq!(unix_name(b"\0"), "@", "an empty abstract name");
        // Trailing NULs within the caller's length are part of the name.
        assert_eq!(unix_name(b"\0name\0\0"), "@name\\x00\\x00");
        assert_ne!(unix_name(b"\0name\0"), unix_name(b"\0name"));
    }

    #[test]
    fn rule_keys_and_values_round_trip() {
        let key = rule_key(
            map_names::CONNECT_V6,
            7,
            32 + 48,
            &[0x20, 0x01, 0x0d, 0xb8, 0, 1],
        );
        assert_eq!(key.policy_id, 7);
        assert_eq!(
            split_key(&key.key),
            (80, &[0x20, 0x01, 0x0d, 0xb8, 0, 1][..])
        );

        let mut rules = PortRules::default();
        rules.rules[0] = PortRule {
            port_lo: 443,
            port_hi: 443,
            action: action::ALLOW,
        };
        rules.rules[1] = PortRule {
            port_lo: 0,
            port_hi: u16::MAX,
            action: action::DENY,
        };
        let encoded = encode_rules(&rules);
        assert_eq!(encoded.len(), PORT_RULES * size_of::<PortRule>());
        assert_eq!(decode_rules(&encoded), rules);
    }
}
