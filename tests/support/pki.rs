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
use rustls::pki_types::pem::PemObject;
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
        let provider = super::upstream::ring_provider();
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

/// The key type of a certificate from [`TestPki::issue_pem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Ed25519,
    /// RSA 2048: ring (rcgen's backend here) cannot generate RSA keys, so this is the
    /// hand-made key in `tests/fixtures/rsa_private.pem` (the one the RS256 token tests use).
    Rsa2048,
}

/// A certificate and its key as PEM files hold them.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate itself, to compare with what a TLS peer presented.
    pub der: CertificateDer<'static>,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
}

impl TestPki {
    /// A server certificate from this CA for `127.0.0.1` and `localhost`, with a `kind` key,
    /// valid until `not_after` (Unix seconds, whole days).
    pub fn issue_pem(&self, kind: KeyKind, not_after: i64) -> IssuedPem {
        self.issue_pem_for(
            kind,
            not_after,
            ExtendedKeyUsagePurpose::ServerAuth,
            &SERVER_NAMES,
            0,
        )
    }

    /// A client certificate from this CA (ECDSA P-256) with `name` as its common name, for
    /// mutual TLS.
    pub fn client_pem(&self, name: &str) -> IssuedPem {
        self.client_pem_padded(name, 0)
    }

    /// [`client_pem`](Self::client_pem) carrying `padding` bytes in a private, non-critical
    /// extension: a client's certificate flight as large as a long chain makes it.
    pub fn client_pem_padded(&self, name: &str, padding: usize) -> IssuedPem {
        let far = 4_102_444_800; // 2100-01-01
        self.issue_pem_for(
            KeyKind::EcdsaP256,
            far,
            ExtendedKeyUsagePurpose::ClientAuth,
            &[name],
            padding,
        )
    }

    fn issue_pem_for(
        &self,
        kind: KeyKind,
        not_after: i64,
        usage: ExtendedKeyUsagePurpose,
        names: &[&str],
        padding: usize,
    ) -> IssuedPem {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("test pki: names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_after =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after as u64);
        if padding > 0 {
            // An OCTET STRING of zeros under an OID of the private-enterprise arc.
            let mut content = vec![0x04, 0x83];
            content.extend_from_slice(&(padding as u32).to_be_bytes()[1..]);
            content.resize(content.len() + padding, 0);
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 55555, 1],
                    content,
                ));
        }
        let key = match kind {
            KeyKind::EcdsaP256 => KeyPair::generate(),
            KeyKind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyKind::Rsa2048 => {
                let pem = include_str!("../fixtures/rsa_private.pem");
                KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256)
            }
        }
        .expect("test pki: key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("test pki: sign certificate");
        IssuedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            not_after,
        }
    }

    /// A rustls client configuration trusting this CA, presenting `client` (from
    /// [`client_pem`](Self::client_pem), possibly another CA's) for mutual TLS.
    pub fn client_config_with_cert(&self, client: &IssuedPem) -> Arc<rustls::ClientConfig> {
        let provider = super::upstream::ring_provider();
        let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("client key");
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("test pki: protocol versions")
            .with_root_certificates(self.root_store())
            .with_client_auth_cert(vec![client.der.clone()], key)
            .expect("test pki: client certificate");
        Arc::new(config)
    }
}

/// A directory laid out like a Kubernetes Secret volume, as cert-manager's rotations reach a
/// pod: `tls.crt` and `tls.key` are symlinks through `..data`, which points at a versioned
/// directory; [`publish`](Self::publish) writes a new version and swaps `..data` atomically
/// (a rename over it), so the names never change and a reader never sees half a pair.
/// Removed on drop.
pub struct SecretMount {
    dir: std::path::PathBuf,
    version: usize,
}

impl SecretMount {
    /// A mount under the system temp dir holding `first`.
    pub fn new(first: &IssuedPem) -> SecretMount {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvp-secret-mount-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("secret mount dir");
        let mut m = SecretMount { dir, version: 0 };
        m.publish(first);
        std::os::unix::fs::symlink("..data/tls.crt", m.cert()).expect("tls.crt link");
        std::os::unix::fs::symlink("..data/tls.key", m.key()).expect("tls.key link");
        m
    }

    /// Writes `issued` as a new version and points `..data` at it atomically.
    pub fn publish(&mut self, issued: &IssuedPem) {
        self.version += 1;
        let name = format!("..2026_12_03_{:02}", self.version);
        let version = self.dir.join(&name);
        std::fs::create_dir(&version).expect("version dir");
        std::fs::write(version.join("tls.crt"), &issued.cert_pem).expect("write cert");
        std::fs::write(version.join("tls.key"), &issued.key_pem).expect("write key");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).expect("..data_tmp link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    /// `TLS_CERT_FILE`: `<mount>/tls.crt`.
    pub fn cert(&self) -> std::path::PathBuf {
        self.dir.join("tls.crt")
    }

    /// `TLS_KEY_FILE`: `<mount>/tls.key`.
    pub fn key(&self) -> std::path::PathBuf {
        self.dir.join("tls.key")
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The serial number of a DER X.509 certificate, as its content octets (big-endian, with any
/// leading zero DER keeps to make it positive), or `None` if `der` is not shaped like one.
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber
/// INTEGER, ... }, ... }: only these three headers are read.
pub fn serial_of(der: &[u8]) -> Option<Vec<u8>> {
    /// One DER element at the start of `b`: (tag, contents, rest).
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = element(der)? else {
        return None;
    };
    let (0x30, tbs, _) = element(cert)? else {
        return None;
    };
    let (mut tag, mut value, rest) = element(tbs)?;
    if tag == 0xa0 {
        (tag, value, _) = element(rest)?;
    }
    (tag == 0x02).then(|| value.to_vec())
}
