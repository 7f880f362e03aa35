//! `gatekeep-agent check` on the build machine itself, through the library
//! (`preflight::run_checks` with the real paths and the real kernel).
//!
//! The binary is not used: `cargo test` builds another package's binaries
//! only as test harnesses, never the plain executable, so there is none to
//! run from here. The in-VM test (`tests/vm/preflight.rs`) runs the binary.
//!
//! **Assumption about the machine:** this is the kind the project's
//! developers and CI run on (shared/BUILDING.md): a paravirtualised guest
//! running Linux 6.18 with BTF, whose kernel refuses to load BPF LSM
//! programs with EPERM before verification (no ftrace, so no BPF
//! trampolines). On it the preflight must fail, and its trial load must say
//! why. On a host that can run gatekeep this test fails by design: the
//! assumption no longer holds, and the VM test covers the passing case.

use gatekeep_agent::{
    bpf::programs,
    preflight::{KernelTrialLoad, Paths, Report, Status, run_checks, trial},
};

fn check_host() -> Report {
    run_checks(&Paths::default(), &KernelTrialLoad)
}

#[test]
fn the_build_machine_cannot_gate_syscalls_and_says_why() {
    let report = check_host();
    let text = report.to_text();

    let names: Vec<_> = report.checks.iter().map(|c| c.check).collect();
    assert_eq!(
        names,
        [
            "kernel-version",
            "btf",
            "bpf-lsm",
            "cgroup2",
            "bpffs",
            "capabilities",
            "lockdown",
            "trial-load"
        ],
        "{text}"
    );
    assert!(
        !report.passed(),
        "the preflight passed on the build machine:\n{text}"
    );
    assert!(
        report
            .summary()
            .ends_with("failed: gatekeep cannot gate syscalls on this host"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("\n{}\n", report.summary())),
        "{text}"
    );

    // What the machine does have.
    for name in ["kernel-version", "btf"] {
        let check = report.get(name).expect("present");
        assert_eq!(
            check.status,
            Status::Ok,
            "{name} on a 6.18 kernel with BTF:\n{text}"
        );
    }

    // Every line that is not ok tells the operator what to do.
    for check in report.checks.iter().filter(|c| c.status != Status::Ok) {
        assert!(
            check.fix.as_deref().is_some_and(|f| !f.is_empty()),
            "`{}` is {} without a fix:\n{text}",
            check.check,
            check.status.as_str()
        );
    }

    let trial_load = report.get(trial::NAME).expect("the trial load ran");
    assert_eq!(trial_load.status, Status::Fail, "{text}");
    if programs::OBJECT.is_empty() {
        // Built with AYA_BUILD_SKIP=1: there is nothing to load, and it says so.
        assert!(trial_load.detail.contains("AYA_BUILD_SKIP=1"), "{text}");
    } else {
        assert!(trial_load.detail.contains("EPERM"), "{text}");
        assert!(trial_load.detail.contains(trial::EPERM_CAUSE), "{text}");
        assert_eq!(trial_load.fix.as_deref(), Some(trial::EPERM_FIX), "{text}");
    }
}

#[test]
fn json_output_is_an_array_of_check_status_detail_fix() {
    let report = check_host();
    let json: serde_json::Value =
        serde_json::from_str(&report.to_json().expect("encode")).expect("valid json");
    let checks = json.as_array().expect("an array");
    assert_eq!(checks.len(), report.checks.len());
    for (value, check) in checks.iter().zip(&report.checks) {
        let object = value.as_object().expect("an object per check");
        let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["check", "detail", "fix", "status"]);
        assert_eq!(object["check"], check.check);
        assert_eq!(object["status"], check.status.as_str());
        assert_eq!(object["detail"], check.detail.as_str());
    }
    let trial_load = checks
        .iter()
        .find(|c| c["check"] == trial::NAME)
        .expect("trial-load in the json");
    assert_eq!(trial_load["status"], "fail");
}
