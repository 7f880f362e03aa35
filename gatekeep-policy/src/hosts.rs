//! Host-name connect rules (issue 20, item 3): `api.github.com:443`,
//! `*.internal.example.com`, in the same `allow`/`deny`/`ask` lists as the
//! network rules, and how they combine with those (docs/policy-hosts.md).
//!
//! A host rule applies to a connect when the workload itself resolved one
//! of the names it matches to the connect's address, within the answer's TTL
//! (the agent learns that from the DNS answers the workload received). The
//! decision:
//!
//! 1. for each name the workload resolved to the address (and whose answer
//!    is fresh), the most specific host rule matching the name and port
//!    applies: an exact name before any wildcard, a longer wildcard suffix
//!    before a shorter one, then (same pattern) a port-specific rule before
//!    an all-ports one, a narrower range before a wider one;
//! 2. every rule that applies (those of step 1, and the most specific
//!    network rule of [`ConnectPolicy::rule_for`]) votes, and the strictest
//!    vote wins: deny, then ask, then allow;
//! 3. no rule applies: the policy default.
//!
//! So a host rule never loosens a network rule (a name whose DNS someone
//! else controls can resolve to any address: DNS rebinding), and several
//! names sharing an address (a CDN) give the strictest of their rules.

use std::{fmt, net::IpAddr};

pub use crate::model::normalize;
use crate::model::{Action, ConnectPolicy, ConnectRule, HostPattern, HostRule, PortRange};

/// Strictness of an action: deny > ask > allow.
#[must_use]
pub fn strictness(action: Action) -> u8 {
    match action {
        Action::Allow => 1,
        Action::Ask => 2,
        Action::Deny => 3,
    }
}

/// The stricter of two actions.
#[must_use]
pub fn strictest(a: Action, b: Action) -> Action {
    if strictness(b) > strictness(a) { b } else { a }
}

/// Whether a connect target is written as a host name (letters or `*` in
/// an address part without brackets, `/` or a second `:`): such targets are
/// parsed by [`parse_host_target`], all others as networks.
#[must_use]
pub(crate) fn is_host_target(text: &str) -> bool {
    let text = text.trim();
    if text.starts_with('[') || text.contains('/') || text.matches(':').count() > 1 {
        return false;
    }
    let host = text.split_once(':').map_or(text, |(host, _)| host);
    host.chars().any(|c| c.is_ascii_alphabetic() || c == '*')
}

/// Parses `NAME[:PORTS]` or `*.SUFFIX[:PORTS]`; the error is the message.
pub(crate) fn parse_host_target(text: &str) -> Result<(HostPattern, PortRange), String> {
    let text = text.trim();
    let (host, ports) = match text.split_once(':') {
        Some((host, ports)) => (host, Some(ports)),
        None => (text, None),
    };
    let ports = match ports {
        None => PortRange::ALL,
        Some(ports) => crate::net::parse_ports(text, ports).map_err(|e| e.to_string())?,
    };
    let lower = host.to_ascii_lowercase();
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.contains('*') {
        return Err(format!(
            "\"{text}\" has a `*` that is not the whole first label; write a wildcard as *.example.com (every name below example.com)"
        ));
    }
    check_name(text, name, wildcard)?;
    let pattern = if wildcard {
        HostPattern::Wildcard(name.to_owned())
    } else {
        HostPattern::Exact(name.to_owned())
    };
    Ok((pattern, ports))
}

/// DNS name syntax: labels of 1-63 letters, digits, `-` or `_` (not
/// starting or ending with `-`), at most 253 bytes; a wildcard's suffix
/// needs two labels (`*.com` would match half the Internet).
fn check_name(text: &str, name: &str, wildcard: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!(
            "\"{text}\" names no host (expected e.g. api.github.com:443 or *.example.com:443)"
        ));
    }
    if name.len() > 253 {
        return Err(format!(
            "host name in \"{text}\" is longer than 253 bytes, which DNS cannot resolve"
        ));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!(
                "invalid label \"{label}\" in host name \"{text}\" (labels are 1-63 letters, digits, `-` or `_`, e.g. api.github.com)"
            ));
        }
    }
    if wildcard && !name.contains('.') {
        return Err(format!(
            "wildcard \"{text}\" covers a whole top-level domain; name at least two labels, e.g. *.example.com"
        ));
    }
    if name.parse::<IpAddr>().is_ok()
        || name
            .split('.')
            .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "\"{text}\" is neither an IP network nor a host name"
        ));
    }
    Ok(())
}

impl ConnectPolicy {
    /// The host rule that applies to a connect to port `port` of an address
    /// the workload resolved `name` to (the most specific; see the module
    /// documentation), or `None`.
    #[must_use]
    pub fn host_rule_for(&self, name: &str, port: u16) -> Option<&HostRule> {
        self.hosts
            .iter()
            .filter(|rule| rule.ports.contains(port) && rule.pattern.matches(name))
            .max_by_key(|rule| {
                (
                    rule.pattern.specificity(),
                    !rule.ports.is_all(),
                    std::cmp::Reverse(rule.ports.len()),
                )
            })
    }

    /// The decision for a connect to `addr:port` by a workload that
    /// resolved `names` to `addr` (fresh answers only), with the rule that
    /// decided: see the module documentation.
    #[must_use]
    pub fn decide_resolved(&self, addr: IpAddr, port: u16, names: &[&str]) -> HostDecision<'_> {
        let network = self.rule_for(addr, port);
        let mut best: Option<(Action, Decider<'_>)> =
            network.map(|rule| (rule.action, Decider::Network(rule)));
        for name in names {
            if let Some(rule) = self.host_rule_for(name, port) {
                let stricter = best
                    .as_ref()
                    .is_none_or(|(action, _)| strictness(rule.action) > strictness(*action));
                if stricter {
                    best = Some((
                        rule.action,
                        Decider::Host {
                            rule,
                            name: normalize(name),
                        },
                    ));
                }
            }
        }
        match best {
            Some((action, decider)) => HostDecision { action, decider },
            None => HostDecision {
                action: self.default,
                decider: Decider::Default,
            },
        }
    }

    /// The decision for a connect to port `port` of an address the workload
    /// resolved `name` to, an address no network rule names (`gatekeep
    /// policy test`'s `connect = "HOST:PORT"`).
    #[must_use]
    pub fn decide_host(&self, name: &str, port: u16) -> HostDecision<'_> {
        match self.host_rule_for(name, port) {
            Some(rule) => HostDecision {
                action: rule.action,
                decider: Decider::Host {
                    rule,
                    name: normalize(name),
                },
            },
            None => HostDecision {
                action: self.default,
                decider: Decider::Default,
            },
        }
    }

    /// Whether the policy has host rules (its workloads' DNS answers are
    /// observed).
    #[must_use]
    pub fn has_host_rules(&self) -> bool {
        !self.hosts.is_empty()
    }
}

/// What [`ConnectPolicy::decide_resolved`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDecision<'a> {
    pub action: Action,
    pub decider: Decider<'a>,
}

/// The rule behind a [`HostDecision`] decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider<'a> {
    Network(&'a ConnectRule),
    /// A host rule, and the name the workload resolved that it matched.
    Host {
        rule: &'a HostRule,
        name: String,
    },
    Default,
}

impl fmt::Display for HostDecision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.decider {
            Decider::Network(rule) => write!(f, "connect rule {rule}"),
            Decider::Host { rule, name } => write!(f, "connect rule {rule} (resolved {name})"),
            Decider::Default => write!(f, "connect default {}", self.action),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        parse_host_target(text).expect("valid").0
    }

    #[test]
    fn host_targets_are_told_from_networks() {
        for host in [
            "api.github.com",
            "api.github.com:443",
            "*.example.com:8000-8999",
            "localhost",
        ] {
            assert!(is_host_target(host), "{host}");
        }
        for net in [
            "10.0.0.0/8",
            "10.0.0.1:443",
            "[::1]:53",
            "fe80::1",
            "example.com/24",
            "::1",
        ] {
            assert!(!is_host_target(net), "{net}");
        }
    }

    #[test]
    fn patterns_parse_lower_case_and_match_names_below_a_wildcard() {
        assert_eq!(
            pattern("API.GitHub.com."),
            HostPattern::Exact("api.github.com".into())
        );
        let (p, ports) = parse_host_target("*.internal.example.com:443").expect("valid");
        assert_eq!(ports, PortRange(443, 443));
        assert!(p.matches("a.internal.example.com"));
        assert!(p.matches("B.A.Internal.Example.com."));
        assert!(!p.matches("internal.example.com"), "not the suffix itself");
        assert!(!p.matches("xinternal.example.com"), "label boundary");
        assert!(pattern("api.github.com").matches("API.github.com."));
        assert!(!pattern("api.github.com").matches("x.api.github.com"));
    }

    #[test]
    fn bad_host_targets_say_how_to_fix_them() {
        let err = |t: &str| parse_host_target(t).expect_err(t);
        assert!(err("*.com").contains("whole top-level domain"));
        assert!(err("api.*.com").contains("not the whole first label"));
        assert!(err("a..b").contains("invalid label \"\""));
        assert!(err("-a.b").contains("invalid label \"-a\""));
        assert!(err("a.b:0").contains("port 0"));
        assert!(err("a.b:x").contains("invalid port"));
    }

    fn connect(text: &str) -> ConnectPolicy {
        let set = crate::parse_str(
            "policies/agents.toml",
            &format!("[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.connect]\n{text}"),
        )
        .expect("valid policy");
        set.policies[0].connect.clone()
    }

    fn errors(text: &str) -> Vec<String> {
        let err = crate::parse_str(
            "policies/agents.toml",
            &format!("[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.connect]\n{text}"),
        )
        .expect_err("invalid policy");
        err.to_string().lines().map(str::to_owned).collect()
    }

    #[test]
    fn host_rules_share_the_lists_with_networks_and_errors_have_places() {
        let c = connect(
            "default = \"ask\"\nallow = [\"10.0.0.0/8:443\", \"api.github.com:443\", \"*.pkg.dev\"]\ndeny = [\"evil.test\"]\n",
        );
        assert_eq!(c.rules.len(), 1);
        let hosts: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
        assert_eq!(
            hosts,
            [
                "allow api.github.com:443",
                "allow *.pkg.dev",
                "deny evil.test"
            ]
        );
        assert_eq!(
            errors(
                "allow = [\"api.github.com:443\", \"*.com\"]\nask = [\"api.github.com:443\", \"a..b:80\"]\n"
            ),
            [
                "policies/agents.toml:5:32: wildcard \"*.com\" covers a whole top-level domain; name at least two labels, e.g. *.example.com",
                "policies/agents.toml:6:8: connect rule api.github.com:443 is listed under both allow (line 5) and ask; a host name and port range may appear under one action only",
                "policies/agents.toml:6:30: invalid label \"\" in host name \"a..b:80\" (labels are 1-63 letters, digits, `-` or `_`, e.g. api.github.com)",
            ]
        );
    }

    #[test]
    fn exact_names_beat_wildcards_and_specific_ports_beat_all_ports() {
        let c = connect(
            "allow = [\"api.example.com:443\", \"*.cdn.example.com\"]\ndeny = [\"*.example.com\"]\nask = [\"*.cdn.example.com:22\"]\n",
        );
        let action = |name: &str, port| c.host_rule_for(name, port).map(|r| r.action);
        assert_eq!(action("api.example.com", 443), Some(Action::Allow));
        assert_eq!(
            action("api.example.com", 80),
            Some(Action::Deny),
            "exact rule has no port 80: the wildcard applies"
        );
        assert_eq!(
            action("x.cdn.example.com", 80),
            Some(Action::Allow),
            "longer suffix first"
        );
        assert_eq!(
            action("x.cdn.example.com", 22),
            Some(Action::Ask),
            "port-specific first"
        );
        assert_eq!(action("example.com", 443), None);
        assert_eq!(action("other.test", 443), None);
    }

    #[test]
    fn strictest_vote_wins_across_names_and_networks_and_default_only_without_votes() {
        let c = connect(
            "default = \"ask\"\nallow = [\"api.allowed.test:443\", \"cdn.shared.test\", \"10.9.0.0/16\"]\ndeny = [\"evil.test\", \"10.66.0.0/16\"]\nask = [\"other.shared.test\"]\n",
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let decide =
            |addr: &str, port, names: &[&str]| c.decide_resolved(ip(addr), port, names).action;
        // A host allow replaces the default.
        assert_eq!(
            decide("192.0.2.1", 443, &["api.allowed.test"]),
            Action::Allow
        );
        assert_eq!(
            decide("192.0.2.1", 80, &["api.allowed.test"]),
            Action::Ask,
            "port not covered"
        );
        assert_eq!(
            decide("192.0.2.1", 443, &[]),
            Action::Ask,
            "not resolved: the default"
        );
        // Names sharing an address: deny > ask > allow.
        assert_eq!(
            decide("192.0.2.1", 443, &["api.allowed.test", "evil.test"]),
            Action::Deny
        );
        assert_eq!(
            decide("192.0.2.1", 443, &["cdn.shared.test", "other.shared.test"]),
            Action::Ask
        );
        // A network rule still votes: a host allow never opens a denied network.
        assert_eq!(
            decide("10.66.1.1", 443, &["api.allowed.test"]),
            Action::Deny
        );
        // ... and a host deny closes an allowed network.
        assert_eq!(decide("10.9.1.1", 443, &["evil.test"]), Action::Deny);
        let resolved = c.decide_resolved(ip("192.0.2.1"), 443, &["API.allowed.test."]);
        assert_eq!(
            resolved.to_string(),
            "connect rule allow api.allowed.test:443 (resolved api.allowed.test)"
        );
    }
}
