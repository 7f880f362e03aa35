//! The [`Store`] boundary itself, on both backends: what the service logic relies on
//! (idempotent inserts, version-checked transitions of which exactly one wins, queries,
//! grants, reviewers), then what only `PostgreSQL` has (migrations, the shared audit chain).

mod support;

use std::{sync::Arc, time::Duration};

use gatekeep_audit::{AuditRecord, AuditWriter, EncodedRecord, RecordKind, WriterConfig};
use gatekeep_proto::{
    GrantDuration,
    model::{Decision, GrantScope, RequestRecord, RequestState, Revocation, Verdict},
};
use gatekeep_server::{
    ServerConfig, grants,
    store::{
        self, AdmissionQuery, Claim, GrantQuery, Inserted, PostgresStore, RequestQuery, Store,
        StoreError, Transition, postgres::audit::PostgresChain,
    },
};
use support::{Backend, exec_request, pg};
use time::OffsetDateTime;

/// A fresh store of `backend` (and what keeps its files alive).
async fn open(backend: Backend) -> (Arc<dyn Store>, ServerConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig {
        data_dir: dir.path().to_owned(),
        ..ServerConfig::default()
    };
    backend.configure(&mut config).await;
    let store = store::open(&config.store, config.state_db(), config.synchronous)
        .await
        .expect("open the store");
    (store, config, dir)
}

fn record(argv: &[&str]) -> RequestRecord {
    let request = exec_request(argv);
    let now = OffsetDateTime::now_utc();
    RequestRecord {
        approvals_required: request.approval.approvals_required,
        deadline: request.deadline,
        request,
        host: "web-1".into(),
        state: RequestState::Pending,
        received_at: now,
        approvals: Vec::new(),
        decision: None,
    }
}

fn decided(mut record: RequestRecord, verdict: Verdict) -> RequestRecord {
    let now = OffsetDateTime::now_utc();
    record.state = match verdict {
        Verdict::Allow => RequestState::Approved,
        Verdict::Deny => RequestState::Denied,
    };
    record.decision = Some(Decision {
        request_id: record.request.id,
        state: record.state,
        verdict,
        decided_by: "alice".into(),
        reason: String::new(),
        decided_at: now,
        duration: GrantDuration::Once,
        grant: None,
    });
    record
}

async fn inserts_are_idempotent_and_transitions_version_checked(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let pending = record(&["curl", "a"]);
    let id = pending.request.id;
    assert_eq!(
        store.insert_request(pending.clone()).await.expect("insert"),
        Inserted::New
    );
    match store.insert_request(pending.clone()).await.expect("again") {
        Inserted::Existing(existing) => {
            assert_eq!(existing.version, 1);
            assert_eq!(existing.value, pending);
        }
        Inserted::New => panic!("the same id was stored twice"),
    }
    let approved = decided(pending.clone(), Verdict::Allow);
    let moved = |expected_version| Transition {
        record: approved.clone(),
        expected_version,
        new_grant: None,
    };
    assert!(
        !store.transition(moved(7)).await.expect("stale"),
        "stale version"
    );
    assert!(store.transition(moved(1)).await.expect("first"));
    assert!(
        !store.transition(moved(1)).await.expect("second"),
        "the version moved on"
    );
    let stored = store.get_request(id).await.expect("get").expect("stored");
    assert_eq!(stored.version, 2);
    assert_eq!(stored.value.state, RequestState::Approved);
    assert_eq!(store.count_pending().await.expect("count"), 0);
}

/// Many writers move the same request from the same version at once (replicas deciding
/// together): exactly one wins.
async fn of_concurrent_transitions_exactly_one_applies(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let pending = record(&["curl", "race"]);
    store.insert_request(pending.clone()).await.expect("insert");
    let tries = (0..16).map(|n| {
        let store = Arc::clone(&store);
        let verdict = if n % 2 == 0 {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let record = decided(pending.clone(), verdict);
        tokio::spawn(async move {
            store
                .transition(Transition {
                    record,
                    expected_version: 1,
                    new_grant: None,
                })
                .await
                .expect("transition")
        })
    });
    let mut applied = 0;
    for attempt in tries {
        applied += usize::from(attempt.await.expect("task"));
    }
    assert_eq!(applied, 1);
    let stored = store
        .get_request(pending.request.id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored.version, 2);
}

async fn queries_find_what_they_name(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let mut due = record(&["curl", "due"]);
    due.deadline = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let later = record(&["curl", "later"]);
    let mut other = record(&["curl", "other"]);
    other.host = "db-1".into();
    for r in [&due, &later, &other] {
        store.insert_request(r.clone()).await.expect("insert");
    }
    assert_eq!(store.count_pending().await.expect("count"), 3);
    let now = OffsetDateTime::now_utc();
    let found = store.due_requests(now, 10).await.expect("due");
    assert_eq!(
        found.iter().map(|v| v.value.request.id).collect::<Vec<_>>(),
        [due.request.id]
    );
    let next = store
        .next_wakeup()
        .await
        .expect("wakeup")
        .expect("a deadline");
    assert_eq!(
        gatekeep_proto::convert::to_ms(next),
        gatekeep_proto::convert::to_ms(due.deadline)
    );
    let on_db = store
        .list_requests(RequestQuery {
            host: Some("db-1".into()),
            limit: 10,
            ..RequestQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(on_db.len(), 1);
    assert_eq!(on_db[0].request.id, other.request.id);
    assert!(
        store
            .list_requests(RequestQuery {
                final_only: true,
                limit: 10,
                ..RequestQuery::default()
            })
            .await
            .expect("list")
            .is_empty()
    );
    // A prefix of an id (text ordering is bytewise on both backends).
    let text = later.request.id.to_string();
    let ids = store
        .request_ids_with_prefix(text[..9].to_owned(), 5)
        .await
        .expect("prefix");
    assert!(ids.contains(&later.request.id), "{ids:?}");
    assert!(
        store
            .request_ids_with_prefix("ffffffff-ffff".into(), 5)
            .await
            .expect("prefix")
            .iter()
            .all(|id| id.to_string().starts_with("ffffffff-ffff"))
    );
}

async fn grants_are_found_revoked_once_and_listed(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let pending = record(&["curl", "grant"]);
    store.insert_request(pending.clone()).await.expect("insert");
    let now = OffsetDateTime::now_utc();
    let mut approved = decided(pending.clone(), Verdict::Allow);
    let grant = grants::from_decision(
        &approved,
        Verdict::Allow,
        GrantDuration::For(Duration::from_hours(1)),
        GrantScope::Workload,
        "alice",
        now,
    )
    .expect("a grant");
    if let Some(decision) = approved.decision.as_mut() {
        decision.grant = Some(grant.clone());
    }
    assert!(
        store
            .transition(Transition {
                record: approved,
                expected_version: 1,
                new_grant: Some(grant.clone()),
            })
            .await
            .expect("transition")
    );
    let query = |cgroup: &str| AdmissionQuery {
        id: uuid::Uuid::new_v4(),
        host: "web-1".into(),
        policy: pending.request.policy.clone(),
        target: pending.request.target.clone(),
        cgroup: cgroup.into(),
        now,
    };
    let admission = store
        .admission(query(&pending.request.cgroup))
        .await
        .expect("admission");
    assert_eq!(admission.grant.as_ref().map(|g| g.id), Some(grant.id));
    assert!(admission.existing.is_none());
    // A workload grant covers its own cgroup only.
    assert!(
        store
            .admission(query("/sys/fs/cgroup/elsewhere"))
            .await
            .expect("admission")
            .grant
            .is_none()
    );
    let active = store
        .list_grants(GrantQuery::default(), now)
        .await
        .expect("list");
    assert_eq!(active.len(), 1);
    let revocation = Revocation {
        at: now,
        by: "bob".into(),
        reason: "done".into(),
    };
    let revoked = store
        .revoke_grant(grant.id, revocation.clone())
        .await
        .expect("revoke");
    assert_eq!(
        revoked.and_then(|g| g.revoked).map(|r| r.by),
        Some("bob".into())
    );
    assert!(
        store
            .revoke_grant(grant.id, revocation)
            .await
            .expect("again")
            .is_none(),
        "revoked once"
    );
    assert!(
        store
            .list_grants(GrantQuery::default(), now)
            .await
            .expect("list")
            .is_empty()
    );
    let all = store
        .list_grants(
            GrantQuery {
                include_inactive: true,
                ..GrantQuery::default()
            },
            now,
        )
        .await
        .expect("list");
    assert_eq!(all.len(), 1);
    assert!(store.get_grant(grant.id).await.expect("get").is_some());
}

async fn reviewers_are_unique_and_found_by_token(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let token = gatekeep_server::add_reviewer(&*store, "alice", &["sre".into()])
        .await
        .expect("add");
    let again = gatekeep_server::add_reviewer(&*store, "alice", &["sre".into()]).await;
    assert!(
        again.is_err_and(|err| format!("{err:?}").contains("ReviewerExists")),
        "a second alice is refused"
    );
    let found = store
        .reviewer_by_token(gatekeep_server::auth::token_hash(&token))
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(found.name, "alice");
    assert_eq!(found.groups, ["sre"]);
    assert_eq!(store.list_reviewers().await.expect("list").len(), 1);
    assert!(store.remove_reviewer("alice".into()).await.expect("remove"));
    assert!(!store.remove_reviewer("alice".into()).await.expect("again"));
}

async fn notices_are_kept_and_replaced_and_dead_letters_stored(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let key = "slack:C0AGENTS:b1ec35ee".to_owned();
    assert_eq!(store.notice(key.clone()).await.expect("read"), None);
    store
        .set_notice(key.clone(), "1700000000.000001|pending".into())
        .await
        .expect("set");
    store
        .set_notice(key.clone(), "1700000000.000001|approved".into())
        .await
        .expect("replace");
    assert_eq!(
        store.notice(key).await.expect("read").as_deref(),
        Some("1700000000.000001|approved")
    );
    store
        .dead_letter(store::DeadLetter {
            sink: "webhook:audit".into(),
            key: "event-1".into(),
            error: "400 Bad Request".into(),
            attempts: 1,
            at: OffsetDateTime::now_utc(),
        })
        .await
        .expect("dead letter");
    let kept = store.dead_letters(10).await.expect("list");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].letter.key, "event-1");
    let taken = store
        .take_dead_letter(kept[0].id)
        .await
        .expect("take")
        .expect("there");
    assert_eq!(taken, kept[0]);
    assert_eq!(
        store.take_dead_letter(kept[0].id).await.expect("again"),
        None
    );
    assert!(store.dead_letters(10).await.expect("list").is_empty());
}

/// Delivery leases: one holder at a time, taken over once expired, with the unknown
/// outcome of the dead holder's attempt handed to the next.
async fn delivery_leases_have_one_holder_and_expire(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let key = store::DeliveryKey::new(uuid::Uuid::new_v4(), "slack:C0AGENTS", "message");
    let t0 = OffsetDateTime::now_utc();
    let lease = Duration::from_mins(1);
    let claim = |owner: &str, now: OffsetDateTime| {
        store.claim_delivery(key.clone(), owner.to_owned(), now, now + lease)
    };
    assert_eq!(
        claim("a", t0).await.expect("claim"),
        store::Claim::Taken { attempted_at: None }
    );
    assert_eq!(claim("b", t0).await.expect("claim"), store::Claim::Held);
    // Its holder renews it.
    assert_eq!(
        claim("a", t0).await.expect("claim"),
        store::Claim::Taken { attempted_at: None }
    );
    store
        .delivery_attempt(key.clone(), "a".into(), t0)
        .await
        .expect("attempt");
    // `b` is not the holder: its attempt changes nothing.
    store
        .delivery_attempt(key.clone(), "b".into(), t0 + lease)
        .await
        .expect("attempt");
    assert!(
        store
            .expired_deliveries("slack".into(), t0)
            .await
            .expect("expired")
            .is_empty()
    );
    let later = t0 + lease + Duration::from_secs(1);
    assert_eq!(
        store
            .expired_deliveries("slack".into(), later)
            .await
            .expect("expired"),
        std::slice::from_ref(&key)
    );
    assert!(
        store
            .expired_deliveries("webhook:siem".into(), later)
            .await
            .expect("expired")
            .is_empty(),
        "another sink's"
    );
    // Expired: `b` takes it over and learns that `a`'s attempt has no known outcome.
    let Claim::Taken { attempted_at } = claim("b", later).await.expect("claim") else {
        panic!("an expired lease is taken over");
    };
    assert_eq!(
        attempted_at.map(OffsetDateTime::unix_timestamp),
        Some(t0.unix_timestamp())
    );
    assert_eq!(claim("a", later).await.expect("claim"), store::Claim::Held);
    // Released: free for anyone, nothing left unknown.
    store
        .release_delivery(key.clone(), "b".into())
        .await
        .expect("release");
    assert_eq!(
        claim("a", later).await.expect("claim"),
        store::Claim::Taken { attempted_at: None }
    );
    assert_eq!(key.to_string().split(' ').count(), 3);
    assert_eq!(
        store::DeliveryKey::parse(&key.to_string()),
        Some(key.clone())
    );
}

/// Of many claimers racing for one delivery, exactly one wins.
async fn of_racing_claims_exactly_one_wins(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let key = store::DeliveryKey::new(uuid::Uuid::new_v4(), "teams", "requested");
    let now = OffsetDateTime::now_utc();
    let claims = (0..16).map(|n| {
        let store = Arc::clone(&store);
        let key = key.clone();
        tokio::spawn(async move {
            store
                .claim_delivery(
                    key,
                    format!("replica-{n}"),
                    now,
                    now + Duration::from_mins(1),
                )
                .await
                .expect("claim")
        })
    });
    let mut taken = 0;
    for claim in claims {
        if matches!(claim.await.expect("task"), store::Claim::Taken { .. }) {
            taken += 1;
        }
    }
    assert_eq!(taken, 1);
}

/// A request stored in a final state is owed its audit records, in the same write: a
/// final transition, or a request stored decided; not a pending one, nor a vote. Settled,
/// it is owed no more; `before` leaves out what was decided later.
async fn final_requests_are_owed_their_audit_records_until_settled(backend: Backend) {
    let (store, _config, _dir) = open(backend).await;
    let far_future = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let owed = |store: Arc<dyn Store>, before| async move {
        let mut ids: Vec<_> = store
            .audit_owed(before, 100)
            .await
            .expect("owed")
            .into_iter()
            .map(|record| record.request.id)
            .collect();
        ids.sort();
        ids
    };
    let pending = record(&["curl", "owed-1"]);
    store.insert_request(pending.clone()).await.expect("insert");
    let mut voted = pending.clone();
    voted.approvals.push(gatekeep_proto::model::Vote {
        reviewer: "alice".into(),
        reason: String::new(),
        duration: GrantDuration::Once,
        scope: GrantScope::Workload,
        at: OffsetDateTime::now_utc(),
    });
    assert!(
        store
            .transition(Transition {
                record: voted.clone(),
                expected_version: 1,
                new_grant: None,
            })
            .await
            .expect("vote")
    );
    assert!(
        owed(Arc::clone(&store), far_future).await.is_empty(),
        "pending and voted: nothing owed"
    );
    assert!(
        store
            .transition(Transition {
                record: decided(voted, Verdict::Allow),
                expected_version: 2,
                new_grant: None,
            })
            .await
            .expect("decide")
    );
    let automatic = decided(record(&["curl", "owed-2"]), Verdict::Deny);
    store
        .insert_request(automatic.clone())
        .await
        .expect("insert decided");
    let mut both = vec![pending.request.id, automatic.request.id];
    both.sort();
    assert_eq!(owed(Arc::clone(&store), far_future).await, both);
    let long_ago = OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert!(
        owed(Arc::clone(&store), long_ago).await.is_empty(),
        "decided after `before`"
    );
    store
        .audit_settled(vec![pending.request.id])
        .await
        .expect("settle");
    assert_eq!(
        owed(Arc::clone(&store), far_future).await,
        [automatic.request.id]
    );
    store
        .audit_settled(vec![automatic.request.id, pending.request.id])
        .await
        .expect("settle again");
    assert!(owed(Arc::clone(&store), far_future).await.is_empty());
}

on_both_backends!(
    final_requests_are_owed_their_audit_records_until_settled,
    delivery_leases_have_one_holder_and_expire,
    of_racing_claims_exactly_one_wins,
    notices_are_kept_and_replaced_and_dead_letters_stored,
    inserts_are_idempotent_and_transitions_version_checked,
    of_concurrent_transitions_exactly_one_applies,
    queries_find_what_they_name,
    grants_are_found_revoked_once_and_listed,
    reviewers_are_unique_and_found_by_token,
);

/// A raw client of a test database.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

fn store_config(url: &str) -> store::StoreConfig {
    store::StoreConfig {
        url: Some(url.to_owned()),
        pool_size: 2,
        ..store::StoreConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let url = pg::cluster().database().await;
    let config = store_config(&url);
    let starts = (0..4).map(|_| {
        let config = config.clone();
        tokio::spawn(async move { PostgresStore::connect(&config).await.map(drop) })
    });
    for start in starts {
        start.await.expect("task").expect("a replica starts");
    }
    let client = raw(&url).await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .expect("versions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5], "each migration applied once");
    // A newer build migrated the database: this build refuses it, saying why.
    client
        .execute(
            "INSERT INTO schema_version (version, description) VALUES (99, 'from the future')",
            &[],
        )
        .await
        .expect("insert");
    let refused = PostgresStore::connect(&config)
        .await
        .expect_err("a newer schema is refused");
    assert!(matches!(
        refused,
        StoreError::SchemaNewer {
            found: 99,
            supported: 5,
            ..
        }
    ));
    let message = refused.to_string();
    assert!(message.contains("schema version 99"), "{message}");
    assert!(message.contains("newer"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_database_but_never_its_password() {
    let secret = "hunter2-not-logged";
    // Nothing listens on port 1.
    let url = format!("postgres://gk:{secret}@127.0.0.1:1/nowhere");
    let err = PostgresStore::connect(&store_config(&url))
        .await
        .expect_err("nothing listens there");
    let text = format!("{err} {err:?}");
    assert!(text.contains("127.0.0.1:1/nowhere"), "{text}");
    assert!(!text.contains(secret), "{text}");
    let err = PostgresStore::connect(&store_config(&format!("mysql://{secret}@x")))
        .await
        .expect_err("not a postgres url");
    assert!(!format!("{err} {err:?}").contains(secret));
    assert!(err.to_string().contains("postgres://"), "{err}");
}

/// Two writers (two replicas' audit threads) append to one chain at once: it stays one
/// chain, without gaps or forks, and refuses to be changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_append_one_audit_chain() {
    let url = pg::cluster().database().await;
    let config = store_config(&url);
    let a = PostgresStore::connect(&config).await.expect("replica a");
    let b = PostgresStore::connect(&config).await.expect("replica b");
    let writers: Vec<AuditWriter> = [&a, &b]
        .into_iter()
        .map(|store| {
            AuditWriter::spawn(
                PostgresChain::new(store),
                WriterConfig {
                    // Small batches: many interleaved transactions.
                    max_batch: 7,
                    ..WriterConfig::default()
                },
            )
            .expect("writer")
        })
        .collect();
    let writers = Arc::new(writers);
    let tasks = (0..2).map(|w| {
        let writers = Arc::clone(&writers);
        tokio::task::spawn_blocking(move || {
            for n in 0..300 {
                writers[w]
                    .submit(
                        AuditRecord::new(
                            RecordKind::Requested,
                            format!("replica-{w}"),
                            serde_json::json!({ "n": n }),
                        )
                        .with_request_id(format!("r-{w}-{n}")),
                    )
                    .expect("submit");
            }
            writers[w].flush().expect("flush")
        })
    });
    for task in tasks {
        task.await.expect("task");
    }
    for writer in writers.iter() {
        tokio::task::block_in_place(|| writer.shutdown()).expect("shutdown");
    }
    let report = gatekeep_server::store::postgres::audit::verify(&a)
        .await
        .expect("one valid chain");
    assert_eq!(report.records, 600);
    assert_eq!(report.head.map(|h| h.seq), Some(600));
    assert_eq!(report.guards_intact, Some(true));
    let client = raw(&url).await;
    for statement in [
        "UPDATE audit_records SET actor = 'mallory' WHERE seq = 1",
        "DELETE FROM audit_records WHERE seq = 600",
        "TRUNCATE audit_records",
    ] {
        let err = client
            .batch_execute(statement)
            .await
            .expect_err("append-only");
        let message = err
            .as_db_error()
            .map(|db| db.message().to_owned())
            .unwrap_or_default();
        assert_eq!(message, "audit records are append-only", "{statement}");
    }
}

/// Two replicas' writers race to record the same requests as new (an agent re-sent them to
/// the second while the first may have committed them): each request's once-per-request
/// `requested` record is appended once, whichever commits first, also when one batch holds
/// it twice; records of other kinds are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_recorded_by_two_replicas_at_once_is_in_the_chain_once() {
    const REQUESTS: usize = 200;
    let url = pg::cluster().database().await;
    let config = store_config(&url);
    let a = PostgresStore::connect(&config).await.expect("replica a");
    let b = PostgresStore::connect(&config).await.expect("replica b");
    let writers: Vec<Arc<AuditWriter>> = [&a, &b]
        .into_iter()
        .map(|store| {
            let config = WriterConfig {
                max_batch: 16,
                ..WriterConfig::default()
            };
            Arc::new(AuditWriter::spawn(PostgresChain::new(store), config).expect("writer"))
        })
        .collect();
    let record = |kind: RecordKind, n: usize| {
        EncodedRecord::new(kind, "svc", &serde_json::json!({ "n": n }))
            .expect("encode")
            .with_request_id(format!("r-{n}"))
            .once_per_request()
    };
    let tasks = writers.iter().map(|writer| {
        let writer = Arc::clone(writer);
        tokio::spawn(async move {
            for n in 0..REQUESTS {
                // Twice in a row: often twice in one batch.
                for _ in 0..2 {
                    writer
                        .submit_encoded_async(record(RecordKind::Requested, n))
                        .await
                        .expect("submit");
                }
            }
            writer.flush_async().await.expect("flush")
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.expect("task");
    }
    writers[0]
        .submit_encoded_async(record(RecordKind::Decided, 0))
        .await
        .expect("submit");
    writers[0].flush_async().await.expect("flush");
    for writer in &writers {
        tokio::task::block_in_place(|| writer.shutdown()).expect("shutdown");
    }
    let report = gatekeep_server::store::postgres::audit::verify(&a)
        .await
        .expect("one valid chain");
    assert_eq!(report.records, REQUESTS as u64 + 1);
    let client = raw(&url).await;
    let repeated: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT request_id FROM audit_records \
             WHERE kind = 'requested' GROUP BY request_id HAVING count(*) <> 1) AS r",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(repeated, 0, "every request recorded as new exactly once");
}

/// Every connection of the main pool is busy (agents' requests stuck behind another
/// transaction, as a burst of them queues): a reviewer's decision on another request still
/// reads and moves it, through the connections kept apart for decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_does_not_queue_behind_a_full_pool() {
    let url = pg::cluster().database().await;
    let config = store::StoreConfig {
        decision_pool_size: 1,
        ..store_config(&url)
    };
    let store = Arc::new(PostgresStore::connect(&config).await.expect("store"));
    let pending = record(&["curl", "decided-anyway"]);
    let id = pending.request.id;
    assert_eq!(
        store.insert_request(pending.clone()).await.expect("insert"),
        Inserted::New
    );
    // Another transaction inserts the same ids first and stays open: the store's inserts
    // wait for it, each holding a connection of the main pool, and more wait for one.
    let stuck: Vec<RequestRecord> = (0..config.pool_size + 2)
        .map(|n| record(&["curl", &format!("stuck-{n}")]))
        .collect();
    let mut holder = raw(&url).await;
    let first = holder.transaction().await.expect("begin");
    for record in &stuck {
        first
            .execute(
                "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, \
                 deadline, version, record) VALUES ($1, 'h', 'p', 'exec', 'pending', 's', 0, 0, \
                 1, '{}')",
                &[&record.request.id.to_string()],
            )
            .await
            .expect("insert first");
    }
    let inserts: Vec<_> = stuck
        .into_iter()
        .map(|record| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.insert_request(record).await })
        })
        .collect();
    let watcher = raw(&url).await;
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND datname = current_database()",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if usize::try_from(waiting).expect("count") >= config.pool_size {
            break;
        }
        assert!(
            started.elapsed() < support::PATIENCE,
            "the inserts never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read = store.get_request(id).await.expect("read").expect("stored");
    assert_eq!(read.value.state, RequestState::Pending);
    let moved = store
        .transition(Transition {
            record: decided(pending, Verdict::Allow),
            expected_version: read.version,
            new_grant: None,
        })
        .await
        .expect("a decision does not wait for the agents' pool");
    assert!(moved);
    first.rollback().await.expect("release");
    for insert in inserts {
        assert_eq!(insert.await.expect("task").expect("insert"), Inserted::New);
    }
}
