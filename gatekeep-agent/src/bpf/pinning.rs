//! Loading the programs so they outlive the agent: every program's link and
//! every shared map is pinned under the pin directory
//! (`/sys/fs/bpf/gatekeep/{links,maps}/<NAME>`).
//!
//! - First start: load the object (maps created and pinned by name), load
//!   and attach each program (exit cleanup and cgroup tracking first, so
//!   they run before any gating), pin each link.
//! - Restart: every link is pinned already, so nothing is loaded: the agent
//!   adopts the running programs and opens the pinned maps. Enforcement never
//!   lapses, the pending requests and the ring buffer's unread events are
//!   still there, and the digest key stays the kernel's secret.
//! - Some links missing (an interrupted first start): the object is loaded
//!   with its maps taken from the pins, and only the missing programs are
//!   attached. Links of programs this version does not have are unpinned,
//!   which detaches them.
//! - Pinned programs of another build (an upgrade, a downgrade): refused,
//!   naming `gatekeep-agent unload`. Adopting them would keep the old code
//!   enforcing under a new agent that expects other maps and semantics;
//!   replacing them silently would open a gap in enforcement. The pinned
//!   `BUILD_ID` map says which object the running programs came from.
//! - `gatekeep-agent unload`: [`unpin_all`] removes the links (detaching the
//!   programs) and the maps, deliberately.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, RingBuf},
    pin::PinError,
    programs::links::FdLink,
};
use gatekeep_common::{global_names, map_names};

use crate::{
    bpf::programs::{self, LoadError, PROGRAMS},
    paths,
};

/// Maps pinned by name. The kernel-internal ones (approved scripts, argv
/// scratch) are pinned too so a partial reload shares them with the running
/// programs.
pub const PINNED_MAPS: &[&str] = &[
    map_names::GATED_CGROUPS,
    map_names::GATED_FILTER,
    map_names::POLICIES,
    map_names::EXEC_RULES,
    map_names::EXEC_BOUND_ENV,
    map_names::CONNECT_V4,
    map_names::CONNECT_V6,
    map_names::UNIX_RULES,
    map_names::PENDING,
    map_names::PENDING_SLOTS,
    map_names::VERDICTS,
    // Granted durations ("allow for 1h"); ignored while the object has none.
    map_names::GRANTS,
    map_names::EXEC_APPROVED,
    map_names::ARGV_SCRATCH,
    map_names::EVENTS,
    map_names::COUNTERS,
    map_names::BUILD_ID,
    // Self-protection (issue 18).
    map_names::PROTECT_RELAXED,
    map_names::PROTECTED_TASKS,
    map_names::PROTECT_DENIALS,
    map_names::SERVICE_LISTENERS,
    map_names::PROTECTED_INODES,
    map_names::CANDIDATE_PARENTS,
    map_names::POLICY_NAME_HASHES,
    // Host-name connect rules (issue 20, item 3).
    map_names::HOST_RULES,
    map_names::DNS_RECEIVED,
    map_names::DNS_PROCESSED,
];

/// Errors loading, adopting or unloading the pinned programs.
#[derive(Debug, thiserror::Error)]
pub enum PinningError {
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error("failed to create pin directory `{}` (is bpffs mounted on /sys/fs/bpf?)", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to load the eBPF object with maps pinned under `{}`", dir.display())]
    Object {
        dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("failed to open pinned map `{}`", path.display())]
    OpenMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map `{}` does not have the layout this agent expects (left by another gatekeep version?); run `gatekeep-agent unload` and start again",
        path.display()
    )]
    MapLayout {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("failed to pin the link of program `{name}` at `{}`", path.display())]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error(
        "the programs pinned under `{}` were loaded by another gatekeep build (object {pinned}, this agent's is {ours}); run `gatekeep-agent unload` (it denies any paused request and detaches them), then start this agent",
        dir.display()
    )]
    OtherBuild {
        dir: PathBuf,
        pinned: String,
        ours: String,
    },
    #[error("failed to read or write the build id pinned at `{}`", path.display())]
    BuildId {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("failed to open the pinned link `{}`", path.display())]
    OpenLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("failed to remove pin `{}`", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<LoadError> for PinningError {
    fn from(err: LoadError) -> Self {
        PinningError::Load(Box::new(err))
    }
}

/// Where the pins live.
#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.root.join(paths::LINKS_SUBDIR)
    }

    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(paths::MAPS_SUBDIR)
    }

    #[must_use]
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Every program of the object, in attach order.
    #[must_use]
    pub fn programs() -> Vec<&'static str> {
        PROGRAMS.iter().map(|p| p.name).collect()
    }

    /// Programs whose link is pinned.
    #[must_use]
    pub fn pinned_programs(&self) -> Vec<&'static str> {
        Self::programs()
            .into_iter()
            .filter(|name| self.link(name).exists())
            .collect()
    }
}

/// How the programs came to be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Loaded and attached now.
    Fresh,
    /// Every program was already pinned: adopted, nothing loaded.
    Adopted,
    /// Some were pinned; the missing ones were attached now.
    Completed,
}

impl Start {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Fresh => "loaded",
            Start::Adopted => "adopted",
            Start::Completed => "completed",
        }
    }
}

/// The running programs, ready for the agent (which opens their maps with
/// [`KernelMaps::open`](crate::bpf::kernel::KernelMaps::open)).
pub struct Running {
    pub start: Start,
    /// Programs attached (by name), in attach order.
    pub programs: Vec<&'static str>,
    /// Programs attached by this start (empty when adopted).
    pub attached_now: Vec<&'static str>,
    /// Pinned links of programs this version no longer has (an older
    /// agent's), detached by this start.
    pub retired: Vec<String>,
    pub events: RingBuf<MapData>,
}

/// Loads and pins the programs, or adopts the pinned ones.
pub fn load_or_adopt(layout: &PinLayout) -> Result<Running, PinningError> {
    for dir in [
        layout.root().to_owned(),
        layout.links_dir(),
        layout.maps_dir(),
    ] {
        fs::create_dir_all(&dir).map_err(|source| PinningError::CreateDir { path: dir, source })?;
    }
    let all = PinLayout::programs();
    let pinned = layout.pinned_programs();
    if any_link_pinned(layout) {
        check_build(layout)?;
    }
    let (start, attached_now) = if pinned.len() == all.len() {
        (Start::Adopted, Vec::new())
    } else {
        let missing: Vec<&'static str> = all
            .iter()
            .copied()
            .filter(|p| !pinned.contains(p))
            .collect();
        attach_missing(layout, &missing)?;
        let start = if pinned.is_empty() {
            Start::Fresh
        } else {
            Start::Completed
        };
        (start, missing)
    };
    let retired = retire_unknown_links(layout)?;
    let events = open_ring(layout)?;
    Ok(Running {
        start,
        programs: all,
        attached_now,
        retired,
        events,
    })
}

/// Opens a pinned map as an aya [`Map`].
pub fn open_map(layout: &PinLayout, name: &str) -> Result<Map, PinningError> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|source| PinningError::OpenMap {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| PinningError::OpenMap { path, source })
}

fn open_ring(layout: &PinLayout) -> Result<RingBuf<MapData>, PinningError> {
    let map = open_map(layout, map_names::EVENTS)?;
    RingBuf::try_from(map).map_err(|source| PinningError::MapLayout {
        path: layout.map(map_names::EVENTS),
        source,
    })
}

/// Loads the object (maps from or into the pins) and attaches and pins the
/// programs named in `missing`.
fn attach_missing(layout: &PinLayout, missing: &[&'static str]) -> Result<(), PinningError> {
    let (mut object, btf) = load_object(layout)?;
    // Before any program runs from these pins: a later start must know
    // whose they are.
    write_build_id(layout)?;

    for program in PROGRAMS.iter().filter(|p| missing.contains(&p.name)) {
        programs::load(&mut object, &btf, program)?;
        let link = programs::attach(&mut object, program)?;
        pin_link(layout, program.name, link)?;
    }
    // Dropping `object` closes our program fds; the pinned links keep the
    // programs attached, and the pinned maps keep the maps.
    Ok(())
}

/// The DNS observation programs (`cgroup_skb`), loaded (not attached) from
/// a copy of the object whose maps are the pinned ones: the agent attaches
/// them to the gated cgroups whose policies have host rules, and they stay
/// attached while it holds their links ([`crate::dns`]).
pub fn load_dns_programs(layout: &PinLayout) -> Result<aya::Ebpf, PinningError> {
    let (mut object, _btf) = load_object(layout)?;
    for name in programs::DNS_PROGRAMS {
        let program: &mut aya::programs::CgroupSkb = object
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?
            .try_into()
            .map_err(|source| LoadError::LoadProgram { name, source })?;
        program
            .load()
            .map_err(|source| LoadError::LoadProgram { name, source })?;
    }
    Ok(object)
}

/// Loads the object with its maps from (or into) the pins.
fn load_object(layout: &PinLayout) -> Result<(aya::Ebpf, Btf), PinningError> {
    if programs::OBJECT.is_empty() {
        return Err(LoadError::NoObject.into());
    }
    let btf = Btf::from_sys_fs().map_err(|source| PinningError::from(LoadError::Btf { source }))?;
    let offsets = programs::kernel_offsets()?;
    let digest_key = programs::random_digest_key()?;
    let kcore_ino = programs::proc_kcore_ino();
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&btf))
        .override_global(global_names::KERNEL_OFFSETS, &offsets, true)
        .override_global(global_names::DIGEST_KEY, &digest_key, true)
        .override_global(global_names::PROC_KCORE_INO, &kcore_ino, true);
    let map_paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, layout.map(name)))
        .collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let object = loader
        .load(programs::OBJECT)
        .map_err(|source| PinningError::Object {
            dir: layout.maps_dir(),
            source: Box::new(source),
        })?;
    Ok((object, btf))
}

/// Identity of the embedded object: its SHA-256.
#[must_use]
pub fn object_id() -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(programs::OBJECT).into()
}

fn any_link_pinned(layout: &PinLayout) -> bool {
    fs::read_dir(layout.links_dir()).is_ok_and(|mut entries| entries.next().is_some())
}

fn build_id_error(layout: &PinLayout) -> impl FnOnce(MapError) -> PinningError {
    let path = layout.map(map_names::BUILD_ID);
    move |source| PinningError::BuildId { path, source }
}

fn build_id_map(layout: &PinLayout) -> Result<Array<MapData, [u8; 32]>, PinningError> {
    let data =
        MapData::from_pin(layout.map(map_names::BUILD_ID)).map_err(build_id_error(layout))?;
    Array::try_from(Map::Array(data)).map_err(build_id_error(layout))
}

/// Refuses pinned programs that another build loaded (or one from before
/// builds were recorded).
fn check_build(layout: &PinLayout) -> Result<(), PinningError> {
    let ours = object_id();
    let pinned = if layout.map(map_names::BUILD_ID).exists() {
        build_id_map(layout)?
            .get(&0, 0)
            .map_err(build_id_error(layout))?
    } else {
        [0; 32]
    };
    if pinned == ours {
        return Ok(());
    }
    Err(PinningError::OtherBuild {
        dir: layout.root().to_owned(),
        pinned: if pinned == [0; 32] {
            "unrecorded".to_owned()
        } else {
            hex::encode(&pinned[..8])
        },
        ours: hex::encode(&ours[..8]),
    })
}

fn write_build_id(layout: &PinLayout) -> Result<(), PinningError> {
    build_id_map(layout)?
        .set(0, object_id(), 0)
        .map_err(build_id_error(layout))
}

/// Unpins (and so detaches) links of programs this build does not have
/// (pinned by hand, or left by a start this build interrupted): once this
/// build's programs are attached they only cost. Returns their names.
fn retire_unknown_links(layout: &PinLayout) -> Result<Vec<String>, PinningError> {
    let known = PinLayout::programs();
    let mut retired = Vec::new();
    let Ok(entries) = fs::read_dir(layout.links_dir()) else {
        return Ok(retired);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if known.contains(&name.as_str()) {
            continue;
        }
        let mut removed = Vec::new();
        remove_pin(&entry.path(), &mut removed)?;
        retired.push(name);
    }
    retired.sort();
    Ok(retired)
}

fn pin_link(layout: &PinLayout, name: &'static str, link: FdLink) -> Result<(), PinningError> {
    let path = layout.link(name);
    link.pin(&path).map_err(|source| PinningError::PinLink {
        name,
        path: path.clone(),
        source,
    })?;
    Ok(())
}

/// Removes every pinned link (LSM hooks first, so gating stops before its
/// helpers do) and every pinned map, then the directories. Returns the
/// pins removed.
pub fn unpin_all(layout: &PinLayout) -> Result<Vec<PathBuf>, PinningError> {
    let mut removed = Vec::new();
    let mut programs = PinLayout::programs();
    programs.reverse();
    for name in programs {
        remove_pin(&layout.link(name), &mut removed)?;
    }
    // Anything else left in the folders (an older version's names).
    for dir in [layout.links_dir(), layout.maps_dir()] {
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                remove_pin(&entry.path(), &mut removed)?;
            }
        }
    }
    for dir in [
        layout.links_dir(),
        layout.maps_dir(),
        layout.root().to_owned(),
    ] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PinningError::Unpin { path: dir, source }),
        }
    }
    Ok(removed)
}

fn remove_pin(path: &Path, removed: &mut Vec<PathBuf>) -> Result<(), PinningError> {
    match fs::remove_file(path) {
        Ok(()) => {
            removed.push(path.to_owned());
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinningError::Unpin {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_pins_under_links_and_maps() {
        let layout = PinLayout::new("/sys/fs/bpf/gk");
        assert_eq!(
            layout.link("socket_connect"),
            Path::new("/sys/fs/bpf/gk/links/socket_connect")
        );
        assert_eq!(
            layout.map(map_names::PENDING),
            Path::new("/sys/fs/bpf/gk/maps/PENDING")
        );
    }

    #[test]
    fn helper_programs_attach_before_lsm_hooks() {
        let programs = PinLayout::programs();
        let first_lsm = PROGRAMS
            .iter()
            .position(programs::Program::is_lsm)
            .expect("an lsm program");
        assert!(PROGRAMS[first_lsm..].iter().all(programs::Program::is_lsm));
        assert_eq!(programs.len(), PROGRAMS.len());
        assert_eq!(
            programs::lsm_programs().map(|p| p.name).collect::<Vec<_>>(),
            [
                "bprm_check_security",
                "socket_connect",
                "socket_sendmsg",
                "socket_create",
                "mmap_file",
                "file_mprotect",
                "task_kill",
                "ptrace_access_check",
                "bpf",
                "kernel_load_data",
                "kernel_read_file",
                "kernel_module_request",
                "file_open",
                "sb_mount",
                "sb_umount",
                "sb_remount",
                "move_mount",
                "sb_pivotroot",
                "file_permission",
                "task_alloc",
                "inode_create",
                "inode_mkdir",
                "inode_mknod",
                "inode_symlink",
                "inode_link",
                "inode_unlink",
                "inode_rmdir",
                "inode_rename",
                "inode_setattr",
            ]
        );
    }

    #[test]
    fn links_of_programs_this_version_lacks_are_retired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PinLayout::new(dir.path().join("gk"));
        fs::create_dir_all(layout.links_dir()).expect("mkdir");
        fs::write(layout.link("socket_connect"), "").expect("pin");
        fs::write(layout.link("sys_enter_execve"), "").expect("pin");
        fs::write(layout.link("sys_exit_execve"), "").expect("pin");
        let retired = retire_unknown_links(&layout).expect("retire");
        assert_eq!(retired, ["sys_enter_execve", "sys_exit_execve"]);
        assert_eq!(layout.pinned_programs(), ["socket_connect"]);
        assert!(!layout.link("sys_enter_execve").exists());
        assert!(retire_unknown_links(&layout).expect("again").is_empty());
    }

    #[test]
    fn pinned_programs_are_found_by_file_and_unpin_all_removes_everything() {
        // Plain files stand in for bpffs pins: the layout logic is the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PinLayout::new(dir.path().join("gk"));
        fs::create_dir_all(layout.links_dir()).expect("mkdir");
        fs::create_dir_all(layout.maps_dir()).expect("mkdir");
        fs::write(layout.link("socket_connect"), "").expect("pin");
        fs::write(layout.map(map_names::PENDING), "").expect("pin");
        fs::write(layout.map("OLD_MAP"), "").expect("pin");
        assert_eq!(layout.pinned_programs(), ["socket_connect"]);
        let removed = unpin_all(&layout).expect("unpin");
        assert_eq!(removed.len(), 3);
        assert!(!layout.root().exists());
        // Nothing pinned: unpinning again is a no-op.
        assert!(unpin_all(&layout).expect("again").is_empty());
    }
}
