//! [`ReviewClient`]: the reviewers' side of the decision service.

use std::time::Duration;

use gatekeep_proto::{
    GrantDuration, limits,
    model::{Grant, GrantScope, Kind, RequestRecord, Verdict},
    v1::{self, review_service_client::ReviewServiceClient},
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use uuid::Uuid;

use crate::{error::ClientError, tls::ClientTls};

/// Whose shipped records an export includes (see [`ReviewClient::export_audit_hosts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRecords {
    None,
    All,
    One(String),
}

/// Where and as whom a reviewer connects.
#[derive(Clone)]
pub struct ReviewConfig {
    /// `https://HOST:PORT` of the service.
    pub endpoint: String,
    /// The reviewer's token (`gk_...`).
    pub token: String,
    /// The CA of the service's certificate; a reviewer presents no certificate.
    pub tls: ClientTls,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ReviewConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewConfig")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Which requests to list or watch; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFilter {
    pub host: Option<String>,
    pub policy: Option<String>,
    pub kind: Option<Kind>,
}

/// Which grants to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantFilter {
    pub host: Option<String>,
    pub policy: Option<String>,
    /// Also revoked and expired grants.
    pub include_inactive: bool,
}

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A reviewer's connection. Cheap to clone.
#[derive(Clone)]
pub struct ReviewClient {
    inner: ReviewServiceClient<InterceptedService<Channel, Bearer>>,
}

impl std::fmt::Debug for ReviewClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewClient").finish_non_exhaustive()
    }
}

impl From<&RequestFilter> for v1::RequestFilter {
    fn from(filter: &RequestFilter) -> Self {
        v1::RequestFilter {
            host: filter.host.clone().unwrap_or_default(),
            policy: filter.policy.clone().unwrap_or_default(),
            kind: filter
                .kind
                .map_or(0, |kind| v1::RequestKind::from(kind).into()),
        }
    }
}

fn records(wire: Vec<v1::RequestRecord>) -> Result<Vec<RequestRecord>, ClientError> {
    wire.into_iter()
        .map(|record| RequestRecord::try_from(record).map_err(ClientError::from))
        .collect()
}

fn record(wire: Option<v1::RequestRecord>) -> Result<RequestRecord, ClientError> {
    Ok(wire
        .ok_or(gatekeep_proto::WireError::Missing {
            field: "request".into(),
        })?
        .try_into()?)
}

/// What the service reports about itself and the caller.
pub type Status = v1::StatusResponse;
/// The result of verifying the service's audit chain.
pub type AuditReport = v1::VerifyAuditResponse;

impl ReviewClient {
    /// Connects (TLS, verifying the service against `config.tls.ca_pem`).
    pub async fn connect(config: ReviewConfig) -> Result<Self, ClientError> {
        let token =
            MetadataValue::try_from(format!("Bearer {}", config.token.trim())).map_err(|_| {
                ClientError::Config {
                    message: "the token contains characters a header cannot carry".into(),
                }
            })?;
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|err| ClientError::Config {
                message: format!("invalid server address `{}`: {err}", config.endpoint),
            })?
            .tls_config(config.tls.config())
            .map_err(|err| ClientError::Config {
                message: format!("invalid tls settings: {err}"),
            })?
            .connect_timeout(config.connect_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: config.endpoint.clone(),
                source,
            })?;
        Ok(Self {
            inner: ReviewServiceClient::with_interceptor(channel, Bearer(token))
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES * 16),
        })
    }

    /// Pending requests, oldest first (at most `limit`, 0 for the service's maximum).
    pub async fn list_pending(
        &mut self,
        filter: &RequestFilter,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, ClientError> {
        let response = self
            .inner
            .list_pending(v1::ListPendingRequest {
                filter: Some(filter.into()),
                limit,
            })
            .await?;
        records(response.into_inner().requests)
    }

    /// The pending requests that match (`initial` true), then every new or changed one.
    pub async fn watch(
        &mut self,
        filter: &RequestFilter,
    ) -> Result<impl Stream<Item = Result<(bool, RequestRecord), ClientError>> + use<>, ClientError>
    {
        let stream = self
            .inner
            .watch(v1::WatchRequest {
                filter: Some(filter.into()),
            })
            .await?
            .into_inner();
        Ok(stream.map(|event| {
            let event = event?;
            Ok((event.initial, record(event.request)?))
        }))
    }

    /// One request and similar decided ones, newest first.
    pub async fn get(
        &mut self,
        id: Uuid,
    ) -> Result<(RequestRecord, Vec<RequestRecord>), ClientError> {
        let response = self
            .inner
            .get_request(v1::GetRequestRequest {
                request_id: id.to_string(),
            })
            .await?
            .into_inner();
        Ok((record(response.request)?, records(response.similar)?))
    }

    /// The one request (pending or past) whose id starts with `prefix` (at least 4 hex
    /// digits); the service says which ids are candidates when several are.
    pub async fn resolve_request_id(&mut self, prefix: &str) -> Result<Uuid, ClientError> {
        let response = self
            .inner
            .resolve_request_id(v1::ResolveRequestIdRequest {
                prefix: prefix.to_owned(),
            })
            .await?
            .into_inner();
        gatekeep_proto::convert::id("request_id", &response.request_id)
            .map_err(|source| ClientError::InvalidAnswer { source })
    }

    /// Approves or denies; `duration` other than `once` makes a grant for the asking
    /// workload only (see [`Self::decide_scoped`]).
    pub async fn decide(
        &mut self,
        id: Uuid,
        verdict: Verdict,
        reason: &str,
        duration: GrantDuration,
    ) -> Result<RequestRecord, ClientError> {
        self.decide_scoped(id, verdict, reason, duration, GrantScope::Workload)
            .await
    }

    /// Approves or denies; `duration` other than `once` makes a grant covering `scope`: the
    /// workload (cgroup) that asked, or every workload of the policy.
    pub async fn decide_scoped(
        &mut self,
        id: Uuid,
        verdict: Verdict,
        reason: &str,
        duration: GrantDuration,
        scope: GrantScope,
    ) -> Result<RequestRecord, ClientError> {
        let response = self
            .inner
            .decide(v1::DecideRequest {
                request_id: id.to_string(),
                verdict: v1::Verdict::from(verdict).into(),
                reason: reason.to_owned(),
                duration: duration.to_string(),
                scope: scope.to_string(),
            })
            .await?;
        record(response.into_inner().request)
    }

    /// Cancels a pending request (the paused action is denied).
    pub async fn cancel(&mut self, id: Uuid, reason: &str) -> Result<RequestRecord, ClientError> {
        let response = self
            .inner
            .cancel(v1::CancelRequest {
                request_id: id.to_string(),
                reason: reason.to_owned(),
            })
            .await?;
        record(response.into_inner().request)
    }

    /// Grants, oldest first.
    pub async fn list_grants(&mut self, filter: &GrantFilter) -> Result<Vec<Grant>, ClientError> {
        let response = self
            .inner
            .list_grants(v1::ListGrantsRequest {
                host: filter.host.clone().unwrap_or_default(),
                policy: filter.policy.clone().unwrap_or_default(),
                include_inactive: filter.include_inactive,
            })
            .await?;
        response
            .into_inner()
            .grants
            .into_iter()
            .map(|grant| Grant::try_from(grant).map_err(ClientError::from))
            .collect()
    }

    /// Revokes a grant; the agent is told to remove it.
    pub async fn revoke_grant(&mut self, id: Uuid, reason: &str) -> Result<Grant, ClientError> {
        let response = self
            .inner
            .revoke_grant(v1::RevokeGrantRequest {
                grant_id: id.to_string(),
                reason: reason.to_owned(),
            })
            .await?
            .into_inner();
        Ok(response
            .grant
            .ok_or(gatekeep_proto::WireError::Missing {
                field: "grant".into(),
            })?
            .try_into()?)
    }

    /// The service's version, pending count, connected agents, audit head, and who the
    /// caller is.
    pub async fn status(&mut self) -> Result<Status, ClientError> {
        Ok(self.inner.status(v1::StatusRequest {}).await?.into_inner())
    }

    /// Verifies the service's audit chain (`DataLoss` status if it is broken).
    pub async fn verify_audit(&mut self) -> Result<AuditReport, ClientError> {
        Ok(self
            .inner
            .verify_audit(v1::VerifyAuditRequest {})
            .await?
            .into_inner())
    }

    /// Writes the service's audit log as JSON Lines (from `from_seq`, 0 for all) to `out`;
    /// returns the bytes written.
    pub async fn export_audit(
        &mut self,
        from_seq: u64,
        out: &mut (impl std::io::Write + Send),
    ) -> Result<u64, ClientError> {
        self.export_audit_hosts(from_seq, HostRecords::None, out)
            .await
    }

    /// Like [`export_audit`](Self::export_audit), with the hosts' anchored records: every
    /// host's after the service's own chain, or one host's alone (`from_seq` then counts in
    /// that host's chain). Host lines carry `"anchored_host"`.
    pub async fn export_audit_hosts(
        &mut self,
        from_seq: u64,
        hosts: HostRecords,
        out: &mut (impl std::io::Write + Send),
    ) -> Result<u64, ClientError> {
        let (hosts, host) = match hosts {
            HostRecords::None => (v1::HostRecords::None, String::new()),
            HostRecords::All => (v1::HostRecords::All, String::new()),
            HostRecords::One(host) => (v1::HostRecords::One, host),
        };
        let mut stream = self
            .inner
            .export_audit(v1::ExportAuditRequest {
                from_seq,
                hosts: hosts.into(),
                host,
            })
            .await?
            .into_inner();
        let mut written = 0;
        while let Some(chunk) = stream.message().await? {
            out.write_all(&chunk.data)
                .map_err(|err| ClientError::Config {
                    message: format!("cannot write the export: {err}"),
                })?;
            written += chunk.data.len() as u64;
        }
        Ok(written)
    }

    /// What the service anchored of `host`'s audit log (every host's when empty): heads and
    /// divergences; with `limit` > 0, also `host`'s anchored hashes from `from_seq` on.
    pub async fn host_audit(
        &mut self,
        host: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<v1::HostAuditResponse, ClientError> {
        Ok(self
            .inner
            .host_audit(v1::HostAuditRequest {
                host: host.to_owned(),
                from_seq,
                limit,
            })
            .await?
            .into_inner())
    }
}
