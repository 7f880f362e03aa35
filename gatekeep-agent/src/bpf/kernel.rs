//! The agent's hold on the kernel maps.
//!
//! [`KernelMaps`] wraps the pinned maps with typed accessors. One task owns
//! it ([`spawn`]); everything else talks to that task through a cloneable
//! [`KernelHandle`]: [`KernelHandle::run`] sends it one closure over the maps
//! (on an `mpsc`, with a `oneshot` reply), so map writes never race each
//! other and a new operation needs no new command. Map operations are single
//! syscalls, so the owner runs them inline.

use std::{collections::BTreeMap, future::Future, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use gatekeep_common::{
    GatedCgroup, Grant, GrantKey, InodeKey, PendingRequest, PolicyDefaults, Verdict, VerdictKey,
    counter, gated_filter_slot, map_names,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    bpf::pinning::{PinLayout, PinningError, open_map},
    hooks::{self, RuleKey},
    policy::{Applied, MapOp, MapState, PolicyMaps, PolicyMapsError},
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
    /// Every hook's rule maps ([`hooks::RULE_MAPS`]), typed by the hook
    /// at each use.
    rule_maps: BTreeMap<&'static str, Map>,
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
    ($layout:expr, $name:expr, $ty:ty) => {{
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
            gated: typed!(layout, map_names::GATED_CGROUPS, HashMap<MapData, u64, GatedCgroup>),
            gated_filter: typed!(layout, map_names::GATED_FILTER, Array<MapData, u64>),
            policies: typed!(layout, map_names::POLICIES, Array<MapData, PolicyDefaults>),
            rule_maps: hooks::RULE_MAPS
                .iter()
                .map(|name| Ok((*name, open_map(layout, name)?)))
                .collect::<Result<_, PinningError>>()?,
            pending: typed!(layout, map_names::PENDING, HashMap<MapData, u32, PendingRequest>),
            verdicts: typed!(layout, map_names::VERDICTS, HashMap<MapData, VerdictKey, Verdict>),
            grants: if layout.map(map_names::GRANTS).exists() {
                Some(typed!(layout, map_names::GRANTS, HashMap<MapData, GrantKey, Grant>))
            } else {
                None
            },
            counters: typed!(layout, map_names::COUNTERS, PerCpuArray<MapData, u64>),
            names: typed!(layout, map_names::POLICY_NAME_HASHES, Array<MapData, u64>),
            protected: typed!(layout, map_names::PROTECTED_INODES, HashMap<MapData, InodeKey, u32>),
            candidates: typed!(layout, map_names::CANDIDATE_PARENTS, HashMap<MapData, u64, u32>),
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

impl KernelMaps {
    /// Writes (`Some`) or removes one entry of a hook's rule map.
    fn write_rule(&mut self, key: &RuleKey, value: Option<&[u8]>) -> Result<(), PolicyMapsError> {
        let write = |source| PolicyMapsError::Write {
            map: key.map,
            source,
        };
        let Some(map) = self.rule_maps.get_mut(key.map) else {
            return Err(write(MapError::InvalidName {
                name: key.map.to_owned(),
            }));
        };
        hooks::write_map(map, key, value).map_err(write)
    }
}

impl PolicyMaps for KernelMaps {
    fn read_state(&self) -> Result<MapState, PolicyMapsError> {
        let read = |map: &'static str| move |source| PolicyMapsError::Read { map, source };
        let mut state = MapState::default();
        for entry in &self.gated {
            let (id, gated) = entry.map_err(read(map_names::GATED_CGROUPS))?;
            state.gated.insert(id, gated);
        }
        for (index, entry) in self.policies.iter().enumerate() {
            let defaults = entry.map_err(read(map_names::POLICIES))?;
            if defaults != PolicyDefaults::default() {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                state.policies.insert(index, defaults);
            }
        }
        for (name, map) in &self.rule_maps {
            for (key, value) in hooks::read_map(name, map).map_err(read(name))? {
                state.rules.insert(key, value);
            }
        }
        for (index, entry) in self.names.iter().enumerate() {
            let hash = entry.map_err(read(map_names::POLICY_NAME_HASHES))?;
            if hash != 0 {
                state
                    .names
                    .insert(u32::try_from(index).unwrap_or(u32::MAX), hash);
            }
        }
        for entry in &self.protected {
            let (key, flags) = entry.map_err(read(map_names::PROTECTED_INODES))?;
            state.protected.insert((key.dev, key.ino), flags);
        }
        for entry in self.candidates.keys() {
            state
                .candidates
                .insert(entry.map_err(read(map_names::CANDIDATE_PARENTS))?);
        }
        Ok(state)
    }

    fn write(&mut self, op: &MapOp) -> Result<(), PolicyMapsError> {
        let write = |map: &'static str| move |source| PolicyMapsError::Write { map, source };
        match op {
            MapOp::SetPolicy(id, defaults) => self
                .policies
                .set(*id, defaults, 0)
                .map_err(write(map_names::POLICIES)),
            MapOp::SetRule(key, value) => self.write_rule(key, Some(value)),
            MapOp::RemoveRule(key) => self.write_rule(key, None),
            // The filter slot first: the programs never see the entry without it.
            MapOp::SetGated(id, gated) => self
                .gated_filter
                .set(gated_filter_slot(*id), 1, 0)
                .map_err(write(map_names::GATED_FILTER))
                .and_then(|()| {
                    self.gated
                        .insert(id, gated, 0)
                        .map_err(write(map_names::GATED_CGROUPS))
                }),
            MapOp::RemoveGated(id) => not_found_is_none(self.gated.remove(id))
                .map(drop)
                .map_err(write(map_names::GATED_CGROUPS)),
            MapOp::SetPolicyName(id, hash) => self
                .names
                .set(*id, hash, 0)
                .map_err(write(map_names::POLICY_NAME_HASHES)),
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
                .map_err(write(map_names::PROTECTED_INODES)),
            MapOp::RemoveProtected((dev, ino)) => {
                not_found_is_none(self.protected.remove(&InodeKey {
                    dev: *dev,
                    ino: *ino,
                }))
                .map(drop)
                .map_err(write(map_names::PROTECTED_INODES))
            }
            MapOp::SetCandidate(id) => self
                .candidates
                .insert(id, 1, 0)
                .map_err(write(map_names::CANDIDATE_PARENTS)),
            MapOp::RemoveCandidate(id) => not_found_is_none(self.candidates.remove(id))
                .map(drop)
                .map_err(write(map_names::CANDIDATE_PARENTS)),
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

/// One operation on the maps, run by the owner task. It sends its own
/// result back (see [`KernelHandle::run`]), so the task needs no variant
/// per operation.
type Job = Box<dyn FnOnce(&mut KernelMaps) + Send>;

/// Talks to the task that owns the maps.
#[derive(Clone)]
pub struct KernelHandle {
    jobs: mpsc::Sender<Job>,
}

/// Starts the owner task; it ends when every handle is dropped.
#[must_use]
pub fn spawn(maps: KernelMaps) -> (KernelHandle, tokio::task::JoinHandle<()>) {
    let (jobs, receiver) = mpsc::channel(256);
    let task = tokio::spawn(serve(maps, receiver));
    (KernelHandle { jobs }, task)
}

async fn serve(mut maps: KernelMaps, mut receiver: mpsc::Receiver<Job>) {
    while let Some(job) = receiver.recv().await {
        job(&mut maps);
    }
}

/// Names a failed map operation (`"read PENDING"`).
fn map_error(op: &'static str) -> impl FnOnce(MapError) -> KernelError {
    move |source| KernelError::Map { op, source }
}

impl KernelHandle {
    /// Runs `op` on the maps in the owner task and returns its result.
    /// Every map operation goes through here, one at a time, so writes
    /// never race each other; a map operation is a single syscall, so the
    /// owner runs it inline.
    pub async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut KernelMaps) -> Result<T, KernelError> + Send + 'static,
    ) -> Result<T, KernelError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |maps| {
            // A dropped reply means the asker gave up; nothing to do about it.
            drop(reply.send(op(maps)));
        });
        self.jobs.send(job).await.map_err(|_| KernelError::Gone)?;
        answer.await.map_err(|_| KernelError::Gone)?
    }

    pub async fn read_policy_state(&self) -> Result<MapState, KernelError> {
        self.run(|maps| Ok(maps.read_state()?)).await
    }

    pub async fn apply_policy(&self, state: MapState) -> Result<Applied, KernelError> {
        self.run(move |maps| Ok(crate::policy::apply(maps, &state)?))
            .await
    }

    pub async fn counters(&self) -> Result<Vec<u64>, KernelError> {
        self.run(|maps| maps.counters().map_err(map_error("read COUNTERS")))
            .await
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
        self.run(|maps| maps.grants().map_err(map_error("read GRANTS")))
            .await
    }

    async fn set_grant(&self, key: GrantKey, grant: Grant) -> Result<(), KernelError> {
        self.run(move |maps| {
            maps.set_grant(key, grant)
                .map_err(map_error("write GRANTS"))
        })
        .await
    }

    async fn remove_grant(&self, key: GrantKey) -> Result<(), KernelError> {
        self.run(move |maps| maps.remove_grant(&key).map_err(map_error("remove GRANTS")))
            .await
    }
}

impl PauseKernel for KernelHandle {
    async fn pending(&self) -> Result<Vec<(u32, PendingRequest)>, KernelError> {
        self.run(|maps| maps.pending().map_err(map_error("read PENDING")))
            .await
    }

    async fn pending_of(&self, tid: u32) -> Result<Option<PendingRequest>, KernelError> {
        self.run(move |maps| maps.pending_of(tid).map_err(map_error("read PENDING")))
            .await
    }

    async fn remove_pending(&self, tid: u32, digest: u64) -> Result<bool, KernelError> {
        self.run(move |maps| {
            maps.remove_pending(tid, digest)
                .map_err(map_error("remove PENDING"))
        })
        .await
    }

    async fn write_verdict(&self, key: VerdictKey, verdict: Verdict) -> Result<(), KernelError> {
        self.run(move |maps| {
            maps.write_verdict(key, verdict)
                .map_err(map_error("write VERDICTS"))
        })
        .await
    }

    async fn verdicts(&self) -> Result<Vec<(VerdictKey, Verdict)>, KernelError> {
        self.run(|maps| maps.verdicts().map_err(map_error("read VERDICTS")))
            .await
    }

    async fn remove_verdict(&self, key: VerdictKey) -> Result<(), KernelError> {
        self.run(move |maps| {
            maps.remove_verdict(&key)
                .map_err(map_error("remove VERDICTS"))
        })
        .await
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
    "exec_rule_stale",
    "exec_argv_changed",
    "exec_env_changed",
];
