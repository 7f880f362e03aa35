//! Check 8, the ground truth: load (and let the kernel verify) every LSM
//! program without attaching it, then unload it again.

use std::{fmt::Write as _, io};

use aya::programs::ProgramError;
use gatekeep_audit::error_chain;

use super::{CheckResult, Status, checks::KernelConfig};
use crate::bpf::programs::{self, LoadError};

/// The check's name.
pub const NAME: &str = "trial-load";

/// Why the kernel refused, when it refuses before verifying anything.
pub const EPERM_CAUSE: &str = "the kernel refused to load BPF LSM programs (EPERM before verification): this kernel cannot attach BPF trampolines (e.g. a paravirtualised guest without ftrace), or the caller lacks CAP_BPF/CAP_SYS_ADMIN, or lockdown forbids it";

/// What to do about [`EPERM_CAUSE`].
pub const EPERM_FIX: &str = "run gatekeep on a kernel with CONFIG_BPF_LSM=y, CONFIG_FTRACE/DYNAMIC_FTRACE_WITH_DIRECT_CALLS, booted with bpf in lsm=; on this build machine use `cargo xtask vm-run -- gatekeep-agent check`";

/// How many lines of a verifier log to show.
const LOG_TAIL: usize = 20;

/// Loads the programs without attaching them: the kernel in production, a
/// fake in unit tests.
pub trait TrialLoad {
    /// Loads every program; returns `(program, hook)` for each one loaded.
    fn trial_load(&self) -> Result<Vec<(&'static str, &'static str)>, TrialFailure>;
}

/// Loads the embedded object's [`programs::PROGRAMS`] into the running
/// kernel, attaches nothing, and drops them (which unloads them).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelTrialLoad;

impl TrialLoad for KernelTrialLoad {
    fn trial_load(&self) -> Result<Vec<(&'static str, &'static str)>, TrialFailure> {
        let (mut loaded, btf) =
            programs::open().map_err(|err| TrialFailure::from_load_error(&err))?;
        // Every program, the LSM hooks first (their failure explains the
        // most); exit cleanup and cgroup tracking are part of gating too.
        let order =
            programs::lsm_programs().chain(programs::PROGRAMS.iter().filter(|p| !p.is_lsm()));
        let mut verified = Vec::new();
        for program in order {
            programs::load(&mut loaded, &btf, program)
                .map_err(|err| TrialFailure::from_load_error(&err))?;
            verified.push((program.name, hook_name(program.hook)));
        }
        // Dropping the `Ebpf` closes every program and map fd: nothing stays loaded.
        drop(loaded);
        Ok(verified)
    }
}

/// What a program attaches to, as the report names it.
fn hook_name(hook: programs::Hook) -> &'static str {
    match hook {
        programs::Hook::Lsm(name)
        | programs::Hook::BtfTracePoint(name)
        | programs::Hook::TracePoint(_, name) => name,
    }
}

/// Why the trial load failed, reduced to what the report needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialFailure {
    /// The binary embeds no eBPF object (`AYA_BUILD_SKIP=1`).
    NoObject,
    /// The kernel's BTF could not be read.
    Btf { message: String },
    /// `BPF_PROG_LOAD` failed for one program.
    ProgramLoad {
        program: &'static str,
        errno: Option<i32>,
        /// The verifier's log; empty when the kernel refused before verifying.
        verifier_log: String,
    },
    /// Anything else (parsing the object, creating maps, ...).
    Other { message: String, errno: Option<i32> },
}

/// The first OS error number in `err`'s chain.
fn chain_errno(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io_err) = e.downcast_ref::<io::Error>()
            && let Some(errno) = io_err.raw_os_error()
        {
            return Some(errno);
        }
        current = e.source();
    }
    None
}

impl TrialFailure {
    /// Classifies an error from [`programs::open`] or [`programs::load`].
    #[must_use]
    pub fn from_load_error(err: &LoadError) -> Self {
        match err {
            LoadError::NoObject => Self::NoObject,
            LoadError::Btf { .. } => Self::Btf {
                message: error_chain(err),
            },
            LoadError::LoadProgram {
                name,
                source:
                    ProgramError::LoadError {
                        io_error,
                        verifier_log,
                    },
            } => Self::ProgramLoad {
                program: name,
                errno: io_error.raw_os_error(),
                verifier_log: verifier_log.to_string(),
            },
            _ => Self::Other {
                message: error_chain(err),
                errno: chain_errno(err),
            },
        }
    }
}

/// `EPERM`, `EINVAL`, ... for the errors BPF loading returns.
#[must_use]
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::E2BIG => "E2BIG",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        // The kernel-internal ENOTSUPP, which BPF leaks to user space.
        524 => "ENOTSUPP",
        _ => return format!("errno {errno} ({})", io::Error::from_raw_os_error(errno)),
    };
    name.to_owned()
}

/// The last [`LOG_TAIL`] non-empty lines of a verifier log.
fn log_tail(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].to_vec()
}

/// Which earlier, relevant checks did not pass, as a clause for the detail.
fn suspects(earlier: &[CheckResult], relevant: &[&str]) -> String {
    let named = |status: Status| {
        earlier
            .iter()
            .filter(|c| c.status == status && relevant.contains(&c.check))
            .map(|c| c.check)
            .collect::<Vec<_>>()
    };
    let (failed, unsure) = (named(Status::Fail), named(Status::Warn));
    let unsure = if unsure.is_empty() {
        String::new()
    } else {
        format!("; unconfirmed: {}", unsure.join(", "))
    };
    if failed.is_empty() {
        format!("no earlier check explains it{unsure}")
    } else {
        format!(
            "earlier failures that likely explain it: {}{unsure}",
            failed.join(", ")
        )
    }
}

/// Check 8: runs `loader` and explains its failure. `earlier` are the
/// results of checks 1-7, named as likely explanations.
#[must_use]
pub fn trial_load(
    loader: &dyn TrialLoad,
    earlier: &[CheckResult],
    config: Option<&KernelConfig>,
) -> CheckResult {
    let failure = match loader.trial_load() {
        Ok(programs) => {
            let names = programs
                .iter()
                .map(|(program, hook)| format!("{program} on {hook}"))
                .collect::<Vec<_>>()
                .join(", ");
            return CheckResult::ok(
                NAME,
                format!(
                    "the kernel verified and loaded {} program(s) ({names}); none attached, all unloaded again",
                    programs.len()
                ),
            );
        }
        Err(failure) => failure,
    };
    explain(failure, earlier, config)
}

/// Checks whose failure can keep a program from loading.
const LOAD_SUSPECTS: &[&str] = &[
    "kernel-version",
    "btf",
    "bpf-lsm",
    "capabilities",
    "lockdown",
];

/// The failing result for `failure`: its cause, the earlier checks that
/// likely explain it, and the fix.
fn explain(
    failure: TrialFailure,
    earlier: &[CheckResult],
    config: Option<&KernelConfig>,
) -> CheckResult {
    match failure {
        TrialFailure::NoObject => CheckResult::fail(
            NAME,
            "this gatekeep-agent binary was built without its eBPF programs (AYA_BUILD_SKIP=1), so there is nothing to load",
            "rebuild without AYA_BUILD_SKIP: `cargo build --release --package gatekeep-agent` (`cargo xtask setup` installs the eBPF toolchain)",
        ),
        TrialFailure::Btf { message } => CheckResult::fail(
            NAME,
            format!("{message}; {}", suspects(earlier, &["btf"])),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ),
        TrialFailure::ProgramLoad {
            program,
            errno,
            verifier_log,
        } if errno == Some(libc::EPERM) && verifier_log.trim().is_empty() => {
            refused_before_verification(program, earlier, config)
        }
        TrialFailure::ProgramLoad {
            program,
            errno,
            verifier_log,
        } if !verifier_log.trim().is_empty() => {
            let errno = errno.map_or_else(|| "an error".to_owned(), errno_name);
            let tail = log_tail(&verifier_log);
            CheckResult::fail(
                NAME,
                format!(
                    "the verifier rejected program `{program}` ({errno}); {}; verifier log (last {} lines):\n{}",
                    suspects(earlier, LOAD_SUSPECTS),
                    tail.len(),
                    tail.join("\n")
                ),
                "if the earlier checks pass, this kernel lacks something the program needs: report it to the gatekeep developers with this output and the kernel version",
            )
        }
        TrialFailure::ProgramLoad { program, errno, .. } => {
            let errno = errno.map_or_else(|| "an unknown error".to_owned(), errno_name);
            CheckResult::fail(
                NAME,
                format!(
                    "the kernel refused program `{program}` with {errno} and no verifier log; {}",
                    suspects(earlier, LOAD_SUSPECTS)
                ),
                "run gatekeep on a kernel with CONFIG_BPF_LSM=y and CONFIG_DEBUG_INFO_BTF=y, booted with bpf in lsm=",
            )
        }
        TrialFailure::Other { message, errno } => {
            let fix = match errno {
                Some(libc::EPERM) => {
                    "run as root (creating BPF maps needs CAP_BPF or CAP_SYS_ADMIN)"
                }
                Some(_) => {
                    "run gatekeep on a kernel with CONFIG_BPF_SYSCALL=y, CONFIG_BPF_LSM=y and CONFIG_DEBUG_INFO_BTF=y"
                }
                // No system call failed: the embedded object itself does not fit this agent.
                None => {
                    "the eBPF object embedded in this binary does not match its user space (a stale build?): rebuild without AYA_BUILD_SKIP (`cargo build --release --package gatekeep-agent`)"
                }
            };
            CheckResult::fail(
                NAME,
                format!(
                    "{message}; {}",
                    suspects(earlier, &["kernel-version", "btf", "capabilities"])
                ),
                fix,
            )
        }
    }
}

/// EPERM with an empty verifier log: the kernel refused before verifying.
fn refused_before_verification(
    program: &str,
    earlier: &[CheckResult],
    config: Option<&KernelConfig>,
) -> CheckResult {
    let mut detail = format!("program `{program}`: {EPERM_CAUSE}");
    if let Some(config) = config
        && config.get("CONFIG_BPF_LSM") != Some("y")
    {
        let _ = write!(
            detail,
            "; the kernel config ({}) lacks CONFIG_BPF_LSM=y",
            config.source.display()
        );
    }
    let caps_ok = earlier
        .iter()
        .any(|c| c.check == "capabilities" && c.status == Status::Ok);
    if caps_ok {
        detail.push_str("; the capabilities check passed, so the caller is not the cause");
    }
    detail.push_str("; ");
    detail.push_str(&suspects(earlier, LOAD_SUSPECTS));
    CheckResult::fail(NAME, detail, EPERM_FIX)
}

#[cfg(test)]
mod tests {
    use aya_obj::VerifierLog;

    use super::*;

    /// A loader that returns a canned result.
    struct Fake(Result<Vec<(&'static str, &'static str)>, TrialFailure>);

    impl TrialLoad for Fake {
        fn trial_load(&self) -> Result<Vec<(&'static str, &'static str)>, TrialFailure> {
            self.0.clone()
        }
    }

    fn eperm() -> Fake {
        Fake(Err(TrialFailure::ProgramLoad {
            program: "bprm_check_security",
            errno: Some(libc::EPERM),
            verifier_log: String::new(),
        }))
    }

    fn passing_caps() -> CheckResult {
        CheckResult::ok("capabilities", "effective: CAP_BPF")
    }

    #[test]
    fn success_names_the_programs_and_attaches_nothing() {
        let result = trial_load(
            &Fake(Ok(vec![("bprm_check_security", "bprm_check_security")])),
            &[],
            None,
        );
        assert_eq!(result.status, Status::Ok);
        assert!(
            result
                .detail
                .contains("1 program(s) (bprm_check_security on bprm_check_security)"),
            "{result:?}"
        );
        assert!(result.detail.contains("none attached"));
        assert_eq!(result.fix, None);
    }

    #[test]
    fn eperm_before_verification_is_explained() {
        let result = trial_load(&eperm(), &[passing_caps()], None);
        assert_eq!(result.status, Status::Fail);
        assert!(
            result
                .detail
                .starts_with(&format!("program `bprm_check_security`: {EPERM_CAUSE}")),
            "{result:?}"
        );
        assert!(
            result
                .detail
                .contains("the capabilities check passed, so the caller is not the cause")
        );
        assert!(
            result.detail.ends_with("no earlier check explains it"),
            "{result:?}"
        );
        assert_eq!(result.fix.as_deref(), Some(EPERM_FIX));
    }

    #[test]
    fn eperm_names_the_earlier_failures_that_explain_it() {
        let earlier = [
            CheckResult::ok("kernel-version", "6.12"),
            CheckResult::fail("bpf-lsm", "bpf is not active", "lsm=..."),
            CheckResult::fail("capabilities", "missing CAP_BPF", "run as root"),
            CheckResult::fail("cgroup2", "hybrid", "unified"),
            CheckResult::warn("lockdown", "unknown"),
        ];
        let config = KernelConfig::from_text("/proc/config.gz", "# CONFIG_BPF_LSM is not set\n");
        let result = trial_load(&eperm(), &earlier, Some(&config));
        assert!(
            result
                .detail
                .contains("the kernel config (/proc/config.gz) lacks CONFIG_BPF_LSM=y"),
            "{result:?}"
        );
        assert!(!result.detail.contains("the caller is not the cause"));
        // cgroup2 does not keep programs from loading, so it is not named.
        assert!(
            result.detail.ends_with(
                "earlier failures that likely explain it: bpf-lsm, capabilities; unconfirmed: lockdown"
            ),
            "{result:?}"
        );
    }

    #[test]
    fn a_verifier_rejection_shows_the_log_tail() {
        let log = (1..=30).fold(String::new(), |mut log, i| {
            let _ = writeln!(log, "{i}: insn");
            log
        });
        let result = trial_load(
            &Fake(Err(TrialFailure::ProgramLoad {
                program: "bprm_check_security",
                errno: Some(libc::EACCES),
                verifier_log: log,
            })),
            &[],
            None,
        );
        assert_eq!(result.status, Status::Fail);
        let mut lines = result.detail.lines();
        assert_eq!(
            lines.next(),
            Some(
                "the verifier rejected program `bprm_check_security` (EACCES); no earlier check explains it; verifier log (last 20 lines):"
            )
        );
        let tail: Vec<&str> = lines.collect();
        assert_eq!(tail.len(), 20);
        assert_eq!(tail.first(), Some(&"11: insn"));
        assert_eq!(tail.last(), Some(&"30: insn"));
    }

    #[test]
    fn no_object_says_to_rebuild_without_the_skip() {
        let result = trial_load(&Fake(Err(TrialFailure::NoObject)), &[], None);
        assert_eq!(result.status, Status::Fail);
        assert!(result.detail.contains("AYA_BUILD_SKIP=1"));
        assert!(
            result
                .fix
                .is_some_and(|f| f.starts_with("rebuild without AYA_BUILD_SKIP"))
        );
    }

    #[test]
    fn other_refusals_name_the_errno() {
        let result = trial_load(
            &Fake(Err(TrialFailure::ProgramLoad {
                program: "socket_connect",
                errno: Some(libc::EINVAL),
                verifier_log: "\n".to_owned(),
            })),
            &[],
            None,
        );
        assert!(
            result.detail.starts_with(
                "the kernel refused program `socket_connect` with EINVAL and no verifier log"
            ),
            "{result:?}"
        );
        let maps = trial_load(
            &Fake(Err(TrialFailure::Other {
                message: "failed to create map".to_owned(),
                errno: Some(libc::EPERM),
            })),
            &[],
            None,
        );
        assert!(maps.fix.is_some_and(|f| f.starts_with("run as root")));
        let stale = trial_load(
            &Fake(Err(TrialFailure::Other {
                message: "symbol with name DIGEST_KEY not found".to_owned(),
                errno: None,
            })),
            &[],
            None,
        );
        assert!(
            stale
                .fix
                .is_some_and(|f| f.contains("does not match its user space")),
            "a build mismatch is not blamed on the kernel"
        );
    }

    #[test]
    fn maps_aya_load_errors() {
        assert_eq!(
            TrialFailure::from_load_error(&LoadError::NoObject),
            TrialFailure::NoObject
        );
        let refused = LoadError::LoadProgram {
            name: "bprm_check_security",
            source: ProgramError::LoadError {
                io_error: io::Error::from_raw_os_error(libc::EPERM),
                verifier_log: VerifierLog::new(String::new()),
            },
        };
        assert_eq!(
            TrialFailure::from_load_error(&refused),
            TrialFailure::ProgramLoad {
                program: "bprm_check_security",
                errno: Some(libc::EPERM),
                verifier_log: String::new(),
            }
        );
        let missing = LoadError::MissingProgram {
            name: "socket_connect",
        };
        assert_eq!(
            TrialFailure::from_load_error(&missing),
            TrialFailure::Other {
                message: missing.to_string(),
                errno: None,
            }
        );
        let map = LoadError::Object {
            source: aya::EbpfError::MapError(aya::maps::MapError::CreateError {
                name: gatekeep_common::map_names::EVENTS.to_owned(),
                io_error: io::Error::from_raw_os_error(libc::EPERM),
            }),
        };
        let TrialFailure::Other { message, errno } = TrialFailure::from_load_error(&map) else {
            panic!("a map error is not a program load refusal");
        };
        assert_eq!(
            errno,
            Some(libc::EPERM),
            "the errno is found down the chain"
        );
        assert!(
            message.starts_with(&format!("{map}: map error: ")),
            "{message}"
        );
    }

    #[test]
    fn names_errnos() {
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(524), "ENOTSUPP");
        assert!(errno_name(libc::EXDEV).starts_with("errno 18 ("));
    }
}
