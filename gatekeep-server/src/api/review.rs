//! `gatekeep.v1.ReviewService`: what reviewers (and the `gatekeep` CLI) call.
//!
//! Every call authenticates a reviewer token first. Any reviewer may read (list, watch,
//! get, grants, status, audit); deciding, cancelling and revoking need a reviewer group of
//! the request's policy.

use std::{pin::Pin, sync::Arc};

use gatekeep_proto::{
    WireError, convert,
    model::{Kind, RequestRecord},
    v1::{self, review_service_server::ReviewService},
};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    auth::Authenticator,
    error::Error,
    lifecycle::Engine,
    store::{GrantQuery, RequestQuery},
};

/// Most requests one list returns.
const MAX_LIST: u32 = 1000;
/// Bytes of JSON Lines per export message.
const EXPORT_CHUNK: usize = 64 * 1024;

/// The review service.
#[derive(Clone)]
pub struct ReviewApi {
    engine: Arc<Engine>,
    auth: Authenticator,
}

impl std::fmt::Debug for ReviewApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewApi").finish_non_exhaustive()
    }
}

impl ReviewApi {
    #[must_use]
    pub fn new(engine: Arc<Engine>) -> Self {
        let auth = Authenticator::new(Arc::clone(&engine.store));
        Self { engine, auth }
    }
}

/// A validated request filter.
#[derive(Debug, Clone, Default)]
struct Filter {
    host: Option<String>,
    policy: Option<String>,
    kind: Option<Kind>,
}

impl Filter {
    fn parse(wire: Option<v1::RequestFilter>) -> Result<Self, WireError> {
        let wire = wire.unwrap_or_default();
        let opt = |field: &str, value: &str| {
            if value.is_empty() {
                Ok(None)
            } else {
                convert::name(field, value).map(Some)
            }
        };
        Ok(Self {
            host: opt("filter.host", &wire.host)?,
            policy: opt("filter.policy", &wire.policy)?,
            kind: if wire.kind == 0 {
                None
            } else {
                Some(Kind::try_from(wire.kind)?)
            },
        })
    }

    fn matches(&self, record: &RequestRecord) -> bool {
        self.host.as_ref().is_none_or(|host| *host == record.host)
            && self
                .policy
                .as_ref()
                .is_none_or(|policy| *policy == record.request.policy)
            && self.kind.is_none_or(|kind| kind == record.request.kind())
    }
}

fn opt_name(field: &str, value: &str) -> Result<Option<String>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        Ok(Some(convert::name(field, value)?))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;
type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportAuditChunk, Status>> + Send>>;

fn audit_status(error: gatekeep_audit::AuditError) -> Status {
    match error {
        gatekeep_audit::AuditError::Tampered { .. } => Status::data_loss(error.to_string()),
        source => Status::from(Error::Audit { source }),
    }
}

#[tonic::async_trait]
impl ReviewService for ReviewApi {
    type WatchStream = WatchStream;
    type ExportAuditStream = ExportStream;

    async fn list_pending(
        &self,
        request: Request<v1::ListPendingRequest>,
    ) -> Result<Response<v1::ListPendingResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let wire = request.into_inner();
        let filter = Filter::parse(wire.filter).map_err(Error::from)?;
        if wire.limit > MAX_LIST {
            return Err(Error::BadArgument {
                message: format!("limit {} is more than {MAX_LIST}", wire.limit),
            }
            .into());
        }
        let limit = if wire.limit == 0 {
            MAX_LIST
        } else {
            wire.limit
        };
        let requests = self
            .engine
            .store
            .list_requests(RequestQuery {
                state: Some(gatekeep_proto::model::RequestState::Pending),
                host: filter.host,
                policy: filter.policy,
                kind: filter.kind,
                limit: limit as usize,
                ..RequestQuery::default()
            })
            .await
            .map_err(Error::from)?;
        Ok(Response::new(v1::ListPendingResponse {
            requests: requests.into_iter().map(Into::into).collect(),
        }))
    }

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.auth.reviewer(&request).await?;
        let filter = Filter::parse(request.into_inner().filter).map_err(Error::from)?;
        // Subscribe before listing, so nothing falls between the two.
        let mut changes = self.engine.hub.subscribe();
        let initial = self
            .engine
            .store
            .list_requests(RequestQuery {
                state: Some(gatekeep_proto::model::RequestState::Pending),
                host: filter.host.clone(),
                policy: filter.policy.clone(),
                kind: filter.kind,
                limit: MAX_LIST as usize,
                ..RequestQuery::default()
            })
            .await
            .map_err(Error::from)?;
        let (sender, receiver) = mpsc::channel(256);
        let shutdown = self.engine.shutdown.clone();
        tokio::spawn(async move {
            for record in initial {
                let event = v1::WatchEvent {
                    initial: true,
                    request: Some(record.into()),
                };
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let change = tokio::select! {
                    change = changes.recv() => change,
                    () = sender.closed() => return,
                    () = shutdown.cancelled() => {
                        drop(sender.send(Err(Status::unavailable("the decision service is shutting down"))).await);
                        return;
                    }
                };
                match change {
                    Ok(record) if filter.matches(&record) => {
                        let event = v1::WatchEvent {
                            initial: false,
                            request: Some(record.into()),
                        };
                        if sender.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        drop(
                            sender
                                .send(Err(Status::resource_exhausted(format!(
                                    "the watch fell {missed} changes behind; watch again"
                                ))))
                                .await,
                        );
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn get_request(
        &self,
        request: Request<v1::GetRequestRequest>,
    ) -> Result<Response<v1::GetRequestResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let id = convert::id("request_id", &request.get_ref().request_id).map_err(Error::from)?;
        let (record, similar) = self.engine.get(id).await?;
        Ok(Response::new(v1::GetRequestResponse {
            request: Some(record.into()),
            similar: similar.into_iter().map(Into::into).collect(),
        }))
    }

    async fn resolve_request_id(
        &self,
        request: Request<v1::ResolveRequestIdRequest>,
    ) -> Result<Response<v1::ResolveRequestIdResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let prefix = &request.get_ref().prefix;
        convert::text("prefix", prefix, gatekeep_proto::limits::MAX_ID).map_err(Error::from)?;
        let id = self.engine.resolve_request_id(prefix).await?;
        Ok(Response::new(v1::ResolveRequestIdResponse {
            request_id: id.to_string(),
        }))
    }

    async fn decide(
        &self,
        request: Request<v1::DecideRequest>,
    ) -> Result<Response<v1::DecideResponse>, Status> {
        let reviewer = self.auth.reviewer(&request).await?;
        let wire = request.into_inner();
        let id = convert::id("request_id", &wire.request_id).map_err(Error::from)?;
        let verdict = convert::verdict("verdict", wire.verdict).map_err(Error::from)?;
        let reason = convert::reason("reason", wire.reason).map_err(Error::from)?;
        let duration = convert::duration("duration", &wire.duration).map_err(Error::from)?;
        let scope = convert::scope("scope", &wire.scope).map_err(Error::from)?;
        let record = self
            .engine
            .decide(&reviewer, id, verdict, reason, duration, scope)
            .await?;
        Ok(Response::new(v1::DecideResponse {
            request: Some(record.into()),
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let reviewer = self.auth.reviewer(&request).await?;
        let wire = request.into_inner();
        let id = convert::id("request_id", &wire.request_id).map_err(Error::from)?;
        let reason = convert::reason("reason", wire.reason).map_err(Error::from)?;
        let record = self.engine.cancel(&reviewer, id, reason).await?;
        Ok(Response::new(v1::CancelResponse {
            request: Some(record.into()),
        }))
    }

    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let wire = request.into_inner();
        let grants = self
            .engine
            .store
            .list_grants(
                GrantQuery {
                    host: opt_name("host", &wire.host)?,
                    policy: opt_name("policy", &wire.policy)?,
                    include_inactive: wire.include_inactive,
                },
                time::OffsetDateTime::now_utc(),
            )
            .await
            .map_err(Error::from)?;
        Ok(Response::new(v1::ListGrantsResponse {
            grants: grants.into_iter().map(Into::into).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::RevokeGrantResponse>, Status> {
        let reviewer = self.auth.reviewer(&request).await?;
        let wire = request.into_inner();
        let id = convert::id("grant_id", &wire.grant_id).map_err(Error::from)?;
        let reason = convert::reason("reason", wire.reason).map_err(Error::from)?;
        let grant = self.engine.revoke_grant(&reviewer, id, &reason).await?;
        Ok(Response::new(v1::RevokeGrantResponse {
            grant: Some(grant.into()),
        }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let reviewer = self.auth.reviewer(&request).await?;
        let pending = self
            .engine
            .store
            .count_pending()
            .await
            .map_err(Error::from)?;
        let audit_records = self.engine.audit_head().await?;
        let path = self.engine.audit_path.clone();
        let head = tokio::task::spawn_blocking(move || gatekeep_audit::AuditStore::open(&path))
            .await
            .map_err(|_| Status::internal("audit task failed"))?
            .map_err(|source| Error::Audit { source })?
            .head()
            .map(|head| head.hash.clone())
            .unwrap_or_default();
        Ok(Response::new(v1::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_ms: convert::to_ms(self.engine.started_at),
            pending,
            connected_agents: self.engine.hub.connected(),
            audit_records,
            audit_head: head,
            reviewer: reviewer.name,
            groups: reviewer.groups,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<v1::VerifyAuditRequest>,
    ) -> Result<Response<v1::VerifyAuditResponse>, Status> {
        self.auth.reviewer(&request).await?;
        self.engine.audit_head().await?;
        let path = self.engine.audit_path.clone();
        let report = tokio::task::spawn_blocking(move || gatekeep_audit::verify(&path))
            .await
            .map_err(|_| Status::internal("audit task failed"))?
            .map_err(audit_status)?;
        let head = report.head.unwrap_or(gatekeep_audit::ChainHead {
            seq: 0,
            hash: String::new(),
        });
        Ok(Response::new(v1::VerifyAuditResponse {
            records: report.records,
            head_seq: head.seq,
            head_hash: head.hash,
            guards_intact: report.guards_intact.unwrap_or(false),
        }))
    }

    async fn export_audit(
        &self,
        request: Request<v1::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        self.auth.reviewer(&request).await?;
        let from_seq = request.into_inner().from_seq;
        self.engine.audit_head().await?;
        let path = self.engine.audit_path.clone();
        let (sender, receiver) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            let mut writer = ChunkWriter {
                sender: sender.clone(),
                buffer: Vec::with_capacity(EXPORT_CHUNK),
            };
            let filter = gatekeep_audit::ExportFilter {
                from_seq: (from_seq > 0).then_some(from_seq),
                kind: None,
            };
            let result = gatekeep_audit::export(&path, &mut writer, &filter).and_then(|_| {
                writer
                    .finish()
                    .map_err(|source| gatekeep_audit::AuditError::Export { source })
            });
            if let Err(error) = result {
                drop(sender.blocking_send(Err(audit_status(error))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Sends an export in chunks of whole lines.
struct ChunkWriter {
    sender: mpsc::Sender<Result<v1::ExportAuditChunk, Status>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        self.sender
            .blocking_send(Ok(v1::ExportAuditChunk { data }))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buffer);
        self.send(data)
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= EXPORT_CHUNK {
            // Cut after the last complete line.
            if let Some(end) = self.buffer.iter().rposition(|b| *b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let data = std::mem::replace(&mut self.buffer, rest);
                self.send(data)?;
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
