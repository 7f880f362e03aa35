//! The batching front: callers queue records, one thread commits them in batches.

use std::{
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{AuditError, error_chain},
    record::{AuditRecord, EncodedRecord, Prepared},
    store::AuditStore,
};

/// Why [`AuditWriter::try_submit`] did not take a record; the
/// record is handed back where it can be retried.
#[derive(Debug, thiserror::Error)]
pub enum TrySubmitError {
    /// The queue is full: the writer is behind (or its disk is failing). Retry, or submit from a
    /// blocking context.
    #[error("the audit queue is full")]
    Full { record: Box<AuditRecord> },
    /// The writer is shut down.
    #[error("the audit writer is shut down")]
    Closed { record: Box<AuditRecord> },
    /// The record cannot be stored (see [`AuditRecord::validate`]).
    #[error("the audit record is invalid")]
    Invalid {
        #[source]
        source: AuditError,
    },
}

/// Tuning of an [`AuditWriter`]. The defaults suit the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Records the queue holds before `try_submit` reports back-pressure and `submit` waits.
    pub queue_capacity: usize,
    /// Most records committed in one transaction.
    pub max_batch: usize,
    /// First wait before retrying a failed commit; doubles up to [`max_retry_delay`](Self::max_retry_delay).
    pub retry_delay: Duration,
    /// Longest wait between commit retries.
    pub max_retry_delay: Duration,
    /// Commit attempts after shutdown was asked for before the writer gives up on the rest.
    pub shutdown_attempts: u32,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            // About 16 MB of typical records: several seconds of a burst at full rate.
            queue_capacity: 16_384,
            // Large enough to amortise the fsync, small enough to keep a commit short.
            max_batch: 4_096,
            retry_delay: Duration::from_millis(50),
            max_retry_delay: Duration::from_secs(5),
            // With the delays above, about 6 s before giving up on a dead disk at shutdown.
            shutdown_attempts: 8,
        }
    }
}

enum Command {
    Record(Prepared),
    Flush(oneshot::Sender<Result<u64, AuditError>>),
}

/// Writes records off the caller's path: a dedicated thread owns the [`AuditStore`] and commits
/// whatever has queued up since its last commit (up to [`WriterConfig::max_batch`]) in one
/// transaction. There is no artificial delay: while one batch's fsync runs the next one
/// gathers, so batches grow with load and a lone record is committed at once.
///
/// Share it behind an `Arc`. From async code use [`submit_async`](Self::submit_async) or
/// [`try_submit`](Self::try_submit), never [`submit`](Self::submit) (which blocks and panics
/// inside a runtime). A record whose submit has returned `Ok` is committed before
/// [`shutdown`](Self::shutdown) returns, or shutdown reports it lost. A failed commit is logged
/// and retried with back-off, keeping the records; meanwhile the queue fills and submitters feel
/// back-pressure. Dropping the writer shuts it down.
#[derive(Debug)]
pub struct AuditWriter {
    /// `None` once shut down. Submitters clone the sender out and release the lock before
    /// sending, so shutdown never waits on a full queue; the thread drains until every clone
    /// is gone, which is what makes every accepted record reach the disk.
    sender: RwLock<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<Result<u64, AuditError>>>>,
    closing: Arc<AtomicBool>,
}

impl AuditWriter {
    /// Opens the log at `path` and starts the writer thread.
    pub fn open(
        path: impl AsRef<std::path::Path>,
        config: WriterConfig,
    ) -> Result<Self, AuditError> {
        Self::spawn(AuditStore::open(path)?, config)
    }

    /// Starts the writer thread on `store`.
    pub fn spawn(store: AuditStore, config: WriterConfig) -> Result<Self, AuditError> {
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let closing = Arc::new(AtomicBool::new(false));
        let thread_closing = Arc::clone(&closing);
        let thread = thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || run(store, receiver, config, &thread_closing))
            .map_err(|source| AuditError::SpawnWriter { source })?;
        Ok(Self {
            sender: RwLock::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            closing,
        })
    }

    fn sender(&self) -> Option<mpsc::Sender<Command>> {
        self.sender
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues `record`, waiting while the queue is full. For threads outside an async runtime
    /// (in a runtime it panics: use [`submit_async`](Self::submit_async)).
    pub fn submit(&self, record: AuditRecord) -> Result<(), AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        sender
            .blocking_send(Command::Record(record.into_prepared()?))
            .map_err(|_| AuditError::WriterClosed)
    }

    /// Queues `record`, waiting asynchronously while the queue is full.
    pub async fn submit_async(&self, record: AuditRecord) -> Result<(), AuditError> {
        self.submit_encoded_async(record.into_encoded()?).await
    }

    /// Queues `record` (its payload already encoded), waiting asynchronously while the queue
    /// is full.
    pub async fn submit_encoded_async(&self, record: EncodedRecord) -> Result<(), AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        sender
            .send(Command::Record(record.into_prepared()?))
            .await
            .map_err(|_| AuditError::WriterClosed)
    }

    /// Queues `record` if there is room, without ever waiting; hands it back when the queue is
    /// full (the writer is behind) or the writer is shut down.
    pub fn try_submit(&self, record: AuditRecord) -> Result<(), TrySubmitError> {
        if let Err(source) = record.validate() {
            return Err(TrySubmitError::Invalid { source });
        }
        let Some(sender) = self.sender() else {
            return Err(TrySubmitError::Closed {
                record: Box::new(record),
            });
        };
        // Room first, so that a refused record goes back as it came.
        let permit = match sender.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                return Err(TrySubmitError::Full {
                    record: Box::new(record),
                });
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(TrySubmitError::Closed {
                    record: Box::new(record),
                });
            }
        };
        let prepared = record
            .into_prepared()
            .map_err(|source| TrySubmitError::Invalid { source })?;
        permit.send(Command::Record(prepared));
        Ok(())
    }

    /// Waits until every record submitted before this call is durable; returns the seq of the
    /// last durable record (0 while the log is empty). Fails, without losing the records, when
    /// the commit in front of it failed. Outside an async runtime only (see
    /// [`flush_async`](Self::flush_async)).
    pub fn flush(&self) -> Result<u64, AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        let (ack, done) = oneshot::channel();
        sender
            .blocking_send(Command::Flush(ack))
            .map_err(|_| AuditError::WriterClosed)?;
        done.blocking_recv().map_err(|_| AuditError::WriterClosed)?
    }

    /// [`flush`](Self::flush) for async code.
    pub async fn flush_async(&self) -> Result<u64, AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        let (ack, done) = oneshot::channel();
        sender
            .send(Command::Flush(ack))
            .await
            .map_err(|_| AuditError::WriterClosed)?;
        done.await.map_err(|_| AuditError::WriterClosed)?
    }

    /// Stops taking records, commits everything accepted so far and joins the thread; returns
    /// the seq of the last durable record. Blocks (from async code, call it in
    /// `spawn_blocking`). A second call returns [`AuditError::WriterClosed`].
    pub fn shutdown(&self) -> Result<u64, AuditError> {
        self.closing.store(true, Ordering::Release);
        drop(
            self.sender
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let thread = thread.ok_or(AuditError::WriterClosed)?;
        thread.join().map_err(|_| AuditError::WriterPanicked)?
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        let running = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if running && let Err(err) = self.shutdown() {
            tracing::error!(error = %error_chain(&err), "audit writer shut down with an error");
        }
    }
}

/// The writer thread: commit what has queued, answer flushes in order, until every sender is
/// gone and the queue is empty.
fn run(
    mut store: AuditStore,
    mut receiver: mpsc::Receiver<Command>,
    config: WriterConfig,
    closing: &AtomicBool,
) -> Result<u64, AuditError> {
    let max_batch = config.max_batch.max(1);
    let mut commands = Vec::with_capacity(max_batch);
    let mut pending = Vec::with_capacity(max_batch);
    let mut flushes = Vec::new();
    while receiver.blocking_recv_many(&mut commands, max_batch) > 0 {
        for command in commands.drain(..) {
            match command {
                Command::Record(record) => pending.push(record),
                Command::Flush(ack) => flushes.push(ack),
            }
        }
        commit(
            &mut store,
            &mut pending,
            &mut flushes,
            &config,
            closing,
            &receiver,
        )?;
    }
    Ok(head_seq(&store))
}

/// Commits `pending`, retrying with back-off until it succeeds (or, once closing, until the
/// attempts run out). Flushes queued behind the records are answered after the commit, or with
/// the error when an attempt fails.
fn commit(
    store: &mut AuditStore,
    pending: &mut Vec<Prepared>,
    flushes: &mut Vec<oneshot::Sender<Result<u64, AuditError>>>,
    config: &WriterConfig,
    closing: &AtomicBool,
    receiver: &mpsc::Receiver<Command>,
) -> Result<(), AuditError> {
    let mut delay = config.retry_delay;
    let mut closing_attempts = 0;
    loop {
        match store.append_prepared(pending) {
            Ok(_) => {
                pending.clear();
                let seq = head_seq(store);
                for ack in flushes.drain(..) {
                    // A flusher that stopped waiting is no concern of ours.
                    let _ = ack.send(Ok(seq));
                }
                return Ok(());
            }
            Err(err) => {
                let err = Arc::new(err);
                tracing::error!(
                    error = %error_chain(err.as_ref()),
                    records = pending.len(),
                    retry_in = ?delay,
                    "failed to commit audit records, retrying"
                );
                for ack in flushes.drain(..) {
                    let _ = ack.send(Err(AuditError::Commit {
                        source: Arc::clone(&err),
                    }));
                }
                if closing.load(Ordering::Acquire) {
                    closing_attempts += 1;
                    if closing_attempts >= config.shutdown_attempts {
                        return Err(AuditError::Unwritten {
                            lost: pending.len() + receiver.len(),
                            source: err,
                        });
                    }
                }
                thread::sleep(delay);
                delay = (delay * 2).min(config.max_retry_delay);
            }
        }
    }
}

fn head_seq(store: &AuditStore) -> u64 {
    store.head().map_or(0, |head| head.seq)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rusqlite::Connection;
    use time::macros::datetime;

    use super::*;
    use crate::{ExportFilter, StoredRecord, export, store::tests::sample, verify};

    #[test]
    fn a_logged_error_names_its_causes() {
        let err = AuditError::Sqlite {
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        };
        let text = error_chain(&err);
        assert!(text.starts_with("audit log database error: "), "{text}");
        assert!(text.contains("full"), "{text}");
    }

    fn stored(path: &std::path::Path) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        export(path, &mut out, &ExportFilter::default()).unwrap();
        std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn records_from_many_threads_all_survive_shutdown_in_submission_order() {
        const THREADS: u64 = 4;
        const EACH: u64 = 2_500;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(
            &path,
            WriterConfig {
                // Small enough that the submitters meet back-pressure.
                queue_capacity: 256,
                max_batch: 512,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        thread::scope(|scope| {
            for t in 0..THREADS {
                let writer = &writer;
                scope.spawn(move || {
                    for i in 0..EACH {
                        writer
                            .submit(sample(i).with_request_id(format!("{t}-{i}")))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(writer.shutdown().unwrap(), THREADS * EACH);

        let report = verify(&path).unwrap();
        assert_eq!(report.records, THREADS * EACH);
        let records = stored(&path);
        let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
        for record in &records {
            let id = record.request_id.as_deref().unwrap();
            let (t, i) = id.split_once('-').unwrap();
            seen.entry(t.parse().unwrap())
                .or_default()
                .push(i.parse().unwrap());
        }
        for t in 0..THREADS {
            // Every record of each thread, once, in the order it submitted them.
            assert_eq!(seen[&t], (0..EACH).collect::<Vec<_>>(), "thread {t}");
        }
    }

    #[test]
    fn flush_returns_once_everything_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        assert_eq!(writer.flush().unwrap(), 0);
        for i in 0..100 {
            writer.submit(sample(i)).unwrap();
        }
        assert_eq!(writer.flush().unwrap(), 100);
        // Another connection sees them while the writer still runs.
        assert_eq!(verify(&path).unwrap().records, 100);
        for i in 100..150 {
            writer.submit(sample(i)).unwrap();
        }
        assert_eq!(writer.flush().unwrap(), 150);
        assert_eq!(stored(&path).len(), 150);
        assert_eq!(writer.shutdown().unwrap(), 150);
    }

    #[test]
    fn try_submit_hands_the_record_back_when_the_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(
            &path,
            WriterConfig {
                queue_capacity: 1,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        // Another connection holds the write lock, so the writer cannot commit.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

        // At most one record in the writer's hands and one in the queue: the third must bounce.
        let mut accepted = 0;
        let bounced = (0..3)
            .find_map(|i| match writer.try_submit(sample(i)) {
                Ok(()) => {
                    accepted += 1;
                    None
                }
                Err(TrySubmitError::Full { record }) => Some((i, record)),
                Err(other) => panic!("unexpected {other:?}"),
            })
            .expect("the queue never filled");
        assert_eq!(*bounced.1, sample(bounced.0));

        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(writer.flush().unwrap(), accepted);
        writer.submit(*bounced.1).unwrap();
        assert_eq!(writer.shutdown().unwrap(), accepted + 1);
        assert_eq!(verify(&path).unwrap().records, accepted + 1);
    }

    #[test]
    fn nothing_is_taken_after_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        writer.submit(sample(0)).unwrap();
        assert_eq!(writer.shutdown().unwrap(), 1);

        assert!(matches!(
            writer.submit(sample(1)),
            Err(AuditError::WriterClosed)
        ));
        assert!(matches!(
            writer.try_submit(sample(2)),
            Err(TrySubmitError::Closed { record }) if *record == sample(2)
        ));
        assert!(matches!(writer.flush(), Err(AuditError::WriterClosed)));
        assert!(matches!(writer.shutdown(), Err(AuditError::WriterClosed)));
        assert_eq!(verify(&path).unwrap().records, 1);
    }

    #[test]
    fn dropping_the_writer_commits_what_it_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        {
            let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
            for i in 0..50 {
                writer.submit(sample(i)).unwrap();
            }
        }
        assert_eq!(verify(&path).unwrap().records, 50);
        // And a new writer continues the chain.
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        writer.submit(sample(50)).unwrap();
        assert_eq!(writer.shutdown().unwrap(), 51);
        assert_eq!(verify(&path).unwrap().records, 51);
    }

    #[test]
    fn invalid_records_are_refused_at_submit() {
        let dir = tempfile::tempdir().unwrap();
        let writer =
            AuditWriter::open(dir.path().join("audit.db"), WriterConfig::default()).unwrap();
        let bad = sample(0).with_at(datetime!(-0001-06-01 0:00 UTC));
        assert!(matches!(
            writer.submit(bad.clone()),
            Err(AuditError::TimestampOutOfRange { .. })
        ));
        assert!(matches!(
            writer.try_submit(bad),
            Err(TrySubmitError::Invalid { .. })
        ));
        assert_eq!(writer.shutdown().unwrap(), 0);
    }

    #[test]
    fn async_callers_submit_and_flush_without_blocking_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = Arc::new(
            AuditWriter::open(
                &path,
                WriterConfig {
                    queue_capacity: 8,
                    ..WriterConfig::default()
                },
            )
            .unwrap(),
        );
        // One runtime thread: a blocking send would deadlock the tasks behind it.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let flushed = runtime.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let writer = Arc::clone(&writer);
                    tokio::spawn(async move {
                        for i in 0..100 {
                            writer.submit_async(sample(t * 100 + i)).await.unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            writer.flush_async().await.unwrap()
        });
        assert_eq!(flushed, 400);
        assert_eq!(writer.shutdown().unwrap(), 400);
        assert_eq!(verify(&path).unwrap().records, 400);
    }
}
