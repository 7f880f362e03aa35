//! The path a reviewer is shown for a paused exec: the host's path of the file that runs,
//! not the name the workload passed to `execve`.
//!
//! The name is the workload's text, read in the workload's mount namespace. A workload in a
//! private mount namespace can bind-mount any file over an innocent path and exec that path:
//! the name then says `/tmp/innocent/echo` while another file runs, and a reviewer looking
//! at `/tmp/innocent/echo` on the host sees the innocent file. The kernel matched the file
//! itself: its device and inode are in the exec event. So the agent:
//!
//! 1. resolves the name in the task's own view: made absolute against its cwd, every
//!    symbolic link followed through `/proc/<tid>/root` ([`resolve_in_root`]);
//! 2. finds the mount that holds that path in the task's mount table
//!    (`/proc/<tid>/mountinfo`: the longest mount point that is a prefix, the last one
//!    mounted there on top), which gives the file's filesystem (major:minor) and its path
//!    within that filesystem (the mount's root + the rest of the path);
//! 3. finds where the host reaches that filesystem path: the agent's own mount table
//!    (`/proc/self/mountinfo`), mounts of the same device whose root holds it
//!    ([`host_candidates`]);
//! 4. keeps the first candidate whose `lstat` is the kernel's (device, inode): that is what
//!    a reviewer on the host opens. If none is, the request says the path is unverified and
//!    names the file by device and inode; it never shows the workload's name as if it were
//!    the file.
//!
//! The task is stopped inside its exec while this runs, so its namespaces, mounts, root and
//! cwd cannot change meanwhile (a sibling thread is stopped with it). Every step that fails
//! (the task is gone, a file is unreadable) ends in "unverified", never in an error, and so
//! does a walk that does not end in time: it runs on a thread of its own ([`within`]), so a
//! filesystem of the workload's that never answers cannot stall the agent.
//!
//! The mount namespace is compared with the agent's (`/proc/<tid>/ns/mnt`, e.g.
//! `mnt:[4026532301]`): a different one is noted in the request.

use std::{
    ffi::OsStr,
    fs,
    os::unix::{
        ffi::{OsStrExt as _, OsStringExt as _},
        fs::MetadataExt as _,
    },
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

/// Most symbolic links followed while resolving a name (the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// One line of a `mountinfo` file: the fields the path mapping needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem's device, in the kernel's encoding (`major << 20 | minor`), as the
    /// exec event carries it.
    pub dev: u64,
    /// The directory (or file) of the filesystem mounted here (`/` for a whole filesystem;
    /// the source's path within its filesystem for a bind mount).
    pub root: PathBuf,
    /// Where it is mounted, relative to the reading process's root.
    pub mount_point: PathBuf,
}

/// The mounts of a `mountinfo` text (`proc(5)`: `id parent major:minor root mount-point
/// options [optional fields] - type source super-options`), in its order (a later mount on
/// the same mount point is on top). Lines that do not parse are skipped.
#[must_use]
pub fn parse_mountinfo(text: &[u8]) -> Vec<Mount> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|b| *b == b' ').filter(|f| !f.is_empty());
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let dev = fields.next()?;
    let root = fields.next()?;
    let mount_point = fields.next()?;
    let dev = std::str::from_utf8(dev).ok()?;
    let (major, minor) = dev.split_once(':')?;
    let major: u64 = major.parse().ok()?;
    let minor: u64 = minor.parse().ok()?;
    let root = PathBuf::from(std::ffi::OsString::from_vec(unescape(root)));
    let mount_point = PathBuf::from(std::ffi::OsString::from_vec(unescape(mount_point)));
    if !root.is_absolute() || !mount_point.is_absolute() {
        return None;
    }
    Some(Mount {
        dev: (major << 20) | minor,
        root,
        mount_point,
    })
}

/// Undoes the kernel's escaping of a path in `mountinfo` (`mangle()`: space, tab, newline
/// and backslash as `\ooo` octal); any other backslash is kept as it is.
#[must_use]
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits
                .iter()
                .fold(0_u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// `path` below `base` (`None` when it is not at or below it, component by component).
fn below<'a>(path: &'a Path, base: &Path) -> Option<&'a Path> {
    path.strip_prefix(base).ok()
}

/// `base` joined with `rest` (`rest` relative; an empty `rest` is `base` itself).
fn join(base: &Path, rest: &Path) -> PathBuf {
    if rest.as_os_str().is_empty() {
        base.to_owned()
    } else {
        base.join(rest)
    }
}

/// The filesystem (device) and the path within it of the absolute, resolved `path`, by the
/// mount table `mounts` of the process whose view `path` is in: the mount whose mount point
/// is the longest prefix of `path` (of those on the same mount point, the last: it is on
/// top).
#[must_use]
pub fn within_filesystem(mounts: &[Mount], path: &Path) -> Option<(u64, PathBuf)> {
    let mut best: Option<(&Mount, &Path)> = None;
    for mount in mounts {
        if let Some(rest) = below(path, &mount.mount_point) {
            let longer = best.is_none_or(|(chosen, _)| {
                mount.mount_point.components().count() >= chosen.mount_point.components().count()
            });
            if longer {
                best = Some((mount, rest));
            }
        }
    }
    best.map(|(mount, rest)| (mount.dev, join(&mount.root, rest)))
}

/// The paths at which `mounts` (the host's table) reach `fs_path` of filesystem `dev`: one
/// per mount of `dev` whose root holds `fs_path`, in table order. Each must still be checked
/// (another mount may cover it).
#[must_use]
pub fn host_candidates(mounts: &[Mount], dev: u64, fs_path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for mount in mounts.iter().filter(|m| m.dev == dev) {
        if let Some(rest) = below(fs_path, &mount.root) {
            let candidate = join(&mount.mount_point, rest);
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

/// The host paths that may be the file the task sees at `task_path` (absolute, resolved in
/// its view), given its mount table and the host's; `task_path` itself first when the host
/// reaches the file there too (same namespace, nothing mounted over it).
#[must_use]
pub fn candidates(task: &[Mount], host: &[Mount], task_path: &Path) -> Vec<PathBuf> {
    let Some((dev, fs_path)) = within_filesystem(task, task_path) else {
        return Vec::new();
    };
    let mut out = host_candidates(host, dev, &fs_path);
    if let Some(at) = out.iter().position(|p| p == task_path) {
        let same = out.remove(at);
        out.insert(0, same);
    }
    out
}

/// `path` (absolute) with `.` and `..` taken lexically (`..` of `/` is `/`).
#[must_use]
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// `path` (absolute, in the view of a process whose root directory is reached at `root`,
/// e.g. `/proc/<tid>/root`) with every symbolic link followed in that view: absolute link
/// targets start again at that process's root, not the agent's. `None` when a component
/// cannot be read or there are more than [`MAX_LINKS`] links. The last component may be
/// missing (the name is kept as it is).
#[must_use]
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut done = PathBuf::from("/");
    // Components still to walk, last first.
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    push_components(&mut todo, path);
    let mut links = 0;
    while let Some(name) = todo.pop() {
        match name.as_bytes() {
            b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let next = done.join(&name);
        let inside = root.join(next.strip_prefix("/").unwrap_or(&next));
        match fs::symlink_metadata(&inside) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                let target = fs::read_link(&inside).ok()?;
                if target.is_absolute() {
                    done = PathBuf::from("/");
                }
                push_components(&mut todo, &target);
            }
            Ok(_) => done = next,
            Err(_) if todo.is_empty() => return Some(next),
            Err(_) => return None,
        }
    }
    Some(done)
}

/// Pushes the components of `path` onto `todo` so the first is popped first.
fn push_components(todo: &mut Vec<std::ffi::OsString>, path: &Path) {
    let names: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            Component::ParentDir => Some(OsStr::new("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(names.into_iter().rev().map(ToOwned::to_owned));
}

/// What a reviewer is shown of a paused exec's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExePath {
    /// The host's path of the file that runs when [`Self::verified`]; otherwise the name,
    /// resolved in the task's view.
    pub path: PathBuf,
    /// Whether the host's file at [`Self::path`] is the one the kernel matched (device and
    /// inode).
    pub verified: bool,
    /// The name the workload passed, made absolute against its cwd.
    pub named: PathBuf,
    /// The task's mount namespace (`mnt:[4026532301]`) when it is not the agent's.
    pub mount_namespace: Option<String>,
}

/// Where to look: the proc tree (usually `/proc`), and the agent's own entry in it
/// (`/proc/self`; tests give a fake one).
#[derive(Debug, Clone)]
pub struct Views {
    pub proc_root: PathBuf,
    pub own: PathBuf,
}

impl Views {
    /// The views of `/proc`, the agent itself being `/proc/self`.
    #[must_use]
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_owned(),
            own: proc_root.join("self"),
        }
    }

    /// What a reviewer is shown for the exec of `named` (as passed, made absolute against the
    /// cwd) by task `tid`, whose file the kernel matched as (`dev`, `ino`).
    #[must_use]
    pub fn exe_path(&self, tid: u32, named: &Path, dev: u64, ino: u64) -> ExePath {
        let task = self.proc_root.join(tid.to_string());
        let namespace = |dir: &Path| {
            fs::read_link(dir.join("ns/mnt"))
                .ok()
                .map(|link| link.to_string_lossy().into_owned())
        };
        let theirs = namespace(&task);
        let mount_namespace = match (&theirs, namespace(&self.own)) {
            (Some(theirs), Some(ours)) if *theirs == ours => None,
            // Unreadable on either side: noted as unknown rather than passed as the same.
            (theirs, _) => Some(theirs.clone().unwrap_or_else(|| "unknown".to_owned())),
        };
        let named = normalize(named);
        let fallback = ExePath {
            path: named.clone(),
            verified: false,
            named: named.clone(),
            mount_namespace: mount_namespace.clone(),
        };
        let (own, same) = (self.own.clone(), mount_namespace.is_none());
        within(&RUNNING, RESOLVE_WITHIN, move || {
            let (path, verified) = locate(&task, &own, same, &named, (dev, ino));
            ExePath {
                path,
                verified,
                named,
                mount_namespace,
            }
        })
        .unwrap_or(fallback)
    }
}

/// How long the agent waits for a path to be resolved and checked. The walk reads the
/// workload's filesystems (`lstat` through `/proc/<tid>/root`): one that never answers (a
/// FUSE server the workload runs) must not stall the agent, so the work runs on its own
/// thread and, past this, the request shows the name unverified.
const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// Most resolutions running at once (the controller runs one at a time; the rest are stuck
/// on a filesystem that does not answer): past it, a request shows the name unverified at
/// once, so stuck threads stay bounded.
const MAX_RUNNING: usize = 8;

/// Resolutions running now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// `work`'s result if it ends within `limit`, run on a thread of its own; `None` when it
/// does not, or when `running` (counting such threads) already holds [`MAX_RUNNING`].
pub(crate) fn within<T: Send + 'static>(
    running: &'static AtomicUsize,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if running.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
        running.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("exe-path".to_owned())
        .spawn(move || {
            let out = work();
            running.fetch_sub(1, Ordering::SeqCst);
            let _ = done.send(out);
        });
    if spawned.is_err() {
        running.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    result.recv_timeout(limit).ok()
}

/// The path to show for the file (`dev`, `ino`) that task dir `task` named `named`, and
/// whether it is verified: the host's path of that file when one is found, else the name
/// resolved in the task's view. `own` is the agent's proc dir; `same` says the task shares
/// the agent's mount namespace.
fn locate(task: &Path, own: &Path, same: bool, named: &Path, file: (u64, u64)) -> (PathBuf, bool) {
    let (dev, ino) = file;
    let resolved = resolve_in_root(&task.join("root"), named).unwrap_or_else(|| named.to_owned());
    let is_the_file = |candidate: &Path| {
        fs::symlink_metadata(candidate)
            .is_ok_and(|meta| meta.is_file() && kernel_dev(meta.dev()) == dev && meta.ino() == ino)
    };
    // The common case first, without reading mount tables: the same namespace, and the
    // host's file at the resolved name is the one that runs.
    if same && is_the_file(&resolved) {
        return (resolved, true);
    }
    let read = |dir: &Path| fs::read(dir.join("mountinfo")).map(|t| parse_mountinfo(&t));
    let found = match (read(task), read(own)) {
        (Ok(theirs), Ok(ours)) => candidates(&theirs, &ours, &resolved)
            .into_iter()
            .find(|candidate| is_the_file(candidate)),
        _ => None,
    };
    match found {
        Some(path) => (path, true),
        None => (resolved, false),
    }
}

/// The kernel's encoding of a `stat` device number (`MKDEV`: major << 20 | minor).
fn kernel_dev(st_dev: u64) -> u64 {
    (u64::from(libc::major(st_dev)) << 20) | u64::from(libc::minor(st_dev))
}

/// A file's identity as reviewers read it: `major:minor inode`.
#[must_use]
pub fn file_identity(dev: u64, ino: u64) -> String {
    format!("{}:{} {ino}", dev >> 20, dev & 0xf_ffff)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const TMPFS: u64 = 30; // 0:30
    const DISK: u64 = (8 << 20) | 1; // 8:1

    fn mount(dev: u64, root: &str, mount_point: &str) -> Mount {
        Mount {
            dev,
            root: root.into(),
            mount_point: mount_point.into(),
        }
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let text = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            30 22 0:30 / /tmp rw,nosuid shared:5 master:2 - tmpfs tmpfs rw\n\
            41 30 0:30 /x/evil /tmp/innocent/echo rw - tmpfs tmpfs rw\n\
            42 22 8:1 /srv/a\\040b /mnt/my\\040disk\\011tab\\134back rw - ext4 /dev/sda1 rw\n\
            garbage line\n\
            43 22 x:y / /bad rw - ext4 /dev/sdb rw\n\
            44 22 8:2 relative /rel rw - ext4 /dev/sdb rw\n\
            \n";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts,
            [
                mount(DISK, "/", "/"),
                mount(TMPFS, "/", "/tmp"),
                mount(TMPFS, "/x/evil", "/tmp/innocent/echo"),
                mount(DISK, "/srv/a b", "/mnt/my disk\ttab\\back"),
            ]
        );
    }

    #[test]
    fn unescaping_keeps_what_is_not_an_octal_escape() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\134040"), b"a\\040", "an escaped backslash");
        assert_eq!(unescape(b"end\\04"), b"end\\04", "too short");
        assert_eq!(unescape(b"x\\089"), b"x\\089", "not octal");
        assert_eq!(unescape(b"\\777"), b"\\777", "over a byte");
    }

    #[test]
    fn the_longest_mount_point_holds_a_path_and_the_top_mount_wins() {
        let mounts = [
            mount(DISK, "/", "/"),
            mount(TMPFS, "/", "/tmp"),
            mount(DISK, "/home/u/bin", "/tmp/tools"),
            // Mounted over /tmp/tools later: on top.
            mount(TMPFS, "/other", "/tmp/tools"),
        ];
        assert_eq!(
            within_filesystem(&mounts, Path::new("/usr/bin/env")),
            Some((DISK, "/usr/bin/env".into()))
        );
        assert_eq!(
            within_filesystem(&mounts, Path::new("/tmp/x")),
            Some((TMPFS, "/x".into()))
        );
        assert_eq!(
            within_filesystem(&mounts, Path::new("/tmp/tools/run")),
            Some((TMPFS, "/other/run".into()))
        );
        // Whole components only: /tmpfoo is on /, not /tmp.
        assert_eq!(
            within_filesystem(&mounts, Path::new("/tmpfoo")),
            Some((DISK, "/tmpfoo".into()))
        );
        assert_eq!(within_filesystem(&mounts[1..], Path::new("/usr")), None);
    }

    /// The host's table: the disk at `/`, a tmpfs at `/tmp`, the disk's `/srv` at a mount
    /// point with a space.
    fn host() -> Vec<Mount> {
        vec![
            mount(DISK, "/", "/"),
            mount(TMPFS, "/", "/tmp"),
            mount(DISK, "/srv", "/mnt/my disk"),
        ]
    }

    #[test]
    fn a_file_bind_mounted_over_a_name_maps_to_the_host_path_of_its_source() {
        // In the task's namespace: /tmp/x/evil bound over /tmp/innocent/echo.
        let mut task = host();
        task.push(mount(TMPFS, "/x/evil", "/tmp/innocent/echo"));
        assert_eq!(
            candidates(&task, &host(), Path::new("/tmp/innocent/echo")),
            [PathBuf::from("/tmp/x/evil")]
        );
        // A disk file bound over a tmpfs name.
        let mut task = host();
        task.push(mount(DISK, "/usr/bin/curl", "/tmp/innocent/echo"));
        assert_eq!(
            candidates(&task, &host(), Path::new("/tmp/innocent/echo")),
            [PathBuf::from("/usr/bin/curl")]
        );
    }

    #[test]
    fn a_directory_bind_mount_maps_the_rest_of_the_path() {
        let mut task = host();
        task.push(mount(DISK, "/home/u/bin", "/opt/tools"));
        assert_eq!(
            candidates(&task, &host(), Path::new("/opt/tools/sub/run")),
            [PathBuf::from("/home/u/bin/sub/run")]
        );
    }

    #[test]
    fn nested_mounts_and_several_host_paths_are_all_candidates_the_same_path_first() {
        // The task's /data is the disk's /srv (a bind), with a tmpfs on /data/cache.
        let mut task = host();
        task.push(mount(DISK, "/srv", "/data"));
        task.push(mount(TMPFS, "/c", "/data/cache"));
        // The host reaches the disk's /srv/x at /srv/x and at "/mnt/my disk/x".
        assert_eq!(
            candidates(&task, &host(), Path::new("/data/x")),
            [PathBuf::from("/srv/x"), PathBuf::from("/mnt/my disk/x")]
        );
        assert_eq!(
            candidates(&task, &host(), Path::new("/data/cache/y")),
            [PathBuf::from("/tmp/c/y")]
        );
        // The same namespace: the path itself comes first.
        assert_eq!(
            candidates(&host(), &host(), Path::new("/mnt/my disk/x")),
            [PathBuf::from("/mnt/my disk/x"), PathBuf::from("/srv/x")]
        );
    }

    #[test]
    fn a_file_the_host_does_not_reach_has_no_candidate() {
        // A tmpfs of the task's own (0:99), which the host never mounted.
        let mut task = host();
        task.push(mount(99, "/", "/tmp/innocent"));
        assert!(candidates(&task, &host(), Path::new("/tmp/innocent/echo")).is_empty());
        // The host mounts only another part of the disk.
        let host = [mount(DISK, "/srv", "/srv")];
        assert!(candidates(&[mount(DISK, "/", "/")], &host, Path::new("/usr/bin/x")).is_empty());
        // No mount holds the path at all.
        assert!(candidates(&[], &host, Path::new("/x")).is_empty());
    }

    #[test]
    fn dots_are_taken_lexically() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(normalize(Path::new("/../../x")), Path::new("/x"));
    }

    #[test]
    fn links_are_followed_in_the_tasks_root_not_the_agents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        fs::write(root.join("usr/bin/python3.11"), b"").expect("file");
        symlink("python3.11", root.join("usr/bin/python3")).expect("relative link");
        // Absolute: must be /usr/bin in the task's root, not the agent's.
        symlink("/usr/bin", root.join("bin")).expect("absolute link");
        symlink("../usr/./bin/python3", root.join("usr/py")).expect("dotted link");
        symlink("loop", root.join("loop")).expect("loop");
        assert_eq!(
            resolve_in_root(root, Path::new("/bin/python3")),
            Some("/usr/bin/python3.11".into())
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/usr/py")),
            Some("/usr/bin/python3.11".into())
        );
        // A missing last component keeps its name; a missing directory is unresolvable.
        assert_eq!(
            resolve_in_root(root, Path::new("/bin/missing")),
            Some("/usr/bin/missing".into())
        );
        assert_eq!(resolve_in_root(root, Path::new("/nodir/x")), None);
        assert_eq!(resolve_in_root(root, Path::new("/loop")), None);
    }

    /// A fake proc tree: the agent (`self`) in `mnt:[1]` with mount table `own`, task 77 in
    /// `ns` with mount table `theirs` and its root at `root`.
    fn fake_proc(dir: &Path, ns: &str, own: &str, theirs: &str, root: &Path) -> Views {
        let proc_root = dir.join("proc");
        for (entry, ns, table) in [("self", "mnt:[1]", own), ("77", ns, theirs)] {
            let at = proc_root.join(entry);
            fs::create_dir_all(at.join("ns")).expect("mkdir");
            symlink(ns, at.join("ns/mnt")).expect("ns link");
            fs::write(at.join("mountinfo"), table).expect("mountinfo");
        }
        symlink(root, proc_root.join("77/root")).expect("root link");
        Views::new(&proc_root)
    }

    fn identity(path: &Path) -> (u64, u64) {
        let meta = fs::metadata(path).expect("stat");
        (kernel_dev(meta.dev()), meta.ino())
    }

    /// `mountinfo` text of one mount.
    fn line(dev: u64, root: &Path, mount_point: &str) -> String {
        let escape = |p: &Path| p.to_str().expect("utf8").replace(' ', "\\040");
        format!(
            "1 1 {}:{} {} {} rw - fs fs rw\n",
            dev >> 20,
            dev & 0xf_ffff,
            escape(root),
            mount_point.replace(' ', "\\040")
        )
    }

    #[test]
    fn a_decoy_name_in_another_namespace_shows_the_file_that_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The file that runs, on the host (in a folder with a space).
        let real = dir.path().join("real dir/evil");
        fs::create_dir_all(real.parent().expect("parent")).expect("mkdir");
        fs::write(&real, b"evil").expect("evil");
        let (dev, ino) = identity(&real);
        // The task's root: /tmp/innocent/echo exists there (the bind mount's mount point).
        let task_root = dir.path().join("task-root");
        fs::create_dir_all(task_root.join("tmp/innocent")).expect("mkdir");
        fs::write(task_root.join("tmp/innocent/echo"), b"innocent").expect("decoy");
        let own = line(dev, Path::new("/"), "/");
        let theirs = own.clone() + &line(dev, &real, "/tmp/innocent/echo");
        let views = fake_proc(dir.path(), "mnt:[2]", &own, &theirs, &task_root);

        let seen = views.exe_path(77, Path::new("/tmp/./innocent/echo"), dev, ino);
        assert_eq!(
            seen,
            ExePath {
                path: real.clone(),
                verified: true,
                named: "/tmp/innocent/echo".into(),
                mount_namespace: Some("mnt:[2]".into()),
            }
        );

        // Another file than the kernel matched: nothing verifies; the name, marked so.
        let seen = views.exe_path(77, Path::new("/tmp/innocent/echo"), dev, ino + 1);
        assert_eq!(
            seen,
            ExePath {
                path: "/tmp/innocent/echo".into(),
                verified: false,
                named: "/tmp/innocent/echo".into(),
                mount_namespace: Some("mnt:[2]".into()),
            }
        );
    }

    #[test]
    fn the_same_namespace_shows_the_resolved_path_without_a_namespace_note() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("tool");
        fs::write(&real, b"tool").expect("tool");
        symlink("tool", dir.path().join("alias")).expect("alias");
        let (dev, ino) = identity(&real);
        // The task's root is the agent's.
        let views = fake_proc(dir.path(), "mnt:[1]", "", "", Path::new("/"));
        let alias = dir.path().join("alias");
        let seen = views.exe_path(77, &alias, dev, ino);
        assert_eq!(
            seen,
            ExePath {
                path: real,
                verified: true,
                named: alias.clone(),
                mount_namespace: None,
            }
        );
        // A file the host does not have at that path (no mount table helps): unverified.
        let seen = views.exe_path(77, &alias, dev, ino + 1);
        assert!(!seen.verified);
        // A task already gone: its namespace is unknown, which is noted.
        let seen = views.exe_path(78, &alias, dev, ino);
        assert_eq!(seen.mount_namespace.as_deref(), Some("unknown"));
    }

    #[test]
    fn a_resolution_that_does_not_end_gives_way_and_stuck_ones_stay_bounded() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        let quick = within(&RUNNING, Duration::from_hours(1), || 7);
        assert_eq!(quick, Some(7));
        // Resolutions that never end (a filesystem that does not answer): each gives way.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = std::sync::Arc::new(std::sync::Mutex::new(stuck));
        for _ in 0..MAX_RUNNING {
            let stuck = std::sync::Arc::clone(&stuck);
            let out = within(&RUNNING, Duration::from_millis(1), move || {
                let _ = stuck.lock().map(|rx| rx.recv());
                1
            });
            assert_eq!(out, None);
        }
        // With MAX_RUNNING stuck, nothing more is started, not even quick work.
        assert_eq!(within(&RUNNING, Duration::from_hours(1), || 2), None);
        assert_eq!(RUNNING.load(Ordering::SeqCst), MAX_RUNNING);
        // Once they end, work runs again.
        drop(release);
        let again = (0..10_000)
            .find_map(|_| {
                let out = within(&RUNNING, Duration::from_hours(1), || 3);
                if out.is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                out
            })
            .expect("the released resolutions end");
        assert_eq!(again, 3);
    }

    #[test]
    fn file_identities_read_as_major_minor_inode() {
        assert_eq!(file_identity(DISK, 1234), "8:1 1234");
        assert_eq!(file_identity((259 << 20) | 0x1_0001, 5), "259:65537 5");
    }
}
