//! Helpers shared by gatekeep's integration tests: cgroups that clean up
//! after themselves, workloads started inside a cgroup, and a guard that
//! refuses to run kernel tests outside the VM.

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

/// Where cgroup v2 is mounted (by the VM's `/init`, and on systemd hosts).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Panics unless running inside the test VM (`cargo xtask vm-test` sets
/// `GATEKEEP_IN_VM=1`): these tests load BPF LSM programs and change kernel
/// state, which must never happen on a developer's host.
pub fn require_vm() {
    assert!(
        std::env::var_os("GATEKEEP_IN_VM").is_some(),
        "this test needs a kernel with BPF LSM and runs only inside the VM: use `cargo xtask vm-test`"
    );
}

/// A cgroup v2 directory created for one test and removed when dropped
/// (after killing anything still inside it).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/<name>` (removing a leftover of an earlier
    /// run first).
    pub fn create(name: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(name);
        if path.exists() {
            drop(Self { path: path.clone() });
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the
    /// inode number of the cgroup directory.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("failed to stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Makes `command` join this cgroup between fork and exec, so the exec
    /// itself is already gated.
    pub fn place(&self, command: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: the closure only opens and writes a file (async-signal-safe
        // syscalls); the path was allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                let mut file = fs::OpenOptions::new().write(true).open(&procs)?;
                file.write_all(b"0")
            });
        }
    }

    /// Starts `command` inside this cgroup.
    pub fn spawn(&self, command: &mut Command) -> Child {
        self.place(command);
        command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {command:?} in {}: {e}", self.path.display()))
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) kills every process inside, including stopped
        // ones; then the (empty) directory can be removed.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// Polls `condition` every 10 ms until it returns `Some` or `timeout`
/// passes; panics with `what` on timeout.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
