//! Every default path and port of the service, in one place.

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 7443;
/// Default configuration file.
pub const CONFIG_FILE: &str = "/etc/gatekeep-server/config.toml";
/// Default data directory.
pub const DATA_DIR: &str = "/var/lib/gatekeep-server";
/// Default directory of the service's TLS files.
pub const TLS_DIR: &str = "/etc/gatekeep-server/tls";
/// State database (requests, grants, reviewers), in the data directory.
pub const STATE_DB: &str = "state.db";
/// Audit log, in the data directory.
pub const AUDIT_DB: &str = "audit.db";
/// CA certificate, in a TLS directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key, in a TLS directory.
pub const CA_KEY: &str = "ca.key";
/// Server certificate, in a TLS directory.
pub const SERVER_CERT: &str = "server.pem";
/// Server private key, in a TLS directory.
pub const SERVER_KEY: &str = "server.key";
