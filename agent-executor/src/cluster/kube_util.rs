//! Small helpers around kube-rs calls: a timeout on every API call, and error messages that
//! read well in a status line (`secrets "x" is forbidden: ... (403)` rather than a `Debug`
//! dump).

use std::{future::Future, time::Duration};

/// Upper bound on one Kubernetes API call.
pub const API_TIMEOUT: Duration = agent_runtime::API_TIMEOUT;

/// A failed Kubernetes API call. Every variant is worth a retry later except a 4xx other
/// than 404/409/429.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API server answered with an error, or the request failed on the way.
    #[error("{}", describe(.0))]
    Kube(#[source] kube::Error),
    /// No answer within [`API_TIMEOUT`].
    #[error("the Kubernetes API did not answer within {0:?}")]
    Timeout(Duration),
}

impl ApiError {
    /// HTTP status code of an API error response, if there was one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Kube(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// Runs one API call with [`API_TIMEOUT`].
pub async fn call<T>(future: impl Future<Output = Result<T, kube::Error>>) -> Result<T, ApiError> {
    match tokio::time::timeout(API_TIMEOUT, future).await {
        Ok(result) => result.map_err(ApiError::Kube),
        Err(_) => Err(ApiError::Timeout(API_TIMEOUT)),
    }
}

/// Like [`call`], mapping 404 to `None`.
pub async fn call_opt<T>(future: impl Future<Output = Result<T, kube::Error>>) -> Result<Option<T>, ApiError> {
    match call(future).await {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.is_not_found() => Ok(None),
        Err(error) => Err(error),
    }
}
