//! [`AuditShipper`]: ships the agent's local audit log to the decision service, which
//! anchors each host's chain so that a rewritten, truncated or rolled-back host log shows.
//!
//! The local log is the backlog: the shipper keeps no queue, only the service's head for
//! this host and at most one batch in memory. On every (re)connect it learns that head (an
//! empty `ShipAudit` carrying the local head, which also lets the service see a log that
//! fell behind), then reads from the local log from the head on. Each batch starts with the
//! record at the anchored head (an overlap the service checks is unchanged) and carries the
//! local head; the service stores records idempotently by (host, seq).
//!
//! It runs on its own task and its own connection (not the decision stream), and reads the
//! log through its own read-only connection on a blocking thread: shipping never waits
//! behind, or holds anything, a decision needs.

use std::{sync::Arc, time::Duration};

use gatekeep_proto::{
    host_audit::{ChainPoint, Divergence, HostAuditRecord, ShipBatch},
    limits,
    v1::{self, agent_service_client::AgentServiceClient},
};
use gatekeep_util::retry::Backoff;
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::Channel;

use crate::{AgentLinkConfig, agent::endpoint};

/// Records per batch: large enough that the per-batch round trip and transaction are a small
/// share, small enough to stay well inside the message size limit.
pub const BATCH_RECORDS: usize = 500;
/// Payload bytes per batch (the message limit is 1 MiB).
pub const BATCH_BYTES: usize = 512 * 1024;

/// The agent's local log, as the shipper reads it. Called on a blocking thread.
pub trait LocalLog: Send + 'static {
    /// The last record now; `None` while the log is empty.
    fn head(&mut self) -> Result<Option<ChainPoint>, String>;
    /// Records from `from_seq` on, in seq order: at most `limit` records and about `bytes`
    /// bytes of payload.
    fn read_from(
        &mut self,
        from_seq: u64,
        limit: usize,
        bytes: usize,
    ) -> Result<Vec<HostAuditRecord>, String>;
}

/// How the shipper runs.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// The service's addresses and the agent's certificate (as for the decision link).
    pub link: AgentLinkConfig,
    /// Records per batch (at most [`gatekeep_proto::host_audit::MAX_SHIP_RECORDS`]).
    pub batch: usize,
    /// How often the local log is looked at while everything is shipped.
    pub poll: Duration,
    /// How long to wait before reporting again after the service found a divergence (it
    /// will not go away by itself; an operator must look).
    pub diverged_retry: Duration,
}

impl ShipperConfig {
    #[must_use]
    pub fn new(link: AgentLinkConfig) -> Self {
        Self {
            link,
            batch: BATCH_RECORDS,
            poll: Duration::from_secs(1),
            diverged_retry: Duration::from_mins(1),
        }
    }
}

/// Where shipping stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipStatus {
    /// The service's head for this host, as last learned.
    pub anchored: Option<ChainPoint>,
    /// The local log's head, as last read.
    pub local: Option<ChainPoint>,
    /// The divergence the service reported, if any.
    pub divergence: Option<Divergence>,
    /// The last error (connection, refusal, local log), cleared by the next success.
    pub error: Option<String>,
}

impl ShipStatus {
    /// Local records not anchored yet.
    #[must_use]
    pub fn lag(&self) -> u64 {
        let local = self.local.as_ref().map_or(0, |head| head.seq);
        let anchored = self.anchored.as_ref().map_or(0, |head| head.seq);
        local.saturating_sub(anchored)
    }
}

/// The running shipper; dropping it (or [`shutdown`](Self::shutdown)) stops it.
#[derive(Debug)]
pub struct AuditShipper {
    status: watch::Receiver<ShipStatus>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl AuditShipper {
    /// Starts shipping `log` in the background (within the current tokio runtime).
    pub fn start(config: ShipperConfig, log: impl LocalLog) -> Result<Self, crate::LinkError> {
        let endpoints: Vec<String> = std::iter::once(config.link.endpoint.clone())
            .chain(config.link.failover.iter().cloned())
            .collect();
        for address in &endpoints {
            endpoint(&config.link, address)
                .map_err(|message| crate::LinkError::Config { message })?;
        }
        if config.link.tls.identity.is_none() {
            return Err(crate::LinkError::Config {
                message: "shipping audit records needs the agent's client certificate".into(),
            });
        }
        let (status_tx, status) = watch::channel(ShipStatus::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(
            Shipper {
                config,
                endpoints,
                log: Some(Box::new(log)),
                status: status_tx,
                stopped,
            }
            .run(),
        );
        Ok(Self {
            status,
            stop,
            task: Some(task),
        })
    }

    /// Follows [`ShipStatus`] changes.
    #[must_use]
    pub fn status(&self) -> watch::Receiver<ShipStatus> {
        self.status.clone()
    }

    /// Stops shipping. Nothing is lost: what was not shipped stays in the local log.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            drop(task.await);
        }
    }
}

impl Drop for AuditShipper {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Why one connection's shipping ended.
enum Ended {
    Stopped,
    /// Reconnect (to the next address).
    Failed(String),
}

struct Shipper {
    config: ShipperConfig,
    endpoints: Vec<String>,
    /// `None` only while a blocking read holds it.
    log: Option<Box<dyn LocalLog>>,
    status: watch::Sender<ShipStatus>,
    stopped: watch::Receiver<bool>,
}

impl Shipper {
    async fn run(mut self) {
        let backoff: Backoff = self.config.link.backoff;
        let mut delays = backoff.delays();
        let mut current = 0;
        let mut failed = 0;
        loop {
            let address = self.endpoints[current].clone();
            let ended = match self.connect(&address).await {
                Ok(client) => {
                    delays.reset();
                    failed = 0;
                    self.serve(client).await
                }
                Err(error) => Ended::Failed(error),
            };
            let error = match ended {
                Ended::Stopped => return,
                Ended::Failed(error) => error,
            };
            tracing::warn!(%address, %error, "audit shipping interrupted");
            self.status.send_modify(|status| status.error = Some(error));
            // The next address at once; the back-off once every address failed in turn.
            current = (current + 1) % self.endpoints.len();
            failed += 1;
            let delay = if failed < self.endpoints.len() {
                Duration::ZERO
            } else {
                failed = 0;
                delays.next().unwrap_or(backoff.max)
            };
            if self.sleep(delay).await {
                return;
            }
        }
    }

    /// Waits `delay`; `true` if stopped meanwhile.
    async fn sleep(&mut self, delay: Duration) -> bool {
        if *self.stopped.borrow() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => *self.stopped.borrow(),
            _ = self.stopped.changed() => true,
        }
    }

    async fn connect(&mut self, address: &str) -> Result<AgentServiceClient<Channel>, String> {
        let channel = endpoint(&self.config.link, address)?
            .connect()
            .await
            .map_err(|err| format!("cannot connect to {address}: {}", chain(&err)))?;
        Ok(AgentServiceClient::new(channel).max_decoding_message_size(limits::MAX_MESSAGE_BYTES))
    }

    /// Runs a blocking read of the local log.
    async fn with_log<T: Send + 'static>(
        &mut self,
        read: impl FnOnce(&mut dyn LocalLog) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let Some(mut log) = self.log.take() else {
            return Err("the local audit log is in use".into());
        };
        let (log, result) = tokio::task::spawn_blocking(move || {
            let result = read(&mut *log);
            (log, result)
        })
        .await
        .map_err(|err| format!("reading the local audit log failed: {err}"))?;
        self.log = Some(log);
        result
    }

    /// Ships over one connection until it fails or the shipper stops.
    async fn serve(&mut self, mut client: AgentServiceClient<Channel>) -> Ended {
        // Unknown until the service says: learned first on every connection.
        let mut anchored: Option<Option<ChainPoint>> = None;
        let mut reported: Option<Option<ChainPoint>> = None;
        loop {
            if *self.stopped.borrow() {
                return Ended::Stopped;
            }
            let local = match self.with_log(LocalLog::head).await {
                Ok(local) => local,
                Err(error) => {
                    if self.unreadable(error).await {
                        return Ended::Stopped;
                    }
                    continue;
                }
            };
            let records = match &anchored {
                // Something new: from the anchored head (the overlap) on.
                Some(head)
                    if local.as_ref().map_or(0, |l| l.seq) > head.as_ref().map_or(0, |h| h.seq) =>
                {
                    let from = head.as_ref().map_or(1, |head| head.seq);
                    let (limit, bytes) = (self.config.batch, BATCH_BYTES);
                    match self
                        .with_log(move |log| log.read_from(from, limit, bytes))
                        .await
                    {
                        Ok(records) => records,
                        Err(error) => {
                            if self.unreadable(error).await {
                                return Ended::Stopped;
                            }
                            continue;
                        }
                    }
                }
                // Nothing new, and the service already knows this head: wait.
                Some(_) if reported.as_ref() == Some(&local) => {
                    self.status
                        .send_modify(|status| status.local.clone_from(&local));
                    if self.sleep(self.config.poll).await {
                        return Ended::Stopped;
                    }
                    continue;
                }
                // Learn the service's head, or report a head that changed without growing.
                _ => Vec::new(),
            };
            let batch = ShipBatch {
                records,
                local_head: local.clone(),
            };
            let response = match client.ship_audit(v1::ShipAuditRequest::from(batch)).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    // Out of step with the service (another connection shipped meanwhile):
                    // learn its head again.
                    tracing::warn!(message = status.message(), "audit shipping refused");
                    anchored = None;
                    reported = None;
                    self.status
                        .send_modify(|s| s.error = Some(status.message().to_owned()));
                    if self.sleep(self.config.poll).await {
                        return Ended::Stopped;
                    }
                    continue;
                }
                Err(status) => {
                    return Ended::Failed(format!("{} ({:?})", status.message(), status.code()));
                }
            };
            let head = self.learned(response, local.clone());
            anchored = Some(head);
            reported = Some(local);
            let diverged = self.status.borrow().divergence.is_some();
            if diverged && self.sleep(self.config.diverged_retry).await {
                return Ended::Stopped;
            }
        }
    }

    /// Logs a local log that cannot be read and waits a poll; `true` if stopped meanwhile.
    async fn unreadable(&mut self, error: String) -> bool {
        tracing::error!(%error, "cannot read the local audit log to ship it");
        self.status.send_modify(|status| status.error = Some(error));
        self.sleep(self.config.poll).await
    }

    /// Takes in the service's answer: its head for this host (returned) and any divergence.
    fn learned(
        &self,
        response: v1::ShipAuditResponse,
        local: Option<ChainPoint>,
    ) -> Option<ChainPoint> {
        let head = (response.head_seq > 0).then_some(ChainPoint {
            seq: response.head_seq,
            hash: response.head_hash,
        });
        let divergence = response
            .divergence
            .and_then(|wire| Divergence::try_from(wire).ok());
        self.status.send_modify(|status| {
            if let Some(divergence) = &divergence
                && status.divergence.as_ref() != Some(divergence)
            {
                tracing::error!(
                    seq = divergence.seq,
                    kind = divergence.kind.as_str(),
                    detail = %divergence.detail,
                    "the decision service found that this host's audit log no longer \
                     matches what it shipped; an operator must look (`gatekeep audit \
                     verify --host`)"
                );
            }
            status.anchored.clone_from(&head);
            status.local = local;
            status.divergence = divergence;
            status.error = None;
        });
        head
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A [`LocalLog`] in memory, for tests and benchmarks: records can be appended, rewritten
/// and removed behind the shipper's back.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    records: Arc<std::sync::Mutex<Vec<HostAuditRecord>>>,
}

impl MemoryLog {
    /// The records, to change.
    pub fn records(&self) -> std::sync::MutexGuard<'_, Vec<HostAuditRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LocalLog for MemoryLog {
    fn head(&mut self) -> Result<Option<ChainPoint>, String> {
        Ok(self.records().last().map(|record| ChainPoint {
            seq: record.seq,
            hash: record.hash.clone(),
        }))
    }

    fn read_from(
        &mut self,
        from_seq: u64,
        limit: usize,
        _bytes: usize,
    ) -> Result<Vec<HostAuditRecord>, String> {
        Ok(self
            .records()
            .iter()
            .filter(|record| record.seq >= from_seq)
            .take(limit)
            .cloned()
            .collect())
    }
}
