//! Who reviews: what the store keeps and authentication returns. Its own
//! module, below both `store` and `auth`, so that neither imports the other.

use serde::{Deserialize, Serialize};

/// An authenticated reviewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reviewer {
    pub name: String,
    pub groups: Vec<String>,
}

impl Reviewer {
    /// Whether the reviewer may decide requests of a policy naming `groups` (empty: anyone).
    #[must_use]
    pub fn may_review(&self, groups: &[String]) -> bool {
        groups.is_empty() || groups.iter().any(|group| self.groups.contains(group))
    }
}
