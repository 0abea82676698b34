//! The TLS side of a gRPC server: an accept loop that completes each handshake with the
//! credentials current at that moment, and a tower layer that lets a call through only when
//! the client's identity may call that method.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{Either, Ready, ready};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, transport::server::Connected};

use super::{CredentialsWatch, PeerIdentity, Role};

/// Time a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once at most. The agent's clients are the poller, the updater
/// and an operator; more than this at once are strangers, who then wait in the listen backlog
/// instead of each costing a task and a handshake's memory.
pub const MAX_HANDSHAKES: usize = 32;

/// What the server knows of a connection's client; tonic puts it into every request's
/// extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub identity: Arc<PeerIdentity>,
    pub addr: SocketAddr,
}

/// A TLS connection whose client presented a certificate the agent's CA issued.
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for AuthenticatedStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake succeeded with
/// the credentials current when the connection arrived. Refused handshakes are logged (the
/// verifier names what the client presented) and dropped.
pub fn incoming(
    listener: TcpListener,
    credentials: CredentialsWatch,
    namespace: String,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<AuthenticatedStream>> {
    incoming_with_limit(listener, credentials, namespace, shutdown, MAX_HANDSHAKES)
}

/// [`incoming`] with at most `max_handshakes` handshakes under way: no connection is accepted
/// while that many are.
pub fn incoming_with_limit(
    listener: TcpListener,
    credentials: CredentialsWatch,
    namespace: String,
    shutdown: CancellationToken,
    max_handshakes: usize,
) -> ReceiverStream<std::io::Result<AuthenticatedStream>> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(current) = credentials.borrow().clone() else {
                tracing::warn!(%addr, "refused a connection: no server certificate loaded yet");
                continue;
            };
            let acceptor = TlsAcceptor::from(current.server.clone());
            let tx = tx.clone();
            let namespace = namespace.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::warn!(%addr, %error, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
                let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(leaf) => PeerIdentity::from_certificate(leaf, &namespace),
                    // The verifier makes a client certificate mandatory; this is unreachable.
                    None => return,
                };
                tracing::debug!(%addr, peer = %identity, "client connected");
                let info = PeerInfo {
                    identity: Arc::new(identity),
                    addr,
                };
                let _ = tx.send(Ok(AuthenticatedStream { inner: tls, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Which roles may call which gRPC method. Health checks and reflection are open to every
/// identity of the agent; any method not listed is refused.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    methods: HashMap<String, Vec<Role>>,
}

const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `roles` to call `service`/`method` (`distr.agent.v1.Executor`, `Sync`).
    pub fn allow(mut self, service: &str, method: &str, roles: &[Role]) -> Self {
        self.methods.insert(format!("/{service}/{method}"), roles.to_vec());
        self
    }

    /// Lets the poller collect and acknowledge this process's own log lines (the `AgentLogs`
    /// service, see [`crate::logging::service`]).
    pub fn allow_agent_logs(self) -> Self {
        const SERVICE: &str = "distr.agent.v1.AgentLogs";
        self.allow(SERVICE, "Collect", &[Role::Poller])
            .allow(SERVICE, "Ack", &[Role::Poller])
    }

    /// Decides a call to `path` from `peer`.
    pub fn check(&self, path: &str, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(peer) = peer else {
            return Err(Status::unauthenticated(
                "a client certificate issued by the agent's CA is required",
            ));
        };
        let Some(role) = peer.identity.role else {
            return Err(Status::permission_denied(format!(
                "{} is no identity of this agent",
                peer.identity.presented
            )));
        };
        if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
            return Ok(());
        }
        match self.methods.get(path) {
            Some(roles) if roles.contains(&role) => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "the {role} identity may not call {path}"
            ))),
        }
    }
}

/// Applies a [`Policy`] to every request of a server.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

type Guarded<R, E> = Pin<Box<dyn std::future::Future<Output = Result<R, E>> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Either<Guarded<Self::Response, Self::Error>, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<PeerInfo>();
        match self.policy.check(request.uri().path(), peer) {
            Ok(()) => {
                // A handler that panics fails its call with INTERNAL and a log line, instead
                // of a silently reset stream.
                use futures::FutureExt as _;
                let method = request.uri().path().to_owned();
                let call = std::panic::AssertUnwindSafe(self.inner.call(request)).catch_unwind();
                Either::Left(Box::pin(async move {
                    match call.await {
                        Ok(answer) => answer,
                        Err(_) => {
                            tracing::error!(%method, "a gRPC handler panicked; the call failed");
                            Ok(
                                Status::internal(format!("{method} failed unexpectedly; see the agent's log"))
                                    .into_http(),
                            )
                        }
                    }
                }))
            }
            Err(status) => {
                let presented = peer.map(|p| p.identity.to_string()).unwrap_or_else(|| "nothing".into());
                let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
                tracing::warn!(
                    method = request.uri().path(),
                    presented,
                    addr,
                    reason = status.message(),
                    "refused a gRPC call"
                );
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Credentials;

    fn peer(role: Option<Role>) -> PeerInfo {
        PeerInfo {
            identity: Arc::new(PeerIdentity {
                role,
                presented: "x".into(),
                serial: "01".into(),
            }),
            addr: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    #[test]
    fn only_listed_roles_may_call_a_method() {
        let policy = Policy::new().allow("distr.agent.v1.Executor", "Sync", &[Role::Poller]);
        let sync = "/distr.agent.v1.Executor/Sync";
        assert!(policy.check(sync, Some(&peer(Some(Role::Poller)))).is_ok());
        let denied = policy
            .check(sync, Some(&peer(Some(Role::Updater))))
            .expect_err("updater");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let unknown = policy
            .check("/distr.agent.v1.Executor/Other", Some(&peer(Some(Role::Poller))))
            .expect_err("unlisted");
        assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
        let nobody = policy.check(sync, None).expect_err("no peer");
        assert_eq!(nobody.code(), tonic::Code::Unauthenticated);
        let stranger = policy.check(sync, Some(&peer(None))).expect_err("no role");
        assert_eq!(stranger.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_its_call_with_internal() {
        use tower::{Layer as _, Service as _};
        let policy = Policy::new().allow("svc", "Boom", &[Role::Poller]);
        let inner = tower::service_fn(|_: http::Request<()>| async {
            if std::hint::black_box(true) {
                panic!("handler bug");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
        let mut service = AuthzLayer::new(policy).layer(inner);
        let mut request = http::Request::builder().uri("/svc/Boom").body(()).expect("request");
        request.extensions_mut().insert(peer(Some(Role::Poller)));
        let answer = service.call(request).await.expect("an answer");
        assert_eq!(answer.headers()["grpc-status"], "13");
    }

    /// A CA and an executor leaf of namespace `ns`, as the executor's authority issues them.
    fn credentials() -> Credentials {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_key = KeyPair::generate().expect("key");
        let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let mut leaf = CertificateParams::new(vec![Role::Executor.identity("ns")]).expect("params");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        let files = super::super::TlsFiles {
            cert_chain: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
            ca_bundle: ca_pem.into_bytes(),
        };
        Credentials::from_files(files, "ns").expect("credentials")
    }

    #[tokio::test]
    async fn handshakes_beyond_the_cap_wait_for_one_to_end() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_keep, watch) = tokio::sync::watch::channel(Some(Arc::new(credentials())));
        let shutdown = CancellationToken::new();
        let _incoming = incoming_with_limit(listener, watch, "ns".into(), shutdown.clone(), 1);

        // A client that connects and says nothing holds the only handshake.
        let idle = TcpStream::connect(addr).await.expect("connect");
        // Another one, which is no TLS client at all: a handshake with it would fail at
        // once, and the server would close the connection.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        let mut buffer = [0_u8; 64];
        // A window for the absence of an answer: while the first handshake is under way, the
        // second connection is not even accepted.
        let waiting = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buffer)).await;
        assert!(
            waiting.is_err(),
            "the second connection was handled beside the first: {waiting:?}"
        );

        drop(idle);
        let answered = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buffer)).await;
        assert!(
            answered.is_ok(),
            "the second connection was handled once the first ended"
        );
        shutdown.cancel();
    }

    #[test]
    fn health_and_reflection_are_open_to_every_identity_but_not_to_strangers() {
        let policy = Policy::new();
        let health = "/grpc.health.v1.Health/Check";
        assert!(policy.check(health, Some(&peer(Some(Role::Operator)))).is_ok());
        assert!(
            policy
                .check(
                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                    Some(&peer(Some(Role::Updater)))
                )
                .is_ok()
        );
        assert!(policy.check(health, Some(&peer(None))).is_err());
    }
}
