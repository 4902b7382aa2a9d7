//! Tokens as LabOrchestrator sends them: minted at test time by `generate_auth_token` of PyPI's
//! `lab-orchestrator-lib-auth` itself (0.0.5, what production runs, and 2.2.0, the latest; see
//! tests/support/labo.rs), not by hand. Each case runs for every issuer the library can be:
//! 0.0.5 with HS256 (all it knows), 2.2.0 with HS256 (its default) and with each asymmetric
//! algorithm PyJWT and the proxy share, RS256, PS256, ES256, ES384 and EdDSA (key pairs made for
//! the run by `cryptography`, as an operator would make them). And the other way round: a token from our `token` subcommand is read by
//! each version's own `decode_auth_token`.
//!
//! With `PYTHON_SKIP=1` every test here returns early after a notice.

mod common;
#[path = "support/labo.rs"]
mod labo;

use std::net::TcpStream;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{Behaviour as B, Harness, SECRET, raw_request, upgrade_request, upstream, ws_connect};
use jsonwebtoken::Algorithm;
use kubevirt_vnc_proxy::Config;
use kubevirt_vnc_proxy::KeyMaterial;
use labo::{KeyKind, LibAuth, Mint};
use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// An algorithm `generate_auth_token` signs with (PyJWT's `algorithm`) that the proxy also
/// verifies: HS256, LabOrchestrator's default, and each asymmetric family jsonwebtoken and PyJWT
/// share (PyJWT's ES512 has no jsonwebtoken counterpart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Ps256,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    /// PyJWT's name for it and jsonwebtoken's.
    fn names(self) -> (&'static str, Algorithm) {
        match self {
            Alg::Hs256 => ("HS256", Algorithm::HS256),
            Alg::Rs256 => ("RS256", Algorithm::RS256),
            Alg::Ps256 => ("PS256", Algorithm::PS256),
            Alg::Es256 => ("ES256", Algorithm::ES256),
            Alg::Es384 => ("ES384", Algorithm::ES384),
            Alg::EdDsa => ("EdDSA", Algorithm::EdDSA),
        }
    }

    /// The key pair this algorithm signs with, made once per run: (private PEM, public PEM);
    /// `None` for HS256, which signs with [`SECRET`].
    fn keys(self) -> Option<&'static (String, String)> {
        static KEYS: [OnceLock<(String, String)>; 4] = [const { OnceLock::new() }; 4];
        let (slot, kind) = match self {
            Alg::Hs256 => return None,
            Alg::Rs256 | Alg::Ps256 => (0, KeyKind::Rsa),
            Alg::Es256 => (1, KeyKind::P256),
            Alg::Es384 => (2, KeyKind::P384),
            Alg::EdDsa => (3, KeyKind::Ed25519),
        };
        Some(KEYS[slot].get_or_init(|| labo::key_pair(kind)))
    }
}

/// A library version signing with one algorithm.
#[derive(Debug, Clone, Copy)]
struct Issuer {
    lib: LibAuth,
    alg: Alg,
}

/// Every issuer the library can be: 0.0.5 signs HS256 only, 2.2.0 whatever PyJWT can.
const ISSUERS: [Issuer; 7] = [
    Issuer {
        lib: LibAuth::V0_0_5,
        alg: Alg::Hs256,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::Hs256,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::Rs256,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::Ps256,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::Es256,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::Es384,
    },
    Issuer {
        lib: LibAuth::V2_2_0,
        alg: Alg::EdDsa,
    },
];

impl Issuer {
    fn name(self) -> String {
        format!("lib-auth {} {}", self.lib.version(), self.alg.names().0)
    }

    /// A proxy that accepts this issuer's algorithm (only that one) with its key, then
    /// `adjust`ed, in front of a stand-in that serves `upstream`.
    fn proxy(self, upstream: B, adjust: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_with(upstream, |c| {
            if let Some((_, public)) = self.alg.keys() {
                c.jwt.algorithms = vec![self.alg.names().1];
                c.jwt.public_keys = vec![KeyMaterial {
                    kid: None,
                    bytes: public.as_bytes().to_vec(),
                    source: format!("labo::key_pair for {}", self.alg.names().0),
                }];
            }
            adjust(c);
        })
    }

    /// `generate_auth_token` of this version; HS256 is the library's default, so it is not
    /// named.
    fn mint(self, m: Mint) -> String {
        let token = match self.alg.keys() {
            None => m.with(self.lib),
            Some((private, _)) => m.signed(self.alg.names().0, private).with(self.lib),
        };
        let header: Value = serde_json::from_str(&part(&token, 0)).expect("JSON header");
        assert_eq!(
            header["alg"],
            self.alg.names().0,
            "{}: {header}",
            self.name()
        );
        token
    }
}

/// The usual lab's token for `vmis`, signed with [`SECRET`] (HS256 issuers).
fn lab(vmis: &[&str]) -> Mint {
    Mint::new(SECRET, vmis)
}

/// Open `/TOKEN/VMI`; panics with the proxy's answer when it is not 101.
fn session(h: &Harness, token: &str, vmi: &str, what: &str) -> WebSocket<TcpStream> {
    let path = format!("/{token}/{vmi}");
    ws_connect(h.addr, &path).unwrap_or_else(|e| {
        let a = raw_request(h.addr, &upgrade_request(&path, ""));
        panic!(
            "{what}: no 101 ({e}); the proxy answers {}: {}",
            a.status, a.body
        )
    })
}

/// A refused upgrade for `/TOKEN/VMI`: (status, body), and the proxy must not have dialed the
/// upstream for it.
fn refusal(h: &Harness, token: &str, vmi: &str, what: &str) -> (u16, String) {
    let before = h.upstream.connections_total();
    let a = raw_request(h.addr, &upgrade_request(&format!("/{token}/{vmi}"), ""));
    assert_eq!(
        h.upstream.connections_total(),
        before,
        "{what}: refused ({} {}) only after dialing the upstream",
        a.status,
        a.body
    );
    (a.status, a.body)
}

/// The next message that is not a ping or pong.
fn next_data(ws: &mut WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read().expect("read") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// A binary and a text message go through the echo upstream and come back unchanged.
fn relays_both_ways(ws: &mut WebSocket<TcpStream>, what: &str) {
    let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    ws.send(Message::binary(binary.clone()))
        .expect("send binary");
    assert_eq!(
        next_data(ws),
        Message::binary(binary),
        "{what}: binary echo"
    );
    ws.send(Message::text("RFB 003.008 ✓")).expect("send text");
    assert_eq!(
        next_data(ws),
        Message::text("RFB 003.008 ✓"),
        "{what}: text echo"
    );
}

/// A token's claims (the payload, not verified).
fn claims(token: &str) -> Value {
    serde_json::from_str(&part(token, 1)).expect("JSON claims")
}

/// Part `n` of a JWT (0: header, 1: payload) as the issuer wrote it.
fn part(token: &str, n: usize) -> String {
    let b64 = token.split('.').nth(n).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .expect("base64url");
    String::from_utf8(bytes).expect("UTF-8 JSON")
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn a_valid_token_gets_101_and_relays_both_ways() {
    if !labo::available() {
        return;
    }
    for issuer in ISSUERS {
        let h = issuer.proxy(B::Echo, |_| {});
        let t = issuer.mint(lab(&["echo-valid"]));
        let mut ws = session(&h, &t, "echo-valid", &issuer.name());
        relays_both_ways(&mut ws, &issuer.name());
    }
}

#[test]
fn a_token_expired_ten_minutes_ago_gets_401() {
    if !labo::available() {
        return;
    }
    for issuer in ISSUERS {
        let h = issuer.proxy(B::Echo, |_| {});
        let t = issuer.mint(lab(&["echo"]).expires_in(-600.0));
        let (status, body) = refusal(&h, &t, "echo", &issuer.name());
        assert_eq!(status, 401, "{}: {body}", issuer.name());
        assert!(body.contains("expired"), "{}: {body}", issuer.name());
    }
}

#[test]
fn ten_seconds_past_exp_is_inside_the_default_leeway() {
    if !labo::available() {
        return;
    }
    for issuer in ISSUERS {
        let t = issuer.mint(lab(&["echo-leeway"]).expires_in(-10.0));
        let h = issuer.proxy(B::Echo, |c| {
            assert_eq!(c.jwt.leeway_secs, 30, "the default leeway")
        });
        let mut ws = session(&h, &t, "echo-leeway", &issuer.name());
        relays_both_ways(&mut ws, &issuer.name());
        // The leeway is what lets it in: without one, the same token is refused.
        let strict = issuer.proxy(B::Echo, |c| c.jwt.leeway_secs = 0);
        let (status, body) = refusal(&strict, &t, "echo-leeway", &issuer.name());
        assert_eq!(status, 401, "{} without leeway: {body}", issuer.name());
    }
}

#[test]
fn a_vmi_not_listed_in_the_token_gets_403() {
    if !labo::available() {
        return;
    }
    for issuer in ISSUERS {
        let h = issuer.proxy(B::Echo, |_| {});
        let t = issuer.mint(lab(&["ubuntu", "win-10"]));
        let (status, body) = refusal(&h, &t, "echo-other", &issuer.name());
        assert_eq!(status, 403, "{}: {body}", issuer.name());
        // The same token opens the VMIs it lists (the stand-in echoes for these names).
        for vmi in ["ubuntu", "win-10"] {
            let mut ws = session(&h, &t, vmi, &issuer.name());
            relays_both_ways(&mut ws, &issuer.name());
        }
    }
}

#[test]
fn string_ids_and_additional_data_pass() {
    if !labo::available() {
        return;
    }
    let string_ids = || lab(&["echo-ids"]).ids(json!("5"), json!("lab-1"), json!("instance-9"));
    let nested = json!({
        "course": {"name": "Kubernetes 101", "seats": 12, "tags": ["k8s", "vnc"]},
        "limits": {"cpu": 2.5, "gpu": null, "flags": [true, false]},
    });
    for issuer in ISSUERS {
        let h = issuer.proxy(B::Echo, |_| {});
        let mut tokens = vec![("string ids", issuer.mint(string_ids()))];
        if issuer.lib == LibAuth::V2_2_0 {
            tokens.push((
                "additional_data",
                issuer.mint(lab(&["echo-ids"]).additional_data(nested.clone())),
            ));
            tokens.push((
                "string ids and additional_data",
                issuer.mint(string_ids().additional_data(nested.clone())),
            ));
        }
        for (what, t) in tokens {
            let what = format!("{}, {what}", issuer.name());
            // The token carries what the case is about (the library did not drop it).
            let c = claims(&t);
            if what.contains("string ids") {
                assert_eq!(c["id"], json!("5"), "{what}");
                assert_eq!(c["lab_instance"]["lab_id"], json!("lab-1"), "{what}");
            }
            if what.contains("additional_data") {
                assert_eq!(c["lab_instance"]["additional_data"], nested, "{what}");
            }
            let mut ws = session(&h, &t, "echo-ids", &what);
            relays_both_ways(&mut ws, &what);
        }
    }
}

#[test]
fn a_session_is_closed_with_1008_when_its_token_expires() {
    if !labo::available() {
        return;
    }
    for issuer in ISSUERS {
        issuer.alg.keys(); // made before the clocks start
    }
    std::thread::scope(|s| {
        for issuer in ISSUERS {
            s.spawn(move || closes_at_exp(issuer));
        }
    });
}

/// A token that expires 4.5 s after minting, on a proxy without leeway: the session relays
/// (to the counting upstream), then the proxy closes it with 1008 once the token's `exp` has
/// passed, within a second, and the upstream with 1000. (4.5 s: the Pythons of this test and
/// of others start at once on a loaded machine, and the token must still be valid when the
/// session opens; the close is timed against the token's own `exp`, not the minting.)
fn closes_at_exp(issuer: Issuer) {
    let what = issuer.name();
    let h = issuer.proxy(B::Sink, |c| {
        c.jwt.leeway_secs = 0;
        c.close_on_token_expiry = true;
    });
    let minting = Instant::now();
    let m = lab(&["sink-expiry"]);
    let t = issuer.mint(match issuer.lib {
        LibAuth::V0_0_5 => m.expires_in(4.5),
        LibAuth::V2_2_0 => m.expires_at(wall_now() + 4.5),
    });
    let exp = claims(&t)["exp"].as_f64().expect("exp is a number");
    let mut ws = session(&h, &t, "sink-expiry", &what);
    ws.send(Message::binary(vec![7u8; 100]))
        .expect("send binary");
    ws.send(Message::text("before expiry")).expect("send text");
    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => panic!("{what}: {m:?} instead of a close"),
            Err(e) => panic!("{what}: no close frame: {e}"),
        }
    };
    let (elapsed, closed_at) = (minting.elapsed(), wall_now());
    let close = close.unwrap_or_else(|| panic!("{what}: a close frame without a code"));
    assert_eq!(close.code, CloseCode::Policy, "{what}: {close:?}");
    assert_eq!(close.reason.as_str(), "token expired", "{what}");
    assert!(
        closed_at >= exp,
        "{what}: closed {:.3} s before the token's exp",
        exp - closed_at
    );
    assert!(
        closed_at - exp <= 1.0,
        "{what}: closed {:.3} s after the token's exp",
        closed_at - exp
    );
    assert!(
        elapsed >= Duration::from_millis(4500),
        "{what}: closed {elapsed:?} after minting a token that expires 4.5 s after"
    );
    assert!(
        upstream::wait_until(Duration::from_secs(5), || !h
            .upstream
            .close_codes()
            .is_empty()),
        "{what}: the upstream got no close"
    );
    assert_eq!(
        h.upstream.close_codes(),
        vec![Some(1000)],
        "{what}: the upstream gets a normal close"
    );
    assert_eq!(
        h.upstream.sink_results()[0].0,
        113,
        "{what}: what the client sent before expiry reached the upstream"
    );
}

/// A JSON value's shape: object keys and the kind of every value (a number is an integer or
/// has a fraction), so two tokens minted at different times compare equal when they have the
/// same claims of the same types.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
        Value::Array(a) => a.iter().map(shape).collect(),
        Value::Number(n) if n.is_f64() => json!("number with a fraction"),
        Value::Number(_) => json!("integer"),
        Value::String(_) => json!("string"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

/// Compact JSON claims with the value of `"exp"` replaced by `EXP`.
fn without_exp(payload: &str) -> String {
    let (head, rest) = payload.split_once("\"exp\":").expect("an exp claim");
    let end = rest.find([',', '}']).expect("exp ends");
    format!("{head}\"exp\":EXP{}", &rest[end..])
}

#[test]
fn our_token_subcommand_mints_what_each_library_version_decodes() {
    if !labo::available() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");
    for lib in LibAuth::ALL {
        let what = format!("token --lib-version {}", lib.version());
        let out = Command::new(bin)
            .env_remove("SECRET_KEY")
            .args(["token", "--vmi", "ubuntu", "--namespace", "lab-ns"])
            .args(["--user-id", "5", "--lab-id", "1", "--lab-instance-id", "9"])
            .args(["--secret-key", SECRET, "--lib-version", lib.version()])
            .output()
            .expect("run the token subcommand");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ours = String::from_utf8(out.stdout).expect("UTF-8");
        let ours = ours.trim();
        let theirs = lab(&["ubuntu"]).with(lib);
        let decoded = labo::decode(lib, ours, SECRET, None)
            .unwrap_or_else(|e| panic!("{what}: the library refuses our token: {e}"));
        let expected = labo::decode(lib, &theirs, SECRET, None).expect("its own token");
        assert_eq!(decoded, expected, "{what}: decoded data");
        assert_eq!(part(ours, 0), part(&theirs, 0), "{what}: header");
        assert_eq!(
            shape(&claims(ours)),
            shape(&claims(&theirs)),
            "{what}: claims {} against the library's {}",
            part(ours, 1),
            part(&theirs, 1)
        );
        // Byte for byte (same claims, same order, same JSON), but for exp's value.
        assert_eq!(
            without_exp(&part(ours, 1)),
            without_exp(&part(&theirs, 1)),
            "{what}: payload"
        );
    }
}

/// A token that names an audience is meant for that audience. LabOrchestrator's
/// `generate_auth_token` never writes `aud`, so this token is hand-made; what each library
/// version's own `decode_auth_token` (PyJWT) makes of it is asked at test time: it refuses, and
/// so do we while `JWT_AUDIENCE` is unset.
#[test]
fn a_token_naming_an_audience_is_refused_without_jwt_audience() {
    let base = common::tokens::lab_claims("lab-ns", &["echo"], common::tokens::now() + 600);
    let without = common::tokens::mint_claims(SECRET, &base);
    let h = Harness::start(B::Echo);
    // An explicit null names an audience too, for PyJWT ("aud" in payload).
    for aud in [json!("another-service"), json!(null)] {
        let mut claims = base.clone();
        claims["aud"] = aud.clone();
        let token = common::tokens::mint_claims(SECRET, &claims);
        if labo::available() {
            for lib in LibAuth::ALL {
                let v = lib.version();
                // The same claims but `aud` pass: it is the audience that is refused.
                labo::decode(lib, &without, SECRET, None)
                    .unwrap_or_else(|e| panic!("{v}: the control token is refused: {e}"));
                let e = labo::decode(lib, &token, SECRET, None)
                    .expect_err("the library refuses a token with an audience it was not given");
                // 0.0.5 swallows PyJWT's exception and returns None; 2.x lets it through.
                if lib == LibAuth::V2_2_0 {
                    assert!(
                        e.to_lowercase().contains("audience"),
                        "{v} on aud {aud}: {e}"
                    );
                }
            }
        }
        let (status, body) = refusal(
            &h,
            &token,
            "echo",
            &format!("aud {aud} without JWT_AUDIENCE"),
        );
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("audience"), "{body}");
    }
}

/// `iat` is read as PyJWT reads it under LabOrchestrator: a token whose `iat` is not a time is
/// refused. LabOrchestrator's `generate_auth_token` never writes `iat`, so these tokens are
/// hand-made; each library version's own `decode_auth_token` is asked about the same tokens.
#[test]
fn an_iat_that_is_not_a_time_is_refused_as_pyjwt_refuses_it() {
    let h = Harness::start(B::Echo);
    let base = common::tokens::lab_claims("lab-ns", &["echo"], common::tokens::now() + 600);
    for (iat, ok) in [
        (json!(common::tokens::now()), true),
        (json!(1_700_000_000.25), true),
        (json!("yesterday"), false),
        (json!(null), false),
    ] {
        let mut claims = base.clone();
        claims["iat"] = iat.clone();
        let token = common::tokens::mint_claims(SECRET, &claims);
        if labo::available() {
            for lib in LibAuth::ALL {
                let decoded = labo::decode(lib, &token, SECRET, None);
                assert_eq!(
                    decoded.is_ok(),
                    ok,
                    "{} on iat {iat}: {decoded:?}",
                    lib.version()
                );
            }
        }
        if ok {
            let mut ws = session(&h, &token, "echo", &format!("iat {iat}"));
            relays_both_ways(&mut ws, &format!("iat {iat}"));
        } else {
            let (status, body) = refusal(&h, &token, "echo", &format!("iat {iat}"));
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("claim iat is not a number"), "{body}");
        }
    }
}
