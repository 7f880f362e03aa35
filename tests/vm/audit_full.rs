//! Nothing runs off the record (issue 19, item 7): a gated workload fills the filesystem
//! that holds the agent's audit log, then asks to exec. The exec is denied (not run), the
//! kernel's own denials go on, `status` names the condition and the fix; once space returns,
//! the held records appear in order after one `audit_interrupted` record, and the chain
//! verifies. Run as an unprivileged user and as root inside the gated cgroup (which issue
//! 18's file protections keep out of the audit log's folder, but not off its filesystem).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use gatekeep_tests::{
    Agent, Cgroup,
    policy::{exec, on_timeout},
    require_vm, wait_for,
    workload::{Outcome, line_of, run_in, tool},
};

/// The unprivileged user.
const NOBODY: &str = "65534";

/// A small tmpfs everybody may write to (like a shared `/var` or `/tmp`), unmounted when
/// dropped.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(name: &str) -> Self {
        let path = PathBuf::from(format!("/tmp/gk-smallfs-{name}"));
        fs::create_dir_all(&path).expect("mount point");
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=2m,mode=1777"),
        )
        .unwrap_or_else(|e| panic!("mount a 2 MiB tmpfs at {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.path);
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The whole attack, with the filling done as `user` (root when `None`) in the gated cgroup.
fn fill_then_ask(name: &str, user: Option<&str>) {
    require_vm();
    let smallfs = SmallFs::mount(name);
    let audit_dir = smallfs.path.join("gatekeep");
    fs::create_dir(&audit_dir).expect("audit dir");
    fs::set_permissions(&audit_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let audit_db = audit_dir.join("audit.db");
    let tools = tempfile::tempdir().expect("tools dir");
    let asked = tool(tools.path(), "asked-tool");
    let denied = tool(tools.path(), "denied-tool");
    let cgroup = Cgroup::create(&format!("gk-{name}"));
    // Unanswered asks are allowed at the timeout: what the attack relied on.
    let agent = Agent::start_with_audit_db(
        name,
        &exec(
            &format!("gk-{name}"),
            &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{denied}\"]"),
            &on_timeout("2s", "allow"),
        ),
        &audit_db,
    );
    assert_eq!(agent.status()["audit"]["state"], "writable");

    // While the log can be written, the ask runs at its timeout, on record.
    let before = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    assert_eq!(before, Outcome::exec_ran());
    agent.wait_record("expired", Duration::from_secs(30), |_| true);

    // The attacker fills the filesystem.
    let mut prefix: Vec<&str> = Vec::new();
    if let Some(user) = user {
        prefix.extend(["as-user", user]);
    }
    if user.is_none() {
        // Root in the gated cgroup may not write the audit log's folder (issue 18)...
        let inside = audit_dir.join("filler");
        let mut args = prefix.clone();
        args.extend(["fs", "create", s(&inside)]);
        assert_eq!(
            line_of(Some(&cgroup), &args),
            "errno 1",
            "the audit folder is protected"
        );
    }
    // ...but the filesystem is shared: it fills it from outside that folder.
    let filler = smallfs.path.join("filler");
    let mut args = prefix.clone();
    args.extend(["fs", "fill", s(&filler)]);
    assert_eq!(
        line_of(Some(&cgroup), &args),
        "errno 28",
        "filled to ENOSPC"
    );

    // The asked exec is denied, not run, whatever the timeout says.
    let during = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    assert_eq!(during, Outcome::exec_denied(), "an exec ran off the record");
    // The kernel's own denials go on.
    let kernel = run_in(&cgroup, &["exec", &denied, "true"], Duration::from_secs(30));
    assert_eq!(kernel, Outcome::exec_denied());

    // Loudly: the status, and the log at error level.
    let status = wait_for(
        "the status to say the audit log fails",
        Duration::from_secs(30),
        || {
            let status = agent.status();
            (status["audit"]["state"] == "failing").then_some(status)
        },
    );
    let summary = status["audit"]["summary"].as_str().expect("summary");
    for needle in [
        "CANNOT WRITE",
        "disk_full",
        "asked actions are denied",
        &format!(
            "free space on the filesystem holding {}",
            audit_dir.display()
        ),
    ] {
        assert!(
            summary.contains(needle),
            "`{needle}` in the status: {summary}"
        );
    }
    let (ok, text, err) = agent.admin(&["status"]);
    assert!(ok, "{err}");
    assert!(text.contains("audit log: CANNOT WRITE"), "{text}");
    let log = agent.log();
    assert!(
        log.contains("ERROR") && log.contains("the audit log cannot be written"),
        "no error line in the agent's log:\n{log}"
    );
    let held = agent.audit_records().len();

    // Space returns: the held records are written, after the interruption record.
    fs::remove_file(&filler).expect("free the space");
    let interrupted = agent.wait_record("audit_interrupted", Duration::from_mins(1), |_| true);
    assert_eq!(interrupted["payload"]["cause"], "disk_full");
    assert_eq!(interrupted["payload"]["records_lost"], 0);
    let records = wait_for("the held records", Duration::from_mins(1), || {
        let records = agent.audit_records();
        records
            .iter()
            .any(|r| {
                r["kind"] == "kernel_denied"
                    && r["payload"]["target"].to_string().contains("denied-tool")
            })
            .then_some(records)
    });
    assert!(records.len() > held, "nothing new after the recovery");
    let seq = |r: &serde_json::Value| r["seq"].as_u64().expect("seq");
    let at = records
        .iter()
        .position(|r| r["kind"] == "audit_interrupted")
        .expect("interruption record");
    assert_eq!(
        seq(&records[at]),
        u64::try_from(held).expect("count") + 1,
        "written first"
    );
    // The second ask: its request, then its denial for want of a record, in that order.
    let after = &records[at + 1..];
    let requested = after
        .iter()
        .find(|r| r["kind"] == "requested")
        .expect("the ask's request, held then written");
    let id = requested["request_id"].clone();
    let denial = after
        .iter()
        .rfind(|r| r["request_id"] == id && r["kind"] == "decided")
        .expect("the ask's decision");
    assert!(seq(denial) > seq(requested));
    assert_eq!(denial["payload"]["verdict"], "deny", "{denial}");
    assert_eq!(denial["payload"]["cause"], "audit_unavailable", "{denial}");
    assert_eq!(denial["actor"], "agent");
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "the chain must verify after the recovery: {out}{err}");
    wait_for(
        "the status to say writable",
        Duration::from_secs(30),
        || (agent.status()["audit"]["state"] == "writable").then_some(()),
    );

    // And asks are decided again.
    let again = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    assert_eq!(again, Outcome::exec_ran());
    drop(agent);
    drop(smallfs);
}

#[test]
fn audit_full_disk_by_an_unprivileged_workload_denies_asks_and_loses_nothing() {
    fill_then_ask("auditfull-user", Some(NOBODY));
}

#[test]
fn audit_full_disk_by_root_in_the_gated_cgroup_denies_asks_and_loses_nothing() {
    fill_then_ask("auditfull-root", None);
}
