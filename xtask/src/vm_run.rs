//! `cargo xtask vm-run [--file SRC:DEST]... -- CMD...`: boots the VM with gatekeep's
//! binaries on `PATH` and the given files copied in, runs `CMD` as root, and exits with its
//! status.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use clap::Args;
use xtask::{
    PayloadFailed,
    vm::{self, Initramfs, Kernel, Payload, VmArgs},
};

#[derive(Debug, Args)]
pub struct Options {
    /// Copy a host file or folder into the VM at an absolute path (`SRC` alone: the same
    /// path). Repeatable.
    #[arg(long = "file", value_name = "SRC:DEST", value_parser = parse_file)]
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Give up (and kill the VM) after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// Skip building gatekeep's binaries: boot busybox and the `--file`s only.
    #[arg(long)]
    pub no_build: bool,
    #[command(flatten)]
    pub vm: VmArgs,
    /// The command to run in the VM, as root, with its arguments passed unchanged (for
    /// shell syntax: `-- sh -c '...'`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_file(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let (src, dest) = spec.split_once(':').unwrap_or((spec, spec));
    let (src, dest) = (PathBuf::from(src), PathBuf::from(dest));
    ensure!(
        dest.is_absolute(),
        "the VM path `{}` must be absolute",
        dest.display()
    );
    ensure!(
        Path::new(&src).exists(),
        "`{}` does not exist",
        src.display()
    );
    Ok((src, dest))
}

pub fn run(opts: &Options) -> Result<()> {
    let kernel = Kernel::load()?;
    let binaries = if opts.no_build {
        Vec::new()
    } else {
        vm::build_for_vm(vm::Extras::None)?.binaries
    };

    let initramfs = Initramfs::new("vm-run")?;
    initramfs.add_busybox()?;
    initramfs.add_modules(&kernel)?;
    for (name, path) in &binaries {
        initramfs.add_executable(path, name)?;
    }
    for (src, dest) in &opts.files {
        initramfs.add_payload_file(src, dest)?;
    }
    let initrd = initramfs.finish(&Payload {
        env: vec![("RUST_BACKTRACE".to_owned(), "1".to_owned())],
        argv: opts.command.clone(),
    })?;

    let code = vm::boot(
        &kernel,
        &initrd,
        &opts.vm,
        Duration::from_secs(opts.timeout),
        &mut |_| {},
    )?;
    if code != 0 {
        bail!(PayloadFailed {
            what: format!("`{}`", opts.command.join(" ")),
            code,
        });
    }
    Ok(())
}
