//! The VM runner shared by `vm-test` and `vm-run`: the kernel that `setup` prepares, an
//! initramfs holding busybox and our binaries, and QEMU booting it with the console
//! relayed live.
//!
//! BPF LSM cannot load on the build machines' own kernel (see `../shared/BUILDING.md`), so
//! anything that must gate real syscalls runs under Debian's cloud kernel in QEMU with
//! software emulation (nested KVM fails there).

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{BufRead as _, BufReader},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::{
    cargo::{self, build_executables, find_executable},
    cmd_stdout, display_cmd, shell_quote, target_dir,
};

/// The line `/init` prints last, followed by the payload's exit status.
pub const EXIT_MARKER: &str = "GATEKEEP-VM-EXIT: ";

/// Kernel modules the initramfs can load, by name; `setup` adds their dependencies.
/// `virtio_net` gives the VM a NIC for QEMU user networking (`--net`).
pub const VM_MODULES: &[&str] = &["virtio_net"];

/// Workspace binaries put on the VM's `PATH`, as (package, binary). Packages that do not
/// exist (yet) are skipped, so a new binary only needs a line here.
pub const VM_BINARIES: &[(&str, &str)] = &[
    ("gatekeep-agent", "gatekeep-agent"),
    ("gatekeep-cli", "gatekeep"),
    ("gatekeep-server", "gatekeep-server"),
];

/// Where everything VM-related lives: `target/vm`.
#[must_use]
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

/// Downloaded `.deb`s: `target/vm/cache`.
#[must_use]
pub fn cache_dir() -> PathBuf {
    vm_dir().join("cache")
}

/// The kernel `setup` prepares: `target/vm/kernel`, laid out as
/// - `VERSION`: the Debian package it came from (written last, so its presence means done);
/// - `root/`: the package extracted by `dpkg-deb -x`;
/// - `vmlinuz`: the kernel image;
/// - `modules/*.ko` (decompressed) and `modules/load-order` (one name a line, dependencies
///   first).
#[must_use]
pub fn kernel_dir() -> PathBuf {
    vm_dir().join("kernel")
}

/// The prepared VM kernel.
#[derive(Debug)]
pub struct Kernel {
    /// The Debian package name, e.g. `linux-image-6.12.117+deb12-cloud-amd64`.
    pub package: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// Decompressed modules, in the order to load them.
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// Finds the kernel `cargo xtask setup` prepared.
    pub fn load() -> Result<Self> {
        let dir = kernel_dir();
        let not_ready = || format!("no VM kernel in {}: run `cargo xtask setup`", dir.display());
        let package = fs::read_to_string(dir.join("VERSION")).with_context(not_ready)?;
        let vmlinuz = dir.join("vmlinuz");
        ensure!(vmlinuz.is_file(), not_ready());
        let modules_dir = dir.join("modules");
        let order = fs::read_to_string(modules_dir.join("load-order")).with_context(not_ready)?;
        let modules = order
            .lines()
            .filter(|name| !name.is_empty())
            .map(|name| modules_dir.join(format!("{name}.ko")))
            .collect();
        Ok(Self {
            package: package.trim().to_owned(),
            vmlinuz,
            modules,
        })
    }
}

/// How to size and wire the VM.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Memory for the VM, in MiB. 4 GiB: the mass-pause test holds 10,000 tasks paused at
    /// once and sizes itself by the memory there is (2 GiB held 5,624); QEMU takes the
    /// guest's pages from the host only as the guest touches them.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub memory: u32,
    /// Virtual CPUs. One by default: with several, QEMU's multi-threaded TCG can race the
    /// kernel's live code patching (tracepoint static keys flipped as programs attach), which
    /// showed up once as an `Oops: int3` in `syscall_trace_enter`; one vCPU never patches
    /// code another CPU is running, and the suite runs faster (108 s against 138 s).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Give the VM a virtio NIC on QEMU user networking: inside, `eth0` is 10.0.2.15 and
    /// 10.0.2.2 reaches the host's loopback.
    #[arg(long)]
    pub net: bool,
    /// Extra kernel command-line arguments.
    #[arg(long = "append", value_name = "ARG")]
    pub kernel_args: Vec<String>,
    /// Count instructions instead of emulating wall time (QEMU `-icount
    /// shift=0,sleep=off`): the guest's clocks advance one nanosecond per instruction it
    /// executes, so a time measured inside is an exact instruction count that the host's
    /// load cannot move. A few times slower than plain TCG.
    #[arg(long)]
    pub icount: bool,
    /// TCP ports forwarded from the host's 127.0.0.1 into the VM, as (host port, VM
    /// port); only with `net` (set by `cargo xtask demo`, not a flag).
    #[arg(skip)]
    pub forward: Vec<(u16, u16)>,
}

impl Default for VmArgs {
    fn default() -> Self {
        Self {
            memory: 4096,
            cpus: 1,
            net: false,
            kernel_args: Vec::new(),
            icount: false,
            forward: Vec::new(),
        }
    }
}

/// What [`build_for_vm`] built.
#[derive(Debug)]
pub struct VmBuild {
    /// Each of [`VM_BINARIES`] that exists: its binary name and path.
    pub binaries: Vec<(String, PathBuf)>,
    /// The benchmark binary, when asked for.
    pub bench: Option<PathBuf>,
    /// The test executable, when asked for.
    pub test: Option<PathBuf>,
}

/// The in-VM test suite, as (package, test target).
pub const VM_TEST_SUITE: (&str, &str) = ("gatekeep-tests", "vm");

/// The benchmark binary, as (package, binary).
pub const BENCH_BINARY: (&str, &str) = ("gatekeep-bench", "gatekeep-bench");

/// What [`build_for_vm`] builds besides [`VM_BINARIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extras {
    /// Only the binaries (`demo`, `vm-run`).
    None,
    /// The test suite and the benchmark binary (`vm-test`, `bench`). Both tasks build
    /// the same set so that, run one after the other (as CI does), the second reuses
    /// the first's artifacts: cargo unifies dependency features per invocation, and
    /// different sets recompiled two dozen crates (about ten minutes on 2 cores).
    TestsAndBench,
}

/// Builds [`VM_BINARIES`] and the [`Extras`] in the release profile and in one cargo
/// invocation: cargo unifies dependency features per invocation, so separate builds of
/// the agent and of the tests would compile tokio, aya, serde... twice over.
pub fn build_for_vm(extras: Extras) -> Result<VmBuild> {
    let workspace = cargo::workspace_binaries()?;
    let wanted: Vec<(&str, &str)> = VM_BINARIES
        .iter()
        .copied()
        .chain((extras == Extras::TestsAndBench).then_some(BENCH_BINARY))
        .filter(|(package, bin)| {
            workspace
                .iter()
                .any(|(name, bins)| name == package && bins.iter().any(|b| b == bin))
        })
        .collect();
    let test = (extras == Extras::TestsAndBench).then_some(VM_TEST_SUITE);
    if wanted.is_empty() && test.is_none() {
        return Ok(VmBuild {
            binaries: Vec::new(),
            bench: None,
            test: None,
        });
    }
    let mut cmd = cargo::cargo();
    cmd.args(["build", "--release", "--locked"]);
    for (package, bin) in &wanted {
        cmd.args(["--package", package, "--bin", bin]);
    }
    if let Some((package, name)) = test {
        cmd.args(["--package", package, "--test", name]);
    }
    let built = build_executables(&mut cmd)?;
    let mut binaries = Vec::new();
    let mut bench = None;
    for (_, bin) in &wanted {
        let path = find_executable(&built, "bin", bin)?;
        if *bin == BENCH_BINARY.1 {
            bench = Some(path);
        } else {
            binaries.push(((*bin).to_owned(), path));
        }
    }
    let test = test
        .map(|(_, name)| find_executable(&built, "test", name))
        .transpose()?;
    Ok(VmBuild {
        binaries,
        bench,
        test,
    })
}

/// What `/init` runs once the system is up.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Environment variables to export.
    pub env: Vec<(String, String)>,
    /// The command and its arguments, passed through unchanged (each word is quoted).
    pub argv: Vec<String>,
}

/// An initramfs being put together in a staging folder under `target/vm/`.
pub struct Initramfs {
    dir: PathBuf,
    root: PathBuf,
}

/// The VM's PID 1. It is the same for every run: what varies lives in the files it reads
/// (`/gatekeep/payload.sh`, `/lib/modules/gatekeep/load-order`).
const INIT: &str = r#"#!/bin/sh
# gatekeep VM init, generated by `cargo xtask` (xtask/src/vm.rs).
# No /dev/console node is packed, so the kernel starts us with no stdio: mount devtmpfs
# first and point stdio at the console.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

export PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin
export HOME=/root

mnt() { # TYPE DIR [OPTIONS]
    mkdir -p "$2" && mount -t "$1" ${3:+-o "$3"} "$1" "$2" || echo "gatekeep-init: cannot mount $1 on $2"
}
mnt proc /proc
mnt sysfs /sys
mnt devpts /dev/pts
mnt tmpfs /dev/shm
mnt cgroup2 /sys/fs/cgroup
mnt bpf /sys/fs/bpf
mnt securityfs /sys/kernel/security
mnt debugfs /sys/kernel/debug
mnt tracefs /sys/kernel/tracing
mnt tmpfs /tmp mode=1777
mnt tmpfs /run mode=0755

ip link set lo up
hostname gatekeep-vm

if [ -f /lib/modules/gatekeep/load-order ]; then
    while read -r m; do
        insmod "/lib/modules/gatekeep/$m.ko" || echo "gatekeep-init: cannot load module $m"
    done </lib/modules/gatekeep/load-order
fi
# QEMU user networking's fixed addresses; eth0 exists only with `--net`.
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi

# Files from `--file`, copied only now so the tmpfs mounts above do not hide them.
if [ -d /gatekeep/files ]; then
    cp -a /gatekeep/files/. / || echo "gatekeep-init: cannot copy the payload's files"
fi

cd /root
sh /gatekeep/payload.sh
code=$?
cd /
sync
echo "GATEKEEP-VM-EXIT: $code"
poweroff -f
"#;

impl Initramfs {
    /// Starts an empty initramfs in `target/vm/<name>/` (wiping an old one).
    pub fn new(name: &str) -> Result<Self> {
        let dir = vm_dir().join(name);
        let root = dir.join("root");
        if root.exists() {
            fs::remove_dir_all(&root)
                .with_context(|| format!("failed to remove {}", root.display()))?;
        }
        for sub in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/local/bin",
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "root",
            "var/tmp",
            "gatekeep",
        ] {
            let path = root.join(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("failed to create {}", path.display()))?;
        }
        let initramfs = Self { dir, root };
        initramfs.write(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )?;
        initramfs.write("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
        initramfs.write("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644)?;
        initramfs.write(
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
            0o644,
        )?;
        initramfs.write("init", INIT, 0o755)?;
        Ok(initramfs)
    }

    /// The staging path of `dest`, an absolute path inside the VM.
    fn staged(&self, dest: &Path) -> PathBuf {
        self.root.join(dest.strip_prefix("/").unwrap_or(dest))
    }

    /// Writes a file at `dest` (relative to the VM's `/`).
    fn write(&self, dest: &str, contents: &str, mode: u32) -> Result<()> {
        let path = self.root.join(dest);
        fs::write(&path, contents)
            .with_context(|| format!("failed to write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("failed to chmod {}", path.display()))
    }

    /// Adds busybox-static and a link for each applet it has (`sh`, `mount`, `ip`, ...).
    pub fn add_busybox(&self) -> Result<()> {
        let busybox = Path::new("/bin/busybox");
        let applets = cmd_stdout(Command::new(busybox).arg("--list-full")).context(
            "busybox is missing: `cargo xtask setup` installs it (Debian's busybox-static)",
        )?;
        self.add_file(busybox, Path::new("/bin/busybox"))?;
        for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
            let link = self.root.join(applet);
            if link.symlink_metadata().is_err() {
                if let Some(parent) = link.parent() {
                    fs::create_dir_all(parent)?;
                }
                symlink("/bin/busybox", &link)
                    .with_context(|| format!("failed to link {}", link.display()))?;
            }
        }
        Ok(())
    }

    /// Adds a host executable as `/usr/local/bin/<name>`, with every shared library `ldd`
    /// lists for it (the dynamic loader included) at the same path as on the host.
    pub fn add_executable(&self, src: &Path, name: &str) -> Result<()> {
        self.add_file(src, &Path::new("/usr/local/bin").join(name))?;
        for lib in shared_libraries(src)? {
            if !self.staged(&lib).exists() {
                self.add_file(&lib, &lib)?;
            }
        }
        Ok(())
    }

    /// Copies a host file, or a folder recursively, to `dest` (absolute, inside the VM).
    /// Symlinks are followed; permissions are kept.
    pub fn add_file(&self, src: &Path, dest: &Path) -> Result<()> {
        ensure!(
            dest.is_absolute(),
            "the VM path {} must be absolute",
            dest.display()
        );
        copy_recursive(src, &self.staged(dest))
    }

    /// Adds a host file or folder that `/init` copies to `dest` (absolute, inside the VM)
    /// after its mounts, so that destinations under `/tmp` or `/run` (tmpfs there) work.
    pub fn add_payload_file(&self, src: &Path, dest: &Path) -> Result<()> {
        ensure!(
            dest.is_absolute(),
            "the VM path {} must be absolute",
            dest.display()
        );
        let relative = dest.strip_prefix("/").unwrap_or(dest);
        copy_recursive(src, &self.root.join("gatekeep/files").join(relative))
    }

    /// Adds the kernel's modules and their load order under `/lib/modules/gatekeep/`.
    pub fn add_modules(&self, kernel: &Kernel) -> Result<()> {
        let dir = Path::new("/lib/modules/gatekeep");
        let mut order = String::new();
        for module in &kernel.modules {
            let file_name = module.file_name().context("module path has a file name")?;
            self.add_file(module, &dir.join(file_name))?;
            let name = module.file_stem().context("module path has a stem")?;
            writeln!(order, "{}", name.to_string_lossy())?;
        }
        self.write("lib/modules/gatekeep/load-order", &order, 0o644)
    }

    /// Writes the payload, then packs the initramfs as a gzipped newc cpio archive and
    /// returns its path (`target/vm/<name>/initrd.gz`).
    pub fn finish(self, payload: &Payload) -> Result<PathBuf> {
        let mut script = String::from("# What the VM runs, generated by `cargo xtask`.\n");
        for (key, value) in &payload.env {
            writeln!(script, "export {key}={}", shell_quote(value))?;
        }
        let argv: Vec<String> = payload.argv.iter().map(shell_quote).collect();
        writeln!(script, "exec {}", argv.join(" "))?;
        self.write("gatekeep/payload.sh", &script, 0o644)?;

        let initrd = self.dir.join("initrd.gz");
        let out = File::create(&initrd)
            .with_context(|| format!("failed to create {}", initrd.display()))?;
        // find | cpio | gzip, with each stage's status checked (sh has no pipefail).
        let mut find = Command::new("find");
        find.arg(".").current_dir(&self.root).stdout(Stdio::piped());
        let mut find_child = find.spawn().context("failed to start `find`")?;
        let mut cpio = Command::new("cpio");
        cpio.args(["--create", "--format=newc", "--owner=0:0", "--quiet"])
            .current_dir(&self.root)
            .stdin(find_child.stdout.take().context("find's stdout is piped")?)
            .stdout(Stdio::piped());
        let mut cpio_child = cpio
            .spawn()
            .context("failed to start `cpio` (`cargo xtask setup` installs it)")?;
        let mut gzip = Command::new("gzip");
        gzip.arg("-1")
            .stdin(cpio_child.stdout.take().context("cpio's stdout is piped")?)
            .stdout(out);
        let mut gzip_child = gzip.spawn().context("failed to start `gzip`")?;
        for (cmd, child) in [
            (&find, &mut find_child),
            (&cpio, &mut cpio_child),
            (&gzip, &mut gzip_child),
        ] {
            let status = child.wait()?;
            ensure!(
                status.success(),
                "command `{}` failed with {status} while packing {}",
                display_cmd(cmd),
                initrd.display()
            );
        }
        Ok(initrd)
    }
}

/// Copies `src` to `dest`, recursing into folders and following symlinks.
fn copy_recursive(src: &Path, dest: &Path) -> Result<()> {
    let meta = fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    if meta.is_dir() {
        fs::create_dir_all(dest).with_context(|| format!("failed to create {}", dest.display()))?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_recursive(&entry.path(), &dest.join(entry.file_name()))?;
        }
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        fs::copy(src, dest)
            .with_context(|| format!("failed to copy {} to {}", src.display(), dest.display()))?;
    }
    Ok(())
}

/// The shared libraries `ldd` lists for `exe` (none for a static executable).
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(exe)
        .stdin(Stdio::null())
        .output()
        .context("failed to start `ldd`")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd exits 1 and says so for static executables; anything else is an error.
        let says = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
        ensure!(
            says.contains("not a dynamic executable") || says.contains("statically linked"),
            "`ldd {}` failed: {}",
            exe.display(),
            says.trim()
        );
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&stdout))
}

/// Picks the library paths out of `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x..)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x..)`; `linux-vdso.so.1` has no file.
fn parse_ldd(stdout: &str) -> Vec<PathBuf> {
    stdout
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, path)| path.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Boots `initrd` under QEMU, relays the serial console to stdout line by line, and
/// returns the payload's exit status from the final marker line. `on_line` sees every
/// console line too (e.g. to count test results).
///
/// Fails loudly on a kernel panic, on a hang (nothing finished within `timeout`: qemu is
/// killed), when QEMU fails, or when the VM stops without printing the marker.
pub fn boot(
    kernel: &Kernel,
    initrd: &Path,
    vm: &VmArgs,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<i32> {
    let mut append = vec!["console=ttyS0", "quiet", "panic=-1"];
    append.extend(vm.kernel_args.iter().map(String::as_str));
    let mut qemu = Command::new("qemu-system-x86_64");
    // TCG: nested KVM fails on the build machines (BUILDING.md).
    qemu.args(["-accel", "tcg", "-cpu", "max", "-nographic", "-no-reboot"])
        .args(["-m", &vm.memory.to_string(), "-smp", &vm.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append.join(" ")]);
    if vm.icount {
        // shift=0: one instruction, one virtual nanosecond; sleep=off: an idle guest jumps
        // to its next timer instead of waiting for it in real time; align=off: never
        // slowed down to the host's clock.
        qemu.args(["-icount", "shift=0,sleep=off,align=off"]);
    }
    if vm.net {
        // No option ROM: iPXE would only slow the boot down.
        let mut netdev = "user,id=net0".to_owned();
        for (host, guest) in &vm.forward {
            write!(netdev, ",hostfwd=tcp:127.0.0.1:{host}-:{guest}")?;
        }
        qemu.args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=net0,romfile="]);
    } else {
        qemu.args(["-nic", "none"]);
    }
    // No stdin: QEMU would otherwise put a terminal into raw mode.
    qemu.stdin(Stdio::null()).stdout(Stdio::piped());
    eprintln!(
        "[vm] booting {} ({} s timeout)",
        kernel.package,
        timeout.as_secs()
    );
    eprintln!("$ {}", display_cmd(&qemu));
    let mut child = qemu
        .spawn()
        .context("failed to start qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let stdout = child.stdout.take().context("qemu's stdout is piped")?;

    // A thread reads the console so the main thread can wait with a deadline.
    let (lines, console) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if lines.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let started = Instant::now();
    let mut deadline = started + timeout;
    let mut exit_code = None;
    let mut panicked = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left) {
            Ok(bytes) => {
                let line = printable(&String::from_utf8_lossy(&bytes));
                println!("{line}");
                on_line(&line);
                if let Some(code) = parse_marker(&line) {
                    exit_code = Some(code);
                }
                if line.contains("Kernel panic - not syncing") && !panicked {
                    panicked = true;
                    // panic=-1 reboots at once and -no-reboot then stops QEMU; allow a
                    // little time for the rest of the panic report.
                    deadline = deadline.min(Instant::now() + Duration::from_secs(30));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                kill(&mut child);
                if panicked {
                    bail!("the VM's kernel panicked (see the console output above)");
                }
                bail!(
                    "the VM did not finish within {} s and was killed: a hang, or raise --timeout",
                    timeout.as_secs()
                );
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("failed to wait for qemu")?;
    eprintln!(
        "[vm] stopped after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if panicked {
        bail!("the VM's kernel panicked (see the console output above)");
    }
    ensure!(status.success(), "qemu failed with {status}");
    exit_code.with_context(|| {
        format!(
            "the VM stopped without printing its `{} <status>` line: /init did not finish \
             (see the console output above)",
            EXIT_MARKER.trim_end()
        )
    })
}

/// A console line without its line ending and without terminal control sequences:
/// `SeaBIOS` mirrors its screen to the serial port with a terminal reset (`ESC c`) and
/// "no line wrap" (`ESC [?7l`) that would otherwise reach the user's terminal.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI sequences end with a byte in '@'..='~'; other escapes are two characters.
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Stops QEMU after a timeout.
fn kill(child: &mut Child) {
    // Errors only mean it already exited.
    let _ = child.kill();
    let _ = child.wait();
}

/// The payload's exit status if `line` is the final marker line. Kernel messages can share
/// a console line with it, so the marker is looked for anywhere in the line.
fn parse_marker(line: &str) -> Option<i32> {
    let (_, rest) = line.split_once(EXIT_MARKER)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn strips_terminal_controls() {
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\n"),
            "SeaBIOS (version 1.16.2)"
        );
        assert_eq!(printable("a\tb\r\n"), "a\tb");
    }

    #[test]
    fn finds_the_marker_anywhere_in_a_line() {
        assert_eq!(parse_marker("GATEKEEP-VM-EXIT: 0"), Some(0));
        assert_eq!(
            parse_marker("[   3.1] foo GATEKEEP-VM-EXIT: 101"),
            Some(101)
        );
        assert_eq!(parse_marker("GATEKEEP-VM-EXIT: "), None);
        assert_eq!(parse_marker("test result: ok"), None);
    }
}
