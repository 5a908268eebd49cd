//! The mesh certificate authority and its client, speaking Istio's
//! certificate API (`istio.v1.auth.IstioCertificateService/CreateCertificate`)
//! over mutual TLS.
//!
//! Nodes never hold a CA key. A node agent authenticates with its node
//! credential (a client certificate naming `spiffe://<td>/mesh-node/<node>`)
//! or, on Kubernetes, with a bearer token (its projected service-account
//! token, validated by the [`Authorizer`] through TokenReview), and may only
//! obtain certificates, by impersonation, for service accounts of pods on
//! its node; the [`Authorizer`] decides.
use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig},
    Request, Response, Status,
};

use crate::identity::{self, IdentityError, SpiffeId, WorkloadCert};

/// Generated from proto/istio/ca.proto.
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

use pb::{
    istio_certificate_service_client::IstioCertificateServiceClient,
    istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
    IstioCertificateRequest, IstioCertificateResponse,
};

/// Istio's metadata key for the identity a node agent asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The name the CA's serving certificate carries; clients verify it.
pub const CA_SERVER_NAME: &str = "mesh-ca";
/// Istio's CA port.
pub const CA_PORT: u16 = 15012;
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {path}: {source}", path = path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already holds a CA; remove it to start over, or serve from it", path = path.display())]
    Exists { path: PathBuf },
    #[error("cannot create or use certificates: {0}")]
    Cert(String),
    #[error("cannot reach the CA at {addr}: {message}; check --ca-address, that the CA runs, and the node credential")]
    Connect { addr: String, message: String },
    #[error("the CA refused the certificate for {id}: {message}")]
    Refused { id: String, message: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn cert_err(e: impl std::fmt::Display) -> CaError {
    CaError::Cert(e.to_string())
}

/// The files of a local CA directory (`agent ca init`).
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }
    fn root_key(&self) -> PathBuf {
        self.dir.join("root-key.pem")
    }
    fn server_cert(&self) -> PathBuf {
        self.dir.join("ca-server-cert.pem")
    }
    fn server_key(&self) -> PathBuf {
        self.dir.join("ca-server-key.pem")
    }
    fn trust_domain_file(&self) -> PathBuf {
        self.dir.join("trust-domain")
    }
    /// The node credential of `node`: (certificate, key).
    pub fn node_credential(&self, node: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join("nodes").join(node);
        (d.join("cert.pem"), d.join("key.pem"))
    }

    /// Creates a root, the CA's serving certificate and one credential per
    /// node. Keys are written 0600; the root key stays in this directory.
    pub fn init(&self, trust_domain: &str, nodes: &[String]) -> Result<(), CaError> {
        if self.root_key().exists() {
            return Err(CaError::Exists { path: self.dir.clone() });
        }
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = DistinguishedName::new();
        root.distinguished_name.push(DnType::OrganizationName, trust_domain);
        root.distinguished_name.push(DnType::CommonName, "mesh root CA");
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (root.not_before, root.not_after) = validity(Duration::from_secs(10 * 365 * 24 * 3600));
        let root_cert = root.self_signed(&root_key).map_err(cert_err)?;
        let root_key_pem = root_key.serialize_pem();
        let issuer = Issuer::new(root, root_key);

        let server = leaf(
            vec![SanType::DnsName(CA_SERVER_NAME.try_into().map_err(cert_err)?)],
            Duration::from_secs(365 * 24 * 3600),
        );
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let server_cert = server.signed_by(&server_key, &issuer).map_err(cert_err)?;

        write(&self.root_cert(), &root_cert.pem(), 0o644)?;
        write(&self.root_key(), &root_key_pem, 0o600)?;
        write(
            &self.server_cert(),
            &format!("{}{}", server_cert.pem(), root_cert.pem()),
            0o644,
        )?;
        write(&self.server_key(), &server_key.serialize_pem(), 0o600)?;
        write(&self.trust_domain_file(), trust_domain, 0o644)?;
        for node in nodes {
            let san = identity::uri_san(&node_uri(trust_domain, node)).map_err(cert_err)?;
            let params = leaf(vec![san], Duration::from_secs(365 * 24 * 3600));
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
            let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
            let (c, k) = self.node_credential(node);
            write(&c, &cert.pem(), 0o644)?;
            write(&k, &key.serialize_pem(), 0o600)?;
        }
        Ok(())
    }
}

/// `spiffe://<td>/mesh-node/<node>`: how a node credential names its node.
pub fn node_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/mesh-node/{node}")
}

fn validity(life: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    // Backdate a little for clocks that disagree.
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::minutes(5), now + life)
}

/// Parameters of an end-entity certificate with an empty subject (so the
/// SAN extension is critical, as SPIFFE requires).
fn leaf(sans: Vec<SanType>, life: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    (p.not_before, p.not_after) = validity(life);
    p
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        what: "cannot write",
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
    // The umask may have narrowed the mode; keys must be exactly 0600.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io)
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        what: "cannot read",
        path: path.to_owned(),
        source,
    })
}

/// Signs workload certificates with the root of a CA directory.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    pub trust_domain: String,
    pub max_lifetime: Duration,
}

impl Signer {
    pub fn load(files: &CaFiles, max_lifetime: Duration) -> Result<Self, CaError> {
        let root_pem = read(&files.root_cert())?;
        let key = KeyPair::from_pem(&read(&files.root_key())?).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(cert_err)?;
        let trust_domain = read(&files.trust_domain_file())?.trim().to_string();
        Ok(Self {
            issuer,
            root_pem,
            trust_domain,
            max_lifetime,
        })
    }

    /// A certificate for `id` on the CSR's public key. Whatever else the CSR
    /// asks for is ignored: the CA decides subject, SAN and lifetime.
    pub fn sign(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<Vec<String>, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| format!("bad CSR: {e}"))?;
        let san = identity::uri_san(&id.to_string()).map_err(|e| e.to_string())?;
        let params = leaf(vec![san], lifetime.min(self.max_lifetime));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| e.to_string())?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }
}

/// Who may have which identity: the CA's link to the cluster's state.
#[tonic::async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// The node of the agent presenting `token` (e.g. by TokenReview); Err
    /// says why not. By default tokens are not accepted.
    async fn node_of_token(&self, _token: &str) -> Result<String, String> {
        Err("this CA accepts node certificates only".into())
    }

    /// Ok when a pod with identity `id` is scheduled on `node`; else the reason.
    async fn may_impersonate(&self, node: &str, id: &SpiffeId) -> Result<(), String>;
}

/// The gRPC service.
pub struct CaService<A> {
    signer: Signer,
    authz: A,
    default_lifetime: Duration,
}

#[tonic::async_trait]
impl<A: Authorizer> IstioCertificateService for CaService<A> {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = match bearer(&req) {
            Some(token) => self.authz.node_of_token(&token).await.map_err(|e| {
                tracing::warn!(reason = %e, "token refused");
                Status::unauthenticated(format!("bearer token refused: {e}"))
            })?,
            None => self.node_of(&req)?,
        };
        let body = req.into_inner();
        let Requested { id, lifetime } = requested(&body, &self.signer.trust_domain, self.default_lifetime)?;
        if let Err(reason) = self.authz.may_impersonate(&node, &id).await {
            tracing::warn!(node = %node, id = %id, reason = %reason, "certificate refused");
            return Err(Status::permission_denied(format!(
                "node {node} may not have {id}: {reason}"
            )));
        }
        let chain = self
            .signer
            .sign(&body.csr, &id, lifetime)
            .map_err(Status::invalid_argument)?;
        tracing::info!(node = %node, id = %id, lifetime_s = lifetime.min(self.signer.max_lifetime).as_secs(), "certificate issued");
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}

impl<A> CaService<A> {
    /// The node named by the client certificate (verified by TLS against our root).
    fn node_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let prefix = node_uri(&self.signer.trust_domain, "");
        identity::uri_sans(&cert)
            .iter()
            .find_map(|u| u.strip_prefix(&prefix).map(str::to_string))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Status::unauthenticated("the client certificate is not a node credential of this mesh"))
    }
}

/// `authorization: Bearer <token>` (how Istio's agents send their token).
fn bearer<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// What a certificate request asks for, once its form is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub id: SpiffeId,
    /// As asked for (`default` when not given); the signer caps it.
    pub lifetime: Duration,
}

/// Reads a request body before anyone is asked whether the caller may
/// have the identity: the identity it names (in `trust_domain`) and the
/// lifetime it wants. The CSR itself is read by [`Signer::sign`].
pub fn requested(body: &IstioCertificateRequest, trust_domain: &str, default: Duration) -> Result<Requested, Status> {
    let id = impersonated(body)?;
    if *id.trust_domain != *trust_domain {
        return Err(Status::permission_denied(format!(
            "{id} is not in this CA's trust domain {trust_domain}"
        )));
    }
    let lifetime = match body.validity_duration {
        s if s > 0 => Duration::from_secs(s as u64),
        _ => default,
    };
    Ok(Requested { id, lifetime })
}

fn impersonated(body: &IstioCertificateRequest) -> Result<SpiffeId, Status> {
    let value = body
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .ok_or_else(|| {
            Status::invalid_argument("node agents must name the workload in metadata.ImpersonatedIdentity")
        })?;
    value
        .parse()
        .map_err(|e: IdentityError| Status::invalid_argument(e.to_string()))
}

/// Serves the CA on `addr` until `shutdown` resolves.
pub async fn serve<A: Authorizer>(
    files: &CaFiles,
    addr: SocketAddr,
    authz: A,
    max_lifetime: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CaError> {
    let signer = Signer::load(files, max_lifetime)?;
    let identity = Identity::from_pem(read(&files.server_cert())?, read(&files.server_key())?);
    // Client certificates are optional: agents on Kubernetes send a token.
    let tls = ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(&files.root_cert())?))
        .client_auth_optional(true);
    let svc = CaService {
        signer,
        authz,
        default_lifetime: DEFAULT_CERT_LIFETIME.min(max_lifetime),
    };
    tracing::info!(addr = %addr, "CA serving");
    Server::builder()
        .tls_config(tls)
        .map_err(cert_err)?
        .add_service(IstioCertificateServiceServer::new(svc))
        .serve_with_shutdown(addr, shutdown)
        .await
        .map_err(|e| CaError::Connect {
            addr: addr.to_string(),
            message: format!("serving failed: {e}"),
        })
}

/// A node agent's connection to the CA.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    inner: IstioCertificateServiceClient<Channel>,
    token: Option<PathBuf>,
}

/// Where a node agent finds the CA and its own credential.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaClientConfig {
    /// `https://host:port`.
    pub address: String,
    pub root_cert: PathBuf,
    pub auth: CaAuth,
}

/// How a node agent proves which node it serves.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CaAuth {
    /// A node credential from `agent ca init`.
    NodeCert { cert: PathBuf, key: PathBuf },
    /// A (projected, rotating) service-account token, re-read per request.
    Token(PathBuf),
}

impl CaClient {
    /// Prepares a lazily connecting client (the CA may start after the agent).
    pub fn new(cfg: &CaClientConfig) -> Result<Self, CaError> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&cfg.root_cert)?))
            .domain_name(CA_SERVER_NAME);
        let mut token = None;
        match &cfg.auth {
            CaAuth::NodeCert { cert, key } => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
            CaAuth::Token(path) => {
                read(path)?; // fail at start when it is missing
                token = Some(path.clone());
            }
        }
        let connect = |e: &dyn std::fmt::Display| CaError::Connect {
            addr: cfg.address.clone(),
            message: e.to_string(),
        };
        let channel = Channel::from_shared(cfg.address.clone())
            .map_err(|e| connect(&e))?
            .tls_config(tls)
            .map_err(|e| connect(&e))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            addr: cfg.address.clone(),
            inner: IstioCertificateServiceClient::new(channel),
            token,
        })
    }

    /// Generates a key, asks the CA for a certificate for `id`, checks it.
    pub async fn fetch(&self, id: &SpiffeId, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let (key, csr) = identity::new_csr(id)?;
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        );
        let req = IstioCertificateRequest {
            csr,
            validity_duration: lifetime.as_secs() as i64,
            metadata: Some(prost_types::Struct { fields }),
        };
        let mut req = Request::new(req);
        if let Some(path) = &self.token {
            let token = read(path)?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| CaError::Refused {
                    id: id.to_string(),
                    message: format!("the token in {} is not a valid header value", path.display()),
                })?;
            req.metadata_mut().insert("authorization", value);
        }
        let resp = self
            .inner
            .clone()
            .create_certificate(req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated => {
                    CaError::Refused {
                        id: id.to_string(),
                        message: s.message().to_string(),
                    }
                }
                _ => CaError::Connect {
                    addr: self.addr.clone(),
                    message: format!("{}: {}{}", s.code(), s.message(), crate::causes(&s)),
                },
            })?;
        Ok(WorkloadCert::new(id.clone(), resp.into_inner().cert_chain, key)?)
    }
}

/// Seconds until `t` (zero when past).
pub fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-ca-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_writes_keys_0600_and_refuses_to_overwrite() {
        let d = tmp("init");
        let files = CaFiles::new(&d);
        files.init("cluster.local", &["node1".into()]).unwrap();
        for key in [files.root_key(), files.server_key(), files.node_credential("node1").1] {
            assert_eq!(
                fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                key.display()
            );
        }
        let e = files.init("cluster.local", &[]).unwrap_err().to_string();
        assert!(e.contains("already holds a CA"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn signer_names_the_identity_and_caps_the_lifetime() {
        let d = tmp("sign");
        let files = CaFiles::new(&d);
        files.init("td.example", &[]).unwrap();
        let signer = Signer::load(&files, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("td.example", "default", "web");
        let (key, csr) = identity::new_csr(&id).unwrap();
        let chain = signer.sign(&csr, &id, Duration::from_secs(100 * 3600)).unwrap();
        let cert = WorkloadCert::new(id.clone(), chain, key).unwrap();
        let life = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(life <= Duration::from_secs(3600 + 300), "{life:?}");
        // Renewal is due half-way to expiry from now, not from the back-dated start.
        let due = cert.refresh_at().duration_since(SystemTime::now()).unwrap();
        assert!(
            due > Duration::from_secs(1790) && due <= Duration::from_secs(1800),
            "{due:?}"
        );
        // A chain for another key is rejected by the client-side check.
        let (other_key, _) = identity::new_csr(&id).unwrap();
        let chain = signer.sign(&csr, &id, Duration::from_secs(60)).unwrap();
        let e = WorkloadCert::new(id, chain, other_key).unwrap_err().to_string();
        assert!(e.contains("does not carry the key"), "{e}");
        assert!(signer
            .sign(
                "garbage",
                &SpiffeId::new("td.example", "a", "b"),
                Duration::from_secs(1)
            )
            .unwrap_err()
            .contains("bad CSR"));
        fs::remove_dir_all(&d).unwrap();
    }
}
