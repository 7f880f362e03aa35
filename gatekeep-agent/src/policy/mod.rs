//! Compiling a [`PolicySet`] into the kernel's map entries, and applying the
//! result with as little exposure as a set of hash maps allows.
//!
//! # Compiling
//!
//! - Every policy gets an id (an index into `POLICIES`). A *new* policy set
//!   gets ids that are not in use in the kernel right now, so the old and
//!   the new set coexist while the new one is written; each gated cgroup
//!   then flips from its old id to its new one in one map update. A rescan
//!   of the same set (new cgroups, replaced binaries) keeps the ids.
//! - Each hook compiles its part of a policy (its defaults and its rule
//!   maps' entries): see [`crate::hooks`], e.g. [`crate::hooks::exec`] and
//!   [`crate::hooks::connect`].
//! - Gated cgroups: every existing cgroup directory a policy governs (the
//!   matched ones and all their descendants, nearest match deciding), keyed
//!   by cgroup id (the directory's inode). The agent's own cgroup is never
//!   gated.
//!
//! # Applying
//!
//! [`plan`] turns (what the kernel holds, what it should hold) into ordered
//! operations: new defaults and rules first, then the cgroups switch, then
//! stale cgroups, rules and defaults go. If writing fails before the cgroups
//! switch, [`apply`] restores the previous state, so a policy set that does
//! not fit never half-replaces a working one.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use gatekeep_common::{
    GATED_INHERITED, GATED_UNCLASSIFIED, GatedCgroup, MAX_POLICIES, PolicyDefaults,
};
use gatekeep_policy::{Policy, PolicySet};

pub mod error;

pub use error::PolicyMapsError;

use crate::hooks::{self, Compiling, Request, RuleKey};

/// What the policy maps hold (or should hold). Only non-zero `POLICIES`
/// slots are listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    pub gated: BTreeMap<u64, GatedCgroup>,
    pub policies: BTreeMap<u32, PolicyDefaults>,
    /// Policy id -> hash of its name (`POLICY_NAME_HASHES`), so a reload or a
    /// restarted agent finds the new id of a policy the kernel gated a cgroup
    /// under.
    pub names: BTreeMap<u32, u64>,
    /// gatekeep's files and folders, (dev, ino) -> `protected_inode` bits.
    pub protected: BTreeMap<(u64, u64), u32>,
    /// cgroup ids below which a policy pattern can match a cgroup to come
    /// (`CANDIDATE_PARENTS`).
    pub candidates: BTreeSet<u64>,
    /// Desired state only (never read back): unclassified cgroups the agent
    /// classified as governed by no policy, to ungate. An unclassified entry
    /// is never removed otherwise, so one the kernel adds while the agent
    /// compiles stays gated until the agent has looked at it.
    pub ungate: BTreeSet<u64>,
    /// Every hook's rule map entries, encoded by the hook
    /// ([`crate::hooks::Hook::read_map`]).
    pub rules: BTreeMap<RuleKey, Vec<u8>>,
}

impl MapState {
    /// Every policy id the state refers to.
    #[must_use]
    pub fn ids_in_use(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.policies.keys().copied().collect();
        ids.extend(self.names.keys().copied());
        ids.extend(
            self.gated
                .values()
                .map(|g| g.policy_id)
                .filter(|id| *id < MAX_POLICIES),
        );
        ids.extend(self.rules.keys().map(|key| key.policy_id));
        ids
    }

    /// The highest generation any policy slot carries.
    #[must_use]
    pub fn generation(&self) -> u32 {
        self.policies
            .values()
            .map(|p| p.generation)
            .max()
            .unwrap_or(0)
    }

    /// How many entries `map` holds.
    #[must_use]
    pub fn rule_count(&self, map: &str) -> usize {
        self.rules.keys().filter(|key| key.map == map).count()
    }
}

/// One write to the policy maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    SetPolicy(u32, PolicyDefaults),
    /// Writes one entry of a hook's rule map.
    SetRule(RuleKey, Vec<u8>),
    RemoveRule(RuleKey),
    SetGated(u64, GatedCgroup),
    RemoveGated(u64),
    /// `POLICY_NAME_HASHES[id] = hash` (0 clears it).
    SetPolicyName(u32, u64),
    SetProtected((u64, u64), u32),
    RemoveProtected((u64, u64)),
    SetCandidate(u64),
    RemoveCandidate(u64),
}

impl MapOp {
    /// Whether this op switches (or drops) a cgroup: the point after which
    /// the new policy is in force.
    fn touches_cgroups(&self) -> bool {
        matches!(self, MapOp::SetGated(..) | MapOp::RemoveGated(_))
    }
}

/// Reads and writes the policy maps (the kernel's, or a fake in tests).
pub trait PolicyMaps {
    fn read_state(&self) -> Result<MapState, PolicyMapsError>;
    fn write(&mut self, op: &MapOp) -> Result<(), PolicyMapsError>;
}

/// A policy as loaded into the kernel.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub id: u32,
    pub policy: Policy,
    /// What each hook's compilation left, to name the rule that decided.
    pub hooks: hooks::Loaded,
}

impl LoadedPolicy {
    /// The rule (or default) of this policy that decided `request`, as
    /// reviewers read it.
    #[must_use]
    pub fn rule_for(&self, request: &Request) -> String {
        request.rule(&self.policy, &self.hooks)
    }
}

/// The compiled form of a policy set.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub generation: u32,
    /// Policy id -> policy.
    pub policies: BTreeMap<u32, Arc<LoadedPolicy>>,
    /// What the maps must hold.
    pub state: MapState,
    /// cgroup id -> directory, for the startup summary and logs.
    pub cgroup_paths: BTreeMap<u64, PathBuf>,
    /// Problems that did not stop the load (missing executables...).
    pub warnings: Vec<String>,
}

impl Compiled {
    /// Policy id -> name, as logged.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.policies
            .values()
            .map(|p| p.policy.name.clone())
            .collect()
    }

    /// The ids in use, in policy-set order (to recompile with the same ids).
    #[must_use]
    pub fn ids(&self) -> Vec<u32> {
        self.policies.keys().copied().collect()
    }
}

/// Where compilation reads the host.
#[derive(Debug, Clone)]
pub struct HostView {
    /// cgroup2 mount point.
    pub cgroup_root: PathBuf,
    /// The agent's own cgroup directory, never gated.
    pub own_cgroup: Option<PathBuf>,
    /// gatekeep's files and folders, protected from gated tasks by identity.
    pub protected: Vec<crate::hooks::protect_files::ProtectedPath>,
}

impl HostView {
    /// `cgroup_root` and the cgroup of the current process (from
    /// `<proc_root>/self/cgroup`).
    #[must_use]
    pub fn current(cgroup_root: &Path, proc_root: &Path) -> Self {
        let own = fs::read_to_string(proc_root.join("self/cgroup"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .map(|rel| cgroup_root.join(rel.trim().trim_start_matches('/')))
            });
        Self {
            cgroup_root: cgroup_root.to_owned(),
            own_cgroup: own,
            protected: Vec::new(),
        }
    }
}

/// Picks `count` ids not in `in_use`, lowest first.
pub fn allocate_ids(count: usize, in_use: &BTreeSet<u32>) -> Result<Vec<u32>, PolicyMapsError> {
    let free: Vec<u32> = (0..MAX_POLICIES)
        .filter(|id| !in_use.contains(id))
        .collect();
    if count > free.len() {
        return Err(PolicyMapsError::TooManyPolicies {
            count,
            max: free.len(),
        });
    }
    Ok(free.into_iter().take(count).collect())
}

/// Compiles `set` with the given ids (one per policy, in order).
pub fn compile(
    set: &PolicySet,
    ids: &[u32],
    generation: u32,
    host: &HostView,
) -> Result<Compiled, PolicyMapsError> {
    debug_assert_eq!(set.policies.len(), ids.len());
    let mut compiled = Compiled {
        generation,
        ..Compiled::default()
    };
    compiled.state.protected = crate::hooks::protect_files::identities(&host.protected);
    for (policy, &id) in set.policies.iter().zip(ids) {
        compiled.state.names.insert(id, name_hash(&policy.name));
        let mut defaults = PolicyDefaults {
            generation,
            audit: u32::from(policy.mode == gatekeep_policy::Mode::Audit),
            ..PolicyDefaults::default()
        };
        let mut loaded = hooks::Loaded::default();
        hooks::compile(
            policy,
            &mut Compiling {
                id,
                defaults: &mut defaults,
                rules: &mut compiled.state.rules,
                warnings: &mut compiled.warnings,
            },
            &mut loaded,
        )?;
        compiled.state.policies.insert(id, defaults);
        compiled.policies.insert(
            id,
            Arc::new(LoadedPolicy {
                id,
                policy: policy.clone(),
                hooks: loaded,
            }),
        );
    }
    gate_cgroups(set, ids, host, &mut compiled);
    compiled.state.candidates = candidate_parents(set, host);
    Ok(compiled)
}

/// A stable, non-zero hash of a policy name (`POLICY_NAME_HASHES`).
#[must_use]
pub fn name_hash(name: &str) -> u64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut word = [0u8; 8];
    word.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(word).max(1)
}

/// Whether a pattern component is a plain name (no glob syntax).
fn is_literal(part: &str) -> bool {
    !part.contains(['*', '?', '[', ']', '{', '}'])
}

/// Every existing cgroup (by id) in which a cgroup made later could be
/// matched by some policy pattern: walking each pattern component by
/// component, the folders reached so far are candidates for the next
/// component (a literal one only while that name does not exist yet; `**`
/// makes the whole subtree candidates). The kernel gates a cgroup made in a
/// candidate as unclassified until the agent has classified it.
fn candidate_parents(set: &PolicySet, host: &HostView) -> BTreeSet<u64> {
    let mut candidates = BTreeSet::new();
    let id_of = |dir: &Path| fs::metadata(dir).ok().map(|m| m.ino());
    for policy in &set.policies {
        for pattern in &policy.cgroups {
            let mut frontier = vec![host.cgroup_root.clone()];
            for part in pattern.relative().split('/').filter(|p| !p.is_empty()) {
                let mut next = Vec::new();
                for dir in &frontier {
                    if part == "**" {
                        let mut stack = vec![dir.clone()];
                        while let Some(d) = stack.pop() {
                            candidates.extend(id_of(&d));
                            stack.extend(child_dirs(&d));
                        }
                        continue;
                    }
                    if is_literal(part) {
                        let child = dir.join(part);
                        if child.is_dir() {
                            next.push(child);
                        } else {
                            candidates.extend(id_of(dir));
                        }
                    } else {
                        candidates.extend(id_of(dir));
                        let relative_pattern = pattern.relative();
                        next.extend(child_dirs(dir).into_iter().filter(|child| {
                            child
                                .strip_prefix(&host.cgroup_root)
                                .is_ok_and(|rel| prefix_may_match(relative_pattern, rel))
                        }));
                    }
                }
                frontier = next;
            }
        }
    }
    candidates
}

/// Whether the cgroup `relative` (to the root) can be an ancestor-or-self of
/// a match of `pattern`: each of its components matches the pattern's
/// component at the same depth (glob within one component).
fn prefix_may_match(pattern: &str, relative: &Path) -> bool {
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    for (index, component) in relative.components().enumerate() {
        let Some(part) = parts.get(index) else {
            return false;
        };
        if *part == "**" {
            return true;
        }
        let name = component.as_os_str().to_string_lossy();
        let matches =
            globset::Glob::new(part).is_ok_and(|g| g.compile_matcher().is_match(name.as_ref()));
        if !matches {
            return false;
        }
    }
    true
}

fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .collect()
}

/// Carries the cgroups the kernel gated itself (`GATED_INHERITED`) into a
/// newly compiled set, which has new policy ids: each goes to the new id of
/// the policy with the same name (`POLICY_NAME_HASHES`), so inherited gating
/// survives reloads and agent restarts. One whose policy is gone from the
/// set is ungated with it. Unclassified entries are left to
/// [`classify_unclassified`].
pub fn carry_inherited(current: &MapState, desired: &mut MapState) {
    let new_ids: BTreeMap<u64, u32> = desired.names.iter().map(|(id, h)| (*h, *id)).collect();
    for (cgroup, gated) in &current.gated {
        if gated.flags & GATED_INHERITED == 0
            || gated.flags & GATED_UNCLASSIFIED != 0
            || desired.gated.contains_key(cgroup)
        {
            continue;
        }
        let Some(new_id) = current
            .names
            .get(&gated.policy_id)
            .and_then(|hash| new_ids.get(hash))
        else {
            continue;
        };
        desired.gated.insert(
            *cgroup,
            GatedCgroup {
                policy_id: *new_id,
                flags: GATED_INHERITED,
            },
        );
    }
}

/// Classifies the unclassified cgroups of `current` (those the kernel gated
/// as `GATED_UNCLASSIFIED` when they were made in a candidate parent) by
/// their path: governed by a policy -> gated under it in `desired` (the
/// compile already did so for every cgroup below a match); governed by none
/// -> listed in `desired.ungate`. One whose folder is not found (gone, or
/// made after the walk) stays as it is until the next pass.
pub fn classify_unclassified(
    current: &MapState,
    desired: &mut MapState,
    set: &PolicySet,
    ids: &[u32],
    host: &HostView,
) {
    let pending: BTreeSet<u64> = current
        .gated
        .iter()
        .filter(|(id, g)| g.flags & GATED_UNCLASSIFIED != 0 && !desired.gated.contains_key(id))
        .map(|(id, _)| *id)
        .collect();
    if pending.is_empty() {
        return;
    }
    let mut stack = vec![host.cgroup_root.clone()];
    while let Some(dir) = stack.pop() {
        stack.extend(child_dirs(&dir));
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if !pending.contains(&meta.ino()) {
            continue;
        }
        let policy = dir
            .strip_prefix(&host.cgroup_root)
            .ok()
            .and_then(|relative| set.policy_for_cgroup(relative))
            .filter(|_| host.own_cgroup.as_deref() != Some(dir.as_path()));
        match policy {
            Some(index) => {
                desired.gated.insert(
                    meta.ino(),
                    GatedCgroup {
                        policy_id: ids[index],
                        flags: 0,
                    },
                );
            }
            None => {
                desired.ungate.insert(meta.ino());
            }
        }
    }
}

/// Fills `gated` with every cgroup directory the set governs.
fn gate_cgroups(set: &PolicySet, ids: &[u32], host: &HostView, compiled: &mut Compiled) {
    let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
    for (_, dir) in set.expand_cgroups(&host.cgroup_root) {
        roots.insert(dir);
    }
    let mut seen = BTreeSet::new();
    for root in roots {
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            if !seen.insert(dir.clone()) {
                continue;
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
            let Ok(relative) = dir.strip_prefix(&host.cgroup_root) else {
                continue;
            };
            let Some(index) = set.policy_for_cgroup(relative) else {
                continue;
            };
            if host.own_cgroup.as_deref() == Some(dir.as_path()) {
                compiled.warnings.push(format!(
                    "cgroup {} holds the agent itself and is not gated (policy `{}`)",
                    dir.display(),
                    set.policies[index].name
                ));
                continue;
            }
            // The directory may vanish while we walk: skip it then.
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            compiled.state.gated.insert(
                meta.ino(),
                GatedCgroup {
                    policy_id: ids[index],
                    flags: 0,
                },
            );
            compiled.cgroup_paths.insert(meta.ino(), dir);
        }
    }
}

/// The operations that turn `current` into `desired`, in a safe order.
#[must_use]
pub fn plan(current: &MapState, desired: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    // Protection first, and it goes last.
    for (key, flags) in &desired.protected {
        if current.protected.get(key) != Some(flags) {
            ops.push(MapOp::SetProtected(*key, *flags));
        }
    }
    for (id, defaults) in &desired.policies {
        if current.policies.get(id) != Some(defaults) {
            ops.push(MapOp::SetPolicy(*id, *defaults));
        }
    }
    for (id, hash) in &desired.names {
        if current.names.get(id) != Some(hash) {
            ops.push(MapOp::SetPolicyName(*id, *hash));
        }
    }
    for id in &desired.candidates {
        if !current.candidates.contains(id) {
            ops.push(MapOp::SetCandidate(*id));
        }
    }
    for (key, value) in &desired.rules {
        if current.rules.get(key) != Some(value) {
            ops.push(MapOp::SetRule(key.clone(), value.clone()));
        }
    }
    for (id, gated) in &desired.gated {
        if current.gated.get(id) != Some(gated) {
            ops.push(MapOp::SetGated(*id, *gated));
        }
    }
    for (id, gated) in &current.gated {
        if desired.gated.contains_key(id) {
            continue;
        }
        // Unclassified: only the agent's classification ungates it.
        if gated.flags & GATED_UNCLASSIFIED != 0 {
            if desired.ungate.contains(id) {
                ops.push(MapOp::RemoveGated(*id));
            }
            continue;
        }
        // The kernel gated this cgroup because a gated task created it (or
        // an ungated one did, inside a gated cgroup); it stays gated while
        // its policy is loaded. (Cgroups under a policy's patterns are in
        // `desired` anyway; a reload carries it over with
        // [`carry_inherited`].)
        let inherited =
            gated.flags & GATED_INHERITED != 0 && desired.policies.contains_key(&gated.policy_id);
        if !inherited {
            ops.push(MapOp::RemoveGated(*id));
        }
    }
    for id in &current.candidates {
        if !desired.candidates.contains(id) {
            ops.push(MapOp::RemoveCandidate(*id));
        }
    }
    for key in current.rules.keys() {
        if !desired.rules.contains_key(key) {
            ops.push(MapOp::RemoveRule(key.clone()));
        }
    }
    for id in current.policies.keys() {
        if !desired.policies.contains_key(id) {
            ops.push(MapOp::SetPolicy(*id, PolicyDefaults::default()));
        }
    }
    for id in current.names.keys() {
        if !desired.names.contains_key(id) {
            ops.push(MapOp::SetPolicyName(*id, 0));
        }
    }
    for key in current.protected.keys() {
        if !desired.protected.contains_key(key) {
            ops.push(MapOp::RemoveProtected(*key));
        }
    }
    ops
}

/// What [`apply`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    pub cgroups_added: usize,
    pub cgroups_removed: usize,
}

/// Makes the maps hold `desired`. On a failure before any cgroup switched,
/// the previous state is restored and [`PolicyMapsError::RolledBack`]
/// returned.
pub fn apply(maps: &mut impl PolicyMaps, desired: &MapState) -> Result<Applied, PolicyMapsError> {
    let before = maps.read_state()?;
    let ops = plan(&before, desired);
    let mut applied = Applied::default();
    for op in &ops {
        if let Err(err) = maps.write(op) {
            if op.touches_cgroups() || ops[..applied.ops].iter().any(MapOp::touches_cgroups) {
                // Past the switch: the new policy is (partly) in force, and
                // going back could fail the same way. Report it as is.
                return Err(err);
            }
            let now = maps.read_state()?;
            for undo in plan(&now, &before) {
                // Best effort: removing entries we just added cannot run out
                // of space.
                if let Err(undo_err) = maps.write(&undo) {
                    tracing::error!(error = %undo_err, "failed to undo a partial policy write");
                }
            }
            return Err(PolicyMapsError::RolledBack {
                source: Box::new(err),
            });
        }
        applied.ops += 1;
        match op {
            MapOp::SetGated(id, _) if !before.gated.contains_key(id) => applied.cgroups_added += 1,
            MapOp::RemoveGated(_) => applied.cgroups_removed += 1,
            _ => {}
        }
    }
    Ok(applied)
}

/// An in-memory [`PolicyMaps`], for tests and dry runs.
#[derive(Debug, Clone, Default)]
pub struct MemoryMaps {
    pub state: MapState,
    /// Refuse the write with this index (0-based, counting attempts), once.
    pub fail_at: Option<usize>,
    pub attempts: usize,
}

impl PolicyMaps for MemoryMaps {
    fn read_state(&self) -> Result<MapState, PolicyMapsError> {
        Ok(self.state.clone())
    }

    fn write(&mut self, op: &MapOp) -> Result<(), PolicyMapsError> {
        let attempt = self.attempts;
        self.attempts += 1;
        if self.fail_at == Some(attempt) {
            return Err(PolicyMapsError::Write {
                map: gatekeep_common::map_names::EXEC_RULES,
                source: aya::maps::MapError::OutOfBounds {
                    index: 0,
                    max_entries: 0,
                },
            });
        }
        let state = &mut self.state;
        match op {
            MapOp::SetPolicy(id, defaults) => {
                if *defaults == PolicyDefaults::default() {
                    state.policies.remove(id);
                } else {
                    state.policies.insert(*id, *defaults);
                }
            }
            MapOp::SetRule(key, value) => {
                state.rules.insert(key.clone(), value.clone());
            }
            MapOp::RemoveRule(key) => {
                state.rules.remove(key);
            }
            MapOp::SetGated(key, value) => {
                state.gated.insert(*key, *value);
            }
            MapOp::RemoveGated(key) => {
                state.gated.remove(key);
            }
            MapOp::SetPolicyName(id, 0) => {
                state.names.remove(id);
            }
            MapOp::SetPolicyName(id, hash) => {
                state.names.insert(*id, *hash);
            }
            MapOp::SetProtected(key, flags) => {
                state.protected.insert(*key, *flags);
            }
            MapOp::RemoveProtected(key) => {
                state.protected.remove(key);
            }
            MapOp::SetCandidate(id) => {
                state.candidates.insert(*id);
            }
            MapOp::RemoveCandidate(id) => {
                state.candidates.remove(id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, os::unix::fs::symlink};

    use gatekeep_common::{PortRule, PortRules, action, map_names};
    use gatekeep_policy::parse_str;

    use super::*;
    use crate::hooks::{
        self, Request,
        connect::{ConnectRequest, Destination, Via, decode_rules, encode_rules, split_key},
        exec::{ExecRequest, decode_action, kernel_dev},
        kernel_action,
    };

    /// (prefix, policy id, address) of a `CONNECT_V4` entry.
    type V4Key = (u32, u32, [u8; 4]);

    /// The `CONNECT_V4` entries.
    fn v4_entries(state: &MapState) -> Vec<(V4Key, PortRules)> {
        state
            .rules
            .iter()
            .filter(|(key, _)| key.map == map_names::CONNECT_V4)
            .map(|(key, value)| {
                let (prefix, addr) = split_key(&key.key);
                let addr = <[u8; 4]>::try_from(addr).expect("an IPv4 key");
                ((prefix, key.policy_id, addr), decode_rules(value))
            })
            .collect()
    }

    fn set(text: &str) -> PolicySet {
        parse_str("test.toml", text).unwrap_or_else(|e| panic!("invalid test policy: {e}"))
    }

    fn host(root: &Path) -> HostView {
        HostView {
            cgroup_root: root.to_owned(),
            own_cgroup: None,
            protected: Vec::new(),
        }
    }

    fn rules_of(state: &MapState, prefix: u32, id: u32, addr: [u8; 4]) -> Vec<(u16, u16, u32)> {
        let rules = v4_entries(state)
            .into_iter()
            .find(|(key, _)| *key == (prefix, id, addr))
            .map_or_else(
                || panic!("no entry for /{prefix} {addr:?}"),
                |(_, rules)| rules,
            );
        rules
            .rules
            .iter()
            .take_while(|r| r.action != action::NONE)
            .map(|r| (r.port_lo, r.port_hi, r.action))
            .collect()
    }

    /// What the kernel would decide for `addr:port` with these entries: the
    /// longest prefix entry of the policy holding the address, then the
    /// first port rule, else the default.
    fn kernel_decides(state: &MapState, id: u32, addr: [u8; 4], port: u16, default: u32) -> u32 {
        let full = u32::from_be_bytes(addr);
        let entries = v4_entries(state);
        let best = entries
            .iter()
            .filter(|((prefix, policy_id, key_addr), _)| {
                let bits = prefix - 32;
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                *policy_id == id && (u32::from_be_bytes(*key_addr) & mask) == (full & mask)
            })
            .max_by_key(|((prefix, _, _), _)| *prefix);
        let Some((_, rules)) = best else {
            return default;
        };
        rules
            .rules
            .iter()
            .take_while(|r| r.action != action::NONE)
            .find(|r| r.port_lo <= port && port <= r.port_hi)
            .map_or(default, |r| r.action)
    }

    const CONNECT_POLICY: &str = r#"
[[policy]]
name = "net"
cgroups = ["/sys/fs/cgroup/agents"]
[policy.connect]
default = "ask"
allow = ["10.0.0.0/8", "10.1.0.0/16:443", "10.1.2.0/24:8000-8999", "10.1.2.0/24:8500"]
deny = ["10.1.0.0/16", "10.1.2.0/24:7000-7001", "169.254.169.254"]
"#;

    #[test]
    fn connect_prefixes_fold_in_wider_rules_specific_ports_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(CONNECT_POLICY), &[5], 1, &host(dir.path())).expect("compile");
        let state = &compiled.state;
        assert_eq!(
            rules_of(state, 32 + 8, 5, [10, 0, 0, 0]),
            [(0, 65535, action::ALLOW)]
        );
        // /16: its port-specific allow, its all-ports deny; the /8 after it
        // is unreachable and left out.
        assert_eq!(
            rules_of(state, 32 + 16, 5, [10, 1, 0, 0]),
            [(443, 443, action::ALLOW), (0, 65535, action::DENY)]
        );
        // /24: narrower port ranges first, then wider ones, then the /16's.
        assert_eq!(
            rules_of(state, 32 + 24, 5, [10, 1, 2, 0]),
            [
                (8500, 8500, action::ALLOW),
                (7000, 7001, action::DENY),
                (8000, 8999, action::ALLOW),
                (443, 443, action::ALLOW),
                (0, 65535, action::DENY),
            ]
        );
        assert_eq!(
            rules_of(state, 32 + 32, 5, [169, 254, 169, 254]),
            [(0, 65535, action::DENY)]
        );
        assert_eq!(state.rule_count(map_names::CONNECT_V4), 4);
    }

    #[test]
    fn folded_entries_decide_like_the_policy_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = set(CONNECT_POLICY);
        let compiled = compile(&policies, &[5], 1, &host(dir.path())).expect("compile");
        let connect = &policies.policies[0].connect;
        let addrs = [
            [10, 1, 2, 3],
            [10, 1, 9, 9],
            [10, 9, 9, 9],
            [192, 0, 2, 1],
            [169, 254, 169, 254],
        ];
        for addr in addrs {
            for port in [22, 443, 7000, 7001, 7002, 8000, 8500, 8999, 9000] {
                let expected = kernel_action(connect.action_for(IpAddr::from(addr), port));
                assert_eq!(
                    kernel_decides(&compiled.state, 5, addr, port, action::ASK),
                    expected,
                    "{addr:?}:{port}"
                );
            }
        }
    }

    #[test]
    fn too_many_port_rules_for_one_prefix_is_an_error() {
        let ports: Vec<String> = (1..=17)
            .map(|p| format!("\"10.0.0.0/8:{}\"", 1000 + p))
            .collect();
        let text = format!(
            "[[policy]]\nname = \"n\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.connect]\nallow = [{}]\n",
            ports.join(", ")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let err = compile(&set(&text), &[0], 1, &host(dir.path())).expect_err("17 rules");
        assert!(
            matches!(err, PolicyMapsError::TooManyPortRules { count: 17, .. }),
            "{err}"
        );
    }

    #[test]
    fn unix_rules_compile_to_their_name_hash_under_the_policy_id() {
        let text = r#"
[[policy]]
name = "u"
cgroups = ["/sys/fs/cgroup/a"]
[policy.connect]
unix = "ask"
deny = ["unix:/run/docker.sock"]
allow = ["unix:@gk-ok"]
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[7], 1, &host(dir.path())).expect("compile");
        let unix: Vec<_> = compiled
            .state
            .rules
            .iter()
            .filter(|(key, _)| key.map == map_names::UNIX_RULES)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let entry = |name: &[u8], action: u32| {
            (
                hooks::connect::unix_rule_key(7, gatekeep_common::unix_rule_hash(name)),
                action.to_ne_bytes().to_vec(),
            )
        };
        let mut expected = vec![
            entry(b"/run/docker.sock", action::DENY),
            entry(b"\0gk-ok", action::ALLOW),
        ];
        expected.sort();
        assert_eq!(unix, expected);
        assert_eq!(compiled.state.policies[&7].unix_action, action::ASK);
    }

    #[test]
    fn ipv6_prefixes_are_keyed_after_the_policy_id() {
        let text = r#"
[[policy]]
name = "v6"
cgroups = ["/sys/fs/cgroup/a"]
[policy.connect]
deny = ["[2001:db8::]/32:443"]
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[0x0102_0304], 1, &host(dir.path())).expect("compile");
        let (key, value) = compiled.state.rules.iter().next().expect("one entry");
        assert_eq!(key.map, map_names::CONNECT_V6);
        assert_eq!(key.policy_id, 0x0102_0304);
        let (prefix, addr) = split_key(&key.key);
        assert_eq!(prefix, 32 + 32);
        assert_eq!(&addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(
            decode_rules(value).rules[0],
            PortRule {
                port_lo: 443,
                port_hi: 443,
                action: action::DENY
            }
        );
    }

    #[test]
    fn connect_defaults_compile_unix_other_families_and_raw_sockets() {
        let text = r#"
[[policy]]
name = "follows"
cgroups = ["/sys/fs/cgroup/a"]
[policy.connect]
default = "deny"

[[policy]]
name = "says"
cgroups = ["/sys/fs/cgroup/b"]
[policy.connect]
default = "deny"
unix = "allow"
other_families = "ask"
raw_sockets = "allow"
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[1, 2], 1, &host(dir.path())).expect("compile");
        let defaults = |id: u32| {
            let d = compiled.state.policies[&id];
            (
                d.connect_default,
                d.unix_action,
                d.other_action,
                d.raw_action,
            )
        };
        assert_eq!(
            defaults(1),
            (action::DENY, action::DENY, action::DENY, action::DENY),
            "unix and other families follow the default; raw sockets are denied"
        );
        assert_eq!(
            defaults(2),
            (action::DENY, action::ALLOW, action::ASK, action::ALLOW)
        );
        let request = |destination| ConnectRequest {
            origin: crate::bpf::record::origin(&gatekeep_common::EventHeader::default()),
            destination,
            sock_type: 3,
            via: Via::Socket,
            resolved: Vec::new(),
        };
        let follows = &set(text).policies[0];
        let rule = |destination| {
            <hooks::connect::Connect as hooks::Hook>::rule(follows, &(), &request(destination))
        };
        assert_eq!(
            rule(Destination::RawSocket {
                family: 17,
                protocol: 3
            }),
            "connect raw_sockets deny"
        );
        assert_eq!(
            rule(Destination::Other { family: 16 }),
            "connect other_families deny"
        );
        assert_eq!(
            rule(Destination::Unix {
                path: "/run/x".into(),
                name: b"/run/x".to_vec(),
            }),
            "connect unix deny"
        );
    }

    #[test]
    fn bound_env_compiles_to_an_exec_bound_env_entry_of_its_policy_only() {
        let text = r#"
[[policy]]
name = "plain"
cgroups = ["/sys/fs/cgroup/a"]
[policy.exec]
default = "ask"

[[policy]]
name = "python"
cgroups = ["/sys/fs/cgroup/b"]
[policy.exec]
default = "ask"
bound_env = ["PYTHONPATH", "NODE_OPTIONS"]
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[1, 2], 1, &host(dir.path())).expect("compile");
        let bound: Vec<_> = compiled
            .state
            .rules
            .iter()
            .filter(|(key, _)| key.map == gatekeep_common::map_names::EXEC_BOUND_ENV)
            .collect();
        assert_eq!(bound.len(), 1, "{bound:?}");
        let (key, value) = bound[0];
        assert_eq!(key.policy_id, 2);
        let expected = gatekeep_common::BoundEnv::from_names(&[b"PYTHONPATH", b"NODE_OPTIONS"])
            .expect("valid");
        assert_eq!(value.len(), size_of::<gatekeep_common::BoundEnv>());
        assert_eq!(value[..4], expected.count.to_ne_bytes());
        assert_eq!(value[8..16], expected.names[0][0].to_ne_bytes());
    }

    #[test]
    fn on_truncated_compiles_to_deny_unless_the_policy_says_ask() {
        let text = r#"
[[policy]]
name = "silent"
cgroups = ["/sys/fs/cgroup/a"]
[policy.exec]
default = "ask"

[[policy]]
name = "asks"
cgroups = ["/sys/fs/cgroup/b"]
[policy.exec]
default = "ask"
on_truncated = "ask"
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[1, 2], 1, &host(dir.path())).expect("compile");
        assert_eq!(compiled.state.policies[&1].on_truncated, action::DENY);
        assert_eq!(compiled.state.policies[&2].on_truncated, action::ASK);

        // A kernel denial for truncation names on_truncated, with its reason.
        let denied = Request::Exec(ExecRequest {
            origin: crate::bpf::record::origin(&gatekeep_common::EventHeader::default()),
            dev: 1,
            ino: 2,
            content: gatekeep_common::ContentVersion::default(),
            filename: PathBuf::from("/bin/echo"),
            argv: vec!["echo".into()],
            argv_truncated: true,
            env: Vec::new(),
            denied_truncated: true,
            argc: 1,
            via: crate::hooks::exec::Via::Exec,
            interpreter: false,
        });
        let silent = &set(text).policies[0];
        assert_eq!(
            denied.rule(silent, &compiled.policies[&1].hooks),
            "exec on_truncated deny"
        );
        assert_eq!(
            denied.denied_because().map(|(reason, _)| reason),
            Some("argv_truncated")
        );
        let Request::Exec(mut asked) = denied else {
            unreachable!()
        };
        asked.denied_truncated = false;
        assert_eq!(Request::Exec(asked).denied_because(), None);
    }

    #[test]
    fn exec_rules_are_keyed_by_kernel_identity_and_missing_paths_warn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = dir.path().join("tool");
        // A binary: a rule naming a script would hand the host's
        // interpreters over to the agent's matcher too.
        fs::write(&tool, b"\x7fELF").expect("write");
        let link = dir.path().join("link");
        symlink(&tool, &link).expect("symlink");
        let text = format!(
            "[[policy]]\nname = \"e\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\ndefault = \"ask\"\ndeny = [\"{}\"]\nallow = [\"{}\"]\n",
            link.display(),
            dir.path().join("missing").display()
        );
        let compiled = compile(&set(&text), &[3], 7, &host(dir.path())).expect("compile");
        let meta = fs::metadata(&tool).expect("stat");
        let dev = kernel_dev(meta.dev());
        assert_eq!(
            compiled
                .state
                .rules
                .get(&hooks::exec::rule_key(3, dev, meta.ino()))
                .map(|value| decode_action(value)),
            Some(action::DENY),
            "the symlink's target is what the kernel sees"
        );
        assert_eq!(compiled.state.rule_count(map_names::EXEC_RULES), 1);
        assert_eq!(compiled.warnings.len(), 1, "{:?}", compiled.warnings);
        assert!(compiled.warnings[0].contains("missing"));
        assert_eq!(
            compiled.state.policies[&3],
            PolicyDefaults {
                exec_default: action::ASK,
                connect_default: action::ALLOW,
                unix_action: action::ALLOW,
                generation: 7,
                raw_action: action::DENY,
                other_action: action::ALLOW,
                on_truncated: action::DENY,
                audit: 0,
                map_unlisted: action::ALLOW,
                fileless: action::DENY,
            }
        );
        let loaded = &compiled.policies[&3];
        let exec_of = |dev, ino| {
            Request::Exec(ExecRequest {
                origin: crate::bpf::events::Origin {
                    policy_id: 3,
                    pid: 1,
                    tid: 1,
                    uid: 0,
                    gid: 0,
                    ppid: 0,
                    cgroup_id: 0,
                    ktime_ns: 0,
                    digest: 0,
                    comm: String::new(),
                },
                dev,
                ino,
                content: gatekeep_common::ContentVersion::default(),
                filename: PathBuf::new(),
                argv: Vec::new(),
                argv_truncated: false,
                env: Vec::new(),
                denied_truncated: false,
                argc: 0,
                via: crate::hooks::exec::Via::Exec,
                interpreter: false,
            })
        };
        assert_eq!(
            loaded.rule_for(&exec_of(dev, meta.ino())),
            format!("exec deny {}", link.display())
        );
        assert_eq!(loaded.rule_for(&exec_of(1, 1)), "exec default ask");
        // A mapping names the same rule, marked; an unlisted one names the setting.
        let mapped = |dev, ino| {
            let Request::Exec(mut exec) = exec_of(dev, ino) else {
                unreachable!()
            };
            exec.via = crate::hooks::exec::Via::Mapped;
            Request::Exec(exec)
        };
        assert_eq!(
            loaded.rule_for(&mapped(dev, meta.ino())),
            format!("exec deny {} (mapped as code)", link.display())
        );
        assert_eq!(
            loaded.rule_for(&mapped(1, 1)),
            "exec unlisted_mappings allow (default ask) (mapped as code)"
        );
        assert_eq!(
            mapped(1, 1).denied_because().map(|(reason, _)| reason),
            Some("mapped_as_code")
        );
    }

    #[test]
    fn unlisted_mappings_and_fileless_compile_into_the_policy_defaults() {
        let text = r#"
[[policy]]
name = "plain"
cgroups = ["/sys/fs/cgroup/a"]
[policy.exec]
default = "deny"

[[policy]]
name = "strict"
cgroups = ["/sys/fs/cgroup/b"]
[policy.exec]
default = "deny"
unlisted_mappings = "default"
fileless = "ask"
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let compiled = compile(&set(text), &[1, 2], 1, &host(dir.path())).expect("compile");
        // Unwritten: libraries map freely, fileless executables are denied.
        assert_eq!(compiled.state.policies[&1].map_unlisted, action::ALLOW);
        assert_eq!(compiled.state.policies[&1].fileless, action::DENY);
        // `default`: the exec default decides unlisted mappings.
        assert_eq!(compiled.state.policies[&2].map_unlisted, action::DENY);
        assert_eq!(compiled.state.policies[&2].fileless, action::ASK);

        let fileless = Request::Exec(ExecRequest {
            origin: crate::bpf::record::origin(&gatekeep_common::EventHeader::default()),
            dev: 1,
            ino: 2,
            content: gatekeep_common::ContentVersion::default(),
            filename: PathBuf::from("memfd:payload"),
            argv: vec!["payload".into()],
            argv_truncated: false,
            env: Vec::new(),
            denied_truncated: false,
            argc: 1,
            via: crate::hooks::exec::Via::Fileless,
            interpreter: false,
        });
        let plain = &set(text).policies[0];
        assert_eq!(
            fileless.rule(plain, &compiled.policies[&1].hooks),
            "exec fileless deny"
        );
        assert_eq!(
            fileless.denied_because().map(|(reason, _)| reason),
            Some("fileless")
        );
        assert_eq!(
            fileless.kernel_facts().exec.and_then(|exec| exec.via),
            Some("fileless".to_owned())
        );
    }

    #[test]
    fn cgroups_and_descendants_are_gated_nearest_match_deciding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for sub in [
            "agents/a1/child",
            "agents/special/x",
            "other",
            "agents/agent-self",
        ] {
            fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        let text = r#"
[[policy]]
name = "broad"
cgroups = ["/sys/fs/cgroup/agents"]
[[policy]]
name = "special"
cgroups = ["/sys/fs/cgroup/agents/special"]
"#;
        let view = HostView {
            cgroup_root: root.to_owned(),
            own_cgroup: Some(root.join("agents/agent-self")),
            protected: Vec::new(),
        };
        let compiled = compile(&set(text), &[10, 11], 1, &view).expect("compile");
        let ino = |sub: &str| fs::metadata(root.join(sub)).expect("stat").ino();
        let policy_of = |sub: &str| compiled.state.gated.get(&ino(sub)).map(|g| g.policy_id);
        assert_eq!(policy_of("agents"), Some(10));
        assert_eq!(policy_of("agents/a1/child"), Some(10));
        assert_eq!(policy_of("agents/special"), Some(11));
        assert_eq!(policy_of("agents/special/x"), Some(11));
        assert_eq!(policy_of("other"), None);
        assert_eq!(
            policy_of("agents/agent-self"),
            None,
            "the agent never gates itself"
        );
        assert_eq!(compiled.warnings.len(), 1);
    }

    #[test]
    fn ids_avoid_those_in_use() {
        let in_use: BTreeSet<u32> = [0, 1, 3].into();
        assert_eq!(allocate_ids(3, &in_use).expect("ids"), [2, 4, 5]);
        let all: BTreeSet<u32> = (0..MAX_POLICIES - 1).collect();
        assert!(matches!(
            allocate_ids(2, &all),
            Err(PolicyMapsError::TooManyPolicies { max: 1, .. })
        ));
    }

    fn sample_state(id: u32, cgroups: &[u64], generation: u32) -> MapState {
        let mut state = MapState::default();
        state.policies.insert(
            id,
            PolicyDefaults {
                exec_default: action::ASK,
                connect_default: action::ALLOW,
                unix_action: action::ALLOW,
                generation,
                raw_action: action::DENY,
                other_action: action::ALLOW,
                on_truncated: action::DENY,
                audit: 0,
                map_unlisted: action::ALLOW,
                fileless: action::DENY,
            },
        );
        state.rules.insert(
            hooks::exec::rule_key(id, 1, 2),
            action::DENY.to_ne_bytes().to_vec(),
        );
        state.rules.insert(
            hooks::connect::rule_key(map_names::CONNECT_V4, id, 40, &[10, 0, 0, 0]),
            encode_rules(&PortRules::default()),
        );
        for cgroup in cgroups {
            state.gated.insert(
                *cgroup,
                GatedCgroup {
                    policy_id: id,
                    flags: 0,
                },
            );
        }
        state
    }

    #[test]
    fn plan_keeps_kernel_inherited_cgroups_while_their_policy_is_loaded() {
        let mut current = sample_state(0, &[100], 1);
        let inherited = GatedCgroup {
            policy_id: 0,
            flags: GATED_INHERITED,
        };
        current.gated.insert(500, inherited);
        // Same policy set (a rescan): the inherited entry stays.
        let same = sample_state(0, &[100], 1);
        assert!(
            !plan(&current, &same).contains(&MapOp::RemoveGated(500)),
            "a rescan must not ungate a cgroup the kernel inherited"
        );
        // A cgroup the agent does not match and the kernel did not add goes.
        current.gated.insert(
            600,
            GatedCgroup {
                policy_id: 0,
                flags: 0,
            },
        );
        assert!(plan(&current, &same).contains(&MapOp::RemoveGated(600)));
        // Its policy unloaded: the inherited entry goes with it.
        let other = sample_state(1, &[100], 2);
        assert!(plan(&current, &other).contains(&MapOp::RemoveGated(500)));
    }

    #[test]
    fn plan_writes_new_policy_before_switching_cgroups_and_removes_old_after() {
        let old = sample_state(0, &[100, 101], 1);
        let new = sample_state(1, &[100, 102], 2);
        let ops = plan(&old, &new);
        let first_cgroup_op = ops
            .iter()
            .position(MapOp::touches_cgroups)
            .expect("cgroup ops");
        assert!(
            ops[..first_cgroup_op]
                .iter()
                .all(|op| matches!(op, MapOp::SetPolicy(1, _) | MapOp::SetRule(..))),
            "{ops:?}"
        );
        let last_cgroup_op = ops
            .iter()
            .rposition(MapOp::touches_cgroups)
            .expect("cgroup ops");
        assert!(
            ops[last_cgroup_op + 1..]
                .iter()
                .all(|op| matches!(op, MapOp::RemoveRule(_) | MapOp::SetPolicy(0, _)))
        );
        let mut maps = MemoryMaps {
            state: old,
            ..MemoryMaps::default()
        };
        let applied = apply(&mut maps, &new).expect("apply");
        assert_eq!(maps.state, new);
        assert_eq!(applied.cgroups_added, 1);
        assert_eq!(applied.cgroups_removed, 1);
        // Applying again changes nothing.
        assert_eq!(apply(&mut maps, &new).expect("apply").ops, 0);
    }

    #[test]
    fn failed_write_before_the_switch_restores_the_previous_state() {
        let old = sample_state(0, &[100], 1);
        let new = sample_state(1, &[100], 2);
        let mut maps = MemoryMaps {
            state: old.clone(),
            fail_at: Some(2),
            ..MemoryMaps::default()
        };
        let err = apply(&mut maps, &new).expect_err("fails");
        assert!(matches!(err, PolicyMapsError::RolledBack { .. }), "{err}");
        assert_eq!(maps.state, old, "the old policy is fully in force again");
    }

    #[test]
    fn failed_write_after_the_switch_is_reported_without_rollback() {
        let old = sample_state(0, &[100, 101], 1);
        let new = sample_state(1, &[100, 101], 2);
        let switch = plan(&old, &new)
            .iter()
            .position(MapOp::touches_cgroups)
            .expect("switch");
        let mut maps = MemoryMaps {
            state: old,
            fail_at: Some(switch + 1),
            ..MemoryMaps::default()
        };
        let err = apply(&mut maps, &new).expect_err("fails");
        assert!(matches!(err, PolicyMapsError::Write { .. }), "{err}");
        // A retry converges.
        apply(&mut maps, &new).expect("retry");
        assert_eq!(maps.state, new);
    }

    #[test]
    fn ids_in_use_and_generation_are_read_back() {
        let mut state = sample_state(4, &[1], 9);
        state.gated.insert(
            2,
            GatedCgroup {
                policy_id: 6,
                flags: 0,
            },
        );
        assert_eq!(state.ids_in_use(), [4, 6].into());
        assert_eq!(state.generation(), 9);
    }

    fn two_policies(a: &str, b: &str) -> PolicySet {
        set(&format!(
            "[[policy]]\nname = \"{a}\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n\
             [[policy]]\nname = \"{b}\"\ncgroups = [\"/sys/fs/cgroup/b\"]\n"
        ))
    }

    #[test]
    fn inherited_gating_follows_its_policy_to_the_new_id_and_goes_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = compile(&two_policies("one", "two"), &[0, 1], 1, &host(dir.path())).expect("old");
        let mut current = old.state.clone();
        let inherited = |policy_id| GatedCgroup {
            policy_id,
            flags: GATED_INHERITED,
        };
        current.gated.insert(500, inherited(0));
        current.gated.insert(501, inherited(1));
        // The reload keeps "two" (new id 3) and drops "one".
        let mut new = compile(
            &set("[[policy]]\nname = \"two\"\ncgroups = [\"/sys/fs/cgroup/b\"]\n"),
            &[3],
            2,
            &host(dir.path()),
        )
        .expect("new");
        carry_inherited(&current, &mut new.state);
        assert_eq!(new.state.gated.get(&501), Some(&inherited(3)));
        assert_eq!(new.state.gated.get(&500), None);
        let mut maps = MemoryMaps {
            state: current,
            ..MemoryMaps::default()
        };
        apply(&mut maps, &new.state).expect("apply");
        assert_eq!(maps.state.gated.get(&501), Some(&inherited(3)));
        assert!(!maps.state.gated.contains_key(&500), "its policy is gone");
        assert_eq!(maps.state.names.keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(maps.state.names[&3], name_hash("two"));
    }

    #[test]
    fn an_unclassified_cgroup_is_ungated_only_once_the_agent_has_classified_it() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("jobs/job-1")).expect("mkdir");
        fs::create_dir_all(root.path().join("jobs/other")).expect("mkdir");
        let text = "[[policy]]\nname = \"jobs\"\ncgroups = [\"/sys/fs/cgroup/jobs/job-*\"]\n";
        let id_of = |p: &str| fs::metadata(root.path().join(p)).expect("stat").ino();
        let (job, other) = (id_of("jobs/job-1"), id_of("jobs/other"));
        let unclassified = GatedCgroup {
            policy_id: gatekeep_common::UNCLASSIFIED_POLICY,
            flags: GATED_UNCLASSIFIED,
        };
        let mut current = MapState::default();
        // `other` and one the walk never sees (made after it).
        current.gated.insert(other, unclassified);
        current.gated.insert(999_999, unclassified);
        let mut compiled = compile(&set(text), &[7], 1, &host(root.path())).expect("compile");
        // The matched one is gated by the compile itself.
        current.gated.insert(job, unclassified);
        assert!(compiled.state.candidates.contains(&id_of("jobs")));
        classify_unclassified(
            &current,
            &mut compiled.state,
            &set(text),
            &[7],
            &host(root.path()),
        );
        assert_eq!(
            compiled.state.ungate.iter().copied().collect::<Vec<_>>(),
            [other]
        );
        let mut maps = MemoryMaps {
            state: current,
            ..MemoryMaps::default()
        };
        apply(&mut maps, &compiled.state).expect("apply");
        assert_eq!(maps.state.gated[&job].policy_id, 7);
        assert_eq!(maps.state.gated[&job].flags, 0);
        assert!(!maps.state.gated.contains_key(&other));
        assert_eq!(
            maps.state.gated.get(&999_999),
            Some(&unclassified),
            "not seen yet: stays unclassified"
        );
    }

    #[test]
    fn candidate_parents_are_where_a_pattern_can_still_match_a_new_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        for dir in [
            "system.slice/ai-1.service",
            "system.slice/other.service",
            "fixed",
            "deep/x",
        ] {
            fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        }
        let text = "[[policy]]\nname = \"p\"\ncgroups = [\
             \"/sys/fs/cgroup/system.slice/ai-*.service\", \"/sys/fs/cgroup/fixed\", \
             \"/sys/fs/cgroup/missing/job\", \"/sys/fs/cgroup/deep/*/leaf\"]\n";
        let compiled = compile(&set(text), &[0], 1, &host(root.path())).expect("compile");
        let id_of = |p: &str| fs::metadata(root.path().join(p)).expect("stat").ino();
        let want: BTreeSet<u64> = [
            // ai-*.service can appear in system.slice.
            id_of("system.slice"),
            // `missing` does not exist yet: it can appear at the root.
            id_of(""),
            // deep/*/leaf: any child of deep, and a leaf in deep/x.
            id_of("deep"),
            id_of("deep/x"),
        ]
        .into();
        assert_eq!(compiled.state.candidates, want);
    }

    #[test]
    fn protection_is_written_before_and_removed_after_everything_else() {
        let mut desired = MapState::default();
        desired.protected.insert((1, 2), 1);
        desired.gated.insert(
            5,
            GatedCgroup {
                policy_id: 0,
                flags: 0,
            },
        );
        let ops = plan(&MapState::default(), &desired);
        assert_eq!(ops.first(), Some(&MapOp::SetProtected((1, 2), 1)));
        let ops = plan(&desired, &MapState::default());
        assert_eq!(ops.last(), Some(&MapOp::RemoveProtected((1, 2))));
    }
}
