//! The proxy's own TLS listener (`TLS_CERT_FILE`, `TLS_KEY_FILE`, `CLIENT_CA_FILE`), through
//! real sockets on loopback with a rustls client: TLS 1.2 and 1.3 with RSA, ECDSA and Ed25519
//! keys, ALPN and resumption, rotation as cert-manager does it, client certificates, probes,
//! the refusal table, stalled handshakes and backpressure with TLS on both sides.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{IssuedPem, KeyKind, SecretMount, TestPki};
use common::upstream::{Behaviour as B, StandInOptions, wait_until};
use common::{
    Harness, NS, ProxyProcess, RawAnswer, SECRET, StandIn, TempDir, parse_answer, upgrade_request,
};
use kubevirt_vnc_proxy::Config;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, StreamOwned};
use tungstenite::{Message, WebSocket};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A year from now, in whole days (what rcgen writes).
fn in_a_year() -> i64 {
    let now = common::tokens::now() as i64;
    (now / 86_400 + 365) * 86_400
}

/// Plain PEM files in a directory of their own.
fn pem_files(issued: &IssuedPem) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new("tls-files");
    dir.write("cert.pem", &issued.cert_pem);
    dir.write("key.pem", &issued.key_pem);
    let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    (dir, c, k)
}

/// The proxy in front of a stand-in serving `upstream`, its listener speaking TLS with `cert`
/// and `key`, after `adjust`.
fn tls_proxy(
    upstream: impl Into<StandInOptions>,
    cert: PathBuf,
    key: PathBuf,
    adjust: impl FnOnce(&mut Config),
) -> Harness {
    Harness::start_with(upstream, |c| {
        c.tls_cert_file = Some(cert);
        c.tls_key_file = Some(key);
        adjust(c);
    })
}

/// A rustls client trusting `pki`, speaking only `version` (or both when `None`), offering
/// ALPN `http/1.1` as browsers do for WebSockets.
fn client(
    pki: &TestPki,
    version: Option<&'static rustls::SupportedProtocolVersion>,
) -> Arc<ClientConfig> {
    let provider = common::upstream::ring_provider();
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .expect("versions")
        .with_root_certificates(pki.root_store())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TCP connection to `addr` with the TLS handshake done (or its error).
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<Tls> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// A WebSocket over TLS to `path`.
fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> WebSocket<Tls> {
    let tls = tls_connect(addr, config).expect("TLS handshake");
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, resp) = tungstenite::client::client(url.as_str(), tls)
        .unwrap_or_else(|e| panic!("upgrade {path}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

fn echo(ws: &mut WebSocket<Tls>, text: &str) {
    ws.send(Message::text(text)).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text(text));
}

/// Send `request` over TLS and read the answer until the proxy closes.
fn tls_request(addr: SocketAddr, config: &Arc<ClientConfig>, request: &[u8]) -> RawAnswer {
    let mut tls = tls_connect(addr, config).expect("TLS handshake");
    tls.write_all(request).expect("write request");
    read_all(&mut tls)
}

fn read_all(tls: &mut Tls) -> RawAnswer {
    let mut all = Vec::new();
    match tls.read_to_end(&mut all) {
        Ok(_) => {}
        // No close_notify before the FIN: the bytes before it still count.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("read answer: {e} after {:?}", String::from_utf8_lossy(&all)),
    }
    parse_answer(&all)
}

/// Cleartext `request` on a TLS port gets no HTTP answer: it cannot be read as TLS.
fn assert_no_cleartext_answer(addr: SocketAddr, request: &[u8]) {
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a cleartext answer on the TLS port: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// The proxy with an ECDSA certificate from `pki`, requiring client certificates signed by
/// `pki`'s CA, after `adjust`; the guards keep its files.
fn mtls_proxy(pki: &TestPki, adjust: impl FnOnce(&mut Config)) -> (Harness, TempDir, TempDir) {
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (files, cert, key) = pem_files(&issued);
    let client_ca = TempDir::new("client-ca");
    client_ca.write("ca.pem", &pki.ca_pem);
    let ca = client_ca.path().join("ca.pem");
    let h = tls_proxy(B::Echo, cert, key, |c| {
        c.client_ca_file = Some(ca);
        adjust(c);
    });
    (h, files, client_ca)
}

fn get(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> RawAnswer {
    tls_request(
        addr,
        config,
        format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n").as_bytes(),
    )
}

/// The value of an unlabelled series in a /metrics text.
fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn tls_1_2_and_1_3_with_rsa_ecdsa_and_ed25519_keys_negotiate_http_1_1_and_resume() {
    let pki = TestPki::new();
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048, KeyKind::Ed25519] {
        let issued = pki.issue_pem(kind, in_a_year());
        let (_dir, cert, key) = pem_files(&issued);
        let h = tls_proxy(B::Echo, cert, key, |_| {});
        for (version, want) in [
            (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
            (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
        ] {
            let config = client(&pki, Some(version));
            let tls = tls_connect(h.addr, &config).expect("handshake");
            assert_eq!(tls.conn.protocol_version(), Some(want), "{kind:?}");
            assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{kind:?}");
            let presented = tls.conn.peer_certificates().expect("a certificate");
            assert_eq!(presented[0], issued.der, "{kind:?} {want:?}");
            assert_eq!(tls.conn.handshake_kind(), Some(HandshakeKind::Full));
            // TLS 1.3 tickets come after the handshake: a request and its answer bring them.
            let mut tls = tls;
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            assert_eq!(read_all(&mut tls).status, 200);

            let tok = Harness::token(&["echo"]);
            let mut ws = wss(h.addr, &config, &format!("/{tok}/echo"));
            // The second connection of this client resumes the first one's session.
            assert_eq!(
                ws.get_ref().conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{kind:?} {want:?}: no resumption"
            );
            echo(&mut ws, &format!("hello over {want:?} with {kind:?}"));
            ws.close(None).expect("close");
            while ws.read().is_ok() {}
        }
        assert!(h.wait_idle(), "{kind:?}: sockets left open");
    }
}

#[test]
fn plain_http_on_the_tls_port_and_a_client_without_http_1_1_fail_the_handshake_only() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert, key, |c| {
        c.metrics_addr = Some("127.0.0.1:0".into())
    });
    let tok = Harness::token(&["echo"]);
    // Cleartext HTTP gets no HTTP answer (it cannot be read as TLS) and no upstream work.
    assert_no_cleartext_answer(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    // A client offering only h2 has no protocol in common with the proxy.
    let mut h2_only = (*client(&pki, None)).clone();
    h2_only.alpn_protocols = vec![b"h2".to_vec()];
    let err = tls_connect(h.addr, &Arc::new(h2_only))
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    assert_eq!(h.upstream.connections_total(), 0);
    let metrics_addr = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let text = get(metrics_addr, &client(&pki, None), "/metrics").body;
    assert_eq!(
        metric(&text, "kubevirt_vnc_proxy_tls_handshake_failures_total"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds"
        ),
        Some(issued.not_after)
    );
    // Still serving.
    let mut ws = wss(h.addr, &client(&pki, None), &format!("/{tok}/echo"));
    echo(&mut ws, "still here");
}

#[test]
fn probes_and_metrics_answer_over_tls_on_both_listeners() {
    let pki = TestPki::new();
    // With client certificates required on the main port, the probe port still takes the
    // kubelet's and Prometheus' certificate-less HTTPS.
    let (h, _files, _ca) = mtls_proxy(&pki, |c| c.metrics_addr = Some("127.0.0.1:0".into()));
    let metrics_addr = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let anonymous = client(&pki, None);
    for path in ["/healthz", "/readyz"] {
        let a = get(metrics_addr, &anonymous, path);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    let m = get(metrics_addr, &anonymous, "/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains("kubevirt_vnc_proxy_max_connections 10000"),
        "{}",
        m.body
    );
    // The main port answers them too, to a client with a certificate.
    let with_cert = pki.client_config_with_cert(&pki.client_pem("ingress"));
    for path in ["/healthz", "/readyz"] {
        let a = get(h.addr, &with_cert, path);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    // Plain HTTP on the TLS probe port is no probe answer.
    assert_no_cleartext_answer(metrics_addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
}

#[test]
fn client_certificates_are_required_before_any_upstream_work() {
    let pki = TestPki::new();
    let (h, _files, _ca) = mtls_proxy(&pki, |_| {});
    let tok = Harness::token(&["echo"]);
    let path = format!("/{tok}/echo");
    // No certificate: the handshake fails (TLS 1.3 reports it on the first read).
    let no_cert = client(&pki, None);
    let refused = |config: &Arc<ClientConfig>| match tls_connect(h.addr, config) {
        Err(e) => e.to_string(),
        Ok(mut tls) => {
            let _ = tls.write_all(&upgrade_request(&path, ""));
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("answered without a valid client certificate: {buf:?}"),
            }
        }
    };
    let why = refused(&no_cert);
    assert!(
        why.contains("CertificateRequired") || why.contains("HandshakeFailure"),
        "{why}"
    );
    // A certificate from another CA is no better.
    let other = TestPki::new();
    let stranger = pki.client_config_with_cert(&other.client_pem("stranger"));
    let why = refused(&stranger);
    assert!(
        why.contains("UnknownCA") || why.contains("BadCertificate"),
        "{why}"
    );
    assert_eq!(h.upstream.connections_total(), 0, "the upstream was dialed");
    // The CA's own client gets through.
    let ingress = pki.client_config_with_cert(&pki.client_pem("ingress"));
    let mut ws = wss(h.addr, &ingress, &path);
    echo(&mut ws, "mutual");
    assert_eq!(h.upstream.connections_total(), 1);
    // So does one whose certificate flight is 40 KiB (rustls takes up to 64 KiB, read 4 KiB at
    // a time): the handshake does not wait for an event that the buffered flight never raises.
    let bulky = pki.client_pem_padded("bulky", 40 << 10);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(bulky.key_pem.as_bytes()).unwrap();
    // TLS 1.2 without tickets: a ticket carries the client's certificate, and rustls' client
    // refuses post-handshake messages over 16 KiB (TLS 1.3 sends its tickets after the
    // handshake). What is tested is the server reading a 40 KiB flight.
    let mut bulky = ClientConfig::builder_with_provider(common::upstream::ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pki.root_store())
        .with_client_auth_cert(vec![bulky.der.clone()], key)
        .unwrap();
    bulky.resumption = rustls::client::Resumption::disabled();
    let bulky = Arc::new(bulky);
    let started = Instant::now();
    let mut ws = wss(h.addr, &bulky, &path);
    echo(&mut ws, "a long chain");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn every_refusal_status_is_unchanged_over_tls() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let opts = StandInOptions::serving(B::Echo)
        .vmi("gone", B::Status(404))
        .vmi("unavailable", B::Status(503))
        // A console in use, as virt-api answers it (hand-made Status).
        .vmi("in-use", B::console_in_use())
        .vmi("broken", B::Status(500))
        .vmi("bad-accept", B::BadAccept)
        .vmi("silent", B::Silent);
    let h = tls_proxy(opts, cert, key, |c| {
        c.upstream_timeout = Duration::from_secs(1);
        c.handshake_timeout = Duration::from_secs(1);
        c.max_head_bytes = 1024;
    });
    let config = client(&pki, None);
    let up = |vmi: &str| format!("/{}/{vmi}", Harness::token(&[vmi]));
    let expired = common::tokens::mint(SECRET, NS, &["echo"], common::tokens::now() - 3600);
    let with = |path: &str, extra: &str| upgrade_request(path, extra);
    let big = format!("X-Fill: {}\r\n", "a".repeat(2048));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"garbage\r\n\r\n".to_vec(), 400),
        (
            "no upgrade",
            format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", up("echo")).into_bytes(),
            426,
        ),
        ("head too big", with(&up("echo"), &big), 431),
        (
            "version 8",
            String::from_utf8(with(&up("echo"), ""))
                .unwrap()
                .replace("Version: 13", "Version: 8")
                .into_bytes(),
            426,
        ),
        ("no token", with("/echo", ""), 404),
        ("bad token", with("/not.a.token/echo", ""), 401),
        ("expired", with(&format!("/{expired}/echo"), ""), 401),
        (
            "other vmi",
            with(&format!("/{}/other", Harness::token(&["echo"])), ""),
            403,
        ),
        ("upstream 404", with(&up("gone"), ""), 404),
        ("console in use", with(&up("in-use"), ""), 503),
        ("upstream 503", with(&up("unavailable"), ""), 502),
        ("upstream 500", with(&up("broken"), ""), 502),
        ("bad accept", with(&up("bad-accept"), ""), 502),
        ("silent upstream", with(&up("silent"), ""), 504),
    ];
    for (what, request, want) in cases {
        let a = tls_request(h.addr, &config, &request);
        assert_eq!(a.status, want, "{what}: {}", a.body);
        if want == 426 {
            assert!(a.head.contains("Sec-WebSocket-Version: 13"), "{}", a.head);
            assert!(a.head.contains("Upgrade: websocket"), "{}", a.head);
            assert!(
                a.head.contains("Connection: Upgrade, close"),
                "{what}: {}",
                a.head
            );
        } else {
            assert!(a.head.contains("Connection: close"), "{what}: {}", a.head);
        }
    }
    // A head that never completes: 408 once the TLS handshake is done.
    let mut tls = tls_connect(h.addr, &config).expect("handshake");
    tls.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let a = read_all(&mut tls);
    assert_eq!(a.status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The per-address limit answers 503 over TLS as well.
    drop(h);
    let (_dir2, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert.clone(), key.clone(), |c| {
        c.max_connections_per_ip = 1;
        c.allowed_origins = vec!["https://console.example".into()];
    });
    let holder = tls_connect(h.addr, &config).expect("first connection");
    let a = tls_request(h.addr, &config, &with(&up("echo"), ""));
    assert_eq!(a.status, 503, "{}", a.body);
    drop(holder);
    assert!(h.wait_idle());
    // An Origin not allowed: 403.
    let a = tls_request(
        h.addr,
        &config,
        &with(&up("echo"), "Origin: https://elsewhere.example\r\n"),
    );
    assert_eq!(a.status, 403, "{}", a.body);
    // An upstream nobody listens on: 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h = tls_proxy(B::Echo, cert, key, |c| c.upstream.port = port);
    let a = tls_request(h.addr, &config, &with(&up("echo"), ""));
    assert_eq!(a.status, 502, "{}", a.body);
    // Shutting down: 503 (a connection held open keeps the draining loop listening).
    let _open = tls_connect(h.addr, &config).expect("a connection to hold");
    h.handle().drain(Duration::from_secs(5));
    let a = tls_request(h.addr, &config, &with(&up("echo"), ""));
    assert_eq!(a.status, 503, "{}", a.body);
}

#[test]
fn a_thousand_stalled_handshakes_do_not_delay_a_real_session() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let stalled = common::fit_to_nofile_limit("stalled TLS handshakes", 1000, 2);
    let h = tls_proxy(B::Echo, cert, key, |c| {
        c.handshake_timeout = Duration::from_secs(3);
    });
    let config = client(&pki, None);
    let tok = Harness::token(&["echo"]);
    let path = format!("/{tok}/echo");
    // The time of a session with nobody else around.
    let started = Instant::now();
    let mut ws = wss(h.addr, &config, &path);
    echo(&mut ws, "alone");
    let alone = started.elapsed();
    drop(ws);
    // Each stalled client sends the first bytes of a ClientHello record and nothing more.
    let hello_start = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];
    let first_stalled = Instant::now();
    let mut holders = Vec::with_capacity(stalled);
    for _ in 0..stalled {
        let mut s = TcpStream::connect(h.addr).expect("stalled connect");
        s.write_all(&hello_start).expect("partial hello");
        holders.push(s);
    }
    assert!(
        wait_until(Duration::from_secs(10), || h.handle().stats().accepted
            > stalled as u64),
        "the proxy did not take the stalled connections"
    );
    // Every stalled connection's timer started by now.
    let all_accepted = Instant::now();
    let started = Instant::now();
    let mut ws = wss(h.addr, &config, &path);
    echo(&mut ws, "among the stalled");
    let among = started.elapsed();
    assert!(
        among < Duration::from_secs(2).max(alone * 20),
        "a session took {among:?} among {stalled} stalled handshakes ({alone:?} alone)"
    );
    drop(ws);
    // HANDSHAKE_TIMEOUT_SECONDS (3 s) counts from accept, and a client stalled inside the
    // TLS handshake is closed at once then, with no HTTP answer (it could not read one). A
    // 408 would wait out the close timeout (5 s) first. The deadline counts from when all
    // were accepted (not from the first connect: accepting a thousand can take seconds on a
    // loaded machine).
    let deadline = all_accepted + Duration::from_millis(4500);
    for s in &mut holders {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        if let Err(e) = s.read_to_end(&mut got) {
            panic!("a stalled handshake was not closed: {e}");
        }
        assert!(
            !got.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        let now = Instant::now();
        assert!(
            now < deadline,
            "closed {:?} after the first stalled connection, {:?} after all were accepted",
            now - first_stalled,
            now - all_accepted
        );
    }
    assert!(h.wait_idle());
}

/// The proxy process with TLS to the client and to a stand-in upstream
/// that behaves as `upstream`, both on certificates of `pki`, and `extra`
/// settings; with the directory of its files, which must outlive it.
fn tls_both_ways(
    pki: &TestPki,
    upstream: B,
    extra: &[(&'static str, String)],
) -> (TempDir, StandIn, ProxyProcess) {
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (dir, cert, key) = pem_files(&issued);
    dir.write("ca.pem", &pki.ca_pem);
    let standin = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls()),
        ..StandInOptions::serving(upstream)
    });
    let mut env = vec![
        ("LOCAL_DEV_MODE", "true".to_owned()),
        (
            "WS_REMOTE_URL",
            format!("wss://localhost:{}", standin.addr().port()),
        ),
        (
            "UPSTREAM_CA_FILE",
            dir.path().join("ca.pem").display().to_string(),
        ),
        ("TLS_CERT_FILE", cert.display().to_string()),
        ("TLS_KEY_FILE", key.display().to_string()),
    ];
    env.extend_from_slice(extra);
    let proxy = ProxyProcess::start(&env);
    (dir, standin, proxy)
}

#[test]
fn backpressure_holds_with_tls_on_both_sides() {
    const TOTAL: u64 = 128 << 20;
    let pki = TestPki::new();
    let stream = B::Stream {
        total: TOTAL,
        frame: 65536,
    };
    let (_files, _standin, proxy) = tls_both_ways(&pki, stream, &[]);
    let vmi = format!("stream-{TOTAL}-65536");
    let tok = Harness::token(&[&vmi]);
    let mut ws = wss(proxy.addr, &client(&pki, None), &format!("/{tok}/{vmi}"));
    // Read a little, stall while the upstream pushes, then read everything in order.
    let mut seen = 0u64;
    let mut state = common::upstream::fnv1a(0xcbf2_9ce4_8422_2325, &[]);
    let mut take = |ws: &mut WebSocket<Tls>, until: u64| {
        while seen < until {
            match ws.read().expect("read") {
                Message::Binary(b) => {
                    let want = common::upstream::pattern_vec(seen, b.len());
                    assert_eq!(&b[..], &want[..], "bytes at {seen} out of order");
                    state = common::upstream::fnv1a(state, &b);
                    seen += b.len() as u64;
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    take(&mut ws, 1 << 20);
    let flowing = proxy.rss_kib();
    let mut peak = flowing;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(proxy.rss_kib());
    }
    take(&mut ws, TOTAL);
    assert_eq!(seen, TOTAL, "bytes lost");
    assert!(
        peak <= flowing + 2048,
        "RSS grew from {flowing} KiB to {peak} KiB while the TLS client stalled\n{}",
        proxy.log_text()
    );
}

#[test]
fn a_rotated_certificate_serves_new_connections_and_spares_open_sessions() {
    let pki = TestPki::new();
    let first = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let second = pki.issue_pem(KeyKind::Rsa2048, in_a_year() + 86_400);
    let unmatched = pki.issue_pem(KeyKind::EcdsaP256, in_a_year() + 2 * 86_400);
    let mut mount = SecretMount::new(&first);
    let upstream = StandIn::serving(B::Echo);
    let proxy = ProxyProcess::local_dev(
        upstream.addr(),
        &[
            ("TLS_CERT_FILE", &mount.cert().display().to_string()),
            ("TLS_KEY_FILE", &mount.key().display().to_string()),
            ("CREDENTIALS_CHECK_SECONDS", "1"),
            ("METRICS_ADDR", "127.0.0.1:0"),
            // Two loops share the port and, through the first, one TLS state: a ticket
            // resumes on either, and a rotation is loaded, counted and reported once.
            ("WORKERS", "2"),
        ],
    );
    let metrics_addr: SocketAddr = {
        let found = wait_until(Duration::from_secs(10), || {
            proxy.log_text().contains("/readyz on ")
        });
        assert!(found, "{}", proxy.log_text());
        let log = proxy.log_text();
        let line = log.lines().find(|l| l.contains("/readyz on ")).unwrap();
        line.rsplit("/readyz on ")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {line}"))
    };
    // One client configuration throughout: a rotation must also beat its resumption.
    let config = client(&pki, None);
    let presented = |config: &Arc<ClientConfig>| {
        let tls = tls_connect(proxy.addr, config).expect("handshake");
        tls.conn.peer_certificates().expect("certificate")[0].clone()
    };
    let expiry = || {
        let text = get(metrics_addr, &config, "/metrics").body;
        (
            metric(
                &text,
                "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds",
            ),
            metric(&text, "kubevirt_vnc_proxy_tls_reloads_total"),
            metric(&text, "kubevirt_vnc_proxy_tls_reload_failures_total"),
        )
    };
    assert_eq!(presented(&config), first.der);
    assert_eq!(expiry(), (Some(first.not_after), Some(0), Some(0)));
    // The client holds tickets (a request's answer brings TLS 1.3's) and resumes with them,
    // whichever worker the kernel hands each connection to.
    for _ in 0..6 {
        assert_eq!(get(proxy.addr, &config, "/healthz").status, 200);
        let resumed = tls_connect(proxy.addr, &config).expect("handshake");
        assert_eq!(resumed.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    }
    assert_eq!(get(proxy.addr, &config, "/healthz").status, 200);
    let tok = Harness::token(&["echo"]);
    let mut open = wss(proxy.addr, &config, &format!("/{tok}/echo"));
    echo(&mut open, "before");

    mount.publish(&second);
    assert!(
        wait_until(Duration::from_secs(10), || expiry().1 == Some(1)),
        "the rotation was not loaded\n{}",
        proxy.log_text()
    );
    assert_eq!(expiry(), (Some(second.not_after), Some(1), Some(0)));
    // The very next connection, from a client holding tickets from before, gets the new
    // certificate in a full handshake: no resuming past a rotation.
    let after = tls_connect(proxy.addr, &config).expect("handshake");
    assert_eq!(after.conn.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(
        after.conn.peer_certificates().expect("certificate")[0],
        second.der
    );
    drop(after);
    echo(&mut open, "after the rotation");
    let mut fresh = wss(proxy.addr, &config, &format!("/{tok}/echo"));
    echo(&mut fresh, "on the new certificate");

    // A certificate with the wrong key: the second pair keeps serving, one ERROR line.
    mount.publish(&IssuedPem {
        key_pem: second.key_pem.clone(),
        ..unmatched.clone()
    });
    assert!(
        wait_until(Duration::from_secs(10), || expiry().2 == Some(1)),
        "the bad pair was not reported\n{}",
        proxy.log_text()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(presented(&config), second.der);
    assert_eq!(expiry(), (Some(second.not_after), Some(1), Some(1)));
    let errors: Vec<String> = proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("TLS_KEY_FILE"))
        .map(str::to_owned)
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR line per bad pair: {errors:#?}");
    assert!(
        errors[0].contains("previous TLS certificate keeps serving"),
        "{}",
        errors[0]
    );
    echo(&mut open, "still open");
    echo(&mut fresh, "still open too");

    // A set caught while it was being written: the next one is read in full, in place, with
    // the same length and time, so its stamp is unchanged. The failed set is tried again at
    // each check (reported once), and the good one loads.
    let half_written = pki.issue_pem(KeyKind::EcdsaP256, in_a_year() + 3 * 86_400);
    let whole = pki.issue_pem(KeyKind::EcdsaP256, in_a_year() + 3 * 86_400);
    assert_eq!(half_written.key_pem.len(), whole.key_pem.len());
    mount.publish(&IssuedPem {
        key_pem: half_written.key_pem.clone(),
        ..whole.clone()
    });
    assert!(
        wait_until(Duration::from_secs(10), || expiry().2 == Some(2)),
        "the torn set was not reported\n{}",
        proxy.log_text()
    );
    let key_file = std::fs::canonicalize(mount.key()).expect("the key behind the links");
    let before = std::fs::metadata(&key_file).unwrap();
    std::fs::write(&key_file, &whole.key_pem).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&key_file)
        .and_then(|f| f.set_modified(before.modified().unwrap()))
        .unwrap();
    let after = std::fs::metadata(&key_file).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap()),
        "the stamp must stay as it was"
    );
    assert!(
        wait_until(Duration::from_secs(10), || expiry().1 == Some(2)),
        "the set whose failed read came right was never tried again\n{}",
        proxy.log_text()
    );
    assert_eq!(presented(&config), whole.der);
    assert_eq!(expiry(), (Some(whole.not_after), Some(2), Some(2)));
}

#[test]
fn the_binary_refuses_half_a_tls_configuration_and_bad_files_with_status_2() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let other = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (dir, cert, key) = pem_files(&issued);
    dir.write("other.key", &other.key_pem);
    dir.write("empty.pem", "");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("TLS_CERT_FILE", cert.display().to_string())],
            "TLS_KEY_FILE: not set",
        ),
        (
            vec![("TLS_KEY_FILE", key.display().to_string())],
            "TLS_CERT_FILE: not set",
        ),
        (
            vec![("CLIENT_CA_FILE", path("cert.pem"))],
            "CLIENT_CA_FILE: needs TLS",
        ),
        (
            vec![
                ("TLS_CERT_FILE", path("empty.pem")),
                ("TLS_KEY_FILE", key.display().to_string()),
            ],
            "holds no certificate",
        ),
        (
            vec![
                ("TLS_CERT_FILE", cert.display().to_string()),
                ("TLS_KEY_FILE", path("other.key")),
            ],
            "does not fit the certificate",
        ),
        (
            vec![
                ("TLS_CERT_FILE", cert.display().to_string()),
                ("TLS_KEY_FILE", path("missing.key")),
            ],
            "TLS_KEY_FILE",
        ),
    ];
    for (env, want) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"))
            .arg("check-config")
            .env_clear()
            .env("SECRET_KEY", SECRET)
            .env("LOCAL_DEV_MODE", "true")
            .env("WS_REMOTE_URL", "ws://127.0.0.1:1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run check-config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(want), "{env:?}: want {want:?} in {stderr}");
    }
}

/// A TLS client refused by MAX_CONNECTIONS_PER_IP at accept, which never sends its
/// ClientHello, must still be closed by the refusal's close timeout (its deadline must be armed).
#[test]
fn a_silent_tls_client_over_the_per_address_limit_is_closed_by_the_close_timeout() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert, key, |c| {
        c.max_connections_per_ip = 1;
        c.handshake_timeout = Duration::from_secs(1);
        c.close_timeout = Duration::from_millis(500);
    });
    let config = client(&pki, None);
    let holder = tls_connect(h.addr, &config).expect("first connection");
    // Over the limit: refused at accept, waits in Refusing for a handshake that never comes.
    let silent = TcpStream::connect(h.addr).unwrap();
    // The holder gets its 408 after 1 s, then lingers 0.5 s; the silent one has 0.5 s.
    let idle = wait_until(Duration::from_secs(6), || {
        h.handle().stats().open_sessions == 0
    });
    let left = h.handle().stats().open_sessions;
    drop((holder, silent));
    assert!(idle, "sessions still open 6 s later: {left}");
}

#[test]
fn a_clean_close_over_tls_ends_with_close_notify() {
    // RFC 8446 §6.1: close_notify before the write side closes, however
    // the session ends. Here it mostly lingers for the client's FIN; the
    // fast exit (both FINs already in when the close handshake completes),
    // which skipped close_notify, depends on timing on loopback and is
    // driven deterministically by session.rs's
    // `a_clean_close_over_tls_sends_close_notify`.
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert, key, |_| {});
    let tok = Harness::token(&["echo"]);
    let mut ws = wss(h.addr, &client(&pki, None), &format!("/{tok}/echo"));
    echo(&mut ws, "before the close");
    ws.close(None).expect("close");
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing handshake: {e}"),
        }
    }
    let mut rest = [0u8; 16];
    match ws.get_mut().read(&mut rest) {
        Ok(0) => {}
        other => panic!("the TLS stream ended without close_notify: {other:?}"),
    }
}

/// A masked binary frame as a browser sends it (payload under 126 bytes).
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x82, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn a_frame_split_across_tls_records_is_relayed_with_a_16_kib_buffer() {
    // RELAY_BUFFER_BYTES at 16 KiB, below a TLS record's plaintext: one
    // record brings a frame and the first byte of the next one's header,
    // the next record the rest. The proxy waited for a record's worth of
    // room to read on, which only an empty buffer had, and that byte
    // stayed: the console froze.
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert, key, |c| c.buffer_size = 16 << 10);
    let tok = Harness::token(&["echo"]);
    let mut ws = wss(h.addr, &client(&pki, None), &format!("/{tok}/echo"));
    let (first, second) = (masked_binary(b"first"), masked_binary(b"second"));
    for _ in 0..3 {
        // One write, one record; then the proxy reads it alone.
        let tls = ws.get_mut();
        tls.write_all(&[&first[..], &second[..1]].concat())
            .expect("first record");
        tls.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(50));
        let tls = ws.get_mut();
        tls.write_all(&second[1..]).expect("second record");
        tls.flush().expect("flush");
        assert_eq!(ws.read().expect("echo"), Message::binary(&b"first"[..]));
        assert_eq!(
            ws.read().expect("the frame split across records"),
            Message::binary(&b"second"[..])
        );
    }
}

/// The value of the container's environment variable `name` in a manifest
/// (`- name:` then `value:`), if it is set there.
fn manifest_env(yaml: &str, name: &str) -> Option<String> {
    let mut lines = yaml.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("- name: {name}") {
            let value = lines.next()?.trim().strip_prefix("value:")?;
            return Some(value.trim().trim_matches('"').to_owned());
        }
    }
    None
}

/// The container's memory under `limits:` or `requests:` in a manifest, in
/// bytes (`Mi` or `Gi`).
fn manifest_memory(yaml: &str, under: &str) -> u64 {
    let after = yaml.split(under).nth(1).expect(under);
    let line = after
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .expect("a memory setting");
    let v = line.trim();
    let (n, unit) = v.split_at(v.len() - 2);
    let n: u64 = n.parse().expect("a number");
    match unit {
        "Mi" => n << 20,
        "Gi" => n << 30,
        other => panic!("memory unit {other}"),
    }
}

/// What a console costs the proxy through the real binary, TLS to the
/// client and to the upstream (deploy/'s TLS overlay, its costliest shape
/// per session), with an upstream that behaves as `upstream` and a client
/// that reads nothing after the 101: RSS at the start, and the bytes each
/// session adds (the slope from `n / 2` sessions to `n`, as the first ones
/// also grow what the process keeps for all), and `n`. Relay memory is
/// kept to two buffers, so that what is left is the session's own.
fn tls_console_cost(upstream: B, buffer: usize) -> (u64, u64, usize) {
    let n = common::fit_to_nofile_limit("console memory", 200, 2);
    let pki = TestPki::new();
    let (_files, _standin, proxy) = tls_both_ways(
        &pki,
        upstream,
        &[
            ("RELAY_BUFFER_BYTES", buffer.to_string()),
            ("RELAY_MEMORY_BYTES", (2 * buffer).to_string()),
        ],
    );
    let settled = || proxy.settled_rss_kib() << 10;
    let at_start = settled();
    let vmi = "console";
    let tok = Harness::token(&[vmi]);
    let config = client(&pki, None);
    let half = n / 2;
    let mut open: Vec<_> = (0..half)
        .map(|_| wss(proxy.addr, &config, &format!("/{tok}/{vmi}")))
        .collect();
    let with_half = settled();
    open.extend((half..n).map(|_| wss(proxy.addr, &config, &format!("/{tok}/{vmi}"))));
    let with_all = settled();
    drop(open);
    (
        at_start,
        with_all.saturating_sub(with_half) / (n - half) as u64,
        n,
    )
}

/// An upstream that streams as fast as it may: every console whose client
/// reads nothing fills what it is allowed and waits.
fn streaming() -> B {
    B::Stream {
        total: 256 << 20,
        frame: 65536,
    }
}

#[test]
fn the_deployments_memory_request_and_limit_hold_max_connections_stalled_tls_consoles() {
    // Its memory limit must hold the process, the relay buffers
    // RELAY_MEMORY_BYTES allows and the spares the pool keeps (64 regular
    // and 4 bulk buffers per worker, see server.rs), and MAX_CONNECTIONS
    // consoles whose browsers all fell behind at once, the worst case, each
    // measured through the real binary. With 10% to spare for allocator
    // slack. (The limit was 64Mi for 10,000 sessions, which needed about
    // 530 MiB then: an OOM kill waiting for a large lab.) The request must
    // hold the same without the slack: under node memory pressure the
    // kubelet evicts first the pods using more than they request, and an
    // evicted proxy ends every console it holds. (It was 16Mi, which a
    // proxy holding a few hundred consoles exceeds.)
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/deployment.yaml"
    ))
    .expect("deployment.yaml");
    let defaults = Config::local_dev("ws://127.0.0.1:9", SECRET.as_bytes()).expect("defaults");
    let setting = |name: &str, default: usize| -> usize {
        manifest_env(&yaml, name).map_or(default, |v| v.parse().expect(name))
    };
    let max_connections = setting("MAX_CONNECTIONS", defaults.max_connections);
    let relay_memory = setting("RELAY_MEMORY_BYTES", defaults.relay_memory);
    let buffer = setting("RELAY_BUFFER_BYTES", defaults.buffer_size);
    let bulk = setting("RELAY_BULK_BUFFER_BYTES", defaults.bulk_buffer_size);
    let workers = setting("WORKERS", defaults.workers).max(1);
    let limit = manifest_memory(&yaml, "limits:");
    let request = manifest_memory(&yaml, "requests:");

    let (at_start, per_session, n) = tls_console_cost(streaming(), buffer);
    let spares = (64 * buffer + 4 * bulk) as u64;
    let needed = at_start
        + workers as u64 * (relay_memory as u64 + spares)
        + (workers * max_connections) as u64 * per_session;
    assert!(
        needed + needed / 10 <= limit,
        "deployment.yaml: a {} MiB memory limit, but {max_connections} stalled TLS consoles \
         ({per_session} bytes each, measured over {n}) with {relay_memory} bytes of relay \
         buffers and {spares} of spares need {} MiB, plus 10%",
        limit >> 20,
        needed >> 20
    );
    assert!(
        needed <= request,
        "deployment.yaml: a {} MiB memory request, below the {} MiB that {max_connections} \
         stalled TLS consoles need at worst: under node memory pressure such a pod is evicted \
         first",
        request >> 20,
        needed >> 20
    );
}

#[test]
fn a_tls_console_waiting_for_relay_memory_keeps_little_beyond_an_idle_ones_state() {
    // Waiting for a buffer (RELAY_MEMORY_BYTES all taken), a console with
    // bytes coming from a TLS upstream leaves them in the socket: rustls
    // gives back its 17-20 KiB record buffer, and what it decrypted past the
    // upstream's 101 went to the client with the 101. Measured: about
    // 0.3 KiB above an idle console; 15 KiB when the decrypted rest of a
    // record stayed in rustls, 31 KiB when the record buffer stayed too.
    let buffer = 65536;
    let (_, idle, _) = tls_console_cost(B::Echo, buffer);
    let (_, waiting, n) = tls_console_cost(streaming(), buffer);
    assert!(
        waiting <= idle + 6 * 1024,
        "a waiting TLS console costs {waiting} bytes, an idle one {idle} (over {n} each)"
    );
}

#[test]
fn a_tls_probe_mid_handshake_outlasts_a_flood_of_silent_connections_on_the_probe_port() {
    let pki = TestPki::new();
    let issued = pki.issue_pem(KeyKind::EcdsaP256, in_a_year());
    let (_dir, cert, key) = pem_files(&issued);
    let h = tls_proxy(B::Echo, cert, key, |c| {
        c.metrics_addr = Some("127.0.0.1:0".into())
    });
    let probes = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    // The probe: its ClientHello sent and the server's answer read, its
    // Finished not yet sent (a kubelet probe between two round trips).
    let name = ServerName::try_from("localhost").unwrap().to_owned();
    let mut probe = ClientConnection::new(client(&pki, None), name).unwrap();
    let mut sock = TcpStream::connect(probes).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while probe.wants_write() {
        probe.write_tls(&mut sock).unwrap();
    }
    while !probe.wants_write() {
        assert!(probe.read_tls(&mut sock).unwrap() > 0, "no server flight");
        probe.process_new_packets().unwrap();
    }
    // More silent connections than the probe port holds, all after it.
    // (The port holds 16.)
    let mut silent: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(probes).unwrap())
        .collect();
    // The oldest silent one gives way (once the proxy has accepted them all).
    let oldest = &mut silent[0];
    oldest
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match oldest.read(&mut [0u8; 1]) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest silent connection is still open: {other:?}"),
    }
    // The probe finishes its handshake and is answered.
    let mut tls = StreamOwned::new(probe, sock);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("the probe's connection was closed");
    assert_eq!(read_all(&mut tls).status, 200);
    drop(silent);
}
