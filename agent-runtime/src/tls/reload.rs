//! Reloads credentials from a mounted Secret directory when its files change.
//!
//! The kubelet updates a Secret volume by swapping a `..data` symlink, so the three files can
//! be read half-way through a swap; such a set fails validation and is simply read again on
//! the next tick. A set that fails validation never replaces working credentials.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Credentials, CredentialsWatch, TlsFiles};

/// Starts polling `dir` every `interval` and returns the latest valid credentials. The first
/// read happens at once; until it succeeds the watch holds `None`.
pub fn watch_dir(dir: PathBuf, namespace: String, interval: Duration, shutdown: CancellationToken) -> CredentialsWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut seen: Option<TlsFiles> = None;
        let mut rejected: Option<TlsFiles> = None;
        let mut waiting_logged = false;
        loop {
            match TlsFiles::read_dir(&dir) {
                Err(error) => {
                    if tx.borrow().is_none() && !waiting_logged {
                        tracing::info!(dir = %dir.display(), %error, "waiting for the TLS certificate files");
                        waiting_logged = true;
                    }
                }
                Ok(files) if seen.as_ref() == Some(&files) || rejected.as_ref() == Some(&files) => {}
                Ok(files) => match Credentials::from_files(files.clone(), &namespace) {
                    Ok(credentials) => {
                        tracing::info!(
                            dir = %dir.display(),
                            serial = %credentials.serial,
                            expires_in_seconds = credentials.remaining().as_secs(),
                            "loaded TLS credentials"
                        );
                        seen = Some(files);
                        tx.send_replace(Some(Arc::new(credentials)));
                    }
                    Err(error) => {
                        // Possibly a half-swapped set: the next tick reads the whole new one.
                        rejected = Some(files);
                        tracing::warn!(dir = %dir.display(), %error, "TLS certificate files not usable; keeping the current credentials");
                    }
                },
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
    rx
}

/// Waits until `credentials` holds a value, or `shutdown`.
pub async fn first(credentials: &mut CredentialsWatch, shutdown: &CancellationToken) -> Option<Arc<Credentials>> {
    tokio::select! {
        loaded = credentials.wait_for(Option::is_some) => loaded.ok().and_then(|c| c.clone()),
        _ = shutdown.cancelled() => None,
    }
}

/// `distr_agent_tls_certificate_expiry_timestamp_seconds`: when the process's own certificate
/// expires (Unix time), read from the credentials in use at each scrape.
#[derive(Debug)]
pub struct CertificateExpiry(pub CredentialsWatch);

impl prometheus_client::collector::Collector for CertificateExpiry {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Some(expiry) = self.0.borrow().as_ref().map(|c| c.not_after_unix()) else {
            return Ok(());
        };
        let metric = prometheus_client::metrics::gauge::ConstGauge::new(i64::try_from(expiry).unwrap_or(i64::MAX));
        let unit = prometheus_client::registry::Unit::Other("timestamp_seconds".into());
        metric.encode(encoder.encode_descriptor(
            "tls_certificate_expiry",
            "When the process's own TLS certificate expires, as Unix time",
            Some(&unit),
            prometheus_client::metrics::MetricType::Gauge,
        )?)
    }
}
