//! `gatekeep-agent`: the host daemon and its admin subcommands.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gatekeep_agent::{
    admin,
    config::{AgentConfig, DecisionMode, LogFormat},
    daemon, paths,
};

/// gatekeep host agent: gates execve and connect from policy-controlled
/// cgroups with BPF LSM, pausing sensitive ones for a human decision.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format (default: the config file's `log_format`, else text).
    #[arg(long, global = true, value_enum, env = "GATEKEEP_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// Where the agent's configuration file is.
#[derive(Debug, Clone, clap::Args)]
struct ConfigArg {
    /// The agent's configuration file (TOML).
    #[arg(long, env = "GATEKEEP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The configuration file this agent uses.
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(paths::CONFIG_FILE))
    }

    fn load(&self) -> anyhow::Result<AgentConfig> {
        let (path, explicit) = match &self.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(paths::CONFIG_FILE), false),
        };
        Ok(AgentConfig::load(&path, explicit)?)
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check policy files (or directories of them) as the agent would load
    /// them; print every problem with its line and column, exit 1 if any.
    /// Warnings (where a valid policy cannot keep its promise on this host)
    /// are printed before the summary and do not fail; `gatekeep policy
    /// validate --deny-warnings` fails on them.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Prove the local audit log's hash chain; exit 1 and name the first
    /// tampered record if it is broken.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// The audit database (default: the config file's `audit_db`).
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write the local audit log as JSON Lines (every field, both hashes).
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// The audit database (default: the config file's `audit_db`).
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Only records from this sequence number on.
        #[arg(long, value_name = "SEQ")]
        from_seq: Option<u64>,
        /// Write here instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the kernel programs and report exec events (smoke run).
    Probe,
    /// Check that this host can run gatekeep (kernel, BTF, BPF LSM, mounts,
    /// capabilities) and trial-load the programs; exit 1 if it cannot.
    Check(gatekeep_agent::preflight::Options),
    /// Run the agent: load (or adopt) and pin the programs, enforce the
    /// policies, pause and resume asked syscalls, keep the audit log.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Create this file (holding the agent's pid) once the agent is
        /// enforcing and handling requests; removed at exit.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The local audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show the pinned programs, paused requests and kernel counters.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Deliberately remove gatekeep from the kernel: deny every paused
    /// request, then unpin (detach) the programs and maps.
    Unload {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Protect another process of gatekeep's (a local `gatekeep-server`):
    /// gated tasks cannot signal, ptrace or read it through /proc while it
    /// runs (e.g. `ExecStartPost=gatekeep-agent protect $MAINPID`).
    Protect {
        #[command(flatten)]
        config: ConfigArg,
        pid: u32,
    },
    /// Reviewers of the embedded decision service (`[decision] mode =
    /// "embedded"`, the default).
    #[command(subcommand)]
    Reviewers(ReviewersCommand),
}

#[derive(Debug, Subcommand)]
enum ReviewersCommand {
    /// Add a reviewer and print their token (shown once; only its hash is
    /// stored). Works while the agent runs.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// The reviewer's name (never the user a gated workload runs as:
        /// nobody approves their own requests).
        name: String,
        /// Reviewer group (repeat for several); policies name the groups
        /// that may decide (`[policy.approval] reviewers`).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
}

fn init_logging_to<W>(format: LogFormat, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Lines the daemon's log queues for its standard error before it drops them.
const LOG_QUEUE_LINES: usize = 16_384;
/// How often the daemon says how many log lines it dropped.
const LOG_DROPS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The daemon logs through a bounded queue and a writer thread. Whatever reads its standard
/// error (journald, a pipe, a terminal) may stall, and may even be a process in a gated
/// cgroup that the agent itself has paused: a blocking write would then stop the agent
/// deciding, and nobody would resume the reader. So a full queue drops lines, and counts
/// them; the audit log, not this log, is the record of what was decided.
fn init_daemon_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gatekeep-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    init_logging_to(format, writer);
    let watcher = std::thread::Builder::new()
        .name("gatekeep-log-drops".to_owned())
        .spawn(move || {
            let mut reported = 0;
            loop {
                std::thread::sleep(LOG_DROPS_EVERY);
                let total = dropped.dropped_lines();
                if total > reported {
                    // Queued like any line: it gets out once the reader reads again.
                    tracing::warn!(
                        dropped = total - reported,
                        total,
                        "log lines dropped: whatever reads the agent's standard error \
                         (journald, a pipe) is not keeping up; the audit log is complete"
                    );
                    reported = total;
                }
            }
        });
    if let Err(error) = watcher {
        tracing::warn!(%error, "cannot watch for dropped log lines");
    }
    guard
}

/// `reviewers add`: a reviewer of the embedded service, and their token.
fn add_reviewer(config: &AgentConfig, name: &str, groups: &[String]) -> anyhow::Result<()> {
    if config.decision.mode() != DecisionMode::Embedded {
        anyhow::bail!(
            "this agent does not run the embedded decision service (`[decision] mode = \"{}\"`); add reviewers on the service's host with `gatekeep-server reviewers add NAME`",
            config.decision.mode().as_str()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let token = runtime.block_on(gatekeep_agent::decision::embedded::add_reviewer(
        &config.state_dir,
        name,
        groups,
        false,
    ))?;
    eprintln!("added reviewer `{name}`; their token (shown once, keep it secret):");
    println!("{token}");
    Ok(())
}

/// `protect PID`.
fn protect(config: &AgentConfig, pid: u32) -> anyhow::Result<()> {
    admin::protect_process(&config.pin_dir, &config.proc_root, pid)?;
    println!("process {pid} is protected from gated tasks while it runs");
    Ok(())
}

/// `status` as text.
fn print_status(status: &admin::Status) {
    println!("audit log: {}", status.audit.summary);
    println!("pin dir: {}", status.pin_dir.display());
    println!("programs pinned: {}", status.programs_pinned.join(", "));
    if !status.programs_missing.is_empty() {
        println!(
            "programs NOT pinned: {}",
            status.programs_missing.join(", ")
        );
    }
    println!("paused requests: {}", status.paused_requests.len());
    for paused in &status.paused_requests {
        println!(
            "  pid {} tid {} {} policy {} paused {} ms",
            paused.pid, paused.tid, paused.kind, paused.policy_id, paused.paused_for_ms
        );
    }
    for (name, value) in &status.counters {
        println!("{name}: {value}");
    }
    println!(
        "protected processes: {}",
        status
            .protected_processes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "self-protection refusals: {}",
        status.protect_refusals.iter().map(|r| r.count).sum::<u64>()
    );
    for refusal in &status.protect_refusals {
        println!(
            "  {} refused {} time(s) in cgroup {}",
            refusal.protection, refusal.count, refusal.cgroup_id
        );
    }
    println!(
        "grants: {} ({} kernel entries)",
        status.grants.len(),
        status.kernel_grants
    );
    for grant in &status.grants {
        let g = &grant.grant;
        let until = g
            .expires_at
            .map_or_else(|| "no expiry".to_owned(), |at| format!("until {at}"));
        let scope = match (g.is_workload(), g.cgroup.as_deref()) {
            (true, Some(c)) => format!(" scope workload {c}"),
            (true, None) => " scope workload (unknown cgroup)".to_owned(),
            (false, _) => " scope policy (every workload)".to_owned(),
        };
        println!(
            "  {} policy {} {} `{}` {}{scope}, {until}, by {}{}",
            g.id,
            g.policy,
            g.kind,
            g.target,
            g.duration,
            g.created_by,
            if grant.in_kernel {
                ""
            } else {
                " (not in the kernel)"
            }
        );
    }
}

/// `gatekeep-agent run`.
fn run(
    config: &ConfigArg,
    ready_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
) -> anyhow::Result<()> {
    let options = daemon::RunOptions {
        ready_file,
        config_file: Some(config.path()),
    };
    let config = config.load()?;
    let _log_writer = init_daemon_logging(log_format.unwrap_or(config.log_format));
    tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(daemon::run(config, options))?;
    Ok(())
}

/// Keeps glibc's malloc from holding on to memory a daemon that mostly waits does not use.
///
/// - glibc gives each thread that allocates an arena of its own (up to 8 per core), and
///   each keeps what was freed in it: two arenas are plenty (the embedded service's
///   threads allocate too).
/// - By default, freeing a large (mmap'd) block raises the mmap and trim thresholds to its
///   size, so later blocks of that size come from the heap and stay resident once freed:
///   one buffer of a few MiB, taken about 16 s after start and freed, added 3.2 MiB to
///   the idle RSS for good (in the VM: 30.6 -> 33.9 MiB). Fixed thresholds of 128 KiB
///   (glibc's own starting values) give such blocks back when they are freed.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    {
        const THRESHOLD: libc::c_int = 128 << 10;
        // SAFETY: allocator tunables, set before the runtime starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe => {
            let _ebpf = gatekeep_agent::bpf::programs::load_and_attach()?;
            println!("attached");
            Ok(())
        }
        Command::Check(opts) => {
            if !gatekeep_agent::preflight::run(&opts)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Run { config, ready_file } => run(&config, ready_file, cli.log_format),
        Command::Policy(PolicyCommand::Validate { paths }) => {
            if let Err(err) = admin::validate_policy(&paths, &mut std::io::stdout().lock()) {
                eprintln!("{err}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Audit(AuditCommand::Verify { config, db, output }) => {
            let db = match db {
                Some(db) => db,
                None => config.load()?.audit_db,
            };
            if let Err(err) =
                admin::verify_audit(&db, output == Output::Json, &mut std::io::stdout().lock())
            {
                eprintln!("error: {err}");
                let mut source = std::error::Error::source(&err);
                while let Some(cause) = source {
                    eprintln!("  caused by: {cause}");
                    source = cause.source();
                }
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Audit(AuditCommand::Export {
            config,
            db,
            format: ExportFormat::Jsonl,
            from_seq,
            output,
        }) => {
            let db = match db {
                Some(db) => db,
                None => config.load()?.audit_db,
            };
            admin::export_audit(&db, from_seq, output.as_deref())?;
            Ok(())
        }
        Command::Status { config, output } => {
            let config = config.load()?;
            let status = admin::status(&config.pin_dir, &config.state_dir, &config.audit_db)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Unload { config } => {
            let config = config.load()?;
            let report = admin::unload(&config.pin_dir, &config.proc_root)?;
            println!(
                "denied {} paused request(s); removed {} pin(s) under {}",
                report.denied,
                report.pins_removed.len(),
                config.pin_dir.display()
            );
            if !report.still_paused.is_empty() {
                println!(
                    "warning: threads still paused (now ungated): {:?}",
                    report.still_paused
                );
            }
            Ok(())
        }
        Command::Protect { config, pid } => protect(&config.load()?, pid),
        Command::Reviewers(ReviewersCommand::Add {
            config,
            name,
            groups,
        }) => add_reviewer(&config.load()?, &name, &groups),
    }
}
