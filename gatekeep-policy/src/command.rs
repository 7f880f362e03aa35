//! Command-line rules, scripts run by interpreters, applets of multi-call
//! binaries: what the agent decides in user space for the executables the
//! kernel hands it (`docs/policy-commands.md` is the user's guide).
//!
//! The kernel decides every executable by its identity alone, except those
//! this module needs argv for ([`ExecMatcher::needs_match`]): the kernel
//! pauses their execs exactly as an ask (argv captured and bound), and the
//! agent calls [`ExecMatcher::decide`]. Only an `ask` outcome reaches a
//! reviewer.
//!
//! # Most specific wins
//!
//! Of the command rules of one executable whose patterns match the
//! arguments, the one that wins is the first by:
//! 1. more literal argument patterns (`delete`);
//! 2. then more glob argument patterns (`--force*`);
//! 3. then fewer `**` (a fixed-length pattern beats one with `**`);
//! 4. then the stricter action (deny, then ask, then allow).
//!
//! Two rules with the same patterns are refused when the policy is loaded,
//! so step 4 only orders different patterns of equal weight.
//!
//! When no command rule matches, the executable's own rule (its path under
//! `allow`/`deny`/`ask`), else the exec default, decides.

use std::{
    cmp::Reverse,
    collections::HashMap,
    hash::Hash,
    path::{Path, PathBuf},
};

use crate::model::{Action, ArgPattern, CommandRule, ExecPolicy, InterpreterKind};

impl ArgPattern {
    /// Reads one element of a rule's `argv`.
    ///
    /// # Errors
    /// `**` inside a longer pattern (it stands for whole arguments), or a
    /// pattern ending in a lone `\`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "**" {
            return Ok(ArgPattern::Rest);
        }
        let mut literal = String::new();
        let mut glob = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(next) => literal.push(next),
                    None => {
                        return Err(format!(
                            "argument pattern {text:?} ends with a lone `\\`; write `\\\\` for a backslash"
                        ));
                    }
                },
                '*' if chars.peek() == Some(&'*') => {
                    return Err(format!(
                        "argument pattern {text:?} contains `**` inside an argument; `**` stands for any number of whole arguments and must be an element of its own (use `*` for any characters within one argument)"
                    ));
                }
                '*' | '?' => {
                    glob = true;
                    literal.push(c);
                }
                _ => literal.push(c),
            }
        }
        Ok(if glob {
            ArgPattern::Glob(text.to_owned())
        } else {
            ArgPattern::Literal(literal)
        })
    }

    /// Whether one argument matches (never true for [`ArgPattern::Rest`],
    /// which matches sequences).
    #[must_use]
    pub fn matches(&self, arg: &str) -> bool {
        match self {
            ArgPattern::Literal(text) => text == arg,
            ArgPattern::Glob(glob) => glob_match(glob.as_bytes(), arg.as_bytes()),
            ArgPattern::Rest => false,
        }
    }
}

impl std::fmt::Display for ArgPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgPattern::Literal(text) => {
                let escaped = text
                    .replace('\\', "\\\\")
                    .replace('*', "\\*")
                    .replace('?', "\\?");
                write!(f, "{escaped:?}")
            }
            ArgPattern::Glob(text) => write!(f, "{text:?}"),
            ArgPattern::Rest => f.write_str("\"**\""),
        }
    }
}

impl std::fmt::Display for CommandRule {
    /// `ask ["/usr/bin/kubectl", "delete", "**"]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{:?}", self.action, self.path.display().to_string())?;
        for arg in &self.args {
            write!(f, ", {arg}")?;
        }
        f.write_str("]")
    }
}

/// A one-argument glob on UTF-8 text, without allocating: `*` any run, `?`
/// one character, `\` escapes the next character.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // The length of the UTF-8 character that starts with `lead`.
    fn char_len(lead: u8) -> usize {
        match lead {
            0xf0.. => 4,
            0xe0.. => 3,
            0xc0.. => 2,
            _ => 1,
        }
    }
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' if t < text.len() => {
                    p += 1;
                    t += char_len(text[t]);
                    continue;
                }
                b'\\' if p + 1 < pattern.len() && t < text.len() && pattern[p + 1] == text[t] => {
                    p += 2;
                    t += 1;
                    continue;
                }
                c if c != b'\\' && c != b'?' && t < text.len() && c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        } else if t >= text.len() {
            return true;
        }
        match star {
            Some((sp, st)) if st < text.len() => {
                let next = st + char_len(text[st]);
                star = Some((sp, next));
                p = sp + 1;
                t = next;
            }
            _ => return false,
        }
    }
}

/// Whether `patterns` match `args` (`**` any number of arguments).
#[must_use]
pub fn args_match<S: AsRef<str>>(patterns: &[ArgPattern], args: &[S]) -> bool {
    let (mut p, mut a) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while a < args.len() {
        match patterns.get(p) {
            Some(ArgPattern::Rest) => {
                star = Some((p, a));
                p += 1;
            }
            Some(pattern) if pattern.matches(args[a].as_ref()) => {
                p += 1;
                a += 1;
            }
            _ => match star {
                Some((sp, sa)) => {
                    p = sp + 1;
                    a = sa + 1;
                    star = Some((sp, sa + 1));
                }
                None => return false,
            },
        }
    }
    patterns[p..]
        .iter()
        .all(|pattern| *pattern == ArgPattern::Rest)
}

/// How strict an action is: deny > ask > allow.
#[must_use]
pub fn strictness(action: Action) -> u8 {
    match action {
        Action::Allow => 0,
        Action::Ask => 1,
        Action::Deny => 2,
    }
}

/// The stricter of two actions.
#[must_use]
pub fn stricter(a: Action, b: Action) -> Action {
    if strictness(b) > strictness(a) { b } else { a }
}

/// The precedence of a rule: greater wins (see the module docs).
fn weight(rule: &CommandRule) -> (usize, usize, Reverse<usize>, u8) {
    let count = |f: fn(&ArgPattern) -> bool| rule.args.iter().filter(|a| f(a)).count();
    (
        count(|a| matches!(a, ArgPattern::Literal(_))),
        count(|a| matches!(a, ArgPattern::Glob(_))),
        Reverse(count(|a| matches!(a, ArgPattern::Rest))),
        strictness(rule.action),
    )
}

/// The command rules of one executable, in precedence order, indexed by
/// their first argument so a match looks at few of them.
#[derive(Debug, Clone, Default)]
pub struct CommandSet {
    /// Most specific first.
    rules: Vec<CommandRule>,
    /// `exec command {rule}` for each rule, made once (what a decision names).
    described: Vec<String>,
    /// First argument (literal) -> indices into `rules`, ascending.
    by_first: HashMap<String, Vec<u32>>,
    /// Rules whose first pattern is not a literal but that have a literal
    /// somewhere: that literal -> indices, ascending (one of the arguments
    /// must be it).
    by_literal: HashMap<String, Vec<u32>>,
    /// Rules with no literal pattern at all.
    other: Vec<u32>,
}

impl CommandSet {
    /// Indexes `rules`.
    #[must_use]
    pub fn new(mut rules: Vec<CommandRule>) -> Self {
        rules.sort_by_key(|rule| Reverse(weight(rule)));
        let mut by_first: HashMap<String, Vec<u32>> = HashMap::new();
        let mut by_literal: HashMap<String, Vec<u32>> = HashMap::new();
        let mut other = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let literal = rule.args.iter().find_map(|arg| match arg {
                ArgPattern::Literal(text) => Some(text),
                _ => None,
            });
            match (rule.args.first(), literal) {
                (Some(ArgPattern::Literal(first)), _) => {
                    by_first.entry(first.clone()).or_default().push(i);
                }
                (_, Some(literal)) => by_literal.entry(literal.clone()).or_default().push(i),
                (_, None) => other.push(i),
            }
        }
        let described = rules
            .iter()
            .map(|rule| format!("exec command {rule}"))
            .collect();
        Self {
            rules,
            described,
            by_first,
            by_literal,
            other,
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The most specific rule matching `args` (`argv[1..]`, or the applet
    /// and its arguments), if any.
    #[must_use]
    pub fn best<S: AsRef<str>>(&self, args: &[S]) -> Option<&CommandRule> {
        self.best_index(args).map(|i| &self.rules[i])
    }

    /// [`CommandSet::best`]'s index into the rules.
    fn best_index<S: AsRef<str>>(&self, args: &[S]) -> Option<usize> {
        let mut candidates: Vec<u32> = Vec::new();
        if let Some(first) = args
            .first()
            .and_then(|first| self.by_first.get(first.as_ref()))
        {
            candidates.extend_from_slice(first);
        }
        if !self.by_literal.is_empty() {
            for arg in args {
                if let Some(found) = self.by_literal.get(arg.as_ref()) {
                    candidates.extend_from_slice(found);
                }
            }
        }
        candidates.extend_from_slice(&self.other);
        // Most specific first: indices follow precedence.
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .map(|i| i as usize)
            .find(|i| args_match(&self.rules[*i].args, args))
    }
}

/// The applet a multi-call binary runs for `argv`, and the index of the
/// argument that named it, exactly as busybox dispatches
/// (`libbb/appletlib.c`): the file name of `argv[0]` (a leading `-`, a login
/// shell's mark, dropped); while that name is the binary's own (starts with
/// `busybox`, or is `self_name`), the file name of the next argument. `None`
/// when the binary runs as itself (`busybox --list`, no argument).
#[must_use]
pub fn applet<'a, S: AsRef<str>>(self_name: &str, argv: &'a [S]) -> Option<(&'a str, usize)> {
    let own =
        |name: &str| name.starts_with("busybox") || (!self_name.is_empty() && name == self_name);
    let zero = argv.first()?.as_ref();
    let zero = zero.strip_prefix('-').unwrap_or(zero);
    let mut name = file_name(zero);
    let mut at = 0;
    while own(name) {
        at += 1;
        let next = argv.get(at)?.as_ref();
        if next.starts_with('-') {
            // `busybox --list`, `--install`, `--help`: the binary itself.
            return None;
        }
        name = file_name(next);
    }
    Some((name, at))
}

/// The part after the last `/` (what busybox's `bb_basename` returns).
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What an interpreter is asked to run, read from its arguments
/// (`argv[1..]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand<'a> {
    /// A script file: the argument at this index of `argv[1..]`; what
    /// follows are the script's arguments.
    Script(usize),
    /// A shell command string (`sh -c STRING`).
    ShellCommand(&'a str),
    /// Code given inline (`python3 -c`, `perl -e`, `node -e`, `ruby -e`).
    Code(&'a str),
    /// A module found through the interpreter's search path (`python3 -m`).
    Module(&'a str),
    /// Code read from standard input (no operand, `-`, `sh -s`).
    Stdin,
    /// An option this reader does not know: the operand cannot be told.
    Unknown(&'a str),
}

/// Finds the operand of an interpreter of `kind` in `args` (`argv[1..]`).
#[must_use]
pub fn operand<S: AsRef<str>>(kind: InterpreterKind, args: &[S]) -> Operand<'_> {
    match kind {
        InterpreterKind::Shell => shell_operand(args),
        InterpreterKind::Python => short_options(
            args,
            "WXQ",
            "c",
            "m",
            &["--check-hash-based-pycs"],
            &[
                "--help",
                "--version",
                "--help-env",
                "--help-xoptions",
                "--help-all",
            ],
        ),
        InterpreterKind::Perl => short_options(args, "", "eE", "", &[], &["--help", "--version"]),
        InterpreterKind::Ruby => ruby_operand(args),
        InterpreterKind::Node => node_operand(args),
    }
}

/// `sh`, `bash`, ...: `-c` takes the first operand as the command string;
/// `-o`/`+o` (and bash's `-O`/`+O`, `--rcfile`, `--init-file`) take a value;
/// `-s` reads standard input; `--` or `-` end the options.
fn shell_operand<S: AsRef<str>>(args: &[S]) -> Operand<'_> {
    let mut command = false;
    let mut stdin = false;
    let mut i = 0;
    while let Some(arg) = args.get(i).map(AsRef::as_ref) {
        if arg == "--" || arg == "-" {
            i += 1;
            break;
        }
        if arg == "--rcfile" || arg == "--init-file" {
            i += 2;
            continue;
        }
        if arg.starts_with("--") {
            // bash's long flags (`--norc`, `--login`, `--posix`, ...).
            i += 1;
            continue;
        }
        let Some(letters) = arg.strip_prefix('-').or_else(|| arg.strip_prefix('+')) else {
            break;
        };
        let mut takes_value = 0;
        for letter in letters.chars() {
            match letter {
                'c' => command = true,
                's' => stdin = true,
                'o' | 'O' => takes_value += 1,
                _ => {}
            }
        }
        i += 1 + takes_value;
    }
    if command {
        return match args.get(i) {
            Some(string) => Operand::ShellCommand(string.as_ref()),
            None => Operand::Stdin,
        };
    }
    if stdin || i >= args.len() {
        return Operand::Stdin;
    }
    Operand::Script(i)
}

/// Interpreters whose options are single letters that may be clustered
/// (`python3 -Bc CODE`): letters in `valued` take a value (the rest of the
/// cluster, else the next argument); a letter in `code` or `module` ends the
/// options with code or a module name. Long options in `long_valued` take
/// the next argument; others in `long_flags` take none; any other long
/// option is unknown.
fn short_options<'a, S: AsRef<str>>(
    args: &'a [S],
    valued: &str,
    code: &str,
    module: &str,
    long_valued: &[&str],
    long_flags: &[&str],
) -> Operand<'a> {
    let mut i = 0;
    while let Some(arg) = args.get(i).map(AsRef::as_ref) {
        if arg == "--" {
            i += 1;
            break;
        }
        if arg == "-" {
            return Operand::Stdin;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or(long);
            let name = format!("--{name}");
            if long_valued.contains(&name.as_str()) {
                i += if long.contains('=') { 1 } else { 2 };
                continue;
            }
            if long_flags.contains(&name.as_str()) {
                i += 1;
                continue;
            }
            return Operand::Unknown(arg);
        }
        let Some(letters) = arg.strip_prefix('-') else {
            break;
        };
        let mut next = i + 1;
        for (at, letter) in letters.char_indices() {
            let rest = &letters[at + letter.len_utf8()..];
            let value = || {
                if rest.is_empty() {
                    args.get(i + 1).map(AsRef::as_ref)
                } else {
                    Some(rest)
                }
            };
            if code.contains(letter) {
                return value().map_or(Operand::Stdin, Operand::Code);
            }
            if module.contains(letter) {
                return value().map_or(Operand::Stdin, Operand::Module);
            }
            if valued.contains(letter) {
                if rest.is_empty() {
                    next = i + 2;
                }
                break;
            }
        }
        i = next;
    }
    if i >= args.len() {
        Operand::Stdin
    } else {
        Operand::Script(i)
    }
}

/// ruby: `-e` code; `-r`, `-I`, `-E`, `-F` take a value; `-C` (changes
/// directory first), `-S` (searches `PATH`) and `-x` make the script
/// operand something else than a file beside the cwd: unknown.
fn ruby_operand<S: AsRef<str>>(args: &[S]) -> Operand<'_> {
    for arg in args.iter().map(AsRef::as_ref) {
        if arg == "--" || !arg.starts_with('-') {
            break;
        }
        if !arg.starts_with("--") && arg[1..].contains(['C', 'S', 'x']) {
            return Operand::Unknown(arg);
        }
    }
    let longs = &[
        "--help",
        "--version",
        "--verbose",
        "--yjit",
        "--jit",
        "--copyright",
    ];
    short_options(args, "rIEF0l", "e", "", &[], longs)
}

/// node: `-e`/`--eval`, `-p`/`--print` take code; `-r`/`--require`,
/// `--import`, `--loader` and a few others take a value; other options
/// written `--name=value` or known as flags take none; anything else is
/// unknown.
fn node_operand<S: AsRef<str>>(args: &[S]) -> Operand<'_> {
    const VALUED: &[&str] = &[
        "-r",
        "--require",
        "--import",
        "--loader",
        "--experimental-loader",
        "--conditions",
        "-C",
        "--input-type",
        "--title",
        "--env-file",
        "--inspect-port",
    ];
    const FLAGS: &[&str] = &[
        "--inspect",
        "--inspect-brk",
        "--no-warnings",
        "--trace-warnings",
        "--enable-source-maps",
        "--no-deprecation",
        "--trace-deprecation",
        "--preserve-symlinks",
        "--expose-gc",
        "--abort-on-uncaught-exception",
        "-i",
        "--interactive",
    ];
    let mut i = 0;
    while let Some(arg) = args.get(i).map(AsRef::as_ref) {
        if arg == "--" {
            i += 1;
            break;
        }
        if arg == "-" {
            return Operand::Stdin;
        }
        if !arg.starts_with('-') {
            break;
        }
        let name = arg.split('=').next().unwrap_or(arg);
        if matches!(name, "-e" | "--eval" | "-p" | "--print" | "-pe") {
            return match arg.split_once('=') {
                Some((_, code)) => Operand::Code(code),
                None => args
                    .get(i + 1)
                    .map_or(Operand::Stdin, |code| Operand::Code(code.as_ref())),
            };
        }
        if VALUED.contains(&name) {
            i += if arg.contains('=') { 1 } else { 2 };
        } else if FLAGS.contains(&name) || arg.contains('=') {
            i += 1;
        } else {
            return Operand::Unknown(arg);
        }
    }
    if i >= args.len() {
        Operand::Stdin
    } else {
        Operand::Script(i)
    }
}

/// Splits a `sh -c` string into words when that is faithful: no shell
/// syntax a word list cannot express (`;`, `&`, `|`, `<`, `>`, `(`, `)`,
/// `$`, backquote, newline, globs `*?[`, `{`, `}`, `~`, `#`, an assignment
/// before the command); quotes and backslashes are fine. `None` otherwise.
#[must_use]
pub fn split_shell_command(string: &str) -> Option<Vec<String>> {
    // Outside single quotes these all mean something to the shell; inside
    // them nothing does, but a simple scan that refuses them anywhere is
    // stricter and enough.
    if string.contains([
        ';', '&', '|', '<', '>', '(', ')', '$', '`', '\n', '\r', '*', '?', '[', ']', '{', '}', '~',
        '#', '!',
    ]) {
        return None;
    }
    let words = shlex::split(string)?;
    let first = words.first()?;
    if first.contains('=') {
        return None;
    }
    Some(words)
}

/// The executable's own kernel-side decision and the rules the agent
/// matches for it.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The executable's path rule (action, path), if it has one.
    own: Option<(Action, PathBuf)>,
    commands: CommandSet,
    interpreter: Option<InterpreterKind>,
    /// For a multi-call binary: its own file name.
    multicall: Option<String>,
}

/// Whether `path` is an ELF binary here (`\x7fELF`): no interpreter runs
/// it. A file that cannot be read counts as a script.
fn is_binary(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// What a resolver of [`ExecMatcher::decide`] found for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved<K> {
    /// A regular file, by identity.
    File(K),
    /// No regular file by that name.
    Missing,
    /// A name whose file cannot be told from outside the task (it goes
    /// through `/proc` or `/dev/fd`, which name the reader's own files):
    /// asked.
    Unknown,
}

/// An outcome of [`ExecMatcher::decide`] and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub action: Action,
    /// As reviewers and auditors read it, e.g. `exec command ask
    /// ["/usr/bin/kubectl", "delete", "**"]`.
    pub because: String,
}

/// One policy's command rules, interpreters and multi-call binaries, keyed by
/// file identity `K` (the agent: the kernel's device and inode; `policy
/// test`: the host's file).
#[derive(Debug, Clone)]
pub struct ExecMatcher<K> {
    entries: HashMap<K, Entry>,
    /// File name -> identities with command or path rules, for the command
    /// word of a `sh -c` string.
    by_name: HashMap<String, Vec<K>>,
    default: Action,
    /// Whether interpreters must look at their script (some rule could be
    /// stricter than the interpreter's own decision).
    script_checks: bool,
}

impl<K: Clone + Eq + Hash> ExecMatcher<K> {
    /// Compiles `exec`; `identify` gives a path's identity (`None`: the file
    /// does not exist here, and its rules are skipped).
    pub fn new(exec: &ExecPolicy, mut identify: impl FnMut(&Path) -> Option<K>) -> Self {
        let mut entries: HashMap<K, Entry> = HashMap::new();
        let mut by_name: HashMap<String, Vec<K>> = HashMap::new();
        let mut name = |path: &Path, key: &K| {
            if let Some(file) = path.file_name().and_then(|n| n.to_str()) {
                let keys = by_name.entry(file.to_owned()).or_default();
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
        };
        for rule in &exec.rules {
            if let Some(key) = identify(&rule.path) {
                name(&rule.path, &key);
                entries.entry(key).or_default().own = Some((rule.action, rule.path.clone()));
            }
        }
        let mut commands: HashMap<K, Vec<CommandRule>> = HashMap::new();
        for rule in &exec.commands {
            if let Some(key) = identify(&rule.path) {
                name(&rule.path, &key);
                commands.entry(key).or_default().push(rule.clone());
            }
        }
        for (key, rules) in commands {
            entries.entry(key).or_default().commands = CommandSet::new(rules);
        }
        for path in &exec.multicall {
            if let Some(key) = identify(path) {
                let own = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                entries.entry(key).or_default().multicall = Some(own.to_owned());
            }
        }
        for path in &exec.interpreters {
            // Told by the name of the file it is: `/bin/sh` may be a link to
            // dash (an interpreter) or to busybox (a multi-call binary, whose
            // shells are told by applet name once it is declared).
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            let kind = [path, &real]
                .into_iter()
                .map(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(InterpreterKind::from_name)
                })
                .reduce(Option::and)
                .flatten();
            if let (Some(kind), Some(key)) = (kind, identify(path)) {
                entries.entry(key).or_default().interpreter = Some(kind);
            }
        }
        // Only a script can be run by an interpreter (a binary read as a
        // script fails), and every command a `sh -c` string runs is an exec
        // of its own: interpreters need to look at their operand only when a
        // rule stricter than allow names a script.
        let script_checks = exec
            .rules
            .iter()
            .filter(|rule| rule.action != Action::Allow)
            .map(|rule| &rule.path)
            .chain(
                exec.commands
                    .iter()
                    .filter(|rule| rule.action != Action::Allow)
                    .map(|rule| &rule.path),
            )
            .any(|path| !is_binary(path));
        Self {
            entries,
            by_name,
            default: exec.default,
            script_checks,
        }
    }

    /// The identities the kernel must hand to user space (compiled as its
    /// ask action): those with command rules, and interpreters and
    /// multi-call binaries when some rule could make them stricter than
    /// their own decision (and that is not deny already).
    pub fn needs_match(&self) -> impl Iterator<Item = &K> {
        self.entries
            .iter()
            .filter(|(_, entry)| {
                let own = entry
                    .own
                    .as_ref()
                    .map_or(self.default, |(action, _)| *action);
                !entry.commands.is_empty()
                    || ((entry.interpreter.is_some() || entry.multicall.is_some())
                        && self.script_checks
                        && own != Action::Deny)
            })
            .map(|(key, _)| key)
    }

    /// Whether `key` is one of [`ExecMatcher::needs_match`].
    #[must_use]
    pub fn matches(&self, key: &K) -> bool {
        self.needs_match().any(|k| k == key)
    }

    /// The decision for an exec of the file `exe` with `argv`, before any
    /// reviewer acts. `resolve` gives the identity of a file an
    /// interpreter would open (the agent: under the task's root and cwd).
    pub fn decide<S: AsRef<str>>(
        &self,
        exe: &K,
        argv: &[S],
        resolve: &dyn Fn(&str) -> Resolved<K>,
    ) -> Decided {
        let Some(entry) = self.entries.get(exe) else {
            return self.own(None);
        };
        let operands = argv.get(1..).unwrap_or_default();
        if let Some(self_name) = &entry.multicall {
            let Some((applet, at)) = applet(self_name, argv) else {
                return self.own(Some(entry));
            };
            let rest = argv.get(at + 1..).unwrap_or_default();
            let mut line: Vec<&str> = Vec::with_capacity(rest.len() + 1);
            line.push(applet);
            line.extend(rest.iter().map(AsRef::as_ref));
            let base = self.with_commands(entry, &line);
            return match InterpreterKind::from_name(applet) {
                Some(kind) => self.with_operand(base, kind, rest, resolve),
                None => base,
            };
        }
        let base = self.with_commands(entry, operands);
        match entry.interpreter {
            Some(kind) => self.with_operand(base, kind, operands, resolve),
            None => base,
        }
    }

    /// The decision of `exe`'s own rule (else the default), without its
    /// command rules: what the kernel decided before these rules existed.
    #[must_use]
    pub fn decide_own(&self, exe: &K) -> Decided {
        self.own(self.entries.get(exe))
    }

    /// The executable's own rule, else the default.
    fn own(&self, entry: Option<&Entry>) -> Decided {
        match entry.and_then(|entry| entry.own.as_ref()) {
            Some((action, path)) => Decided {
                action: *action,
                because: format!("exec {action} {}", path.display()),
            },
            None => Decided {
                action: self.default,
                because: match self.default {
                    Action::Allow => "exec default allow",
                    Action::Deny => "exec default deny",
                    Action::Ask => "exec default ask",
                }
                .to_owned(),
            },
        }
    }

    /// The most specific command rule matching `args`, else the own rule.
    fn with_commands<S: AsRef<str>>(&self, entry: &Entry, args: &[S]) -> Decided {
        match entry.commands.best_index(args) {
            Some(i) => Decided {
                action: entry.commands.rules[i].action,
                because: entry.commands.described[i].clone(),
            },
            None => self.own(Some(entry)),
        }
    }

    /// An interpreter's decision `base`, made stricter by what it runs: a
    /// script file's own decision (when a rule names the file), a `sh -c`
    /// string's command; an option that hides the operand makes it at least
    /// ask. Never laxer than `base`.
    fn with_operand<S: AsRef<str>>(
        &self,
        base: Decided,
        kind: InterpreterKind,
        args: &[S],
        resolve: &dyn Fn(&str) -> Resolved<K>,
    ) -> Decided {
        if !self.script_checks {
            return base;
        }
        let found = match operand(kind, args) {
            Operand::Script(i) => {
                let script = args[i].as_ref();
                match resolve(script) {
                    Resolved::File(key) => self
                        .entries
                        .get(&key)
                        .filter(|entry| entry.own.is_some() || !entry.commands.is_empty())
                        .map(|entry| {
                            let decided = self.with_commands(entry, &args[i + 1..]);
                            Decided {
                                because: format!("{} (the script {script:?})", decided.because),
                                ..decided
                            }
                        }),
                    // bash looks an operand it does not find in the cwd up in
                    // `PATH`, which the workload sets: the file cannot be told.
                    Resolved::Missing
                        if kind == InterpreterKind::Shell && !script.contains('/') =>
                    {
                        Some(Decided {
                            action: Action::Ask,
                            because: format!(
                                "shell script {script:?} is not in the cwd, and a shell may look it up in PATH: asked"
                            ),
                        })
                    }
                    Resolved::Missing => None,
                    Resolved::Unknown => Some(Decided {
                        action: Action::Ask,
                        because: format!(
                            "script {script:?} cannot be identified (it goes through /proc or /dev/fd): asked"
                        ),
                    }),
                }
            }
            Operand::ShellCommand(string) => self.shell_command(string, resolve),
            Operand::Unknown(option) => Some(Decided {
                action: Action::Ask,
                because: format!("interpreter option {option:?} hides which file it runs: asked"),
            }),
            Operand::Code(_) | Operand::Module(_) | Operand::Stdin => None,
        };
        match found {
            Some(found) if strictness(found.action) > strictness(base.action) => found,
            _ => base,
        }
    }

    /// The decision for the command of a `sh -c` string, when it splits
    /// into words faithfully and its command word names a file with rules
    /// (by path, else by file name: the strictest of the files so named).
    fn shell_command(
        &self,
        string: &str,
        resolve: &dyn Fn(&str) -> Resolved<K>,
    ) -> Option<Decided> {
        let words = split_shell_command(string)?;
        let (command, args) = words.split_first()?;
        let keys: Vec<K> = if command.contains('/') {
            match resolve(command) {
                Resolved::File(key) => vec![key],
                Resolved::Missing | Resolved::Unknown => Vec::new(),
            }
        } else {
            self.by_name.get(command).cloned().unwrap_or_default()
        };
        keys.iter()
            .filter_map(|key| self.entries.get(key))
            .map(|entry| self.with_commands(entry, args))
            .max_by_key(|decided| strictness(decided.action))
            .map(|decided| Decided {
                because: format!("{} (in sh -c {string:?})", decided.because),
                ..decided
            })
    }
}

/// The identity of `path` relative to `cwd`, for [`ExecMatcher::decide`]'s
/// resolver: absolute paths as they are, others joined to `cwd`.
#[must_use]
pub fn operand_path(cwd: &Path, operand: &str) -> PathBuf {
    if operand.starts_with('/') {
        PathBuf::from(operand)
    } else {
        cwd.join(operand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(items: &[&str]) -> Vec<ArgPattern> {
        items
            .iter()
            .map(|p| ArgPattern::parse(p).unwrap())
            .collect()
    }

    fn rule(path: &str, args: &[&str], action: Action) -> CommandRule {
        CommandRule {
            path: PathBuf::from(path),
            args: pats(args),
            action,
        }
    }

    #[test]
    fn patterns_parse_literals_globs_and_rest() {
        assert_eq!(
            ArgPattern::parse("delete"),
            Ok(ArgPattern::Literal("delete".into()))
        );
        assert_eq!(ArgPattern::parse("**"), Ok(ArgPattern::Rest));
        assert_eq!(
            ArgPattern::parse("--force*"),
            Ok(ArgPattern::Glob("--force*".into()))
        );
        assert_eq!(
            ArgPattern::parse("a\\*b"),
            Ok(ArgPattern::Literal("a*b".into()))
        );
        assert!(
            ArgPattern::parse("a**")
                .unwrap_err()
                .contains("element of its own")
        );
        assert!(ArgPattern::parse("a\\").unwrap_err().contains("lone"));
    }

    #[test]
    fn globs_match_one_argument() {
        let glob = ArgPattern::parse("--force*").unwrap();
        assert!(glob.matches("--force"));
        assert!(glob.matches("--force-with-lease"));
        assert!(!glob.matches("-f"));
        let q = ArgPattern::parse("v?").unwrap();
        assert!(q.matches("v1") && q.matches("vé") && !q.matches("v") && !q.matches("v12"));
        assert!(ArgPattern::parse("*").unwrap().matches(""));
        assert!(ArgPattern::parse("a\\*").unwrap().matches("a*"));
        assert!(!ArgPattern::parse("a\\*").unwrap().matches("ab"));
        assert!(
            ArgPattern::parse("*.example.*")
                .unwrap()
                .matches("a/b.example.c")
        );
    }

    #[test]
    fn rest_matches_any_number_of_arguments_anywhere() {
        let p = pats(&["push", "**", "--force*"]);
        assert!(args_match(&p, &["push", "--force"]));
        assert!(args_match(
            &p,
            &["push", "origin", "main", "--force-with-lease"]
        ));
        assert!(!args_match(&p, &["push", "origin", "main"]));
        assert!(!args_match(&p, &["pull", "--force"]));
        let p = pats(&["delete", "**"]);
        assert!(args_match(&p, &["delete"]));
        assert!(args_match(&p, &["delete", "pod", "x"]));
        assert!(!args_match(&p, &[] as &[&str]));
        let p = pats(&["get"]);
        assert!(args_match(&p, &["get"]) && !args_match(&p, &["get", "pods"]));
        let p = pats(&["**", "x", "**", "y"]);
        assert!(args_match(&p, &["a", "x", "b", "c", "y"]));
        assert!(!args_match(&p, &["a", "x", "b", "y", "c"]));
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let set = CommandSet::new(vec![
            rule("/k", &["**"], Action::Allow),
            rule("/k", &["delete", "**"], Action::Ask),
            rule("/k", &["delete", "pod", "scratch-*"], Action::Allow),
            rule("/k", &["*", "--all"], Action::Deny),
            rule("/k", &["get", "**"], Action::Allow),
            rule("/k", &["get", "secrets", "**"], Action::Deny),
        ]);
        let best = |args: &[&str]| set.best(args).map(|r| r.action);
        // More literals beat fewer.
        assert_eq!(best(&["delete", "pod", "web"]), Some(Action::Ask));
        assert_eq!(best(&["get", "pods"]), Some(Action::Allow));
        assert_eq!(best(&["get", "secrets", "-A"]), Some(Action::Deny));
        // Two literals and a glob beat two literals and `**`.
        assert_eq!(best(&["delete", "pod", "scratch-1"]), Some(Action::Allow));
        // One literal + `**` beats one glob + one literal? `delete --all`:
        // ["delete", "**"] has 1 literal; ["*", "--all"] has 1 literal and
        // 1 glob: the latter is more specific.
        assert_eq!(best(&["delete", "--all"]), Some(Action::Deny));
        assert_eq!(best(&["version"]), Some(Action::Allow));
        let none = CommandSet::new(vec![rule("/k", &["get"], Action::Allow)]);
        assert_eq!(none.best(&["get", "pods"]), None);
    }

    #[test]
    fn equal_weight_goes_to_the_stricter_and_fixed_length_beats_rest() {
        let set = CommandSet::new(vec![
            rule("/g", &["push", "*"], Action::Allow),
            rule("/g", &["push", "**"], Action::Ask),
            rule("/g", &["*", "main"], Action::Allow),
            rule("/g", &["push", "-*"], Action::Deny),
        ]);
        // ["push", "*"] (1 literal, 1 glob) and ["push", "-*"] tie on weight:
        // the stricter (deny) wins where both match.
        assert_eq!(
            set.best(&["push", "-f"]).map(|r| r.action),
            Some(Action::Deny)
        );
        assert_eq!(
            set.best(&["push", "origin"]).map(|r| r.action),
            Some(Action::Allow)
        );
        // ["push", "**"] has 1 literal, ["*", "main"] 1 literal + 1 glob.
        assert_eq!(
            set.best(&["push", "main"]).map(|r| r.action),
            Some(Action::Allow)
        );
        assert_eq!(
            set.best(&["push", "a", "b"]).map(|r| r.action),
            Some(Action::Ask)
        );
    }

    /// The index finds what a scan of every rule in precedence order finds.
    #[test]
    fn the_index_finds_what_a_full_scan_finds() {
        let words = ["get", "delete", "-f", "--all", "x", "pod"];
        let shapes: [&[&str]; 9] = [
            &["get", "**"],
            &["*", "--all"],
            &["**", "-f", "**"],
            &["delete", "*", "x"],
            &["?et"],
            &["**"],
            &["*", "*"],
            &["pod", "**", "--all"],
            &["**", "x"],
        ];
        let actions = [Action::Allow, Action::Deny, Action::Ask];
        let rules: Vec<CommandRule> = shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| rule("/k", shape, actions[i % 3]))
            .collect();
        let set = CommandSet::new(rules);
        let mut scan = set.rules.clone();
        scan.sort_by_key(|rule| Reverse(weight(rule)));
        let mut checked = 0;
        for a in words {
            for b in words {
                for c in ["", "x", "--all"] {
                    let args: Vec<&str> = [a, b, c].into_iter().filter(|w| !w.is_empty()).collect();
                    let want = scan.iter().find(|rule| args_match(&rule.args, &args));
                    assert_eq!(set.best(&args), want, "{args:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 108);
    }

    #[test]
    fn busybox_dispatch() {
        assert_eq!(applet("busybox", &["wget", "x"]), Some(("wget", 0)));
        assert_eq!(applet("busybox", &["/tmp/x/wget"]), Some(("wget", 0)));
        assert_eq!(applet("busybox", &["-sh"]), Some(("sh", 0)));
        assert_eq!(
            applet("busybox", &["busybox", "wget", "x"]),
            Some(("wget", 1))
        );
        assert_eq!(
            applet("busybox", &["/bin/busybox", "/x/wget"]),
            Some(("wget", 1))
        );
        assert_eq!(
            applet("busybox", &["busybox", "busybox", "rm"]),
            Some(("rm", 2))
        );
        assert_eq!(
            applet("busybox", &["busybox.static", "rm"]),
            Some(("rm", 1))
        );
        assert_eq!(applet("bb", &["bb", "rm"]), Some(("rm", 1)));
        assert_eq!(applet("busybox", &["busybox", "--list"]), None);
        assert_eq!(applet("busybox", &["busybox"]), None);
        assert_eq!(applet::<&str>("busybox", &[]), None);
    }

    #[test]
    fn shell_operands() {
        let op = |args: &'static [&'static str]| operand(InterpreterKind::Shell, args);
        assert_eq!(op(&["deploy.sh", "prod"]), Operand::Script(0));
        assert_eq!(op(&["-e", "-x", "deploy.sh"]), Operand::Script(2));
        assert_eq!(
            op(&["-o", "errexit", "+o", "nounset", "d.sh"]),
            Operand::Script(4)
        );
        assert_eq!(op(&["-eo", "pipefail", "d.sh"]), Operand::Script(2));
        assert_eq!(op(&["--norc", "-O", "extglob", "d.sh"]), Operand::Script(3));
        assert_eq!(op(&["--rcfile", "r", "d.sh"]), Operand::Script(2));
        assert_eq!(op(&["--", "-d.sh"]), Operand::Script(1));
        assert_eq!(op(&["-", "d.sh"]), Operand::Script(1));
        assert_eq!(
            op(&["-c", "kubectl get", "name"]),
            Operand::ShellCommand("kubectl get")
        );
        assert_eq!(op(&["-ec", "x"]), Operand::ShellCommand("x"));
        assert_eq!(op(&["-c", "-e", "x"]), Operand::ShellCommand("x"));
        assert_eq!(op(&["-s", "d.sh"]), Operand::Stdin);
        assert_eq!(op(&[]), Operand::Stdin);
        assert_eq!(op(&["-c"]), Operand::Stdin);
    }

    #[test]
    fn python_perl_node_ruby_operands() {
        let py = |args: &'static [&'static str]| operand(InterpreterKind::Python, args);
        assert_eq!(py(&["x.py", "-c"]), Operand::Script(0));
        assert_eq!(py(&["-B", "-u", "x.py"]), Operand::Script(2));
        assert_eq!(py(&["-W", "ignore", "x.py"]), Operand::Script(2));
        assert_eq!(py(&["-Wignore", "-X", "dev", "x.py"]), Operand::Script(3));
        assert_eq!(py(&["-Bc", "print(1)"]), Operand::Code("print(1)"));
        assert_eq!(py(&["-m", "pip", "install"]), Operand::Module("pip"));
        assert_eq!(py(&["-mpip"]), Operand::Module("pip"));
        assert_eq!(
            py(&["--check-hash-based-pycs", "always", "x.py"]),
            Operand::Script(2)
        );
        assert_eq!(py(&["--weird", "x.py"]), Operand::Unknown("--weird"));
        assert_eq!(py(&["-"]), Operand::Stdin);
        let perl = |args: &'static [&'static str]| operand(InterpreterKind::Perl, args);
        assert_eq!(perl(&["-w", "x.pl"]), Operand::Script(1));
        assert_eq!(perl(&["-we", "1"]), Operand::Code("1"));
        let node = |args: &'static [&'static str]| operand(InterpreterKind::Node, args);
        assert_eq!(node(&["x.js"]), Operand::Script(0));
        assert_eq!(node(&["-r", "dotenv/config", "x.js"]), Operand::Script(2));
        assert_eq!(
            node(&["--max-old-space-size=100", "x.js"]),
            Operand::Script(1)
        );
        assert_eq!(node(&["-e", "1"]), Operand::Code("1"));
        assert_eq!(
            node(&["--frobnicate", "x.js"]),
            Operand::Unknown("--frobnicate")
        );
        let ruby = |args: &'static [&'static str]| operand(InterpreterKind::Ruby, args);
        assert_eq!(ruby(&["-w", "x.rb"]), Operand::Script(1));
        assert_eq!(ruby(&["-I", "lib", "x.rb"]), Operand::Script(2));
        assert_eq!(ruby(&["-C", "/tmp", "x.rb"]), Operand::Unknown("-C"));
        assert_eq!(ruby(&["-e", "1"]), Operand::Code("1"));
    }

    #[test]
    fn shell_strings_split_only_when_faithful() {
        assert_eq!(
            split_shell_command("kubectl delete 'pod x'"),
            Some(vec!["kubectl".into(), "delete".into(), "pod x".into()])
        );
        for string in [
            "a; b", "a && b", "a | b", "a > f", "$(x)", "`x`", "X=1 a", "a *", "a\nb", "{a,b}",
        ] {
            assert_eq!(split_shell_command(string), None, "{string}");
        }
        assert_eq!(split_shell_command("'unterminated"), None);
    }

    /// Keys are paths here; `resolve` joins a fixed cwd.
    fn matcher(exec: &ExecPolicy) -> ExecMatcher<PathBuf> {
        ExecMatcher::new(exec, |path| Some(path.to_path_buf()))
    }

    fn policy(commands: Vec<CommandRule>) -> ExecPolicy {
        ExecPolicy {
            default: Action::Allow,
            rules: vec![crate::ExecRule {
                path: "/srv/deploy.sh".into(),
                action: Action::Ask,
            }],
            on_truncated: Action::Deny,
            bound_env: Vec::new(),
            unlisted_mappings: crate::UnlistedMappings::Allow,
            fileless: Action::Deny,
            commands,
            interpreters: vec!["/bin/sh".into(), "/usr/bin/python3".into()],
            multicall: vec!["/bin/busybox".into()],
            integrity: crate::Integrity::Content,
        }
    }

    /// Joins the cwd `/srv` and folds `.` and `..` (the agent resolves
    /// through the file system instead).
    fn resolve(path: &str) -> Resolved<PathBuf> {
        let mut out = PathBuf::from("/");
        for part in operand_path(Path::new("/srv"), path).components() {
            match part {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::Normal(name) => out.push(name),
                _ => {}
            }
        }
        if out.starts_with("/proc") {
            return Resolved::Unknown;
        }
        Resolved::File(out)
    }

    fn decide(m: &ExecMatcher<PathBuf>, exe: &str, argv: &[&str]) -> Action {
        m.decide(&PathBuf::from(exe), argv, &resolve).action
    }

    #[test]
    fn interpreters_meet_the_scripts_rule_never_laxer() {
        let m = matcher(&policy(vec![
            rule("/usr/bin/kubectl", &["delete", "**"], Action::Ask),
            rule("/usr/bin/kubectl", &["get", "**"], Action::Allow),
            rule("/bin/busybox", &["wget", "**"], Action::Deny),
        ]));
        assert!(m.matches(&PathBuf::from("/bin/sh")));
        assert!(m.matches(&PathBuf::from("/usr/bin/kubectl")));
        assert!(!m.matches(&PathBuf::from("/usr/bin/git")));
        assert_eq!(
            decide(&m, "/usr/bin/kubectl", &["kubectl", "get", "pods"]),
            Action::Allow
        );
        assert_eq!(
            decide(&m, "/usr/bin/kubectl", &["kubectl", "delete", "pods"]),
            Action::Ask
        );
        assert_eq!(decide(&m, "/bin/sh", &["sh", "deploy.sh"]), Action::Ask);
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "-e", "/srv/deploy.sh"]),
            Action::Ask
        );
        assert_eq!(decide(&m, "/bin/sh", &["sh", "other.sh"]), Action::Allow);
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "/proc/self/fd/3"]),
            Action::Ask
        );
        // Not in the cwd: bash would search PATH, so it is asked.
        let nowhere = |_: &str| Resolved::Missing;
        assert_eq!(
            m.decide(&PathBuf::from("/bin/sh"), &["sh", "deploy.sh"], &nowhere)
                .action,
            Action::Ask
        );
        assert_eq!(
            m.decide(&PathBuf::from("/bin/sh"), &["sh", "./gone.sh"], &nowhere)
                .action,
            Action::Allow
        );
        assert_eq!(
            decide(&m, "/usr/bin/python3", &["python3", "../srv/deploy.sh"]),
            Action::Ask
        );
        assert_eq!(
            decide(&m, "/usr/bin/python3", &["python3", "-c", "x"]),
            Action::Allow
        );
        assert_eq!(
            decide(&m, "/usr/bin/python3", &["python3", "--odd", "x"]),
            Action::Ask
        );
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "-c", "kubectl delete x"]),
            Action::Ask
        );
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "-c", "kubectl get x"]),
            Action::Allow
        );
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "-c", "./deploy.sh"]),
            Action::Ask
        );
        // Shell syntax: the shell's own decision (each command it runs is an
        // exec that meets its own rules).
        assert_eq!(
            decide(&m, "/bin/sh", &["sh", "-c", "true; kubectl delete x"]),
            Action::Allow
        );
        // Multi-call: by applet name, however invoked.
        assert_eq!(decide(&m, "/bin/busybox", &["wget", "x"]), Action::Deny);
        assert_eq!(
            decide(&m, "/bin/busybox", &["busybox", "wget", "x"]),
            Action::Deny
        );
        assert_eq!(decide(&m, "/bin/busybox", &["/tmp/wget"]), Action::Deny);
        assert_eq!(decide(&m, "/bin/busybox", &["ls"]), Action::Allow);
        // ... and its shell applets read their script.
        assert_eq!(
            decide(&m, "/bin/busybox", &["sh", "deploy.sh"]),
            Action::Ask
        );
        assert_eq!(
            decide(&m, "/bin/busybox", &["busybox", "ash", "deploy.sh"]),
            Action::Ask
        );
        assert_eq!(
            decide(&m, "/bin/busybox", &["busybox", "--list"]),
            Action::Allow
        );
        // A file with no entry: the default.
        assert_eq!(decide(&m, "/usr/bin/git", &["git"]), Action::Allow);
    }

    /// The worked example of `docs/policy-commands.md` decides as its table says.
    #[test]
    fn the_documented_example_decides_as_documented() {
        let doc = include_str!("../../docs/policy-commands.md");
        let start = doc
            .find("[[policy]]\nname = \"coding-agents\"")
            .expect("the example");
        let end = start + doc[start..].find("```").expect("its end");
        let set = crate::parse_str("policy-commands.md", &doc[start..end]).expect("valid");
        let m = matcher(&set.policies[0].exec);
        let at = |path: &str, argv: &[&str]| {
            m.decide(&PathBuf::from(path), argv, &|p| {
                Resolved::File(operand_path(Path::new("/srv/app"), p))
            })
            .action
        };
        let git = "/usr/bin/git";
        assert_eq!(at(git, &["git", "push", "origin", "main"]), Action::Allow);
        assert_eq!(
            at(
                git,
                &["git", "push", "origin", "main", "--force-with-lease"]
            ),
            Action::Ask
        );
        assert_eq!(
            at(git, &["git", "-C", "repo", "push", "--force", "origin"]),
            Action::Ask
        );
        assert_eq!(
            at(git, &["git", "-C", "repo", "push", "origin", "+main"]),
            Action::Ask
        );
        let npm = "/usr/bin/npm";
        assert_eq!(at(npm, &["npm", "install", "left-pad"]), Action::Ask);
        assert_eq!(at(npm, &["npm", "ci"]), Action::Allow);
        let pip = "/usr/bin/pip3";
        assert_eq!(
            at(pip, &["pip3", "install", "-r", "requirements.txt"]),
            Action::Allow
        );
        assert_eq!(at(pip, &["pip3", "install", "requests"]), Action::Ask);
        let kubectl = "/usr/local/bin/kubectl";
        assert_eq!(
            at(kubectl, &["kubectl", "get", "pods", "-A"]),
            Action::Allow
        );
        assert_eq!(
            at(kubectl, &["kubectl", "get", "secrets", "-n", "prod"]),
            Action::Deny
        );
        assert_eq!(
            at(kubectl, &["kubectl", "delete", "pod", "web-1"]),
            Action::Ask
        );
        assert_eq!(
            at(kubectl, &["kubectl", "apply", "-f", "x.yaml"]),
            Action::Ask
        );
        let aws = "/usr/local/bin/aws";
        assert_eq!(
            at(aws, &["aws", "s3api", "delete-bucket", "--bucket", "b"]),
            Action::Ask
        );
        assert_eq!(at(aws, &["aws", "s3", "ls"]), Action::Allow);
        assert_eq!(
            at("/usr/bin/terraform", &["terraform", "destroy"]),
            Action::Deny
        );
        assert_eq!(at("/bin/sh", &["sh", "/srv/app/deploy.sh"]), Action::Ask);
        assert_eq!(
            at("/bin/sh", &["sh", "-c", "kubectl delete pod x"]),
            Action::Ask
        );
        assert_eq!(
            at("/bin/busybox", &["busybox", "wget", "http://x"]),
            Action::Deny
        );
    }

    #[test]
    fn a_scripts_allow_never_loosens_an_interpreter_that_asks() {
        let mut exec = policy(Vec::new());
        exec.rules.push(crate::ExecRule {
            path: "/bin/sh".into(),
            action: Action::Ask,
        });
        exec.rules.push(crate::ExecRule {
            path: "/srv/ok.sh".into(),
            action: Action::Allow,
        });
        let m = matcher(&exec);
        assert_eq!(decide(&m, "/bin/sh", &["sh", "ok.sh"]), Action::Ask);
        // A policy whose rules all allow has nothing for scripts to meet.
        let mut lax = policy(Vec::new());
        lax.rules[0].action = Action::Allow;
        let m = matcher(&lax);
        assert!(!m.matches(&PathBuf::from("/bin/sh")));
    }
}
