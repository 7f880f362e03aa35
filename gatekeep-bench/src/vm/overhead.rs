//! What gatekeep costs exec, connect, UDP `sendto` (a send with a destination gets the
//! connect decision), `mmap` with `PROT_EXEC` (a file mapped as code meets its exec rules)
//! and the system calls its self-protection hooks see (`kill`, open/read/close, `stat`), in
//! four setups measured side by side in
//! one VM run (the VM is emulated: absolute times drift with the host's load, ratios
//! measured close together in time do not):
//!
//! - `none`: no program attached;
//! - `outside`: every program attached, the process in a cgroup nobody gates;
//! - `rule`: the process gated, the exec, the connect and the send allowed by an in-kernel rule
//!   (`EXEC_RULES`, `CONNECT_V4`) under a policy whose defaults deny (the mapped binary
//!   meets its exec rule);
//! - `grant`: the process gated under a policy that asks by default, the exact exec,
//!   connect and send allowed by a granted duration (`GRANTS`, digests learnt from one paused
//!   request each, as the agent does).
//!
//! Two diagnostic setups split the cost outside gated cgroups between the LSM hooks and
//! the other programs (exit and cgroup tracking), each group attached alone; a third,
//! `floor`, attaches only LSM programs that do nothing on the hooks the loops reach
//! ([`FLOOR_PROGRAMS`]): what the kernel's BPF LSM trampoline costs before any of
//! gatekeep's code runs.
//!
//! How, so that a ratio is precise to a fraction of a percent on a noisy emulated VM:
//!
//! - the programs are loaded once through the agent's loader (the verifier is slow under
//!   TCG); a setup switch only attaches or detaches links (a detach waits for RCU grace
//!   periods: about 0.3 s);
//! - one long-lived worker runs the loops on request and is moved from cgroup to cgroup
//!   (a process's own speed under TCG depends on where its pages lie: separate workers
//!   per cgroup differed by 2 %);
//! - a chunk reduces its ops to the mean of the fastest quarter: a timer tick costs an
//!   exec about 20 % under TCG and lands in a third of them, host preemptions anywhere;
//!   gatekeep's cost is in every op;
//! - a round gives every setup its full count of execs and connects in short chunks,
//!   in cycles: a baseline chunk before and after each unit (the three setups with every
//!   program attached as one block, each diagnostic setup alone), units and block in
//!   random orders. A chunk's ratio is its time over the baseline's interpolated
//!   between the baseline chunks around it, so the VM's drifting speed cancels; a
//!   round's ratio is the mean over its chunks; the figure is the median over the
//!   rounds, with their range and a 95 % confidence interval of the median. The
//!   conditions give the same ratio from plain means too (which keeps any cost that
//!   lands only in some ops, such as deferred kernel work).
//!
//! A separate pass reads the programs' own run time per operation from the kernel's BPF
//! statistics (they cost time of their own, so never during the ratio rounds).
//!
//! A thread drains the ring buffer like the agent's reader does. Counters check that
//! every chunk took the path its setup names.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::links::FdLink,
    sys::{Stats, enable_stats},
};
use gatekeep_agent::bpf::{
    events::Event,
    kernel::boot_time_ns,
    programs::{Hook, PROGRAMS, Program},
};
use gatekeep_common::{
    ConnectV4Key, ExecRule, ExecRuleKey, GatedCgroup, Grant, GrantKey, PendingRequest,
    PolicyDefaults, PortRule, PortRules, Verdict, VerdictKey, action, counter, gated_filter_slot,
    map_names,
};

use super::{
    BenchCgroup, Clock, TINY, finish_worker, spawn_worker,
    worker::{TRIMMED_KEEP, WorkerReport},
};
use crate::report::{Figure, Summary, Target};

const RULE_POLICY: u32 = 1;
const GRANT_POLICY: u32 = 2;

/// How much of one loop the overhead benchmark runs.
#[derive(Debug, Clone, Copy)]
pub struct LoopSize {
    /// Untimed iterations at the start of every chunk (and before a statistics sample).
    pub warmup: usize,
    /// Timed iterations of one chunk (one setup's turn). A setup gets `cycles * timed`
    /// per round (the baseline three times as many).
    pub timed: usize,
    /// Iterations per setup per round of the BPF statistics pass.
    pub stats: usize,
}

impl LoopSize {
    const fn new(warmup: usize, timed: usize, stats: usize) -> Self {
        Self {
            warmup,
            timed,
            stats,
        }
    }
}

/// How much the overhead benchmark measures.
#[derive(Debug, Clone, Copy)]
pub struct OverheadSizes {
    /// Rounds: each gives one paired ratio per setup.
    pub rounds: usize,
    /// Cycles per round: each measures every setup but `none` once, each next to
    /// baseline chunks (see [`cycle`]).
    pub cycles: usize,
    /// Per loop, in [`Op::ALL`] order.
    pub loops: [LoopSize; OPS],
    /// Pauses after attaching, and after detaching: detaching waits for RCU grace
    /// periods, and the trampolines' old images are freed after one more; that work is
    /// left to run before anything is timed.
    pub settle_attach: Duration,
    pub settle_detach: Duration,
    /// Rounds of the BPF statistics pass.
    pub stats_rounds: usize,
}

impl OverheadSizes {
    #[must_use]
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                rounds: 1,
                cycles: 1,
                loops: [
                    LoopSize::new(2, 20, 20),
                    LoopSize::new(5, 50, 50),
                    LoopSize::new(10, 100, 100),
                    LoopSize::new(10, 100, 100),
                    LoopSize::new(10, 100, 100),
                    LoopSize::new(10, 100, 100),
                    LoopSize::new(10, 100, 100),
                    LoopSize::new(10, 100, 100),
                ],
                settle_attach: Duration::from_millis(20),
                settle_detach: Duration::from_millis(20),
                stats_rounds: 1,
            }
        } else {
            // 2000 execs and 5000 connects per setup per round, in 4 chunks each. Counted
            // in instructions, rounds differ by about a tenth of a percent: three suffice.
            // In emulated time three only show the spread: those figures carry no verdict
            // (nine rounds took 45 minutes on a slow host and still left out most chunks).
            // The system-call loops are a few thousand instructions an op or less: many
            // per chunk.
            Self {
                rounds: 3,
                cycles: 4,
                loops: [
                    LoopSize::new(10, 500, 600),
                    LoopSize::new(40, 1250, 1500),
                    LoopSize::new(100, 5000, 6000),
                    LoopSize::new(100, 2500, 3000),
                    LoopSize::new(100, 5000, 6000),
                    LoopSize::new(100, 2500, 3000),
                    LoopSize::new(100, 2500, 3000),
                    LoopSize::new(100, 2500, 3000),
                ],
                settle_attach: Duration::from_millis(50),
                settle_detach: Duration::from_millis(100),
                // Three rounds give a median and a spread; counted in instructions they
                // agree to a few instructions.
                stats_rounds: 3,
            }
        }
    }

    fn of(&self, op: Op) -> LoopSize {
        self.loops[op as usize]
    }

    fn per_round(&self, op: Op) -> usize {
        self.cycles * self.of(op).timed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Exec,
    Connect,
    /// `kill(own pid, 0)`: the `task_kill` hook (issue 18's self-protection).
    Kill,
    /// open + read + close of a small file: `file_open` and `file_permission`.
    Open,
    /// `stat` of a file: the path walk and `inode_getattr`, which gatekeep leaves alone.
    Stat,
    /// A UDP datagram to a loopback port from an unconnected socket: `socket_sendmsg`
    /// (issue 19: a send with a destination gets the connect decision).
    Sendto,
    /// `mmap` of a file's first page with `PROT_EXEC`, then `munmap`: `mmap_file`
    /// (issue 19: a file mapped as code meets its exec rules).
    Mmap,
    /// A DNS query to a loopback responder on port 53 and its answer (issue 20: host-name
    /// rules observe DNS with `cgroup_skb` programs attached only to gated cgroups whose
    /// policy has host rules, so outside them only `socket_sendmsg` runs).
    Dns,
}

/// How many loops there are.
const OPS: usize = 8;

impl Op {
    const ALL: [Op; OPS] = [
        Op::Exec,
        Op::Connect,
        Op::Kill,
        Op::Open,
        Op::Stat,
        Op::Sendto,
        Op::Mmap,
        Op::Dns,
    ];

    /// The worker's name for the loop, and the figures'.
    fn name(self) -> &'static str {
        match self {
            Op::Exec => "exec",
            Op::Connect => "connect",
            Op::Kill => "kill",
            Op::Open => "open",
            Op::Stat => "stat",
            Op::Sendto => "sendto",
            Op::Mmap => "mmap",
            Op::Dns => "dns",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Op::Exec => "fork + exec of a 129-byte static binary",
            Op::Connect => "TCP connect + close to a loopback listener",
            Op::Kill => "kill(own pid, 0): a signal permission check, nothing delivered",
            Op::Open => "open + read of 64 bytes + close of a 129-byte file",
            Op::Stat => "stat of a file",
            Op::Sendto => "sendto of 16 bytes on an unconnected UDP socket to a loopback port",
            Op::Mmap => {
                "mmap of the 129-byte binary's page with PROT_READ | PROT_EXEC, then munmap"
            }
            Op::Dns => {
                "DNS query (sendto of 32 bytes on an unconnected UDP socket) to a loopback \
                 responder on port 53, and its answer (recv)"
            }
        }
    }
}

const SETUPS: usize = 7;

/// The `floor` setup's programs (in the object, never loaded by the agent): LSM programs
/// on the hooks the loops reach that only pass the previous verdict on.
const FLOOR_PROGRAMS: [Program; 8] = [
    Program {
        name: "floor_bprm_check_security",
        hook: Hook::Lsm("bprm_check_security"),
    },
    Program {
        name: "floor_socket_connect",
        hook: Hook::Lsm("socket_connect"),
    },
    Program {
        name: "floor_task_kill",
        hook: Hook::Lsm("task_kill"),
    },
    Program {
        name: "floor_task_alloc",
        hook: Hook::Lsm("task_alloc"),
    },
    Program {
        name: "floor_file_open",
        hook: Hook::Lsm("file_open"),
    },
    Program {
        name: "floor_file_permission",
        hook: Hook::Lsm("file_permission"),
    },
    Program {
        name: "floor_socket_sendmsg",
        hook: Hook::Lsm("socket_sendmsg"),
    },
    Program {
        name: "floor_mmap_file",
        hook: Hook::Lsm("mmap_file"),
    },
];

/// Every program whose run time the statistics pass reads: gatekeep's, then the floor's.
fn measured_programs() -> impl Iterator<Item = &'static Program> {
    PROGRAMS.iter().chain(&FLOOR_PROGRAMS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    None,
    Outside,
    Rule,
    Grant,
    /// Diagnostic: `outside` with only the LSM hooks attached.
    LsmOnly,
    /// Diagnostic: `outside` with only the other programs attached.
    TracingOnly,
    /// Diagnostic: only [`FLOOR_PROGRAMS`] attached (the kernel's own cost of a BPF LSM
    /// program on each hook).
    Floor,
}

impl Setup {
    const ALL: [Setup; SETUPS] = [
        Setup::None,
        Setup::Outside,
        Setup::Rule,
        Setup::Grant,
        Setup::LsmOnly,
        Setup::TracingOnly,
        Setup::Floor,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::Outside => "outside",
            Setup::Rule => "rule",
            Setup::Grant => "grant",
            Setup::LsmOnly => "outside_lsm_only",
            Setup::TracingOnly => "outside_tracing_only",
            Setup::Floor => "floor",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Setup::None => "no gatekeep",
            Setup::Outside => "gatekeep loaded, process outside gated cgroups",
            Setup::Rule => "gated, allowed by an in-kernel rule",
            Setup::Grant => "gated, allowed by a granted duration",
            Setup::LsmOnly => "outside gated cgroups, only the LSM hooks attached (diagnostic)",
            Setup::TracingOnly => {
                "outside gated cgroups, only the non-LSM programs attached (diagnostic)"
            }
            Setup::Floor => {
                "only LSM programs that do nothing, on the hooks the loops reach (diagnostic: \
                 the kernel's floor)"
            }
        }
    }

    /// Which programs the setup has attached.
    fn groups(self) -> Groups {
        match self {
            Setup::None => Groups::default(),
            Setup::Outside | Setup::Rule | Setup::Grant => Groups {
                lsm: true,
                others: true,
                floor: false,
            },
            Setup::LsmOnly => Groups {
                lsm: true,
                ..Groups::default()
            },
            Setup::TracingOnly => Groups {
                others: true,
                ..Groups::default()
            },
            Setup::Floor => Groups {
                floor: true,
                ..Groups::default()
            },
        }
    }

    /// Which cgroup the worker runs the loops in: 0 free, 1 rule, 2 grant.
    fn cgroup(self) -> usize {
        match self {
            Setup::None | Setup::Outside | Setup::LsmOnly | Setup::TracingOnly | Setup::Floor => 0,
            Setup::Rule => 1,
            Setup::Grant => 2,
        }
    }

    /// The target for `op`'s ratio to `none`: every loop ungated <= 1.005, gated and
    /// allowed <= 1.03 (issue 18), a gated and allowed `sendto` <= 1.05 (issue 19).
    fn target(self, op: Op) -> Option<f64> {
        match (self, op) {
            (Setup::Outside, _) => Some(1.005),
            (Setup::Rule | Setup::Grant, Op::Sendto | Op::Dns) => Some(1.05),
            (Setup::Rule | Setup::Grant, _) => Some(1.03),
            _ => None,
        }
    }
}

/// Which programs are attached: the agent's LSM hooks, its others (exit and cgroup
/// tracking), the floor's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Groups {
    lsm: bool,
    others: bool,
    floor: bool,
}

/// What [`Programs::set`] did.
#[derive(Debug, Clone, Copy, Default)]
struct Change {
    attached: bool,
    detached: bool,
}

/// The cgroups of the setups.
struct Cgroups {
    free: BenchCgroup,
    rule: BenchCgroup,
    grant: BenchCgroup,
}

/// gatekeep's programs, loaded once through the agent's loader and attached group by
/// group: switching setups attaches or detaches links, it never reloads.
struct Programs {
    /// Links of the attached LSM hooks and of the other attached programs (dropping a
    /// link detaches it). Declared before the object, so dropped before it.
    lsm: Vec<FdLink>,
    others: Vec<FdLink>,
    floor: Vec<FdLink>,
    ebpf: Ebpf,
}

impl Programs {
    fn load() -> Result<Self> {
        let (mut ebpf, btf) = gatekeep_agent::bpf::programs::open()?;
        for program in measured_programs() {
            gatekeep_agent::bpf::programs::load(&mut ebpf, &btf, program)?;
        }
        Ok(Self {
            lsm: Vec::new(),
            others: Vec::new(),
            floor: Vec::new(),
            ebpf,
        })
    }

    fn attach<'a>(&mut self, programs: impl Iterator<Item = &'a Program>) -> Result<Vec<FdLink>> {
        programs
            .map(|p| Ok(gatekeep_agent::bpf::programs::attach(&mut self.ebpf, p)?))
            .collect()
    }

    /// Attaches and detaches so that exactly `groups` is attached, in the agent's order:
    /// the LSM hooks come off first and go on last.
    fn set(&mut self, groups: Groups) -> Result<Change> {
        let mut change = Change::default();
        if !groups.lsm && !self.lsm.is_empty() {
            self.lsm.clear();
            change.detached = true;
        }
        if !groups.others && !self.others.is_empty() {
            self.others.clear();
            change.detached = true;
        }
        if !groups.floor && !self.floor.is_empty() {
            self.floor.clear();
            change.detached = true;
        }
        if groups.others && self.others.is_empty() {
            self.others = self.attach(PROGRAMS.iter().filter(|p| !p.is_lsm()))?;
            change.attached = true;
        }
        if groups.lsm && self.lsm.is_empty() {
            self.lsm = self.attach(PROGRAMS.iter().filter(|p| p.is_lsm()))?;
            change.attached = true;
        }
        if groups.floor && self.floor.is_empty() {
            self.floor = self.attach(FLOOR_PROGRAMS.iter())?;
            change.attached = true;
        }
        Ok(change)
    }

    /// Each program's (run time in ns, run count) from the kernel, in
    /// [`measured_programs`] order.
    fn run_stats(&self) -> Result<Vec<(u64, u64)>> {
        measured_programs()
            .map(|p| {
                let info = self
                    .ebpf
                    .program(p.name)
                    .with_context(|| format!("no program {}", p.name))?
                    .info()?;
                Ok((u64::try_from(info.run_time().as_nanos())?, info.run_count()))
            })
            .collect()
    }
}

/// A `gatekeep-bench worker ... serve` process, running loops on request. One for every
/// setup, moved from cgroup to cgroup: under TCG a process's own speed depends on where
/// its pages lie (QEMU's software TLB is indexed by address), and different processes
/// differed by 2 %.
struct LoopWorker {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl LoopWorker {
    fn start(cgroup: &Path, addr: SocketAddr) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("worker")
            .arg("--cgroup")
            .arg(cgroup)
            .args(["serve", TINY, &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start a worker")?;
        let input = child.stdin.take().context("the worker's stdin is piped")?;
        let output = BufReader::new(child.stdout.take().context("stdout is piped")?);
        Ok(Self {
            child,
            input,
            output,
        })
    }

    /// Moves the worker into `cgroup` (the benchmark, not gated, moves it: gating does not
    /// follow).
    fn move_to(&self, cgroup: &Path) -> Result<()> {
        std::fs::write(cgroup.join("cgroup.procs"), self.child.id().to_string())
            .with_context(|| format!("cannot move the worker into {}", cgroup.display()))
    }

    /// Runs `warmup` untimed then `count` timed iterations of `op`.
    fn run(&mut self, op: Op, warmup: usize, count: usize) -> Result<WorkerReport> {
        self.input
            .write_all(format!("{} {warmup} {count}\n", op.name()).as_bytes())?;
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        if line.is_empty() {
            let mut err = String::new();
            if let Some(mut stderr) = self.child.stderr.take() {
                stderr.read_to_string(&mut err)?;
            }
            let status = self.child.wait()?;
            bail!("a worker stopped ({status}): {}", err.trim());
        }
        serde_json::from_str(line.trim()).with_context(|| format!("worker printed `{line}`"))
    }

    /// Closes the worker's input; it stops.
    fn finish(self) -> Result<()> {
        let Self {
            mut child, input, ..
        } = self;
        drop(input);
        let status = child.wait()?;
        ensure!(status.success(), "a worker failed ({status})");
        Ok(())
    }
}

/// `SplitMix64`: enough to shuffle the setups' order.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let bound = u64::try_from(i + 1).unwrap_or(u64::MAX);
            let j = usize::try_from(self.next() % bound).unwrap_or(0);
            items.swap(i, j);
        }
    }
}

/// An ask the drain thread saw: (kind, pid, tid, digest).
type Ask = (u32, u32, u32, u64);

/// Reads the ring buffer like the agent does (wake on the ring's fd, drain, parse), and
/// hands the asks it sees to the benchmark.
struct Drainer {
    stop: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    asks: mpsc::Receiver<Ask>,
    thread: JoinHandle<()>,
}

impl Drainer {
    fn start(mut ring: RingBuf<MapData>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let (tx, asks) = mpsc::channel();
        let (thread_stop, thread_events) = (Arc::clone(&stop), Arc::clone(&events));
        let thread = std::thread::Builder::new()
            .name("ring-drain".into())
            .spawn(move || {
                let fd = ring.as_raw_fd();
                while !thread_stop.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&raw mut poll, 1, 50) };
                    while let Some(item) = ring.next() {
                        thread_events.fetch_add(1, Ordering::Relaxed);
                        if let Ok(Event::Ask(ask)) = gatekeep_agent::bpf::events::parse(&item) {
                            // The receiver gone means the measurement is over.
                            let _ = tx.send((
                                ask.kind(),
                                ask.origin().pid,
                                ask.origin().tid,
                                ask.origin().digest,
                            ));
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            events,
            asks,
            thread,
        })
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.thread.join());
        self.events.load(Ordering::Relaxed)
    }
}

fn counters(ebpf: &Ebpf) -> Result<Vec<u64>> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(map_names::COUNTERS).context("no COUNTERS map")?)?;
    (0..counter::COUNT)
        .map(|index| Ok(map.get(&index, 0)?.iter().sum()))
        .collect()
}

/// Writes the rule and grant policies into the maps, and gates their cgroups.
fn configure(ebpf: &mut Ebpf, cgroups: &Cgroups, tiny: (u64, u64)) -> Result<()> {
    let mut policies: Array<_, PolicyDefaults> = Array::try_from(
        ebpf.map_mut(map_names::POLICIES)
            .context(map_names::POLICIES)?,
    )?;
    let deny_by_default = PolicyDefaults {
        exec_default: action::DENY,
        connect_default: action::DENY,
        unix_action: action::ALLOW,
        generation: 1,
        raw_action: action::DENY,
        other_action: action::DENY,
        on_truncated: action::DENY,
        audit: 0,
        map_unlisted: action::ALLOW,
        fileless: action::DENY,
    };
    let ask_by_default = PolicyDefaults {
        exec_default: action::ASK,
        connect_default: action::ASK,
        unix_action: action::ALLOW,
        generation: 1,
        raw_action: action::DENY,
        other_action: action::ASK,
        on_truncated: action::DENY,
        audit: 0,
        map_unlisted: action::ALLOW,
        fileless: action::DENY,
    };
    policies.set(RULE_POLICY, deny_by_default, 0)?;
    policies.set(GRANT_POLICY, ask_by_default, 0)?;
    let mut rules: HashMap<_, ExecRuleKey, ExecRule> = HashMap::try_from(
        ebpf.map_mut(map_names::EXEC_RULES)
            .context(map_names::EXEC_RULES)?,
    )?;
    let key = ExecRuleKey {
        policy_id: RULE_POLICY,
        _pad: 0,
        dev: tiny.0,
        ino: tiny.1,
    };
    // Bound to the tiny executable's content, as the agent binds a rule.
    let meta = std::fs::metadata(super::TINY).with_context(|| super::TINY.to_owned())?;
    let (content, flags) = gatekeep_agent::hooks::exec::content_version(&meta, None);
    let rule = ExecRule {
        action: action::ALLOW,
        flags,
        content,
    };
    rules.insert(key, rule, 0)?;
    let mut v4: LpmTrie<_, ConnectV4Key, PortRules> = LpmTrie::try_from(
        ebpf.map_mut(map_names::CONNECT_V4)
            .context(map_names::CONNECT_V4)?,
    )?;
    let mut allow_all = PortRules::default();
    allow_all.rules[0] = PortRule {
        port_lo: 0,
        port_hi: u16::MAX,
        action: action::ALLOW,
    };
    // 127.0.0.0/8 under the rule policy: the policy id is the key's first 32 bits.
    let loopback = Key::new(
        32 + 8,
        ConnectV4Key {
            policy_id_be: RULE_POLICY.to_be_bytes(),
            addr: [127, 0, 0, 0],
        },
    );
    v4.insert(&loopback, allow_all, 0)?;
    let gated_cgroups = [(&cgroups.rule, RULE_POLICY), (&cgroups.grant, GRANT_POLICY)];
    // Each cgroup's filter slot before its entry, as the agent does.
    let mut filter: Array<_, u64> = Array::try_from(
        ebpf.map_mut(map_names::GATED_FILTER)
            .context(map_names::GATED_FILTER)?,
    )?;
    for (cgroup, _) in gated_cgroups {
        filter.set(gated_filter_slot(cgroup.id()?), 1, 0)?;
    }
    let mut gated: HashMap<_, u64, GatedCgroup> = HashMap::try_from(
        ebpf.map_mut(map_names::GATED_CGROUPS)
            .context(map_names::GATED_CGROUPS)?,
    )?;
    for (cgroup, policy_id) in gated_cgroups {
        gated.insert(
            cgroup.id()?,
            GatedCgroup {
                policy_id,
                flags: 0,
            },
            0,
        )?;
    }
    Ok(())
}

/// Asks once in the grant cgroup (the worker pauses), allows that one request with a
/// verdict, and installs a grant for its digest, as the agent does after a reviewer grants
/// a duration.
fn learn_and_grant(
    ebpf: &mut Ebpf,
    drainer: &Drainer,
    cgroup: &Path,
    action: &[String],
) -> Result<()> {
    let child = spawn_worker(cgroup, 0, false, action)?;
    let (kind, pid, tid, digest) = drainer
        .asks
        .recv_timeout(Duration::from_secs(30))
        .context("the grant setup's first request was not asked")?;
    // The verdict names the task (tid and start time, from its pending entry).
    let start_ns = {
        let pending: HashMap<_, u32, PendingRequest> =
            HashMap::try_from(ebpf.map(map_names::PENDING).context(map_names::PENDING)?)?;
        pending.get(&tid, 0)?.start_ns
    };
    let mut verdicts: HashMap<_, VerdictKey, Verdict> = HashMap::try_from(
        ebpf.map_mut(map_names::VERDICTS)
            .context(map_names::VERDICTS)?,
    )?;
    verdicts.insert(
        VerdictKey {
            tid,
            _pad: 0,
            digest,
            start_ns,
        },
        Verdict {
            action: action::ALLOW,
            _pad: 0,
            expires_ns: boot_time_ns() + 30_000_000_000,
        },
        0,
    )?;
    // The task stops on its way back to user space; a SIGCONT that comes first cancels
    // the stop and the restarted syscall finds the verdict all the same.
    // SAFETY: plain kill(2).
    unsafe { libc::kill(i32::try_from(pid)?, libc::SIGCONT) };
    finish_worker(child)?;
    let mut grants: HashMap<_, GrantKey, Grant> =
        HashMap::try_from(ebpf.map_mut(map_names::GRANTS).context(map_names::GRANTS)?)?;
    // Policy-wide (cgroup 0): the ask path looks up the workload's key first and finds
    // this one second, the costlier of the two scopes.
    grants.insert(
        GrantKey {
            policy_id: GRANT_POLICY,
            kind,
            digest,
            cgroup_id: 0,
        },
        Grant {
            expires_ns: 0,
            cgroup_id: 0,
        },
        0,
    )?;
    Ok(())
}

/// What one chunk measured, per op (in [`Op::ALL`] order, ns): the mean time per op and
/// the mean of its fastest quarter.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    setup: Setup,
    mean: [f64; OPS],
    trimmed: [f64; OPS],
}

/// The apparatus of one run: programs, the worker, and what the switches cost.
struct Bench {
    programs: Programs,
    worker: LoopWorker,
    /// The free, rule and grant cgroups ([`Setup::cgroup`]), and where the worker is.
    cgroups: [PathBuf; 3],
    place: usize,
    sizes: OverheadSizes,
    switches: usize,
    switching: Duration,
}

impl Bench {
    /// Attaches and detaches for `setup`, then lets the kernel's deferred work run; moves
    /// the worker into the setup's cgroup.
    fn switch(&mut self, setup: Setup) -> Result<()> {
        let started = Instant::now();
        let change = self.programs.set(setup.groups())?;
        if change.detached {
            std::thread::sleep(self.sizes.settle_detach);
        } else if change.attached {
            std::thread::sleep(self.sizes.settle_attach);
        }
        if change.attached || change.detached {
            self.switches += 1;
            self.switching += started.elapsed();
        }
        if self.place != setup.cgroup() {
            self.worker.move_to(&self.cgroups[setup.cgroup()])?;
            self.place = setup.cgroup();
        }
        Ok(())
    }

    /// One chunk of `setup`: its exec loop, then its connect loop, each after a few
    /// untimed iterations; checks with the counters that it took the setup's path.
    fn chunk(&mut self, setup: Setup) -> Result<Chunk> {
        let sizes = self.sizes;
        self.switch(setup)?;
        let before = counters(&self.programs.ebpf)?;
        let mut mean = [0.0; OPS];
        let mut trimmed = [0.0; OPS];
        for (o, op) in Op::ALL.into_iter().enumerate() {
            let size = sizes.of(op);
            let report = self.worker.run(op, size.warmup, size.timed)?;
            mean[o] = report.mean_ns();
            trimmed[o] = report.trimmed_mean_ns;
        }
        let after = counters(&self.programs.ebpf)?;
        check_path(
            setup,
            &before,
            &after,
            u64::try_from(sizes.of(Op::Exec).warmup + sizes.of(Op::Exec).timed)?,
            u64::try_from(
                sizes.of(Op::Connect).warmup
                    + sizes.of(Op::Connect).timed
                    + sizes.of(Op::Sendto).warmup
                    + sizes.of(Op::Sendto).timed
                    + sizes.of(Op::Dns).warmup
                    + sizes.of(Op::Dns).timed,
            )?,
        )?;
        Ok(Chunk {
            setup,
            mean,
            trimmed,
        })
    }
}

/// Checks with the counters' moves that a chunk of `execs` and `connects` (connects and
/// sends with a destination, which share the connect decision) took the path `setup` names.
fn check_path(
    setup: Setup,
    before: &[u64],
    after: &[u64],
    execs: u64,
    connects: u64,
) -> Result<()> {
    let moved = |index: u32| after[index as usize].saturating_sub(before[index as usize]);
    match setup {
        Setup::None | Setup::Floor => ensure!(
            before == after,
            "{}: one of gatekeep's programs ran (its counters moved)",
            setup.name()
        ),
        Setup::Outside | Setup::LsmOnly | Setup::TracingOnly => ensure!(
            moved(counter::EXEC_GATED) == 0 && moved(counter::CONNECT_GATED) == 0,
            "{}: gated actions were counted",
            setup.name()
        ),
        Setup::Rule => ensure!(
            moved(counter::EXEC_ALLOWED) >= execs && moved(counter::CONNECT_ALLOWED) >= connects,
            "rule: the rules did not allow every action"
        ),
        Setup::Grant => ensure!(
            moved(counter::GRANT_ALLOWED) >= execs + connects,
            "grant: the grants did not allow every action ({} counted)",
            moved(counter::GRANT_ALLOWED)
        ),
    }
    Ok(())
}

/// How far apart the two baseline chunks around a chunk may be for its ratio to count:
/// the interpolation between them assumes the VM's speed moved smoothly. Chunk to chunk
/// they differ by about 2 %; in episodes where exec alone slowed by up to 50 % for
/// minutes (connect unaffected, host idle) they differed by 10 % and more.
const BRACKET_AGREEMENT: f64 = 0.05;

/// A round's figures under one way of reducing a chunk to a time per op, per op
/// (`[op][setup]`): each setup's mean time per op (ns) over its chunks; its ratio to the
/// baseline: the mean over its chunks of the chunk's time over the baseline's,
/// interpolated between the baseline chunks before and after it (NaN when no chunk
/// counted); and how many chunks did not count ([`BRACKET_AGREEMENT`]).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Estimates {
    values: [[f64; SETUPS]; OPS],
    ratios: [[f64; SETUPS]; OPS],
    dropped: [[usize; SETUPS]; OPS],
}

impl Estimates {
    /// From a round's chunks in the order they ran, reduced by `pick`. Every chunk but
    /// the baseline's lies between two baseline chunks ([`ratio_rounds`]).
    #[expect(clippy::cast_precision_loss, reason = "chunk counts and positions")]
    fn of(chunks: &[Chunk], pick: fn(&Chunk) -> [f64; OPS]) -> Self {
        let mut estimates = Self::default();
        let mut counts = [0usize; SETUPS];
        let mut counted = [[0usize; SETUPS]; OPS];
        let baselines: Vec<usize> = (0..chunks.len())
            .filter(|i| chunks[*i].setup == Setup::None)
            .collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let s = chunk.setup.index();
            let times = pick(chunk);
            counts[s] += 1;
            for (value, time) in estimates.values.iter_mut().zip(times) {
                value[s] += time;
            }
            if chunk.setup == Setup::None {
                continue;
            }
            let before = baselines.iter().rev().find(|b| **b < i);
            let after = baselines.iter().find(|b| **b > i);
            let (Some(&p), Some(&q)) = (before, after) else {
                continue;
            };
            let weight = (i - p) as f64 / (q - p) as f64;
            let (first, last) = (pick(&chunks[p]), pick(&chunks[q]));
            for o in 0..OPS {
                if (ratio(last[o], first[o]) - 1.0).abs() > BRACKET_AGREEMENT {
                    estimates.dropped[o][s] += 1;
                    continue;
                }
                let baseline = first[o] + (last[o] - first[o]) * weight;
                estimates.ratios[o][s] += ratio(times[o], baseline);
                counted[o][s] += 1;
            }
        }
        for (o, op_counted) in counted.iter().enumerate() {
            for (s, count) in counts.iter().enumerate() {
                estimates.values[o][s] /= (*count).max(1) as f64;
                estimates.ratios[o][s] = if op_counted[s] == 0 {
                    f64::NAN
                } else {
                    estimates.ratios[o][s] / op_counted[s] as f64
                };
            }
        }
        estimates
    }
}

/// One round, reduced both ways: the mean of each chunk's fastest quarter (the
/// figures), and the plain mean (in their conditions).
#[derive(Debug, Clone, Copy)]
struct Round {
    trimmed: Estimates,
    mean: Estimates,
}

impl Round {
    fn of(chunks: &[Chunk]) -> Self {
        Self {
            trimmed: Estimates::of(chunks, |c| c.trimmed),
            mean: Estimates::of(chunks, |c| c.mean),
        }
    }

    /// One line for the console.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (o, op) in Op::ALL.iter().enumerate() {
            let ratios: Vec<String> = Setup::ALL[1..]
                .iter()
                .map(|s| format!("{} {:.4}", s.name(), self.trimmed.ratios[o][s.index()]))
                .collect();
            parts.push(format!("{}: {}", op.name(), ratios.join(", ")));
        }
        parts.join("; ")
    }
}

fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        value / baseline
    } else {
        0.0
    }
}

/// One measurement of the statistics pass: each program's (run time ns, run count)
/// over `ops` operations, in [`measured_programs`] order.
struct StatsSample {
    setup: Setup,
    op: Op,
    ops: usize,
    programs: Vec<(u64, u64)>,
}

/// The programs' own run time per op, from the kernel's statistics
/// (`BPF_ENABLE_STATS`, as `/proc/sys/kernel/bpf_stats_enabled` does): every setup but
/// `none`, in a random order each round.
fn stats_pass(bench: &mut Bench, rng: &mut Rng) -> Result<Vec<StatsSample>> {
    let sizes = bench.sizes;
    // On while this descriptor lives.
    let _stats = enable_stats(Stats::RunTime).context("failed to enable BPF statistics")?;
    let mut samples = Vec::new();
    for _ in 0..sizes.stats_rounds {
        let mut order = Setup::ALL[1..].to_vec();
        rng.shuffle(&mut order);
        for setup in order {
            bench.switch(setup)?;
            for op in Op::ALL {
                let LoopSize {
                    warmup, stats: ops, ..
                } = sizes.of(op);
                bench.worker.run(op, 0, warmup)?;
                let before = bench.programs.run_stats()?;
                bench.worker.run(op, 0, ops)?;
                let after = bench.programs.run_stats()?;
                let programs = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
                    .collect();
                samples.push(StatsSample {
                    setup,
                    op,
                    ops,
                    programs,
                });
            }
        }
    }
    Ok(samples)
}

/// What [`run`] found: its figures, and the baseline exec and connect times (µs).
pub struct Overhead {
    pub figures: Vec<Figure>,
    pub baselines: (f64, f64),
}

/// How the run went, for the figures' conditions.
struct RunNotes {
    clock: Clock,
    vcpus: usize,
    seed: u64,
    switches: usize,
    per_switch_ms: f64,
    rounds_took: Duration,
}

impl Bench {
    /// Loads the programs, writes the policies, learns the two grants (with every program
    /// attached) and starts one worker per cgroup. Also returns the ring buffer's reader.
    fn start(
        cgroups: &Cgroups,
        sizes: OverheadSizes,
        tiny: (u64, u64),
        addr: SocketAddr,
    ) -> Result<(Self, Drainer)> {
        let mut programs = Programs::load().context("failed to load gatekeep's programs")?;
        configure(&mut programs.ebpf, cgroups, tiny)?;
        let events = RingBuf::try_from(
            programs
                .ebpf
                .take_map(map_names::EVENTS)
                .context(map_names::EVENTS)?,
        )?;
        let drainer = Drainer::start(events)?;
        programs.set(Setup::Grant.groups())?;
        learn_and_grant(
            &mut programs.ebpf,
            &drainer,
            cgroups.grant.path(),
            &["exec".into(), "1".into(), TINY.into()],
        )?;
        learn_and_grant(
            &mut programs.ebpf,
            &drainer,
            cgroups.grant.path(),
            &["connect".into(), "1".into(), addr.to_string()],
        )?;
        // A datagram's digest differs from a stream connect's (the socket type is in it).
        learn_and_grant(
            &mut programs.ebpf,
            &drainer,
            cgroups.grant.path(),
            &["sendto".into(), "1".into(), addr.to_string()],
        )?;
        // The DNS loop's query: a datagram to port 53 (the digest holds no payload).
        learn_and_grant(
            &mut programs.ebpf,
            &drainer,
            cgroups.grant.path(),
            &[
                "sendto".into(),
                "1".into(),
                SocketAddr::new(addr.ip(), super::worker::DNS_PORT).to_string(),
            ],
        )?;
        let worker = LoopWorker::start(cgroups.free.path(), addr)?;
        let bench = Self {
            programs,
            worker,
            cgroups: [&cgroups.free, &cgroups.rule, &cgroups.grant].map(|c| c.path().to_owned()),
            place: 0,
            sizes,
            switches: 0,
            switching: Duration::ZERO,
        };
        Ok((bench, drainer))
    }

    /// Mean time of a switch, settling included (ms).
    fn per_switch_ms(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a count of switches")]
        let switches = self.switches.max(1) as f64;
        self.switching.as_secs_f64() * 1e3 / switches
    }

    /// Stops the worker and checks that no event was dropped.
    fn finish(self, drainer: Drainer) -> Result<()> {
        self.worker.finish()?;
        let dropped = counters(&self.programs.ebpf)?[counter::EVENTS_DROPPED as usize];
        drainer.stop();
        drop(self.programs);
        ensure!(
            dropped == 0,
            "{dropped} events dropped while the ring buffer was drained"
        );
        Ok(())
    }
}

/// One cycle's setups after its first baseline chunk: the three setups with every
/// program attached as one block (switching among them moves nothing), the three
/// diagnostic setups alone, these four units in a random order and each followed by a
/// baseline chunk; inside the block, a random order too.
fn cycle(rng: &mut Rng) -> Vec<Setup> {
    let mut attached = [Setup::Outside, Setup::Rule, Setup::Grant];
    rng.shuffle(&mut attached);
    let mut units = [
        Setup::Outside,
        Setup::LsmOnly,
        Setup::TracingOnly,
        Setup::Floor,
    ];
    rng.shuffle(&mut units);
    let mut order = Vec::with_capacity(10);
    for unit in units {
        if unit == Setup::Outside {
            order.extend(attached);
        } else {
            order.push(unit);
        }
        order.push(Setup::None);
    }
    order
}

/// The ratio rounds: a baseline chunk, then [`cycle`] after cycle.
fn ratio_rounds(bench: &mut Bench, rng: &mut Rng) -> Result<Vec<Round>> {
    let sizes = bench.sizes;
    let started = Instant::now();
    let mut rounds = Vec::with_capacity(sizes.rounds);
    for r in 0..sizes.rounds {
        let mut order = vec![Setup::None];
        for _ in 0..sizes.cycles {
            order.extend(cycle(rng));
        }
        let mut chunks = Vec::with_capacity(order.len());
        for setup in order {
            chunks.push(bench.chunk(setup)?);
        }
        let round = Round::of(&chunks);
        eprintln!(
            "[bench] overhead round {}/{} ({:.0} s): {}",
            r + 1,
            sizes.rounds,
            started.elapsed().as_secs_f64(),
            round.describe()
        );
        rounds.push(round);
    }
    Ok(rounds)
}

/// A UDP responder answering the DNS loop's queries ([`super::worker::answer_dns`]) from a
/// thread of this process, until dropped.
struct DnsResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsResponder {
    fn start(at: SocketAddr) -> Result<Self> {
        let socket = std::net::UdpSocket::bind(at)
            .with_context(|| format!("bind the DNS loop's responder on {at}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&super::worker::answer_dns(&buf[..len]), from);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Loads the programs once, runs the ratio rounds and the statistics pass, and returns
/// the figures.
pub fn run(
    sizes: OverheadSizes,
    clock: Clock,
    tiny: (u64, u64),
    addr: SocketAddr,
) -> Result<Overhead> {
    let cgroups = Cgroups {
        free: BenchCgroup::create("gk-bench-free")?,
        rule: BenchCgroup::create("gk-bench-rule")?,
        grant: BenchCgroup::create("gk-bench-grant")?,
    };
    let vcpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let started = Instant::now();
    // The DNS loop's resolver: this process, which no setup gates.
    let _responder = DnsResponder::start(SocketAddr::new(addr.ip(), super::worker::DNS_PORT))?;
    let (mut bench, drainer) = Bench::start(&cgroups, sizes, tiny, addr)?;
    eprintln!(
        "[bench] overhead: programs loaded and grants learnt in {:.1} s; {vcpus} vCPU",
        started.elapsed().as_secs_f64(),
    );
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
    });
    let mut rng = Rng(seed);
    let rounds_started = Instant::now();
    let rounds = ratio_rounds(&mut bench, &mut rng)?;
    let rounds_took = rounds_started.elapsed();
    let notes = RunNotes {
        clock,
        vcpus,
        seed,
        switches: bench.switches,
        per_switch_ms: bench.per_switch_ms(),
        rounds_took,
    };
    let stats_started = Instant::now();
    let stats = stats_pass(&mut bench, &mut rng)?;
    eprintln!(
        "[bench] overhead: ratio rounds {:.0} s ({} switches, {:.0} ms each), statistics pass \
         {:.0} s",
        rounds_took.as_secs_f64(),
        notes.switches,
        notes.per_switch_ms,
        stats_started.elapsed().as_secs_f64()
    );
    bench.finish(drainer)?;
    let mut figures = ratio_figures(&rounds, sizes, &notes);
    let baselines = baselines(&figures, clock);
    figures.extend(stats_figures(&stats, baselines, &notes));
    Ok(Overhead {
        figures,
        baselines: (baselines[0], baselines[1]),
    })
}

/// The no-gatekeep time of each loop among the figures (µs), in [`Op::ALL`] order.
fn baselines(figures: &[Figure], clock: Clock) -> [f64; OPS] {
    Op::ALL.map(|op| {
        let id = format!("{}.{}.none", clock.id_prefix(), op.name());
        figures.iter().find(|f| f.id == id).map_or(0.0, |f| f.value)
    })
}

fn ratio_figures(rounds: &[Round], sizes: OverheadSizes, notes: &RunNotes) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (o, op) in Op::ALL.iter().enumerate() {
        let size = sizes.of(*op);
        let chunk = (size.timed, size.warmup);
        let mean_us = |round: &Round, setup: Setup| round.trimmed.values[o][setup.index()] / 1e3;
        let none: Vec<f64> = rounds.iter().map(|r| mean_us(r, Setup::None)).collect();
        let baseline = Summary::of(&none).median;
        let conditions = format!(
            "{}; per op: the mean of the fastest {:.0}% of a chunk's ops (the others: those a \
             timer tick or a host preemption landed in), averaged over chunks; {} per setup per \
             round in {} chunks of {} (after {} untimed each); {} rounds of {} cycles, a cycle \
             = a no-gatekeep chunk before and after each of (outside, rule, grant as one \
             block), lsm only, non-LSM only, floor, in random orders (seed {}); ratio per chunk: its \
             time over the no-gatekeep time interpolated between the no-gatekeep chunks around \
             it; a round's ratio: the mean over its chunks; the figure: the median over the \
             rounds (95% CI of the median; range over rounds); programs loaded once, setups \
             switched by attaching/detaching their links ({} switches, {:.0} ms each incl. \
             {}/{} ms settling after an attach/detach), no gatekeep = loaded, nothing \
             attached; the rounds took {:.0} s; {}, {} vCPU",
            op.describe(),
            100.0 * TRIMMED_KEEP,
            sizes.per_round(*op),
            sizes.cycles,
            chunk.0,
            chunk.1,
            rounds.len(),
            sizes.cycles,
            notes.seed,
            notes.switches,
            notes.per_switch_ms,
            sizes.settle_attach.as_millis(),
            sizes.settle_detach.as_millis(),
            notes.rounds_took.as_secs_f64(),
            notes.clock.describe(),
            notes.vcpus,
        );
        for setup in Setup::ALL {
            let values: Vec<f64> = rounds.iter().map(|r| mean_us(r, setup)).collect();
            let mut figure = Figure::from_runs(
                &format!("{}.{}.{}", notes.clock.id_prefix(), op.name(), setup.name()),
                &format!(
                    "{} loop, {}: {}",
                    op.name(),
                    notes.clock.measure(),
                    setup.describe()
                ),
                notes.clock.micros_unit(),
                &values,
            )
            .conditions(conditions.clone());
            if setup != Setup::None {
                let of = |pick: fn(&Round) -> &Estimates| -> Vec<f64> {
                    rounds
                        .iter()
                        .map(|r| pick(r).ratios[o][setup.index()])
                        .filter(|r| r.is_finite())
                        .collect()
                };
                let dropped: usize = rounds
                    .iter()
                    .map(|r| r.trimmed.dropped[o][setup.index()])
                    .sum();
                let plain = Figure::from_runs("", "", "", &of(|r| &r.mean)).ratio(&of(|r| &r.mean));
                figure = figure
                    .ratio(&of(|r| &r.trimmed))
                    .baseline("no gatekeep", baseline)
                    .conditions(format!(
                        "{conditions}; {dropped} of {} chunks left out (the baseline chunks \
                         around them {:.0}% or more apart), rounds with a ratio: {}; with plain \
                         means per op instead: ratio {}",
                        sizes.cycles * rounds.len(),
                        BRACKET_AGREEMENT * 100.0,
                        of(|r| &r.trimmed).len(),
                        plain.ratio_text()
                    ));
                // The targets are judged on instruction counts: emulated wall time moves
                // by more than the 1 % they tell apart (host load, the emulator's own
                // costs), so it is shown beside them without a verdict.
                if let Some(target) = setup
                    .target(*op)
                    .filter(|_| notes.clock == Clock::Instructions)
                {
                    figure = figure.target(Target::ratio_at_most(target));
                }
            }
            figures.push(figure);
        }
        figures.push(over_floor(rounds, o, *op, notes));
    }
    figures
}

/// What gatekeep's own code costs outside gated cgroups, above the kernel's floor: per
/// round, the `outside` ratio over the `floor` ratio (both to `none`). The floor is what
/// any BPF LSM program on the same hooks costs (the trampoline's entry and exit, RCU and
/// migration bookkeeping); for a system call of a thousand instructions it alone is more
/// than the 0.5 % the ungated target allows, so this figure shows where gatekeep's part of
/// the ratio ends.
fn over_floor(rounds: &[Round], o: usize, op: Op, notes: &RunNotes) -> Figure {
    let per_round: Vec<f64> = rounds
        .iter()
        .map(|r| {
            r.trimmed.ratios[o][Setup::Outside.index()] / r.trimmed.ratios[o][Setup::Floor.index()]
        })
        .filter(|r| r.is_finite())
        .collect();
    Figure::from_runs(
        &format!(
            "{}.{}.outside_over_floor",
            notes.clock.id_prefix(),
            op.name()
        ),
        &format!(
            "{} loop, {}: gatekeep outside gated cgroups over the kernel's floor (do-nothing \
             LSM programs on the same hooks)",
            op.name(),
            notes.clock.measure()
        ),
        "ratio",
        &per_round,
    )
    .ratio(&per_round)
    .conditions(format!(
        "per round: the outside ratio over the floor ratio, both to no gatekeep (see the \
         outside and floor rows); {} rounds; {}",
        per_round.len(),
        notes.clock.describe()
    ))
}

/// The statistics pass's figures: per setup and op, the programs' run time per op next
/// to the no-gatekeep op time (µs, exec and connect).
#[expect(
    clippy::cast_precision_loss,
    reason = "counts and nanoseconds, far below 2^52"
)]
fn stats_figures(stats: &[StatsSample], baselines: [f64; OPS], notes: &RunNotes) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (o, op) in Op::ALL.iter().enumerate() {
        for setup in &Setup::ALL[1..] {
            let samples: Vec<&StatsSample> = stats
                .iter()
                .filter(|s| s.setup == *setup && s.op == *op)
                .collect();
            let Some(first) = samples.first() else {
                continue;
            };
            let per_op: Vec<f64> = samples
                .iter()
                .map(|s| s.programs.iter().map(|p| p.0).sum::<u64>() as f64 / s.ops as f64)
                .collect();
            let programs: Vec<String> = measured_programs()
                .enumerate()
                .filter_map(|(i, program)| {
                    let median = |pick: fn(&(u64, u64)) -> u64| {
                        let values: Vec<f64> = samples
                            .iter()
                            .map(|s| pick(&s.programs[i]) as f64 / s.ops as f64)
                            .collect();
                        Summary::of(&values).median
                    };
                    let runs = median(|p| p.1);
                    (runs > 0.0).then(|| {
                        format!(
                            "{} {} {} x {runs:.2}",
                            program.name,
                            crate::report::format_value(median(|p| p.0) / runs),
                            match notes.clock {
                                Clock::Wall => "ns",
                                Clock::Instructions => "instr",
                            }
                        )
                    })
                })
                .collect();
            let figure = Figure::from_runs(
                &format!(
                    "{}.{}.{}.bpf_run_time",
                    notes.clock.id_prefix(),
                    op.name(),
                    setup.name()
                ),
                &format!(
                    "{} loop, {}: programs' own run time per op (kernel BPF stats), {}",
                    op.name(),
                    setup.describe(),
                    notes.clock.measure()
                ),
                notes.clock.nanos_unit(),
                &per_op,
            )
            .baseline(
                "no-gatekeep op time",
                1e3 * baselines[o],
            )
            .conditions(format!(
                "sum over the attached programs of their run_time_ns growth / ops, with the \
                 kernel's BPF statistics on (BPF_ENABLE_STATS) in a pass of its own after the \
                 ratio rounds; {} ops per setup per round, {} rounds; per program (ns per run \
                 x runs per op): {}; counts the programs' bodies only, not the trampoline or \
                 tracepoint dispatch around them (nor the statistics' own clock reads); ratio = \
                 the fraction of the no-gatekeep op time (the ratio rounds' fastest-quarter mean); {}, {} vCPU",
                first.ops,
                samples.len(),
                if programs.is_empty() {
                    "none ran".to_owned()
                } else {
                    programs.join(", ")
                },
                notes.clock.describe(),
                notes.vcpus,
            ));
            figures.push(figure);
        }
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(setup: Setup, time: f64) -> Chunk {
        Chunk {
            setup,
            mean: [
                time,
                2.0 * time,
                3.0 * time,
                4.0 * time,
                5.0 * time,
                6.0 * time,
                7.0 * time,
                8.0 * time,
            ],
            trimmed: [time; OPS],
        }
    }

    #[test]
    fn a_linear_drift_cancels_out_of_the_ratios() {
        // The VM slows by 1 % per chunk; outside costs 2 %, rule 5 %, grant 3 %.
        let order = [
            (Setup::None, 1.0),
            (Setup::Rule, 1.05),
            (Setup::Outside, 1.02),
            (Setup::Grant, 1.03),
            (Setup::None, 1.0),
            (Setup::LsmOnly, 1.01),
            (Setup::None, 1.0),
        ];
        let chunks: Vec<Chunk> = order
            .iter()
            .enumerate()
            .map(|(i, (setup, cost))| {
                #[expect(clippy::cast_precision_loss, reason = "a small index")]
                let drift = 1.0 + 0.01 * i as f64;
                chunk(*setup, 100.0 * cost * drift)
            })
            .collect();
        let round = Round::of(&chunks);
        for (setup, cost) in order {
            if setup != Setup::None {
                let ratio = round.trimmed.ratios[0][setup.index()];
                assert!((ratio - cost).abs() < 1e-3, "{setup:?}: {ratio}");
                assert!((round.mean.ratios[1][setup.index()] - ratio).abs() < 1e-12);
            }
        }
        // The baseline's value is the mean of its three chunks: 100, 104, 106.
        assert!((round.trimmed.values[0][0] - 310.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_chunk_between_disagreeing_baselines_does_not_count() {
        let chunks = [
            chunk(Setup::None, 100.0),
            chunk(Setup::Outside, 102.0),
            chunk(Setup::None, 101.0),
            chunk(Setup::LsmOnly, 150.0),
            chunk(Setup::None, 140.0),
        ];
        let round = Round::of(&chunks);
        let outside = round.trimmed.ratios[0][Setup::Outside.index()];
        assert!((outside - 102.0 / 100.5).abs() < 1e-12, "{outside}");
        assert!(round.trimmed.ratios[0][Setup::LsmOnly.index()].is_nan());
        assert_eq!(round.trimmed.dropped[0][Setup::LsmOnly.index()], 1);
        assert_eq!(round.trimmed.dropped[0][Setup::Outside.index()], 0);
    }

    #[test]
    fn a_cycle_puts_a_baseline_after_every_unit() {
        let mut rng = Rng(7);
        for _ in 0..20 {
            let order = cycle(&mut rng);
            assert_eq!(order.len(), 10);
            assert_eq!(order.last(), Some(&Setup::None));
            for setup in &Setup::ALL[1..] {
                assert_eq!(order.iter().filter(|s| *s == setup).count(), 1);
            }
            // The block of three with every program attached stays together.
            let first = order
                .iter()
                .position(|s| s.groups() == Setup::Outside.groups())
                .unwrap();
            assert!(
                order[first..first + 3]
                    .iter()
                    .all(|s| s.groups() == Setup::Outside.groups())
            );
        }
    }
}
