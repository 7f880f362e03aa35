//! The in-VM benchmarks (real kernel, BPF LSM): `gatekeep-bench vm`, booted by
//! `cargo xtask bench`.
//!
//! 1. [`overhead`]: exec and connect loops in four setups (and two diagnostic ones),
//!    interleaved in short chunks; the programs' own run time from the kernel's statistics.
//! 2. [`agent`]: the ask path through the real agent, the agent's event throughput and
//!    its memory.

pub mod agent;
pub mod overhead;
pub mod worker;

use std::{
    fs,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use worker::WorkerReport;

/// Options of `gatekeep-bench vm`.
#[derive(Debug, clap::Args)]
pub struct VmOptions {
    /// Seconds, not minutes: one round, few iterations.
    #[arg(long)]
    pub smoke: bool,
    /// Only these groups: `overhead`, `agent` (default: both).
    #[arg(long = "only", value_name = "GROUP")]
    pub only: Vec<String>,
    /// How the VM's clock runs (`cargo xtask bench` boots QEMU to match).
    #[arg(long, value_enum, default_value_t = Clock::Wall)]
    pub clock: Clock,
}

/// How the VM's clock runs, which decides what a time measured in it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Clock {
    /// Plain TCG: emulated wall time, moved by the host's load and weighted by what each
    /// instruction costs the emulator (a TLB miss, a jump between pages).
    Wall,
    /// QEMU counts instructions (`-icount shift=0`): one virtual nanosecond per guest
    /// instruction, so a time is an exact instruction count.
    Instructions,
}

impl Clock {
    /// What starts the figures' ids.
    #[must_use]
    pub fn id_prefix(self) -> &'static str {
        match self {
            Clock::Wall => "vm",
            Clock::Instructions => "vm.icount",
        }
    }

    /// What the figures' names say was measured.
    #[must_use]
    pub fn measure(self) -> &'static str {
        match self {
            Clock::Wall => "emulated time",
            Clock::Instructions => "instructions",
        }
    }

    /// The unit of a time measured in microseconds (thousands of instructions).
    #[must_use]
    pub fn micros_unit(self) -> &'static str {
        match self {
            Clock::Wall => "us/op",
            Clock::Instructions => "k instr/op",
        }
    }

    /// The unit of a time measured in nanoseconds (instructions).
    #[must_use]
    pub fn nanos_unit(self) -> &'static str {
        match self {
            Clock::Wall => "ns/op",
            Clock::Instructions => "instr/op",
        }
    }

    /// For the figures' conditions.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Clock::Wall => "VM under TCG, emulated wall time",
            Clock::Instructions => {
                "VM under TCG with -icount shift=0,sleep=off: every time is the count of \
                 instructions the guest executed (1 ns = 1 instruction), whatever each costs \
                 the emulator or the host's load"
            }
        }
    }
}

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Rounds of the agent benchmarks.
    pub rounds: usize,
    /// Repetitions of what is measured once per agent start or per ramp: idle RSS, the
    /// event-rate ramp, the SIGTERM count.
    pub repeats: usize,
    pub overhead: overhead::OverheadSizes,
    pub asks: usize,
    /// Length of one step of the event-rate ramp.
    pub step: Duration,
}

impl Sizes {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                rounds: 1,
                repeats: 1,
                overhead: overhead::OverheadSizes::new(true),
                asks: 20,
                step: Duration::from_secs(1),
            }
        } else {
            Self {
                rounds: 5,
                repeats: 3,
                overhead: overhead::OverheadSizes::new(false),
                asks: 300,
                step: Duration::from_secs(4),
            }
        }
    }
}

/// Where the tiny exec target goes (tmpfs in the VM).
pub const TINY: &str = "/tmp/gk-true";

/// The smallest static x86-64 executable that exits 0: an ELF header, one loadable
/// segment, and `xor edi, edi; mov eax, 60; syscall` (`exit(0)`). 129 bytes: exec costs
/// what the kernel spends, not what a C runtime or dynamic loader would add.
#[must_use]
pub fn tiny_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE: [u8; 9] = [0x31, 0xff, 0xb8, 0x3c, 0x00, 0x00, 0x00, 0x0f, 0x05];
    let header_len: u64 = 64 + 56;
    let total = header_len + CODE.len() as u64;
    let mut elf = Vec::with_capacity(129);
    // e_ident: magic, 64-bit, little endian, version 1, System V ABI, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + header_len).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&total.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&total.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&CODE);
    elf
}

/// Writes [`tiny_elf`] to `path` (mode 0755); returns its kernel identity (dev, ino).
pub fn install_tiny(path: &Path) -> Result<(u64, u64)> {
    fs::write(path, tiny_elf()).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    let meta = fs::metadata(path)?;
    Ok((
        gatekeep_agent::hooks::exec::kernel_dev(meta.dev()),
        meta.ino(),
    ))
}

/// A cgroup made for the benchmark, removed (after killing what is left in it) on drop.
#[derive(Debug)]
pub struct BenchCgroup {
    path: PathBuf,
}

impl BenchCgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = Path::new("/sys/fs/cgroup").join(name);
        if path.exists() {
            drop(Self { path: path.clone() });
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id `bpf_get_current_cgroup_id` reports: the directory's inode number.
    pub fn id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.path)?.ino())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        drop(fs::write(self.path.join("cgroup.kill"), "1"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// A loopback TCP listener that accepts and closes connections on a thread of its own
/// (for as long as the process lives).
///
/// The thread runs under `SCHED_FIFO`, so it takes each connection as soon as it is
/// queued: on one vCPU, a thread of ordinary priority sometimes ran after every connect
/// and sometimes after a batch of them, for seconds at a time, which moved a loop's mean
/// by 10 %.
pub fn start_listener() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: sets the calling thread's policy (pid 0) from a valid sched_param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
                eprintln!(
                    "warning: the accept thread keeps its ordinary priority: {}",
                    std::io::Error::last_os_error()
                );
            }
            for stream in listener.incoming() {
                drop(stream);
            }
        })?;
    Ok(addr)
}

/// Starts `gatekeep-bench worker` in `cgroup`, in the background.
pub fn spawn_worker(
    cgroup: &Path,
    warmup: usize,
    samples: bool,
    action: &[String],
) -> Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("worker")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--warmup")
        .arg(warmup.to_string());
    if samples {
        cmd.arg("--samples");
    }
    cmd.args(action)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("failed to start a worker")
}

/// Waits for a worker and reads its report.
pub fn finish_worker(mut child: Child) -> Result<WorkerReport> {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut err)?;
    }
    let status = child.wait()?;
    ensure!(status.success(), "worker failed ({status}): {}", err.trim());
    serde_json::from_str(out.trim()).with_context(|| format!("worker printed `{}`", out.trim()))
}

/// Runs a worker to completion.
pub fn worker(
    cgroup: &Path,
    warmup: usize,
    samples: bool,
    action: &[String],
) -> Result<WorkerReport> {
    finish_worker(spawn_worker(cgroup, warmup, samples, action)?)
}

/// Runs the in-VM benchmarks and prints their figures.
pub fn run(opts: &VmOptions) -> Result<()> {
    if std::env::var_os("GATEKEEP_IN_VM").is_none() {
        bail!("`gatekeep-bench vm` loads BPF LSM programs: run it in the VM (`cargo xtask bench`)");
    }
    for group in &opts.only {
        if !["overhead", "agent"].contains(&group.as_str()) {
            bail!("unknown benchmark group `{group}`");
        }
    }
    let wants = |group: &str| opts.only.is_empty() || opts.only.iter().any(|g| g == group);
    if opts.clock == Clock::Instructions && wants("agent") {
        bail!(
            "the `agent` group measures latencies and rates in real time: run it with \
             `--clock wall` (with `--clock instructions`, add `--only overhead`)"
        );
    }
    let sizes = Sizes::new(opts.smoke);
    let tiny = install_tiny(Path::new(TINY))?;
    let listener = start_listener()?;
    let mut exec_baseline = None;
    if wants("overhead") {
        let result = overhead::run(sizes.overhead, opts.clock, tiny, listener)?;
        exec_baseline = Some(result.baselines);
        for figure in result.figures {
            figure.emit();
        }
    }
    if wants("agent") {
        agent::run(&sizes, listener, exec_baseline)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_executable_runs_and_exits_zero() {
        let elf = tiny_elf();
        assert_eq!(elf.len(), 129);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny");
        install_tiny(&path).unwrap();
        let status = Command::new(&path).status().unwrap();
        assert!(status.success(), "{status}");
    }
}
