//! [`HubError`]: everything that can go wrong talking to the Hub, each displayed as one
//! secret-free line fit for a status message or a log field.

use std::error::Error as _;
use std::time::Duration;

use reqwest::{Method, StatusCode};

use super::token::TokenError;
use crate::config::{ConfigError, Secret};

/// Longest body excerpt kept in [`HubError::Status`], in characters.
const EXCERPT_CHARS: usize = 200;

/// An error from a Hub call.
///
/// Retryable on the next cycle: [`HubError::Timeout`], [`HubError::Transport`],
/// [`HubError::RateLimited`] and 5xx [`HubError::Status`] (see [`HubError::is_retryable`]).
/// The others need something to change first (the configuration, the target secret, the Hub).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is missing or invalid.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// A request body could not be encoded.
    #[error("cannot encode the request body: {0}")]
    Encode(#[source] serde_json::Error),
    /// The connect or total timeout elapsed.
    #[error("{method} {path} timed out")]
    Timeout {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The connection failed or broke (refused, reset, truncated body, TLS).
    #[error("{method} {path} failed: {detail}")]
    Transport {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The cause, without the URL.
        detail: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The Hub answered with an unexpected status.
    #[error("hub answered {status} for {method} {path}{}", excerpt_suffix(excerpt))]
    Status {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The status code.
        status: StatusCode,
        /// The start of the response body, one line, with known secrets removed.
        excerpt: String,
    },
    /// The body is not what the protocol says (bad JSON, not UTF-8).
    #[error("hub sent a malformed response for {method} {path}: {message}")]
    Malformed {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// The body exceeded the size bound.
    #[error("hub response for {method} {path} is larger than {limit} bytes")]
    BodyTooLarge {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The bound.
        limit: usize,
    },
    /// The login was refused (401/403): wrong target id or secret, or a revoked target.
    #[error("hub rejected the login of target {target_id} ({status}); check DISTR_TARGET_ID and DISTR_TARGET_SECRET")]
    LoginRejected {
        /// The target id used (not secret).
        target_id: String,
        /// 401 or 403.
        status: StatusCode,
    },
    /// The Hub answered 429.
    #[error(
        "hub rate limited {method} {path} (429 Too Many Requests){}",
        retry_suffix(retry_after)
    )]
    RateLimited {
        /// HTTP method.
        method: Method,
        /// URL path of the endpoint.
        path: String,
        /// The `Retry-After` the Hub sent, if any (in seconds).
        retry_after: Option<Duration>,
    },
    /// A login failed a short while ago and no valid token is left: no new login is tried
    /// before the back-off ends (the Hub allows about 5 logins a minute and a rate-limited
    /// target that keeps trying stays locked out).
    #[error("not logging in to the hub again for {}s after a failed login: {last_error}", .retry_in.as_secs().max(1))]
    LoginBackoff {
        /// Time until the next login may be tried.
        retry_in: Duration,
        /// The failed login's error, as displayed.
        last_error: String,
    },
    /// The login answered a token whose expiry cannot be read.
    #[error("hub login returned an unusable token: {0}")]
    BadToken(#[from] TokenError),
}

impl HubError {
    /// The HTTP status the Hub answered, for errors that have one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HubError::Status { status, .. } | HubError::LoginRejected { status, .. } => Some(*status),
            HubError::RateLimited { .. } => Some(StatusCode::TOO_MANY_REQUESTS),
            _ => None,
        }
    }

    /// Whether trying again later, unchanged, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HubError::Timeout { .. }
            | HubError::Transport { .. }
            | HubError::RateLimited { .. }
            | HubError::LoginBackoff { .. } => true,
            HubError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }

    /// A transport-level error, classified as timeout or other.
    pub(crate) fn transport(method: &Method, path: &str, source: reqwest::Error) -> Self {
        let (method, path) = (method.clone(), path.to_owned());
        if source.is_timeout() {
            return HubError::Timeout { method, path, source };
        }
        HubError::Transport {
            method,
            path,
            detail: describe(&source),
            source,
        }
    }
}

fn excerpt_suffix(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

fn retry_suffix(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!(", retry after {}s", d.as_secs()))
        .unwrap_or_default()
}

/// The causes of a reqwest error, joined, without the URL (reqwest's own top message repeats
/// the URL and says little).
fn describe(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = inner.source();
    }
    if parts.is_empty() {
        // Clone cannot be had; the Display of a reqwest error without URL is what we want.
        return error
            .to_string()
            .split(" for url (")
            .next()
            .unwrap_or_default()
            .to_owned();
    }
    parts.join(": ")
}

/// Turns the start of an error body into one short line with the given secrets removed.
pub(crate) fn excerpt(body: &[u8], secrets: &[&Secret]) -> String {
    let mut text = String::from_utf8_lossy(body).into_owned();
    for secret in secrets {
        if !secret.is_empty() {
            text = text.replace(secret.expose(), "<redacted>");
        }
    }
    let mut line = String::new();
    let mut count = 0;
    let mut last_space = true;
    for c in text.chars() {
        let c = if c.is_whitespace() || c.is_control() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        if count == EXCERPT_CHARS {
            line.push('…');
            break;
        }
        line.push(c);
        count += 1;
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_read_as_one_line() {
        let error = HubError::Status {
            method: Method::GET,
            path: "/api/v1/agent/resources".into(),
            status: StatusCode::INTERNAL_SERVER_ERROR,
            excerpt: String::new(),
        };
        assert_eq!(
            error.to_string(),
            "hub answered 500 Internal Server Error for GET /api/v1/agent/resources"
        );
        assert!(error.is_retryable());
        assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    }

    #[test]
    fn excerpts_are_short_single_lines_without_secrets() {
        let secret = Secret::new("s3cret");
        let body = format!("line one\n\tline two {} end", secret.expose());
        assert_eq!(excerpt(body.as_bytes(), &[&secret]), "line one line two <redacted> end");
        let long = "x".repeat(10_000);
        let cut = excerpt(long.as_bytes(), &[]);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn rate_limit_mentions_retry_after() {
        let error = HubError::RateLimited {
            method: Method::POST,
            path: "/api/v1/agent/login".into(),
            retry_after: Some(Duration::from_secs(12)),
        };
        assert_eq!(
            error.to_string(),
            "hub rate limited POST /api/v1/agent/login (429 Too Many Requests), retry after 12s"
        );
    }
}
