//! TLS settings shared by both clients.

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A client certificate and key (PEM): an agent's identity.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// How to reach the service over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the service's certificate (PEM).
    pub ca_pem: String,
    /// The agent's certificate; `None` for reviewers (they use a token).
    pub identity: Option<ClientIdentity>,
    /// The name to verify the service's certificate against, when it is not the endpoint's
    /// host.
    pub domain: Option<String>,
}

impl ClientTls {
    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(identity) = &self.identity {
            config = config.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}
