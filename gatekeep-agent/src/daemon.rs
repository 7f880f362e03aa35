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
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use gatekeep_audit::{AuditError, AuditRecord, RecordKind};
use gatekeep_common::map_names;
use gatekeep_policy::{PolicyError, PolicySet};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    audit::{AuditHandle, AuditPipeline, AuditSink as _},
    bpf::{
        events::{Event, reader::EventReader},
        kernel::{self, KernelHandle, PauseKernel as _},
        kernel_log,
        pinning::{self, PinLayout, PinningError},
    },
    config::{AgentConfig, DecisionMode},
    decision::service::{self, ServiceError},
    hooks::protect_files,
    pause::{
        controller::{Controller, Parts},
        enrich::Enricher,
        resume::{PauseTiming, ProcTasks},
    },
    policy::{self, Compiled, HostView, MapState, PolicyMapsError},
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
/// names (the embedded decision service by default).
#[expect(
    clippy::too_many_lines,
    reason = "the startup sequence reads best in one place, step by step"
)]
pub async fn run(config: AgentConfig, options: RunOptions) -> Result<(), DaemonError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| DaemonError::Signals { source })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signals { source })?;
    let mut sighup =
        signal(SignalKind::hangup()).map_err(|source| DaemonError::Signals { source })?;

    // 1. The policy must be valid before anything changes.
    let set = load_policy(&config.policy_dir).await?;
    let fingerprint = policy_fingerprint(&config.policy_dir);

    // 2. The audit log.
    let audit = AuditPipeline::open(&config.audit_db).map_err(|source| DaemonError::Audit {
        path: config.audit_db.clone(),
        source,
    })?;
    let sink = Arc::new(audit.handle.clone());

    // 3. The programs: loaded and pinned, or adopted.
    let layout = PinLayout::new(&config.pin_dir);
    let running = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || pinning::load_or_adopt(&layout))
            .await
            .map_err(|source| DaemonError::Join { source })??
    };
    let pinning::Running {
        start,
        programs,
        attached_now,
        retired,
        maps,
        events,
    } = running;
    if !retired.is_empty() {
        tracing::info!(
            programs = retired.join(","),
            "detached programs an older agent left pinned"
        );
    }
    let (kernel, kernel_task) = kernel::spawn(maps);

    // 4. The policy into the maps (fresh ids: the old set stays in force
    //    until each cgroup switches).
    let mut host = HostView::current(&config.cgroup_root, &config.proc_root);
    host.protected = protect_files::protected_paths(
        &config,
        options.config_file.as_deref(),
        &protect_files::own_binaries(),
    );
    let compiled = apply_new_policy(&kernel, &set, &host).await?;
    let paused_found = kernel.pending().await.map_or(0, |p| p.len());
    sink.record(AuditRecord::new(
        RecordKind::AgentStarted,
        config.host.clone(),
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "programs": programs,
            "start": start.as_str(),
            "attached_now": attached_now,
            "retired": retired,
            "pin_dir": config.pin_dir,
            "paused_requests_found": paused_found,
            "decision": {
                "mode": config.decision.mode().as_str(),
                "service": match config.decision.mode() {
                    DecisionMode::Embedded => Some(format!("https://{}", config.decision.listen)),
                    DecisionMode::Remote => config.decision.server.clone(),
                    DecisionMode::Local => None,
                },
            },
        }),
    ));
    record_policy_loaded(sink.as_ref(), &config, &compiled, "startup");
    for warning in &compiled.warnings {
        tracing::warn!(warning, "policy");
    }

    // The programs' own diagnostics (one log buffer per loaded object).
    let kernel_logs = kernel_log::attach(&layout, "bprm_check_security")
        .map(|logger| tokio::spawn(kernel_log::drain(logger, shutdown_rx.clone())));

    // 5. The request path.
    let mut reader =
        EventReader::new(events).map_err(|source| DaemonError::RingBuffer { source })?;
    // Batches of at most `BATCH_LIMIT` events: at most 16,384 events read and not yet
    // handled; a longer backlog waits in the ring buffer.
    let (events_tx, events_rx) = mpsc::channel(64);
    // Tasks of unclassified cgroups, for the policy watcher to classify and resume.
    let (classify_tx, classify_rx) = mpsc::channel(1024);
    let backlog: Vec<_> = reader
        .drain()
        .into_iter()
        .filter_map(log_parse_error)
        .filter(|event| !route_unclassified(event, &classify_tx))
        .collect();
    let backlog_len = backlog.len();
    if !backlog.is_empty() {
        // Capacity 1024 and nothing queued yet: this cannot block.
        let _ = events_tx.send(backlog).await;
    }
    let reader_task = tokio::spawn(read_events(
        reader,
        events_tx,
        classify_tx,
        shutdown_rx.clone(),
    ));

    let (policies_tx, policies_rx) = watch::channel(Arc::new(compiled));

    // 6. Who decides: the embedded service, a central one, or timeouts only.
    let decision = service::start(service::Wiring {
        config: &config,
        kernel: &kernel,
        audit: Arc::clone(&sink),
        start,
        policies: policies_rx.clone(),
        shutdown: shutdown_rx.clone(),
    })
    .await
    .map_err(|source| DaemonError::Decision { source })?;
    let enricher = Arc::new(Enricher::new(&config.proc_root, &config.passwd));
    let controller = Controller::new(Parts {
        kernel: Arc::new(kernel.clone()),
        tasks: Arc::new(ProcTasks::new(&config.proc_root)),
        audit: Arc::clone(&sink),
        enricher,
        host: config.host.clone(),
        timing: PauseTiming::default(),
        policies: Arc::clone(&policies_rx.borrow()),
        decider: Arc::clone(&decision.decider),
    });
    let controller_task = tokio::spawn(controller.run(
        events_rx,
        policies_rx.clone(),
        shutdown_rx.clone(),
        config.reconcile_interval,
    ));

    let (reload_tx, reload_rx) = mpsc::channel(4);
    let watcher_task = tokio::spawn(watch_policy(
        config.clone(),
        kernel.clone(),
        policies_tx,
        Arc::clone(&sink),
        host,
        fingerprint,
        reload_rx,
        classify_rx,
        shutdown_rx.clone(),
    ));

    {
        let compiled = policies_rx.borrow();
        tracing::info!(
            start = start.as_str(),
            programs = programs.join(","),
            attached_now = attached_now.len(),
            pin_dir = %config.pin_dir.display(),
            policies = compiled.names().join(","),
            generation = compiled.generation,
            cgroups_gated = compiled.state.gated.len(),
            exec_rules = compiled.state.rule_count(map_names::EXEC_RULES),
            connect_prefixes = compiled.state.rule_count(map_names::CONNECT_V4)
                + compiled.state.rule_count(map_names::CONNECT_V6),
            paused_requests_found = paused_found,
            buffered_events = backlog_len,
            kernel_logs = kernel_logs.is_some(),
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

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                let _ = reload_tx.try_send(());
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let stats = controller_task
        .await
        .map_err(|source| DaemonError::Join { source })?;
    let _ = reader_task.await;
    let _ = watcher_task.await;
    decision.stop().await;
    if let Some(task) = kernel_logs {
        let _ = task.await;
    }
    let paused_left = kernel.pending().await.map_or(0, |p| p.len());
    sink.record(AuditRecord::new(
        RecordKind::AgentStopped,
        config.host.clone(),
        json!({
            "pid": std::process::id(),
            "paused_requests_left": paused_left,
            "asked": stats.asked,
            "decided": stats.decided,
            "abandoned": stats.abandoned,
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

fn log_parse_error(
    result: Result<crate::bpf::events::Event, crate::bpf::events::ParseError>,
) -> Option<crate::bpf::events::Event> {
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
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            batch = reader.next_batch() => match batch {
                Ok(batch) => {
                    let batch: Vec<_> = batch
                        .into_iter()
                        .filter_map(log_parse_error)
                        .filter(|event| !route_unclassified(event, &classify))
                        .collect();
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
        move || PolicySet::load_dir(&dir)
    })
    .await
    .map_err(|source| DaemonError::Join { source })?
    .map_err(|source| DaemonError::Policy { dir, source })
}

/// Compiles `set` with ids unused in the kernel and applies it.
async fn apply_new_policy(
    kernel: &KernelHandle,
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

fn record_policy_loaded(
    sink: &AuditHandle,
    config: &AgentConfig,
    compiled: &Compiled,
    trigger: &str,
) {
    sink.record(AuditRecord::new(
        RecordKind::PolicyLoaded,
        config.host.clone(),
        json!({
            "trigger": trigger,
            "policy_dir": config.policy_dir,
            "generation": compiled.generation,
            "policies": compiled
                .policies
                .values()
                .map(|p| json!({ "id": p.id, "name": p.policy.name }))
                .collect::<Vec<_>>(),
            "cgroups_gated": compiled.cgroup_paths.values().collect::<Vec<_>>(),
            "exec_rules": compiled.state.rule_count(map_names::EXEC_RULES),
            "connect_prefixes": compiled.state.rule_count(map_names::CONNECT_V4)
                + compiled.state.rule_count(map_names::CONNECT_V6),
            "warnings": compiled.warnings,
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
    match apply_new_policy(kernel, &set, host).await {
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
}
