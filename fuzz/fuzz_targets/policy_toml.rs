//! Policy files: any text through the loader gives a `PolicySet` or diagnostics, never a
//! panic; every diagnostic renders; a loaded set answers its matchers.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gatekeep_policy::{ExecMatcher, Resolved, parse_cases, parse_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_str("fuzz.toml", text) {
        Ok(set) => {
            let _ = set.warnings();
            for policy in &set.policies {
                for addr in [
                    IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ] {
                    let _ = policy.connect.action_for(addr, 443);
                }
                let _ = serde_json::to_string(policy);
                // Command rules, interpreters and applets decide any argv.
                let matcher = ExecMatcher::new(&policy.exec, |path| Some(path.to_owned()));
                for rule in &policy.exec.commands {
                    for argv in [
                        &["x", "delete", "--force", "a b"][..],
                        &["busybox", "sh", "-c", "kubectl delete x"],
                        &[],
                    ] {
                        let _ = matcher.decide(&rule.path, argv, &|_| Resolved::Missing);
                    }
                }
            }
            let _ = set.policy_for_cgroup(std::path::Path::new("/sys/fs/cgroup/agents/a/b"));
        }
        Err(err) => {
            // Every diagnostic has a message a human reads.
            assert!(!err.to_string().is_empty());
        }
    }
    // The same text as a `*.cases.toml` file.
    match parse_cases("fuzz.cases.toml", text) {
        Ok(cases) => drop(cases),
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});
