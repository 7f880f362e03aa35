//! `cargo xtask`: gatekeep's developer and CI tasks. See each subcommand's `--help`.

mod bench;
mod console;
mod demo;
mod fuzz;
mod lint;
mod module_cycles;
mod setup;
mod test;
mod vm_run;
mod vm_test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::PayloadFailed;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing needs (rust-src, bpf-linker, QEMU, busybox) and
    /// prepare the VM kernel. Idempotent.
    Setup(setup::Options),
    /// Run every test: native ones, then the in-VM suite.
    Test(test::Options),
    /// Run the in-VM test suite (`tests/vm`) under Debian's kernel in QEMU.
    VmTest(vm_test::Options),
    /// Run a command as root in the VM, with gatekeep's binaries on PATH.
    VmRun(vm_run::Options),
    /// Show the approval flow in the VM: a workload's connect and exec are paused, a
    /// reviewer approves one and denies the other (you, or the script with `--auto`),
    /// then both audit logs are printed and verified.
    Demo(demo::Options),
    /// Enforce the house rules: rustfmt, clippy with `-D warnings`, cargo-deny (deny.toml).
    /// Installs rustfmt (nightly) and cargo-deny first if they are missing.
    Lint(lint::Options),
    /// Run the benchmarks (natively, then in the VM) and print one table of figures,
    /// baselines, ratios and targets; also written as JSON under `target/bench/`.
    Bench(bench::Options),
    /// Build the libFuzzer targets in `fuzz/` (nightly) and run each for a while over its
    /// seeds; prints executions and coverage, fails on a crash with the input that caused it.
    Fuzz(fuzz::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Task::Setup(opts) => setup::run(opts),
        Task::Test(opts) => setup::ensure().and_then(|()| test::run(opts)),
        Task::VmTest(opts) => setup::ensure().and_then(|()| vm_test::run(opts)),
        Task::VmRun(opts) => setup::ensure().and_then(|()| vm_run::run(opts)),
        Task::Demo(opts) => setup::ensure().and_then(|()| demo::run(opts)),
        Task::Lint(opts) => lint::run(opts),
        Task::Bench(opts) => setup::ensure().and_then(|()| bench::run(opts)),
        Task::Fuzz(opts) => fuzz::run(opts),
    };
    let Err(err) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    // A failing command in the VM: exit with its own status, like running it directly.
    match err.downcast_ref::<PayloadFailed>() {
        Some(failed) => ExitCode::from(u8::try_from(failed.code).unwrap_or(1).max(1)),
        None => ExitCode::FAILURE,
    }
}
