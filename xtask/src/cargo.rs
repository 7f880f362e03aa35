//! Running cargo from xtask and finding what it built.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{cmd_stdout, display_cmd, workspace_root};

/// A `cargo` command run from the workspace root, with the same cargo that runs xtask.
#[must_use]
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// One executable cargo reported building.
#[derive(Debug, Clone)]
pub struct Executable {
    /// The target's name (`gatekeep-agent`, or `vm` for `tests/vm/main.rs`).
    pub target: String,
    /// The target's kinds, e.g. `["bin"]` or `["test"]`.
    pub kinds: Vec<String>,
    /// Where the executable is.
    pub path: PathBuf,
}

/// Runs a cargo build command (`build`, `test --no-run`, ...) with
/// `--message-format=json-render-diagnostics` and returns the executables it produced.
///
/// Diagnostics and progress still reach the terminal (cargo renders them on stderr);
/// only the machine-readable artifact messages are read from stdout.
pub fn build_executables(cmd: &mut Command) -> Result<Vec<Executable>> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("$ {}", display_cmd(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{}`", display_cmd(cmd)))?;
    let stdout = child.stdout.take().context("cargo's stdout is piped")?;

    let mut executables = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("failed to read cargo's output")?;
        // Build scripts' and cargo's own non-JSON lines are passed through.
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            eprintln!("{line}");
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(path) = message["executable"].as_str() else {
            continue;
        };
        let target = &message["target"];
        executables.push(Executable {
            target: target["name"].as_str().unwrap_or_default().to_owned(),
            kinds: target["kind"]
                .as_array()
                .map(|kinds| {
                    kinds
                        .iter()
                        .filter_map(|kind| kind.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            path: PathBuf::from(path),
        });
    }

    let status = child.wait().context("failed to wait for cargo")?;
    if !status.success() {
        bail!("command `{}` failed with {status}", display_cmd(cmd));
    }
    Ok(executables)
}

/// Finds the executable of the target named `target` whose kinds include `kind`.
pub fn find_executable(executables: &[Executable], kind: &str, target: &str) -> Result<PathBuf> {
    executables
        .iter()
        .find(|exe| exe.target == target && exe.kinds.iter().any(|k| k == kind))
        .map(|exe| exe.path.clone())
        .with_context(|| format!("cargo did not report building the {kind} target `{target}`"))
}

/// The workspace's packages, as `cargo metadata` describes them.
fn workspace_packages() -> Result<Vec<Value>> {
    let json = cmd_stdout(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let mut metadata: Value =
        serde_json::from_str(&json).context("failed to parse `cargo metadata` output")?;
    match metadata["packages"].take() {
        Value::Array(packages) => Ok(packages),
        _ => bail!("`cargo metadata` printed no package list"),
    }
}

/// The workspace's packages and their binary targets, from `cargo metadata`.
pub fn workspace_binaries() -> Result<Vec<(String, Vec<String>)>> {
    let packages = workspace_packages()?;
    Ok(packages
        .iter()
        .map(|package| {
            let name = package["name"].as_str().unwrap_or_default().to_owned();
            let bins = package["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|target| {
                    target["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .filter_map(|target| target["name"].as_str().map(str::to_owned))
                .collect();
            (name, bins)
        })
        .collect())
}

/// The source roots of the workspace's library and binary targets, as
/// `(package/target, path)`, from `cargo metadata`.
pub fn workspace_crate_roots() -> Result<Vec<(String, PathBuf)>> {
    let packages = workspace_packages()?;
    let mut roots = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default();
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_code = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "bin"));
            if let (true, Some(src)) = (is_code, target["src_path"].as_str()) {
                let target_name = target["name"].as_str().unwrap_or_default();
                roots.push((format!("{name}/{target_name}"), PathBuf::from(src)));
            }
        }
    }
    Ok(roots)
}
