//! No deadlock on the audit file's locks (issue 24, item 4). A process the agent may pause
//! (a gated workload) can hold a lock on the audit log forever: a stopped task never
//! releases it.
//!
//! - A reader in the middle of a read transaction (what any `sqlite3 audit.db` session
//!   holds; gated tasks may read the log unless a policy says otherwise) never stops the
//!   writer: the log is in WAL mode, so every record still becomes durable and the chain
//!   verifies. Expected and checked: all records flushed, the reader still sees its
//!   snapshot, the chain verifies.
//! - A writer lock (`BEGIN IMMEDIATE`), which only a process allowed to write the file can
//!   take (gated tasks cannot: `docs/threat-model.md` section 3), makes flushes fail after
//!   the busy timeout instead of waiting forever: the agent then denies asks (section 9)
//!   rather than wedging, and once the lock goes, the held records are written in order.

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use gatekeep_audit::{AuditError, AuditRecord, AuditWriter, RecordKind, WriterConfig, verify};
use rusqlite::Connection;
use serde_json::json;

fn record(i: u64) -> AuditRecord {
    AuditRecord::new(RecordKind::Requested, "web-1", json!({ "i": i }))
        .with_request_id(format!("r-{i}"))
}

#[test]
fn a_reader_holding_a_read_transaction_forever_never_blocks_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.db");
    let writer = AuditWriter::open(&path, WriterConfig::default()).expect("writer");
    for i in 0..10 {
        writer.submit(record(i)).expect("submit");
    }
    assert_eq!(writer.flush().expect("flush"), 10);

    // The "paused" reader: a read transaction that is never finished.
    let reader = Connection::open(&path).expect("reader");
    reader.execute_batch("BEGIN").expect("begin");
    let seen: i64 = reader
        .query_row("SELECT count(*) FROM audit_records", [], |r| r.get(0))
        .expect("read");
    assert_eq!(seen, 10);

    for i in 10..2_010 {
        writer.submit(record(i)).expect("submit");
    }
    assert_eq!(
        writer
            .flush()
            .expect("every record durable beside the reader"),
        2_010
    );
    let still: i64 = reader
        .query_row("SELECT count(*) FROM audit_records", [], |r| r.get(0))
        .expect("read");
    assert_eq!(still, 10, "the reader keeps its snapshot");
    assert_eq!(writer.shutdown().expect("shutdown"), 2_010);
    assert_eq!(verify(&path).expect("the chain verifies").records, 2_010);
    drop(reader);
}

#[test]
fn a_held_write_lock_fails_flushes_instead_of_hanging_and_nothing_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.db");
    let writer = AuditWriter::open(&path, WriterConfig::default()).expect("writer");
    writer.submit(record(0)).expect("submit");
    assert_eq!(writer.flush().expect("flush"), 1);

    // Another connection takes the write lock and holds it until told to let go.
    let (release, released) = mpsc::channel::<()>();
    let (locked, is_locked) = mpsc::channel::<()>();
    let holder = thread::spawn({
        let path = path.clone();
        move || {
            let conn = Connection::open(&path).expect("holder");
            conn.execute_batch("BEGIN IMMEDIATE").expect("write lock");
            locked.send(()).expect("tell");
            released.recv().expect("wait");
            conn.execute_batch("ROLLBACK").expect("release");
        }
    });
    is_locked.recv().expect("locked");

    writer.submit(record(1)).expect("accepted while locked");
    // Returns (after the busy timeout, 5 s) instead of waiting for the lock forever.
    let flushed = writer.flush();
    assert!(
        matches!(flushed, Err(AuditError::Unavailable { .. })),
        "a flush behind a held lock fails (asks are then denied): {flushed:?}"
    );

    release.send(()).expect("release");
    holder.join().expect("holder thread");
    // The writer retries with back-off; the held record is written once the lock is gone.
    // (A guard against a hang, not a timing check.)
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        writer.submit(record(2)).expect("submit");
        if let Ok(seq) = writer.flush() {
            assert!(seq >= 3, "the held record came first: {seq}");
            break;
        }
        assert!(Instant::now() < deadline, "the log never came back");
        thread::sleep(Duration::from_millis(200));
    }
    writer.shutdown().expect("shutdown");
    let report = verify(&path).expect("the chain verifies");
    assert!(report.records >= 3);
}
