//! Slack: a Block Kit message per pending request in the channels its policy or host
//! group is routed to, updated (`chat.update`) when the request is decided anywhere,
//! expires or is cancelled; and the interaction endpoint its buttons call
//! ([`interactions`]).
//!
//! Idempotent delivery: the message's channel and `ts` are stored per request and channel
//! (store notices `slack:CHANNEL:ID`) with the state it shows, so a retried or repeated job
//! posts a request once and updates it once per change. A post whose answer was lost (Slack
//! posted it, the service never heard) is found again before it is retried: every message
//! carries metadata naming its request ([`METADATA_EVENT`]), and `conversations.history`
//! (with `include_all_metadata`, from shortly before the first attempt) finds it; its `ts`
//! is adopted. Replicas take the message's lease (`deliveries`, event `message`) before
//! posting or updating it, so one replica at a time does, and the one holding it brings the
//! message up to date after letting go of it.

use std::{collections::BTreeMap, sync::Arc};

use gatekeep_proto::{
    GrantDuration,
    model::{RequestRecord, RequestState},
};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    config::{SlackApprovals, SlackConfig},
    delivery::{self, Failure, Sink, store_failure},
    render,
    secret::Secret,
};
use crate::{error::Error, lifecycle::Engine, store::DeliveryKey};

pub mod interactions;

/// Action ids of the message's interactive elements.
pub(crate) const APPROVE: &str = "gatekeep_approve";
pub(crate) const DENY: &str = "gatekeep_deny";
pub(crate) const DURATION: &str = "gatekeep_duration";
/// The actions block (its state carries the chosen duration).
pub(crate) const ACTIONS_BLOCK: &str = "gatekeep_actions";
/// The `event_type` of the metadata every message carries (its payload: `request_id`).
pub const METADATA_EVENT: &str = "gatekeep_request";
/// How far before the first attempt a lost post is looked for (Slack's clock may differ
/// from the service's).
const LOOKBACK: time::Duration = time::Duration::minutes(5);
/// Pages of history read at most when looking for a lost post.
const HISTORY_PAGES: usize = 10;

/// Escapes text for Slack's mrkdwn: `&`, `<` and `>` are its control characters (links,
/// mentions such as `<!channel>`), per Slack's "Escaping text" rules.
#[must_use]
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Slack's Web API, with the bot token.
#[derive(Clone)]
pub(crate) struct SlackApi {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

impl std::fmt::Debug for SlackApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackApi")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Slack error codes worth another attempt (the rest are a wrong channel, token or scope:
/// retrying changes nothing).
const TRANSIENT: &[&str] = &[
    "ratelimited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
];

impl SlackApi {
    pub(crate) fn new(http: reqwest::Client, base: &str, token: Secret) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Reads a Web API answer: HTTP status, then Slack's `ok`/`error`.
    async fn answer(
        method: &str,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Value, Failure> {
        let response = response.map_err(|err| delivery::network(method, &err))?;
        delivery::classify(&response, method)?;
        let body: Value = response
            .json()
            .await
            .map_err(|_| Failure::retry(format!("{method}: the answer is not json")))?;
        if body["ok"].as_bool() == Some(true) {
            return Ok(body);
        }
        let error = body["error"]
            .as_str()
            .unwrap_or("no error given")
            .to_owned();
        let message = format!("{method}: slack says `{error}`");
        if TRANSIENT.contains(&error.as_str()) {
            Err(Failure::retry(message))
        } else {
            Err(Failure::Permanent { message })
        }
    }

    /// A JSON Web API call (`chat.postMessage`, `chat.update`, `chat.postEphemeral`).
    pub(crate) async fn call(&self, method: &str, body: &Value) -> Result<Value, Failure> {
        let response = self
            .http
            .post(format!("{}/{method}", self.base))
            .bearer_auth(self.token.expose())
            .json(body)
            .send()
            .await;
        Self::answer(method, response).await
    }

    /// `users.info`: the user's profile (with email, given `users:read.email`).
    pub(crate) async fn user_info(&self, user: &str) -> Result<Value, Failure> {
        let response = self
            .http
            .get(format!("{}/users.info", self.base))
            .bearer_auth(self.token.expose())
            .query(&[("user", user)])
            .send()
            .await;
        Self::answer("users.info", response).await
    }

    /// Looks in `channel` for the message of `request` posted since `oldest`
    /// (`conversations.history` with `include_all_metadata`); its `ts` and what it shows
    /// (its metadata's `shows`) if found.
    pub(crate) async fn find_posted(
        &self,
        channel: &str,
        request: Uuid,
        oldest: OffsetDateTime,
    ) -> Result<Option<(String, String)>, Failure> {
        let oldest = format!("{}.000000", oldest.unix_timestamp());
        let wanted = request.to_string();
        let mut cursor = String::new();
        for _ in 0..HISTORY_PAGES {
            let mut query = vec![
                ("channel", channel),
                ("oldest", oldest.as_str()),
                ("inclusive", "true"),
                ("include_all_metadata", "true"),
                ("limit", "200"),
            ];
            if !cursor.is_empty() {
                query.push(("cursor", cursor.as_str()));
            }
            let response = self
                .http
                .get(format!("{}/conversations.history", self.base))
                .bearer_auth(self.token.expose())
                .query(&query)
                .send()
                .await;
            let answer = Self::answer("conversations.history", response).await?;
            let found = answer["messages"].as_array().and_then(|messages| {
                messages.iter().find(|message| {
                    message["metadata"]["event_type"] == METADATA_EVENT
                        && message["metadata"]["event_payload"]["request_id"] == wanted.as_str()
                })
            });
            if let Some(message) = found
                && let Some(ts) = message["ts"].as_str()
            {
                let shows = message["metadata"]["event_payload"]["shows"]
                    .as_str()
                    .unwrap_or_default();
                return Ok(Some((ts.to_owned(), shows.to_owned())));
            }
            answer["response_metadata"]["next_cursor"]
                .as_str()
                .unwrap_or_default()
                .clone_into(&mut cursor);
            if answer["has_more"].as_bool() != Some(true) || cursor.is_empty() {
                break;
            }
        }
        Ok(None)
    }
}

/// Where and how requests go to Slack.
pub(crate) struct Routing {
    routes: Vec<Route>,
    default_channel: Option<String>,
    approvals: BTreeMap<String, SlackApprovals>,
}

struct Route {
    policy: Option<String>,
    hosts: Option<GlobSet>,
    channel: String,
}

impl Routing {
    pub(crate) fn new(
        config: &SlackConfig,
        host_groups: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, Error> {
        let bad = |message: String| Error::Notify { message };
        let mut routes = Vec::with_capacity(config.routes.len());
        for (index, route) in config.routes.iter().enumerate() {
            let what = format!("[[notify.slack.routes]] #{}", index + 1);
            if route.policy.is_none() && route.host_group.is_none() {
                return Err(bad(format!(
                    "{what}: give `policy`, `host_group` or both (use `channel` in [notify.slack] for everything else)"
                )));
            }
            if route.channel.trim().is_empty() {
                return Err(bad(format!("{what}: `channel` is empty")));
            }
            let hosts = match &route.host_group {
                None => None,
                Some(group) => {
                    let patterns = host_groups.get(group).ok_or_else(|| {
                        bad(format!(
                            "{what}: host_group `{group}` is not defined in [host_groups]"
                        ))
                    })?;
                    let mut set = GlobSetBuilder::new();
                    for pattern in patterns {
                        set.add(Glob::new(pattern).map_err(|err| bad(format!("{what}: {err}")))?);
                    }
                    Some(set.build().map_err(|err| bad(format!("{what}: {err}")))?)
                }
            };
            routes.push(Route {
                policy: route.policy.clone(),
                hosts,
                channel: route.channel.clone(),
            });
        }
        Ok(Self {
            routes,
            default_channel: config.channel.clone().filter(|c| !c.trim().is_empty()),
            approvals: config.approvals.clone(),
        })
    }

    /// The channels of a request: every matching route's, else the default channel.
    pub(crate) fn channels(&self, record: &RequestRecord) -> Vec<String> {
        let mut channels: Vec<String> = Vec::new();
        for route in &self.routes {
            let policy_ok = route
                .policy
                .as_ref()
                .is_none_or(|policy| *policy == record.request.policy);
            let host_ok = route
                .hosts
                .as_ref()
                .is_none_or(|hosts| hosts.is_match(&record.host));
            if policy_ok && host_ok && !channels.contains(&route.channel) {
                channels.push(route.channel.clone());
            }
        }
        if channels.is_empty()
            && let Some(channel) = &self.default_channel
        {
            channels.push(channel.clone());
        }
        channels
    }

    /// Buttons or a console link, for a policy.
    pub(crate) fn approvals(&self, policy: &str) -> SlackApprovals {
        self.approvals.get(policy).copied().unwrap_or_default()
    }
}

/// For a policy with `require_reason`: a button carries no reason and its Approve is
/// refused, so the message says where to approve instead (Deny works in Slack).
fn reason_notice(request: &gatekeep_proto::model::ApprovalRequest) -> Option<Value> {
    request.approval.require_reason.then(|| {
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "Policy {} requires a reason to approve: approve in the console or with `gatekeep review approve {} --reason ...`",
            escape(&request.policy),
            request.id
        )}]})
    })
}

/// A Slack message for `record`: its blocks and notification text.
#[expect(clippy::too_many_lines, reason = "one message's blocks, top to bottom")]
pub(crate) fn message(
    record: &RequestRecord,
    mode: SlackApprovals,
    console_url: Option<&str>,
    now: OffsetDateTime,
) -> (Vec<Value>, String) {
    let request = &record.request;
    let title = render::outcome(record.state);
    let host = escape(&render::word(&record.host));
    let policy = escape(&render::word(&request.policy));
    let (label, subject) = render::subject(record);
    let deadline = record.deadline.unix_timestamp();
    let mut fields = vec![
        json!({"type": "mrkdwn", "text": format!("*Host*\n{host}")}),
        json!({"type": "mrkdwn", "text": format!("*Policy*\n{policy}")}),
        json!({"type": "mrkdwn", "text": format!("*Asked by*\n{}", escape(&render::asker(record)))}),
    ];
    if record.state == RequestState::Pending {
        fields.push(json!({"type": "mrkdwn", "text": format!(
            "*Time left*\n{} (until <!date^{deadline}^{{date_short_pretty}} {{time_secs}}|{}>)",
            render::time_left(record, now),
            render::rfc3339(record.deadline)
        )}));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": format!("gatekeep: {title}"), "emoji": false}}),
        json!({"type": "section", "fields": fields}),
        // Verbatim: plain_text is never parsed for links, mentions or formatting.
        json!({"type": "section", "text": {"type": "plain_text", "text": format!("{label}: {subject}"), "emoji": false}}),
    ];
    let votes = if record.approvals.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = record
            .approvals
            .iter()
            .map(|vote| escape(&vote.reviewer))
            .collect();
        format!(" · approved by {}", names.join(", "))
    };
    blocks.push(
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "Request `{}` · rule {} · {} of {} approvals{votes}",
            request.id,
            escape(&render::word(&request.rule)),
            record.approvals.len(),
            record.approvals_required
        )}]}),
    );
    if let Some(decision) = &record.decision {
        let at = decision.decided_at.unix_timestamp();
        let reason = if decision.reason.is_empty() {
            String::new()
        } else {
            format!("\nReason: {}", escape(&decision.reason))
        };
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!(
            "*{title}* by {} at <!date^{at}^{{date_short_pretty}} {{time_secs}}|{}>{}{reason}",
            escape(&decision.decided_by),
            render::rfc3339(decision.decided_at),
            if decision.duration == GrantDuration::Once { String::new() } else { format!(" (for {})", decision.duration) },
        )}}));
    } else {
        let mut actions = Vec::new();
        let console = console_url.map(|url| render::console_link(url, record));
        match mode {
            SlackApprovals::Buttons => {
                blocks.extend(reason_notice(request));
                let durations = &request.approval.grant_durations;
                if durations.len() > 1 {
                    let options: Vec<Value> = durations
                        .iter()
                        .map(|d| json!({"text": {"type": "plain_text", "text": d.to_string()}, "value": d.to_string()}))
                        .collect();
                    let once = durations
                        .iter()
                        .position(|d| *d == GrantDuration::Once)
                        .unwrap_or(0);
                    actions.push(json!({
                        "type": "static_select", "action_id": DURATION,
                        "placeholder": {"type": "plain_text", "text": "Duration"},
                        "options": options, "initial_option": options[once].clone(),
                    }));
                }
                actions.push(json!({"type": "button", "action_id": APPROVE, "style": "primary",
                    "text": {"type": "plain_text", "text": "Approve"}, "value": request.id.to_string()}));
                actions.push(json!({"type": "button", "action_id": DENY, "style": "danger",
                    "text": {"type": "plain_text", "text": "Deny"}, "value": request.id.to_string()}));
                if let Some(url) = console {
                    actions.push(json!({"type": "button", "action_id": "gatekeep_open",
                        "text": {"type": "plain_text", "text": "Open in console"}, "url": url}));
                }
            }
            SlackApprovals::Link => {
                if let Some(url) = console {
                    actions.push(
                        json!({"type": "button", "action_id": "gatekeep_open", "style": "primary",
                        "text": {"type": "plain_text", "text": "Review in console"}, "url": url}),
                    );
                }
            }
        }
        if !actions.is_empty() {
            blocks.push(json!({"type": "actions", "block_id": ACTIONS_BLOCK, "elements": actions}));
        }
    }
    let text = format!("gatekeep: {title} on {host} (policy {policy})");
    (blocks, text)
}

/// What is stored per request and channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Posted {
    /// The channel id Slack answered with (`chat.update` needs the id, not a name).
    channel: String,
    ts: String,
    /// The state the message shows ([`shown`]).
    shown: String,
}

/// What a message shows, to skip updates that would change nothing.
fn shown(record: &RequestRecord) -> String {
    format!("{}:{}", record.state, record.approvals.len())
}

/// A job: bring `channel`'s message of request `id` up to date. `post` is set when the
/// change that made it was a pending request: only those are posted (a request a grant or
/// rule decided at once never needed a reviewer).
#[derive(Debug, Clone)]
pub(crate) struct SlackJob {
    pub id: Uuid,
    pub channel: String,
    pub post: bool,
}

/// The Slack sink.
pub(crate) struct SlackSink {
    pub api: SlackApi,
    pub engine: Arc<Engine>,
    pub routing: Arc<Routing>,
    pub console_url: Option<String>,
    pub leases: delivery::Leases,
}

impl SlackSink {
    /// Jobs for a changed request.
    pub(crate) fn jobs(&self, record: &RequestRecord) -> Vec<SlackJob> {
        self.routing
            .channels(record)
            .into_iter()
            .map(|channel| SlackJob {
                id: record.request.id,
                channel,
                post: record.state == RequestState::Pending,
            })
            .collect()
    }

    /// The request as it is now (a job that waited through an outage shows the latest) and
    /// what its message shows so far.
    async fn read(
        &self,
        job: &SlackJob,
    ) -> Result<Option<(RequestRecord, Option<Posted>)>, Failure> {
        let store = &self.engine.store;
        let Some(record) = store.get_request(job.id).await.map_err(store_failure)? else {
            return Ok(None);
        };
        let posted = store
            .notice(notice_key(job))
            .await
            .map_err(store_failure)?
            .and_then(|text| serde_json::from_str(&text).ok());
        Ok(Some((record.value, posted)))
    }

    async fn sync(&self, job: &SlackJob) -> Result<(), Failure> {
        let lease = self.key(job);
        // A replica that finds the message's lease held leaves the change to its holder,
        // which reads the request again after letting go (below): so the last change is
        // always shown, by one replica, and updates never race each other.
        loop {
            let Some((record, posted)) = self.read(job).await? else {
                return Ok(());
            };
            if posted.as_ref().is_some_and(|p| p.shown == shown(&record)) {
                return Ok(());
            }
            if posted.is_none() && !job.post {
                return Ok(());
            }
            let Some(attempted_at) = self.leases.claim(&lease).await? else {
                return Ok(());
            };
            // On failure the lease stays held: this worker retries, or another replica
            // takes it over once it expires.
            self.bring_up_to_date(job, attempted_at).await?;
            self.leases.release(&lease).await?;
        }
    }

    /// Under the message's lease: posts it (or finds the post whose answer was lost) or
    /// updates it, and stores what it shows.
    async fn bring_up_to_date(
        &self,
        job: &SlackJob,
        attempted_at: Option<OffsetDateTime>,
    ) -> Result<(), Failure> {
        // Read again under the lease: the previous holder may have changed it.
        let Some((record, mut posted)) = self.read(job).await? else {
            return Ok(());
        };
        let now_shown = shown(&record);
        if posted.as_ref().is_some_and(|p| p.shown == now_shown) {
            return Ok(());
        }
        if posted.is_none()
            && let Some(since) = attempted_at
        {
            posted = self.find_lost_post(job, since).await?;
            if let Some(found) = &posted
                && found.shown == now_shown
            {
                return self.store_posted(job, found).await;
            }
        }
        let mode = self.routing.approvals(&record.request.policy);
        let (blocks, text) = message(
            &record,
            mode,
            self.console_url.as_deref(),
            OffsetDateTime::now_utc(),
        );
        // Names the request, and what the message shows, so a lost post found again is
        // updated only if it shows less than the request's state.
        let metadata = json!({
            "event_type": METADATA_EVENT,
            "event_payload": {"request_id": job.id.to_string(), "shows": now_shown},
        });
        let stored = match posted {
            None => {
                self.leases.attempt(&self.key(job)).await?;
                let answer = self
                    .api
                    .call(
                        "chat.postMessage",
                        &json!({
                            "channel": job.channel, "text": text, "blocks": blocks,
                            "unfurl_links": false, "metadata": metadata,
                        }),
                    )
                    .await?;
                let ts = answer["ts"].as_str().unwrap_or_default().to_owned();
                if ts.is_empty() {
                    return Err(Failure::Permanent {
                        message: "chat.postMessage: the answer has no `ts`".to_owned(),
                    });
                }
                Posted {
                    channel: answer["channel"]
                        .as_str()
                        .unwrap_or(&job.channel)
                        .to_owned(),
                    ts,
                    shown: now_shown,
                }
            }
            Some(posted) => {
                self.api
                    .call(
                        "chat.update",
                        &json!({"channel": posted.channel, "ts": posted.ts, "text": text,
                            "blocks": blocks, "metadata": metadata}),
                    )
                    .await?;
                Posted {
                    shown: now_shown,
                    ..posted
                }
            }
        };
        self.store_posted(job, &stored).await
    }

    async fn store_posted(&self, job: &SlackJob, posted: &Posted) -> Result<(), Failure> {
        let value = serde_json::to_string(posted)
            .map_err(|err| Failure::retry(format!("encode: {err}")))?;
        self.engine
            .store
            .set_notice(notice_key(job), value)
            .await
            .map_err(store_failure)
    }

    /// A post was attempted at `since` and its outcome never heard: the message Slack may
    /// have posted then, found by its metadata. If the history cannot be read (a channel
    /// given by name, a token without `channels:history`), the post is made again and may
    /// appear twice: a notice seen twice beats one never seen.
    async fn find_lost_post(
        &self,
        job: &SlackJob,
        since: OffsetDateTime,
    ) -> Result<Option<Posted>, Failure> {
        match self
            .api
            .find_posted(&job.channel, job.id, since - LOOKBACK)
            .await
        {
            Ok(Some((ts, shown))) => {
                tracing::info!(channel = job.channel, request = %job.id, ts, "found the message of a post whose answer was lost");
                Ok(Some(Posted {
                    channel: job.channel.clone(),
                    ts,
                    shown,
                }))
            }
            Ok(None) => Ok(None),
            Err(failure @ Failure::Retry { .. }) => Err(failure),
            Err(Failure::Permanent { message }) => {
                tracing::warn!(channel = job.channel, request = %job.id, error = message,
                    "cannot look for a post whose answer was lost; posting again (it may appear twice)");
                Ok(None)
            }
        }
    }
}

/// Where the message of a job is stored.
fn notice_key(job: &SlackJob) -> String {
    format!("slack:{}:{}", job.channel, job.id)
}

impl Sink for SlackSink {
    type Job = SlackJob;

    fn name(&self) -> &'static str {
        "slack"
    }

    fn key(&self, job: &SlackJob) -> DeliveryKey {
        DeliveryKey::new(job.id, format!("slack:{}", job.channel), "message")
    }

    fn request_id(&self, job: &SlackJob) -> Uuid {
        job.id
    }

    fn deliver(&self, job: &SlackJob) -> impl Future<Output = Result<(), Failure>> + Send {
        self.sync(job)
    }

    async fn resume(&self, key: &DeliveryKey) -> Option<SlackJob> {
        let channel = key.channel.strip_prefix("slack:")?;
        (key.event == "message").then_some(())?;
        Some(SlackJob {
            id: key.subject.parse().ok()?,
            channel: channel.to_owned(),
            // A message taken over may have been posted already (found again, not twice).
            post: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrkdwn_control_characters_are_escaped() {
        assert_eq!(
            escape("<!channel> & <https://evil|click>"),
            "&lt;!channel&gt; &amp; &lt;https://evil|click&gt;"
        );
    }
}
