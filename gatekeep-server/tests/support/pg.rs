//! A throwaway `PostgreSQL` cluster for tests: Debian's server binaries, a fresh data
//! directory under `target/tmp/pg/<pid>`, loopback on a free port, trust authentication for
//! the superuser `gk`, and a new database per test ([`Cluster::database`]).
//!
//! - One cluster per test process, started on first use ([`cluster`]); a benchmark starts
//!   a durable one of its own ([`start`]).
//! - `initdb` and `postgres` refuse to run as root. As root (CI, these machines) both run as
//!   the `postgres` user that Debian's package creates (else `nobody`): the data directory
//!   is handed to that user and the processes drop to it (`Command::uid`).
//! - The server is started from a thread that lives as long as the test process and asks
//!   the kernel for a parent-death signal (`SIGINT`: fast shutdown): when the tests end, by
//!   success, failure or a kill, `postgres` stops by itself. The next run removes the data
//!   directories of processes that are gone.
//! - `GATEKEEP_PG_BIN` names another directory of server binaries; without it the newest
//!   `/usr/lib/postgresql/<version>/bin` is used. `cargo xtask setup` installs the package.

use std::{
    fs,
    os::unix::{fs::chown, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

/// The superuser of the throwaway cluster.
pub const USER: &str = "gk";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    /// The postmaster's process id (benchmarks read the cluster's CPU time from `/proc`).
    pub pid: u32,
    bin: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// How much a cluster keeps on a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Tests: `fsync`, `synchronous_commit` and `full_page_writes` off.
    Throwaway,
    /// Benchmarks: `PostgreSQL`'s defaults (every commit flushed).
    Durable,
}

/// The test process's cluster, started on first use. Panics with the cause (and what to do)
/// when it cannot start.
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(|| start(Durability::Throwaway)) {
        Ok(cluster) => cluster,
        Err(message) => panic!("cannot start the test PostgreSQL cluster: {message}"),
    }
}

impl Cluster {
    /// A URL of database `name` in this cluster.
    #[must_use]
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn database(&self) -> String {
        let name = format!("gk_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        drop(client);
        drop(driver.await);
        self.url(&name)
    }

    /// A server binary of the cluster's installation (`psql`, `pg_ctl`...).
    #[must_use]
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// The newest installed server binaries.
fn server_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("GATEKEEP_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|err| {
            format!(
                "PostgreSQL is not installed (/usr/lib/postgresql: {err}); run `cargo xtask setup` \
                 (Debian package `postgresql`) or set GATEKEEP_PG_BIN"
            )
        })?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server under /usr/lib/postgresql; run `cargo xtask setup`".to_owned()
    })
}

/// The unprivileged user the cluster runs as when the tests run as root.
fn unprivileged() -> Result<Option<nix::unistd::User>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
            return Ok(Some(user));
        }
    }
    Err(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run \
         PostgreSQL as (initdb refuses root)"
            .to_owned(),
    )
}

/// Removes the data directories of test processes that are gone.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let gone = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            drop(fs::remove_dir_all(entry.path()));
        }
    }
}

fn as_user<'a>(command: &'a mut Command, user: Option<&nix::unistd::User>) -> &'a mut Command {
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

/// Starts a cluster of its own (tests share [`cluster`] instead).
pub fn start(durability: Durability) -> Result<Cluster, String> {
    start_with(durability, None)
}

/// A server certificate and key (PEM) for a cluster that speaks TLS only.
#[derive(Debug, Clone, Copy)]
pub struct ServerTls<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// Starts a throwaway cluster that accepts TCP connections over TLS only (`hostssl` in
/// `pg_hba.conf`, `ssl = on` with `tls`'s certificate).
pub fn start_tls(tls: ServerTls<'_>) -> Result<Cluster, String> {
    start_with(Durability::Throwaway, Some(tls))
}

fn start_with(durability: Durability, tls: Option<ServerTls<'_>>) -> Result<Cluster, String> {
    let bin = server_bin()?;
    let user = unprivileged()?;
    // Integration tests get cargo's temporary folder; examples (benchmarks) the same one.
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp"),
            PathBuf::from,
        )
        .join("pg");
    remove_stale(&base);
    let dir = base.join(std::process::id().to_string());
    drop(fs::remove_dir_all(&dir));
    fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    if let Some(user) = &user {
        chown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(|err| format!("cannot hand {} to {}: {err}", dir.display(), user.name))?;
    }
    let data = dir.join("data");
    let output = as_user(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(&dir),
        user.as_ref(),
    )
    .output()
    .map_err(|err| format!("cannot run {}: {err}", bin.join("initdb").display()))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if let Some(tls) = tls {
        only_tls(&data, tls, user.as_ref())?;
    }
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        match launch(
            &bin,
            &dir,
            &data,
            port,
            user.as_ref(),
            durability,
            tls.is_some(),
        ) {
            Ok(pid) => {
                return Ok(Cluster {
                    port,
                    dir,
                    pid,
                    bin,
                });
            }
            // Most likely the port was taken meanwhile: try another.
            Err(message) => last = message,
        }
    }
    Err(last)
}

/// Writes the server's certificate and key into `data` (the key readable by its owner
/// only, as `postgres` demands) and a `pg_hba.conf` that admits TCP over TLS only.
fn only_tls(
    data: &Path,
    tls: ServerTls<'_>,
    user: Option<&nix::unistd::User>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    for (name, text, mode) in [
        ("server.crt", tls.cert_pem, 0o644),
        ("server.key", tls.key_pem, 0o600),
        (
            "pg_hba.conf",
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            0o600,
        ),
    ] {
        let path = data.join(name);
        fs::write(&path, text).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|err| format!("cannot restrict {}: {err}", path.display()))?;
        if let Some(user) = user {
            chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|err| format!("cannot hand {} to {}: {err}", path.display(), user.name))?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| format!("no free port: {err}"))
}

/// Starts `postgres` from a thread that outlives every test (see the module comment), waits
/// until it accepts connections, and returns its process id.
fn launch(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    user: Option<&nix::unistd::User>,
    durability: Durability,
    tls: bool,
) -> Result<u32, String> {
    let log_path = dir.join(format!("postgres-{port}.log"));
    let log = fs::File::create(&log_path).map_err(|err| format!("cannot create the log: {err}"))?;
    let mut command = Command::new(bin.join("postgres"));
    command
        .arg("-D")
        .arg(data)
        .arg("-k")
        .arg(dir)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        // Room for every test's pools and replicas.
        .args(["-c", "max_connections=400"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|err| err.to_string())?)
        .stderr(log);
    if tls {
        command.args(["-c", "ssl=on"]);
    }
    if durability == Durability::Throwaway {
        command
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"]);
    }
    as_user(&mut command, user);
    // SAFETY: prctl is async-signal-safe; it runs in the child after the uid change (which
    // would clear it) and before exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGINT)
                .map_err(std::io::Error::from)
        });
    }
    let (started, spawned) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("postgres-{port}"))
        .spawn(move || {
            let child = command.spawn();
            let ok = child.is_ok();
            drop(started.send(child.map_err(|err| err.to_string())));
            if ok {
                // The parent-death signal fires when this thread ends: never end it.
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|err| err.to_string())?;
    let mut child = spawned
        .recv()
        .map_err(|err| err.to_string())?
        .map_err(|err| format!("cannot run {}: {err}", bin.join("postgres").display()))?;
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "postgres exited ({status}): {}",
                fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
            .status()
            .is_ok_and(|status| status.success());
        if ready {
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            drop(child.kill());
            return Err(format!(
                "postgres did not accept connections within 60 s: {}",
                fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
