//! The admin HTTP server: `/livez` (the process runs and its loops beat), `/readyz` (every readiness gate open and
//! no shutdown under way) and `/metrics` (Prometheus text format).

use crate::sync::MutexExt as _;
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::Readiness;

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    metrics: Arc<Mutex<Registry>>,
}

/// Registers `distr_agent_build_info{component,version} 1`, `version` the agent's version name.
pub fn register_build_info(registry: &mut Registry, component: &'static str, version: &str) {
    let info = Family::<Vec<(&'static str, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("component", component.to_owned()),
        ("version", version.to_owned()),
    ])
    .set(1);
    registry.register("build_info", "Build of the running agent component", info);
}

/// Binds `addr` and serves the admin routes until `shutdown`. Returns once the socket is bound.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    metrics: Arc<Mutex<Registry>>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| anyhow::anyhow!("cannot bind the admin server on {addr}: {error}"))?;
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, metrics });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin server failed");
        }
    }))
}

/// Alive while every heartbeat is on time (a wedged loop gets the container restarted).
async fn livez(State(state): State<AdminState>) -> impl IntoResponse {
    match state.readiness.check_live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not live: {why}\n")),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    let registry = state.metrics.locked();
    match encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            error.to_string(),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn livez_fails_once_a_heartbeat_is_missed() {
        crate::install_crypto_provider();
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new(shutdown.clone());
        let heartbeat = readiness.heartbeat("poll loop", Duration::from_secs(60));
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let server = serve(addr, readiness, Arc::default(), shutdown.clone()).await.unwrap();
        let livez = || async {
            let response = reqwest::get(format!("http://{addr}/livez")).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        };
        assert_eq!(livez().await.0, 200);
        // The loop wedges: its next beat never comes.
        heartbeat.beat(Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (status, body) = livez().await;
        assert_eq!(status, 503);
        assert!(body.contains("poll loop"), "{body}");
        heartbeat.beat(Duration::from_secs(60));
        assert_eq!(livez().await.0, 200);
        shutdown.cancel();
        server.await.unwrap();
    }
}
