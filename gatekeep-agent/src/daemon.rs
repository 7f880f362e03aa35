//! `gatekeep-agent run`: the daemon's tasks and how they are wired.
//!
//! ```text
//!  ring buffer ──reader──► controller ◄── decision / resume tasks
//!                              │  ▲
//!                  audit sink ◄┘  └── policy watch (reload, rescan)
//!  kernel task (owns the maps) ◄── everyone, via KernelHandle
//! ```
//!
//! SIGINT/SIGTERM flip one shutdown flag every task watches; SIGHUP reloads
//! the policy. Shutdown never detaches the programs and never continues a
//! paused task: the next agent adopts both.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use gatekeep_audit::{AuditError, AuditRecord, RecordKind};
use gatekeep_common::map_names;
use gatekeep_policy::{PolicyError, PolicySet};
use gatekeep_proto::audit;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    audit::{AuditHandle, AuditPipeline, AuditSink as _},
    audit_health,
    bpf::{
        events::{Event, reader::EventReader},
        kernel::{self, KernelHandle, KernelMaps, PauseKernel as _},
        kernel_log,
        pinning::{self, PinLayout, PinningError},
    },
    config::{AgentConfig, DecisionMode},
    decision::service::{self, DecisionService, ServiceError},
    hooks::protect_files,
    metrics::{AgentMetrics, Snapshot},
    pause::{
        controller::{Controller, Parts, Stats},
        enrich::Enricher,
        resume::{PauseTiming, ProcTasks},
    },
    policy::{self, Compiled, HostView, MapState, PolicyMapsError},
    protect::{self, HeldLinks, ProtectError, ProtectHandle, ProtectMaps},
};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "invalid policy in `{}`; nothing was changed (programs already pinned keep enforcing the last loaded policy)",
        dir.display()
    )]
    Policy {
        dir: PathBuf,
        #[source]
        source: PolicyError,
    },
    #[error("failed to start DNS observation (host-name connect rules)")]
    Dns {
        #[source]
        source: crate::dns::DnsError,
    },
    #[error("failed to open the audit log `{}`", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: AuditError,
    },
    #[error(
        "failed to load or adopt the kernel programs (`gatekeep-agent check` diagnoses this host)"
    )]
    Pinning(#[from] PinningError),
    #[error("failed to compile the policy into kernel maps")]
    Compile {
        #[source]
        source: PolicyMapsError,
    },
    #[error("failed to write the policy into the kernel maps")]
    Apply {
        #[source]
        source: kernel::KernelError,
    },
    #[error("failed to watch the ring buffer")]
    RingBuffer {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ServedByAProcess(#[from] crate::deps::ServedByAProcess),
    #[error("failed to install signal handlers")]
    Signals {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write the ready file `{}`", path.display())]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to commit the audit log at shutdown")]
    AuditShutdown {
        #[source]
        source: AuditError,
    },
    #[error("a blocking task panicked")]
    Join {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("failed to set up self-protection (the PROTECT_* and SERVICE_LISTENERS maps)")]
    Protect {
        #[source]
        source: ProtectError,
    },
    #[error("failed to serve metrics (`[metrics] listen` in the config)")]
    Metrics {
        #[source]
        source: gatekeep_server::Error,
    },
    #[error("failed to start the decision side (`[decision]` in the config)")]
    Decision {
        #[source]
        source: ServiceError,
    },
}

/// Options of `run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Created (with the agent's pid) once everything is attached, the
    /// policy applied and requests are being handled; removed at exit.
    pub ready_file: Option<PathBuf>,
    /// The configuration file the agent was started with: protected from
    /// gated tasks like the rest of gatekeep's files.
    pub config_file: Option<PathBuf>,
}

/// Runs the daemon until SIGINT/SIGTERM, with the decider `[decision]`
/// names (the embedded decision service by default). Each step is a
/// function below, in this order.
#[expect(
    clippy::too_many_lines,
    reason = "the daemon's start and stop in order, one numbered step after another"
)]
pub async fn run(config: AgentConfig, options: RunOptions) -> Result<(), DaemonError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signals = Signals::install()?;
    // 0. Nothing the agent waits on may be served by a process it could pause.
    crate::deps::check_paths(&config)?;
    // 1. The policy must be valid before anything changes.
    let set = load_policy(&config.policy_dir).await?;
    let fingerprint = policy_fingerprint(&config.policy_dir);
    // 2. The audit log.
    let audit = open_audit(&config)?;
    let sink = Arc::new(audit.handle.clone());
    // 3. The programs: loaded and pinned, or adopted; one task owns the maps.
    let kernel = load_kernel(&config).await?;
    // 3b. Self-protection: hold every link (a removed pin detaches nothing),
    //     protect this process, fence off the decision service.
    let links = HeldLinks::open(&kernel.layout)?;
    let protect_maps = setup_protection(&config, &kernel.layout).await?;
    // 4. The policy into the maps (fresh ids: the old set stays in force
    //    until each cgroup switches).
    let startup = apply_startup_policy(
        &config,
        options.config_file.as_deref(),
        &kernel,
        &protect_maps,
        &set,
        &sink,
        links.len(),
    )
    .await?;
    // The programs' own diagnostics (one log buffer per loaded object).
    let kernel_logs = kernel_log::attach(&kernel.layout, "bprm_check_security")
        .map(|logger| tokio::spawn(kernel_log::drain(logger, shutdown_rx.clone())));
    // 5. The request path: the ring buffer's reader (DNS records go to the
    //    observer, in ring order).
    let (dns_tx, dns_rx) = mpsc::channel(DNS_QUEUE);
    let reader = start_reader(kernel.events, dns_tx, shutdown_rx.clone()).await?;
    let (policies_tx, policies_rx) = watch::channel(Arc::new(startup.compiled));
    // 5b. Host-name connect rules: DNS observation where policies need it.
    let dns_task = start_dns(&config, &kernel.layout, &policies_rx, dns_rx, &shutdown_rx)?;
    // 6. Who decides: the embedded service, a central one, or timeouts only.
    let decision = service::start(service::Wiring {
        config: &config,
        kernel: &kernel.handle,
        audit: Arc::clone(&sink),
        start: kernel.start,
        policies: policies_rx.clone(),
        shutdown: shutdown_rx.clone(),
    })
    .await
    .map_err(|source| DaemonError::Decision { source })?;
    // 6b. The audit log's health: status file, logs, the decision service.
    let health_task = start_audit_health(&config, &audit, &decision, &shutdown_rx);
    // 6c. Metrics, when `[metrics] listen` is set.
    let metrics = Arc::new(AgentMetrics::new());
    if let Some(addr) = config.metrics.listen {
        let shipping = decision.shipping();
        serve_metrics(
            addr,
            &metrics,
            &kernel.handle,
            &audit,
            shipping,
            &shutdown_rx,
        )
        .await?;
    }
    // 7. The controller (paused requests) and the policy watch.
    let controller_task = start_controller(
        &config,
        &kernel.handle,
        &sink,
        &decision,
        reader.events,
        &policies_rx,
        &shutdown_rx,
        &metrics,
    );
    let protect_task = tokio::spawn(protect::run(
        Arc::clone(&protect_maps),
        links,
        kernel.layout.clone(),
        Arc::clone(&sink),
        config.host.clone(),
        policies_rx.clone(),
        PROTECT_INTERVAL,
        shutdown_rx.clone(),
    ));
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let watcher_task = tokio::spawn(watch_policy(
        config.clone(),
        kernel.handle.clone(),
        Arc::clone(&protect_maps),
        policies_tx,
        Arc::clone(&sink),
        startup.host,
        fingerprint,
        reload_rx,
        reader.classify,
        shutdown_rx.clone(),
    ));
    // 8. Ready.
    announce_ready(&Ready {
        config: &config,
        options: &options,
        kernel: &kernel.summary,
        compiled: &policies_rx.borrow(),
        decision: &decision,
        paused_found: startup.paused_found,
        buffered_events: reader.backlog,
        kernel_logs: kernel_logs.is_some(),
    })?;
    // 9. Serve until SIGINT/SIGTERM (SIGHUP reloads the policy).
    signals.wait(&reload_tx).await;
    // 10. Stop: every task drains, the audit log commits, nothing is
    //     detached and no paused task is continued.
    let _ = shutdown_tx.send(true);
    shut_down(Stopping {
        config: &config,
        options: &options,
        controller_task,
        reader_task: reader.task,
        watcher_task,
        protect_task,
        dns_task,
        health_task,
        decision,
        kernel_logs,
        kernel: kernel.handle,
        kernel_task: kernel.task,
        sink,
        audit,
    })
    .await
}

/// SIGTERM, SIGINT and SIGHUP, installed before anything starts.
struct Signals {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        let install = |kind| signal(kind).map_err(|source| DaemonError::Signals { source });
        Ok(Self {
            sigterm: install(SignalKind::terminate())?,
            sigint: install(SignalKind::interrupt())?,
            sighup: install(SignalKind::hangup())?,
        })
    }

    /// Returns at SIGTERM or SIGINT; a SIGHUP asks `reload` for a reload.
    async fn wait(mut self, reload: &mpsc::Sender<()>) {
        loop {
            tokio::select! {
                _ = self.sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = self.sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = self.sighup.recv() => {
                    tracing::info!("SIGHUP: reloading the policy");
                    let _ = reload.try_send(());
                }
            }
        }
    }
}

fn open_audit(config: &AgentConfig) -> Result<AuditPipeline, DaemonError> {
    AuditPipeline::open(&config.audit_db).map_err(|source| DaemonError::Audit {
        path: config.audit_db.clone(),
        source,
    })
}

/// What loading (or adopting) the programs gave the agent.
struct Kernel {
    layout: PinLayout,
    start: pinning::Start,
    summary: KernelSummary,
    events: RingBuf<MapData>,
    handle: KernelHandle,
    task: tokio::task::JoinHandle<()>,
}

/// How the programs came to run, for the logs and the audit.
struct KernelSummary {
    start: pinning::Start,
    programs: Vec<&'static str>,
    attached_now: Vec<&'static str>,
    retired: Vec<String>,
}

async fn load_kernel(config: &AgentConfig) -> Result<Kernel, DaemonError> {
    let layout = PinLayout::new(&config.pin_dir);
    let (running, maps) = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || {
            let running = pinning::load_or_adopt(&layout)?;
            let maps = KernelMaps::open(&layout)?;
            Ok::<_, PinningError>((running, maps))
        })
        .await
        .map_err(|source| DaemonError::Join { source })??
    };
    let pinning::Running {
        start,
        programs,
        attached_now,
        retired,
        events,
    } = running;
    if !retired.is_empty() {
        tracing::info!(
            programs = retired.join(","),
            "detached programs an older agent left pinned"
        );
    }
    let (handle, task) = kernel::spawn(maps);
    Ok(Kernel {
        layout,
        start,
        summary: KernelSummary {
            start,
            programs,
            attached_now,
            retired,
        },
        events,
        handle,
        task,
    })
}

/// The policy as first applied.
struct Startup {
    host: HostView,
    compiled: Compiled,
    paused_found: usize,
}

async fn apply_startup_policy(
    config: &AgentConfig,
    config_file: Option<&Path>,
    kernel: &Kernel,
    protect_maps: &ProtectHandle,
    set: &PolicySet,
    sink: &AuditHandle,
    links_held: usize,
) -> Result<Startup, DaemonError> {
    let summary = &kernel.summary;
    let mut host = HostView::current(&config.cgroup_root, &config.proc_root);
    host.protected =
        protect_files::protected_paths(config, config_file, &protect_files::own_binaries());
    let compiled = apply_new_policy(&kernel.handle, protect_maps, set, &host).await?;
    let paused_found = kernel.handle.pending().await.map_or(0, |p| p.len());
    sink.record(AuditRecord::new(
        RecordKind::AgentStarted,
        config.host.clone(),
        payload(&audit::AgentStarted {
            schema: audit::Schema::default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            programs: summary.programs.iter().map(|p| (*p).to_owned()).collect(),
            start: summary.start.as_str().to_owned(),
            attached_now: summary
                .attached_now
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            retired: summary.retired.clone(),
            links_held,
            pin_dir: config.pin_dir.to_string_lossy().into_owned(),
            paused_requests_found: paused_found,
            decision: audit::DecisionSetting {
                mode: config.decision.mode().as_str().to_owned(),
                service: match config.decision.mode() {
                    DecisionMode::Embedded => Some(format!("https://{}", config.decision.listen)),
                    DecisionMode::Remote => config.decision.server.clone(),
                    DecisionMode::Local => None,
                },
            },
        }),
    ));
    record_policy_loaded(sink, config, &compiled, "startup");
    for warning in &compiled.warnings {
        tracing::warn!(warning, "policy");
    }
    Ok(Startup {
        host,
        compiled,
        paused_found,
    })
}

/// DNS records read and not yet processed; the reader waits when it is full.
const DNS_QUEUE: usize = 4096;

/// Starts the DNS observer (`crate::dns`).
fn start_dns(
    config: &AgentConfig,
    layout: &PinLayout,
    policies: &watch::Receiver<Arc<Compiled>>,
    inputs: mpsc::Receiver<crate::dns::Input>,
    shutdown: &watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let resolvers = config.dns.effective_resolvers();
    tracing::info!(resolvers = ?resolvers, "DNS answers believed from these resolvers (host-name connect rules)");
    crate::dns::spawn(
        layout,
        resolvers,
        config.cgroup_root.clone(),
        policies.clone(),
        inputs,
        shutdown.clone(),
    )
    .map_err(|source| DaemonError::Dns { source })
}

/// Hands DNS records to the observer (`true`); other events stay.
async fn route_dns(event: &mut Option<Event>, dns: &mpsc::Sender<crate::dns::Input>) {
    let input = match event.take() {
        Some(Event::DnsPacket { packet, .. }) => crate::dns::Input::Packet(packet),
        Some(Event::DnsWait { origin }) => crate::dns::Input::Wait(origin),
        other => {
            *event = other;
            return;
        }
    };
    // The observer gone (shutdown): nothing to hand it.
    let _ = dns.send(input).await;
}

/// The ring buffer's reader task, and what it reads.
struct Reader {
    events: mpsc::Receiver<Vec<Event>>,
    /// Pids of tasks stopped in an unclassified cgroup.
    classify: mpsc::Receiver<u32>,
    task: tokio::task::JoinHandle<()>,
    /// Events already waiting at start.
    backlog: usize,
}

async fn start_reader(
    events: RingBuf<MapData>,
    dns: mpsc::Sender<crate::dns::Input>,
    shutdown: watch::Receiver<bool>,
) -> Result<Reader, DaemonError> {
    let mut reader =
        EventReader::new(events).map_err(|source| DaemonError::RingBuffer { source })?;
    // Batches of at most `BATCH_LIMIT` events: at most 16,384 events read and not yet
    // handled; a longer backlog waits in the ring buffer.
    let (events_tx, events_rx) = mpsc::channel(64);
    // Tasks of unclassified cgroups, for the policy watcher to classify and resume.
    let (classify_tx, classify_rx) = mpsc::channel(1024);
    let mut backlog = Vec::new();
    for event in reader.drain().into_iter().filter_map(log_parse_error) {
        let mut event = Some(event);
        route_dns(&mut event, &dns).await;
        if let Some(event) = event
            && !route_unclassified(&event, &classify_tx)
        {
            backlog.push(event);
        }
    }
    let backlog_len = backlog.len();
    if !backlog.is_empty() {
        // Capacity 64 and nothing queued yet: this cannot block.
        let _ = events_tx.send(backlog).await;
    }
    Ok(Reader {
        events: events_rx,
        classify: classify_rx,
        task: tokio::spawn(read_events(reader, events_tx, classify_tx, dns, shutdown)),
        backlog: backlog_len,
    })
}

/// The task that reports the audit log's health ([`audit_health`]).
fn start_audit_health(
    config: &AgentConfig,
    audit: &AuditPipeline,
    decision: &DecisionService,
    shutdown: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(audit_health::run(
        audit.handle.health(),
        config.state_dir.clone(),
        config.audit_db.clone(),
        decision.audit_health_reporter(),
        shutdown.clone(),
    ))
}

#[expect(
    clippy::too_many_arguments,
    reason = "the controller's wiring: each argument is a distinct part of the daemon"
)]
fn start_controller(
    config: &AgentConfig,
    kernel: &KernelHandle,
    sink: &Arc<AuditHandle>,
    decision: &DecisionService,
    events: mpsc::Receiver<Vec<Event>>,
    policies: &watch::Receiver<Arc<Compiled>>,
    shutdown: &watch::Receiver<bool>,
    metrics: &Arc<AgentMetrics>,
) -> tokio::task::JoinHandle<Stats> {
    let enricher = Arc::new(Enricher::new(&config.proc_root, &config.passwd));
    let controller = Controller::new(Parts {
        kernel: Arc::new(kernel.clone()),
        tasks: Arc::new(ProcTasks::new(&config.proc_root)),
        audit: Arc::clone(sink),
        enricher,
        host: config.host.clone(),
        timing: PauseTiming::default(),
        policies: Arc::clone(&policies.borrow()),
        decider: Arc::clone(&decision.decider),
    })
    .with_metrics(Arc::clone(metrics));
    tokio::spawn(controller.run(
        events,
        policies.clone(),
        shutdown.clone(),
        config.reconcile_interval,
    ))
}

/// Binds `addr` and serves `/metrics` until shutdown; each scrape reads the kernel's counters
/// and pending entries and the audit backlog.
async fn serve_metrics(
    addr: SocketAddr,
    metrics: &Arc<AgentMetrics>,
    kernel: &KernelHandle,
    audit: &AuditPipeline,
    shipping: Option<watch::Receiver<gatekeep_client::ShipStatus>>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let listener = gatekeep_server::metrics::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { source })?;
    let render = {
        let metrics = Arc::clone(metrics);
        let kernel = kernel.clone();
        let handle = audit.handle.clone();
        let writer = audit.writer_queue();
        move || {
            let metrics = Arc::clone(&metrics);
            let kernel = kernel.clone();
            let handle = handle.clone();
            let writer = writer.clone();
            let shipping_lag = shipping.as_ref().map(|status| status.borrow().lag());
            async move {
                let kernel_counters = kernel.counters().await.ok();
                let paused_kinds = kernel
                    .pending()
                    .await
                    .ok()
                    .map(|pending| pending.iter().map(|(_, entry)| entry.kind).collect());
                let health = handle.health().borrow().clone();
                metrics.render(Snapshot {
                    kernel_counters,
                    paused_kinds,
                    audit_forwarder: handle.backlog(),
                    audit_writer: writer.queued(),
                    audit_held: health.failing.as_ref().map_or(0, |failure| failure.held),
                    audit_writable: health.is_writable(),
                    shipping_lag,
                })
            }
        }
    };
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    tracing::info!(%addr, "metrics served at /metrics");
    tokio::spawn(async move {
        if let Err(error) = gatekeep_server::metrics::serve(listener, render, stopped).await {
            tracing::warn!(%error, "the metrics listener failed");
        }
    });
    Ok(())
}

/// What the "ready" line says.
struct Ready<'a> {
    config: &'a AgentConfig,
    options: &'a RunOptions,
    kernel: &'a KernelSummary,
    compiled: &'a Compiled,
    decision: &'a DecisionService,
    paused_found: usize,
    buffered_events: usize,
    kernel_logs: bool,
}

fn announce_ready(ready: &Ready<'_>) -> Result<(), DaemonError> {
    let Ready {
        config,
        options,
        kernel,
        compiled,
        decision,
        ..
    } = ready;
    tracing::info!(
        start = kernel.start.as_str(),
        programs = kernel.programs.join(","),
        attached_now = kernel.attached_now.len(),
        pin_dir = %config.pin_dir.display(),
        policies = compiled.names().join(","),
        generation = compiled.generation,
        cgroups_gated = compiled.state.gated.len(),
        exec_rules = compiled.state.rule_count(map_names::EXEC_RULES),
        connect_prefixes = compiled.state.rule_count(map_names::CONNECT_V4)
            + compiled.state.rule_count(map_names::CONNECT_V6),
        paused_requests_found = ready.paused_found,
        buffered_events = ready.buffered_events,
        kernel_logs = ready.kernel_logs,
        audit_db = %config.audit_db.display(),
        decision = decision.mode.as_str(),
        decision_service = decision.endpoint.as_deref().unwrap_or("-"),
        "gatekeep agent ready"
    );
    if let Some(cli) = &decision.cli_config {
        tracing::info!(
            "reviewers on this host: GATEKEEP_CLI_CONFIG={} gatekeep review list",
            cli.display()
        );
    }
    release_startup_memory();
    if let Some(path) = &options.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
            DaemonError::ReadyFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Everything [`shut_down`] stops, in its order.
struct Stopping<'a> {
    config: &'a AgentConfig,
    options: &'a RunOptions,
    controller_task: tokio::task::JoinHandle<Stats>,
    reader_task: tokio::task::JoinHandle<()>,
    watcher_task: tokio::task::JoinHandle<()>,
    protect_task: tokio::task::JoinHandle<()>,
    dns_task: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    decision: DecisionService,
    kernel_logs: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    kernel: KernelHandle,
    kernel_task: tokio::task::JoinHandle<()>,
    sink: Arc<AuditHandle>,
    audit: AuditPipeline,
}

/// After the shutdown flag: waits for every task, records the stop, commits
/// the audit log.
async fn shut_down(stopping: Stopping<'_>) -> Result<(), DaemonError> {
    let Stopping {
        config,
        options,
        controller_task,
        reader_task,
        watcher_task,
        protect_task,
        dns_task,
        health_task,
        decision,
        kernel_logs,
        kernel,
        kernel_task,
        sink,
        audit,
    } = stopping;
    let stats = controller_task
        .await
        .map_err(|source| DaemonError::Join { source })?;
    let _ = reader_task.await;
    let _ = watcher_task.await;
    let _ = protect_task.await;
    // Its links go with it: the DNS programs detach until the next start.
    let _ = dns_task.await;
    let _ = health_task.await;
    decision.stop().await;
    if let Some(task) = kernel_logs {
        let _ = task.await;
    }
    let paused_left = kernel.pending().await.map_or(0, |p| p.len());
    sink.record(AuditRecord::new(
        RecordKind::AgentStopped,
        config.host.clone(),
        payload(&audit::AgentStopped {
            schema: audit::Schema::default(),
            pid: std::process::id(),
            paused_requests_left: paused_left,
            asked: stats.asked,
            decided: stats.decided,
            abandoned: stats.abandoned,
        }),
    ));
    drop(sink);
    drop(kernel);
    let last = audit
        .shutdown()
        .await
        .map_err(|source| DaemonError::AuditShutdown { source })?;
    let _ = kernel_task.await;
    if let Some(path) = &options.ready_file {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(
        paused_requests_left = paused_left,
        audit_seq = last,
        "stopped; programs stay attached and paused tasks stay paused for the next agent"
    );
    Ok(())
}

/// How often the protect task pins removed link pins again and records
/// refusal bursts.
const PROTECT_INTERVAL: Duration = Duration::from_millis(500);

/// Opens the self-protection maps, protects this process (forgetting
/// processes of earlier runs that are gone) and registers the decision
/// service's listeners.
async fn setup_protection(
    config: &AgentConfig,
    layout: &PinLayout,
) -> Result<ProtectHandle, DaemonError> {
    let wrap = |source| DaemonError::Protect { source };
    let mut maps =
        ProtectMaps::open(layout).map_err(|source| wrap(ProtectError::Pinning(source)))?;
    maps.prune_processes(&config.proc_root).map_err(wrap)?;
    maps.protect_process(&config.proc_root, std::process::id())
        .map_err(wrap)?;
    let listeners = match config.decision.mode() {
        DecisionMode::Embedded => vec![config.decision.listen],
        DecisionMode::Remote => {
            let url = config.decision.server.clone().unwrap_or_default();
            tokio::task::spawn_blocking(move || protect::resolve_service(&url))
                .await
                .map_err(|source| DaemonError::Join { source })?
        }
        DecisionMode::Local => Vec::new(),
    };
    // The metrics listener too: gated tasks have no business reading what is paused.
    let listeners: Vec<SocketAddr> = listeners.into_iter().chain(config.metrics.listen).collect();
    let local = protect::local_addresses();
    let keys: Vec<_> = listeners
        .iter()
        .flat_map(|addr| protect::listener_keys(*addr, &local))
        .collect();
    maps.set_listeners(&keys).map_err(wrap)?;
    tracing::info!(
        listeners = ?listeners,
        keys = keys.len(),
        "gated tasks cannot signal or trace this agent, nor connect to its decision service"
    );
    Ok(Arc::new(std::sync::Mutex::new(maps)))
}

/// Gives the memory start-up used and freed (the kernel's BTF parsed twice, the
/// programs' object, policy compilation: tens of MiB) back to the system. glibc keeps
/// freed heap pages otherwise, and they would count in the idle agent's RSS for good.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) };
    }
}

fn log_parse_error(result: Result<Event, crate::bpf::events::ParseError>) -> Option<Event> {
    match result {
        Ok(event) => Some(event),
        Err(err) => {
            tracing::error!(error = %err, "unreadable ring buffer record");
            None
        }
    }
}

/// Hands an [`Event::Unclassified`] to the policy watcher (`true`), which
/// classifies the task's cgroup and resumes it; other events stay.
fn route_unclassified(event: &Event, classify: &mpsc::Sender<u32>) -> bool {
    if let Event::Unclassified { origin, .. } = event {
        // A full queue already holds a classification pass to come.
        let _ = classify.try_send(origin.pid);
        true
    } else {
        false
    }
}

async fn read_events(
    mut reader: EventReader,
    events: mpsc::Sender<Vec<Event>>,
    classify: mpsc::Sender<u32>,
    dns: mpsc::Sender<crate::dns::Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            batch = reader.next_batch() => match batch {
                Ok(batch) => {
                    let mut kept = Vec::with_capacity(batch.len());
                    for event in batch.into_iter().filter_map(log_parse_error) {
                        let mut event = Some(event);
                        route_dns(&mut event, &dns).await;
                        if let Some(event) = event
                            && !route_unclassified(&event, &classify)
                        {
                            kept.push(event);
                        }
                    }
                    let batch = kept;
                    if !batch.is_empty() && events.send(batch).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "ring buffer poll failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn load_policy(dir: &Path) -> Result<PolicySet, DaemonError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            let set = PolicySet::load_dir(&dir)?;
            log_policy_warnings(&set);
            Ok(set)
        }
    })
    .await
    .map_err(|source| DaemonError::Join { source })?
    .map_err(|source| DaemonError::Policy { dir, source })
}

/// Logs where a loaded policy cannot keep its promise on this host (the
/// warnings of `gatekeep policy validate`); the policy is enforced all the
/// same. Reads the files the exec rules name, so it runs off the async
/// threads.
fn log_policy_warnings(set: &PolicySet) {
    for warning in set.warnings() {
        tracing::warn!(
            kind = warning.kind.as_str(),
            policy = warning.policy.as_str(),
            warning = warning.message.as_str(),
            "policy cannot keep its promise"
        );
    }
}

/// Compiles `set` with ids unused in the kernel and applies it.
async fn apply_new_policy(
    kernel: &KernelHandle,
    protect_maps: &ProtectHandle,
    set: &PolicySet,
    host: &HostView,
) -> Result<Compiled, DaemonError> {
    let current = kernel
        .read_policy_state()
        .await
        .map_err(|source| DaemonError::Apply { source })?;
    let ids = policy::allocate_ids(set.policies.len(), &current.ids_in_use())
        .map_err(|source| DaemonError::Compile { source })?;
    let generation = current.generation().wrapping_add(1).max(1);
    let mut compiled = compile_blocking(set.clone(), ids.clone(), generation, host.clone()).await?;
    policy::carry_inherited(&current, &mut compiled.state);
    classify_blocking(current, &mut compiled, set.clone(), ids, host.clone()).await?;
    // The new ids' relaxations before any cgroup switches to them.
    protect::with_maps(protect_maps, |maps| {
        maps.set_relaxed(&protect::masks_of(&compiled))
    })
    .map_err(|source| DaemonError::Protect { source })?;
    kernel
        .apply_policy(compiled.state.clone())
        .await
        .map_err(|source| DaemonError::Apply { source })?;
    Ok(compiled)
}

/// [`policy::classify_unclassified`] off the async threads (it may walk
/// the cgroup tree).
async fn classify_blocking(
    current: MapState,
    compiled: &mut Compiled,
    set: PolicySet,
    ids: Vec<u32>,
    host: HostView,
) -> Result<(), DaemonError> {
    let mut desired = std::mem::take(&mut compiled.state);
    desired = tokio::task::spawn_blocking(move || {
        policy::classify_unclassified(&current, &mut desired, &set, &ids, &host);
        desired
    })
    .await
    .map_err(|source| DaemonError::Join { source })?;
    compiled.state = desired;
    Ok(())
}

async fn compile_blocking(
    set: PolicySet,
    ids: Vec<u32>,
    generation: u32,
    host: HostView,
) -> Result<Compiled, DaemonError> {
    tokio::task::spawn_blocking(move || policy::compile(&set, &ids, generation, &host))
        .await
        .map_err(|source| DaemonError::Join { source })?
        .map_err(|source| DaemonError::Compile { source })
}

/// An audit payload ([`gatekeep_proto::audit`]) as the record's JSON value.
fn payload(payload: &impl serde::Serialize) -> serde_json::Value {
    // Strings, numbers and lists of them: they always encode.
    serde_json::to_value(payload).unwrap_or_default()
}

fn record_policy_loaded(
    sink: &AuditHandle,
    config: &AgentConfig,
    compiled: &Compiled,
    trigger: &str,
) {
    for policy in compiled.policies.values() {
        if policy.policy.mode == gatekeep_policy::Mode::Audit {
            tracing::warn!(
                policy = %policy.policy.name.escape_debug(),
                "policy is in audit mode: it denies and pauses nothing of its rules and records \
                 what it would have done (`gatekeep policy forecast`); write mode = \"enforce\" \
                 and reload to enforce it"
            );
        }
    }
    sink.record(AuditRecord::new(
        RecordKind::PolicyLoaded,
        config.host.clone(),
        payload(&audit::PolicyLoaded {
            schema: audit::Schema::default(),
            trigger: trigger.to_owned(),
            policy_dir: config.policy_dir.to_string_lossy().into_owned(),
            generation: compiled.generation,
            policies: compiled
                .policies
                .values()
                .map(|p| audit::LoadedPolicy {
                    id: p.id,
                    name: p.policy.name.clone(),
                    mode: p.policy.mode.to_string(),
                })
                .collect(),
            cgroups_gated: compiled
                .cgroup_paths
                .values()
                .map(|path| path.to_string_lossy().into_owned())
                .collect(),
            exec_rules: compiled.state.rule_count(map_names::EXEC_RULES),
            connect_prefixes: compiled.state.rule_count(map_names::CONNECT_V4)
                + compiled.state.rule_count(map_names::CONNECT_V6),
            warnings: compiled.warnings.clone(),
            protect_relaxed: protect::relaxations(compiled),
        }),
    ));
}

/// What identifies the policy files' content cheaply: name, size, mtime and
/// inode of each `*.toml`.
#[must_use]
pub fn policy_fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok(), meta.ino()))
        })
        .collect();
    files.sort();
    files
}

/// Reloads the policy on SIGHUP or when its files change, and rescans the
/// host (new cgroups, replaced executables) every `rescan_interval`.
#[expect(
    clippy::too_many_arguments,
    reason = "one task's whole context, wired once"
)]
async fn watch_policy(
    config: AgentConfig,
    kernel: KernelHandle,
    protect_maps: ProtectHandle,
    policies: watch::Sender<Arc<Compiled>>,
    sink: Arc<AuditHandle>,
    host: HostView,
    mut fingerprint: Vec<(PathBuf, u64, Option<SystemTime>, u64)>,
    mut reload: mpsc::Receiver<()>,
    mut classify: mpsc::Receiver<u32>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(config.rescan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => false,
            Some(()) = reload.recv() => true,
            Some(pid) = classify.recv() => {
                let mut waiting = BTreeSet::from([pid]);
                while let Ok(pid) = classify.try_recv() {
                    waiting.insert(pid);
                }
                rescan(&kernel, &policies, &host).await;
                resume_classified(&waiting);
                continue;
            }
        };
        let now = policy_fingerprint(&config.policy_dir);
        if forced || now != fingerprint {
            fingerprint = now;
            reload_policy(
                &config,
                &kernel,
                &protect_maps,
                &policies,
                sink.as_ref(),
                &host,
                if forced { "sighup" } else { "file_change" },
            )
            .await;
        } else {
            rescan(&kernel, &policies, &host).await;
        }
    }
}

async fn reload_policy(
    config: &AgentConfig,
    kernel: &KernelHandle,
    protect_maps: &ProtectHandle,
    policies: &watch::Sender<Arc<Compiled>>,
    sink: &AuditHandle,
    host: &HostView,
    trigger: &str,
) {
    let set = match load_policy(&config.policy_dir).await {
        Ok(set) => set,
        Err(err) => {
            // Invalid files never replace a valid loaded policy.
            let detail = match &err {
                DaemonError::Policy { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            tracing::error!(error = %detail, "policy reload refused; the loaded policy stays in force");
            return;
        }
    };
    match apply_new_policy(kernel, protect_maps, &set, host).await {
        Ok(compiled) => {
            for warning in &compiled.warnings {
                tracing::warn!(warning, "policy");
            }
            tracing::info!(
                trigger,
                generation = compiled.generation,
                policies = compiled.names().join(","),
                cgroups_gated = compiled.state.gated.len(),
                "policy reloaded"
            );
            record_policy_loaded(sink, config, &compiled, trigger);
            let _ = policies.send(Arc::new(compiled));
        }
        Err(err) => {
            tracing::error!(error = %err, "policy reload failed; the loaded policy stays in force");
        }
    }
}

/// Recompiles the loaded set with the same ids (new cgroups, replaced
/// executables) and applies the difference.
async fn rescan(kernel: &KernelHandle, policies: &watch::Sender<Arc<Compiled>>, host: &HostView) {
    let loaded = Arc::clone(&policies.borrow());
    let set = PolicySet {
        policies: loaded.policies.values().map(|p| p.policy.clone()).collect(),
    };
    let current = match kernel.read_policy_state().await {
        Ok(current) => current,
        Err(err) => {
            tracing::error!(error = %err, "rescan could not read the maps");
            return;
        }
    };
    let compiled = compile_blocking(set.clone(), loaded.ids(), loaded.generation, host.clone())
        .await
        .map(|compiled| (compiled, current));
    let compiled = match compiled {
        Ok((mut compiled, current)) => {
            // Only a load binds exec rules to their files' content.
            crate::hooks::exec::keep_bindings(&mut compiled.state.rules, &loaded.state.rules);
            // Except files pinned by their bytes that still have them.
            for (id, policy) in &mut compiled.policies {
                if let (Some(before), Some(policy)) =
                    (loaded.policies.get(id), Arc::get_mut(policy))
                {
                    crate::hooks::exec::integrity::rebind(
                        &mut compiled.state.rules,
                        &loaded.state.rules,
                        *id,
                        &mut policy.hooks.exec.integrity,
                        &before.hooks.exec.integrity,
                    );
                }
            }
            match classify_blocking(current, &mut compiled, set, loaded.ids(), host.clone()).await {
                Ok(()) => compiled,
                Err(err) => {
                    tracing::error!(error = %err, "rescan failed");
                    return;
                }
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "rescan failed");
            return;
        }
    };
    if compiled.state == loaded.state {
        return;
    }
    match kernel.apply_policy(compiled.state.clone()).await {
        Ok(applied) => {
            tracing::info!(
                cgroups_added = applied.cgroups_added,
                cgroups_removed = applied.cgroups_removed,
                changes = applied.ops,
                "rescan updated the gated cgroups and rules"
            );
            let _ = policies.send(Arc::new(compiled));
        }
        Err(err) => tracing::error!(error = %err, "rescan could not update the maps"),
    }
}

/// Resumes tasks that stopped in an unclassified cgroup, now that the
/// cgroup is classified: each restarts its syscall, which meets the
/// cgroup's policy (or none). One still unclassified (its folder not seen
/// yet) stops again and asks again.
fn resume_classified(pids: &BTreeSet<u32>) {
    for pid in pids {
        let Ok(raw) = i32::try_from(*pid) else {
            continue;
        };
        if let Err(err) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGCONT,
        ) {
            tracing::debug!(pid, error = %err, "resume after classification");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_when_a_policy_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.toml"), "x").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let first = policy_fingerprint(dir.path());
        assert_eq!(first.len(), 1, "only *.toml files count");
        std::fs::write(dir.path().join("a.toml"), "xy").expect("write");
        assert_ne!(policy_fingerprint(dir.path()), first);
        std::fs::write(dir.path().join("notes.txt"), "changed").expect("write");
        let second = policy_fingerprint(dir.path());
        std::fs::write(dir.path().join("b.toml"), "").expect("write");
        assert_ne!(policy_fingerprint(dir.path()), second);
    }

    /// A log writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_policy_that_cannot_keep_its_promise_is_loaded_and_its_warnings_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("denied.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
        std::fs::write(
            dir.path().join("a.toml"),
            format!(
                "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.exec]\ndeny = [\"{}\"]\n",
                script.display()
            ),
        )
        .expect("write");

        // Not refused: the policy is what the files say.
        let set = load_policy(dir.path())
            .await
            .expect("a policy with warnings loads");
        assert_eq!(set.policies[0].exec.rules.len(), 1);

        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer({
                let log = log.clone();
                move || log.clone()
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || log_policy_warnings(&set));
        let text = String::from_utf8(log.0.lock().expect("log buffer").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines.iter().all(|line| line.contains(" WARN ")), "{text}");
        assert!(
            lines[0].contains("policy cannot keep its promise")
                && lines[0].contains("kind=\"deny-list-under-allow\"")
                && lines[0].contains("policy=\"agents\""),
            "{text}"
        );
        assert!(
            lines[1].contains("kind=\"script\"")
                && lines[1].contains("restrict the interpreter too"),
            "{text}"
        );
    }
}
