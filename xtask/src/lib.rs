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
