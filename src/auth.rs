//! Token verification and the decision which VMI a session may reach.
//!
//! Tokens are LabOrchestrator's JWTs. The accepted algorithms come from the
//! configuration, never from the token: the token's `alg` only selects among
//! them, and each algorithm family has its own key (the HMAC secret is never
//! offered to an RSA verifier and the RSA key never to HMAC), so `alg: none`
//! and HS/RS confusion cannot happen by construction (RFC 8725 §3.1).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::http::Status;
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
    /// When the token expires (its `exp`, with the fraction LabOrchestrator's
    /// issuer writes), before any leeway.
    pub expires_at: SystemTime,
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
    pub fn status(&self) -> Status {
        match self {
            AuthError::Forbidden(_) => Status::Forbidden,
            _ => Status::Unauthorized,
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
///
/// `exp` and `nbf` are read here, not by jsonwebtoken: its check takes whole
/// seconds, while LabOrchestrator's issuer writes `time.time() + expires_in`,
/// a JSON number with a fraction. See
/// [`TimeRules::check`].
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    iat: Option<Value>,
    /// Read only to refuse it when no audience is configured: jsonwebtoken
    /// takes `"aud": null` for no audience, PyJWT for one.
    #[serde(default, deserialize_with = "present")]
    aud: Option<Value>,
    lab_instance: LabInstance,
}

/// A claim as it stands: `None` when absent, `Some(Value::Null)` for an
/// explicit null, which PyJWT, under LabOrchestrator, refuses where it reads
/// the claim (serde's `Option` would take it for absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
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

/// The latest time claim accepted: 9999-12-31T23:59:59Z. Beyond it a value is
/// a mistake (milliseconds for seconds, say), not a lifetime.
const LATEST_TIME_CLAIM: f64 = 253_402_300_799.0;

/// The checks on `exp` (required) and `nbf` (when present), at sub-second
/// precision: a token is expired once `exp + leeway <= now` and not yet valid
/// while `nbf - leeway > now`. (PyJWT 2.1.0, which LabOrchestrator's
/// packages pin, truncates `exp` to whole seconds first, so it refuses a
/// token up to a second sooner: nothing it refuses is accepted here.)
#[derive(Debug, Clone, Copy)]
struct TimeRules {
    leeway: f64,
}

impl TimeRules {
    /// `exp` as a time, or why the claims are refused.
    fn check(self, claims: &Claims, now: f64) -> Result<f64, AuthError> {
        // iat is only read, as PyJWT under LabOrchestrator reads it: a
        // token whose iat is no time is refused, whatever the time.
        time_claim("iat", claims.iat.as_ref())?;
        let (exp, nbf) = (claims.exp.as_ref(), claims.nbf.as_ref());
        let exp = time_claim("exp", exp)?
            .ok_or_else(|| AuthError::Malformed("missing claim exp".into()))?;
        if exp + self.leeway <= now {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = time_claim("nbf", nbf)?
            && nbf - self.leeway > now
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(exp)
    }
}

/// A NumericDate claim (RFC 7519 §2): any JSON number, with or without a
/// fraction, from 0 to [`LATEST_TIME_CLAIM`]. `None` when absent (or null).
fn time_claim(name: &str, value: Option<&Value>) -> Result<Option<f64>, AuthError> {
    let bad = |problem: &str| Err(AuthError::Malformed(format!("claim {name} {problem}")));
    let seconds = match value {
        None => return Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) => s,
            None => return bad("is not a number"),
        },
        Some(_) => return bad("is not a number"),
    };
    if !seconds.is_finite() {
        bad("is not a finite number")
    } else if seconds < 0.0 {
        bad("is negative")
    } else if seconds > LATEST_TIME_CLAIM {
        bad("is past the year 9999")
    } else {
        Ok(Some(seconds))
    }
}

/// Why claims that passed the signature could not be read as JSON, when the
/// cause is a time claim JSON cannot hold: Python's json (under PyJWT) writes
/// a float infinity or NaN as `Infinity`/`NaN`, and a number past f64
/// (`1e400`) does not parse. `None`: some other problem.
fn unreadable_time_claim(token: &str) -> Option<AuthError> {
    // A header that reads means the JSON error came from the claims, which
    // jsonwebtoken reads only after the signature verified.
    jsonwebtoken::decode_header(token).ok()?;
    let json = payload_json(token)?;
    let json = std::str::from_utf8(&json).ok()?;
    ["exp", "nbf", "iat"].into_iter().find_map(|name| {
        let key = format!("\"{name}\"");
        let at = json.find(&key)? + key.len();
        let value = json[at..].trim_start().strip_prefix(':')?.trim_start();
        let value = value.strip_prefix('-').unwrap_or(value);
        let non_finite = value.starts_with("Infinity")
            || value.starts_with("NaN")
            || value
                .split(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .is_some_and(|n| n.is_infinite());
        non_finite.then(|| AuthError::Malformed(format!("claim {name} is not a finite number")))
    })
}

/// A token's claims segment, decoded but not verified: for log lines and
/// error reasons only, never for a decision.
pub(crate) fn payload_json(token: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Verifies tokens with the keys and algorithms from the configuration.
pub struct JwtVerifier {
    /// The accepted algorithms, each with its validation rules.
    algorithms: Vec<(Algorithm, Validation)>,
    /// `exp` and `nbf`, checked by us (see [`Claims`]).
    times: TimeRules,
    /// Every configured key; a key is only ever used with algorithms of its
    /// own family (`DecodingKey::family`).
    keys: Vec<Key>,
    /// No audience is configured: a token that names one, even `null`, is
    /// meant for someone else (RFC 7519 4.1.3), and PyJWT under
    /// LabOrchestrator refuses it.
    no_audience: bool,
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

/// How tokens are verified: [`Config::jwt`](crate::Config::jwt), what the
/// built-in [`JwtAuthorizer`](crate::JwtAuthorizer) checks.
#[derive(Clone, Default)]
#[non_exhaustive]
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
    /// Accept HMAC secrets shorter than 32 bytes (the hash size of HS256).
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

/// The label of the first PEM block in `pem` that holds a private key
/// (`PRIVATE KEY`, `RSA PRIVATE KEY`, `EC PRIVATE KEY`, `ENCRYPTED PRIVATE
/// KEY`...), if any.
fn private_key_label(pem: &[u8]) -> Option<String> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    pem.split(|&b| b == b'\n').find_map(|line| {
        let label = line
            .trim_ascii()
            .strip_prefix(BEGIN)?
            .strip_suffix(b"-----")?;
        label
            .ends_with(b"PRIVATE KEY")
            .then(|| String::from_utf8_lossy(label).into_owned())
    })
}

/// The curve of an EC public key and the one algorithm it verifies, told by
/// the length of its uncompressed point (0x04, x, y).
fn ec_curve(key: &DecodingKey) -> Option<(&'static str, Algorithm)> {
    match key.try_get_as_bytes().ok()?.len() {
        65 => Some(("P-256", Algorithm::ES256)),
        97 => Some(("P-384", Algorithm::ES384)),
        _ => None,
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
            // jsonwebtoken takes an RSA private key for a public one and then
            // refuses every token as badly signed; and the key that signs
            // tokens has no business in the proxy's pod.
            if let Some(label) = private_key_label(&m.bytes) {
                return Err((
                    "JWT_PUBLIC_KEY_FILE",
                    format!(
                        "{} holds a private key ({label}); give the proxy only the public key \
                         (openssl pkey -in KEY -pubout)",
                        m.source
                    ),
                ));
            }
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
            // An EC key verifies one algorithm, its curve's; jsonwebtoken
            // parses any curve and fails only at the first token.
            if key.family() == AlgorithmFamily::Ec {
                let curve = ec_curve(&key);
                if !curve.is_some_and(|(_, alg)| s.algorithms.contains(&alg)) {
                    let what = match curve {
                        Some((name, alg)) => format!("a {name} key, for {alg:?} only"),
                        None => "an EC key on a curve other than P-256 (ES256) and P-384 \
                                 (ES384)"
                            .into(),
                    };
                    return Err((
                        "JWT_PUBLIC_KEY_FILE",
                        format!(
                            "{} is {what}, and JWT_ALGORITHMS accepts {:?}",
                            m.source, s.algorithms
                        ),
                    ));
                }
            }
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
                // exp and nbf are ours to check (TimeRules): jsonwebtoken's
                // check would round LabOrchestrator's fractional exp.
                v.validate_exp = false;
                v.validate_nbf = false;
                let mut required = vec![];
                if !s.audience.is_empty() {
                    v.set_audience(&s.audience);
                    required.push("aud");
                } else {
                    // Refused by `no_audience`, which also sees `"aud": null`
                    // (jsonwebtoken takes it for absent): one decision.
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
        Ok(JwtVerifier {
            algorithms,
            times: TimeRules {
                leeway: s.leeway_secs as f64,
            },
            keys,
            no_audience: s.audience.is_empty(),
        })
    }

    /// Verify `token` and decide whether it allows `vmi`.
    ///
    /// Order matters: the token is checked first (401) so that nobody without
    /// a valid token learns anything about names (403).
    pub fn authorize(&self, token: &str, vmi: &str) -> Result<Grant, AuthError> {
        self.authorize_at(token, vmi, unix_now())
    }

    /// [`JwtVerifier::authorize`] at `now`, seconds since the epoch.
    fn authorize_at(&self, token: &str, vmi: &str, now: f64) -> Result<Grant, AuthError> {
        let claims = self.verify(token).map_err(|e| match e {
            // Only claims that passed the signature get a closer look.
            AuthError::Malformed(why) if why == UNREADABLE_CLAIMS => {
                unreadable_time_claim(token).unwrap_or(AuthError::Malformed(why))
            }
            e => e,
        })?;
        if self.no_audience && claims.aud.is_some() {
            return Err(AuthError::Malformed(
                "audience, issuer or subject not accepted".into(),
            ));
        }
        let exp = self.times.check(&claims, now)?;
        self.grant(claims, vmi, UNIX_EPOCH + Duration::from_secs_f64(exp))
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
                // Not this key: a signature it does not verify, or a key
                // this token's algorithm cannot use (ES384 meets a P-256
                // key when both curves are configured). The next key may.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    result = Err(map_error(e));
                    break;
                }
            }
        }
        result
    }

    /// What verified claims allow for `vmi`.
    fn grant(&self, claims: Claims, vmi: &str, expires_at: SystemTime) -> Result<Grant, AuthError> {
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
            expires_at,
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
        let Some(bytes) = payload_json(token) else {
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

/// The reason for claims that verified but do not have the token's shape.
const UNREADABLE_CLAIMS: &str = "claims do not match the token format";

fn map_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Malformed(format!("missing claim {c}")),
        ErrorKind::InvalidClaimFormat(c) => AuthError::Malformed(format!("bad claim {c}")),
        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => {
            AuthError::Malformed("audience, issuer or subject not accepted".into())
        }
        // The header or (only after the signature verified) the claims.
        ErrorKind::Json(_) => AuthError::Malformed(UNREADABLE_CLAIMS.into()),
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

/// A short fingerprint of a token for log lines: the first 8 hex digits
/// (32 bits) of its SHA-256. Enough to correlate log lines about the same
/// token; tokens that differ in one character get unrelated fingerprints,
/// and no bits of the token can be read back from it.
pub fn fingerprint(token: &str) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = String::with_capacity(8);
    for b in &digest.as_ref()[..4] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> JwtVerifier {
        leeway(0)
    }

    /// HS256 with SECRET and `secs` of leeway.
    fn leeway(secs: u64) -> JwtVerifier {
        JwtVerifier::new(&JwtSettings {
            algorithms: vec![Algorithm::HS256],
            secrets: vec![KeyMaterial {
                kid: None,
                bytes: SECRET.to_vec(),
                source: "SECRET_KEY".into(),
            }],
            leeway_secs: secs,
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

    fn lab(ns: &str, vmis: &[&str], exp: impl Into<serde_json::Value>) -> serde_json::Value {
        let exp = exp.into();
        json!({"id": 5, "exp": exp, "lab_instance": {"lab_id": 1, "lab_instance_id": "9",
               "namespace_name": ns, "allowed_vmi_names": vmis, "additional_data": {"x": [1]}}})
    }

    #[test]
    fn private_key_labels_are_found_in_any_block() {
        let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
        for label in [
            "PRIVATE KEY",
            "RSA PRIVATE KEY",
            "EC PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
        ] {
            let after_a_public_key = pem("PUBLIC KEY") + &pem(label).replace('\n', "\r\n");
            for text in [pem(label), after_a_public_key] {
                assert_eq!(private_key_label(text.as_bytes()).as_deref(), Some(label));
            }
        }
        for public in ["PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE"] {
            assert_eq!(private_key_label(pem(public).as_bytes()), None, "{public}");
        }
    }

    #[test]
    fn an_ec_key_on_a_curve_without_an_algorithm_here_is_named_as_such() {
        // P-521's uncompressed point: jsonwebtoken parses the key, and has
        // no ES512 to verify with it.
        let p521 = DecodingKey::from_ec_der(&[4; 133]);
        assert_eq!(ec_curve(&p521), None);
        assert_eq!(
            ec_curve(&DecodingKey::from_ec_der(&[4; 97])),
            Some(("P-384", Algorithm::ES384))
        );
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

    /// A token whose claims are `payload` verbatim, signed with SECRET:
    /// for JSON that serde_json will not write (`Infinity`, `1e400`), as
    /// PyJWT writes a float infinity.
    fn mint_raw(payload: &str) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let sig = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{signed}.{sig}")
    }

    #[test]
    fn exp_is_any_json_number_compared_to_the_sub_second() {
        // What LabOrchestrator's issuer writes: time.time() + expires_in.
        let exp = 1_796_229_461.962_929_7;
        let t = mint(lab("lab-ns", &["ubuntu"], exp));
        for secs in [0, 30] {
            let v = leeway(secs);
            let l = secs as f64;
            let g = v.authorize_at(&t, "ubuntu", exp - 0.4).unwrap();
            // serde_json reads floats to within an ulp (240 ns here).
            let want = UNIX_EPOCH + Duration::from_secs_f64(exp);
            let off = g
                .expires_at
                .duration_since(want)
                .unwrap_or_else(|e| e.duration());
            assert!(off < Duration::from_micros(1), "{:?}", g.expires_at);
            assert!(v.authorize_at(&t, "ubuntu", exp + l - 0.4).is_ok());
            assert_eq!(
                v.authorize_at(&t, "ubuntu", exp + l + 0.4),
                Err(AuthError::Expired)
            );
            assert_eq!(
                v.authorize_at(&t, "ubuntu", exp + l),
                Err(AuthError::Expired),
                "expired at exp + leeway exactly"
            );
        }
        // An integer exp, as before.
        let t = mint(lab("lab-ns", &["ubuntu"], 2_000_000_000u64));
        let g = leeway(0).authorize_at(&t, "ubuntu", 1e9).unwrap();
        assert_eq!(
            g.expires_at,
            UNIX_EPOCH + Duration::from_secs(2_000_000_000)
        );
        // And through the real clock.
        let t = mint(lab("lab-ns", &["ubuntu"], unix_now() + 0.4));
        assert!(leeway(0).authorize(&t, "ubuntu").is_ok());
        let t = mint(lab("lab-ns", &["ubuntu"], unix_now() - 0.4));
        assert_eq!(leeway(0).authorize(&t, "ubuntu"), Err(AuthError::Expired));
    }

    #[test]
    fn nbf_is_any_json_number_too() {
        let now = 1_800_000_000.0;
        let mut c = lab("ns", &["ubuntu"], now + 60.0);
        c["nbf"] = json!(now + 0.4);
        let t = mint(c);
        assert_eq!(
            leeway(0).authorize_at(&t, "ubuntu", now),
            Err(AuthError::NotYetValid)
        );
        assert!(leeway(0).authorize_at(&t, "ubuntu", now + 0.5).is_ok());
        assert!(leeway(1).authorize_at(&t, "ubuntu", now).is_ok());
    }

    #[test]
    fn time_claims_that_are_no_time_are_refused_by_name() {
        let v = verifier();
        let why = |t: &str| match v.authorize(t, "ubuntu") {
            Err(AuthError::Malformed(why)) => why,
            other => panic!("{other:?}"),
        };
        let exp = |value: serde_json::Value| mint(lab("ns", &["ubuntu"], value));
        assert_eq!(why(&exp(json!(1e20))), "claim exp is past the year 9999");
        assert_eq!(
            why(&exp(json!(253_402_300_800u64))),
            "claim exp is past the year 9999"
        );
        assert_eq!(why(&exp(json!(-1))), "claim exp is negative");
        assert_eq!(why(&exp(json!(-0.5))), "claim exp is negative");
        assert_eq!(why(&exp(json!("4102444800"))), "claim exp is not a number");
        assert_eq!(why(&exp(json!(true))), "claim exp is not a number");
        assert_eq!(why(&exp(json!(null))), "claim exp is not a number");
        let lab_instance =
            r#""lab_instance":{"namespace_name":"ns","allowed_vmi_names":["ubuntu"]}"#;
        for value in ["Infinity", "-Infinity", "NaN", "1e400", "-1e400"] {
            let t = mint_raw(&format!(r#"{{"id":5,"exp": {value},{lab_instance}}}"#));
            assert_eq!(why(&t), "claim exp is not a finite number", "{value}");
            let t = mint_raw(&format!(
                r#"{{"exp":4102444800,"nbf":{value},{lab_instance}}}"#
            ));
            assert_eq!(why(&t), "claim nbf is not a finite number", "{value}");
        }
        let mut c = lab("ns", &["ubuntu"], now() + 60);
        c["nbf"] = json!(-3);
        assert_eq!(why(&mint(c)), "claim nbf is negative");
        // Other unreadable claims keep the general reason, and a token whose
        // signature fails is not looked into.
        let t = mint_raw(&format!(r#"{{"exp":4102444800,"id":x,{lab_instance}}}"#));
        assert_eq!(why(&t), UNREADABLE_CLAIMS);
        let t = mint_raw(&format!(r#"{{"exp":Infinity,{lab_instance}}}"#));
        let forged = format!("{}AAAA", &t[..t.len() - 4]);
        assert_eq!(v.authorize(&forged, "ubuntu"), Err(AuthError::BadSignature));
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint("abc"), fingerprint("abc"));
        assert_ne!(fingerprint("abc"), fingerprint("abd"));
        assert_eq!(fingerprint("abc").len(), 8);
        // The first 32 bits of SHA-256 (FIPS 180-2's "abc" vector), not a
        // fast hash whose output follows its input.
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_eq!(fingerprint(""), "e3b0c442");
        // Tokens differing in their last character share no visible prefix
        // (FNV-1a, the hash before, gave these two 3a4e123c and 3a4e153c).
        let (a, b) = (
            fingerprint("eyJ0eXAi.eyJpZCI6NX0.sigA"),
            fingerprint("eyJ0eXAi.eyJpZCI6NX0.sigB"),
        );
        assert_ne!(a[..4], b[..4], "{a} {b}");
    }
}
