//! The `PostgreSQL` schema as numbered migrations, applied in order at start.
//!
//! `schema_version` holds one row per applied migration. Every replica runs [`migrate`] when it
//! starts; a transaction-scoped advisory lock makes replicas starting together apply each
//! migration once. A database migrated by a newer build (a version this build does not know)
//! is refused: this build would misread it.

use tokio_postgres::Client;

use super::{Target, pg_error};
use crate::store::StoreError;

/// The advisory lock key migrations run under (any constant unique to gatekeep).
const MIGRATION_LOCK: i64 = 0x6761_7465_6b65_6570; // "gatekeep"

/// `(version, description, SQL)`, in order. Never edit a released migration: add one.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "requests, grants, reviewers, the audit chain, change notifications",
        r#"
CREATE TABLE requests (
    id          TEXT COLLATE "C" PRIMARY KEY,
    host        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    deadline    BIGINT NOT NULL,
    decided_at  BIGINT,
    version     BIGINT NOT NULL,
    record      TEXT NOT NULL
);
CREATE INDEX requests_pending ON requests (deadline) WHERE state = 'pending';
CREATE INDEX requests_received ON requests (received_at, id);
CREATE INDEX requests_subject ON requests (policy, subject, decided_at);

CREATE TABLE grants (
    id         TEXT COLLATE "C" PRIMARY KEY,
    host       TEXT NOT NULL,
    policy     TEXT NOT NULL,
    target     TEXT NOT NULL,
    cgroup     TEXT,
    duration   TEXT NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    body       TEXT NOT NULL
);
CREATE INDEX grants_match ON grants (host, policy, target) WHERE revoked_at IS NULL;
CREATE INDEX grants_expiry ON grants (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL;

CREATE TABLE reviewers (
    name         TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    groups       TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

-- The service's audit chain (gatekeep-audit's columns and hash); appended under an advisory
-- lock so that every replica extends one chain.
CREATE TABLE audit_records (
    seq        BIGINT PRIMARY KEY CHECK (seq >= 1),
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    request_id TEXT,
    host       TEXT NOT NULL,
    actor      TEXT,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_records_request_id ON audit_records (request_id)
    WHERE request_id IS NOT NULL;
CREATE FUNCTION gatekeep_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END $$;
CREATE TRIGGER audit_records_no_change BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION gatekeep_audit_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION gatekeep_audit_append_only();

-- Every committed change of a request, and every revocation, is announced to the replicas
-- (delivered at commit, never for a rolled-back change). The payload names the writer's
-- application_name, so a replica skips its own changes, and the request's state and host,
-- so a replica with no watcher and without that agent's stream skips re-reading it.
CREATE FUNCTION gatekeep_notify_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gatekeep_changes',
        'r|' || NEW.id || '|' || NEW.state || '|' || current_setting('application_name')
        || '|' || NEW.host);
    RETURN NULL;
END $$;
CREATE TRIGGER requests_changed AFTER INSERT OR UPDATE ON requests
    FOR EACH ROW EXECUTE FUNCTION gatekeep_notify_request();
CREATE FUNCTION gatekeep_notify_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gatekeep_changes',
        'g|' || NEW.id || '||' || current_setting('application_name') || '|' || NEW.host);
    RETURN NULL;
END $$;
CREATE TRIGGER grants_revoked AFTER UPDATE OF revoked_at ON grants
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION gatekeep_notify_grant();
"#,
    ),
    (
        2,
        "notification bookkeeping: delivered notices and dead letters",
        r#"
CREATE TABLE notices (
    key        TEXT COLLATE "C" PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE dead_letters (
    id       BIGSERIAL PRIMARY KEY,
    sink     TEXT NOT NULL,
    key      TEXT NOT NULL,
    error    TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    at       BIGINT NOT NULL
);
"#,
    ),
    (
        3,
        "hosts' audit chains anchored at the service",
        r#"
-- Records as each host stored them, under the host of the agent's certificate (`host`;
-- `record_host` is the name the agent wrote), append-only like the service's own chain.
CREATE TABLE host_audit_records (
    host        TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq >= 1),
    at          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    request_id  TEXT,
    record_host TEXT NOT NULL,
    actor       TEXT,
    payload     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (host, seq)
);
CREATE TRIGGER host_audit_records_no_change BEFORE UPDATE OR DELETE ON host_audit_records
    FOR EACH ROW EXECUTE FUNCTION gatekeep_audit_append_only();
CREATE TRIGGER host_audit_records_no_truncate BEFORE TRUNCATE ON host_audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION gatekeep_audit_append_only();
-- Each host's anchored head; seq 0 while nothing is anchored (a row to lock).
CREATE TABLE host_audit_heads (
    host       TEXT COLLATE "C" PRIMARY KEY,
    seq        BIGINT NOT NULL,
    hash       TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE host_audit_divergences (
    host   TEXT COLLATE "C" NOT NULL,
    seq    BIGINT NOT NULL,
    kind   TEXT NOT NULL,
    detail TEXT NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (host, seq, kind)
);
"#,
    ),
    (
        4,
        "notification delivery leases: one replica posts and updates each message",
        r#"
CREATE TABLE deliveries (
    subject      TEXT COLLATE "C" NOT NULL,
    channel      TEXT COLLATE "C" NOT NULL,
    event        TEXT COLLATE "C" NOT NULL,
    owner        TEXT,
    lease_until  BIGINT NOT NULL,
    attempted_at BIGINT,
    PRIMARY KEY (subject, channel, event)
);
CREATE INDEX deliveries_held ON deliveries (lease_until) WHERE owner IS NOT NULL;
"#,
    ),
    (
        5,
        "what the audit chain is owed: requests stored final whose records are not durable yet",
        r#"
-- A row for every request stored in a final state, put there by the statement that stored
-- it (so in its transaction), taken away once the request's records are durable in the
-- chain. A replica killed in between leaves it for another replica to write them.
CREATE TABLE audit_owed (
    id    TEXT COLLATE "C" PRIMARY KEY,
    since BIGINT NOT NULL
);
CREATE INDEX audit_owed_since ON audit_owed (since);
CREATE FUNCTION gatekeep_audit_owed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_owed (id, since)
        VALUES (NEW.id, coalesce(NEW.decided_at, NEW.received_at))
        ON CONFLICT (id) DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER requests_audit_owed_new AFTER INSERT ON requests
    FOR EACH ROW WHEN (NEW.state <> 'pending') EXECUTE FUNCTION gatekeep_audit_owed();
CREATE TRIGGER requests_audit_owed_final AFTER UPDATE OF state ON requests
    FOR EACH ROW WHEN (OLD.state = 'pending' AND NEW.state <> 'pending')
    EXECUTE FUNCTION gatekeep_audit_owed();
"#,
    ),
];

/// The newest schema version this build knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// Brings the database to [`latest`]; returns the version it found.
pub(super) async fn migrate(client: &mut Client, target: &Target) -> Result<i32, StoreError> {
    let err = |source| pg_error(target, source);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version     INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(err)?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(err)?
        .get(0);
    let latest = latest();
    if found > latest {
        return Err(StoreError::SchemaNewer {
            target: target.to_string(),
            found: i64::from(found),
            supported: i64::from(latest),
        });
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await
        .map_err(err)?;
        tracing::info!(version, description, "service database migrated");
    }
    tx.commit().await.map_err(err)?;
    Ok(found)
}
