//! The local audit log: hash chain verification and tamper detection.

use std::time::Duration;

use gatekeep_tests::{
    gate_exec,
    policy::on_timeout,
    require_vm,
    workload::{run_in, tool},
};

#[test]
fn audit_chain_verifies_and_detects_a_tampered_row() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "bad-tool");
    let asked = tool(dir.path(), "asked-tool");
    let (cgroup, mut agent) = gate_exec(
        "audit",
        &format!("default = \"allow\"\ndeny = [\"{bad}\"]\nask = [\"{asked}\"]"),
        &on_timeout("1s", "allow"),
    );
    let denied = run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(denied.code, 111);
    let allowed_at_timeout = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    assert_eq!(allowed_at_timeout.code, 0);
    agent.wait_record("expired", Duration::from_secs(20), |_| true);
    assert!(agent.stop(), "clean stop");

    let records = agent.audit_records();
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    for kind in [
        "agent_started",
        "policy_loaded",
        "kernel_denied",
        "requested",
        "expired",
        "agent_stopped",
    ] {
        assert!(kinds.contains(&kind), "no `{kind}` record in {kinds:?}");
    }
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "a clean log must verify: {out}{err}");
    assert!(
        out.starts_with(&format!("ok: {} records", records.len())),
        "{out}"
    );

    // Tamper with one row behind the triggers' back.
    let conn = rusqlite::Connection::open(agent.audit_db()).expect("open the audit db");
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS audit_records_no_update;
         UPDATE audit_records SET payload = replace(payload, 'bad-tool', 'good-tool') WHERE kind = 'kernel_denied';",
    )
    .expect("tamper");
    drop(conn);
    let tampered_seq = records
        .iter()
        .find(|r| r["kind"] == "kernel_denied")
        .and_then(|r| r["seq"].as_u64())
        .expect("seq of the denial");
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(!ok, "a tampered log must fail verification: {out}");
    assert!(
        err.contains(&format!("audit record {tampered_seq} was tampered with")),
        "the tampered record must be named: {err}"
    );
}
