//! Loading and attaching the kernel programs embedded at build time.

use std::io::Read as _;

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{Lsm, ProgramError, TracePoint},
};
use gatekeep_common::KernelOffsets;

use crate::kernel_btf::{BtfError, KernelBtf, Offsets};

/// The eBPF object built by `build.rs` (empty when built with
/// `AYA_BUILD_SKIP=1`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeep"));

/// Every LSM program in the object: (program name, kernel hook).
pub const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("bprm_check_security", "bprm_check_security"),
    ("socket_connect", "socket_connect"),
];

/// Every tracepoint program: (program name, category, tracepoint). They
/// capture argv at execve entry and clean up per-thread state; attached
/// before the LSM hooks so gating never runs without them.
pub const TRACEPOINT_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_execve", "syscalls", "sys_enter_execve"),
    ("sys_enter_execveat", "syscalls", "sys_enter_execveat"),
    ("sys_exit_execve", "syscalls", "sys_exit_execve"),
    ("sys_exit_execveat", "syscalls", "sys_exit_execveat"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("cgroup_mkdir", "cgroup", "cgroup_mkdir"),
    ("cgroup_attach_task", "cgroup", "cgroup_attach_task"),
];

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
}

/// The running kernel's struct offsets, in the layout the programs read.
pub fn kernel_offsets() -> Result<KernelOffsets, LoadError> {
    let btf = KernelBtf::from_file(VMLINUX_BTF).map_err(|source| LoadError::Offsets { source })?;
    let o = Offsets::resolve(&btf).map_err(|source| LoadError::Offsets { source })?;
    Ok(KernelOffsets {
        linux_binprm_file: o.linux_binprm_file,
        linux_binprm_filename: o.linux_binprm_filename,
        file_f_inode: o.file_f_inode,
        inode_i_ino: o.inode_i_ino,
        inode_i_sb: o.inode_i_sb,
        super_block_s_dev: o.super_block_s_dev,
        task_struct_ptrace: o.task_struct_ptrace,
        socket_type: o.socket_type,
        task_struct_real_parent: o.task_struct_real_parent,
        task_struct_tgid: o.task_struct_tgid,
    })
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
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("KERNEL_OFFSETS", &offsets, true)
        .override_global("DIGEST_KEY", &digest_key, true)
        .load(OBJECT)
        .map_err(|source| LoadError::Object { source })?;
    Ok((ebpf, btf))
}

/// Loads (verifies) LSM program `name` for `hook`, without attaching it.
pub fn load_lsm<'a>(
    ebpf: &'a mut Ebpf,
    btf: &Btf,
    name: &'static str,
    hook: &'static str,
) -> Result<&'a mut Lsm, LoadError> {
    let program: &mut Lsm = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::LoadProgram { name, source })?;
    program
        .load(hook, btf)
        .map_err(|source| LoadError::LoadProgram { name, source })?;
    Ok(program)
}

/// Loads (verifies) tracepoint program `name`, without attaching it.
pub fn load_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut TracePoint, LoadError> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::LoadProgram { name, source })?;
    program
        .load()
        .map_err(|source| LoadError::LoadProgram { name, source })?;
    Ok(program)
}

/// Loads and attaches every program; they stay attached while `ebpf`
/// lives (dropping it detaches them).
pub fn load_and_attach() -> Result<Ebpf, LoadError> {
    let (mut ebpf, btf) = open()?;
    for &(name, category, tracepoint) in TRACEPOINT_PROGRAMS {
        load_tracepoint(&mut ebpf, name)?
            .attach(category, tracepoint)
            .map_err(|source| LoadError::Attach { name, source })?;
    }
    for &(name, hook) in LSM_PROGRAMS {
        load_lsm(&mut ebpf, &btf, name, hook)?
            .attach()
            .map_err(|source| LoadError::Attach { name, source })?;
    }
    Ok(ebpf)
}
