//! Where the DNS observation programs run: attached (as BPF links, which run
//! beside anyone else's programs) to each topmost gated cgroup whose policy has host
//! rules. A cgroup's effective programs include its ancestors', so the
//! cgroups below it (made later, or gated by inheritance) are covered too;
//! everything else on the host runs none of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, cgroup_skb::CgroupSkbLink};

use super::DnsError;
use crate::{
    bpf::{pinning::PinLayout, programs::DNS_PROGRAMS},
    policy::Compiled,
};

/// The loaded programs and their links, by cgroup directory.
pub struct Attached {
    object: aya::Ebpf,
    /// directory -> (its inode, the links holding the programs there).
    links: BTreeMap<PathBuf, (u64, Vec<CgroupSkbLink>)>,
}

impl Attached {
    /// Loads the programs (attached nowhere yet).
    pub fn load(layout: &PinLayout, _cgroup_root: PathBuf) -> Result<Self, DnsError> {
        let object = crate::bpf::pinning::load_dns_programs(layout)?;
        Ok(Self {
            object,
            links: BTreeMap::new(),
        })
    }

    /// Attaches to the cgroups `compiled` needs observed and detaches from
    /// the others.
    pub fn follow(&mut self, compiled: &Compiled) {
        let wanted = wanted(compiled);
        let gone: Vec<PathBuf> = self
            .links
            .iter()
            .filter(|(dir, (ino, _))| wanted.get(*dir) != Some(ino))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in gone {
            // Dropping the links detaches the programs.
            self.links.remove(&dir);
            tracing::info!(cgroup = %dir.display(), "DNS observation detached");
        }
        for (dir, ino) in wanted {
            if self.links.contains_key(&dir) {
                continue;
            }
            match self.attach(&dir) {
                Ok(links) => {
                    tracing::info!(cgroup = %dir.display(), "DNS observation attached (host-name connect rules)");
                    self.links.insert(dir, (ino, links));
                }
                Err(err) => tracing::error!(
                    cgroup = %dir.display(),
                    error = %err,
                    "cannot observe DNS answers here: host-name rules do not apply to this cgroup's connects"
                ),
            }
        }
    }

    fn attach(&mut self, dir: &Path) -> Result<Vec<CgroupSkbLink>, Box<dyn std::error::Error>> {
        let file = File::open(dir)?;
        let mut links = Vec::new();
        for name in DNS_PROGRAMS {
            let program: &mut CgroupSkb = self
                .object
                .program_mut(name)
                .ok_or_else(|| format!("program `{name}` missing"))?
                .try_into()?;
            let attach_type = if name.ends_with("ingress") {
                CgroupSkbAttachType::Ingress
            } else {
                CgroupSkbAttachType::Egress
            };
            // A BPF link (kernels >= 5.7, where aya makes one) always runs
            // beside the cgroup's other programs; link_create refuses the
            // BPF_F_ALLOW_MULTI flag itself.
            let id = program.attach(&file, attach_type, CgroupAttachMode::Single)?;
            links.push(program.take_link(id)?);
        }
        Ok(links)
    }

    /// The directories observed now.
    #[must_use]
    pub fn observed(&self) -> Vec<PathBuf> {
        self.links.keys().cloned().collect()
    }
}

/// The topmost gated directories whose policy has host rules, with their
/// inodes (a directory removed and made again is another cgroup).
#[must_use]
pub fn wanted(compiled: &Compiled) -> BTreeMap<PathBuf, u64> {
    let dirs: BTreeSet<(PathBuf, u64)> = compiled
        .cgroup_paths
        .iter()
        .filter(|(id, _)| {
            compiled
                .state
                .gated
                .get(id)
                .and_then(|gated| compiled.policies.get(&gated.policy_id))
                .is_some_and(|loaded| loaded.policy.connect.has_host_rules())
        })
        .map(|(id, dir)| (dir.clone(), *id))
        .collect();
    let mut kept: BTreeMap<PathBuf, u64> = BTreeMap::new();
    for (dir, id) in dirs {
        // Sorted: an ancestor comes before its descendants.
        if kept.keys().any(|top| dir.starts_with(top)) {
            continue;
        }
        let ino = std::fs::metadata(&dir).map_or(id, |m| m.ino());
        kept.insert(dir, ino);
    }
    kept
}
