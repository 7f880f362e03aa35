//! `gatekeep-agent check` on the build machine itself, through the library
//! (`preflight::run_checks` with the real paths and the real kernel).
//!
//! The binary is not used: `cargo test` builds another package's binaries
//! only as test harnesses, never the plain executable, so there is none to
//! run from here. The in-VM test (`tests/vm/preflight.rs`) runs the binary.
//!
//! The test holds on any host. Where the kernel refuses the trial load (the build
//! machines here: a paravirtualised 6.18 guest whose kernel refuses BPF LSM programs
//! with EPERM before verification, shared/BUILDING.md), the preflight must fail and say
//! exactly why; where the kernel accepts it, the preflight must not claim otherwise. The
//! VM test (`tests/vm/preflight.rs`) covers a kernel that can gate syscalls.

use gatekeep_agent::{
    bpf::programs,
    preflight::{KernelTrialLoad, Paths, Report, Status, run_checks, trial},
};

fn check_host() -> Report {
    run_checks(&Paths::default(), &KernelTrialLoad)
}

#[test]
fn the_preflight_verdict_matches_the_kernel_and_every_failure_names_its_fix() {
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
        text.ends_with(&format!("\n{}\n", report.summary())),
        "{text}"
    );
    if report.passed() {
        assert!(
            report
                .summary()
                .starts_with("gatekeep can run on this host"),
            "{text}"
        );
    } else {
        assert!(
            report
                .summary()
                .ends_with("failed: gatekeep cannot gate syscalls on this host"),
            "{text}"
        );
    }

    // What the host has is reported as such.
    let btf = report.get("btf").expect("present");
    assert_eq!(
        btf.status == Status::Ok,
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "btf is ok exactly when /sys/kernel/btf/vmlinux exists:\n{text}"
    );

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
    if programs::OBJECT.is_empty() {
        // Built with AYA_BUILD_SKIP=1: there is nothing to load, and it says so.
        assert_eq!(trial_load.status, Status::Fail, "{text}");
        assert!(trial_load.detail.contains("AYA_BUILD_SKIP=1"), "{text}");
    } else if trial_load.detail.contains("EPERM") {
        // A kernel that refuses LSM programs before verification: the cause is named.
        assert_eq!(trial_load.status, Status::Fail, "{text}");
        assert!(trial_load.detail.contains(trial::EPERM_CAUSE), "{text}");
        assert_eq!(trial_load.fix.as_deref(), Some(trial::EPERM_FIX), "{text}");
    }
    // A host whose kernel loads the programs cannot be told it cannot gate syscalls for
    // that reason.
    if trial_load.status == Status::Ok {
        assert!(!trial_load.detail.contains("EPERM"), "{text}");
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
    let expected = report.get(trial::NAME).expect("trial-load").status.as_str();
    assert_eq!(trial_load["status"], expected);
}
