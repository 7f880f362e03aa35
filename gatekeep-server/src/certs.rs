//! A small certificate authority for a quick start: a CA, the service's certificate and agent
//! client certificates, made with rcgen (ECDSA P-256).
//!
//! - The service certificate names `localhost`, `127.0.0.1`, `::1` and any extra names, and
//!   may only authenticate a server.
//! - An agent certificate names its host (DNS subject alternative name and common name), and
//!   may only authenticate a client: the service reads the host from it.
//!
//! `gatekeep-server certs init --dir DIR` writes `ca.pem`, `ca.key`, `server.pem` and
//! `server.key`; `gatekeep-server certs agent --dir DIR --name HOST` writes
//! `agent-HOST.pem` and `agent-HOST.key`. Keys are written with mode 0600 and existing files
//! are never overwritten. [`Pki::ephemeral`] makes the same in memory, for an embedded service.

use std::path::{Path, PathBuf};

use gatekeep_util::fs::{Existing, PRIVATE, write_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{error::Error, paths};

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// What the service needs for TLS: its identity and the CA that signs agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub server: Identity,
}

impl TlsMaterial {
    /// Reads the files of a [`TlsPaths`](crate::config::TlsPaths).
    pub fn load(paths: &crate::config::TlsPaths) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::ReadTls {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            ca_pem: read(&paths.ca)?,
            server: Identity {
                cert_pem: read(&paths.cert)?,
                key_pem: read(&paths.key)?,
            },
        })
    }
}

fn certs_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Certs {
        message: format!("{what}: {err}"),
    }
}

/// A CA that can issue server and agent certificates.
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Valid from a day ago: a host whose clock is behind, or a clock set back (NTP, `date -s`)
/// after the certificate was made, must still accept it (the fault table in the threat
/// model, section 19). The end of validity is what limits a stolen key, not the start.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

impl CertAuthority {
    /// A new CA, valid for ten years.
    pub fn generate() -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(|e| certs_error("failed to make the ca key", e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "gatekeep CA");
        name.push(DnType::OrganizationName, "gatekeep");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| certs_error("failed to sign the ca", e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| certs_error("unreadable ca key", e))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| certs_error("unreadable ca certificate", e))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Identity, Error> {
        let key = KeyPair::generate().map_err(|e| certs_error("failed to make a key", e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 825);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| certs_error("failed to sign a certificate", e))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The service's certificate: `localhost`, `127.0.0.1`, `::1` and `names` (host names or
    /// IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<Identity, Error> {
        let mut sans = vec![
            SanType::DnsName(dns("localhost")?),
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        for name in names {
            sans.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(dns(name)?),
            });
        }
        self.issue("gatekeep-server", sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// An agent's client certificate for `host`.
    pub fn issue_agent(&self, host: &str) -> Result<Identity, Error> {
        check_host(host)?;
        self.issue(
            host,
            vec![SanType::DnsName(dns(host)?)],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

fn dns(name: &str) -> Result<rcgen::string::Ia5String, Error> {
    name.try_into()
        .map_err(|e| certs_error(&format!("`{name}` is not a dns name"), e))
}

/// Host names of agents: letters, digits, `-`, `_` and `.`, as in DNS.
fn check_host(host: &str) -> Result<(), Error> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Certs {
            message: format!("`{host}` is not a host name (use letters, digits, `-`, `_` and `.`)"),
        })
    }
}

/// A whole PKI in memory: the CA and the service's identity. For an embedded service and
/// for tests; [`Pki::agent`] issues agent certificates from it.
#[derive(Debug)]
pub struct Pki {
    pub ca: CertAuthority,
    pub server: Identity,
}

impl Pki {
    /// A fresh CA and a service certificate for `localhost`, `127.0.0.1`, `::1` and `names`.
    pub fn ephemeral(names: &[String]) -> Result<Self, Error> {
        let ca = CertAuthority::generate()?;
        let server = ca.issue_server(names)?;
        Ok(Self { ca, server })
    }

    /// The PKI kept in `dir` (as [`init_dir`] writes it), made there first if `dir` holds no
    /// `ca.pem` yet. For an embedded service that must keep its CA across restarts, so that
    /// the CLI's copy of `ca.pem` stays valid.
    pub fn load_or_init(dir: &Path, names: &[String]) -> Result<Self, Error> {
        if !dir.join(paths::CA_CERT).exists() {
            init_dir(dir, names)?;
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::ReadTls { path, source })
        };
        Ok(Self {
            ca: CertAuthority::from_pem(&read(paths::CA_CERT)?, &read(paths::CA_KEY)?)?,
            server: Identity {
                cert_pem: read(paths::SERVER_CERT)?,
                key_pem: read(paths::SERVER_KEY)?,
            },
        })
    }

    /// The service's TLS material.
    #[must_use]
    pub fn tls(&self) -> TlsMaterial {
        TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            server: self.server.clone(),
        }
    }

    /// A client certificate for the agent on `host`.
    pub fn agent(&self, host: &str) -> Result<Identity, Error> {
        self.ca.issue_agent(host)
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    write_atomic(path, contents.as_bytes(), mode, Existing::Refuse).map_err(|err| {
        let what = if err.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "cannot create `{}` (files are never overwritten)",
                path.display()
            )
        } else {
            format!("cannot write `{}`", path.display())
        };
        certs_error(&what, err)
    })
}

/// Writes a new CA and service certificate into `dir` (created if needed); returns the files
/// written.
pub fn init_dir(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir)
        .map_err(|err| certs_error(&format!("cannot create `{}`", dir.display()), err))?;
    let files = [
        paths::CA_CERT,
        paths::CA_KEY,
        paths::SERVER_CERT,
        paths::SERVER_KEY,
    ]
    .map(|name| dir.join(name));
    if let Some(existing) = files.iter().find(|path| path.exists()) {
        return Err(Error::Certs {
            message: format!(
                "`{}` already exists; use another --dir or remove the old files",
                existing.display()
            ),
        });
    }
    let pki = Pki::ephemeral(names)?;
    write_new(&files[0], pki.ca.cert_pem(), 0o644)?;
    write_new(&files[1], &pki.ca.key_pem, PRIVATE)?;
    write_new(&files[2], &pki.server.cert_pem, 0o644)?;
    write_new(&files[3], &pki.server.key_pem, PRIVATE)?;
    Ok(files.to_vec())
}

/// Issues an agent certificate for `host` from the CA in `dir`, written as
/// `agent-HOST.pem` and `agent-HOST.key` into `out` (default `dir`); returns the files.
pub fn agent_files(dir: &Path, host: &str, out: Option<&Path>) -> Result<Vec<PathBuf>, Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| Error::ReadTls { path, source })
    };
    let ca = CertAuthority::from_pem(&read(paths::CA_CERT)?, &read(paths::CA_KEY)?)?;
    let identity = ca.issue_agent(host)?;
    let out = out.unwrap_or(dir);
    let cert = out.join(format!("agent-{host}.pem"));
    let key = out.join(format!("agent-{host}.key"));
    write_new(&cert, &identity.cert_pem, 0o644)?;
    write_new(&key, &identity.key_pem, PRIVATE)?;
    Ok(vec![cert, key])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_name_their_host() {
        let pki = Pki::ephemeral(&["gk.example.org".into(), "10.0.0.5".into()]).unwrap();
        let agent = pki.agent("web-1").unwrap();
        let pem = x509_parser::pem::parse_x509_pem(agent.cert_pem.as_bytes())
            .unwrap()
            .1;
        let cert = pem.parse_x509().unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "web-1"
        );
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(pki.agent("web 1").is_err());
        assert!(pki.agent("").is_err());
    }

    #[test]
    fn files_are_written_once_and_the_ca_reloads() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().unwrap();
        let files = init_dir(dir.path(), &[]).unwrap();
        assert_eq!(files.len(), 4);
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            init_dir(dir.path(), &[])
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        let agent = agent_files(dir.path(), "db-2", None).unwrap();
        assert!(agent[0].ends_with("agent-db-2.pem"));
        assert!(
            agent_files(dir.path(), "db-2", None).is_err(),
            "never overwritten"
        );
        let kept = Pki::load_or_init(dir.path(), &[]).unwrap();
        assert_eq!(
            kept.ca.cert_pem(),
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
        );
        let fresh = tempfile::tempdir().unwrap();
        let first = Pki::load_or_init(&fresh.path().join("tls"), &[]).unwrap();
        let again = Pki::load_or_init(&fresh.path().join("tls"), &[]).unwrap();
        assert_eq!(first.ca.cert_pem(), again.ca.cert_pem(), "the ca is kept");
        TlsMaterial::load(&crate::config::TlsPaths {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
        })
        .unwrap();
    }
}
