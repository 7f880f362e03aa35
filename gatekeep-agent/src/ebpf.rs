//! Loading and attaching the kernel programs embedded at build time.

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{Lsm, ProgramError},
};

/// The eBPF object built by `build.rs` (empty when built with
/// `AYA_BUILD_SKIP=1`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeep"));

/// Every LSM program in the object: (program name, kernel hook).
pub const LSM_PROGRAMS: &[(&str, &str)] = &[("bprm_check_security", "bprm_check_security")];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this agent was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NoObject,
    #[error("failed to read the kernel's BTF from /sys/kernel/btf/vmlinux")]
    Btf {
        #[source]
        source: aya::BtfError,
    },
    #[error("failed to parse or create the maps of the eBPF object")]
    Object {
        #[source]
        source: aya::EbpfError,
    },
    #[error("program `{name}` is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("failed to load lsm program `{name}` into the kernel")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("failed to attach lsm hook `{hook}`")]
    Attach {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// Parses the embedded object and creates its maps (no program is loaded
/// into the kernel yet).
pub fn open() -> Result<(Ebpf, Btf), LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let btf = Btf::from_sys_fs().map_err(|source| LoadError::Btf { source })?;
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(OBJECT)
        .map_err(|source| LoadError::Object { source })?;
    Ok((ebpf, btf))
}

/// Loads (verifies) one LSM program without attaching it.
pub fn load_lsm(ebpf: &mut Ebpf, btf: &Btf, name: &'static str, hook: &'static str) -> Result<(), LoadError> {
    let program: &mut Lsm = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::LoadProgram { name, source })?;
    program
        .load(hook, btf)
        .map_err(|source| LoadError::LoadProgram { name, source })
}

/// Loads and attaches every LSM program; they stay attached while `ebpf`
/// lives (dropping it detaches them).
pub fn load_and_attach() -> Result<Ebpf, LoadError> {
    let (mut ebpf, btf) = open()?;
    for &(name, hook) in LSM_PROGRAMS {
        load_lsm(&mut ebpf, &btf, name, hook)?;
        let program: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?
            .try_into()
            .map_err(|source| LoadError::Attach { hook, source })?;
        program.attach().map_err(|source| LoadError::Attach { hook, source })?;
    }
    Ok(ebpf)
}
