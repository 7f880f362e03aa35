//! Microsoft Teams: an Adaptive Card per pending request, and one with its outcome, posted
//! through a Teams Workflows incoming webhook (`{"type":"message","attachments":[{
//! "contentType":"application/vnd.microsoft.card.adaptive","content":CARD}]}`). Workflows
//! cannot update a posted card, so the outcome is a second, short card. Decisions are made
//! in the console ("Open in console"); in-card approval would need a Bot Framework bot.
//!
//! Idempotent: each card is stored once posted (notice `teams:ID:requested|final`).

use std::{future::Future, sync::Arc};

use gatekeep_proto::model::{RequestRecord, RequestState};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    delivery::{self, Failure, Leases, Sink, store_failure},
    render,
    secret::Secret,
};
use crate::{lifecycle::Engine, store::DeliveryKey};

/// Escapes the markdown Adaptive Cards render in `TextBlock` and `FactSet` text, so a
/// workload's string cannot make a link or emphasis.
#[must_use]
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\`*_{}[]()#+-.!<>|~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The message envelope with the card of `record`.
pub(crate) fn card(
    record: &RequestRecord,
    console_url: Option<&str>,
    now: OffsetDateTime,
) -> Value {
    let title = render::outcome(record.state);
    let (label, subject) = render::subject(record);
    let mut facts = vec![
        json!({"title": "Host", "value": escape(&render::word(&record.host))}),
        json!({"title": "Policy", "value": escape(&render::word(&record.request.policy))}),
        json!({"title": "Asked by", "value": escape(&render::asker(record))}),
    ];
    if record.state == RequestState::Pending {
        facts.push(json!({"title": "Time left", "value": escape(&format!(
            "{} (until {})",
            render::time_left(record, now),
            render::rfc3339(record.deadline)
        ))}));
    }
    if let Some(decision) = &record.decision {
        facts.push(json!({"title": "Decided by", "value": escape(&decision.decided_by)}));
        facts.push(json!({"title": "At", "value": escape(&render::rfc3339(decision.decided_at))}));
        if !decision.reason.is_empty() {
            facts.push(json!({"title": "Reason", "value": escape(&decision.reason)}));
        }
    }
    let mut actions = Vec::new();
    if let Some(url) = console_url {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Open in console",
            "url": render::console_link(url, record)}));
    }
    let content = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": true,
             "text": escape(&format!("gatekeep: {title}"))},
            {"type": "FactSet", "facts": facts},
            {"type": "TextBlock", "text": escape(label), "weight": "Bolder", "wrap": true},
            {"type": "TextBlock", "text": escape(&subject), "fontType": "Monospace", "wrap": true},
            {"type": "TextBlock", "isSubtle": true, "wrap": true, "size": "Small",
             "text": escape(&format!("Request {}", record.request.id))},
        ],
        "actions": actions,
    });
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": content,
        }],
    })
}

/// A card to post: the request's pending card, or its outcome.
#[derive(Debug, Clone)]
pub(crate) struct TeamsJob {
    pub id: Uuid,
    pub outcome: bool,
}

/// The Teams sink.
pub(crate) struct TeamsSink {
    pub http: reqwest::Client,
    /// The workflow URL (it carries its own signature: a secret).
    pub url: Secret,
    pub engine: Arc<Engine>,
    pub policies: Vec<String>,
    pub console_url: Option<String>,
    pub leases: Leases,
}

impl TeamsSink {
    /// The job a changed request makes, if its policy is announced: the pending card for a
    /// new request, the outcome card for a final one (votes make none).
    pub(crate) fn job(&self, record: &RequestRecord) -> Option<TeamsJob> {
        let announced = self.policies.is_empty() || self.policies.contains(&record.request.policy);
        let outcome = match record.state {
            RequestState::Pending if record.approvals.is_empty() => false,
            RequestState::Pending => return None,
            _ => true,
        };
        announced.then_some(TeamsJob {
            id: record.request.id,
            outcome,
        })
    }

    async fn post(&self, job: &TeamsJob) -> Result<(), Failure> {
        let store = &self.engine.store;
        let Some(record) = store.get_request(job.id).await.map_err(store_failure)? else {
            return Ok(());
        };
        let record = record.value;
        // A request decided before its first card could be posted gets the outcome card
        // only (it says everything the first would have).
        let outcome = job.outcome || record.state != RequestState::Pending;
        let event = if outcome { "final" } else { "requested" };
        let key = format!("teams:{}:{event}", job.id);
        let posted = || async {
            Ok::<_, Failure>(
                store
                    .notice(key.clone())
                    .await
                    .map_err(store_failure)?
                    .is_some(),
            )
        };
        if posted().await? {
            return Ok(());
        }
        // An outcome is posted only for an announced request (not one a grant or rule
        // decided at once).
        if job.outcome
            && store
                .notice(format!("teams:{}:requested", job.id))
                .await
                .map_err(store_failure)?
                .is_none()
        {
            return Ok(());
        }
        let lease = DeliveryKey::new(job.id, "teams", event);
        // Another replica posts it (and if it dies, its lease expires and it is resumed).
        let Some(unknown_since) = self.leases.claim(&lease).await? else {
            return Ok(());
        };
        if posted().await? {
            return self.leases.release(&lease).await;
        }
        // Workflows have no idempotency key and nothing to read a channel back with: after a
        // post whose answer was lost (or whose replica died mid-call) nobody can tell whether
        // the card is there. Posting again could show it twice, so it goes to the dead
        // letters instead, where an operator sees it and retries it if the card is missing.
        if unknown_since.is_some() {
            return Err(Failure::Permanent {
                message: concat!(
                    "teams workflow: an earlier post's answer was lost, so whether its card ",
                    "was posted is unknown; not posted again (a Workflows webhook cannot be ",
                    "read back): retry it from the dead letters if the card is missing"
                )
                .to_owned(),
            });
        }
        let body = card(
            &record,
            self.console_url.as_deref(),
            OffsetDateTime::now_utc(),
        );
        self.leases.attempt(&lease).await?;
        let response = match self.http.post(self.url.expose()).json(&body).send().await {
            Ok(response) => response,
            Err(err) if err.is_connect() => {
                // Never sent: no card can exist, so another attempt is safe.
                self.leases.release(&lease).await?;
                // The error's text would name the URL, which is a secret: `network` drops it.
                return Err(delivery::network("teams workflow", &err));
            }
            // Sent, answer lost: the attempt stays noted and the next one gives up (above).
            Err(err) => return Err(delivery::network("teams workflow", &err)),
        };
        if !response.status().is_success() {
            // An answer that says it failed: nothing was posted, another attempt is safe.
            self.leases.release(&lease).await?;
        }
        delivery::classify(&response, "teams workflow")?;
        store
            .set_notice(key, "posted".to_owned())
            .await
            .map_err(store_failure)?;
        self.leases.release(&lease).await
    }
}

impl Sink for TeamsSink {
    type Job = TeamsJob;

    fn name(&self) -> &'static str {
        "teams"
    }

    fn key(&self, job: &TeamsJob) -> DeliveryKey {
        DeliveryKey::new(
            job.id,
            "teams",
            if job.outcome { "final" } else { "requested" },
        )
    }

    fn request_id(&self, job: &TeamsJob) -> Uuid {
        job.id
    }

    fn deliver(&self, job: &TeamsJob) -> impl Future<Output = Result<(), Failure>> + Send {
        self.post(job)
    }

    async fn resume(&self, key: &DeliveryKey) -> Option<TeamsJob> {
        (key.channel == "teams").then_some(())?;
        Some(TeamsJob {
            id: key.subject.parse().ok()?,
            outcome: key.event == "final",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_escaped() {
        assert_eq!(escape("[click](https://x)"), "\\[click\\]\\(https://x\\)");
        assert_eq!(escape("**b**"), "\\*\\*b\\*\\*");
    }
}
