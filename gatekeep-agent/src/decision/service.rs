//! Who decides, as the configuration says (`[decision] mode`): the local
//! timeout decider, the embedded decision service, or a central one. For
//! the services this wires the agent's link, the grant bookkeeping and the
//! [`RemoteDecider`] together, and takes them down in order at shutdown.

use std::{path::Path, sync::Arc};

use gatekeep_client::{
    AgentLink, AgentLinkConfig, AuditShipper, ClientIdentity, ClientTls, LinkError, ShipperConfig,
};
use gatekeep_util::retry::poll_until;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    audit::AuditHandle,
    bpf::{kernel::KernelHandle, pinning::Start},
    config::{AgentConfig, DecisionMode},
    decision::{
        DecideError, Decider, Decision, DecisionRequest, LocalDecider, Withdrawal,
        embedded::{self, EmbeddedError, EmbeddedService},
        grants::{self, Grants, GrantsConfig, SessionEnded},
        remote::RemoteDecider,
    },
    paths,
    policy::Compiled,
};

/// Errors setting up the decider.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("failed to read `{}` (`[decision] {field}`)", path.display())]
    ReadTls {
        field: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the link to the decision service")]
    Link {
        #[source]
        source: LinkError,
    },
}

/// The decider the controller uses.
pub enum AgentDecider {
    Local(LocalDecider),
    Remote(RemoteDecider),
}

impl Decider for AgentDecider {
    async fn decide(&self, request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
        match self {
            AgentDecider::Local(local) => local.decide(request).await,
            AgentDecider::Remote(remote) => remote.decide(request).await,
        }
    }

    fn withdraw(&self, request_id: uuid::Uuid, reason: Withdrawal, detail: &str) {
        match self {
            AgentDecider::Local(local) => local.withdraw(request_id, reason, detail),
            AgentDecider::Remote(remote) => remote.withdraw(request_id, reason, detail),
        }
    }
}

/// The running decision side.
pub struct DecisionService {
    pub decider: Arc<AgentDecider>,
    pub mode: DecisionMode,
    /// The service's address (embedded or remote).
    pub endpoint: Option<String>,
    /// Embedded: the CLI config written for the bootstrap reviewer.
    pub cli_config: Option<std::path::PathBuf>,
    link: Option<Arc<AgentLink>>,
    tasks: Vec<JoinHandle<()>>,
    embedded: Option<EmbeddedService>,
    /// Remote only: ships the local audit log to the service, which anchors this host's
    /// chain (an embedded service on the same host would anchor nothing the host's root
    /// cannot rewrite too).
    shipper: Option<AuditShipper>,
}

impl DecisionService {
    /// Where shipping the local audit log stands; `None` unless the agent ships (remote mode).
    #[must_use]
    pub fn shipping(&self) -> Option<watch::Receiver<gatekeep_client::ShipStatus>> {
        self.shipper.as_ref().map(AuditShipper::status)
    }
}

/// What [`start`] needs from the daemon.
pub struct Wiring<'a> {
    pub config: &'a AgentConfig,
    pub kernel: &'a KernelHandle,
    pub audit: Arc<AuditHandle>,
    /// How the programs came to run (a fresh load means a new digest key).
    pub start: Start,
    pub policies: watch::Receiver<Arc<Compiled>>,
    pub shutdown: watch::Receiver<bool>,
}

fn read(field: &'static str, path: &Path) -> Result<String, ServiceError> {
    std::fs::read_to_string(path).map_err(|source| ServiceError::ReadTls {
        field,
        path: path.to_owned(),
        source,
    })
}

/// Starts what `[decision]` asks for.
pub async fn start(wiring: Wiring<'_>) -> Result<DecisionService, ServiceError> {
    let config = wiring.config;
    let mode = config.decision.mode();
    let (endpoint, tls, embedded, failover) = match mode {
        DecisionMode::Local => {
            return Ok(DecisionService {
                decider: Arc::new(AgentDecider::Local(LocalDecider)),
                mode,
                endpoint: None,
                cli_config: None,
                link: None,
                tasks: Vec::new(),
                embedded: None,
                shipper: None,
            });
        }
        DecisionMode::Embedded => {
            let service = embedded::start(config).await?;
            (
                service.endpoint.clone(),
                service.tls.clone(),
                Some(service),
                Vec::new(),
            )
        }
        DecisionMode::Remote => {
            let decision = &config.decision;
            // Validation guarantees these are set in remote mode.
            let (Some(server), Some(ca), Some(cert), Some(key)) = (
                decision.server.clone(),
                decision.ca.as_deref(),
                decision.cert.as_deref(),
                decision.key.as_deref(),
            ) else {
                return Err(ServiceError::Link {
                    source: LinkError::Config {
                        message: "remote mode needs server, ca, cert and key".into(),
                    },
                });
            };
            let tls = ClientTls {
                ca_pem: read("ca", ca)?,
                identity: Some(ClientIdentity {
                    cert_pem: read("cert", cert)?,
                    key_pem: read("key", key)?,
                }),
                domain: decision.server_name.clone(),
            };
            (server, tls, None, decision.failover.clone())
        }
    };
    let cli_config = embedded.as_ref().map(|e| e.cli_config.clone());
    let mut link_config = AgentLinkConfig::new(endpoint.clone(), tls);
    link_config.failover = failover;
    let shipper = start_shipper(config, mode, &link_config)?;
    let (link, events) =
        AgentLink::start(link_config).map_err(|source| ServiceError::Link { source })?;
    let link = Arc::new(link);
    let session_link = Arc::clone(&link);
    let on_session_end: SessionEnded = Arc::new(move |cgroup: &str| {
        if let Err(err) = session_link.session_ended(cgroup) {
            tracing::warn!(cgroup, error = %err, "cannot tell the service that a session ended");
        }
    });
    let grants = Grants::load(
        Arc::new(wiring.kernel.clone()),
        Arc::clone(&wiring.audit),
        GrantsConfig {
            host: config.host.clone(),
            file: Some(config.state_dir.join(paths::GRANTS_FILE)),
            cgroup_root: config.cgroup_root.clone(),
            fresh_digests: wiring.start == Start::Fresh,
        },
        Some(on_session_end),
    )
    .await;
    let (grants, grants_task) = grants::spawn(
        grants,
        wiring.policies,
        wiring.shutdown,
        config.rescan_interval,
    );
    let (remote, pump_task) = RemoteDecider::start(Arc::clone(&link), events, grants, &config.host);
    Ok(DecisionService {
        decider: Arc::new(AgentDecider::Remote(remote)),
        mode,
        endpoint: Some(endpoint),
        cli_config,
        link: Some(link),
        tasks: vec![grants_task, pump_task],
        embedded,
        shipper,
    })
}

/// Remote mode: ships the local audit log to the service over the link's addresses.
fn start_shipper(
    config: &AgentConfig,
    mode: DecisionMode,
    link: &AgentLinkConfig,
) -> Result<Option<AuditShipper>, ServiceError> {
    if mode != DecisionMode::Remote {
        return Ok(None);
    }
    let log = crate::audit_ship::AuditDbLog::new(&config.audit_db);
    AuditShipper::start(ShipperConfig::new(link.clone()), log)
        .map(Some)
        .map_err(|source| ServiceError::Link { source })
}

impl DecisionService {
    /// Tells the decision service (remote or embedded) whether the audit log can be written;
    /// a no-op with the local decider.
    pub fn audit_health_reporter(&self) -> impl Fn(&gatekeep_audit::WriterHealth) + Send + 'static {
        let link = self.link.clone();
        move |health| {
            let Some(link) = &link else { return };
            let wire = match &health.failing {
                None => gatekeep_proto::v1::AuditHealth {
                    writable: true,
                    ..Default::default()
                },
                Some(failure) => gatekeep_proto::v1::AuditHealth {
                    writable: false,
                    cause: failure.cause.as_str().to_owned(),
                    error: failure.error.clone(),
                    fix: failure.fix.clone(),
                    since_ms: gatekeep_proto::convert::to_ms(failure.since),
                    held: u64::try_from(failure.held).unwrap_or(u64::MAX),
                    lost: failure.lost,
                },
            };
            if let Err(error) = link.audit_health(wire) {
                tracing::debug!(%error, "cannot report the audit health to the decision service");
            }
        }
    }

    /// Stops the link, the grant task and the embedded service, once the
    /// controller (the decider's other holder) has stopped.
    pub async fn stop(self) {
        let Self {
            decider,
            link,
            mut tasks,
            embedded,
            shipper,
            ..
        } = self;
        drop(decider);
        if let Some(shipper) = shipper {
            // What it did not ship stays in the local log, shipped after the next start.
            shipper.shutdown().await;
        }
        // The grant task ends on the shutdown signal; with it goes the last
        // other holder of the link.
        let pump = if tasks.len() == 2 { tasks.pop() } else { None };
        for task in tasks {
            let _ = task.await;
        }
        if let Some(link) = link {
            // Decision tasks the controller aborted drop their clones soon.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut shared = Some(link);
            let owned =
                poll_until(
                    deadline,
                    std::time::Duration::from_millis(20),
                    || match Arc::try_unwrap(shared.take()?) {
                        Ok(owned) => Some(owned),
                        Err(still_shared) => {
                            shared = Some(still_shared);
                            None
                        }
                    },
                )
                .await;
            match owned {
                Some(owned) => owned.shutdown().await,
                None => {
                    tracing::debug!("the decision service link is still shared at shutdown");
                }
            }
        }
        if let Some(pump) = pump {
            // Ends with the link's event stream.
            if tokio::time::timeout(std::time::Duration::from_secs(5), pump)
                .await
                .is_err()
            {
                tracing::warn!("the decision service event task did not stop");
            }
        }
        if let Some(embedded) = embedded {
            embedded.stop().await;
        }
    }
}
