//! The command-line matcher alone (issue 20): matches per second against a
//! policy of 1,000 command rules, as the agent runs it for an exec the kernel
//! handed over (no file reads: the executables are not interpreters).

use std::{hint::black_box, path::PathBuf, time::Instant};

use anyhow::{Result, ensure};
use gatekeep_policy::{
    Action, ArgPattern, CommandRule, ExecMatcher, ExecPolicy, Resolved, UnlistedMappings,
};

use crate::report::{Figure, Target, per_second};

/// Rules in the policy.
const RULES: usize = 1_000;

/// One rule's patterns: a subcommand and a tail, the shapes policies use.
fn patterns(n: usize) -> (Vec<ArgPattern>, Action) {
    let sub = format!("sub{}", n % 50);
    let parse = |texts: &[&str]| {
        texts
            .iter()
            .map(|t| ArgPattern::parse(t).expect("valid pattern"))
            .collect::<Vec<_>>()
    };
    match n % 4 {
        0 => (parse(&[&sub, "**"]), Action::Allow),
        1 => (parse(&[&sub, "**", "--force*"]), Action::Ask),
        2 => (parse(&[&sub, &format!("target-{n}"), "**"]), Action::Deny),
        _ => (parse(&["*", &format!("--flag-{n}")]), Action::Ask),
    }
}

/// A policy of [`RULES`] command rules over `executables` executables.
fn policy(executables: usize) -> ExecPolicy {
    let commands = (0..RULES)
        .map(|n| {
            let (args, action) = patterns(n);
            CommandRule {
                path: PathBuf::from(format!("/usr/bin/tool{}", n % executables)),
                args,
                action,
            }
        })
        .collect();
    ExecPolicy {
        default: Action::Allow,
        rules: Vec::new(),
        on_truncated: Action::Deny,
        bound_env: Vec::new(),
        unlisted_mappings: UnlistedMappings::Allow,
        fileless: Action::Deny,
        commands,
        interpreters: Vec::new(),
        multicall: Vec::new(),
        integrity: gatekeep_policy::Integrity::Content,
    }
}

/// Exec argvs to match: hits of every rule shape and misses.
fn samples(executables: usize) -> Vec<(u32, Vec<String>)> {
    (0..4096)
        .map(|i| {
            let tool = u32::try_from(i % executables).unwrap_or(0);
            let words: Vec<String> = match i % 5 {
                0 => vec![format!("sub{}", i % 50), "a".into(), "b".into()],
                1 => vec![
                    format!("sub{}", i % 50),
                    "origin".into(),
                    "main".into(),
                    "--force-with-lease".into(),
                ],
                2 => vec![format!("sub{}", i % 50), format!("target-{i}"), "x".into()],
                3 => vec!["anything".into(), format!("--flag-{i}")],
                _ => vec!["unknown".into(), "--verbose".into(), "x".into(), "y".into()],
            };
            let mut argv = vec![format!("tool{tool}")];
            argv.extend(words);
            (tool, argv)
        })
        .collect()
}

/// Matches per second with 1,000 rules spread over 50 executables, and all
/// on one.
pub fn figures(smoke: bool) -> Result<Vec<Figure>> {
    let (rounds, per_round) = if smoke { (2, 100_000) } else { (7, 1_000_000) };
    let mut out = Vec::new();
    for (executables, id, what) in [
        (50, "native.matcher.spread", "50 executables x 20 rules"),
        (1, "native.matcher.one", "1 executable x 1,000 rules"),
    ] {
        let exec = policy(executables);
        let matcher = ExecMatcher::new(&exec, |path| {
            path.to_str()?
                .strip_prefix("/usr/bin/tool")?
                .parse::<u32>()
                .ok()
        });
        let samples = samples(executables);
        let resolve = |_: &str| Resolved::Missing;
        // Every shape decides as written (a check that the loop matches).
        let asked = samples
            .iter()
            .filter(|(tool, argv)| matcher.decide(tool, argv, &resolve).action == Action::Ask)
            .count();
        ensure!(
            asked > 0,
            "no sample was asked: the matcher bench matches nothing"
        );
        let mut runs = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            for i in 0..per_round {
                let (tool, argv) = &samples[i % samples.len()];
                black_box(matcher.decide(black_box(tool), black_box(argv), &resolve));
            }
            runs.push(per_second(per_round, started.elapsed()));
        }
        out.push(
            Figure::from_runs(
                id,
                &format!("command-line matcher, 1,000 rules ({what}): matches per second"),
                "matches/s",
                &runs,
            )
            .target(Target::at_least(1_000_000.0))
            .conditions(format!(
                "{rounds} rounds x {per_round} matches on one thread; argvs of 3-5 words, \
                 every rule shape hit and misses; ExecMatcher::decide as the agent calls it"
            )),
        );
    }
    Ok(out)
}
