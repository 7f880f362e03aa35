//! Connections to `PostgreSQL`, over TLS where the server offers it: rustls with the
//! system's roots and `[store] ca_file`, the server's name checked against its certificate.
//!
//! `sslmode` in the URL works as `libpq`'s first three: `disable`, `prefer` (the default)
//! and `require`. With rustls a TLS connection always verifies the certificate, so
//! `require` means what `libpq` calls `verify-full`. `prefer` falls back to plaintext when
//! the server has no TLS, which an attacker on the path can force; so `prefer` becomes
//! `require` for any host but this one (a loopback address or a Unix socket), and only an
//! explicit `sslmode=disable` talks plaintext across the network.

use std::net::IpAddr;

use tokio_postgres::{
    Client, Connection, Socket,
    config::{Host, SslMode},
    tls::MakeTlsConnect,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What a connection runs over: plain TCP or TLS, as negotiated.
type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

use crate::store::{StoreConfig, StoreError};

/// What a connection needs: the client settings and the TLS connector.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("ssl_mode", &self.config.get_ssl_mode())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// The dialer of `config` (already parsed from `store`'s URL): `prefer` tightened to
    /// `require` off this host, roots from the system and `store.ca_file`.
    pub fn new(
        mut config: tokio_postgres::Config,
        store: &StoreConfig,
    ) -> Result<Self, StoreError> {
        if config.get_ssl_mode() == SslMode::Prefer && !config.get_hosts().iter().all(is_local) {
            config.ssl_mode(SslMode::Require);
        }
        let tls =
            crate::https::tls_config(store.ca_file.as_deref()).map_err(|err| StoreError::Url {
                message: format!("`[store] ca_file`: {err}"),
            })?;
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// One connection; the caller drives (spawns) the [`Connection`].
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, Stream>), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// This host: a Unix socket, `localhost` or a loopback address.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;

    fn mode(url: &str) -> SslMode {
        let config = tokio_postgres::Config::from_str(url).expect("a url");
        Dialer::new(config, &StoreConfig::default())
            .expect("a dialer")
            .config
            .get_ssl_mode()
    }

    #[test]
    fn prefer_becomes_require_off_this_host_and_explicit_modes_stay() {
        assert_eq!(mode("postgres://gk@db.example.com/gk"), SslMode::Require);
        assert_eq!(mode("postgres://gk@10.0.0.5:5432/gk"), SslMode::Require);
        assert_eq!(
            mode("postgres://gk@127.0.0.1,db.example.com/gk"),
            SslMode::Require,
            "any remote host of a list"
        );
        assert_eq!(mode("postgres://gk@127.0.0.1:5432/gk"), SslMode::Prefer);
        assert_eq!(mode("postgres://gk@localhost/gk"), SslMode::Prefer);
        assert_eq!(mode("postgres://gk@[::1]:5432/gk"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://gk@db.example.com/gk?sslmode=disable"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://gk@127.0.0.1/gk?sslmode=require"),
            SslMode::Require
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let dial = |ca_file: std::path::PathBuf| {
            let config =
                tokio_postgres::Config::from_str("postgres://gk@db.example.com/gk").expect("a url");
            let store = StoreConfig {
                ca_file: Some(ca_file),
                ..StoreConfig::default()
            };
            Dialer::new(config, &store)
                .expect_err("refused")
                .to_string()
        };
        let err = dial(path);
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = dial(dir.path().join("missing.pem"));
        assert!(err.contains("`[store] ca_file`"), "{err}");
        assert!(err.contains("missing.pem"), "{err}");
    }
}
