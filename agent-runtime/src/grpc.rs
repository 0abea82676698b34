//! gRPC server set-up shared by the executor and the updater: bind first (so readiness can
//! follow a bound listener), serve `grpc.health.v1` and server reflection beside the services,
//! only over mutual TLS with a per-method identity check, and stop on the shared shutdown
//! token.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::Server,
};
use tonic_health::server::HealthReporter;

use crate::tls::{
    CredentialsWatch,
    server::{AuthzLayer, Policy},
};

/// Largest gRPC message either side accepts: above the poller's bound on the Hub's resources
/// body (8 MiB), so a large desired state is never refused whole.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How a server authenticates its clients.
pub struct ServerTls {
    /// The server's own credentials, swapped in when they change.
    pub credentials: CredentialsWatch,
    /// The agent's namespace, which identities are named in.
    pub namespace: String,
    /// Who may call what.
    pub policy: Policy,
    /// Connections older than this are closed gracefully, so clients reconnect with their
    /// current certificates.
    pub max_connection_age: Duration,
}

/// A bound gRPC listener with the standard services added.
pub struct GrpcServer {
    listener: TcpListener,
    routes: RoutesBuilder,
    pub health: HealthReporter,
}

impl GrpcServer {
    /// Binds `addr` and adds health and reflection (for `descriptor_sets`).
    pub async fn bind(addr: SocketAddr, descriptor_sets: &[&[u8]]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| anyhow::anyhow!("cannot bind the gRPC server on {addr}: {error}"))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for set in descriptor_sets {
            reflection = reflection.register_encoded_file_descriptor_set(set);
        }
        let reflection = reflection.build_v1()?;
        let mut routes = Routes::builder();
        routes.add_service(health_service).add_service(reflection);
        Ok(Self {
            listener,
            routes,
            health,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Adds a service and marks it SERVING in `grpc.health.v1`.
    pub async fn add_service<S>(&mut self, service: S)
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.set_serving::<S>().await;
        self.routes.add_service(service);
    }

    /// Serves over mutual TLS until `shutdown`, then drains in-flight calls.
    pub async fn serve(self, tls: ServerTls, shutdown: CancellationToken) -> anyhow::Result<()> {
        let routes: Routes = self.routes.routes();
        let incoming = crate::tls::server::incoming(self.listener, tls.credentials, tls.namespace, shutdown.clone());
        Server::builder()
            .max_connection_age(tls.max_connection_age)
            .layer(AuthzLayer::new(tls.policy))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(|error| anyhow::anyhow!("gRPC server failed: {error}"))
    }
}
