//! Outgoing HTTPS, as every client of the service makes it (the identity provider, Slack,
//! Teams, webhooks): one way to build the client and one rule for the URLs it may call.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use crate::error::Error;

/// A rustls client configuration trusting the system's roots and the certificates in
/// `ca_file` (PEM): what the service's HTTPS calls and its `PostgreSQL` connections use.
pub(crate) fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        drop(roots.add(cert));
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| Error::ReadTls {
            path: path.to_owned(),
            source,
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|err| Error::Certs {
                message: format!("`{}`: {err}", path.display()),
            })?;
            roots.add(cert).map_err(|err| Error::Certs {
                message: format!("`{}`: {err}", path.display()),
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Certs {
                message: format!("`{}` holds no PEM certificate", path.display()),
            });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Certs {
            message: err.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTPS client trusting the system's roots and `ca_file`; it never follows redirects
/// (a receiver cannot send a signed call elsewhere) and gives up after 15 s.
pub fn client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, Error> {
    let mut tls = tls_config(ca_file)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|err| Error::Certs {
            message: format!("cannot make an https client: {err}"),
        })
}

/// A URL is `https`, or `http` on a loopback address (tests, a receiver or provider on the
/// same host). The error says what is wrong with `text`; the caller names the field.
pub(crate) fn check_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|err| format!("`{text}` is not a url: {err}"))?;
    let loopback = url.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if url.scheme() == "https" || (url.scheme() == "http" && loopback) {
        Ok(url)
    } else {
        Err(format!(
            "`{text}` must be an https url (http only on a loopback address)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_or_loopback_http_only() {
        assert!(check_url("https://login.example.com").is_ok());
        assert!(check_url("http://127.0.0.1:9000").is_ok());
        assert!(check_url("http://[::1]:9000").is_ok());
        assert!(check_url("http://localhost:9000").is_ok());
        assert!(check_url("http://login.example.com").is_err());
        assert!(check_url("ftp://x").is_err());
    }
}
