//! gatekeep's policy files: what security teams write to say which workloads
//! are gated and how.
//!
//! # Files
//!
//! Policies live in a directory of TOML files (`/etc/gatekeep/policies/*.toml`),
//! each holding one or more `[[policy]]` tables. [`PolicySet::load_dir`] reads
//! the files in file name order, and the policies of each file in the order
//! they are written; that is the *load order*. `examples/ai-agents.toml` in
//! this crate is a commented, valid example.
//!
//! ```toml
//! [[policy]]
//! name = "ai-agents"
//! cgroups = ["/sys/fs/cgroup/agents/*"]     # cgroup v2 paths, globs allowed
//! mode = "enforce"                           # enforce | audit (default enforce)
//!
//! [policy.exec]
//! default = "ask"                            # allow | deny | ask (default allow)
//! allow = ["/usr/bin/ls", "/usr/bin/git"]
//! deny  = ["/usr/bin/sudo"]
//! ask   = ["/usr/bin/curl"]
//! on_truncated = "deny"                      # deny | ask (default deny): an exec to be asked whose
//!                                            # argv the kernel cannot bind completely
//! bound_env = ["PYTHONPATH", "NODE_OPTIONS"] # shown and bound besides LD_* (at most 8 names)
//! unlisted_mappings = "allow"                # allow | default (default allow): a PROT_EXEC mapping
//!                                            # (ld.so, LD_PRELOAD, dlopen) of a file no rule names
//! fileless = "deny"                          # allow | deny | ask (default deny): an exec of a file
//!                                            # with no name on disk (memfd, O_TMPFILE, deleted)
//!
//! [policy.connect]
//! default = "ask"                            # allow | deny | ask (default allow)
//! allow = ["127.0.0.0/8", "10.1.0.0/16:443", "[::1]/128", "10.2.0.0/16:8000-8999"]
//! deny  = ["169.254.169.254/32"]
//! unix = "allow"                             # AF_UNIX connects and datagrams (default: `default`)
//! raw_sockets = "deny"                       # raw and packet sockets: allow | deny (default deny)
//! other_families = "deny"                    # vsock, netlink to a process... (default: `default`)
//!
//! [policy.approval]
//! timeout = "5m"                             # default 5m, at most 24h
//! on_timeout = "deny"                        # allow | deny (default deny)
//! reviewers = ["sre", "security"]            # default: any authenticated reviewer
//! approvals_required = 1                     # distinct reviewers (default 1)
//! grant_durations = ["once", "1h", "session", "always"]   # default ["once"]
//! ```
//!
//! Loading never stops at the first problem: every problem of every file is
//! reported, each as `file:line:column: message` with a message that says how
//! to fix it (see [`PolicyError`] and [`Diagnostic`]).
//!
//! ```
//! use gatekeep_policy::{Action, parse_str};
//!
//! let set = parse_str(
//!     "agents.toml",
//!     r#"
//! [[policy]]
//! name = "ai-agents"
//! cgroups = ["/sys/fs/cgroup/agents/*"]
//! [policy.connect]
//! default = "ask"
//! deny = ["169.254.169.254"]
//! "#,
//! )?;
//! let policy = set.policy("ai-agents").expect("loaded");
//! assert_eq!(policy.connect.action_for("169.254.169.254".parse()?, 80), Action::Deny);
//!
//! let error = parse_str(
//!     "agents.toml",
//!     "[[policy]]\nname = \"x\"\ncgroups = [\"agents/*\"]\n[policy.exec]\ndefault = \"alow\"\n",
//! )
//! .unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "agents.toml:3:12: cgroup pattern \"agents/*\" is relative; write an absolute path under /sys/fs/cgroup, e.g. \"/sys/fs/cgroup/agents/*\"\n\
//!      agents.toml:5:11: unknown action \"alow\" (expected allow, deny or ask)"
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Which policy governs a process
//!
//! A policy governs the cgroups its `cgroups` patterns match **and all their
//! descendants**, so a workload cannot leave its policy by creating a child
//! cgroup. Patterns are absolute paths under `/sys/fs/cgroup` and may use
//! globs (`*` and `?` stay within one path component, `**` spans any number,
//! `[abc]` and `{a,b}` as usual); see [`CgroupPattern`].
//!
//! A cgroup is governed by one policy only. Writing the same pattern in two
//! policies is an error. Different globs can still match the same cgroup;
//! then, at run time, the nearest matched cgroup on the way up from the
//! process's cgroup decides, and among the policies matching that cgroup the
//! **first in load order wins** ([`PolicySet::policy_for_cgroup`],
//! [`PolicySet::expand_cgroups`]).
//!
//! # Exec rules
//!
//! Exec rules name executables by absolute path. The agent resolves each path
//! to the file's identity (device and inode) when it loads the policy, and the
//! kernel matches the identity of the file actually being executed. Symlinks,
//! relative paths, `..` and hard links therefore cannot dodge a rule: every
//! name of the file is the same file. A path may appear under one action only.
//! (Two different paths naming the same file cannot be told apart here; they
//! become one identity when the agent resolves them.)
//! An executable no rule names gets `default`.
//!
//! An exec that would be asked (an `ask` rule or default) is bound by a
//! digest of the executable and its argv. The kernel captures at most 32
//! arguments and 4 KiB of argv (64-bit and ia32 `int 0x80` execs alike),
//! and reads nothing of an x32 exec's argv; such a request is *truncated*, its digest does
//! not cover all of it, and `on_truncated` decides: `deny` (the default)
//! refuses it in the kernel, `ask` asks with the request marked truncated
//! (and no granted duration ever covers it: each one is asked). `allow` is
//! not offered.
//!
//! The digest also binds the exec's loader environment: every `LD_*`
//! variable (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`...) and the names
//! `bound_env` lists (at most 8 names of at most 31 bytes), which reviewers
//! are shown; approving `cmd` does not approve `LD_PRELOAD=x cmd`. Bound
//! variables over 1 KiB in all, or an environment of more than 4,096
//! entries, make the request truncated. Allow and deny rules do not depend on argv and apply as
//! written.
//!
//! Code also runs without an exec: ld.so maps the program it is handed
//! (`/lib64/ld-linux-x86-64.so.2 /usr/bin/x`), `LD_PRELOAD` and `dlopen`
//! map libraries. A file mapped with `PROT_EXEC` meets the exec rules of
//! that file: a deny (or ask: a mapping is never paused) rule refuses the
//! mapping, an allow rule allows it. A file no rule names gets
//! `unlisted_mappings`: `allow` (the default, so every program can load
//! its libraries) or `default` (the exec default; an allow-list under
//! `default = "deny"` then keeps its promise for libraries too, and must
//! list the ones its programs load, ld.so and libc included). The
//! program's own binary, which the kernel maps as part of the exec, is
//! never checked twice.
//!
//! A file with no name on disk (made with `memfd_create`, `O_TMPFILE`, or
//! deleted) cannot be named by a rule; its exec gets `fileless`: `deny`
//! (the default), `ask` or `allow`.
//!
//! # Warnings: promises a valid policy cannot keep
//!
//! Some valid policies promise more than identity matching can hold. Loading
//! never refuses them, but [`validate_paths`] (`gatekeep policy validate`)
//! and [`PolicySet::warnings`] (which the agent logs when it loads a policy)
//! report each as a [`Warning`] with its cause and fix ([`WarningKind`]):
//! - deny or ask rules under an exec `default = "allow"`: a copy or rebuild
//!   of a denied program is a new file and runs (write `default = "deny"` or
//!   `"ask"` with an allow-list);
//! - a rule path that does not exist on this host, or is not a regular file;
//! - a deny or ask rule on a script (`#!`, or any file that is not ELF):
//!   `sh denied.sh` runs the interpreter, never exec'ing the script (put the
//!   rule on the interpreter, or deny the interpreter).
//!
//! # Connect rules
//!
//! Connect rules are `NETWORK[:PORTS]`: `10.0.0.0/8`, `10.1.0.0/16:443`,
//! `10.2.0.0/16:8000-8999`, IPv6 in brackets (`[::1]/128`,
//! `[2001:db8::]/32:443`; brackets may be left out when no port follows).
//! A bare address means a single host (`/32` or `/128`), and no port means
//! every port. Host bits must be zero (`10.1.2.3/16` is refused with a
//! suggestion of `10.1.0.0/16`).
//!
//! For a connect to an address and port ([`ConnectPolicy::action_for`]):
//! 1. the rule with the **most specific (longest) prefix** that contains the
//!    address and port wins, whatever the rules' order;
//! 2. at the same prefix a **port-specific rule beats an all-ports rule**;
//! 3. when no rule matches, `default` applies.
//!
//! Overlapping networks with different prefixes are therefore fine (allow
//! `10.0.0.0/8`, deny `10.9.0.0/16`). The same network and ports under two
//! actions is an error, and so are overlapping port ranges at the same prefix
//! under different actions, since no order could settle them.
//!
//! The same rules decide every way a governed process can send to an
//! address: `connect()`, and `sendto()`/`sendmsg()` with a destination on
//! an unconnected socket (UDP, ICMP "ping" sockets, TCP Fast Open). `0.0.0.0`
//! and `::` are matched as `127.0.0.1` and `::1`, the loopback addresses
//! they reach. Beyond IP:
//! - `AF_UNIX` connects and datagrams have no IP address and take `unix`,
//!   which is `default` unless written;
//! - other address families (vsock, netlink addressed to another process,
//!   ...) take `other_families`, also `default` unless written; netlink
//!   messages to the kernel itself are not egress and are not gated;
//! - raw sockets (`SOCK_RAW`, netlink excepted) and packet sockets
//!   (`AF_PACKET`) write their own headers, so no address rule can follow
//!   them: `raw_sockets` (`allow` or `deny`, default `deny`) decides whether
//!   they can be created at all.
//!
//! # Audit mode
//!
//! `mode = "audit"` rolls a policy out safely: it denies and pauses nothing
//! of its own rules. Every action enforcement would have denied or asked
//! about runs, and the agent records it (`audited`, one record per burst of
//! identical actions, with `would` = `deny` or `ask`, the rule and a count).
//! `gatekeep policy forecast` sums those per policy and rule over a window
//! and lists the commands and destinations that would have asked most.
//! Switching between `audit` and `enforce` is a policy reload. gatekeep's
//! self-protections are enforced in both modes.
//!
//! # Policy tests
//!
//! A `*.cases.toml` file lists example actions, each with the outcome it
//! must get (`[[case]]` with `cgroup`, one of `exec` (+ `argv`), `connect`
//! or `unix`, and `expect`); [`load_cases`] reads them and
//! [`PolicySet::run_cases`] decides each as the kernel would, before any
//! reviewer acts (`gatekeep policy test`). Such files may sit in a policy
//! directory: [`PolicySet::load_dir`] skips them.
//!
//! # Approval
//!
//! `ask` pauses the process and asks reviewers: any authenticated reviewer, or
//! members of the listed `reviewers` groups; `approvals_required` distinct
//! reviewers must approve. After `timeout` the `on_timeout` action applies
//! (`allow` or `deny`, never `ask`). `grant_durations` says what a reviewer may
//! grant beyond the one request: `once`, a duration such as `1h`, `session`
//! (until the workload's cgroup goes away) or `always` ([`GrantDuration`]).

mod cases;
mod cgroup;
mod command;
mod error;
mod hosts;
mod load;
mod model;
mod net;
mod parse;
mod unix;
mod warning;

pub use cases::{Case, CaseResult, Example, Outcome, load_cases, parse_cases};
pub use cgroup::{CGROUP_ROOT, CgroupPattern, CgroupPatternError};
pub use command::{
    CommandSet, Decided, ExecMatcher, Operand, Resolved, applet, args_match, operand, operand_path,
    split_shell_command, stricter, strictness,
};
pub use error::{Diagnostic, PolicyError};
pub use hosts::{Decider, HostDecision, strictest};
pub use load::{Summary, Validation, parse_str, validate_paths};
pub use model::{
    Action, Approval, ArgPattern, CommandRule, ConnectPolicy, ConnectRule, DEFAULT_INTERPRETERS,
    ExecPolicy, ExecRule, GrantDuration, HostPattern, HostRule, Integrity, InterpreterKind, Mode,
    ParseActionError, ParseGrantDurationError, ParseProtectPointError, Policy, PolicySet,
    PortRange, Protect, ProtectPoint, UnixRule, UnlistedMappings, normalize as normalize_host,
};
pub use parse::{DEFAULT_TIMEOUT, MAX_TIMEOUT};
pub use unix::{rule_hash as unix_rule_hash, sun_path};
pub use warning::{Location, Warning, WarningKind};

#[cfg(test)]
mod tests;
