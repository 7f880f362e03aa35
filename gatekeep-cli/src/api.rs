//! `gatekeep api METHOD PATH [--body JSON] [--session]`: one call to the service's
//! HTTP/JSON API (the one the console uses, described at `/api/v1/openapi.json`), its JSON
//! answer printed. For scripts and integrations that need more than the typed commands,
//! and to drive the console's own path end to end: with `--session` the call signs in as
//! the console does (`POST /api/v1/session` with the reviewer token: a session cookie, and
//! its CSRF token on every change) and signs out after, instead of sending the token as a
//! bearer credential.

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, ValueEnum};
use reqwest::{Method, RequestBuilder, StatusCode, header};
use serde_json::{Value, json};

use crate::{config::Connection, escape, login};

/// `gatekeep api`'s arguments.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The HTTP method.
    #[arg(value_enum)]
    method: ApiMethod,
    /// A path under /api/v1/ (with its query string, if any).
    path: String,
    /// The JSON body of a POST.
    #[arg(long, value_name = "JSON")]
    body: Option<String>,
    /// Sign in as the console does (a session cookie from the token, its CSRF token on
    /// changes; signed out after) instead of sending the token as a bearer credential.
    #[arg(long)]
    session: bool,
}

/// Makes the call and prints the answer.
pub async fn run(connection: &Connection, args: &ApiArgs) -> anyhow::Result<()> {
    let answer = call(
        connection,
        args.method,
        &args.path,
        args.body.as_deref(),
        args.session,
    )
    .await?;
    // The answer holds workload strings: nothing in them reaches the terminal raw.
    println!("{}", escape::json(&serde_json::to_string_pretty(&answer)?));
    Ok(())
}

/// The methods the API has.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ApiMethod {
    Get,
    Post,
    Delete,
}

impl From<ApiMethod> for Method {
    fn from(method: ApiMethod) -> Self {
        match method {
            ApiMethod::Get => Method::GET,
            ApiMethod::Post => Method::POST,
            ApiMethod::Delete => Method::DELETE,
        }
    }
}

/// How a call authenticates.
enum Credentials {
    Bearer(String),
    /// The console's way: the session cookie (`name=value`) and its CSRF token.
    Session {
        cookie: String,
        csrf: String,
    },
}

impl Credentials {
    fn apply(&self, request: RequestBuilder, method: &Method) -> RequestBuilder {
        match self {
            Credentials::Bearer(token) => request.bearer_auth(token),
            Credentials::Session { cookie, csrf } => {
                let request = request.header(header::COOKIE, cookie);
                if method == Method::GET {
                    request
                } else {
                    request.header("x-csrf-token", csrf)
                }
            }
        }
    }
}

/// Checks that `path` names an API route of the service, and nothing else (another host,
/// the console's pages, a way out of `/api/v1/`).
fn check_path(path: &str) -> anyhow::Result<()> {
    let route = path.split(['?', '#']).next().unwrap_or_default();
    if !route.starts_with("/api/v1/")
        || route.split('/').any(|part| part == ".." || part == ".")
        || path.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        bail!(
            "`{}` is not an API path: give one under /api/v1/, such as /api/v1/requests (the routes: /api/v1/openapi.json)",
            path.escape_debug()
        );
    }
    Ok(())
}

/// The JSON of an answer, or an error naming the call, the status and the service's message.
async fn answer(what: &str, response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("{what}: the answer broke off"))?;
    let value = serde_json::from_str::<Value>(&text).ok();
    if !status.is_success() {
        let message = value
            .as_ref()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(300).collect());
        bail!("{what} answered {status}: {message}");
    }
    if status == StatusCode::NO_CONTENT || text.is_empty() {
        return Ok(Value::Null);
    }
    value.with_context(|| format!("{what} answered {status} with something that is not JSON"))
}

/// Signs in as the console does; returns the session's credentials.
async fn sign_in(
    http: &reqwest::Client,
    server: &str,
    token: String,
) -> anyhow::Result<Credentials> {
    let what = "signing in (POST /api/v1/session)";
    let response = http
        .post(format!("{server}/api/v1/session"))
        .json(&json!({ "token": token }))
        .send()
        .await
        .with_context(|| format!("{what}: cannot reach the service at {server}"))?;
    // The cookie's `name=value`, without its attributes, is what a browser sends back.
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::to_owned);
    let info = answer(what, response).await?;
    let cookie = cookie.ok_or_else(|| anyhow!("{what}: the service set no session cookie"))?;
    let csrf = info["csrf_token"]
        .as_str()
        .ok_or_else(|| anyhow!("{what}: the answer carries no csrf_token"))?
        .to_owned();
    Ok(Credentials::Session { cookie, csrf })
}

/// Makes the call; the answer's JSON (`null` for none).
pub(crate) async fn call(
    connection: &Connection,
    method: ApiMethod,
    path: &str,
    body: Option<&str>,
    session: bool,
) -> anyhow::Result<Value> {
    check_path(path)?;
    let body = body
        .map(|text| {
            serde_json::from_str::<Value>(text).with_context(
                || "--body is not JSON; quote it, e.g. --body '{\"verdict\": \"deny\"}'",
            )
        })
        .transpose()?;
    let token = connection.review_config()?.token;
    let http = login::client(&connection.ca)?;
    let server = connection.server.trim_end_matches('/');
    let credentials = if session {
        sign_in(&http, server, token).await?
    } else {
        Credentials::Bearer(token)
    };
    let method = Method::from(method);
    let what = format!("{method} {path}");
    let mut request = credentials.apply(
        http.request(method.clone(), format!("{server}{path}")),
        &method,
    );
    if let Some(body) = &body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{what}: cannot reach the service at {server}"))?;
    let result = answer(&what, response).await;
    if session {
        // A session left open would stay valid until it expires.
        let out = credentials.apply(
            http.delete(format!("{server}/api/v1/session")),
            &Method::DELETE,
        );
        let signed_out = match out.send().await {
            Ok(response) => answer("signing out (DELETE /api/v1/session)", response)
                .await
                .map(drop),
            Err(err) => Err(anyhow!(err).context("signing out (DELETE /api/v1/session)")),
        };
        if let Err(err) = signed_out {
            eprintln!("warning: {err:#}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_api_paths_are_called() {
        for good in [
            "/api/v1/requests",
            "/api/v1/requests?kind=exec",
            "/api/v1/requests/6f1c/decision",
        ] {
            check_path(good).unwrap();
        }
        for bad in [
            "api/v1/requests",
            "/console/",
            "/api/v1/../console/",
            "/api/v2/requests",
            "https://evil.example/api/v1/requests",
            "//evil.example/api/v1/",
            "/api/v1/requests\r\nX: y",
            "/api/v1/requests /x",
        ] {
            let err = check_path(bad).expect_err(bad).to_string();
            assert!(err.contains("is not an API path"), "{err}");
        }
    }
}
