//! Hosts' anchored audit chains on `PostgreSQL` (migration 3); see [`crate::host_audit`].
//!
//! A batch is one transaction that row-locks the host's head (`FOR UPDATE`), so two
//! connections of one host (a failover while the old stream lingers) never interleave; the
//! new records go in with one `INSERT ... SELECT FROM unnest(...)`, one round trip per batch.

use std::collections::BTreeMap;

use gatekeep_proto::host_audit::{
    ChainPoint, Divergence, DivergenceKind, HostAuditRecord, HostHead, ShipBatch,
};
use time::OffsetDateTime;
use tokio_postgres::Row;

use super::{PostgresStore, from_ms};
use crate::{
    host_audit,
    store::{Shipped, StoreError, ms},
};

fn seq_to_sql(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt {
        message: format!("seq {seq} too large"),
    })
}

fn seq_from_sql(seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt {
        message: format!("negative seq {seq}"),
    })
}

fn divergence(row: &Row) -> Result<Divergence, StoreError> {
    Ok(Divergence {
        host: row.get(0),
        seq: seq_from_sql(row.get(1))?,
        kind: row
            .get::<_, &str>(2)
            .parse::<DivergenceKind>()
            .map_err(|err| StoreError::Corrupt {
                message: err.to_string(),
            })?,
        detail: row.get(3),
        at: from_ms(row.get(4))?,
    })
}

impl PostgresStore {
    pub(super) async fn ship_host_audit(
        &self,
        host: &str,
        batch: &ShipBatch,
        now: OffsetDateTime,
    ) -> Result<Shipped, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(self.err())?;
        // A row to lock even for a host's first batch (seq 0: nothing anchored yet).
        tx.execute(
            "INSERT INTO host_audit_heads (host, seq, hash, updated_at) VALUES ($1, 0, '', $2) \
             ON CONFLICT (host) DO NOTHING",
            &[&host, &ms(now)],
        )
        .await
        .map_err(self.err())?;
        let row = tx
            .query_one(
                "SELECT seq, hash FROM host_audit_heads WHERE host = $1 FOR UPDATE",
                &[&host],
            )
            .await
            .map_err(self.err())?;
        let seq = seq_from_sql(row.get(0))?;
        let anchored_head = (seq > 0).then(|| ChainPoint {
            seq,
            hash: row.get(1),
        });
        let needed = host_audit::needed(anchored_head.as_ref(), batch)
            .into_iter()
            .map(seq_to_sql)
            .collect::<Result<Vec<_>, _>>()?;
        let mut anchored = BTreeMap::new();
        if !needed.is_empty() {
            for row in tx
                .query(
                    "SELECT seq, hash FROM host_audit_records WHERE host = $1 AND seq = ANY($2)",
                    &[&host, &needed],
                )
                .await
                .map_err(self.err())?
            {
                anchored.insert(seq_from_sql(row.get(0))?, row.get::<_, String>(1));
            }
        }
        let plan = match host_audit::check(anchored_head.as_ref(), &anchored, batch) {
            Ok(plan) => plan,
            Err(refusal) => {
                return Ok(Shipped {
                    head: anchored_head,
                    refused: Some(refusal),
                    ..Shipped::default()
                });
            }
        };
        let mut shipped = Shipped {
            head: anchored_head,
            appended: plan.append.len(),
            ..Shipped::default()
        };
        if let Some(last) = plan.append.last() {
            self.append_host_records(&tx, host, &plan.append, now)
                .await?;
            shipped.head = Some(ChainPoint {
                seq: last.seq,
                hash: last.hash.clone(),
            });
        }
        if let Some((seq, kind, detail)) = plan.divergence {
            let seq = seq_to_sql(seq)?;
            let added = tx
                .execute(
                    "INSERT INTO host_audit_divergences (host, seq, kind, detail, at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&host, &seq, &kind.as_str(), &detail, &ms(now)],
                )
                .await
                .map_err(self.err())?;
            shipped.new_divergence = added == 1;
            let row = tx
                .query_one(
                    "SELECT host, seq, kind, detail, at FROM host_audit_divergences \
                     WHERE host = $1 AND seq = $2 AND kind = $3",
                    &[&host, &seq, &kind.as_str()],
                )
                .await
                .map_err(self.err())?;
            shipped.divergence = Some(divergence(&row)?);
        }
        tx.commit().await.map_err(self.err())?;
        Ok(shipped)
    }

    /// Inserts `records` (one `INSERT ... unnest`) and moves the host's head to the last.
    async fn append_host_records(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        host: &str,
        records: &[HostAuditRecord],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        let seqs = records
            .iter()
            .map(|r| seq_to_sql(r.seq))
            .collect::<Result<Vec<_>, _>>()?;
        let column =
            |f: fn(&HostAuditRecord) -> &str| -> Vec<&str> { records.iter().map(f).collect() };
        let optional = |f: fn(&HostAuditRecord) -> Option<&str>| -> Vec<Option<&str>> {
            records.iter().map(f).collect()
        };
        tx.execute(
            "INSERT INTO host_audit_records (host, seq, at, kind, request_id, record_host, \
             actor, payload, prev_hash, hash, received_at) \
             SELECT $1, * , $10 FROM unnest($2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $11::text[])",
            &[
                &host,
                &seqs,
                &column(|r| &r.at),
                &column(|r| &r.kind),
                &optional(|r| r.request_id.as_deref()),
                &column(|r| &r.host),
                &optional(|r| r.actor.as_deref()),
                &column(|r| &r.payload),
                &column(|r| &r.prev_hash),
                &ms(now),
                &column(|r| &r.hash),
            ],
        )
        .await
        .map_err(self.err())?;
        tx.execute(
            "UPDATE host_audit_heads SET seq = $2, hash = $3, updated_at = $4 WHERE host = $1",
            &[&host, &seq_to_sql(last.seq)?, &last.hash, &ms(now)],
        )
        .await
        .map_err(self.err())?;
        Ok(())
    }

    pub(super) async fn host_audit_heads(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<HostHead>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "SELECT host, seq, hash, updated_at FROM host_audit_heads \
                 WHERE seq > 0 AND ($1::text IS NULL OR host = $1) ORDER BY host",
                &[&host],
            )
            .await
            .map_err(self.err())?
            .iter()
            .map(|row| {
                Ok(HostHead {
                    host: row.get(0),
                    head: ChainPoint {
                        seq: seq_from_sql(row.get(1))?,
                        hash: row.get(2),
                    },
                    updated: from_ms(row.get(3))?,
                })
            })
            .collect()
    }

    pub(super) async fn host_audit_divergences(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<Divergence>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "SELECT host, seq, kind, detail, at FROM host_audit_divergences \
                 WHERE $1::text IS NULL OR host = $1 ORDER BY at, host, seq",
                &[&host],
            )
            .await
            .map_err(self.err())?
            .iter()
            .map(divergence)
            .collect()
    }

    pub(super) async fn host_audit_records(
        &self,
        host: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<HostAuditRecord>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        client
            .query(
                "SELECT seq, at, kind, request_id, record_host, actor, payload, prev_hash, hash \
                 FROM host_audit_records WHERE host = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                &[&host, &seq_to_sql(from_seq)?, &limit],
            )
            .await
            .map_err(self.err())?
            .iter()
            .map(|row| {
                Ok(HostAuditRecord {
                    seq: seq_from_sql(row.get(0))?,
                    at: row.get(1),
                    kind: row.get(2),
                    request_id: row.get(3),
                    host: row.get(4),
                    actor: row.get(5),
                    payload: row.get(6),
                    prev_hash: row.get(7),
                    hash: row.get(8),
                })
            })
            .collect()
    }
}
