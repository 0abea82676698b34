//! gRPC channels over mutual TLS whose client certificate follows the reloaded credentials.
//!
//! A channel is bound to the credentials it was built with; [`MtlsChannel::channel`] builds a
//! new one when the credentials change, so new calls use the new certificate while calls in
//! flight finish on the old connection.

use crate::sync::MutexExt as _;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Credentials, CredentialsWatch};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid gRPC URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("no client certificate loaded yet (waiting for the mounted TLS Secret)")]
    NotReady,
}

/// A lazily connecting channel to one server, re-created when the credentials change.
pub struct MtlsChannel {
    authority: String,
    server_identity: String,
    connect_timeout: Duration,
    timeout: Duration,
    credentials: CredentialsWatch,
    current: Mutex<Option<(Arc<Credentials>, Channel)>>,
}

impl MtlsChannel {
    /// `url` is `https://host:port` (or `host:port`); the server must present a certificate
    /// for `server_identity` (see [`super::Role::identity`]), whatever address it is reached at.
    pub fn new(
        url: &str,
        server_identity: String,
        credentials: CredentialsWatch,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = match url.split_once("://") {
            Some(("https", rest)) => rest,
            Some((scheme, _)) => return Err(bad(&format!("the scheme must be https, not {scheme}"))),
            None => url,
        };
        let uri: Uri = format!("http://{}", rest.trim_end_matches('/'))
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.port_u16().is_none() {
            return Err(bad("no port"));
        }
        ServerName::try_from(server_identity.clone()).map_err(|e| bad(&format!("server identity: {e}")))?;
        Ok(Self {
            authority: authority.to_string(),
            server_identity,
            connect_timeout,
            timeout,
            credentials,
            current: Mutex::new(None),
        })
    }

    /// The channel for the current credentials.
    pub fn channel(&self) -> Result<Channel, ClientError> {
        let credentials = self.credentials.borrow().clone().ok_or(ClientError::NotReady)?;
        let mut current = self.current.locked();
        if let Some((built_with, channel)) = current.as_ref()
            && Arc::ptr_eq(built_with, &credentials)
        {
            return Ok(channel.clone());
        }
        let channel = self.build(credentials.clone());
        *current = Some((credentials, channel.clone()));
        Ok(channel)
    }

    fn build(&self, credentials: Arc<Credentials>) -> Channel {
        let connector = TlsConnector::from(credentials.client.clone());
        // Checked in `new`; an error here would surface as a failed connection.
        let name = ServerName::try_from(self.server_identity.clone()).map_err(|e| e.to_string());
        let authority = self.authority.clone();
        let connect = tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let authority = authority.clone();
            async move {
                let name = name?;
                let tcp = TcpStream::connect(authority.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(TokioIo::new(tls))
            }
        });
        #[allow(clippy::expect_used)] // the authority was parsed in `new`
        let endpoint = Endpoint::from_shared(format!("http://{}", self.authority)).expect("a valid authority");
        endpoint
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(connect)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC transport for generated clients (`ExecutorClient<ReloadingChannel>`) that sends each
/// call over the channel of the current credentials.
#[derive(Clone)]
pub struct ReloadingChannel {
    source: Arc<MtlsChannel>,
    ready: Option<Channel>,
}

impl ReloadingChannel {
    pub fn new(source: MtlsChannel) -> Self {
        Self {
            source: Arc::new(source),
            ready: None,
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ReloadingChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = futures::future::MapErr<
        <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future,
        fn(tonic::transport::Error) -> BoxError,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        let channel = match self.source.channel() {
            Ok(channel) => self.ready.insert(channel),
            Err(error) => return std::task::Poll::Ready(Err(error.into())),
        };
        tower::Service::poll_ready(channel, cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use futures::TryFutureExt as _;
        // tower's contract: `call` follows a successful `poll_ready`, which stored the channel.
        let mut channel = match self.ready.take() {
            Some(channel) => channel,
            None => self.source.channel().unwrap_or_else(|_| {
                // Unreachable under the contract; a lazy channel to nowhere fails the call.
                Endpoint::from_static("http://0.0.0.0:1").connect_lazy()
            }),
        };
        tower::Service::call(&mut channel, request).map_err(Into::into as fn(tonic::transport::Error) -> BoxError)
    }
}
