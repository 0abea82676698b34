//! HS256 JSON Web Tokens, signed and verified with `hmac` + `sha2`, the way the Hub issues
//! agent tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The audience of agent tokens.
pub const AUDIENCE: &str = "agent";

/// The claims of an agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Not before, seconds since the epoch.
    pub nbf: i64,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// The deployment target id.
    pub sub: String,
    /// [`AUDIENCE`].
    pub aud: String,
    /// The organization id.
    pub org: String,
    /// A unique token id, so single tokens can be revoked.
    pub jti: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not `header.claims.signature`, or not base64url JSON.
    #[error("malformed token")]
    Malformed,
    /// The header does not say HS256.
    #[error("unsupported algorithm")]
    Algorithm,
    /// The signature does not match.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `aud` is not [`AUDIENCE`].
    #[error("wrong audience")]
    Audience,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// Signs `claims` with `key`.
pub fn sign(key: &[u8], claims: &Claims) -> String {
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let claims = serde_json::to_vec(claims).expect("claims serialize");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = mac(key);
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// Verifies the signature and the time claims (`now` in seconds since the epoch).
pub fn verify(key: &[u8], token: &str, now: i64) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed);
    let header: Header = serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Malformed)?;
    if header.alg != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let mut mac = mac(key);
    mac.update(&token.as_bytes()[..token.len() - signature.len() - 1]);
    mac.verify_slice(&decode(signature)?).map_err(|_| JwtError::Signature)?;
    let claims: Claims = serde_json::from_slice(&decode(claims)?).map_err(|_| JwtError::Malformed)?;
    if claims.aud != AUDIENCE {
        return Err(JwtError::Audience);
    }
    if now >= claims.exp {
        return Err(JwtError::Expired);
    }
    if now < claims.nbf {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            exp,
            nbf: 100,
            iat: 100,
            sub: "target".into(),
            aud: AUDIENCE.into(),
            org: "org".into(),
            jti: "1".into(),
        }
    }

    #[test]
    fn round_trips_and_checks_time() {
        let token = sign(b"key", &claims(200));
        assert_eq!(verify(b"key", &token, 150), Ok(claims(200)));
        assert_eq!(verify(b"key", &token, 200), Err(JwtError::Expired));
        assert_eq!(verify(b"key", &token, 99), Err(JwtError::NotYetValid));
        assert_eq!(verify(b"other", &token, 150), Err(JwtError::Signature));
        assert_eq!(verify(b"key", "a.b", 150), Err(JwtError::Malformed));
    }

    #[test]
    fn a_tampered_claim_breaks_the_signature() {
        let token = sign(b"key", &claims(200));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(10_000)).expect("json"));
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(verify(b"key", &tampered, 150), Err(JwtError::Signature));
    }

    #[test]
    fn matches_a_known_hs256_vector() {
        // The signature part of jwt.io's HS256 example, recomputed independently.
        let input = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ";
        let mut mac = mac(b"your-256-bit-secret");
        mac.update(input.as_bytes());
        assert_eq!(
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
            "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
        );
    }
}
