//! The decision service's instructions per decision, counted by valgrind's callgrind.
//!
//! Times and rates move with the machine's speed and load (the service took 61 µs of CPU per
//! decision on one machine of this project's kind and 170 µs on another); an instruction
//! count does not, so this figure compares across machines, and before and after a change.
//!
//! Two runs of the `gatekeep-server` binary under callgrind, each deciding a fixed number
//! of requests (the server rule decides) from the same agents: the difference of their
//! totals over the difference of their decisions is what one more decision costs, without
//! the start, the handshakes and the shutdown that both runs share.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, Result, ensure};

use super::service::{RULE, Service, request};
use crate::report::Figure;

/// Agents (one stream each) and requests in flight on each.
const AGENTS: usize = 4;
const IN_FLIGHT: usize = 8;

/// Whether valgrind can be run here.
fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The figure, or none (said on stderr) when valgrind is missing. With `keep`, the two
/// runs' callgrind files are kept there (`callgrind_annotate` shows where the
/// instructions go).
pub async fn service_per_decision(
    server: &Path,
    base: &Path,
    smoke: bool,
    keep: Option<&Path>,
) -> Result<Vec<Figure>> {
    if !valgrind_available() {
        eprintln!(
            "[bench] valgrind not found: no instruction count per decision (`cargo xtask setup` \
             installs it)"
        );
        return Ok(Vec::new());
    }
    let (few, many) = if smoke { (100, 400) } else { (500, 3_000) };
    let low = count(server, base, few, keep).await?;
    let high = count(server, base, many, keep).await?;
    ensure!(
        high > low,
        "callgrind counted {high} instructions for {many} decisions, {low} for {few}"
    );
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_decision = (high - low) as f64 / (many - few) as f64;
    Ok(vec![
        Figure::from_runs(
            "native.service.instructions_per_decision",
            "service instructions per decision (callgrind)",
            "instr",
            &[per_decision],
        )
        .conditions(format!(
            "valgrind --tool=callgrind on the gatekeep-server binary, every thread; {AGENTS} \
             agents (mTLS stream each) x {IN_FLIGHT} in flight, the server rule decides; \
             (instructions of a {many}-decision run - those of a {few}-decision run) / {}; \
             sqlite synchronous=full; does not depend on the machine's speed or load",
            many - few
        )),
    ])
}

/// Runs the service under callgrind for `decisions` decisions; returns its instructions.
async fn count(server: &Path, base: &Path, decisions: usize, keep: Option<&Path>) -> Result<u64> {
    let out_dir = tempfile::Builder::new()
        .prefix("gk-bench-callgrind-")
        .tempdir_in(base)?;
    let out = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.join(format!("callgrind.service.{decisions}.out"))
        }
        None => out_dir.path().join("callgrind.out"),
    };
    let wrapper = [
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let service = Service::start_under(&wrapper, server, base, "full")?;
    let mut links = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        links.push(service.agent(&format!("counted-{i}")).await?);
    }
    let left = Arc::new(AtomicUsize::new(decisions));
    let mut tasks = Vec::new();
    for (a, link) in links.iter().enumerate() {
        for worker in 0..IN_FLIGHT {
            let (link, left) = (Arc::clone(link), Arc::clone(&left));
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let decision = link
                        .decide(request("fetch", (a * IN_FLIGHT + worker) * 1_000_000 + n))
                        .await?;
                    ensure!(
                        decision.decided_by == format!("rule:{RULE}"),
                        "decided by `{}`, not the rule",
                        decision.decided_by
                    );
                    n += 1;
                }
                anyhow::Ok(())
            }));
        }
    }
    for task in tasks {
        task.await??;
    }
    for link in links {
        if let Some(link) = Arc::into_inner(link) {
            link.shutdown().await;
        }
    }
    // Callgrind writes its counts as the service exits.
    service.stop()?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("callgrind wrote no {}", out.display()))?;
    totals(&text).with_context(|| format!("no `totals:` line in {}", out.display()))
}

/// The `totals:` (or `summary:`) line of a callgrind output file, whose only event is `Ir`.
fn totals(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_either_line() {
        assert_eq!(
            totals("events: Ir\nfn=main\n1 5\nsummary: 2347014\ntotals: 2347014\n"),
            Some(2_347_014)
        );
        assert_eq!(totals("events: Ir\ntotals: 42\n"), Some(42));
        assert_eq!(totals("events: Ir\nfn=main\n"), None);
    }
}
