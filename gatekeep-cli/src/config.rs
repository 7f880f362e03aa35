//! Where the CLI finds the service: flags, then the environment, then
//! `~/.config/gatekeep/cli.toml`, then defaults.
//!
//! ```toml
//! server = "https://gatekeep.example.org:7443"
//! token = "gk_..."
//! ca = "/etc/gatekeep/ca.pem"
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use clap::Args;
use gatekeep_client::{ClientTls, ReviewConfig};
use serde::Deserialize;

/// Where the service listens unless told otherwise (the embedded default).
const DEFAULT_SERVER: &str = "https://127.0.0.1:7443";
/// The CA `gatekeep-server certs init` writes by default.
const DEFAULT_CA: &str = "/etc/gatekeep-server/tls/ca.pem";

#[derive(Debug, Args)]
#[expect(clippy::doc_markdown, reason = "clap help text, shown as written")]
pub struct ConnectionArgs {
    /// Decision service URL [default: https://127.0.0.1:7443].
    #[arg(long, global = true, env = "GATEKEEP_SERVER")]
    server: Option<String>,
    /// Reviewer token.
    #[arg(long, global = true, env = "GATEKEEP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate of the service (PEM) [default: /etc/gatekeep-server/tls/ca.pem].
    #[arg(long, global = true, env = "GATEKEEP_CA")]
    ca: Option<PathBuf>,
    /// CLI config file [default: ~/.config/gatekeep/cli.toml].
    #[arg(long, global = true, env = "GATEKEEP_CLI_CONFIG")]
    cli_config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
}

/// Resolved connection settings.
#[derive(Debug, Clone)]
pub struct Connection {
    pub server: String,
    token: Option<String>,
    pub ca: PathBuf,
    source: Option<PathBuf>,
    /// The config file `gatekeep login` writes its token to (named, or the default one).
    pub file: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/gatekeep/cli.toml`, else `$HOME/.config/gatekeep/cli.toml`.
pub fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("gatekeep").join("cli.toml"))
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cli config `{}`", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid cli config `{}`", path.display()))
}

impl ConnectionArgs {
    /// Flags and environment over the config file over defaults. An explicitly named config
    /// file must exist; the default one may not.
    pub fn resolve(&self, default_file: Option<&PathBuf>) -> anyhow::Result<Connection> {
        let (file, source) = match (&self.cli_config, default_file) {
            (Some(path), _) => (read_file(path)?, Some(path.clone())),
            (None, Some(path)) if path.exists() => (read_file(path)?, Some(path.clone())),
            _ => (FileConfig::default(), None),
        };
        Ok(Connection {
            server: self
                .server
                .clone()
                .or(file.server)
                .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
            token: self.token.clone().or(file.token),
            ca: self
                .ca
                .clone()
                .or(file.ca)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CA)),
            source,
            file: self.cli_config.clone().or_else(|| default_file.cloned()),
        })
    }
}

impl Connection {
    /// For commands that do not talk to the service.
    pub fn offline() -> Self {
        Self {
            server: DEFAULT_SERVER.to_owned(),
            token: None,
            ca: PathBuf::from(DEFAULT_CA),
            source: None,
            file: None,
        }
    }

    /// The client config; says what is missing and where to set it.
    pub fn review_config(&self) -> anyhow::Result<ReviewConfig> {
        let where_ = self.source.as_ref().map_or_else(
            || "~/.config/gatekeep/cli.toml".to_owned(),
            |path| format!("`{}`", path.display()),
        );
        let token = self.token.clone().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            anyhow!(
                "no reviewer token: pass --token, set GATEKEEP_TOKEN, or write `token = \"gk_...\"` in {where_} (an administrator makes one with `gatekeep-server reviewers add NAME`)"
            )
        })?;
        let ca_pem = std::fs::read_to_string(&self.ca).map_err(|err| {
            anyhow!(
                "cannot read the service's ca certificate `{}` ({err}); pass --ca, set GATEKEEP_CA, or write `ca = \"...\"` in {where_}",
                self.ca.display()
            )
        })?;
        Ok(ReviewConfig {
            endpoint: self.server.clone(),
            token,
            tls: ClientTls {
                ca_pem,
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: Option<&str>, cli_config: Option<PathBuf>) -> ConnectionArgs {
        ConnectionArgs {
            server: server.map(str::to_owned),
            token: None,
            ca: None,
            cli_config,
        }
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cli.toml");
        std::fs::write(&file, "server = \"https://gk:1\"\ntoken = \"gk_x\"\n").unwrap();
        let resolved = args(None, Some(file.clone())).resolve(None).unwrap();
        assert_eq!(resolved.server, "https://gk:1");
        assert_eq!(resolved.token.as_deref(), Some("gk_x"));
        assert_eq!(resolved.ca, Path::new(DEFAULT_CA));
        let resolved = args(Some("https://other:2"), Some(file))
            .resolve(None)
            .unwrap();
        assert_eq!(resolved.server, "https://other:2");
        let resolved = args(None, None)
            .resolve(Some(&dir.path().join("absent.toml")))
            .unwrap();
        assert_eq!(resolved.server, DEFAULT_SERVER);
    }

    #[test]
    fn missing_pieces_name_the_fix() {
        let connection = Connection::offline();
        let err = connection.review_config().unwrap_err().to_string();
        assert!(
            err.contains("no reviewer token") && err.contains("GATEKEEP_TOKEN"),
            "{err}"
        );
        let connection = Connection {
            token: Some("gk_x".into()),
            ca: PathBuf::from("/nonexistent/ca.pem"),
            ..Connection::offline()
        };
        let err = connection.review_config().unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("GATEKEEP_CA"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cli.toml");
        std::fs::write(&file, "sever = \"x\"\n").unwrap();
        let err = format!("{:#}", args(None, Some(file)).resolve(None).unwrap_err());
        assert!(
            err.contains("invalid cli config") && err.contains("sever"),
            "{err}"
        );
    }
}
