//! `cargo xtask fuzz [--seconds N] [TARGET]`: builds the libFuzzer targets in `fuzz/` (one
//! per input boundary, issue 24) and runs each for a while over its committed seeds.
//!
//! `fuzz/` is a cargo-fuzz project (`cargo fuzz run TARGET` works there too), but this
//! builds it with plain cargo and cargo-fuzz's instrumentation flags: it needs no
//! cargo-fuzz, which would take minutes to install on every fresh CI machine. New inputs go
//! to `fuzz/target/corpus/<target>` (the committed seeds in `fuzz/corpus/<target>` stay as
//! they are), crashes to `fuzz/artifacts/<target>/`; a crash, once fixed, is committed to
//! `fuzz/regressions/<target>/`, which every run reads at start. Each run prints libFuzzer's figures:
//! executions, coverage (`cov`, edges) and features (`ft`).

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use xtask::{display_cmd, run_cmd, workspace_root};

/// Every target, in the order they run, with its cargo-fuzz project: `fuzz/` (light), or
/// `fuzz/agent/` (the agent's parsers, which build the whole agent and decision service).
pub const TARGETS: &[(&str, Project)] = &[
    ("policy_toml", Project::Light),
    ("proto_wire", Project::Light),
    ("audit_verify", Project::Light),
    ("canonical_json", Project::Light),
    ("ring_buffer_event", Project::Agent),
    ("btf", Project::Agent),
    ("slack_interaction", Project::Agent),
    ("http_api", Project::Agent),
];

/// One of the two cargo-fuzz projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Project {
    Light,
    Agent,
}

impl Project {
    fn dir(self) -> PathBuf {
        match self {
            Project::Light => fuzz_dir(),
            Project::Agent => fuzz_dir().join("agent"),
        }
    }
}

/// How long CI runs each target (`cargo xtask test`): the two builds (about 1.5 and 8 CPU
/// minutes at `fuzz-ci`) and these runs stay within the minutes the suite can spare.
pub const CI_SECONDS: u64 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sanitizer {
    /// `AddressSanitizer` (cargo-fuzz's default): catches memory errors in unsafe code, at
    /// about half the speed; building the bundled `SQLite` under it takes over ten minutes.
    Address,
    /// Panics, overflow and debug assertions only (gatekeep's parsers are safe Rust).
    None,
}

#[derive(Debug, Args)]
pub struct Options {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Sanitizer to build with.
    #[arg(long, value_enum, default_value_t = Sanitizer::None)]
    pub sanitizer: Sanitizer,
    /// Only this target (default: all, one after the other).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS.iter().map(|t| t.0)))]
    pub target: Option<String>,
    /// Only the light project's targets (a quick look: the agent's project builds the whole
    /// agent and decision service instrumented).
    #[arg(long)]
    pub light: bool,
    /// Cargo profile of the build: `release` (fastest fuzzing), or `fuzz-ci` (`fuzz/Cargo.toml`:
    /// less optimised, builds in about half the time; what CI uses).
    #[arg(long, default_value = "release")]
    pub profile: String,
}

/// What one run printed.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub target: String,
    pub seconds: f64,
    pub executions: u64,
    pub cov: u64,
    pub ft: u64,
    pub corpus: u64,
}

pub fn run(opts: &Options) -> Result<()> {
    let targets: Vec<(&str, Project)> = TARGETS
        .iter()
        .copied()
        .filter(|(name, project)| {
            opts.target.as_deref().is_none_or(|t| t == *name)
                && (!opts.light || *project == Project::Light)
        })
        .collect();
    for project in [Project::Light, Project::Agent] {
        if targets.iter().any(|(_, p)| *p == project) {
            let built = Instant::now();
            build(project, opts.sanitizer, &opts.profile)?;
            eprintln!(
                "[fuzz] built {} in {:.0} s",
                project.dir().display(),
                built.elapsed().as_secs_f64()
            );
        }
    }
    let mut figures = Vec::new();
    for (target, _) in targets {
        figures.push(run_target(target, opts.seconds, &opts.profile)?);
    }
    summary(&figures);
    Ok(())
}

/// CI's short run (`cargo xtask test`): every target of both projects, built without a
/// sanitizer and with the quicker `fuzz-ci` profile, [`CI_SECONDS`] each.
pub fn smoke() -> Result<()> {
    run(&Options {
        seconds: CI_SECONDS,
        sanitizer: Sanitizer::None,
        target: None,
        light: false,
        profile: "fuzz-ci".to_owned(),
    })
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn host() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds every target with the nightly and libFuzzer's coverage instrumentation (the
/// flags cargo-fuzz 0.13 passes), for the host target so build scripts stay plain.
fn build(project: Project, sanitizer: Sanitizer, profile: &str) -> Result<()> {
    let mut flags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg fuzzing",
        "-Cdebug-assertions",
        "-Coverflow-checks",
    ]
    .join(" ");
    if sanitizer == Sanitizer::Address {
        flags.push_str(" -Zsanitizer=address");
    }
    let mut cmd = Command::new("rustup");
    cmd.current_dir(project.dir())
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--profile",
            profile,
            "--locked",
            "--bins",
        ])
        .args(["--target", &host()])
        .env("RUSTFLAGS", flags)
        // The targets read no kernel object: skip building the eBPF programs.
        .env("AYA_BUILD_SKIP", "1")
        // One target directory for both projects: they share most dependencies.
        .env("CARGO_TARGET_DIR", fuzz_dir().join("target"))
        // Set by the stable cargo running xtask; the nightly must pick its own.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO");
    run_cmd(&mut cmd).context(
        "failed to build the fuzz targets; they need the nightly toolchain (`cargo xtask setup`)",
    )
}

/// Runs one target for `seconds` and reads its figures; a crash fails with the input that
/// caused it and how to replay it.
fn run_target(target: &str, seconds: u64, profile: &str) -> Result<Figures> {
    let binary = fuzz_dir()
        .join("target")
        .join(host())
        .join(profile)
        .join(target);
    let work_corpus = fuzz_dir().join("target/corpus").join(target);
    let seeds = fuzz_dir().join("corpus").join(target);
    // Inputs that once crashed the target: read (and so run) at every start.
    let regressions = fuzz_dir().join("regressions").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let logs = fuzz_dir().join("target/logs");
    for dir in [&work_corpus, &artifacts, &logs, &regressions] {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut cmd = Command::new(&binary);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-max_len=65536")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&work_corpus)
        .arg(&seeds)
        .arg(&regressions)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!("$ {}", display_cmd(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut log = fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    let mut figures = Figures {
        target: target.to_owned(),
        ..Figures::default()
    };
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("failed to read libFuzzer's output")?;
        writeln!(log, "{line}").context("failed to write the fuzz log")?;
        observe(&line, &mut figures);
        tail.push(line);
        if tail.len() > 60 {
            tail.remove(0);
        }
    }
    let status = child.wait().context("failed to wait for libFuzzer")?;
    figures.seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        for line in &tail {
            eprintln!("{line}");
        }
        let crash = newest_file(&artifacts);
        bail!(
            "fuzz target {target} failed ({status}); input: {}; replay with `{} {}`; full log: {}",
            crash
                .as_ref()
                .map_or("(none written)".into(), |p| p.display().to_string()),
            binary.display(),
            crash
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string()),
            log_path.display()
        );
    }
    eprintln!(
        "[fuzz] {target}: {} executions in {:.0} s, cov {} ft {} corpus {}",
        figures.executions, figures.seconds, figures.cov, figures.ft, figures.corpus
    );
    Ok(figures)
}

/// Reads libFuzzer's status lines (`#1234 NEW cov: 56 ft: 78 corp: 9/1kb ...`) and final
/// statistics (`stat::number_of_executed_units: 1234`).
fn observe(line: &str, figures: &mut Figures) {
    let number = |after: &str| -> Option<u64> {
        let rest = line.split_once(after)?.1.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if line.starts_with('#') {
        if let Some(cov) = number("cov: ") {
            figures.cov = cov;
        }
        if let Some(ft) = number("ft: ") {
            figures.ft = ft;
        }
        if let Some(corpus) = number("corp: ") {
            figures.corpus = corpus;
        }
        if let Some(execs) = number("#") {
            figures.executions = figures.executions.max(execs);
        }
    }
    if let Some(execs) = number("stat::number_of_executed_units:") {
        figures.executions = execs;
    }
}

fn newest_file(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
}

fn summary(figures: &[Figures]) {
    eprintln!(
        "[fuzz] {:<18} {:>8} {:>12} {:>7} {:>8} {:>7}",
        "target", "seconds", "executions", "cov", "ft", "corpus"
    );
    for f in figures {
        eprintln!(
            "[fuzz] {:<18} {:>8.0} {:>12} {:>7} {:>8} {:>7}",
            f.target, f.seconds, f.executions, f.cov, f.ft, f.corpus
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_figures() {
        let mut figures = Figures::default();
        observe(
            "#4096\tpulse  cov: 1234 ft: 5678 corp: 90/12Kb exec/s: 2048 rss: 80Mb",
            &mut figures,
        );
        assert_eq!(
            (figures.executions, figures.cov, figures.ft, figures.corpus),
            (4096, 1234, 5678, 90)
        );
        observe("stat::number_of_executed_units: 123456", &mut figures);
        assert_eq!(figures.executions, 123_456);
        observe("INFO: Seed: 42", &mut figures);
        assert_eq!(figures.cov, 1234);
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for (target, project) in TARGETS {
            let source = project
                .dir()
                .join("fuzz_targets")
                .join(format!("{target}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
            let seeds = fuzz_dir().join("corpus").join(target);
            let count = fs::read_dir(&seeds).map_or(0, Iterator::count);
            assert!(count > 0, "{} has no seeds", seeds.display());
        }
    }
}
