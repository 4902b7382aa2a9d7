//! In-cluster mode: the upstream over TLS with the service account's CA and
//! bearer token, rotation of both, subprotocols and query pass-through,
//! against a stand-in KubeVirt that serves TLS from a CA the test makes,
//! requires the exact bearer token and serves only the VNC paths.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::TestPki;
use common::upstream::{self, Behaviour as B, StandInOptions};
use common::{
    Harness, NS, ProxyProcess, SECRET, StandIn, TempDir, raw_request, stall_then_read_all,
    upgrade_request, ws_connect,
};
use kubevirt_vnc_proxy::config::UpstreamUrl;
use kubevirt_vnc_proxy::{Config, Proxy};
use tungstenite::Message;

const SA_TOKEN: &str = "sa-token-1";

/// A service-account directory with `ca.crt` and `token`.
fn sa_dir(pki: &TestPki, token: &str) -> TempDir {
    let dir = TempDir::new("sa");
    dir.write("ca.crt", &pki.ca_pem);
    dir.write("token", token);
    dir
}

/// The proxy in in-cluster mode (configured in code) in front of `standin`.
fn in_cluster(standin: StandIn, sa: &TempDir, adjust: impl FnOnce(&mut Config)) -> Harness {
    let mut config = Config::local_dev("ws://127.0.0.1:1", SECRET.as_bytes()).unwrap();
    config.upstream = UpstreamUrl {
        tls: true,
        host: "127.0.0.1".into(),
        port: standin.addr().port(),
        base_path: String::new(),
    };
    config.in_cluster = true;
    config.ca_file = Some(sa.path().join("ca.crt"));
    config.token_file = Some(sa.path().join("token"));
    config.credentials_check_interval = Duration::from_millis(100);
    adjust(&mut config);
    let proxy = Proxy::bind(config).expect("bind").spawn().expect("spawn");
    let addr = proxy.local_addr();
    Harness {
        upstream: standin,
        proxy: Some(proxy),
        addr,
    }
}

/// KubeVirt's API server as the stand-in plays it: TLS, `bearer` required, its paths only,
/// and `behaviour` for every VMI.
fn kubevirt(pki: &TestPki, bearer: Option<&str>, behaviour: B) -> StandIn {
    StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls()),
        bearer: bearer.map(str::to_owned),
        kubevirt_paths_only: true,
        ..StandInOptions::serving(behaviour)
    })
}

fn echo_once(h: &Harness, vmi: &str, text: &str) {
    let mut ws = h.ws(vmi);
    ws.send(Message::text(text)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(text));
}

#[test]
fn a_session_through_tls_with_the_bearer_and_the_ca() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    echo_once(&h, "echo-tls", "over TLS");
    let seen = h.upstream.seen();
    let req = seen.last().unwrap();
    assert_eq!(
        req.path,
        format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/echo-tls/vnc"
        )
    );
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {SA_TOKEN}").as_str())
    );
    assert_eq!(
        req.header("sec-websocket-protocol"),
        Some("plain.kubevirt.io")
    );
    assert_eq!(
        req.header("host"),
        Some(h.upstream.addr().to_string().as_str())
    );
    // The v1alpha3 path is served too.
    let old_api = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |c| {
        c.api_path = "/apis/subresources.kubevirt.io/v1alpha3/namespaces/{namespace}/virtualmachineinstances/{vmi_name}/vnc".into();
    });
    echo_once(&old_api, "echo-alpha", "v1alpha3");
}

#[test]
fn an_unknown_ca_or_a_wrong_name_is_refused_with_502() {
    let pki = TestPki::new();
    let other = TestPki::new();
    // The proxy trusts another CA.
    let sa = sa_dir(&other, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    let tok = Harness::token(&["echo"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body.contains("TLS") && a.body.contains("UnknownIssuer"),
        "{}",
        a.body
    );
    assert!(
        h.upstream.seen().is_empty(),
        "no request may cross an untrusted TLS session"
    );
    // The right CA, but the certificate names another host.
    let sa = sa_dir(&pki, SA_TOKEN);
    let wrong_name = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls_for_name("not-the-host.example")),
        bearer: Some(SA_TOKEN.into()),
        kubevirt_paths_only: true,
        ..StandInOptions::serving(B::Echo)
    });
    let h = in_cluster(wrong_name, &sa, |_| {});
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(a.body.contains("not valid for name"), "{}", a.body);
    assert!(h.wait_idle());
}

#[test]
fn a_rotated_token_is_used_for_new_sessions_without_a_restart() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, "token-one");
    let h = in_cluster(kubevirt(&pki, None, B::Echo), &sa, |_| {});
    let mut open = h.ws("echo-long");
    open.send(Message::text("before")).unwrap();
    assert_eq!(open.read().unwrap(), Message::text("before"));
    sa.write("token", "token-two");
    let bearer = |h: &Harness| {
        h.upstream
            .seen()
            .last()
            .and_then(|r| r.header("authorization").map(str::to_owned))
    };
    assert!(
        upstream::wait_until(Duration::from_secs(10), || {
            echo_once(&h, "echo-new", "after");
            bearer(&h).as_deref() == Some("Bearer token-two")
        }),
        "the new token was never used"
    );
    assert_eq!(
        h.upstream.seen()[0].header("authorization"),
        Some("Bearer token-one")
    );
    // The session opened before the rotation is untouched.
    open.send(Message::text("still open")).unwrap();
    assert_eq!(open.read().unwrap(), Message::text("still open"));
}

#[test]
fn a_rotated_ca_is_trusted_for_new_sessions_without_a_restart() {
    let old = TestPki::new();
    let new = TestPki::new();
    let sa = sa_dir(&old, SA_TOKEN);
    let h = in_cluster(kubevirt(&new, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    let tok = Harness::token(&["echo"]);
    assert_eq!(
        raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), "")).status,
        502
    );
    sa.write("ca.crt", &new.ca_pem);
    assert!(
        upstream::wait_until(Duration::from_secs(10), || {
            status_of(&h, &format!("/{tok}/echo")) == 101
        }),
        "the new CA was never trusted"
    );
}

#[test]
fn a_credential_file_that_disappears_fails_new_sessions_and_spares_open_ones() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    let mut open = h.ws("echo-kept");
    open.send(Message::text("one")).unwrap();
    assert_eq!(open.read().unwrap(), Message::text("one"));
    std::fs::remove_file(sa.path().join("token")).unwrap();
    let tok = Harness::token(&["echo"]);
    // Within a check interval, new sessions are refused.
    assert!(upstream::wait_until(Duration::from_secs(10), || {
        status_of(&h, &format!("/{tok}/echo")) == 502
    }));
    let dialed = h.upstream.connections_total();
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 502);
    assert!(a.body.contains("credentials unavailable"), "{}", a.body);
    assert!(a.body.contains("token"), "names the file: {}", a.body);
    // A refused session does not even dial.
    assert_eq!(h.upstream.connections_total(), dialed);
    // And the pod reports not ready, so traffic goes elsewhere.
    let readyz = || raw_request(h.addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    let ready = readyz();
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("credentials"), "{}", ready.body);
    open.send(Message::text("two")).unwrap();
    assert_eq!(open.read().unwrap(), Message::text("two"));
    // Back again: new sessions work again, and the pod is ready.
    sa.write("token", SA_TOKEN);
    assert!(upstream::wait_until(Duration::from_secs(10), || readyz()
        .status
        == 200));
    assert_eq!(status_of(&h, &format!("/{tok}/echo")), 101);
}

#[test]
fn in_cluster_mode_from_the_environment_and_missing_files_at_start() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let standin = kubevirt(&pki, Some(SA_TOKEN), B::Echo);
    let proxy = ProxyProcess::start(&[
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT", standin.addr().port().to_string()),
        ("SERVICE_ACCOUNT_DIR", sa.path().display().to_string()),
    ]);
    let tok = Harness::token(&["echo-env"]);
    let mut ws = ws_connect(proxy.addr, &format!("/{tok}/echo-env")).unwrap();
    ws.send(Message::text("in cluster")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("in cluster"));
    drop(proxy);

    let empty = TempDir::new("empty-sa");
    for (remove, var) in [
        ("ca.crt", "UPSTREAM_CA_FILE"),
        ("token", "UPSTREAM_TOKEN_FILE"),
    ] {
        let dir = sa_dir(&pki, SA_TOKEN);
        std::fs::remove_file(dir.path().join(remove)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"))
            .env_clear()
            .env("SECRET_KEY", SECRET)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", "6443")
            .env("SERVICE_ACCOUNT_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(var) && err.contains(remove), "{err}");
    }
    drop(empty);
}

/// The raw 101 (or refusal) head for an upgrade offering `protocols`.
fn offered(h: &Harness, vmi: &str, protocols: Option<&str>) -> String {
    let tok = Harness::token(&[vmi]);
    let extra = protocols
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    head_of(h, &format!("/{tok}/{vmi}"), &extra)
}

/// The status of an upgrade to `path`, reading only the response head (a
/// 101 leaves the connection open).
fn status_of(h: &Harness, path: &str) -> u16 {
    common::status_in(&head_of(h, path, ""))
}

fn head_of(h: &Harness, path: &str, extra: &str) -> String {
    common::upgrade_head(h.addr, path, extra).1
}

fn answered_protocol(head: &str) -> Option<String> {
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Protocol: "))
        .map(str::to_owned)
}

#[test]
fn subprotocols_follow_the_rules() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    let bearer_proto = "base64url.bearer.authorization.k8s.io.c2VjcmV0";
    let with_bearer = format!("{bearer_proto}, binary");
    let cases: [(Option<&str>, Option<&str>); 6] = [
        (None, None),
        (Some("binary"), Some("binary")),
        (
            Some("base64, plain.kubevirt.io, binary"),
            Some("plain.kubevirt.io"),
        ),
        (Some("base64"), None),
        (Some(bearer_proto), None),
        (Some(&with_bearer), Some("binary")),
    ];
    for (i, (offer, want)) in cases.into_iter().enumerate() {
        let head = offered(&h, &format!("echo-proto-{i}"), offer);
        assert_eq!(
            answered_protocol(&head).as_deref(),
            want,
            "offered {offer:?}"
        );
        assert!(!head.contains("bearer"), "a credential was echoed: {head}");
    }
    // The upstream is offered plain.kubevirt.io; with the setting empty, nothing.
    assert!(
        h.upstream
            .seen()
            .iter()
            .all(|r| r.header("sec-websocket-protocol") == Some("plain.kubevirt.io"))
    );
    let none = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |c| {
        c.upstream_subprotocols.clear()
    });
    answered_protocol(&offered(&none, "echo-none", None));
    assert_eq!(
        none.upstream.seen()[0].header("sec-websocket-protocol"),
        None
    );
}

#[test]
fn allowed_query_parameters_reach_the_upstream_and_preserve_session_gets_503() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |_| {});
    let tok = Harness::token(&["echo-busy"]);
    let mut first = h.ws_path(&format!(
        "/{tok}/echo-busy?preserveSession=true&token=leak&x=%2F"
    ));
    first.send(Message::text("first")).unwrap();
    assert_eq!(first.read().unwrap(), Message::text("first"));
    let seen = h.upstream.seen();
    assert_eq!(seen[0].query(), Some("preserveSession=true"));
    let a = raw_request(
        h.addr,
        &upgrade_request(&format!("/{tok}/echo-busy?preserveSession=true"), ""),
    );
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("Active VNC connection"), "{}", a.body);
    // Without the flag, the second session goes through.
    let mut second = h.ws_path(&format!("/{tok}/echo-busy"));
    second.send(Message::text("second")).unwrap();
    assert_eq!(second.read().unwrap(), Message::text("second"));
    assert_eq!(h.upstream.seen().last().unwrap().query(), None);
}

#[test]
fn backpressure_holds_through_tls() {
    const TOTAL: u64 = 128 << 20;
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let standin = kubevirt(
        &pki,
        Some(SA_TOKEN),
        B::Stream {
            total: TOTAL,
            frame: 65536,
        },
    );
    let proxy = ProxyProcess::start(&[
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT", standin.addr().port().to_string()),
        ("SERVICE_ACCOUNT_DIR", sa.path().display().to_string()),
    ]);
    let vmi = format!("stream-{TOTAL}-65536");
    let tok = Harness::token(&[&vmi]);
    let mut ws = ws_connect(proxy.addr, &format!("/{tok}/{vmi}")).unwrap();
    let (flowing, peak) = stall_then_read_all(&mut ws, &proxy, TOTAL);
    assert!(
        peak <= flowing + 2048,
        "RSS grew from {flowing} KiB to {peak} KiB while the client stalled"
    );
}

#[test]
fn an_upstream_that_never_finishes_tls_gets_504() {
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    // Accepts TCP, never says a word of TLS.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || {
        let (conn, _) = mute.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let standin = kubevirt(&pki, Some(SA_TOKEN), B::Echo);
    let h = in_cluster(standin, &sa, |c| {
        c.upstream.port = port;
        c.upstream_timeout = Duration::from_secs(1);
    });
    let tok = Harness::token(&["echo"]);
    let a = raw_request(h.addr, &upgrade_request(&format!("/{tok}/echo"), ""));
    assert_eq!(a.status, 504, "{}", a.body);
    holder.join().unwrap();
}

#[test]
fn an_upstream_that_answers_and_ends_in_one_flight_ends_the_session() {
    // A hand-made KubeVirt (the stand-in answers and ends in separate
    // writes): the 101, one frame and TCP's FIN without close_notify,
    // read by the proxy in one go. The end was seen while gathering the
    // head and forgotten, so the session waited for an event that had
    // already come.
    use std::io::{Read as _, Write as _};
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let tls = pki.server_tls().server_config().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ServerConnection::new(tls).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
            .unwrap();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut flight = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        flight.extend_from_slice(&[0x82, 2, b'h', b'i']);
        s.write_all(&flight).unwrap();
        s.flush().unwrap();
        s.sock.shutdown(std::net::Shutdown::Write).unwrap();
        // Until the proxy lets go.
        let mut rest = Vec::new();
        let _ = s.sock.read_to_end(&mut rest);
    });
    let standin = kubevirt(&pki, Some(SA_TOKEN), B::Echo);
    let h = in_cluster(standin, &sa, |c| c.upstream.port = port);
    let mut ws = h.ws("vm");
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(&b"hi"[..]));
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert!(f.reason.contains("upstream"), "{f:?}");
        }
        other => panic!("expected a close frame at once, got {other:?}"),
    }
    drop(ws);
    server.join().unwrap();
}

#[test]
fn a_clean_close_over_tls_ends_the_session_without_waiting_for_the_clients_fin() {
    // The client closes, KubeVirt answers and ends its TLS connection: with both close frames
    // through and the upstream's end read, nothing is owed to anyone, so the proxy closes the
    // client's socket and the session ends at once, as it does over plain TCP. The client here
    // keeps its socket open: a session waiting for its FIN would last the 30 s close timeout.
    let pki = TestPki::new();
    let sa = sa_dir(&pki, SA_TOKEN);
    let h = in_cluster(kubevirt(&pki, Some(SA_TOKEN), B::Echo), &sa, |c| {
        c.close_timeout = Duration::from_secs(30);
    });
    let stats = h.handle();
    for i in 0..20 {
        let mut ws = h.ws("echo-close");
        ws.send(Message::text("bye")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("bye"));
        ws.close(None).unwrap();
        // The upstream's answer to the close, then the end of the WebSocket.
        match ws.read() {
            Ok(Message::Close(_)) => {}
            other => panic!("session {i}: expected the close answer, got {other:?}"),
        }
        match ws.read() {
            Err(tungstenite::Error::ConnectionClosed) => {}
            other => panic!("session {i}: expected the closed WebSocket, got {other:?}"),
        }
        assert!(
            upstream::wait_until(Duration::from_secs(3), || stats.stats().open_sessions == 0),
            "session {i} still open with its client's socket open: it waits for the client's FIN"
        );
        drop(ws);
    }
}
