//! Durable audit throughput: records/s for batched appends and through the writer thread, the
//! stored bytes per record, and verify/export speed. Prints; asserts nothing.
//!
//! ```text
//! cargo run --release -p gatekeep-audit --example audit_bench -- [RECORDS] [DIR]
//! ```
//!
//! `RECORDS` defaults to 100000; `DIR` (where the temporary databases go) to the system
//! temporary directory. Put it on the disk the agent will use: on tmpfs an fsync costs nothing.

use std::{
    error::Error,
    io,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use gatekeep_audit::{
    AuditRecord, AuditStore, AuditWriter, ExportFilter, RecordKind, WriterConfig, canonical_json,
    export, verify,
};
use serde_json::json;

/// A `requested` record the size of a real one: process, argv, cgroup, address, rule.
fn record(i: u64) -> AuditRecord {
    AuditRecord::new(
        RecordKind::Requested,
        "web-01.prod.example.org",
        json!({
            "pid": 40_000 + i % 20_000,
            "ppid": 1234,
            "uid": 1000,
            "exe": "/usr/bin/curl",
            "argv": ["curl", "-fsSL", "-o", "/tmp/install.sh", format!("https://downloads.example.org/release/{i}/install.sh")],
            "cgroup": "/system.slice/ci-runner.service",
            "address": "203.0.113.7:443",
            "rule": "egress.unknown-hosts.ask",
            "action": "ask",
            "deadline_ms": 120_000,
        }),
    )
    .with_request_id(format!("01JDQ3K5Y8X2{i:014}"))
    .with_actor("gatekeep-agent/web-01")
}

fn rate(records: u64, elapsed: Duration) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a printed rate")]
    let records = records as f64;
    records / elapsed.as_secs_f64()
}

fn appends(dir: &Path, records: u64, batch: usize, run: usize) -> Result<f64, Box<dyn Error>> {
    let path = dir.join(format!("append-{batch}-{run}.db"));
    let mut store = AuditStore::open(&path)?;
    let all: Vec<AuditRecord> = (0..records).map(record).collect();
    let start = Instant::now();
    for chunk in all.chunks(batch) {
        store.append_batch(chunk)?;
    }
    Ok(rate(records, start.elapsed()))
}

fn through_writer(
    dir: &Path,
    records: u64,
    submitters: u64,
    run: usize,
) -> Result<f64, Box<dyn Error>> {
    let path = dir.join(format!("writer-{run}.db"));
    let writer = AuditWriter::open(&path, WriterConfig::default())?;
    let each = records / submitters;
    let start = Instant::now();
    thread::scope(|scope| -> Result<(), Box<dyn Error>> {
        let handles: Vec<_> = (0..submitters)
            .map(|t| {
                let writer = &writer;
                scope.spawn(move || {
                    (t * each..(t + 1) * each).try_for_each(|i| writer.submit(record(i)))
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "submitter panicked")??;
        }
        Ok(())
    })?;
    let durable = writer.flush()?;
    let elapsed = start.elapsed();
    writer.shutdown()?;
    Ok(rate(durable, elapsed))
}

/// Database bytes per record once the WAL is folded in.
fn bytes_per_record(path: &Path, records: u64) -> Result<u64, Box<dyn Error>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    drop(conn);
    Ok(std::fs::metadata(path)?.len() / records.max(1))
}

/// Runs `f` `runs` times on fresh databases; returns the median and best rate.
fn repeat(
    runs: usize,
    mut f: impl FnMut(usize) -> Result<f64, Box<dyn Error>>,
) -> Result<String, Box<dyn Error>> {
    let mut rates = (0..runs).map(&mut f).collect::<Result<Vec<_>, _>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(format!(
        "{:>9.0} durable records/s median, {:>9.0} best",
        rates[rates.len() / 2],
        rates[rates.len() - 1]
    ))
}

fn main() -> Result<(), Box<dyn Error>> {
    const RUNS: usize = 3;
    let mut args = std::env::args().skip(1);
    let records: u64 = args.next().map_or(Ok(100_000), |n| n.parse())?;
    let base = args.next().map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base)?;
    let path = dir.path();
    println!(
        "audit_bench: {records} records per run, {RUNS} runs, databases in {} \
         (WAL, synchronous=FULL)",
        base.display()
    );
    let payload = canonical_json(&record(0).payload)?.len();
    println!("canonical payload of one record: {payload} bytes");

    // One fsync per record: bounded by the disk's sync latency, so fewer records.
    let single = records.min(2_000);
    println!(
        "append_batch, batch of 1:     {} ({single} records)",
        repeat(RUNS, |run| appends(path, single, 1, run))?
    );
    for batch in [64, 512, 4_096] {
        println!(
            "append_batch, batch of {batch:<5} {}",
            repeat(RUNS, |run| appends(path, records, batch, run))?
        );
    }
    println!(
        "AuditWriter, 2 submitters:    {} (submit to flush)",
        repeat(RUNS, |run| through_writer(path, records, 2, run))?
    );

    let db = path.join("writer-0.db");
    let start = Instant::now();
    let report = verify(&db)?;
    println!(
        "verify:                       {:>9.0} records/s ({} records)",
        rate(report.records, start.elapsed()),
        report.records
    );
    let start = Instant::now();
    let exported = export(&db, io::sink(), &ExportFilter::default())?;
    println!(
        "export (JSON Lines):          {:>9.0} records/s",
        rate(exported, start.elapsed())
    );
    println!(
        "stored size:                  {:>9} bytes per record (database incl. index)",
        bytes_per_record(&db, report.records)?
    );
    Ok(())
}
