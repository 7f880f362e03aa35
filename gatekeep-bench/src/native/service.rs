//! The decision service under test: the shipped `gatekeep-server` binary in its own
//! process (its allocator, its runtime), so that its memory and CPU can be read from
//! `/proc` and are not the clients'.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use gatekeep_client::{
    AgentLink, AgentLinkConfig, ClientIdentity, ClientTls, LinkEvent, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{ApprovalRequest, ApprovalSettings, ExecTarget, Target, Verdict},
};
use gatekeep_server::certs::Pki;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::server::ServerProcess;

/// The rule that auto-decides `git fetch *` requests of policy `bench`.
pub const RULE: &str = "bench-fetch";

/// The service's configuration: its rule and durability (addresses and folders are given
/// on the command line).
fn config_toml(synchronous: &str) -> String {
    format!(
        "synchronous = \"{synchronous}\"\n\n[[rules]]\nname = \"{RULE}\"\naction = \"allow\"\n\
         policy = \"bench\"\nexecutable = \"/usr/bin/git\"\ncommand = \"git fetch *\"\n"
    )
}

/// `gatekeep-server` next to this binary (cargo builds both into one folder).
pub fn default_server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("path of gatekeep-bench")?;
    let server = exe.with_file_name("gatekeep-server");
    ensure!(
        server.exists(),
        "`{}` is missing: build it (`cargo build --release -p gatekeep-server`) or name it \
         with `--server`",
        server.display()
    );
    Ok(server)
}

/// A running `gatekeep-server serve` and what clients need to reach it.
pub struct Service {
    process: ServerProcess,
    pub endpoint: String,
    pub token: String,
    pub pki: Arc<Pki>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts `server` with a fresh PKI, configuration and databases in a temporary folder
    /// under `base` (on the disk being measured: fsync on tmpfs costs nothing), and adds
    /// the reviewer `bench`.
    pub fn start(server: &Path, base: &Path, synchronous: &str) -> Result<Self> {
        Self::start_under(&[], server, base, synchronous)
    }

    /// [`start`](Self::start), with the service run by `wrapper` (see
    /// [`ServerProcess::start_under`]).
    pub fn start_under(
        wrapper: &[String],
        server: &Path,
        base: &Path,
        synchronous: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-service-")
            .tempdir_in(base)
            .context("temporary folder for the service")?;
        let pki = Pki::load_or_init(&dir.path().join("tls"), &[])?;
        let added = Command::new(server)
            .args(["reviewers", "add", "bench", "--db"])
            .arg(dir.path().join("data").join("state.db"))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("failed to run `{}`", server.display()))?;
        ensure!(
            added.status.success(),
            "`gatekeep-server reviewers add` failed with {}",
            added.status
        );
        let token = String::from_utf8(added.stdout)?.trim().to_owned();
        // A free port: the kernel picks one, the service binds it right after.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let process = ServerProcess::start_under(
            wrapper,
            server,
            dir.path(),
            &config_toml(synchronous),
            listen,
            "warn",
        )?;
        Ok(Self {
            endpoint: format!("https://{listen}"),
            process,
            token,
            pki: Arc::new(pki),
            _dir: dir,
        })
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Connects one agent named `host` and waits until its stream is up.
    pub async fn agent(&self, host: &str) -> Result<Arc<AgentLink>> {
        let (link, events) = connect_agent(&self.pki, &self.endpoint, &[], host).await?;
        drain(events);
        Ok(Arc::new(link))
    }

    /// A reviewer client (for the service's status).
    pub async fn reviewer(&self) -> Result<ReviewClient> {
        reviewer(&self.pki, &self.endpoint, &self.token).await
    }

    /// Stops the service and waits for it to commit and exit.
    pub fn stop(self) -> Result<()> {
        self.process.stop()
    }
}

/// Starts an agent link named `host` to `endpoint` (then `failover`, in turn) with a
/// certificate of `pki`, and waits until its stream is up; returns its events.
pub async fn connect_agent(
    pki: &Pki,
    endpoint: &str,
    failover: &[String],
    host: &str,
) -> Result<(AgentLink, mpsc::UnboundedReceiver<LinkEvent>)> {
    let identity = pki.agent(host)?;
    let mut config = AgentLinkConfig::new(
        endpoint,
        ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        },
    );
    config.failover = failover.to_vec();
    let (link, mut events) = AgentLink::start(config)?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some(LinkEvent::Connected { .. })) => break,
            Ok(Some(LinkEvent::Disconnected { error, .. })) => {
                bail!("agent {host} cannot connect: {error}")
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!("agent {host} did not connect"),
        }
    }
    Ok((link, events))
}

/// Keeps reading a link's events so their queue does not grow.
pub fn drain(mut events: mpsc::UnboundedReceiver<LinkEvent>) {
    tokio::spawn(async move { while events.recv().await.is_some() {} });
}

/// A reviewer client of `endpoint`, trusting `pki`'s CA.
pub async fn reviewer(pki: &Pki, endpoint: &str, token: &str) -> Result<ReviewClient> {
    Ok(ReviewClient::connect(ReviewConfig {
        endpoint: endpoint.to_owned(),
        token: token.to_owned(),
        tls: ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: None,
            domain: None,
        },
        connect_timeout: Duration::from_secs(5),
    })
    .await?)
}

/// A request id as the agent mints them: from the host, the boot, the kernel's first
/// sighting of the request (boot time), the thread and the request's digest, on host `bench`.
fn request_id() -> Uuid {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let first_seen = gatekeep_agent::bpf::kernel::boot_time_ns();
    let digest = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(u64::from(n));
    gatekeep_agent::pause::request::request_id("bench", "bench-boot", first_seen, n, digest)
}

/// An exec request of policy `bench`: `git <command> branch-<n>` (the rule decides
/// `git fetch`; anything else waits for a reviewer).
#[must_use]
pub fn request(command: &str, n: usize) -> ApprovalRequest {
    let now = time::OffsetDateTime::now_utc();
    ApprovalRequest {
        id: request_id(),
        policy: "bench".into(),
        rule: "default".into(),
        cgroup: "/sys/fs/cgroup/bench".into(),
        pid: 1000,
        tid: 1000,
        uid: 1000,
        user_name: Some("worker".into()),
        cwd: Some("/srv".into()),
        ancestry: vec![],
        target: Target::Exec(ExecTarget {
            executable: "/usr/bin/git".into(),
            argv: vec!["git".into(), command.into(), format!("branch-{n}")],
            content: None,
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: Vec::new(),
        }),
        requested_at: now,
        deadline: now + time::Duration::hours(1),
        on_timeout: Verdict::Deny,
        approval: ApprovalSettings {
            grant_durations: vec![GrantDuration::Once],
            ..ApprovalSettings::default()
        },
    }
}
