//! Granted durations: a reviewer's "allow for 1h / for this session /
//! always" becomes an entry of the kernel's `GRANTS` map, so the identical
//! request (same policy, kind and digest) runs without asking while the grant
//! lasts.
//!
//! The kernel keys grants by policy *id* and request digest. Ids change with
//! every policy reload and digests come only from the kernel's ask events, so
//! user space keeps the grants by policy *name* ([`LocalGrant`]), persisted in
//! `state_dir/grants.json`, and derives the kernel's entries from them
//! ([`Grants::apply`]) whenever the grants or the loaded policies change.
//!
//! - A decision carrying a grant installs it ([`Grants::install`]).
//! - On every (re)connection the service lists the grants in force for this
//!   host: exactly those stay ([`Grants::sync`]); listed grants whose digest
//!   this agent never saw are kept aside and installed once a request they
//!   decide shows the digest ([`Grants::adopt`]).
//! - A revocation removes one ([`Grants::revoke`]); expiry and the end of a
//!   session (its cgroup disappeared) are found by [`Grants::tick`], which
//!   also tells the service that the session ended.
//! - A fresh load of the programs draws a new digest key: the stored digests
//!   mean nothing then and are dropped ([`Grants::load`]).
//!
//! Scope: a grant covers the workload (cgroup) that asked, unless the
//! reviewer chose the whole policy. The kernel's key carries the cgroup id
//! (0 for the whole policy). cgroup ids are not stable (a cgroup made again
//! at the same path, or after a reboot, has a new id, and an old id may be
//! reused by another cgroup after a reboot), so a workload grant is kept by
//! its cgroup *path* and its id is resolved again from that path whenever
//! the kernel entries are computed (every tick): a workload cgroup made
//! again at the same path is covered again; while no cgroup exists at the
//! path, nothing is. A `session` grant keeps the id it was made for, and
//! ends when that cgroup goes away.

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gatekeep_audit::{AuditRecord, RecordKind};
use gatekeep_common::{Grant, GrantKey, request_kind};
use gatekeep_policy::GrantDuration;
use gatekeep_proto::model::{self, GrantScope};
use gatekeep_util::fs::{Existing, PRIVATE, write_atomic};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::{
    audit::AuditSink,
    bpf::kernel::{GrantKernel, boot_time_ns},
    policy::Compiled,
};

/// The kernel identity of the request a grant was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTarget {
    /// Policy name (the kernel id is looked up at install time).
    pub policy: String,
    /// [`request_kind`].
    pub kind: u32,
    pub digest: u64,
    /// The asking task's cgroup: what a workload grant is bound to.
    pub cgroup_id: u64,
    /// Its path relative to the cgroup root (`/agents/a1`), as the service
    /// knows it.
    pub cgroup: String,
}

/// A grant as the agent keeps it (and `grants.json` stores it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalGrant {
    pub id: Uuid,
    pub policy: String,
    /// `exec` or `connect`.
    pub kind: String,
    /// The kernel's request digest (hex).
    pub digest: String,
    /// Whom it covers: `workload` (only [`Self::cgroup`]) or `policy`.
    /// Files written before scopes existed read as `policy` unless they
    /// name a cgroup (their `session` grants).
    #[serde(default = "GrantScope::legacy")]
    pub scope: GrantScope,
    /// Workload grants: the id of the cgroup that asked (a `session` grant
    /// is bound to exactly this id; other workload grants resolve
    /// [`Self::cgroup`] again). 0 for policy-wide grants.
    pub cgroup_id: u64,
    /// Workload grants: the asking cgroup's path relative to the cgroup
    /// root (`/agents/a1`); a `session` grant ends when it goes away.
    pub cgroup: Option<String>,
    /// `1h`, `session`, `always`...
    pub duration: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub created_by: String,
    /// The service's request whose decision made it.
    pub request_id: Uuid,
    /// What it allows, as reviewers saw it.
    pub target: String,
}

/// The payload of a grant record ([`gatekeep_proto::audit::GrantChange`]).
fn grant_payload(grant: &LocalGrant, by: Option<&str>, reason: Option<&str>) -> serde_json::Value {
    let change = gatekeep_proto::audit::GrantChange {
        schema: gatekeep_proto::audit::Schema::default(),
        grant,
        by: by.map(str::to_owned),
        reason: reason.map(str::to_owned),
    };
    // A struct of strings and numbers always encodes.
    serde_json::to_value(&change).unwrap_or_default()
}

impl LocalGrant {
    fn kind_raw(&self) -> u32 {
        if self.kind == "connect" {
            request_kind::CONNECT
        } else {
            request_kind::EXEC
        }
    }

    fn digest_raw(&self) -> Option<u64> {
        u64::from_str_radix(&self.digest, 16).ok()
    }

    fn expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether it is a `session` grant (it ends with its cgroup).
    #[must_use]
    pub fn is_session(&self) -> bool {
        self.duration == GrantDuration::Session.to_string()
    }

    /// Whether it covers only its workload (a legacy entry naming a cgroup
    /// was a session grant, bound to it).
    #[must_use]
    pub fn is_workload(&self) -> bool {
        self.scope == GrantScope::Workload || self.cgroup.is_some()
    }
}

/// What `grants.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct GrantsFile {
    grants: Vec<LocalGrant>,
}

/// Reads the grants an agent stored in `path` (none when the file is absent
/// or unreadable; [`try_read_file`] says why).
#[must_use]
pub fn read_file(path: &Path) -> Vec<LocalGrant> {
    try_read_file(path).unwrap_or_default()
}

/// Why `grants.json` could not be read at start.
#[derive(Debug, thiserror::Error)]
pub enum GrantsFileError {
    #[error(
        "cannot read the grants file `{path}`: {source}; the agent must be able to read it (root, mode 0600): fix its owner and mode, or remove it to start without stored grants"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the grants file `{path}` is corrupt: {source}; it was moved aside to `{aside}` and the agent goes on without stored grants (requests they covered are asked again): restore a good copy there, or let reviewers grant again"
    )]
    Corrupt {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the grants stored in `path`: none when the file does not exist, an
/// error naming the file, the cause and the fix when it cannot be read or
/// parsed. (A corrupt file's `aside` is where [`Grants::load`] moves it.)
pub fn try_read_file(path: &Path) -> Result<Vec<LocalGrant>, GrantsFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(GrantsFileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice::<GrantsFile>(&bytes)
        .map(|file| file.grants)
        .map_err(|source| GrantsFileError::Corrupt {
            path: path.to_owned(),
            aside: corrupt_aside(path),
            source,
        })
}

/// Where a corrupt grants file is kept for inspection (`grants.json.corrupt`),
/// so that storing the grants again does not destroy it.
fn corrupt_aside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".corrupt");
    PathBuf::from(name)
}

/// Where the kernel's clock will be at wall-clock time `at` (0: never).
fn boot_ns_at(at: Option<OffsetDateTime>, now: OffsetDateTime, boot_now: u64) -> u64 {
    let Some(at) = at else { return 0 };
    let left = at - now;
    if left.is_negative() {
        // Already past: an expiry the kernel treats as lapsed (0 would mean never).
        return boot_now.max(1);
    }
    let left = u64::try_from(left.whole_nanoseconds()).unwrap_or(u64::MAX);
    boot_now.saturating_add(left)
}

/// Of two grants for the same kernel key (same request, same scope), the
/// one that lasts longer (expiry 0 = never).
fn broader(a: Grant, b: Grant) -> Grant {
    let later = |x: u64, y: u64| x == 0 || (y != 0 && x >= y);
    if later(a.expires_ns, b.expires_ns) {
        a
    } else {
        b
    }
}

/// Whether two entries differ beyond clock jitter in their expiry.
fn differs(a: Grant, b: Grant) -> bool {
    a.cgroup_id != b.cgroup_id
        || (a.expires_ns == 0) != (b.expires_ns == 0)
        || a.expires_ns.abs_diff(b.expires_ns) > 1_000_000_000
}

/// Called with a session's cgroup path when it ends.
pub type SessionEnded = Arc<dyn Fn(&str) + Send + Sync>;

/// The grants of this host and their kernel entries.
pub struct Grants<K: GrantKernel, A: AuditSink> {
    kernel: Arc<K>,
    audit: Arc<A>,
    host: String,
    file: Option<PathBuf>,
    cgroup_root: PathBuf,
    table: BTreeMap<Uuid, LocalGrant>,
    /// What the kernel's `GRANTS` map holds.
    installed: HashMap<GrantKey, Grant>,
    /// Policy name -> kernel id, of the loaded policy set.
    policy_ids: HashMap<String, u32>,
    /// Grants the service listed whose digest this agent has not seen.
    unplaced: HashMap<Uuid, model::Grant>,
    on_session_end: Option<SessionEnded>,
}

/// Where [`Grants`] keeps things.
pub struct GrantsConfig {
    pub host: String,
    /// `grants.json`; `None` keeps them in memory only.
    pub file: Option<PathBuf>,
    /// The cgroup v2 mount, to see sessions end.
    pub cgroup_root: PathBuf,
    /// The programs were loaded now, with a new digest key: stored digests
    /// are void.
    pub fresh_digests: bool,
}

impl<K: GrantKernel, A: AuditSink> Grants<K, A> {
    /// Loads the stored grants and what the kernel holds; call
    /// [`set_policies`](Self::set_policies) next to install them.
    pub async fn load(
        kernel: Arc<K>,
        audit: Arc<A>,
        config: GrantsConfig,
        on_session_end: Option<SessionEnded>,
    ) -> Self {
        // Fail closed: stored grants that cannot be read are not applied (the
        // kernel entries they made are removed at the next `apply`), so their
        // requests are asked again; the error names the file, cause and fix.
        let stored = match config.file.as_deref().map(try_read_file) {
            None => Vec::new(),
            Some(Ok(stored)) => stored,
            Some(Err(err)) => {
                if let GrantsFileError::Corrupt { path, aside, .. } = &err
                    && let Err(rename) = std::fs::rename(path, aside)
                {
                    tracing::error!(
                        path = %path.display(),
                        error = %rename,
                        "cannot move the corrupt grants file aside; storing grants will replace it"
                    );
                }
                tracing::error!(error = %err, "stored grants not applied");
                Vec::new()
            }
        };
        let installed = match kernel.grants().await {
            Ok(entries) => entries.into_iter().collect(),
            Err(err) => {
                tracing::error!(error = %err, "cannot read the kernel's grants");
                HashMap::new()
            }
        };
        let mut grants = Self {
            kernel,
            audit,
            host: config.host,
            file: config.file,
            cgroup_root: config.cgroup_root,
            table: BTreeMap::new(),
            installed,
            policy_ids: HashMap::new(),
            unplaced: HashMap::new(),
            on_session_end,
        };
        if config.fresh_digests && !stored.is_empty() {
            tracing::warn!(
                grants = stored.len(),
                "the programs were loaded afresh (new digest key): stored grants are set aside until the service decides their requests again"
            );
            grants.persist();
        } else {
            grants.table = stored.into_iter().map(|g| (g.id, g)).collect();
        }
        grants
    }

    /// Grants in force, by id.
    #[must_use]
    pub fn list(&self) -> Vec<LocalGrant> {
        self.table.values().cloned().collect()
    }

    /// The loaded policies changed (ids are new after a reload): re-key.
    pub async fn set_policies(&mut self, compiled: &Compiled) {
        self.policy_ids = compiled
            .policies
            .values()
            .map(|p| (p.policy.name.clone(), p.id))
            .collect();
        self.apply().await;
    }

    /// A decision made `grant` for the request `target`.
    pub async fn install(&mut self, grant: &model::Grant, target: &GrantTarget) {
        self.unplaced.remove(&grant.id);
        let now = OffsetDateTime::now_utc();
        if !grant.is_active(now) {
            tracing::info!(grant_id = %grant.id, "grant already ended; not installed");
            return;
        }
        if grant.verdict != model::Verdict::Allow {
            // The kernel's grants only let requests through; a standing
            // denial is the policy's business.
            tracing::info!(grant_id = %grant.id, "standing denial not installed in the kernel");
            return;
        }
        let session = grant.duration == GrantDuration::Session;
        // A session ends with its cgroup, so it only ever covers that cgroup.
        let scope = if session {
            GrantScope::Workload
        } else {
            grant.scope
        };
        let workload = scope == GrantScope::Workload;
        let local = LocalGrant {
            id: grant.id,
            policy: grant.policy.clone(),
            kind: if target.kind == request_kind::CONNECT {
                "connect"
            } else {
                "exec"
            }
            .to_owned(),
            digest: format!("{:016x}", target.digest),
            scope,
            cgroup_id: if workload { target.cgroup_id } else { 0 },
            cgroup: workload.then(|| {
                grant
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| target.cgroup.clone())
            }),
            duration: grant.duration.to_string(),
            expires_at: grant.expires_at,
            created_by: grant.created_by.clone(),
            request_id: grant.request_id,
            target: grant.target.to_string(),
        };
        tracing::info!(
            grant_id = %local.id,
            policy = local.policy,
            duration = local.duration,
            scope = %local.scope,
            cgroup = local.cgroup.as_deref().unwrap_or(""),
            target = local.target,
            "grant installed"
        );
        self.audit.record(
            AuditRecord::new(
                RecordKind::GrantInstalled,
                self.host.clone(),
                grant_payload(&local, None, None),
            )
            .with_request_id(grant.request_id.to_string())
            .with_actor(grant.created_by.clone()),
        );
        self.table.insert(local.id, local);
        self.apply().await;
        self.persist();
    }

    /// A request was decided by standing grant `grant_id` (the service
    /// matched it): if the grant was listed but not installed, this request
    /// shows its digest, so install it now.
    pub async fn adopt(&mut self, grant_id: Uuid, target: &GrantTarget) {
        if self.table.contains_key(&grant_id) {
            return;
        }
        if let Some(grant) = self.unplaced.remove(&grant_id) {
            self.install(&grant, target).await;
        }
    }

    /// The service's list of grants in force for this host, on (re)connect:
    /// exactly these stay.
    pub async fn sync(&mut self, listed: Vec<model::Grant>) {
        let now = OffsetDateTime::now_utc();
        let listed: HashMap<Uuid, model::Grant> = listed
            .into_iter()
            .filter(|g| g.is_active(now))
            .map(|g| (g.id, g))
            .collect();
        let gone: Vec<Uuid> = self
            .table
            .keys()
            .filter(|id| !listed.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.forget(
                id,
                "service",
                "not among the service's grants in force (revoked or ended meanwhile)",
            );
        }
        self.unplaced.clear();
        for (id, grant) in listed {
            match self.table.get_mut(&id) {
                Some(local) => local.expires_at = grant.expires_at,
                None => {
                    self.unplaced.insert(id, grant);
                }
            }
        }
        self.apply().await;
        self.persist();
    }

    /// The service revoked (or ended) a grant.
    pub async fn revoke(&mut self, id: Uuid, by: &str, reason: &str) {
        self.unplaced.remove(&id);
        if self.forget(id, by, reason) {
            self.apply().await;
            self.persist();
        }
    }

    /// Removes expired grants and those whose session cgroup is gone (and
    /// tells the service about the session); run every few seconds.
    pub async fn tick(&mut self) {
        self.tick_at(OffsetDateTime::now_utc()).await;
    }

    /// [`Self::tick`] as of `now`: tests pass the instants they mean instead of
    /// sleeping past them (a slow disk's fsyncs must not decide an expiry test).
    async fn tick_at(&mut self, now: OffsetDateTime) {
        let mut changed = false;
        let expired: Vec<Uuid> = self
            .table
            .values()
            .filter(|g| g.expired(now))
            .map(|g| g.id)
            .collect();
        for id in expired {
            changed |= self.forget(id, "expiry", "the granted duration ran out");
        }
        let mut ended: Vec<(Uuid, String)> = Vec::new();
        for grant in self.table.values().filter(|g| g.is_session()) {
            if let Some(cgroup) = &grant.cgroup
                && !self.cgroup_alive(cgroup, grant.cgroup_id)
            {
                ended.push((grant.id, cgroup.clone()));
            }
        }
        let mut told = Vec::new();
        for (id, cgroup) in ended {
            changed |= self.forget(id, "session-end", "the workload's cgroup went away");
            if !told.contains(&cgroup) {
                if let Some(notify) = &self.on_session_end {
                    notify(&cgroup);
                }
                told.push(cgroup);
            }
        }
        if changed {
            self.persist();
        }
        // Always: a workload's cgroup may have been made again (a new id).
        self.apply().await;
    }

    /// Whether the cgroup at `path` (relative to the root) is still the one
    /// with id `cgroup_id` (its directory's inode).
    fn cgroup_alive(&self, path: &str, cgroup_id: u64) -> bool {
        self.cgroup_id_of(path)
            .is_some_and(|id| cgroup_id == 0 || id == cgroup_id)
    }

    /// The id (directory inode) of the cgroup at `path` (relative to the
    /// root), if one exists there now.
    fn cgroup_id_of(&self, path: &str) -> Option<u64> {
        let dir = self.cgroup_root.join(path.trim_start_matches('/'));
        std::fs::metadata(dir).ok().map(|meta| meta.ino())
    }

    /// The cgroup id a grant's kernel entry is keyed by: 0 for the whole
    /// policy; a session's own cgroup; for other workload grants, the
    /// cgroup at its path now. `None`: no cgroup to cover (none exists at
    /// its path, or the session's is gone), so no kernel entry.
    fn kernel_cgroup(&self, grant: &LocalGrant) -> Option<u64> {
        if !grant.is_workload() {
            return Some(0);
        }
        let path = grant.cgroup.as_deref()?;
        let now = self.cgroup_id_of(path)?;
        if grant.is_session() && grant.cgroup_id != 0 && now != grant.cgroup_id {
            return None;
        }
        Some(now)
    }

    /// Drops a grant from the table (recording why); true if it was there.
    fn forget(&mut self, id: Uuid, by: &str, reason: &str) -> bool {
        let Some(grant) = self.table.remove(&id) else {
            return false;
        };
        tracing::info!(grant_id = %id, by, reason, "grant removed");
        self.audit.record(
            AuditRecord::new(
                RecordKind::GrantRevoked,
                self.host.clone(),
                grant_payload(&grant, Some(by), Some(reason)),
            )
            .with_request_id(grant.request_id.to_string())
            .with_actor(by.to_owned()),
        );
        true
    }

    /// Makes the kernel's `GRANTS` map hold exactly what the grants and the
    /// loaded policies say.
    pub async fn apply(&mut self) {
        let now = OffsetDateTime::now_utc();
        let boot_now = boot_time_ns();
        let mut desired: HashMap<GrantKey, Grant> = HashMap::new();
        for grant in self.table.values() {
            let (Some(&policy_id), Some(digest)) =
                (self.policy_ids.get(&grant.policy), grant.digest_raw())
            else {
                continue;
            };
            if grant.expired(now) {
                continue;
            }
            let Some(cgroup_id) = self.kernel_cgroup(grant) else {
                continue;
            };
            let key = GrantKey {
                policy_id,
                kind: grant.kind_raw(),
                digest,
                cgroup_id,
            };
            let value = Grant {
                expires_ns: boot_ns_at(grant.expires_at, now, boot_now),
                cgroup_id,
            };
            desired
                .entry(key)
                .and_modify(|current| *current = broader(*current, value))
                .or_insert(value);
        }
        for (key, value) in &desired {
            let current = self.installed.get(key).copied();
            if current.is_none_or(|current| differs(current, *value)) {
                match self.kernel.set_grant(*key, *value).await {
                    Ok(()) => {
                        self.installed.insert(*key, *value);
                    }
                    Err(err) => tracing::error!(error = %err, "cannot install a grant"),
                }
            }
        }
        let stale: Vec<GrantKey> = self
            .installed
            .keys()
            .filter(|key| !desired.contains_key(key))
            .copied()
            .collect();
        for key in stale {
            match self.kernel.remove_grant(key).await {
                Ok(()) => {
                    self.installed.remove(&key);
                }
                Err(err) => tracing::error!(error = %err, "cannot remove a grant"),
            }
        }
    }

    /// Writes `grants.json` (atomically, mode 0600).
    fn persist(&self) {
        let Some(path) = &self.file else { return };
        let file = GrantsFile {
            grants: self.table.values().cloned().collect(),
        };
        let result = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|json| write_atomic(path, &json, PRIVATE, Existing::Replace));
        if let Err(err) = result {
            tracing::error!(path = %path.display(), error = %err, "cannot store the grants");
        }
    }
}

enum Command {
    Install(Box<model::Grant>, GrantTarget, oneshot::Sender<()>),
    Adopt(Uuid, GrantTarget, oneshot::Sender<()>),
    Sync(Vec<model::Grant>, oneshot::Sender<()>),
    Revoke {
        id: Uuid,
        by: String,
        reason: String,
    },
}

/// Talks to the task that owns the [`Grants`].
#[derive(Clone)]
pub struct GrantsHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl GrantsHandle {
    /// Installs `grant` (made by a decision on `target`); returns once the
    /// kernel holds it.
    pub async fn install(&self, grant: model::Grant, target: GrantTarget) {
        let (done, wait) = oneshot::channel();
        if self
            .commands
            .send(Command::Install(Box::new(grant), target, done))
            .is_ok()
        {
            let _ = wait.await;
        }
    }

    pub async fn adopt(&self, grant_id: Uuid, target: GrantTarget) {
        let (done, wait) = oneshot::channel();
        if self
            .commands
            .send(Command::Adopt(grant_id, target, done))
            .is_ok()
        {
            let _ = wait.await;
        }
    }

    pub async fn sync(&self, listed: Vec<model::Grant>) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Sync(listed, done)).is_ok() {
            let _ = wait.await;
        }
    }

    pub fn revoke(&self, id: Uuid, by: String, reason: String) {
        let _ = self.commands.send(Command::Revoke { id, by, reason });
    }
}

/// Runs `grants`: commands, policy changes, and a [`Grants::tick`] every
/// `every`, until `shutdown` (or every handle is dropped).
#[must_use]
pub fn spawn<K: GrantKernel, A: AuditSink>(
    mut grants: Grants<K, A>,
    mut policies: watch::Receiver<Arc<Compiled>>,
    mut shutdown: watch::Receiver<bool>,
    every: Duration,
) -> (GrantsHandle, tokio::task::JoinHandle<()>) {
    let (commands, mut receiver) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let compiled = Arc::clone(&policies.borrow_and_update());
        grants.set_policies(&compiled).await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                command = receiver.recv() => match command {
                    Some(Command::Install(grant, target, done)) => {
                        grants.install(&grant, &target).await;
                        let _ = done.send(());
                    }
                    Some(Command::Adopt(id, target, done)) => {
                        grants.adopt(id, &target).await;
                        let _ = done.send(());
                    }
                    Some(Command::Sync(listed, done)) => {
                        grants.sync(listed).await;
                        let _ = done.send(());
                    }
                    Some(Command::Revoke { id, by, reason }) => {
                        grants.revoke(id, &by, &reason).await;
                    }
                    None => break,
                },
                changed = policies.changed() => {
                    if changed.is_ok() {
                        let compiled = Arc::clone(&policies.borrow_and_update());
                        grants.set_policies(&compiled).await;
                    }
                }
                _ = tick.tick() => grants.tick().await,
            }
        }
    });
    (GrantsHandle { commands }, task)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use gatekeep_proto::model::{ExecTarget, Target};

    use super::*;
    use crate::{
        audit::MemorySink,
        bpf::testing::{FakeGrants, compiled_policies},
    };

    fn compiled(names: &[&str], ids: &[u32]) -> Compiled {
        compiled_policies(names, ids)
    }

    /// A policy-wide grant (a `session` grant is always its workload's).
    fn grant(duration: GrantDuration, expires_in: Option<time::Duration>) -> model::Grant {
        let session = duration == GrantDuration::Session;
        scoped_grant(
            duration,
            expires_in,
            if session {
                GrantScope::Workload
            } else {
                GrantScope::Policy
            },
        )
    }

    fn scoped_grant(
        duration: GrantDuration,
        expires_in: Option<time::Duration>,
        scope: GrantScope,
    ) -> model::Grant {
        let now = OffsetDateTime::now_utc();
        model::Grant {
            id: Uuid::new_v4(),
            host: "h".into(),
            policy: "agents".into(),
            target: Target::Exec(ExecTarget {
                executable: "/usr/bin/git".into(),
                argv: vec!["git".into(), "push".into()],
                content: None,
                path_check: None,
                named: None,
                file: None,
                mount_namespace: None,
                argv_truncated: false,
                env: Vec::new(),
            }),
            verdict: model::Verdict::Allow,
            duration,
            scope,
            cgroup: (scope == GrantScope::Workload).then(|| "/agents/a1".to_owned()),
            expires_at: expires_in.map(|d| now + d),
            created_by: "alice".into(),
            created_at: now,
            request_id: Uuid::new_v4(),
            revoked: None,
        }
    }

    fn target(digest: u64, cgroup_id: u64) -> GrantTarget {
        GrantTarget {
            policy: "agents".into(),
            kind: request_kind::EXEC,
            digest,
            cgroup_id,
            cgroup: "/agents/a1".into(),
        }
    }

    struct Rig {
        kernel: Arc<FakeGrants>,
        audit: Arc<MemorySink>,
        dir: tempfile::TempDir,
        ended: Arc<Mutex<Vec<String>>>,
    }

    impl Rig {
        fn new() -> Self {
            Self {
                kernel: Arc::new(FakeGrants::default()),
                audit: Arc::new(MemorySink::default()),
                dir: tempfile::tempdir().expect("tempdir"),
                ended: Arc::default(),
            }
        }

        fn file(&self) -> PathBuf {
            self.dir.path().join("state/grants.json")
        }

        /// Makes the workload cgroup `/agents/a1` (a directory) and
        /// returns its id.
        fn make_cgroup(&self) -> u64 {
            let dir = self.dir.path().join("cgroup/agents/a1");
            std::fs::create_dir_all(&dir).expect("cgroup dir");
            std::fs::metadata(&dir).expect("stat").ino()
        }

        fn remove_cgroup(&self) {
            std::fs::remove_dir(self.dir.path().join("cgroup/agents/a1")).expect("rmdir");
        }

        async fn grants(&self, fresh: bool) -> Grants<FakeGrants, MemorySink> {
            let ended = Arc::clone(&self.ended);
            let notify: SessionEnded = Arc::new(move |cgroup: &str| {
                ended.lock().expect("lock").push(cgroup.to_owned());
            });
            Grants::load(
                Arc::clone(&self.kernel),
                Arc::clone(&self.audit),
                GrantsConfig {
                    host: "h".into(),
                    file: Some(self.file()),
                    cgroup_root: self.dir.path().join("cgroup"),
                    fresh_digests: fresh,
                },
                Some(notify),
            )
            .await
        }
    }

    #[tokio::test]
    async fn a_grant_is_keyed_by_the_policys_current_id_and_rekeyed_on_reload() {
        let rig = Rig::new();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[3])).await;
        grants
            .install(
                &grant(
                    GrantDuration::For(Duration::from_hours(1)),
                    Some(time::Duration::HOUR),
                ),
                &target(0xabc, 77),
            )
            .await;
        let map = rig.kernel.now();
        let key = GrantKey {
            policy_id: 3,
            kind: request_kind::EXEC,
            digest: 0xabc,
            cgroup_id: 0,
        };
        let entry = map.get(&key).expect("installed under policy id 3");
        assert_eq!(
            entry.cgroup_id, 0,
            "a timed grant covers every cgroup of the policy"
        );
        let hour = 3_600_000_000_000;
        let left = entry.expires_ns.saturating_sub(boot_time_ns());
        assert!(
            left > hour - 60_000_000_000 && left <= hour,
            "expires in about an hour: {left}"
        );

        // A reload gives the policy id 5: the entry moves.
        grants
            .set_policies(&compiled(&["other", "agents"], &[4, 5]))
            .await;
        let map = rig.kernel.now();
        assert_eq!(map.len(), 1);
        assert!(map.contains_key(&GrantKey {
            policy_id: 5,
            ..key
        }));
        // Policy gone: nothing in the kernel, but the grant is kept.
        grants.set_policies(&compiled(&["other"], &[6])).await;
        assert!(rig.kernel.now().is_empty());
        assert_eq!(grants.list().len(), 1);
        let kinds: Vec<_> = rig.audit.records().iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::GrantInstalled]);
    }

    #[tokio::test]
    async fn grants_survive_a_restart_but_not_a_new_digest_key() {
        let rig = Rig::new();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        grants
            .install(&grant(GrantDuration::Always, None), &target(9, 0))
            .await;
        drop(grants);
        assert_eq!(read_file(&rig.file()).len(), 1, "stored");

        let mut again = rig.grants(false).await;
        again.set_policies(&compiled(&["agents"], &[2])).await;
        assert_eq!(again.list().len(), 1);
        let map = rig.kernel.now();
        assert_eq!(map.len(), 1, "the stale id-1 entry was replaced: {map:?}");
        assert!(map.keys().all(|k| k.policy_id == 2 && k.digest == 9));

        rig.kernel.clear();
        let fresh = rig.grants(true).await;
        assert!(fresh.list().is_empty(), "digests of the old key are void");
        assert!(read_file(&rig.file()).is_empty());
    }

    /// Fault injection (issue 24): a torn or corrupt `grants.json` at start.
    /// Expected: an error naming the file, the cause and the fix; the file kept
    /// aside; none of its grants applied, and the kernel entry a grant of it made
    /// removed (fail closed: the request is asked again).
    #[tokio::test]
    async fn a_corrupt_grants_file_is_named_kept_aside_and_its_grants_fail_closed() {
        let rig = Rig::new();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        grants
            .install(&grant(GrantDuration::Always, None), &target(9, 0))
            .await;
        assert_eq!(rig.kernel.now().len(), 1);
        drop(grants);
        let good = std::fs::read(rig.file()).expect("stored");
        let torn = &good[..good.len() / 2];
        std::fs::write(rig.file(), torn).expect("tear the file");

        let text = try_read_file(&rig.file())
            .expect_err("a torn file is an error")
            .to_string();
        for part in [
            &rig.file().display().to_string(),
            "is corrupt: EOF while parsing",
            "moved aside to",
            "grants.json.corrupt",
            "restore a good copy",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }

        let mut again = rig.grants(false).await;
        again.set_policies(&compiled(&["agents"], &[2])).await;
        assert!(again.list().is_empty(), "nothing of the torn file applies");
        assert!(
            rig.kernel.now().is_empty(),
            "the torn file's grant no longer lets its request through: {:?}",
            rig.kernel.now()
        );
        assert_eq!(
            std::fs::read(corrupt_aside(&rig.file())).expect("kept aside"),
            torn
        );
        assert!(!rig.file().exists(), "moved, not copied");
    }

    /// An unreadable `grants.json` (here a directory in its place): the error
    /// names the file, the cause and the fix, and the agent starts without it.
    #[tokio::test]
    async fn an_unreadable_grants_file_is_named_with_its_cause_and_fix() {
        let rig = Rig::new();
        std::fs::create_dir_all(rig.file()).expect("a directory in its place");
        let text = try_read_file(&rig.file())
            .expect_err("unreadable")
            .to_string();
        for part in [
            &format!("cannot read the grants file `{}`", rig.file().display()),
            "Is a directory",
            "fix its owner and mode, or remove it",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        let grants = rig.grants(false).await;
        assert!(grants.list().is_empty());
        // A missing file is no error: a fresh host has none.
        assert!(try_read_file(&rig.dir.path().join("absent.json")).is_ok_and(|g| g.is_empty()));
    }

    #[tokio::test]
    async fn sync_keeps_exactly_the_listed_grants_and_adopt_places_unknown_ones() {
        let rig = Rig::new();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        let kept = grant(GrantDuration::Always, None);
        let dropped = grant(GrantDuration::Always, None);
        grants.install(&kept, &target(1, 0)).await;
        grants.install(&dropped, &target(2, 0)).await;
        assert_eq!(rig.kernel.now().len(), 2);
        let unknown = grant(GrantDuration::Always, None);
        grants.sync(vec![kept.clone(), unknown.clone()]).await;
        let ids: Vec<Uuid> = grants.list().iter().map(|g| g.id).collect();
        assert_eq!(ids, [kept.id]);
        assert_eq!(rig.kernel.now().len(), 1);
        // A request decided by the unknown grant shows its digest.
        grants.adopt(unknown.id, &target(3, 0)).await;
        assert_eq!(grants.list().len(), 2);
        assert!(rig.kernel.now().keys().any(|k| k.digest == 3));
        // Revoked: gone from the kernel.
        grants.revoke(unknown.id, "bob", "too broad").await;
        assert!(!rig.kernel.now().keys().any(|k| k.digest == 3));
        let revoked = rig
            .audit
            .records()
            .into_iter()
            .filter(|r| r.kind == RecordKind::GrantRevoked)
            .count();
        assert_eq!(revoked, 2, "the unlisted grant and the revoked one");
    }

    #[tokio::test]
    async fn expired_grants_and_ended_sessions_are_removed_by_the_tick() {
        let rig = Rig::new();
        let cgroup_dir = rig.dir.path().join("cgroup/agents/a1");
        std::fs::create_dir_all(&cgroup_dir).expect("cgroup dir");
        let cgroup_id = std::fs::metadata(&cgroup_dir).expect("stat").ino();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        let short = grant(
            GrantDuration::For(Duration::from_secs(1)),
            Some(time::Duration::milliseconds(200)),
        );
        grants.install(&short, &target(1, 0)).await;
        let session = grant(GrantDuration::Session, None);
        grants.install(&session, &target(2, cgroup_id)).await;
        let entry = rig
            .kernel
            .now()
            .into_iter()
            .find(|(k, _)| k.digest == 2)
            .expect("session grant installed")
            .1;
        assert_eq!(entry.cgroup_id, cgroup_id, "bound to the asking cgroup");
        assert_eq!(entry.expires_ns, 0);

        let created = short.created_at;
        grants
            .tick_at(created + time::Duration::milliseconds(100))
            .await;
        assert_eq!(grants.list().len(), 2, "nothing ended yet");
        grants
            .tick_at(created + time::Duration::milliseconds(300))
            .await;
        assert_eq!(grants.list().len(), 1, "the timed grant ran out");
        std::fs::remove_dir(&cgroup_dir).expect("rmdir");
        grants.tick().await;
        assert!(grants.list().is_empty());
        assert!(rig.kernel.now().is_empty());
        assert_eq!(*rig.ended.lock().expect("lock"), ["/agents/a1"]);
    }

    #[tokio::test]
    async fn denials_and_ended_grants_are_not_installed() {
        let rig = Rig::new();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        let mut denial = grant(GrantDuration::Always, None);
        denial.verdict = model::Verdict::Deny;
        grants.install(&denial, &target(1, 0)).await;
        let mut ended = grant(GrantDuration::Always, None);
        ended.expires_at = Some(OffsetDateTime::now_utc() - time::Duration::SECOND);
        grants.install(&ended, &target(2, 0)).await;
        assert!(grants.list().is_empty());
        assert!(rig.kernel.now().is_empty());
    }

    #[tokio::test]
    async fn a_workload_grant_is_keyed_by_the_asking_cgroup_only() {
        let rig = Rig::new();
        let cgroup_id = rig.make_cgroup();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[3])).await;
        let hour = scoped_grant(
            GrantDuration::For(Duration::from_hours(1)),
            Some(time::Duration::HOUR),
            GrantScope::Workload,
        );
        grants.install(&hour, &target(0xabc, cgroup_id)).await;
        let map = rig.kernel.now();
        assert_eq!(map.len(), 1, "{map:?}");
        let (key, value) = map.into_iter().next().expect("one entry");
        assert_eq!(
            key,
            GrantKey {
                policy_id: 3,
                kind: request_kind::EXEC,
                digest: 0xabc,
                cgroup_id,
            },
            "keyed by the asking cgroup, never policy-wide (0)"
        );
        assert_eq!(value.cgroup_id, cgroup_id);
        let listed = grants.list();
        assert_eq!(listed[0].scope, GrantScope::Workload);
        assert_eq!(listed[0].cgroup.as_deref(), Some("/agents/a1"));
        let record = &rig.audit.records()[0];
        assert_eq!(record.payload["grant"]["scope"], "workload", "{record:?}");
        assert_eq!(record.payload["grant"]["cgroup"], "/agents/a1");

        // The same request granted for the whole policy: a second entry, keyed 0.
        let everywhere = scoped_grant(GrantDuration::Always, None, GrantScope::Policy);
        grants.install(&everywhere, &target(0xabc, cgroup_id)).await;
        let mut cgroups: Vec<u64> = rig.kernel.now().keys().map(|k| k.cgroup_id).collect();
        cgroups.sort_unstable();
        assert_eq!(cgroups, [0, cgroup_id]);
        assert_eq!(
            rig.audit.records()[1].payload["grant"]["scope"],
            "policy",
            "the record shows the scope"
        );
    }

    #[tokio::test]
    async fn a_workload_grant_follows_its_cgroup_path_not_a_stale_id() {
        let rig = Rig::new();
        let first_id = rig.make_cgroup();
        let mut grants = rig.grants(false).await;
        grants.set_policies(&compiled(&["agents"], &[1])).await;
        let always = scoped_grant(GrantDuration::Always, None, GrantScope::Workload);
        grants.install(&always, &target(5, first_id)).await;
        assert!(rig.kernel.now().keys().all(|k| k.cgroup_id == first_id));

        // The workload's cgroup goes away: nothing left to cover, but the
        // grant (not a session) stays, and no session end is reported.
        rig.remove_cgroup();
        grants.tick().await;
        assert!(rig.kernel.now().is_empty(), "{:?}", rig.kernel.now());
        assert_eq!(grants.list().len(), 1);
        assert!(rig.ended.lock().expect("lock").is_empty());

        // Made again at the same path (whatever its new id): covered again,
        // by the id the path has now.
        let second_id = rig.make_cgroup();
        grants.tick().await;
        let keys: Vec<u64> = rig.kernel.now().keys().map(|k| k.cgroup_id).collect();
        assert_eq!(keys, [second_id]);
        drop(grants);

        // An agent restart keeps the scope and the path, and resolves it again.
        rig.kernel.clear();
        let stored = read_file(&rig.file());
        assert_eq!(stored[0].scope, GrantScope::Workload);
        assert_eq!(stored[0].cgroup.as_deref(), Some("/agents/a1"));
        let mut again = rig.grants(false).await;
        again.set_policies(&compiled(&["agents"], &[2])).await;
        let keys: Vec<(u32, u64)> = rig
            .kernel
            .now()
            .keys()
            .map(|k| (k.policy_id, k.cgroup_id))
            .collect();
        assert_eq!(keys, [(2, second_id)]);
    }

    #[test]
    fn grants_files_from_before_scopes_keep_their_meaning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grants.json");
        let entry = |cgroup_id: u64, cgroup: &str, duration: &str| {
            serde_json::json!({
                "id": Uuid::new_v4(), "policy": "agents", "kind": "exec",
                "digest": "00000000000000aa", "cgroup_id": cgroup_id,
                "cgroup": (!cgroup.is_empty()).then_some(cgroup),
                "duration": duration, "expires_at": null, "created_by": "alice",
                "request_id": Uuid::new_v4(), "target": "git push",
            })
        };
        let file = serde_json::json!({ "grants": [
            entry(0, "", "always"),
            entry(7, "/agents/a1", "session"),
        ]});
        std::fs::write(&path, file.to_string()).expect("write");
        let read = read_file(&path);
        assert_eq!(read.len(), 2);
        assert!(!read[0].is_workload(), "a timed grant was policy-wide");
        assert!(read[1].is_workload(), "a session grant was its cgroup's");
        assert!(read[1].is_session());
    }

    #[test]
    fn the_longer_of_two_entries_wins() {
        let hour = Grant {
            expires_ns: 100,
            cgroup_id: 7,
        };
        let day = Grant {
            expires_ns: 2400,
            cgroup_id: 7,
        };
        let forever = Grant {
            expires_ns: 0,
            cgroup_id: 7,
        };
        assert_eq!(broader(hour, day), day);
        assert_eq!(broader(day, hour), day);
        assert_eq!(broader(hour, forever), forever);
        assert_eq!(broader(forever, hour), forever);
    }
}
