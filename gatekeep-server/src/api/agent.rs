//! `gatekeep.v1.AgentService`: one bidirectional stream per agent.

use std::{pin::Pin, sync::Arc, time::Duration};

use gatekeep_proto::{
    WireError, convert,
    host_audit::ShipBatch,
    model::{ApprovalRequest, Decision},
    v1::{
        self, AgentMessage, ServerMessage, agent_message, agent_service_server::AgentService,
        server_message,
    },
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::{Stream, wrappers::UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth,
    error::Error,
    hub::AgentSender,
    lifecycle::{Engine, Submitted},
};

/// How long an agent has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests of one agent handled at once. Withdrawals wait for those in flight, so a request
/// is always stored before its withdrawal.
const MAX_IN_FLIGHT: u32 = 256;

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    engine: Arc<Engine>,
}

impl AgentApi {
    #[must_use]
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn send(sender: &AgentSender, message: server_message::Message) {
    // A closed stream means the agent went away; it re-sends what it still needs.
    drop(sender.send(Ok(ServerMessage {
        message: Some(message),
    })));
}

/// Refuses one message: the stream stays open and nothing changed. Internal details stay in
/// the service's log (the `Status` conversion hides them).
fn reject(sender: &AgentSender, request_id: &str, error: Error) {
    let status = Status::from(error);
    reject_plain(sender, request_id, status.code(), status.message());
}

fn reject_plain(sender: &AgentSender, request_id: &str, code: tonic::Code, message: &str) {
    send(
        sender,
        server_message::Message::Rejected(v1::Rejected {
            request_id: request_id.to_owned(),
            code: code as i32,
            message: message.to_owned(),
        }),
    );
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let host = auth::agent_host(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30s"))??;
        let Some(agent_message::Message::Hello(hello)) = first.and_then(|m| m.message) else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        convert::text(
            "agent_version",
            &hello.agent_version,
            gatekeep_proto::limits::MAX_NAME,
        )
        .map_err(Error::from)?;
        let grants = self.engine.active_grants(&host).await?;
        let (sender, receiver) = mpsc::unbounded_channel();
        send(
            &sender,
            server_message::Message::Welcome(v1::Welcome {
                host: host.clone(),
                server_time_ms: convert::to_ms(time::OffsetDateTime::now_utc()),
                grants: grants.into_iter().map(Into::into).collect(),
            }),
        );
        let connection = self.engine.hub.register(&host, sender.clone());
        tracing::info!(%host, agent_version = %hello.agent_version, "agent connected");
        let engine = Arc::clone(&self.engine);
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = engine.shutdown.cancelled() => break,
                };
                match message {
                    Ok(Some(message)) => {
                        handle(&engine, &host, &sender, &in_flight, message).await;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(%host, %status, "agent stream failed");
                        break;
                    }
                }
            }
            // Let what is in flight answer before the stream closes.
            drop(in_flight.acquire_many(MAX_IN_FLIGHT).await);
            engine.hub.unregister(&host, connection);
            tracing::info!(%host, "agent disconnected");
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }

    async fn ship_audit(
        &self,
        request: Request<v1::ShipAuditRequest>,
    ) -> Result<Response<v1::ShipAuditResponse>, Status> {
        // The certificate names the host: one host cannot ship as another.
        let host = auth::agent_host(&request)?;
        let batch = ShipBatch::try_from(request.into_inner()).map_err(Error::from)?;
        let shipped = self.engine.ship_host_audit(&host, batch).await?;
        let (head_seq, head_hash) = shipped
            .head
            .map_or((0, String::new()), |head| (head.seq, head.hash));
        Ok(Response::new(v1::ShipAuditResponse {
            head_seq,
            head_hash,
            divergence: shipped.divergence.map(Into::into),
        }))
    }
}

async fn handle(
    engine: &Arc<Engine>,
    host: &str,
    sender: &AgentSender,
    in_flight: &Arc<Semaphore>,
    message: AgentMessage,
) {
    match message.message {
        Some(agent_message::Message::Request(wire)) => {
            let request_id = wire.request_id.clone();
            let request = match ApprovalRequest::try_from(wire) {
                Ok(request) => request,
                Err(error) => return reject(sender, &request_id, Error::from(error)),
            };
            let Ok(permit) = Arc::clone(in_flight).acquire_owned().await else {
                return;
            };
            let engine = Arc::clone(engine);
            let host = host.to_owned();
            let sender = sender.clone();
            tokio::spawn(async move {
                let early = |decision: &Decision| {
                    send(
                        &sender,
                        server_message::Message::Decision(decision.clone().into()),
                    );
                };
                match engine.submit(&host, request, early).await {
                    Ok(Submitted::Decided(decision)) => {
                        send(&sender, server_message::Message::Decision(decision.into()));
                    }
                    Ok(Submitted::Delivered(_) | Submitted::Pending) => {}
                    Err(error) => reject(&sender, &request_id, error),
                }
                // Held until the request is stored: at most MAX_IN_FLIGHT per agent.
                drop(permit);
            });
        }
        Some(agent_message::Message::Withdraw(withdraw)) => {
            let parsed = convert::id("request_id", &withdraw.request_id)
                .and_then(|id| Ok((id, convert::withdraw_reason(withdraw.reason)?)))
                .and_then(|parsed| {
                    convert::reason("detail", withdraw.detail.clone()).map(|d| (parsed, d))
                });
            let ((id, reason), detail) = match parsed {
                Ok(parsed) => parsed,
                Err(error) => return reject(sender, &withdraw.request_id, Error::from(error)),
            };
            // The request may still be on its way to the store.
            let Ok(all) = in_flight.acquire_many(MAX_IN_FLIGHT).await else {
                return;
            };
            drop(all);
            if let Err(error) = engine.withdraw(host, id, reason, detail).await {
                reject(sender, &withdraw.request_id, error);
            }
        }
        Some(agent_message::Message::SessionEnded(ended)) => {
            let cgroup = if ended.cgroup.is_empty() {
                Err(WireError::Missing {
                    field: "cgroup".into(),
                })
            } else {
                convert::text("cgroup", &ended.cgroup, gatekeep_proto::limits::MAX_PATH)
            };
            if let Err(error) = cgroup {
                return reject(sender, "", Error::from(error));
            }
            if let Err(error) = engine.session_ended(host, &ended.cgroup).await {
                reject(sender, "", error);
            }
        }
        Some(agent_message::Message::AuditHealth(health)) => {
            if let Err(error) = audit_health(engine, host, &health).await {
                reject(sender, "", error);
            }
        }
        Some(agent_message::Message::Hello(_)) => reject(
            sender,
            "",
            Error::BadArgument {
                message: "hello was already sent on this stream".into(),
            },
        ),
        None => reject(
            sender,
            "",
            Error::from(WireError::Missing {
                field: "message".into(),
            }),
        ),
    }
}

/// An agent's audit log health: logged (error level while the log cannot be written) and
/// recorded (`agent_audit_health`). Every text an agent sends is escaped before it reaches a
/// log line.
async fn audit_health(engine: &Engine, host: &str, health: &v1::AuditHealth) -> Result<(), Error> {
    convert::text("cause", &health.cause, gatekeep_proto::limits::MAX_NAME)?;
    convert::text("error", &health.error, gatekeep_proto::limits::MAX_REASON)?;
    convert::text("fix", &health.fix, gatekeep_proto::limits::MAX_REASON)?;
    let clip = |text: &str| {
        let clipped: String = text.chars().take(1024).collect();
        clipped.escape_debug().to_string()
    };
    if health.writable {
        tracing::info!(host, "the agent's audit log can be written");
    } else {
        tracing::error!(
            host,
            cause = clip(&health.cause),
            error = clip(&health.error),
            fix = clip(&health.fix),
            since_ms = health.since_ms,
            held = health.held,
            lost = health.lost,
            "the agent's audit log cannot be written: it denies asked actions until it can"
        );
    }
    let payload = serde_json::json!({
        "writable": health.writable,
        "cause": health.cause,
        "error": health.error,
        "fix": health.fix,
        "since_ms": health.since_ms,
        "held": health.held,
        "lost": health.lost,
    });
    engine.agent_audit_health(host, &payload).await;
    Ok(())
}
