//! The host checks: each reads only the paths it is given and returns one
//! [`CheckResult`], so unit tests drive them with temporary files.

use std::{
    fs, io,
    io::Read as _,
    path::{Path, PathBuf},
};

use super::{CheckResult, Paths};

/// The oldest kernel gatekeep supports.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Capability numbers (`include/uapi/linux/capability.h`).
pub const CAP_KILL: u32 = 5;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Where to change the kernel command line on the usual GRUB hosts.
const GRUB_STEPS: &str = "to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub (grub2-mkconfig -o /boot/grub2/grub.cfg on RHEL-likes) and reboot";

/// Reads a small text file, trimmed.
fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_owned())
}

/// `path: error`, for details.
fn io_detail(path: &Path, err: &io::Error) -> String {
    format!("cannot read {}: {err}", path.display())
}

// ---------------------------------------------------------------------------
// 1. kernel version

/// The `(major, minor)` at the start of a kernel release such as `6.18.44-fc-v657`.
#[must_use]
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    let major = numbers.next()?.ok()?;
    let minor = numbers.next()?.ok()?;
    Some((major, minor))
}

/// Check 1: the running kernel is at least [`MIN_KERNEL`].
#[must_use]
pub fn kernel_version(paths: &Paths) -> CheckResult {
    const NAME: &str = "kernel-version";
    let (min_major, min_minor) = MIN_KERNEL;
    let release = match read_trimmed(&paths.osrelease) {
        Ok(release) => release,
        Err(err) => {
            return CheckResult::fail(
                NAME,
                io_detail(&paths.osrelease, &err),
                "run the check on Linux with /proc mounted (`mount -t proc proc /proc`)",
            );
        }
    };
    match parse_kernel_release(&release) {
        Some(version) if version >= MIN_KERNEL => {
            CheckResult::ok(NAME, format!("{release} (>= {min_major}.{min_minor})"))
        }
        Some(_) => CheckResult::fail(
            NAME,
            format!(
                "kernel {release} is older than {min_major}.{min_minor}, the oldest gatekeep supports"
            ),
            format!(
                "boot a kernel >= {min_major}.{min_minor} (e.g. Debian 12's 6.1 or Ubuntu 22.04's 5.15)"
            ),
        ),
        None => CheckResult::fail(
            NAME,
            format!(
                "cannot parse the kernel release `{release}` from {}",
                paths.osrelease.display()
            ),
            format!("make sure the kernel is Linux >= {min_major}.{min_minor}"),
        ),
    }
}

// ---------------------------------------------------------------------------
// 2. BTF

/// Check 2: the kernel exposes its BTF (needed to load LSM programs against
/// its types).
#[must_use]
pub fn btf(paths: &Paths) -> CheckResult {
    const NAME: &str = "btf";
    let path = &paths.btf_vmlinux;
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            #[expect(
                clippy::cast_precision_loss,
                reason = "a size in MiB for people to read"
            )]
            let mib = meta.len() as f64 / (1024.0 * 1024.0);
            CheckResult::ok(NAME, format!("{} ({mib:.1} MiB)", path.display()))
        }
        Ok(_) => CheckResult::fail(
            NAME,
            format!("{} is not a file", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => CheckResult::fail(
            NAME,
            format!(
                "{} does not exist: the kernel was built without CONFIG_DEBUG_INFO_BTF, so BPF LSM programs cannot be loaded against its types",
                path.display()
            ),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the stock kernels of current distributions are)",
        ),
        Err(err) => CheckResult::fail(
            NAME,
            io_detail(path, &err),
            "run the check as root; the kernel needs CONFIG_DEBUG_INFO_BTF=y",
        ),
    }
}

// ---------------------------------------------------------------------------
// kernel config (/boot/config-$(uname -r) or /proc/config.gz)

/// The kernel's build configuration, as far as the host exposes it.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The file it was read from.
    pub source: PathBuf,
    text: String,
}

impl KernelConfig {
    /// Reads `/boot/config-<release>` (under `paths.boot_dir`), else
    /// `paths.proc_config` (gzip); `None` when neither is readable.
    #[must_use]
    pub fn read(paths: &Paths) -> Option<Self> {
        if let Ok(release) = read_trimmed(&paths.osrelease) {
            let source = paths.boot_dir.join(format!("config-{release}"));
            if let Ok(text) = fs::read_to_string(&source) {
                return Some(Self { source, text });
            }
        }
        let file = fs::File::open(&paths.proc_config).ok()?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .ok()?;
        Some(Self {
            source: paths.proc_config.clone(),
            text,
        })
    }

    /// Builds one from text (tests).
    #[must_use]
    pub fn from_text(source: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            text: text.into(),
        }
    }

    /// The value of `key` (e.g. `CONFIG_LSM`), unquoted; `None` when unset.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"'))
        })
    }
}

// ---------------------------------------------------------------------------
// mounts

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(byte) = u8::from_str_radix(&String::from_utf8_lossy(digits), 8)
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` (proc(5)): mount point is field 5, the file
/// system type follows the ` - ` separator. Malformed lines are skipped.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let fs_type = after.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape_mount_field(mount_point)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The file system visible at `point`: the last mount there (later mounts
/// stack on top of earlier ones).
#[must_use]
pub fn mounted_at<'m>(mounts: &'m [Mount], point: &Path) -> Option<&'m Mount> {
    mounts.iter().rev().find(|m| m.mount_point == point)
}

/// The mount table, or a failing check's detail.
fn read_mounts(paths: &Paths) -> Result<Vec<Mount>, String> {
    fs::read_to_string(&paths.mountinfo)
        .map(|text| parse_mountinfo(&text))
        .map_err(|err| io_detail(&paths.mountinfo, &err))
}

// ---------------------------------------------------------------------------
// 3. bpf in the active LSM list

/// Splits a comma-separated LSM list.
fn lsm_names(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect()
}

/// The boot option that enables the BPF LSM on top of `current` (the active
/// or configured list): the same order, with `bpf` appended.
#[must_use]
pub fn lsm_boot_option(current: &str) -> String {
    let mut names = lsm_names(current);
    names.retain(|n| *n != "bpf");
    names.push("bpf");
    format!("lsm={}", names.join(","))
}

/// The last `lsm=` on a kernel command line (the one the kernel uses).
#[must_use]
pub fn cmdline_lsm(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .take_while(|word| *word != "--")
        .filter_map(|word| word.strip_prefix("lsm="))
        .last()
}

/// The fix when `bpf` is missing from `list`.
fn enable_bpf_lsm_fix(list: &str, config: Option<&KernelConfig>) -> String {
    let option = lsm_boot_option(list);
    match config.map(|c| (c, c.get("CONFIG_BPF_LSM"))) {
        Some((config, value)) if value != Some("y") => format!(
            "this kernel is built without CONFIG_BPF_LSM ({}): boot a kernel with CONFIG_BPF_LSM=y and add `{option}` {GRUB_STEPS}",
            config.source.display()
        ),
        _ => format!("add `{option}` {GRUB_STEPS} (the kernel must have CONFIG_BPF_LSM=y)"),
    }
}

/// Check 3: `bpf` is among the active LSMs. Without securityfs the active
/// list is unreadable; then `lsm=` on the command line or `CONFIG_LSM` says
/// what the kernel was asked for, labelled as such.
#[must_use]
pub fn bpf_lsm(paths: &Paths, config: Option<&KernelConfig>) -> CheckResult {
    const NAME: &str = "bpf-lsm";
    let lsm_path = &paths.lsm;
    let active_err = match read_trimmed(lsm_path) {
        Ok(list) if lsm_names(&list).contains(&"bpf") => {
            return CheckResult::ok(NAME, format!("bpf is an active LSM ({list})"));
        }
        Ok(list) => {
            return CheckResult::fail(
                NAME,
                format!(
                    "bpf is not among the active LSMs ({list}, from {}), so BPF LSM programs are never called",
                    lsm_path.display()
                ),
                enable_bpf_lsm_fix(&list, config),
            );
        }
        Err(err) => err,
    };
    if active_err.kind() != io::ErrorKind::NotFound {
        return CheckResult::fail(
            NAME,
            io_detail(lsm_path, &active_err),
            "run the check as root",
        );
    }

    let securityfs = &paths.securityfs;
    let mounted = read_mounts(paths).is_ok_and(|mounts| {
        mounted_at(&mounts, securityfs).is_some_and(|m| m.fs_type == "securityfs")
    });
    let (why, mount_fix) = if mounted {
        (
            format!(
                "{} does not exist although securityfs is mounted (a kernel older than 5.1?)",
                lsm_path.display()
            ),
            None,
        )
    } else {
        (
            format!(
                "securityfs is not mounted at {}, so the active LSM list ({}) cannot be read",
                securityfs.display(),
                lsm_path.display()
            ),
            Some(format!(
                "mount -t securityfs securityfs {}",
                securityfs.display()
            )),
        )
    };

    let cmdline = fs::read_to_string(&paths.cmdline).unwrap_or_default();
    let fallback = cmdline_lsm(&cmdline)
        .map(|list| {
            (
                list.to_owned(),
                format!(
                    "lsm= on the kernel command line ({})",
                    paths.cmdline.display()
                ),
            )
        })
        .or_else(|| {
            let config = config?;
            Some((
                config.get("CONFIG_LSM")?.to_owned(),
                format!("CONFIG_LSM in {}", config.source.display()),
            ))
        });
    let then_rerun = |fix: Option<String>| {
        fix.map_or_else(
            || "run the check on a kernel >= 5.1 with securityfs".to_owned(),
            |mount| format!("`{mount}`, then run the check again"),
        )
    };
    match fallback {
        Some((list, label)) if lsm_names(&list).contains(&"bpf") => CheckResult::warn(
            NAME,
            format!(
                "{why}; fallback: {label} lists bpf ({list}), which is what was asked for, not confirmed as active"
            ),
        )
        .with_fix(then_rerun(mount_fix)),
        Some((list, label)) => CheckResult::fail(
            NAME,
            format!(
                "{why}; fallback: {label} does not list bpf ({list}), so BPF LSM programs would never be called"
            ),
            enable_bpf_lsm_fix(&list, config),
        ),
        None => CheckResult::warn(
            NAME,
            format!(
                "{why}; no fallback either (no lsm= in {}, no kernel config in {} or {})",
                paths.cmdline.display(),
                paths.boot_dir.display(),
                paths.proc_config.display()
            ),
        )
        .with_fix(then_rerun(mount_fix)),
    }
}

// ---------------------------------------------------------------------------
// 4. cgroup v2, 5. bpffs

/// Check 4: the unified cgroup v2 hierarchy is what `/sys/fs/cgroup` shows.
#[must_use]
pub fn cgroup2(paths: &Paths) -> CheckResult {
    const NAME: &str = "cgroup2";
    let point = &paths.cgroup_mount;
    let mounts = match read_mounts(paths) {
        Ok(mounts) => mounts,
        Err(detail) => return CheckResult::fail(NAME, detail, "mount /proc"),
    };
    let fix = format!(
        "boot with `systemd.unified_cgroup_hierarchy=1` (add it {GRUB_STEPS}); without systemd: `mount -t cgroup2 cgroup2 {}`",
        point.display()
    );
    match mounted_at(&mounts, point) {
        Some(m) if m.fs_type == "cgroup2" => {
            CheckResult::ok(NAME, format!("cgroup2 mounted at {}", point.display()))
        }
        Some(m) => {
            let unified = mounts
                .iter()
                .filter(|u| u.fs_type == "cgroup2")
                .map(|u| u.mount_point.display().to_string())
                .collect::<Vec<_>>();
            let hybrid = if unified.is_empty() {
                String::new()
            } else {
                format!(", cgroup2 only at {}", unified.join(", "))
            };
            CheckResult::fail(
                NAME,
                format!(
                    "{} is {}, not cgroup2 (a cgroup v1 or hybrid layout{hybrid}): gatekeep's policies name cgroup v2 paths",
                    point.display(),
                    m.fs_type
                ),
                fix,
            )
        }
        None => CheckResult::fail(
            NAME,
            format!("nothing is mounted at {}", point.display()),
            fix,
        ),
    }
}

/// Check 5: bpffs is mounted where the agent pins its maps.
#[must_use]
pub fn bpffs(paths: &Paths) -> CheckResult {
    const NAME: &str = "bpffs";
    let point = &paths.bpffs_mount;
    let fix = format!(
        "`mount -t bpf bpf {0}` (to keep it: `bpf {0} bpf defaults 0 0` in /etc/fstab)",
        point.display()
    );
    let why = "the agent pins its maps there so paused tasks survive an agent restart";
    match read_mounts(paths) {
        Err(detail) => CheckResult::fail(NAME, detail, "mount /proc"),
        Ok(mounts) => match mounted_at(&mounts, point) {
            Some(m) if m.fs_type == "bpf" => {
                CheckResult::ok(NAME, format!("bpffs mounted at {}", point.display()))
            }
            Some(m) => CheckResult::fail(
                NAME,
                format!("{} is {}, not bpffs; {why}", point.display(), m.fs_type),
                fix,
            ),
            None => CheckResult::fail(
                NAME,
                format!("bpffs is not mounted at {}; {why}", point.display()),
                fix,
            ),
        },
    }
}

// ---------------------------------------------------------------------------
// 6. capabilities

/// The `CapEff` mask in `/proc/<pid>/status`.
#[must_use]
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let hex = line.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok()
    })
}

/// Check 6: the effective capabilities suffice to load BPF LSM programs and
/// to signal paused tasks.
#[must_use]
pub fn capabilities(paths: &Paths) -> CheckResult {
    const NAME: &str = "capabilities";
    let fix = "run as root, or give the agent's systemd unit `AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_KILL` (CAP_SYS_ADMIN instead of CAP_BPF CAP_PERFMON before Linux 5.8)";
    let status = match fs::read_to_string(&paths.status) {
        Ok(status) => status,
        Err(err) => return CheckResult::fail(NAME, io_detail(&paths.status, &err), fix),
    };
    let Some(eff) = parse_cap_eff(&status) else {
        return CheckResult::fail(
            NAME,
            format!("no CapEff line in {}", paths.status.display()),
            fix,
        );
    };
    let has = |cap: u32| eff & (1 << cap) != 0;
    let named = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_KILL, "CAP_KILL"),
    ];
    let list = |want: bool| {
        named
            .iter()
            .filter(|(cap, _)| has(*cap) == want)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let load = (has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN);
    let kill = has(CAP_KILL);
    let (held, missing) = (list(true), list(false));
    let held = if held.is_empty() { "none" } else { &held };
    if load && kill {
        return CheckResult::ok(NAME, format!("effective: {held} (CapEff {eff:016x})"));
    }
    let mut lacks = Vec::new();
    if !load {
        lacks.push("CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) to load BPF LSM programs");
    }
    if !kill {
        lacks.push("CAP_KILL to stop and resume paused tasks");
    }
    CheckResult::fail(
        NAME,
        format!(
            "missing {}; effective: {held}, not: {missing} (CapEff {eff:016x})",
            lacks.join(" and ")
        ),
        fix,
    )
}

// ---------------------------------------------------------------------------
// 7. lockdown

/// The selected mode in `/sys/kernel/security/lockdown`
/// (`none [integrity] confidentiality` -> `integrity`).
#[must_use]
pub fn parse_lockdown(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'))
}

/// Check 7 (informational): the kernel lockdown mode. `confidentiality`
/// refuses the BPF helpers that read kernel memory.
#[must_use]
pub fn lockdown(paths: &Paths) -> CheckResult {
    const NAME: &str = "lockdown";
    let path = &paths.lockdown;
    match fs::read_to_string(path) {
        Ok(text) => match parse_lockdown(&text) {
            Some("none") => CheckResult::ok(NAME, "none"),
            Some("integrity") => CheckResult::ok(
                NAME,
                "integrity (BPF LSM programs load; only bpf_probe_write_user is refused)",
            ),
            Some("confidentiality") => CheckResult::warn(
                NAME,
                "confidentiality: BPF helpers that read kernel memory (bpf_probe_read_kernel, ...) are refused, so programs that use them fail to load",
            )
            .with_fix("boot with `lockdown=integrity` if your Secure Boot policy allows it"),
            Some(other) => CheckResult::warn(NAME, format!("unknown mode `{other}`")),
            None => CheckResult::warn(
                NAME,
                format!("cannot parse {}: `{}`", path.display(), text.trim()),
            ),
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let mounted = read_mounts(paths).is_ok_and(|mounts| {
                mounted_at(&mounts, &paths.securityfs).is_some_and(|m| m.fs_type == "securityfs")
            });
            if mounted {
                CheckResult::ok(NAME, "none (the lockdown LSM is not built in)")
            } else {
                CheckResult::warn(
                    NAME,
                    format!(
                        "unknown: securityfs is not mounted at {}",
                        paths.securityfs.display()
                    ),
                )
                .with_fix(format!(
                    "`mount -t securityfs securityfs {}`, then run the check again",
                    paths.securityfs.display()
                ))
            }
        }
        Err(err) => CheckResult::warn(NAME, io_detail(path, &err)).with_fix("run the check as root"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tempfile::TempDir;

    use super::*;
    use crate::preflight::Status;

    /// A `Paths` whose files live in a temporary folder (none exists yet);
    /// mount points keep their real names, as mountinfo lines name them.
    fn fixture() -> (TempDir, Paths) {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |name: &str| dir.path().join(name);
        let paths = Paths {
            osrelease: p("osrelease"),
            btf_vmlinux: p("vmlinux"),
            securityfs: "/sys/kernel/security".into(),
            lsm: p("lsm"),
            lockdown: p("lockdown"),
            cmdline: p("cmdline"),
            boot_dir: p("boot"),
            proc_config: p("config.gz"),
            mountinfo: p("mountinfo"),
            status: p("status"),
            cgroup_mount: "/sys/fs/cgroup".into(),
            bpffs_mount: "/sys/fs/bpf".into(),
        };
        (dir, paths)
    }

    fn write(path: &Path, contents: &str) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create dir");
        }
        fs::write(path, contents).expect("write fixture");
    }

    const PROC: &str = "22 27 0:21 / /proc rw,relatime shared:12 - proc proc rw\n";
    const CGROUP2: &str = "31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
    const BPFFS: &str = "33 23 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:11 - bpf bpf rw,mode=700\n";
    const SECURITYFS: &str = "29 23 0:7 / /sys/kernel/security rw,nosuid,nodev,noexec,relatime shared:8 - securityfs securityfs rw\n";
    /// This build machine's layout: cgroup v1 under a tmpfs, cgroup2 beside it.
    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_kernel_release("6.12"), Some((6, 12)));
        assert_eq!(parse_kernel_release("linux"), None);
        assert_eq!(parse_kernel_release("6"), None);
    }

    #[test]
    fn kernel_version_passes_from_5_15() {
        let (_dir, paths) = fixture();
        write(&paths.osrelease, "6.12.57+deb12-cloud-amd64\n");
        let result = kernel_version(&paths);
        assert_eq!(result.status, Status::Ok);
        assert_eq!(result.detail, "6.12.57+deb12-cloud-amd64 (>= 5.15)");
        write(&paths.osrelease, "5.15.0-91-generic\n");
        assert_eq!(kernel_version(&paths).status, Status::Ok);
    }

    #[test]
    fn kernel_version_fails_before_5_15() {
        let (_dir, paths) = fixture();
        write(&paths.osrelease, "5.10.0-28-amd64\n");
        let result = kernel_version(&paths);
        assert_eq!(result.status, Status::Fail);
        assert!(
            result.detail.contains("5.10.0-28-amd64 is older than 5.15"),
            "{result:?}"
        );
        assert!(result.fix.is_some_and(|f| f.contains(">= 5.15")));
    }

    #[test]
    fn kernel_version_fails_when_unreadable_or_garbled() {
        let (_dir, paths) = fixture();
        let missing = kernel_version(&paths);
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.detail.starts_with("cannot read "), "{missing:?}");
        write(&paths.osrelease, "unknown\n");
        let garbled = kernel_version(&paths);
        assert_eq!(garbled.status, Status::Fail);
        assert!(
            garbled
                .detail
                .contains("cannot parse the kernel release `unknown`")
        );
    }

    #[test]
    fn btf_passes_when_present_and_fails_naming_the_config_option() {
        let (_dir, paths) = fixture();
        let missing = btf(&paths);
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.detail.contains("CONFIG_DEBUG_INFO_BTF"),
            "{missing:?}"
        );
        assert!(
            missing
                .fix
                .is_some_and(|f| f.contains("CONFIG_DEBUG_INFO_BTF=y"))
        );
        write(&paths.btf_vmlinux, "btf");
        assert_eq!(btf(&paths).status, Status::Ok);
    }

    #[test]
    fn builds_the_lsm_boot_option_from_the_current_list() {
        assert_eq!(
            lsm_boot_option("lockdown,capability,landlock,yama,apparmor"),
            "lsm=lockdown,capability,landlock,yama,apparmor,bpf"
        );
        assert_eq!(
            lsm_boot_option("capability, selinux\n"),
            "lsm=capability,selinux,bpf"
        );
        assert_eq!(lsm_boot_option(""), "lsm=bpf");
    }

    #[test]
    fn finds_the_last_lsm_option_before_init_arguments() {
        let cmdline =
            "BOOT_IMAGE=/vmlinuz root=/dev/vda1 lsm=yama lsm=landlock,bpf quiet -- lsm=init";
        assert_eq!(cmdline_lsm(cmdline), Some("landlock,bpf"));
        assert_eq!(cmdline_lsm("console=ttyS0 quiet"), None);
    }

    #[test]
    fn bpf_lsm_passes_when_active() {
        let (_dir, paths) = fixture();
        write(&paths.lsm, "lockdown,capability,landlock,yama,apparmor,bpf");
        let result = bpf_lsm(&paths, None);
        assert_eq!(result.status, Status::Ok);
        assert!(
            result
                .detail
                .contains("lockdown,capability,landlock,yama,apparmor,bpf")
        );
    }

    #[test]
    fn bpf_lsm_fails_with_the_exact_boot_option_when_inactive() {
        let (_dir, paths) = fixture();
        write(&paths.lsm, "lockdown,capability,landlock,yama,apparmor");
        let result = bpf_lsm(&paths, None);
        assert_eq!(result.status, Status::Fail);
        assert!(
            result.detail.contains("bpf is not among the active LSMs"),
            "{result:?}"
        );
        let fix = result.fix.expect("a fix");
        assert!(
            fix.starts_with("add `lsm=lockdown,capability,landlock,yama,apparmor,bpf` to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub"),
            "{fix}"
        );
        assert!(fix.contains("reboot"), "{fix}");
    }

    #[test]
    fn bpf_lsm_fix_says_when_the_kernel_lacks_config_bpf_lsm() {
        let (_dir, paths) = fixture();
        write(&paths.lsm, "capability,selinux");
        let config = KernelConfig::from_text("/boot/config-x", "# CONFIG_BPF_LSM is not set\n");
        let fix = bpf_lsm(&paths, Some(&config)).fix.expect("a fix");
        assert!(
            fix.starts_with("this kernel is built without CONFIG_BPF_LSM (/boot/config-x)"),
            "{fix}"
        );
        assert!(fix.contains("`lsm=capability,selinux,bpf`"), "{fix}");
    }

    #[test]
    fn bpf_lsm_without_securityfs_falls_back_to_the_command_line() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, PROC);
        write(
            &paths.cmdline,
            "root=/dev/vda1 lsm=landlock,lockdown,yama,bpf quiet\n",
        );
        let config = KernelConfig::from_text("/boot/config-x", "CONFIG_LSM=\"yama\"\n");
        let result = bpf_lsm(&paths, Some(&config));
        assert_eq!(result.status, Status::Warn, "{result:?}");
        assert!(
            result
                .detail
                .starts_with("securityfs is not mounted at /sys/kernel/security")
        );
        assert!(
            result
                .detail
                .contains("fallback: lsm= on the kernel command line"),
            "{result:?}"
        );
        assert!(result.detail.contains("not confirmed as active"));
        assert_eq!(
            result.fix.as_deref(),
            Some("`mount -t securityfs securityfs /sys/kernel/security`, then run the check again")
        );
    }

    #[test]
    fn bpf_lsm_without_securityfs_fails_when_the_config_lacks_bpf() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, PROC);
        write(&paths.cmdline, "root=/dev/vda1 quiet\n");
        let config = KernelConfig::from_text(
            "/boot/config-6.1.0-18-amd64",
            "CONFIG_BPF_LSM=y\nCONFIG_LSM=\"landlock,lockdown,yama,apparmor\"\n",
        );
        let result = bpf_lsm(&paths, Some(&config));
        assert_eq!(result.status, Status::Fail);
        assert!(
            result
                .detail
                .contains("fallback: CONFIG_LSM in /boot/config-6.1.0-18-amd64 does not list bpf"),
            "{result:?}"
        );
        assert!(
            result
                .fix
                .is_some_and(|f| f.contains("`lsm=landlock,lockdown,yama,apparmor,bpf`"))
        );
    }

    #[test]
    fn bpf_lsm_warns_when_nothing_tells() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, PROC);
        let result = bpf_lsm(&paths, None);
        assert_eq!(result.status, Status::Warn);
        assert!(result.detail.contains("no fallback either"), "{result:?}");
    }

    #[test]
    fn reads_the_kernel_config_from_boot_then_proc() {
        let (_dir, paths) = fixture();
        write(&paths.osrelease, "6.1.0-18-amd64\n");
        assert!(KernelConfig::read(&paths).is_none());

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"CONFIG_BPF_LSM=y\nCONFIG_LSM=\"landlock,bpf\"\n")
            .expect("compress");
        fs::write(&paths.proc_config, gz.finish().expect("compress")).expect("write");
        let config = KernelConfig::read(&paths).expect("config.gz");
        assert_eq!(config.source, paths.proc_config);
        assert_eq!(config.get("CONFIG_LSM"), Some("landlock,bpf"));
        assert_eq!(config.get("CONFIG_BPF"), None);

        let boot = paths.boot_dir.join("config-6.1.0-18-amd64");
        write(&boot, "# CONFIG_BPF_LSM is not set\nCONFIG_LSM=\"yama\"\n");
        let config = KernelConfig::read(&paths).expect("boot config");
        assert_eq!(config.source, boot);
        assert_eq!(config.get("CONFIG_BPF_LSM"), None);
        assert_eq!(config.get("CONFIG_LSM"), Some("yama"));
    }

    #[test]
    fn parses_mountinfo_with_escapes_and_stacking() {
        let text = format!(
            "{PROC}{HYBRID}50 27 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\nbroken line\n{CGROUP2}"
        );
        let mounts = parse_mountinfo(&text);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[4].mount_point, Path::new("/mnt/with space"));
        // The cgroup2 mounted last over the tmpfs is what /sys/fs/cgroup shows.
        let top = mounted_at(&mounts, Path::new("/sys/fs/cgroup")).expect("mounted");
        assert_eq!(top.fs_type, "cgroup2");
        assert!(mounted_at(&mounts, Path::new("/sys/fs/bpf")).is_none());
    }

    #[test]
    fn cgroup2_passes_on_the_unified_hierarchy() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, &format!("{PROC}{CGROUP2}"));
        let result = cgroup2(&paths);
        assert_eq!(result.status, Status::Ok);
        assert_eq!(result.detail, "cgroup2 mounted at /sys/fs/cgroup");
    }

    #[test]
    fn cgroup2_fails_on_a_hybrid_layout() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, &format!("{PROC}{HYBRID}"));
        let result = cgroup2(&paths);
        assert_eq!(result.status, Status::Fail);
        assert!(
            result
                .detail
                .starts_with("/sys/fs/cgroup is tmpfs, not cgroup2"),
            "{result:?}"
        );
        assert!(
            result
                .detail
                .contains("cgroup2 only at /sys/fs/cgroup/unified")
        );
        let fix = result.fix.expect("a fix");
        assert!(fix.contains("systemd.unified_cgroup_hierarchy=1"), "{fix}");
        assert!(
            fix.contains("mount -t cgroup2 cgroup2 /sys/fs/cgroup"),
            "{fix}"
        );
    }

    #[test]
    fn cgroup2_fails_when_nothing_is_mounted() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, PROC);
        let result = cgroup2(&paths);
        assert_eq!(result.status, Status::Fail);
        assert_eq!(result.detail, "nothing is mounted at /sys/fs/cgroup");
    }

    #[test]
    fn bpffs_passes_when_mounted_and_fails_otherwise() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, &format!("{PROC}{BPFFS}"));
        assert_eq!(bpffs(&paths).status, Status::Ok);

        write(&paths.mountinfo, PROC);
        let missing = bpffs(&paths);
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing
                .detail
                .starts_with("bpffs is not mounted at /sys/fs/bpf")
        );
        assert!(
            missing
                .fix
                .is_some_and(|f| f.starts_with("`mount -t bpf bpf /sys/fs/bpf`"))
        );

        write(
            &paths.mountinfo,
            "33 23 0:30 / /sys/fs/bpf rw - tmpfs tmpfs rw\n",
        );
        let wrong = bpffs(&paths);
        assert_eq!(wrong.status, Status::Fail);
        assert!(wrong.detail.starts_with("/sys/fs/bpf is tmpfs, not bpffs"));
    }

    fn status_with(cap_eff: u64) -> String {
        format!(
            "Name:\tgatekeep-agent\nCapInh:\t0000000000000000\nCapPrm:\t{cap_eff:016x}\nCapEff:\t{cap_eff:016x}\n"
        )
    }

    #[test]
    fn parses_cap_eff() {
        assert_eq!(
            parse_cap_eff(&status_with(0x1ff_feff_ffff)),
            Some(0x1ff_feff_ffff)
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn capabilities_pass_for_root_and_for_the_minimal_set() {
        let (_dir, paths) = fixture();
        write(&paths.status, &status_with(0x1ff_feff_ffff));
        let root = capabilities(&paths);
        assert_eq!(root.status, Status::Ok);
        assert!(
            root.detail
                .starts_with("effective: CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_KILL")
        );

        let minimal = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_KILL);
        write(&paths.status, &status_with(minimal));
        assert_eq!(capabilities(&paths).status, Status::Ok);

        let old_style = (1 << CAP_SYS_ADMIN) | (1 << CAP_KILL);
        write(&paths.status, &status_with(old_style));
        assert_eq!(capabilities(&paths).status, Status::Ok);
    }

    #[test]
    fn capabilities_fail_naming_what_is_missing() {
        let (_dir, paths) = fixture();
        write(&paths.status, &status_with(1 << CAP_BPF));
        let result = capabilities(&paths);
        assert_eq!(result.status, Status::Fail);
        assert!(
            result.detail.starts_with("missing CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) to load BPF LSM programs and CAP_KILL"),
            "{result:?}"
        );
        assert!(
            result
                .detail
                .contains("effective: CAP_BPF, not: CAP_PERFMON, CAP_SYS_ADMIN, CAP_KILL")
        );
        assert!(
            result
                .fix
                .is_some_and(|f| f.contains("AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_KILL"))
        );

        write(&paths.status, &status_with(1 << CAP_SYS_ADMIN));
        let no_kill = capabilities(&paths);
        assert_eq!(no_kill.status, Status::Fail);
        assert!(
            no_kill.detail.starts_with("missing CAP_KILL"),
            "{no_kill:?}"
        );

        write(&paths.status, &status_with(0));
        assert!(capabilities(&paths).detail.contains("effective: none"));
    }

    #[test]
    fn lockdown_modes() {
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n"),
            Some("integrity")
        );
        assert_eq!(
            parse_lockdown("[none] integrity confidentiality"),
            Some("none")
        );
        assert_eq!(parse_lockdown(""), None);

        let (_dir, paths) = fixture();
        write(&paths.lockdown, "[none] integrity confidentiality\n");
        assert_eq!(lockdown(&paths), CheckResult::ok("lockdown", "none"));
        write(&paths.lockdown, "none [integrity] confidentiality\n");
        assert_eq!(lockdown(&paths).status, Status::Ok);
        write(&paths.lockdown, "none integrity [confidentiality]\n");
        let strict = lockdown(&paths);
        assert_eq!(strict.status, Status::Warn);
        assert!(strict.fix.is_some_and(|f| f.contains("lockdown=integrity")));
    }

    #[test]
    fn lockdown_without_its_file() {
        let (_dir, paths) = fixture();
        write(&paths.mountinfo, PROC);
        let unknown = lockdown(&paths);
        assert_eq!(unknown.status, Status::Warn);
        assert_eq!(
            unknown.detail,
            "unknown: securityfs is not mounted at /sys/kernel/security"
        );

        write(&paths.mountinfo, &format!("{PROC}{SECURITYFS}"));
        let not_built = lockdown(&paths);
        assert_eq!(not_built.status, Status::Ok);
        assert!(not_built.detail.contains("not built in"));
    }
}
