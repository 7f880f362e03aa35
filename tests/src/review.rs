//! A reviewer at a decision service, through the `gatekeep` CLI: the
//! embedded service's bootstrap reviewer (an [`Agent`]'s) or `alice` at a
//! separate [`Service`].

use std::{
    ffi::{OsStr, OsString},
    time::Duration,
};

use serde_json::Value;

use crate::{Agent, Service, gatekeep, wait_for};

/// Runs the `gatekeep` CLI as a reviewer of one decision service.
pub trait Reviewer {
    /// Runs the CLI with `args`; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String);

    /// Runs the CLI with `args` and returns its stdout; panics, naming
    /// `what`, if it fails.
    fn cli_ok(&self, args: &[&str], what: &str) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "{what} failed: {out}{err}");
        out
    }

    /// Pending requests as `gatekeep --output json review list` prints them,
    /// once there are at least `count`.
    fn wait_pending(&self, count: usize, timeout: Duration) -> Vec<Value> {
        wait_for(
            &format!("{count} pending request(s) at the service"),
            timeout,
            || {
                let (ok, out, err) = self.cli(&["--output", "json", "review", "list"]);
                assert!(ok, "gatekeep review list failed: {err}");
                let listed: Vec<Value> = serde_json::from_str(&out)
                    .unwrap_or_else(|e| panic!("review list json ({e}): {out}"));
                (listed.len() >= count).then_some(listed)
            },
        )
    }

    /// The id of the first pending request, once there is one.
    fn wait_request_id(&self, timeout: Duration) -> String {
        request_id(&self.wait_pending(1, timeout)[0])
    }

    /// Every record of the service's audit log (`gatekeep audit export`).
    fn service_audit(&self) -> Vec<Value> {
        self.cli_ok(
            &["audit", "export", "--format", "jsonl"],
            "service audit export",
        )
        .lines()
        .map(|line| serde_json::from_str(line).expect("export line is json"))
        .collect()
    }
}

/// The embedded service's bootstrap reviewer, with the `cli.toml` the agent
/// wrote.
impl Reviewer for Agent {
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let cli_config = self.state_dir().join("cli.toml");
        gatekeep(
            args,
            &[
                ("GATEKEEP_CLI_CONFIG", cli_config.as_os_str()),
                ("XDG_CONFIG_HOME", self.dir.path().as_os_str()),
            ],
        )
    }
}

/// Reviewer `alice`.
impl Reviewer for Service {
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let env = self.cli_env();
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        gatekeep(args, &env)
    }
}

impl Service {
    /// The environment that makes the `gatekeep` CLI reviewer `alice` here
    /// (owned, so that another thread can run the CLI with it).
    #[must_use]
    pub fn cli_env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("GATEKEEP_SERVER", self.endpoint().into()),
            ("GATEKEEP_TOKEN", self.token.clone().into()),
            ("GATEKEEP_CA", self.dir.path().join("tls/ca.pem").into()),
            ("XDG_CONFIG_HOME", self.dir.path().into()),
        ]
    }
}

/// The service's id of a pending request (as `review list` prints it).
#[must_use]
pub fn request_id(pending: &Value) -> String {
    pending["request"]["id"]
        .as_str()
        .expect("request id")
        .to_owned()
}

/// The pending request whose target is of `kind` (`exec` or `connect`).
#[must_use]
pub fn pending_of_kind<'a>(pending: &'a [Value], kind: &str) -> &'a Value {
    pending
        .iter()
        .find(|r| r["request"]["target"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no pending {kind} request in {pending:#?}"))
}
