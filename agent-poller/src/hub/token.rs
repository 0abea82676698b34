//! The agent's Hub JWT: reading its expiry (without verifying the signature: it is the
//! Hub's token, the agent only needs to know when to refresh it) and deciding when to log in
//! again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;

use crate::config::{HubConfig, Secret};

/// Why a JWT from the Hub cannot be used. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three dot-separated parts.
    #[error("the token is not a JWT")]
    NotAJwt,
    /// The claims part is not base64url-encoded JSON.
    #[error("the token's claims are not base64url JSON")]
    BadClaims,
    /// No numeric `exp` claim.
    #[error("the token has no numeric exp claim")]
    NoExpiry,
}

/// Reads the `exp` claim of a JWT without checking its signature.
pub fn jwt_expiry(jwt: &str) -> Result<SystemTime, TokenError> {
    let mut parts = jwt.split('.');
    let (Some(_header), Some(claims), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::NotAJwt);
    };
    // Tolerate padding, which some encoders add.
    let bytes = URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .map_err(|_| TokenError::BadClaims)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::BadClaims)?;
    // NumericDate may carry a fraction; seconds are all that matter.
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_f64)
        .ok_or(TokenError::NoExpiry)?;
    if !exp.is_finite() {
        return Err(TokenError::NoExpiry);
    }
    if exp <= 0.0 {
        return Ok(UNIX_EPOCH);
    }
    Ok(UNIX_EPOCH + Duration::from_secs_f64(exp.min(1e12)))
}

/// Who a token was issued to: if any of this changes in the configuration (a rotated secret,
/// a moved login endpoint), the next call logs in again with the new values.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LoginIdentity {
    pub(crate) target_id: String,
    pub(crate) target_secret: Secret,
    pub(crate) login_endpoint: Url,
}

impl LoginIdentity {
    pub(crate) fn of(config: &HubConfig) -> Self {
        Self {
            target_id: config.target_id.clone(),
            target_secret: config.target_secret.clone(),
            login_endpoint: config.login_endpoint.clone(),
        }
    }

    /// Same target and Hub: a token of `self` is still good for `other` (only the secret may
    /// differ, which does not invalidate tokens already issued).
    pub(crate) fn same_target(&self, other: &LoginIdentity) -> bool {
        self.target_id == other.target_id && self.login_endpoint == other.login_endpoint
    }
}

/// A token from a successful login.
#[derive(Clone)]
pub(crate) struct Token {
    pub(crate) jwt: Secret,
    pub(crate) expires_at: SystemTime,
    pub(crate) identity: LoginIdentity,
}

impl Token {
    /// Whether the token can be used without logging in first: issued for this identity and
    /// not within `refresh_before` of its expiry.
    pub(crate) fn is_fresh(&self, identity: &LoginIdentity, now: SystemTime, refresh_before: Duration) -> bool {
        self.identity == *identity && now + refresh_before < self.expires_at
    }

    /// Whether the token may stand in when a refresh failed: same target and not expired yet.
    pub(crate) fn is_usable(&self, identity: &LoginIdentity, now: SystemTime) -> bool {
        self.identity.same_target(identity) && now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_with_claims(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn reads_exp_without_verifying() {
        let jwt = jwt_with_claims(r#"{"exp":1700000000,"sub":"x","aud":["agent"]}"#);
        assert_eq!(jwt_expiry(&jwt), Ok(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        let jwt = jwt_with_claims(r#"{"exp":1700000000.5}"#);
        assert_eq!(
            jwt_expiry(&jwt),
            Ok(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
    }

    #[test]
    fn rejects_tokens_without_expiry() {
        assert_eq!(jwt_expiry("abc"), Err(TokenError::NotAJwt));
        assert_eq!(jwt_expiry("a.b.c.d"), Err(TokenError::NotAJwt));
        assert_eq!(jwt_expiry("a.!!!.c"), Err(TokenError::BadClaims));
        assert_eq!(
            jwt_expiry(&jwt_with_claims(r#"{"sub":"x"}"#)),
            Err(TokenError::NoExpiry)
        );
        assert_eq!(
            jwt_expiry(&jwt_with_claims(r#"{"exp":"soon"}"#)),
            Err(TokenError::NoExpiry)
        );
    }
}
