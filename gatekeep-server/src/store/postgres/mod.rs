//! [`Store`] on `PostgreSQL`: what lets several service replicas share one database.
//!
//! - Requests carry the same optimistic `version` as on `SQLite`: a transition is one
//!   `UPDATE ... WHERE id = $1 AND version = $2`. `PostgreSQL` row-locks the row for the
//!   update and re-checks the condition after a concurrent writer committed, so of two
//!   replicas moving the same request (two approvals, an approval and the deadline) exactly
//!   one wins and the other re-reads: no vote is lost or counted twice, a deadline expires
//!   once.
//! - Every committed change of a request (and every revocation) is announced with
//!   `pg_notify` by a trigger; [`listen`] follows the announcements of the other replicas so
//!   a decision made anywhere reaches the replica holding the agent's stream.
//! - The service's audit chain lives here too ([`audit`]): one chain, appended by every
//!   replica under an advisory lock.
//! - The schema is versioned ([`migrations`]) and migrated at start.
//!
//! Times are milliseconds since the epoch, records JSON text, as on `SQLite`; ids are text in
//! the `C` collation, so that prefix ranges and ordering are bytewise.

pub mod audit;
mod deliveries;
mod host_audit;
mod listen;
mod migrations;
mod tls;

use std::{fmt, str::FromStr as _, sync::Mutex, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use gatekeep_proto::model::{Grant, RequestRecord, RequestState, Revocation};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{
    Admission, AdmissionQuery, Change, Claim, DeadLetter, DeliveryKey, GrantQuery, Inserted,
    RequestQuery, Shipped, Store, StoreConfig, StoreError, StoreFuture, Transition, Versioned, ms,
    subject_key, target_key,
};
use crate::reviewer::Reviewer;

/// How long a replica waits for a pooled connection before the call fails.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// How long connecting to the database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The database a store talks to, as it may be logged: user, hosts, port and database,
/// never the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(String);

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Target {
    fn of(config: &tokio_postgres::Config) -> Self {
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        Self(format!(
            "postgres://{}@{}:{}/{}",
            config.get_user().unwrap_or(""),
            hosts.join(","),
            ports.join(","),
            config.get_dbname().unwrap_or("")
        ))
    }
}

pub(crate) fn pg_error(target: &Target, source: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres {
        target: target.to_string(),
        source,
    }
}

/// The `PostgreSQL` store. Cheap to clone (a pool).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Kept apart for decisions (`[store] decision_pool_size`): see [`Self::decision_client`].
    decisions: Pool,
    dialer: tls::Dialer,
    target: Target,
    /// This replica's `application_name`, which the change notifications carry.
    origin: String,
    /// Started by the first [`Store::changes`] call.
    listening: std::sync::Arc<Mutex<bool>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Parses the store's URL (and password file) into a client config.
pub(crate) fn client_config(config: &StoreConfig) -> Result<tokio_postgres::Config, StoreError> {
    let url = config.url.as_deref().unwrap_or_default();
    // The parser's message may quote the URL, password included: name the cause only.
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|_| StoreError::Url {
        message: "`[store] url` is not a PostgreSQL connection URL; write it as \
                  postgres://USER@HOST:PORT/DATABASE (the password in `password_file`)"
            .to_owned(),
    })?;
    if let Some(path) = &config.password_file {
        let password = std::fs::read_to_string(path).map_err(|source| StoreError::Url {
            message: format!(
                "cannot read the database password file `{}`: {source}",
                path.display()
            ),
        })?;
        pg.password(password.trim_end_matches(['\r', '\n']));
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(pg)
}

impl PostgresStore {
    /// Connects to the database of `config`, migrates it, and returns the store.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let mut pg = client_config(config)?;
        let target = Target::of(&pg);
        let origin = format!("gatekeep-{}", Uuid::new_v4());
        pg.application_name(&origin);
        let dialer = tls::Dialer::new(pg, config)?;
        let mut client = connect_one(&dialer, &target).await?;
        migrations::migrate(&mut client, &target).await?;
        drop(client);
        let pool = |size: usize| {
            let manager = Manager::from_config(
                dialer.config.clone(),
                dialer.tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|err| StoreError::Url {
                    message: format!("cannot make a connection pool: {err}"),
                })
        };
        tracing::info!(target = %target, "service database: PostgreSQL");
        Ok(Self {
            pool: pool(config.pool_size.max(2))?,
            decisions: pool(config.decision_pool_size.max(1))?,
            dialer,
            target,
            origin,
            listening: std::sync::Arc::new(Mutex::new(false)),
        })
    }

    /// The database, as it may be logged.
    #[must_use]
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connection pool (the audit chain shares it).
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How to connect (the audit chain and the notification listener connect with it).
    pub(crate) fn dialer(&self) -> &tls::Dialer {
        &self.dialer
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|source| StoreError::Pool {
            target: self.target.to_string(),
            source,
        })
    }

    /// A connection of the decision pool: for what a reviewer's decision, or its delivery
    /// from another replica, waits on. Under a burst of agents' requests every connection of
    /// the main pool is busy and a queue forms for it; a decision queued there would wait
    /// for the whole burst ahead of it.
    async fn decision_client(&self) -> Result<Object, StoreError> {
        self.decisions
            .get()
            .await
            .map_err(|source| StoreError::Pool {
                target: self.target.to_string(),
                source,
            })
    }

    fn err(&self) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
        |source| pg_error(&self.target, source)
    }

    async fn get_request(&self, id: Uuid) -> Result<Option<Versioned<RequestRecord>>, StoreError> {
        let client = self.decision_client().await?;
        self.get_request_on(&client, id).await
    }

    async fn get_request_on(
        &self,
        client: &Object,
        id: Uuid,
    ) -> Result<Option<Versioned<RequestRecord>>, StoreError> {
        let stmt = client
            .prepare_cached("SELECT record, version FROM requests WHERE id = $1")
            .await
            .map_err(self.err())?;
        client
            .query_opt(&stmt, &[&id.to_string()])
            .await
            .map_err(self.err())?
            .map(|row| versioned(&row))
            .transpose()
    }

    async fn find_grant_on(
        &self,
        client: &Object,
        query: &AdmissionQuery,
    ) -> Result<Option<Grant>, StoreError> {
        let stmt = client
            .prepare_cached(
                "SELECT body FROM grants WHERE host = $1 AND policy = $2 AND target = $3 \
                 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $4) \
                 AND (cgroup IS NULL OR cgroup = $5) ORDER BY created_at DESC LIMIT 1",
            )
            .await
            .map_err(self.err())?;
        let row = client
            .query_opt(
                &stmt,
                &[
                    &query.host,
                    &query.policy,
                    &target_key(&query.target)?,
                    &ms(query.now),
                    &query.cgroup,
                ],
            )
            .await
            .map_err(self.err())?;
        row.map(|row| Ok(serde_json::from_str(row.get::<_, &str>(0))?))
            .transpose()
    }

    async fn grants_where(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Grant>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(self.err())?;
        client
            .query(&stmt, params)
            .await
            .map_err(self.err())?
            .iter()
            .map(|row| Ok(serde_json::from_str(row.get::<_, &str>(0))?))
            .collect()
    }

    async fn insert_request(&self, record: &RequestRecord) -> Result<Inserted, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, \
                 deadline, decided_at, version, record) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(self.err())?;
        let id = record.request.id.to_string();
        let inserted = client
            .execute(
                &stmt,
                &[
                    &id,
                    &record.host,
                    &record.request.policy,
                    &record.request.kind().as_str(),
                    &record.state.as_str(),
                    &subject_key(&record.request.target),
                    &ms(record.received_at),
                    &ms(record.deadline),
                    &record.decision.as_ref().map(|d| ms(d.decided_at)),
                    &serde_json::to_string(record)?,
                ],
            )
            .await
            .map_err(self.err())?;
        drop(client);
        if inserted == 1 {
            return Ok(Inserted::New);
        }
        let existing =
            self.get_request(record.request.id)
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    message: format!("request `{id}` conflicted on insert but cannot be read"),
                })?;
        Ok(Inserted::Existing(Box::new(existing)))
    }

    async fn transition(&self, transition: &Transition) -> Result<bool, StoreError> {
        let mut client = self.decision_client().await?;
        let tx = client.transaction().await.map_err(self.err())?;
        let record = &transition.record;
        let stmt = tx
            .prepare_cached(
                "UPDATE requests SET state = $1, decided_at = $2, deadline = $3, record = $4, \
                 version = version + 1 WHERE id = $5 AND version = $6",
            )
            .await
            .map_err(self.err())?;
        let changed = tx
            .execute(
                &stmt,
                &[
                    &record.state.as_str(),
                    &record.decision.as_ref().map(|d| ms(d.decided_at)),
                    &ms(record.deadline),
                    &serde_json::to_string(record)?,
                    &record.request.id.to_string(),
                    &version_to_sql(transition.expected_version)?,
                ],
            )
            .await
            .map_err(self.err())?;
        if changed == 0 {
            // Nothing written; dropping the transaction rolls it back.
            return Ok(false);
        }
        if let Some(grant) = &transition.new_grant {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO grants (id, host, policy, target, cgroup, duration, expires_at, \
                     created_at, revoked_at, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .await
                .map_err(self.err())?;
            tx.execute(
                &stmt,
                &[
                    &grant.id.to_string(),
                    &grant.host,
                    &grant.policy,
                    &target_key(&grant.target)?,
                    &grant.cgroup,
                    &grant.duration.to_string(),
                    &grant.expires_at.map(ms),
                    &ms(grant.created_at),
                    &grant.revoked.as_ref().map(|r| ms(r.at)),
                    &serde_json::to_string(grant)?,
                ],
            )
            .await
            .map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(true)
    }

    async fn audit_owed(
        &self,
        before: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT r.record, r.version FROM audit_owed o JOIN requests r ON r.id = o.id \
                 WHERE o.since <= $1 ORDER BY o.since, o.id LIMIT $2",
            )
            .await
            .map_err(self.err())?;
        client
            .query(
                &stmt,
                &[&ms(before), &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(self.err())?
            .iter()
            .map(|row| versioned(row).map(|v| v.value))
            .collect()
    }

    async fn audit_settled(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM audit_owed WHERE id = ANY($1)")
            .await
            .map_err(self.err())?;
        client.execute(&stmt, &[&ids]).await.map_err(self.err())?;
        Ok(())
    }

    async fn list_requests(&self, query: &RequestQuery) -> Result<Vec<RequestRecord>, StoreError> {
        let order = if query.newest_first { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT record, version FROM requests WHERE ($1::text IS NULL OR state = $1) \
             AND (NOT $2::bool OR state <> 'pending') AND ($3::text IS NULL OR host = $3) \
             AND ($4::text IS NULL OR policy = $4) AND ($5::text IS NULL OR kind = $5) \
             AND ($6::text IS NULL OR subject = $6) AND ($7::text IS NULL OR id <> $7) \
             ORDER BY received_at {order}, id LIMIT $8"
        );
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await.map_err(self.err())?;
        let rows = client
            .query(
                &stmt,
                &[
                    &query.state.map(RequestState::as_str),
                    &query.final_only,
                    &query.host,
                    &query.policy,
                    &query.kind.map(gatekeep_proto::model::Kind::as_str),
                    &query.subject,
                    &query.exclude.map(|id| id.to_string()),
                    &i64::try_from(query.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(self.err())?;
        rows.iter()
            .map(|row| versioned(row).map(|v| v.value))
            .collect()
    }

    async fn request_ids_with_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id FROM requests WHERE id >= $1 AND id < $2 ORDER BY id LIMIT $3",
            )
            .await
            .map_err(self.err())?;
        let rows = client
            .query(
                &stmt,
                &[
                    &prefix,
                    &format!("{prefix}g"),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(self.err())?;
        rows.iter()
            .map(|row| {
                let text: &str = row.get(0);
                Uuid::try_parse(text).map_err(|err| StoreError::Corrupt {
                    message: format!("stored request id `{text}` is not a uuid: {err}"),
                })
            })
            .collect()
    }

    async fn due_requests(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Versioned<RequestRecord>>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT record, version FROM requests WHERE state = 'pending' AND deadline <= $1 \
                 ORDER BY deadline LIMIT $2",
            )
            .await
            .map_err(self.err())?;
        client
            .query(
                &stmt,
                &[&ms(now), &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(self.err())?
            .iter()
            .map(versioned)
            .collect()
    }

    async fn next_wakeup(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT least(\
                 (SELECT min(deadline) FROM requests WHERE state = 'pending'), \
                 (SELECT min(expires_at) FROM grants \
                  WHERE revoked_at IS NULL AND expires_at IS NOT NULL))",
                &[],
            )
            .await
            .map_err(self.err())?;
        row.get::<_, Option<i64>>(0).map(from_ms).transpose()
    }

    async fn count_pending(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let count: i64 = client
            .query_one("SELECT count(*) FROM requests WHERE state = 'pending'", &[])
            .await
            .map_err(self.err())?
            .get(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn revoke_grant(
        &self,
        id: Uuid,
        revocation: Revocation,
    ) -> Result<Option<Grant>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(self.err())?;
        // Locked, so that two replicas revoking at once write one revocation.
        let Some(row) = tx
            .query_opt(
                "SELECT body FROM grants WHERE id = $1 FOR UPDATE",
                &[&id.to_string()],
            )
            .await
            .map_err(self.err())?
        else {
            return Ok(None);
        };
        let mut grant: Grant = serde_json::from_str(row.get::<_, &str>(0))?;
        if grant.revoked.is_some() {
            return Ok(None);
        }
        let at = ms(revocation.at);
        grant.revoked = Some(revocation);
        let changed = tx
            .execute(
                "UPDATE grants SET revoked_at = $1, body = $2 WHERE id = $3 AND revoked_at IS NULL",
                &[&at, &serde_json::to_string(&grant)?, &id.to_string()],
            )
            .await
            .map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        Ok((changed == 1).then_some(grant))
    }

    async fn add_reviewer(
        &self,
        reviewer: Reviewer,
        token_sha256: String,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO reviewers (name, token_sha256, groups, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                &[
                    &reviewer.name,
                    &token_sha256,
                    &serde_json::to_string(&reviewer.groups)?,
                    &ms(OffsetDateTime::now_utc()),
                ],
            )
            .await
            .map_err(self.err())?;
        if inserted == 0 {
            return Err(StoreError::ReviewerExists {
                name: reviewer.name,
            });
        }
        Ok(())
    }

    async fn reviewers_where(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Reviewer>, StoreError> {
        // Reviewers signing in are served apart from agents' requests, as their decisions.
        let client = self.decision_client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(self.err())?;
        client
            .query(&stmt, params)
            .await
            .map_err(self.err())?
            .iter()
            .map(|row| {
                Ok(Reviewer {
                    name: row.get(0),
                    groups: serde_json::from_str(row.get::<_, &str>(1))?,
                    email: None,
                })
            })
            .collect()
    }

    async fn remove_reviewer(&self, name: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute("DELETE FROM reviewers WHERE name = $1", &[&name])
            .await
            .map_err(self.err())?
            == 1)
    }

    async fn notice(&self, key: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT value FROM notices WHERE key = $1", &[&key])
            .await
            .map_err(self.err())?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn set_notice(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO notices (key, value, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
                &[&key, &value, &ms(OffsetDateTime::now_utc())],
            )
            .await
            .map_err(self.err())?;
        Ok(())
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO dead_letters (sink, key, error, attempts, at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &letter.sink,
                    &letter.key,
                    &letter.error,
                    &i64::from(letter.attempts),
                    &ms(letter.at),
                ],
            )
            .await
            .map_err(self.err())?;
        Ok(())
    }
}

async fn connect_one(
    dialer: &tls::Dialer,
    target: &Target,
) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = dialer
        .connect()
        .await
        .map_err(|source| StoreError::Connect {
            target: target.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "service database connection ended");
        }
    });
    Ok(client)
}

fn versioned(row: &Row) -> Result<Versioned<RequestRecord>, StoreError> {
    let version: i64 = row.get(1);
    Ok(Versioned {
        version: u64::try_from(version).map_err(|_| StoreError::Corrupt {
            message: format!("negative version {version}"),
        })?,
        value: serde_json::from_str(row.get::<_, &str>(0))?,
    })
}

fn version_to_sql(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::Corrupt {
        message: format!("version {version} too large"),
    })
}

fn from_ms(value: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value) * 1_000_000).map_err(|_| {
        StoreError::Corrupt {
            message: format!("time {value} out of range"),
        }
    })
}

impl Store for PostgresStore {
    fn insert_request(&self, record: RequestRecord) -> StoreFuture<'_, Inserted> {
        Box::pin(async move { self.insert_request(&record).await })
    }

    fn get_request(&self, id: Uuid) -> StoreFuture<'_, Option<Versioned<RequestRecord>>> {
        Box::pin(self.get_request(id))
    }

    fn transition(&self, transition: Transition) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.transition(&transition).await })
    }

    fn list_requests(&self, query: RequestQuery) -> StoreFuture<'_, Vec<RequestRecord>> {
        Box::pin(async move { self.list_requests(&query).await })
    }

    fn audit_owed(
        &self,
        before: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<RequestRecord>> {
        Box::pin(self.audit_owed(before, limit))
    }

    fn audit_settled(&self, ids: Vec<Uuid>) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.audit_settled(&ids).await })
    }

    fn request_ids_with_prefix(&self, prefix: String, limit: usize) -> StoreFuture<'_, Vec<Uuid>> {
        Box::pin(async move { self.request_ids_with_prefix(&prefix, limit).await })
    }

    fn due_requests(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Versioned<RequestRecord>>> {
        Box::pin(self.due_requests(now, limit))
    }

    fn next_wakeup(&self) -> StoreFuture<'_, Option<OffsetDateTime>> {
        Box::pin(self.next_wakeup())
    }

    fn count_pending(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.count_pending())
    }

    fn get_grant(&self, id: Uuid) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(async move {
            Ok(self
                .grants_where("SELECT body FROM grants WHERE id = $1", &[&id.to_string()])
                .await?
                .pop())
        })
    }

    fn revoke_grant(&self, id: Uuid, revocation: Revocation) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(self.revoke_grant(id, revocation))
    }

    fn list_grants(&self, query: GrantQuery, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(async move {
            self.grants_where(
                "SELECT body FROM grants WHERE ($1::text IS NULL OR host = $1) \
                 AND ($2::text IS NULL OR policy = $2) \
                 AND ($3::bool OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $4))) \
                 ORDER BY created_at, id",
                &[&query.host, &query.policy, &query.include_inactive, &ms(now)],
            )
            .await
        })
    }

    fn admission(&self, query: AdmissionQuery) -> StoreFuture<'_, Admission> {
        Box::pin(async move {
            // Both on one connection (pipelined): a call never holds one pooled connection
            // while it waits for a second, which could starve the pool.
            let client = self.client().await?;
            let (existing, grant) = tokio::try_join!(
                self.get_request_on(&client, query.id),
                self.find_grant_on(&client, &query)
            )?;
            Ok(Admission { existing, grant })
        })
    }

    fn due_grants(&self, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(async move {
            self.grants_where(
                "SELECT body FROM grants WHERE revoked_at IS NULL AND expires_at IS NOT NULL \
                 AND expires_at <= $1 ORDER BY expires_at",
                &[&ms(now)],
            )
            .await
        })
    }

    fn session_grants(&self, host: String, cgroup: String) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(async move {
            let below = format!("{}/", cgroup.trim_end_matches('/'));
            self.grants_where(
                "SELECT body FROM grants WHERE host = $1 AND revoked_at IS NULL \
                 AND duration = 'session' AND cgroup IS NOT NULL \
                 AND (cgroup = $2 OR left(cgroup, length($3)) = $3)",
                &[&host, &cgroup, &below],
            )
            .await
        })
    }

    fn add_reviewer(&self, reviewer: Reviewer, token_sha256: String) -> StoreFuture<'_, ()> {
        Box::pin(self.add_reviewer(reviewer, token_sha256))
    }

    fn reviewer_by_token(&self, token_sha256: String) -> StoreFuture<'_, Option<Reviewer>> {
        Box::pin(async move {
            Ok(self
                .reviewers_where(
                    "SELECT name, groups FROM reviewers WHERE token_sha256 = $1",
                    &[&token_sha256],
                )
                .await?
                .pop())
        })
    }

    fn list_reviewers(&self) -> StoreFuture<'_, Vec<Reviewer>> {
        Box::pin(self.reviewers_where("SELECT name, groups FROM reviewers ORDER BY name", &[]))
    }

    fn remove_reviewer(&self, name: String) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.remove_reviewer(&name).await })
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }

    fn notice(&self, key: String) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move { self.notice(&key).await })
    }

    fn set_notice(&self, key: String, value: String) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.set_notice(&key, &value).await })
    }

    fn dead_letter(&self, letter: DeadLetter) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.dead_letter(&letter).await })
    }

    fn ship_host_audit(
        &self,
        host: String,
        batch: gatekeep_proto::host_audit::ShipBatch,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Shipped> {
        Box::pin(async move { self.ship_host_audit(&host, &batch, now).await })
    }

    fn host_audit_heads(
        &self,
        host: Option<String>,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::HostHead>> {
        Box::pin(async move { self.host_audit_heads(host.as_deref()).await })
    }

    fn host_audit_divergences(
        &self,
        host: Option<String>,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::Divergence>> {
        Box::pin(async move { self.host_audit_divergences(host.as_deref()).await })
    }

    fn host_audit_records(
        &self,
        host: String,
        from_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::HostAuditRecord>> {
        Box::pin(async move { self.host_audit_records(&host, from_seq, limit).await })
    }

    fn dead_letters(&self, limit: usize) -> StoreFuture<'_, Vec<super::StoredDeadLetter>> {
        Box::pin(self.dead_letters(limit))
    }

    fn take_dead_letter(&self, id: i64) -> StoreFuture<'_, Option<super::StoredDeadLetter>> {
        Box::pin(self.take_dead_letter(id))
    }

    fn claim_delivery(
        &self,
        key: DeliveryKey,
        owner: String,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> StoreFuture<'_, Claim> {
        Box::pin(async move { self.claim_delivery(&key, &owner, now, lease_until).await })
    }

    fn delivery_attempt(
        &self,
        key: DeliveryKey,
        owner: String,
        at: OffsetDateTime,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.delivery_attempt(&key, &owner, at).await })
    }

    fn release_delivery(&self, key: DeliveryKey, owner: String) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.release_delivery(&key, &owner).await })
    }

    fn expired_deliveries(
        &self,
        channel: String,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Vec<DeliveryKey>> {
        Box::pin(async move { self.expired_deliveries(&channel, now).await })
    }

    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        let mut listening = self
            .listening
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *listening {
            return None;
        }
        *listening = true;
        Some(listen::spawn(
            self.dialer.clone(),
            self.target.clone(),
            self.origin.clone(),
        ))
    }
}
