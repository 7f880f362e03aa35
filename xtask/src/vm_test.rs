//! `cargo xtask vm-test [-- <libtest args>]`: builds the in-VM test suite
//! (`tests/vm/main.rs`, target `vm` of `gatekeep-tests`) and the agent, boots them in the
//! VM, and fails unless every test passes there.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use xtask::{
    PayloadFailed, TestCounts,
    vm::{self, Initramfs, Kernel, Payload, VmArgs, VmBuild},
};

/// The test binary's name on the VM's `PATH`.
const TEST_BINARY: &str = "gatekeep-vm-tests";
/// The VM suite's default time limit.
const VM_TEST_TIMEOUT_SECS: u64 = 2700;

#[derive(Debug, Args)]
pub struct Options {
    /// Give up (and kill the VM) after this many seconds: a guard against a hang, not a
    /// target (the whole suite takes 15 to 25 minutes under TCG, more on a loaded host).
    #[arg(long, default_value_t = VM_TEST_TIMEOUT_SECS, value_name = "SECS")]
    pub timeout: u64,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Arguments for the test binary (libtest's: a name filter, `--exact`, `--nocapture`...).
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: VM_TEST_TIMEOUT_SECS,
            vm: VmArgs::default(),
            test_args: Vec::new(),
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    run_counted(opts, &mut TestCounts::default())
}

/// [`run`], adding the suite's libtest result line to `counts` (also when it fails).
pub fn run_counted(opts: &Options, counts: &mut TestCounts) -> Result<()> {
    let kernel = Kernel::load()?;
    let started = Instant::now();
    let VmBuild { binaries, test, .. } = vm::build_for_vm(vm::Extras::TestsAndBench)?;
    let tests = test.context("cargo did not build the VM test suite")?;
    eprintln!(
        "[vm-test] built in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let initramfs = Initramfs::new("vm-test")?;
    initramfs.add_busybox()?;
    initramfs.add_modules(&kernel)?;
    for (name, path) in &binaries {
        initramfs.add_executable(path, name)?;
    }
    initramfs.add_executable(&tests, TEST_BINARY)?;
    // A real bash (busybox has none), for scripts run by an interpreter.
    initramfs.add_executable(std::path::Path::new("/bin/bash"), "bash")?;
    let mut argv = vec![TEST_BINARY.to_owned(), "--test-threads=1".to_owned()];
    argv.extend(opts.test_args.iter().cloned());
    let initrd = initramfs.finish(&Payload {
        env: vec![
            ("GATEKEEP_IN_VM".to_owned(), "1".to_owned()),
            ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
        ],
        argv,
    })?;

    let code = vm::boot(
        &kernel,
        &initrd,
        &opts.vm,
        Duration::from_secs(opts.timeout),
        &mut |line| counts.observe(line),
    )?;
    if code != 0 {
        bail!(PayloadFailed {
            what: "the test suite".to_owned(),
            code,
        });
    }
    eprintln!("[vm-test] VM tests: {counts}");
    Ok(())
}
