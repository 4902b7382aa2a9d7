#![allow(dead_code)]
//! LabOrchestrator's own Python code, called from the tests: tokens minted by
//! `generate_auth_token` of PyPI's `lab-orchestrator-lib-auth` (0.0.5, what production runs,
//! and 2.2.0, the latest), decoded by its `decode_auth_token`, and the Python proxy this project
//! replaces. `tests/python/setup.sh` (run by `tests/e2e/setup.sh`, the README's test command)
//! installs them into virtualenvs under `target/python/`.
//!
//! A test that needs them and finds them missing fails with the command that installs them,
//! unless `PYTHON_SKIP=1` is set, which skips it with a notice.
//!
//! Depends only on std and serde_json, so it can be included by `#[path]` anywhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// One version of `lab-orchestrator-lib-auth`, each in a virtualenv of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibAuth {
    /// 0.0.5: HS256 only, no `additional_data`, `expires_in` seconds (default 600).
    V0_0_5,
    /// 2.2.0: `algorithm`, `expires_at`, `additional_data`.
    V2_2_0,
}

impl LibAuth {
    pub const ALL: [LibAuth; 2] = [LibAuth::V0_0_5, LibAuth::V2_2_0];

    pub fn version(self) -> &'static str {
        match self {
            LibAuth::V0_0_5 => "0.0.5",
            LibAuth::V2_2_0 => "2.2.0",
        }
    }

    fn venv(self) -> &'static str {
        match self {
            LibAuth::V0_0_5 => "auth-0.0.5",
            LibAuth::V2_2_0 => "auth-2.2.0",
        }
    }
}

/// The directory holding the virtualenvs.
pub fn venvs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python")
}

/// The interpreter of virtualenv `name` (`auth-0.0.5`, `auth-2.2.0`, `ws-proxy`), or `None`
/// when `PYTHON_SKIP=1` asks to skip the tests that need it. Panics with the set-up command
/// when it is missing.
pub fn python(name: &str) -> Option<PathBuf> {
    if std::env::var("PYTHON_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (PYTHON_SKIP=1): this test needs LabOrchestrator's Python code");
        return None;
    }
    let p = venvs().join(name).join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/python/setup.sh` (the README's test command runs it \
         through tests/e2e/setup.sh), or set PYTHON_SKIP=1 to skip the tests that need \
         LabOrchestrator's Python code",
        p.display()
    );
    Some(p)
}

/// Whether the tests that need the Python code run (`false` only with `PYTHON_SKIP=1`;
/// panics when the code is missing).
pub fn available() -> bool {
    LibAuth::ALL.iter().all(|v| python(v.venv()).is_some())
}

fn labo_py(lib: LibAuth, verb: &str, spec: &Value) -> String {
    let python = python(lib.venv()).expect("PYTHON_SKIP=1: check labo::available() first");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/labo.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(verb)
        .arg(spec.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "lab-orchestrator-lib-auth {} {verb} failed: {}",
        lib.version(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("labo.py prints UTF-8")
        .trim()
        .to_owned()
}

/// What `generate_auth_token` is called with. `Default` is the usual lab: user 5, lab 1,
/// instance 9, namespace `lab-ns`, HS256 (the library's default), no `expires_*` (the
/// library's default lifetime).
#[derive(Debug, Clone)]
pub struct Mint {
    pub user_id: Value,
    pub lab_id: Value,
    pub lab_instance_id: Value,
    pub namespace: String,
    pub vmis: Vec<String>,
    /// The HMAC secret, or for an asymmetric algorithm the PEM private key.
    pub key: String,
    /// `expires_in` seconds (both versions).
    pub expires_in: Option<f64>,
    /// `expires_at`, seconds since the epoch (2.x only).
    pub expires_at: Option<f64>,
    /// `algorithm` (2.x only).
    pub algorithm: Option<&'static str>,
    /// `additional_data` (2.x only).
    pub additional_data: Option<Value>,
}

impl Mint {
    /// HS256 with `secret`, for `vmis` in namespace `lab-ns`.
    pub fn new(secret: &str, vmis: &[&str]) -> Mint {
        Mint {
            user_id: json!(5),
            lab_id: json!(1),
            lab_instance_id: json!(9),
            namespace: "lab-ns".into(),
            vmis: vmis.iter().map(|v| v.to_string()).collect(),
            key: secret.into(),
            expires_in: None,
            expires_at: None,
            algorithm: None,
            additional_data: None,
        }
    }

    pub fn expires_in(mut self, seconds: f64) -> Mint {
        self.expires_in = Some(seconds);
        self
    }

    pub fn expires_at(mut self, unix_seconds: f64) -> Mint {
        self.expires_at = Some(unix_seconds);
        self
    }

    /// `user_id`, `lab_id`, `lab_instance_id` (numbers or strings).
    pub fn ids(mut self, user_id: Value, lab_id: Value, lab_instance_id: Value) -> Mint {
        self.user_id = user_id;
        self.lab_id = lab_id;
        self.lab_instance_id = lab_instance_id;
        self
    }

    /// Sign with `algorithm` (2.x only) and `key` (an HMAC secret, or a PEM private key for
    /// the asymmetric algorithms, e.g. from [`key_pair`]).
    pub fn signed(mut self, algorithm: &'static str, key: &str) -> Mint {
        self.algorithm = Some(algorithm);
        self.key = key.into();
        self
    }

    /// `additional_data` (2.x only): any JSON.
    pub fn additional_data(mut self, data: Value) -> Mint {
        self.additional_data = Some(data);
        self
    }

    /// Call the library's `generate_auth_token`; the token it returns.
    pub fn with(&self, lib: LibAuth) -> String {
        let mut spec = json!({
            "user_id": self.user_id,
            "lab_id": self.lab_id,
            "lab_instance_id": self.lab_instance_id,
            "namespace_name": self.namespace,
            "allowed_vmi_names": self.vmis,
            "secret_key": self.key,
        });
        if let Some(s) = self.expires_in {
            spec["expires_in"] = json!(s);
        }
        let v2_only = [
            ("expires_at", self.expires_at.map(|s| json!(s))),
            ("algorithm", self.algorithm.map(|a| json!(a))),
            ("additional_data", self.additional_data.clone()),
        ];
        for (name, value) in v2_only {
            if let Some(v) = value {
                assert_eq!(
                    lib,
                    LibAuth::V2_2_0,
                    "{name} needs lab-orchestrator-lib-auth 2.x"
                );
                spec[name] = v;
            }
        }
        labo_py(lib, "mint", &spec)
    }
}

/// The library's `decode_auth_token(token, key[, algorithms])`: `Ok(data)` (the
/// `LabInstanceTokenParams` as JSON) or `Err(what it said)`.
pub fn decode(
    lib: LibAuth,
    token: &str,
    key: &str,
    algorithms: Option<&[&str]>,
) -> Result<Value, String> {
    let mut spec = json!({"token": token, "secret_key": key});
    if let Some(a) = algorithms {
        assert_eq!(
            lib,
            LibAuth::V2_2_0,
            "algorithms needs lab-orchestrator-lib-auth 2.x"
        );
        spec["algorithms"] = json!(a);
    }
    let answer: Value =
        serde_json::from_str(&labo_py(lib, "decode", &spec)).expect("labo.py decode prints JSON");
    if answer["ok"] == json!(true) {
        Ok(answer["data"].clone())
    } else {
        Err(answer["error"].as_str().unwrap_or("?").to_owned())
    }
}

/// The kinds of key pair PyJWT signs with (through `cryptography`) and the proxy verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048 (RS256, PS256).
    Rsa,
    /// ECDSA on P-256 (ES256).
    P256,
    /// ECDSA on P-384 (ES384).
    P384,
    /// Ed25519 (EdDSA).
    Ed25519,
}

impl KeyKind {
    /// The `cryptography` call that makes a private key of this kind.
    fn generate(self) -> &'static str {
        match self {
            KeyKind::Rsa => "rsa.generate_private_key(public_exponent=65537, key_size=2048)",
            KeyKind::P256 => "ec.generate_private_key(ec.SECP256R1())",
            KeyKind::P384 => "ec.generate_private_key(ec.SECP384R1())",
            KeyKind::Ed25519 => "ed25519.Ed25519PrivateKey.generate()",
        }
    }
}

/// A key pair fresh from `cryptography` in the 2.2.0 virtualenv (the package PyJWT signs
/// every asymmetric algorithm with): (PKCS#8 private key PEM, SubjectPublicKeyInfo public key
/// PEM), the forms an operator exports for LabOrchestrator and for the proxy.
pub fn key_pair(kind: KeyKind) -> (String, String) {
    let script = format!(
        "\
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
k = {}
print(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()).decode(), end='')
print(k.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode(), end='')
",
        kind.generate()
    );
    let python =
        python(LibAuth::V2_2_0.venv()).expect("PYTHON_SKIP=1: check labo::available() first");
    let out = Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "{kind:?} key generation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pems = String::from_utf8(out.stdout).expect("PEM is ASCII");
    let split = pems
        .find("-----BEGIN PUBLIC KEY-----")
        .expect("a public key PEM after the private key");
    (pems[..split].to_owned(), pems[split..].to_owned())
}
