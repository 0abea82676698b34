//! A component's TLS credentials: its certificate chain and key, and the trust bundle of the
//! agent's CA, checked together before anything uses them.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, ClientConfig, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use x509_parser::prelude::FromDer as _;

use super::identity::PeerIdentity;

/// File names in a mounted TLS Secret (the `kubernetes.io/tls` keys plus the CA bundle).
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// The latest valid credentials of a process, `None` until the first ones are loaded.
pub type CredentialsWatch = tokio::sync::watch::Receiver<Option<Arc<Credentials>>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the mounted Secret could not be read (not there yet, or being swapped).
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// PEM that holds nothing usable.
    #[error("{what}: {detail}")]
    Pem { what: &'static str, detail: String },
    /// The pieces do not fit together: wrong key, a chain the bundle does not trust, expired.
    #[error("the certificate is not usable: {0}")]
    Invalid(String),
    /// The set is sound but not valid at this moment by this process's clock: not yet valid
    /// (the issuer's clock runs ahead of ours) or expired. Unlike the other errors this one
    /// can go away without the files changing.
    #[error("the certificate is not valid now: {0}")]
    NotValidNow(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    /// True when the same files may be accepted later without changing: they failed only
    /// because of the time (a clock behind the issuer's, or an expiry being replaced).
    pub fn depends_on_time(&self) -> bool {
        matches!(self, Self::NotValidNow(_))
    }
}

/// The PEM bytes of a component's credentials, as the executor writes them into a Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls.crt`: the leaf certificate (and any intermediates).
    pub cert_chain: Vec<u8>,
    /// `tls.key`: its private key.
    pub key: Vec<u8>,
    /// `ca.crt`: the CA certificates to trust (more than one while the CA rotates).
    pub ca_bundle: Vec<u8>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_chain", &format_args!("{} bytes", self.cert_chain.len()))
            .field("key", &"<redacted>")
            .field("ca_bundle", &format_args!("{} bytes", self.ca_bundle.len()))
            .finish()
    }
}

impl TlsFiles {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from a mounted Secret directory.
    pub fn read_dir(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(Self {
            cert_chain: read(CERT_FILE)?,
            key: read(KEY_FILE)?,
            ca_bundle: read(CA_FILE)?,
        })
    }
}

/// Validated credentials with the rustls configurations built from them.
pub struct Credentials {
    pub files: TlsFiles,
    /// For servers: present the leaf, require a client certificate from the bundle.
    pub server: Arc<ServerConfig>,
    /// For clients: present the leaf, trust servers from the bundle.
    pub client: Arc<ClientConfig>,
    /// Serial number of the leaf, in hex.
    pub serial: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses and checks `files`: the key belongs to the leaf, the bundle trusts the leaf for
    /// client authentication, and the leaf is valid now. `namespace` names the identities
    /// that servers built from these credentials log for refused peers.
    pub fn from_files(files: TlsFiles, namespace: &str) -> Result<Self, TlsError> {
        let provider = provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert_chain)
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error("tls.crt", e))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(TlsError::Pem {
                what: "tls.crt",
                detail: "no certificate in it".into(),
            });
        };
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| pem_error("tls.key", e))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&files.ca_bundle) {
            let ca = ca.map_err(|e| pem_error("ca.crt", e))?;
            roots
                .add(ca)
                .map_err(|e| TlsError::Invalid(format!("ca.crt holds a bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "ca.crt",
                detail: "no certificate in it".into(),
            });
        }
        let roots = Arc::new(roots);

        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("tls.key: {e}")))?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| TlsError::Invalid(format!("tls.key does not belong to tls.crt: {e}")))?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        verifier
            .verify_client_cert(&leaf, &chain[1..], UnixTime::now())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => TlsError::NotValidNow(e.to_string()),
                e => TlsError::Invalid(format!("ca.crt does not vouch for tls.crt: {e}")),
            })?;

        let (serial, not_after) = leaf_facts(&leaf)?;
        let h2 = vec![b"h2".to_vec()];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(LoggingVerifier {
                inner: verifier,
                namespace: namespace.to_owned(),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        server.alpn_protocols = h2.clone();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        client.alpn_protocols = h2;
        Ok(Self {
            files,
            server: Arc::new(server),
            client: Arc::new(client),
            serial,
            not_after,
        })
    }

    /// Time left until the leaf expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// The leaf's expiry as seconds since the Unix epoch (for metrics and logs).
    pub fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn pem_error(what: &'static str, error: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        what,
        detail: error.to_string(),
    }
}

/// Serial (hex) and expiry of a certificate.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(String, SystemTime), TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| TlsError::Invalid(format!("tls.crt cannot be parsed: {e}")))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((
        cert.raw_serial_as_string().replace(':', ""),
        SystemTime::UNIX_EPOCH + Duration::from_secs(not_after),
    ))
}

/// The WebPKI client verifier, plus a log line naming what a refused client presented.
#[derive(Debug)]
struct LoggingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    namespace: String,
}

impl ClientCertVerifier for LoggingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|error| {
                let peer = PeerIdentity::from_certificate(end_entity, &self.namespace);
                tracing::warn!(presented = %peer, %error, "refused a client certificate");
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
