//! Property tests of connect rules (issue 24, item 2): on random valid policies and random
//! destinations,
//!
//! 1. the policy model ([`gatekeep_policy::ConnectPolicy::action_for`]) agrees with a naive
//!    reference written here from the documented rules (longest prefix wins, then a
//!    port-specific rule over an all-ports one, else the default; `0.0.0.0`/`::` are the
//!    loopback, IPv4-mapped IPv6 is IPv4);
//! 2. the map entries the agent compiles, applied to in-memory maps and read back, are the
//!    entries compiled (keys and values decode and re-encode to the same bytes), and a lookup
//!    done the kernel's way over the decoded entries (LPM: the longest prefix of the policy
//!    holding the address, then the first port rule holding the port) decides the same.
//!
//! Case counts are small so the whole file runs in about a second.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use gatekeep_agent::{
    hooks::{
        connect::{decode_rules, encode_rules, rule_key, split_key},
        kernel_action,
    },
    policy::{HostView, MemoryMaps, PolicyMaps as _, apply, compile},
};
use gatekeep_common::{PortRules, action, map_names};
use gatekeep_policy::{Action, PolicySet, parse_str};
use proptest::prelude::*;

/// One rule as generated: network bytes (4 or 16), prefix length, ports, action.
#[derive(Debug, Clone)]
struct GenRule {
    addr: Vec<u8>,
    prefix: u8,
    ports: Option<(u16, u16)>,
    action: Action,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Ask)]
}

/// Addresses from a small space so that networks overlap often.
fn v4_addr() -> impl Strategy<Value = [u8; 4]> {
    (
        prop_oneof![Just(10u8), Just(127), Just(192)],
        0u8..3,
        0u8..3,
        0u8..4,
    )
        .prop_map(|(a, b, c, d)| [a, b, c, d])
}

fn v6_addr() -> impl Strategy<Value = [u8; 16]> {
    (0u8..3, 0u8..3, 0u8..3).prop_map(|(a, b, c)| {
        let mut out = [0u8; 16];
        out[0] = 0x20;
        out[1] = 0x01;
        out[2] = a;
        out[7] = b;
        out[15] = c;
        out
    })
}

/// Port ranges from a small space, so that ranges overlap often.
fn ports() -> impl Strategy<Value = Option<(u16, u16)>> {
    prop_oneof![
        2 => Just(None),
        3 => (1u16..40, 0u16..8).prop_map(|(lo, len)| Some((lo, lo + len))),
        1 => Just(Some((1, 65535))),
    ]
}

/// The network of `addr` at `prefix` (host bits cleared).
fn truncate(addr: &[u8], prefix: u8) -> Vec<u8> {
    addr.iter()
        .enumerate()
        .map(|(i, byte)| {
            let bits = (usize::from(prefix).saturating_sub(i * 8)).min(8);
            if bits == 0 {
                0
            } else {
                byte & (0xffu8 << (8 - bits))
            }
        })
        .collect()
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    let v4 = (
        v4_addr(),
        prop_oneof![Just(0u8), Just(8), Just(16), Just(24), Just(32), 0u8..=32],
    )
        .prop_map(|(addr, prefix)| (truncate(&addr, prefix), prefix));
    let v6 = (
        v6_addr(),
        prop_oneof![Just(0u8), Just(16), Just(64), Just(128), 0u8..=128],
    )
        .prop_map(|(addr, prefix)| (truncate(&addr, prefix), prefix));
    (prop_oneof![3 => v4, 1 => v6], ports(), action()).prop_map(
        |((addr, prefix), ports, action)| GenRule {
            addr,
            prefix,
            ports,
            action,
        },
    )
}

fn overlaps(a: Option<(u16, u16)>, b: Option<(u16, u16)>) -> bool {
    let (a, b) = (a.unwrap_or((1, 65535)), b.unwrap_or((1, 65535)));
    a.0 <= b.1 && b.0 <= a.1
}

/// Drops the rules a policy file may not hold: the same network and ports twice, and
/// overlapping port ranges at the same network under different actions. At most 16 rules
/// may cover one network (`PORT_RULES`), so keep the set small.
fn valid(rules: Vec<GenRule>) -> Vec<GenRule> {
    let mut kept: Vec<GenRule> = Vec::new();
    for rule in rules {
        let clash = kept.iter().any(|k| {
            k.addr == rule.addr
                && k.prefix == rule.prefix
                && (k.ports == rule.ports
                    || (k.action != rule.action && overlaps(k.ports, rule.ports)))
        });
        if !clash {
            kept.push(rule);
        }
    }
    kept
}

fn target(rule: &GenRule) -> String {
    let net = if rule.addr.len() == 4 {
        let addr = Ipv4Addr::new(rule.addr[0], rule.addr[1], rule.addr[2], rule.addr[3]);
        format!("{addr}/{}", rule.prefix)
    } else {
        let bytes: [u8; 16] = rule.addr.clone().try_into().expect("16 bytes");
        format!("[{}]/{}", Ipv6Addr::from(bytes), rule.prefix)
    };
    match rule.ports {
        None => net,
        Some((lo, hi)) if lo == hi => format!("{net}:{lo}"),
        Some((lo, hi)) => format!("{net}:{lo}-{hi}"),
    }
}

/// The policy file for `rules` under `default`.
fn policy_text(rules: &[GenRule], default: Action) -> String {
    let mut text = format!(
        "[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/p\"]\n[policy.connect]\ndefault = \"{default}\"\n"
    );
    for wanted in [Action::Allow, Action::Deny, Action::Ask] {
        let targets: Vec<String> = rules
            .iter()
            .filter(|r| r.action == wanted)
            .map(|r| format!("{:?}", target(r)))
            .collect();
        writeln!(text, "{wanted} = [{}]", targets.join(", ")).expect("write to a String");
    }
    text
}

/// What the documented rules say, computed the plain way: every rule holding the address
/// and port; the longest prefix; port-specific over all-ports; else the default.
fn reference(rules: &[GenRule], default: Action, addr: IpAddr, port: u16) -> Action {
    let bytes = address_bytes(addr);
    let holds = |rule: &GenRule| {
        rule.addr.len() == bytes.len()
            && truncate(&bytes, rule.prefix) == rule.addr
            && rule.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi)
    };
    let matching: Vec<&GenRule> = rules.iter().filter(|r| holds(r)).collect();
    let Some(longest) = matching.iter().map(|r| r.prefix).max() else {
        return default;
    };
    let at_longest: Vec<&&GenRule> = matching.iter().filter(|r| r.prefix == longest).collect();
    let specific: Vec<&&GenRule> = at_longest
        .iter()
        .copied()
        .filter(|r| r.ports.is_some())
        .collect();
    let winners = if specific.is_empty() {
        at_longest
    } else {
        specific
    };
    let actions: BTreeSet<&str> = winners.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions.len(),
        1,
        "a valid policy never leaves two actions at one prefix: {winners:?}"
    );
    winners[0].action
}

/// The bytes a destination is matched by: `0.0.0.0` and `::` reach the loopback; an
/// IPv4-mapped IPv6 address is IPv4.
fn address_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => address_bytes(IpAddr::V4(v4)),
            None if v6.is_unspecified() => Ipv6Addr::LOCALHOST.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv4Addr::LOCALHOST.octets().to_vec(),
        IpAddr::V4(v4) => v4.octets().to_vec(),
    }
}

/// Destinations near the generated networks, and the special ones.
fn destination() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        4 => v4_addr().prop_map(|a| IpAddr::V4(a.into())),
        2 => v6_addr().prop_map(|a| IpAddr::V6(a.into())),
        1 => v4_addr().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
        1 => prop_oneof![
            Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            Just(IpAddr::V6(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped())),
            Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ],
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 1u16..50, 1 => Just(65535u16), 1 => any::<u16>().prop_map(|p| p.max(1))]
}

/// A parsed policy set from generated rules (every generated set is valid).
fn load(rules: &[GenRule], default: Action) -> PolicySet {
    let text = policy_text(rules, default);
    parse_str("props.toml", &text)
        .unwrap_or_else(|err| panic!("generated policy refused:\n{text}\n{err}"))
}

/// One decoded connect entry: (map, policy id, LPM prefix length, address, rules).
type Entry = (&'static str, u32, u32, Vec<u8>, PortRules);

/// The kernel's decision over decoded entries (`gatekeep-ebpf/src/hooks/connect.rs`:
/// `lookup_v4`/`lookup_v6` then `port_action`, the policy default when nothing matches).
fn kernel_decides(entries: &[Entry], policy_id: u32, addr: IpAddr, port: u16, default: u32) -> u32 {
    let bytes = address_bytes(addr);
    let map = if bytes.len() == 4 {
        map_names::CONNECT_V4
    } else {
        map_names::CONNECT_V6
    };
    // The key is (policy id, address); the LPM prefix counts the 32 policy-id bits.
    let best = entries
        .iter()
        .filter(|(m, id, prefix, key_addr, _)| {
            let bits = u8::try_from(prefix - 32).expect("a prefix past the policy id");
            *m == map && *id == policy_id && truncate(&bytes, bits) == *key_addr
        })
        .max_by_key(|(_, _, prefix, _, _)| *prefix);
    let Some((.., rules)) = best else {
        return default;
    };
    rules
        .rules
        .iter()
        .take_while(|r| r.action != action::NONE)
        .find(|r| r.port_lo <= port && port <= r.port_hi)
        .map_or(default, |r| r.action)
}

fn host() -> HostView {
    HostView {
        cgroup_root: std::env::temp_dir().join("gatekeep-props-no-cgroups"),
        own_cgroup: None,
        protected: Vec::new(),
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_policy_model_decides_like_the_naive_reference(
        rules in proptest::collection::vec(gen_rule(), 0..12).prop_map(valid),
        default in action(),
        probes in proptest::collection::vec((destination(), port()), 1..24),
    ) {
        let set = load(&rules, default);
        let connect = &set.policies[0].connect;
        for (addr, port) in probes {
            prop_assert_eq!(
                connect.action_for(addr, port),
                reference(&rules, default, addr, port),
                "{}:{} under\n{}", addr, port, policy_text(&rules, default)
            );
        }
    }

    #[test]
    fn compiled_entries_read_back_losslessly_and_decide_like_the_model(
        rules in proptest::collection::vec(gen_rule(), 0..12).prop_map(valid),
        default in action(),
        policy_id in 0u32..64,
        probes in proptest::collection::vec((destination(), port()), 1..24),
    ) {
        let set = load(&rules, default);
        let compiled = compile(&set, &[policy_id], 1, &host()).expect("compile");
        let desired = &compiled.state;

        // Written to maps and read back: the same entries.
        let mut maps = MemoryMaps::default();
        apply(&mut maps, desired).expect("apply");
        let read = maps.read_state().expect("read back");
        prop_assert_eq!(&read, desired);

        // Every entry decodes and re-encodes to the same bytes.
        let mut entries: Vec<Entry> = Vec::new();
        for (key, value) in read.rules.iter().filter(|(key, _)| {
            key.map == map_names::CONNECT_V4 || key.map == map_names::CONNECT_V6
        }) {
            let (prefix, addr) = split_key(&key.key);
            prop_assert_eq!(&rule_key(key.map, key.policy_id, prefix, addr), key);
            let decoded = decode_rules(value);
            prop_assert_eq!(&encode_rules(&decoded), value);
            entries.push((key.map, key.policy_id, prefix, addr.to_vec(), decoded));
        }
        // One entry per distinct network, in the policy's own id.
        let networks: BTreeSet<(Vec<u8>, u8)> =
            rules.iter().map(|r| (r.addr.clone(), r.prefix)).collect();
        prop_assert_eq!(entries.len(), networks.len());
        prop_assert!(entries.iter().all(|e| e.1 == policy_id));

        let defaults = read.policies.get(&policy_id).copied().unwrap_or_default();
        prop_assert_eq!(defaults.connect_default, kernel_action(default));
        for (addr, port) in probes {
            let model = set.policies[0].connect.action_for(addr, port);
            prop_assert_eq!(
                kernel_decides(&entries, policy_id, addr, port, defaults.connect_default),
                kernel_action(model),
                "{}:{} under\n{}", addr, port, policy_text(&rules, default)
            );
            // Another policy's entries never decide for this one.
            prop_assert_eq!(
                kernel_decides(&entries, policy_id + 1, addr, port, action::NONE),
                action::NONE
            );
        }
    }

    #[test]
    fn port_rules_round_trip_through_their_encoding(
        raw in proptest::collection::vec((any::<u16>(), any::<u16>(), 0u32..4), 0..=16),
    ) {
        let mut rules = PortRules::default();
        for (slot, (lo, hi, action)) in rules.rules.iter_mut().zip(raw) {
            slot.port_lo = lo;
            slot.port_hi = hi;
            slot.action = action;
        }
        prop_assert_eq!(decode_rules(&encode_rules(&rules)), rules);
    }
}
