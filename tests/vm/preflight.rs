//! `gatekeep-agent check` on a kernel that can run gatekeep (the VM's):
//! the binary on `PATH`, as an operator would run it.

use std::process::{Command, Output};

use gatekeep_tests::require_vm;

fn check(args: &[&str]) -> Output {
    Command::new("gatekeep-agent")
        .arg("check")
        .args(args)
        .output()
        .expect("run `gatekeep-agent check` from PATH (the VM runner puts it there)")
}

#[test]
fn check_passes_on_the_vm_kernel() {
    require_vm();
    let output = check(&[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`gatekeep-agent check` failed ({}) on the VM kernel:\n{stdout}{stderr}",
        output.status
    );
    let mut lines = stdout.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("STATUS")),
        "no table header:\n{stdout}"
    );
    let rows: Vec<&str> = lines
        .clone()
        .filter(|l| !l.starts_with(' ') && !l.starts_with("gatekeep can run"))
        .collect();
    assert_eq!(rows.len(), 8, "one row per check expected:\n{stdout}");
    for row in &rows {
        assert!(
            row.starts_with("ok ") || row.starts_with("warn "),
            "a check did not pass:\n{stdout}"
        );
    }
    let trial = rows
        .iter()
        .find(|r| r.contains(" trial-load "))
        .expect("a trial-load row");
    assert!(trial.starts_with("ok "), "{stdout}");
    assert!(trial.contains("the kernel verified and loaded"), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("gatekeep can run on this host")),
        "no success summary:\n{stdout}"
    );
}

#[test]
fn check_json_reports_every_check_as_passing() {
    require_vm();
    let output = check(&["--output", "json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}:\n{stdout}", output.status);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("valid json");
    let checks = json.as_array().expect("an array");
    assert_eq!(checks.len(), 8, "{stdout}");
    for check in checks {
        assert!(
            check["status"] == "ok" || check["status"] == "warn",
            "{check} did not pass:\n{stdout}"
        );
    }
    // Everything the VM's /init mounts is found where gatekeep expects it.
    for name in ["bpf-lsm", "cgroup2", "bpffs", "capabilities", "trial-load"] {
        let check = checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("{name} missing:\n{stdout}"));
        assert_eq!(check["status"], "ok", "{name}:\n{stdout}");
    }
}
