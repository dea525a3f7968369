//! Agent authentication at the edge: the `hark_session` cookie (browsers) or an
//! `Authorization: Bearer` token (API clients), resolved to a live, enabled agent. Requests that
//! change state and are authenticated by the cookie must also carry the CSRF token.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};

use super::error::ApiError;
use crate::auth::{same_secret, token_hash};
use crate::domain::{now_ms, Agent, AgentRole};
use crate::server::App;

pub const SESSION_COOKIE: &str = "hark_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct AuthedAgent {
    pub agent: Agent,
    /// The bearer token's stored hash, for logout.
    pub token_hash: String,
}

impl AuthedAgent {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.agent.role == AgentRole::Admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("admins only"))
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Resolves the request's credentials to an agent. `check_csrf` applies the CSRF rule to
/// cookie-authenticated requests.
pub async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    check_csrf: bool,
) -> Result<AuthedAgent, ApiError> {
    let (token, via_cookie) = match bearer(headers) {
        Some(t) => (t, false),
        None => (
            cookie(headers, SESSION_COOKIE).ok_or_else(ApiError::unauthenticated)?,
            true,
        ),
    };
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::unauthenticated());
    }
    let hash = token_hash(token);
    let row = app
        .store
        .session(&hash)
        .await?
        .ok_or_else(ApiError::unauthenticated)?;
    if row.expires_at <= now_ms() {
        return Err(ApiError::unauthenticated());
    }
    if via_cookie && check_csrf {
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !same_secret(sent, &row.csrf_token) {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "csrf_failed",
                "missing or wrong X-CSRF-Token header",
            ));
        }
    }
    let agent = app
        .store
        .agent(row.agent_id)
        .await?
        .filter(|a| !a.disabled)
        .ok_or_else(ApiError::unauthenticated)?;
    Ok(AuthedAgent {
        agent,
        token_hash: hash,
    })
}

impl FromRequestParts<App> for AuthedAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        authenticate(app, &parts.headers, !safe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_bearer_tokens_are_found() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; hark_session=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie(&h, "missing"), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}

/// The agent sessions that have live WebSocket connections on this node, so that ending a
/// session (logout, new password, account disabled) closes its sockets at once. Connections also
/// re-check their session regularly, which covers expiry and changes made through other nodes.
#[derive(Default)]
pub struct LiveSessions {
    /// Held only to insert, remove or collect tokens (no `.await` inside): a std mutex fits.
    inner: std::sync::Mutex<Vec<LiveSession>>,
}

struct LiveSession {
    conn: u64,
    agent: crate::domain::AgentId,
    token_hash: String,
    revoked: tokio_util::sync::CancellationToken,
}

/// Keeps a connection listed; unlists it when dropped.
pub struct LiveSessionGuard<'a> {
    sessions: &'a LiveSessions,
    conn: u64,
}

impl Drop for LiveSessionGuard<'_> {
    fn drop(&mut self) {
        self.sessions.lock().retain(|s| s.conn != self.conn);
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LiveSession>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists a connection; `revoked` is cancelled when its session ends.
    pub fn watch(
        &self,
        conn: u64,
        agent: crate::domain::AgentId,
        token_hash: &str,
        revoked: tokio_util::sync::CancellationToken,
    ) -> LiveSessionGuard<'_> {
        self.lock().push(LiveSession {
            conn,
            agent,
            token_hash: token_hash.to_owned(),
            revoked,
        });
        LiveSessionGuard {
            sessions: self,
            conn,
        }
    }

    /// Ends the connections of one session (logout).
    pub fn revoke_session(&self, token_hash: &str) {
        for s in self.lock().iter().filter(|s| s.token_hash == token_hash) {
            s.revoked.cancel();
        }
    }

    /// Ends the connections of every session of an agent (new password, disabled).
    pub fn revoke_agent(&self, agent: crate::domain::AgentId) {
        for s in self.lock().iter().filter(|s| s.agent == agent) {
            s.revoked.cancel();
        }
    }
}
