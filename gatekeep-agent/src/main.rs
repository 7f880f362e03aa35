//! `gatekeep-agent`: the host daemon and its admin subcommands.

use clap::{Parser, Subcommand};

/// gatekeep host agent: gates execve and connect from policy-controlled
/// cgroups with BPF LSM, pausing sensitive ones for a human decision.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the kernel programs and report exec events (smoke run).
    Probe,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe => {
            let _ebpf = gatekeep_agent::ebpf::load_and_attach()?;
            println!("attached");
            Ok(())
        }
    }
}
