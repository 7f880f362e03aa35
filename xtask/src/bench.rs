//! `cargo xtask bench [--smoke]`: gatekeep's benchmarks, natively and in the VM, as one
//! table and one JSON file (`target/bench/bench-<time>.json`, and `latest.json`).
//!
//! The workloads live in `gatekeep-bench` (its `native` and `vm` subcommands print one
//! `GATEKEEP-BENCH {json}` line per figure); this task builds it with the agent and the
//! service, runs the native part on this machine, boots the VM for the rest, collects
//! every figure, adds the machine's load to each, and reports targets met and missed.
//! Benchmarks print figures; they fail only when a workload cannot run, never on timing.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use xtask::{
    run_cmd_lines, target_dir,
    vm::{self, Initramfs, Kernel, Payload, VmArgs},
};

/// What starts a figure line (`gatekeep-bench`'s `report::MARKER`).
const MARKER: &str = "GATEKEEP-BENCH ";
/// The benchmark binary's name on the VM's `PATH`.
const BENCH_BINARY: &str = vm::BENCH_BINARY.1;

#[derive(Debug, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
pub struct Options {
    /// A short run (seconds per benchmark, not minutes) that checks everything still works;
    /// its figures are not worth comparing.
    #[arg(long)]
    pub smoke: bool,
    /// Skip the native benchmarks.
    #[arg(long)]
    pub no_native: bool,
    /// Skip the in-VM benchmarks.
    #[arg(long)]
    pub no_vm: bool,
    /// Only these in-VM groups: `overhead`, `agent` (default: both).
    #[arg(long = "vm-only", value_name = "GROUP")]
    pub vm_only: Vec<String>,
    /// Skip the second VM pass, which measures the `overhead` group again with QEMU
    /// counting instructions (`-icount`): exact ratios the host's load cannot move, judged
    /// against the targets.
    #[arg(long)]
    pub no_icount: bool,
    /// Give up on the VM (and kill it) after this many seconds.
    #[arg(long, default_value_t = 5400, value_name = "SECS")]
    pub timeout: u64,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// The host's 1-minute load average.
fn load() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Collects figure lines, each tagged with where it was measured and the host's load.
#[derive(Default)]
struct Figures {
    figures: Vec<Value>,
}

impl Figures {
    fn observe(&mut self, line: &str, place: &str, load_at_start: f64) {
        let Some((_, json)) = line.split_once(MARKER) else {
            return;
        };
        let Ok(mut figure) = serde_json::from_str::<Value>(json.trim()) else {
            eprintln!("[bench] unreadable figure line: {line}");
            return;
        };
        let conditions = figure["conditions"].as_str().unwrap_or_default().to_owned();
        figure["conditions"] = json!(format!(
            "{conditions}; {place}; host load {load_at_start:.2} -> {:.2} ({} cores)",
            load(),
            cores()
        ));
        figure["met"] = json!(met(&figure));
        self.figures.push(figure);
    }
}

/// Whether a figure meets its target (`None` without one).
fn met(figure: &Value) -> Option<bool> {
    let target = figure.get("target").filter(|t| !t.is_null())?;
    let measured = if target["on_ratio"].as_bool()? {
        figure["ratio"].as_f64()?
    } else {
        figure["value"].as_f64()?
    };
    let limit = target["value"].as_f64()?;
    match target["goal"].as_str()? {
        "atmost" => Some(measured <= limit),
        "atleast" => Some(measured >= limit),
        _ => None,
    }
}

/// A number the way the table shows it.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        format!("{value:.0}")
    } else if magnitude >= 100.0 {
        format!("{value:.1}")
    } else if magnitude >= 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn target_text(figure: &Value) -> String {
    let target = &figure["target"];
    if target.is_null() {
        return String::new();
    }
    let op = if target["goal"] == "atmost" {
        "<="
    } else {
        ">="
    };
    let what = if target["on_ratio"].as_bool().unwrap_or(false) {
        "ratio "
    } else {
        ""
    };
    let verdict = match figure["met"].as_bool() {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "?",
    };
    let limit = target["value"].as_f64().unwrap_or(f64::NAN);
    // A ratio's confidence interval that contains the target: the verdict is the
    // median's, not a certainty.
    let within = target["on_ratio"].as_bool().unwrap_or(false)
        && interval(&figure["ratio_ci"]).is_some_and(|(lo, hi)| lo <= limit && limit <= hi);
    format!(
        "{what}{op} {} {verdict}{}",
        number(limit),
        if within {
            " (target within the CI)"
        } else {
            ""
        }
    )
}

/// A `[low, high]` pair.
fn interval(value: &Value) -> Option<(f64, f64)> {
    Some((value.get(0)?.as_f64()?, value.get(1)?.as_f64()?))
}

/// A ratio the way the table shows it: the median, its 95 % confidence interval and the
/// range of the per-run ratios when the figure has them. Fractions (below 0.1) get one
/// more digit.
fn ratio_text(figure: &Value) -> String {
    let Some(ratio) = figure["ratio"].as_f64() else {
        return String::new();
    };
    let digits = if ratio.abs() < 0.1 { 4 } else { 3 };
    let mut text = format!("{ratio:.digits$}");
    if let Some((lo, hi)) = interval(&figure["ratio_ci"]) {
        let _ = write!(text, " (CI {lo:.digits$}..{hi:.digits$})");
    }
    if let Some((lo, hi)) = interval(&figure["ratio_range"]) {
        let _ = write!(text, " [{lo:.digits$}..{hi:.digits$}]");
    }
    text
}

/// The table: metric, value (median, min..max over runs), baseline, ratio (median, its
/// confidence interval, min..max over runs), target, conditions.
fn table(figures: &[Value]) -> String {
    let rows: Vec<[String; 6]> = figures
        .iter()
        .map(|f| {
            let unit = f["unit"].as_str().unwrap_or_default();
            let value = format!(
                "{} {unit} [{}..{}, n={}]",
                number(f["value"].as_f64().unwrap_or(f64::NAN)),
                number(f["min"].as_f64().unwrap_or(f64::NAN)),
                number(f["max"].as_f64().unwrap_or(f64::NAN)),
                f["runs"].as_u64().unwrap_or(0)
            );
            let baseline = match (f["baseline"].as_f64(), f["baseline_label"].as_str()) {
                (Some(b), Some(label)) => format!("{} ({label})", number(b)),
                (Some(b), None) => number(b),
                _ => String::new(),
            };
            let ratio = ratio_text(f);
            [
                f["metric"].as_str().unwrap_or_default().to_owned(),
                value,
                baseline,
                ratio,
                target_text(f),
                f["conditions"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    let header = [
        "metric",
        "value",
        "baseline",
        "ratio",
        "target",
        "conditions",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        // The last column is not padded.
        for (width, cell) in widths.iter_mut().zip(row).take(5) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String]| {
        let mut text = String::from("|");
        for (i, cell) in cells.iter().enumerate() {
            let pad = if i < 5 { widths[i] } else { 0 };
            let _ = write!(text, " {cell:<pad$} |");
        }
        text
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let _ = writeln!(out, "{}", line(&header));
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| "-".repeat(if i < 5 { *w } else { 3 }))
        .collect();
    let _ = writeln!(out, "{}", line(&rule));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

/// Builds the VM's binaries and `gatekeep-bench` (with the VM test suite: see
/// [`vm::Extras`]); returns the bench binary and the VM binaries.
fn build() -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
    let build = vm::build_for_vm(vm::Extras::TestsAndBench)?;
    Ok((
        build.bench.context("cargo did not build gatekeep-bench")?,
        build.binaries,
    ))
}

/// One boot of the VM: which `gatekeep-bench vm` arguments it runs, how QEMU counts time,
/// and what the figures' conditions call the place.
struct VmPass {
    args: Vec<String>,
    icount: bool,
    place: String,
}

/// The VM passes `opts` asks for: emulated wall time for the groups asked for, then (unless
/// `--no-icount`, and when `overhead` is among them) `overhead` counted in instructions.
fn vm_passes(opts: &Options, kernel: &Kernel) -> Vec<VmPass> {
    let mut common = Vec::new();
    if opts.smoke {
        common.push("--smoke".to_owned());
    }
    let mut wall = common.clone();
    for group in &opts.vm_only {
        wall.extend(["--only".to_owned(), group.clone()]);
    }
    let mut passes = vec![VmPass {
        args: wall,
        icount: false,
        place: format!("in the VM ({}, TCG)", kernel.package),
    }];
    let overhead_wanted = opts.vm_only.is_empty() || opts.vm_only.iter().any(|g| g == "overhead");
    if !opts.no_icount && overhead_wanted {
        let mut counted = common;
        counted.extend(["--only", "overhead", "--clock", "instructions"].map(str::to_owned));
        passes.push(VmPass {
            args: counted,
            icount: true,
            place: format!(
                "in the VM ({}, TCG counting instructions: -icount shift=0)",
                kernel.package
            ),
        });
    }
    passes
}

/// The VM's initramfs: busybox, the kernel's modules, the VM binaries and the benchmark,
/// which runs `gatekeep-bench vm` with `args`.
fn initrd(
    kernel: &Kernel,
    bench: &Path,
    binaries: &[(String, PathBuf)],
    args: &[String],
) -> Result<PathBuf> {
    let initramfs = Initramfs::new("bench")?;
    initramfs.add_busybox()?;
    initramfs.add_modules(kernel)?;
    for (name, path) in binaries {
        initramfs.add_executable(path, name)?;
    }
    initramfs.add_executable(bench, BENCH_BINARY)?;
    initramfs.finish(&Payload {
        env: vec![
            ("GATEKEEP_IN_VM".to_owned(), "1".to_owned()),
            ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
        ],
        argv: [BENCH_BINARY, "vm"]
            .into_iter()
            .map(str::to_owned)
            .chain(args.iter().cloned())
            .collect(),
    })
}

/// Boots the VM once per [`vm_passes`] entry and collects the figures each prints.
fn run_vm_passes(
    opts: &Options,
    kernel: &Kernel,
    bench: &Path,
    binaries: &[(String, PathBuf)],
    figures: &mut Figures,
) -> Result<()> {
    for pass in vm_passes(opts, kernel) {
        let initrd = initrd(kernel, bench, binaries, &pass.args)?;
        let load_at_start = load();
        eprintln!(
            "[bench] in-VM benchmarks{} (host load {load_at_start:.2})",
            if pass.icount {
                ", counting instructions"
            } else {
                ""
            }
        );
        let vm_args = VmArgs {
            icount: pass.icount,
            ..opts.vm.clone()
        };
        let code = vm::boot(
            kernel,
            &initrd,
            &vm_args,
            Duration::from_secs(opts.timeout),
            &mut |line| figures.observe(line, &pass.place, load_at_start),
        )?;
        if code != 0 {
            bail!(
                "the in-VM benchmarks ({}) failed with status {code} (see the console \
                 output above)",
                pass.args.join(" ")
            );
        }
    }
    Ok(())
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.no_native && opts.no_vm {
        bail!("nothing to run: both --no-native and --no-vm");
    }
    if opts.vm.icount {
        bail!(
            "`cargo xtask bench` runs its instruction-counting VM pass by itself: drop --icount \
             (--no-icount skips that pass)"
        );
    }
    let started = Instant::now();
    let kernel = if opts.no_vm {
        None
    } else {
        Some(Kernel::load()?)
    };
    let (bench, binaries) = build()?;
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;
    let mut figures = Figures::default();
    let smoke: &[&str] = if opts.smoke { &["--smoke"] } else { &[] };

    if !opts.no_native {
        // Databases on the disk under target/ (fsync on tmpfs would cost nothing).
        let scratch = out_dir.join("scratch");
        fs::create_dir_all(&scratch)?;
        let load_at_start = load();
        eprintln!("[bench] native benchmarks (host load {load_at_start:.2})");
        run_cmd_lines(
            Command::new(&bench)
                .arg("native")
                .args(smoke)
                .arg("--dir")
                .arg(&scratch)
                .env("RUST_LOG", "warn"),
            &mut |line| figures.observe(line, "native", load_at_start),
        )
        .context("the native benchmarks failed")?;
    }

    if let Some(kernel) = &kernel {
        run_vm_passes(opts, kernel, &bench, &binaries, &mut figures)?;
    }

    let figures = figures.figures;
    let text = table(&figures);
    println!("\n{text}");
    // The metrics of the figures whose `met` is `verdict` (null: a target whose figure could
    // not be measured, neither met nor missed).
    let metrics = |verdict: &Value| -> Vec<&str> {
        figures
            .iter()
            .filter(|f| !f["target"].is_null() && f["met"] == *verdict)
            .filter_map(|f| f["metric"].as_str())
            .collect()
    };
    let listed = |metrics: &[&str]| {
        if metrics.is_empty() {
            String::new()
        } else {
            format!(" ({})", metrics.join("; "))
        }
    };
    let (met, missed, unjudged) = (
        metrics(&json!(true)).len(),
        metrics(&json!(false)),
        metrics(&Value::Null),
    );
    let unjudged = if unjudged.is_empty() {
        String::new()
    } else {
        format!(", {} without a figure{}", unjudged.len(), listed(&unjudged))
    };
    println!(
        "targets: {met} met, {} missed{}{unjudged}",
        missed.len(),
        listed(&missed)
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let report = json!({
        "generated_at_unix": now,
        "smoke": opts.smoke,
        "cores": cores(),
        "vm_kernel": kernel.as_ref().map(|k| k.package.clone()),
        "took_s": started.elapsed().as_secs(),
        "figures": figures,
        "table": text,
    });
    let body = serde_json::to_string_pretty(&report)?;
    let path = out_dir.join(format!("bench-{now}.json"));
    fs::write(&path, &body)?;
    fs::write(out_dir.join("latest.json"), &body)?;
    eprintln!(
        "[bench] {} figures in {:.0} s; written to {} (and latest.json)",
        figures.len(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(value: f64, ratio: Option<f64>, target: &Value) -> Value {
        json!({
            "id": "x", "metric": "a metric", "value": value, "unit": "us", "min": value,
            "max": value, "runs": 3, "baseline": 10.0, "baseline_label": "none",
            "ratio": ratio, "target": target, "conditions": "n=3",
        })
    }

    #[test]
    fn targets_are_checked_on_the_value_or_the_ratio() {
        let at_most = json!({"goal": "atmost", "value": 300.0, "on_ratio": false});
        assert_eq!(met(&figure(250.0, None, &at_most)), Some(true));
        assert_eq!(met(&figure(350.0, None, &at_most)), Some(false));
        let ratio = json!({"goal": "atmost", "value": 1.01, "on_ratio": true});
        assert_eq!(met(&figure(1.0, Some(1.02), &ratio)), Some(false));
        assert_eq!(met(&figure(1.0, None, &ratio)), None);
        let at_least = json!({"goal": "atleast", "value": 20000.0, "on_ratio": false});
        assert_eq!(met(&figure(25_000.0, None, &at_least)), Some(true));
        assert_eq!(met(&figure(1.0, None, &Value::Null)), None);
    }

    #[test]
    fn figure_lines_are_collected_with_their_conditions() {
        let mut figures = Figures::default();
        let line = format!(
            "[  12.3] {MARKER}{}",
            figure(
                1.02,
                Some(1.02),
                &json!({"goal": "atmost", "value": 1.01, "on_ratio": true})
            )
        );
        figures.observe(&line, "in the VM", 0.5);
        figures.observe("test result: ok", "in the VM", 0.5);
        assert_eq!(figures.figures.len(), 1);
        let collected = &figures.figures[0];
        assert_eq!(collected["met"], json!(false));
        let conditions = collected["conditions"].as_str().unwrap();
        assert!(
            conditions.starts_with("n=3; in the VM; host load 0.50 -> "),
            "{conditions}"
        );
        let text = table(&figures.figures);
        assert!(text.contains("| a metric "), "{text}");
        assert!(text.contains("ratio <= 1.010 MISSED"), "{text}");
        assert!(text.contains("1.020 us [1.020..1.020, n=3]"), "{text}");
    }

    #[test]
    fn paired_ratios_show_their_interval_and_range() {
        let mut f = figure(
            1.0,
            Some(1.012),
            &json!({"goal": "atmost", "value": 1.01, "on_ratio": true}),
        );
        f["ratio_ci"] = json!([1.008, 1.015]);
        f["ratio_range"] = json!([1.001, 1.02]);
        f["met"] = json!(met(&f));
        assert_eq!(ratio_text(&f), "1.012 (CI 1.008..1.015) [1.001..1.020]");
        assert_eq!(
            target_text(&f),
            "ratio <= 1.010 MISSED (target within the CI)"
        );
        f["ratio"] = json!(0.01234);
        f["ratio_ci"] = Value::Null;
        f["ratio_range"] = Value::Null;
        assert_eq!(ratio_text(&f), "0.0123");
    }
}
