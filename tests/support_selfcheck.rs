//! Checks the test-support code itself: every behaviour of the stand-in upstream, driven
//! directly with a tungstenite client (no proxy involved), and the token helpers.

mod support {
    pub mod pki;
    pub mod tokens;
    pub mod upstream;
}

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::{Value, json};
use support::pki::TestPki;
use support::tokens;
use support::upstream::{
    self, Behaviour as B, FNV_OFFSET, StandIn, StandInOptions, fnv1a, pattern, pattern_vec,
    wait_until,
};
use tungstenite::client::IntoClientRequest;
use tungstenite::error::ProtocolError;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, WebSocket};

const T: Duration = Duration::from_secs(5);

fn vmi_path(vmi: &str) -> String {
    format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/{vmi}/vnc?preserveSession=true"
    )
}

fn raw_stream(si: &StandIn) -> TcpStream {
    let s = TcpStream::connect(si.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

fn try_connect(si: &StandIn, vmi: &str) -> Result<WebSocket<TcpStream>, WsError> {
    let url = format!("ws://{}{}", si.addr(), vmi_path(vmi));
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    match tungstenite::client::client_with_config(url, raw_stream(si), Some(config)) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            assert!(resp.headers().get("sec-websocket-protocol").is_none());
            Ok(ws)
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("blocking stream"),
    }
}

fn connect(si: &StandIn, vmi: &str) -> WebSocket<TcpStream> {
    try_connect(si, vmi).unwrap_or_else(|e| panic!("connect {vmi}: {e}"))
}

/// Reads until the close handshake completes; returns the peer's close frame (if it sent one).
fn finish<S: Read + Write>(ws: &mut WebSocket<S>) -> Option<(u16, String)> {
    let mut got = None;
    for _ in 0..1000 {
        match ws.read() {
            Ok(Message::Close(f)) => got = f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Ok(_) => {}
            Err(WsError::ConnectionClosed) => return got,
            Err(e) => panic!("unexpected error while closing: {e}"),
        }
    }
    panic!("close handshake did not finish")
}

/// Sends a raw request and reads the whole answer until EOF.
fn raw_exchange(si: &StandIn, request: &str) -> String {
    let mut s = raw_stream(si);
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: upstream\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Parses `HTTP/1.1 CODE REASON`, the headers and the body; checks Content-Length.
fn parse_response(resp: &str) -> (u16, String, Vec<(String, String)>, String) {
    let (head, body) = resp.split_once("\r\n\r\n").expect("complete head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    let mut parts = status.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"));
    let code = parts.next().unwrap().parse().unwrap();
    let reason = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (code, reason, headers, body.to_string())
}

#[test]
fn pattern_and_fnv() {
    assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
    assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    assert_eq!(
        fnv1a(fnv1a(FNV_OFFSET, b"foo"), b"bar"),
        fnv1a(FNV_OFFSET, b"foobar")
    );

    let all = pattern_vec(0, 1 << 20);
    assert!(all.iter().any(|&b| b != all[0]), "not constant");
    assert_ne!(all[..256], all[256..512], "not period 256");
    assert_ne!(all[..65536], all[65536..131072], "not period 65536");
    let mut part = vec![0; 1000];
    pattern(12345, &mut part);
    assert_eq!(part, all[12345..13345], "offset is absolute");

    // The checksum notices reordered and duplicated chunks, not only lost bytes.
    let sum = fnv1a(FNV_OFFSET, &all);
    let mut swapped = all.clone();
    swapped[..8192].rotate_left(4096);
    assert_ne!(fnv1a(FNV_OFFSET, &swapped), sum);
    let mut duplicated = all.clone();
    duplicated.copy_within(65536..65536 + 4096, 131072);
    assert_ne!(fnv1a(FNV_OFFSET, &duplicated), sum);
}

#[test]
fn echo_and_seen() {
    let si = StandIn::serving(B::Echo);
    let mut ws = connect(&si, "echo-1");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![1u8, 2, 3]));
    ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec().into()));
    ws.close(None).unwrap();
    assert_eq!(finish(&mut ws), None);
    assert!(wait_until(T, || si.connections_open() == 0));

    let seen = si.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, vmi_path("echo-1"));
    assert_eq!(seen[0].query(), Some("preserveSession=true"));
    assert_eq!(seen[0].header("Sec-WebSocket-Version"), Some("13"));
    assert!(seen[0].header("sec-websocket-key").is_some());
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(n, _)| *n == n.to_ascii_lowercase())
    );
    assert_eq!(si.connections_total(), 1);
}

#[test]
fn a_default_behaviour_serves_every_name() {
    let si = StandIn::serving(B::Echo);
    for path in ["/", "/whatever/unknown-name"] {
        let url = format!("ws://{}{path}", si.addr());
        let (mut ws, _) = tungstenite::client(url, raw_stream(&si)).unwrap();
        ws.send(Message::text("x")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("x"));
        ws.close(None).unwrap();
        finish(&mut ws);
    }
    let seen: Vec<String> = si.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, ["/", "/whatever/unknown-name"]);
    assert_eq!(
        upstream::vmi_name("/a/virtualmachineinstances/vnc-x/vnc?y=1"),
        "vnc-x"
    );
    assert_eq!(upstream::vmi_name("/a/b/sink?q"), "sink");
    assert_eq!(upstream::vmi_name("/"), "");
}

#[test]
fn echo_16_mib_message() {
    let si = StandIn::serving(B::Echo);
    let mut ws = connect(&si, "echo-big");
    let big = pattern_vec(7, 16 << 20);
    ws.send(Message::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "16 MiB echo intact"),
        m => panic!("unexpected {m:?}"),
    }
    ws.close(None).unwrap();
    finish(&mut ws);
}

#[test]
fn vnc_speaks_first() {
    let si = StandIn::serving(B::Vnc);
    let mut ws = connect(&si, "vnc-ubuntu");
    assert_eq!(ws.read().unwrap(), Message::binary(&b"RFB 003.008\n"[..]));
    ws.send(Message::binary(&b"RFB 003.008\n"[..])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(&b"RFB 003.008\n"[..]));
    ws.close(None).unwrap();
    finish(&mut ws);
}

fn read_stream(ws: &mut WebSocket<TcpStream>, frame: usize) -> (Vec<u8>, Option<(u16, String)>) {
    let mut got = Vec::new();
    loop {
        match ws.read().unwrap() {
            Message::Binary(b) => {
                assert!(b.len() <= frame);
                got.extend_from_slice(&b);
            }
            Message::Close(f) => {
                let f = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                assert!(matches!(ws.read(), Err(WsError::ConnectionClosed)));
                return (got, f);
            }
            m => panic!("unexpected {m:?}"),
        }
    }
}

#[test]
fn stream_small() {
    let si = StandIn::start_with(StandInOptions::default().vmi(
        "stream-100000-4096",
        B::Stream {
            total: 100_000,
            frame: 4096,
        },
    ));
    let mut ws = connect(&si, "stream-100000-4096");
    let (got, close) = read_stream(&mut ws, 4096);
    assert_eq!(got.len(), 100_000);
    assert!(got == pattern_vec(0, 100_000));
    assert_eq!(close, Some((1000, String::new())));
    assert!(wait_until(T, || si.connections_open() == 0));
}

#[test]
fn stream_frames_larger_than_write_cap() {
    // 2 MB frames exceed the stand-in's 1 MiB write-buffer cap: exercises WriteBufferFull.
    let si = StandIn::start_with(StandInOptions::default().vmi(
        "stream-5000000-2000000",
        B::Stream {
            total: 5_000_000,
            frame: 2_000_000,
        },
    ));
    let mut ws = connect(&si, "stream-5000000-2000000");
    let (got, close) = read_stream(&mut ws, 2_000_000);
    assert!(got == pattern_vec(0, 5_000_000));
    assert_eq!(close, Some((1000, String::new())));
}

#[test]
fn sink_counts_and_checksums() {
    let si = StandIn::serving(B::Sink);
    let mut ws = connect(&si, "sink");
    let mut sum = FNV_OFFSET;
    let mut bytes = 0u64;
    for i in 0..20u64 {
        let chunk = pattern_vec(i * 1000, 1000 + i as usize);
        sum = fnv1a(sum, &chunk);
        bytes += chunk.len() as u64;
        ws.send(Message::binary(chunk)).unwrap();
    }
    ws.send(Message::text("tail")).unwrap();
    sum = fnv1a(sum, b"tail");
    bytes += 4;
    ws.close(None).unwrap();
    finish(&mut ws);
    // Recorded before the close reply was sent, so it is already there.
    assert_eq!(si.sink_results(), vec![(bytes, sum)]);

    // A sink whose peer vanishes without a close frame is recorded too.
    let mut ws = connect(&si, "sink-2");
    ws.send(Message::binary(vec![9u8; 10])).unwrap();
    drop(ws);
    assert!(wait_until(T, || si.sink_results().len() == 2));
    assert_eq!(si.sink_results()[1], (10, fnv1a(FNV_OFFSET, &[9u8; 10])));
}

#[test]
fn dropafter_ends_without_close_frame() {
    let si = StandIn::serving(B::DropAfter(3000));
    let mut ws = connect(&si, "dropafter-3000");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 3000)));
    match ws.read() {
        Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {}
        other => panic!("expected a drop without close, got {other:?}"),
    }
}

#[test]
fn closeafter_closes_with_done() {
    let si = StandIn::serving(B::CloseAfter(5000));
    let mut ws = connect(&si, "closeafter-5000");
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 5000)));
    match ws.read().unwrap() {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Normal);
            assert_eq!(f.reason.as_str(), "done");
        }
        m => panic!("unexpected {m:?}"),
    }
    assert!(matches!(ws.read(), Err(WsError::ConnectionClosed)));
}

#[test]
fn status_answers() {
    let si = StandIn::start_with(
        StandInOptions::default()
            .vmi("status-404", B::Status(404))
            .vmi("status-503", B::Status(503))
            .vmi("status-403", B::Status(403)),
    );
    for (code, reason) in [
        (404, "Not Found"),
        (503, "Service Unavailable"),
        (403, "Forbidden"),
    ] {
        let resp = raw_exchange(&si, &upgrade_request(&vmi_path(&format!("status-{code}"))));
        let (got, got_reason, headers, body) = parse_response(&resp);
        assert_eq!((got, got_reason.as_str()), (code, reason));
        let h = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("content-type"), Some("application/json"));
        assert_eq!(h("connection"), Some("close"));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": format!("stand-in says {code}"), "code": code})
        );
    }
    // And through a WebSocket client: a plain HTTP error, not an upgrade.
    match try_connect(&si, "status-503") {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn not_an_upgrade_gets_400() {
    let si = StandIn::serving(B::Echo);
    let resp = raw_exchange(&si, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(parse_response(&resp).0, 400);
    assert_eq!(si.seen().len(), 1);
}

/// A name the test did not declare picks no behaviour by its spelling: without a default it is
/// refused with a 404 that says so, even when it reads like one of the behaviours.
#[test]
fn an_unlisted_name_does_not_pick_a_behaviour() {
    let si = StandIn::start_with(StandInOptions::default().vmi("declared", B::Vnc));
    for name in [
        "echo",
        "vnc",
        "stream-1000-10",
        "status-200",
        "sink",
        "undeclared",
    ] {
        let resp = raw_exchange(&si, &upgrade_request(&vmi_path(name)));
        let (code, v) = status_body(&resp);
        assert_eq!(code, 404, "{name}: {resp}");
        assert_eq!(v["reason"], "NotFound", "{name}");
        assert_eq!(
            v["message"],
            format!("stand-in: no behaviour declared for VMI {name:?}"),
            "{name}"
        );
    }
    // The declared name gets what was declared (Vnc speaks first), whatever it is called.
    let mut ws = connect(&si, "declared");
    assert_eq!(ws.read().unwrap(), Message::binary(&b"RFB 003.008\n"[..]));
    ws.close(None).unwrap();
    finish(&mut ws);
    // An entry overrides the default for its name only.
    let si = StandIn::start_with(StandInOptions::serving(B::Echo).vmi("vnc-like", B::Status(418)));
    let resp = raw_exchange(&si, &upgrade_request(&vmi_path("vnc-like")));
    assert_eq!(parse_response(&resp).0, 418);
    let mut ws = connect(&si, "status-500");
    echo_once(&mut ws, b"echoed by default".to_vec());
}

#[test]
#[should_panic(expected = "a Stream frame of 0 bytes")]
fn a_declaration_that_cannot_be_served_panics() {
    let _ = StandIn::start_with(StandInOptions::default().vmi(
        "zero",
        B::Stream {
            total: 10,
            frame: 0,
        },
    ));
}

#[test]
fn badaccept_rejected_by_client() {
    let si = StandIn::serving(B::BadAccept);
    match try_connect(&si, "badaccept") {
        Err(WsError::Protocol(ProtocolError::SecWebSocketAcceptKeyMismatch)) => {}
        other => panic!("expected accept-key mismatch, got {:?}", other.map(|_| ())),
    }
    // The stand-in noticed the client going away.
    assert!(wait_until(T, || si.connections_open() == 0));
}

#[test]
fn masked_frame_rejected_by_client() {
    let si = StandIn::serving(B::Masked);
    let mut ws = connect(&si, "masked");
    match ws.read() {
        Err(WsError::Protocol(ProtocolError::MaskedFrameFromServer)) => {}
        other => panic!("expected a masked-frame error, got {other:?}"),
    }
    // The raw bytes after the 101, for the record. (Another VMI name: the first session is
    // still open, and the path asks for preserveSession=true.)
    let mut s = raw_stream(&si);
    s.write_all(upgrade_request(&vmi_path("masked-raw")).as_bytes())
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf[..1]).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "));
    let mut frame = [0u8; 12];
    s.read_exact(&mut frame).unwrap();
    assert_eq!(frame[0], 0x82);
    assert_eq!(frame[1], 0x80 | 6, "MASK bit set");
    let unmasked: Vec<u8> = (0..6).map(|i| frame[6 + i] ^ frame[2 + i % 4]).collect();
    assert_eq!(unmasked, b"masked");
}

#[test]
fn silent_never_answers_and_holds_until_eof() {
    let si = StandIn::serving(B::Silent);
    let mut s = raw_stream(&si);
    s.write_all(upgrade_request(&vmi_path("silent")).as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = s.read(&mut buf).expect_err("no answer");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert!(wait_until(T, || si.seen().len() == 1));
    assert_eq!(si.connections_open(), 1);
    drop(s);
    assert!(wait_until(T, || si.connections_open() == 0));
}

#[test]
fn drop_does_not_hang_and_closes_connections() {
    let si = StandIn::serving(B::Silent);
    let mut s = raw_stream(&si);
    s.write_all(upgrade_request(&vmi_path("silent")).as_bytes())
        .unwrap();
    assert!(wait_until(T, || si.seen().len() == 1));
    let started = Instant::now();
    drop(si);
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "socket shut down by Drop");
}

#[test]
fn counters() {
    let si = StandIn::serving(B::Echo);
    let a = connect(&si, "echo-a");
    let b = connect(&si, "echo-b");
    assert!(wait_until(T, || si.connections_open() == 2));
    assert_eq!(si.connections_total(), 2);
    drop(a);
    drop(b);
    assert!(wait_until(T, || si.connections_open() == 0));
    assert_eq!(si.connections_total(), 2);
}

#[test]
fn tokens_decode() {
    let exp = tokens::now() + 600;
    let t = tokens::mint(tokens::SECRET, "lab-ns", &["ubuntu", "win-10"], exp);
    let header = jsonwebtoken::decode_header(&t).unwrap();
    assert_eq!(
        (header.alg, header.typ.as_deref()),
        (Algorithm::HS256, Some("JWT"))
    );
    let key = DecodingKey::from_secret(tokens::SECRET.as_bytes()).unwrap();
    let claims: Value = jsonwebtoken::decode(&t, &key, &Validation::new(Algorithm::HS256))
        .unwrap()
        .claims;
    assert_eq!(
        claims,
        tokens::lab_claims("lab-ns", &["ubuntu", "win-10"], exp)
    );
    assert_eq!(claims["lab_instance"]["additional_data"], Value::Null);

    let wrong = tokens::mint("another-secret-that-is-long-enough-too", "lab-ns", &[], exp);
    assert!(
        jsonwebtoken::decode::<Value>(&wrong, &key, &Validation::new(Algorithm::HS256)).is_err()
    );

    let none = tokens::unsigned(&json!({"exp": exp}));
    assert!(none.ends_with('.'));
    assert!(
        jsonwebtoken::decode::<Value>(&none, &key, &Validation::new(Algorithm::HS256)).is_err()
    );
    let first = none.split('.').next().unwrap();
    assert_eq!(first, tokens::b64url(br#"{"alg":"none","typ":"JWT"}"#));

    let mut h = jsonwebtoken::Header::new(Algorithm::HS512);
    h.kid = Some("k2".into());
    let t = tokens::mint_with_header(
        b"k2-secret-k2-secret-k2-secret-k2-secret",
        h,
        &json!({"exp": exp}),
    );
    let key2 = DecodingKey::from_secret(b"k2-secret-k2-secret-k2-secret-k2-secret").unwrap();
    assert!(jsonwebtoken::decode::<Value>(&t, &key2, &Validation::new(Algorithm::HS512)).is_ok());
    assert_eq!(
        jsonwebtoken::decode_header(&t).unwrap().kid.as_deref(),
        Some("k2")
    );

    let rs = tokens::mint_rs256(
        include_bytes!("fixtures/rsa_private.pem"),
        &json!({"exp": exp}),
    );
    let pubkey = DecodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_public.pem")).unwrap();
    assert!(
        jsonwebtoken::decode::<Value>(&rs, &pubkey, &Validation::new(Algorithm::RS256)).is_ok()
    );
}

#[test]
fn b64url_vectors() {
    // RFC 4648 test vectors, unpadded, plus the url-safe alphabet.
    let cases: [(&[u8], &str); 8] = [
        (b"", ""),
        (b"f", "Zg"),
        (b"fo", "Zm8"),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg"),
        (b"fooba", "Zm9vYmE"),
        (b"foobar", "Zm9vYmFy"),
        (&[0xfb, 0xff, 0xbf], "-_-_"),
    ];
    for (input, want) in cases {
        assert_eq!(tokens::b64url(input), want);
    }
}

// ---------------------------------------------------------------------------------------------
// Options: TLS, bearer, KubeVirt paths, preserveSession, subprotocol, bridge

type TlsClient = StreamOwned<ClientConnection, TcpStream>;

fn path_with(version: &str, vmi: &str, query: &str) -> String {
    format!(
        "/apis/subresources.kubevirt.io/{version}/namespaces/lab-ns/virtualmachineinstances/{vmi}/vnc{query}"
    )
}

/// Dials `addr` over TLS expecting `name`, and completes the handshake. A certificate the
/// client refuses comes back as the rustls error.
fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> Result<TlsClient, rustls::Error> {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.set_write_timeout(Some(T)).unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut conn = ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            let text = e.to_string();
            return match e.into_inner().map(|b| b.downcast::<rustls::Error>()) {
                Some(Ok(tls)) => Err(*tls),
                _ => panic!("TLS handshake I/O error: {text}"),
            };
        }
    }
    Ok(StreamOwned::new(conn, sock))
}

/// A WebSocket handshake over `stream` for `url`, with extra request headers.
fn ws_over<S: Read + Write>(
    stream: S,
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<(WebSocket<S>, tungstenite::handshake::client::Response), WsError> {
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().append(*name, value.parse().unwrap());
    }
    match tungstenite::client::client_with_config(req, stream, None) {
        Ok(x) => Ok(x),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("blocking stream"),
    }
}

/// Sends `request` over `stream` and reads the whole answer until EOF (or TLS close_notify).
fn exchange_on(mut stream: impl Read + Write, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Sends `request` and reads only the response head (the 101 keeps the connection open).
fn head_on(stream: &mut impl Read, request_writer: impl FnOnce()) -> String {
    request_writer();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "EOF inside the head");
        got.push(byte[0]);
    }
    String::from_utf8(got).unwrap()
}

fn raw_head(si: &StandIn, request: &str) -> String {
    let mut s = raw_stream(si);
    let mut w = s.try_clone().unwrap();
    head_on(&mut s, || w.write_all(request.as_bytes()).unwrap())
}

fn upgrade_request_with(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: upstream\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn status_body(resp: &str) -> (u16, Value) {
    let (code, _, _, body) = parse_response(resp);
    (code, serde_json::from_str(&body).unwrap())
}

fn echo_once<S: Read + Write>(ws: &mut WebSocket<S>, payload: Vec<u8>) {
    ws.send(Message::binary(payload.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == payload[..], "echo intact"),
        m => panic!("unexpected {m:?}"),
    }
}

#[test]
fn tls_echo_with_bearer_and_kubevirt_paths() {
    let pki = TestPki::new();
    let si = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls()),
        bearer: Some("sa-token".into()),
        kubevirt_paths_only: true,
        ..StandInOptions::serving(B::Echo)
    });
    assert!(si.is_tls());
    assert_eq!(si.base_url(), format!("wss://{}", si.addr()));

    // Both names in the certificate work.
    for name in ["127.0.0.1", "localhost"] {
        let stream = tls_connect(si.addr(), pki.client_config(), name).unwrap();
        // A VMI name per round: the path asks for preserveSession=true, and the previous
        // round's session may still be ending on the stand-in's side.
        let url = format!("{}{}", si.base_url(), vmi_path(&format!("echo-tls-{name}")));
        let (mut ws, resp) = ws_over(stream, &url, &[("authorization", "Bearer sa-token")])
            .unwrap_or_else(|e| panic!("wss via {name}: {e}"));
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("over tls")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("over tls"));
        echo_once(&mut ws, pattern_vec(3, 1 << 20));
        ws.close(None).unwrap();
        assert_eq!(finish(&mut ws), None);
    }

    // The refusals come over TLS too, and end with close_notify (read_to_end sees a clean EOF).
    let tls = || tls_connect(si.addr(), pki.client_config(), "127.0.0.1").unwrap();
    let resp = exchange_on(tls(), &upgrade_request(&vmi_path("echo")));
    assert_eq!(status_body(&resp).0, 401);
    let resp = exchange_on(
        tls(),
        &upgrade_request_with("/echo", "Authorization: Bearer sa-token\r\n"),
    );
    assert_eq!(status_body(&resp).0, 404);

    assert!(wait_until(T, || si.connections_open() == 0));
    assert_eq!(si.seen().len(), 4);
    assert_eq!(
        si.seen()[0].header("authorization"),
        Some("Bearer sa-token")
    );
}

#[test]
fn tls_sessions_of_every_kind() {
    // The behaviours are generic over the stream: spot-check the ones with special endings.
    let pki = TestPki::new();
    let si = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls()),
        ..StandInOptions::default()
            .vmi(
                "stream-300000-10000",
                B::Stream {
                    total: 300_000,
                    frame: 10_000,
                },
            )
            .vmi("sink-tls", B::Sink)
            .vmi("dropafter-1000", B::DropAfter(1000))
            .vmi("status-418", B::Status(418))
    });
    let tls = || tls_connect(si.addr(), pki.client_config(), "localhost").unwrap();
    let url = |vmi: &str| format!("{}{}", si.base_url(), vmi_path(vmi));

    let (mut ws, _) = ws_over(tls(), &url("stream-300000-10000"), &[]).unwrap();
    let mut got = Vec::new();
    let close = loop {
        match ws.read().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Close(f) => break f.map(|f| u16::from(f.code)),
            m => panic!("unexpected {m:?}"),
        }
    };
    assert!(got == pattern_vec(0, 300_000));
    assert_eq!(close, Some(1000));
    assert!(matches!(ws.read(), Err(WsError::ConnectionClosed)));

    let (mut ws, _) = ws_over(tls(), &url("sink-tls"), &[]).unwrap();
    ws.send(Message::binary(pattern_vec(0, 50_000))).unwrap();
    ws.close(None).unwrap();
    finish(&mut ws);
    assert_eq!(
        si.sink_results(),
        vec![(50_000, fnv1a(FNV_OFFSET, &pattern_vec(0, 50_000)))]
    );
    assert_eq!(si.close_codes(), vec![Some(1005)]);

    let (mut ws, _) = ws_over(tls(), &url("dropafter-1000"), &[]).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(pattern_vec(0, 1000)));
    assert!(ws.read().is_err(), "dropped without a close frame");

    let resp = exchange_on(tls(), &upgrade_request(&vmi_path("status-418")));
    assert_eq!(status_body(&resp).0, 418);
    assert!(wait_until(T, || si.connections_open() == 0));
}

#[test]
fn tls_wrong_ca_is_rejected() {
    let trusted = TestPki::new();
    let other = TestPki::new();
    assert_ne!(trusted.ca_pem, other.ca_pem);
    let si = StandIn::start_with(StandInOptions {
        tls: Some(other.server_tls()),
        ..StandInOptions::serving(B::Echo)
    });
    match tls_connect(si.addr(), trusted.client_config(), "127.0.0.1") {
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {}
        other => panic!("expected UnknownIssuer, got {:?}", other.map(|_| ())),
    }
    // The stand-in's own CA is fine; the failed one left nothing behind.
    assert!(tls_connect(si.addr(), other.client_config(), "127.0.0.1").is_ok());
    assert!(wait_until(T, || si.connections_open() == 0));
    assert!(si.seen().is_empty());
    assert_eq!(si.connections_total(), 2);
}

#[test]
fn tls_name_mismatch_is_rejected() {
    let pki = TestPki::new();
    let si = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls_for_name("not-the-host.example")),
        ..StandInOptions::serving(B::Echo)
    });
    for dialed in ["127.0.0.1", "localhost"] {
        match tls_connect(si.addr(), pki.client_config(), dialed) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            other => panic!(
                "{dialed}: expected a name mismatch, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // The same certificate is accepted for the name it was made for.
    let stream = tls_connect(si.addr(), pki.client_config(), "not-the-host.example").unwrap();
    let url = format!("wss://not-the-host.example{}", vmi_path("echo"));
    let (mut ws, _) = ws_over(stream, &url, &[]).unwrap();
    echo_once(&mut ws, b"named".to_vec());
}

#[test]
fn pki_helpers() {
    let pki = TestPki::new();
    assert!(pki.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let tls = pki.server_tls();
    assert_eq!(tls.chain.len(), 1);
    assert!(tls.server_config().is_ok());
    let copy = tls.clone();
    assert_eq!(copy.chain, tls.chain);
    assert_eq!(copy.key.secret_der(), tls.key.secret_der());
    assert!(!format!("{tls:?}").contains(&format!("{:?}", tls.key.secret_der())));

    let path = std::env::temp_dir().join(format!("stand-in-ca-{}.pem", std::process::id()));
    pki.write_ca(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pki.ca_pem);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn bearer_required() {
    let si = StandIn::start_with(StandInOptions {
        bearer: Some("sa-token".into()),
        ..StandInOptions::serving(B::Echo).vmi("status-200", B::Status(200))
    });
    let want = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": "Unauthorized", "reason": "Unauthorized", "code": 401});
    for extra in [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: Bearer sa-token-and-more\r\n",
        "Authorization: bearer sa-token\r\n",
        "Authorization: Basic c2EtdG9rZW4=\r\n",
        "Authorization: Bearer sa-token\r\nAuthorization: Bearer sa-token\r\n",
    ] {
        let resp = raw_exchange(&si, &upgrade_request_with(&vmi_path("echo"), extra));
        let (code, reason, _, body) = parse_response(&resp);
        assert_eq!((code, reason.as_str()), (401, "Unauthorized"), "{extra:?}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), want);
    }
    // Even the non-upgrading behaviours are behind the check.
    let resp = raw_exchange(&si, &upgrade_request(&vmi_path("status-200")));
    assert_eq!(parse_response(&resp).0, 401);

    let url = format!("{}{}", si.base_url(), vmi_path("echo-auth"));
    let (mut ws, resp) = ws_over(
        raw_stream(&si),
        &url,
        &[("authorization", "Bearer sa-token")],
    )
    .unwrap();
    assert_eq!(resp.status(), 101);
    echo_once(&mut ws, b"authorized".to_vec());
    ws.close(None).unwrap();
    finish(&mut ws);

    let seen = si.seen();
    assert_eq!(seen.len(), 8, "refused requests are recorded too");
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(seen[1].header("authorization"), Some("Bearer wrong"));
    assert_eq!(seen[7].header("authorization"), Some("Bearer sa-token"));
}

#[test]
fn kubevirt_paths_only() {
    let si = StandIn::start_with(StandInOptions {
        kubevirt_paths_only: true,
        ..StandInOptions::serving(B::Echo).vmi("status-503", B::Status(503))
    });
    for version in ["v1", "v1alpha3"] {
        for query in ["", "?preserveSession=false"] {
            let url = format!("{}{}", si.base_url(), path_with(version, "echo", query));
            let (mut ws, _) = ws_over(raw_stream(&si), &url, &[]).unwrap();
            echo_once(&mut ws, version.as_bytes().to_vec());
            ws.close(None).unwrap();
            finish(&mut ws);
        }
    }
    // Behaviours still apply on the right paths.
    let resp = raw_exchange(&si, &upgrade_request(&path_with("v1", "status-503", "")));
    assert_eq!(parse_response(&resp).0, 503);

    for path in [
        "/".to_string(),
        "/echo".to_string(),
        path_with("v2", "echo", ""),
        path_with("v1", "echo", "").replace("/vnc", "/console"),
        path_with("v1", "echo", "/extra"),
        path_with("v1", "", ""),
        path_with("v1", "echo", "").replace("lab-ns", ""),
        path_with("v1", "echo", "").replace("subresources.kubevirt.io", "kubevirt.io"),
        format!("/prefix{}", path_with("v1", "echo", "")),
    ] {
        let resp = raw_exchange(&si, &upgrade_request(&path));
        let (code, v) = status_body(&resp);
        assert_eq!(code, 404, "{path}");
        assert_eq!(v["reason"], "NotFound");
        assert_eq!(v["code"], 404);
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("not found"), "{message}");
        assert!(
            message.contains(path.split('?').next().unwrap()),
            "{message}"
        );
    }
    assert!(upstream::is_kubevirt_vnc_path(&path_with(
        "v1alpha3", "x", "?a=b"
    )));
    assert!(!upstream::is_kubevirt_vnc_path(
        "/apis/subresources.kubevirt.io/v1"
    ));
}

#[test]
fn preserve_session_refuses_a_second_session() {
    let si = StandIn::serving(B::Echo);
    let flagged = |vmi: &str| path_with("v1", vmi, "?preserveSession=true");
    let url = |path: String| format!("{}{path}", si.base_url());

    let (mut first, _) = ws_over(raw_stream(&si), &url(flagged("win")), &[]).unwrap();
    assert_eq!(si.sessions_open(), 1);

    // Same VMI, flag set: virt-api's 500 wrapping virt-handler's refusal; also via v1alpha3,
    // among other params, in another spelling Go's ParseBool takes as true, percent-encoded,
    // and first of two values (Go's `Query().Get` decodes and takes the first).
    for path in [
        flagged("win"),
        path_with("v1alpha3", "win", "?preserveSession=true"),
        path_with("v1", "win", "?x=1&preserveSession=true"),
        path_with("v1", "win", "?preserveSession=1"),
        path_with("v1", "win", "?preserveSession=%74rue"),
        path_with("v1", "win", "?preserveSession=true&preserveSession=false"),
        path_with("v1", "win", "?a;b=1&preserveSession=true"),
    ] {
        let resp = raw_exchange(&si, &upgrade_request(&path));
        let (code, reason, _, body) = parse_response(&resp);
        assert_eq!(
            (code, reason.as_str()),
            (500, "Internal Server Error"),
            "{path}"
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["message"], support::upstream::CONSOLE_IN_USE);
        assert_eq!(v["reason"], "InternalError");
        assert_eq!(v["code"], 500);
    }
    match ws_over(raw_stream(&si), &url(flagged("win")), &[]) {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 500),
        other => panic!("expected HTTP 500, got {:?}", other.map(|_| ())),
    }

    // Without the flag (or with another value) the new session proceeds.
    let (mut second, _) = ws_over(raw_stream(&si), &url(path_with("v1", "win", "")), &[]).unwrap();
    echo_once(&mut second, b"second".to_vec());
    let (mut third, _) = ws_over(
        raw_stream(&si),
        &url(path_with("v1", "win", "?preserveSession=false")),
        &[],
    )
    .unwrap();
    // The first value is the one read, and a pair holding a `;` is no pair (Go 1.17 on).
    let (mut fourth, _) = ws_over(
        raw_stream(&si),
        &url(path_with(
            "v1",
            "win",
            "?preserveSession=false&preserveSession=true",
        )),
        &[],
    )
    .unwrap();
    let (mut fifth, _) = ws_over(
        raw_stream(&si),
        &url(path_with("v1", "win", "?x=1;preserveSession=true")),
        &[],
    )
    .unwrap();
    // Another VMI, or the same name in another namespace, is not affected.
    let (mut other, _) = ws_over(raw_stream(&si), &url(flagged("linux")), &[]).unwrap();
    let other_ns = flagged("win").replace("lab-ns", "other-ns");
    let (mut other_ns, _) = ws_over(raw_stream(&si), &url(other_ns), &[]).unwrap();
    assert_eq!(si.sessions_open(), 7);
    echo_once(&mut first, b"first still works".to_vec());

    for ws in [
        &mut first,
        &mut second,
        &mut third,
        &mut fourth,
        &mut fifth,
        &mut other,
        &mut other_ns,
    ] {
        ws.close(None).unwrap();
        finish(ws);
    }
    assert!(wait_until(T, || si.sessions_open() == 0));
    let (mut again, _) = ws_over(raw_stream(&si), &url(flagged("win")), &[]).unwrap();
    echo_once(&mut again, b"again".to_vec());
}

#[test]
fn subprotocol_answered_only_when_offered() {
    let si = StandIn::serving(B::Echo);
    let url = format!("{}{}", si.base_url(), vmi_path("echo-proto"));
    let (mut ws, resp) = ws_over(
        raw_stream(&si),
        &url,
        &[("sec-websocket-protocol", "plain.kubevirt.io")],
    )
    .unwrap();
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("plain.kubevirt.io")
    );
    echo_once(&mut ws, b"proto".to_vec());
    ws.close(None).unwrap();
    finish(&mut ws);
    assert_eq!(
        si.seen()[0].header("sec-websocket-protocol"),
        Some("plain.kubevirt.io")
    );

    let answered = |extra: &str| {
        // No preserveSession here: the previous raw session may not have ended yet.
        let head = raw_head(
            &si,
            &upgrade_request_with(&path_with("v1", "echo", ""), extra),
        );
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        head.lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Protocol: "))
            .map(str::to_string)
    };
    assert_eq!(answered(""), None);
    let offered = [
        "Sec-WebSocket-Protocol: other, plain.kubevirt.io\r\n",
        "Sec-WebSocket-Protocol: other\r\nSec-WebSocket-Protocol: plain.kubevirt.io\r\n",
    ];
    for extra in offered {
        assert_eq!(answered(extra).as_deref(), Some("plain.kubevirt.io"));
    }
    for extra in [
        "Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.c2EtdG9rZW4\r\n",
        "Sec-WebSocket-Protocol: Plain.Kubevirt.IO\r\n",
    ] {
        assert_eq!(answered(extra), None, "{extra:?}");
    }
}

/// A tiny VNC-like TCP server: greets with `RFB 003.008\n`, echoes bytes, closes when it has
/// received `quit`, and reports each connection's end (`"eof"` or `"quit"`) on the channel.
fn tcp_echo_server(conns: usize) -> (SocketAddr, mpsc::Receiver<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming().take(conns) {
            let Ok(mut s) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                s.set_read_timeout(Some(T)).unwrap();
                s.write_all(b"RFB 003.008\n").unwrap();
                let mut all = Vec::new();
                let mut buf = [0u8; 8192];
                let end = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break "eof",
                        Ok(n) => {
                            all.extend_from_slice(&buf[..n]);
                            if all.windows(4).any(|w| w == b"quit") {
                                break "quit";
                            }
                            s.write_all(&buf[..n]).unwrap();
                        }
                        Err(_) => break "error",
                    }
                };
                drop(s);
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

/// Reads binary messages until `len` bytes arrived.
fn read_bytes<S: Read + Write>(ws: &mut WebSocket<S>, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        match ws.read().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            m => panic!("unexpected {m:?}"),
        }
    }
    got
}

#[test]
fn bridge_relays_both_ways() {
    let (vnc, ends) = tcp_echo_server(3);
    let pki = TestPki::new();
    let plain = StandIn::start_with(StandInOptions {
        bridge_to: Some(vnc),
        ..StandInOptions::serving(B::Bridge)
    });
    let tls = StandIn::start_with(StandInOptions {
        bridge_to: Some(vnc),
        tls: Some(pki.server_tls()),
        ..StandInOptions::serving(B::Bridge)
    });

    // The client closes: the VNC server sees EOF.
    let started = Instant::now();
    let (mut ws, _) = ws_over(
        raw_stream(&plain),
        &format!("{}{}", plain.base_url(), vmi_path("bridge-1")),
        &[],
    )
    .unwrap();
    assert_eq!(read_bytes(&mut ws, 12), b"RFB 003.008\n");
    let big = pattern_vec(11, 300_000);
    ws.send(Message::binary(big.clone())).unwrap();
    assert!(
        read_bytes(&mut ws, big.len()) == big,
        "relayed intact both ways"
    );
    // Text is dropped, as virt-handler does; the next binary message still goes through.
    ws.send(Message::text("dropped")).unwrap();
    ws.send(Message::binary(&b"after"[..])).unwrap();
    assert_eq!(read_bytes(&mut ws, 5), b"after");
    ws.close(None).unwrap();
    assert_eq!(finish(&mut ws), None);
    assert_eq!(ends.recv_timeout(T), Ok("eof"));

    // The VNC server closes: the client gets close 1000.
    let (mut ws, _) = ws_over(
        raw_stream(&plain),
        &format!("{}{}", plain.base_url(), vmi_path("bridge-2")),
        &[],
    )
    .unwrap();
    assert_eq!(read_bytes(&mut ws, 12), b"RFB 003.008\n");
    ws.send(Message::binary(&b"qu"[..])).unwrap();
    ws.send(Message::binary(&b"it"[..])).unwrap();
    assert_eq!(ends.recv_timeout(T), Ok("quit"));
    assert_eq!(finish(&mut ws), Some((1000, String::new())));
    assert!(wait_until(T, || plain.connections_open() == 0));

    // Over TLS.
    let stream = tls_connect(tls.addr(), pki.client_config(), "127.0.0.1").unwrap();
    let url = format!("{}{}", tls.base_url(), vmi_path("bridge-tls"));
    let (mut ws, _) = ws_over(stream, &url, &[]).unwrap();
    assert_eq!(read_bytes(&mut ws, 12), b"RFB 003.008\n");
    ws.send(Message::binary(big.clone())).unwrap();
    assert!(read_bytes(&mut ws, big.len()) == big);
    ws.close(None).unwrap();
    finish(&mut ws);
    assert_eq!(ends.recv_timeout(T), Ok("eof"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no polling stalls"
    );

    // Not configured, or nobody listening: 502 before any upgrade.
    let si = StandIn::serving(B::Bridge);
    let resp = raw_exchange(&si, &upgrade_request(&vmi_path("bridge")));
    assert_eq!(parse_response(&resp).0, 502);
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let si = StandIn::start_with(StandInOptions {
        bridge_to: Some(closed),
        ..StandInOptions::serving(B::Bridge)
    });
    let resp = raw_exchange(&si, &upgrade_request(&vmi_path("bridge")));
    let (code, v) = status_body(&resp);
    assert_eq!(code, 502);
    assert!(v["message"].as_str().unwrap().contains("cannot connect"));
}
