//! One sink's deliveries: a bounded queue, attempts with exponential backoff (or the
//! receiver's `Retry-After`), and a dead letter in the store when they run out.
//!
//! A sink's worker delivers one job at a time, in order, so a request's message is posted
//! before it is updated. An outage holds that sink's queue only: decisions never wait on it
//! (the feed reads the hub's broadcast, which never blocks a publisher), and other sinks
//! keep delivering.

use std::{future::Future, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::config::RetryConfig;
use crate::{
    lifecycle::request_span,
    metrics::Metrics,
    store::{Claim, DeadLetter, DeliveryKey, Store, StoreError},
};

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Try again later (network error, 5xx, 429); `after` is the receiver's `Retry-After`.
    Retry {
        message: String,
        after: Option<Duration>,
    },
    /// The receiver refused it for good (a 4xx, an unknown channel): no retry.
    Permanent { message: String },
}

impl Failure {
    pub(crate) fn retry(message: impl Into<String>) -> Self {
        Self::Retry {
            message: message.into(),
            after: None,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Retry { message, .. } | Self::Permanent { message } => message,
        }
    }
}

/// Classifies an HTTP answer: 2xx is done, 408/429/5xx retry (429 after its `Retry-After`),
/// any other status is refused for good. `what` names the call in messages.
pub(crate) fn classify(response: &reqwest::Response, what: &str) -> Result<(), Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let message = format!("{what}: http status {status}");
    if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
        let after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(Failure::Retry { message, after })
    } else {
        Err(Failure::Permanent { message })
    }
}

/// A network failure: always worth another attempt. Only its kind is kept: reqwest's text
/// names the URL, and a Teams workflow URL is a secret.
pub(crate) fn network(what: &str, error: &reqwest::Error) -> Failure {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    Failure::retry(format!("{what}: {kind}"))
}

/// A sink: turns jobs into calls to one receiver.
pub(crate) trait Sink: Send + Sync + 'static {
    type Job: Send + Sync + 'static;

    /// Names the sink in logs and dead letters (`slack`, `webhook:siem`).
    fn name(&self) -> &str;

    /// The delivery a job makes: its lease, its name in logs and dead letters.
    fn key(&self, job: &Self::Job) -> DeliveryKey;

    /// The request a job is about (a grant's: the request whose decision made it): what is
    /// logged while delivering it is in that request's span, so JSON logs carry its id.
    fn request_id(&self, job: &Self::Job) -> Uuid;

    /// One attempt, under the delivery's lease ([`Leases`]); must be idempotent (a retry after
    /// a lost answer must not post twice where the receiver allows avoiding it).
    fn deliver(&self, job: &Self::Job) -> impl Future<Output = Result<(), Failure>> + Send;

    /// The job of a delivery known by its key only (a lease another replica let expire, a
    /// dead letter to retry); `None` if it names nothing this sink delivers.
    fn resume(&self, key: &DeliveryKey) -> impl Future<Output = Option<Self::Job>> + Send;
}

/// A store failure: worth another attempt.
#[expect(
    clippy::needless_pass_by_value,
    reason = "made for `map_err(store_failure)`"
)]
pub(crate) fn store_failure(error: StoreError) -> Failure {
    Failure::retry(format!("store: {error}"))
}

/// This process's delivery leases (table `deliveries`): before it calls a receiver, a sink
/// takes the delivery's lease, so of replicas sharing the database one delivers; a lease
/// whose holder died expires and another replica takes the delivery over.
#[derive(Clone)]
pub(crate) struct Leases {
    pub store: Arc<dyn Store>,
    /// Names this process (random per start).
    pub owner: String,
    /// How long a lease holds without being renewed (every claim by its holder renews it).
    pub lease: Duration,
}

impl Leases {
    /// Takes `key`'s lease: `None` if another holder's is live (it delivers), else when a
    /// call with an unknown outcome was started (`Some(Some(at))`).
    pub(crate) async fn claim(
        &self,
        key: &DeliveryKey,
    ) -> Result<Option<Option<OffsetDateTime>>, Failure> {
        let now = OffsetDateTime::now_utc();
        let claim = self
            .store
            .claim_delivery(key.clone(), self.owner.clone(), now, now + self.lease)
            .await
            .map_err(store_failure)?;
        Ok(match claim {
            Claim::Held => None,
            Claim::Taken { attempted_at } => Some(attempted_at),
        })
    }

    /// Notes that a call to the receiver starts now (its outcome unknown until released).
    pub(crate) async fn attempt(&self, key: &DeliveryKey) -> Result<(), Failure> {
        self.store
            .delivery_attempt(key.clone(), self.owner.clone(), OffsetDateTime::now_utc())
            .await
            .map_err(store_failure)
    }

    /// Frees `key`'s lease: its outcome is known.
    pub(crate) async fn release(&self, key: &DeliveryKey) -> Result<(), Failure> {
        self.store
            .release_delivery(key.clone(), self.owner.clone())
            .await
            .map_err(store_failure)
    }
}

/// The delay before attempt `attempt + 1` (attempt counts from 1).
pub(crate) fn backoff(retry: &RetryConfig, attempt: u32, after: Option<Duration>) -> Duration {
    let max = Duration::from_millis(retry.max_ms);
    if let Some(after) = after {
        return after.min(max);
    }
    let factor = 1_u64
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_millis(retry.initial_ms.saturating_mul(factor)).min(max)
}

/// Starts `sink`'s worker; returns its queue and the worker's task. The worker ends when
/// the queue's senders are gone and it is empty (at shutdown the feed stops sending: what
/// is queued is still attempted once), or when `shutdown` interrupts a retry.
pub(crate) fn spawn<S: Sink>(
    sink: Arc<S>,
    leases: Leases,
    metrics: Arc<Metrics>,
    retry: RetryConfig,
    capacity: usize,
    shutdown: CancellationToken,
) -> (mpsc::Sender<S::Job>, JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<S::Job>(capacity.max(1));
    let worker = tokio::spawn(async move {
        while let Some(job) = receiver.recv().await {
            let span = request_span(sink.request_id(&job));
            if !run(&*sink, &leases, &metrics, &retry, &job, &shutdown)
                .instrument(span)
                .await
            {
                return;
            }
        }
    });
    (sender, worker)
}

/// Delivers one job with retries; `false` when shutdown interrupted it (no retry waits
/// once the service stops: the attempt made is the last).
async fn run<S: Sink>(
    sink: &S,
    leases: &Leases,
    metrics: &Metrics,
    retry: &RetryConfig,
    job: &S::Job,
    shutdown: &CancellationToken,
) -> bool {
    let mut attempt = 0_u32;
    loop {
        attempt += 1;
        let failure = match sink.deliver(job).await {
            Ok(()) => return true,
            Err(failure) => failure,
        };
        let give_up =
            matches!(failure, Failure::Permanent { .. }) || attempt >= retry.max_attempts.max(1);
        metrics.notification_failed(sink.name(), give_up);
        if give_up {
            let key = sink.key(job);
            tracing::error!(
                sink = sink.name(),
                key = %key,
                attempt,
                error = failure.message(),
                "notification not delivered; kept as a dead letter"
            );
            let letter = DeadLetter {
                sink: sink.name().to_owned(),
                key: key.to_string(),
                error: failure.message().to_owned(),
                attempts: attempt,
                at: OffsetDateTime::now_utc(),
            };
            if let Err(error) = leases.store.dead_letter(letter).await {
                tracing::error!(%error, sink = sink.name(), "failed to store a dead letter");
            }
            // Given up: no other replica should take it over (an operator retries it).
            if let Err(failure) = leases.release(&key).await {
                tracing::error!(
                    error = failure.message(),
                    sink = sink.name(),
                    "failed to release a delivery"
                );
            }
            return true;
        }
        let after = match &failure {
            Failure::Retry { after, .. } => *after,
            Failure::Permanent { .. } => None,
        };
        let wait = backoff(retry, attempt, after);
        tracing::warn!(
            sink = sink.name(),
            key = %sink.key(job),
            attempt,
            error = failure.message(),
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "notification delivery failed; retrying"
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_honours_retry_after() {
        let retry = RetryConfig {
            initial_ms: 100,
            max_ms: 1000,
            max_attempts: 5,
        };
        let ms = |attempt| backoff(&retry, attempt, None).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5)],
            [100, 200, 400, 800, 1000]
        );
        assert_eq!(backoff(&retry, 60, None).as_millis(), 1000, "no overflow");
        assert_eq!(
            backoff(&retry, 1, Some(Duration::from_millis(300))).as_millis(),
            300
        );
        assert_eq!(
            backoff(&retry, 1, Some(Duration::from_hours(1))).as_millis(),
            1000,
            "a receiver cannot park the queue for an hour"
        );
    }
}
