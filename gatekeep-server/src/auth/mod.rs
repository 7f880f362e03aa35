//! Who is calling, and what they may do.
//!
//! - Reviewers present `authorization: Bearer TOKEN`. Tokens are 32 random bytes
//!   (`gk_` + 64 hex digits); the store keeps only their SHA-256, so a stolen database does
//!   not give away a token. A token is shown once, when the reviewer is added.
//! - Agents present a client certificate signed by the service's CA (mutual TLS); their
//!   host name is the certificate's first DNS subject alternative name (or its common name).
//!   An agent certificate is refused on the review API, so no agent can approve anything.
//! - Reviewers are authorised per policy: a policy's reviewer groups (any reviewer when it
//!   lists none). Nobody approves a request of a workload they own ([`is_owner`]).

use std::sync::Arc;

use gatekeep_proto::model::RequestRecord;
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataMap;

pub mod oidc;
pub mod session;

pub use crate::reviewer::Reviewer;
use crate::{error::Error, store::Store};

/// A new random reviewer token.
pub fn new_token() -> Result<String, Error> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).map_err(|err| Error::Certs {
        message: format!("no randomness for a token: {err}"),
    })?;
    Ok(format!("gk_{}", hex::encode(bytes)))
}

/// The stored form of a token: lowercase hex SHA-256.
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `reviewer` counts as an owner of the workload that asked: a declared owner of the
/// policy, the user the asking process runs as (by name, or by uid: the reviewer's name
/// resolved through the system's name service, NSS, so a user known only to LDAP/SSSD is
/// recognised too), or the asking agent's own host identity.
#[must_use]
pub fn is_owner(reviewer: &Reviewer, record: &RequestRecord) -> bool {
    is_owner_with(reviewer, record, nss_uid)
}

/// The uid NSS gives user `name`, if it knows one.
fn nss_uid(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|user| user.uid.as_raw())
}

/// [`is_owner`] with `uid_of` resolving reviewer names to uids.
fn is_owner_with(
    reviewer: &Reviewer,
    record: &RequestRecord,
    uid_of: impl Fn(&str) -> Option<u32>,
) -> bool {
    // A token reviewer is their name; a reviewer of the identity provider is also the local
    // part of their verified email (alice@example.com is the host's user alice).
    let local = reviewer
        .email
        .as_deref()
        .and_then(|email| email.split_once('@'))
        .map(|(local, _)| local);
    std::iter::once(reviewer.name.as_str())
        .chain(local)
        .any(|name| {
            record
                .request
                .approval
                .owners
                .iter()
                .any(|owner| owner == name || reviewer.email.as_deref() == Some(owner.as_str()))
                || record.request.user_name.as_deref() == Some(name)
                || record.host == name
                || uid_of(name) == Some(record.request.uid)
        })
}

/// Authenticates calls.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    /// Command-line sessions (`gatekeep login`), whose ids are bearer tokens too.
    sessions: Option<Arc<session::Sessions>>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            sessions: None,
        }
    }

    /// Also accepts the ids of command-line sessions in `sessions` as bearer tokens.
    #[must_use]
    pub fn with_sessions(mut self, sessions: Arc<session::Sessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// The reviewer making a review call, and when they last signed in at the identity
    /// provider (`None` for a reviewer token).
    pub async fn caller<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<(Reviewer, Option<time::OffsetDateTime>), Error> {
        if request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            return Err(Error::permission(
                "agent certificates cannot use the review api; connect without a client certificate and use a reviewer token",
            ));
        }
        self.caller_by_token(bearer(request.metadata())?).await
    }

    /// The reviewer holding `token`: a reviewer token, or a command-line session's id.
    pub async fn caller_by_token(
        &self,
        token: &str,
    ) -> Result<(Reviewer, Option<time::OffsetDateTime>), Error> {
        if let Some(reviewer) = self.store.reviewer_by_token(token_hash(token)).await? {
            return Ok((reviewer, None));
        }
        let session = self
            .sessions
            .as_ref()
            .and_then(|sessions| sessions.get(token))
            .filter(|session| session.bearer);
        match session.map(|session| session.principal) {
            Some(session::Principal::Oidc {
                reviewer,
                auth_time,
            }) => Ok((reviewer, Some(auth_time))),
            _ => Err(Error::unauthenticated(
                "unknown or expired token; sign in again (`gatekeep login`) or ask an administrator for a reviewer token",
            )),
        }
    }

    /// The reviewer making a review call. Refuses agent certificates, missing or malformed
    /// `authorization` headers and unknown tokens.
    pub async fn reviewer<T>(&self, request: &tonic::Request<T>) -> Result<Reviewer, Error> {
        Ok(self.caller(request).await?.0)
    }

    /// The reviewer holding `token`.
    pub async fn by_token(&self, token: &str) -> Result<Reviewer, Error> {
        self.store
            .reviewer_by_token(token_hash(token))
            .await?
            .ok_or_else(|| {
                Error::unauthenticated(
                    "unknown reviewer token; ask an administrator for one (`gatekeep-server reviewers add NAME`)",
                )
            })
    }
}

fn bearer(metadata: &MetadataMap) -> Result<&str, Error> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Error::unauthenticated("missing reviewer token; pass --token or set GATEKEEP_TOKEN")
    })?;
    let value = value
        .to_str()
        .map_err(|_| Error::unauthenticated("malformed authorization header"))?;
    bearer_token(value)
}

/// The token of an `authorization: Bearer TOKEN` header value.
pub fn bearer_token(value: &str) -> Result<&str, Error> {
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Error::unauthenticated("authorization header is not `Bearer TOKEN`"))?
        .trim();
    if token.is_empty() || token.len() > 256 {
        return Err(Error::unauthenticated("malformed reviewer token"));
    }
    Ok(token)
}

/// The host name of an agent, from its verified client certificate: the first DNS subject
/// alternative name, else the common name.
pub fn agent_host<T>(request: &tonic::Request<T>) -> Result<String, Error> {
    let certs = request.peer_certs().ok_or_else(|| {
        Error::unauthenticated(
            "agents must present a client certificate issued by the service's ca (`gatekeep-server certs agent`)",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::unauthenticated("agents must present a client certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| Error::unauthenticated("unreadable client certificate"))?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        });
    let host = from_san
        .or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .ok_or_else(|| Error::unauthenticated("the client certificate names no host"))?;
    gatekeep_proto::convert::name("certificate host", &host).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use gatekeep_proto::model::{ApprovalSettings, RequestState};

    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("gk_") && a.len() == 67, "{a}");
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_header_forms() {
        let mut metadata = MetadataMap::new();
        assert_eq!(
            bearer(&metadata).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        metadata.insert("authorization", "Basic x".parse().unwrap());
        assert!(bearer(&metadata).is_err());
        metadata.insert("authorization", "Bearer gk_1".parse().unwrap());
        assert_eq!(bearer(&metadata).unwrap(), "gk_1");
    }

    #[test]
    fn groups_and_owners() {
        let alice = Reviewer {
            name: "alice".into(),
            groups: vec!["sre".into()],
            email: None,
        };
        assert!(alice.may_review(&[]));
        assert!(alice.may_review(&["security".into(), "sre".into()]));
        assert!(!alice.may_review(&["security".into()]));

        let mut record: RequestRecord = serde_json::from_value(serde_json::json!({
            "request": {
                "id": "6f1c1d2e-3a4b-4c5d-8e9f-001122334455", "policy": "p", "rule": "r",
                "cgroup": "/a", "pid": 1, "tid": 1, "uid": 1000, "user_name": "bob", "cwd": null,
                "ancestry": [], "target": {"kind": "exec", "executable": "/bin/true", "argv": []},
                "requested_at": "2026-11-24T21:00:00Z", "deadline": "2026-11-24T21:05:00Z",
                "on_timeout": "deny",
                "approval": serde_json::to_value(ApprovalSettings::default()).unwrap()
            },
            "host": "web-1", "state": "pending", "received_at": "2026-11-24T21:00:00Z",
            "deadline": "2026-11-24T21:05:00Z", "approvals": [], "approvals_required": 1,
            "decision": null
        }))
        .unwrap();
        assert_eq!(record.state, RequestState::Pending);
        assert!(!is_owner(&alice, &record));
        record.request.user_name = Some("alice".into());
        assert!(is_owner(&alice, &record), "the user the workload runs as");
        record.request.user_name = None;
        record.request.approval.owners = vec!["alice".into()];
        assert!(is_owner(&alice, &record), "a declared owner");
        record.request.approval.owners.clear();
        record.host = "alice".into();
        assert!(is_owner(&alice, &record), "the agent's own identity");
        record.host = "web-1".into();

        // The workload's user is known to the directory only: the agent sent no name, but
        // alice's uid (through NSS) is the uid the workload runs as.
        let directory = |name: &str| (name == "alice").then_some(1000);
        assert!(
            is_owner_with(&alice, &record, directory),
            "same uid, no name"
        );
        record.request.uid = 1001;
        assert!(!is_owner_with(&alice, &record, directory), "another uid");
        // The real name service: uid 0 is root on every host.
        let root = Reviewer {
            name: "root".into(),
            groups: Vec::new(),
            email: None,
        };
        record.request.uid = 0;
        assert!(is_owner(&root, &record), "root's uid through NSS");
    }
}
