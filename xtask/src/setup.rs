//! `cargo xtask setup`: installs everything building and testing gatekeep needs, and
//! prepares the VM kernel. Idempotent; with everything present it takes seconds.
//!
//! The recipe is the one `../shared/BUILDING.md` records for these machines: the
//! preinstalled nightly (for the eBPF crate) with `rust-src`, bpf-linker built against that
//! nightly's own libLLVM, Debian's QEMU and busybox, and Debian's cloud kernel.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashSet},
    env,
    fs::{self, File},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;
use xtask::{
    cmd_stdout, probe, run_cmd,
    vm::{VM_MODULES, cache_dir, kernel_dir},
};

/// The bpf-linker release that fits the nightly's LLVM 22 (BUILDING.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-deny release `cargo xtask lint` runs (rust-version 1.88, builds with 1.95).
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// Debian packages the VM runner uses, valgrind, whose callgrind counts the decision
/// service's instructions per decision for `cargo xtask bench`, and `PostgreSQL`, whose
/// server binaries the decision service's tests start as throwaway clusters under `target/`
/// (the package's own cluster is never used).
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "valgrind",
    "postgresql",
];

/// apt's pattern for Debian's cloud kernels. Anchored at both ends, so the `-dbg` and
/// `-unsigned` variants do not match; the signed package boots the same under QEMU.
const KERNEL_PATTERN: &str = r"^linux-image-6\.12\..*-cloud-amd64$";

#[derive(Debug, Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    let started = Instant::now();
    let mut apt = Apt::default();
    rust_src()?;
    bpf_linker()?;
    apt_packages(&mut apt)?;
    kernel(&mut apt)?;
    crate::console::ensure()?;
    lint_tools()?;
    say(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// The set-up every other task runs first, so each README command works on
/// a fresh machine by itself (about half a second when all is in place). The
/// lint tools are left to `setup` and `lint`: building cargo-deny takes minutes
/// that a test or demo run does not need.
pub fn ensure() -> Result<()> {
    let mut apt = Apt::default();
    rust_src()?;
    bpf_linker()?;
    apt_packages(&mut apt)?;
    kernel(&mut apt)?;
    crate::console::ensure()
}

/// What `cargo xtask lint` runs besides clippy: the nightly's rustfmt (rustfmt.toml
/// groups imports, a nightly-only option) and cargo-deny, built from crates.io.
pub fn lint_tools() -> Result<()> {
    let rustfmt = probe(Command::new("rustfmt").args(["+nightly", "--version"]));
    if rustfmt.is_some() {
        say("rustfmt (nightly): already installed");
    } else {
        say("rustfmt (nightly): installing");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rustfmt",
            "--toolchain",
            "nightly",
        ]))
        .context("cannot add rustfmt to the nightly toolchain")?;
    }
    let current = probe(Command::new("cargo").args(["deny", "--version"]))
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if current.as_deref() == Some(&format!("cargo-deny {CARGO_DENY_VERSION}")) {
        say(&format!(
            "cargo-deny {CARGO_DENY_VERSION}: already installed"
        ));
        return Ok(());
    }
    say(&format!(
        "cargo-deny {CARGO_DENY_VERSION}: installing from crates.io (a few minutes; found: {})",
        current.as_deref().unwrap_or("none")
    ));
    let mut install = Command::new("cargo");
    install.args([
        "install",
        "cargo-deny",
        "--version",
        CARGO_DENY_VERSION,
        "--locked",
        "--force",
    ]);
    // `cargo install` would build in a CARGO_TARGET_DIR meant for the workspace.
    install.env_remove("CARGO_TARGET_DIR");
    run_cmd(&mut install).context("cannot build cargo-deny (see cargo's output above)")
}

fn say(message: &str) {
    eprintln!("[setup] {message}");
}

/// The nightly's `rust-src`, which `-Z build-std=core` needs for the eBPF crate.
fn rust_src() -> Result<()> {
    let installed = cmd_stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list the nightly toolchain's components: is rustup's `nightly` installed?")?;
    if installed
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"))
    {
        say("rust-src (nightly): already installed");
        return Ok(());
    }
    say("rust-src (nightly): installing");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src to the nightly toolchain")
}

/// bpf-linker, linked against the nightly's own libLLVM (no LLVM package of that version
/// exists for Debian 12).
fn bpf_linker() -> Result<()> {
    // The nightly ships `lib/libLLVM.so.<major>.<minor>-rust-<version>-nightly`; bpf-linker's
    // build looks for `$LLVM_PREFIX/lib/libLLVM.so` and embeds `$LLVM_PREFIX/lib` as its run
    // path, so the prefix must be a lasting folder of symlinks.
    let sysroot = cmd_stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("cannot find the nightly toolchain (`rustc +nightly`)")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&lib_dir)?;
    let file_name = libllvm
        .file_name()
        .context("libLLVM path has a file name")?
        .to_string_lossy()
        .into_owned();
    let major = llvm_major(&file_name)
        .with_context(|| format!("cannot read the LLVM version from {file_name}"))?;
    let prefix = cargo_home()?.join(format!("gatekeep-llvm{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("failed to create {}", prefix_lib.display()))?;
    // Refreshed every time (cheap): an installed bpf-linker finds libLLVM through them. Made
    // under a name of this process's and renamed over the old link, so a build running
    // meanwhile (or a second set-up) never finds it missing.
    for name in ["libLLVM.so", file_name.as_str()] {
        let link = prefix_lib.join(name);
        let fresh = prefix_lib.join(format!(".{name}.{}", std::process::id()));
        let _ = fs::remove_file(&fresh);
        symlink(&libllvm, &fresh).with_context(|| format!("failed to link {}", fresh.display()))?;
        fs::rename(&fresh, &link)
            .with_context(|| format!("failed to replace {}", link.display()))?;
    }

    let current = probe(Command::new("bpf-linker").arg("--version"))
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if current.as_deref() == Some(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        say(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: already installed"
        ));
        return Ok(());
    }
    say(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: installing against LLVM {major} in {} (about a minute; found: {})",
        prefix.display(),
        current.as_deref().unwrap_or("none")
    ));
    let mut install = Command::new("cargo");
    install
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]);
    // `cargo install` would build in a CARGO_TARGET_DIR meant for the workspace.
    install.env_remove("CARGO_TARGET_DIR");
    run_cmd(&mut install).context("cannot build bpf-linker (see cargo's output above)")?;
    let installed = probe(Command::new("bpf-linker").arg("--version"));
    ensure!(
        installed.is_some(),
        "bpf-linker was installed but does not run: is {} on PATH (`source ~/.cargo/env`)?",
        cargo_home()?.join("bin").display()
    );
    Ok(())
}

/// `$CARGO_HOME`, or `~/.cargo`.
fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// The one `libLLVM.so.*` in the nightly's `lib/`.
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?
    {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
        {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}: the nightly toolchain lacks its LLVM library",
            lib_dir.display()
        ),
        _ => bail!("several libLLVM.so.* in {}: {found:?}", lib_dir.display()),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> `22`.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    version.split(['.', '-']).next()?.parse().ok()
}

/// apt, updated at most once per run and only when something is missing.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn command(args: &[&str]) -> Command {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .args(args);
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            say("apt: updating package lists");
            run_cmd(&mut Self::command(&["update"]))
                .context("`apt-get update` failed: apt needs root and network access")?;
            self.updated = true;
        }
        Ok(())
    }
}

fn dpkg_installed(package: &str) -> bool {
    probe(Command::new("dpkg-query").args(["--show", "--showformat=${Status}", package]))
        .is_some_and(|output| output.stdout == b"install ok installed")
}

fn apt_packages(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        say(&format!(
            "Debian packages ({}): already installed",
            APT_PACKAGES.join(", ")
        ));
        return Ok(());
    }
    say(&format!(
        "Debian packages: installing {}",
        missing.join(", ")
    ));
    apt.update()?;
    let mut args = vec!["install", "--yes", "--no-install-recommends"];
    args.extend(&missing);
    run_cmd(&mut Apt::command(&args)).with_context(|| {
        format!(
            "cannot install {} (apt needs root: run setup as root)",
            missing.join(" ")
        )
    })
}

/// Debian's newest 6.12 cloud kernel, downloaded and extracted into `target/vm/kernel`.
fn kernel(apt: &mut Apt) -> Result<()> {
    let package = newest_kernel(apt)?;
    let dir = kernel_dir();
    let done = fs::read_to_string(dir.join("VERSION")).ok();
    if done.as_deref().map(str::trim) == Some(package.as_str()) && dir.join("vmlinuz").is_file() {
        say(&format!(
            "VM kernel {package}: already prepared in {}",
            dir.display()
        ));
        return Ok(());
    }
    let deb = download_kernel(apt, &package)?;
    say(&format!(
        "VM kernel {package}: extracting into {}",
        dir.display()
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    }
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).with_context(|| {
        format!(
            "cannot extract {} (delete it and run setup again)",
            deb.display()
        )
    })?;

    let vmlinuz = single_file(&root.join("boot"), "vmlinuz-")?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("failed to copy {}", vmlinuz.display()))?;
    let modules = dir.join("modules");
    fs::create_dir_all(&modules)?;
    let order = prepare_modules(&root.join("lib/modules"), &modules, VM_MODULES)?;
    fs::write(modules.join("load-order"), order.join("\n") + "\n")?;
    say(&format!(
        "VM kernel {package}: modules {}",
        order.join(", ")
    ));
    // Last: its presence means everything above is done.
    fs::write(dir.join("VERSION"), format!("{package}\n"))?;
    Ok(())
}

/// The highest-versioned cloud kernel apt knows, updating the lists once if it knows none.
fn newest_kernel(apt: &mut Apt) -> Result<String> {
    loop {
        let found =
            cmd_stdout(Command::new("apt-cache").args(["search", "--names-only", KERNEL_PATTERN]))?;
        let newest = found
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .max_by(|a, b| version_cmp(a, b));
        if let Some(newest) = newest {
            return Ok(newest.to_owned());
        }
        if apt.updated {
            bail!("apt knows no package matching {KERNEL_PATTERN}, even after `apt-get update`");
        }
        apt.update()?;
    }
}

/// The cached `.deb` of `package`, downloaded first if missing.
fn download_kernel(apt: &mut Apt, package: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("failed to create {}", cache.display()))?;
    if let Ok(deb) = single_file(&cache, &format!("{package}_")) {
        say(&format!("VM kernel {package}: using {}", deb.display()));
        return Ok(deb);
    }
    say(&format!(
        "VM kernel {package}: downloading into {}",
        cache.display()
    ));
    // Into a scratch folder first, so a broken download never looks cached.
    let partial = cache.join("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir_all(&partial)?;
    let mut download = Apt::command(&["download", "-o", "APT::Sandbox::User=root", package]);
    download.current_dir(&partial);
    if let Err(err) = run_cmd(&mut download) {
        // The lists may name a version the mirror has dropped: refresh them once.
        if apt.updated {
            return Err(err.context(format!("cannot download {package}")));
        }
        apt.update()?;
        run_cmd(&mut download).with_context(|| format!("cannot download {package}"))?;
    }
    let downloaded = single_file(&partial, &format!("{package}_"))?;
    // Older kernels are of no more use.
    for entry in fs::read_dir(&cache)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            fs::remove_file(&path)?;
        }
    }
    let deb = cache.join(downloaded.file_name().context("download has a file name")?);
    fs::rename(&downloaded, &deb)?;
    fs::remove_dir_all(&partial)?;
    Ok(deb)
}

/// The one file in `dir` whose name starts with `prefix`.
fn single_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(prefix) && entry.path().is_file() {
                found.push(entry.path());
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no {prefix}* in {}", dir.display()),
        _ => bail!("several {prefix}* in {}: {found:?}", dir.display()),
    }
}

/// Compares version-like strings with their digit runs as numbers, so
/// `6.12.117+deb12` > `6.12.99+deb12`.
fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(first) = rest.chars().next() {
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    for (x, y) in chunks(a).into_iter().zip(chunks(b)) {
        let order = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// Decompresses `wanted` modules and everything they depend on from the extracted
/// `lib/modules` into `out` as `<name>.ko`, and returns their names in load order
/// (dependencies first). The `.deb` carries no `modules.dep` (depmod runs at install), so
/// dependencies come from each module's own `.modinfo` `depends=` entry.
fn prepare_modules(modules_root: &Path, out: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let mut index = BTreeMap::new();
    let mut builtin = HashSet::new();
    for release in fs::read_dir(modules_root)
        .with_context(|| format!("cannot read {}", modules_root.display()))?
    {
        let release = release?.path();
        index_modules(&release.join("kernel"), &mut index)?;
        if let Ok(list) = fs::read_to_string(release.join("modules.builtin")) {
            builtin.extend(list.lines().filter_map(module_name));
        }
    }

    let mut resolver = Resolver {
        index,
        builtin,
        out,
        order: Vec::new(),
    };
    for name in wanted {
        resolver.add(name, "gatekeep's VM")?;
    }
    Ok(resolver.order)
}

/// Walks module dependencies depth-first, decompressing each module once.
struct Resolver<'a> {
    /// Every module file in the package, by name.
    index: BTreeMap<String, PathBuf>,
    /// Modules built into the kernel: nothing to load.
    builtin: HashSet<String>,
    /// Where the decompressed modules go.
    out: &'a Path,
    /// Names in load order.
    order: Vec<String>,
}
impl Resolver<'_> {
    fn add(&mut self, name: &str, needed_by: &str) -> Result<()> {
        if self.order.iter().any(|done| done == name) || self.builtin.contains(name) {
            return Ok(());
        }
        let src = self
            .index
            .get(name)
            .with_context(|| {
                format!("kernel module {name} (needed by {needed_by}) is not in the kernel package")
            })?
            .clone();
        let dest = self.out.join(format!("{name}.ko"));
        decompress(&src, &dest)?;
        let bytes = fs::read(&dest)?;
        for dep in modinfo_depends(&bytes) {
            self.add(&dep, name)?;
        }
        self.order.push(name.to_owned());
        Ok(())
    }
}

/// Maps module names (with `-` read as `_`, as the kernel does) to their files.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.to_str().and_then(module_name) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// `kernel/drivers/net/virtio_net.ko.xz` -> `virtio_net`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// Writes the uncompressed module: busybox's `insmod` takes plain `.ko` files.
fn decompress(src: &Path, dest: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        fs::copy(src, dest)?;
        return Ok(());
    };
    let out = File::create(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    run_cmd(Command::new(tool).arg("-dc").arg(src).stdout(out))
}

/// The `depends=` list of a module's `.modinfo` section (NUL-separated `key=value`s).
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    module
        .split(|&byte| byte == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|dep| !dep.is_empty())
                .map(|dep| dep.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_kernel_versions_numerically() {
        assert_eq!(
            version_cmp(
                "linux-image-6.12.117+deb12-cloud-amd64",
                "linux-image-6.12.99+deb12-cloud-amd64"
            ),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.12.100", "6.12.100"), Ordering::Equal);
        assert_eq!(version_cmp("6.12.9", "6.12.10"), Ordering::Less);
    }

    #[test]
    fn reads_llvm_major() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }

    #[test]
    fn reads_module_dependencies() {
        let modinfo = b"\0license=GPL\0depends=net_failover,virtio-foo\0intree=Y\0";
        assert_eq!(modinfo_depends(modinfo), ["net_failover", "virtio_foo"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
    }
}
