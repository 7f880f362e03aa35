//! Notification bookkeeping shared by replicas: delivery leases (so one replica calls a
//! receiver for a delivery, and another takes over once its lease expires) and dead letters.

use time::OffsetDateTime;

use super::{PostgresStore, from_ms};
use crate::store::{Claim, DeadLetter, DeliveryKey, StoreError, StoredDeadLetter, ms};

/// Takes a delivery's lease (see [`crate::store::Store::claim_delivery`]). `ON CONFLICT DO
/// UPDATE` locks the row and re-checks the `WHERE` on its newest version, so of replicas
/// racing for one delivery exactly one gets a row back.
const CLAIM: &str = "INSERT INTO deliveries (subject, channel, event, owner, lease_until) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (subject, channel, event) DO UPDATE SET owner = excluded.owner, \
     lease_until = excluded.lease_until \
     WHERE deliveries.owner IS NULL OR deliveries.owner = excluded.owner \
     OR deliveries.lease_until < $6 \
     RETURNING attempted_at";

fn dead_letter_of(row: &tokio_postgres::Row) -> Result<StoredDeadLetter, StoreError> {
    let id: i64 = row.get(0);
    let attempts: i64 = row.get(4);
    Ok(StoredDeadLetter {
        id,
        letter: DeadLetter {
            sink: row.get(1),
            key: row.get(2),
            error: row.get(3),
            attempts: u32::try_from(attempts).map_err(|_| StoreError::Corrupt {
                message: format!("dead letter {id}: attempts {attempts}"),
            })?,
            at: from_ms(row.get(5))?,
        },
    })
}

impl PostgresStore {
    pub(super) async fn dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, sink, key, error, attempts, at FROM dead_letters ORDER BY id LIMIT $1",
                &[&i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(self.err())?;
        rows.iter().map(dead_letter_of).collect()
    }

    pub(super) async fn take_dead_letter(
        &self,
        id: i64,
    ) -> Result<Option<StoredDeadLetter>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM dead_letters WHERE id = $1 \
                 RETURNING id, sink, key, error, attempts, at",
                &[&id],
            )
            .await
            .map_err(self.err())?;
        row.as_ref().map(dead_letter_of).transpose()
    }

    pub(super) async fn claim_delivery(
        &self,
        key: &DeliveryKey,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Claim, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                CLAIM,
                &[
                    &key.subject,
                    &key.channel,
                    &key.event,
                    &owner,
                    &ms(lease_until),
                    &ms(now),
                ],
            )
            .await
            .map_err(self.err())?;
        Ok(match row {
            None => Claim::Held,
            Some(row) => Claim::Taken {
                attempted_at: row.get::<_, Option<i64>>(0).map(from_ms).transpose()?,
            },
        })
    }

    pub(super) async fn delivery_attempt(
        &self,
        key: &DeliveryKey,
        owner: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE deliveries SET attempted_at = coalesce(attempted_at, $5) \
                 WHERE subject = $1 AND channel = $2 AND event = $3 AND owner = $4",
                &[&key.subject, &key.channel, &key.event, &owner, &ms(at)],
            )
            .await
            .map_err(self.err())?;
        Ok(())
    }

    pub(super) async fn release_delivery(
        &self,
        key: &DeliveryKey,
        owner: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE deliveries SET owner = NULL, attempted_at = NULL \
                 WHERE subject = $1 AND channel = $2 AND event = $3 AND owner = $4",
                &[&key.subject, &key.channel, &key.event, &owner],
            )
            .await
            .map_err(self.err())?;
        Ok(())
    }

    pub(super) async fn expired_deliveries(
        &self,
        channel: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<DeliveryKey>, StoreError> {
        let client = self.client().await?;
        let prefix = format!("{channel}:");
        let rows = client
            .query(
                "SELECT subject, channel, event FROM deliveries \
                 WHERE owner IS NOT NULL AND lease_until < $3 \
                 AND (channel = $1 OR left(channel, length($2)) = $2) \
                 ORDER BY lease_until LIMIT 1000",
                &[&channel, &prefix, &ms(now)],
            )
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|row| {
                DeliveryKey::new(
                    row.get::<_, String>(0),
                    row.get::<_, String>(1),
                    row.get::<_, String>(2),
                )
            })
            .collect())
    }
}
