//! What open consoles cost the decision service (issue 21: 100 consoles watching the live
//! queue add at most 10 % to the service's CPU per decision).
//!
//! The shipped `gatekeep-server` binary in its own process, so that its CPU time is its own
//! and not the load generator's: an agent submits requests, a reviewer decides them over the
//! HTTP API, and either no console or 100 signed-in consoles (one HTTP/2 connection each,
//! as 100 browsers) hold the live queue (`GET /api/v1/events`) open meanwhile. A round
//! counts the service's CPU time from the first submission until every console has seen
//! every decision, so the fan-out of both the new requests and the decisions is inside.
//!
//! Noise: two services run side by side, the same workload at the same moments, one with
//! the consoles and one without (which one swaps every pair), so the shared machine's other
//! load falls on both alike; each pair gives one ratio, and the figure is the median of the
//! pairs' ratios with their range and a 95 % interval. The CPU time is read
//! in nanoseconds (`/proc/PID/task/*/schedstat`), not in 10 ms ticks.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use gatekeep_client::AgentLink;
use gatekeep_proto::model::Verdict;
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{
    cpu_seconds,
    service::{Service, request},
};
use crate::report::{Figure, Summary, Target};

/// Consoles watching in the "with" rounds (the figure).
const WATCHERS: usize = 100;
/// Decisions at once: a reviewer deciding from the console decides one at a time, a few
/// reviewers a few.
const DECIDERS: usize = 4;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Pairs of rounds (one without consoles, one with).
    pub pairs: usize,
    /// Requests submitted and decided per round.
    pub decisions: usize,
}

impl Sizes {
    /// The full sizes, or a smoke run's; `pairs` (`--console-pairs`) overrides either's.
    #[must_use]
    pub fn of(smoke: bool, pairs: Option<u16>) -> Self {
        let (default_pairs, decisions) = if smoke { (1, 50) } else { (16, 600) };
        Self {
            pairs: pairs.map_or(default_pairs, usize::from),
            decisions,
        }
    }
}

/// The service's CPU time so far, in nanoseconds: the sum over its threads of
/// `/proc/PID/task/TID/schedstat` (time on the CPU, exact), keyed by thread.
fn thread_cpu_ns(pid: u32) -> Result<BTreeMap<u32, u64>> {
    let mut threads = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list /proc/{pid}/task"))?
    {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread may end between the listing and the read: it is then left out.
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("unexpected /proc/{pid}/task/{tid}/schedstat: {text}"))?;
        threads.insert(tid, ns);
    }
    Ok(threads)
}

/// A reading of the service's CPU time at the start of a round.
struct CpuMark {
    threads: BTreeMap<u32, u64>,
    ticks: f64,
}

impl CpuMark {
    fn take(pid: u32) -> Result<Self> {
        Ok(Self {
            threads: thread_cpu_ns(pid)?,
            ticks: cpu_seconds(pid)?,
        })
    }

    /// Seconds of CPU since the mark: exact from the threads' counters, unless a thread
    /// that ran at the mark has ended since (its time is then only in the process's total,
    /// read in clock ticks).
    fn elapsed(&self, pid: u32) -> Result<(f64, bool)> {
        let now = thread_cpu_ns(pid)?;
        if self.threads.keys().all(|tid| now.contains_key(tid)) {
            let ns: u64 = now
                .iter()
                .map(|(tid, ns)| ns.saturating_sub(self.threads.get(tid).copied().unwrap_or(0)))
                .sum();
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
            let seconds = ns as f64 / 1e9;
            Ok((seconds, true))
        } else {
            Ok((cpu_seconds(pid)? - self.ticks, false))
        }
    }
}

/// An HTTPS client of the service trusting its CA, speaking HTTP/2 as browsers do.
fn client(ca_pem: &str) -> Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("the service's CA certificate")?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_mins(5))
        .build()?)
}

/// What the consoles of a round have seen.
#[derive(Default)]
struct Seen {
    /// Consoles that had their snapshot (`ready`).
    ready: AtomicUsize,
    /// Approvals seen, summed over the consoles.
    approvals: AtomicUsize,
}

impl Seen {
    fn approvals(&self) -> usize {
        self.approvals.load(Ordering::Relaxed)
    }
}

/// Reads one console's event stream, counting `ready` and approved requests. Cheaply: the
/// consoles run beside the measured services on the same cores, so they count text rather
/// than parse JSON (an approval is `"state":"approved"` in a `left` item; the service sends
/// a decided request nowhere else).
async fn read_events(mut stream: reqwest::Response, seen: Arc<Seen>) {
    const APPROVED: &str = "\"state\":\"approved\"";
    let mut pending = Vec::new();
    while let Ok(Some(chunk)) = stream.chunk().await {
        pending.extend_from_slice(&chunk);
        // Whole lines only: a chunk may end inside one.
        let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let lines: Vec<u8> = pending.drain(..=end).collect();
        let text = String::from_utf8_lossy(&lines);
        seen.ready
            .fetch_add(text.matches("event: ready\n").count(), Ordering::Relaxed);
        seen.approvals
            .fetch_add(text.matches(APPROVED).count(), Ordering::Relaxed);
    }
}

/// The measuring setup: the service, its agent, a reviewer's client and the consoles'
/// sessions (signed in once, reused by every round).
struct Bench {
    service: Service,
    link: Arc<AgentLink>,
    reviewer: reqwest::Client,
    /// The consoles' session cookies (each round connects them anew, as browsers opening
    /// the console).
    cookies: Vec<String>,
    ca: String,
    next: usize,
}

impl Bench {
    async fn start(server: &Path, base: &Path) -> Result<Self> {
        let service = Service::start(server, base, "full")?;
        let link = service.agent("console-bench").await?;
        let ca = service.pki.ca.cert_pem().to_owned();
        let reviewer = client(&ca)?;
        let mut cookies = Vec::with_capacity(WATCHERS);
        for _ in 0..WATCHERS {
            let signed_in = reviewer
                .post(format!("{}/api/v1/session", service.endpoint))
                .json(&json!({ "token": service.token }))
                .send()
                .await
                .context("console sign-in")?;
            ensure!(
                signed_in.status().is_success(),
                "console sign-in refused: {}",
                signed_in.status()
            );
            let cookie = signed_in
                .headers()
                .get("set-cookie")
                .context("no session cookie")?
                .to_str()?
                .split(';')
                .next()
                .unwrap_or_default()
                .to_owned();
            cookies.push(cookie);
        }
        Ok(Self {
            service,
            link,
            reviewer,
            cookies,
            ca,
            next: 0,
        })
    }

    /// Opens the live queue of `count` consoles, each on a connection of its own, and
    /// waits for their snapshots.
    async fn watch(&self, count: usize, seen: &Arc<Seen>) -> Result<Vec<JoinHandle<()>>> {
        let mut readers = Vec::with_capacity(count);
        for cookie in self.cookies.iter().take(count) {
            let stream = client(&self.ca)?
                .get(format!("{}/api/v1/events", self.service.endpoint))
                .header("cookie", cookie)
                .send()
                .await
                .context("console live queue")?;
            ensure!(
                stream.status().is_success(),
                "live queue refused: {}",
                stream.status()
            );
            readers.push(tokio::spawn(read_events(stream, Arc::clone(seen))));
        }
        let started = Instant::now();
        while seen.ready.load(Ordering::Relaxed) < count {
            ensure!(
                started.elapsed() < Duration::from_mins(1),
                "{} of {count} consoles had their snapshot after 60 s",
                seen.ready.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(readers)
    }

    /// The service's pending requests (`GET /api/v1/status`).
    async fn pending(&self) -> Result<u64> {
        let status: Value = self
            .reviewer
            .get(format!("{}/api/v1/status", self.service.endpoint))
            .bearer_auth(&self.service.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        status["pending"]
            .as_u64()
            .context("no `pending` in the status")
    }

    /// One round with `watchers` consoles open: returns the service's CPU seconds per
    /// decision and whether they were read exactly (see [`CpuMark::elapsed`]).
    async fn round(&mut self, watchers: usize, decisions: usize) -> Result<(f64, bool)> {
        let seen = Arc::new(Seen::default());
        let readers = self.watch(watchers, &seen).await?;
        let pid = self.service.pid();
        let mark = CpuMark::take(pid)?;

        let mut answers = Vec::with_capacity(decisions);
        let mut ids = Vec::with_capacity(decisions);
        for _ in 0..decisions {
            let request = request("push", self.next);
            self.next += 1;
            ids.push(request.id);
            let link = Arc::clone(&self.link);
            answers.push(tokio::spawn(async move { link.decide(request).await }));
        }
        let started = Instant::now();
        while self.pending().await? < decisions as u64 {
            ensure!(
                started.elapsed() < Duration::from_mins(2),
                "the requests were not all pending after 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A few reviewers decide, each one request at a time.
        let ids = Arc::new(Mutex::new(ids));
        let mut deciders = Vec::with_capacity(DECIDERS);
        for _ in 0..DECIDERS {
            let (ids, http) = (Arc::clone(&ids), self.reviewer.clone());
            let (endpoint, token) = (self.service.endpoint.clone(), self.service.token.clone());
            deciders.push(tokio::spawn(async move {
                loop {
                    let Some(id) = ids.lock().unwrap_or_else(PoisonError::into_inner).pop() else {
                        return anyhow::Ok(());
                    };
                    http.post(format!("{endpoint}/api/v1/requests/{id}/decision"))
                        .bearer_auth(&token)
                        .json(&json!({ "verdict": "allow" }))
                        .send()
                        .await?
                        .error_for_status()?;
                }
            }));
        }
        for decider in deciders {
            decider.await??;
        }
        for answer in answers {
            let decision = answer.await??;
            ensure!(
                decision.verdict == Verdict::Allow,
                "a decision arrived as {:?}",
                decision.verdict
            );
        }
        let started = Instant::now();
        while seen.approvals() < watchers * decisions {
            if started.elapsed() > Duration::from_mins(1) {
                bail!(
                    "the consoles saw {} of {} approvals",
                    seen.approvals(),
                    watchers * decisions
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (cpu, exact) = mark.elapsed(pid)?;
        for reader in readers {
            reader.abort();
        }
        // Let the service close the consoles' streams outside the next round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        #[expect(clippy::cast_precision_loss, reason = "a count of decisions")]
        let per = cpu / decisions as f64;
        Ok((per, exact))
    }
}

/// The service's CPU per decision without consoles and with [`WATCHERS`], and their ratio.
/// `pairs` (`--console-pairs`) overrides the pairs of rounds.
pub async fn figures(
    server: &Path,
    base: &Path,
    smoke: bool,
    pairs: Option<u16>,
) -> Result<Vec<Figure>> {
    let sizes = Sizes::of(smoke, pairs);
    // Two services side by side, one watched and one not at the same moments: the machine's
    // other load then falls on both alike (rounds one after the other saw it move the CPU
    // per decision by 40 %). Which one is watched swaps every pair.
    let mut first = Bench::start(server, base).await?;
    let mut second = Bench::start(server, base).await?;
    // One round each way first, unmeasured: connections, caches and the database warm up.
    let warm = sizes.decisions.min(100);
    for watchers in [[0, WATCHERS], [WATCHERS, 0]] {
        let (a, b) = tokio::join!(
            first.round(watchers[0], warm),
            second.round(watchers[1], warm)
        );
        a?;
        b?;
    }
    let (mut alone, mut watched, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut inexact = 0;
    for pair in 0..sizes.pairs {
        let (with, without) = if pair % 2 == 0 {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        let (with, without) = tokio::join!(
            with.round(WATCHERS, sizes.decisions),
            without.round(0, sizes.decisions)
        );
        let (with, without) = (with?, without?);
        inexact += usize::from(!with.1) + usize::from(!without.1);
        let per = [without.0 * 1e6, with.0 * 1e6];
        eprintln!(
            "[bench] console pair {}: {:.0} us alone, {:.0} us with {WATCHERS} consoles ({:+.1} %)",
            pair + 1,
            per[0],
            per[1],
            (per[1] / per[0] - 1.0) * 100.0
        );
        alone.push(per[0]);
        watched.push(per[1]);
        ratios.push(per[1] / per[0]);
    }
    first.service.stop()?;
    second.service.stop()?;
    let conditions = format!(
        "the gatekeep-server binary's own CPU time (user + system, every thread, from \
         /proc/PID/task/*/schedstat{}), from the first of {} requests submitted by one agent \
         (mTLS stream) to the last of their HTTP decisions ({DECIDERS} reviewers, one \
         decision at a time each) seen by every console; {WATCHERS} consoles: a signed-in \
         session and an HTTP/2 connection each, holding GET /api/v1/events open; two services \
         side by side, one watched, one not, at the same time (which one is watched swaps \
         every pair); {} pairs; ratio = median of the pairs' ratios",
        if inexact > 0 {
            format!("; {inexact} rounds in clock ticks, a thread having ended")
        } else {
            String::new()
        },
        sizes.decisions,
        sizes.pairs
    );
    let baseline = Summary::of(&alone).median;
    Ok(vec![
        Figure::from_runs(
            "native.console.cpu_per_decision_alone",
            "service CPU per decision, no console open",
            "us",
            &alone,
        )
        .conditions(conditions.clone()),
        Figure::from_runs(
            "native.console.cpu_per_decision_100_consoles",
            "service CPU per decision, 100 consoles on the live queue",
            "us",
            &watched,
        )
        .ratio(&ratios)
        .baseline("no console open", baseline)
        .target(Target::ratio_at_most(1.10))
        .conditions(conditions),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_cpu_time_is_read_from_its_threads() {
        let pid = std::process::id();
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = u32::try_from(unsafe { libc::gettid() }).unwrap();
        let mark = CpuMark::take(pid).unwrap();
        let before = mark.threads[&tid];
        // Some work on this thread.
        let mut x = 1u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
        }
        assert!(
            thread_cpu_ns(pid).unwrap()[&tid] > before,
            "this thread's time grew"
        );
        // Exact unless another test's thread ended meanwhile; more than nothing either way.
        let (seconds, _exact) = mark.elapsed(pid).unwrap();
        assert!(seconds > 0.0, "{seconds}");
    }
}
