//! Console sessions: server-side, in memory, with a fixed lifetime.
//!
//! A session id is 32 random bytes (64 hex digits) sent only in a `Secure; HttpOnly;
//! SameSite=Strict` cookie; the map is keyed by its SHA-256, like tokens in the store. Each
//! session carries its own CSRF token, which every change of state must echo in the
//! `x-csrf-token` header. Sessions end at their expiry (checked on every use, whatever the
//! browser's cookie says) or on sign-out. They live in one process: a restart signs every
//! reviewer out, which is the safe direction.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use super::{Reviewer, new_token, token_hash};
use crate::error::Error;

/// The session cookie. `__Host-` makes browsers refuse it unless it is `Secure`, has
/// `Path=/` and no `Domain`, so no other host (or subdomain) can plant one.
pub const COOKIE: &str = "__Host-gatekeep";

/// Most sessions held at once; beyond, sign-ins are refused until some expire.
const MAX_SESSIONS: usize = 10_000;

/// Who a session signed in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A reviewer token (its hash): the reviewer is looked up on every use, so a removed
    /// reviewer loses the session too.
    Token { hash: String },
    /// An identity of the OpenID provider, as it signed in.
    Oidc {
        reviewer: Reviewer,
        /// When the user last authenticated at the provider.
        auth_time: OffsetDateTime,
    },
}

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    /// Echoed by the console in `x-csrf-token` on every change of state.
    pub csrf: String,
    pub expires: Instant,
    pub expires_at: OffsetDateTime,
    pub signed_in_at: OffsetDateTime,
    /// A command-line session (`gatekeep login`): its id is a bearer token and never a
    /// cookie. A browser session's id is only ever a cookie.
    pub bearer: bool,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (compared in constant time).
    #[must_use]
    pub fn csrf_matches(&self, presented: &str) -> bool {
        let (a, b) = (self.csrf.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The sessions of one service.
#[derive(Debug)]
pub struct Sessions {
    by_hash: Mutex<HashMap<String, Session>>,
    ttl: Duration,
}

impl Sessions {
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            by_hash: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// How long a session lasts.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Opens a browser session and returns its id (for the cookie) and the session.
    pub fn create(&self, principal: Principal) -> Result<(String, Session), Error> {
        self.open(principal, false)
    }

    /// Opens a command-line session: its id is the bearer token `gatekeep login` keeps.
    pub fn create_bearer(&self, principal: Principal) -> Result<(String, Session), Error> {
        self.open(principal, true)
    }

    fn open(&self, principal: Principal, bearer: bool) -> Result<(String, Session), Error> {
        let id = new_token()?;
        let csrf = new_token()?;
        let now = OffsetDateTime::now_utc();
        let session = Session {
            principal,
            csrf,
            expires: Instant::now() + self.ttl,
            expires_at: now + self.ttl,
            signed_in_at: now,
            bearer,
        };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, session| session.expires > now);
            if map.len() >= MAX_SESSIONS {
                return Err(Error::permission(
                    "too many open console sessions; sign out elsewhere or wait for sessions to expire",
                ));
            }
        }
        map.insert(token_hash(&id), session.clone());
        Ok((id, session))
    }

    /// The live session with this id; an expired one is removed and not returned.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = token_hash(id);
        let mut map = self.lock();
        match map.get(&key) {
            Some(session) if session.expires > Instant::now() => Some(session.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends a session (sign-out).
    pub fn remove(&self, id: &str) {
        self.lock().remove(&token_hash(id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a consistent map (single inserts/removes).
        self.by_hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The value of cookie `name` in a `cookie` header.
#[must_use]
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The `set-cookie` value that stores session `id` for `ttl`.
#[must_use]
pub fn set_cookie(id: &str, ttl: Duration) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        ttl.as_secs()
    )
}

/// The `set-cookie` value of a sign-in in progress (`SameSite=Lax`: it must come back with
/// the provider's top-level redirect to the callback).
#[must_use]
pub fn set_login_cookie(name: &str, state: &str, ttl: Duration) -> String {
    format!(
        "{name}={state}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        ttl.as_secs()
    )
}

/// The `set-cookie` value that deletes cookie `name`.
#[must_use]
pub fn clear_named_cookie(name: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

/// The `set-cookie` value that deletes the session cookie.
#[must_use]
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::new(Duration::from_mins(1));
        let (id, session) = sessions
            .create(Principal::Token { hash: "h".into() })
            .unwrap();
        assert!(session.csrf_matches(&session.csrf));
        assert!(!session.csrf_matches("gk_forged"));
        assert!(!session.csrf_matches(""));
        assert!(sessions.get(&id).is_some());
        assert!(sessions.get("gk_other").is_none());
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none(), "signed out");

        let expired = Sessions::new(Duration::ZERO);
        let (id, _) = expired
            .create(Principal::Token { hash: "h".into() })
            .unwrap();
        assert!(expired.get(&id).is_none(), "expired on the server");
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie("a=1; __Host-gatekeep=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("a=1", COOKIE), None);
        let set = set_cookie("xyz", Duration::from_secs(5));
        for part in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=5",
        ] {
            assert!(set.contains(part), "{set}");
        }
    }
}
