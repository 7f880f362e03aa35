//! Self-protection (issue 18), the agent's side.
//!
//! The kernel programs (`gatekeep-ebpf/src/hooks/{signal,ptrace,bpf,kernel,
//! file_open,mount}.rs` and the listener check in `connect.rs`) refuse
//! gated tasks what would switch gatekeep off or approve their own requests.
//! The agent feeds them:
//!
//! - `PROTECTED_TASKS`: its own process (the embedded decision service runs
//!   in it), keyed by tgid with the start time, so a reused pid is never
//!   protected; `gatekeep-agent protect PID` adds another (a local
//!   `gatekeep-server`).
//! - `SERVICE_LISTENERS`: where the decision service listens (embedded, or
//!   the configured central one), so gated tasks cannot reach it.
//! - `PROTECT_RELAXED`: per policy id, the protections the policy relaxed
//!   (`[policy.protect] relax`), written before the policy's cgroups switch
//!   to that id, so a new policy is never less protected than it says.
//!
//! It also holds a file descriptor of every program link ([`HeldLinks`]),
//! so removing a pin under `/sys/fs/bpf/gatekeep/links` detaches nothing
//! while the agent runs, and it pins the link again; and it turns the
//! kernel's refusal counts (`PROTECT_DENIALS`) into one audit record per
//! burst ([`Bursts`]), so a flood of attempts writes a bounded number of
//! records.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError},
    programs::links::{FdLink, PinnedLink},
};
use gatekeep_audit::{AuditRecord, RecordKind};
use gatekeep_common::{
    MAX_POLICIES, ProtectDenialKey, ProtectedTask, ServiceListenerKey, map_names, protect,
};
use gatekeep_policy::{Policy, ProtectPoint};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::{
    audit::AuditSink,
    bpf::pinning::{PinLayout, PinningError, open_map},
    policy::Compiled,
};

/// `AF_INET` and `AF_INET6`, as the kernel keys listeners.
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Errors of the self-protection maps.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Pinning(#[from] PinningError),
    #[error("failed to update kernel map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("failed to read the start time of process {pid} from `{}` (is it running?)", path.display())]
    StartTime {
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> ProtectError {
    move |source| ProtectError::Map { map, source }
}

/// The name of protection `id` (a `gatekeep_common::protect` id), as audit
/// records and `status` show it.
#[must_use]
pub fn protection_name(id: u32) -> &'static str {
    ProtectPoint::ALL
        .into_iter()
        .find(|point| point.kernel_id() == id)
        .map_or("unknown", ProtectPoint::as_str)
}

/// The `PROTECT_RELAXED` word of `policy`.
#[must_use]
pub fn relax_mask(policy: &Policy) -> u32 {
    policy
        .protect
        .relax
        .iter()
        .fold(0, |mask, point| mask | protect::bit(point.kernel_id()))
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since
/// boot, the unit the kernel compares (`gatekeep_common::ProtectedTask`).
pub fn start_ticks(proc_root: &Path, pid: u32) -> Result<u64, ProtectError> {
    let path = proc_root.join(pid.to_string()).join("stat");
    let error = |source| ProtectError::StartTime {
        pid,
        path: path.clone(),
        source,
    };
    let text = std::fs::read_to_string(&path).map_err(error)?;
    parse_start_ticks(&text).ok_or_else(|| {
        error(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected format",
        ))
    })
}

/// The start time in a `stat` line: the name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The kernel keys of a service listening on `addr`: the address itself,
/// and for a wildcard one the all-zero key (which the kernel matches for
/// loopback destinations) plus each of `local` of the same family.
#[must_use]
pub fn listener_keys(addr: SocketAddr, local: &[IpAddr]) -> Vec<ServiceListenerKey> {
    let key = |ip: IpAddr| {
        let (family, bytes) = match ip {
            IpAddr::V4(v4) => {
                let mut bytes = [0; 16];
                bytes[..4].copy_from_slice(&v4.octets());
                (AF_INET, bytes)
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    let mut bytes = [0; 16];
                    bytes[..4].copy_from_slice(&v4.octets());
                    (AF_INET, bytes)
                }
                None => (AF_INET6, v6.octets()),
            },
        };
        ServiceListenerKey {
            family,
            port: addr.port(),
            _pad: 0,
            addr: bytes,
        }
    };
    let mut keys = vec![key(addr.ip())];
    if addr.ip().is_unspecified() {
        keys.extend(
            local
                .iter()
                .filter(|ip| ip.is_ipv4() == addr.is_ipv4())
                .map(|ip| key(*ip)),
        );
        // A v6 wildcard socket accepts IPv4 too unless it is v6-only.
        if addr.is_ipv6() {
            keys.push(key(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)));
            keys.extend(local.iter().filter(|ip| ip.is_ipv4()).map(|ip| key(*ip)));
        }
    }
    keys.sort_by_key(|k| (k.family, k.port, k.addr));
    keys.dedup();
    keys
}

/// The host's own addresses (every interface), for wildcard listeners.
#[must_use]
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Where a decision service URL (`https://host:port`) listens, resolved.
#[must_use]
pub fn resolve_service(url: &str) -> Vec<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    with_port
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default()
}

/// Typed handles on the self-protection maps.
pub struct ProtectMaps {
    relaxed: Array<MapData, u32>,
    tasks: HashMap<MapData, u32, ProtectedTask>,
    denials: HashMap<MapData, ProtectDenialKey, u64>,
    listeners: HashMap<MapData, ServiceListenerKey, u32>,
}

fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
    layout: &PinLayout,
    name: &'static str,
) -> Result<T, PinningError> {
    T::try_from(open_map(layout, name)?).map_err(|source| PinningError::MapLayout {
        path: layout.map(name),
        source,
    })
}

impl ProtectMaps {
    /// Opens the pinned maps.
    pub fn open(layout: &PinLayout) -> Result<Self, PinningError> {
        Ok(Self {
            relaxed: typed(layout, map_names::PROTECT_RELAXED)?,
            tasks: typed(layout, map_names::PROTECTED_TASKS)?,
            denials: typed(layout, map_names::PROTECT_DENIALS)?,
            listeners: typed(layout, map_names::SERVICE_LISTENERS)?,
        })
    }

    /// Protects process `pid` (as it is now: its start time is recorded).
    pub fn protect_process(&mut self, proc_root: &Path, pid: u32) -> Result<(), ProtectError> {
        let entry = ProtectedTask {
            start_ticks: start_ticks(proc_root, pid)?,
        };
        self.tasks
            .insert(pid, entry, 0)
            .map_err(map_error(map_names::PROTECTED_TASKS))
    }

    /// Drops the entries of processes that are gone (or whose pid now
    /// names another process). Returns how many.
    pub fn prune_processes(&mut self, proc_root: &Path) -> Result<usize, ProtectError> {
        let entries: Vec<(u32, ProtectedTask)> = self
            .tasks
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::PROTECTED_TASKS))?;
        let mut pruned = 0;
        for (pid, entry) in entries {
            let alive = start_ticks(proc_root, pid).is_ok_and(|t| t == entry.start_ticks);
            if !alive && self.tasks.remove(&pid).is_ok() {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// The protected processes: pid -> start ticks.
    pub fn processes(&self) -> Result<Vec<(u32, u64)>, ProtectError> {
        self.tasks
            .iter()
            .map(|entry| entry.map(|(pid, task)| (pid, task.start_ticks)))
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::PROTECTED_TASKS))
    }

    /// Makes `SERVICE_LISTENERS` hold exactly `keys`.
    pub fn set_listeners(&mut self, keys: &[ServiceListenerKey]) -> Result<(), ProtectError> {
        let present: Vec<ServiceListenerKey> = self
            .listeners
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::SERVICE_LISTENERS))?;
        for key in keys {
            self.listeners
                .insert(*key, 1, 0)
                .map_err(map_error(map_names::SERVICE_LISTENERS))?;
        }
        for key in present.iter().filter(|key| !keys.contains(key)) {
            let _ = self.listeners.remove(key);
        }
        Ok(())
    }

    /// Writes each policy's relaxations at its id and clears every other
    /// id's (a stale word would relax a policy that later gets the id).
    pub fn set_relaxed(&mut self, masks: &BTreeMap<u32, u32>) -> Result<(), ProtectError> {
        for id in 0..MAX_POLICIES {
            let want = masks.get(&id).copied().unwrap_or(0);
            let have = self
                .relaxed
                .get(&id, 0)
                .map_err(map_error(map_names::PROTECT_RELAXED))?;
            if have != want {
                self.relaxed
                    .set(id, want, 0)
                    .map_err(map_error(map_names::PROTECT_RELAXED))?;
            }
        }
        Ok(())
    }

    /// Refused attempts counted so far, per (protection, cgroup).
    pub fn denials(&self) -> Result<Vec<(ProtectDenialKey, u64)>, ProtectError> {
        self.denials
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::PROTECT_DENIALS))
    }
}

/// The masks of every policy of `compiled`, by policy id.
#[must_use]
pub fn masks_of(compiled: &Compiled) -> BTreeMap<u32, u32> {
    compiled
        .policies
        .iter()
        .map(|(id, loaded)| (*id, relax_mask(&loaded.policy)))
        .collect()
}

/// What each policy of `compiled` relaxes, for the `policy_loaded` record
/// (only policies that relax something).
#[must_use]
pub fn relaxations(compiled: &Compiled) -> Vec<gatekeep_proto::audit::ProtectRelaxed> {
    compiled
        .policies
        .values()
        .filter(|loaded| !loaded.policy.protect.relax.is_empty())
        .map(|loaded| gatekeep_proto::audit::ProtectRelaxed {
            policy: loaded.policy.name.clone(),
            relax: loaded
                .policy
                .protect
                .relax
                .iter()
                .map(|point| {
                    serde_json::to_value(point)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                })
                .collect(),
        })
        .collect()
}

/// The maps, shared by the policy path (relaxations) and the protect task.
pub type ProtectHandle = Arc<Mutex<ProtectMaps>>;

/// Runs `f` on the maps.
pub fn with_maps<T>(handle: &ProtectHandle, f: impl FnOnce(&mut ProtectMaps) -> T) -> T {
    f(&mut handle.lock().unwrap_or_else(PoisonError::into_inner))
}

/// A file descriptor of every program link, plus a spare to pin it again
/// with: a removed pin detaches nothing while the agent runs.
pub struct HeldLinks {
    links: Vec<HeldLink>,
}

struct HeldLink {
    name: &'static str,
    /// Keeps the link (and so the program) attached.
    _held: FdLink,
    /// Consumed by a re-pin; `None` after a failed one.
    spare: Option<FdLink>,
}

impl HeldLinks {
    /// Opens every pinned link of `layout` twice.
    pub fn open(layout: &PinLayout) -> Result<Self, PinningError> {
        let mut links = Vec::new();
        for name in layout.pinned_programs() {
            let path = layout.link(name);
            let open = || {
                PinnedLink::from_pin(&path)
                    .map(FdLink::from)
                    .map_err(|source| PinningError::OpenLink {
                        path: path.clone(),
                        source,
                    })
            };
            links.push(HeldLink {
                name,
                _held: open()?,
                spare: Some(open()?),
            });
        }
        Ok(Self { links })
    }

    /// How many links are held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.links.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Pins again every held link whose pin is gone. Returns the names
    /// pinned again, and those that could not be.
    pub fn repin_missing(&mut self, layout: &PinLayout) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut repinned = Vec::new();
        let mut failed = Vec::new();
        for link in &mut self.links {
            let path = layout.link(link.name);
            if path.exists() {
                continue;
            }
            match link.spare.take().map(|spare| spare.pin(&path)) {
                Some(Ok(pinned)) => {
                    link.spare = Some(FdLink::from(pinned));
                    repinned.push(link.name);
                }
                Some(Err(err)) => {
                    tracing::error!(program = link.name, error = %err, "cannot pin the link again");
                    failed.push(link.name);
                }
                None => failed.push(link.name),
            }
        }
        (repinned, failed)
    }
}

pub use crate::bursts::{BURST_MAX, BURST_QUIET};

/// Refusals of one protection in one cgroup, seen in consecutive polls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Burst {
    pub protection: &'static str,
    pub protection_id: u32,
    pub cgroup_id: u64,
    pub count: u64,
    #[serde(skip)]
    pub first_seen: SystemTime,
    #[serde(skip)]
    pub last_seen: SystemTime,
}

/// Turns the kernel's running counts into bursts ([`crate::bursts`], keyed by protection id
/// and cgroup).
#[derive(Debug, Default)]
pub struct Bursts {
    /// Count last seen per key.
    seen: StdHashMap<ProtectDenialKey, u64>,
    open: crate::bursts::Bursts<(u32, u64), ()>,
}

impl Bursts {
    /// Starts from the counts the kernel holds now (refusals recorded by an
    /// earlier agent are not counted again).
    #[must_use]
    pub fn starting_from(counts: &[(ProtectDenialKey, u64)]) -> Self {
        Self {
            seen: counts.iter().copied().collect(),
            open: crate::bursts::Bursts::default(),
        }
    }

    /// Takes the counts of one poll at `now`; returns the bursts that ended
    /// (quiet for [`BURST_QUIET`]) or ran for [`BURST_MAX`].
    pub fn observe(&mut self, now: SystemTime, counts: &[(ProtectDenialKey, u64)]) -> Vec<Burst> {
        for (key, count) in counts {
            let last = self.seen.insert(*key, *count).unwrap_or(0);
            // A count below the last one: the LRU entry was evicted and
            // started again.
            let new = if *count >= last { count - last } else { *count };
            self.open.add((key.hook, key.cgroup_id), new, now, || ());
        }
        self.open.close(now).iter().map(Self::burst).collect()
    }

    /// Every burst still open (at shutdown).
    pub fn drain(&mut self) -> Vec<Burst> {
        self.open.drain().iter().map(Self::burst).collect()
    }

    fn burst(burst: &crate::bursts::Burst<(u32, u64), ()>) -> Burst {
        let (protection_id, cgroup_id) = burst.key;
        Burst {
            protection: protection_name(protection_id),
            protection_id,
            cgroup_id,
            count: burst.count,
            first_seen: burst.first_seen,
            last_seen: burst.last_seen,
        }
    }
}

/// The audit record of a burst.
#[must_use]
pub fn burst_record(host: &str, burst: &Burst, cgroup: Option<&Path>) -> AuditRecord {
    let rfc3339 = |at: SystemTime| {
        time::OffsetDateTime::from(at)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    AuditRecord::new(
        RecordKind::ProtectRefused,
        host,
        json!({
            "protection": burst.protection,
            "protection_id": burst.protection_id,
            "cgroup_id": burst.cgroup_id,
            "cgroup": cgroup,
            "count": burst.count,
            "first_at": rfc3339(burst.first_seen),
            "last_at": rfc3339(burst.last_seen),
            "action": "deny",
        }),
    )
}

/// The protect task: every `interval`, pins again any removed link pin,
/// and records refusal bursts.
#[expect(
    clippy::too_many_arguments,
    reason = "one task's whole context, wired once"
)]
pub async fn run(
    handle: ProtectHandle,
    mut links: HeldLinks,
    layout: PinLayout,
    sink: Arc<impl AuditSink>,
    host: String,
    policies: watch::Receiver<Arc<Compiled>>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let initial = with_maps(&handle, |maps| maps.denials()).unwrap_or_default();
    let mut bursts = Bursts::starting_from(&initial);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let record = |burst: &Burst| {
        let compiled = Arc::clone(&policies.borrow());
        let cgroup = compiled.cgroup_paths.get(&burst.cgroup_id).cloned();
        tracing::warn!(
            protection = burst.protection,
            cgroup_id = burst.cgroup_id,
            count = burst.count,
            "gated tasks were refused a self-protection point"
        );
        sink.record(burst_record(&host, burst, cgroup.as_deref()));
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let (repinned, failed) = links.repin_missing(&layout);
        if !repinned.is_empty() {
            tracing::warn!(
                programs = repinned.join(","),
                "link pins were removed; pinned them again (the programs never detached)"
            );
        }
        if !failed.is_empty() {
            tracing::error!(
                programs = failed.join(","),
                "link pins are missing and could not be pinned again; the agent still holds the links"
            );
        }
        match with_maps(&handle, |maps| maps.denials()) {
            Ok(counts) => {
                for burst in bursts.observe(SystemTime::now(), &counts) {
                    record(&burst);
                }
            }
            Err(err) => tracing::error!(error = %err, "cannot read the refusal counts"),
        }
    }
    for burst in bursts.drain() {
        record(&burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hook: u32, cgroup_id: u64) -> ProtectDenialKey {
        ProtectDenialKey {
            hook,
            _pad: 0,
            cgroup_id,
        }
    }

    #[test]
    fn start_ticks_are_field_22_even_with_spaces_and_parentheses_in_the_name() {
        let stat =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        assert_eq!(parse_start_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn own_start_ticks_are_read_from_proc() {
        let ticks = start_ticks(Path::new("/proc"), std::process::id()).expect("own stat");
        assert!(ticks > 0 || std::fs::read_to_string("/proc/uptime").is_ok());
        let err = start_ticks(Path::new("/nonexistent"), 1).expect_err("no proc");
        assert!(err.to_string().contains("process 1"), "{err}");
    }

    #[test]
    fn relax_masks_follow_the_kernel_ids() {
        let mut set = gatekeep_policy::parse_str(
            "p.toml",
            "[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.protect]\nrelax = [\"mount\", \"service-connect\"]\n",
        )
        .expect("valid");
        let policy = set.policies.remove(0);
        assert_eq!(
            relax_mask(&policy),
            protect::bit(protect::MOUNT) | protect::bit(protect::SERVICE_CONNECT)
        );
        for point in ProtectPoint::ALL {
            assert_eq!(protection_name(point.kernel_id()), point.as_str());
        }
        assert_eq!(protection_name(protect::SIGNAL), "signals");
        assert_eq!(protection_name(protect::RAW_DEVICE), "raw-devices");
        assert_eq!(protection_name(99), "unknown");
    }

    #[test]
    fn listener_keys_cover_wildcards_and_mapped_addresses() {
        let loopback: SocketAddr = "127.0.0.1:7443".parse().expect("addr");
        let keys = listener_keys(loopback, &[]);
        assert_eq!(keys.len(), 1);
        assert_eq!((keys[0].family, keys[0].port), (AF_INET, 7443));
        assert_eq!(keys[0].addr[..4], [127, 0, 0, 1]);

        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().expect("addr");
        assert_eq!(listener_keys(mapped, &[])[0].family, AF_INET);

        let local: Vec<IpAddr> = vec!["10.0.2.15".parse().expect("ip"), "::1".parse().expect("ip")];
        let any_v4: SocketAddr = "0.0.0.0:7443".parse().expect("addr");
        let keys = listener_keys(any_v4, &local);
        assert_eq!(keys.len(), 2, "wildcard + the one v4 address: {keys:?}");
        assert!(keys.iter().any(|k| k.addr == [0; 16]));
        let any_v6: SocketAddr = "[::]:7443".parse().expect("addr");
        // v6 wildcard, ::1, v4 wildcard, 10.0.2.15.
        assert_eq!(listener_keys(any_v6, &local).len(), 4);
    }

    #[test]
    fn service_urls_resolve_with_their_port_or_443() {
        assert_eq!(
            resolve_service("https://127.0.0.1:7443"),
            ["127.0.0.1:7443".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(
            resolve_service("https://[::1]/x"),
            ["[::1]:443".parse::<SocketAddr>().expect("addr")]
        );
    }

    #[test]
    fn a_flood_is_one_record_per_burst_with_its_count() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |secs| t0 + Duration::from_secs(secs);
        let k = key(protect::SIGNAL, 7);
        // Counts from before this agent are not reported.
        let mut bursts = Bursts::starting_from(&[(k, 5)]);
        assert!(bursts.observe(at(0), &[(k, 5)]).is_empty());
        // A flood: 10,000 refusals a second for three seconds stays one
        // open burst...
        assert!(bursts.observe(at(1), &[(k, 10_005)]).is_empty());
        assert!(bursts.observe(at(2), &[(k, 20_005)]).is_empty());
        assert!(bursts.observe(at(3), &[(k, 30_005)]).is_empty());
        // ...recorded once, when it goes quiet.
        let closed = bursts.observe(at(4), &[(k, 30_005)]);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 30_000);
        assert_eq!(closed[0].protection, "signals");
        assert_eq!(closed[0].first_seen, at(1));
        assert_eq!(closed[0].last_seen, at(3));
        assert!(bursts.observe(at(5), &[(k, 30_005)]).is_empty());
    }

    #[test]
    fn a_burst_that_never_ends_is_recorded_once_a_minute() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let k = key(protect::BPF, 9);
        let mut bursts = Bursts::default();
        let mut records = 0;
        for second in 0..180u64 {
            let now = t0 + Duration::from_secs(second);
            records += bursts.observe(now, &[(k, (second + 1) * 100)]).len();
        }
        assert_eq!(records, 2, "180 s of refusals: two full minutes recorded");
        let rest = bursts.drain();
        assert_eq!(rest.len(), 1);
    }

    #[test]
    fn an_evicted_count_starts_again_and_keys_are_apart() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let (a, b) = (key(protect::MOUNT, 1), key(protect::MOUNT, 2));
        let mut bursts = Bursts::starting_from(&[(a, 50)]);
        assert!(bursts.observe(t0, &[(a, 3), (b, 2)]).is_empty());
        let closed = bursts.observe(t0 + Duration::from_secs(2), &[(a, 3), (b, 2)]);
        let counts: Vec<(u64, u64)> = closed.iter().map(|b| (b.cgroup_id, b.count)).collect();
        assert_eq!(counts.len(), 2);
        assert!(
            counts.contains(&(1, 3)) && counts.contains(&(2, 2)),
            "{counts:?}"
        );
        let record = burst_record("h", &closed[0], Some(Path::new("/sys/fs/cgroup/x")));
        assert_eq!(record.kind, RecordKind::ProtectRefused);
        assert_eq!(record.payload["protection"], "mount");
        assert_eq!(record.payload["cgroup"], "/sys/fs/cgroup/x");
    }
}
