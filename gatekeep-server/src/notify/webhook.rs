//! Signed JSON webhooks: every request and grant event, to any HTTPS receiver.
//!
//! A delivery is `POST URL` with a JSON body
//! `{"id": EVENT_ID, "type": TYPE, "at": RFC3339, "request": {...}}` (or `"grant"`) and
//! headers:
//! - `X-Gatekeep-Event-Id`: the event's id, the same on every retry (the receiver's
//!   idempotency key);
//! - `X-Gatekeep-Timestamp`: Unix seconds when this attempt was signed;
//! - `X-Gatekeep-Signature`: `v1=` + hex HMAC-SHA256 with the webhook's key over
//!   `v1:TIMESTAMP:BODY` (the receiver recomputes it, compares in constant time and refuses
//!   a timestamp more than five minutes old).
//!
//! Event types: `request.requested`, `request.decided` (approved or denied),
//! `request.expired`, `request.cancelled`, `request.abandoned`, `grant.created`,
//! `grant.revoked`. Ids are derived from what they announce (`REQUEST_ID.decided`,
//! `GRANT_ID.revoked`), so the same event found twice (after a catch-up) has the same id,
//! and a delivered id is stored (notice `webhook:NAME:ID`) and never sent again.

use std::{future::Future, sync::Arc};

use gatekeep_proto::model::{Grant, RequestRecord, RequestState};
use ring::hmac;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    config::WebhookConfig,
    delivery::{self, Failure, Leases, Sink, store_failure},
    render,
    secret::Secret,
};
use crate::{error::Error, store::DeliveryKey};

/// Every event type.
pub const EVENTS: &[&str] = &[
    "request.requested",
    "request.decided",
    "request.expired",
    "request.cancelled",
    "request.abandoned",
    "grant.created",
    "grant.revoked",
];

/// One event, encoded once: every retry sends the same body.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    /// `SUBJECT.SUFFIX`: the idempotency key receivers dedupe on.
    pub id: String,
    /// The request or grant it announces.
    pub subject: Uuid,
    /// The request it is about: the one it announces, or the one whose decision made the
    /// grant it announces.
    pub request: Uuid,
    /// `requested`, `decided`, ... `created`, `revoked`.
    pub suffix: &'static str,
    pub kind: &'static str,
    pub body: Arc<str>,
}

fn event(
    subject: Uuid,
    request: Uuid,
    suffix: &'static str,
    kind: &'static str,
    field: &str,
    value: Value,
) -> Event {
    let id = format!("{subject}.{suffix}");
    let mut body = json!({
        "id": id,
        "type": kind,
        "at": render::rfc3339(OffsetDateTime::now_utc()),
    });
    body[field] = value;
    Event {
        id,
        subject,
        request,
        suffix,
        kind,
        body: body.to_string().into(),
    }
}

/// The event suffix and type of a request's state (`None` for a vote that did not reach
/// the quorum).
fn request_kind(record: &RequestRecord) -> Option<(&'static str, &'static str)> {
    Some(match record.state {
        RequestState::Pending if record.approvals.is_empty() => ("requested", "request.requested"),
        RequestState::Pending => return None,
        RequestState::Approved | RequestState::Denied => ("decided", "request.decided"),
        RequestState::Expired => ("expired", "request.expired"),
        RequestState::Cancelled => ("cancelled", "request.cancelled"),
        RequestState::Abandoned => ("abandoned", "request.abandoned"),
    })
}

/// Request event suffixes and their types.
const REQUEST_KINDS: &[(&str, &str)] = &[
    ("requested", "request.requested"),
    ("decided", "request.decided"),
    ("expired", "request.expired"),
    ("cancelled", "request.cancelled"),
    ("abandoned", "request.abandoned"),
];

/// The events a changed request makes (none for a vote that did not reach the quorum).
pub(crate) fn request_events(record: &RequestRecord) -> Vec<Event> {
    let Some((suffix, kind)) = request_kind(record) else {
        return Vec::new();
    };
    let value = serde_json::to_value(record).unwrap_or(Value::Null);
    let id = record.request.id;
    let mut events = vec![event(id, id, suffix, kind, "request", value)];
    if let Some(grant) = record.decision.as_ref().and_then(|d| d.grant.as_ref()) {
        events.push(grant_event(grant, "created", "grant.created"));
    }
    events
}

/// A grant's event.
pub(crate) fn grant_event(grant: &Grant, suffix: &'static str, kind: &'static str) -> Event {
    let value = serde_json::to_value(grant).unwrap_or(Value::Null);
    event(grant.id, grant.request_id, suffix, kind, "grant", value)
}

/// The signature header's value for `body` signed at `timestamp`.
#[must_use]
pub fn signature(secret: &Secret, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(format!("v1:{timestamp}:").as_bytes());
    context.update(body);
    format!("v1={}", hex::encode(context.sign().as_ref()))
}

/// One webhook.
pub(crate) struct WebhookSink {
    name: String,
    url: reqwest::Url,
    secret: Secret,
    events: Vec<String>,
    http: reqwest::Client,
    leases: Leases,
}

impl WebhookSink {
    pub(crate) fn new(
        config: &WebhookConfig,
        http: reqwest::Client,
        leases: Leases,
    ) -> Result<Self, Error> {
        let what = format!("[[notify.webhook]] `{}`", config.name);
        let bad = |message: String| Error::Notify { message };
        if config.name.is_empty() || config.name.contains(':') {
            return Err(bad(format!(
                "{what}: `name` must be non-empty, without `:`"
            )));
        }
        let url = super::check_url(&format!("{what} url"), &config.url)?;
        for kind in &config.events {
            if !EVENTS.contains(&kind.as_str()) {
                return Err(bad(format!(
                    "{what}: unknown event `{kind}` (known: {})",
                    EVENTS.join(", ")
                )));
            }
        }
        let secret = config.secret.load(&format!("{what} secret")).map_err(bad)?;
        Ok(Self {
            name: format!("webhook:{}", config.name),
            url,
            secret,
            events: config.events.clone(),
            http,
            leases,
        })
    }

    /// Whether this webhook takes events of `kind`.
    pub(crate) fn wants(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == kind)
    }

    async fn delivered(&self, notice: &str) -> Result<bool, Failure> {
        Ok(self
            .leases
            .store
            .notice(notice.to_owned())
            .await
            .map_err(store_failure)?
            .is_some())
    }

    async fn send(&self, event: &Event) -> Result<(), Failure> {
        let notice = format!("{}:{}", self.name, event.id);
        if self.delivered(&notice).await? {
            return Ok(());
        }
        let key = self.key(event);
        // Another replica delivers it (and if it dies, its lease expires and it is resumed).
        if self.leases.claim(&key).await?.is_none() {
            return Ok(());
        }
        // The previous holder may have delivered it just before letting go.
        if self.delivered(&notice).await? {
            return self.leases.release(&key).await;
        }
        // An attempt whose answer is lost is sent again: receivers dedupe on the event id.
        self.leases.attempt(&key).await?;
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let response = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-gatekeep-event-id", &event.id)
            // The same key under the name the IETF draft `Idempotency-Key` header gives it.
            .header("idempotency-key", &event.id)
            .header("x-gatekeep-timestamp", timestamp.to_string())
            .header(
                "x-gatekeep-signature",
                signature(&self.secret, timestamp, event.body.as_bytes()),
            )
            .body(event.body.to_string())
            .send()
            .await
            .map_err(|err| delivery::network(&self.name, &err))?;
        delivery::classify(&response, &self.name)?;
        tracing::debug!(
            webhook = self.name,
            event = event.id,
            "webhook event delivered"
        );
        self.leases
            .store
            .set_notice(notice, "delivered".to_owned())
            .await
            .map_err(store_failure)?;
        self.leases.release(&key).await
    }

    async fn event_of(&self, key: &DeliveryKey) -> Option<Event> {
        let subject: Uuid = key.subject.parse().ok()?;
        let store = &self.leases.store;
        if let Some((suffix, kind)) = REQUEST_KINDS.iter().find(|(s, _)| *s == key.event) {
            let record = store.get_request(subject).await.ok()??.value;
            let value = serde_json::to_value(&record).unwrap_or(Value::Null);
            return Some(event(subject, subject, suffix, kind, "request", value));
        }
        let grant = store.get_grant(subject).await.ok()??;
        match key.event.as_str() {
            "created" => Some(grant_event(&grant, "created", "grant.created")),
            "revoked" if grant.revoked.is_some() => {
                Some(grant_event(&grant, "revoked", "grant.revoked"))
            }
            _ => None,
        }
    }
}

impl Sink for WebhookSink {
    type Job = Event;

    fn name(&self) -> &str {
        &self.name
    }

    fn key(&self, job: &Event) -> DeliveryKey {
        DeliveryKey::new(job.subject, self.name.clone(), job.suffix)
    }

    fn request_id(&self, job: &Event) -> Uuid {
        job.request
    }

    fn deliver(&self, job: &Event) -> impl Future<Output = Result<(), Failure>> + Send {
        self.send(job)
    }

    async fn resume(&self, key: &DeliveryKey) -> Option<Event> {
        if key.channel != self.name {
            return None;
        }
        self.event_of(key).await.filter(|e| self.wants(e.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_version_timestamp_and_body() {
        // Computed independently: printf 'v1:1700000000:{"a":1}' | openssl dgst -sha256 -hmac key
        let secret = Secret::new("key");
        assert_eq!(
            signature(&secret, 1_700_000_000, br#"{"a":1}"#),
            "v1=d9557872749208eb6fd1b4949933064d21edc4f53ab77a187f5569f605c14ec1"
        );
    }
}
