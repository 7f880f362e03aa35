//! [`AgentLink`]: the agent's connection to the decision service.
//!
//! One task owns the connection and the queue. Requests are queued first and sent when
//! connected; each stays queued until its decision (or a refusal) arrives, and every queued
//! request is re-sent after a reconnect. The service treats request ids idempotently: a
//! re-sent pending request stays one request, and a re-sent decided one is answered with its
//! decision. Withdrawals and session ends made while disconnected are sent on reconnect.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use gatekeep_proto::{
    convert, limits,
    model::{ApprovalRequest, Decision, Grant, WithdrawReason},
    v1::{self, agent_message, agent_service_client::AgentServiceClient, server_message},
};
pub use gatekeep_util::retry::Backoff;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Streaming, transport::Endpoint};
use uuid::Uuid;

use crate::{error::LinkError, tls::ClientTls};

/// How long the service has to answer hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how an [`AgentLink`] connects.
#[derive(Debug, Clone)]
pub struct AgentLinkConfig {
    /// `https://HOST:PORT` of the service.
    pub endpoint: String,
    /// Further replicas of the same service (same database), tried in turn when the one in
    /// use cannot be reached or its stream ends. Pending requests are re-sent to the next
    /// one; the service keeps them by id, so nothing is asked twice.
    pub failover: Vec<String>,
    /// The service's CA and the agent's certificate (required: the service identifies the
    /// agent's host by it).
    pub tls: ClientTls,
    /// Sent in hello, for the service's log.
    pub agent_version: String,
    /// Reconnect delays (doubling, with jitter).
    pub backoff: Backoff,
    /// Longest wait for a TCP + TLS connection.
    pub connect_timeout: Duration,
}

impl AgentLinkConfig {
    /// A config with the default backoff and timeouts.
    pub fn new(endpoint: impl Into<String>, tls: ClientTls) -> Self {
        Self {
            endpoint: endpoint.into(),
            failover: Vec::new(),
            tls,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            // Reconnect delays: 200 ms, doubling up to 15 s, each with up to
            // 20% of jitter.
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(15),
                jitter: true,
            },
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What the link reports besides the answers to [`AgentLink::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Connected (again). `grants` are every grant in force for this host: install exactly
    /// these (remove any other previously installed).
    Connected { host: String, grants: Vec<Grant> },
    /// The connection failed or was lost; the next attempt is in `retry_in`. Queued requests
    /// stay queued.
    Disconnected { error: String, retry_in: Duration },
    /// A decision nobody awaits: of a request queued with [`AgentLink::submit`], or whose
    /// [`AgentLink::decide`] future was dropped (e.g. at the agent's deadline). It may carry
    /// a grant to install.
    Decision(Box<Decision>),
    /// A grant ended (revoked by a reviewer, expired, or its session ended): remove it.
    GrantRevoked {
        grant_id: Uuid,
        revoked_by: String,
        reason: String,
    },
    /// The service refused a message nobody awaits an answer to.
    Rejected {
        request_id: String,
        code: tonic::Code,
        message: String,
    },
}

type Waiter = oneshot::Sender<Result<Decision, LinkError>>;

enum Command {
    Submit {
        request: Box<v1::ApprovalRequest>,
        id: Uuid,
        waiter: Option<Waiter>,
    },
    Withdraw(v1::Withdraw),
    SessionEnded(String),
    AuditHealth(v1::AuditHealth),
}

#[derive(Debug, Default)]
struct Shared {
    pending: AtomicUsize,
    connected: AtomicBool,
}

/// The agent's link to the decision service. Cheap to share by reference; dropping it (or
/// [`shutdown`](Self::shutdown)) ends the connection.
#[derive(Debug)]
pub struct AgentLink {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl AgentLink {
    /// Starts connecting in the background (within the current tokio runtime) and returns the
    /// link and its events. Events queue up unboundedly until read: keep reading them.
    pub fn start(
        config: AgentLinkConfig,
    ) -> Result<(Self, mpsc::UnboundedReceiver<LinkEvent>), LinkError> {
        for endpoint in std::iter::once(&config.endpoint).chain(&config.failover) {
            Endpoint::from_shared(endpoint.clone()).map_err(|err| LinkError::Config {
                message: format!("endpoint `{endpoint}`: {err}"),
            })?;
        }
        if config.tls.identity.is_none() {
            return Err(LinkError::Config {
                message: "an agent needs a client certificate (tls.identity)".into(),
            });
        }
        let (commands, receiver) = mpsc::unbounded_channel();
        let (events, events_out) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(
            Task {
                config: Arc::new(config),
                commands: receiver,
                events,
                shared: Arc::clone(&shared),
                queue: Queue::default(),
            }
            .run(),
        );
        Ok((
            Self {
                commands,
                shared,
                task,
            },
            events_out,
        ))
    }

    fn prepare(request: ApprovalRequest) -> Result<(Uuid, Box<v1::ApprovalRequest>), LinkError> {
        let id = request.id;
        let wire = v1::ApprovalRequest::from(request);
        // Refuse locally what the service would refuse.
        if let Err(err) = ApprovalRequest::try_from(wire.clone()) {
            return Err(LinkError::Rejected {
                request_id: id.to_string(),
                code: tonic::Code::InvalidArgument,
                message: format!("invalid request: {err}"),
            });
        }
        Ok((id, Box::new(wire)))
    }

    /// Queues `request` and waits for its decision, across reconnects. The service answers
    /// at the latest at its deadline (with the policy's timeout action), but only while it
    /// is reachable: bound the wait with the agent's own deadline. Dropping the future keeps
    /// the request queued; its decision then arrives as [`LinkEvent::Decision`] (call
    /// [`withdraw`](Self::withdraw) if it is no longer wanted).
    pub async fn decide(&self, request: ApprovalRequest) -> Result<Decision, LinkError> {
        let (id, request) = Self::prepare(request)?;
        let (waiter, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit {
                request,
                id,
                waiter: Some(waiter),
            })
            .map_err(|_| LinkError::Closed)?;
        answer.await.map_err(|_| LinkError::Closed)?
    }

    /// Queues `request` without waiting; its decision arrives as [`LinkEvent::Decision`].
    pub fn submit(&self, request: ApprovalRequest) -> Result<(), LinkError> {
        let (id, request) = Self::prepare(request)?;
        self.commands
            .send(Command::Submit {
                request,
                id,
                waiter: None,
            })
            .map_err(|_| LinkError::Closed)
    }

    /// The request is no longer wanted (the task died, or asked something else): it leaves
    /// the queue, a pending [`decide`](Self::decide) returns [`LinkError::Withdrawn`], and the
    /// service marks it abandoned.
    pub fn withdraw(
        &self,
        request_id: Uuid,
        reason: WithdrawReason,
        detail: impl Into<String>,
    ) -> Result<(), LinkError> {
        let detail = detail.into();
        convert::reason("detail", detail.clone()).map_err(|err| LinkError::Config {
            message: err.to_string(),
        })?;
        self.commands
            .send(Command::Withdraw(v1::Withdraw {
                request_id: request_id.to_string(),
                reason: v1::WithdrawReason::from(reason).into(),
                detail,
            }))
            .map_err(|_| LinkError::Closed)
    }

    /// The workload's cgroup went away: the service ends its `session` grants (and reports
    /// them as [`LinkEvent::GrantRevoked`]).
    pub fn session_ended(&self, cgroup: impl Into<String>) -> Result<(), LinkError> {
        let cgroup = cgroup.into();
        if cgroup.is_empty() || cgroup.len() > limits::MAX_PATH {
            return Err(LinkError::Config {
                message: "cgroup must be a path of at most 4096 bytes".into(),
            });
        }
        self.commands
            .send(Command::SessionEnded(cgroup))
            .map_err(|_| LinkError::Closed)
    }

    /// Reports whether the agent's audit log can be written (see the `AuditHealth` message);
    /// the last report is sent again after every reconnect.
    pub fn audit_health(&self, health: v1::AuditHealth) -> Result<(), LinkError> {
        self.commands
            .send(Command::AuditHealth(health))
            .map_err(|_| LinkError::Closed)
    }

    /// Requests queued without a decision yet.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Whether the stream is up now.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Closes the connection and waits for the link's task to end. Queued requests are
    /// dropped (their `decide` calls return [`LinkError::Closed`]).
    pub async fn shutdown(self) {
        let Self { commands, task, .. } = self;
        drop(commands);
        drop(task.await);
    }
}

struct Entry {
    seq: u64,
    request: Box<v1::ApprovalRequest>,
    waiter: Option<Waiter>,
    sent: bool,
}

/// Requests awaiting decisions, in submission order, and messages to send on reconnect.
#[derive(Default)]
struct Queue {
    order: BTreeMap<u64, Uuid>,
    entries: HashMap<Uuid, Entry>,
    next: u64,
    withdrawals: Vec<v1::Withdraw>,
    sessions: Vec<String>,
    /// The last audit health reported: sent again on every connect.
    audit_health: Option<v1::AuditHealth>,
}

impl Queue {
    fn remove(&mut self, id: &Uuid) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.order.remove(&entry.seq);
        Some(entry)
    }
}

struct Task {
    config: Arc<AgentLinkConfig>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<LinkEvent>,
    shared: Arc<Shared>,
    queue: Queue,
}

type Outbound = mpsc::UnboundedSender<v1::AgentMessage>;

struct Connection {
    outbound: Outbound,
    inbound: Streaming<v1::ServerMessage>,
    host: String,
    grants: Vec<Grant>,
}

fn message(message: agent_message::Message) -> v1::AgentMessage {
    v1::AgentMessage {
        message: Some(message),
    }
}

impl Task {
    async fn run(mut self) {
        let mut delays = self.config.backoff.delays();
        let endpoints: Vec<String> = std::iter::once(self.config.endpoint.clone())
            .chain(self.config.failover.iter().cloned())
            .collect();
        // Which address is tried next, and how many failed in a row since one worked.
        let mut current = 0;
        let mut failed = 0;
        loop {
            let config = Arc::clone(&self.config);
            let endpoint = &endpoints[current];
            let attempt = connect(&config, endpoint);
            tokio::pin!(attempt);
            let connected = loop {
                tokio::select! {
                    result = &mut attempt => break result,
                    command = self.commands.recv() => match command {
                        Some(command) => self.apply(command, None),
                        None => return,
                    },
                }
            };
            let error = match connected {
                Ok(connection) => {
                    delays.reset();
                    failed = 0;
                    match self.serve(connection).await {
                        Some(error) => error,
                        None => return,
                    }
                }
                Err(error) => error,
            };
            self.shared.connected.store(false, Ordering::Relaxed);
            // The next address at once; the back-off only once every address failed in turn.
            current = (current + 1) % endpoints.len();
            failed += 1;
            let delay = if failed < endpoints.len() {
                Duration::ZERO
            } else {
                failed = 0;
                delays.next().unwrap_or(self.config.backoff.max)
            };
            tracing::warn!(%error, retry_in = ?delay, "decision service link down");
            self.emit(LinkEvent::Disconnected {
                error,
                retry_in: delay,
            });
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        Some(command) => self.apply(command, None),
                        None => return,
                    },
                }
            }
        }
    }

    fn emit(&self, event: LinkEvent) {
        // Nobody listening is the caller's choice.
        drop(self.events.send(event));
    }

    fn update_pending(&self) {
        self.shared
            .pending
            .store(self.queue.entries.len(), Ordering::Relaxed);
    }

    /// Runs one connection: re-sends what is queued, then relays. `None` when the link is
    /// shut down, else why the connection ended.
    async fn serve(&mut self, connection: Connection) -> Option<String> {
        let Connection {
            outbound,
            mut inbound,
            host,
            grants,
        } = connection;
        self.shared.connected.store(true, Ordering::Relaxed);
        tracing::info!(%host, grants = grants.len(), "connected to the decision service");
        self.emit(LinkEvent::Connected { host, grants });
        for withdraw in std::mem::take(&mut self.queue.withdrawals) {
            drop(outbound.send(message(agent_message::Message::Withdraw(withdraw))));
        }
        for cgroup in std::mem::take(&mut self.queue.sessions) {
            drop(outbound.send(message(agent_message::Message::SessionEnded(
                v1::SessionEnded { cgroup },
            ))));
        }
        if let Some(health) = &self.queue.audit_health {
            drop(outbound.send(message(agent_message::Message::AuditHealth(health.clone()))));
        }
        for id in self.queue.order.values() {
            if let Some(entry) = self.queue.entries.get_mut(id) {
                drop(outbound.send(message(agent_message::Message::Request(
                    (*entry.request).clone(),
                ))));
                entry.sent = true;
            }
        }
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.apply(command, Some(&outbound)),
                    None => return None,
                },
                received = inbound.message() => match received {
                    Ok(Some(received)) => self.receive(received),
                    Ok(None) => return Some("the decision service closed the stream".into()),
                    Err(status) => return Some(format!("{} ({:?})", status.message(), status.code())),
                },
            }
        }
    }

    /// Applies a caller's command; sends it at once when connected.
    fn apply(&mut self, command: Command, outbound: Option<&Outbound>) {
        match command {
            Command::Submit {
                request,
                id,
                waiter,
            } => {
                let sent = outbound.is_some_and(|outbound| {
                    outbound
                        .send(message(agent_message::Message::Request((*request).clone())))
                        .is_ok()
                });
                if let Some(entry) = self.queue.entries.get_mut(&id) {
                    // The same id again: one request, the newest waiter.
                    if waiter.is_some() {
                        entry.waiter = waiter;
                    }
                    entry.sent |= sent;
                } else {
                    let seq = self.queue.next;
                    self.queue.next += 1;
                    self.queue.order.insert(seq, id);
                    self.queue.entries.insert(
                        id,
                        Entry {
                            seq,
                            request,
                            waiter,
                            sent,
                        },
                    );
                }
            }
            Command::Withdraw(withdraw) => {
                let id = Uuid::try_parse(&withdraw.request_id).ok();
                let entry = id.and_then(|id| self.queue.remove(&id));
                let was_sent = entry.as_ref().is_none_or(|entry| entry.sent);
                if let Some(waiter) = entry.and_then(|entry| entry.waiter) {
                    drop(waiter.send(Err(LinkError::Withdrawn {
                        request_id: withdraw.request_id.clone(),
                    })));
                }
                if was_sent {
                    match outbound {
                        Some(outbound) => {
                            drop(
                                outbound.send(message(agent_message::Message::Withdraw(withdraw))),
                            );
                        }
                        None => self.queue.withdrawals.push(withdraw),
                    }
                }
            }
            Command::SessionEnded(cgroup) => match outbound {
                Some(outbound) => {
                    drop(outbound.send(message(agent_message::Message::SessionEnded(
                        v1::SessionEnded { cgroup },
                    ))));
                }
                None => self.queue.sessions.push(cgroup),
            },
            Command::AuditHealth(health) => {
                if let Some(outbound) = outbound {
                    drop(
                        outbound.send(message(agent_message::Message::AuditHealth(health.clone()))),
                    );
                }
                self.queue.audit_health = Some(health);
            }
        }
        self.update_pending();
    }

    /// Handles a message from the service.
    fn receive(&mut self, received: v1::ServerMessage) {
        match received.message {
            Some(server_message::Message::Decision(wire)) => {
                let decision = match Decision::try_from(wire) {
                    Ok(decision) => decision,
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an invalid decision from the service");
                        return;
                    }
                };
                let Some(entry) = self.queue.remove(&decision.request_id) else {
                    tracing::debug!(request_id = %decision.request_id, "decision for a request no longer queued");
                    return;
                };
                let unanswered = match entry.waiter {
                    Some(waiter) => waiter.send(Ok(decision)).err().and_then(Result::ok),
                    None => Some(decision),
                };
                if let Some(decision) = unanswered {
                    self.emit(LinkEvent::Decision(Box::new(decision)));
                }
            }
            Some(server_message::Message::GrantRevoked(revoked)) => {
                match Uuid::try_parse(&revoked.grant_id) {
                    Ok(grant_id) => self.emit(LinkEvent::GrantRevoked {
                        grant_id,
                        revoked_by: revoked.revoked_by,
                        reason: revoked.reason,
                    }),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a revocation with an invalid grant id");
                    }
                }
            }
            Some(server_message::Message::Rejected(rejected)) => {
                let code = tonic::Code::from_i32(rejected.code);
                let entry = Uuid::try_parse(&rejected.request_id)
                    .ok()
                    .and_then(|id| self.queue.remove(&id));
                let error = LinkError::Rejected {
                    request_id: rejected.request_id.clone(),
                    code,
                    message: rejected.message.clone(),
                };
                let answered = entry
                    .and_then(|entry| entry.waiter)
                    .is_some_and(|waiter| waiter.send(Err(error)).is_ok());
                if !answered {
                    self.emit(LinkEvent::Rejected {
                        request_id: rejected.request_id,
                        code,
                        message: rejected.message,
                    });
                }
            }
            Some(server_message::Message::Welcome(_)) | None => {
                tracing::debug!("ignoring an unexpected message from the service");
            }
        }
        self.update_pending();
    }
}

/// The endpoint of `address` with `config`'s TLS, timeouts and keep-alives.
pub(crate) fn endpoint(config: &AgentLinkConfig, address: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(address.to_owned())
        .map_err(|err| format!("invalid endpoint `{address}`: {err}"))?
        .tls_config(config.tls.config())
        .map_err(|err| format!("invalid tls settings: {err}"))?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Connects to `address`, says hello and waits for welcome.
async fn connect(config: &AgentLinkConfig, address: &str) -> Result<Connection, String> {
    let channel = endpoint(config, address)?.connect().await.map_err(|err| {
        let mut text = format!("cannot connect to {address}: {err}");
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    })?;
    let (outbound, receiver) = mpsc::unbounded_channel();
    drop(
        outbound.send(message(agent_message::Message::Hello(v1::Hello {
            agent_version: config.agent_version.clone(),
        }))),
    );
    let mut client =
        AgentServiceClient::new(channel).max_decoding_message_size(limits::MAX_MESSAGE_BYTES);
    let response = client
        .connect(UnboundedReceiverStream::new(receiver))
        .await
        .map_err(|status| format!("{} ({:?})", status.message(), status.code()))?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .map_err(|_| "no welcome from the decision service within 30s".to_owned())?
        .map_err(|status| format!("{} ({:?})", status.message(), status.code()))?;
    let Some(server_message::Message::Welcome(welcome)) = first.and_then(|m| m.message) else {
        return Err("the decision service did not answer hello with welcome".into());
    };
    let grants = welcome
        .grants
        .into_iter()
        .filter_map(|grant| match Grant::try_from(grant) {
            Ok(grant) => Some(grant),
            Err(error) => {
                tracing::warn!(%error, "ignoring an invalid grant from the service");
                None
            }
        })
        .collect();
    Ok(Connection {
        outbound,
        inbound,
        host: welcome.host,
        grants,
    })
}
