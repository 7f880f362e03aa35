//! What the console tests need besides Rust (`gatekeep-server/tests/oidc.rs` and
//! `console_browser.rs`): Node.js packages (`oidc-provider`, a real OpenID provider, and
//! `playwright-core`) installed under `target/node` from the lock file in
//! `gatekeep-server/tests/browser`, and Debian's Chromium, which Playwright drives (it never
//! downloads a browser). Idempotent: with both in place this checks two files.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};
use xtask::{run_cmd, target_dir, workspace_root};

/// The browser Playwright drives.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs what is missing.
pub fn ensure() -> Result<()> {
    node_packages()?;
    chromium()
}

fn node_packages() -> Result<()> {
    let source = workspace_root().join("gatekeep-server/tests/browser");
    let dir = target_dir().join("node");
    let lock = fs::read(source.join("package-lock.json"))
        .context("reading gatekeep-server/tests/browser/package-lock.json")?;
    let stamp = dir.join(".installed-package-lock.json");
    if dir.join("node_modules").is_dir()
        && fs::read(&stamp).is_ok_and(|installed| installed == lock)
    {
        eprintln!("[setup] node packages for the console tests: already installed");
        return Ok(());
    }
    eprintln!(
        "[setup] node packages for the console tests: installing into {}",
        dir.display()
    );
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in ["package.json", "package-lock.json"] {
        fs::copy(source.join(file), dir.join(file))
            .with_context(|| format!("copying {file} to {}", dir.display()))?;
    }
    run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    )
    .context("npm is needed for the console tests (Debian: `apt-get install nodejs npm`)")?;
    fs::write(&stamp, lock).with_context(|| format!("writing {}", stamp.display()))
}

fn chromium() -> Result<()> {
    if Path::new(CHROMIUM).exists() {
        eprintln!("[setup] chromium: already installed");
        return Ok(());
    }
    eprintln!("[setup] chromium: installing (Debian's package)");
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .or_else(|_| {
        run_cmd(Command::new("apt-get").arg("update"))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    })
    .context("cannot install chromium (apt needs root and network access)")
}
