//! A classic Helm chart repository for one test: `index.yaml` and the chart archives, served
//! by axum on loopback behind HTTP basic auth, over TLS with the test registry's certificate
//! (or plain HTTP, to check that the executor refuses it unless allowed).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context as _;
use axum::{
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::net::{TcpListener, TcpStream};

use crate::{TestEnv, tools};

/// Whether the repository speaks TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
}

/// A running chart repository; stopped when dropped.
pub struct ChartRepo {
    /// `https://127.0.0.1:<port>` (or `http://`), the `chartUrl` the Hub would send.
    pub url: String,
    /// `127.0.0.1:<port>`, the key of its entry in `registryAuth`.
    pub host: String,
    refused: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ChartRepo {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Served {
    dir: PathBuf,
    authorization: String,
    refused: Arc<AtomicUsize>,
}

impl ChartRepo {
    /// Packages each chart directory into a fresh repository of `test`, indexes it with
    /// `helm repo index`, and serves it to `user`/`password` only.
    pub async fn start(
        test: &str,
        charts: &[PathBuf],
        user: &str,
        password: &str,
        scheme: Scheme,
    ) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        env.record_secret(password);
        let dir = env
            .test_dir(test)
            .join(format!("chart-repo-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let home = tempfile::tempdir()?;
        for chart in charts {
            tools::helm(home.path(), &["package", path(chart)?, "-d", path(&dir)?])
                .await?
                .ok("helm package")?;
        }
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let host = tcp.local_addr()?.to_string();
        let url = match scheme {
            Scheme::Https => format!("https://{host}"),
            Scheme::Http => format!("http://{host}"),
        };
        tools::helm(home.path(), &["repo", "index", path(&dir)?, "--url", &url])
            .await?
            .ok("helm repo index")?;

        let refused = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Served {
            dir,
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            refused: refused.clone(),
        });
        let app = axum::Router::new()
            .route("/{file}", axum::routing::get(file))
            .with_state(served);
        let server = match scheme {
            Scheme::Https => {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(registry_tls(env)?));
                tokio::spawn(async move {
                    let _ = axum::serve(TlsListener { tcp, acceptor }, app).await;
                })
            }
            Scheme::Http => tokio::spawn(async move {
                let _ = axum::serve(tcp, app).await;
            }),
        };
        Ok(Self {
            url,
            host,
            refused,
            server,
        })
    }

    /// Requests refused for missing or wrong credentials so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

async fn file(State(served): State<Arc<Served>>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == served.authorization.as_bytes());
    if !authorized {
        served.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"charts\"")],
        )
            .into_response();
    }
    if name.starts_with('.') {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(served.dir.join(&name)).await {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The test registry's certificate (issued by the environment's CA for 127.0.0.1).
fn registry_tls(env: &TestEnv) -> anyhow::Result<rustls::ServerConfig> {
    let pki = env.ca_file.parent().context("the CA file has no directory")?;
    let chain = CertificateDer::pem_file_iter(pki.join("registry.crt"))
        .context("reading registry.crt")?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.join("registry.key")).context("reading registry.key")?;
    Ok(rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?)
}

/// TLS over a TCP listener, for `axum::serve`; failed handshakes are skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
