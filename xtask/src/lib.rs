//! Helpers shared by gatekeep's `cargo xtask` subcommands: running commands loudly,
//! finding the workspace, building with cargo, and the VM runner behind `vm-test` and
//! `vm-run`.
//!
//! Every message xtask prints itself goes to stderr; stdout carries only what the VM's
//! console says, so `cargo xtask vm-run -- CMD > out` captures the command's output.

pub mod cargo;
pub mod vm;

use std::{
    env,
    ffi::OsStr,
    fmt,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root: xtask lives in `<root>/xtask`.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
        .to_path_buf()
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR` like cargo does).
#[must_use]
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Renders a command the way a person would type it, with the environment variables it
/// sets explicitly in front (e.g. `LLVM_PREFIX=... cargo install ...`).
#[must_use]
pub fn display_cmd(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), shell_quote(value)))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(shell_quote);
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// Quotes one word for a POSIX shell, leaving plain words alone.
#[must_use]
pub fn shell_quote(word: impl AsRef<OsStr>) -> String {
    let word = word.as_ref().to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Starts `cmd`, saying which program could not be started if that fails.
fn spawn_error(cmd: &Command, err: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    anyhow::Error::new(err).context(format!(
        "failed to start `{program}` (is it installed? `cargo xtask setup` installs what gatekeep needs)"
    ))
}

/// Runs `cmd` with inherited stdio after printing it, and fails naming the command and
/// its exit status if it does not succeed.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display_cmd(cmd));
    let status = cmd.status().map_err(|err| spawn_error(cmd, err))?;
    if !status.success() {
        bail!("command `{}` failed with {status}", display_cmd(cmd));
    }
    Ok(())
}

/// Runs `cmd` like [`run_cmd`], relaying its stdout line by line through `on_line` too
/// (stderr stays inherited).
pub fn run_cmd_lines(cmd: &mut Command, on_line: &mut dyn FnMut(&str)) -> Result<()> {
    eprintln!("$ {}", display_cmd(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|err| spawn_error(cmd, err))?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    for line in BufReader::new(stdout).split(b'\n') {
        let line =
            line.with_context(|| format!("failed to read `{}`'s output", display_cmd(cmd)))?;
        let line = String::from_utf8_lossy(&line);
        println!("{line}");
        on_line(&line);
    }
    let status = child.wait().map_err(|err| spawn_error(cmd, err))?;
    if !status.success() {
        bail!("command `{}` failed with {status}", display_cmd(cmd));
    }
    Ok(())
}

/// Totals of libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// Adds the counts of `line` if it is a libtest result line.
    pub fn observe(&mut self, line: &str) {
        let Some((_, rest)) = line.split_once("test result: ") else {
            return;
        };
        // `ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s`
        let Some((_, counts)) = rest.split_once(". ") else {
            return;
        };
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(number), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }

    /// Sums two tallies.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            ignored: self.ignored + other.ignored,
        }
    }
}

impl fmt::Display for TestCounts {
    /// The plain `N passed, N failed, N skipped` form CI logs are read for.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Runs `cmd` quietly and returns its stdout; on failure the error carries its stderr.
pub fn cmd_stdout(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| spawn_error(cmd, err))?;
    if !output.status.success() {
        bail!(
            "command `{}` failed with {}: {}",
            display_cmd(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("command `{}` printed non-UTF-8 output", display_cmd(cmd)))
}

/// Runs `cmd` quietly to find something out: `None` if it cannot start or fails.
#[must_use]
pub fn probe(cmd: &mut Command) -> Option<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
}

/// The command run in the VM finished with a non-zero status. `main` exits with the same
/// status, so `cargo xtask vm-run -- CMD` behaves like `CMD`.
#[derive(Debug)]
pub struct PayloadFailed {
    /// What the payload ran, for the message.
    pub what: String,
    /// Its exit status (128 + N when a signal killed it, as the shell reports it).
    pub code: i32,
}

impl fmt::Display for PayloadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in the VM exited with status {}",
            self.what, self.code
        )
    }
}

impl std::error::Error for PayloadFailed {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("--test-threads=1"), "--test-threads=1");
        assert_eq!(shell_quote("/tmp/s.sh"), "/tmp/s.sh");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn counts_libtest_results() {
        let mut counts = TestCounts::default();
        counts.observe("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        counts.observe("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.2s");
        counts.observe("test exec::denies ... ok");
        assert_eq!(
            counts,
            TestCounts {
                passed: 4,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(counts.to_string(), "4 passed, 2 failed, 1 skipped");
    }

    #[test]
    fn displays_env_and_args() {
        let mut cmd = Command::new("cargo");
        cmd.env("LLVM_PREFIX", "/p q")
            .args(["install", "bpf-linker"]);
        assert_eq!(
            display_cmd(&cmd),
            "LLVM_PREFIX='/p q' cargo install bpf-linker"
        );
    }
}
