//! What each workload (cgroup) resolved: the queries it sent, which
//! answers are believed, which names stand for which addresses until when,
//! and the `HOST_RULES` entries that follows from a policy's host rules.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use gatekeep_common::{HostRules, PORT_RULES, PortRule, PortRules};
use gatekeep_policy::{Action, ConnectPolicy, strictest};

use super::message::Parsed;

/// How long a query waits for its answer.
pub const QUERY_TIMEOUT_NS: u64 = 30 * NS_PER_S;
/// Shortest validity of an answer: a TTL of 0 still covers the connect
/// that follows it at once.
pub const MIN_TTL_S: u32 = 1;
/// Longest validity of an answer, whatever its TTL says.
pub const MAX_TTL_S: u32 = 24 * 3600;
/// Most queries waiting for answers (the oldest go first).
pub const MAX_QUERIES: usize = 4096;
/// Most (name, address) pairs remembered per workload.
pub const MAX_RESOLVED: usize = 4096;
const NS_PER_S: u64 = 1_000_000_000;

/// A DNS datagram a workload sent or received, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub cgroup_id: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ktime_ns: u64,
}

/// A query the workload sent and no answer matched yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct QueryKey {
    cgroup_id: u64,
    resolver: IpAddr,
    /// The workload's port the answer must come back to.
    port: u16,
    id: u16,
    name: String,
}

/// Why an answer was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Its source is not one of the configured resolvers.
    NotAResolver,
    /// No query of this workload (same resolver, port, id and name) waits
    /// for it: unsolicited, forged, or a duplicate.
    Unsolicited,
}

impl Ignored {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NotAResolver => "not from a configured resolver",
            Ignored::Unsolicited => "answers no query the workload sent",
        }
    }
}

/// Everything learned, per workload.
#[derive(Debug, Default)]
pub struct Table {
    queries: BTreeMap<QueryKey, u64>,
    /// cgroup -> address -> name -> expiry (boot-time ns).
    resolved: HashMap<u64, BTreeMap<IpAddr, BTreeMap<String, u64>>>,
}

impl Table {
    /// Remembers a query the workload sent.
    pub fn query(&mut self, packet: &Packet, parsed: &Parsed) {
        if parsed.response {
            return;
        }
        let key = QueryKey {
            cgroup_id: packet.cgroup_id,
            resolver: packet.dst.to_canonical(),
            port: packet.sport,
            id: parsed.id,
            name: parsed.name.clone(),
        };
        self.queries.insert(key, packet.ktime_ns);
        let now = packet.ktime_ns;
        self.queries
            .retain(|_, sent| now.saturating_sub(*sent) < QUERY_TIMEOUT_NS);
        while self.queries.len() > MAX_QUERIES {
            let oldest = self
                .queries
                .iter()
                .min_by_key(|(_, sent)| **sent)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.queries.remove(&oldest);
            }
        }
    }

    /// Takes in an answer the workload received: believed only from a
    /// resolver in `resolvers`, for a query the workload sent to it (same
    /// port, id and name), once. Returns the addresses whose names changed.
    pub fn answer(
        &mut self,
        packet: &Packet,
        parsed: &Parsed,
        resolvers: &[IpAddr],
    ) -> Result<Vec<IpAddr>, Ignored> {
        let resolver = packet.src.to_canonical();
        if !resolvers.iter().any(|r| r.to_canonical() == resolver) {
            return Err(Ignored::NotAResolver);
        }
        let key = QueryKey {
            cgroup_id: packet.cgroup_id,
            resolver,
            port: packet.dport,
            id: parsed.id,
            name: parsed.name.clone(),
        };
        let Some(sent) = self.queries.remove(&key) else {
            return Err(Ignored::Unsolicited);
        };
        if packet.ktime_ns.saturating_sub(sent) >= QUERY_TIMEOUT_NS {
            return Err(Ignored::Unsolicited);
        }
        let by_addr = self.resolved.entry(packet.cgroup_id).or_default();
        let mut changed = Vec::new();
        for (addr, ttl) in &parsed.addresses {
            let ttl = (*ttl).clamp(MIN_TTL_S, MAX_TTL_S);
            let expires = packet.ktime_ns + u64::from(ttl) * NS_PER_S;
            let addr = addr.to_canonical();
            let names = by_addr.entry(addr).or_default();
            let slot = names.entry(parsed.name.clone()).or_insert(0);
            *slot = (*slot).max(expires);
            changed.push(addr);
        }
        let count: usize = by_addr.values().map(BTreeMap::len).sum();
        if count > MAX_RESOLVED {
            // Forget the soonest to expire first.
            let mut all: Vec<(u64, IpAddr, String)> = by_addr
                .iter()
                .flat_map(|(addr, names)| {
                    names
                        .iter()
                        .map(move |(name, expires)| (*expires, *addr, name.clone()))
                })
                .collect();
            all.sort();
            for (_, addr, name) in all.into_iter().take(count - MAX_RESOLVED) {
                if let Some(names) = by_addr.get_mut(&addr) {
                    names.remove(&name);
                }
                changed.push(addr);
            }
        }
        changed.sort();
        changed.dedup();
        Ok(changed)
    }

    /// Forgets what expired by `now_ns`; returns (cgroup, address) pairs
    /// whose names changed.
    pub fn expire(&mut self, now_ns: u64) -> Vec<(u64, IpAddr)> {
        let mut changed = Vec::new();
        for (cgroup, by_addr) in &mut self.resolved {
            for (addr, names) in by_addr.iter_mut() {
                let before = names.len();
                names.retain(|_, expires| *expires > now_ns);
                if names.len() != before {
                    changed.push((*cgroup, *addr));
                }
            }
            by_addr.retain(|_, names| !names.is_empty());
        }
        self.resolved.retain(|_, by_addr| !by_addr.is_empty());
        changed
    }

    /// Forgets a workload entirely (its cgroup is gone).
    pub fn forget(&mut self, cgroup_id: u64) -> Vec<IpAddr> {
        self.queries.retain(|key, _| key.cgroup_id != cgroup_id);
        self.resolved
            .remove(&cgroup_id)
            .map(|by_addr| by_addr.into_keys().collect())
            .unwrap_or_default()
    }

    /// The names `cgroup_id` resolved to `addr` that are fresh at `now_ns`.
    #[must_use]
    pub fn names(&self, cgroup_id: u64, addr: IpAddr, now_ns: u64) -> Vec<String> {
        self.resolved
            .get(&cgroup_id)
            .and_then(|by_addr| by_addr.get(&addr.to_canonical()))
            .map(|names| {
                names
                    .iter()
                    .filter(|(_, expires)| **expires > now_ns)
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The names `cgroup_id` resolved to `addr`, with their expiry.
    #[must_use]
    pub fn names_until(&self, cgroup_id: u64, addr: IpAddr) -> Vec<(String, u64)> {
        self.resolved
            .get(&cgroup_id)
            .and_then(|by_addr| by_addr.get(&addr.to_canonical()))
            .map(|names| names.iter().map(|(n, e)| (n.clone(), *e)).collect())
            .unwrap_or_default()
    }

    /// Every (cgroup, address) known.
    #[must_use]
    pub fn pairs(&self) -> Vec<(u64, IpAddr)> {
        self.resolved
            .iter()
            .flat_map(|(cgroup, by_addr)| by_addr.keys().map(move |addr| (*cgroup, *addr)))
            .collect()
    }

    /// The earliest expiry of anything learned.
    #[must_use]
    pub fn next_expiry(&self) -> Option<u64> {
        self.resolved
            .values()
            .flat_map(|by_addr| by_addr.values())
            .flat_map(|names| names.values().copied())
            .min()
    }

    /// The `HOST_RULES` entry for `cgroup_id` and `addr` under `policy`:
    /// per port, the strictest of the host rules of the fresh names (each
    /// name's most specific rule), valid until the earliest expiry of the
    /// names that gave a rule. `None`: no host rule applies (no entry).
    #[must_use]
    pub fn entry(
        &self,
        cgroup_id: u64,
        addr: IpAddr,
        policy: &ConnectPolicy,
        now_ns: u64,
    ) -> Option<HostRules> {
        let names: Vec<(String, u64)> = self
            .resolved
            .get(&cgroup_id)?
            .get(&addr.to_canonical())?
            .iter()
            .filter(|(_, expires)| **expires > now_ns)
            .map(|(name, expires)| (name.clone(), *expires))
            .collect();
        host_rules(policy, &names)
    }
}

/// Merges the host rules of `names` (name, expiry) into port rules.
#[must_use]
pub fn host_rules(policy: &ConnectPolicy, names: &[(String, u64)]) -> Option<HostRules> {
    let mut bounds: BTreeSet<u32> = BTreeSet::new();
    let mut expires = u64::MAX;
    for (name, until) in names {
        let mut any = false;
        for rule in policy
            .hosts
            .iter()
            .filter(|rule| rule.pattern.matches(name))
        {
            bounds.insert(u32::from(rule.ports.0));
            bounds.insert(u32::from(rule.ports.1) + 1);
            any = true;
        }
        if any {
            expires = expires.min(*until);
        }
    }
    if bounds.is_empty() {
        return None;
    }
    // Elementary port intervals, each with one action for every port in it.
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut ranges: Vec<(u16, u16, Action)> = Vec::new();
    for pair in bounds.windows(2) {
        let (lo, hi) = (pair[0], pair[1] - 1);
        let (Ok(lo), Ok(hi)) = (u16::try_from(lo), u16::try_from(hi)) else {
            continue;
        };
        let action = names
            .iter()
            .filter_map(|(name, _)| policy.host_rule_for(name, lo).map(|rule| rule.action))
            .reduce(strictest);
        let Some(action) = action else {
            continue;
        };
        match ranges.last_mut() {
            Some(last) if last.2 == action && u32::from(last.1) + 1 == u32::from(lo) => {
                last.1 = hi;
            }
            _ => ranges.push((lo, hi, action)),
        }
    }
    if ranges.is_empty() {
        return None;
    }
    if ranges.len() > PORT_RULES {
        // Keep the strictest: an allow left out falls back to the network
        // rules and the default, never the other way round.
        ranges.sort_by_key(|(_, _, action)| std::cmp::Reverse(strictness(*action)));
        ranges.truncate(PORT_RULES);
        tracing::warn!(
            "host rules give an address more than {PORT_RULES} port ranges; the least strict are left to the network rules and the default"
        );
    }
    let mut rules = PortRules::default();
    for (slot, (lo, hi, action)) in rules.rules.iter_mut().zip(&ranges) {
        *slot = PortRule {
            port_lo: *lo,
            port_hi: *hi,
            action: kernel_action(*action),
        };
    }
    Some(HostRules {
        expires_ns: expires,
        rules,
    })
}

/// The kernel's [`gatekeep_common::action`] for a policy action (as the
/// hooks compile rules; written here so `dns` does not use `hooks`, which
/// uses `dns`).
fn kernel_action(action: Action) -> u32 {
    match action {
        Action::Allow => gatekeep_common::action::ALLOW,
        Action::Deny => gatekeep_common::action::DENY,
        Action::Ask => gatekeep_common::action::ASK,
    }
}

fn strictness(action: Action) -> u8 {
    match action {
        Action::Allow => 1,
        Action::Ask => 2,
        Action::Deny => 3,
    }
}

#[cfg(test)]
mod tests {
    use gatekeep_common::action;

    use super::*;
    use crate::dns::message::{
        parse,
        tests::{a, answer, query},
    };

    const S: u64 = NS_PER_S;
    const RESOLVER: [u8; 4] = [127, 0, 0, 53];

    fn policy(text: &str) -> ConnectPolicy {
        gatekeep_policy::parse_str(
            "p.toml",
            &format!("[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.connect]\n{text}"),
        )
        .expect("valid")
        .policies[0]
            .connect
            .clone()
    }

    fn packet(
        cgroup_id: u64,
        from: [u8; 4],
        sport: u16,
        to: [u8; 4],
        dport: u16,
        at: u64,
    ) -> Packet {
        Packet {
            cgroup_id,
            src: IpAddr::from(from),
            dst: IpAddr::from(to),
            sport,
            dport,
            ktime_ns: at,
        }
    }

    fn resolvers() -> Vec<IpAddr> {
        vec![IpAddr::from(RESOLVER)]
    }

    /// The workload of cgroup 7 asks for `name` from port 40000 (id 5) at
    /// `at`; the answer comes back at `at + 1 ms`.
    fn resolve(
        table: &mut Table,
        name: &str,
        addr: [u8; 4],
        ttl: u32,
        at: u64,
    ) -> Result<Vec<IpAddr>, Ignored> {
        let q = parse(&query(5, name)).unwrap();
        table.query(&packet(7, [127, 0, 0, 1], 40000, RESOLVER, 53, at), &q);
        let answer = parse(&answer(5, name, vec![a(name, ttl, addr)])).unwrap();
        table.answer(
            &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, at + 1_000_000),
            &answer,
            &resolvers(),
        )
    }

    #[test]
    fn answers_to_queries_teach_names_until_their_ttl() {
        let mut table = Table::default();
        let ip = IpAddr::from([127, 0, 0, 2]);
        assert_eq!(
            resolve(&mut table, "api.allowed.test.", [127, 0, 0, 2], 2, 10 * S),
            Ok(vec![ip])
        );
        assert_eq!(table.names(7, ip, 11 * S), ["api.allowed.test"]);
        assert!(table.names(8, ip, 11 * S).is_empty(), "per workload");
        assert_eq!(table.next_expiry(), Some(12 * S + 1_000_000));
        assert!(table.expire(11 * S).is_empty());
        assert_eq!(table.expire(13 * S), vec![(7, ip)]);
        assert!(table.names(7, ip, 13 * S).is_empty());
        assert_eq!(table.next_expiry(), None);
    }

    #[test]
    fn forged_unsolicited_and_foreign_answers_are_ignored() {
        let mut table = Table::default();
        let forged = parse(&answer(
            5,
            "api.allowed.test.",
            vec![a("api.allowed.test.", 60, [203, 0, 113, 7])],
        ))
        .unwrap();
        // No query was sent.
        assert_eq!(
            table.answer(
                &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, S),
                &forged,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
        // A query was sent, but the answer comes from elsewhere.
        let q = parse(&query(5, "api.allowed.test.")).unwrap();
        table.query(&packet(7, [127, 0, 0, 1], 40000, RESOLVER, 53, S), &q);
        assert_eq!(
            table.answer(
                &packet(7, [127, 0, 0, 9], 53, [127, 0, 0, 1], 40000, S),
                &forged,
                &resolvers()
            ),
            Err(Ignored::NotAResolver)
        );
        // Another id, another port, another workload: no match.
        let other_id = parse(&answer(6, "api.allowed.test.", vec![])).unwrap();
        assert_eq!(
            table.answer(
                &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, S),
                &other_id,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
        assert_eq!(
            table.answer(
                &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40001, S),
                &forged,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
        assert_eq!(
            table.answer(
                &packet(8, RESOLVER, 53, [127, 0, 0, 1], 40000, S),
                &forged,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
        // The matching one is believed once; a second copy is not.
        assert!(
            table
                .answer(
                    &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, S),
                    &forged,
                    &resolvers()
                )
                .is_ok()
        );
        assert_eq!(
            table.answer(
                &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, S),
                &forged,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
        // A query too old to be answered.
        table.query(&packet(7, [127, 0, 0, 1], 40000, RESOLVER, 53, S), &q);
        assert_eq!(
            table.answer(
                &packet(7, RESOLVER, 53, [127, 0, 0, 1], 40000, S + QUERY_TIMEOUT_NS),
                &forged,
                &resolvers()
            ),
            Err(Ignored::Unsolicited)
        );
    }

    #[test]
    fn entries_merge_names_sharing_an_address_strictest_first() {
        let p = policy(
            "default = \"ask\"\nallow = [\"api.allowed.test:443\", \"cdn.shared.test\"]\ndeny = [\"evil.test:443\"]\nask = [\"*.shared.test:22\"]\n",
        );
        let rules = |entry: &HostRules| -> Vec<(u16, u16, u32)> {
            entry
                .rules
                .rules
                .iter()
                .take_while(|r| r.action != action::NONE)
                .map(|r| (r.port_lo, r.port_hi, r.action))
                .collect()
        };
        let one = host_rules(&p, &[("api.allowed.test".into(), 50)]).unwrap();
        assert_eq!(rules(&one), [(443, 443, action::ALLOW)]);
        assert_eq!(one.expires_ns, 50);
        let shared = host_rules(
            &p,
            &[("api.allowed.test".into(), 50), ("evil.test".into(), 90)],
        )
        .unwrap();
        assert_eq!(rules(&shared), [(443, 443, action::DENY)]);
        assert_eq!(shared.expires_ns, 50);
        // The exact name beats the wildcard, even on the wildcard's port.
        let cdn = host_rules(&p, &[("cdn.shared.test".into(), 70)]).unwrap();
        assert_eq!(rules(&cdn), [(0, 65535, action::ALLOW)]);
        let other = host_rules(&p, &[("x.shared.test".into(), 70)]).unwrap();
        assert_eq!(rules(&other), [(22, 22, action::ASK)]);
        // Two names on one address: per port, the strictest.
        let both = host_rules(
            &p,
            &[("cdn.shared.test".into(), 70), ("x.shared.test".into(), 60)],
        )
        .unwrap();
        assert_eq!(
            rules(&both),
            [
                (0, 21, action::ALLOW),
                (22, 22, action::ASK),
                (23, 65535, action::ALLOW)
            ]
        );
        assert_eq!(both.expires_ns, 60);
        assert_eq!(host_rules(&p, &[("unlisted.test".into(), 70)]), None);
        // Names without rules do not shorten the entry.
        let mixed = host_rules(
            &p,
            &[
                ("api.allowed.test".into(), 50),
                ("unlisted.test".into(), 10),
            ],
        )
        .unwrap();
        assert_eq!(mixed.expires_ns, 50);
    }

    #[test]
    fn table_entries_expire_with_the_answers() {
        let p = policy("allow = [\"api.allowed.test:443\"]\n");
        let mut table = Table::default();
        resolve(&mut table, "api.allowed.test.", [127, 0, 0, 2], 5, S).unwrap();
        let ip = IpAddr::from([127, 0, 0, 2]);
        assert!(table.entry(7, ip, &p, 2 * S).is_some());
        assert_eq!(table.entry(7, ip, &p, 7 * S), None);
        assert_eq!(
            table.entry(7, IpAddr::from([127, 0, 0, 3]), &p, 2 * S),
            None
        );
    }
}
