//! Token verification and the decision which VMI a session may reach.
//!
//! Tokens are LabOrchestrator's JWTs. The accepted algorithms come from the
//! configuration, never from the token: the token's `alg` only selects among
//! them, and each algorithm family has its own key (the HMAC secret is never
//! offered to an RSA verifier and the RSA key never to HMAC), so `alg: none`
//! and HS/RS confusion cannot happen by construction (RFC 8725 §3.1).

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::route::{is_dns1123_label, is_dns1123_subdomain};

/// What a verified token allows one session to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The namespace of the VMI (a valid DNS-1123 label).
    pub namespace: String,
    /// The VMI name (a valid DNS-1123 subdomain, listed in the token).
    pub vmi: String,
    /// The token's `id` claim, rendered for logs (never the token itself).
    pub token_id: String,
    /// The token's `exp`, seconds since the epoch.
    pub expires_at: u64,
}

/// Why a request was not authorized. Each variant maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// 401: the token is not a well-formed JWT or its claims have the wrong shape.
    Malformed(String),
    /// 401: the signature does not verify.
    BadSignature,
    /// 401: the token's algorithm is not one the proxy accepts.
    WrongAlgorithm,
    /// 401: `exp` has passed (beyond the leeway).
    Expired,
    /// 401: `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// 403: the token is valid but does not allow this VMI, or a name is invalid.
    Forbidden(String),
}

impl AuthError {
    /// The HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 403,
            _ => 401,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Malformed(why) => write!(f, "malformed token: {why}"),
            AuthError::BadSignature => f.write_str("invalid token signature"),
            AuthError::WrongAlgorithm => f.write_str("token algorithm not accepted"),
            AuthError::Expired => f.write_str("token expired"),
            AuthError::NotYetValid => f.write_str("token not yet valid"),
            AuthError::Forbidden(why) => f.write_str(why),
        }
    }
}

/// The claims of a LabOrchestrator token. Unknown claims are ignored;
/// `id` may be a number or a string; `additional_data` may be anything.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    id: Option<serde_json::Value>,
    exp: u64,
    lab_instance: LabInstance,
}

#[derive(Deserialize)]
struct LabInstance {
    namespace_name: String,
    allowed_vmi_names: Vec<String>,
}

/// Verifies tokens with the keys and algorithms from the configuration.
pub struct JwtVerifier {
    /// One entry per accepted algorithm, with the key of its family.
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _, _)| a).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algs)
            .finish()
    }
}

/// The settings a [`JwtVerifier`] is built from.
#[derive(Clone, Default)]
pub struct JwtSettings {
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// The HMAC secret (for HS256/384/512).
    pub secret: Option<Vec<u8>>,
    /// A PEM public key (for RS*, PS*, ES*, EdDSA).
    pub public_key_pem: Option<Vec<u8>>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("JwtSettings")
            .field("algorithms", &self.algorithms)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl JwtVerifier {
    /// Build the verifier, or say which setting is wrong. The error names the
    /// environment variable an operator would fix.
    pub fn new(s: &JwtSettings) -> Result<Self, (&'static str, String)> {
        if s.algorithms.is_empty() {
            return Err(("JWT_ALGORITHMS", "no algorithm configured".into()));
        }
        let mut keys = Vec::new();
        for &alg in &s.algorithms {
            let key = match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let Some(secret) = &s.secret else {
                        return Err(("SECRET_KEY", format!("required for {alg:?} but not set")));
                    };
                    DecodingKey::from_secret(secret)
                        .map_err(|e| ("SECRET_KEY", format!("unusable secret: {e}")))?
                }
                _ => {
                    let Some(pem) = &s.public_key_pem else {
                        return Err((
                            "JWT_PUBLIC_KEY_FILE",
                            format!("required for {alg:?} but not set"),
                        ));
                    };
                    let key = match alg {
                        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                        _ => DecodingKey::from_rsa_pem(pem),
                    };
                    key.map_err(|e| {
                        (
                            "JWT_PUBLIC_KEY_FILE",
                            format!("not a PEM public key usable for {alg:?}: {e}"),
                        )
                    })?
                }
            };
            let mut v = Validation::new(alg);
            v.leeway = s.leeway_secs;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp"]);
            keys.push((alg, key, v));
        }
        Ok(JwtVerifier { keys })
    }

    /// Verify `token` and decide whether it allows `vmi`.
    ///
    /// Order matters: the token is checked first (401) so that nobody without
    /// a valid token learns anything about names (403).
    pub fn authorize(&self, token: &str, vmi: &str) -> Result<Grant, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(map_error)?;
        let Some((_, key, validation)) = self.keys.iter().find(|(a, _, _)| *a == header.alg) else {
            return Err(AuthError::WrongAlgorithm);
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(map_error)?;
        let claims = data.claims;
        let namespace = claims.lab_instance.namespace_name;
        if !is_dns1123_subdomain(vmi) {
            return Err(AuthError::Forbidden("invalid VMI name".into()));
        }
        if !claims
            .lab_instance
            .allowed_vmi_names
            .iter()
            .any(|v| v == vmi)
        {
            return Err(AuthError::Forbidden("VMI not allowed by token".into()));
        }
        if !is_dns1123_label(&namespace) {
            return Err(AuthError::Forbidden("invalid namespace in token".into()));
        }
        Ok(Grant {
            namespace,
            vmi: vmi.to_owned(),
            token_id: match claims.id {
                Some(serde_json::Value::String(s)) => s,
                Some(v) => v.to_string(),
                None => "-".into(),
            },
            expires_at: claims.exp,
        })
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Malformed(format!("missing claim {c}")),
        ErrorKind::InvalidClaimFormat(c) => AuthError::Malformed(format!("bad claim {c}")),
        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => {
            AuthError::Malformed("audience, issuer or subject not accepted".into())
        }
        ErrorKind::Json(_) => AuthError::Malformed("claims do not match the token format".into()),
        _ => AuthError::Malformed("not a valid JWT".into()),
    }
}

/// Parse `JWT_ALGORITHMS` names.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name.trim() {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// A short, non-reversible fingerprint of a token for log lines: the first
/// 8 hex digits of its FNV-1a hash. Enough to correlate two log lines about
/// the same token, useless for replaying it.
pub fn fingerprint(token: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in token.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&JwtSettings {
            algorithms: vec![Algorithm::HS256],
            secret: Some(SECRET.to_vec()),
            public_key_pem: None,
            leeway_secs: 0,
        })
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn mint(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    fn lab(ns: &str, vmis: &[&str], exp: u64) -> serde_json::Value {
        json!({"id": 5, "exp": exp, "lab_instance": {"lab_id": 1, "lab_instance_id": "9",
               "namespace_name": ns, "allowed_vmi_names": vmis, "additional_data": {"x": [1]}}})
    }

    #[test]
    fn grants_listed_vmi() {
        let t = mint(lab("lab-ns", &["ubuntu"], now() + 60));
        let g = verifier().authorize(&t, "ubuntu").unwrap();
        assert_eq!(g.namespace, "lab-ns");
        assert_eq!(g.token_id, "5");
    }

    #[test]
    fn refusals() {
        let v = verifier();
        let t = mint(lab("lab-ns", &["ubuntu", "Bad_Name"], now() + 60));
        assert!(matches!(
            v.authorize(&t, "other"),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            v.authorize(&t, "Bad_Name"),
            Err(AuthError::Forbidden(_))
        ));
        let t = mint(lab("Bad.NS", &["ubuntu"], now() + 60));
        assert!(matches!(
            v.authorize(&t, "ubuntu"),
            Err(AuthError::Forbidden(_))
        ));
        let t = mint(lab("ns", &["ubuntu"], now() - 10));
        assert_eq!(v.authorize(&t, "ubuntu"), Err(AuthError::Expired));
        let mut c = lab("ns", &["ubuntu"], now() + 60);
        c["nbf"] = json!(now() + 3600);
        assert_eq!(v.authorize(&mint(c), "ubuntu"), Err(AuthError::NotYetValid));
        let c = json!({"lab_instance": {"namespace_name": "ns", "allowed_vmi_names": ["ubuntu"]}});
        assert!(matches!(
            v.authorize(&mint(c), "ubuntu"),
            Err(AuthError::Malformed(_))
        ));
        let c = json!({"exp": now() + 60});
        assert!(matches!(
            v.authorize(&mint(c), "ubuntu"),
            Err(AuthError::Malformed(_))
        ));
        // Flip one character in the middle of the signature (the last one
        // may only carry padding bits).
        let t = mint(lab("ns", &["ubuntu"], now() + 60));
        let at = t.len() - 10;
        let flipped = if &t[at..at + 1] == "A" { "B" } else { "A" };
        let t = format!("{}{flipped}{}", &t[..at], &t[at + 1..]);
        assert_eq!(v.authorize(&t, "ubuntu"), Err(AuthError::BadSignature));
        assert!(matches!(
            v.authorize("garbage", "ubuntu"),
            Err(AuthError::Malformed(_))
        ));
        // A token signed for another algorithm is refused before any key is used.
        let t = encode(
            &Header::new(Algorithm::HS512),
            &lab("ns", &["ubuntu"], now() + 60),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(v.authorize(&t, "ubuntu"), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint("abc"), fingerprint("abc"));
        assert_ne!(fingerprint("abc"), fingerprint("abd"));
        assert_eq!(fingerprint("abc").len(), 8);
    }
}
