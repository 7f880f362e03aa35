//! `gatekeep login`: sign the CLI in with the service's OpenID Connect provider, by the
//! device authorization flow (RFC 8628), so CLI reviewers are the provider's identities
//! (subject, email, groups) like console reviewers.
//!
//! 1. Ask the service how (`GET /api/v1/auth`: the provider's issuer, the public client id
//!    of the CLI and the scopes).
//! 2. Discover the provider; ask it for a device code; show the verification address and
//!    the user code; poll its token endpoint until the user has signed in there.
//! 3. Hand the ID token to the service (`POST /api/v1/token`), which validates it (issuer,
//!    audience, signature, age) and opens a command-line session; its bearer token is
//!    written to the CLI config (`token = ...`), mode 0600.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde::Deserialize;

use crate::config::Connection;

#[derive(Debug, Deserialize)]
struct AuthMethods {
    device: Option<DeviceClient>,
}

#[derive(Debug, Deserialize)]
struct DeviceClient {
    issuer: String,
    client_id: String,
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    issuer: String,
    token_endpoint: String,
    device_authorization_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    interval: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// What the service says after a sign-in.
#[derive(Debug, Deserialize)]
pub struct Session {
    token: String,
    pub reviewer: String,
    pub groups: Vec<String>,
    pub expires_at: String,
}

/// An HTTPS client trusting the service's CA and the system's roots.
pub(crate) fn client(ca: &Path) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        drop(roots.add(cert));
    }
    let pem = std::fs::read(ca).with_context(|| {
        format!(
            "cannot read the service's ca certificate `{}`; pass --ca or set GATEKEEP_CA",
            ca.display()
        )
    })?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.with_context(|| format!("`{}` is not PEM", ca.display()))?)
            .with_context(|| format!("`{}` holds an unusable certificate", ca.display()))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn json<T: serde::de::DeserializeOwned>(
    what: &str,
    request: reqwest::RequestBuilder,
) -> anyhow::Result<T> {
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {what}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| value["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        bail!("{what} answered {status}: {message}");
    }
    serde_json::from_str(&text).with_context(|| format!("unreadable answer from {what}"))
}

/// Runs the device flow; `show` is told the address and code to give the user.
pub async fn login(connection: &Connection, show: impl Fn(&str, &str)) -> anyhow::Result<Session> {
    let http = client(&connection.ca)?;
    let server = connection.server.trim_end_matches('/');
    let methods: AuthMethods = json(
        "the decision service",
        http.get(format!("{server}/api/v1/auth")),
    )
    .await?;
    let device = methods.device.ok_or_else(|| {
        anyhow!(
            "the decision service at {server} offers no command-line sign-in (its [console.oidc] needs cli_client_id); use a reviewer token instead"
        )
    })?;
    let issuer = device.issuer.trim_end_matches('/');
    let metadata: Metadata = json(
        "the identity provider",
        http.get(format!("{issuer}/.well-known/openid-configuration")),
    )
    .await?;
    if metadata.issuer != device.issuer {
        bail!(
            "the identity provider calls itself `{}`, not `{}`",
            metadata.issuer,
            device.issuer
        );
    }
    let endpoint = metadata
        .device_authorization_endpoint
        .ok_or_else(|| anyhow!("the identity provider has no device authorization endpoint"))?;
    let scope = device.scopes.join(" ");
    let authorization: DeviceAuthorization = json(
        "the identity provider's device endpoint",
        http.post(&endpoint)
            .form(&[("client_id", device.client_id.as_str()), ("scope", &scope)]),
    )
    .await?;
    show(
        authorization
            .verification_uri_complete
            .as_deref()
            .unwrap_or(&authorization.verification_uri),
        &authorization.user_code,
    );
    let deadline = Instant::now() + Duration::from_secs(authorization.expires_in);
    let mut interval = Duration::from_secs(authorization.interval.unwrap_or(5).max(1));
    let id_token = loop {
        tokio::time::sleep(interval).await;
        if Instant::now() > deadline {
            bail!("the code expired before the sign-in was completed; run `gatekeep login` again");
        }
        let response = http
            .post(&metadata.token_endpoint)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", authorization.device_code.as_str()),
                ("client_id", device.client_id.as_str()),
            ])
            .send()
            .await
            .context("cannot reach the identity provider's token endpoint")?;
        let answer: TokenAnswer = response
            .json()
            .await
            .context("unreadable answer from the identity provider's token endpoint")?;
        match (answer.id_token, answer.error.as_deref()) {
            (Some(token), _) => break token,
            (None, Some("authorization_pending")) => {}
            (None, Some("slow_down")) => interval += Duration::from_secs(5),
            (None, error) => bail!(
                "the identity provider refused the sign-in: {} {}",
                error.unwrap_or("no id_token"),
                answer.error_description.unwrap_or_default()
            ),
        }
    };
    json(
        "the decision service",
        http.post(format!("{server}/api/v1/token"))
            .json(&serde_json::json!({ "id_token": id_token })),
    )
    .await
}

/// Writes `token` into the CLI config `file` (other lines kept), mode 0600.
pub fn save_token(file: &Path, session: &Session) -> anyhow::Result<()> {
    use std::{
        fmt::Write as _,
        os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    };
    let old = std::fs::read_to_string(file).unwrap_or_default();
    let mut text = String::new();
    for line in old.lines().filter(|line| {
        let line = line.trim_start();
        !line.starts_with("token") && !line.starts_with("# gatekeep login:")
    }) {
        text.push_str(line);
        text.push('\n');
    }
    writeln!(
        text,
        "# gatekeep login: {} until {}\ntoken = {}",
        session.reviewer,
        session.expires_at,
        serde_json::to_string(&session.token)?
    )?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot write `{}`", file.display()))?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    std::io::Write::write_all(&mut out, text.as_bytes())
        .with_context(|| format!("cannot write `{}`", file.display()))
}
