//! The embedded decision service: with no central service configured, the
//! agent runs `gatekeep-server` in-process, on `SQLite` under the state
//! folder, listening on loopback, so one host works with `gatekeep-agent
//! run` and the `gatekeep` CLI alone.
//!
//! What it keeps in the state folder (`/var/lib/gatekeep` by default):
//!
//! - `pki/`: the service's CA and certificate ([`Pki::load_or_init`]): made
//!   once, so reviewers' copies of `pki/ca.pem` stay valid across restarts.
//!   The agent's own client certificate is issued from it at every start.
//! - `service/`: the service's `state.db` (requests, grants, reviewers) and
//!   its hash-chained `audit.db`.
//! - `reviewer.token` (0600): the token of the bootstrap reviewer `admin`,
//!   made at the first start (or again if the file was removed).
//! - `cli.toml` (0600): `server`, `token` and `ca` for the `gatekeep` CLI:
//!   `GATEKEEP_CLI_CONFIG=/var/lib/gatekeep/cli.toml gatekeep review list`.
//!
//! More reviewers: `gatekeep-agent reviewers add NAME [--group G]` (or
//! `gatekeep-server reviewers add NAME --db /var/lib/gatekeep/service/state.db`).

use std::path::{Path, PathBuf};

use gatekeep_client::{ClientIdentity, ClientTls};
use gatekeep_server::{
    Server, ServerConfig,
    certs::Pki,
    store::{SqliteStore, Store as _, Synchronous},
};
use gatekeep_util::fs::{Existing, PRIVATE, write_atomic};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{config::AgentConfig, paths};

/// Errors starting the embedded service.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("failed to load or create the embedded service's CA in `{}`", dir.display())]
    Pki {
        dir: PathBuf,
        #[source]
        source: Box<gatekeep_server::Error>,
    },
    #[error(
        "failed to open the embedded service's database `{}` (if it is corrupt, restore it from a backup, or move it aside to start with an empty one: reviewers are then added again and pending requests asked again; until then the agent does not start, and paused tasks stay paused)",
        path.display()
    )]
    Store {
        path: PathBuf,
        #[source]
        source: gatekeep_server::store::StoreError,
    },
    #[error("failed to add reviewer `{name}`")]
    Reviewer {
        name: String,
        #[source]
        source: Box<gatekeep_server::Error>,
    },
    #[error(
        "failed to start the embedded decision service on {listen} (another service on that port? set `[decision] listen`)"
    )]
    Server {
        listen: std::net::SocketAddr,
        #[source]
        source: Box<gatekeep_server::Error>,
    },
    #[error("failed to write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a blocking task panicked")]
    Join {
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The running embedded service.
pub struct EmbeddedService {
    /// `https://127.0.0.1:7443`.
    pub endpoint: String,
    /// What the agent's link needs: the CA and an agent certificate.
    pub tls: ClientTls,
    /// The CA file reviewers' CLIs trust.
    pub ca_file: PathBuf,
    /// The CLI config written for the bootstrap reviewer.
    pub cli_config: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), gatekeep_server::Error>>,
}

/// The embedded service's folders, from the agent's state folder.
#[derive(Debug, Clone)]
pub struct EmbeddedPaths {
    pub pki: PathBuf,
    pub data: PathBuf,
    pub token: PathBuf,
    pub cli_config: PathBuf,
}

impl EmbeddedPaths {
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        Self {
            pki: state_dir.join(paths::EMBEDDED_PKI_SUBDIR),
            data: state_dir.join(paths::EMBEDDED_SERVICE_SUBDIR),
            token: state_dir.join(paths::REVIEWER_TOKEN_FILE),
            cli_config: state_dir.join(paths::CLI_CONFIG_FILE),
        }
    }

    /// The service's state database (reviewers live there).
    #[must_use]
    pub fn state_db(&self) -> PathBuf {
        self.data.join(gatekeep_server::paths::STATE_DB)
    }

    /// The service's audit log.
    #[must_use]
    pub fn audit_db(&self) -> PathBuf {
        self.data.join(gatekeep_server::paths::AUDIT_DB)
    }
}

/// `host` as a certificate name: letters, digits, `-`, `_` and `.`.
#[must_use]
pub fn certificate_name(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// Writes `contents` to `path` readable by its owner only, replacing it.
fn write_private(path: &Path, contents: &str) -> Result<(), EmbeddedError> {
    write_atomic(path, contents.as_bytes(), PRIVATE, Existing::Replace).map_err(|source| {
        EmbeddedError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

fn open_store(path: &Path) -> Result<SqliteStore, EmbeddedError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| EmbeddedError::Write {
            path: parent.to_owned(),
            source,
        })?;
    }
    SqliteStore::open(path, Synchronous::Full).map_err(|source| EmbeddedError::Store {
        path: path.to_owned(),
        source,
    })
}

/// Adds a reviewer to the embedded service's database (the service may be
/// running) and returns their token. `replace` first removes a reviewer of
/// that name.
pub async fn add_reviewer(
    state_dir: &Path,
    name: &str,
    groups: &[String],
    replace: bool,
) -> Result<String, EmbeddedError> {
    let paths = EmbeddedPaths::new(state_dir);
    let store = open_store(&paths.state_db())?;
    if replace {
        store
            .remove_reviewer(name.to_owned())
            .await
            .map_err(|source| EmbeddedError::Store {
                path: paths.state_db(),
                source,
            })?;
    }
    gatekeep_server::add_reviewer(&store, name, groups)
        .await
        .map_err(|source| EmbeddedError::Reviewer {
            name: name.to_owned(),
            source: Box::new(source),
        })
}

/// The bootstrap reviewer's token: read from its file, or made (and
/// written) when the file is missing.
async fn bootstrap_token(state_dir: &Path, paths: &EmbeddedPaths) -> Result<String, EmbeddedError> {
    if let Ok(token) = std::fs::read_to_string(&paths.token)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_owned());
    }
    let token = add_reviewer(state_dir, paths::BOOTSTRAP_REVIEWER, &[], true).await?;
    write_private(&paths.token, &format!("{token}\n"))?;
    tracing::info!(
        reviewer = paths::BOOTSTRAP_REVIEWER,
        token_file = %paths.token.display(),
        "made the bootstrap reviewer's token"
    );
    Ok(token)
}

/// A TOML basic string: JSON's string escapes are TOML's too.
fn toml_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Starts the embedded service for `config` and returns once it listens.
pub async fn start(config: &AgentConfig) -> Result<EmbeddedService, EmbeddedError> {
    let paths = EmbeddedPaths::new(&config.state_dir);
    let pki = {
        let dir = paths.pki.clone();
        tokio::task::spawn_blocking(move || Pki::load_or_init(&dir, &[]))
            .await
            .map_err(|source| EmbeddedError::Join { source })?
            .map_err(|source| EmbeddedError::Pki {
                dir: paths.pki.clone(),
                source: Box::new(source),
            })?
    };
    let name = certificate_name(&config.host);
    let identity = pki.agent(&name).map_err(|source| EmbeddedError::Pki {
        dir: paths.pki.clone(),
        source: Box::new(source),
    })?;
    // A state database that cannot be opened (corrupt, unreadable) is named with its
    // cause and fix here, not reported as a failure to listen by the server below.
    drop(open_store(&paths.state_db())?);
    let token = bootstrap_token(&config.state_dir, &paths).await?;
    let listen = config.decision.listen;
    let server_config = ServerConfig {
        name: name.clone(),
        listen,
        data_dir: paths.data.clone(),
        ..ServerConfig::default()
    };
    let server = Server::builder(server_config)
        .tls(pki.tls())
        .build()
        .await
        .map_err(|source| EmbeddedError::Server {
            listen,
            source: Box::new(source),
        })?;
    let endpoint = server.endpoint();
    let ca_file = paths.pki.join(gatekeep_server::paths::CA_CERT);
    write_private(
        &paths.cli_config,
        &format!(
            "# Written by gatekeep-agent for the embedded decision service.\n\
             # Use it with: GATEKEEP_CLI_CONFIG={} gatekeep review list\n\
             server = {}\ntoken = {}\nca = {}\n",
            paths.cli_config.display(),
            toml_string(&endpoint),
            toml_string(&token),
            toml_string(&ca_file.to_string_lossy()),
        ),
    )?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    tracing::info!(
        %endpoint,
        data_dir = %paths.data.display(),
        cli_config = %paths.cli_config.display(),
        "embedded decision service listening; reviewers: GATEKEEP_CLI_CONFIG={} gatekeep review list",
        paths.cli_config.display()
    );
    Ok(EmbeddedService {
        endpoint,
        tls: ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        },
        ca_file,
        cli_config: paths.cli_config,
        stop: Some(stop),
        task,
    })
}

impl EmbeddedService {
    /// Stops the service (its audit log is committed before this returns).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "the embedded decision service failed"),
            Err(err) => tracing::error!(error = %err, "the embedded decision service panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gatekeep_client::{ReviewClient, ReviewConfig};

    use super::*;

    #[test]
    fn host_names_become_certificate_names() {
        assert_eq!(certificate_name("web-1.example.org"), "web-1.example.org");
        assert_eq!(certificate_name("my host"), "my-host");
        assert_eq!(certificate_name(""), "localhost");
    }

    /// Fault injection (issue 24): a corrupt `state.db` at start. Expected: the agent
    /// does not start (fail closed: paused tasks stay paused, the pinned programs keep
    /// enforcing), with an error naming the file, the cause and the fix; the file is left
    /// as it is for inspection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_state_db_stops_the_start_with_file_cause_and_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = AgentConfig {
            state_dir: dir.path().join("state"),
            host: "h".into(),
            ..AgentConfig::default()
        };
        config.decision.listen = "127.0.0.1:0".parse().expect("addr");
        let paths = EmbeddedPaths::new(&config.state_dir);
        std::fs::create_dir_all(&paths.data).expect("data dir");
        let garbage = b"this is not an SQLite database, a torn write left it like this".repeat(64);
        std::fs::write(paths.state_db(), &garbage).expect("corrupt state.db");
        // With and without the bootstrap token (which decides who opens the file first).
        for token in [false, true] {
            if token {
                std::fs::write(&paths.token, "t0ken\n").expect("token");
            }
            let Err(err) = start(&config).await else {
                panic!("started on a corrupt state.db");
            };
            let text = gatekeep_audit::error_chain(&err);
            for part in [
                &format!("`{}`", paths.state_db().display()),
                "file is not a database",
                "move it aside",
                "paused tasks stay paused",
            ] {
                assert!(text.contains(part), "{part:?} missing from: {text}");
            }
            assert!(!text.contains("another service on that port"), "{text}");
            assert_eq!(
                std::fs::read(paths.state_db()).expect("left in place"),
                garbage
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_service_starts_keeps_its_ca_and_token_and_serves_the_cli_config() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().expect("tempdir");
        // Port 0: the service binds a free port itself and reports it (picking one here,
        // dropping it and binding it again would race other tests for it).
        let listen: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut config = AgentConfig {
            state_dir: dir.path().join("state"),
            host: "test host".into(),
            ..AgentConfig::default()
        };
        config.decision.listen = listen;
        let service = start(&config).await.expect("embedded service");
        let bound: std::net::SocketAddr = service
            .endpoint
            .strip_prefix("https://")
            .and_then(|addr| addr.parse().ok())
            .expect("the endpoint is https://ADDR");
        assert_eq!(bound.ip(), listen.ip());
        assert_ne!(bound.port(), 0, "the endpoint names the port it bound");
        let paths = EmbeddedPaths::new(&config.state_dir);
        let token = std::fs::read_to_string(&paths.token).expect("token file");
        let mode = std::fs::metadata(&paths.token)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let cli: toml::Table =
            toml::from_str(&std::fs::read_to_string(&paths.cli_config).expect("cli.toml"))
                .expect("toml");
        assert_eq!(cli["token"].as_str(), Some(token.trim()));
        assert_eq!(cli["server"].as_str(), Some(service.endpoint.as_str()));

        // A reviewer's client with exactly what cli.toml says gets in.
        let ca_pem = std::fs::read_to_string(cli["ca"].as_str().expect("ca")).expect("ca.pem");
        let mut review = ReviewClient::connect(ReviewConfig {
            endpoint: service.endpoint.clone(),
            token: token.trim().to_owned(),
            tls: ClientTls {
                ca_pem: ca_pem.clone(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
        .expect("connect");
        let pending = review
            .list_pending(&gatekeep_client::RequestFilter::default(), 0)
            .await
            .expect("list");
        assert!(pending.is_empty());
        service.stop().await;

        // Restarted: the same CA and token.
        let again = start(&config).await.expect("restart");
        assert_eq!(again.tls.ca_pem, ca_pem);
        assert_eq!(std::fs::read_to_string(&paths.token).expect("token"), token);
        // Another reviewer, added while the service runs.
        let bob = add_reviewer(&config.state_dir, "bob", &["sre".into()], false)
            .await
            .expect("add bob");
        assert!(bob.starts_with("gk_"));
        again.stop().await;
    }
}
