//! Shutdown through real processes and real signals: from SIGTERM to exit the
//! binary takes at most `SHUTDOWN_GRACE_SECONDS` + 2 s, closing handshakes
//! included, whatever kind of client is connected (one that answers the
//! close, one that reads it but never answers, one that reads nothing, one
//! that never sent its request); the demo drains on Ctrl-C like the binary
//! and logs each session's open and close; the example client answers a
//! close frame as a browser does.
//!
//! The examples are run as built by cargo (`cargo build --examples`, done
//! here when needed, into this test's own target directory and profile).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Behaviour as B, Harness, ProxyProcess, StandIn, StandInOptions, ws_connect};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

/// The grace the tests drain with: short, so they are quick.
const GRACE: Duration = Duration::from_secs(1);
/// What the binary promises: from the signal to its exit at most the grace
/// plus this, closing handshakes included.
const CLOSING_BOUND: Duration = Duration::from_secs(2);
/// Generous bound for anything that should happen at once.
const PROMPT: Duration = Duration::from_secs(10);

// ---- processes ----------------------------------------------------------

/// Wait (bounded) for `child` to exit: its exit code (`None` for a signal)
/// and when it was seen to have exited; `Err` when it is still running.
fn wait_exit(child: &mut Child, within: Duration) -> Result<(Option<i32>, Instant), ()> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Ok((status.code(), Instant::now()));
        }
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The binary with `SHUTDOWN_GRACE_SECONDS=1` in front of a stand-in
/// upstream; killed (by its PID) when dropped.
fn proxy(standin: &StandIn) -> ProxyProcess {
    ProxyProcess::local_dev(
        standin.addr(),
        &[("SHUTDOWN_GRACE_SECONDS", &GRACE.as_secs().to_string())],
    )
}

/// SIGTERM `p`, then wait for it to exit: exit 0, no sooner than the grace
/// allows (`min`), no later than the grace plus [`CLOSING_BOUND`]. Returns
/// how long it took.
fn terminate_within_bound(p: &mut ProxyProcess, min: Duration) -> Duration {
    let sent = Instant::now();
    common::signal(p.child.id(), "TERM");
    let bound = GRACE + CLOSING_BOUND;
    let (code, at) = wait_exit(&mut p.child, bound + PROMPT).unwrap_or_else(|()| {
        panic!(
            "still running {:?} after SIGTERM:\n{}",
            bound + PROMPT,
            p.log_text()
        )
    });
    let took = at - sent;
    eprintln!("exit {took:?} after SIGTERM (grace {GRACE:?})");
    assert_eq!(
        code,
        Some(0),
        "exit status after SIGTERM:\n{}",
        p.log_text()
    );
    assert!(
        took <= bound,
        "exit {took:?} after SIGTERM, more than the grace {GRACE:?} + {CLOSING_BOUND:?}:\n{}",
        p.log_text()
    );
    assert!(
        took >= min,
        "exit {took:?} after SIGTERM, before {min:?}:\n{}",
        p.log_text()
    );
    took
}

/// A child process with its stdout and stderr lines collected; killed (by
/// its PID) when dropped.
struct Proc {
    child: Child,
    out: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, out) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Proc { child, out, log }
    }

    /// The first stdout line `pick` accepts, waiting at most `within`.
    fn stdout_line<T>(&self, within: Duration, pick: impl Fn(&str) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + within;
        loop {
            let line = self
                .out
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            if let Some(t) = pick(&line) {
                return Some(t);
            }
        }
    }

    /// Everything it printed so far, stdout and stderr.
    fn text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Wait (bounded) until a line of its output contains all of `words`.
    fn wait_for_line(&self, within: Duration, words: &[&str]) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .cloned();
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An example built by cargo for this test's profile and target directory.
/// `cargo test` builds the examples already; a lone `cargo test --test
/// shutdown` does not, so this asks cargo (a no-op when they are fresh).
fn example(name: &str) -> PathBuf {
    // This test runs from TARGET/PROFILE/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("TARGET/PROFILE")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("TARGET").to_path_buf();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--example", name, "--target-dir"])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    let mut build = cmd.spawn().expect("cargo build");
    let (code, _) = wait_exit(&mut build, Duration::from_secs(900)).unwrap_or_else(|()| {
        let _ = build.kill();
        let _ = build.wait();
        panic!("cargo build --example {name} took more than 15 minutes")
    });
    assert_eq!(code, Some(0), "cargo build --example {name}");
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

// ---- clients --------------------------------------------------------------

/// A raw WebSocket session (the upgrade done by hand, frames read as bytes),
/// for clients that misbehave in exact ways.
fn raw_session(addr: SocketAddr, vmi: &str) -> TcpStream {
    common::upgraded(addr, &format!("/{}/{vmi}", Harness::token(&[vmi])))
}

/// Server frames in `bytes` (unmasked, as the proxy sends them): opcode and
/// payload of each whole one.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let (len, at) = match bytes[1] & 0x7F {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        if bytes.len() < at + len {
            break;
        }
        out.push((bytes[0] & 0x0F, bytes[at..at + len].to_vec()));
        bytes = &bytes[at + len..];
    }
    out
}

/// The close code of the close frame among `frames`, if there is one.
fn close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
}

/// Read until EOF (or a reset, or the read timeout): what came.
fn read_to_end_lenient(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

// ---- the binary: one test per kind of client --------------------------------

/// A browser-like client: reads, answers the close 1001 with its own, and
/// sees the proxy close the connection. The drain ends as soon as the
/// handshakes are done, not at the end of the closing time.
#[test]
fn a_client_that_answers_the_close_gets_1001_and_the_binary_exits_at_the_grace() {
    let standin = StandIn::serving(B::Echo);
    let mut p = proxy(&standin);
    let mut ws = ws_connect(p.addr, &format!("/{}/echo", Harness::token(&["echo"]))).unwrap();
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let client = std::thread::spawn(move || {
        let close = loop {
            match ws.read() {
                Ok(Message::Close(f)) => break f,
                Ok(_) => {}
                Err(e) => panic!("expected close 1001, got {e}"),
            }
        };
        let at = Instant::now();
        // tungstenite answers with the same code on the next read/flush.
        let _ = ws.flush();
        let end = loop {
            match ws.read() {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        (close, at, end)
    });
    let sent = Instant::now();
    let took = terminate_within_bound(&mut p, GRACE);
    let (close, closed_at, end) = client.join().unwrap();
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "going away");
    assert!(
        closed_at - sent >= GRACE,
        "close 1001 after {:?}, before the grace",
        closed_at - sent
    );
    assert!(
        matches!(end, tungstenite::Error::ConnectionClosed),
        "the proxy closes the connection after the handshake: {end}"
    );
    // Both closing handshakes completed: nothing was left for the closing
    // time to cut off.
    assert!(
        !p.log_text().contains("did not finish closing"),
        "exit after {took:?}:\n{}",
        p.log_text()
    );
}

/// A client that reads the close 1001 but never answers it, and keeps its
/// connection open: it no longer holds the binary for the close timeout.
#[test]
fn a_client_that_reads_but_never_answers_the_close_does_not_hold_the_exit() {
    let standin = StandIn::serving(B::Echo);
    let mut p = proxy(&standin);
    let mut s = raw_session(p.addr, "echo");
    let reader = std::thread::spawn(move || {
        let got = read_to_end_lenient(&mut s);
        (got, s)
    });
    terminate_within_bound(&mut p, GRACE);
    let (got, _s) = reader.join().unwrap();
    assert_eq!(close_code(&frames(&got)), Some(1001), "{got:?}");
    assert!(
        p.log_text().contains("did not finish closing"),
        "the closing time cut it off:\n{}",
        p.log_text()
    );
}

/// A client that reads nothing at all: the close 1001 waits in its receive
/// buffer (it finds it when it finally reads), and the binary exits anyway.
#[test]
fn a_client_that_reads_nothing_does_not_hold_the_exit() {
    let standin = StandIn::serving(B::Echo);
    let mut p = proxy(&standin);
    let mut s = raw_session(p.addr, "echo");
    terminate_within_bound(&mut p, GRACE);
    let got = read_to_end_lenient(&mut s);
    assert_eq!(close_code(&frames(&got)), Some(1001), "{got:?}");
}

/// A client that reads nothing while the upstream streams to it: the
/// proxy's buffer and both socket buffers are full, so its close 1001 can
/// never be delivered. The closing time bounds that too.
#[test]
fn a_client_that_reads_nothing_of_a_stream_does_not_hold_the_exit() {
    let standin = StandIn::serving(B::Stream {
        total: 1073741824,
        frame: 65536,
    });
    let mut p = proxy(&standin);
    let s = raw_session(p.addr, "stream-1073741824-65536");
    // Let the stream fill every buffer on the way.
    std::thread::sleep(Duration::from_millis(300));
    terminate_within_bound(&mut p, GRACE);
    drop(s);
}

/// A connection that never sent its request: after the grace it gets 503,
/// and it does not hold the exit either.
#[test]
fn an_idle_connection_without_a_request_gets_503_and_does_not_hold_the_exit() {
    let standin = StandIn::serving(B::Echo);
    let mut p = proxy(&standin);
    let mut s = TcpStream::connect(p.addr).expect("connect");
    s.set_read_timeout(Some(PROMPT)).unwrap();
    // Accepted before the signal (a health check proves the loop is past it).
    assert_eq!(
        common::raw_request(p.addr, b"GET /healthz HTTP/1.1\r\n\r\n").status,
        200
    );
    terminate_within_bound(&mut p, GRACE);
    let got = String::from_utf8_lossy(&read_to_end_lenient(&mut s)).into_owned();
    assert!(got.starts_with("HTTP/1.1 503"), "{got:?}");
    assert!(got.contains("shutting down"), "{got:?}");
}

/// Every kind at once, as a pod sees them.
#[test]
fn every_kind_of_client_at_once_within_the_bound() {
    let standin = StandIn::start_with(
        StandInOptions::serving(B::Echo)
            .vmi(
                "stream-1073741824-65536",
                B::Stream {
                    total: 1073741824,
                    frame: 65536,
                },
            )
            .vmi("vnc-deaf", B::Vnc),
    );
    let mut p = proxy(&standin);
    let mut answering =
        ws_connect(p.addr, &format!("/{}/echo", Harness::token(&["echo"]))).unwrap();
    let answering = std::thread::spawn(move || {
        let close = loop {
            match answering.read() {
                Ok(Message::Close(f)) => break f,
                Ok(_) => {}
                Err(e) => panic!("expected close 1001, got {e}"),
            }
        };
        let _ = answering.flush();
        while answering.read().is_ok() {}
        close
    });
    let mut mute = raw_session(p.addr, "echo");
    let mute = std::thread::spawn(move || read_to_end_lenient(&mut mute));
    let mut deaf = raw_session(p.addr, "vnc-deaf");
    let _stuffed = raw_session(p.addr, "stream-1073741824-65536");
    let mut idle = TcpStream::connect(p.addr).unwrap();
    idle.set_read_timeout(Some(PROMPT)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    terminate_within_bound(&mut p, GRACE);
    let close = answering.join().unwrap().expect("a code");
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close_code(&frames(&mute.join().unwrap())), Some(1001));
    let deaf = frames(&read_to_end_lenient(&mut deaf));
    assert_eq!(
        deaf.first().map(|f| f.1.as_slice()),
        Some(&b"RFB 003.008\n"[..])
    );
    assert_eq!(close_code(&deaf), Some(1001));
    let idle = String::from_utf8_lossy(&read_to_end_lenient(&mut idle)).into_owned();
    assert!(idle.starts_with("HTTP/1.1 503"), "{idle:?}");
}

// ---- the examples -----------------------------------------------------------

/// `examples/client` answers the proxy's close as a browser does, even while
/// it waits for input, and exits 0 on its own once the proxy closed.
#[test]
fn the_example_client_answers_the_close_like_a_browser() {
    let client_bin = example("client");
    let standin = StandIn::serving(B::Vnc);
    let mut p = proxy(&standin);
    let url = format!("ws://{}/{}/vnc-demo", p.addr, Harness::token(&["vnc-demo"]));
    let mut cmd = Command::new(client_bin);
    cmd.arg(&url);
    // Its standard input stays open and silent: a user who typed nothing.
    let mut client = Proc::start(cmd);
    client
        .stdout_line(PROMPT, |l| l.contains("RFB 003.008").then_some(()))
        .unwrap_or_else(|| panic!("no greeting:\n{}", client.text()));
    let took = terminate_within_bound(&mut p, GRACE);
    let (code, _) = wait_exit(&mut client.child, PROMPT)
        .unwrap_or_else(|()| panic!("the client did not exit:\n{}", client.text()));
    assert_eq!(code, Some(0), "{}", client.text());
    assert!(
        client.text().contains("< close") && client.text().contains("Away"),
        "{}",
        client.text()
    );
    assert!(
        !p.log_text().contains("did not finish closing"),
        "the client did not answer the close (exit after {took:?}):\n{}",
        p.log_text()
    );
}

/// The demo, as built, stops on Ctrl-C (SIGINT) the way the binary does:
/// the open session is served through the grace, gets close 1001, and the
/// demo exits 0 within the bound. Its log shows the session open and close.
#[test]
fn the_demo_drains_on_ctrl_c_and_logs_the_session_open_and_close() {
    let demo_bin = example("demo");
    let mut cmd = Command::new(demo_bin);
    cmd.env_remove("RUST_LOG")
        .env("PORT", "0")
        .env("SHUTDOWN_GRACE_SECONDS", GRACE.as_secs().to_string());
    let mut demo = Proc::start(cmd);
    // The URL the demo prints (as .ci/run finds it).
    let url = demo
        .stdout_line(Duration::from_secs(60), |l| {
            l.split_whitespace()
                .find(|w| w.starts_with("ws://127.0.0.1:") && w.ends_with("/vnc-demo"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("the demo printed no URL:\n{}", demo.text()));
    let rest = url.trim_start_matches("ws://");
    let (authority, path) = rest.split_at(rest.find('/').expect("a path"));
    let addr: SocketAddr = authority.parse().expect("an address");
    let mut ws = ws_connect(addr, path).expect("a session through the demo");
    match ws.read() {
        Ok(Message::Binary(b)) => assert_eq!(&b[..], b"RFB 003.008\n"),
        other => panic!("expected the VNC greeting, got {other:?}"),
    }
    ws.send(Message::text("typed")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("typed"));
    assert!(
        demo.wait_for_line(PROMPT, &["access", "event=opened", "vnc-demo"])
            .is_some(),
        "no line for the session's open:\n{}",
        demo.text()
    );

    let sent = Instant::now();
    common::signal(demo.child.id(), "INT");
    // Still served during the grace.
    ws.send(Message::text("during the grace")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("during the grace"));
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Away);
            assert_eq!(f.reason.as_str(), "going away");
        }
        other => panic!("expected close 1001, got {other:?}:\n{}", demo.text()),
    }
    assert!(sent.elapsed() >= GRACE, "closed before the grace");
    let _ = ws.flush();
    let bound = GRACE + CLOSING_BOUND;
    let (code, at) = wait_exit(&mut demo.child, bound + PROMPT)
        .unwrap_or_else(|()| panic!("the demo still runs after SIGINT:\n{}", demo.text()));
    assert_eq!(code, Some(0), "{}", demo.text());
    assert!(
        at - sent <= bound,
        "the demo exited {:?} after SIGINT:\n{}",
        at - sent,
        demo.text()
    );
    let closed = demo
        .wait_for_line(PROMPT, &["access", "event=session", "vnc-demo"])
        .unwrap_or_else(|| panic!("no line for the session's close:\n{}", demo.text()));
    assert!(closed.contains("going away"), "{closed}");
}
