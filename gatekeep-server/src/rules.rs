//! Server-side rules: decide some requests without a reviewer.
//!
//! ```toml
//! [host_groups]
//! ci = ["ci-*", "build-01"]          # host name globs
//!
//! [[rules]]
//! name = "ci-git-fetch"
//! action = "allow"                   # allow | deny
//! host_group = "ci"                  # optional: every host when absent
//! policy = "ai-agents"               # optional
//! kind = "exec"                      # optional: exec | connect
//! executable = "/usr/bin/git"        # exec: exact path (optional; an allow rule never
//!                                    # matches a path the agent marked unverified)
//! command = "git fetch *"            # exec: glob over argv joined by spaces (optional)
//! destination = "10.0.0.0/8"         # connect: network (optional)
//! ports = "443"                      # connect: port or range "8000-8999" (optional)
//! ```
//!
//! Rules are tried in file order; the first that matches decides, and the decision records
//! `rule:NAME` as who decided. A rule only decides this one request (duration `once`).

use std::{collections::BTreeMap, net::IpAddr};

use gatekeep_proto::model::{ApprovalRequest, Kind, PathCheck, Target, Verdict};
use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One `[[rules]]` entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub action: Verdict,
    #[serde(default)]
    pub host_group: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub kind: Option<Kind>,
    #[serde(default)]
    pub executable: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub destination: Option<IpNet>,
    #[serde(default)]
    pub ports: Option<String>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    action: Verdict,
    hosts: Option<GlobSet>,
    policy: Option<String>,
    kind: Option<Kind>,
    executable: Option<String>,
    command: Option<GlobMatcher>,
    destination: Option<IpNet>,
    ports: Option<(u16, u16)>,
}

/// Compiled rules.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

fn bad(rule: &str, message: impl std::fmt::Display) -> Error {
    Error::BadArgument {
        message: format!("rule `{rule}`: {message}"),
    }
}

fn parse_ports(rule: &str, text: &str) -> Result<(u16, u16), Error> {
    let parse = |part: &str| {
        part.trim().parse::<u16>().map_err(|_| {
            bad(
                rule,
                format!("ports \"{text}\" is not a port or a range such as 8000-8999"),
            )
        })
    };
    let (lo, hi) = if let Some((lo, hi)) = text.split_once('-') {
        (parse(lo)?, parse(hi)?)
    } else {
        let port = parse(text)?;
        (port, port)
    };
    if lo > hi {
        return Err(bad(rule, format!("ports \"{text}\" is an empty range")));
    }
    Ok((lo, hi))
}

impl Rules {
    /// Compiles `rules`, resolving their `host_group` in `host_groups`.
    pub fn compile(
        rules: &[RuleConfig],
        host_groups: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, Error> {
        let mut compiled = Vec::with_capacity(rules.len());
        for config in rules {
            let name = &config.name;
            let hosts = match &config.host_group {
                None => None,
                Some(group) => {
                    let patterns = host_groups.get(group).ok_or_else(|| {
                        bad(
                            name,
                            format!("host_group `{group}` is not defined in [host_groups]"),
                        )
                    })?;
                    let mut set = GlobSetBuilder::new();
                    for pattern in patterns {
                        set.add(Glob::new(pattern).map_err(|err| bad(name, err))?);
                    }
                    Some(set.build().map_err(|err| bad(name, err))?)
                }
            };
            let exec_only = config.executable.is_some() || config.command.is_some();
            let connect_only = config.destination.is_some() || config.ports.is_some();
            if exec_only && connect_only {
                return Err(bad(
                    name,
                    "mixes exec (executable, command) and connect (destination, ports) conditions",
                ));
            }
            let kind = match (config.kind, exec_only, connect_only) {
                (Some(Kind::Connect), true, _) | (Some(Kind::Exec), _, true) => {
                    return Err(bad(name, "its conditions do not fit its kind"));
                }
                (kind @ Some(_), _, _) => kind,
                (None, true, _) => Some(Kind::Exec),
                (None, _, true) => Some(Kind::Connect),
                (None, false, false) => None,
            };
            compiled.push(Rule {
                name: name.clone(),
                action: config.action,
                hosts,
                policy: config.policy.clone(),
                kind,
                executable: config.executable.clone(),
                command: config
                    .command
                    .as_deref()
                    .map(|glob| Glob::new(glob).map(|g| g.compile_matcher()))
                    .transpose()
                    .map_err(|err| bad(name, err))?,
                destination: config.destination,
                ports: config
                    .ports
                    .as_deref()
                    .map(|p| parse_ports(name, p))
                    .transpose()?,
            });
        }
        Ok(Self { rules: compiled })
    }

    /// How many rules there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching a request from `host`: its name and verdict.
    #[must_use]
    pub fn decide(&self, host: &str, request: &ApprovalRequest) -> Option<(&str, Verdict)> {
        self.rules
            .iter()
            .find(|rule| rule.matches(host, request))
            .map(|rule| (rule.name.as_str(), rule.action))
    }
}

impl Rule {
    fn matches(&self, host: &str, request: &ApprovalRequest) -> bool {
        if self
            .hosts
            .as_ref()
            .is_some_and(|hosts| !hosts.is_match(host))
            || self
                .policy
                .as_ref()
                .is_some_and(|policy| *policy != request.policy)
            || self.kind.is_some_and(|kind| kind != request.kind())
        {
            return false;
        }
        match &request.target {
            Target::Exec(exec) => {
                // A truncated argv is a prefix of what runs: an allow rule never matches it.
                // Nor does it match an exec with a bound environment (`LD_PRELOAD`...): the
                // rule names a file and command, not the code a loader adds to them.
                if (exec.argv_truncated || !exec.env.is_empty()) && self.action == Verdict::Allow {
                    return false;
                }
                // An allow rule's path must be the file that runs: a path the agent could
                // not verify is only the workload's name for it (a decoy in a private mount
                // namespace), and a reviewer decides it. A deny rule may match the name.
                self.executable.as_ref().is_none_or(|path| {
                    *path == exec.executable
                        && (self.action == Verdict::Deny
                            || exec.path_check != Some(PathCheck::Unverified))
                }) && self
                    .command
                    .as_ref()
                    .is_none_or(|glob| glob.is_match(exec.argv.join(" ")))
            }
            Target::Connect(connect) => {
                let address = connect.address.parse::<IpAddr>().ok();
                self.destination.is_none_or(|net| {
                    address.is_some_and(|address| net.contains(&address.to_canonical()))
                }) && self
                    .ports
                    .is_none_or(|(lo, hi)| (lo..=hi).contains(&connect.port))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use gatekeep_proto::model::{ApprovalSettings, ConnectTarget, ExecTarget, Family, SocketType};
    use time::macros::datetime;

    use super::*;

    fn request(target: Target) -> ApprovalRequest {
        ApprovalRequest {
            id: uuid::Uuid::nil(),
            policy: "ai-agents".into(),
            rule: "default".into(),
            cgroup: "/a".into(),
            pid: 1,
            tid: 1,
            uid: 0,
            user_name: None,
            cwd: None,
            ancestry: vec![],
            target,
            requested_at: datetime!(2026-01-01 0:00 UTC),
            deadline: datetime!(2026-01-01 0:05 UTC),
            on_timeout: Verdict::Deny,
            approval: ApprovalSettings::default(),
        }
    }

    fn exec(argv: &[&str]) -> Target {
        Target::Exec(ExecTarget {
            executable: "/usr/bin/git".into(),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            content: None,
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: Vec::new(),
        })
    }

    fn rules(toml_text: &str) -> Result<Rules, Error> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            host_groups: BTreeMap<String, Vec<String>>,
            rules: Vec<RuleConfig>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        Rules::compile(&file.rules, &file.host_groups)
    }

    #[test]
    fn command_line_on_a_host_group() {
        let rules = rules(
            r#"
            [host_groups]
            ci = ["ci-*"]
            [[rules]]
            name = "fetch"
            action = "allow"
            host_group = "ci"
            executable = "/usr/bin/git"
            command = "git fetch *"
            [[rules]]
            name = "no-metadata"
            action = "deny"
            destination = "169.254.169.254/32"
            "#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        let fetch = request(exec(&["git", "fetch", "origin"]));
        assert_eq!(
            rules.decide("ci-7", &fetch),
            Some(("fetch", Verdict::Allow))
        );
        assert_eq!(rules.decide("web-1", &fetch), None, "not in the host group");
        assert_eq!(rules.decide("ci-7", &request(exec(&["git", "push"]))), None);
        let metadata = request(Target::Connect(ConnectTarget {
            family: Family::Inet,
            address: "169.254.169.254".into(),
            port: 80,
            socket_type: SocketType::Stream,
            resolved: Vec::new(),
        }));
        assert_eq!(
            rules.decide("web-1", &metadata),
            Some(("no-metadata", Verdict::Deny))
        );
    }

    #[test]
    fn an_allow_rule_never_matches_a_path_the_agent_could_not_verify() {
        let rules = rules(
            "[[rules]]\nname = \"git\"\naction = \"allow\"\nexecutable = \"/usr/bin/git\"\n\
             [[rules]]\nname = \"no-curl\"\naction = \"deny\"\nexecutable = \"/usr/bin/curl\"\n",
        )
        .unwrap();
        let with = |executable: &str, check: Option<PathCheck>| {
            let mut asked = request(exec(&["x"]));
            if let Target::Exec(exec) = &mut asked.target {
                exec.executable = executable.into();
                exec.path_check = check;
            }
            asked
        };
        let verified = with("/usr/bin/git", Some(PathCheck::Verified));
        assert_eq!(rules.decide("h", &verified), Some(("git", Verdict::Allow)));
        let decoy = with("/usr/bin/git", Some(PathCheck::Unverified));
        assert_eq!(rules.decide("h", &decoy), None, "a reviewer decides it");
        let curl = with("/usr/bin/curl", Some(PathCheck::Unverified));
        assert_eq!(rules.decide("h", &curl), Some(("no-curl", Verdict::Deny)));
    }

    #[test]
    fn an_allow_rule_never_matches_a_truncated_argv_or_a_bound_environment() {
        let rules = rules(
            "[[rules]]\nname = \"git\"\naction = \"allow\"\nexecutable = \"/usr/bin/git\"\n\
             [[rules]]\nname = \"no-curl\"\naction = \"deny\"\nexecutable = \"/usr/bin/curl\"\n",
        )
        .unwrap();
        let with = |executable: &str, truncated: bool| {
            let mut asked = request(exec(&["x"]));
            if let Target::Exec(exec) = &mut asked.target {
                exec.executable = executable.into();
                exec.argv_truncated = truncated;
            }
            asked
        };
        assert_eq!(
            rules.decide("h", &with("/usr/bin/git", false)),
            Some(("git", Verdict::Allow))
        );
        assert_eq!(
            rules.decide("h", &with("/usr/bin/git", true)),
            None,
            "a reviewer decides it"
        );
        assert_eq!(
            rules.decide("h", &with("/usr/bin/curl", true)),
            Some(("no-curl", Verdict::Deny))
        );
        // A bound environment: a reviewer decides it, a deny rule still denies.
        let preloaded = |executable: &str| {
            let mut asked = with(executable, false);
            if let Target::Exec(exec) = &mut asked.target {
                exec.env = vec!["LD_PRELOAD=/tmp/evil.so".into()];
            }
            asked
        };
        assert_eq!(rules.decide("h", &preloaded("/usr/bin/git")), None);
        assert_eq!(
            rules.decide("h", &preloaded("/usr/bin/curl")),
            Some(("no-curl", Verdict::Deny))
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_named() {
        let err = rules("[[rules]]\nname = \"x\"\naction = \"allow\"\nhost_group = \"nope\"\n")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid request: rule `x`: host_group `nope` is not defined in [host_groups]"
        );
        assert!(rules("[[rules]]\nname = \"x\"\naction = \"allow\"\nports = \"9-1\"\n").is_err());
        assert!(
            rules("[[rules]]\nname = \"x\"\naction = \"allow\"\ncommand = \"a\"\nports = \"1\"\n")
                .is_err()
        );
    }
}
