//! Operations, through real sockets and the real binary with real signals:
//! keepalive, graceful shutdown, health and readiness, metrics, the access
//! log, and the `token` / `check-config` subcommands.

mod common;
#[path = "support/labo.rs"]
mod labo;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::{self, StandIn};
use common::{
    Behaviour as B, Binary, Harness, SECRET, StandInOptions, raw_request, upgrade_request,
    ws_connect,
};
use kubevirt_vnc_proxy::{Config, Proxy};
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let a = raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    (a.status, a.body)
}

// ---- raw WebSocket client bits (frames as bytes, for exact control) ----

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7F {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l)?;
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((h[0] & 0x0F, p))
}

fn masked(op: u8, payload: &[u8]) -> Vec<u8> {
    let k = [3u8, 5, 7, 9];
    let mut f = vec![0x80 | op, 0x80 | payload.len() as u8];
    f.extend_from_slice(&k);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    f
}

#[test]
fn keepalive_pings_a_silent_client_and_takes_its_pongs_out_of_the_stream() {
    let standin = StandIn::serving(B::Sink);
    let p = Binary::start(
        standin.addr(),
        &[
            ("PING_INTERVAL_SECONDS", "1"),
            ("PEER_TIMEOUT_SECONDS", "3"),
            ("LOG_FORMAT", "json"),
        ],
    );
    let t = Harness::token(&["sink-ka"]);
    let mut s = common::upgraded(p.addr, &format!("/{t}/sink-ka"));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut pings = 0;
    // Answer every ping for longer than PEER_TIMEOUT: the session lives.
    while started.elapsed() < Duration::from_millis(4500) {
        match read_frame(&mut s) {
            Ok((0x9, payload)) => {
                assert_eq!(payload.len(), 8);
                pings += 1;
                s.write_all(&masked(0xA, &payload)).unwrap();
            }
            Ok((op, _)) => panic!("unexpected frame opcode {op} (a pong from upstream leaked?)"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("session died while answering pings: {e}"),
        }
    }
    assert!(pings >= 2, "{pings} pings in 4.5 s with a 1 s interval");
    // A clean close: the access line shows what crossed.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&masked(0x8, &1000u16.to_be_bytes())).unwrap();
    let (op, payload) = read_frame(&mut s).unwrap();
    assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));
    drop(s);
    let lines = p.drain_lines(Duration::from_secs(3));
    let session = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "session")
        .unwrap_or_else(|| panic!("no access line in {lines:?}"));
    // Only the close frame (2 + 4 mask + 2 code bytes) went upstream: every
    // pong answering the proxy's pings was taken out.
    assert_eq!(session["bytes_up"], 8, "{session}");
    assert_eq!(session["client_close"], 1000);
    assert!(upstream::wait_until(Duration::from_secs(3), || !standin
        .close_codes()
        .is_empty()));
    assert_eq!(
        standin.sink_results()[0].0,
        0,
        "no data reached the upstream"
    );
}

#[test]
fn a_client_that_stops_answering_is_gone_after_the_peer_timeout() {
    let standin = StandIn::serving(B::Sink);
    let h = Harness::start_with(B::Sink, |c| {
        c.upstream =
            kubevirt_vnc_proxy::config::UpstreamUrl::parse(&format!("ws://{}", standin.addr()))
                .unwrap();
        c.ping_interval = Duration::from_secs(1);
        c.peer_timeout = Duration::from_secs(2);
        c.metrics_addr = Some("127.0.0.1:0".into());
    });
    let t = Harness::token(&["sink-silent"]);
    // Read before the upgrade: the proxy's timers start before the client
    // sees its 101, so only this makes the lower bound below sound.
    let started = Instant::now();
    let s = common::upgraded(h.addr, &format!("/{t}/sink-silent"));
    // The client never reads and never answers.
    assert!(upstream::wait_until(Duration::from_secs(6), || !standin
        .close_codes()
        .is_empty()));
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(
        standin.close_codes(),
        vec![Some(1001)],
        "the upstream is told the client went away"
    );
    let metrics = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let (_, body) = get(metrics, "/metrics");
    assert!(
        body.contains("kubevirt_vnc_proxy_keepalive_timeouts_total 1"),
        "{body}"
    );
    drop(s);
}

#[test]
fn a_client_that_talks_but_never_reads_is_gone_after_the_peer_timeout() {
    // It sends a message every 100 ms, so it is never silent, and reads
    // nothing while the upstream streams: every buffer on the way fills,
    // and the proxy's would be held for good (RELAY_MEMORY_BYTES is shared).
    const TOTAL: u64 = 1 << 30;
    const FRAME: usize = 64 << 10;
    let h = Harness::start_with(
        B::Stream {
            total: TOTAL,
            frame: FRAME,
        },
        |c| {
            c.ping_interval = Duration::from_secs(1);
            c.peer_timeout = Duration::from_secs(2);
            c.close_timeout = Duration::from_secs(1);
        },
    );
    // Read before the upgrade (the proxy's timers start before the 101).
    let started = Instant::now();
    let mut ws = h.ws(&format!("stream-{TOTAL}-{FRAME}"));
    let handle = h.handle();
    while handle.stats().open_sessions > 0 && started.elapsed() < Duration::from_secs(20) {
        // Sends fail once the proxy has closed the socket.
        let _ = ws.send(Message::binary(vec![7u8; 16]));
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = handle.stats();
    assert_eq!(
        s.open_sessions, 0,
        "the session outlived 20 s of a client reading nothing"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((s.buffers_in_use, s.buffer_bytes), (0, 0));
}

#[test]
fn sigterm_drains_then_closes_with_1001_and_exits_0() {
    let standin = StandIn::serving(B::Echo);
    let mut p = Binary::start(standin.addr(), &[("SHUTDOWN_GRACE_SECONDS", "3")]);
    assert_eq!(get(p.addr, "/healthz").0, 200);
    assert_eq!(get(p.addr, "/readyz").0, 200);
    let t = Harness::token(&["echo"]);
    let mut ws = ws_connect(p.addr, &format!("/{t}/echo")).unwrap();
    ws.send(Message::text("before")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("before"));
    // One loop answers the signals itself: no thread besides it (socket
    // calls of a single-threaded process take no file reference).
    assert_eq!(threads(p.child.id()), 1, "one worker, one thread");
    p.signal("TERM");
    // Not ready (once the loop has taken the signal), new sessions refused,
    // open ones still served.
    assert!(
        upstream::wait_until(Duration::from_secs(5), || get(p.addr, "/readyz").0 == 503),
        "/readyz still ready 5 s after SIGTERM"
    );
    assert_eq!(
        raw_request(p.addr, &upgrade_request(&format!("/{t}/echo"), "")).status,
        503
    );
    ws.send(Message::text("during grace")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("during grace"));
    // After the grace: going away.
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1001);
            assert_eq!(f.reason.as_str(), "going away");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    let _ = ws.flush();
    drop(ws);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_second_signal_stops_at_once() {
    let standin = StandIn::serving(B::Echo);
    let mut p = Binary::start(standin.addr(), &[("SHUTDOWN_GRACE_SECONDS", "60")]);
    let t = Harness::token(&["echo"]);
    let _ws = ws_connect(p.addr, &format!("/{t}/echo")).unwrap();
    p.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        p.wait_exit(Duration::from_millis(300)),
        None,
        "the first signal only drains"
    );
    p.signal("INT");
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn metrics_are_served_in_the_prometheus_text_format() {
    let h = Harness::start_with(B::Echo, |c| c.metrics_addr = Some("127.0.0.1:0".into()));
    let metrics = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let mut ws = h.ws("echo");
    ws.send(Message::binary(vec![7; 1000])).unwrap();
    ws.read().unwrap();
    ws.close(None).unwrap();
    let _ = ws.read();
    drop(ws);
    assert_eq!(
        raw_request(h.addr, &upgrade_request("/bad/echo", "")).status,
        401
    );
    assert!(h.wait_idle());
    let (status, body) = get(metrics, "/metrics");
    assert_eq!(status, 200);
    let mut samples = std::collections::HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.insert(name.to_owned(), value);
    }
    assert_eq!(
        samples["kubevirt_vnc_proxy_refusals_total{status=\"401\"}"],
        1.0
    );
    assert_eq!(
        samples["kubevirt_vnc_proxy_sessions_total{outcome=\"normal\"}"],
        1.0
    );
    assert!(samples["kubevirt_vnc_proxy_bytes_total{direction=\"up\"}"] >= 1000.0);
    assert!(samples["kubevirt_vnc_proxy_bytes_total{direction=\"down\"}"] >= 1000.0);
    assert_eq!(samples["kubevirt_vnc_proxy_handshake_seconds_count"], 1.0);
    assert_eq!(
        samples["kubevirt_vnc_proxy_upstream_dial_seconds_count"],
        1.0
    );
    for family in [
        "kubevirt_vnc_proxy_open_connections",
        "kubevirt_vnc_proxy_open_sessions",
        "kubevirt_vnc_proxy_keepalive_timeouts_total",
        "kubevirt_vnc_proxy_backpressure_pauses_total",
        "kubevirt_vnc_proxy_limits_hit_total",
    ] {
        assert!(samples.contains_key(family), "{family} missing");
    }
    // Only /metrics there; the main listener does not serve it.
    assert_eq!(get(metrics, "/other").0, 404);
    assert_eq!(get(h.addr, "/metrics").0, 404);
}

#[test]
fn the_access_log_has_one_json_line_per_connection_and_never_the_token() {
    let standin = StandIn::serving(B::Echo);
    let p = Binary::start(standin.addr(), &[("LOG_FORMAT", "json")]);
    let t = Harness::token(&["echo"]);
    let mut ws = ws_connect(p.addr, &format!("/{t}/echo")).unwrap();
    ws.send(Message::text("hi")).unwrap();
    ws.read().unwrap();
    ws.close(None).unwrap();
    let _ = ws.read();
    drop(ws);
    let bad = common::tokens::mint(
        "a-wrong-secret-that-is-32-bytes-long",
        common::NS,
        &["echo"],
        common::tokens::now() + 60,
    );
    assert_eq!(
        raw_request(p.addr, &upgrade_request(&format!("/{bad}/echo"), "")).status,
        401
    );
    let lines = p.drain_lines(Duration::from_secs(2));
    for l in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l}"
        );
        assert!(
            !l.contains(&t) && !l.contains(&bad),
            "a token in the log: {l}"
        );
    }
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let session = events
        .iter()
        .find(|e| e["event"] == "session")
        .expect("a session line");
    for field in [
        "client",
        "vmi",
        "namespace",
        "token_id",
        "outcome",
        "duration_ms",
        "bytes_up",
        "bytes_down",
        "client_close",
        "upstream_close",
    ] {
        assert!(session.get(field).is_some(), "{field} in {session}");
    }
    assert_eq!(session["vmi"], "echo");
    assert_eq!(session["token_id"], "5");
    let refused = events
        .iter()
        .find(|e| e["event"] == "refused")
        .expect("a refusal line");
    assert_eq!(refused["status"], 401);
    assert!(
        refused["reason"].as_str().unwrap().contains("signature"),
        "{refused}"
    );
    assert!(
        refused["detail"].as_str().unwrap().contains("id 5"),
        "{refused}"
    );
}

#[test]
fn the_token_subcommand_mints_what_the_proxy_accepts() {
    let out = Command::new(BIN)
        .env_clear()
        .env("SECRET_KEY", SECRET)
        .args([
            "token",
            "--vmi",
            "echo",
            "--vmi",
            "other",
            "--namespace",
            "lab-ns",
            "--ttl",
            "60",
            "--user-id",
            "42",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let h = Harness::start(B::Echo);
    let mut ws = h.ws_path(&format!("/{token}/echo"));
    ws.send(Message::text("minted")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("minted"));
    let bad = Command::new(BIN)
        .env_clear()
        .args(["token", "--vmi", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn check_config_and_version() {
    let ok = Command::new(BIN)
        .env_clear()
        .env("SECRET_KEY", SECRET)
        .env("LOCAL_DEV_MODE", "true")
        .env("WS_REMOTE_URL", "ws://127.0.0.1:8001")
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration ok"));
    let missing = Command::new(BIN)
        .env_clear()
        .env("SECRET_KEY", SECRET)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_ACCOUNT_DIR", "/nonexistent")
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent"));
    // In-cluster mode sends the service account's token: never over ws://
    // unless the operator says so.
    let sa = std::env::temp_dir().join(format!("kvp-sa-{}", std::process::id()));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "sa-token").unwrap();
    let cleartext = |allow: Option<&str>| {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("SECRET_KEY", SECRET)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("SERVICE_ACCOUNT_DIR", &sa)
            .env("WS_REMOTE_URL", "ws://127.0.0.1:8080")
            .arg("check-config");
        if let Some(a) = allow {
            c.env("ALLOW_CLEARTEXT_BEARER_TOKEN", a);
        }
        c.output().unwrap()
    };
    let refused = cleartext(None);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("WS_REMOTE_URL") && err.contains("ALLOW_CLEARTEXT_BEARER_TOKEN=true"),
        "{err}"
    );
    let allowed = cleartext(Some("true"));
    assert_eq!(
        allowed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    std::fs::remove_dir_all(&sa).unwrap();
    let v = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(v.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("kubevirt-vnc-proxy "));
}

#[test]
fn two_workers_share_the_port_one_metrics_one_signal_path() {
    let standin = StandIn::serving(B::Echo);
    let mut p = Binary::start(
        standin.addr(),
        &[
            ("WORKERS", "2"),
            ("SHUTDOWN_GRACE_SECONDS", "1"),
            ("METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let line = p.lines_until(|l| l.last().is_some_and(|l| l.contains("serving /metrics")));
    let metrics: SocketAddr = line
        .last()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    let t = Harness::token(&["echo"]);
    let mut sessions: Vec<_> = (0..24)
        .map(|_| ws_connect(p.addr, &format!("/{t}/echo")).unwrap())
        .collect();
    for (i, ws) in sessions.iter_mut().enumerate() {
        ws.send(Message::text(format!("{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("{i}")));
    }
    // One /metrics for the process: every worker's sessions (the kernel
    // spreads 24 connections over both, so one worker alone shows fewer).
    let sample = |name: &str| -> f64 {
        let (status, body) = get(metrics, "/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    assert!(
        upstream::wait_until(Duration::from_secs(5), || sample(
            "kubevirt_vnc_proxy_open_sessions "
        ) == 24.0),
        "open sessions: {}",
        sample("kubevirt_vnc_proxy_open_sessions ")
    );
    assert_eq!(sample("kubevirt_vnc_proxy_handshake_seconds_count "), 24.0);
    // One signal path: the first loop answers SIGTERM for both, with no
    // signal thread beside the two loops.
    let threads = threads(p.child.id());
    assert_eq!(threads, 2, "two loops and nothing else: {threads} threads");
    p.signal("TERM");
    for ws in &mut sessions {
        match ws.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001),
            other => panic!("expected 1001 from every worker, got {other:?}"),
        }
    }
    drop(sessions);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn max_connections_is_per_worker() {
    let standin = StandIn::serving(B::Echo);
    let p = Binary::start(
        standin.addr(),
        &[
            ("WORKERS", "2"),
            ("MAX_CONNECTIONS", "5"),
            ("METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let line = p.lines_until(|l| l.last().is_some_and(|l| l.contains("serving /metrics")));
    let metrics: SocketAddr = line
        .last()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap();
    // 24 clients that never finish their request: each worker takes 5, the
    // rest wait in the backlog. The kernel spreads connections over both
    // workers by their ports, so it takes more than 5 and at most 10 (all 24
    // on one worker: a chance of one in 2^23).
    let _slow: Vec<TcpStream> = (0..24)
        .map(|_| {
            let mut s = TcpStream::connect(p.addr).unwrap();
            s.write_all(b"GET /x/echo HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // The scrape's own connection (the probe port's) is not counted.
    let open = || -> usize {
        let (_, body) = get(metrics, "/metrics");
        let n: usize = body
            .lines()
            .find_map(|l| {
                l.strip_prefix("kubevirt_vnc_proxy_open_connections ")?
                    .parse()
                    .ok()
            })
            .unwrap();
        n
    };
    assert!(upstream::wait_until(Duration::from_secs(5), || open() > 5));
    std::thread::sleep(Duration::from_millis(300));
    let n = open();
    assert!(
        n > 5 && n <= 10,
        "{n} connections open with MAX_CONNECTIONS=5 per worker"
    );
}

/// Threads of process `pid` (from /proc).
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn sigterm_on_an_idle_proxy_exits_at_once() {
    let standin = StandIn::serving(B::Echo);
    let mut p = Binary::start(standin.addr(), &[("SHUTDOWN_GRACE_SECONDS", "25")]);
    let started = Instant::now();
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited for a grace with nothing to drain"
    );
}

#[test]
fn a_line_break_in_a_token_id_stays_inside_one_log_record() {
    if !labo::available() {
        return;
    }
    // LabOrchestrator's issuer signs whatever user id it is given.
    let mut mint = labo::Mint::new(SECRET, &["echo"]);
    // U+009B is CSI, which a terminal may obey as ESC [ does; DEL and the
    // C1 controls are escaped like the C0 ones.
    mint.user_id = serde_json::json!("5\r\nINFO forged record\u{9b}2J\u{7f}\u{2028}");
    let t = mint.with(labo::LibAuth::V2_2_0);
    let standin = StandIn::serving(B::Echo);
    let p = Binary::start(standin.addr(), &[("LOGLEVEL", "DEBUG")]);
    let mut ws = ws_connect(p.addr, &format!("/{t}/echo")).unwrap();
    ws.send(Message::binary(&b"x"[..])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(&b"x"[..]));
    ws.close(None).unwrap();
    let lines = p.drain_lines(Duration::from_secs(2));
    let escaped = r#""5\r\nINFO forged record\u009b2J\u007f\u2028""#;
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("token id {escaped} allows lab-ns/echo"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("token id {escaped})"))),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("INFO forged")),
        "a record was split: {lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(|c: char| c.is_control() || c == '\u{2028}')),
        "a control character written raw: {lines:#?}"
    );
}

/// The soft open-files limit of process `pid` (`/proc/PID/limits`).
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn the_binary_raises_its_open_files_limit_to_what_max_connections_needs() {
    let hard = rlimit::Resource::NOFILE.get().unwrap().1;
    if hard < 2048 {
        eprintln!("SKIPPED: the hard open-files limit ({hard}) leaves nothing to raise to");
        return;
    }
    let standin = StandIn::serving(B::Echo);
    // Started from a shell with the common default soft limit.
    let start = |max_connections: &str| {
        let mut child = Command::new("bash")
            .args(["-c", "ulimit -Sn 1024 && exec \"$0\"", BIN])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SECRET_KEY", SECRET)
            .env("LOCAL_DEV_MODE", "true")
            .env("WS_REMOTE_URL", format!("ws://{}", standin.addr()))
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("MAX_CONNECTIONS", max_connections)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        for line in lines.by_ref().map_while(Result::ok) {
            let listening = line.contains("listening on");
            log.push(line);
            if listening {
                break;
            }
        }
        let soft = soft_nofile(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        (soft, log.join("\n"))
    };
    // 10,000 sessions need about 20,064 descriptors: raised as far as allowed,
    // with a warning when fewer than 90 % of them fit.
    let (soft, log) = start("10000");
    assert_eq!(soft, hard.min(20_064), "{log}");
    let fits = (soft - 64) / 2;
    assert_eq!(
        log.contains("needs about 20064"),
        fits < 9_000,
        "a warning exactly when the hard limit is too low: {log}"
    );
    // 20,000 sessions cannot fit under this hard limit: always a warning.
    let (soft, log) = start("20000");
    assert_eq!(soft, hard.min(40_064), "{log}");
    if hard < 36_000 {
        assert!(log.contains("needs about 40064"), "{log}");
        assert!(
            log.contains(&format!(
                "past about {fits2} sessions",
                fits2 = (soft - 64) / 2
            )),
            "{log}"
        );
    }
    // 100 sessions fit in 1,024: left alone, no warning.
    let (soft, log) = start("100");
    assert_eq!(soft, 1024, "{log}");
    assert!(!log.contains("open-files limit"), "{log}");
}

#[test]
fn probes_on_the_probe_path_answer_a_proxy_full_of_slow_clients() {
    // A long handshake timeout: a probe stuck behind the slow clients would
    // wait the whole 30 s, far past the bound below, which leaves room for
    // a loaded machine.
    let h = Harness::start_with(B::Echo, |c| {
        c.max_connections = 20;
        c.metrics_addr = Some("127.0.0.1:0".into());
        c.handshake_timeout = Duration::from_secs(30);
    });
    let probes = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    // 25 clients that send half a request head: 20 fill MAX_CONNECTIONS, 5
    // wait in the backlog.
    let slow: Vec<TcpStream> = (0..25)
        .map(|_| {
            let mut s = TcpStream::connect(h.addr).unwrap();
            s.write_all(b"GET /x/echo HTTP/1.1\r\nHost: a\r\n").unwrap();
            s
        })
        .collect();
    assert!(upstream::wait_until(Duration::from_secs(5), || h
        .handle()
        .stats()
        .limits_hit
        >= 1));
    // The main port is full: its /healthz waits with the slow clients.
    let mut main = TcpStream::connect(h.addr).unwrap();
    main.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    main.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(main.read(&mut [0u8; 1]).is_err(), "the main port is full");
    // The probe path is not: every probe answers at once, twice in a row.
    for _ in 0..2 {
        for (path, want) in [("/healthz", "ok"), ("/readyz", "ready"), ("/metrics", "#")] {
            let started = Instant::now();
            let (status, body) = get(probes, path);
            let took = started.elapsed();
            assert_eq!(status, 200, "{path}: {body}");
            assert!(body.starts_with(want), "{path}: {body}");
            assert!(took < Duration::from_secs(3), "{path} took {took:?}");
        }
    }
    drop(slow);
}

/// The probe port holds 16 connections at once. Any pod may reach it, and 16 that send nothing
/// used to hold every slot for HANDSHAKE_TIMEOUT_SECONDS while kubelet's probe waited in the
/// backlog past its 2 s timeout (kept up, the pod is restarted and every console dropped). Now
/// the oldest connection of a full set gives way, so probes answer at once however many idle
/// connections come, and the idle ones are closed.
#[test]
fn idle_connections_on_the_probe_path_give_way_to_probes() {
    // Idle connections would hold their slots for the whole 30 s handshake
    // timeout if they did not give way: far past the bounds below.
    let h = Harness::start_with(B::Echo, |c| {
        c.metrics_addr = Some("127.0.0.1:0".into());
        c.handshake_timeout = Duration::from_secs(30);
    });
    let probes = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let mut idle: Vec<TcpStream> = Vec::new();
    for round in 0..3 {
        // More than the slots, each round: the earlier ones are given up, oldest first.
        idle.extend((0..20).map(|_| TcpStream::connect(probes).unwrap()));
        std::thread::sleep(Duration::from_millis(100));
        for path in ["/healthz", "/readyz", "/metrics"] {
            let started = Instant::now();
            let (status, _) = get(probes, path);
            let took = started.elapsed();
            assert_eq!(status, 200, "round {round}: {path}");
            assert!(
                took < Duration::from_secs(3),
                "round {round}: {path} took {took:?}"
            );
        }
    }
    // The first idle connections were closed without an answer.
    let mut first = idle.swap_remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Closed (EOF or reset), not merely silent past the read timeout.
    let read = first.read(&mut [0u8; 1]);
    assert!(
        match &read {
            Ok(n) => *n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        },
        "the oldest idle connection was not closed: {read:?}"
    );
    // The main port never noticed.
    let mut ws = h.ws("echo");
    ws.send(tungstenite::Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("still here"));
}

/// `bytes_total` moves while a console is open (counted within a second), not all at once when
/// it ends, and never goes down when it does. Before, a console streaming for hours added
/// nothing until it closed, and the byte rate showed a spike then.
#[test]
fn bytes_total_counts_open_sessions_as_they_go() {
    let h = Harness::start_with(B::Echo, |c| c.metrics_addr = Some("127.0.0.1:0".into()));
    let metrics = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let bytes = |direction: &str| -> u64 {
        let name = format!("kubevirt_vnc_proxy_bytes_total{{direction=\"{direction}\"}} ");
        let (_, body) = get(metrics, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name.as_str())?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    let mut ws = h.ws("echo");
    let payload = vec![7u8; 100_000];
    ws.send(tungstenite::Message::binary(payload.clone()))
        .unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::binary(payload));
    // 100,000 payload bytes and the frame's head, masked upstream (14) and not down (10).
    let started = Instant::now();
    assert!(
        upstream::wait_until(Duration::from_secs(6), || bytes("up") == 100_014
            && bytes("down") == 100_010),
        "the open session's bytes are not counted: up {}, down {}",
        bytes("up"),
        bytes("down")
    );
    // Counted once a second; 5 s leaves room for a loaded machine and still
    // catches bytes counted only when the session ends.
    assert!(started.elapsed() < Duration::from_secs(5));
    // It ends: the count stays, and its close frames are added.
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert!(h.wait_idle());
    let (up, down) = (bytes("up"), bytes("down"));
    assert!(up > 100_014 && down > 100_010, "{up} {down}");
    assert!(up < 100_014 + 16 && down < 100_010 + 16, "{up} {down}");
}

/// A closed or timed-out read from the client's side: the proxy has closed it.
fn closed_by_the_proxy(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    match s.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A full set of probe connections gives up exactly one, its oldest, for each one accepted: 16
/// idle ones all stay, a 17th closes the first. (Found in review: the oldest was closed before
/// the accept, also on the pass that found the backlog empty, so 16 never held.)
#[test]
fn one_new_probe_connection_closes_exactly_the_oldest() {
    // A 30 s handshake timeout: no idle connection is closed by it during the
    // test, however slow the machine.
    let h = Harness::start_with(B::Echo, |c| {
        c.metrics_addr = Some("127.0.0.1:0".into());
        c.handshake_timeout = Duration::from_secs(30);
    });
    let probes = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(probes).unwrap());
        std::thread::sleep(Duration::from_millis(10)); // accepted in this order
    }
    std::thread::sleep(Duration::from_millis(300));
    let closed = |idle: &mut Vec<TcpStream>| -> Vec<usize> {
        (0..idle.len())
            .filter(|&i| closed_by_the_proxy(&mut idle[i]))
            .collect()
    };
    assert_eq!(closed(&mut idle), Vec::<usize>::new(), "16 fit");
    let _new = TcpStream::connect(probes).unwrap();
    // However long the loop takes to accept it, the oldest goes...
    assert!(
        upstream::wait_until(Duration::from_secs(5), || closed_by_the_proxy(&mut idle[0])),
        "the oldest was not closed"
    );
    // ...alone.
    assert_eq!(closed(&mut idle), vec![0], "the oldest, alone");
}

/// `bytes_total` never goes down, not even for a scrape answered in the pass that ends a session
/// whose bytes were counted live (found in review: its live bytes left the count at once and its
/// final bytes came only with its event's dispatch, later in the pass, so such a scrape saw the
/// counter drop, which Prometheus takes for a reset). The loop is driven by hand here, so that
/// scrapes land in the passes that end the session.
#[test]
fn bytes_total_never_goes_down_when_a_session_ends() {
    let standin = StandIn::serving(B::Echo);
    let mut config =
        Config::local_dev(&format!("ws://{}", standin.addr()), SECRET.as_bytes()).unwrap();
    config.metrics_addr = Some("127.0.0.1:0".into());
    let mut proxy = Proxy::bind(config).unwrap();
    let metrics = proxy.metrics_addr().unwrap();
    let mut client = TcpStream::connect(proxy.local_addr()).unwrap();
    let token = Harness::token(&["echo"]);
    client
        .write_all(&upgrade_request(&format!("/{token}/echo"), ""))
        .unwrap();
    client.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let pump = |proxy: &mut Proxy, client: &mut TcpStream, got: &mut Vec<u8>| {
        proxy.poll_once(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 65536];
        if let Ok(n) = client.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let head_end = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n");
    while head_end(&got).is_none() {
        assert!(Instant::now() < deadline, "no 101");
        pump(&mut proxy, &mut client, &mut got);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));
    got.drain(..head_end(&got).unwrap() + 4);
    // One masked binary frame of 1,000 bytes, and its echo (1,004 bytes).
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | 126, 0x03, 0xE8];
    frame.extend_from_slice(&mask);
    frame.extend((0..1000).map(|i| (i as u8) ^ mask[i % 4]));
    client.write_all(&frame).unwrap();
    while got.len() < 1004 {
        assert!(Instant::now() < deadline, "no echo");
        pump(&mut proxy, &mut client, &mut got);
    }
    // A second and more: the open session's bytes are counted live.
    let until = Instant::now() + Duration::from_millis(1300);
    while Instant::now() < until {
        pump(&mut proxy, &mut client, &mut got);
    }
    let bytes_up = |s: &mut TcpStream| -> u64 {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find_map(|l| {
                l.strip_prefix("kubevirt_vnc_proxy_bytes_total{direction=\"up\"} ")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no bytes_total in {body}"))
    };
    let scrape = || {
        let mut s = TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        s
    };
    let mut first = scrape();
    proxy.poll_once(Some(Duration::ZERO)).unwrap();
    let before = bytes_up(&mut first);
    assert!(before >= 1008, "counted live: {before}");
    // The client resets; each pass also answers a scrape.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let mut scrapes = Vec::new();
    for _ in 0..8 {
        scrapes.push(scrape());
        proxy.poll_once(Some(Duration::ZERO)).unwrap();
    }
    let seen: Vec<u64> = scrapes.iter_mut().map(bytes_up).collect();
    let mut last = before;
    for v in &seen {
        assert!(*v >= last, "bytes_total went down: {before} then {seen:?}");
        last = *v;
    }
}

#[test]
fn metrics_count_sessions_by_how_they_ended() {
    let h = Harness::start_with(
        StandInOptions::serving(B::Echo).vmi("dropafter-10", B::DropAfter(10)),
        |c| {
            c.metrics_addr = Some("127.0.0.1:0".into());
            c.jwt.leeway_secs = 0;
        },
    );
    let metrics = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    // A close frame each way: normal.
    let mut ws = h.ws("echo");
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    // The upstream drops TCP after its data: abnormal.
    let mut ws = h.ws("dropafter-10");
    while ws.read().is_ok() {}
    // The token expires while relaying: token_expired, not abnormal. (`now`
    // is whole seconds: + 3 leaves at least 2 s to connect on a loaded
    // machine; + 1 left between 0 and 1.)
    let t = common::tokens::mint(SECRET, common::NS, &["echo-exp"], common::tokens::now() + 3);
    let mut ws = ws_connect(h.addr, &format!("/{t}/echo-exp")).unwrap();
    while ws.read().is_ok() {}
    assert!(h.wait_idle());
    let (_, body) = get(metrics, "/metrics");
    let count = |end: &str| -> String {
        let name = format!("kubevirt_vnc_proxy_sessions_total{{outcome=\"{end}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
            .to_owned()
    };
    assert_eq!(count("normal"), "1", "{body}");
    assert_eq!(count("abnormal"), "1", "{body}");
    assert_eq!(count("token_expired"), "1", "{body}");
    for end in ["violation", "timeout", "shutdown"] {
        assert_eq!(count(end), "0", "{body}");
    }
}

#[test]
fn probe_connections_do_not_count_toward_max_connections_per_ip() {
    let h = Harness::start_with(B::Echo, |c| {
        c.max_connections_per_ip = 1;
        c.metrics_addr = Some("127.0.0.1:0".into());
    });
    let probes = h.proxy.as_ref().unwrap().metrics_addr().unwrap();
    // A probe from this address in progress (kubelet's, from the node's
    // address): accepted, its request not complete yet.
    let mut probe = TcpStream::connect(probes).unwrap();
    probe.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    assert!(upstream::wait_until(Duration::from_secs(5), || h
        .handle()
        .stats()
        .accepted
        >= 1));
    // The one session this address may have still opens beside it.
    let mut ws = h.ws("echo");
    ws.send(Message::text("x")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("x"));
    // Another probe still answers beside the session...
    assert_eq!(get(probes, "/healthz"), (200, "ok\n".into()));
    // ...and the probe in progress is answered.
    probe.write_all(b"Host: a\r\n\r\n").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(common::read_answer(&mut probe).status, 200);
    // The limit itself holds on the main port: a second session is refused.
    let t = Harness::token(&["echo"]);
    let second = raw_request(h.addr, &upgrade_request(&format!("/{t}/echo"), ""));
    assert_eq!(second.status, 503, "{second:?}");
    assert!(
        second.body.contains("MAX_CONNECTIONS_PER_IP=1"),
        "{second:?}"
    );
}

/// The binary under `ulimit -n limit` (soft and hard, so it cannot raise
/// it), with its stderr lines on a channel.
fn start_with_nofile(
    limit: u32,
    upstream: SocketAddr,
    env: &[(&str, &str)],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("bash")
        .args(["-c", &format!("ulimit -n {limit} && exec \"$0\""), BIN])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SECRET_KEY", SECRET)
        .env("LOCAL_DEV_MODE", "true")
        .env("WS_REMOTE_URL", format!("ws://{upstream}"))
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Out of descriptors (EMFILE), accepting pauses for 100 ms on both
/// listeners: a probe waiting on the probe path is not retried (and logged)
/// on every pass of a busy loop, and is answered once descriptors free up.
#[test]
fn out_of_descriptors_the_probe_path_backs_off_like_the_main_port() {
    let standin = StandIn::serving(B::Echo);
    let (mut child, lines) = start_with_nofile(
        40,
        standin.addr(),
        &[("METRICS_ADDR", "127.0.0.1:0"), ("RUST_LOG", "info")],
    );
    let kill = scopeguard(&mut child);
    let mut startup = Vec::new();
    let (mut addr, mut probes): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
    while probes.is_none() {
        let l = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no start in {startup:#?}"));
        let last = l.rsplit(' ').next().and_then(|a| a.parse().ok());
        if l.contains("listening on") {
            addr = last;
        } else if l.contains("serving /metrics") {
            probes = last;
        }
        startup.push(l);
    }
    let (addr, probes) = (addr.unwrap(), probes.unwrap());
    // A session that keeps the loop busy, opened while descriptors are free.
    let t = Harness::token(&["echo"]);
    let mut ws = ws_connect(addr, &format!("/{t}/echo")).unwrap();
    // Slow clients until accept fails for lack of descriptors.
    let mut slow = Vec::new();
    let mut failed = false;
    for _ in 0..60 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /x/echo HTTP/1.1\r\n").unwrap();
        slow.push(s);
        while let Ok(l) = lines.recv_timeout(Duration::from_millis(20)) {
            failed |= l.contains("accept failed");
        }
        if failed {
            break;
        }
    }
    assert!(failed, "accept never failed with 40 descriptors");
    // A probe waits on the probe path, and the loop is kept busy.
    let mut probe = TcpStream::connect(probes).unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let busy = Instant::now();
    let mut round_trips = 0;
    while busy.elapsed() < Duration::from_secs(1) {
        ws.send(Message::binary(&b"busy"[..])).unwrap();
        assert_eq!(ws.read().unwrap(), Message::binary(&b"busy"[..]));
        round_trips += 1;
    }
    let failures = std::iter::from_fn(|| lines.recv_timeout(Duration::from_millis(50)).ok())
        .filter(|l| l.contains("accept failed"))
        .count();
    // Retried every 100 ms: about 10 in that second (the main port's and
    // the probe path's share the pause), not one per pass.
    assert!(
        failures <= 25,
        "{failures} failed accepts logged in 1 s ({round_trips} round trips)"
    );
    // Descriptors free again: the waiting probe is answered.
    drop(slow);
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(common::read_answer(&mut probe).status, 200);
    drop(kill);
}

/// Kills the child when dropped (the test may fail half-way).
fn scopeguard(child: &mut std::process::Child) -> impl Drop + '_ {
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Kill(child)
}

/// More probe connections queued at once than one pass accepts (ACCEPT_BUDGET), each
/// already complete (request and FIN sent), must all be answered promptly: the ones left in the
/// probe listener's backlog get no new epoll edge.
#[test]
fn probes_queued_beyond_one_passs_accept_budget_are_all_answered_at_once() {
    let standin = StandIn::serving(B::Echo);
    let mut config = kubevirt_vnc_proxy::Config::local_dev(
        &format!("ws://{}", standin.addr()),
        SECRET.as_bytes(),
    )
    .unwrap();
    config.metrics_addr = Some("127.0.0.1:0".into());
    config.handshake_timeout = Duration::from_secs(30);
    let proxy = kubevirt_vnc_proxy::Proxy::bind(config).unwrap();
    let probes = proxy.metrics_addr().unwrap();
    // Queued in the kernel before the loop runs: 8 complete probes.
    let mut clients: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(probes).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .collect();
    let running = proxy.spawn().unwrap();
    let started = Instant::now();
    let mut answered = 0;
    for s in &mut clients {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        if all.starts_with(b"HTTP/1.1 200") {
            answered += 1;
        }
    }
    let took = started.elapsed();
    running.shutdown().unwrap();
    assert_eq!(
        answered, 8,
        "only {answered} of 8 probes answered in {took:?}"
    );
}

/// A secret file ends with a newline more often than not, and the newline is
/// no part of the secret, even when the secret is bytes that are not text
/// (`head -c 48 /dev/urandom > k; echo >> k`). Tokens signed with either
/// file's secret are accepted (rotation); the newline never counts.
#[test]
fn secret_key_files_hold_bytes_and_their_trailing_newline_is_dropped() {
    let dir = common::TempDir::new("secret-files");
    let binary: Vec<u8> = (0..48u8).map(|i| 0x80 | i.wrapping_mul(37)).collect();
    assert!(
        std::str::from_utf8(&binary).is_err(),
        "the secret is not text"
    );
    let with_newline = [binary.as_slice(), b"\n"].concat();
    std::fs::write(dir.path().join("old"), &with_newline).unwrap();
    std::fs::write(dir.path().join("new"), format!("{SECRET}-new\r\n")).unwrap();
    let files = format!(
        "{},{}",
        dir.path().join("new").display(),
        dir.path().join("old").display()
    );
    let standin = StandIn::serving(B::Echo);
    let p = Binary::start(standin.addr(), &[("SECRET_KEY_FILES", &files)]);
    let claims = common::tokens::lab_claims(common::NS, &["echo"], common::tokens::now() + 600);
    let header = jsonwebtoken::Header::default();
    for (what, key, ok) in [
        ("the binary secret", binary.clone(), true),
        (
            "the text secret",
            format!("{SECRET}-new").into_bytes(),
            true,
        ),
        ("the binary secret with its newline", with_newline, false),
    ] {
        let t = common::tokens::mint_with_header(&key, header.clone(), &claims);
        let (_s, head) = common::upgrade_head(p.addr, &format!("/{t}/echo"), "");
        let want = if ok { 101 } else { 401 };
        assert_eq!(common::status_in(&head), want, "{what}: {head}");
    }
}
