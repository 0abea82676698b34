//! Reloads credentials from a mounted Secret directory when its files change.
//!
//! The kubelet updates a Secret volume by swapping a `..data` symlink, so the three files can
//! be read half-way through a swap; such a set fails validation and is simply read again on
//! the next tick. A set that fails validation never replaces working credentials. A set
//! refused only because of the time (not yet valid on a node whose clock runs behind the
//! executor's, or expired) is checked again on every tick, since the same files become usable
//! once the clock passes `notBefore`; any other refusal is remembered until the files change.

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
        let mut refused_logged: Option<TlsFiles> = None;
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
                        // Logged once per set of files, however often a time-dependent
                        // refusal is checked again.
                        if refused_logged.as_ref() != Some(&files) {
                            tracing::warn!(dir = %dir.display(), %error, retried = error.depends_on_time(), "TLS certificate files not usable; keeping the current credentials");
                            refused_logged = Some(files.clone());
                        }
                        // Otherwise possibly a half-swapped set: the next tick reads the
                        // whole new one.
                        if !error.depends_on_time() {
                            rejected = Some(files);
                        }
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    /// A CA and a poller leaf of `namespace` whose validity starts `ahead` from now, as a
    /// node whose clock runs behind the issuer's sees a freshly issued leaf.
    fn files_valid_from(namespace: &str, ahead: Duration) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let now = SystemTime::now();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.not_before = (now - Duration::from_secs(60)).into();
        ca_params.not_after = (now + Duration::from_secs(3600)).into();
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).expect("issuer");
        let mut leaf_params =
            CertificateParams::new(vec![format!("poller.{namespace}.distr-agent.internal")]).expect("leaf params");
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        leaf_params.not_before = (now + ahead).into();
        leaf_params.not_after = (now + Duration::from_secs(3600)).into();
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
        TlsFiles {
            cert_chain: leaf.pem().into_bytes(),
            key: leaf_key.serialize_pem().into_bytes(),
            ca_bundle: ca.pem().into_bytes(),
        }
    }

    fn write(dir: &std::path::Path, files: &TlsFiles) {
        std::fs::write(dir.join(super::super::credentials::CERT_FILE), &files.cert_chain).expect("write tls.crt");
        std::fs::write(dir.join(super::super::credentials::KEY_FILE), &files.key).expect("write tls.key");
        std::fs::write(dir.join(super::super::credentials::CA_FILE), &files.ca_bundle).expect("write ca.crt");
    }

    #[tokio::test]
    async fn a_set_not_yet_valid_is_loaded_once_the_clock_reaches_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // X.509 times have whole seconds: two seconds ahead is at least one second ahead.
        let files = files_valid_from("ns1", Duration::from_secs(2));
        let refused = Credentials::from_files(files.clone(), "ns1").expect_err("not yet valid");
        assert!(refused.depends_on_time(), "{refused}");
        write(dir.path(), &files);

        let shutdown = CancellationToken::new();
        let mut credentials = watch_dir(
            dir.path().to_owned(),
            "ns1".into(),
            Duration::from_millis(100),
            shutdown.clone(),
        );
        let loaded = tokio::time::timeout(Duration::from_secs(10), first(&mut credentials, &shutdown))
            .await
            .expect("the same files are accepted once they are valid")
            .expect("credentials");
        assert_eq!(loaded.files.cert_chain, files.cert_chain);
        shutdown.cancel();
    }

    #[test]
    fn only_time_refusals_are_checked_again() {
        let mut files = files_valid_from("ns1", Duration::ZERO);
        // Another CA's bundle: no clock makes this set usable.
        files.ca_bundle = files_valid_from("ns1", Duration::ZERO).ca_bundle;
        let refused = Credentials::from_files(files, "ns1").expect_err("untrusted");
        assert!(!refused.depends_on_time(), "{refused}");
    }
}
