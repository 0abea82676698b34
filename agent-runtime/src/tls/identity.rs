//! Identities of the agent's components, carried as DNS subject alternative names.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// The domain under which identities are named; never resolved, only compared.
pub const IDENTITY_DOMAIN: &str = "distr-agent.internal";

/// Who a certificate speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The Hub-facing process; the only caller of `Sync` and `ApplyAgentManifest`.
    Poller,
    /// The process holding the cluster RBAC; serves `distr.agent.v1.Executor`.
    Executor,
    /// The self-update process; serves `distr.agent.v1.Updater`.
    Updater,
    /// A person debugging the agent with `grpcurl`: read-only calls and `Rollback`.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Poller, Role::Executor, Role::Updater, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Poller => "poller",
            Role::Executor => "executor",
            Role::Updater => "updater",
            Role::Operator => "operator",
        }
    }

    /// The identity name of this role in `namespace`.
    pub fn identity(self, namespace: &str) -> String {
        format!("{}.{namespace}.{IDENTITY_DOMAIN}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a server knows of the client of a connection, taken from its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The role, when the certificate names one of this namespace's identities.
    pub role: Option<Role>,
    /// What the certificate presents, for logs: its identity names, else its subject.
    pub presented: String,
    /// Serial number in hex, to tell certificates apart in logs.
    pub serial: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (serial {})", self.presented, self.serial)
    }
}

impl PeerIdentity {
    /// Reads the identity of `leaf` (DER) for `namespace`. A certificate that cannot be parsed
    /// yields no role; it has been verified by then, so this does not happen in practice.
    pub fn from_certificate(leaf: &[u8], namespace: &str) -> Self {
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(leaf) else {
            return Self {
                role: None,
                presented: "an unparsable certificate".to_owned(),
                serial: String::new(),
            };
        };
        let names = dns_names(&cert);
        let role = Role::ALL
            .into_iter()
            .find(|role| names.iter().any(|name| *name == role.identity(namespace)));
        let ours: Vec<&String> = names.iter().filter(|n| n.ends_with(IDENTITY_DOMAIN)).collect();
        let presented = if ours.is_empty() {
            format!("subject {:?}", cert.subject().to_string())
        } else {
            ours.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
        };
        Self {
            role,
            presented,
            serial: cert.raw_serial_as_string().replace(':', ""),
        }
    }
}

fn dns_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> Vec<u8> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn the_role_comes_from_the_identity_name_of_the_namespace() {
        let cert = cert_with(&["poller.ns1.distr-agent.internal"]);
        let peer = PeerIdentity::from_certificate(&cert, "ns1");
        assert_eq!(peer.role, Some(Role::Poller));
        assert_eq!(peer.presented, "poller.ns1.distr-agent.internal");
        assert!(!peer.serial.is_empty());
    }

    #[test]
    fn another_namespace_or_a_plain_name_is_no_role() {
        let other = PeerIdentity::from_certificate(&cert_with(&["poller.ns2.distr-agent.internal"]), "ns1");
        assert_eq!(other.role, None);
        assert_eq!(other.presented, "poller.ns2.distr-agent.internal");
        let plain = PeerIdentity::from_certificate(&cert_with(&["example.com"]), "ns1");
        assert_eq!(plain.role, None);
        assert!(plain.presented.starts_with("subject"), "{}", plain.presented);
    }
}
