//! Retrying and polling with delays, until a deadline.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// Delays between attempts: `initial`, doubling up to `max`; with `jitter`,
/// each with up to 20% added, so that peers that failed together do not
/// retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: bool,
}

impl Backoff {
    /// The same delay every time, without jitter.
    #[must_use]
    pub const fn fixed(delay: Duration) -> Self {
        Self {
            initial: delay,
            max: delay,
            jitter: false,
        }
    }

    /// The delays, in order (an endless iterator).
    #[must_use]
    pub fn delays(self) -> Delays {
        Delays {
            backoff: self,
            next: self.initial,
        }
    }
}

/// [`Backoff::delays`].
#[derive(Debug, Clone)]
pub struct Delays {
    backoff: Backoff,
    next: Duration,
}

impl Delays {
    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.backoff.initial;
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.backoff.max);
        Some(if self.backoff.jitter {
            jitter(delay)
        } else {
            delay
        })
    }
}

/// Adds up to 20% to `delay`.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = delay / 5;
    if spread.is_zero() {
        return delay;
    }
    let spread_nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX).max(1);
    delay + Duration::from_nanos(u64::from(nanos) % spread_nanos)
}

/// Runs `attempt` until it succeeds, waiting `backoff`'s delays after each
/// failure (reported to `on_error` first). `None` once `deadline` passes,
/// even in the middle of an attempt.
pub async fn retry_until<T, E, F, Fut>(
    deadline: Instant,
    backoff: Backoff,
    mut attempt: F,
    mut on_error: impl FnMut(&E),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff.delays();
    let attempts = async {
        loop {
            match attempt().await {
                Ok(value) => return value,
                Err(err) => {
                    on_error(&err);
                    let delay = delays.next().unwrap_or(backoff.max);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    };
    tokio::time::timeout_at(deadline, attempts).await.ok()
}

/// Asks `check` every `every` until it gives `Some`, or `deadline` passes
/// (then `None`).
pub async fn poll_until<T>(
    deadline: Instant,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll_until`] for blocking code (sleeps the thread).
pub fn poll_until_blocking<T>(
    deadline: std::time::Instant,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, time::Duration};

    use super::*;

    #[test]
    fn delays_double_up_to_the_max_and_reset() {
        let mut delays = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            jitter: false,
        }
        .delays();
        let first: Vec<_> = delays.by_ref().take(5).collect();
        assert_eq!(
            first,
            [200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        delays.reset();
        assert_eq!(delays.next(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn jitter_adds_at_most_a_fifth() {
        let backoff = Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(10),
            jitter: true,
        };
        for delay in backoff.delays().take(20) {
            assert!(delay >= Duration::from_secs(10) && delay < Duration::from_secs(12));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_until_retries_failures_and_gives_up_at_the_deadline() {
        let calls = Cell::new(0);
        let errors = Cell::new(0);
        let start = Instant::now();
        let got = retry_until(
            start + Duration::from_secs(10),
            Backoff::fixed(Duration::from_secs(1)),
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 3 { Err("down") } else { Ok(n) } }
            },
            |_| errors.set(errors.get() + 1),
        )
        .await;
        assert_eq!(got, Some(3));
        assert_eq!(errors.get(), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let never = retry_until(
            Instant::now() + Duration::from_secs(5),
            Backoff::fixed(Duration::from_secs(1)),
            || async { Err::<(), _>("down") },
            |_| {},
        )
        .await;
        assert_eq!(never, None);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_until_stops_at_the_first_some_or_the_deadline() {
        let calls = Cell::new(0);
        let found = poll_until(
            Instant::now() + Duration::from_secs(1),
            Duration::from_millis(20),
            || {
                calls.set(calls.get() + 1);
                (calls.get() == 4).then_some("ready")
            },
        )
        .await;
        assert_eq!(found, Some("ready"));
        let none: Option<()> = poll_until(
            Instant::now() + Duration::from_millis(100),
            Duration::from_millis(20),
            || None,
        )
        .await;
        assert_eq!(none, None);
        assert_eq!(
            poll_until_blocking(std::time::Instant::now(), Duration::ZERO, || Some(1)),
            Some(1)
        );
    }
}
