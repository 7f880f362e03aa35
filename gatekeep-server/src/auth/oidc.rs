//! Console sign-in with an OpenID Connect provider: the authorization code flow with PKCE
//! (S256), issuer discovery, and ID token validation.
//!
//! Why not the `openidconnect` crate: it verifies signatures with the `rsa` crate (RUSTSEC-
//! 2023-0071, no fixed release) plus `p256`/`p384`/`ed25519-dalek` and `chrono`, a second
//! crypto stack beside ring, which rustls and tonic already bring. What the console needs
//! of OIDC is small and is all here: discovery, one code exchange, and the ID token checks
//! of OpenID Connect Core 3.1.3.7 with `jsonwebtoken` (ring):
//!
//! - the signature, against the provider's JWKS (by `kid`; an unknown `kid` fetches the
//!   JWKS again, at most every [`JWKS_REFRESH`], so the provider's key rotation works);
//!   only asymmetric algorithms (`RS*`, `PS*`, `ES*`, `EdDSA`), never `none` or `HS*`;
//! - `iss` equals the configured issuer (and discovery's `issuer` must too);
//! - `aud` contains the client id (and `azp`, if present, is the client id);
//! - `exp` in the future, `iat` present (60 s leeway for clocks);
//! - `nonce` equals the one this sign-in sent;
//! - `auth_time`, when a maximum authentication age was asked (re-authentication).
//!
//! A browser's sign-in is bound to it by a short-lived `__Host-gatekeep-login` cookie
//! holding the `state` (`SameSite=Lax`, the one cookie that must survive the provider's
//! redirect back), so a code injected into another browser is refused.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, JwkSet},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokio::sync::RwLock;

use super::Reviewer;
use crate::error::Error;

/// The login cookie (the pending sign-in's `state`).
pub const LOGIN_COOKIE: &str = "__Host-gatekeep-login";
/// How long a sign-in may take at the provider.
const LOGIN_TTL: Duration = Duration::from_mins(10);
/// Most sign-ins in progress at once.
const MAX_PENDING: usize = 10_000;
/// The same unknown `kid` refetches the JWKS at most this often (a new one at once: the
/// provider rotated its keys).
const JWKS_REFRESH: Duration = Duration::from_secs(10);
/// The oldest ID token `gatekeep login` may hand over.
pub const DEVICE_TOKEN_AGE: Duration = Duration::from_mins(10);
/// Clock skew allowed on `exp`, `iat`, `auth_time`.
const LEEWAY_SECS: u64 = 60;

/// `[console.oidc]`: the OpenID provider reviewers sign in with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL, exactly as the provider names itself (`https://...`; `http://` only
    /// on a loopback address).
    pub issuer: String,
    pub client_id: String,
    /// The client secret, or `client_secret_file` (preferred: keep secrets out of config).
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// This service's callback, as registered at the provider:
    /// `https://HOST:PORT/auth/oidc/callback`.
    pub redirect_url: String,
    /// Shown on the sign-in button.
    #[serde(default = "default_display_name")]
    pub display_name: String,
    /// The claim holding the user's groups (a list of strings, or one string); its values
    /// are the reviewer's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Scopes asked besides `openid`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Extra trust roots (PEM) for the provider's TLS, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The public client `gatekeep login` uses (device authorization grant, no secret);
    /// without it the CLI cannot sign in with the provider.
    #[serde(default)]
    pub cli_client_id: Option<String>,
}

/// What `gatekeep login` needs to run the device flow (public: `GET /api/v1/auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClient {
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
}

fn default_display_name() -> String {
    "single sign-on".to_owned()
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

fn default_scopes() -> Vec<String> {
    vec!["email".to_owned(), "profile".to_owned()]
}

/// What discovery says (the fields used).
#[derive(Debug, Clone, Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

#[derive(Debug)]
struct Discovered {
    metadata: Metadata,
    jwks: JwkSet,
    jwks_fetched: Instant,
    /// The unknown `kid` that caused the last refetch.
    refetched_for: Option<String>,
}

/// A sign-in in progress.
#[derive(Debug, Clone)]
struct Pending {
    verifier: String,
    nonce: String,
    max_age: Option<u64>,
    return_to: String,
    started: Instant,
}

/// Who signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub reviewer: Reviewer,
    pub subject: String,
    pub email: Option<String>,
    /// When the user last authenticated at the provider.
    pub auth_time: OffsetDateTime,
}

/// The console's OpenID Connect client.
pub struct Oidc {
    config: OidcConfig,
    secret: Option<String>,
    http: reqwest::Client,
    discovered: RwLock<Option<Discovered>>,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

fn oidc_error(message: impl Into<String>) -> Error {
    Error::Oidc {
        message: message.into(),
    }
}

/// A URL is `https`, or `http` on a loopback address (tests, a provider on the same host).
fn check_url(field: &str, text: &str) -> Result<reqwest::Url, Error> {
    crate::https::check_url(text).map_err(|message| oidc_error(format!("`{field}` {message}")))
}

fn random_b64(bytes: usize) -> Result<String, Error> {
    let mut buffer = vec![0_u8; bytes];
    getrandom::fill(&mut buffer).map_err(|err| Error::Certs {
        message: format!("no randomness: {err}"),
    })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer))
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 4.2).
#[must_use]
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The claims read from an ID token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    /// One audience or a list (`jsonwebtoken` checks ours is among them).
    #[serde(default)]
    aud: serde_json::Value,
    #[serde(default)]
    auth_time: Option<i64>,
    iat: i64,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
    #[serde(flatten)]
    other: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
}

impl Oidc {
    /// A client for `config` (nothing is fetched until the first sign-in).
    pub fn new(config: OidcConfig) -> Result<Self, Error> {
        check_url("issuer", &config.issuer)?;
        check_url("redirect_url", &config.redirect_url)?;
        if config.client_id.is_empty() {
            return Err(oidc_error("`client_id` is empty"));
        }
        let secret = match (&config.client_secret, &config.client_secret_file) {
            (Some(secret), _) => Some(secret.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| Error::ReadConfig {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let http = crate::https::client(config.ca_file.as_deref())?;
        Ok(Self {
            config,
            secret,
            http,
            discovered: RwLock::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The name shown on the sign-in button.
    #[must_use]
    pub fn display_name(&self) -> &str {
        &self.config.display_name
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, Error> {
        let response =
            self.http.get(url).send().await.map_err(|err| {
                oidc_error(format!("cannot reach the provider at `{url}`: {err}"))
            })?;
        if !response.status().is_success() {
            return Err(oidc_error(format!(
                "the provider answered `{url}` with {}",
                response.status()
            )));
        }
        response
            .json()
            .await
            .map_err(|err| oidc_error(format!("unreadable answer from `{url}`: {err}")))
    }

    /// Discovery and JWKS, fetched once (and again by [`Self::refresh_jwks`]).
    async fn metadata(&self) -> Result<Metadata, Error> {
        if let Some(found) = &*self.discovered.read().await {
            return Ok(found.metadata.clone());
        }
        let issuer = self.config.issuer.trim_end_matches('/');
        let metadata: Metadata = self
            .get_json(&format!("{issuer}/.well-known/openid-configuration"))
            .await?;
        if metadata.issuer != self.config.issuer {
            return Err(oidc_error(format!(
                "the provider calls itself `{}`, not the configured issuer `{}`",
                metadata.issuer, self.config.issuer
            )));
        }
        for (field, url) in [
            ("authorization_endpoint", &metadata.authorization_endpoint),
            ("token_endpoint", &metadata.token_endpoint),
            ("jwks_uri", &metadata.jwks_uri),
        ] {
            check_url(field, url)?;
        }
        let jwks: JwkSet = self.get_json(&metadata.jwks_uri).await?;
        *self.discovered.write().await = Some(Discovered {
            metadata: metadata.clone(),
            jwks,
            jwks_fetched: Instant::now(),
            refetched_for: None,
        });
        Ok(metadata)
    }

    /// Fetches the JWKS again for an unknown `kid` (the provider rotated its keys); the
    /// same unknown `kid` again only after [`JWKS_REFRESH`].
    async fn refresh_jwks(&self, kid: Option<&str>) -> Result<(), Error> {
        let uri = {
            let guard = self.discovered.read().await;
            let Some(found) = &*guard else {
                return Ok(());
            };
            if found.refetched_for.as_deref() == kid && found.jwks_fetched.elapsed() < JWKS_REFRESH
            {
                return Ok(());
            }
            found.metadata.jwks_uri.clone()
        };
        let jwks: JwkSet = self.get_json(&uri).await?;
        if let Some(found) = &mut *self.discovered.write().await {
            tracing::info!(kid = ?kid, keys = jwks.keys.len(), "fetched the identity provider's keys again");
            found.jwks = jwks;
            found.jwks_fetched = Instant::now();
            found.refetched_for = kid.map(str::to_owned);
        }
        Ok(())
    }

    /// The device authorization endpoint, if the provider has one.
    pub async fn device_endpoint(&self) -> Result<Option<String>, Error> {
        Ok(self.metadata().await?.device_authorization_endpoint)
    }

    /// Starts a sign-in: returns the provider's authorization URL and the `state` for the
    /// login cookie. `max_age` asks the provider for an authentication at most that old
    /// (`prompt=login` when 0); `return_to` is the console route to come back to.
    pub async fn start(
        &self,
        max_age: Option<u64>,
        return_to: &str,
    ) -> Result<(String, String), Error> {
        let metadata = self.metadata().await?;
        let state = random_b64(32)?;
        let verifier = random_b64(48)?;
        let nonce = random_b64(32)?;
        let mut url = check_url("authorization_endpoint", &metadata.authorization_endpoint)?;
        {
            let mut scope = vec!["openid".to_owned()];
            scope.extend(self.config.scopes.iter().cloned());
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &self.config.client_id)
                .append_pair("redirect_uri", &self.config.redirect_url)
                .append_pair("scope", &scope.join(" "))
                .append_pair("state", &state)
                .append_pair("nonce", &nonce)
                .append_pair("code_challenge", &pkce_challenge(&verifier))
                .append_pair("code_challenge_method", "S256");
            match max_age {
                Some(0) => {
                    query.append_pair("prompt", "login");
                    query.append_pair("max_age", "0");
                }
                Some(age) => {
                    query.append_pair("max_age", &age.to_string());
                }
                None => {}
            }
        }
        let mut pending = self.lock_pending();
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, login| login.started.elapsed() < LOGIN_TTL);
            if pending.len() >= MAX_PENDING {
                return Err(oidc_error("too many sign-ins in progress; try again later"));
            }
        }
        pending.insert(
            state.clone(),
            Pending {
                verifier,
                nonce,
                max_age,
                return_to: return_to.to_owned(),
                started: Instant::now(),
            },
        );
        Ok((url.into(), state))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finishes a sign-in: `state` from the query must equal the login cookie's; exchanges
    /// `code` (with the PKCE verifier) and validates the ID token. Returns who signed in
    /// and the console route to return to.
    pub async fn finish(
        &self,
        code: &str,
        state: &str,
        cookie_state: Option<&str>,
    ) -> Result<(Identity, String), Error> {
        if cookie_state != Some(state) {
            return Err(Error::permission(
                "this sign-in was not started by this browser (login cookie missing or different); start again",
            ));
        }
        let login = self
            .lock_pending()
            .remove(state)
            .filter(|login| login.started.elapsed() < LOGIN_TTL)
            .ok_or_else(|| Error::permission("unknown or expired sign-in (state); start again"))?;
        let metadata = self.metadata().await?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.config.redirect_url.as_str()),
            ("code_verifier", login.verifier.as_str()),
            ("client_id", self.config.client_id.as_str()),
        ];
        let mut request = self.http.post(&metadata.token_endpoint);
        if let Some(secret) = &self.secret {
            // client_secret_basic; a public client (no secret) is identified by client_id.
            request = request.basic_auth(&self.config.client_id, Some(secret));
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|err| oidc_error(format!("cannot reach the token endpoint: {err}")))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(Error::unauthenticated(format!(
                "the provider refused the code ({status}): {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let tokens: TokenResponse = response
            .json()
            .await
            .map_err(|err| oidc_error(format!("unreadable token response: {err}")))?;
        let id_token = tokens
            .id_token
            .ok_or_else(|| oidc_error("the token response has no id_token"))?;
        let identity = self
            .validate(&id_token, &login.nonce, login.max_age)
            .await?;
        Ok((identity, login.return_to))
    }

    /// Validates an ID token of a console sign-in (see the module's list) and maps it to a
    /// reviewer.
    pub async fn validate(
        &self,
        id_token: &str,
        nonce: &str,
        max_age: Option<u64>,
    ) -> Result<Identity, Error> {
        self.check(id_token, &self.config.client_id, Some(nonce), max_age)
            .await
    }

    /// The command-line client (`gatekeep login`, the device authorization flow), when
    /// `cli_client_id` is configured.
    #[must_use]
    pub fn device_client(&self) -> Option<DeviceClient> {
        self.config
            .cli_client_id
            .as_ref()
            .map(|client_id| DeviceClient {
                issuer: self.config.issuer.clone(),
                client_id: client_id.clone(),
                scopes: std::iter::once("openid".to_owned())
                    .chain(self.config.scopes.iter().cloned())
                    .collect(),
            })
    }

    /// Validates an ID token `gatekeep login` obtained with the device flow: issued to
    /// `cli_client_id`, at most [`DEVICE_TOKEN_AGE`] old (the device flow has no nonce, so
    /// the token's age bounds a replay).
    pub async fn validate_device_token(&self, id_token: &str) -> Result<Identity, Error> {
        let client_id = self.config.cli_client_id.as_deref().ok_or_else(|| {
            Error::permission(
                "the service accepts no command-line sign-in (no console.oidc.cli_client_id)",
            )
        })?;
        let identity = self.check(id_token, client_id, None, None).await?;
        Ok(identity)
    }

    async fn check(
        &self,
        id_token: &str,
        audience: &str,
        nonce: Option<&str>,
        max_age: Option<u64>,
    ) -> Result<Identity, Error> {
        let refused = |why: String| Error::unauthenticated(format!("id token refused: {why}"));
        let header =
            jsonwebtoken::decode_header(id_token).map_err(|err| refused(err.to_string()))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(refused(format!("symmetric algorithm {:?}", header.alg)));
        }
        self.metadata().await?;
        let mut key = self.key(header.kid.as_deref()).await;
        if key.is_none() {
            // The provider may have rotated its keys since the JWKS was fetched.
            self.refresh_jwks(header.kid.as_deref()).await?;
            key = self.key(header.kid.as_deref()).await;
        }
        let key = key.ok_or_else(|| {
            refused(format!(
                "no key `{}` in the provider's jwks",
                header.kid.as_deref().unwrap_or("(none)")
            ))
        })??;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<Claims>(id_token, &key, &validation)
            .map_err(|err| refused(err.to_string()))?
            .claims;
        let now = OffsetDateTime::now_utc();
        match nonce {
            Some(nonce) if claims.nonce.as_deref() != Some(nonce) => {
                return Err(refused("the nonce is not this sign-in's".to_owned()));
            }
            Some(_) => {}
            None => {
                let age = now.unix_timestamp() - claims.iat;
                if age > i64::try_from(DEVICE_TOKEN_AGE.as_secs()).unwrap_or(i64::MAX) {
                    return Err(refused(format!(
                        "issued {age} s ago; sign in again (`gatekeep login`)"
                    )));
                }
            }
        }
        let audiences = claims.aud.as_array().map_or(1, Vec::len);
        if (audiences > 1 || claims.azp.is_some()) && claims.azp.as_deref() != Some(audience) {
            return Err(refused("azp is not this client".to_owned()));
        }
        let auth_time = claims.auth_time.unwrap_or(claims.iat);
        let auth_time = OffsetDateTime::from_unix_timestamp(auth_time)
            .map_err(|_| refused("auth_time out of range".to_owned()))?;
        if let Some(max_age) = max_age {
            if claims.auth_time.is_none() {
                return Err(refused(
                    "a re-authentication was asked but the token has no auth_time".to_owned(),
                ));
            }
            let age = (now - auth_time).whole_seconds();
            if age > i64::try_from(max_age + LEEWAY_SECS).unwrap_or(i64::MAX) {
                return Err(refused(format!(
                    "the provider's authentication is {age} s old, more than the {max_age} s asked"
                )));
            }
        }
        self.identity(claims, auth_time)
    }

    async fn key(&self, kid: Option<&str>) -> Option<Result<DecodingKey, Error>> {
        let guard = self.discovered.read().await;
        let found = guard.as_ref()?;
        let jwk = match kid {
            Some(kid) => found.jwks.find(kid)?,
            // No kid: only unambiguous with a single key.
            None if found.jwks.keys.len() == 1 => &found.jwks.keys[0],
            None => return None,
        };
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            return Some(Err(Error::unauthenticated(
                "id token refused: a symmetric key in the provider's jwks",
            )));
        }
        Some(DecodingKey::from_jwk(jwk).map_err(|err| {
            Error::unauthenticated(format!("id token refused: unusable jwk: {err}"))
        }))
    }

    fn identity(&self, claims: Claims, auth_time: OffsetDateTime) -> Result<Identity, Error> {
        let groups = match claims.other.get(&self.config.groups_claim) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            Some(serde_json::Value::Array(many)) => many
                .iter()
                .filter_map(|value| value.as_str().map(str::to_owned))
                .collect(),
            Some(_) => {
                return Err(Error::unauthenticated(format!(
                    "id token refused: claim `{}` is neither a string nor a list of strings",
                    self.config.groups_claim
                )));
            }
        };
        let groups = groups
            .iter()
            .map(|group| gatekeep_proto::convert::name("group", group))
            .collect::<Result<Vec<_>, _>>()?;
        let subject = gatekeep_proto::convert::name("sub", &claims.sub)?;
        // An email the provider says is unverified is not an identity.
        let email = claims
            .email
            .filter(|_| claims.email_verified != Some(false))
            .map(|email| gatekeep_proto::convert::name("email", &email))
            .transpose()?;
        if subject.contains(',') || email.as_deref().is_some_and(|e| e.contains(',')) {
            return Err(Error::unauthenticated(
                "id token refused: a comma in sub or email (reviewer lists are comma separated)",
            ));
        }
        // The reviewer as the audit log names them: the provider's subject and email.
        let name = match &email {
            Some(email) => format!("{email} (oidc:{subject})"),
            None => format!("oidc:{subject}"),
        };
        Ok(Identity {
            reviewer: Reviewer {
                name,
                groups,
                email: email.clone(),
            },
            subject,
            email,
            auth_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn urls_must_be_https_off_loopback() {
        assert!(check_url("issuer", "https://login.example.com").is_ok());
        assert!(check_url("issuer", "http://127.0.0.1:9000").is_ok());
        assert!(check_url("issuer", "http://localhost:9000").is_ok());
        assert!(check_url("issuer", "http://login.example.com").is_err());
        assert!(check_url("issuer", "ftp://x").is_err());
    }
}
