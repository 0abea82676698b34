//! The agent's private CA and the leaf certificates it issues. Pure: no cluster access.

use std::time::{Duration, SystemTime};

use agent_runtime::tls::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use x509_parser::prelude::FromDer as _;

/// Certificates are valid from a little before they are issued, for nodes whose clocks lag
/// behind the executor's: five minutes (as public CAs backdate), or a tenth of very short
/// lifetimes (so the renewal point stays after issuance).
const CLOCK_SKEW: Duration = Duration::from_secs(300);

fn skew(lifetime: Duration) -> Duration {
    CLOCK_SKEW.min(lifetime / 10)
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the certificate cannot be read: {0}")]
    Parse(String),
}

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Reads the validity of the first certificate in `pem`.
    pub fn of_pem(pem: &str) -> Result<Self, CertError> {
        let der = rustls_der(pem)?;
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(&der).map_err(|e| CertError::Parse(e.to_string()))?;
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        Ok(Self {
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }

    /// True from two thirds of the lifetime on (cert-manager's rule), or when expired.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or_default();
        now >= self.not_before + lifetime * 2 / 3
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

fn rustls_der(pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| CertError::Parse(e.to_string()))
}

/// A certificate and its key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub role: Role,
    pub namespace: String,
    /// DNS names the leaf serves under (Service names), besides its identity; empty for a
    /// client-only leaf.
    pub server_names: Vec<String>,
}

impl LeafSpec {
    /// The leaf of `role`: the executor and updater also serve, under their Service's names.
    pub fn for_role(role: Role, namespace: &str) -> Self {
        let server_names = match role {
            Role::Executor | Role::Updater => {
                let service = format!("distr-agent-{role}");
                vec![
                    service.clone(),
                    format!("{service}.{namespace}"),
                    format!("{service}.{namespace}.svc"),
                    format!("{service}.{namespace}.svc.cluster.local"),
                ]
            }
            Role::Poller | Role::Operator => Vec::new(),
        };
        Self {
            role,
            namespace: namespace.to_owned(),
            server_names,
        }
    }
}

/// A CA that can sign leaves.
pub struct Authority {
    pub cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub validity: Validity,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA for the agent of `namespace`.
    pub fn generate(namespace: &str, lifetime: Duration, now: SystemTime) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("distr-agent CA ({namespace})"));
        params.not_before = (now - skew(lifetime)).into();
        params.not_after = (now + lifetime).into();
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// The CA kept in a Secret.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            validity: Validity::of_pem(cert_pem)?,
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues the leaf of `spec`, valid for `lifetime` but never beyond the CA itself.
    pub fn issue(&self, spec: &LeafSpec, lifetime: Duration, now: SystemTime) -> Result<Issued, CertError> {
        let mut names = vec![spec.role.identity(&spec.namespace)];
        names.extend(spec.server_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("distr-agent {}", spec.role));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if spec.server_names.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - skew(lifetime)).into();
        params.not_after = (now + lifetime).min(self.validity.not_after).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Splits a PEM bundle into its certificates (PEM each), dropping what does not parse.
pub fn split_bundle(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END CERTIFICATE") {
            if Validity::of_pem(&current).is_ok() {
                out.push(current.clone());
            }
            current.clear();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use agent_runtime::tls::{Credentials, PeerIdentity, TlsFiles};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn files(leaf: &Issued, bundle: &str) -> TlsFiles {
        TlsFiles {
            cert_chain: leaf.cert_pem.clone().into_bytes(),
            key: leaf.key_pem.clone().into_bytes(),
            ca_bundle: bundle.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_leaf_carries_its_identity_and_is_trusted_by_its_ca_only() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = SystemTime::now();
        let ca = Authority::generate("ns1", 365 * DAY, now).expect("ca");
        let other = Authority::generate("ns1", 365 * DAY, now).expect("other ca");
        let leaf = ca
            .issue(&LeafSpec::for_role(Role::Poller, "ns1"), 7 * DAY, now)
            .expect("leaf");
        let credentials = Credentials::from_files(files(&leaf, &ca.cert_pem), "ns1").expect("valid");
        assert!(credentials.remaining() > 6 * DAY);
        let der = {
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("der")
        };
        assert_eq!(PeerIdentity::from_certificate(&der, "ns1").role, Some(Role::Poller));
        let error = Credentials::from_files(files(&leaf, &other.cert_pem), "ns1").expect_err("untrusted");
        assert!(error.to_string().contains("does not vouch"), "{error}");
        let both = format!("{}{}", other.cert_pem, ca.cert_pem);
        assert!(
            Credentials::from_files(files(&leaf, &both), "ns1").is_ok(),
            "a bundle trusts both"
        );
    }

    #[test]
    fn a_mismatched_key_or_an_expired_leaf_is_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = SystemTime::now();
        let ca = Authority::generate("ns1", 365 * DAY, now).expect("ca");
        let spec = LeafSpec::for_role(Role::Executor, "ns1");
        let a = ca.issue(&spec, DAY, now).expect("a");
        let b = ca.issue(&spec, DAY, now).expect("b");
        let mixed = Issued {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        let error = Credentials::from_files(files(&mixed, &ca.cert_pem), "ns1").expect_err("mixed");
        assert!(error.to_string().contains("does not belong"), "{error}");
        let old = ca.issue(&spec, DAY, now - 2 * DAY).expect("old");
        assert!(Credentials::from_files(files(&old, &ca.cert_pem), "ns1").is_err());
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime_and_leaves_end_with_their_ca() {
        let now = SystemTime::now();
        let ca = Authority::generate("ns1", 30 * DAY, now).expect("ca");
        let leaf = ca
            .issue(&LeafSpec::for_role(Role::Updater, "ns1"), 90 * DAY, now)
            .expect("leaf");
        let validity = Validity::of_pem(&leaf.cert_pem).expect("validity");
        assert!(validity.not_after <= ca.validity.not_after);
        let v = Validity {
            not_before: now,
            not_after: now + 3 * DAY,
        };
        assert!(!v.renewal_due(now + DAY));
        assert!(v.renewal_due(now + 2 * DAY));
        assert!(v.expired(now + 3 * DAY));
    }

    #[test]
    fn a_short_lived_leaf_is_not_due_for_renewal_when_issued() {
        let now = SystemTime::now();
        let ca = Authority::generate("ns1", DAY, now).expect("ca");
        let spec = LeafSpec::for_role(Role::Poller, "ns1");
        for lifetime in [Duration::from_secs(30), DAY] {
            let leaf = ca.issue(&spec, lifetime, now).expect("leaf");
            let validity = Validity::of_pem(&leaf.cert_pem).expect("validity");
            assert!(!validity.renewal_due(now + Duration::from_secs(1)), "{lifetime:?}");
            assert!(validity.renewal_due(now + lifetime), "{lifetime:?}");
        }
    }

    #[test]
    fn a_bundle_splits_into_its_certificates() {
        let now = SystemTime::now();
        let a = Authority::generate("ns1", DAY, now).expect("a");
        let b = Authority::generate("ns1", DAY, now).expect("b");
        let bundle = format!("{}{}garbage\n", a.cert_pem, b.cert_pem);
        assert_eq!(split_bundle(&bundle), vec![a.cert_pem.clone(), b.cert_pem.clone()]);
    }
}
