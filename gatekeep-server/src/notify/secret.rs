//! Secrets of the notification sinks (Slack's bot token and signing secret, the Teams
//! workflow URL, webhook keys): named in the config by where they live, a file or an
//! environment variable, never by value, and never printed.

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Where a secret is read from: `{ file = "/etc/gatekeep-server/slack-token" }` or
/// `{ env = "GATEKEEP_SLACK_TOKEN" }`. Exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretSource {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

impl SecretSource {
    /// Reads the secret; `what` names it in errors (e.g. `[notify.slack] bot_token`).
    pub fn load(&self, what: &str) -> Result<Secret, String> {
        let value = match (&self.file, &self.env) {
            (Some(path), None) => std::fs::read_to_string(path).map_err(|err| {
                format!(
                    "{what}: cannot read `{}`: {err}; create it (mode 0600) or name another file",
                    path.display()
                )
            })?,
            (None, Some(name)) => std::env::var(name).map_err(|_| {
                format!("{what}: environment variable `{name}` is not set (or not UTF-8)")
            })?,
            (Some(_), Some(_)) => {
                return Err(format!("{what}: give `file` or `env`, not both"));
            }
            (None, None) => {
                return Err(format!(
                    "{what}: missing; give `{{ file = \"PATH\" }}` or `{{ env = \"VARIABLE\" }}`"
                ));
            }
        };
        // A trailing newline from `echo ... > file` is not part of the secret.
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{what}: the secret is empty"));
        }
        Ok(Secret(value.to_owned()))
    }
}

/// A secret value. Its `Debug` and `Display` print `<redacted>`, so a secret inside a
/// config or error that is logged stays out of the log; [`Secret::expose`] is the one way
/// to the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// For tests and callers that hold the value already.
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends or keys with it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("xoxb-very-secret");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(<redacted>)");
        assert_eq!(secret.expose(), "xoxb-very-secret");
    }

    #[test]
    fn sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "xoxb-1\n").unwrap();
        let file = SecretSource {
            file: Some(path.clone()),
            env: None,
        };
        assert_eq!(file.load("t").unwrap().expose(), "xoxb-1");
        let both = SecretSource {
            file: Some(path),
            env: Some("X".into()),
        };
        assert!(both.load("t").unwrap_err().contains("not both"));
        let none = SecretSource::default();
        assert!(
            none.load("[notify.slack] bot_token")
                .unwrap_err()
                .contains("missing")
        );
        let unset = SecretSource {
            file: None,
            env: Some("GATEKEEP_TEST_SURELY_UNSET_VARIABLE".into()),
        };
        let err = unset.load("t").unwrap_err();
        assert!(err.contains("is not set"), "{err}");
        let empty_path = dir.path().join("empty");
        std::fs::write(&empty_path, "\n").unwrap();
        let empty = SecretSource {
            file: Some(empty_path),
            env: None,
        };
        assert!(empty.load("t").unwrap_err().contains("empty"));
    }
}
