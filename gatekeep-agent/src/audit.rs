//! The agent's side of the local audit log: a sink the decision path hands
//! records to without waiting, and a forwarder that queues them into the
//! batching [`AuditWriter`] in order. On shutdown the forwarder drains and
//! the writer commits everything before the agent exits.
//!
//! Nothing asked is released before it is on record: the controller records a
//! request and its decision, then waits for [`AuditSink::durable`] (a flush
//! queued behind them, in order) before it writes an allowing verdict; when
//! the log cannot be written (disk full, I/O error, read-only) that wait
//! fails at once and the request is denied instead. [`AuditSink::is_writable`]
//! lets it deny new requests without asking anyone.

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use gatekeep_audit::{
    AuditError, AuditRecord, AuditWriter, WriterConfig, WriterHealth, error_chain,
};
use tokio::{
    sync::{Notify, mpsc, oneshot, watch},
    task::JoinHandle,
};

/// Records handed to the sink and not yet queued in the writer above which
/// [`AuditSink::has_room`] waits. Each is a JSON tree of a few KiB; the writer's own queue
/// holds its encoded records behind them.
pub const BACKLOG_LIMIT: usize = 1024;

/// Takes audit records without blocking the caller.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord);

    /// Waits while the sink holds [`BACKLOG_LIMIT`] records or more. A caller that can
    /// slow down calls it before making a record: the kernel-denial path, whose backlog
    /// then stays in the kernel's fixed-size ring buffer (and what it cannot hold is
    /// counted as dropped) instead of growing the agent's memory without bound. `record`
    /// itself never refuses or waits. Sinks without a backlog never wait.
    fn has_room(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// Resolves once every record handed over before this call is durable, or fails (with
    /// the reason, for the record that says so) when the log cannot be written. The flush is
    /// queued when this is called, behind the records before it; awaiting it can happen
    /// elsewhere.
    fn durable(&self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        std::future::ready(Ok(()))
    }

    /// Whether records are committed now. `false` while the log cannot be written: asked
    /// actions are then denied without asking.
    fn is_writable(&self) -> bool {
        true
    }
}

/// What the forwarder takes, in order.
enum Item {
    Record(AuditRecord),
    Flush(oneshot::Sender<Result<u64, AuditError>>),
}

/// Records handed to an [`AuditHandle`] and not yet taken by the writer.
#[derive(Debug, Default)]
struct Backlog {
    queued: AtomicUsize,
    /// Woken when `queued` falls below half of [`BACKLOG_LIMIT`]: a waiter then makes
    /// half a limit's records before it waits again, rather than one per wake-up.
    room: Notify,
}

impl Backlog {
    /// One record taken off by the forwarder.
    fn taken(&self) {
        if self.queued.fetch_sub(1, Ordering::AcqRel) == BACKLOG_LIMIT / 2 {
            self.room.notify_waiters();
        }
    }
}

/// Sends records to the forwarder task.
#[derive(Clone)]
pub struct AuditHandle {
    records: mpsc::UnboundedSender<Item>,
    backlog: Arc<Backlog>,
    health: watch::Receiver<WriterHealth>,
}

impl AuditHandle {
    /// Records handed over and not yet queued in the writer.
    #[must_use]
    pub fn backlog(&self) -> usize {
        self.backlog.queued.load(Ordering::Acquire)
    }

    /// Whether the log can be written, and while it cannot, why.
    #[must_use]
    pub fn health(&self) -> watch::Receiver<WriterHealth> {
        self.health.clone()
    }
}

impl AuditSink for AuditHandle {
    fn record(&self, record: AuditRecord) {
        self.backlog.queued.fetch_add(1, Ordering::AcqRel);
        if self.records.send(Item::Record(record)).is_err() {
            self.backlog.taken();
            tracing::error!("audit forwarder is gone; a record was not written");
        }
    }

    async fn has_room(&self) {
        // The common case, on every denial: no waiter registered, no lock taken.
        if self.backlog() < BACKLOG_LIMIT {
            return;
        }
        loop {
            // Registered before the check, so a wake-up between the two is not missed.
            let room = self.backlog.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.backlog() < BACKLOG_LIMIT {
                return;
            }
            room.await;
        }
    }

    fn durable(&self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        let queued = self.records.send(Item::Flush(ack)).is_ok();
        async move {
            if !queued {
                return Err("the audit forwarder is gone".to_owned());
            }
            match done.await {
                Ok(Ok(_seq)) => Ok(()),
                Ok(Err(err)) => Err(error_chain(&err)),
                Err(_) => Err("the audit forwarder is gone".to_owned()),
            }
        }
    }

    fn is_writable(&self) -> bool {
        self.health.borrow().is_writable()
    }
}

/// Reads the writer's queue length (metrics).
#[derive(Debug, Clone)]
pub struct WriterQueue(std::sync::Weak<AuditWriter>);

impl WriterQueue {
    /// Records queued in the writer; 0 once it stopped.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.0.upgrade().map_or(0, |writer| writer.queued())
    }
}

/// The running audit pipeline.
pub struct AuditPipeline {
    pub handle: AuditHandle,
    forwarder: JoinHandle<()>,
    writer: Arc<AuditWriter>,
}

impl AuditPipeline {
    /// Opens the log at `path` (creating it and its folder) and starts the
    /// writer thread and the forwarder task.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| AuditError::CreateFile {
                path: parent.to_owned(),
                source,
            })?;
        }
        let writer = Arc::new(AuditWriter::open(path, WriterConfig::default())?);
        let (records, mut receiver) = mpsc::unbounded_channel::<Item>();
        let backlog = Arc::new(Backlog::default());
        let forward_to = Arc::clone(&writer);
        let taken_by = Arc::clone(&backlog);
        let forwarder = tokio::spawn(async move {
            while let Some(item) = receiver.recv().await {
                match item {
                    Item::Record(record) => {
                        let queued = forward_to.submit_async(record).await;
                        taken_by.taken();
                        if let Err(err) = queued {
                            tracing::error!(error = %err, "failed to queue an audit record");
                        }
                    }
                    Item::Flush(ack) => {
                        // Everything before it is queued in the writer already; the flush
                        // waits on its own, so records behind it go on being forwarded.
                        let writer = Arc::clone(&forward_to);
                        tokio::spawn(async move {
                            let _ = ack.send(writer.flush_async().await);
                        });
                    }
                }
            }
        });
        let health = writer.health();
        Ok(Self {
            handle: AuditHandle {
                records,
                backlog,
                health,
            },
            forwarder,
            writer,
        })
    }

    /// What [`AuditWriter::queued`] reports, for as long as the writer runs (the probe does
    /// not keep it alive).
    #[must_use]
    pub fn writer_queue(&self) -> WriterQueue {
        WriterQueue(Arc::downgrade(&self.writer))
    }

    /// Drains the forwarder (once every other handle clone is dropped) and
    /// commits everything; returns the last durable seq.
    pub async fn shutdown(self) -> Result<u64, AuditError> {
        let Self {
            handle,
            forwarder,
            writer,
        } = self;
        drop(handle);
        if forwarder.await.is_err() {
            tracing::error!("audit forwarder panicked");
        }
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .map_err(|_| AuditError::WriterPanicked)?
    }
}

/// Collects records in memory (tests, dry runs). [`set_unwritable`](Self::set_unwritable)
/// makes it act like a log on a full disk: records are still taken, nothing is durable.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<AuditRecord>>>,
    unwritable: Arc<std::sync::atomic::AtomicBool>,
    /// When set, `durable` waits for a permit of it (a slow disk the test controls).
    gate: Arc<Mutex<Option<Arc<tokio::sync::Semaphore>>>>,
}

impl MemorySink {
    /// Whether it acts like a log that cannot be written.
    pub fn set_unwritable(&self, unwritable: bool) {
        self.unwritable.store(unwritable, Ordering::Release);
    }

    /// From now on `durable` waits for a permit of the returned semaphore (one per call).
    #[must_use]
    pub fn gate_durable(&self) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *self.gate.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&gate));
        gate
    }

    #[must_use]
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    fn durable(&self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let gate = self
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let unwritable = Arc::clone(&self.unwritable);
        async move {
            if let Some(gate) = gate {
                gate.acquire()
                    .await
                    .map_err(|_| "the gate closed".to_owned())?
                    .forget();
            }
            if unwritable.load(Ordering::Acquire) {
                Err("audit log database error: database or disk is full".to_owned())
            } else {
                Ok(())
            }
        }
    }

    fn is_writable(&self) -> bool {
        !self.unwritable.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gatekeep_audit::RecordKind;
    use serde_json::json;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_committed_by_shutdown_and_the_chain_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.db");
        let pipeline = AuditPipeline::open(&path).expect("open");
        for i in 0..500 {
            pipeline.handle.record(AuditRecord::new(
                RecordKind::Requested,
                "h",
                json!({ "i": i }),
            ));
        }
        let last = pipeline.shutdown().await.expect("shutdown");
        assert_eq!(last, 500);
        let report = gatekeep_audit::verify(&path).expect("verify");
        assert_eq!(report.records, 500);
    }

    /// On one thread, the forwarder runs only when the test yields: the backlog is exact.
    #[tokio::test(flavor = "current_thread")]
    async fn has_room_waits_while_the_backlog_is_at_its_limit_and_nothing_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.db");
        let pipeline = AuditPipeline::open(&path).expect("open");
        let handle = pipeline.handle.clone();
        let record = |i: usize| AuditRecord::new(RecordKind::Requested, "h", json!({ "i": i }));
        for i in 0..BACKLOG_LIMIT - 1 {
            handle.record(record(i));
        }
        assert_eq!(handle.backlog(), BACKLOG_LIMIT - 1);
        // Below the limit: no wait (the future is ready when first polled).
        tokio::time::timeout(Duration::ZERO, handle.has_room())
            .await
            .expect("room below the limit");

        // At the limit (and past it: recording itself never waits), it waits...
        for i in BACKLOG_LIMIT - 1..2 * BACKLOG_LIMIT {
            handle.record(record(i));
        }
        assert_eq!(handle.backlog(), 2 * BACKLOG_LIMIT);
        {
            let room = handle.has_room();
            tokio::pin!(room);
            assert!(
                futures_poll_once(room.as_mut()).is_pending(),
                "no room with {} queued",
                handle.backlog()
            );
            // ...until the forwarder has taken the backlog below half of it.
            tokio::time::timeout(Duration::from_secs(30), room)
                .await
                .expect("room once the writer caught up");
        }
        assert!(handle.backlog() < BACKLOG_LIMIT / 2, "{}", handle.backlog());

        drop(handle);
        let last = pipeline.shutdown().await.expect("shutdown");
        assert_eq!(
            last,
            u64::try_from(2 * BACKLOG_LIMIT).unwrap(),
            "nothing refused"
        );
    }

    /// Polls `future` once, with a waker that does nothing.
    fn futures_poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut cx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_resolves_once_the_records_before_it_are_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.db");
        let pipeline = AuditPipeline::open(&path).expect("open");
        assert!(pipeline.handle.is_writable());
        for i in 0..3 {
            pipeline.handle.record(AuditRecord::new(
                RecordKind::Requested,
                "h",
                json!({ "i": i }),
            ));
        }
        let durable = pipeline.handle.durable();
        // Recorded after the flush was queued: not waited for.
        pipeline
            .handle
            .record(AuditRecord::new(RecordKind::Decided, "h", json!({})));
        durable.await.expect("durable");
        let report = gatekeep_audit::verify(&path).expect("verify");
        assert!(report.records >= 3, "{}", report.records);
        assert_eq!(pipeline.shutdown().await.expect("shutdown"), 4);
    }

    #[tokio::test]
    async fn a_memory_sink_always_has_room() {
        let sink = MemorySink::default();
        tokio::time::timeout(Duration::ZERO, sink.has_room())
            .await
            .expect("no backlog");
    }
}
