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

/// One verification key and the key id (`kid`) it answers to.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies tokens with the keys and algorithms from the configuration.
pub struct JwtVerifier {
    /// The accepted algorithms, each with its validation rules.
    algorithms: Vec<(Algorithm, Validation)>,
    /// Every configured key; a key is only ever used with algorithms of its
    /// own family (`DecodingKey::family`).
    keys: Vec<Key>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<_> = self.algorithms.iter().map(|(a, _)| a).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algs)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// The smallest HMAC secret accepted without `ALLOW_WEAK_SECRET` (RFC 7518
/// §3.2: a key of at least the hash size, 256 bits for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

/// A key as configured: raw bytes (an HMAC secret or a PEM public key) and
/// the key id it answers to (`None`: any token without a `kid`, or whose
/// `kid` matches no key).
#[derive(Clone)]
pub struct KeyMaterial {
    /// The key id, for rotation (`kid` in the token header).
    pub kid: Option<String>,
    /// The secret (HMAC) or the PEM text (public keys).
    pub bytes: Vec<u8>,
    /// Where it came from, for error messages: a variable or a file.
    pub source: String,
}

/// The settings a [`JwtVerifier`] is built from.
#[derive(Clone, Default)]
pub struct JwtSettings {
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// HMAC secrets (for HS256/384/512), tried in order.
    pub secrets: Vec<KeyMaterial>,
    /// PEM public keys (for RS*, PS*, ES*, EdDSA), tried in order.
    pub public_keys: Vec<KeyMaterial>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Accepted audiences; when not empty, `aud` is required.
    pub audience: Vec<String>,
    /// Accepted issuers; when not empty, `iss` is required.
    pub issuer: Vec<String>,
    /// Accept HMAC secrets shorter than [`MIN_SECRET_BYTES`].
    pub allow_weak_secret: bool,
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        let sources =
            |keys: &[KeyMaterial]| keys.iter().map(|k| k.source.clone()).collect::<Vec<_>>();
        f.debug_struct("JwtSettings")
            .field("algorithms", &self.algorithms)
            .field("secrets", &sources(&self.secrets))
            .field("public_keys", &sources(&self.public_keys))
            .field("leeway_secs", &self.leeway_secs)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl JwtVerifier {
    /// Build the verifier, or say which setting is wrong. The error names the
    /// environment variable an operator would fix.
    pub fn new(s: &JwtSettings) -> Result<Self, (&'static str, String)> {
        if s.algorithms.is_empty() {
            return Err(("JWT_ALGORITHMS", "no algorithm configured".into()));
        }
        let wants_hmac = s.algorithms.iter().any(|a| is_hmac(*a));
        let wants_public: Vec<Algorithm> = s
            .algorithms
            .iter()
            .copied()
            .filter(|a| !is_hmac(*a))
            .collect();
        if wants_hmac && s.secrets.is_empty() {
            return Err((
                "SECRET_KEY",
                "not set, but JWT_ALGORITHMS accepts an HMAC algorithm".into(),
            ));
        }
        if !wants_public.is_empty() && s.public_keys.is_empty() {
            return Err((
                "JWT_PUBLIC_KEY_FILE",
                format!("not set, but JWT_ALGORITHMS accepts {wants_public:?}"),
            ));
        }
        let mut keys = Vec::new();
        if wants_hmac {
            for m in &s.secrets {
                if m.bytes.len() < MIN_SECRET_BYTES && !s.allow_weak_secret {
                    return Err((
                        "SECRET_KEY",
                        format!(
                            "the secret from {} is {} bytes; at least {MIN_SECRET_BYTES} are needed \
                             (set ALLOW_WEAK_SECRET=true to accept it anyway)",
                            m.source,
                            m.bytes.len()
                        ),
                    ));
                }
                let key = DecodingKey::from_secret(&m.bytes).map_err(|e| {
                    (
                        "SECRET_KEY",
                        format!("unusable secret from {}: {e}", m.source),
                    )
                })?;
                keys.push(Key {
                    kid: m.kid.clone(),
                    key,
                });
            }
        }
        for m in s.public_keys.iter().filter(|_| !wants_public.is_empty()) {
            // A PEM file holds one kind of key; use it for whichever
            // configured family it parses as.
            let mut parsed = None;
            for alg in &wants_public {
                let key = match alg {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&m.bytes),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&m.bytes),
                    _ => DecodingKey::from_rsa_pem(&m.bytes),
                };
                if let Ok(k) = key {
                    parsed = Some(k);
                    break;
                }
            }
            let Some(key) = parsed else {
                return Err((
                    "JWT_PUBLIC_KEY_FILE",
                    format!(
                        "{} is not a PEM public key usable for {wants_public:?}",
                        m.source
                    ),
                ));
            };
            keys.push(Key {
                kid: m.kid.clone(),
                key,
            });
        }
        let algorithms = s
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = s.leeway_secs;
                v.validate_exp = true;
                v.validate_nbf = true;
                let mut required = vec!["exp"];
                if !s.audience.is_empty() {
                    v.set_audience(&s.audience);
                    required.push("aud");
                } else {
                    // No audience configured: a token that names one is not
                    // meant for us only if we say who we are, which we don't.
                    v.validate_aud = false;
                }
                if !s.issuer.is_empty() {
                    v.set_issuer(&s.issuer);
                    required.push("iss");
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        Ok(JwtVerifier { algorithms, keys })
    }

    /// Verify `token` and decide whether it allows `vmi`.
    ///
    /// Order matters: the token is checked first (401) so that nobody without
    /// a valid token learns anything about names (403).
    pub fn authorize(&self, token: &str, vmi: &str) -> Result<Grant, AuthError> {
        let claims = self.verify(token)?;
        self.grant(claims, vmi)
    }

    /// Check the signature and the registered claims; the claims.
    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        // The usual set-up, one algorithm and one key for it, needs no look
        // at the header first: `decode` refuses any other algorithm itself,
        // and with one key a kid has nothing to choose.
        if let [(alg, validation)] = self.algorithms.as_slice() {
            let mut family = self.keys.iter().filter(|k| k.key.family() == alg.family());
            if let (Some(key), None) = (family.next(), family.next()) {
                return jsonwebtoken::decode::<Claims>(token, &key.key, validation)
                    .map(|data| data.claims)
                    .map_err(map_error);
            }
        }
        let header = jsonwebtoken::decode_header(token).map_err(map_error)?;
        let Some((alg, validation)) = self.algorithms.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::WrongAlgorithm);
        };
        let family = alg.family();
        let same_family = self.keys.iter().filter(|k| k.key.family() == family);
        // A kid that names a key selects that key alone; without a kid (or
        // with one no key answers to) every key of the family is tried in
        // order, which is how rotation works for tokens without kids.
        let named: Vec<&Key> = same_family
            .clone()
            .filter(|k| header.kid.is_some() && k.kid == header.kid)
            .collect();
        let ordered: Vec<&Key> = if named.is_empty() {
            same_family.collect()
        } else {
            named
        };
        if ordered.is_empty() {
            return Err(AuthError::WrongAlgorithm);
        }
        let mut result = Err(AuthError::BadSignature);
        for key in ordered {
            match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
                Ok(data) => {
                    result = Ok(data.claims);
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => {
                    result = Err(map_error(e));
                    break;
                }
            }
        }
        result
    }

    /// What verified claims allow for `vmi`.
    fn grant(&self, claims: Claims, vmi: &str) -> Result<Grant, AuthError> {
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

    /// A token's `id` claim without verifying anything, for log lines about
    /// refused tokens ("-" when there is none or it cannot be read).
    pub fn unverified_id(token: &str) -> String {
        #[derive(Deserialize)]
        struct IdOnly {
            #[serde(default)]
            id: Option<serde_json::Value>,
        }
        let Some(payload) = token.split('.').nth(1) else {
            return "-".into();
        };
        use base64::Engine;
        let Ok(bytes) =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
        else {
            return "-".into();
        };
        match serde_json::from_slice::<IdOnly>(&bytes)
            .ok()
            .and_then(|c| c.id)
        {
            Some(serde_json::Value::String(s)) => {
                s.chars().take(64).filter(|c| !c.is_control()).collect()
            }
            Some(v @ serde_json::Value::Number(_)) => v.to_string(),
            _ => "-".into(),
        }
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
            secrets: vec![KeyMaterial {
                kid: None,
                bytes: SECRET.to_vec(),
                source: "SECRET_KEY".into(),
            }],
            ..Default::default()
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
