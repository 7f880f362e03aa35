//! The service, assembled: [`Server::builder`] opens the state database and the audit log,
//! binds the listener and returns a [`Server`] whose [`serve`](Server::serve) runs until a
//! shutdown future completes. The same entry point serves a fleet or, embedded in the agent,
//! a single host on `127.0.0.1` with an in-memory CA ([`Pki::ephemeral`](crate::certs::Pki)).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use gatekeep_audit::{AuditWriter, WriterConfig};
use gatekeep_policy::PolicySet;
use gatekeep_proto::{
    limits,
    v1::{agent_service_server::AgentServiceServer, review_service_server::ReviewServiceServer},
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::{
    service::Routes,
    transport::{Certificate, Identity, ServerTlsConfig},
};

use crate::{
    api::{AgentApi, ReviewApi, http},
    audit_log::AuditLog,
    auth::{self, Reviewer, session::Sessions},
    certs::TlsMaterial,
    config::{ConsoleConfig, ServerConfig},
    error::Error,
    fanout,
    lifecycle::{Engine, EngineParts},
    metrics::{self, Metrics, TimedStore},
    notify::Notify,
    rules::Rules,
    store::{self, Store, postgres::audit::PostgresChain},
};

/// Builds a [`Server`].
#[must_use = "a builder does nothing until built"]
pub struct ServerBuilder {
    config: ServerConfig,
    tls: Option<TlsMaterial>,
    listener: Option<std::net::TcpListener>,
    policies: Option<PolicySet>,
    store: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// TLS material in memory, instead of the files named in the config.
    pub fn tls(mut self, tls: TlsMaterial) -> Self {
        self.tls = Some(tls);
        self
    }

    /// An already bound listener, instead of binding `config.listen` (e.g. port 0 bound by
    /// the caller).
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Policies the service trusts over the agents' copies, instead of `config.policy_dir`.
    pub fn policies(mut self, policies: PolicySet) -> Self {
        self.policies = Some(policies);
        self
    }

    /// Another storage backend, instead of `SQLite` at `config.state_db()`.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Opens the databases (creating `data_dir`), loads policies and TLS material, and binds.
    pub async fn build(self) -> Result<Server, Error> {
        let config = self.config;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::ReadConfig {
            path: config.data_dir.clone(),
            source,
        })?;
        let tls = match self.tls {
            Some(tls) => tls,
            None => TlsMaterial::load(&config.tls)?,
        };
        let policies = match (self.policies, &config.policy_dir) {
            (Some(policies), _) => Some(policies),
            (None, Some(dir)) => {
                Some(PolicySet::load_dir(dir).map_err(|source| Error::Policy { source })?)
            }
            (None, None) => None,
        };
        let rules = Rules::compile(&config.rules, &config.host_groups)?;
        // Checked (and its secrets read) before anything is opened: a wrong [notify] section
        // stops the start with its cause.
        let notify = Notify::new(&config.notify, &config.host_groups)?;
        let store: Arc<dyn Store> = match self.store {
            Some(store) => store,
            None => store::open(&config.store, config.state_db(), config.synchronous).await?,
        };
        let metrics = Arc::new(Metrics::new());
        let store = TimedStore::wrap(store, Arc::clone(&metrics));
        // Bound now, so a taken port stops the start with its cause.
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        // On PostgreSQL the audit chain is in the database too: one chain for every replica.
        let (audit, audit_log) = if let Some(postgres) = store.postgres() {
            (
                AuditWriter::spawn(PostgresChain::new(postgres), WriterConfig::default()),
                AuditLog::Postgres(Box::new(postgres.clone())),
            )
        } else {
            let path = config.audit_db();
            let writer = tokio::task::spawn_blocking({
                let path = path.clone();
                move || AuditWriter::open(path, WriterConfig::default())
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
            (writer, AuditLog::Sqlite(path))
        };
        let audit = audit.map_err(|source| Error::Audit { source })?;
        let listener = match self.listener {
            Some(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|source| Error::Bind {
                        addr: "the given listener".into(),
                        source,
                    })?;
                TcpListener::from_std(listener)
            }
            None => TcpListener::bind(config.listen).await,
        }
        .map_err(|source| Error::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
        let engine = Arc::new(Engine::new(EngineParts {
            store,
            audit: Arc::new(audit),
            audit_log,
            rules,
            policies,
            name: config.name.clone(),
            history_limit: config.history_limit,
            metrics,
        }));
        Ok(Server {
            engine,
            listener,
            local_addr,
            tls,
            console: config.console,
            notify,
            metrics_listener,
        })
    }
}

/// A bound decision service, ready to [`serve`](Self::serve).
pub struct Server {
    engine: Arc<Engine>,
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: TlsMaterial,
    console: ConsoleConfig,
    notify: Option<Notify>,
    metrics_listener: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts building a service from `config`.
    pub fn builder(config: ServerConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            tls: None,
            listener: None,
            policies: None,
            store: None,
        }
    }

    /// The engine every surface decides through (the in-process HTTP probe builds its router
    /// on it).
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of `/metrics`, when `[metrics] listen` is set.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// The URL clients connect to: `https://127.0.0.1:PORT` (loopback when listening on
    /// every address).
    #[must_use]
    pub fn endpoint(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("https://{addr}")
    }

    /// The web console's address (`https://127.0.0.1:PORT/console/`), when it is enabled.
    #[must_use]
    pub fn console_url(&self) -> Option<String> {
        self.console
            .enabled
            .then(|| format!("{}/console/", self.endpoint()))
    }

    /// The CA certificate clients must trust (PEM).
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.tls.ca_pem
    }

    /// Adds a reviewer and returns their token (shown once; only its hash is stored).
    pub async fn add_reviewer(&self, name: &str, groups: &[String]) -> Result<String, Error> {
        add_reviewer(&*self.engine.store, name, groups).await
    }

    /// Serves until `shutdown` completes, then ends every agent stream and watch, stops
    /// accepting, and commits the audit log before returning.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.tls.server.cert_pem,
                &self.tls.server.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.tls.ca_pem))
            // Agents must present a certificate (checked by the agent service); reviewers
            // use tokens and present none. An untrusted certificate fails the handshake.
            .client_auth_optional(true);
        let engine = Arc::clone(&self.engine);
        // Notification feeds subscribe before anything is served, so they miss no change.
        let mut notify = match self.notify {
            Some(notify) => Some(notify.start(&engine, &self.console.max_auth_age)?),
            None => None,
        };
        let timer = tokio::spawn(Arc::clone(&engine).run_timer());
        // Writes what a replica killed between a decision's commit and its audit records'
        // left unwritten, and settles what this one writes.
        let recovery = tokio::spawn(Arc::clone(&engine).run_audit_recovery());
        let metrics = self
            .metrics_listener
            .map(|listener| spawn_metrics(listener, &engine));
        // Replicas sharing the database: their changes reach this one's agents and watchers.
        let fanout = engine
            .store
            .changes()
            .map(|changes| tokio::spawn(fanout::follow(Arc::clone(&engine), changes)));
        let stopping = Arc::clone(&engine);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down");
            stopping.shutdown.cancel();
            stopping.hub.close_all();
        };
        tracing::info!(addr = %self.local_addr, "decision service listening");
        // Small messages both ways: no Nagle delay on accepted connections.
        let incoming = TcpListenerStream::new(self.listener).map(|stream| {
            if let Ok(stream) = &stream
                && let Err(error) = stream.set_nodelay(true)
            {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            stream
        });
        // gRPC and the HTTP API/console share this listener, routed by path (see api::http).
        // Sessions: the console's (cookies) and the CLI's (`gatekeep login`, bearer tokens
        // on both APIs).
        let sessions = Arc::new(Sessions::new(Duration::from_secs(
            self.console.session_ttl_secs,
        )));
        let grpc = Routes::new(
            AgentServiceServer::new(AgentApi::new(Arc::clone(&engine)))
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES),
        )
        .add_service(
            ReviewServiceServer::new(
                ReviewApi::new(Arc::clone(&engine))
                    .with_max_auth_age(self.console.max_auth_age.clone())
                    .with_sessions(Arc::clone(&sessions)),
            )
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES),
        );
        let mut router = grpc.into_axum_router();
        // Slack's interactions come signed by Slack, not from a console session: served
        // whenever Slack is configured, console or not.
        if let Some(slack) = notify.as_mut().and_then(|running| running.router.take()) {
            router = router.merge(slack);
        }
        if self.console.enabled {
            router = router.merge(http::router(
                Arc::clone(&engine),
                &self.console,
                Arc::clone(&sessions),
            )?);
        }
        let result = tonic::transport::Server::builder()
            // Find agents that vanished without closing their connection.
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tls_config(tls)
            .map_err(|source| Error::Transport { source })?
            .add_routes(Routes::from(router))
            .serve_with_incoming_shutdown(incoming, signal)
            .await
            .map_err(|source| Error::Transport { source });
        engine.shutdown.cancel();
        drop(timer.await);
        drop(recovery.await);
        if let Some(metrics) = metrics
            && let Ok(Err(error)) = metrics.await
        {
            tracing::warn!(%error, "the metrics listener failed");
        }
        if let Some(fanout) = fanout {
            drop(fanout.await);
        }
        if let Some(notify) = notify {
            notify.finish().await;
        }
        let audit = Arc::clone(engine.audit());
        let flushed = tokio::task::spawn_blocking(move || audit.shutdown())
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match flushed {
            Ok(_) | Err(gatekeep_audit::AuditError::WriterClosed) => {}
            Err(source) => return Err(Error::Audit { source }),
        }
        result
    }
}

/// Serves `/metrics` on `listener` until the engine shuts down.
fn spawn_metrics(
    listener: TcpListener,
    engine: &Arc<Engine>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let scraped = Arc::clone(engine);
    let render = move || {
        let engine = Arc::clone(&scraped);
        async move { engine.metrics.render(&*engine.store).await }
    };
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics served at /metrics");
    tokio::spawn(metrics::serve(
        listener,
        render,
        engine.shutdown.clone().cancelled_owned(),
    ))
}

/// Adds a reviewer to `store` and returns the new token.
pub async fn add_reviewer(
    store: &dyn Store,
    name: &str,
    groups: &[String],
) -> Result<String, Error> {
    let name = gatekeep_proto::convert::name("name", name)?;
    let groups = groups
        .iter()
        .map(|group| gatekeep_proto::convert::name("group", group))
        .collect::<Result<Vec<_>, _>>()?;
    let token = auth::new_token()?;
    store
        .add_reviewer(
            Reviewer {
                name,
                groups,
                email: None,
            },
            auth::token_hash(&token),
        )
        .await?;
    Ok(token)
}
