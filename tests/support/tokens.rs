#![allow(dead_code)]
//! Token minting for tests: the LabOrchestrator claim shape, HS256 by default.
//!
//! Depends only on std, jsonwebtoken and serde_json, so it can be included by `#[path]` from
//! tests, examples and benches.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The HMAC secret the tests configure the proxy with (>= 32 bytes).
pub const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long!!";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
}

/// The LabOrchestrator claims:
/// `{"id":5,"exp":EXP,"lab_instance":{"lab_id":1,"lab_instance_id":9,"namespace_name":NS,
/// "allowed_vmi_names":[..],"additional_data":null}}`.
pub fn lab_claims(namespace: &str, vmis: &[&str], exp: u64) -> Value {
    json!({
        "id": 5,
        "exp": exp,
        "lab_instance": {
            "lab_id": 1,
            "lab_instance_id": 9,
            "namespace_name": namespace,
            "allowed_vmi_names": vmis,
            "additional_data": null,
        }
    })
}

/// HS256 token with the LabOrchestrator claims (see [`lab_claims`]); header
/// `{"typ":"JWT","alg":"HS256"}`.
pub fn mint(secret: &str, namespace: &str, vmis: &[&str], exp: u64) -> String {
    mint_claims(secret, &lab_claims(namespace, vmis, exp))
}

/// HS256 token with arbitrary claims.
pub fn mint_claims(secret: &str, claims: &Value) -> String {
    mint_with_header(secret.as_bytes(), Header::new(Algorithm::HS256), claims)
}

/// HMAC-signed token with a caller-built header (e.g. HS384/HS512, a `kid`, a different `typ`).
/// Panics if `header.alg` is not an HMAC algorithm.
pub fn mint_with_header(secret: &[u8], header: Header, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret).expect("tokens: empty HMAC secret");
    jsonwebtoken::encode(&header, claims, &key).expect("tokens: encode")
}

/// RS256 token signed with a PEM private key (PKCS#1 or PKCS#8), e.g.
/// `tests/fixtures/rsa_private.pem`.
pub fn mint_rs256(private_pem: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem).expect("tokens: RSA private key PEM");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("tokens: encode")
}

/// An `alg: none` token: `b64url({"alg":"none","typ":"JWT"}) . b64url(claims) .` (empty
/// signature). jsonwebtoken refuses to produce these, hence the hand-made encoding.
pub fn unsigned(claims: &Value) -> String {
    let header = br#"{"alg":"none","typ":"JWT"}"#;
    let body = serde_json::to_vec(claims).expect("tokens: claims to JSON");
    format!("{}.{}.", b64url(header), b64url(&body))
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1; // 1 byte -> 2 chars, 2 -> 3, 3 -> 4
        for i in 0..chars {
            out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}
