//! Notifications: Slack messages with buttons, Teams cards, signed webhooks.
//!
//! Each configured sink has its own feed task, fed from the hub's change events
//! ([`Hub::subscribe`](crate::hub::Hub)), and its own worker with a bounded queue and
//! retries ([`delivery`]). Notification never blocks a decision: the hub's broadcast never
//! waits for a reader, and a sink that is down only holds its own queue. A feed that falls
//! behind (its queue full while the hub moves on) catches up from the store: the pending
//! requests, and the outcomes and revocations since the feed started, go through the sink
//! again, which its stored delivery state makes idempotent. At start the pending requests
//! are read the same way, so requests pending across a restart are announced too.

pub mod config;
mod delivery;
pub mod render;
pub mod replay;
pub mod secret;
pub mod slack;
pub mod teams;
pub mod webhook;

use std::{collections::BTreeMap, sync::Arc};

use axum::Router;
use gatekeep_proto::model::{Grant, RequestRecord, RequestState};
use time::OffsetDateTime;
use tokio::{
    sync::{broadcast::error::RecvError, mpsc},
    task::JoinHandle,
};

pub use self::config::NotifyConfig;
use self::{
    config::{RetryConfig, SlackApprovals},
    delivery::{Leases, Sink},
    secret::Secret,
    slack::{Routing, SlackApi, SlackSink, interactions::Interactions},
    teams::TeamsSink,
    webhook::WebhookSink,
};
use crate::{
    error::Error,
    lifecycle::{Engine, request_span},
    store::RequestQuery,
};

/// Pending requests read per catch-up, at most.
const CATCH_UP_LIMIT: usize = 100_000;

/// A URL is `https`, or `http` on a loopback address (tests, a receiver on the same host).
pub(crate) fn check_url(field: &str, text: &str) -> Result<reqwest::Url, Error> {
    crate::https::check_url(text).map_err(|message| Error::Notify {
        message: format!("{field}: {message}"),
    })
}

struct SlackParts {
    api: SlackApi,
    routing: Arc<Routing>,
    signing_secret: Secret,
    team_id: Option<String>,
    reviewers: BTreeMap<String, Vec<String>>,
}

struct TeamsParts {
    url: Secret,
    policies: Vec<String>,
}

/// The configured sinks, checked and with their secrets read; [`Notify::start`] runs them.
pub(crate) struct Notify {
    retry: RetryConfig,
    queue: usize,
    lease: std::time::Duration,
    console_url: Option<String>,
    http: reqwest::Client,
    slack: Option<SlackParts>,
    teams: Option<TeamsParts>,
    webhooks: Vec<config::WebhookConfig>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("slack", &self.slack.is_some())
            .field("teams", &self.teams.is_some())
            .field("webhooks", &self.webhooks.len())
            .finish_non_exhaustive()
    }
}

impl Notify {
    /// Checks `config` and reads its secrets; `None` when no sink is configured.
    pub(crate) fn new(
        config: &NotifyConfig,
        host_groups: &BTreeMap<String, Vec<String>>,
    ) -> Result<Option<Self>, Error> {
        if config.slack.is_none() && config.teams.is_none() && config.webhook.is_empty() {
            return Ok(None);
        }
        let bad = |message: String| Error::Notify { message };
        let console_url = match &config.console_url {
            Some(url) => Some(
                check_url("console_url", url)?
                    .as_str()
                    .trim_end_matches('/')
                    .to_owned(),
            ),
            None => None,
        };
        check_limits(config)?;
        let http = crate::https::client(None)?;
        let slack = match &config.slack {
            None => None,
            Some(slack) => {
                let api_url = check_url("[notify.slack] api_url", &slack.api_url)?;
                let token = slack
                    .bot_token
                    .load("[notify.slack] bot_token")
                    .map_err(bad)?;
                let signing_secret = slack
                    .signing_secret
                    .load("[notify.slack] signing_secret")
                    .map_err(bad)?;
                let links = slack
                    .approvals
                    .iter()
                    .filter(|(_, mode)| **mode == SlackApprovals::Link)
                    .map(|(policy, _)| policy.as_str())
                    .collect::<Vec<_>>();
                if !links.is_empty() && console_url.is_none() {
                    return Err(bad(format!(
                        "[notify.slack.approvals]: `link` (policies {}) needs `console_url` in [notify]",
                        links.join(", ")
                    )));
                }
                for (email, groups) in &slack.reviewers {
                    if !email.contains('@') || email.contains(',') {
                        return Err(bad(format!(
                            "[notify.slack.reviewers]: `{email}` is not an email address"
                        )));
                    }
                    if groups.is_empty() {
                        return Err(bad(format!(
                            "[notify.slack.reviewers]: `{email}` has no groups; give at least one (e.g. [\"sre\"])"
                        )));
                    }
                }
                Some(SlackParts {
                    api: SlackApi::new(http.clone(), api_url.as_str(), token),
                    routing: Arc::new(Routing::new(slack, host_groups)?),
                    signing_secret,
                    team_id: slack.team_id.clone(),
                    reviewers: slack.reviewers.clone(),
                })
            }
        };
        let teams = match &config.teams {
            None => None,
            Some(teams) => {
                let url = teams
                    .workflow_url
                    .load("[notify.teams] workflow_url")
                    .map_err(bad)?;
                // Checked without echoing it: the URL is a secret.
                check_url("[notify.teams] workflow_url", url.expose()).map_err(|_| {
                    bad("[notify.teams] workflow_url: the secret is not an https url".to_owned())
                })?;
                Some(TeamsParts {
                    url,
                    policies: teams.policies.clone(),
                })
            }
        };
        let mut names = std::collections::BTreeSet::new();
        for webhook in &config.webhook {
            if !names.insert(&webhook.name) {
                return Err(bad(format!(
                    "[[notify.webhook]]: two webhooks are named `{}`",
                    webhook.name
                )));
            }
        }
        Ok(Some(Self {
            retry: config.retry.clone(),
            queue: config.queue,
            lease: std::time::Duration::from_millis(config.lease_ms),
            console_url,
            http,
            slack,
            teams,
            webhooks: config.webhook.clone(),
        }))
    }

    /// Starts every sink's feed and worker; returns the Slack interaction route when Slack
    /// is configured, and the workers ([`Running::finish`] waits for them at shutdown).
    /// Call it before serving, so no change is published unseen.
    pub(crate) fn start(
        self,
        engine: &Arc<Engine>,
        max_auth_age: &BTreeMap<String, u64>,
    ) -> Result<Running, Error> {
        let mut router = None;
        let mut workers = Vec::new();
        // This process's name on the leases it takes.
        let leases = Leases {
            store: Arc::clone(&engine.store),
            owner: format!("{}:{}", engine.name(), uuid::Uuid::new_v4()),
            lease: self.lease,
        };
        let settings = FeedSettings {
            leases: leases.clone(),
            retry: self.retry.clone(),
            capacity: self.queue,
        };
        if let Some(slack) = self.slack {
            let sink = Arc::new(SlackSink {
                api: slack.api.clone(),
                engine: Arc::clone(engine),
                routing: Arc::clone(&slack.routing),
                console_url: self.console_url.clone(),
                leases: leases.clone(),
            });
            workers.push(feed(engine, sink, &settings, |sink, change| match change {
                Change::Request(record) => sink.jobs(record),
                Change::Revoked(_) => Vec::new(),
            }));
            let interactions = Interactions::new(
                Arc::clone(engine),
                slack.api,
                slack.signing_secret,
                slack.team_id,
                &slack.reviewers,
                slack.routing,
                max_auth_age.clone(),
            );
            router = Some(slack::interactions::router(Arc::new(interactions)));
        }
        if let Some(teams) = self.teams {
            let sink = Arc::new(TeamsSink {
                http: self.http.clone(),
                url: teams.url,
                engine: Arc::clone(engine),
                policies: teams.policies,
                console_url: self.console_url.clone(),
                leases: leases.clone(),
            });
            workers.push(feed(engine, sink, &settings, |sink, change| match change {
                Change::Request(record) => sink.job(record).into_iter().collect(),
                Change::Revoked(_) => Vec::new(),
            }));
        }
        for config in &self.webhooks {
            let sink = Arc::new(WebhookSink::new(config, self.http.clone(), leases.clone())?);
            workers.push(feed(engine, sink, &settings, |sink, change| {
                let events = match change {
                    Change::Request(record) => webhook::request_events(record),
                    Change::Revoked(grant) => {
                        vec![webhook::grant_event(grant, "revoked", "grant.revoked")]
                    }
                };
                events.into_iter().filter(|e| sink.wants(e.kind)).collect()
            }));
        }
        Ok(Running { router, workers })
    }
}

/// The numbers of `[notify]` that must not be zero.
fn check_limits(config: &NotifyConfig) -> Result<(), Error> {
    let bad = |message: &str| {
        Err(Error::Notify {
            message: message.to_owned(),
        })
    };
    if config.lease_ms < 100 {
        return bad("[notify]: `lease_ms` must be at least 100 (default 60000)");
    }
    if config.retry.max_attempts == 0 || config.retry.initial_ms == 0 {
        return bad("[notify.retry]: `max_attempts` and `initial_ms` must be at least 1");
    }
    Ok(())
}

/// Started sinks.
pub(crate) struct Running {
    /// `/slack/interactions`, when Slack is configured.
    pub router: Option<Router>,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Longest wait at shutdown for the notices still queued.
    const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

    /// After the service stopped (its shutdown token cancelled): waits up to
    /// [`Self::DRAIN`] while the workers attempt what is queued, each once.
    pub(crate) async fn finish(self) {
        let all = futures_util::future::join_all(self.workers);
        if tokio::time::timeout(Self::DRAIN, all).await.is_err() {
            tracing::warn!("notifications still queued at shutdown were not all sent");
        }
    }
}

/// What a feed reacts to.
enum Change {
    Request(Arc<RequestRecord>),
    Revoked(Arc<Grant>),
}

/// Queues the jobs `change` makes for `sink`; `false` once the worker is gone.
async fn send_all<S: Sink>(
    sink: &S,
    jobs: &(impl Fn(&S, &Change) -> Vec<S::Job> + Send + Sync),
    queue: &mpsc::Sender<S::Job>,
    change: &Change,
) -> bool {
    for job in jobs(sink, change) {
        if queue.send(job).await.is_err() {
            return false;
        }
    }
    true
}

/// What every feed shares.
struct FeedSettings {
    leases: Leases,
    retry: RetryConfig,
    capacity: usize,
}

/// How often a feed looks for leases of its sink that expired: a quarter of the lease
/// (between 1 and 15 s), so a delivery a dead replica held resumes soon after it expires.
fn sweep_interval(lease: std::time::Duration) -> std::time::Duration {
    (lease / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(15),
    )
}

/// The deliveries of `sink` whose lease expired (their holder died or stalled, or an
/// operator asked for a dead letter to be retried), as jobs.
async fn expired_jobs<S: Sink>(sink: &S, leases: &Leases) -> Vec<S::Job> {
    let keys = match leases
        .store
        .expired_deliveries(sink.name().to_owned(), OffsetDateTime::now_utc())
        .await
    {
        Ok(keys) => keys,
        Err(error) => {
            tracing::warn!(%error, sink = sink.name(), "cannot read expired delivery leases");
            return Vec::new();
        }
    };
    let mut jobs = Vec::with_capacity(keys.len());
    for key in keys {
        match sink.resume(&key).await {
            Some(job) => {
                request_span(sink.request_id(&job)).in_scope(|| {
                    tracing::info!(sink = sink.name(), key = %key, "taking over a delivery whose lease expired");
                });
                jobs.push(job);
            }
            // Nothing this sink delivers now (a request or grant gone, a webhook renamed).
            None => {
                tracing::debug!(sink = sink.name(), key = %key, "an expired delivery lease names nothing to deliver");
            }
        }
    }
    jobs
}

/// Runs `sink`: subscribes to the hub now, catches up with the pending requests, then
/// turns every change into jobs for the sink's queue until shutdown; and takes over the
/// deliveries whose lease expired.
fn feed<S: Sink>(
    engine: &Arc<Engine>,
    sink: Arc<S>,
    settings: &FeedSettings,
    jobs: impl Fn(&S, &Change) -> Vec<S::Job> + Send + Sync + 'static,
) -> JoinHandle<()> {
    let mut requests = engine.hub.subscribe();
    let mut revoked = engine.hub.subscribe_revoked();
    let shutdown = engine.shutdown.clone();
    let leases = settings.leases.clone();
    let (queue, worker) = delivery::spawn(
        Arc::clone(&sink),
        leases.clone(),
        Arc::clone(&engine.metrics),
        settings.retry.clone(),
        settings.capacity,
        shutdown.clone(),
    );
    let mut sweep = tokio::time::interval(sweep_interval(leases.lease));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let engine = Arc::clone(engine);
    // Changes from here on are this feed's to deliver; a catch-up after a lag re-reads
    // the outcomes since then (not older history, which was never this feed's).
    let since = OffsetDateTime::now_utc();
    tokio::spawn(async move {
        let mut catch_up = Some(CatchUp::Pending);
        loop {
            if let Some(what) = catch_up.take() {
                let changes = match catch_up_changes(&engine, what, since).await {
                    Ok(changes) => changes,
                    Err(error) => {
                        tracing::error!(%error, sink = sink.name(), "cannot read requests to catch up with");
                        Vec::new()
                    }
                };
                for change in changes {
                    if !send_all(&*sink, &jobs, &queue, &change).await {
                        return;
                    }
                }
            }
            let change = tokio::select! {
                _ = sweep.tick() => {
                    for job in expired_jobs(&*sink, &leases).await {
                        if queue.send(job).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                change = requests.recv() => change.map(Change::Request),
                change = revoked.recv() => change.map(Change::Revoked),
                () = shutdown.cancelled() => {
                    // What was published before the stop still goes to the worker, which
                    // attempts it once; then the queue closes.
                    while let Ok(record) = requests.try_recv() {
                        if !send_all(&*sink, &jobs, &queue, &Change::Request(record)).await {
                            return;
                        }
                    }
                    while let Ok(grant) = revoked.try_recv() {
                        if !send_all(&*sink, &jobs, &queue, &Change::Revoked(grant)).await {
                            return;
                        }
                    }
                    return;
                }
            };
            match change {
                Ok(change) => {
                    if !send_all(&*sink, &jobs, &queue, &change).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        sink = sink.name(),
                        missed,
                        "notifications fell behind the changes; catching up from the store"
                    );
                    catch_up = Some(CatchUp::Everything);
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    worker
}

/// What a feed re-reads from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// At start: the pending requests.
    Pending,
    /// After a lag: the pending requests, the outcomes and grant revocations since the
    /// feed started (sinks skip what they delivered already).
    Everything,
}

async fn catch_up_changes(
    engine: &Engine,
    what: CatchUp,
    since: OffsetDateTime,
) -> Result<Vec<Change>, crate::store::StoreError> {
    let mut changes = Vec::new();
    if what == CatchUp::Everything {
        let mut finals = engine
            .store
            .list_requests(RequestQuery {
                final_only: true,
                newest_first: true,
                limit: CATCH_UP_LIMIT,
                ..RequestQuery::default()
            })
            .await?;
        finals.retain(|r| r.decision.as_ref().is_some_and(|d| d.decided_at >= since));
        finals.reverse();
        changes.extend(finals.into_iter().map(|r| Change::Request(Arc::new(r))));
        let now = OffsetDateTime::now_utc();
        let grants = engine
            .store
            .list_grants(
                crate::store::GrantQuery {
                    include_inactive: true,
                    ..crate::store::GrantQuery::default()
                },
                now,
            )
            .await?;
        changes.extend(
            grants
                .into_iter()
                .filter(|g| g.revoked.as_ref().is_some_and(|r| r.at >= since))
                .map(|g| Change::Revoked(Arc::new(g))),
        );
    }
    let pending = engine
        .store
        .list_requests(RequestQuery {
            state: Some(RequestState::Pending),
            limit: CATCH_UP_LIMIT,
            ..RequestQuery::default()
        })
        .await?;
    changes.extend(pending.into_iter().map(|r| Change::Request(Arc::new(r))));
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(text: &str) -> Result<Option<Notify>, String> {
        let config: NotifyConfig = toml::from_str(text).map_err(|err| err.to_string())?;
        let groups = BTreeMap::from([("prod".to_owned(), vec!["prod-*".to_owned()])]);
        Notify::new(&config, &groups).map_err(|err| err.to_string())
    }

    #[test]
    fn config_errors_name_their_cause_and_never_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "xoxb-never-printed").unwrap();
        let slack = |extra: &str| {
            format!(
                "[slack]\nbot_token = {{ file = \"{0}\" }}\nsigning_secret = {{ file = \"{0}\" }}\n{extra}",
                token.display()
            )
        };
        assert!(
            notify("").unwrap().is_none(),
            "nothing configured, nothing runs"
        );
        let ok = notify(&slack("channel = \"C1\"")).unwrap().unwrap();
        assert!(!format!("{ok:?}").contains("xoxb"), "{ok:?}");

        let err = notify("[slack]\nsigning_secret = { env = \"X\" }").unwrap_err();
        assert!(err.contains("[notify.slack] bot_token: missing"), "{err}");
        let err = notify(&slack("api_url = \"http://slack.example.com/api\"")).unwrap_err();
        assert!(err.contains("must be an https url"), "{err}");
        let err = notify(&slack(
            "[[slack.routes]]\nhost_group = \"nope\"\nchannel = \"C\"",
        ))
        .unwrap_err();
        assert!(err.contains("host_group `nope` is not defined"), "{err}");
        let err = notify(&slack("[slack.approvals]\nprod-deploy = \"link\"")).unwrap_err();
        assert!(err.contains("needs `console_url`"), "{err}");
        let err = notify(&slack("[slack.approvals]\nprod-deploy = \"maybe\"")).unwrap_err();
        assert!(err.contains("unknown variant"), "{err}");
        let err = notify(&slack("[slack.reviewers]\n\"alice\" = [\"sre\"]")).unwrap_err();
        assert!(err.contains("not an email address"), "{err}");
        let err = notify(&format!(
            "[teams]\nworkflow_url = {{ file = \"{}\" }}",
            token.display()
        ))
        .unwrap_err();
        assert!(err.contains("not an https url"), "{err}");
        assert!(!err.contains("xoxb"), "the secret is not echoed: {err}");
        let hook = |name: &str, events: &str| {
            format!(
                "[[webhook]]\nname = \"{name}\"\nurl = \"https://h.example.com/x\"\nsecret = {{ file = \"{}\" }}\nevents = {events}\n",
                token.display()
            )
        };
        let err = notify(&format!("{}{}", hook("a", "[]"), hook("a", "[]"))).unwrap_err();
        assert!(err.contains("two webhooks are named `a`"), "{err}");
        let err = notify(&hook("a", "[]").replace("secret =", "secrte =")).unwrap_err();
        assert!(err.contains("unknown field `secrte`"), "{err}");
        // Webhook sinks are checked when they start (they need the store): their errors
        // are tested through `WebhookSink::new`.
        let config: config::WebhookConfig =
            toml::from_str(&hook("a", "[\"request.approved\"]").replace("[[webhook]]\n", ""))
                .unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::SqliteStore::open(
                dir2.path().join("s.db"),
                crate::store::Synchronous::Normal,
            )
            .unwrap(),
        );
        let leases = Leases {
            store,
            owner: "test".to_owned(),
            lease: std::time::Duration::from_mins(1),
        };
        let err = WebhookSink::new(&config, crate::https::client(None).unwrap(), leases)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown event `request.approved`"), "{err}");
    }

    #[test]
    fn routes_by_policy_and_host_group() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "xoxb-1").unwrap();
        let text = format!(
            "[slack]\nbot_token = {{ file = \"{0}\" }}\nsigning_secret = {{ file = \"{0}\" }}\nchannel = \"CDEFAULT\"\n\
             [[slack.routes]]\npolicy = \"deploy\"\nchannel = \"CDEPLOY\"\n\
             [[slack.routes]]\nhost_group = \"prod\"\nchannel = \"CPROD\"\n\
             [[slack.routes]]\npolicy = \"deploy\"\nhost_group = \"prod\"\nchannel = \"CPROD\"\n",
            token.display()
        );
        let notify = notify(&text).unwrap().unwrap();
        let routing = &notify.slack.as_ref().unwrap().routing;
        let record = |policy: &str, host: &str| {
            let mut record: RequestRecord = serde_json::from_value(serde_json::json!({
                "request": {
                    "id": "6f1c1d2e-3a4b-4c5d-8e9f-001122334455", "policy": policy, "rule": "r",
                    "cgroup": "/a", "pid": 1, "tid": 1, "uid": 1000, "user_name": null, "cwd": null,
                    "ancestry": [], "target": {"kind": "exec", "executable": "/bin/true", "argv": []},
                    "requested_at": "2026-11-24T21:00:00Z", "deadline": "2026-11-24T21:05:00Z",
                    "on_timeout": "deny",
                    "approval": {"reviewer_groups": [], "approvals_required": 1, "grant_durations": ["once"], "owners": []}
                },
                "host": "h", "state": "pending", "received_at": "2026-11-24T21:00:00Z",
                "deadline": "2026-11-24T21:05:00Z", "approvals": [], "approvals_required": 1,
                "decision": null
            }))
            .unwrap();
            record.host = host.to_owned();
            record
        };
        assert_eq!(
            routing.channels(&record("deploy", "prod-1")),
            ["CDEPLOY", "CPROD"]
        );
        assert_eq!(routing.channels(&record("deploy", "dev-1")), ["CDEPLOY"]);
        assert_eq!(routing.channels(&record("other", "prod-2")), ["CPROD"]);
        assert_eq!(routing.channels(&record("other", "dev-1")), ["CDEFAULT"]);
    }
}
