//! Loading and attaching the kernel programs embedded at build time.

use std::io::Read as _;

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        BtfTracePoint, Lsm, ProgramError, TracePoint,
        links::{FdLink, LinkError},
    },
};
use gatekeep_common::{KernelOffsets, global_names};

use crate::bpf::btf::{BtfError, KernelBtf, Offsets};

/// The eBPF object built by `build.rs` (empty when built with
/// `AYA_BUILD_SKIP=1`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeep"));

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A BPF LSM hook: the gating programs.
    Lsm(&'static str),
    /// A static tracepoint, taken with its raw arguments (`tp_btf`).
    BtfTracePoint(&'static str),
    /// A static tracepoint, taken with its perf record: (category, name).
    TracePoint(&'static str, &'static str),
}

/// One program of the object and its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    pub hook: Hook,
}

impl Program {
    /// Whether this is one of the gating (LSM) programs.
    #[must_use]
    pub fn is_lsm(&self) -> bool {
        matches!(self.hook, Hook::Lsm(_))
    }
}

/// The DNS observation programs (`cgroup_skb`, issue 20 item 3): not in
/// [`PROGRAMS`], because the agent attaches them per gated cgroup
/// ([`crate::dns`]), never to the whole host.
pub const DNS_PROGRAMS: [&str; 2] = ["dns_egress", "dns_ingress"];

/// Every program of the object, in attach order: per-thread cleanup and
/// cgroup tracking first, so gating never runs without them. Nothing on
/// the exec or connect syscalls but the LSM hooks, which return after one
/// map lookup for tasks outside gated cgroups (argv is read inside the exec
/// hook, only when needed).
pub const PROGRAMS: &[Program] = &[
    Program {
        name: "sched_process_exit",
        hook: Hook::BtfTracePoint("sched_process_exit"),
    },
    Program {
        name: "cgroup_mkdir",
        hook: Hook::BtfTracePoint("cgroup_mkdir"),
    },
    // Before the exec hook: an exec it allows with a bound argv is checked
    // when its new program starts (issue 19, item 3).
    Program {
        name: "sched_process_exec",
        hook: Hook::BtfTracePoint("sched_process_exec"),
    },
    Program {
        name: "bprm_check_security",
        hook: Hook::Lsm("bprm_check_security"),
    },
    Program {
        name: "socket_connect",
        hook: Hook::Lsm("socket_connect"),
    },
    // Egress beyond connect (issue 19, item 6): sends to an address, raw and
    // packet sockets.
    Program {
        name: "socket_sendmsg",
        hook: Hook::Lsm("socket_sendmsg"),
    },
    Program {
        name: "socket_create",
        hook: Hook::Lsm("socket_create"),
    },
    // Code that runs without an exec (issue 19, item 2): files mapped with
    // PROT_EXEC meet the exec rules.
    Program {
        name: "mmap_file",
        hook: Hook::Lsm("mmap_file"),
    },
    Program {
        name: "file_mprotect",
        hook: Hook::Lsm("file_mprotect"),
    },
    // Self-protection (issue 18): see `crate::protect`.
    Program {
        name: "task_kill",
        hook: Hook::Lsm("task_kill"),
    },
    Program {
        name: "ptrace_access_check",
        hook: Hook::Lsm("ptrace_access_check"),
    },
    Program {
        name: "bpf",
        hook: Hook::Lsm("bpf"),
    },
    Program {
        name: "kernel_load_data",
        hook: Hook::Lsm("kernel_load_data"),
    },
    Program {
        name: "kernel_read_file",
        hook: Hook::Lsm("kernel_read_file"),
    },
    Program {
        name: "kernel_module_request",
        hook: Hook::Lsm("kernel_module_request"),
    },
    Program {
        name: "file_open",
        hook: Hook::Lsm("file_open"),
    },
    Program {
        name: "sb_mount",
        hook: Hook::Lsm("sb_mount"),
    },
    Program {
        name: "sb_umount",
        hook: Hook::Lsm("sb_umount"),
    },
    Program {
        name: "sb_remount",
        hook: Hook::Lsm("sb_remount"),
    },
    Program {
        name: "move_mount",
        hook: Hook::Lsm("move_mount"),
    },
    Program {
        name: "sb_pivotroot",
        hook: Hook::Lsm("sb_pivotroot"),
    },
    // Self-protection, items 3 and 5 of issue 18: gatekeep's files and the
    // gated cgroup subtree (gatekeep-ebpf hooks/protect_files.rs and
    // hooks/cgroup_escape.rs); `file_open` above also checks the files.
    Program {
        name: "file_permission",
        hook: Hook::Lsm("file_permission"),
    },
    Program {
        name: "task_alloc",
        hook: Hook::Lsm("task_alloc"),
    },
    Program {
        name: "inode_create",
        hook: Hook::Lsm("inode_create"),
    },
    Program {
        name: "inode_mkdir",
        hook: Hook::Lsm("inode_mkdir"),
    },
    Program {
        name: "inode_mknod",
        hook: Hook::Lsm("inode_mknod"),
    },
    Program {
        name: "inode_symlink",
        hook: Hook::Lsm("inode_symlink"),
    },
    Program {
        name: "inode_link",
        hook: Hook::Lsm("inode_link"),
    },
    Program {
        name: "inode_unlink",
        hook: Hook::Lsm("inode_unlink"),
    },
    Program {
        name: "inode_rmdir",
        hook: Hook::Lsm("inode_rmdir"),
    },
    Program {
        name: "inode_rename",
        hook: Hook::Lsm("inode_rename"),
    },
    Program {
        name: "inode_setattr",
        hook: Hook::Lsm("inode_setattr"),
    },
];

/// The gating programs alone.
pub fn lsm_programs() -> impl Iterator<Item = &'static Program> {
    PROGRAMS.iter().filter(|p| p.is_lsm())
}

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this agent was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NoObject,
    #[error("failed to read the kernel's BTF from {VMLINUX_BTF}")]
    Btf {
        #[source]
        source: aya::BtfError,
    },
    #[error("failed to resolve kernel struct offsets from {VMLINUX_BTF}")]
    Offsets {
        #[source]
        source: BtfError,
    },
    #[error("failed to read random bytes for the request digest key")]
    Random {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse or create the maps of the eBPF object")]
    Object {
        #[source]
        source: aya::EbpfError,
    },
    #[error("program `{name}` is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("failed to load program `{name}` into the kernel")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("failed to attach program `{name}`")]
    Attach {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the link of program `{name}` cannot be pinned")]
    LinkKind {
        name: &'static str,
        #[source]
        source: LinkError,
    },
}

/// The running kernel's struct offsets, in the layout the programs read.
pub fn kernel_offsets() -> Result<KernelOffsets, LoadError> {
    let btf = KernelBtf::from_file(VMLINUX_BTF).map_err(|source| LoadError::Offsets { source })?;
    let o = Offsets::resolve(&btf).map_err(|source| LoadError::Offsets { source })?;
    Ok(KernelOffsets {
        linux_binprm_file: o.linux_binprm_file,
        linux_binprm_filename: o.linux_binprm_filename,
        linux_binprm_interp: o.linux_binprm_interp,
        linux_binprm_buf: o.linux_binprm_buf,
        file_f_inode: o.file_f_inode,
        inode_i_ino: o.inode_i_ino,
        inode_i_sb: o.inode_i_sb,
        super_block_s_dev: o.super_block_s_dev,
        task_struct_ptrace: o.task_struct_ptrace,
        socket_type: o.socket_type,
        task_struct_real_parent: o.task_struct_real_parent,
        task_struct_tgid: o.task_struct_tgid,
        inode_i_mode: o.inode_i_mode,
        inode_i_rdev: o.inode_i_rdev,
        super_block_s_magic: o.super_block_s_magic,
        task_struct_group_leader: o.task_struct_group_leader,
        task_struct_start_boottime: o.task_struct_start_boottime,
        file_f_path_dentry: o.file_f_path_dentry,
        file_f_mode: o.file_f_mode,
        dentry_d_parent: o.dentry_d_parent,
        dentry_d_inode: o.dentry_d_inode,
        cgroup_kn: o.cgroup_kn,
        kernfs_node_id: o.kernfs_node_id,
        kernfs_node_parent: o.kernfs_node_parent,
        cgroup_root: o.cgroup_root,
        cgroup_root_hierarchy_id: o.cgroup_root_hierarchy_id,
        msghdr_msg_name: o.msghdr_msg_name,
        msghdr_msg_namelen: o.msghdr_msg_namelen,
        socket_sk: o.socket_sk,
        sock_skc_family: o.sock_skc_family,
        sock_sk_protocol: o.sock_sk_protocol,
        inode_i_ctime_sec: o.inode_i_ctime_sec,
        inode_i_ctime_nsec: o.inode_i_ctime_nsec,
        inode_i_size: o.inode_i_size,
        inode_i_generation: o.inode_i_generation,
        task_struct_mm: o.task_struct_mm,
        mm_struct_exe_file: o.mm_struct_exe_file,
        vm_area_struct_vm_file: o.vm_area_struct_vm_file,
        inode_i_nlink: o.inode_i_nlink,
        dentry_d_name_name: o.dentry_d_name_name,
        mm_struct_arg_start: o.mm_struct_arg_start,
        mm_struct_arg_end: o.mm_struct_arg_end,
        mm_struct_env_end: o.mm_struct_env_end,
    })
}

/// The inode number of `/proc/kcore` (the same in every procfs instance),
/// which the `file_open` program refuses to gated tasks; 0 (nothing
/// matches) on a kernel without it.
#[must_use]
pub fn proc_kcore_ino() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/kcore").map_or(0, |meta| meta.ino())
}

/// A fresh random key for the request digests.
pub fn random_digest_key() -> Result<[u64; 2], LoadError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| LoadError::Random { source })?;
    let (a, b) = bytes.split_at(8);
    let word = |s: &[u8]| {
        s.iter()
            .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte))
    };
    Ok([word(a), word(b)])
}

/// Parses the embedded object, sets its load-time globals (kernel offsets,
/// digest key) and creates its maps. No program is loaded yet.
pub fn open() -> Result<(Ebpf, Btf), LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let btf = Btf::from_sys_fs().map_err(|source| LoadError::Btf { source })?;
    let offsets = kernel_offsets()?;
    let digest_key = random_digest_key()?;
    let kcore_ino = proc_kcore_ino();
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(global_names::KERNEL_OFFSETS, &offsets, true)
        .override_global(global_names::DIGEST_KEY, &digest_key, true)
        .override_global(global_names::PROC_KCORE_INO, &kcore_ino, true)
        .load(OBJECT)
        .map_err(|source| LoadError::Object { source })?;
    Ok((ebpf, btf))
}

/// Loads (verifies) `program` into the kernel, without attaching it.
pub fn load(ebpf: &mut Ebpf, btf: &Btf, program: &Program) -> Result<(), LoadError> {
    let name = program.name;
    let object = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    let loaded = match program.hook {
        Hook::Lsm(hook) => <&mut Lsm>::try_from(object).and_then(|p| p.load(hook, btf)),
        Hook::BtfTracePoint(tracepoint) => {
            <&mut BtfTracePoint>::try_from(object).and_then(|p| p.load(tracepoint, btf))
        }
        Hook::TracePoint(..) => <&mut TracePoint>::try_from(object).and_then(TracePoint::load),
    };
    loaded.map_err(|source| LoadError::LoadProgram { name, source })
}

/// Attaches the loaded `program` and hands its link over (to pin it, or to
/// detach it by dropping it).
pub fn attach(ebpf: &mut Ebpf, program: &Program) -> Result<FdLink, LoadError> {
    let name = program.name;
    let object = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    let attach_error = |source| LoadError::Attach { name, source };
    Ok(match program.hook {
        Hook::Lsm(_) => {
            let p = <&mut Lsm>::try_from(object).map_err(attach_error)?;
            let id = p.attach().map_err(attach_error)?;
            p.take_link(id).map_err(attach_error)?.into()
        }
        Hook::BtfTracePoint(_) => {
            let p = <&mut BtfTracePoint>::try_from(object).map_err(attach_error)?;
            let id = p.attach().map_err(attach_error)?;
            p.take_link(id).map_err(attach_error)?.into()
        }
        Hook::TracePoint(category, tracepoint) => {
            let p = <&mut TracePoint>::try_from(object).map_err(attach_error)?;
            let id = p.attach(category, tracepoint).map_err(attach_error)?;
            let link = p.take_link(id).map_err(attach_error)?;
            FdLink::try_from(link).map_err(|source| LoadError::LinkKind { name, source })?
        }
    })
}

/// The object of [`load_and_attach`], with the links that keep its programs
/// attached; dropping it detaches them (gating programs first) and frees the
/// maps.
pub struct Attached {
    ebpf: Ebpf,
    links: Vec<FdLink>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Reverse attach order: the LSM hooks go first.
        while let Some(link) = self.links.pop() {
            drop(link);
        }
    }
}

impl std::ops::Deref for Attached {
    type Target = Ebpf;
    fn deref(&self) -> &Ebpf {
        &self.ebpf
    }
}

impl std::ops::DerefMut for Attached {
    fn deref_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Loads every program of `PROGRAMS` that `select` picks and attaches them
/// in order.
pub fn load_and_attach_only(select: impl Fn(&Program) -> bool) -> Result<Attached, LoadError> {
    let (mut ebpf, btf) = open()?;
    let mut links = Vec::new();
    for program in PROGRAMS.iter().filter(|p| select(p)) {
        load(&mut ebpf, &btf, program)?;
        links.push(attach(&mut ebpf, program)?);
    }
    Ok(Attached { ebpf, links })
}

/// Loads and attaches every program.
pub fn load_and_attach() -> Result<Attached, LoadError> {
    load_and_attach_only(|_| true)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use gatekeep_common::map_names;

    use super::OBJECT;

    /// The kernel's `#[map]` statics are named by their identifiers, which
    /// cannot be the `map_names` constants: this keeps the two equal.
    #[test]
    fn every_map_name_constant_is_a_map_of_the_object_and_back() {
        assert!(
            !OBJECT.is_empty(),
            "this test reads the eBPF object, which was not built (AYA_BUILD_SKIP=1): run it without AYA_BUILD_SKIP"
        );
        let object = aya_obj::Object::parse(OBJECT).expect("parse the embedded eBPF object");
        // Data sections (`.rodata`, `.bss`: the load-time globals) and
        // aya-log's own ring buffer are maps too, but not ours to name.
        let in_object: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.') && *name != "AYA_LOGS")
            .collect();
        let named: BTreeSet<&str> = map_names::ALL.iter().copied().collect();
        assert_eq!(named.len(), map_names::ALL.len(), "a name is listed twice");
        assert_eq!(
            in_object, named,
            "gatekeep_common::map_names and the maps of gatekeep-ebpf differ"
        );
        // The globals (`global_names`) need no test here: they are set with
        // `must_exist`, so a renamed static fails every load.
    }
}
