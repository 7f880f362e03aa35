//! The agent's hold on the kernel maps.
//!
//! [`KernelMaps`] wraps the pinned maps with typed accessors. One task owns
//! it ([`spawn`]); everything else talks to that task through a cloneable
//! [`KernelHandle`] (an `mpsc` of commands, each with a `oneshot` reply), so
//! map writes never race each other. Map operations are single syscalls, so
//! the owner runs them inline.

use std::{future::Future, time::Duration};

use aya::maps::{
    Array, HashMap, MapData, MapError, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use gatekeep_common::{
    ConnectV4Key, ConnectV6Key, ExecRuleKey, GatedCgroup, Grant, GrantKey, InodeKey,
    PendingRequest, PolicyDefaults, PortRules, Verdict, VerdictKey, counter, gated_filter_slot,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    pinning::{PinLayout, PinningError, open_map},
    policy_maps::{
        Applied, MapOp, MapState, PolicyMaps, PolicyMapsError, exec_key, v4_bytes, v4_key,
        v6_bytes, v6_key,
    },
};

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock of `bpf_ktime_get_boot_ns`.
#[must_use]
pub fn boot_time_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |ts| {
        let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    })
}

/// How long a written verdict stays valid if the task never comes back for it.
pub const VERDICT_TTL: Duration = Duration::from_secs(30);

/// Typed handles on every map user space touches.
pub struct KernelMaps {
    gated: HashMap<MapData, u64, GatedCgroup>,
    /// The kernel's first test of "may this cgroup be gated" (see
    /// `gatekeep_common::gated_filter_slot`).
    gated_filter: Array<MapData, u64>,
    policies: Array<MapData, PolicyDefaults>,
    exec_rules: HashMap<MapData, ExecRuleKey, u32>,
    connect_v4: LpmTrie<MapData, ConnectV4Key, PortRules>,
    connect_v6: LpmTrie<MapData, ConnectV6Key, PortRules>,
    pending: HashMap<MapData, u32, PendingRequest>,
    verdicts: HashMap<MapData, VerdictKey, Verdict>,
    /// Granted durations; `None` when the pinned programs predate them.
    grants: Option<HashMap<MapData, GrantKey, Grant>>,
    counters: PerCpuArray<MapData, u64>,
    /// Policy id -> name hash (`POLICY_NAME_HASHES`).
    names: Array<MapData, u64>,
    /// gatekeep's files by identity (`PROTECTED_INODES`).
    protected: HashMap<MapData, InodeKey, u32>,
    /// `CANDIDATE_PARENTS`.
    candidates: HashMap<MapData, u64, u32>,
}

/// Converts a pinned map, naming it when its layout is not the expected one.
macro_rules! typed {
    ($layout:expr, $name:literal, $ty:ty) => {{
        let map = open_map($layout, $name)?;
        <$ty>::try_from(map).map_err(|source| PinningError::MapLayout {
            path: $layout.map($name),
            source,
        })?
    }};
}

impl KernelMaps {
    /// Opens the pinned maps.
    pub fn open(layout: &PinLayout) -> Result<Self, PinningError> {
        Ok(Self {
            gated: typed!(layout, "GATED_CGROUPS", HashMap<MapData, u64, GatedCgroup>),
            gated_filter: typed!(layout, "GATED_FILTER", Array<MapData, u64>),
            policies: typed!(layout, "POLICIES", Array<MapData, PolicyDefaults>),
            exec_rules: typed!(layout, "EXEC_RULES", HashMap<MapData, ExecRuleKey, u32>),
            connect_v4: typed!(layout, "CONNECT_V4", LpmTrie<MapData, ConnectV4Key, PortRules>),
            connect_v6: typed!(layout, "CONNECT_V6", LpmTrie<MapData, ConnectV6Key, PortRules>),
            pending: typed!(layout, "PENDING", HashMap<MapData, u32, PendingRequest>),
            verdicts: typed!(layout, "VERDICTS", HashMap<MapData, VerdictKey, Verdict>),
            grants: if layout.map("GRANTS").exists() {
                Some(typed!(layout, "GRANTS", HashMap<MapData, GrantKey, Grant>))
            } else {
                None
            },
            counters: typed!(layout, "COUNTERS", PerCpuArray<MapData, u64>),
            names: typed!(layout, "POLICY_NAME_HASHES", Array<MapData, u64>),
            protected: typed!(layout, "PROTECTED_INODES", HashMap<MapData, InodeKey, u32>),
            candidates: typed!(layout, "CANDIDATE_PARENTS", HashMap<MapData, u64, u32>),
        })
    }

    /// Every installed grant.
    pub fn grants(&self) -> Result<Vec<(GrantKey, Grant)>, MapError> {
        match &self.grants {
            Some(grants) => grants.iter().collect(),
            None => Ok(Vec::new()),
        }
    }

    /// Installs (or replaces) a grant.
    pub fn set_grant(&mut self, key: GrantKey, grant: Grant) -> Result<(), MapError> {
        match &mut self.grants {
            Some(grants) => grants.insert(key, grant, 0),
            // The running programs cannot honour grants: asking again is
            // the safe outcome, so there is nothing to write.
            None => Ok(()),
        }
    }

    pub fn remove_grant(&mut self, key: &GrantKey) -> Result<(), MapError> {
        match &mut self.grants {
            Some(grants) => not_found_is_none(grants.remove(key)).map(drop),
            None => Ok(()),
        }
    }

    /// Every pending request: thread id -> request.
    pub fn pending(&self) -> Result<Vec<(u32, PendingRequest)>, MapError> {
        self.pending.iter().collect()
    }

    pub fn pending_of(&self, tid: u32) -> Result<Option<PendingRequest>, MapError> {
        not_found_is_none(self.pending.get(&tid, 0))
    }

    /// Removes `tid`'s pending request if it is still the one with `digest`.
    pub fn remove_pending(&mut self, tid: u32, digest: u64) -> Result<bool, MapError> {
        match self.pending_of(tid)? {
            Some(pending) if pending.digest == digest => {
                not_found_is_none(self.pending.remove(&tid)).map(|r| r.is_some())
            }
            _ => Ok(false),
        }
    }

    pub fn write_verdict(&mut self, key: VerdictKey, verdict: Verdict) -> Result<(), MapError> {
        self.verdicts.insert(key, verdict, 0)
    }

    pub fn verdicts(&self) -> Result<Vec<(VerdictKey, Verdict)>, MapError> {
        self.verdicts.iter().collect()
    }

    pub fn remove_verdict(&mut self, key: &VerdictKey) -> Result<(), MapError> {
        not_found_is_none(self.verdicts.remove(key)).map(drop)
    }

    /// Every counter, summed over CPUs, indexed by [`counter`].
    pub fn counters(&self) -> Result<Vec<u64>, MapError> {
        (0..counter::COUNT)
            .map(|index| Ok(self.counters.get(&index, 0)?.iter().sum()))
            .collect()
    }
}

/// `get`/`remove` of an absent key is `KeyNotFound`; for us that is `None`.
fn not_found_is_none<T>(result: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(err) => Err(err),
    }
}

impl PolicyMaps for KernelMaps {
    fn read_state(&self) -> Result<MapState, PolicyMapsError> {
        let read = |map: &'static str| move |source| PolicyMapsError::Read { map, source };
        let mut state = MapState::default();
        for entry in &self.gated {
            let (id, gated) = entry.map_err(read("GATED_CGROUPS"))?;
            state.gated.insert(id, gated);
        }
        for (index, entry) in self.policies.iter().enumerate() {
            let defaults = entry.map_err(read("POLICIES"))?;
            if defaults != PolicyDefaults::default() {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                state.policies.insert(index, defaults);
            }
        }
        for entry in &self.exec_rules {
            let (key, action) = entry.map_err(read("EXEC_RULES"))?;
            state
                .exec_rules
                .insert((key.policy_id, key.dev, key.ino), action);
        }
        for entry in &self.connect_v4 {
            let (key, rules) = entry.map_err(read("CONNECT_V4"))?;
            state
                .connect_v4
                .insert((key.prefix_len(), v4_bytes(&key.data())), rules);
        }
        for entry in &self.connect_v6 {
            let (key, rules) = entry.map_err(read("CONNECT_V6"))?;
            state
                .connect_v6
                .insert((key.prefix_len(), v6_bytes(&key.data())), rules);
        }
        for (index, entry) in self.names.iter().enumerate() {
            let hash = entry.map_err(read("POLICY_NAME_HASHES"))?;
            if hash != 0 {
                state
                    .names
                    .insert(u32::try_from(index).unwrap_or(u32::MAX), hash);
            }
        }
        for entry in &self.protected {
            let (key, flags) = entry.map_err(read("PROTECTED_INODES"))?;
            state.protected.insert((key.dev, key.ino), flags);
        }
        for entry in self.candidates.keys() {
            state
                .candidates
                .insert(entry.map_err(read("CANDIDATE_PARENTS"))?);
        }
        Ok(state)
    }

    fn write(&mut self, op: &MapOp) -> Result<(), PolicyMapsError> {
        let write = |map: &'static str| move |source| PolicyMapsError::Write { map, source };
        match op {
            MapOp::SetPolicy(id, defaults) => self
                .policies
                .set(*id, defaults, 0)
                .map_err(write("POLICIES")),
            MapOp::SetExec(key, action) => self
                .exec_rules
                .insert(exec_key(*key), action, 0)
                .map_err(write("EXEC_RULES")),
            MapOp::RemoveExec(key) => not_found_is_none(self.exec_rules.remove(&exec_key(*key)))
                .map(drop)
                .map_err(write("EXEC_RULES")),
            MapOp::SetV4((prefix, key), rules) => self
                .connect_v4
                .insert(&Key::new(*prefix, v4_key(*key)), rules, 0)
                .map_err(write("CONNECT_V4")),
            MapOp::RemoveV4((prefix, key)) => {
                not_found_is_none(self.connect_v4.remove(&Key::new(*prefix, v4_key(*key))))
                    .map(drop)
                    .map_err(write("CONNECT_V4"))
            }
            MapOp::SetV6((prefix, key), rules) => self
                .connect_v6
                .insert(&Key::new(*prefix, v6_key(*key)), rules, 0)
                .map_err(write("CONNECT_V6")),
            MapOp::RemoveV6((prefix, key)) => {
                not_found_is_none(self.connect_v6.remove(&Key::new(*prefix, v6_key(*key))))
                    .map(drop)
                    .map_err(write("CONNECT_V6"))
            }
            // The filter slot first: the programs never see the entry without it.
            MapOp::SetGated(id, gated) => self
                .gated_filter
                .set(gated_filter_slot(*id), 1, 0)
                .map_err(write("GATED_FILTER"))
                .and_then(|()| {
                    self.gated
                        .insert(id, gated, 0)
                        .map_err(write("GATED_CGROUPS"))
                }),
            MapOp::RemoveGated(id) => not_found_is_none(self.gated.remove(id))
                .map(drop)
                .map_err(write("GATED_CGROUPS")),
            MapOp::SetPolicyName(id, hash) => self
                .names
                .set(*id, hash, 0)
                .map_err(write("POLICY_NAME_HASHES")),
            MapOp::SetProtected((dev, ino), flags) => self
                .protected
                .insert(
                    InodeKey {
                        dev: *dev,
                        ino: *ino,
                    },
                    flags,
                    0,
                )
                .map_err(write("PROTECTED_INODES")),
            MapOp::RemoveProtected((dev, ino)) => {
                not_found_is_none(self.protected.remove(&InodeKey {
                    dev: *dev,
                    ino: *ino,
                }))
                .map(drop)
                .map_err(write("PROTECTED_INODES"))
            }
            MapOp::SetCandidate(id) => self
                .candidates
                .insert(id, 1, 0)
                .map_err(write("CANDIDATE_PARENTS")),
            MapOp::RemoveCandidate(id) => not_found_is_none(self.candidates.remove(id))
                .map(drop)
                .map_err(write("CANDIDATE_PARENTS")),
        }
    }
}

/// A map operation failed (in the owner task, or the owner is gone).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel map operation `{op}` failed")]
    Map {
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Policy(#[from] PolicyMapsError),
    #[error("the kernel map task has stopped")]
    Gone,
}

/// What the pause protocol needs from the kernel; [`KernelHandle`] is the
/// real one, tests use a fake.
pub trait PauseKernel: Send + Sync + 'static {
    fn pending(
        &self,
    ) -> impl Future<Output = Result<Vec<(u32, PendingRequest)>, KernelError>> + Send;
    fn pending_of(
        &self,
        tid: u32,
    ) -> impl Future<Output = Result<Option<PendingRequest>, KernelError>> + Send;
    /// Removes the pending request of `tid` if it still has `digest`.
    fn remove_pending(
        &self,
        tid: u32,
        digest: u64,
    ) -> impl Future<Output = Result<bool, KernelError>> + Send;
    fn write_verdict(
        &self,
        key: VerdictKey,
        verdict: Verdict,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn verdicts(
        &self,
    ) -> impl Future<Output = Result<Vec<(VerdictKey, Verdict)>, KernelError>> + Send;
    fn remove_verdict(
        &self,
        key: VerdictKey,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
}

enum Command {
    Pending(oneshot::Sender<Result<Vec<(u32, PendingRequest)>, KernelError>>),
    PendingOf(
        u32,
        oneshot::Sender<Result<Option<PendingRequest>, KernelError>>,
    ),
    RemovePending(u32, u64, oneshot::Sender<Result<bool, KernelError>>),
    WriteVerdict(
        VerdictKey,
        Verdict,
        oneshot::Sender<Result<(), KernelError>>,
    ),
    Verdicts(oneshot::Sender<Result<Vec<(VerdictKey, Verdict)>, KernelError>>),
    RemoveVerdict(VerdictKey, oneshot::Sender<Result<(), KernelError>>),
    ReadPolicyState(oneshot::Sender<Result<MapState, KernelError>>),
    ApplyPolicy(Box<MapState>, oneshot::Sender<Result<Applied, KernelError>>),
    Counters(oneshot::Sender<Result<Vec<u64>, KernelError>>),
    Grants(oneshot::Sender<Result<Vec<(GrantKey, Grant)>, KernelError>>),
    SetGrant(GrantKey, Grant, oneshot::Sender<Result<(), KernelError>>),
    RemoveGrant(GrantKey, oneshot::Sender<Result<(), KernelError>>),
}

/// Talks to the task that owns the maps.
#[derive(Clone)]
pub struct KernelHandle {
    commands: mpsc::Sender<Command>,
}

/// Starts the owner task; it ends when every handle is dropped.
#[must_use]
pub fn spawn(maps: KernelMaps) -> (KernelHandle, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(256);
    let task = tokio::spawn(serve(maps, receiver));
    (KernelHandle { commands }, task)
}

async fn serve(mut maps: KernelMaps, mut receiver: mpsc::Receiver<Command>) {
    let map_err = |op| move |source| KernelError::Map { op, source };
    while let Some(command) = receiver.recv().await {
        // A dropped reply means the asker gave up; nothing to do about it.
        match command {
            Command::Pending(reply) => {
                drop(reply.send(maps.pending().map_err(map_err("read PENDING"))));
            }
            Command::PendingOf(tid, reply) => {
                drop(reply.send(maps.pending_of(tid).map_err(map_err("read PENDING"))));
            }
            Command::RemovePending(tid, digest, reply) => drop(
                reply.send(
                    maps.remove_pending(tid, digest)
                        .map_err(map_err("remove PENDING")),
                ),
            ),
            Command::WriteVerdict(key, verdict, reply) => drop(
                reply.send(
                    maps.write_verdict(key, verdict)
                        .map_err(map_err("write VERDICTS")),
                ),
            ),
            Command::Verdicts(reply) => {
                drop(reply.send(maps.verdicts().map_err(map_err("read VERDICTS"))));
            }
            Command::RemoveVerdict(key, reply) => {
                drop(
                    reply.send(
                        maps.remove_verdict(&key)
                            .map_err(map_err("remove VERDICTS")),
                    ),
                );
            }
            Command::ReadPolicyState(reply) => {
                drop(reply.send(maps.read_state().map_err(KernelError::from)));
            }
            Command::ApplyPolicy(state, reply) => drop(
                reply.send(crate::policy_maps::apply(&mut maps, &state).map_err(KernelError::from)),
            ),
            Command::Counters(reply) => {
                drop(reply.send(maps.counters().map_err(map_err("read COUNTERS"))));
            }
            Command::Grants(reply) => {
                drop(reply.send(maps.grants().map_err(map_err("read GRANTS"))));
            }
            Command::SetGrant(key, grant, reply) => {
                drop(reply.send(maps.set_grant(key, grant).map_err(map_err("write GRANTS"))));
            }
            Command::RemoveGrant(key, reply) => {
                drop(reply.send(maps.remove_grant(&key).map_err(map_err("remove GRANTS"))));
            }
        }
    }
}

impl KernelHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, KernelError>>) -> Command,
    ) -> Result<T, KernelError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| KernelError::Gone)?;
        answer.await.map_err(|_| KernelError::Gone)?
    }

    pub async fn read_policy_state(&self) -> Result<MapState, KernelError> {
        self.ask(Command::ReadPolicyState).await
    }

    pub async fn apply_policy(&self, state: MapState) -> Result<Applied, KernelError> {
        self.ask(|reply| Command::ApplyPolicy(Box::new(state), reply))
            .await
    }

    pub async fn counters(&self) -> Result<Vec<u64>, KernelError> {
        self.ask(Command::Counters).await
    }
}

/// What grant bookkeeping needs from the kernel: the `GRANTS` map.
/// [`KernelHandle`] is the real one, tests use a fake.
pub trait GrantKernel: Send + Sync + 'static {
    fn grants(&self) -> impl Future<Output = Result<Vec<(GrantKey, Grant)>, KernelError>> + Send;
    fn set_grant(
        &self,
        key: GrantKey,
        grant: Grant,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn remove_grant(&self, key: GrantKey) -> impl Future<Output = Result<(), KernelError>> + Send;
}

impl GrantKernel for KernelHandle {
    async fn grants(&self) -> Result<Vec<(GrantKey, Grant)>, KernelError> {
        self.ask(Command::Grants).await
    }

    async fn set_grant(&self, key: GrantKey, grant: Grant) -> Result<(), KernelError> {
        self.ask(|reply| Command::SetGrant(key, grant, reply)).await
    }

    async fn remove_grant(&self, key: GrantKey) -> Result<(), KernelError> {
        self.ask(|reply| Command::RemoveGrant(key, reply)).await
    }
}

impl PauseKernel for KernelHandle {
    async fn pending(&self) -> Result<Vec<(u32, PendingRequest)>, KernelError> {
        self.ask(Command::Pending).await
    }

    async fn pending_of(&self, tid: u32) -> Result<Option<PendingRequest>, KernelError> {
        self.ask(|reply| Command::PendingOf(tid, reply)).await
    }

    async fn remove_pending(&self, tid: u32, digest: u64) -> Result<bool, KernelError> {
        self.ask(|reply| Command::RemovePending(tid, digest, reply))
            .await
    }

    async fn write_verdict(&self, key: VerdictKey, verdict: Verdict) -> Result<(), KernelError> {
        self.ask(|reply| Command::WriteVerdict(key, verdict, reply))
            .await
    }

    async fn verdicts(&self) -> Result<Vec<(VerdictKey, Verdict)>, KernelError> {
        self.ask(Command::Verdicts).await
    }

    async fn remove_verdict(&self, key: VerdictKey) -> Result<(), KernelError> {
        self.ask(|reply| Command::RemoveVerdict(key, reply)).await
    }
}

/// Names of the [`counter`] indices, for the status output.
pub const COUNTER_NAMES: [&str; counter::COUNT as usize] = [
    "exec_gated",
    "events_dropped",
    "exec_allowed",
    "exec_denied",
    "exec_asked",
    "connect_gated",
    "connect_allowed",
    "connect_denied",
    "connect_asked",
    "repaused",
    "verdicts_applied",
    "argv_missed",
    "grant_allowed",
];
