//! `gatekeep-bench`: the benchmark workloads behind `cargo xtask bench`.
//!
//! - `native`: the decision service, the audit logs and memory, no kernel needed;
//! - `vm`: exec/connect overhead, the ask path and event throughput under a real kernel
//!   (inside the VM that `cargo xtask bench` boots);
//! - `worker`, `agent-memory`: the processes those spawn (`native` also runs the
//!   `gatekeep-server` binary, `vm` the agent's and the server's binaries).
//!
//! Every result is printed as a `GATEKEEP-BENCH {json}` line (see [`report::Figure`]);
//! benchmarks print figures and never fail on timing.

mod native;
mod report;
mod server;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gatekeep-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decision round trips, service throughput, audit throughput, memory (no kernel needed).
    Native(native::NativeOptions),
    /// Exec/connect overhead, ask path and event throughput (in the VM only).
    Vm(vm::VmOptions),
    /// A measured loop (started by `vm`).
    #[command(hide = true)]
    Worker(vm::worker::WorkerOptions),
    /// The agent pipeline's memory with N pending requests (started by `native`).
    #[command(hide = true)]
    AgentMemory { pending: usize },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Native(opts) => native::run(opts),
        Command::Vm(opts) => vm::run(opts),
        Command::Worker(opts) => vm::worker::run(opts),
        Command::AgentMemory { pending } => native::agent::memory(*pending),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gatekeep-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
