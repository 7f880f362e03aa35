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
    /// Check that this host can run gatekeep (kernel, BTF, BPF LSM, mounts,
    /// capabilities) and trial-load the programs; exit 1 if it cannot.
    Check(gatekeep_agent::preflight::Options),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe => {
            let _ebpf = gatekeep_agent::ebpf::load_and_attach()?;
            println!("attached");
            Ok(())
        }
        Command::Check(opts) => {
            if !gatekeep_agent::preflight::run(&opts)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
