//! Hardening, through real sockets: key rotation and claims policy, every
//! token transport, Origin, token expiry, connection limits, close-style
//! refusals, frame violations in both directions, and slow clients that must
//! not starve real sessions.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use common::tokens::{self, SECRET, lab_claims, mint_claims, now};
use common::upstream::{self, pattern_vec};
use common::{
    Behaviour as B, Harness, NS, StandInOptions, raw_request, read_head, upgrade_request,
};
use jsonwebtoken::{Algorithm, Header};
use kubevirt_vnc_proxy::KeyMaterial;
use kubevirt_vnc_proxy::TokenSource;
use tungstenite::Message;

const OTHER_SECRET: &str = "the-next-secret-also-32-bytes-long!!";

fn key(kid: Option<&str>, secret: &str) -> KeyMaterial {
    KeyMaterial {
        kid: kid.map(str::to_owned),
        bytes: secret.as_bytes().to_vec(),
        source: "test".into(),
    }
}

fn with_kid(secret: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_owned);
    tokens::mint_with_header(secret.as_bytes(), h, claims)
}

/// Upgrade status for `path` with extra header lines; reads only the head.
fn status(h: &Harness, path: &str, extra: &str) -> (u16, String) {
    let (_, head) = common::upgrade_head(h.addr, path, extra);
    (common::status_in(&head), head)
}

/// Read one server frame (unmasked): (opcode, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7F {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0F, payload)
}

/// The close frame that ends `s`, skipping data frames: (code, reason).
fn close_of(s: &mut TcpStream) -> (u16, String) {
    for _ in 0..1000 {
        let (op, p) = read_frame(s);
        if op == 0x8 {
            assert!(p.len() >= 2, "close without a code");
            return (
                u16::from_be_bytes([p[0], p[1]]),
                String::from_utf8_lossy(&p[2..]).into_owned(),
            );
        }
    }
    panic!("no close frame");
}

fn client_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![b0];
    let m = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        f.push(m | payload.len() as u8);
    } else {
        f.push(m | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    if masked {
        let k = [7u8, 1, 9, 3];
        f.extend_from_slice(&k);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

#[test]
fn rotated_keys_are_chosen_by_kid_or_tried_in_order() {
    let h = Harness::start_with(B::Echo, |c| {
        c.jwt.secrets = vec![key(None, SECRET), key(Some("k2"), OTHER_SECRET)];
    });
    let claims = lab_claims(NS, &["echo"], now() + 600);
    let ok = |t: &str| status(&h, &format!("/{t}/echo"), "").0;
    assert_eq!(ok(&with_kid(SECRET, None, &claims)), 101, "old key, no kid");
    assert_eq!(
        ok(&with_kid(OTHER_SECRET, Some("k2"), &claims)),
        101,
        "new key by kid"
    );
    assert_eq!(
        ok(&with_kid(OTHER_SECRET, None, &claims)),
        101,
        "new key, tried in order"
    );
    assert_eq!(
        ok(&with_kid(SECRET, Some("k2"), &claims)),
        401,
        "kid names a key: only that key"
    );
    assert_eq!(
        ok(&with_kid(SECRET, Some("unknown"), &claims)),
        101,
        "unknown kid: tried in order"
    );
    assert_eq!(
        ok(&with_kid(
            "a-third-secret-nobody-configured!!!",
            None,
            &claims
        )),
        401
    );
}

#[test]
fn audience_and_issuer_are_required_when_configured() {
    let h = Harness::start_with(B::Echo, |c| {
        c.jwt.audience = vec!["vnc-proxy".into()];
        c.jwt.issuer = vec!["lab-orchestrator".into()];
    });
    let mut claims = lab_claims(NS, &["echo"], now() + 600);
    let code =
        |c: &serde_json::Value| status(&h, &format!("/{}/echo", mint_claims(SECRET, c)), "").0;
    assert_eq!(code(&claims), 401, "aud and iss missing");
    claims["aud"] = "vnc-proxy".into();
    assert_eq!(code(&claims), 401, "iss missing");
    claims["iss"] = "someone-else".into();
    assert_eq!(code(&claims), 401, "wrong iss");
    claims["iss"] = "lab-orchestrator".into();
    assert_eq!(code(&claims), 101);
    claims["aud"] = "another-service".into();
    assert_eq!(code(&claims), 401, "wrong aud");
}

#[test]
fn every_token_transport() {
    let h = Harness::start_with(B::Echo, |c| {
        c.token_sources = vec![
            TokenSource::Query,
            TokenSource::Header,
            TokenSource::Cookie,
            TokenSource::Protocol,
        ];
        c.token_cookie = "vnc_token".into();
        c.allowed_origins = vec!["https://lab.example".into()];
    });
    let t = Harness::token(&["echo"]);
    let origin = "Origin: https://lab.example\r\n";
    assert_eq!(status(&h, &format!("/echo?token={t}"), origin).0, 101);
    assert_eq!(
        status(
            &h,
            "/echo",
            &format!("{origin}Authorization: Bearer {t}\r\n")
        )
        .0,
        101
    );
    assert_eq!(
        status(
            &h,
            "/echo",
            &format!("{origin}Cookie: a=b; vnc_token={t}\r\n")
        )
        .0,
        101
    );
    let proto = format!(
        "base64url.bearer.authorization.k8s.io.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&t)
    );
    let (code, head) = status(
        &h,
        "/echo",
        &format!("{origin}Sec-WebSocket-Protocol: {proto}, binary\r\n"),
    );
    assert_eq!(code, 101);
    assert!(head.contains("Sec-WebSocket-Protocol: binary"), "{head}");
    assert!(
        !head.contains("bearer"),
        "the credential is never echoed: {head}"
    );
    // A token that does not decode is refused as malformed, not called missing.
    let protocol = |encoded: &str| {
        format!(
            "{origin}Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.{encoded}, binary\r\n"
        )
    };
    for (path, headers) in [
        (format!("/echo?token={t}%zz"), origin.to_owned()),
        ("/echo".to_owned(), protocol("e30.!")),
    ] {
        let a = raw_request(h.addr, &upgrade_request(&path, &headers));
        assert_eq!(a.status, 401, "{path} {headers}");
        assert!(
            a.body.starts_with("malformed token"),
            "{path} {headers}: {}",
            a.body
        );
    }
    // Without a token anywhere: 401. The path source is off: /TOKEN/VMI is 404.
    assert_eq!(status(&h, "/echo", origin).0, 401);
    assert_eq!(status(&h, &format!("/{t}/echo"), origin).0, 404);
    // The query token never reaches the upstream.
    assert!(h.upstream.seen().iter().all(|r| !r.path.contains("token")));
}

#[test]
fn origins_are_checked_before_the_token() {
    let h = Harness::start_with(B::Echo, |c| {
        c.allowed_origins = vec!["https://lab.example".into()]
    });
    let t = Harness::token(&["echo"]);
    let path = format!("/{t}/echo");
    assert_eq!(status(&h, &path, "Origin: https://lab.example\r\n").0, 101);
    let a = raw_request(
        h.addr,
        &upgrade_request(&path, "Origin: https://evil.example\r\n"),
    );
    assert_eq!(a.status, 403);
    assert!(a.body.contains("origin"), "{}", a.body);
    assert_eq!(
        raw_request(h.addr, &upgrade_request(&path, "")).status,
        403,
        "missing Origin"
    );
    // A garbage token from a foreign origin is refused for the origin.
    let a = raw_request(
        h.addr,
        &upgrade_request("/garbage/echo", "Origin: https://evil.example\r\n"),
    );
    assert_eq!(a.status, 403);
}

#[test]
fn a_session_ends_when_its_token_expires() {
    let h = Harness::start_with(B::Sink, |c| c.jwt.leeway_secs = 0);
    // Whole seconds: + 3 leaves at least 2 s to connect on a loaded machine.
    let t = tokens::mint(SECRET, NS, &["sink-exp"], now() + 3);
    let mut s = common::upgraded(h.addr, &format!("/{t}/sink-exp"));
    let started = Instant::now();
    s.write_all(&client_frame(0x82, b"before expiry", true))
        .unwrap();
    let (code, reason) = close_of(&mut s);
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(upstream::wait_until(Duration::from_secs(5), || !h
        .upstream
        .close_codes()
        .is_empty()));
    assert_eq!(
        h.upstream.close_codes(),
        vec![Some(1000)],
        "the upstream gets a normal close"
    );
    assert_eq!(h.upstream.sink_results()[0].0, 13);
}

#[test]
fn frame_violations_from_the_client_close_with_1002_or_1009() {
    let h = Harness::start_with(B::Sink, |c| c.max_frame_size = 1000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", client_frame(0x82, b"x", false), 1002),
        ("RSV1", client_frame(0xC2, b"x", true), 1002),
        ("reserved opcode", client_frame(0x83, b"x", true), 1002),
        ("long ping", client_frame(0x89, &[0; 126], true), 1002),
        ("fragmented ping", client_frame(0x09, b"p", true), 1002),
        ("continuation first", client_frame(0x80, b"x", true), 1002),
        (
            "over MAX_FRAME_SIZE",
            client_frame(0x82, &[1; 1001], true),
            1009,
        ),
    ];
    for (i, (what, frame, want)) in cases.into_iter().enumerate() {
        let vmi = format!("sink-{i}");
        let t = Harness::token(&[&vmi]);
        let mut s = common::upgraded(h.addr, &format!("/{t}/{vmi}"));
        // A good frame first: it is relayed; the bad one is not.
        s.write_all(&client_frame(0x82, b"fine", true)).unwrap();
        s.write_all(&frame).unwrap();
        let (code, reason) = close_of(&mut s);
        assert_eq!(code, want, "{what}: {reason}");
        assert!(!reason.is_empty(), "{what}: a reason");
        assert!(
            upstream::wait_until(Duration::from_secs(5), || h.upstream.close_codes().len()
                > i),
            "{what}"
        );
        // The upstream is told why the session ends; its close answer is
        // replaced by the proxy's own close toward the client.
        assert_eq!(
            h.upstream.close_codes()[i],
            Some(want),
            "{what}: the upstream is told"
        );
        assert_eq!(
            h.upstream.sink_results()[i].0,
            4,
            "{what}: only the good frame crossed"
        );
    }
    assert!(h.wait_idle());
}

#[test]
fn an_upstream_sending_masked_frames_is_treated_as_broken() {
    let h = Harness::start(B::Masked);
    let t = Harness::token(&["masked"]);
    let mut s = common::upgraded(h.addr, &format!("/{t}/masked"));
    let (code, reason) = close_of(&mut s);
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("upstream"), "{reason}");
}

#[test]
fn refusals_as_close_codes_a_page_can_read() {
    let h = Harness::start_with(
        StandInOptions::serving(B::Echo)
            .vmi("in-use", B::console_in_use())
            .vmi("status-409", B::Status(409))
            // KubeVirt's 400 for a VMI that is not running (hand-made Status).
            .vmi(
                "booting",
                B::KubeStatus {
                    code: 400,
                    reason: "BadRequest",
                    message: "VMI is not running",
                },
            ),
        |c| c.reject_with_close = true,
    );
    let good = Harness::token(&["echo", "in-use", "status-409", "booting"]);
    let cases = [
        (format!("/{}/echo", "not.a.token"), 4401),
        (format!("/{good}/other"), 4403),
        (format!("/{good}"), 4404),
        (format!("/{good}/status-409"), 4409),
        (format!("/{good}/booting"), 4409),
        (format!("/{good}/in-use"), 4503),
    ];
    for (path, want) in cases {
        let mut s = common::upgraded(h.addr, &path);
        let (code, reason) = close_of(&mut s);
        assert_eq!(code, want, "{path}: {reason}");
        assert!(!reason.is_empty());
    }
    // Without a valid upgrade there is nothing to close: HTTP it is.
    assert_eq!(
        raw_request(h.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status,
        426
    );
}

/// A page may offer `binary` (noVNC's `wsProtocols` option), and a browser
/// fails a 101 that names none of the subprotocols it offered (1006, the very
/// code REJECT_WITH=close exists to avoid): the refusal's 101 names what a
/// success would have.
#[test]
fn a_refusal_as_a_close_frame_names_the_offered_subprotocol() {
    let h = Harness::start_with(
        StandInOptions::serving(B::Echo).vmi("in-use", B::console_in_use()),
        |c| c.reject_with_close = true,
    );
    let good = Harness::token(&["in-use"]);
    let cases = [
        // Refused before any upstream work, and refused by the upstream.
        (format!("/{}/echo", "not.a.token"), 4401),
        (format!("/{good}/in-use"), 4503),
    ];
    for (path, want) in cases {
        let offer = "Sec-WebSocket-Protocol: binary, base64\r\n";
        let (mut s, head) = common::upgrade_head(h.addr, &path, offer);
        assert!(head.starts_with("HTTP/1.1 101 "), "{path}: {head}");
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case("sec-websocket-protocol: binary")),
            "{path}: the 101 must name the offered subprotocol: {head}"
        );
        let (code, reason) = close_of(&mut s);
        assert_eq!(code, want, "{path}: {reason}");
    }
}

#[test]
fn the_connection_limit_pauses_accepting_and_resumes_at_90_percent() {
    let h = Harness::start_with(B::Echo, |c| c.max_connections = 5);
    let t = Harness::token(&["echo"]);
    let mut open: Vec<_> = (0..5).map(|_| h.ws_path(&format!("/{t}/echo"))).collect();
    // The sixth waits in the backlog: no answer while the proxy is full.
    let mut waiting = TcpStream::connect(h.addr).unwrap();
    waiting
        .write_all(&upgrade_request(&format!("/{t}/echo"), ""))
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        waiting.read(&mut b).is_err(),
        "served although the proxy was full"
    );
    assert!(h.handle().stats().limits_hit >= 1);
    // 5 -> 4 open is 80 %: accepting resumes and the waiting client is served.
    let mut one = open.pop().unwrap();
    one.close(None).unwrap();
    drop(one);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(read_head(&mut waiting).starts_with("HTTP/1.1 101"));
}

#[test]
fn too_many_connections_from_one_address_get_503() {
    let h = Harness::start_with(B::Echo, |c| c.max_connections_per_ip = 2);
    let t = Harness::token(&["echo"]);
    let _a = h.ws_path(&format!("/{t}/echo"));
    let _b = h.ws_path(&format!("/{t}/echo"));
    let third = raw_request(h.addr, &upgrade_request(&format!("/{t}/echo"), ""));
    assert_eq!(third.status, 503);
    assert!(
        third.body.contains("too many connections"),
        "{}",
        third.body
    );
}

#[test]
fn huge_and_truncated_tokens_get_exact_refusals() {
    let h = Harness::start(B::Echo);
    let t = Harness::token(&["echo"]);
    let truncated = &t[..t.len() / 2];
    assert_eq!(
        raw_request(h.addr, &upgrade_request(&format!("/{truncated}/echo"), "")).status,
        401
    );
    // A request line over the head limit on its own: 414 URI Too Long.
    let huge = "a".repeat(64 << 10);
    assert_eq!(
        raw_request(h.addr, &upgrade_request(&format!("/{huge}/echo"), "")).status,
        414
    );
    let long_vmi = "a".repeat(254);
    let t = Harness::token(&[&long_vmi]);
    assert_eq!(
        raw_request(h.addr, &upgrade_request(&format!("/{t}/{long_vmi}"), "")).status,
        403
    );
    assert_eq!(
        h.upstream.connections_total(),
        0,
        "no upstream connection for any of them"
    );
}

#[test]
fn a_thousand_slow_clients_do_not_starve_real_sessions() {
    // Each slow client holds two descriptors in this process: its own socket and the proxy's.
    let n = common::fit_to_nofile_limit(
        "a_thousand_slow_clients_do_not_starve_real_sessions",
        1000,
        2,
    );
    // The slow clients must outlast the rounds however slow the machine: a
    // 30 s handshake timeout (counted from accept), far past the bounds below.
    let h = Harness::start_with(B::Echo, |c| c.handshake_timeout = Duration::from_secs(30));
    let mut slow: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(h.addr).unwrap())
        .collect();
    let t = Harness::token(&["echo"]);
    let request = upgrade_request(&format!("/{t}/echo"), "");
    for second in 0..3 {
        // Each slow client sends one more byte of its request every second.
        for s in &mut slow {
            let _ = s.write_all(&request[second..second + 1]);
        }
        let started = Instant::now();
        for i in 0..10 {
            let mut ws = h.ws_path(&format!("/{t}/echo"));
            ws.send(Message::binary(pattern_vec(i, 100))).unwrap();
            assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(i, 100)));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "10 real sessions took {:?} beside {n} slow clients",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1000).saturating_sub(started.elapsed()));
    }
    assert!(h.handle().stats().open_sessions >= n);
}

#[test]
fn replies_to_frames_before_a_violation_still_reach_the_client() {
    // As with a direct connection (Autobahn 3.2, 4.1.3, 5.15): a valid
    // message, then a bad frame in the same write; the echo of the message
    // arrives, then the proxy's close with 1002 and its reason.
    let h = Harness::start(B::Echo);
    let t = Harness::token(&["echo-ff"]);
    let mut s = common::upgraded(h.addr, &format!("/{t}/echo-ff"));
    let mut both = client_frame(0x81, b"hello", true);
    both.extend(client_frame(0xA1, b"rsv", true));
    s.write_all(&both).unwrap();
    let (op, payload) = read_frame(&mut s);
    assert_eq!(
        (op, payload.as_slice()),
        (0x1, &b"hello"[..]),
        "the echo comes first"
    );
    let (code, reason) = close_of(&mut s);
    assert_eq!((code, reason.as_str()), (1002, "reserved bits set"));
}

#[test]
fn with_several_token_carriers_the_first_in_order_decides() {
    // Header, then subprotocol, then query, then cookie: the first carrier
    // that holds a token is the one checked, and no later one is tried, so
    // a page cannot fall back from a refused token to another it carries.
    let h = Harness::start_with(B::Echo, |c| {
        c.token_sources = vec![
            TokenSource::Cookie,
            TokenSource::Query,
            TokenSource::Protocol,
            TokenSource::Header,
        ];
        c.token_cookie = "vnc_token".into();
        c.allowed_origins = vec!["https://lab.example".into()];
    });
    let good = Harness::token(&["echo"]);
    let other = Harness::token(&["other-vmi"]);
    let origin = "Origin: https://lab.example\r\n";
    let header = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let protocol = |t: &str| {
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
        format!(
            "Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.{encoded}, binary\r\n"
        )
    };
    let cookie = |t: &str| format!("Cookie: vnc_token={t}\r\n");
    // (path, headers) for token `a` in the earlier carrier and `b` in the later.
    let request = |what: &str, a: &str, b: &str| -> (String, String) {
        match what {
            "header before subprotocol" => ("/echo".into(), header(a) + &protocol(b)),
            "subprotocol before query" => (format!("/echo?token={b}"), protocol(a)),
            "query before cookie" => (format!("/echo?token={a}"), cookie(b)),
            _ => unreachable!("{what}"),
        }
    };
    for what in [
        "header before subprotocol",
        "subprotocol before query",
        "query before cookie",
    ] {
        let (path, headers) = request(what, &good, &other);
        let headers = format!("{origin}{headers}");
        assert_eq!(status(&h, &path, &headers).0, 101, "{what}: earlier good");
        let (path, headers) = request(what, &other, &good);
        let headers = format!("{origin}{headers}");
        let a = raw_request(h.addr, &upgrade_request(&path, &headers));
        assert_eq!(a.status, 403, "{what}: earlier for another VMI: {}", a.body);
    }
}
