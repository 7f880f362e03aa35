//! The programs' own diagnostics (`aya-log-ebpf`), drained asynchronously
//! into the agent's tracing output under the target `gatekeep_ebpf`.
//!
//! The log ring buffer belongs to the loaded programs, so it is found from a
//! pinned link's program id; that works the same whether this agent loaded
//! the programs or adopted them.

use std::io;

use aya::programs::links::{FdLink, PinnedLink};
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use crate::bpf::pinning::PinLayout;

/// Forwards `log` records to `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "gatekeep_ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "gatekeep_ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "gatekeep_ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "gatekeep_ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "gatekeep_ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Attaches to the log buffer of the pinned `program`. `None` (with a debug
/// line) when the program logs nothing or cannot be found.
#[must_use]
pub fn attach(layout: &PinLayout, program: &str) -> Option<EbpfLogger<TracingLog>> {
    let link = match PinnedLink::from_pin(layout.link(program)) {
        Ok(link) => FdLink::from(link),
        Err(err) => {
            tracing::debug!(program, error = %err, "no pinned link to read kernel logs from");
            return None;
        }
    };
    let program_id = match link.info() {
        Ok(info) => info.program_id(),
        Err(err) => {
            tracing::debug!(program, error = %err, "cannot read the pinned link");
            return None;
        }
    };
    match EbpfLogger::init_from_id_with_logger(program_id, TracingLog) {
        Ok(logger) => Some(logger),
        Err(err) => {
            tracing::debug!(program, error = %err, "the programs have no log buffer");
            None
        }
    }
}

/// Drains `logger` whenever records arrive, until `shutdown` turns true.
pub async fn drain(
    logger: EbpfLogger<TracingLog>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // unchanged until the `AsyncFd` drops the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(io::Error::from)?;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                fd.get_mut().flush();
                return Ok(());
            }
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}
