//! Backpressure through the real binary: a client that stops reading while
//! the upstream streams 256 MiB costs the proxy a few buffers, not the
//! stream, and when it reads again every byte arrives in order.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::upstream::{self, StandIn};
use common::{Behaviour as B, Harness, ProxyProcess, SECRET, stall_then_read_all, ws_connect};
use tungstenite::Message;

const TOTAL: u64 = 256 << 20;
const FRAME: u64 = 64 << 10;

#[test]
fn a_stalled_client_costs_a_few_buffers_and_loses_nothing() {
    let standin = StandIn::serving(B::Stream {
        total: TOTAL,
        frame: FRAME as usize,
    });
    let proxy = ProxyProcess::local_dev(standin.addr(), &[("LOGLEVEL", "DEBUG")]);
    let fds_at_start = proxy.open_fds();
    let vmi = format!("stream-{TOTAL}-{FRAME}");
    let token = Harness::token(&[&vmi]);
    let mut ws = ws_connect(proxy.addr, &format!("/{token}/{vmi}")).expect("connect");

    let (flowing, peak) = stall_then_read_all(&mut ws, &proxy, TOTAL);
    // The bound: the relay holds at most one 64 KiB buffer per direction;
    // allow 2 MiB for allocator noise. The stream is 256 MiB.
    assert!(
        peak <= flowing + 2048,
        "proxy RSS grew from {flowing} KiB to {peak} KiB while the client was stalled"
    );
    // The upstream closes after the stream; the close reaches the client.
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the upstream's close, got {other:?}"),
    }
    drop(ws);
    assert!(
        upstream::wait_until(Duration::from_secs(10), || proxy.open_fds() == fds_at_start),
        "proxy fds: {} at start, {} after the session; its log:\n{}",
        fds_at_start,
        proxy.open_fds(),
        proxy.log_text()
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
    // A secret long enough that each case has exactly one thing wrong (every
    // error is reported, one line each).
    const LONG_SECRET: &str = "0123456789abcdef0123456789abcdef";
    for (env, var) in [
        (vec![("LOCAL_DEV_MODE", "true")], "SECRET_KEY"),
        // In-cluster mode (the default) outside a cluster: a clear refusal.
        (vec![("SECRET_KEY", LONG_SECRET)], "KUBERNETES_SERVICE_HOST"),
        (
            vec![("SECRET_KEY", LONG_SECRET), ("LOCAL_DEV_MODE", "sometimes")],
            "LOCAL_DEV_MODE",
        ),
        (
            vec![
                ("SECRET_KEY", LONG_SECRET),
                ("LOCAL_DEV_MODE", "1"),
                ("PORT", "http"),
            ],
            "PORT",
        ),
        (
            vec![
                ("SECRET_KEY", LONG_SECRET),
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
    let standin = StandIn::serving(B::Echo);
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

#[test]
fn bulk_streams_take_bulk_buffers_up_to_the_limit_and_lose_nothing() {
    // Two streams at once, one bulk buffer allowed: the first stream to
    // fill a regular buffer gets it, the other keeps regular buffers, and
    // both arrive whole.
    const N: u64 = 48 << 20;
    let h = Harness::start_with(
        B::Stream {
            total: N,
            frame: FRAME as usize,
        },
        |c| {
            c.bulk_buffer_size = 256 << 10;
            c.bulk_buffers = 1;
        },
    );
    let vmi = format!("stream-{N}-{FRAME}");
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut ws = h.ws(&vmi);
            std::thread::spawn(move || {
                let mut offset = 0u64;
                let mut expect = Vec::new();
                let mut messages = 0u32;
                while offset < N {
                    match ws.read().expect("read") {
                        Message::Binary(b) => {
                            expect.resize(b.len(), 0);
                            upstream::pattern(offset, &mut expect);
                            assert!(b[..] == expect[..], "bytes out of order at {offset}");
                            offset += b.len() as u64;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                    // A reader a little slower than the stream, so that
                    // buffers fill, drain and are taken again; and one long
                    // stall, during which both streams hold a full buffer.
                    messages += 1;
                    if messages.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if offset == N / 2 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
                assert!(matches!(ws.read(), Ok(Message::Close(_))));
                offset
            })
        })
        .collect();
    let handle = h.handle();
    let mut peak = 0;
    while !readers.iter().all(|r| r.is_finished()) {
        peak = peak.max(handle.stats().bulk_buffers_in_use);
        std::thread::sleep(Duration::from_millis(1));
    }
    for r in readers {
        assert_eq!(r.join().expect("reader"), N);
    }
    assert_eq!(peak, 1, "bulk buffers in use at the peak (limit 1)");
    assert!(h.wait_idle());
    let s = handle.stats();
    assert_eq!((s.buffers_in_use, s.bulk_buffers_in_use), (0, 0));
}

#[test]
fn a_closing_handshake_that_times_out_gives_its_buffers_back() {
    // The client stops reading while the upstream streams, then says
    // goodbye; the upstream, blocked writing, never answers. The closing
    // timeout ends the session: the buffers it held (full, one of them a
    // bulk buffer) must go back to the pool, or every such session would
    // shrink it for good.
    let h = Harness::start_with(
        B::Stream {
            total: TOTAL,
            frame: FRAME as usize,
        },
        |c| c.close_timeout = Duration::from_secs(1),
    );
    let vmi = format!("stream-{TOTAL}-{FRAME}");
    let mut ws = h.ws(&vmi);
    // A few messages, so that the stream is flowing (and bulk) ...
    for _ in 0..64 {
        assert!(matches!(ws.read().expect("read"), Message::Binary(_)));
    }
    // ... then no more reading, until every buffer on the way is full (the
    // kernel's first: how long that takes depends on the machine's load,
    // so wait for it, bounded, rather than for a fixed time).
    let handle = h.handle();
    assert!(
        upstream::wait_until(Duration::from_secs(20), || handle.stats().buffers_in_use
            > 0),
        "the stalled stream holds a buffer"
    );
    std::thread::sleep(Duration::from_millis(100));
    ws.close(None).expect("send the close frame");
    assert!(
        upstream::wait_until(Duration::from_secs(10), || handle.stats().open_sessions
            == 0),
        "the session outlived its closing timeout"
    );
    let s = handle.stats();
    assert_eq!((s.buffers_in_use, s.bulk_buffers_in_use), (0, 0));
    drop(ws);
}

#[test]
fn relay_memory_is_bounded_and_a_waiting_stream_resumes_when_a_buffer_frees() {
    // Three streams, room for two buffers (RELAY_MEMORY_BYTES): while the
    // clients do not read, two streams hold a full buffer each and the
    // third waits, its source unread. When they read, every stream
    // arrives whole, the waiting one included (the loop drives it again
    // once a buffer frees: a socket that stays readable raises no event).
    const N: u64 = 32 << 20;
    const BUF: usize = 16 << 10;
    let h = Harness::start_with(
        B::Stream {
            total: N,
            frame: BUF,
        },
        |c| {
            c.buffer_size = BUF;
            c.bulk_buffer_size = 0;
            c.relay_memory = 2 * BUF;
        },
    );
    let vmi = format!("stream-{N}-{BUF}");
    let handle = h.handle();
    // Two streams first, until their clients' kernel buffers are full and
    // each holds a full buffer for good (20 samples in a row, bounded).
    let mut clients: Vec<_> = (0..2).map(|_| h.ws(&vmi)).collect();
    let mut in_a_row = 0;
    assert!(
        upstream::wait_until(Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(10));
            in_a_row = if handle.stats().buffers_in_use == 2 {
                in_a_row + 1
            } else {
                0
            };
            in_a_row == 20
        }),
        "two stalled streams hold two buffers: {:?}",
        handle.stats()
    );
    // The third starts with the memory taken: its 101 goes out through a
    // buffer lent over the limit, into which nothing more may be read, so
    // it waits for memory like any direction.
    clients.push(h.ws(&vmi));
    assert!(
        upstream::wait_until(Duration::from_secs(10), || {
            let s = handle.stats();
            s.buffers_in_use == 2 && s.waiting_for_memory == 1
        }),
        "the third stream waits for memory: {:?}",
        handle.stats()
    );
    let mut peak = 0;
    for _ in 0..30 {
        peak = peak.max(handle.stats().buffer_bytes);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(peak, 2 * BUF, "bytes of the buffers in use while stalled");
    let readers: Vec<_> = clients
        .drain(..)
        .map(|mut ws| {
            ws.get_ref()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
            std::thread::spawn(move || {
                let mut offset = 0u64;
                let mut expect = Vec::new();
                while offset < N {
                    match ws.read().expect("read (a stream left waiting times out)") {
                        Message::Binary(b) => {
                            expect.resize(b.len(), 0);
                            upstream::pattern(offset, &mut expect);
                            assert!(b[..] == expect[..], "bytes out of order at {offset}");
                            offset += b.len() as u64;
                        }
                        Message::Ping(_) | Message::Pong(_) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert!(matches!(ws.read(), Ok(Message::Close(_))));
                offset
            })
        })
        .collect();
    while !readers.iter().all(|r| r.is_finished()) {
        peak = peak.max(handle.stats().buffer_bytes);
        std::thread::sleep(Duration::from_millis(1));
    }
    for r in readers {
        assert_eq!(r.join().expect("reader"), N);
    }
    assert!(peak <= 2 * BUF, "buffer bytes peaked at {peak}");
    assert!(h.wait_idle());
    let s = handle.stats();
    assert_eq!(
        (s.buffers_in_use, s.buffer_bytes, s.waiting_for_memory),
        (0, 0, 0)
    );
}
