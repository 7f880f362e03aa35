//! Host-name connect rules (issue 20, item 3; docs/policy-hosts.md): the
//! agent learns, per workload (cgroup), which addresses the names it looked
//! up stand for, from the DNS answers it received, and writes what the
//! policy's host rules say about each address into `HOST_RULES`.
//!
//! - [`attach`]: the `cgroup_skb` programs (`gatekeep-ebpf/src/hooks/dns.rs`)
//!   are attached to the topmost gated cgroups whose policy has host rules
//!   (descendants inherit them), following every policy load and rescan.
//! - [`table`]: an answer is believed only from a configured resolver
//!   (`[dns] resolvers`, default `/etc/resolv.conf`), for a query the
//!   workload sent to it (same port, id and name), once; datagrams a gated
//!   socket sends from port 53 never leave the kernel.
//! - The task below: processes the kernel's DNS records in order, writes
//!   `HOST_RULES`, counts the answers processed (`DNS_PROCESSED`, which a
//!   connect waits for), refreshes entries when their TTL ends, and resumes
//!   connects that waited ([`gatekeep_common::EVENT_DNS_WAIT`]).

pub mod attach;
pub mod message;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use gatekeep_common::{DnsEvent, GatedCgroup, HostKey, HostRules, dns_direction, map_names};
use tokio::sync::{mpsc, watch};

use crate::{
    bpf::{
        kernel::boot_time_ns,
        pinning::{PinLayout, PinningError, open_map},
        record::Origin,
    },
    policy::Compiled,
};

/// What the ring-buffer reader hands this task, in ring order.
#[derive(Debug)]
pub enum Input {
    Packet(Box<DnsEvent>),
    /// A connect of this task waits for the workload's answers.
    Wait(Origin),
}

/// How long a waiting connect waits for answer records still on their way
/// before its workload's count is taken as processed (a record the kernel
/// counted but user space never got would otherwise stop it for good).
const WAIT_GRACE: Duration = Duration::from_millis(100);

/// The names each workload resolved to each address, with their expiry
/// (boot-time ns), for requests to show reviewers (see [`names_for`]).
type Published = HashMap<(u64, IpAddr), Vec<(String, u64)>>;
static PUBLISHED: Mutex<Option<Published>> = Mutex::new(None);

/// The names `cgroup_id` resolved to `addr` whose answers are still fresh:
/// what a connect request shows its reviewer.
#[must_use]
pub fn names_for(cgroup_id: u64, addr: IpAddr) -> Vec<String> {
    let now = boot_time_ns();
    let guard = PUBLISHED.lock().unwrap_or_else(PoisonError::into_inner);
    guard
        .as_ref()
        .and_then(|published| published.get(&(cgroup_id, addr.to_canonical())))
        .map(|names| {
            names
                .iter()
                .filter(|(_, expires)| *expires > now)
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Errors starting DNS observation.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Pinning(#[from] PinningError),
    #[error("pinned map `{name}` does not have the layout this agent expects")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// The kernel side this task writes.
struct Maps {
    host_rules: BpfHashMap<MapData, HostKey, HostRules>,
    received: BpfHashMap<MapData, u64, u64>,
    processed: BpfHashMap<MapData, u64, u64>,
    gated: BpfHashMap<MapData, u64, GatedCgroup>,
}

impl Maps {
    fn open(layout: &PinLayout) -> Result<Self, DnsError> {
        fn typed<K: aya::Pod, V: aya::Pod>(
            layout: &PinLayout,
            name: &'static str,
        ) -> Result<BpfHashMap<MapData, K, V>, DnsError> {
            BpfHashMap::try_from(open_map(layout, name)?)
                .map_err(|source| DnsError::Layout { name, source })
        }
        Ok(Self {
            host_rules: typed(layout, map_names::HOST_RULES)?,
            received: typed(layout, map_names::DNS_RECEIVED)?,
            processed: typed(layout, map_names::DNS_PROCESSED)?,
            gated: typed(layout, map_names::GATED_CGROUPS)?,
        })
    }
}

/// The observation task's state.
pub struct Observer {
    maps: Maps,
    attach: attach::Attached,
    table: table::Table,
    resolvers: Vec<IpAddr>,
    compiled: Arc<Compiled>,
    /// Answers processed per cgroup (mirrors `DNS_PROCESSED`).
    processed: HashMap<u64, u64>,
    /// Entries written, to remove them when no rule applies any more.
    written: BTreeMap<(u64, IpAddr), HostRules>,
    /// Connects waiting: (pid, cgroup, since).
    waiting: Vec<(u32, u64, tokio::time::Instant)>,
}

/// Starts observing: loads the programs, attaches them where the current
/// policies need them, and runs until shutdown.
pub fn spawn(
    layout: &PinLayout,
    resolvers: Vec<IpAddr>,
    cgroup_root: std::path::PathBuf,
    policies: watch::Receiver<Arc<Compiled>>,
    inputs: mpsc::Receiver<Input>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, DnsError> {
    let maps = Maps::open(layout)?;
    let attach = attach::Attached::load(layout, cgroup_root)?;
    if resolvers.is_empty() {
        tracing::warn!(
            "no DNS resolvers configured ([dns] resolvers) or found in resolv.conf: host-name connect rules learn nothing, so the network rules and the default decide"
        );
    }
    let compiled = Arc::clone(&policies.borrow());
    let mut observer = Observer {
        maps,
        attach,
        table: table::Table::default(),
        resolvers,
        compiled,
        processed: HashMap::new(),
        written: BTreeMap::new(),
        waiting: Vec::new(),
    };
    observer.policies_changed();
    Ok(tokio::spawn(observer.run(policies, inputs, shutdown)))
}

impl Observer {
    async fn run(
        mut self,
        mut policies: watch::Receiver<Arc<Compiled>>,
        mut inputs: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let next = self.next_deadline();
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = policies.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.compiled = Arc::clone(&policies.borrow_and_update());
                    self.policies_changed();
                }
                input = inputs.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                () = tokio::time::sleep_until(next) => {}
            }
            self.expire();
            self.resume_waiting(false);
        }
    }

    /// When the loop must wake up: the next expiry, or a waiting connect's
    /// grace end.
    fn next_deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut next = now + Duration::from_hours(1);
        if let Some(expiry) = self.table.next_expiry() {
            let in_ns = expiry.saturating_sub(boot_time_ns());
            next = next.min(now + Duration::from_nanos(in_ns));
        }
        for (_, _, since) in &self.waiting {
            next = next.min(*since + WAIT_GRACE);
        }
        next
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Packet(event) => self.packet(&event),
            Input::Wait(origin) => {
                self.waiting
                    .push((origin.pid, origin.cgroup_id, tokio::time::Instant::now()));
            }
        }
    }

    fn packet(&mut self, event: &DnsEvent) {
        let packet = table::Packet {
            cgroup_id: event.cgroup_id,
            src: IpAddr::V6(Ipv6Addr::from(event.src)).to_canonical(),
            dst: IpAddr::V6(Ipv6Addr::from(event.dst)).to_canonical(),
            sport: event.sport,
            dport: event.dport,
            ktime_ns: event.ktime_ns,
        };
        let len = usize::try_from(event.len)
            .unwrap_or(0)
            .min(event.payload.len());
        let parsed = message::parse(&event.payload[..len]);
        if event.direction == dns_direction::QUERY {
            if let Ok(parsed) = parsed {
                self.table.query(&packet, &parsed);
            }
            return;
        }
        match parsed {
            Ok(parsed) => match self.table.answer(&packet, &parsed, &self.resolvers) {
                Ok(changed) => {
                    tracing::debug!(
                        cgroup = packet.cgroup_id,
                        name = %parsed.name.escape_debug(),
                        addresses = changed.len(),
                        "learned from a DNS answer"
                    );
                    for addr in changed {
                        self.refresh(packet.cgroup_id, addr);
                    }
                }
                Err(ignored) => tracing::info!(
                    cgroup = packet.cgroup_id,
                    from = %packet.src,
                    name = %parsed.name.escape_debug(),
                    why = ignored.as_str(),
                    "DNS answer ignored"
                ),
            },
            Err(err) => {
                tracing::debug!(cgroup = packet.cgroup_id, error = %err, "DNS answer not parsed");
            }
        }
        self.count_processed(packet.cgroup_id);
        self.publish();
    }

    /// One more answer of `cgroup_id` processed.
    fn count_processed(&mut self, cgroup_id: u64) {
        let maps = &self.maps;
        let count = self
            .processed
            .entry(cgroup_id)
            .or_insert_with(|| maps.processed.get(&cgroup_id, 0).unwrap_or(0));
        *count += 1;
        if let Err(err) = self.maps.processed.insert(cgroup_id, *count, 0) {
            tracing::error!(cgroup = cgroup_id, error = %err, "cannot count a processed DNS answer");
        }
    }

    /// Resumes waiting connects whose workloads' answers are all processed
    /// (or, `force` / past the grace, taken as processed).
    fn resume_waiting(&mut self, force: bool) {
        let now = tokio::time::Instant::now();
        let mut still = Vec::new();
        for (pid, cgroup_id, since) in std::mem::take(&mut self.waiting) {
            let received = self.maps.received.get(&cgroup_id, 0).unwrap_or(0);
            let processed = self.maps.processed.get(&cgroup_id, 0).unwrap_or(0);
            if processed < received {
                if !force && now < since + WAIT_GRACE {
                    still.push((pid, cgroup_id, since));
                    continue;
                }
                tracing::warn!(
                    cgroup = cgroup_id,
                    missing = received - processed,
                    "DNS answers counted by the kernel never arrived; taken as processed"
                );
                self.processed.insert(cgroup_id, received);
                let _ = self.maps.processed.insert(cgroup_id, received, 0);
            }
            resume(pid);
        }
        self.waiting = still;
    }

    /// Forgets expired answers and rewrites the entries they shaped.
    fn expire(&mut self) {
        let now = boot_time_ns();
        let changed = self.table.expire(now);
        let stale: Vec<(u64, IpAddr)> = self
            .written
            .iter()
            .filter(|(_, entry)| entry.expires_ns <= now)
            .map(|(key, _)| *key)
            .collect();
        if changed.is_empty() && stale.is_empty() {
            return;
        }
        for (cgroup_id, addr) in changed.into_iter().chain(stale) {
            self.refresh(cgroup_id, addr);
        }
        self.publish();
    }

    /// After a policy load or rescan: attach where needed, and rewrite
    /// every entry under the (possibly renumbered) policies.
    fn policies_changed(&mut self) {
        self.attach.follow(&self.compiled);
        for (cgroup_id, addr) in self.table.pairs() {
            self.refresh(cgroup_id, addr);
        }
        let orphans: Vec<(u64, IpAddr)> = self
            .written
            .keys()
            .filter(|key| !self.table.pairs().contains(key))
            .copied()
            .collect();
        for (cgroup_id, addr) in orphans {
            self.refresh(cgroup_id, addr);
        }
    }

    /// Writes (or removes) the `HOST_RULES` entry of one workload and address.
    fn refresh(&mut self, cgroup_id: u64, addr: IpAddr) {
        let now = boot_time_ns();
        let entry = self.policy_of(cgroup_id).and_then(|policy| {
            self.table
                .entry(cgroup_id, addr, &policy.policy.connect, now)
        });
        let key = host_key(cgroup_id, addr);
        match entry {
            Some(entry) => {
                if self.written.get(&(cgroup_id, addr)) == Some(&entry) {
                    return;
                }
                match self.maps.host_rules.insert(key, entry, 0) {
                    Ok(()) => {
                        self.written.insert((cgroup_id, addr), entry);
                    }
                    Err(err) => tracing::error!(
                        cgroup = cgroup_id,
                        %addr,
                        error = %err,
                        "cannot write a host rule entry (HOST_RULES full?): the network rules and the default decide"
                    ),
                }
            }
            None => {
                if self.written.remove(&(cgroup_id, addr)).is_some() {
                    let _ = self.maps.host_rules.remove(&key);
                }
            }
        }
    }

    /// The loaded policy governing `cgroup_id`, as the kernel gates it now.
    fn policy_of(&self, cgroup_id: u64) -> Option<Arc<crate::policy::LoadedPolicy>> {
        let gated = self.maps.gated.get(&cgroup_id, 0).ok()?;
        self.compiled.policies.get(&gated.policy_id).cloned()
    }

    fn publish(&self) {
        let mut published: Published = HashMap::new();
        for (cgroup_id, addr) in self.table.pairs() {
            published.insert((cgroup_id, addr), self.table.names_until(cgroup_id, addr));
        }
        *PUBLISHED.lock().unwrap_or_else(PoisonError::into_inner) = Some(published);
    }
}

/// `HOST_RULES` key: IPv4 as `::ffff:a.b.c.d`.
fn host_key(cgroup_id: u64, addr: IpAddr) -> HostKey {
    let addr = match addr.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    HostKey {
        cgroup_id,
        addr: addr.octets(),
    }
}

/// Continues a task stopped waiting for its DNS answers: its syscall
/// restarts and is decided with what was learned.
fn resume(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(err) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGCONT,
    ) {
        tracing::debug!(pid, error = %err, "resume after DNS processing");
    }
}
