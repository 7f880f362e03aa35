//! Context for reviewers and the audit, read from `/proc`: who is asking
//! (process ancestry), from where (cwd, cgroup path), as whom (user name).
//!
//! Everything takes the proc root and the passwd file as paths so unit
//! tests can build a fake tree. A process can exit at any moment, so every
//! field is optional and a missing file is not an error.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Most ancestors listed (a fork bomb must not make enrichment expensive).
const MAX_ANCESTORS: usize = 16;

/// How long a process's enrichment is reused for its kernel denials.
const REUSE_FOR: Duration = Duration::from_secs(1);

/// Most processes whose enrichment is kept for reuse.
const MAX_RECENT: usize = 1024;

/// One process of the ancestry chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    /// Command line, as the process shows it now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmdline: Vec<String>,
    /// cgroup v2 path, relative to the hierarchy root (`/system.slice/x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// What the agent adds to a request before it asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Enrichment {
    /// The asking process first, then its parent, and so on: up to pid 1, or
    /// up to and including the first ancestor outside the asking process's
    /// cgroup (whoever launched the workload).
    pub ancestry: Vec<ProcessInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// Reads process facts from a proc tree.
#[derive(Debug, Clone)]
pub struct Enricher {
    proc_root: PathBuf,
    users: Users,
}

impl Enricher {
    /// `proc_root` is usually `/proc`, `passwd` usually `/etc/passwd`.
    #[must_use]
    pub fn new(proc_root: impl Into<PathBuf>, passwd: &Path) -> Self {
        Self {
            proc_root: proc_root.into(),
            users: Users::load(passwd),
        }
    }

    #[must_use]
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Everything known about `pid` now.
    #[must_use]
    pub fn enrich(&self, pid: u32, uid: u32) -> Enrichment {
        let cgroup = self.cgroup(pid);
        let mut ancestry = Vec::new();
        let mut next = Some(pid);
        while let Some(current) = next {
            if ancestry.len() >= MAX_ANCESTORS {
                break;
            }
            let Some(stat) = self.stat(current) else {
                break;
            };
            let info = ProcessInfo {
                pid: current,
                comm: stat.comm,
                exe: fs::read_link(self.pid_dir(current).join("exe")).ok(),
                cmdline: self.cmdline(current),
                cgroup: self.cgroup(current),
            };
            let outside = current != pid && !within(info.cgroup.as_deref(), cgroup.as_deref());
            ancestry.push(info);
            if outside || current <= 1 || stat.ppid == 0 || stat.ppid == current {
                break;
            }
            next = Some(stat.ppid);
        }
        Enrichment {
            ancestry,
            cwd: self.cwd(pid),
            user: self.users.name(uid),
            cgroup,
        }
    }

    fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }

    /// The process's current directory.
    #[must_use]
    pub fn cwd(&self, pid: u32) -> Option<PathBuf> {
        fs::read_link(self.pid_dir(pid).join("cwd")).ok()
    }

    /// `filename` as passed to execve, made absolute against the process's
    /// cwd for display (the kernel matched the file itself, not this text).
    #[must_use]
    pub fn display_path(&self, pid: u32, filename: &Path) -> PathBuf {
        if filename.is_absolute() {
            return filename.to_owned();
        }
        match self.cwd(pid) {
            Some(cwd) => cwd.join(filename),
            None => filename.to_owned(),
        }
    }

    fn cmdline(&self, pid: u32) -> Vec<String> {
        fs::read(self.pid_dir(pid).join("cmdline"))
            .map(|bytes| {
                bytes
                    .split(|b| *b == 0)
                    .filter(|arg| !arg.is_empty())
                    .map(|arg| String::from_utf8_lossy(arg).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`).
    #[must_use]
    pub fn cgroup(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(self.pid_dir(pid).join("cgroup")).ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("0::"))
            .map(|path| path.trim().to_owned())
    }

    fn stat(&self, pid: u32) -> Option<Stat> {
        Stat::parse(&fs::read_to_string(self.pid_dir(pid).join("stat")).ok()?)
    }
}

/// Enrichments of processes the kernel denied lately, reused for their next denials.
///
/// A workload in a loop of denied connects would otherwise cost about fifteen `/proc` reads
/// per denial, and the agent has to record denials as fast as the kernel makes them or the
/// ring buffer drops some. Each reuse still reads `/proc/<pid>/stat`: an entry is reused only
/// while it shows the same process (start time), name and parent, so a reused pid, an exec
/// under another name or a reparenting reads everything again, and never for longer than
/// [`REUSE_FOR`], after which a command line or working directory changed in place shows
/// too. Requests that ask a reviewer always read everything afresh.
#[derive(Debug, Default)]
pub struct RecentEnrichments {
    entries: HashMap<(u32, u32), Recent>,
}

#[derive(Debug)]
struct Recent {
    read_at: Instant,
    identity: Stat,
    enrichment: Enrichment,
}

impl RecentEnrichments {
    /// What [`Enricher::enrich`] says of `pid` (as `uid`), or what it said less than
    /// [`REUSE_FOR`] ago if `pid` is still the same process.
    pub fn enrich(&mut self, enricher: &Enricher, pid: u32, uid: u32) -> Enrichment {
        self.enrich_at(enricher, pid, uid, Instant::now())
    }

    fn enrich_at(&mut self, enricher: &Enricher, pid: u32, uid: u32, now: Instant) -> Enrichment {
        let Some(identity) = enricher.stat(pid) else {
            // Gone already: nothing to reuse, nothing to keep.
            self.entries.remove(&(pid, uid));
            return enricher.enrich(pid, uid);
        };
        if let Some(recent) = self.entries.get(&(pid, uid))
            && now.saturating_duration_since(recent.read_at) < REUSE_FOR
            && same_process(&recent.identity, &identity)
        {
            return recent.enrichment.clone();
        }
        let enrichment = enricher.enrich(pid, uid);
        if self.entries.len() >= MAX_RECENT {
            self.entries
                .retain(|_, recent| now.saturating_duration_since(recent.read_at) < REUSE_FOR);
            if self.entries.len() >= MAX_RECENT {
                self.entries.clear();
            }
        }
        self.entries.insert(
            (pid, uid),
            Recent {
                read_at: now,
                identity,
                enrichment: enrichment.clone(),
            },
        );
        enrichment
    }
}

/// Whether two readings of `/proc/<pid>/stat` show the same process, by the same name, under
/// the same parent (the state may differ).
fn same_process(before: &Stat, now: &Stat) -> bool {
    before.start_time.is_some()
        && before.start_time == now.start_time
        && before.comm == now.comm
        && before.ppid == now.ppid
}

/// Whether cgroup `path` is `root` or below it.
fn within(path: Option<&str>, root: Option<&str>) -> bool {
    match (path, root) {
        (Some(path), Some(root)) => {
            let root = root.trim_end_matches('/');
            root.is_empty()
                || path == root
                || path
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        _ => false,
    }
}

/// The fields of `/proc/<pid>/stat` enrichment needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    /// One letter: `R`, `S`, `D`, `T` (stopped), `t` (tracing stop), `Z`...
    pub state: char,
    pub ppid: u32,
    /// Field 22, `starttime` (clock ticks after boot): with the pid, it names one process.
    /// `None` when the line stops short of it.
    pub start_time: Option<u64>,
}

impl Stat {
    /// Parses `pid (comm) state ppid ...`; comm may hold spaces and `)`, so
    /// it ends at the last `)`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_owned();
        let mut rest = text.get(close + 1..)?.split_whitespace();
        let state = rest.next()?.chars().next()?;
        let ppid = rest.next()?.parse().ok()?;
        // Fields 5 to 21 lie between ppid and starttime.
        let start_time = rest.nth(17).and_then(|field| field.parse().ok());
        Some(Self {
            comm,
            state,
            ppid,
            start_time,
        })
    }
}

/// How long a request's enrichment waits for the name service. A directory that does not
/// answer (LDAP down, or an SSSD or nscd that sits in a gated cgroup and is itself paused)
/// must not stop the agent deciding: past this, the request goes on without a user name.
const NSS_WAIT: Duration = Duration::from_millis(500);

/// How long an answer of the name service is reused.
const NSS_REMEMBER: Duration = Duration::from_mins(1);

/// uid -> user name: a passwd file read once, then the system's name
/// service (NSS: LDAP, SSSD, ... through `getpwuid_r`) for uids the file
/// does not name, so a workload owner known only to a directory still has a
/// name, and the no-self-approval check can see it.
#[derive(Debug, Clone, Default)]
pub struct Users {
    names: HashMap<u32, String>,
    /// Where uids missing from the file are asked; `None`: nowhere.
    nss: Option<Arc<NameService>>,
}

impl Users {
    /// Reads `path` (an unreadable file gives no names) and falls back to
    /// NSS.
    #[must_use]
    pub fn load(path: &Path) -> Self {
        let text = fs::read_to_string(path).unwrap_or_default();
        Self {
            nss: Some(Arc::new(NameService::new(system_name))),
            ..Self::parse(&text)
        }
    }

    /// The names of a passwd text alone (no NSS).
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut names = HashMap::new();
        for line in text.lines() {
            let mut fields = line.split(':');
            let (Some(name), Some(_password), Some(uid)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if let Ok(uid) = uid.parse() {
                // The first entry for a uid wins, like getpwuid.
                names.entry(uid).or_insert_with(|| name.to_owned());
            }
        }
        Self { names, nss: None }
    }

    #[must_use]
    pub fn name(&self, uid: u32) -> Option<String> {
        if let Some(name) = self.names.get(&uid) {
            return Some(name.clone());
        }
        self.nss.as_ref()?.name(uid)
    }
}

/// `getpwuid_r` through the system's name service switch.
fn system_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
}

/// The name service, asked on a thread of its own with a bounded wait, one lookup at a
/// time, its answers remembered for [`NSS_REMEMBER`].
#[derive(Debug)]
struct NameService {
    lookup: fn(u32) -> Option<String>,
    answers: Mutex<HashMap<u32, (Option<String>, Instant)>>,
    /// Set while a lookup runs. A lookup that never returns keeps it set, and later ones
    /// are not started (no pile of stuck threads) until it does.
    busy: Arc<AtomicBool>,
}

impl NameService {
    fn new(lookup: fn(u32) -> Option<String>) -> Self {
        Self {
            lookup,
            answers: Mutex::default(),
            busy: Arc::default(),
        }
    }

    fn name(&self, uid: u32) -> Option<String> {
        let remembered = self
            .answers
            .lock()
            .ok()
            .and_then(|answers| answers.get(&uid).cloned());
        if let Some((name, at)) = remembered
            && at.elapsed() < NSS_REMEMBER
        {
            return name;
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return None;
        }
        let (answer, answered) = mpsc::channel();
        let (busy, lookup) = (Arc::clone(&self.busy), self.lookup);
        let started = thread::Builder::new()
            .name("gatekeep-nss".to_owned())
            .spawn(move || {
                let name = lookup(uid);
                busy.store(false, Ordering::Release);
                let _ = answer.send(name);
            });
        if let Err(error) = started {
            self.busy.store(false, Ordering::Release);
            tracing::warn!(%error, "cannot ask the name service");
            return None;
        }
        let Ok(name) = answered.recv_timeout(NSS_WAIT) else {
            tracing::warn!(
                uid,
                wait_ms = NSS_WAIT.as_millis(),
                "the name service (NSS: LDAP, SSSD, nscd...) did not answer; the request goes \
                 on without a user name, and no other uid is asked until it does"
            );
            return None;
        };
        if let Ok(mut answers) = self.answers.lock() {
            if answers.len() >= MAX_RECENT {
                answers.clear();
            }
            answers.insert(uid, (name.clone(), Instant::now()));
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Writes a fake `/proc/<pid>` with stat, cgroup, cmdline, cwd and exe.
    fn fake_process(
        root: &Path,
        pid: u32,
        name: &str,
        parent: u32,
        cgroup: &str,
        cmdline: &[&str],
    ) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("stat"),
            format!("{pid} ({name}) S {parent} 1 1 0 -1"),
        )
        .expect("stat");
        fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).expect("cgroup");
        let mut bytes = Vec::new();
        for arg in cmdline {
            bytes.extend_from_slice(arg.as_bytes());
            bytes.push(0);
        }
        fs::write(dir.join("cmdline"), bytes).expect("cmdline");
        symlink(format!("/work/{name}"), dir.join("cwd")).expect("cwd");
        symlink(format!("/usr/bin/{name}"), dir.join("exe")).expect("exe");
    }

    #[test]
    fn ancestry_stops_after_the_first_process_outside_the_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        fake_process(&proc_root, 1, "init", 0, "/init.scope", &["/sbin/init"]);
        fake_process(
            &proc_root,
            50,
            "shim",
            1,
            "/system.slice/shim.service",
            &["shim"],
        );
        fake_process(
            &proc_root,
            60,
            "bash",
            50,
            "/agents/a1",
            &["bash", "-c", "x y"],
        );
        fake_process(
            &proc_root,
            70,
            "python (3)",
            60,
            "/agents/a1/worker",
            &["python3", "run.py"],
        );
        let passwd = dir.path().join("passwd");
        fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .expect("passwd");

        let enricher = Enricher::new(&proc_root, &passwd);
        let info = enricher.enrich(70, 1000);
        let pids: Vec<u32> = info.ancestry.iter().map(|p| p.pid).collect();
        // 70 asks from /agents/a1/worker; 60 is in /agents/a1, which is not
        // within /agents/a1/worker: it is the launcher, and the chain stops.
        assert_eq!(pids, [70, 60]);
        assert_eq!(info.ancestry[0].comm, "python (3)");
        assert_eq!(info.ancestry[0].cmdline, ["python3", "run.py"]);
        assert_eq!(
            info.ancestry[0].exe.as_deref(),
            Some(Path::new("/usr/bin/python (3)"))
        );
        assert_eq!(info.cwd.as_deref(), Some(Path::new("/work/python (3)")));
        assert_eq!(info.user.as_deref(), Some("alice"));
        assert_eq!(info.cgroup.as_deref(), Some("/agents/a1/worker"));

        // From 60 (cgroup /agents/a1) the chain goes to the shim, outside.
        let pids: Vec<u32> = enricher
            .enrich(60, 0)
            .ancestry
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(pids, [60, 50]);
        // Unknown uid: no name; a vanished process: empty ancestry.
        assert_eq!(enricher.enrich(60, 4242).user, None);
        assert!(enricher.enrich(999, 0).ancestry.is_empty());
    }

    #[test]
    fn ancestry_within_the_root_cgroup_reaches_pid_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        fake_process(&proc_root, 1, "init", 0, "/", &["init"]);
        fake_process(&proc_root, 5, "sh", 1, "/", &["sh"]);
        let enricher = Enricher::new(&proc_root, &dir.path().join("missing"));
        let pids: Vec<u32> = enricher
            .enrich(5, 0)
            .ancestry
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(pids, [5, 1]);
    }

    #[test]
    fn relative_filenames_are_shown_against_the_cwd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        fake_process(&proc_root, 9, "sh", 1, "/", &["sh"]);
        let enricher = Enricher::new(&proc_root, &dir.path().join("missing"));
        assert_eq!(
            enricher.display_path(9, Path::new("./tool")),
            Path::new("/work/sh/./tool")
        );
        assert_eq!(
            enricher.display_path(9, Path::new("/bin/ls")),
            Path::new("/bin/ls")
        );
        assert_eq!(
            enricher.display_path(10, Path::new("tool")),
            Path::new("tool")
        );
    }

    #[test]
    fn stat_parsing_handles_parentheses_in_comm() {
        let stat = Stat::parse("42 (a) b (c)) T 7 42 42 0").expect("parse");
        assert_eq!(stat.comm, "a) b (c)");
        assert_eq!(stat.state, 'T');
        assert_eq!(stat.ppid, 7);
        assert_eq!(stat.start_time, None, "the line stops before field 22");
        assert_eq!(Stat::parse("garbage"), None);
    }

    /// A stat line as the kernel writes it, with `start` in field 22.
    fn full_stat(pid: u32, comm: &str, parent: u32, start: u64) -> String {
        format!(
            "{pid} ({comm}) S {parent} {pid} {pid} 0 -1 4194560 0 0 0 0 3 1 0 0 20 0 1 0 {start} 0 0\n"
        )
    }

    #[test]
    fn stat_parsing_reads_the_start_time() {
        let stat = Stat::parse(&full_stat(42, "x y) z", 7, 123_456)).expect("parse");
        assert_eq!(stat.comm, "x y) z");
        assert_eq!(stat.ppid, 7);
        assert_eq!(stat.start_time, Some(123_456));
    }

    /// A fake tree with pid 70 (cgroup `/agents/a1`) under pid 1; returns (tempdir, enricher).
    fn denial_tree() -> (tempfile::TempDir, Enricher) {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        fake_process(&proc_root, 1, "init", 0, "/init.scope", &["/sbin/init"]);
        fake_process(&proc_root, 70, "curl", 1, "/agents/a1", &["curl", "one"]);
        fs::write(proc_root.join("70/stat"), full_stat(70, "curl", 1, 500)).expect("stat");
        let enricher = Enricher::new(&proc_root, &dir.path().join("no-passwd"));
        (dir, enricher)
    }

    fn cmdline_of(enrichment: &Enrichment) -> Vec<String> {
        enrichment.ancestry[0].cmdline.clone()
    }

    #[test]
    fn a_recent_enrichment_is_reused_for_the_same_process_until_it_is_a_second_old() {
        let (dir, enricher) = denial_tree();
        let mut recent = RecentEnrichments::default();
        let start = Instant::now();
        let first = recent.enrich_at(&enricher, 70, 0, start);
        assert_eq!(cmdline_of(&first), ["curl", "one"]);
        assert_eq!(first.ancestry.len(), 2);

        // Rewritten in place (same process, name and parent): reused within the second...
        fs::write(dir.path().join("proc/70/cmdline"), "curl\0two\0").expect("cmdline");
        let reused = recent.enrich_at(&enricher, 70, 0, start + Duration::from_millis(900));
        assert_eq!(reused, first);
        // ...and read afresh after it.
        let fresh = recent.enrich_at(&enricher, 70, 0, start + REUSE_FOR);
        assert_eq!(cmdline_of(&fresh), ["curl", "two"]);
        assert_eq!(recent.entries.len(), 1);
    }

    #[test]
    fn another_process_name_parent_or_uid_reads_everything_again() {
        let (dir, enricher) = denial_tree();
        let stat = dir.path().join("proc/70/stat");
        let cmdline = dir.path().join("proc/70/cmdline");
        let mut recent = RecentEnrichments::default();
        let now = Instant::now();
        let expect_fresh = |recent: &mut RecentEnrichments, uid: u32, arg: &str| {
            fs::write(&cmdline, format!("curl\0{arg}\0")).expect("cmdline");
            let got = recent.enrich_at(&enricher, 70, uid, now);
            assert_eq!(cmdline_of(&got), ["curl", arg]);
        };
        expect_fresh(&mut recent, 0, "a");
        // The pid reused by a process started later.
        fs::write(&stat, full_stat(70, "curl", 1, 501)).expect("stat");
        expect_fresh(&mut recent, 0, "b");
        // An exec under another name.
        fs::write(&stat, full_stat(70, "wget", 1, 501)).expect("stat");
        expect_fresh(&mut recent, 0, "c");
        // Reparented.
        fs::write(&stat, full_stat(70, "wget", 0, 501)).expect("stat");
        expect_fresh(&mut recent, 0, "d");
        // Another user (the user name is part of the enrichment).
        expect_fresh(&mut recent, 1000, "e");
        assert_eq!(recent.entries.len(), 2);
    }

    #[test]
    fn a_process_gone_or_without_a_start_time_is_never_reused() {
        let (dir, enricher) = denial_tree();
        let mut recent = RecentEnrichments::default();
        let now = Instant::now();
        // pid 1's fake stat line stops before the start time.
        recent.enrich_at(&enricher, 1, 0, now);
        fs::write(dir.path().join("proc/1/cmdline"), "changed\0").expect("cmdline");
        let again = recent.enrich_at(&enricher, 1, 0, now);
        assert_eq!(cmdline_of(&again), ["changed"]);

        recent.enrich_at(&enricher, 70, 0, now);
        fs::remove_dir_all(dir.path().join("proc/70")).expect("rm");
        let gone = recent.enrich_at(&enricher, 70, 0, now);
        assert!(gone.ancestry.is_empty(), "{gone:?}");
        assert!(
            !recent.entries.contains_key(&(70, 0)),
            "a gone process is forgotten"
        );
    }

    #[test]
    fn the_reuse_table_stays_bounded() {
        let (_dir, enricher) = denial_tree();
        let mut recent = RecentEnrichments::default();
        let now = Instant::now();
        for uid in 0..u32::try_from(MAX_RECENT).expect("fits") * 2 {
            recent.enrich_at(&enricher, 70, uid, now);
        }
        assert!(
            recent.entries.len() <= MAX_RECENT,
            "{}",
            recent.entries.len()
        );
        assert!(!recent.entries.is_empty());
    }

    #[test]
    fn within_matches_whole_path_components() {
        assert!(within(Some("/a/b"), Some("/a")));
        assert!(within(Some("/a"), Some("/a")));
        assert!(!within(Some("/ab"), Some("/a")));
        assert!(within(Some("/anything"), Some("/")));
        assert!(!within(None, Some("/a")));
    }

    #[test]
    fn first_passwd_entry_for_a_uid_wins_and_junk_is_skipped() {
        let users =
            Users::parse("root:x:0:0::/:/bin/sh\ntoor:x:0:0::/:/bin/sh\nbroken\nx:y:notanumber\n");
        assert_eq!(users.name(0).as_deref(), Some("root"));
        assert_eq!(users.name(1), None);
    }

    #[test]
    fn uids_the_passwd_file_lacks_are_resolved_through_nss() {
        // No file at all: every name comes from the name service.
        let users = Users::load(Path::new("/nonexistent/passwd"));
        let root = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0))
            .expect("getpwuid")
            .expect("uid 0 has an entry on every host");
        assert_eq!(users.name(0), Some(root.name));
        // The file wins where it names a uid.
        let dir = tempfile::tempdir().expect("tempdir");
        let passwd = dir.path().join("passwd");
        fs::write(&passwd, "admin0:x:0:0::/:/bin/sh\n").expect("passwd");
        assert_eq!(Users::load(&passwd).name(0).as_deref(), Some("admin0"));
    }

    /// A name service that never answers (until `release`), like an SSSD paused in a
    /// gated cgroup.
    static HUNG: Mutex<()> = Mutex::new(());

    #[expect(clippy::unnecessary_wraps, reason = "the shape of a lookup")]
    fn hung_lookup(uid: u32) -> Option<String> {
        let _held = HUNG.lock();
        Some(format!("user{uid}"))
    }

    #[test]
    fn a_name_service_that_hangs_delays_one_request_by_the_bounded_wait_and_no_other() {
        let held = HUNG.lock().expect("hold the name service");
        let users = Users {
            names: HashMap::from([(0, "root".to_owned())]),
            nss: Some(Arc::new(NameService::new(hung_lookup))),
        };
        let started = Instant::now();
        assert_eq!(users.name(4242), None, "no answer: no name");
        assert!(started.elapsed() >= NSS_WAIT, "it waited for the answer");
        // The stuck lookup is not joined by others: they answer at once, without a name,
        // and the file's names still resolve.
        assert_eq!(users.name(4243), None);
        assert_eq!(users.name(0).as_deref(), Some("root"));
        assert!(
            users
                .nss
                .as_ref()
                .expect("nss")
                .busy
                .load(Ordering::Acquire)
        );
        drop(held);
        // Once it answers, the service is asked again.
        let name = wait_for_name(&users, 4243);
        assert_eq!(name, "user4243");
    }

    fn wait_for_name(users: &Users, uid: u32) -> String {
        for _ in 0..100 {
            if let Some(name) = users.name(uid) {
                return name;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("uid {uid} never resolved once the name service answered");
    }

    #[test]
    fn answers_of_the_name_service_are_remembered() {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn counting(uid: u32) -> Option<String> {
            CALLS.fetch_add(1, Ordering::SeqCst);
            (uid == 7).then(|| "seven".to_owned())
        }
        let users = Users {
            names: HashMap::new(),
            nss: Some(Arc::new(NameService::new(counting))),
        };
        assert_eq!(users.name(7).as_deref(), Some("seven"));
        assert_eq!(users.name(7).as_deref(), Some("seven"));
        assert_eq!(users.name(8), None);
        assert_eq!(users.name(8), None);
        assert_eq!(CALLS.load(Ordering::SeqCst), 2, "one lookup per uid");
    }
}
