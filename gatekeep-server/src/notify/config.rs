//! The `[notify]` section of the service's config. Secrets are named by where they live
//! ([`SecretSource`]), never written into it.
//!
//! ```toml
//! [notify]
//! console_url = "https://gatekeep.example.com:7443"   # links in messages ("open in console")
//! lease_ms = 60000                                    # a dead replica's deliveries resume after this
//! [notify.retry]                                      # every sink: backoff, then dead letter
//! initial_ms = 1000
//! max_ms = 300000
//! max_attempts = 20
//!
//! [notify.slack]
//! bot_token = { file = "/etc/gatekeep-server/slack-bot-token" }      # xoxb-...
//! signing_secret = { env = "GATEKEEP_SLACK_SIGNING_SECRET" }
//! team_id = "T0123ABCD"             # only this workspace's users may decide
//! channel = "C0DEFAULT"             # optional: requests no route names
//! [[notify.slack.routes]]
//! policy = "prod-deploy"            # and/or host_group = "prod" (from [host_groups])
//! channel = "C0PRODOPS"
//! [notify.slack.approvals]          # per policy: "buttons" (default) or "link"
//! prod-deploy = "link"
//! [notify.slack.reviewers]          # verified Slack email -> reviewer groups
//! "alice@example.com" = ["sre"]
//!
//! [notify.teams]
//! workflow_url = { file = "/etc/gatekeep-server/teams-workflow-url" }
//! policies = []                     # empty: every policy
//!
//! [[notify.webhook]]
//! name = "siem"
//! url = "https://siem.example.com/hooks/gatekeep"
//! secret = { file = "/etc/gatekeep-server/siem-webhook-key" }
//! events = []                       # empty: every event
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::secret::SecretSource;

/// Announcing requests and their outcomes outside the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// The console's public address (`https://HOST:PORT`), for links in messages; without
    /// it messages carry no console link and `link` approvals cannot be used.
    pub console_url: Option<String>,
    /// Retries of every sink.
    pub retry: RetryConfig,
    /// Notices waiting per sink before its feed waits (then catches up from the store).
    pub queue: usize,
    /// How long a replica holds a delivery (a Slack message, a card, a webhook event) before
    /// another may take it over, in milliseconds: a replica that dies while delivering
    /// delays that delivery by about this much.
    pub lease_ms: u64,
    pub slack: Option<SlackConfig>,
    pub teams: Option<TeamsConfig>,
    pub webhook: Vec<WebhookConfig>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            console_url: None,
            retry: RetryConfig::default(),
            queue: 1024,
            // Far longer than one call (15 s at most), so a live holder is never overtaken.
            lease_ms: 60_000,
            slack: None,
            teams: None,
            webhook: Vec::new(),
        }
    }
}

/// Exponential backoff between attempts of one delivery, then a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// First wait, doubled after every failure.
    pub initial_ms: u64,
    /// Longest wait (a receiver's `Retry-After` is capped to it too).
    pub max_ms: u64,
    /// Attempts before a delivery becomes a dead letter.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // 1 s doubling to 5 min: 20 attempts span about an hour of outage.
        Self {
            initial_ms: 1000,
            max_ms: 300_000,
            max_attempts: 20,
        }
    }
}

/// Slack: a Block Kit message per pending request, with buttons or a console link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    /// Slack's Web API (tests point it at a stand-in).
    pub api_url: String,
    /// The bot token (`xoxb-...`): scopes `chat:write`, `users:read`, `users:read.email`.
    pub bot_token: SecretSource,
    /// The app's signing secret: verifies interaction payloads.
    pub signing_secret: SecretSource,
    /// The workspace whose users may decide (`team.id`); any workspace of the app if unset.
    pub team_id: Option<String>,
    /// The channel of requests no route names; such requests are not posted if unset.
    pub channel: Option<String>,
    /// Channels by policy and/or host group; a request goes to every route it matches.
    pub routes: Vec<SlackRoute>,
    /// Per policy: approve with buttons in Slack, or only link to the console.
    pub approvals: BTreeMap<String, SlackApprovals>,
    /// Verified Slack emails of reviewers and their reviewer groups.
    pub reviewers: BTreeMap<String, Vec<String>>,
}

impl Default for SlackConfig {
    fn default() -> Self {
        Self {
            api_url: "https://slack.com/api".to_owned(),
            bot_token: SecretSource::default(),
            signing_secret: SecretSource::default(),
            team_id: None,
            channel: None,
            routes: Vec::new(),
            approvals: BTreeMap::new(),
            reviewers: BTreeMap::new(),
        }
    }
}

/// Requests of `policy` and/or of hosts in `host_group` go to `channel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackRoute {
    pub policy: Option<String>,
    pub host_group: Option<String>,
    pub channel: String,
}

/// How a policy's requests are decided from Slack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlackApprovals {
    /// Approve and Deny buttons (and a duration choice where the policy offers one).
    #[default]
    Buttons,
    /// Only a link to the request in the console (e.g. policies that need a fresh sign-in).
    Link,
}

/// Microsoft Teams: an Adaptive Card per request through a Workflows incoming webhook.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeamsConfig {
    /// The workflow's URL; it carries its own signature, so it is a secret.
    pub workflow_url: SecretSource,
    /// Policies announced; empty: every policy.
    pub policies: Vec<String>,
}

/// A signed JSON webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook in logs and dead letters.
    pub name: String,
    pub url: String,
    /// HMAC-SHA256 key of the signatures.
    pub secret: SecretSource,
    /// Event types sent (`request.requested`, ...); empty: every event.
    #[serde(default)]
    pub events: Vec<String>,
}
