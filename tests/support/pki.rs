#![allow(dead_code)]
//! A throw-away PKI for TLS tests, generated at run time with rcgen (ECDSA P-256, ring).
//!
//! [`TestPki::new`] makes a CA and a server certificate signed by it for `127.0.0.1` and
//! `localhost`. Use [`TestPki::server_tls`] for the stand-in upstream
//! (`StandInOptions { tls: Some(pki.server_tls()), .. }`) and give [`TestPki::ca_pem`] (or the
//! file from [`TestPki::write_ca`]) to the client that must trust it. For the failure cases:
//! another `TestPki::new()` is a CA the client does not trust, and
//! [`TestPki::server_tls_for_name`] is a certificate from the trusted CA for another name only.
//!
//! Include it beside the stand-in, as a sibling module named `upstream`:
//!
//! ```ignore
//! #[path = "../support/upstream.rs"]
//! pub mod upstream;
//! #[path = "../support/pki.rs"]
//! pub mod pki;
//! ```

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use super::upstream::ServerTls;

/// The names [`TestPki::server_tls`] is valid for.
pub const SERVER_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// A CA plus a server certificate it signed for `127.0.0.1` and `localhost`.
pub struct TestPki {
    /// The CA certificate, PEM: what a client trusts.
    pub ca_pem: String,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// A server chain (the leaf) and key for `127.0.0.1` and `localhost`, signed by the CA.
    pub server: ServerTls,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// A fresh CA (a new key every time, so two are independent) and a server certificate.
    pub fn new() -> TestPki {
        // A distinct subject per CA: a client given another TestPki's CA then fails with
        // UnknownIssuer, as with a real wrong CA. (Two CAs with the same subject would make
        // the verifier try the wrong one and report BadSignature instead.)
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "kubevirt-vnc-proxy test CA {}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, unique);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("test pki: generate CA key");
        let cert = params.self_signed(&key).expect("test pki: self-sign CA");
        let issuer = Issuer::new(params, key);
        TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            server: issue(&issuer, &SERVER_NAMES),
            issuer,
        }
    }

    /// The server chain and key for `127.0.0.1` and `localhost`.
    pub fn server_tls(&self) -> ServerTls {
        self.server.clone()
    }

    /// A server certificate from this CA valid for `name` only (e.g. `not-the-host.example`),
    /// for name-mismatch tests.
    pub fn server_tls_for_name(&self, name: &str) -> ServerTls {
        self.server_tls_for(&[name])
    }

    /// A server certificate from this CA for `names` (DNS names or IP addresses).
    pub fn server_tls_for(&self, names: &[&str]) -> ServerTls {
        issue(&self.issuer, names)
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    /// A rustls root store holding only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("test pki: add CA to root store");
        roots
    }

    /// A rustls client configuration (ring provider) that trusts this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("test pki: protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A leaf certificate for `names`, signed by `issuer`, with a fresh key.
fn issue(issuer: &Issuer<'static, KeyPair>, names: &[&str]) -> ServerTls {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("test pki: server names");
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("test pki: generate server key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("test pki: sign server certificate");
    ServerTls {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}
