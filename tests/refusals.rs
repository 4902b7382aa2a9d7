//! Every refusal in the table of the core issue, through real sockets: the
//! precise HTTP status, a plain-text reason, `Connection: close`, the socket
//! closed, and no upstream connection for anything refused before the token
//! and name checks passed.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::tokens::{self, SECRET, lab_claims, mint, mint_claims, now};
use common::{
    Behaviour as B, Harness, NS, RawAnswer, StandInOptions, raw_request, upgrade_request,
};
use jsonwebtoken::{Algorithm, Header};
use kubevirt_vnc_proxy::KeyMaterial;

/// Send `request`, expect a well-formed refusal (and the socket closed:
/// `raw_request` reads until EOF).
fn refused(h: &Harness, request: &[u8]) -> RawAnswer {
    let a = raw_request(h.addr, request);
    let connection = a.head.lines().find_map(|l| l.strip_prefix("Connection: "));
    assert!(
        connection.is_some_and(|c| c.split(", ").any(|t| t == "close")),
        "{}",
        a.head
    );
    assert!(a.head.contains("Content-Type: text/plain"), "{}", a.head);
    assert!(!a.body.trim().is_empty(), "a refusal carries a reason");
    a
}

fn assert_no_upstream<F: FnOnce() -> RawAnswer>(h: &Harness, f: F) -> RawAnswer {
    let before = h.upstream.connections_total();
    let a = f();
    assert_eq!(
        h.upstream.connections_total(),
        before,
        "refused with {} but an upstream connection was made",
        a.status
    );
    a
}

#[test]
fn malformed_and_non_upgrade_requests_are_refused() {
    let h = Harness::start(B::Echo);
    let tok = Harness::token(&["echo"]);
    let path = format!("/{tok}/echo");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"garbage\r\n\r\n".to_vec(), 400),
        (
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
            426,
        ),
        (
            String::from_utf8(upgrade_request(&path, ""))
                .unwrap()
                .replace("GET", "POST")
                .into_bytes(),
            405,
        ),
        (
            String::from_utf8(upgrade_request(&path, ""))
                .unwrap()
                .replace("HTTP/1.1", "HTTP/1.0")
                .into_bytes(),
            400,
        ),
        (
            String::from_utf8(upgrade_request(&path, ""))
                .unwrap()
                .replace("dGhlIHNhbXBsZSBub25jZQ==", "dG9vc2hvcnQ=")
                .into_bytes(),
            400,
        ),
        (
            upgrade_request(&path, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            400,
        ),
        (upgrade_request(&path, "Content-Length: 5\r\n"), 400),
        (
            upgrade_request(&path, "Content-Length: 0\r\nContent-Length: 0\r\n"),
            400,
        ),
        (
            upgrade_request(&path, "Transfer-Encoding: chunked\r\n"),
            400,
        ),
        (upgrade_request(&path, "X-Folded: a\r\n b\r\n"), 400),
        (
            String::from_utf8(upgrade_request(&path, ""))
                .unwrap()
                .replace("Host: proxy\r\n", "Host: proxy\n")
                .into_bytes(),
            400,
        ),
        (upgrade_request("/t/%zz", ""), 400),
    ];
    for (req, want) in cases {
        let a = assert_no_upstream(&h, || refused(&h, &req));
        assert_eq!(
            a.status,
            want,
            "{}\n-> {}",
            String::from_utf8_lossy(&req),
            a.body
        );
    }
}

#[test]
fn wrong_websocket_version_gets_426_with_the_supported_version() {
    let h = Harness::start(B::Echo);
    let path = format!("/{}/echo", Harness::token(&["echo"]));
    let req = String::from_utf8(upgrade_request(&path, ""))
        .unwrap()
        .replace("Version: 13", "Version: 8");
    let a = assert_no_upstream(&h, || refused(&h, req.as_bytes()));
    assert_eq!(a.status, 426);
    assert!(a.head.contains("Sec-WebSocket-Version: 13"));
}

/// What is not a WebSocket upgrade is told what would be, in the headers RFC 9110 asks for: a
/// page load of the console's URL gets 426 naming `Upgrade: websocket` (as the Python proxy
/// answered), another method 405 with `Allow: GET`. And a request line httparse cannot read is
/// not called an "invalid token", which in our logs would read as a bad JWT.
#[test]
fn what_is_not_an_upgrade_is_told_what_would_be() {
    let h = Harness::start(B::Echo);
    let path = format!("/{}/echo", Harness::token(&["echo"]));
    let page = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n");
    let a = assert_no_upstream(&h, || refused(&h, page.as_bytes()));
    assert_eq!(a.status, 426, "{}", a.head);
    assert!(a.head.contains("\r\nUpgrade: websocket\r\n"), "{}", a.head);
    assert!(
        a.head.contains("\r\nConnection: Upgrade, close"),
        "{}",
        a.head
    );
    let post = String::from_utf8(upgrade_request(&path, ""))
        .unwrap()
        .replacen("GET", "POST", 1);
    let a = assert_no_upstream(&h, || refused(&h, post.as_bytes()));
    assert_eq!(a.status, 405, "{}", a.head);
    assert!(a.head.contains("\r\nAllow: GET\r\n"), "{}", a.head);
    let latin1 = [&b"GET /a\xe9/echo HTTP/1.1\r\n"[..], b"Host: x\r\n\r\n"].concat();
    let a = assert_no_upstream(&h, || refused(&h, &latin1));
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body.trim_end(),
        "malformed request: malformed request line (method or target)"
    );
}

/// Only the allow-listed query parameters (`UPSTREAM_QUERY_PARAMS`, `preserveSession`) are read;
/// what is dropped is never judged. A page's own parameter with a broken escape (`?utm=100%`)
/// used to refuse a session whose token had already passed, as "query: malformed
/// percent-encoding in path"; a broken allowed one is refused by its name.
#[test]
fn only_the_allowed_query_parameters_are_judged() {
    let h = Harness::start(B::Echo);
    let tok = Harness::token(&["echo"]);
    let before = h.upstream.seen().len();
    let mut ws = common::ws_connect(
        h.addr,
        &format!("/{tok}/echo?utm=100%&preserveSession=true&x=%E9"),
    )
    .expect("a session with a page's broken parameters");
    ws.send(tungstenite::Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("hi"));
    let seen = h.upstream.seen();
    assert_eq!(
        seen[before..].iter().map(|r| r.query()).collect::<Vec<_>>(),
        vec![Some("preserveSession=true")]
    );
    let a = assert_no_upstream(&h, || {
        refused(
            &h,
            &upgrade_request(&format!("/{tok}/echo?preserveSession=%zz"), ""),
        )
    });
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body.trim_end(),
        "malformed percent-encoding in query parameter 'preserveSession'"
    );
}

/// An absolute-form target (`GET http://host/TOKEN/VMI`, which RFC 9112 3.2.2 asks a server to
/// accept) is routed by its path, for a session as for a probe; it was a 404 ("path must start
/// with /").
#[test]
fn an_absolute_form_target_is_routed_by_its_path() {
    let h = Harness::start(B::Echo);
    let tok = Harness::token(&["echo"]);
    let request = upgrade_request(&format!("http://{}/{tok}/echo", h.addr), "");
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&request).unwrap();
    let head = common::read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let probe = format!("GET http://{}/healthz HTTP/1.1\r\nHost: x\r\n\r\n", h.addr);
    let a = raw_request(h.addr, probe.as_bytes());
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
}

/// Envoy (Istio's ingress gateway and sidecars) adds `Content-Length: 0`
/// to requests without a body, WebSocket upgrades included (envoyproxy/envoy
/// #15049; hand-made here, as no Envoy runs on this machine). It declares no
/// body, so the console opens; it was refused 400 behind every Envoy.
#[test]
fn an_upgrade_with_a_zero_content_length_opens_the_console() {
    let h = Harness::start(B::Echo);
    let tok = Harness::token(&["echo"]);
    let (s, head) = common::upgrade_head(h.addr, &format!("/{tok}/echo"), "content-length: 0\r\n");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(s, tungstenite::protocol::Role::Client, None);
    ws.send(tungstenite::Message::text("behind Envoy")).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        tungstenite::Message::text("behind Envoy")
    );
}

/// RFC 9110 §9.1 and §9.3.2: HEAD is answered as GET would be, head only
/// (`curl -I`, a load balancer's `httpchk HEAD /healthz`). It got a 405
/// with a body. And an Upgrade to anything but a WebSocket is ignored
/// (§7.8): `curl --http2` offers h2c, and got 426 (404 on the probe port).
#[test]
fn head_probes_and_h2c_offers_get_the_probe_answer() {
    let h = Harness::start_with(B::Echo, |c| c.metrics_addr = Some("127.0.0.1:0".into()));
    let probes = h
        .proxy
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("probe port");
    let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
               HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
    for (addr, path) in [
        (h.addr, "/healthz"),
        (h.addr, "/readyz"),
        (probes, "/healthz"),
        (probes, "/metrics"),
    ] {
        let get = raw_request(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert_eq!(get.status, 200, "GET {path}: {}", get.body);
        let head = raw_request(
            addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert_eq!((head.status, head.body.as_str()), (200, ""), "HEAD {path}");
        // After empty lines too, which the parser skips (RFC 9112 §2.2).
        let late = raw_request(
            addr,
            format!("\r\n\nHEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert_eq!(
            (late.status, late.body.as_str()),
            (200, ""),
            "late HEAD {path}"
        );
        assert!(head.head.contains("Content-Length: "), "{}", head.head);
        let offer = raw_request(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{h2c}\r\n").as_bytes(),
        );
        assert_eq!(offer.status, 200, "GET {path} offering h2c: {}", offer.body);
    }
    // A refusal of a HEAD has no content either; an upgrade is still a GET.
    let tok = Harness::token(&["echo"]);
    let a = raw_request(
        h.addr,
        format!("HEAD /{tok}/echo HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    assert_eq!((a.status, a.body.as_str()), (405, ""), "{}", a.head);
    assert!(a.head.contains("Allow: GET"), "{}", a.head);
}

#[test]
fn oversized_heads_get_431_and_a_request_line_over_the_limit_414() {
    let h = Harness::start(B::Echo);
    let path = format!("/{}/echo", Harness::token(&["echo"]));
    let big = format!("X-Pad: {}\r\n", "a".repeat(9000));
    let a = assert_no_upstream(&h, || refused(&h, &upgrade_request(&path, &big)));
    assert_eq!(a.status, 431);
    // A token of 9,000 bytes: the request line alone is over MAX_REQUEST_HEAD_BYTES (RFC 9112
    // asks for 414 when the target is too long to parse).
    let long = format!("/{}/echo", "t".repeat(9000));
    let a = assert_no_upstream(&h, || refused(&h, &upgrade_request(&long, "")));
    assert_eq!(a.status, 414, "{}", a.body);
    assert_eq!(a.body.trim_end(), "request line longer than 8192 bytes");
}

#[test]
fn unknown_paths_and_prefixes_get_404() {
    let h = Harness::start_with(B::Echo, |c| c.path_prefix = Some("console".into()));
    let tok = Harness::token(&["echo"]);
    for path in [
        format!("/{tok}/echo"),
        format!("/other/{tok}/echo"),
        format!("/console/{tok}"),
        format!("/console/{tok}/echo/extra"),
        "/".to_owned(),
    ] {
        let a = assert_no_upstream(&h, || refused(&h, &upgrade_request(&path, "")));
        assert_eq!(a.status, 404, "{path}");
    }
    // And the prefix does route.
    let mut ws = h.ws_path(&format!("/console/{tok}/echo"));
    ws.send(tungstenite::Message::text("via prefix")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("via prefix"));
}

#[test]
fn a_prefix_a_browser_escapes_routes_once_decoded() {
    // A browser escapes a space in a URL: HOST_PATH_PREFIX "lab consoles"
    // arrives as `/lab%20consoles/` (decoded once, as the token and the
    // VMI name are; the escaped text itself is no match).
    let h = Harness::start_with(B::Echo, |c| c.path_prefix = Some("lab consoles".into()));
    let tok = Harness::token(&["echo"]);
    let mut ws = h.ws_path(&format!("/lab%20consoles/{tok}/echo"));
    ws.send(tungstenite::Message::text("via prefix")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("via prefix"));
    for (path, want) in [
        (
            format!("/lab%2520consoles/{tok}/echo"),
            (404, "path prefix does not match"),
        ),
        // A broken escape is a malformed request wherever it is.
        (
            format!("/lab%2/{tok}/echo"),
            (400, "malformed percent-encoding in path"),
        ),
    ] {
        let a = assert_no_upstream(&h, || refused(&h, &upgrade_request(&path, "")));
        assert_eq!((a.status, a.body.trim_end()), want, "{path}");
    }
}

#[test]
fn bad_tokens_get_401_before_any_upstream_work() {
    let h = Harness::start(B::Echo);
    let claims = lab_claims(NS, &["echo"], now() + 600);
    let mut nbf = claims.clone();
    nbf["nbf"] = serde_json::json!(now() + 3600);
    let mut tampered = mint(SECRET, NS, &["echo"], now() + 600);
    let at = tampered.len() - 10;
    let flipped = if &tampered[at..at + 1] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(at..at + 1, flipped);
    let cases = [
        ("garbage", "not.a.jwt".to_owned()),
        (
            "wrong secret",
            mint(
                "another-secret-that-is-32-bytes-long!",
                NS,
                &["echo"],
                now() + 600,
            ),
        ),
        ("tampered signature", tampered),
        ("expired", mint(SECRET, NS, &["echo"], now() - 120)),
        ("not yet valid", mint_claims(SECRET, &nbf)),
        ("alg none", tokens::unsigned(&claims)),
        (
            "HS512 not configured",
            tokens::mint_with_header(SECRET.as_bytes(), Header::new(Algorithm::HS512), &claims),
        ),
        (
            "no exp",
            mint_claims(
                SECRET,
                &serde_json::json!({"lab_instance": {"namespace_name": NS, "allowed_vmi_names": ["echo"]}}),
            ),
        ),
        (
            "no lab_instance",
            mint_claims(SECRET, &serde_json::json!({"exp": now() + 600})),
        ),
        (
            "wrong types",
            mint_claims(
                SECRET,
                &serde_json::json!({"exp": now() + 600, "lab_instance": {"namespace_name": 5, "allowed_vmi_names": "echo"}}),
            ),
        ),
    ];
    for (what, token) in cases {
        let a = assert_no_upstream(&h, || {
            refused(&h, &upgrade_request(&format!("/{token}/echo"), ""))
        });
        assert_eq!(a.status, 401, "{what}: {}", a.body);
    }
}

#[test]
fn forbidden_names_get_403_before_any_upstream_work() {
    let h = Harness::start(B::Echo);
    let tok = mint(SECRET, NS, &["echo", "Echo", "a..b"], now() + 600);
    for vmi in [
        "other",
        "Echo",
        "a..b",
        "%2e%2e",
        "echo%2Fx",
        "echo.",
        "e%2565cho",
    ] {
        let a = assert_no_upstream(&h, || {
            refused(&h, &upgrade_request(&format!("/{tok}/{vmi}"), ""))
        });
        assert_eq!(a.status, 403, "{vmi}: {}", a.body);
    }
    let bad_ns = mint(SECRET, "Bad_Namespace", &["echo"], now() + 600);
    let a = assert_no_upstream(&h, || {
        refused(&h, &upgrade_request(&format!("/{bad_ns}/echo"), ""))
    });
    assert_eq!(a.status, 403);
    // The VMI is compared after decoding once: %65 is 'e'.
    let mut ws = h.ws_path(&format!("/{tok}/%65cho"));
    ws.send(tungstenite::Message::text("decoded once")).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        tungstenite::Message::text("decoded once")
    );
}

/// Hand-made claims signed by PyJWT, with an integer `exp` (tests/fixtures/):
/// the fixed bytes also seed the fuzzers. What LabOrchestrator's issuer
/// itself mints (a fractional `exp`) is tested in tests/labo_tokens.rs.
#[test]
fn pyjwt_fixtures_with_an_integer_exp_are_accepted_unchanged() {
    let h = Harness::start(B::Echo);
    for fixture in ["pyjwt_hs256.jwt", "pyjwt_hs256_string_ids.jwt"] {
        let token = std::fs::read_to_string(format!("tests/fixtures/{fixture}")).unwrap();
        let mut ws = h.ws_path(&format!("/{}/ubuntu", token.trim()));
        ws.send(tungstenite::Message::text(fixture)).unwrap();
        assert_eq!(ws.read().unwrap(), tungstenite::Message::text(fixture));
    }
    let expired = std::fs::read_to_string("tests/fixtures/pyjwt_hs256_expired.jwt").unwrap();
    let a = refused(
        &h,
        &upgrade_request(&format!("/{}/ubuntu", expired.trim()), ""),
    );
    assert_eq!(a.status, 401);
}

#[test]
fn rs256_tokens_with_a_public_key() {
    let h = Harness::start_with(B::Echo, |c| {
        c.jwt.algorithms = vec![Algorithm::RS256];
        c.jwt.public_keys = vec![KeyMaterial {
            kid: None,
            bytes: std::fs::read("tests/fixtures/rsa_public.pem").unwrap(),
            source: "tests/fixtures/rsa_public.pem".into(),
        }];
    });
    let token = std::fs::read_to_string("tests/fixtures/pyjwt_rs256.jwt").unwrap();
    let mut ws = h.ws_path(&format!("/{}/ubuntu", token.trim()));
    ws.send(tungstenite::Message::text("rsa")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("rsa"));
    // An HS256 token is refused although the secret is configured: only the
    // configured algorithms count. And an HS256 token signed with the RSA
    // public key as its secret (algorithm confusion) is refused as well.
    let claims = lab_claims(NS, &["ubuntu"], now() + 600);
    let hs = mint_claims(SECRET, &claims);
    let pem = std::fs::read("tests/fixtures/rsa_public.pem").unwrap();
    let confused = tokens::mint_with_header(&pem, Header::new(Algorithm::HS256), &claims);
    for t in [hs, confused] {
        let a = assert_no_upstream(&h, || {
            refused(&h, &upgrade_request(&format!("/{t}/ubuntu"), ""))
        });
        assert_eq!(a.status, 401);
    }
}

/// ES256 and ES384 keys together (a curve change under rotation): a token is checked with each
/// key of its family until one fits, a key on the other curve being no answer. Hand-made: the
/// keys are fresh from rcgen and the tokens signed by jsonwebtoken, as what is tested is our
/// search through the keys, which no issuer's token shapes (LabOrchestrator's own tokens, in
/// each algorithm, are tests/labo_tokens.rs's).
#[test]
fn ec_keys_on_two_curves_each_verify_their_own_tokens() {
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let material = |k: &rcgen::KeyPair, name: &str| KeyMaterial {
        kid: None,
        bytes: k.public_key_pem().into_bytes(),
        source: name.into(),
    };
    let h = Harness::start_with(B::Echo, |c| {
        c.jwt.algorithms = vec![Algorithm::ES256, Algorithm::ES384];
        c.jwt.public_keys = vec![material(&p256, "p256.pem"), material(&p384, "p384.pem")];
    });
    let claims = lab_claims(NS, &["ubuntu"], now() + 600);
    let sign = |alg, k: &rcgen::KeyPair| {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
    };
    for (what, token) in [
        ("ES256 by the first key", sign(Algorithm::ES256, &p256)),
        ("ES384 by the second key", sign(Algorithm::ES384, &p384)),
    ] {
        let mut ws = h.ws_path(&format!("/{token}/ubuntu"));
        ws.send(tungstenite::Message::text(what)).unwrap();
        assert_eq!(ws.read().unwrap(), tungstenite::Message::text(what));
    }
    // A key of neither is a bad signature, not an error about a key.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let t = sign(Algorithm::ES384, &other);
    let a = assert_no_upstream(&h, || {
        refused(&h, &upgrade_request(&format!("/{t}/ubuntu"), ""))
    });
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("signature"), "{}", a.body);
}

/// Opens each VMI's console with a token for it and checks the status and
/// a piece of the body (the upstream's reason) the proxy answers with.
fn answers_each_vmi_with(h: &Harness, cases: &[(&str, u16, &str)]) {
    for &(vmi, status, reason) in cases {
        let tok = Harness::token(&[vmi]);
        let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/{vmi}"), ""));
        assert_eq!(a.status, status, "{vmi}: {}", a.body);
        assert!(a.body.contains(reason), "{vmi}: {}", a.body);
    }
}

#[test]
fn upstream_failures_map_to_502_404_409_503() {
    let h = Harness::start(
        StandInOptions::default()
            .vmi("badaccept", B::BadAccept)
            .vmi("status-403", B::Status(403))
            .vmi("status-404", B::Status(404))
            .vmi("status-409", B::Status(409))
            .vmi("status-500", B::Status(500))
            .vmi("status-503", B::Status(503))
            .vmi("in-use", B::console_in_use()),
    );
    let cases = [
        ("status-500", 502, "stand-in says 500"),
        ("status-404", 404, "stand-in says 404"),
        // KubeVirt's Conflict (a paused VMI, in older releases), a
        // Kubernetes Conflict Status (the stand-in's hand-made Status body:
        // KubeVirt's Go code cannot run here): the VM's state, not an
        // upstream failure.
        ("status-409", 409, "stand-in says 409"),
        // A console already open with preserveSession=true: virt-api passes
        // virt-handler's refusal on inside a 500 (the stand-in's hand-made
        // InternalError Status in its shape); the message says busy.
        ("in-use", 503, "Active VNC connection. Request denied."),
        // Any other 503 is most likely the API server's "service
        // unavailable" for a virt-api it cannot reach: an upstream failure.
        ("status-503", 502, "stand-in says 503"),
        ("status-403", 502, "stand-in says 403"),
        ("badaccept", 502, "Sec-WebSocket-Accept"),
    ];
    answers_each_vmi_with(&h, &cases);
}

/// KubeVirt's virt-api refuses a console with a 400 (a BadRequest Status)
/// when the VMI cannot have one now: still scheduling or stopped (two
/// wordings, new and older releases) or built without a display. Those are
/// the VMI's state, passed on as 409 with virt-api's message, so that a class
/// opening consoles while its VMs boot does not raise the upstream-failure
/// alert; any other 400 stays a 502. The Status bodies are hand-made in the
/// shape virt-api writes (messages from pkg/virt-api/rest: KubeVirt's Go code
/// cannot run here).
#[test]
fn kubevirts_400_for_the_vmis_state_is_409_and_any_other_400_is_502() {
    let bad_request = |message| B::KubeStatus {
        code: 400,
        reason: "BadRequest",
        message,
    };
    let phase = "Unable to connect to VirtualMachineInstance because phase is \
                 Scheduling instead of Running or Scheduled";
    let upgrade_fault = "websocket: the client is not using the websocket protocol: \
                         'upgrade' token not found in 'Connection' header";
    let h = Harness::start(
        StandInOptions::default()
            .vmi("booting", bad_request("VMI is not running"))
            .vmi("older", bad_request(phase))
            .vmi("headless", bad_request("No graphics devices are present."))
            .vmi("fault", bad_request(upgrade_fault)),
    );
    let cases = [
        ("booting", 409, "upstream answered 400: VMI is not running"),
        ("older", 409, phase),
        ("headless", 409, "No graphics devices are present."),
        ("fault", 502, upgrade_fault),
    ];
    answers_each_vmi_with(&h, &cases);
}

/// The API server's generic 404 for a path nothing serves (KubeVirt not
/// installed, or an API_PATH naming a version it does not serve) is the
/// proxy's setup at fault, not a missing VMI: 502, so that it counts as an
/// upstream failure instead of telling every student their VM is gone.
/// (The stand-in's 404 for a path that is not KubeVirt's is hand-made in the
/// API server's words.)
#[test]
fn an_api_path_the_api_server_does_not_serve_is_502_not_404() {
    let opts = StandInOptions {
        kubevirt_paths_only: true,
        ..StandInOptions::serving(B::Echo)
    };
    let h = Harness::start_with(opts, |c| {
        c.api_path = "/apis/subresources.kubevirt.io/v9/namespaces/{namespace}/\
                      virtualmachineinstances/{vmi_name}/vnc"
            .into()
    });
    let tok = Harness::token(&["echo"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body
            .contains("upstream answered 404: the server could not find the requested resource"),
        "{}",
        a.body
    );
    // virt-api's own 404, for a VMI it does not know, is still passed on.
    let h = Harness::start(StandInOptions::default());
    let tok = Harness::token(&["gone"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/gone"), ""));
    assert_eq!(a.status, 404, "{}", a.body);
}

#[test]
fn unreachable_upstream_gets_502() {
    // A port with nothing listening: bind, note the port, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::start_with(B::Echo, |c| c.upstream.port = port);
    let tok = Harness::token(&["echo"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(a.body.contains("unreachable"), "{}", a.body);
}

/// Go's net/http (the API server, `kubectl proxy`) answers with a chunked body when it does not
/// know the length up front, and keeps the connection open. Hand-made here: neither runs in
/// the tests. The refusal comes when the last chunk does, with the Status message as reason,
/// not after UPSTREAM_TIMEOUT_SECONDS as a 504.
#[test]
fn a_chunked_refusal_from_an_upstream_that_stays_open_is_passed_on_at_once() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = upstream.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let head = common::read_head(&mut s);
        assert!(
            head.starts_with("GET /apis/subresources.kubevirt.io/"),
            "{head}"
        );
        let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"virtualmachineinstances.kubevirt.io \"echo\" not found","reason":"NotFound","code":404}"#;
        let (a, b) = status.split_at(40);
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        s.write_all(answer.as_bytes()).unwrap();
        // Open until the proxy lets go (bounded: the proxy's own timeout).
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    });
    let h = Harness::start_with(B::Echo, |c| {
        c.upstream.port = port;
        c.upstream_timeout = Duration::from_secs(60);
    });
    let tok = Harness::token(&["echo"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(
        a.body
            .contains(r#"virtualmachineinstances.kubevirt.io "echo" not found"#),
        "{}",
        a.body
    );
    server.join().unwrap();
}

/// An upstream that answers in full and then resets the connection (a load balancer that aborts
/// after its answer, an upstream killed right after its 101), before the proxy has read the
/// answer: what came before the reset is the answer. Hand-made answers (no API server runs
/// here); the reset is SO_LINGER 0. Before, the reset won and the client got a 502 naming it.
#[test]
fn a_whole_answer_followed_by_a_reset_is_the_answer() {
    let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"virtualmachineinstances.kubevirt.io \"echo\" not found","reason":"NotFound","code":404}"#;
    let not_found = format!(
        "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{status}",
        status.len()
    );
    let upgrade = |head: &str| {
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key");
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        // The 101, then the VNC server's greeting in a binary frame.
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        answer.extend_from_slice(b"\x82\x0cRFB 003.008\n");
        answer
    };
    for upgraded in [false, true] {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = upstream.local_addr().unwrap().port();
        let not_found = not_found.clone();
        let answer_for = move |head: &str| {
            if upgraded {
                upgrade(head)
            } else {
                not_found.into_bytes()
            }
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            let head = common::read_head(&mut s);
            s.write_all(&answer_for(&head)).unwrap();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s); // the reset, right behind the answer
        });
        let h = Harness::start_with(B::Echo, |c| c.upstream.port = port);
        let tok = Harness::token(&["echo"]);
        let what = if upgraded { "101" } else { "404" };
        if upgraded {
            let mut ws = common::ws_connect(h.addr, &format!("/{tok}/echo"))
                .unwrap_or_else(|e| panic!("{what}: no 101 for the client: {e}"));
            let greeting = ws.read().expect("the greeting");
            assert_eq!(
                greeting,
                tungstenite::Message::binary(&b"RFB 003.008\n"[..])
            );
            // Then the client learns that the upstream is gone: 1001 when the proxy reads the
            // end, 1011 when it reads the reset itself (a read may come between the two).
            use tungstenite::protocol::frame::coding::CloseCode;
            match ws.read() {
                Ok(tungstenite::Message::Close(Some(f))) => assert!(
                    matches!(f.code, CloseCode::Away | CloseCode::Error),
                    "{what}: {f:?}"
                ),
                other => panic!("{what}: {other:?} instead of a close"),
            }
        } else {
            let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
            assert_eq!(a.status, 404, "{what}: {}", a.body);
            assert!(a.body.contains("\"echo\" not found"), "{what}: {}", a.body);
        }
        server.join().unwrap();
    }
}

#[test]
fn silent_upstream_gets_504_after_the_timeout() {
    let h = Harness::start_with(B::Silent, |c| c.upstream_timeout = Duration::from_secs(1));
    let tok = Harness::token(&["silent"]);
    let started = Instant::now();
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/silent"), ""));
    assert_eq!(a.status, 504, "{}", a.body);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(h.wait_idle());
}

#[test]
fn slow_clients_get_408_after_the_handshake_timeout() {
    let h = Harness::start_with(B::Echo, |c| c.handshake_timeout = Duration::from_secs(1));
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /x/y HTTP/1.1\r\nHost: x\r\n").unwrap();
    let a = common::read_answer(&mut s);
    assert_eq!(a.status, 408);
    // Meanwhile, and after, the proxy keeps serving.
    let mut ws = h.ws("echo");
    ws.send(tungstenite::Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("still here"));
}

#[test]
fn refusals_close_the_socket_and_leave_nothing_open() {
    let h = Harness::start(B::Echo);
    for _ in 0..20 {
        let a = refused(&h, &upgrade_request("/nope", ""));
        assert_eq!(a.status, 404);
    }
    assert!(h.wait_idle());
}

#[test]
fn a_client_that_leaves_while_the_upstream_is_silent_is_let_go_at_once() {
    let h = Harness::start(B::Silent); // UPSTREAM_TIMEOUT_SECONDS stays at 10
    let tok = Harness::token(&["silent"]);
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.write_all(&upgrade_request(&format!("/{tok}/silent"), ""))
        .unwrap();
    assert!(common::upstream::wait_until(Duration::from_secs(5), || h
        .upstream
        .connections_total()
        == 1));
    drop(s);
    let started = Instant::now();
    assert!(h.wait_idle());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the proxy held the session until the upstream timeout"
    );
}

#[test]
fn a_refusal_and_its_fin_reach_the_client_in_one_segment() {
    // A refusal is all its connection carries, so the proxy writes it with MSG_MORE and the
    // FIN leaves in the same segment. The request comes in two parts: the proxy's ACK of the
    // first (delayed at most 200 ms) is in before the count starts; the second is ACKed at
    // once (a new connection's first segments are acknowledged without delay), then the
    // answer comes: two segments, three if the FIN came on its own.
    use std::io::Read;
    let h = Harness::start(B::Echo);
    let seen = common::segments_within_three_tries(2, || {
        let mut s = TcpStream::connect(h.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /not-a-token HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let before = common::segments_in(&s);
        s.write_all(b"Host: proxy\r\n\r\n").unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let after = common::segments_in(&s);
        let answer = common::parse_answer(&all);
        assert!((400..500).contains(&answer.status), "{answer:?}");
        after - before
    });
    assert_eq!(
        seen,
        Ok(()),
        "the ACK, then the answer with the FIN: these segments in each try"
    );
}

/// What a client gets for `request` sent together with its FIN (`shutdown(Write)`), both
/// queued before the loop looks at the connection again, so that one event reports both:
/// the loop is driven by hand (`poll_once`) to make sure of it. Returns the answer (empty
/// when the proxy closed without one) and the upstream connections made.
fn answer_to_a_request_with_its_fin(request: &[u8]) -> (String, usize) {
    use std::io::{ErrorKind, Read};
    let standin = common::StandIn::serving(B::Echo);
    let config = kubevirt_vnc_proxy::Config::local_dev(
        &format!("ws://{}", standin.addr()),
        SECRET.as_bytes(),
    )
    .expect("config");
    let mut proxy = kubevirt_vnc_proxy::Proxy::bind(config).expect("bind");
    let mut client = TcpStream::connect(proxy.local_addr()).expect("connect");
    // Accepted, with nothing to read yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.handle().stats().accepted == 0 {
        assert!(Instant::now() < deadline, "never accepted");
        proxy
            .poll_once(Some(Duration::from_millis(100)))
            .expect("poll");
    }
    client.write_all(request).expect("request");
    client.shutdown(std::net::Shutdown::Write).expect("FIN");
    // Both are in the proxy's socket before it is polled again.
    std::thread::sleep(Duration::from_millis(100));
    client.set_nonblocking(true).expect("nonblocking");
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            Instant::now() < deadline,
            "no end to the answer: {answer:?}"
        );
        proxy
            .poll_once(Some(Duration::from_millis(20)))
            .expect("poll");
        let mut buf = [0u8; 1024];
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    let answer = String::from_utf8(answer).expect("an answer in UTF-8");
    (answer, standin.connections_total())
}

#[test]
fn a_request_that_comes_with_the_clients_fin_is_still_answered() {
    // A probe is answered (health checkers such as `nc -N` half-close at once).
    let (answer, dialed) =
        answer_to_a_request_with_its_fin(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(dialed, 0);
    // A bad request gets its refusal.
    let (answer, _) = answer_to_a_request_with_its_fin(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer:?}");
    assert!(answer.contains("not a WebSocket upgrade"), "{answer:?}");
    // A good upgrade from a client that can no longer send gets a 400, and nothing is dialed.
    let tok = mint(SECRET, NS, &["echo"], now() + 600);
    let (answer, dialed) =
        answer_to_a_request_with_its_fin(&upgrade_request(&format!("/{tok}/echo"), ""));
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(
        answer.ends_with("the client closed its side right after the upgrade request\n"),
        "{answer:?}"
    );
    assert_eq!(
        dialed, 0,
        "an upstream was dialed for a client that had left"
    );
    // Half a request, then the FIN: closed without an answer (and at once).
    let (answer, _) = answer_to_a_request_with_its_fin(b"GET /healthz HTTP/1.1\r\n");
    assert_eq!(answer, "");
}
