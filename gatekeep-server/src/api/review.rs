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
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::ops::{self, Filter};
use crate::{auth::Authenticator, error::Error, lifecycle::Engine};

/// The review service.
#[derive(Clone)]
pub struct ReviewApi {
    engine: Arc<Engine>,
    auth: Authenticator,
    /// Policies whose approvals need a recent identity-provider sign-in: tokens never have one.
    max_auth_age: Arc<std::collections::BTreeMap<String, u64>>,
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
        Self {
            engine,
            auth,
            max_auth_age: Arc::default(),
        }
    }

    /// Also accepts command-line sessions' ids (`gatekeep login`) as bearer tokens.
    #[must_use]
    pub fn with_sessions(mut self, sessions: Arc<crate::auth::session::Sessions>) -> Self {
        self.auth = self.auth.with_sessions(sessions);
        self
    }

    /// Approvals of these policies need a recent identity-provider sign-in, which a token
    /// never is: they are refused here (see `ConsoleConfig::max_auth_age`).
    #[must_use]
    pub fn with_max_auth_age(
        mut self,
        max_auth_age: std::collections::BTreeMap<String, u64>,
    ) -> Self {
        self.max_auth_age = Arc::new(max_auth_age);
        self
    }
}

/// A validated wire filter.
fn filter(wire: Option<v1::RequestFilter>) -> Result<Filter, WireError> {
    let wire = wire.unwrap_or_default();
    let kind = if wire.kind == 0 {
        None
    } else {
        Some(Kind::try_from(wire.kind)?)
    };
    Filter::new(&wire.host, &wire.policy, kind)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;
type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportAuditChunk, Status>> + Send>>;

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
        let filter = filter(wire.filter).map_err(Error::from)?;
        let requests = ops::list_pending(&self.engine, &filter, wire.limit).await?;
        Ok(Response::new(v1::ListPendingResponse {
            requests: requests.into_iter().map(Into::into).collect(),
        }))
    }

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.auth.reviewer(&request).await?;
        let filter = filter(request.into_inner().filter).map_err(Error::from)?;
        let items = ops::watch(&self.engine, filter, None).await?;
        // The wire protocol marks initial requests with `initial`; it has no ready marker.
        let events = ReceiverStream::new(items)
            .filter(|item| !matches!(item, ops::WatchItem::Ready))
            .map(|item| match item {
                ops::WatchItem::Request { initial, record } => Ok(v1::WatchEvent {
                    initial,
                    request: Some(RequestRecord::clone(&record).into()),
                }),
                ops::WatchItem::Ready => Err(Status::internal("unreachable: filtered")),
                ops::WatchItem::Lagged { missed } => Err(Status::resource_exhausted(format!(
                    "the watch fell {missed} changes behind; watch again"
                ))),
                ops::WatchItem::ShuttingDown => {
                    Err(Status::unavailable("the decision service is shutting down"))
                }
                ops::WatchItem::Expired => Err(Status::unauthenticated("the session expired")),
            });
        Ok(Response::new(Box::pin(events)))
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
        let (reviewer, auth_time) = self.auth.caller(&request).await?;
        let wire = request.into_inner();
        let id = convert::id("request_id", &wire.request_id).map_err(Error::from)?;
        let verdict = convert::verdict("verdict", wire.verdict).map_err(Error::from)?;
        let reason = convert::reason("reason", wire.reason).map_err(Error::from)?;
        let duration = convert::duration("duration", &wire.duration).map_err(Error::from)?;
        let scope = convert::scope("scope", &wire.scope).map_err(Error::from)?;
        ops::check_auth_age(&self.engine, &self.max_auth_age, id, verdict, auth_time).await?;
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
        let grants = ops::list_grants(
            &self.engine,
            &wire.host,
            &wire.policy,
            wire.include_inactive,
        )
        .await?;
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
        let report = ops::status(&self.engine, reviewer).await?;
        Ok(Response::new(v1::StatusResponse {
            version: report.version.to_owned(),
            started_at_ms: convert::to_ms(report.started_at),
            pending: report.pending,
            connected_agents: report.connected_agents,
            audit_records: report.audit_records,
            audit_head: report.audit_head,
            reviewer: report.reviewer,
            groups: report.groups,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<v1::VerifyAuditRequest>,
    ) -> Result<Response<v1::VerifyAuditResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let report = ops::verify_audit(&self.engine).await?;
        Ok(Response::new(v1::VerifyAuditResponse {
            records: report.records,
            head_seq: report.head_seq,
            head_hash: report.head_hash,
            guards_intact: report.guards_intact,
        }))
    }

    async fn export_audit(
        &self,
        request: Request<v1::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        self.auth.reviewer(&request).await?;
        let request = request.into_inner();
        let hosts = match v1::HostRecords::try_from(request.hosts) {
            Ok(v1::HostRecords::None) => ops::HostRecords::None,
            Ok(v1::HostRecords::All) => ops::HostRecords::All,
            Ok(v1::HostRecords::One) => ops::HostRecords::One(request.host),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown `hosts` value {}",
                    request.hosts
                )));
            }
        };
        let chunks = ops::export_audit_with_hosts(&self.engine, request.from_seq, hosts).await?;
        let chunks = ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(|data| v1::ExportAuditChunk { data })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn host_audit(
        &self,
        request: Request<v1::HostAuditRequest>,
    ) -> Result<Response<v1::HostAuditResponse>, Status> {
        self.auth.reviewer(&request).await?;
        let request = request.into_inner();
        let report =
            ops::host_audit(&self.engine, &request.host, request.from_seq, request.limit).await?;
        Ok(Response::new(v1::HostAuditResponse {
            hosts: report.hosts.into_iter().map(Into::into).collect(),
            divergences: report.divergences.into_iter().map(Into::into).collect(),
            hashes: report
                .hashes
                .into_iter()
                .map(|(seq, hash)| v1::AnchoredHash { seq, hash })
                .collect(),
        }))
    }
}
