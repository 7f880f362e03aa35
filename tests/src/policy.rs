//! Policy files (TOML) for the agents the tests start. Each policy is named
//! after the cgroup it gates (`/sys/fs/cgroup/<name>`) unless it says
//! otherwise.

use std::fmt::Write as _;

/// A policy `name` gating `cgroups` (a path or a glob) with `tables`:
/// (`exec`, `connect` or `approval`, the table's lines).
#[must_use]
pub fn policy(name: &str, cgroups: &str, tables: &[(&str, &str)]) -> String {
    let mut toml = format!("[[policy]]\nname = \"{name}\"\ncgroups = [\"{cgroups}\"]\n");
    for (table, lines) in tables {
        let _ = write!(toml, "[policy.{table}]\n{lines}\n");
    }
    toml
}

/// A policy for cgroup `name` with the given exec table and approval.
#[must_use]
pub fn exec(name: &str, exec: &str, approval: &str) -> String {
    policy(
        name,
        &format!("/sys/fs/cgroup/{name}"),
        &[("exec", exec), ("approval", approval)],
    )
}

/// A policy for cgroup `name` with the given connect table and approval.
#[must_use]
pub fn connect(name: &str, connect: &str, approval: &str) -> String {
    policy(
        name,
        &format!("/sys/fs/cgroup/{name}"),
        &[("connect", connect), ("approval", approval)],
    )
}

/// A policy for cgroup `name` with both an exec and a connect table.
#[must_use]
pub fn exec_and_connect(name: &str, exec: &str, connect: &str, approval: &str) -> String {
    policy(
        name,
        &format!("/sys/fs/cgroup/{name}"),
        &[("exec", exec), ("connect", connect), ("approval", approval)],
    )
}

/// An exec or connect table that allows everything but `target`, which
/// gets `action` (`deny` or `ask`).
#[must_use]
pub fn allow_but(action: &str, target: &str) -> String {
    format!("default = \"allow\"\n{action} = [\"{target}\"]")
}

/// An approval table: undecided requests get `action` after `timeout`.
#[must_use]
pub fn on_timeout(timeout: &str, action: &str) -> String {
    format!("timeout = \"{timeout}\"\non_timeout = \"{action}\"")
}
