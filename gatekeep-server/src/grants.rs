//! Grants: decisions that outlast their request.
//!
//! A decision with a duration other than `once` makes a [`Grant`] for the same host, policy
//! and target (executable and argv, or destination):
//!
//! - `for N` ends N after the decision (the service revokes it then, and tells the agent);
//! - `session` ends when the workload's cgroup goes away (the agent reports it with
//!   `SessionEnded`);
//! - `always` ends when a reviewer revokes it.
//!
//! Its scope ([`GrantScope`]) says whom it covers: by default only the workload (cgroup path)
//! that asked; a reviewer may choose the whole policy instead. A `session` grant is always
//! scoped to its workload. A workload grant outlives its cgroup (unless it is a `session`
//! grant): a cgroup made again at the same path is the same workload.
//!
//! The agent installs grants into its kernel maps, so identical actions are not asked again;
//! should one reach the service anyway, the service decides it by the grant (`grant:ID`).
//! Grants are listed and revoked through the review API; revocations are pushed to the
//! agent, and every agent gets the full list of its grants when it connects.

use gatekeep_proto::{
    GrantDuration,
    model::{Grant, GrantScope, RequestRecord, Verdict},
};
use time::OffsetDateTime;
use uuid::Uuid;

/// The grant a decision of `duration` and `scope` makes, or `None` for `once`.
#[must_use]
pub fn from_decision(
    record: &RequestRecord,
    verdict: Verdict,
    duration: GrantDuration,
    scope: GrantScope,
    created_by: &str,
    now: OffsetDateTime,
) -> Option<Grant> {
    let expires_at = match duration {
        GrantDuration::Once => return None,
        GrantDuration::For(length) => Some(
            time::Duration::try_from(length)
                .ok()
                .and_then(|length| now.checked_add(length))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH.replace_year(9999).unwrap_or(now)),
        ),
        GrantDuration::Session | GrantDuration::Always => None,
    };
    // A session ends with its cgroup, so it can only cover that cgroup.
    let scope = if duration == GrantDuration::Session {
        GrantScope::Workload
    } else {
        scope
    };
    let cgroup = (scope == GrantScope::Workload).then(|| record.request.cgroup.clone());
    Some(Grant {
        id: Uuid::new_v4(),
        host: record.host.clone(),
        policy: record.request.policy.clone(),
        target: record.request.target.clone(),
        verdict,
        duration,
        scope,
        cgroup,
        expires_at,
        created_by: created_by.to_owned(),
        created_at: now,
        request_id: record.request.id,
        revoked: None,
    })
}

/// How much a duration grants, to pick the most restrictive of a quorum's: `once`, then
/// durations by length, then `session`, then `always`.
fn rank(duration: GrantDuration) -> (u8, std::time::Duration) {
    match duration {
        GrantDuration::Once => (0, std::time::Duration::ZERO),
        GrantDuration::For(length) => (1, length),
        GrantDuration::Session => (2, std::time::Duration::ZERO),
        GrantDuration::Always => (3, std::time::Duration::ZERO),
    }
}

/// The most restrictive of the durations the approving reviewers chose: a quorum grants no
/// more than each of its members agreed to.
#[must_use]
pub fn most_restrictive(durations: impl IntoIterator<Item = GrantDuration>) -> GrantDuration {
    durations
        .into_iter()
        .min_by_key(|duration| rank(*duration))
        .unwrap_or(GrantDuration::Once)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn quorum_grants_the_least_anyone_agreed_to() {
        let hour = GrantDuration::For(Duration::from_hours(1));
        let day = GrantDuration::For(Duration::from_hours(24));
        assert_eq!(most_restrictive([GrantDuration::Always, day, hour]), hour);
        assert_eq!(
            most_restrictive([GrantDuration::Session, GrantDuration::Always]),
            GrantDuration::Session
        );
        assert_eq!(
            most_restrictive([GrantDuration::Once, GrantDuration::Always]),
            GrantDuration::Once
        );
        assert_eq!(most_restrictive([]), GrantDuration::Once);
    }
}
