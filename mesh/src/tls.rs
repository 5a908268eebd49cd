//! Mesh mutual TLS: TLS 1.3 only, ALPN `h2`, no SNI, certificates chained to
//! the mesh root(s) and identified by their SPIFFE URI SAN (webpki's name
//! checks know DNS names and IPs only, so identity is checked here).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::{self, SpiffeId, WorkloadCert};

/// HBONE speaks HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mesh root certificate is unusable: {0}")]
    Root(String),
    #[error("workload certificate is unusable: {0}")]
    Cert(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The mesh's suites: TLS 1.3 AES-256-GCM and AES-128-GCM only, as Istio.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

/// The mesh's trust anchors.
#[derive(Clone, Debug)]
pub struct Roots(Arc<RootCertStore>);

impl Roots {
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        let mut reader = std::io::BufReader::new(pem.as_bytes());
        for cert in rustls_pemfile::certs(&mut reader) {
            let cert = cert.map_err(|e| TlsError::Root(e.to_string()))?;
            store.add(cert).map_err(|e| TlsError::Root(e.to_string()))?;
        }
        if store.is_empty() {
            return Err(TlsError::Root("no certificate in it".into()));
        }
        Ok(Self(Arc::new(store)))
    }
}

/// The chain and key of a workload certificate, as rustls wants them.
fn cert_and_key(cert: &WorkloadCert) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    // The root is not sent: peers have it.
    let leaf_and_intermediates = &cert.chain[..cert.chain.len().saturating_sub(1).max(1)];
    let chain = leaf_and_intermediates
        .iter()
        .map(|pem| {
            identity::pem_to_der(pem)
                .map(CertificateDer::from)
                .ok_or_else(|| TlsError::Cert("chain is not PEM".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::try_from(cert.key.serialize_der()).map_err(|e| TlsError::Cert(e.to_string()))?;
    Ok((chain, key))
}

/// Inbound (15008): present `cert`, require a client certificate of the same
/// trust domain chained to `roots`.
pub fn server_config(cert: &WorkloadCert, roots: &Roots) -> Result<Arc<ServerConfig>, TlsError> {
    let webpki = WebPkiClientVerifier::builder_with_provider(roots.0.clone(), provider())
        .build()
        .map_err(|e| TlsError::Root(e.to_string()))?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner: webpki,
        trust_domain: cert.id.trust_domain.to_string(),
    });
    let (chain, key) = cert_and_key(cert)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Outbound: present `cert`, accept only a server that is one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &Roots,
    expected: Vec<SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots.clone(),
        expected,
        algs: p.signature_verification_algorithms,
    });
    let (chain, key) = cert_and_key(cert)?;
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// Client configs kept at most; past it the cache starts over (configs of
/// pods gone and of renewed certificates go with it).
const MAX_CLIENT_CONFIGS: usize = 1024;

/// TLS configs built once per certificate serial, not per connection:
/// building one parses the private key and the chain (tens of
/// microseconds of a new connection's setup). A renewed certificate has a
/// new serial and replaces its identity's entries; client configs are also
/// keyed by the peers they accept.
pub struct Configs {
    roots: Roots,
    server: Mutex<HashMap<SpiffeId, (String, Arc<ServerConfig>)>>,
    client: Mutex<HashMap<ClientKey, (String, Arc<ClientConfig>)>>,
}

/// Our identity and the peers a client config accepts.
type ClientKey = (SpiffeId, Vec<SpiffeId>);

impl Configs {
    pub fn new(roots: Roots) -> Self {
        Self {
            roots,
            server: Mutex::default(),
            client: Mutex::default(),
        }
    }

    /// [`server_config`] for `cert`, built once per serial.
    pub fn server(&self, cert: &WorkloadCert) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cache = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((serial, cfg)) = cache.get(&cert.id) {
            if *serial == cert.serial {
                return Ok(cfg.clone());
            }
        }
        let cfg = server_config(cert, &self.roots)?;
        cache.insert(cert.id.clone(), (cert.serial.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// [`client_config`] for `cert` accepting `expected`, built once per
    /// serial.
    pub fn client(&self, cert: &WorkloadCert, expected: &[SpiffeId]) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (cert.id.clone(), expected.to_vec());
        let mut cache = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((serial, cfg)) = cache.get(&key) {
            if *serial == cert.serial {
                return Ok(cfg.clone());
            }
        }
        let cfg = client_config(cert, &self.roots, expected.to_vec())?;
        if cache.len() >= MAX_CLIENT_CONFIGS {
            cache.clear();
        }
        cache.insert(key, (cert.serial.clone(), cfg.clone()));
        Ok(cfg)
    }
}

/// The SPIFFE ID of a verified peer certificate.
pub fn peer_identity(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let uris = identity::uri_sans(&cert);
    match uris.as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    }
}

#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match peer_identity(end_entity) {
            Some(id) if *id.trust_domain == *self.trust_domain => Ok(verified),
            Some(id) => Err(rustls::Error::General(format!(
                "client {id} is not in trust domain {}",
                self.trust_domain
            ))),
            None => Err(rustls::Error::General(
                "client certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Roots,
    expected: Vec<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        ee.verify_for_usage(
            self.algs.all,
            &self.roots.0.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        match peer_identity(end_entity) {
            Some(id) if self.expected.contains(&id) => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server is {id}, expected one of [{}]",
                self.expected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            None => Err(rustls::Error::General(
                "server certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed in the mesh".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
