//! Who reviews: what the store keeps and authentication returns. Its own
//! module, below both `store` and `auth`, so that neither imports the other.

use serde::{Deserialize, Serialize};

/// An authenticated reviewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reviewer {
    /// How the audit log names them: a token reviewer's name, or for a reviewer signed in
    /// with OpenID Connect `EMAIL (oidc:SUBJECT)`.
    pub name: String,
    pub groups: Vec<String>,
    /// The verified email of a reviewer signed in with OpenID Connect: its local part is
    /// checked against the workload's user too (no self-approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl Reviewer {
    /// Whether the reviewer may decide requests of a policy naming `groups` (empty: anyone).
    #[must_use]
    pub fn may_review(&self, groups: &[String]) -> bool {
        groups.is_empty() || groups.iter().any(|group| self.groups.contains(group))
    }

    /// Whether `name` (a reviewer as the audit log names them) is this reviewer: the same
    /// name, or the same verified email through another surface (`EMAIL (oidc:SUB)` in the
    /// console, `EMAIL (slack:USER)` in Slack), so one person's approvals count once
    /// towards a quorum whichever surfaces they use.
    #[must_use]
    pub fn same_person(&self, name: &str) -> bool {
        if name == self.name {
            return true;
        }
        let email_of = |name: &str| {
            name.strip_suffix(')')
                .and_then(|rest| rest.split_once(" ("))
                .map(|(email, _)| email.to_owned())
        };
        let theirs = email_of(name);
        let mine = self.email.clone().or_else(|| email_of(&self.name));
        matches!((mine, theirs), (Some(a), Some(b)) if a.eq_ignore_ascii_case(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_person_across_surfaces() {
        let slack = Reviewer {
            name: "alice@example.com (slack:U0ALICE)".into(),
            groups: vec!["sre".into()],
            email: Some("alice@example.com".into()),
        };
        assert!(slack.same_person("alice@example.com (slack:U0ALICE)"));
        assert!(
            slack.same_person("Alice@Example.com (oidc:1234)"),
            "the console's name"
        );
        assert!(!slack.same_person("bob@example.com (oidc:99)"));
        assert!(
            !slack.same_person("alice"),
            "a token reviewer is a name, not an email"
        );
        let token = Reviewer {
            name: "alice".into(),
            groups: Vec::new(),
            email: None,
        };
        assert!(token.same_person("alice"));
        assert!(!token.same_person("alice@example.com (oidc:1)"));
    }
}
