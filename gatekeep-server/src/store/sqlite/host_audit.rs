//! Hosts' anchored audit chains on `SQLite` (migration 3); see [`crate::host_audit`].

use std::collections::BTreeMap;

use gatekeep_proto::host_audit::{
    ChainPoint, Divergence, DivergenceKind, HostAuditRecord, HostHead, ShipBatch,
};
use rusqlite::{Connection, OptionalExtension as _, params};
use time::OffsetDateTime;

use super::from_ms;
use crate::{
    host_audit,
    store::{Shipped, StoreError, ms},
};

/// Records as the host stored them, under the host of the agent's certificate (`host`;
/// `record_host` is the name the agent wrote), append-only like the service's own log.
pub(super) const SCHEMA: &str = "
CREATE TABLE host_audit_records (
    host        TEXT NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 1),
    at          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    request_id  TEXT,
    record_host TEXT NOT NULL,
    actor       TEXT,
    payload     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (host, seq)
) STRICT;
CREATE TRIGGER host_audit_records_no_update BEFORE UPDATE ON host_audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER host_audit_records_no_delete BEFORE DELETE ON host_audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TABLE host_audit_heads (
    host       TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    hash       TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE TABLE host_audit_divergences (
    host   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    detail TEXT NOT NULL,
    at     INTEGER NOT NULL,
    PRIMARY KEY (host, seq, kind)
) STRICT;
";

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

fn head(conn: &Connection, host: &str) -> Result<Option<ChainPoint>, StoreError> {
    conn.prepare_cached("SELECT seq, hash FROM host_audit_heads WHERE host = ?1")?
        .query_row([host], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .optional()?
        .map(|(seq, hash)| {
            Ok(ChainPoint {
                seq: seq_from_sql(seq)?,
                hash,
            })
        })
        .transpose()
}

/// Runs [`Store::ship_host_audit`](crate::store::Store::ship_host_audit) on the writing
/// connection (inside the store thread's transaction).
pub(super) fn ship(
    conn: &Connection,
    host: &str,
    batch: &ShipBatch,
    now: OffsetDateTime,
) -> Result<Shipped, StoreError> {
    let anchored_head = head(conn, host)?;
    let mut anchored = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT hash FROM host_audit_records WHERE host = ?1 AND seq = ?2")?;
        for seq in host_audit::needed(anchored_head.as_ref(), batch) {
            if let Some(hash) = stmt
                .query_row(params![host, seq_to_sql(seq)?], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?
            {
                anchored.insert(seq, hash);
            }
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
        let mut insert = conn.prepare_cached(
            "INSERT INTO host_audit_records (host, seq, at, kind, request_id, record_host, \
             actor, payload, prev_hash, hash, received_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for record in &plan.append {
            insert.execute(params![
                host,
                seq_to_sql(record.seq)?,
                record.at,
                record.kind,
                record.request_id,
                record.host,
                record.actor,
                record.payload,
                record.prev_hash,
                record.hash,
                ms(now),
            ])?;
        }
        conn.prepare_cached(
            "INSERT INTO host_audit_heads (host, seq, hash, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (host) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, \
             updated_at = excluded.updated_at",
        )?
        .execute(params![host, seq_to_sql(last.seq)?, last.hash, ms(now)])?;
        shipped.head = Some(ChainPoint {
            seq: last.seq,
            hash: last.hash.clone(),
        });
    }
    if let Some((seq, kind, detail)) = plan.divergence {
        let added = conn
            .prepare_cached(
                "INSERT INTO host_audit_divergences (host, seq, kind, detail, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                host,
                seq_to_sql(seq)?,
                kind.as_str(),
                detail,
                ms(now)
            ])?;
        shipped.new_divergence = added == 1;
        shipped.divergence = divergences(conn, Some(host))?
            .into_iter()
            .find(|d| d.seq == seq && d.kind == kind);
    }
    Ok(shipped)
}

pub(super) fn heads(conn: &Connection, host: Option<&str>) -> Result<Vec<HostHead>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host, seq, hash, updated_at FROM host_audit_heads \
         WHERE ?1 IS NULL OR host = ?1 ORDER BY host",
    )?;
    let mut rows = stmt.query([host])?;
    let mut heads = Vec::new();
    while let Some(row) = rows.next()? {
        heads.push(HostHead {
            host: row.get(0)?,
            head: ChainPoint {
                seq: seq_from_sql(row.get(1)?)?,
                hash: row.get(2)?,
            },
            updated: from_ms(row.get(3)?)?,
        });
    }
    Ok(heads)
}

pub(super) fn divergences(
    conn: &Connection,
    host: Option<&str>,
) -> Result<Vec<Divergence>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT host, seq, kind, detail, at FROM host_audit_divergences \
         WHERE ?1 IS NULL OR host = ?1 ORDER BY at, host, seq",
    )?;
    let mut rows = stmt.query([host])?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        let kind: String = row.get(2)?;
        found.push(Divergence {
            host: row.get(0)?,
            seq: seq_from_sql(row.get(1)?)?,
            kind: kind
                .parse::<DivergenceKind>()
                .map_err(|err| StoreError::Corrupt {
                    message: err.to_string(),
                })?,
            detail: row.get(3)?,
            at: from_ms(row.get(4)?)?,
        });
    }
    Ok(found)
}

pub(super) fn records(
    conn: &Connection,
    host: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<HostAuditRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at, kind, request_id, record_host, actor, payload, prev_hash, hash \
         FROM host_audit_records WHERE host = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![host, seq_to_sql(from_seq)?, limit])?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        found.push(HostAuditRecord {
            seq: seq_from_sql(row.get(0)?)?,
            at: row.get(1)?,
            kind: row.get(2)?,
            request_id: row.get(3)?,
            host: row.get(4)?,
            actor: row.get(5)?,
            payload: row.get(6)?,
            prev_hash: row.get(7)?,
            hash: row.get(8)?,
        });
    }
    Ok(found)
}
