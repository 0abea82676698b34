//! The CA Secret and the decisions about it: create, keep, prepare a successor, promote it.

use std::{collections::BTreeMap, time::SystemTime};

use chrono::{DateTime, Utc};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::ObjectMeta;

use super::{
    PkiConfig,
    authority::{Authority, CertError, Validity, split_bundle},
    managed_labels,
};

pub const CA_SECRET: &str = "distr-agent-ca";
const NEXT_SINCE: &str = "agent.distr.sh/next-ca-since";

/// What the CA Secret holds: the signing CA, maybe its successor, and the trust bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaSecret {
    /// Certificate and key (PEM) of the CA that signs leaves.
    pub signing: Option<(String, String)>,
    /// The successor, trusted already, signing from `next_since + ca_propagation` on.
    pub next: Option<(String, String)>,
    pub next_since: Option<SystemTime>,
    /// Every CA certificate to trust (PEM each).
    pub bundle: Vec<String>,
}

/// What to do with the CA Secret.
#[derive(Debug)]
pub enum CaPlan {
    Keep(CaSecret),
    Write { ca: CaSecret, reason: &'static str },
}

impl CaSecret {
    pub fn from_secret(secret: &Secret) -> Self {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok());
        let pair = |cert: &str, key: &str| Some((text(cert)?, text(key)?));
        let next_since = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NEXT_SINCE))
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(SystemTime::from);
        Self {
            signing: pair("tls.crt", "tls.key"),
            next: pair("next.crt", "next.key"),
            next_since,
            bundle: text("ca.crt").map(|b| split_bundle(&b)).unwrap_or_default(),
        }
    }

    pub fn to_secret(&self, namespace: &str) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
        };
        if let Some((cert, key)) = &self.signing {
            put("tls.crt", cert);
            put("tls.key", key);
        }
        if let Some((cert, key)) = &self.next {
            put("next.crt", cert);
            put("next.key", key);
        }
        put("ca.crt", &self.bundle_pem());
        let annotations = self
            .next_since
            .map(|t| BTreeMap::from([(NEXT_SINCE.to_owned(), DateTime::<Utc>::from(t).to_rfc3339())]));
        Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(managed_labels()),
                annotations,
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data),
            ..Default::default()
        }
    }

    pub fn bundle_pem(&self) -> String {
        self.bundle.concat()
    }
}

fn fresh(namespace: &str, config: &PkiConfig, now: SystemTime) -> Result<CaSecret, CertError> {
    let ca = Authority::generate(namespace, config.ca_lifetime, now)?;
    Ok(CaSecret {
        signing: Some((ca.cert_pem.clone(), ca.key_pem().to_owned())),
        next: None,
        next_since: None,
        bundle: vec![ca.cert_pem],
    })
}

fn usable(pair: &Option<(String, String)>, now: SystemTime) -> Option<Authority> {
    let (cert, key) = pair.as_ref()?;
    Authority::from_pem(cert, key)
        .ok()
        .filter(|ca| !ca.validity.expired(now))
}

/// Decides what the CA Secret must hold at `now`.
pub fn plan_ca(
    current: Option<&CaSecret>,
    namespace: &str,
    config: &PkiConfig,
    now: SystemTime,
) -> Result<CaPlan, CertError> {
    let Some(current) = current else {
        return Ok(CaPlan::Write {
            ca: fresh(namespace, config, now)?,
            reason: "created the CA",
        });
    };
    let Some(signing) = usable(&current.signing, now) else {
        return Ok(CaPlan::Write {
            ca: fresh(namespace, config, now)?,
            reason: "the CA Secret held no usable CA; replaced it with a new one",
        });
    };
    let mut next = current.clone();
    let mut reason = None;
    match (usable(&current.next, now), current.next_since) {
        (Some(successor), Some(since)) if now >= since + config.ca_propagation => {
            next.signing = Some((successor.cert_pem.clone(), successor.key_pem().to_owned()));
            next.next = None;
            next.next_since = None;
            reason = Some("the new CA, trusted everywhere by now, signs from now on");
        }
        (Some(_), Some(_)) => {}
        _ if signing.validity.renewal_due(now) => {
            let successor = Authority::generate(namespace, config.ca_lifetime, now)?;
            next.next = Some((successor.cert_pem.clone(), successor.key_pem().to_owned()));
            next.next_since = Some(now);
            reason = Some("the CA is past two thirds of its lifetime; published its successor in the trust bundle");
        }
        _ => {
            next.next = None;
            next.next_since = None;
        }
    }
    // The bundle: the signing CA, the successor, and older CAs until they expire.
    let mut bundle: Vec<String> = Vec::new();
    let wanted = next
        .signing
        .iter()
        .chain(next.next.iter())
        .map(|(cert, _)| cert.clone())
        .chain(current.bundle.iter().cloned());
    for cert in wanted {
        let alive = Validity::of_pem(&cert).is_ok_and(|v| !v.expired(now));
        if alive && !bundle.contains(&cert) {
            bundle.push(cert);
        }
    }
    next.bundle = bundle;
    if next == *current {
        return Ok(CaPlan::Keep(next));
    }
    Ok(CaPlan::Write {
        ca: next,
        reason: reason.unwrap_or("brought the trust bundle up to date"),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn config() -> PkiConfig {
        PkiConfig {
            ca_lifetime: 30 * DAY,
            leaf_lifetime: DAY,
            operator_lifetime: DAY / 24,
            ca_propagation: Duration::from_secs(600),
            check_interval: Duration::from_secs(30),
        }
    }

    fn written(plan: CaPlan) -> CaSecret {
        match plan {
            CaPlan::Write { ca, .. } => ca,
            CaPlan::Keep(_) => panic!("expected a write"),
        }
    }

    #[test]
    fn a_ca_is_created_once_and_then_kept() {
        let now = SystemTime::now();
        let ca = written(plan_ca(None, "ns", &config(), now).expect("plan"));
        assert_eq!(ca.bundle.len(), 1);
        let stored = CaSecret::from_secret(&ca.to_secret("ns"));
        assert_eq!(stored, ca, "the Secret round-trips");
        assert!(matches!(
            plan_ca(Some(&stored), "ns", &config(), now + DAY).expect("plan"),
            CaPlan::Keep(_)
        ));
    }

    #[test]
    fn a_successor_is_trusted_before_it_signs_and_the_old_ca_stays_trusted() {
        let start = SystemTime::now();
        let first = written(plan_ca(None, "ns", &config(), start).expect("plan"));
        let old_cert = first.signing.clone().expect("signing").0;

        let later = start + 21 * DAY;
        let prepared = written(plan_ca(Some(&first), "ns", &config(), later).expect("plan"));
        assert_eq!(prepared.signing, first.signing, "the old CA still signs");
        let next_cert = prepared.next.clone().expect("a successor").0;
        assert_eq!(prepared.bundle, vec![old_cert.clone(), next_cert.clone()]);

        let too_early = plan_ca(Some(&prepared), "ns", &config(), later + Duration::from_secs(60)).expect("plan");
        assert!(matches!(too_early, CaPlan::Keep(_)), "{too_early:?}");

        let promoted =
            written(plan_ca(Some(&prepared), "ns", &config(), later + Duration::from_secs(601)).expect("plan"));
        assert_eq!(promoted.signing.clone().expect("signing").0, next_cert);
        assert!(promoted.next.is_none());
        assert_eq!(promoted.bundle, vec![next_cert.clone(), old_cert]);

        let after_expiry = written(plan_ca(Some(&promoted), "ns", &config(), start + 31 * DAY).expect("plan"));
        assert_eq!(after_expiry.bundle, vec![next_cert], "the expired CA left the bundle");
    }

    #[test]
    fn a_broken_ca_secret_is_replaced() {
        let now = SystemTime::now();
        let broken = CaSecret {
            signing: Some(("not a cert".into(), "not a key".into())),
            ..Default::default()
        };
        let CaPlan::Write { ca, reason } = plan_ca(Some(&broken), "ns", &config(), now).expect("plan") else {
            panic!("expected a write");
        };
        assert!(reason.contains("no usable CA"), "{reason}");
        assert!(ca.signing.is_some());
    }
}
