//! The service's configuration file (TOML). Every key has a default; see [`ServerConfig`].
//!
//! ```toml
//! name = "gatekeep-server"                 # host name of the service's own audit records
//! listen = "0.0.0.0:7443"                  # gRPC, TLS; agents need a client certificate
//! data_dir = "/var/lib/gatekeep-server"    # state.db (requests, grants, reviewers), audit.db
//! synchronous = "full"                     # full | normal (see store::Synchronous)
//! policy_dir = "/etc/gatekeep/policies"    # optional: the service's own copy of the policies
//! history_limit = 20                       # similar decisions shown with a request
//!
//! [tls]
//! ca = "/etc/gatekeep-server/tls/ca.pem"   # verifies agent certificates
//! cert = "/etc/gatekeep-server/tls/server.pem"
//! key = "/etc/gatekeep-server/tls/server.key"
//!
//! [console]                                # HTTP/JSON API and web console, same port
//! enabled = true
//! session_ttl_secs = 28800
//! token_sign_in = true                     # also sign in to the console with a reviewer token
//! [console.oidc]                           # optional: sign-in with an OpenID provider
//! issuer = "https://login.example.com"
//! client_id = "gatekeep"
//! client_secret_file = "/etc/gatekeep-server/oidc-secret"
//! redirect_url = "https://gatekeep.example.com:7443/auth/oidc/callback"
//! groups_claim = "groups"                  # its values are reviewer groups
//! [console.max_auth_age]                   # per policy: approvals need a fresh provider sign-in
//! prod-deploy = 300
//!
//! [store]                                  # optional: PostgreSQL instead of SQLite (a fleet)
//! url = "postgres://gatekeep@db.example.com:5432/gatekeep"
//! password_file = "/etc/gatekeep-server/db-password"
//! ca_file = "/etc/gatekeep-server/db-ca.pem"  # trusted beside the system's roots; TLS is
//! pool_size = 16                           # required off this host (store::postgres::tls)
//! decision_pool_size = 4                   # kept apart for decisions (see store::StoreConfig)
//!
//! [metrics]                                # optional: Prometheus `/metrics`, plain HTTP
//! listen = "127.0.0.1:9464"                # off when absent (see metrics::MetricsConfig)
//!
//! [host_groups]                            # and [[rules]]: see the rules module
//! [notify.slack]                           # Slack, Teams, webhooks: see notify::config
//! ```

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use crate::{auth::oidc::OidcConfig, notify::NotifyConfig, store::StoreConfig};
use crate::{error::Error, metrics::MetricsConfig, paths, rules::RuleConfig, store::Synchronous};

/// Everything the service reads at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Host name recorded on the service's own audit records.
    pub name: String,
    /// Address of the gRPC listener (agents and reviewers).
    pub listen: SocketAddr,
    /// Holds `state.db` and `audit.db`.
    pub data_dir: PathBuf,
    /// Durability of the state database.
    pub synchronous: Synchronous,
    /// Certificate files.
    pub tls: TlsPaths,
    /// When set, the service loads these policies and trusts their approval settings (and
    /// timeouts) over what agents send; requests naming another policy are refused.
    pub policy_dir: Option<PathBuf>,
    /// Similar decided requests shown with a request.
    pub history_limit: usize,
    /// Named lists of host name globs, for rules.
    pub host_groups: BTreeMap<String, Vec<String>>,
    /// Auto-decide rules, tried in order.
    pub rules: Vec<RuleConfig>,
    /// The HTTP/JSON API and the web console (same port as gRPC).
    pub console: ConsoleConfig,
    /// Slack, Teams and signed webhooks (see [`crate::notify::config`]).
    pub notify: NotifyConfig,
    /// Where requests, grants, reviewers and the audit chain live.
    pub store: StoreConfig,
    /// Prometheus `/metrics` (off unless `listen` is set).
    pub metrics: MetricsConfig,
}

/// The HTTP/JSON API and the reviewers' web console, served on the gRPC port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve `/api/v1/...` and `/console/`.
    pub enabled: bool,
    /// How long a console session lasts after sign-in, in seconds (server-side).
    pub session_ttl_secs: u64,
    /// Whether the console also accepts a reviewer token to sign in (with OIDC configured,
    /// set it to false so every console reviewer is an identity of the provider).
    pub token_sign_in: bool,
    /// Sign-in with an OpenID Connect provider.
    pub oidc: Option<OidcConfig>,
    /// Per policy name: approving needs a sign-in at the provider at most this many seconds
    /// old (the console asks the provider with `max_age`, `prompt=login` for 0). Approvals
    /// with a reviewer token (gRPC, HTTP bearer, token session) are refused for these
    /// policies; denials are not.
    pub max_auth_age: BTreeMap<String, u64>,
    /// Reviewer groups whose members administer the service through the HTTP API (the
    /// notification dead letters: `gatekeep notify ...`). Empty: nobody.
    pub admin_groups: Vec<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // A working day; a reviewer signs in again the next morning.
            session_ttl_secs: 8 * 3600,
            token_sign_in: true,
            oidc: None,
            max_auth_age: BTreeMap::new(),
            admin_groups: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            name: "gatekeep-server".to_owned(),
            // Loopback unless told otherwise: exposing the service is a deliberate choice.
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, paths::DEFAULT_PORT)),
            data_dir: PathBuf::from(paths::DATA_DIR),
            synchronous: Synchronous::Full,
            tls: TlsPaths::default(),
            policy_dir: None,
            history_limit: 20,
            host_groups: BTreeMap::new(),
            rules: Vec::new(),
            console: ConsoleConfig::default(),
            notify: NotifyConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// Where the service's certificate, key and the CA that signs agents live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for TlsPaths {
    fn default() -> Self {
        let dir = Path::new(paths::TLS_DIR);
        Self {
            ca: dir.join(paths::CA_CERT),
            cert: dir.join(paths::SERVER_CERT),
            key: dir.join(paths::SERVER_KEY),
        }
    }
}

impl ServerConfig {
    /// Reads a config file; a missing key takes its default.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|err| Error::Config {
            path: path.to_owned(),
            message: err.to_string(),
        })
    }

    /// The state database.
    #[must_use]
    pub fn state_db(&self) -> PathBuf {
        self.data_dir.join(paths::STATE_DB)
    }

    /// The audit log.
    #[must_use]
    pub fn audit_db(&self) -> PathBuf {
        self.data_dir.join(paths::AUDIT_DB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let config = ServerConfig::parse(Path::new("x.toml"), "").unwrap();
        assert_eq!(config, ServerConfig::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:7443");
        assert_eq!(
            config.state_db(),
            Path::new("/var/lib/gatekeep-server/state.db")
        );
    }

    #[test]
    fn keys_and_errors() {
        let config = ServerConfig::parse(
            Path::new("x.toml"),
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/tmp/gk"
            synchronous = "normal"
            [tls]
            ca = "/c/ca.pem"
            [[rules]]
            name = "r"
            action = "allow"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.synchronous, Synchronous::Normal);
        assert_eq!(config.tls.ca, Path::new("/c/ca.pem"));
        assert_eq!(config.tls.key, TlsPaths::default().key);
        assert_eq!(config.rules.len(), 1);
        assert_eq!(config.store, StoreConfig::default());
        let pg = ServerConfig::parse(
            Path::new("x.toml"),
            "[store]\nurl = \"postgres://gk:secret@db:5432/gk\"\npool_size = 4",
        )
        .unwrap();
        assert_eq!(pg.store.pool_size, 4);
        assert!(!format!("{pg:?}").contains("secret"), "{pg:?}");
        let metrics =
            ServerConfig::parse(Path::new("x.toml"), "[metrics]\nlisten = \"0.0.0.0:9464\"")
                .unwrap();
        assert_eq!(metrics.metrics.listen.unwrap().port(), 9464);
        let bad = ServerConfig::parse(Path::new("x.toml"), "[metrics]\nlisten = \"9464\"")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("line 2")
                && bad.contains("listen = \"9464\"")
                && bad.contains("socket address"),
            "{bad}"
        );
        let err = ServerConfig::parse(Path::new("x.toml"), "lisen = \"x\"").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid config `x.toml`: "),
            "{err}"
        );
        assert!(err.to_string().contains("lisen"), "{err}");
    }
}
