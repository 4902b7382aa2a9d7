//! Backpressure through the real binary: a client that stops reading while
//! the upstream streams 256 MiB costs the proxy a few buffers, not the
//! stream, and when it reads again every byte arrives in order.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::{self, FNV_OFFSET, StandIn, fnv1a, pattern};
use common::{Harness, ProxyProcess, SECRET, ws_connect};
use tungstenite::Message;

const TOTAL: u64 = 256 << 20;
const FRAME: u64 = 64 << 10;

#[test]
fn a_stalled_client_costs_a_few_buffers_and_loses_nothing() {
    let standin = StandIn::start();
    let proxy = ProxyProcess::local_dev(standin.addr(), &[]);
    let fds_at_start = proxy.open_fds();
    let vmi = format!("stream-{TOTAL}-{FRAME}");
    let token = Harness::token(&[&vmi]);
    let mut ws = ws_connect(proxy.addr, &format!("/{token}/{vmi}")).expect("connect");

    let mut received = 0u64;
    let mut sum = FNV_OFFSET;
    let mut expect = vec![0u8; FRAME as usize];
    let mut take = |m: Message, received: &mut u64, sum: &mut u64| match m {
        Message::Binary(b) => {
            pattern(*received, &mut expect[..b.len()]);
            assert!(
                b[..] == expect[..b.len()],
                "bytes out of order at offset {received}"
            );
            *sum = fnv1a(*sum, &b);
            *received += b.len() as u64;
        }
        other => panic!("unexpected {other:?}"),
    };
    // Read a little so the stream is flowing, then stop reading.
    for _ in 0..4 {
        let m = ws.read().unwrap();
        take(m, &mut received, &mut sum);
    }
    let rss_flowing = proxy.rss_kib();
    // Stall for two seconds while the upstream keeps pushing; sample the
    // proxy's memory throughout.
    let stall = Instant::now();
    let mut peak = 0;
    while stall.elapsed() < Duration::from_secs(2) {
        peak = peak.max(proxy.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bound: the relay holds at most one 64 KiB buffer per direction;
    // allow 2 MiB for allocator noise. The stream is 256 MiB.
    assert!(
        peak <= rss_flowing + 2048,
        "proxy RSS grew from {rss_flowing} KiB to {peak} KiB while the client was stalled"
    );
    // Read everything else: all bytes, in order.
    while received < TOTAL {
        let m = ws.read().unwrap();
        take(m, &mut received, &mut sum);
    }
    let mut whole = FNV_OFFSET;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < TOTAL {
        pattern(off, &mut chunk);
        whole = fnv1a(whole, &chunk);
        off += chunk.len() as u64;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(sum, whole, "checksum of the relayed stream");
    // The upstream closes after the stream; the close reaches the client.
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the upstream's close, got {other:?}"),
    }
    drop(ws);
    assert!(
        upstream::wait_until(Duration::from_secs(10), || proxy.open_fds() == fds_at_start),
        "proxy fds: {} at start, {} after the session",
        fds_at_start,
        proxy.open_fds()
    );
}

#[test]
fn the_binary_refuses_bad_configuration_with_status_2() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
        cmd.env_clear()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run the binary")
    };
    for (env, var) in [
        (vec![("LOCAL_DEV_MODE", "true")], "SECRET_KEY"),
        // In-cluster mode (the default) outside a cluster: a clear refusal.
        (vec![("SECRET_KEY", "s")], "KUBERNETES_SERVICE_HOST"),
        (
            vec![("SECRET_KEY", "s"), ("LOCAL_DEV_MODE", "sometimes")],
            "LOCAL_DEV_MODE",
        ),
        (
            vec![
                ("SECRET_KEY", "s"),
                ("LOCAL_DEV_MODE", "1"),
                ("PORT", "http"),
            ],
            "PORT",
        ),
        (
            vec![
                ("SECRET_KEY", "s"),
                ("LOCAL_DEV_MODE", "yes"),
                ("WS_REMOTE_URL", "ftp://x"),
            ],
            "WS_REMOTE_URL",
        ),
    ] {
        let out = run(&env);
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(var), "{var} named in: {err}");
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
    let out = cmd.arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "SECRET_KEY",
        "PORT",
        "HOST",
        "WS_REMOTE_URL",
        "API_PATH",
        "HOST_PATH_PREFIX",
        "LOGLEVEL",
        "JWT_ALGORITHMS",
        "JWT_PUBLIC_KEY_FILE",
        "LOCAL_DEV_MODE",
    ] {
        assert!(text.contains(var), "--help lists {var}");
    }
}

#[test]
fn the_binary_serves_a_session_with_flags_over_environment() {
    let standin = StandIn::start();
    // The environment points at a dead port; the flag wins.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
    cmd.env_clear()
        .env("SECRET_KEY", SECRET)
        .env("LOCAL_DEV_MODE", "true")
        .env("WS_REMOTE_URL", "ws://127.0.0.1:1")
        .env("PORT", "1")
        .args([
            "--ws-remote-url",
            &format!("ws://{}", standin.addr()),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("a log line").unwrap();
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let token = Harness::token(&["echo"]);
    let mut ws = ws_connect(addr, &format!("/{token}/echo")).unwrap();
    ws.send(Message::text("flag")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("flag"));
    let _ = child.kill();
    let _ = child.wait();
}
