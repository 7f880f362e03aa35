//! The service's audit chain in `PostgreSQL`: one chain that every replica appends to.
//!
//! [`PostgresChain`] is the [`ChainStore`] of the replica's [`AuditWriter`]
//! (gatekeep-audit's batching thread): each batch is one transaction that takes a
//! transaction-scoped advisory lock, reads the head, chains the records after it (the same
//! hash as the `SQLite` log) and inserts them. Two replicas therefore never fork the chain:
//! the second waits for the first's commit and chains after it. The table refuses `UPDATE`,
//! `DELETE` and `TRUNCATE` (triggers), and [`export`] writes the same JSON Lines as the
//! `SQLite` log's export, which [`verify`] checks with [`gatekeep_audit::verify_export`].
//!
//! [`AuditWriter`]: gatekeep_audit::AuditWriter

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
};

use gatekeep_audit::{
    AuditError, ChainFields, ChainHead, ChainStore, ExportFilter, GENESIS_HASH, Once, Prepared,
    RecordKind, VerifyReport,
};

use super::PostgresStore;

/// The advisory lock key of audit appends ("gk-audit"): whoever holds it holds up every
/// replica's appends (the replicas test holds it to stall them).
pub const AUDIT_LOCK: i64 = 0x676b_2d61_7564_6974;
/// Rows read per query of an export.
const EXPORT_PAGE: i64 = 5_000;
/// The chain's last record.
const HEAD: &str = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1";
/// The guards `verify` looks for.
const GUARDS: [&str; 2] = ["audit_records_no_change", "audit_records_no_truncate"];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The audit chain's [`ChainStore`] on `PostgreSQL`.
///
/// It owns its connection and a small runtime of its own: the writer calls it from its own
/// thread, and the chain must stay writable while the service's runtime shuts down (the
/// writer commits everything accepted before it stops).
pub struct PostgresChain {
    dialer: super::tls::Dialer,
    location: PathBuf,
    head: u64,
    connection: Option<(tokio::runtime::Runtime, tokio_postgres::Client)>,
}

impl std::fmt::Debug for PostgresChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresChain")
            .field("location", &self.location)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl PostgresChain {
    /// The chain of `store`'s database; connects at its first append.
    #[must_use]
    pub fn new(store: &PostgresStore) -> Self {
        Self {
            dialer: store.dialer().clone(),
            location: PathBuf::from(store.target().to_string()),
            head: 0,
            connection: None,
        }
    }

    fn backend(&self, source: impl Into<BoxError>) -> AuditError {
        AuditError::Backend {
            location: self.location.display().to_string(),
            source: source.into(),
        }
    }

    fn append_rows(&mut self, records: &[Prepared]) -> Result<u64, BoxError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|(_, client)| client.is_closed())
        {
            self.connection = None;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let client = runtime.block_on(async {
                let (client, connection) = self.dialer.connect().await?;
                // Polled whenever the runtime runs, that is during each append.
                tokio::spawn(connection);
                Ok::<_, tokio_postgres::Error>(client)
            })?;
            self.connection = Some((runtime, client));
        }
        let Some((runtime, client)) = self.connection.as_mut() else {
            return Err("no connection".into());
        };
        runtime.block_on(append(client, records))
    }
}

/// One batch, one transaction; returns the new head's seq.
///
/// Every path ends its transaction before returning: the connection is only driven while
/// an append runs, so a transaction left to end on drop would keep the lock until the next
/// append, and every other replica waiting for it.
async fn append(
    client: &mut tokio_postgres::Client,
    records: &[Prepared],
) -> Result<u64, BoxError> {
    if records.is_empty() {
        // Only the head (a flush): no lock, no transaction.
        let head = client.query_opt(HEAD, &[]).await?;
        return Ok(match head {
            Some(row) => u64::try_from(row.get::<_, i64>(0))?,
            None => 0,
        });
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await?;
    let head = tx.query_opt(HEAD, &[]).await?;
    let (mut seq, mut prev) = match head {
        Some(row) => (
            u64::try_from(row.get::<_, i64>(0))?,
            row.get::<_, String>(1),
        ),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let keep = once_filter(&tx, records).await?;
    if keep.is_empty() {
        // Every record was there already.
        tx.commit().await?;
        return Ok(seq);
    }
    let mut columns = Columns::default();
    for record in keep.into_iter().map(|index| &records[index]) {
        seq += 1;
        let hash = record.chain_fields(seq, &prev).hash();
        columns.seq.push(i64::try_from(seq)?);
        columns.at.push(record.at());
        columns.kind.push(record.kind());
        columns.request_id.push(record.request_id());
        columns.host.push(record.host());
        columns.actor.push(record.actor());
        columns.payload.push(record.payload());
        columns
            .prev_hash
            .push(std::mem::replace(&mut prev, hash.clone()));
        columns.hash.push(hash);
    }
    // One statement for the whole batch.
    tx.execute(
        "INSERT INTO audit_records \
         (seq, at, kind, request_id, host, actor, payload, prev_hash, hash) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::text[], $8::text[], $9::text[])",
        &[
            &columns.seq,
            &columns.at,
            &columns.kind,
            &columns.request_id,
            &columns.host,
            &columns.actor,
            &columns.payload,
            &columns.prev_hash,
            &columns.hash,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(seq)
}

/// The records of `records` to append ([`gatekeep_audit::once_filter`]): one query, under
/// the lock, for the requests of the once-per-request records. Of their `decided` records
/// it reads whether the payload says final (an outcome, [`Once::Outcome`]), not a vote.
async fn once_filter(
    tx: &tokio_postgres::Transaction<'_>,
    records: &[Prepared],
) -> Result<Vec<usize>, BoxError> {
    let ids: Vec<&str> = records
        .iter()
        .filter(|r| r.once())
        .filter_map(Prepared::request_id)
        .collect();
    let mut kinds: HashSet<(String, String)> = HashSet::new();
    let mut outcomes: HashSet<String> = HashSet::new();
    if !ids.is_empty() {
        // `CASE` evaluates in order: only `decided` payloads are parsed.
        let rows = tx
            .query(
                "SELECT request_id, kind, CASE WHEN kind = 'decided' \
                 THEN coalesce((payload::jsonb ->> 'final') = 'true', false) \
                 ELSE kind = ANY($2) END \
                 FROM audit_records WHERE request_id = ANY($1)",
                &[&ids, &OUTCOME_KINDS.as_slice()],
            )
            .await?;
        for row in rows {
            let id: String = row.get(0);
            if row.get::<_, bool>(2) {
                outcomes.insert(id.clone());
            }
            kinds.insert((id, row.get(1)));
        }
    }
    gatekeep_audit::once_filter(records, |id, kind, once| {
        Ok::<_, BoxError>(match once {
            Once::Kind => kinds.contains(&(id.to_owned(), kind.to_owned())),
            Once::Outcome => outcomes.contains(id),
        })
    })
}

/// The kinds of an outcome besides a final `decided` ([`Once::Outcome`]).
const OUTCOME_KINDS: [&str; 3] = ["expired", "cancelled", "abandoned"];

/// A batch as arrays, one per column.
#[derive(Default)]
struct Columns<'a> {
    seq: Vec<i64>,
    at: Vec<&'a str>,
    kind: Vec<&'a str>,
    request_id: Vec<Option<&'a str>>,
    host: Vec<&'a str>,
    actor: Vec<Option<&'a str>>,
    payload: Vec<&'a str>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
}

impl ChainStore for PostgresChain {
    fn location(&self) -> &Path {
        &self.location
    }

    fn append(&mut self, records: &[Prepared]) -> Result<u64, AuditError> {
        match self.append_rows(records) {
            Ok(seq) => {
                self.head = seq;
                Ok(seq)
            }
            Err(error) => {
                // A failed transaction may leave the connection unusable: start afresh.
                self.connection = None;
                Err(self.backend(error))
            }
        }
    }

    fn head_seq(&self) -> u64 {
        self.head
    }
}

/// Writes the chain as JSON Lines (see [`gatekeep_audit::export`]); returns the number of
/// records.
pub async fn export(
    store: &PostgresStore,
    mut out: impl Write,
    filter: &ExportFilter,
) -> Result<u64, AuditError> {
    let mut from = filter.from_seq.unwrap_or(1).max(1);
    let mut count = 0;
    loop {
        let (lines, next, page) = export_page(store, from, filter.kind).await?;
        out.write_all(&lines)
            .map_err(|source| AuditError::Export { source })?;
        count += page;
        match next {
            Some(next) => from = next,
            None => return Ok(count),
        }
    }
}

/// One page of [`export`]: the lines of records from `from_seq` (of `kind`), the seq to
/// continue from (`None` at the end) and how many records the page holds.
pub async fn export_page(
    store: &PostgresStore,
    from_seq: u64,
    kind: Option<RecordKind>,
) -> Result<(Vec<u8>, Option<u64>, u64), AuditError> {
    let backend = |source: BoxError| AuditError::Backend {
        location: store.target().to_string(),
        source,
    };
    let client = store.pool().get().await.map_err(|e| backend(e.into()))?;
    let from = i64::try_from(from_seq).map_err(|e| backend(e.into()))?;
    let rows = client
        .query(
            "SELECT seq, at, kind, request_id, host, actor, payload, prev_hash, hash \
             FROM audit_records WHERE seq >= $1 AND ($2::text IS NULL OR kind = $2) \
             ORDER BY seq LIMIT $3",
            &[&from, &kind.map(RecordKind::as_str), &EXPORT_PAGE],
        )
        .await
        .map_err(|e| backend(e.into()))?;
    let mut out = Vec::new();
    let mut last = None;
    for row in &rows {
        let seq = u64::try_from(row.get::<_, i64>(0)).map_err(|e| backend(e.into()))?;
        let fields = ChainFields {
            seq,
            at: row.get(1),
            kind: row.get(2),
            request_id: row.get(3),
            host: row.get(4),
            actor: row.get(5),
            payload: row.get(6),
            prev_hash: row.get(7),
        };
        gatekeep_audit::export_line(&mut out, &fields, row.get(8))?;
        last = Some(seq);
    }
    let full = rows.len() >= usize::try_from(EXPORT_PAGE).unwrap_or(usize::MAX);
    let count = u64::try_from(rows.len()).unwrap_or(u64::MAX);
    Ok((out, last.filter(|_| full).map(|seq| seq + 1), count))
}

/// Verifies the chain (every link and hash, seq without gaps) and that the append-only
/// triggers are in place.
pub async fn verify(store: &PostgresStore) -> Result<VerifyReport, AuditError> {
    let mut lines = Vec::new();
    export(store, &mut lines, &ExportFilter::default()).await?;
    let mut report = gatekeep_audit::verify_export(&lines[..])?;
    let client = store.pool().get().await.map_err(|e| AuditError::Backend {
        location: store.target().to_string(),
        source: e.into(),
    })?;
    let guards: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'audit_records'::regclass \
             AND tgname = ANY($1) AND tgenabled <> 'D'",
            &[&&GUARDS[..]],
        )
        .await
        .map_err(|e| AuditError::Backend {
            location: store.target().to_string(),
            source: e.into(),
        })?
        .get(0);
    report.guards_intact = Some(guards == i64::try_from(GUARDS.len()).unwrap_or(0));
    Ok(report)
}

/// The chain's last record.
pub async fn head(store: &PostgresStore) -> Result<Option<ChainHead>, AuditError> {
    let backend = |source: BoxError| AuditError::Backend {
        location: store.target().to_string(),
        source,
    };
    let client = store.pool().get().await.map_err(|e| backend(e.into()))?;
    let row = client
        .query_opt(HEAD, &[])
        .await
        .map_err(|e| backend(e.into()))?;
    row.map(|row| {
        Ok(ChainHead {
            seq: u64::try_from(row.get::<_, i64>(0)).map_err(|e| backend(e.into()))?,
            hash: row.get(1),
        })
    })
    .transpose()
}
