//! Property tests of command-line rules (issue 24, item 2): on random rules and random
//! argv, [`args_match`] and [`ExecMatcher::decide`] agree with a naive reference written
//! here from the documentation (`docs/policy-commands.md`, `command.rs`'s module docs):
//!
//! - `**` matches any number of whole arguments (none included); a glob argument matches
//!   one argument, `*` any run of characters, `?` one character, `\` escaping the next;
//! - of the matching rules the most specific wins: more literal patterns, then more globs,
//!   then fewer `**`, then the stricter action; no match leaves the executable's own rule,
//!   else the exec default.
//!
//! The reference is plain recursion over characters and arguments (exponential, fine for
//! these sizes); the matcher under test is the index plus the linear-time wildcard walks.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use gatekeep_policy::{
    Action, ArgPattern, ExecMatcher, Resolved, args_match, parse_str, strictness,
};
use proptest::prelude::*;

const TOOL: &str = "/usr/local/bin/tool";

/// Characters that exercise the matchers: letters, an option dash, a two-byte and a
/// four-byte character, and the glob's own metacharacters.
fn arg_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop_oneof![Just('a'), Just('b')],
        1 => Just('-'),
        1 => Just('é'),
        1 => Just('🦀'),
        1 => prop_oneof![Just('*'), Just('?'), Just('\\')],
    ]
}

fn arg() -> impl Strategy<Value = String> {
    proptest::collection::vec(arg_char(), 0..4).prop_map(|chars| chars.into_iter().collect())
}

/// One token of a glob pattern as written.
#[derive(Debug, Clone)]
enum Token {
    Char(char),
    Star,
    Any,
}

/// One argument pattern as generated.
#[derive(Debug, Clone)]
enum Pat {
    Literal(String),
    Glob(Vec<Token>),
    Rest,
}

fn pattern() -> impl Strategy<Value = Pat> {
    let token = prop_oneof![
        3 => arg_char().prop_map(Token::Char),
        2 => Just(Token::Star),
        1 => Just(Token::Any),
    ];
    prop_oneof![
        3 => arg().prop_map(Pat::Literal),
        2 => proptest::collection::vec(token, 1..4)
            .prop_filter("a glob has a wildcard", |tokens| {
                tokens.iter().any(|t| !matches!(t, Token::Char(_)))
            })
            // `**` inside one argument is refused (it names whole arguments).
            .prop_filter("no ** inside an argument", |tokens| {
                !tokens
                    .windows(2)
                    .any(|w| matches!(w, [Token::Star, Token::Star]))
            })
            .prop_map(Pat::Glob),
        1 => Just(Pat::Rest),
    ]
}

/// How a pattern is written in a policy file: `*`, `?` and `\` of a literal character
/// escaped with `\`.
fn written(pattern: &Pat) -> String {
    let escape = |c: char, out: &mut String| {
        if matches!(c, '*' | '?' | '\\') {
            out.push('\\');
        }
        out.push(c);
    };
    let mut out = String::new();
    match pattern {
        Pat::Literal(text) => text.chars().for_each(|c| escape(c, &mut out)),
        Pat::Glob(tokens) => {
            for token in tokens {
                match token {
                    Token::Char(c) => escape(*c, &mut out),
                    Token::Star => out.push('*'),
                    Token::Any => out.push('?'),
                }
            }
        }
        Pat::Rest => out.push_str("**"),
    }
    out
}

/// The naive one-argument glob: recursion over characters.
fn glob_ref(tokens: &[Token], text: &[char]) -> bool {
    match tokens.split_first() {
        None => text.is_empty(),
        Some((Token::Star, rest)) => (0..=text.len()).any(|k| glob_ref(rest, &text[k..])),
        Some((Token::Any, rest)) => !text.is_empty() && glob_ref(rest, &text[1..]),
        Some((Token::Char(c), rest)) => text.first() == Some(c) && glob_ref(rest, &text[1..]),
    }
}

fn one_ref(pattern: &Pat, arg: &str) -> bool {
    match pattern {
        Pat::Literal(text) => text == arg,
        Pat::Glob(tokens) => glob_ref(tokens, &arg.chars().collect::<Vec<_>>()),
        Pat::Rest => false,
    }
}

/// The naive argv match: recursion over arguments, `**` trying every split.
fn args_ref(patterns: &[Pat], args: &[String]) -> bool {
    match patterns.split_first() {
        None => args.is_empty(),
        Some((Pat::Rest, rest)) => (0..=args.len()).any(|k| args_ref(rest, &args[k..])),
        Some((one, rest)) => {
            !args.is_empty() && one_ref(one, &args[0]) && args_ref(rest, &args[1..])
        }
    }
}

/// A command rule's specificity as documented: literals, globs, fewer `**`, stricter.
fn weight(patterns: &[Pat], action: Action) -> (usize, usize, std::cmp::Reverse<usize>, u8) {
    let count = |f: fn(&Pat) -> bool| patterns.iter().filter(|p| f(p)).count();
    (
        count(|p| matches!(p, Pat::Literal(_))),
        count(|p| matches!(p, Pat::Glob(_))),
        std::cmp::Reverse(count(|p| matches!(p, Pat::Rest))),
        strictness(action),
    )
}

fn parsed(patterns: &[Pat]) -> Vec<ArgPattern> {
    patterns
        .iter()
        .map(|p| ArgPattern::parse(&written(p)).expect("generated patterns are valid"))
        .collect()
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Ask)]
}

type Rule = (Vec<Pat>, Action);

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    proptest::collection::vec((proptest::collection::vec(pattern(), 0..4), action()), 0..8)
        .prop_map(|rules| {
            // Two rules with the same patterns are refused by the loader: keep the first.
            let mut seen: Vec<Vec<ArgPattern>> = Vec::new();
            rules
                .into_iter()
                .filter(|(patterns, _)| {
                    let key = parsed(patterns);
                    let fresh = !seen.contains(&key);
                    seen.push(key);
                    fresh
                })
                .collect()
        })
}

/// TOML basic strings escape `"` and `\`; every other generated character is literal.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn policy_text(rules: &[Rule], own: Option<Action>, default: Action) -> String {
    let mut text = format!(
        "[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/p\"]\n[policy.exec]\ndefault = \"{default}\"\n"
    );
    if let Some(own) = own {
        writeln!(text, "{own} = [{}]", toml_string(TOOL)).expect("write to a String");
    }
    for (patterns, action) in rules {
        let mut argv = vec![toml_string(TOOL)];
        argv.extend(patterns.iter().map(|p| toml_string(&written(p))));
        writeln!(
            text,
            "[[policy.exec.command]]\nargv = [{}]\naction = \"{action}\"",
            argv.join(", ")
        )
        .expect("write to a String");
    }
    text
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn argv_patterns_match_like_the_naive_reference(
        patterns in proptest::collection::vec(pattern(), 0..5),
        args in proptest::collection::vec(arg(), 0..5),
    ) {
        prop_assert_eq!(
            args_match(&parsed(&patterns), &args),
            args_ref(&patterns, &args),
            "patterns {:?} args {:?}", patterns.iter().map(written).collect::<Vec<_>>(), args
        );
    }

    #[test]
    fn the_most_specific_matching_rule_decides_like_the_naive_reference(
        rules in rules(),
        own in proptest::option::of(action()),
        default in action(),
        probes in proptest::collection::vec(proptest::collection::vec(arg(), 0..4), 1..16),
    ) {
        let text = policy_text(&rules, own, default);
        let set = parse_str("props.toml", &text)
            .unwrap_or_else(|err| panic!("generated policy refused:\n{text}\n{err}"));
        let exec = &set.policies[0].exec;
        let matcher = ExecMatcher::new(exec, |path: &Path| Some(path.to_owned()));
        let tool = PathBuf::from(TOOL);
        for args in probes {
            let expected = rules
                .iter()
                .filter(|(patterns, _)| args_ref(patterns, &args))
                .max_by_key(|(patterns, action)| weight(patterns, *action))
                .map_or(own.unwrap_or(default), |(_, action)| *action);
            let mut argv = vec![TOOL.to_owned()];
            argv.extend(args.iter().cloned());
            let decided = matcher.decide(&tool, &argv, &|_| Resolved::Missing);
            prop_assert_eq!(
                decided.action, expected,
                "argv {:?} ({}) under\n{}", argv, decided.because, text
            );
            // argv[0] is never compared: any name runs the same decision.
            argv[0] = "whatever".to_owned();
            prop_assert_eq!(matcher.decide(&tool, &argv, &|_| Resolved::Missing).action, expected);
        }
        // Another executable never meets these rules.
        let other = PathBuf::from("/usr/bin/other");
        prop_assert_eq!(
            matcher.decide(&other, &[TOOL], &|_| Resolved::Missing).action,
            default
        );
    }
}
