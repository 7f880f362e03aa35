//! The agent's configuration file (`/etc/gatekeep/agent.toml`).
//!
//! Every field has a default, so an empty (or missing) file is a valid
//! configuration for a standard host:
//!
//! ```toml
//! policy_dir = "/etc/gatekeep/policies"
//! audit_db = "/var/lib/gatekeep/audit.db"
//! pin_dir = "/sys/fs/bpf/gatekeep"
//! cgroup_root = "/sys/fs/cgroup"
//! host = "web-1"               # default: the kernel's host name
//! log_format = "text"          # or "json"
//! reconcile_interval = "1s"
//! rescan_interval = "1s"
//! state_dir = "/var/lib/gatekeep"   # grants.json; the embedded service's data
//!
//! [metrics]                    # optional: Prometheus /metrics, plain HTTP; off when absent
//! listen = "127.0.0.1:9464"    # gated tasks cannot connect to it (like the decision service)
//!
//! [decision]
//! mode = "embedded"            # embedded (default) | remote | local
//! listen = "127.0.0.1:7443"    # embedded: the in-process service's address
//! # remote (the default mode once `server` is set):
//! # server = "https://gatekeep.example.org:7443"
//! # failover = ["https://gatekeep-2.example.org:7443"]  # other replicas, tried in turn
//! # ca = "/etc/gatekeep/tls/ca.pem"
//! # cert = "/etc/gatekeep/tls/agent.pem"
//! # key = "/etc/gatekeep/tls/agent.key"
//! # server_name = "gatekeep.example.org"   # when the certificate names another host
//! ```
//!
//! - `embedded`: the agent runs the decision service itself, on `SQLite` under
//!   `state_dir`, listening on loopback; reviewers use the `gatekeep` CLI
//!   with `state_dir/cli.toml`.
//! - `remote`: a central `gatekeep-server`, reached with mutual TLS.
//! - `local`: nobody reviews; every request gets its policy's timeout action.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::paths;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Folder of policy files; every `*.toml` in it is loaded.
    pub policy_dir: PathBuf,
    /// The local audit log.
    pub audit_db: PathBuf,
    /// Where programs and maps are pinned in bpffs.
    pub pin_dir: PathBuf,
    /// Root of the cgroup v2 hierarchy that policy cgroup paths are relative to.
    pub cgroup_root: PathBuf,
    /// procfs (for enrichment and pausing).
    pub proc_root: PathBuf,
    /// The user database used to name uids.
    pub passwd: PathBuf,
    /// This host's name in audit records; empty means the kernel's host name.
    pub host: String,
    /// Log format, unless `--log-format` says otherwise.
    pub log_format: LogFormat,
    /// How often the agent compares the kernel's pending requests with the
    /// ones it tracks (finds requests whose events were dropped).
    #[serde(with = "duration_text")]
    pub reconcile_interval: Duration,
    /// How often the cgroup tree and the policy folder are rescanned for
    /// new cgroups and changed files.
    #[serde(with = "duration_text")]
    pub rescan_interval: Duration,
    /// The agent's state: granted durations, and the embedded service's
    /// database, CA and reviewer token.
    pub state_dir: PathBuf,
    /// Who decides paused requests.
    pub decision: DecisionConfig,
    /// Whose DNS answers teach host-name connect rules.
    pub dns: DnsConfig,
    /// Prometheus `/metrics` (off unless `listen` is set; see [`crate::metrics`]).
    pub metrics: gatekeep_server::metrics::MetricsConfig,
}

/// `[dns]`: the resolvers whose answers gated workloads receive are
/// believed (host-name connect rules, docs/policy-hosts.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Resolver addresses (port 53). Empty: the `nameserver` lines of
    /// `resolv_conf` when the agent starts.
    pub resolvers: Vec<std::net::IpAddr>,
    /// The resolver configuration read when `resolvers` is empty.
    pub resolv_conf: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            resolvers: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

impl DnsConfig {
    /// The resolvers to believe: `resolvers`, else those `resolv_conf`
    /// names (none when it cannot be read).
    #[must_use]
    pub fn effective_resolvers(&self) -> Vec<std::net::IpAddr> {
        if !self.resolvers.is_empty() {
            return self.resolvers.clone();
        }
        std::fs::read_to_string(&self.resolv_conf)
            .map(|text| nameservers(&text))
            .unwrap_or_default()
    }
}

/// The addresses of a resolv.conf's `nameserver` lines (a `%zone` suffix
/// dropped).
#[must_use]
pub fn nameservers(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|addr| addr.split('%').next())
                .and_then(|addr| addr.parse().ok())
        })
        .collect()
}

/// Who decides paused requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionMode {
    /// The decision service runs inside the agent, on loopback.
    Embedded,
    /// A central decision service, over mutual TLS.
    Remote,
    /// Nobody reviews: the policy's timeout action applies at the deadline.
    Local,
}

impl DecisionMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionMode::Embedded => "embedded",
            DecisionMode::Remote => "remote",
            DecisionMode::Local => "local",
        }
    }
}

/// The `[decision]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecisionConfig {
    /// Unset: `remote` when `server` is set, else `embedded`.
    pub mode: Option<DecisionMode>,
    /// Remote: `https://HOST:PORT` of the decision service.
    pub server: Option<String>,
    /// Remote: further replicas of the same service (one database), tried in turn when
    /// `server` (or the replica in use) cannot be reached; pending requests are re-sent
    /// there and kept once by their id.
    pub failover: Vec<String>,
    /// Remote: the CA that signed the service's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// Remote: this agent's client certificate (PEM), which names its host.
    pub cert: Option<PathBuf>,
    /// Remote: the key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// Remote: the name to check the service's certificate against, when it
    /// is not the host of `server`.
    pub server_name: Option<String>,
    /// Embedded: where the in-process service listens.
    pub listen: SocketAddr,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        Self {
            mode: None,
            server: None,
            failover: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            server_name: None,
            // Loopback: exposing the service is a deliberate choice.
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, paths::EMBEDDED_PORT)),
        }
    }
}

impl DecisionConfig {
    /// The mode in force: the configured one, else `remote` when a server
    /// is named, else `embedded`.
    #[must_use]
    pub fn mode(&self) -> DecisionMode {
        self.mode.unwrap_or(if self.server.is_some() {
            DecisionMode::Remote
        } else {
            DecisionMode::Embedded
        })
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            policy_dir: paths::POLICY_DIR.into(),
            audit_db: paths::AUDIT_DB.into(),
            pin_dir: paths::PIN_DIR.into(),
            cgroup_root: paths::CGROUP_ROOT.into(),
            proc_root: paths::PROC.into(),
            passwd: paths::PASSWD.into(),
            // Filled from the kernel's host name at load.
            host: String::new(),
            log_format: LogFormat::Text,
            // Dropped ring-buffer events are rare; a second is short next to a
            // human decision and cheap (one map walk).
            reconcile_interval: Duration::from_secs(1),
            // New cgroups are gated at most this long after they appear.
            rescan_interval: Duration::from_secs(1),
            state_dir: paths::STATE_DIR.into(),
            decision: DecisionConfig::default(),
            dns: DnsConfig::default(),
            metrics: gatekeep_server::metrics::MetricsConfig::default(),
        }
    }
}

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file `{}`", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("`{field}` must be longer than zero")]
    ZeroInterval { field: &'static str },
    #[error(
        "`[decision] mode = \"remote\"` needs `{field}` (the service's address, its ca, and this agent's cert and key)"
    )]
    RemoteIncomplete { field: &'static str },
}

impl AgentConfig {
    /// Reads `path`. A missing file at the default location gives the
    /// defaults; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if !explicit && err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut config = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.fill_host();
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration document.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.reconcile_interval.is_zero() {
            return Err(ConfigError::ZeroInterval {
                field: "reconcile_interval",
            });
        }
        if self.rescan_interval.is_zero() {
            return Err(ConfigError::ZeroInterval {
                field: "rescan_interval",
            });
        }
        if self.decision.mode() == DecisionMode::Remote {
            let decision = &self.decision;
            for (field, missing) in [
                ("server", decision.server.is_none()),
                ("ca", decision.ca.is_none()),
                ("cert", decision.cert.is_none()),
                ("key", decision.key.is_none()),
            ] {
                if missing {
                    return Err(ConfigError::RemoteIncomplete { field });
                }
            }
        }
        Ok(())
    }

    /// Sets `host` to the kernel's host name when the file leaves it empty.
    fn fill_host(&mut self) {
        if self.host.is_empty() {
            self.host = nix::unistd::gethostname()
                .ok()
                .and_then(|name| name.into_string().ok())
                .unwrap_or_else(|| "localhost".to_owned());
        }
    }
}

/// Durations as humantime text (`"1s"`, `"500ms"`).
mod duration_text {
    use super::{Deserialize, Deserializer, Duration, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_gives_defaults() {
        let config = AgentConfig::parse("").expect("parse");
        assert_eq!(config, AgentConfig::default());
        assert_eq!(config.policy_dir, Path::new("/etc/gatekeep/policies"));
        assert_eq!(config.reconcile_interval, Duration::from_secs(1));
    }

    #[test]
    fn dns_resolvers_come_from_the_config_or_resolv_conf() {
        let config =
            AgentConfig::parse("[dns]\nresolvers = [\"127.0.0.1\", \"::1\"]\n").expect("parse");
        assert_eq!(
            config.dns.effective_resolvers(),
            [
                "127.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            nameservers(
                "# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bad\n"
            ),
            [
                "127.0.0.53".parse::<std::net::IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        let config = AgentConfig::parse("[dns]\nresolv_conf = \"/nonexistent/resolv.conf\"\n")
            .expect("parse");
        assert!(config.dns.effective_resolvers().is_empty());
    }

    #[test]
    fn fields_override_defaults() {
        let config = AgentConfig::parse(
            "policy_dir = \"/tmp/p\"\nlog_format = \"json\"\nreconcile_interval = \"250ms\"\nhost = \"h1\"\n",
        )
        .expect("parse");
        assert_eq!(config.policy_dir, Path::new("/tmp/p"));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.reconcile_interval, Duration::from_millis(250));
        assert_eq!(config.host, "h1");
        assert_eq!(config.pin_dir, Path::new(paths::PIN_DIR));
    }

    #[test]
    fn decision_mode_defaults_to_embedded_and_to_remote_once_a_server_is_named() {
        let config = AgentConfig::parse("").expect("parse");
        assert_eq!(config.decision.mode(), DecisionMode::Embedded);
        assert_eq!(config.decision.listen.to_string(), "127.0.0.1:7443");
        assert_eq!(config.state_dir, Path::new("/var/lib/gatekeep"));
        let config = AgentConfig::parse(
            "[decision]\nserver = \"https://gk:7443\"\nca = \"/c\"\ncert = \"/a\"\nkey = \"/k\"\n",
        )
        .expect("parse");
        assert_eq!(config.decision.mode(), DecisionMode::Remote);
        config.validate().expect("complete remote settings");
        let config = AgentConfig::parse("[decision]\nmode = \"local\"\nserver = \"https://gk\"\n")
            .expect("parse");
        assert_eq!(
            config.decision.mode(),
            DecisionMode::Local,
            "an explicit mode wins"
        );
        assert!(AgentConfig::parse("[decision]\nmode = \"central\"\n").is_err());
    }

    #[test]
    fn remote_mode_names_the_missing_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[decision]\nmode = \"remote\"\nserver = \"https://gk:7443\"\nca = \"/c\"\n",
        )
        .expect("write");
        let err = AgentConfig::load(&path, true).expect_err("incomplete");
        assert!(
            matches!(err, ConfigError::RemoteIncomplete { field: "cert" }),
            "{err}"
        );
        assert!(err.to_string().contains("`cert`"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        assert!(AgentConfig::parse("polcy_dir = \"/x\"").is_err());
        assert!(AgentConfig::parse("reconcile_interval = \"soon\"").is_err());
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("agent.toml");
        let config = AgentConfig::load(&missing, false).expect("defaults");
        assert!(!config.host.is_empty(), "host filled from the kernel");
        assert!(matches!(
            AgentConfig::load(&missing, true),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&missing, "rescan_interval = \"0s\"").expect("write");
        assert!(matches!(
            AgentConfig::load(&missing, true),
            Err(ConfigError::ZeroInterval {
                field: "rescan_interval"
            })
        ));
    }
}
