//! Item 1: what gatekeep costs exec and connect, in four setups measured round by round in
//! one VM run (the VM is emulated: absolute times drift, ratios measured side by side do
//! not):
//!
//! - `none`: no program loaded;
//! - `outside`: programs loaded and attached, the process in a cgroup nobody gates;
//! - `rule`: the process gated, the exec and the connect allowed by an in-kernel rule
//!   (`EXEC_RULES`, `CONNECT_V4`) under a policy whose defaults deny;
//! - `grant`: the process gated under a policy that asks by default, the exact exec and
//!   connect allowed by a granted duration (`GRANTS`, digests learnt from one paused
//!   request each, as the agent does).
//!
//! Two diagnostic setups split the cost outside gated cgroups between the LSM hooks and
//! the tracepoints (each attached alone; no target).
//!
//! The programs are loaded through the agent's own loader and driven through the maps. A
//! thread drains the ring buffer like the agent's reader does. Counters check that each
//! setup really took the path it names.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
};
use gatekeep_agent::{events::Event, kernel::boot_time_ns};
use gatekeep_common::{
    ConnectV4Key, ExecRuleKey, GatedCgroup, Grant, GrantKey, PolicyDefaults, PortRule, PortRules,
    Verdict, VerdictKey, action, counter, request_kind,
};

use super::{BenchCgroup, Sizes, TINY, finish_worker, spawn_worker, worker};
use crate::report::{Figure, Summary, Target};

const RULE_POLICY: u32 = 1;
const GRANT_POLICY: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    None,
    Outside,
    Rule,
    Grant,
    /// Diagnostic: `outside` with only the LSM hooks attached.
    LsmOnly,
    /// Diagnostic: `outside` with only the tracepoints attached.
    TracepointsOnly,
}

impl Setup {
    const ALL: [Setup; 6] = [
        Setup::None,
        Setup::Outside,
        Setup::Rule,
        Setup::Grant,
        Setup::LsmOnly,
        Setup::TracepointsOnly,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::Outside => "outside",
            Setup::Rule => "rule",
            Setup::Grant => "grant",
            Setup::LsmOnly => "outside_lsm_only",
            Setup::TracepointsOnly => "outside_tracepoints_only",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Setup::None => "no gatekeep",
            Setup::Outside => "gatekeep loaded, process outside gated cgroups",
            Setup::Rule => "gated, allowed by an in-kernel rule",
            Setup::Grant => "gated, allowed by a granted duration",
            Setup::LsmOnly => "outside gated cgroups, only the LSM hooks attached (diagnostic)",
            Setup::TracepointsOnly => {
                "outside gated cgroups, only the tracepoints attached (diagnostic)"
            }
        }
    }
}

/// One round's mean times (microseconds) of every setup.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    exec: [f64; 6],
    connect: [f64; 6],
}

/// The cgroups of the setups.
struct Cgroups {
    free: BenchCgroup,
    rule: BenchCgroup,
    grant: BenchCgroup,
}

impl Cgroups {
    fn of(&self, setup: Setup) -> &BenchCgroup {
        match setup {
            Setup::None | Setup::Outside | Setup::LsmOnly | Setup::TracepointsOnly => &self.free,
            Setup::Rule => &self.rule,
            Setup::Grant => &self.grant,
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
                        match gatekeep_agent::events::parse(&item) {
                            Ok(Event::ExecAsk(ask)) => drop(tx.send((
                                request_kind::EXEC,
                                ask.origin.pid,
                                ask.origin.tid,
                                ask.origin.digest,
                            ))),
                            Ok(Event::ConnectAsk(ask)) => drop(tx.send((
                                request_kind::CONNECT,
                                ask.origin.pid,
                                ask.origin.tid,
                                ask.origin.digest,
                            ))),
                            _ => {}
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
        PerCpuArray::try_from(ebpf.map("COUNTERS").context("no COUNTERS map")?)?;
    (0..counter::COUNT)
        .map(|index| Ok(map.get(&index, 0)?.iter().sum()))
        .collect()
}

/// Loads and attaches only the LSM hooks or only the other programs (argv capture,
/// cleanup, cgroup tracking; no policy: nothing is gated), to tell their costs apart.
fn load_only(lsm: bool, tracepoints: bool) -> Result<gatekeep_agent::ebpf::Attached> {
    Ok(gatekeep_agent::ebpf::load_and_attach_only(|program| {
        if program.is_lsm() { lsm } else { tracepoints }
    })?)
}

/// Loads the programs and writes the rule and grant policies into the maps.
fn load(cgroups: &Cgroups, tiny: (u64, u64)) -> Result<gatekeep_agent::ebpf::Attached> {
    let mut ebpf = gatekeep_agent::ebpf::load_and_attach()
        .context("failed to load and attach gatekeep's programs")?;
    let mut policies: Array<_, PolicyDefaults> =
        Array::try_from(ebpf.map_mut("POLICIES").context("POLICIES")?)?;
    let deny_by_default = PolicyDefaults {
        exec_default: action::DENY,
        connect_default: action::DENY,
        unix_action: action::ALLOW,
        generation: 1,
    };
    let ask_by_default = PolicyDefaults {
        exec_default: action::ASK,
        connect_default: action::ASK,
        unix_action: action::ALLOW,
        generation: 1,
    };
    policies.set(RULE_POLICY, deny_by_default, 0)?;
    policies.set(GRANT_POLICY, ask_by_default, 0)?;
    let mut rules: HashMap<_, ExecRuleKey, u32> =
        HashMap::try_from(ebpf.map_mut("EXEC_RULES").context("EXEC_RULES")?)?;
    let key = ExecRuleKey {
        policy_id: RULE_POLICY,
        _pad: 0,
        dev: tiny.0,
        ino: tiny.1,
    };
    rules.insert(key, action::ALLOW, 0)?;
    let mut v4: LpmTrie<_, ConnectV4Key, PortRules> =
        LpmTrie::try_from(ebpf.map_mut("CONNECT_V4").context("CONNECT_V4")?)?;
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
    let mut gated: HashMap<_, u64, GatedCgroup> =
        HashMap::try_from(ebpf.map_mut("GATED_CGROUPS").context("GATED_CGROUPS")?)?;
    for (cgroup, policy_id) in [(&cgroups.rule, RULE_POLICY), (&cgroups.grant, GRANT_POLICY)] {
        gated.insert(
            cgroup.id()?,
            GatedCgroup {
                policy_id,
                flags: 0,
            },
            0,
        )?;
    }
    Ok(ebpf)
}

/// Asks once in the grant cgroup (the worker pauses), allows that one request with a
/// verdict, and installs a grant for its digest, as the agent does after a reviewer grants
/// a duration.
fn learn_and_grant(
    ebpf: &mut Ebpf,
    drainer: &Drainer,
    cgroup: &BenchCgroup,
    action: &[String],
) -> Result<()> {
    let child = spawn_worker(cgroup.path(), 0, false, action)?;
    let (kind, pid, tid, digest) = drainer
        .asks
        .recv_timeout(Duration::from_secs(30))
        .context("the grant setup's first request was not asked")?;
    let mut verdicts: HashMap<_, VerdictKey, Verdict> =
        HashMap::try_from(ebpf.map_mut("VERDICTS").context("VERDICTS")?)?;
    verdicts.insert(
        VerdictKey {
            tid,
            _pad: 0,
            digest,
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
        HashMap::try_from(ebpf.map_mut("GRANTS").context("GRANTS")?)?;
    grants.insert(
        GrantKey {
            policy_id: GRANT_POLICY,
            kind,
            digest,
        },
        Grant {
            expires_ns: 0,
            cgroup_id: 0,
        },
        0,
    )?;
    Ok(())
}

/// Runs the exec and the connect loop in `setup`; checks with the counters (when loaded)
/// that the setup took its path.
fn measure(
    setup: Setup,
    sizes: Sizes,
    cgroups: &Cgroups,
    addr: SocketAddr,
    ebpf: Option<&Ebpf>,
) -> Result<(f64, f64)> {
    let before = ebpf.map(counters).transpose()?;
    let cgroup = cgroups.of(setup).path();
    let exec = worker(
        cgroup,
        sizes.warmup,
        false,
        &["exec".into(), sizes.execs.to_string(), TINY.into()],
    )?;
    let connect = worker(
        cgroup,
        sizes.warmup,
        false,
        &[
            "connect".into(),
            sizes.connects.to_string(),
            addr.to_string(),
        ],
    )?;
    if let (Some(ebpf), Some(before)) = (ebpf, before) {
        let after = counters(ebpf)?;
        let moved = |index: u32| after[index as usize] - before[index as usize];
        let (execs, connects) = (sizes.execs as u64, sizes.connects as u64);
        match setup {
            Setup::None | Setup::LsmOnly | Setup::TracepointsOnly => {}
            Setup::Outside => ensure!(
                moved(counter::EXEC_GATED) == 0 && moved(counter::CONNECT_GATED) == 0,
                "outside: gated actions were counted"
            ),
            Setup::Rule => ensure!(
                moved(counter::EXEC_ALLOWED) >= execs
                    && moved(counter::CONNECT_ALLOWED) >= connects,
                "rule: the rules did not allow every action"
            ),
            Setup::Grant => ensure!(
                moved(counter::GRANT_ALLOWED) >= execs + connects,
                "grant: the grants did not allow every action ({} counted)",
                moved(counter::GRANT_ALLOWED)
            ),
        }
    }
    Ok((exec.mean_us(), connect.mean_us()))
}

/// What [`run`] found: its figures, and the baseline exec and connect times (µs).
pub struct Overhead {
    pub figures: Vec<Figure>,
    pub baselines: (f64, f64),
}

/// Runs every round and returns the figures.
pub fn run(sizes: Sizes, tiny: (u64, u64), addr: SocketAddr) -> Result<Overhead> {
    let cgroups = Cgroups {
        free: BenchCgroup::create("gk-bench-free")?,
        rule: BenchCgroup::create("gk-bench-rule")?,
        grant: BenchCgroup::create("gk-bench-grant")?,
    };
    let mut rounds = Vec::with_capacity(sizes.rounds);
    for r in 0..sizes.rounds {
        eprintln!("[bench] overhead round {}/{}", r + 1, sizes.rounds);
        let mut round = Round::default();
        let mut record = |setup: Setup, (exec, connect): (f64, f64)| {
            let i = Setup::ALL.iter().position(|s| *s == setup).unwrap_or(0);
            round.exec[i] = exec;
            round.connect[i] = connect;
        };
        // "none" alternates between first and last; the loaded setups rotate.
        let none_first = r % 2 == 0;
        if none_first {
            record(
                Setup::None,
                measure(Setup::None, sizes, &cgroups, addr, None)?,
            );
        }
        let mut ebpf = load(&cgroups, tiny)?;
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS")?)?;
        let drainer = Drainer::start(ring)?;
        learn_and_grant(
            &mut ebpf,
            &drainer,
            &cgroups.grant,
            &["exec".into(), "1".into(), TINY.into()],
        )?;
        learn_and_grant(
            &mut ebpf,
            &drainer,
            &cgroups.grant,
            &["connect".into(), "1".into(), addr.to_string()],
        )?;
        let mut loaded = [Setup::Outside, Setup::Rule, Setup::Grant];
        loaded.rotate_left(r % 3);
        for setup in loaded {
            record(setup, measure(setup, sizes, &cgroups, addr, Some(&ebpf))?);
        }
        let dropped = counters(&ebpf)?[counter::EVENTS_DROPPED as usize];
        drainer.stop();
        drop(ebpf);
        if dropped > 0 {
            bail!("{dropped} events dropped while the ring buffer was drained");
        }
        // Detaching frees the trampolines after an RCU grace period.
        std::thread::sleep(Duration::from_millis(500));
        // Which programs the cost outside gated cgroups comes from.
        for (setup, lsm, tracepoints) in [
            (Setup::LsmOnly, true, false),
            (Setup::TracepointsOnly, false, true),
        ] {
            let partial = load_only(lsm, tracepoints)?;
            record(setup, measure(setup, sizes, &cgroups, addr, None)?);
            drop(partial);
            std::thread::sleep(Duration::from_millis(500));
        }
        if !none_first {
            record(
                Setup::None,
                measure(Setup::None, sizes, &cgroups, addr, None)?,
            );
        }
        rounds.push(round);
    }
    Ok(figures(&rounds, sizes))
}

fn figures(rounds: &[Round], sizes: Sizes) -> Overhead {
    let mut figures = Vec::new();
    let mut baselines = (0.0, 0.0);
    for (what, count, exec) in [
        ("exec", sizes.execs, true),
        ("connect", sizes.connects, false),
    ] {
        let times = |i: usize| -> Vec<f64> {
            rounds
                .iter()
                .map(|r| if exec { r.exec[i] } else { r.connect[i] })
                .collect()
        };
        let none = times(0);
        let baseline = Summary::of(&none).median;
        if exec {
            baselines.0 = baseline;
        } else {
            baselines.1 = baseline;
        }
        let action = if exec {
            format!("fork + exec of a 129-byte static binary, {count} per run")
        } else {
            format!("TCP connect + close to a loopback listener, {count} per run")
        };
        for (i, setup) in Setup::ALL.iter().enumerate() {
            let values = times(i);
            let mut figure = Figure::from_runs(
                &format!("vm.{what}.{}", setup.name()),
                &format!("{what} loop: {}", setup.describe()),
                "us/op",
                &values,
            )
            .conditions(format!(
                "{action}; mean per op; {} rounds interleaving the setups; VM under TCG, 2 vCPUs",
                rounds.len()
            ));
            let diagnostic = matches!(setup, Setup::LsmOnly | Setup::TracepointsOnly);
            if *setup != Setup::None {
                let ratios: Vec<f64> = values
                    .iter()
                    .zip(&none)
                    .map(|(v, n)| if *n > 0.0 { v / n } else { 0.0 })
                    .collect();
                figure = figure.ratio(&ratios).baseline("no gatekeep", baseline);
                let target = match (setup, exec) {
                    (Setup::Outside, _) => 1.01,
                    (_, true) => 1.03,
                    (_, false) => 1.05,
                };
                if !diagnostic {
                    figure = figure.target(Target::ratio_at_most(target));
                }
            }
            figures.push(figure);
        }
    }
    Overhead { figures, baselines }
}
