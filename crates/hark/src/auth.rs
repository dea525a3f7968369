//! Credentials: agent passwords (argon2id), agent session tokens (random, stored hashed) and
//! visitor tokens (HMAC-SHA256 signed, kept by the widget). Comparisons of secrets are
//! constant-time.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{now_ms, random_token, SiteId, VisitorId};

type HmacSha256 = Hmac<Sha256>;

/// How long an agent session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a visitor token is valid; every `hello` hands out a fresh one.
pub const VISITOR_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Hashes a password with argon2id and a random salt. CPU-heavy: call from `spawn_blocking`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored hash (constant-time inside argon2). CPU-heavy.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Minimum password length for agents.
pub const MIN_PASSWORD_LEN: usize = 8;

/// A new session: the bearer token the client keeps and the hash the store keeps.
pub struct NewSessionToken {
    pub token: String,
    pub hash: String,
    pub csrf: String,
}

pub fn new_session_token() -> NewSessionToken {
    let token = random_token(32);
    NewSessionToken {
        hash: token_hash(&token),
        token,
        csrf: random_token(18),
    }
}

/// The stored form of a bearer token.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Constant-time equality of two strings (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[derive(Serialize, Deserialize)]
struct VisitorClaims {
    /// site id
    s: SiteId,
    /// visitor id
    v: VisitorId,
    /// expiry, ms since epoch
    e: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token of another site")]
    WrongSite,
}

/// Signs and checks visitor tokens with the installation's key (shared by every node).
#[derive(Clone)]
pub struct VisitorTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for VisitorTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VisitorTokens(***)")
    }
}

const TOKEN_PREFIX: &str = "v1.";

impl VisitorTokens {
    pub fn new(key: Vec<u8>) -> VisitorTokens {
        VisitorTokens { key }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!())
    }

    pub fn issue(&self, site: SiteId, visitor: VisitorId) -> String {
        self.issue_until(
            site,
            visitor,
            now_ms() + VISITOR_TOKEN_TTL.as_millis() as i64,
        )
    }

    /// A token that expires at `expires` (ms since epoch); `issue` gives the standard lifetime.
    pub fn issue_until(&self, site: SiteId, visitor: VisitorId, expires: i64) -> String {
        let claims = VisitorClaims {
            s: site,
            v: visitor,
            e: expires,
        };
        let payload = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{TOKEN_PREFIX}{payload}");
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    /// The visitor a token names, if it is genuine, unexpired and of `site`.
    pub fn verify(&self, token: &str, site: SiteId) -> Result<VisitorId, TokenError> {
        if token.len() > 512 || !token.starts_with(TOKEN_PREFIX) {
            return Err(TokenError::Malformed);
        }
        let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let payload = B64
            .decode(&signed[TOKEN_PREFIX.len()..])
            .map_err(|_| TokenError::Malformed)?;
        let claims: VisitorClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.e <= now_ms() {
            return Err(TokenError::Expired);
        }
        if claims.s != site {
            return Err(TokenError::WrongSite);
        }
        Ok(claims.v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visitor_tokens_verify_only_when_genuine() {
        let t = VisitorTokens::new(b"k1".to_vec());
        let site = SiteId::new();
        let v = VisitorId::new();
        let tok = t.issue(site, v);
        assert_eq!(t.verify(&tok, site), Ok(v));
        assert_eq!(t.verify(&tok, SiteId::new()), Err(TokenError::WrongSite));
        assert_eq!(
            VisitorTokens::new(b"k2".to_vec()).verify(&tok, site),
            Err(TokenError::BadSignature)
        );
        let expired = t.issue_until(site, v, now_ms() - 1);
        assert_eq!(t.verify(&expired, site), Err(TokenError::Expired));
        // Flipping any payload character breaks the signature.
        let mut forged = tok.clone().into_bytes();
        forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(t.verify(&forged, site).is_err());
        for junk in ["", "v1.", "v1.a.b", "nope", "v1.!!!.???"] {
            assert!(t.verify(junk, site).is_err(), "{junk}");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn session_tokens_are_stored_hashed() {
        let s = new_session_token();
        assert_eq!(s.hash, token_hash(&s.token));
        assert_ne!(s.hash, s.token);
        assert!(same_secret(&s.csrf, &s.csrf.clone()));
        assert!(!same_secret(&s.csrf, "other"));
    }
}
