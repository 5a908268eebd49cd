//! The CA's handling of a certificate request (`mesh::ca`): the gRPC body
//! as protobuf (`IstioCertificateRequest`, as tonic decodes it), the
//! identity and lifetime it asks for (`requested`), and the CSR it carries
//! (`Signer::sign`, rcgen/x509-parser); the input is also tried as a CSR
//! on its own. A certificate issued names exactly the identity asked for,
//! on the CSR's key, within the CA's lifetime cap; whatever else the CSR
//! asks for is ignored.
//!
//! Not covered: gRPC framing and TLS (tonic, rustls) and the authorizer
//! (node credential or TokenReview; it needs a cluster).
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh::{
    ca::{pb::IstioCertificateRequest, requested, CaFiles, Requested, Signer},
    identity::{self, SpiffeId},
};
use prost::Message;

const TRUST_DOMAIN: &str = "cluster.local";
const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// A CA made once per process (in a temporary directory, removed again).
fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = CaFiles::new(&dir);
        files.init(TRUST_DOMAIN, &[]).expect("a CA directory");
        let signer = Signer::load(&files, MAX_LIFETIME).expect("the CA loads");
        std::fs::remove_dir_all(&dir).expect("cleaned up");
        signer
    })
}

fuzz_target!(|data: &[u8]| {
    let signer = signer();
    if let Ok(body) = IstioCertificateRequest::decode(data) {
        if let Ok(Requested { id, lifetime }) = requested(&body, TRUST_DOMAIN, MAX_LIFETIME) {
            assert_eq!(&*id.trust_domain, TRUST_DOMAIN);
            assert_eq!(id.to_string().parse::<SpiffeId>().ok().as_ref(), Some(&id));
            issue(signer, &body.csr, &id, lifetime);
        }
    }
    if let Ok(pem) = std::str::from_utf8(data) {
        issue(
            signer,
            pem,
            &SpiffeId::new(TRUST_DOMAIN, "default", "web"),
            MAX_LIFETIME,
        );
    }
});

fn issue(signer: &Signer, csr: &str, id: &SpiffeId, lifetime: Duration) {
    let Ok(chain) = signer.sign(csr, id, lifetime) else {
        return;
    };
    let der = identity::pem_to_der(&chain[0]).expect("the leaf is PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("the leaf parses");
    assert_eq!(
        identity::uri_sans(&cert),
        vec![id.to_string()],
        "exactly the identity asked for"
    );
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    // Back-dated by five minutes for clock skew.
    assert!(life <= (MAX_LIFETIME.as_secs() + 300) as i64, "lifetime {life}s");
    let asked = rcgen::CertificateSigningRequestParams::from_pem(csr).expect("it was signed");
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&asked.public_key).as_slice(),
        "the certificate carries the CSR's key"
    );
}
