//! `gatekeep-agent check`: can this host run gatekeep?
//!
//! Each check reads only the paths in [`Paths`] and returns one
//! [`CheckResult`] (ok / warn / fail, a detail naming the cause and, unless
//! ok, a fix). The last check is the ground truth: it loads every LSM program
//! into the kernel without attaching it ([`TrialLoad`]), and names the
//! earlier failures that likely explain a refusal. Unit tests give the checks
//! temporary files and a fake loader.

pub mod checks;
pub mod trial;

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    path::PathBuf,
};

use serde::Serialize;

pub use self::{
    checks::KernelConfig,
    trial::{KernelTrialLoad, TrialFailure, TrialLoad},
};

/// Checks that the kernel, mounts and privileges let gatekeep gate syscalls
/// here, and trial-loads the BPF LSM programs (nothing is attached). Exits 0
/// when every check passes (warnings allowed), 1 otherwise.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Output format: an aligned table, or a JSON array of
    /// `{check, status, detail, fix}`.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// How [`run`] prints the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Every file and mount point the checks look at.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The running kernel's release.
    pub osrelease: PathBuf,
    /// The kernel's BTF.
    pub btf_vmlinux: PathBuf,
    /// Where securityfs is mounted.
    pub securityfs: PathBuf,
    /// The active LSMs, comma-separated (securityfs).
    pub lsm: PathBuf,
    /// The lockdown mode (securityfs).
    pub lockdown: PathBuf,
    /// The kernel command line.
    pub cmdline: PathBuf,
    /// Holds `config-<release>`.
    pub boot_dir: PathBuf,
    /// The gzipped kernel config (`CONFIG_IKCONFIG_PROC`).
    pub proc_config: PathBuf,
    /// This process's mount table.
    pub mountinfo: PathBuf,
    /// This process's status (capabilities).
    pub status: PathBuf,
    /// Where the cgroup v2 hierarchy must be.
    pub cgroup_mount: PathBuf,
    /// Where bpffs must be.
    pub bpffs_mount: PathBuf,
}

impl Default for Paths {
    /// The running system's paths.
    fn default() -> Self {
        Self {
            osrelease: "/proc/sys/kernel/osrelease".into(),
            btf_vmlinux: "/sys/kernel/btf/vmlinux".into(),
            securityfs: "/sys/kernel/security".into(),
            lsm: "/sys/kernel/security/lsm".into(),
            lockdown: "/sys/kernel/security/lockdown".into(),
            cmdline: "/proc/cmdline".into(),
            boot_dir: "/boot".into(),
            proc_config: "/proc/config.gz".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            status: "/proc/self/status".into(),
            cgroup_mount: "/sys/fs/cgroup".into(),
            bpffs_mount: "/sys/fs/bpf".into(),
        }
    }
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Could not be confirmed, or may limit gatekeep; does not fail the run.
    Warn,
    Fail,
}

impl Status {
    /// `ok`, `warn` or `fail`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// A stable name, e.g. `bpf-lsm`.
    pub check: &'static str,
    pub status: Status,
    /// What was found and, unless ok, why it matters.
    pub detail: String,
    /// What to do about it.
    pub fix: Option<String>,
}

impl CheckResult {
    #[must_use]
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    #[must_use]
    pub fn warn(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            ..Self::ok(check, detail)
        }
    }

    #[must_use]
    pub fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status: Status::Fail,
            ..Self::ok(check, detail)
        }
        .with_fix(fix)
    }

    #[must_use]
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Every check's result, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// How many checks failed.
    #[must_use]
    pub fn failures(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }

    /// True when no check failed (warnings allowed).
    #[must_use]
    pub fn passed(&self) -> bool {
        self.failures() == 0
    }

    /// The result of the check named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == name)
    }

    /// The last line of the text report.
    #[must_use]
    pub fn summary(&self) -> String {
        let warnings = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        match (self.failures(), warnings) {
            (0, 0) => "gatekeep can run on this host".to_owned(),
            (0, 1) => "gatekeep can run on this host (1 warning)".to_owned(),
            (0, w) => format!("gatekeep can run on this host ({w} warnings)"),
            (1, _) => "1 check failed: gatekeep cannot gate syscalls on this host".to_owned(),
            (n, _) => format!("{n} checks failed: gatekeep cannot gate syscalls on this host"),
        }
    }

    /// An aligned table: status, check, detail; continuation lines (the
    /// rest of a multi-line detail, then `fix: ...`) under the detail.
    #[must_use]
    pub fn to_text(&self) -> String {
        let name_width = self
            .checks
            .iter()
            .map(|c| c.check.len())
            .chain(["CHECK".len()])
            .max()
            .unwrap_or_default();
        let indent = " ".repeat(6 + 2 + name_width + 2);
        let mut out = format!("{:<6}  {:<name_width$}  DETAIL\n", "STATUS", "CHECK");
        for check in &self.checks {
            let mut lines = check.detail.lines();
            let first = lines.next().unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<6}  {:<name_width$}  {first}",
                check.status.as_str(),
                check.check
            );
            for line in lines {
                let _ = writeln!(out, "{indent}  | {line}");
            }
            if let Some(fix) = &check.fix {
                let _ = writeln!(out, "{indent}fix: {fix}");
            }
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// A JSON array of `{check, status, detail, fix}`.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(&self.checks)
    }
}

/// Runs every check against `paths`, then the trial load through `loader`.
#[must_use]
pub fn run_checks(paths: &Paths, loader: &dyn TrialLoad) -> Report {
    let config = KernelConfig::read(paths);
    let mut results = vec![
        checks::kernel_version(paths),
        checks::btf(paths),
        checks::bpf_lsm(paths, config.as_ref()),
        checks::cgroup2(paths),
        checks::bpffs(paths),
        checks::capabilities(paths),
        checks::lockdown(paths),
    ];
    let trial = trial::trial_load(loader, &results, config.as_ref());
    results.push(trial);
    Report { checks: results }
}

/// Errors printing the report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to encode the report as json")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to write the report to stdout")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// Checks this host with the real paths and kernel, prints the report, and
/// returns whether every check passed.
pub fn run(opts: &Options) -> Result<bool, Error> {
    let report = run_checks(&Paths::default(), &KernelTrialLoad);
    let text = match opts.output {
        OutputFormat::Text => report.to_text(),
        OutputFormat::Json => {
            let mut json = report.to_json().map_err(|source| Error::Json { source })?;
            json.push('\n');
            json
        }
    };
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Write { source })?;
    Ok(report.passed())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn report() -> Report {
        Report {
            checks: vec![
                CheckResult::ok("btf", "/sys/kernel/btf/vmlinux (5.3 MiB)"),
                CheckResult::warn("lockdown", "unknown").with_fix("mount securityfs"),
                CheckResult::fail("trial-load", "refused\nlog line 1\nlog line 2", "use a VM"),
            ],
        }
    }

    #[test]
    fn text_is_an_aligned_table_with_fixes_and_a_summary() {
        let expected = "\
STATUS  CHECK       DETAIL
ok      btf         /sys/kernel/btf/vmlinux (5.3 MiB)
warn    lockdown    unknown
                    fix: mount securityfs
fail    trial-load  refused
                      | log line 1
                      | log line 2
                    fix: use a VM
1 check failed: gatekeep cannot gate syscalls on this host
";
        assert_eq!(report().to_text(), expected);
    }

    #[test]
    fn summary_counts_failures_and_warnings() {
        let mut report = report();
        assert!(!report.passed());
        report
            .checks
            .push(CheckResult::fail("bpffs", "not mounted", "mount it"));
        assert_eq!(report.failures(), 2);
        assert_eq!(
            report.summary(),
            "2 checks failed: gatekeep cannot gate syscalls on this host"
        );
        report.checks.retain(|c| c.status != Status::Fail);
        assert!(report.passed());
        assert_eq!(
            report.summary(),
            "gatekeep can run on this host (1 warning)"
        );
        report.checks.retain(|c| c.status == Status::Ok);
        assert_eq!(report.summary(), "gatekeep can run on this host");
    }

    #[test]
    fn json_is_an_array_of_check_status_detail_fix() {
        let json: serde_json::Value =
            serde_json::from_str(&report().to_json().expect("json")).expect("valid json");
        assert_eq!(
            json[0],
            serde_json::json!({
                "check": "btf",
                "status": "ok",
                "detail": "/sys/kernel/btf/vmlinux (5.3 MiB)",
                "fix": null,
            })
        );
        assert_eq!(json[2]["status"], "fail");
        assert_eq!(json[2]["fix"], "use a VM");
        assert_eq!(json.as_array().map(Vec::len), Some(3));
    }

    struct Loads;

    impl TrialLoad for Loads {
        fn trial_load(&self) -> Result<Vec<(&'static str, &'static str)>, TrialFailure> {
            Ok(vec![("bprm_check_security", "bprm_check_security")])
        }
    }

    /// Every check on a healthy host laid out in temporary files.
    #[test]
    fn a_healthy_host_passes_every_check() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |name: &str| dir.path().join(name);
        let paths = Paths {
            osrelease: p("osrelease"),
            btf_vmlinux: p("vmlinux"),
            lsm: p("lsm"),
            lockdown: p("lockdown"),
            cmdline: p("cmdline"),
            boot_dir: p("boot"),
            proc_config: p("config.gz"),
            mountinfo: p("mountinfo"),
            status: p("status"),
            ..Paths::default()
        };
        for (path, contents) in [
            (&paths.osrelease, "6.12.57+deb12-cloud-amd64\n"),
            (&paths.btf_vmlinux, "btf"),
            (&paths.lsm, "lockdown,capability,landlock,yama,apparmor,bpf"),
            (&paths.lockdown, "[none] integrity confidentiality\n"),
            (&paths.cmdline, "console=ttyS0\n"),
            (
                &paths.mountinfo,
                "29 23 0:7 / /sys/kernel/security rw - securityfs securityfs rw\n\
                 31 23 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                 33 23 0:30 / /sys/fs/bpf rw - bpf bpf rw\n",
            ),
            (&paths.status, "CapEff:\t000001ffffffffff\n"),
        ] {
            fs::write(path, contents).expect("write fixture");
        }
        let report = run_checks(&paths, &Loads);
        let names: Vec<_> = report.checks.iter().map(|c| c.check).collect();
        assert_eq!(
            names,
            [
                "kernel-version",
                "btf",
                "bpf-lsm",
                "cgroup2",
                "bpffs",
                "capabilities",
                "lockdown",
                "trial-load"
            ]
        );
        assert!(
            report.checks.iter().all(|c| c.status == Status::Ok),
            "{}",
            report.to_text()
        );
        assert!(
            report
                .to_text()
                .ends_with("\ngatekeep can run on this host\n")
        );
    }
}
