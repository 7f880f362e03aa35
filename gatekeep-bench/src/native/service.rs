//! The decision service under test, in its own process (`gatekeep-bench serve`), so that
//! its memory can be read from `/proc` and its runtime is not the clients'.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use gatekeep_client::{
    AgentLink, AgentLinkConfig, ClientIdentity, ClientTls, LinkEvent, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{ApprovalRequest, ApprovalSettings, ExecTarget, Target, Verdict},
};
use gatekeep_server::{Server, ServerConfig, certs::Pki, rules::RuleConfig, store::Synchronous};
use tokio::io::AsyncReadExt as _;
use uuid::Uuid;

/// The rule that auto-decides `git fetch *` requests of policy `bench`.
pub const RULE: &str = "bench-fetch";

/// Options of `gatekeep-bench serve`.
#[derive(Debug, clap::Args)]
pub struct ServeOptions {
    /// Holds the PKI (`pki/`) and the service's databases (`data/`).
    #[arg(long)]
    pub dir: PathBuf,
    /// `full` (fsync every commit, the default) or `normal`.
    #[arg(long, default_value = "full")]
    pub synchronous: String,
}

/// Runs the service until stdin closes; prints `READY <endpoint> <reviewer token>` first.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let synchronous = match opts.synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => bail!("unknown synchronous mode `{other}`"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pki = Pki::load_or_init(&opts.dir.join("pki"), &[])?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let config = ServerConfig {
            data_dir: opts.dir.join("data"),
            synchronous,
            rules: vec![RuleConfig {
                name: RULE.into(),
                action: Verdict::Allow,
                host_group: None,
                policy: Some("bench".into()),
                kind: None,
                executable: Some("/usr/bin/git".into()),
                command: Some("git fetch *".into()),
                destination: None,
                ports: None,
            }],
            ..ServerConfig::default()
        };
        let server = Server::builder(config)
            .tls(pki.tls())
            .listener(listener)
            .build()
            .await?;
        let token = server.add_reviewer("bench", &[]).await?;
        println!("READY {} {token}", server.endpoint());
        std::io::stdout().flush()?;
        server
            .serve(async {
                // The parent closes our stdin to stop us (or dies, which does the same).
                let mut sink = Vec::new();
                drop(tokio::io::stdin().read_to_end(&mut sink).await);
            })
            .await?;
        Ok(())
    })
}

/// A running `gatekeep-bench serve` and what clients need to reach it.
pub struct Service {
    child: Child,
    stdin: Option<ChildStdin>,
    pub endpoint: String,
    pub token: String,
    pub pki: Arc<Pki>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts the service in a fresh temporary folder under `base` (on the disk being
    /// measured: fsync on tmpfs costs nothing).
    pub fn start(base: &Path, synchronous: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-service-")
            .tempdir_in(base)
            .context("temporary folder for the service")?;
        let pki = Pki::load_or_init(&dir.path().join("pki"), &[])?;
        let exe = std::env::current_exe().context("path of gatekeep-bench")?;
        let mut child = Command::new(exe)
            .args(["serve", "--synchronous", synchronous, "--dir"])
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start `gatekeep-bench serve`")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let mut words = line.split_whitespace();
        let (Some("READY"), Some(endpoint), Some(token)) =
            (words.next(), words.next(), words.next())
        else {
            drop(child.kill());
            bail!("the service did not start: `{}`", line.trim());
        };
        Ok(Self {
            stdin: child.stdin.take(),
            endpoint: endpoint.to_owned(),
            token: token.to_owned(),
            child,
            pki: Arc::new(pki),
            _dir: dir,
        })
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects one agent named `host` and waits until its stream is up.
    pub async fn agent(&self, host: &str) -> Result<Arc<AgentLink>> {
        let identity = self.pki.agent(host)?;
        let (link, mut events) = AgentLink::start(AgentLinkConfig::new(
            &self.endpoint,
            ClientTls {
                ca_pem: self.pki.ca.cert_pem().to_owned(),
                identity: Some(ClientIdentity {
                    cert_pem: identity.cert_pem,
                    key_pem: identity.key_pem,
                }),
                domain: None,
            },
        ))?;
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
        // Keep reading events so their queue does not grow.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        Ok(Arc::new(link))
    }

    /// A reviewer client (for the service's status).
    pub async fn reviewer(&self) -> Result<ReviewClient> {
        Ok(ReviewClient::connect(ReviewConfig {
            endpoint: self.endpoint.clone(),
            token: self.token.clone(),
            tls: ClientTls {
                ca_pem: self.pki.ca.cert_pem().to_owned(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await?)
    }

    /// Closes the service's stdin and waits for it to commit and exit.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the service exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            drop(self.child.kill());
            drop(self.child.wait());
        }
    }
}

/// A service request id as the agent makes them: from the kernel's first sighting of the
/// request (boot time), the thread and the request's digest, on host `bench`.
fn request_id() -> Uuid {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let first_seen = gatekeep_agent::kernel::boot_time_ns();
    let digest = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(n);
    gatekeep_agent::remote::request_uuid("bench", &format!("{first_seen:x}-{n}-{digest:016x}"), 0)
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
