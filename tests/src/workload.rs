//! The workload the VM tests put in gated cgroups: the test binary itself,
//! started again with `GATEKEEP_WORKLOAD=1` (its commands, `exec`,
//! `connect`..., are answered by the constructor in `tests/vm/workload.rs`);
//! and how a run of it ended.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{Cgroup, wait_child, wait_stopped};

/// A command running this binary as the workload with `args`.
#[must_use]
pub fn workload(args: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .env("GATEKEEP_WORKLOAD", "1")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The workload binary's path (a policy must let it run).
#[must_use]
pub fn workload_path() -> String {
    std::env::current_exe()
        .expect("current exe")
        .to_string_lossy()
        .into_owned()
}

/// Copies busybox to `dir/name`: a file with its own inode, so exec rules
/// can name it without touching every busybox applet.
#[must_use]
pub fn tool(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::copy("/bin/busybox", &path).expect("copy busybox");
    path.to_string_lossy().into_owned()
}

/// How a workload ended: its exit code (-1 if a signal ended it) and its
/// stdout, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
}

impl Outcome {
    /// `exec` ran the program (`true`): exit 0, nothing printed.
    #[must_use]
    pub fn exec_ran() -> Self {
        Self::new(0, "")
    }

    /// `exec` failed with EPERM: `errno 1`, exit 111.
    #[must_use]
    pub fn exec_denied() -> Self {
        Self::new(111, "errno 1")
    }

    /// `connect` reached the listener: `ok`, exit 0.
    #[must_use]
    pub fn connected() -> Self {
        Self::new(0, "ok")
    }

    /// `connect` failed with EPERM: `errno 1`, exit 1.
    #[must_use]
    pub fn connect_denied() -> Self {
        Self::new(1, "errno 1")
    }

    /// Exit code `code` with `stdout` printed (trimmed).
    #[must_use]
    pub fn new(code: i32, stdout: &str) -> Self {
        Self {
            code,
            stdout: stdout.to_owned(),
        }
    }

    fn of(output: &Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        }
    }

    /// Panics if `errno 513` (-ERESTARTNOINTR) reached user space: it
    /// never may.
    pub fn assert_no_513(&self) {
        assert_no_513(&self.stdout);
    }
}

/// `errno 513` (-ERESTARTNOINTR) must never reach user space.
pub fn assert_no_513(stdout: &str) {
    assert!(
        !stdout.contains("errno 513"),
        "ERESTARTNOINTR leaked to user space: {stdout}"
    );
}

/// Waits (up to `timeout`) for a workload started with [`Cgroup::spawn`].
#[must_use]
pub fn finish(child: &mut Child, timeout: Duration) -> Outcome {
    Outcome::of(&wait_child(child, timeout))
}

/// Runs the workload with `args` in `cgroup` to its end.
#[must_use]
pub fn run_in(cgroup: &Cgroup, args: &[&str], timeout: Duration) -> Outcome {
    finish(&mut cgroup.spawn(&mut workload(args)), timeout)
}

/// Connects from `cgroup` to 127.0.0.1:`port` (the workload's `connect`).
#[must_use]
pub fn connect_in(cgroup: &Cgroup, port: u16, timeout: Duration) -> Outcome {
    run_in(
        cgroup,
        &["connect", "127.0.0.1", &port.to_string()],
        timeout,
    )
}

/// Starts the workload with `args` in `cgroup` and waits (up to `timeout`)
/// until its syscall is paused.
#[must_use]
pub fn start_paused(cgroup: &Cgroup, args: &[&str], timeout: Duration) -> Child {
    let child = cgroup.spawn(&mut workload(args));
    wait_stopped(child.id(), timeout);
    child
}

/// Runs the workload with `args` to its end, in `cgroup` (or, with `None`,
/// in the test's own, ungated cgroup), and returns the one line it printed
/// (`ok`, `errno 1`, `ok 0`...).
#[must_use]
pub fn line_of(cgroup: Option<&Cgroup>, args: &[&str]) -> String {
    let mut command = workload(args);
    let mut child = match cgroup {
        Some(cgroup) => cgroup.spawn(&mut command),
        None => command.spawn().expect("start the workload"),
    };
    let output = wait_child(&mut child, Duration::from_mins(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_no_513(&stdout);
    stdout.trim().to_owned()
}
