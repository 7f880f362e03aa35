//! The dead-letter record for operators: what was given up on, and delivering it again.
//!
//! A retry takes the letter out of the record and hands its delivery to the sinks through
//! its lease: the lease is set to one that has just expired, so the next sweep of any
//! replica running that sink (within 15 s) takes it over and delivers it, with the usual
//! idempotence (a Slack message found again, a webhook event with its same id). If that
//! fails again, a new dead letter is kept.

use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    error::Error,
    store::{Claim, DeliveryKey, Store, StoredDeadLetter},
};

/// Dead letters listed at most.
pub const LIST_LIMIT: usize = 1000;

/// A dead letter as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterView {
    pub id: i64,
    /// `slack`, `teams` or `webhook:NAME`.
    pub sink: String,
    /// The delivery: `SUBJECT EVENT CHANNEL`.
    pub key: String,
    /// The request or grant it was about, its event and channel (when the key names them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub error: String,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl From<StoredDeadLetter> for DeadLetterView {
    fn from(stored: StoredDeadLetter) -> Self {
        let key = DeliveryKey::parse(&stored.letter.key);
        Self {
            id: stored.id,
            sink: stored.letter.sink,
            subject: key.as_ref().map(|k| k.subject.clone()),
            event: key.as_ref().map(|k| k.event.clone()),
            channel: key.map(|k| k.channel),
            key: stored.letter.key,
            error: stored.letter.error,
            attempts: stored.letter.attempts,
            at: stored.letter.at,
        }
    }
}

/// The dead letters kept, oldest first.
pub async fn list(store: &dyn Store) -> Result<Vec<DeadLetterView>, Error> {
    Ok(store
        .dead_letters(LIST_LIMIT)
        .await?
        .into_iter()
        .map(DeadLetterView::from)
        .collect())
}

/// Queues dead letter `id` for delivery again (see the module's comment); returns it.
pub async fn retry(store: &dyn Store, id: i64) -> Result<DeadLetterView, Error> {
    let stored = store
        .dead_letters(LIST_LIMIT)
        .await?
        .into_iter()
        .find(|letter| letter.id == id)
        .ok_or(Error::UnknownDeadLetter { id })?;
    let key = DeliveryKey::parse(&stored.letter.key).ok_or_else(|| Error::NotReplayable {
        id,
        message: format!(
            "its key `{}` names no delivery (kept by an older version)",
            stored.letter.key
        ),
    })?;
    let now = OffsetDateTime::now_utc();
    // A lease that expired a moment ago: the sweep takes it over. If a holder's lease is live
    // the delivery is in progress already: nothing to do.
    let claim = store
        .claim_delivery(
            key,
            format!("retry:{id}"),
            now,
            now - time::Duration::milliseconds(1),
        )
        .await?;
    if claim == Claim::Held {
        return Err(Error::NotReplayable {
            id,
            message: "it is being delivered right now".to_owned(),
        });
    }
    // Taken out only once queued: a letter is never lost between the two.
    let taken = store
        .take_dead_letter(id)
        .await?
        .ok_or(Error::UnknownDeadLetter { id })?;
    Ok(taken.into())
}
