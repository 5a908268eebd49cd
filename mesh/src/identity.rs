//! Mesh identities: SPIFFE IDs per service account, workload keys (made here,
//! never written anywhere) and the certificates the CA issues for them.
use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadSpiffeId(String),
    #[error("cannot generate a key or CSR: {0}")]
    Key(String),
    #[error("certificate from the CA is unusable: {0}")]
    BadCertificate(String),
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. Its
/// parts are shared strings: the agent holds one identity per service
/// account of the cluster, and [`Self::shared`] makes one from the strings
/// its records already hold (48 bytes, where three owned strings took 72
/// plus three allocations).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Without a copy of the strings.
    pub fn shared(trust_domain: &Arc<str>, namespace: &Arc<str>, service_account: &Arc<str>) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            namespace: namespace.clone(),
            service_account: service_account.clone(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// A fresh ECDSA P-256 key and a CSR for `id`. The key stays in memory.
pub fn new_csr(id: &SpiffeId) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(&id.to_string()).map_err(|e| IdentityError::Key(e.to_string()))?];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let pem = csr.pem().map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok((key, pem))
}

pub(crate) fn uri_san(uri: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(rcgen::string::Ia5String::try_from(uri)?))
}

/// A workload's certificate: chain from the CA plus the key made here.
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first, then intermediates, then the root (PEM).
    pub chain: Vec<String>,
    pub key: KeyPair,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// When it arrived: renewal is timed from here, not from the (back-dated)
    /// notBefore.
    pub received: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Checks what the CA returned: the leaf names exactly `id` and carries our key.
    pub fn new(id: SpiffeId, chain: Vec<String>, key: KeyPair) -> Result<Self, IdentityError> {
        let bad = |m: String| IdentityError::BadCertificate(m);
        let leaf = chain.first().ok_or_else(|| bad("empty certificate chain".into()))?;
        let der = pem_to_der(leaf).ok_or_else(|| bad("leaf is not PEM".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
        let uris = uri_sans(&cert);
        if uris != [id.to_string()] {
            return Err(bad(format!("leaf names {uris:?}, expected {id}")));
        }
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(bad("leaf does not carry the key we generated".into()));
        }
        let validity = cert.validity();
        let ts = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            id,
            not_before: ts(validity.not_before),
            not_after: ts(validity.not_after),
            serial: cert.raw_serial_as_string(),
            received: SystemTime::now(),
            chain,
            key,
        })
    }

    /// When to renew: half-way from receipt to expiry. (The CA back-dates
    /// notBefore for clock skew; counting from there would renew early.)
    pub fn refresh_at(&self) -> SystemTime {
        let left = self.not_after.duration_since(self.received).unwrap_or_default();
        self.received + left / 2
    }
}

/// URI SANs of a certificate.
pub fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let mut reader = std::io::BufReader::new(pem.as_bytes());
    let der = rustls_pemfile::certs(&mut reader).next()?.ok().map(|c| c.to_vec());
    der
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_shapes() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "http://x/ns/a/sa/b",
            "spiffe://td/ns/a",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            let e = bad.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(
                e.contains("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"),
                "{e}"
            );
        }
    }

    #[test]
    fn csr_carries_the_uri_san_and_a_p256_key() {
        let id = SpiffeId::new("td", "ns1", "sa1");
        let (key, pem) = new_csr(&id).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(csr.params.subject_alt_names, vec![uri_san(&id.to_string()).unwrap()]);
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    }
}
