//! Differential test: the Python WebsocketProxy this project replaces
//! (`lab-orchestrator-ws-proxy` 1.0.0, installed by `tests/python/setup.sh`) and the
//! `kubevirt-vnc-proxy` binary, started with the same environment in front of the same stand-in
//! upstream, get the same requests; each answer is written down as a short normalized outcome.
//!
//! The outcomes go side by side into `target/differential.md`. Every case where the two differ
//! must be listed, with the same outcomes, in the README's "Measured side by side" table (in
//! "Migrating from the Python WebsocketProxy"), and every row of that table must still differ as
//! written: the test fails otherwise, with the table to paste in its message.
//!
//! The vocabulary of an outcome:
//! - `HTTP 401 "reason"`: refused before the upgrade (the first line of the body as reason);
//! - `101` (`101 with subprotocol P` when one was chosen), then what the client received, in
//!   order, joined by `then`: `binary "bytes"` / `binary N bytes` (over 16 bytes), `text "…"`,
//!   `close 1000 "reason"`, `TCP closed without a close frame`, `nothing within 3 s`;
//!   `101, echo binary+text` when a binary and a text message came back unchanged;
//! - `upstream: none` (never dialed) or `upstream: …/VMI/vnc?QUERY` (the request target the
//!   stand-in saw, from the VMI on), and for the endings what close the upstream got;
//! - for a start: `listens`, or `exits with status N: "its last log line"`.
//!
//! Both get the same variables (`LOCAL_DEV_MODE=true`, `WS_REMOTE_URL`, `HOST`, `SECRET_KEY`,
//! dummy `KUBERNETES_SERVICE_HOST`/`_PORT`, `LOGLEVEL`, and `HOST_PATH_PREFIX=vnc` for the
//! prefix cases) and nothing else; only `PORT` differs: a free port for the Python proxy, `0`
//! for ours (which logs the port it got). Each case runs against ours first, so that a session
//! the Python proxy leaves open cannot change what ours is measured doing.
//!
//! Needs LabOrchestrator's Python code (`bash tests/python/setup.sh`); `PYTHON_SKIP=1` skips it.

#[path = "support/labo.rs"]
mod labo;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use labo::{LibAuth, Mint};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};
use upstream::{Behaviour as B, StandIn, StandInOptions};

/// At least 32 bytes: ours refuses shorter HMAC secrets.
const SECRET: &str = "differential-test-secret-0123456789abcdef";
const OTHER_SECRET: &str = "another-secret-entirely-0123456789abcdef";
/// How long a client waits for something that may never come.
const QUIET: Duration = Duration::from_secs(3);
const STARTUP: Duration = Duration::from_secs(20);
/// The VMIs the valid token lists (their stand-in behaviours are declared where it starts).
/// `echo-preserve` has sessions of its own (the stand-in answers `preserveSession=true` with 500
/// while another session to the same VMI is open); `ECHO` is not a DNS-1123 name.
const VMIS: [&str; 6] = [
    "echo",
    "echo-preserve",
    "sink",
    "closeafter-32",
    "dropafter-32",
    "ECHO",
];
/// Shorter than the 32 bytes ours requires.
const SHORT_SECRET: &str = "sixteen-byte-key";
const BIN_PAYLOAD: &[u8] = b"\x00\xffbin";
const TEXT_PAYLOAD: &str = "t\u{e9}xt \u{2713}";
const PY: &str = "Python proxy";
const OURS: &str = "kubevirt-vnc-proxy";
/// The README bullets a difference may be explained by.
const BULLETS: [&str; 3] = ["What is stricter", "What is new", "What differs"];
const REPRODUCE: &str = "cargo test --test differential";

// ---------------------------------------------------------------------------------------------
// The two proxies as child processes

/// A proxy process, killed (by PID) and reaped when dropped, also when the test panics.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `cmd` with exactly `env`, waits (bounded) for its `listening on ADDR` log line.
    fn start(what: &str, mut cmd: Command, env: &[(&str, String)]) -> Server {
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {what}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = Arc::clone(&log);
        // Drains stderr for the process's whole life, so it never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        let mut server = Server {
            child,
            addr: "127.0.0.1:0".parse().expect("an address"),
            log,
        };
        match rx.recv_timeout(STARTUP) {
            Ok(addr) => server.addr = addr,
            Err(_) => panic!(
                "the {what} did not log `listening on` within {STARTUP:?}:\n{}",
                server.log_text()
            ),
        }
        server
    }

    fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The last `n` lines of the log, for a failure message.
    fn log_tail(&self, n: usize) -> String {
        let lines = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (the Python proxy cannot report a port 0 it was given).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The environment both proxies get; `PORT` is `port`.
fn environment(up: &StandIn, port: u16, prefix: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("LOCAL_DEV_MODE", "true".to_owned()),
        ("WS_REMOTE_URL", up.base_url()),
        ("HOST", "127.0.0.1".to_owned()),
        ("PORT", port.to_string()),
        ("SECRET_KEY", SECRET.to_owned()),
        // The Python proxy reads these even in local dev mode.
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
        ("KUBERNETES_SERVICE_PORT", "6443".to_owned()),
        ("LOGLEVEL", "INFO".to_owned()),
    ];
    if let Some(p) = prefix {
        env.push(("HOST_PATH_PREFIX", p.to_owned()));
    }
    env
}

fn python_command(python: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "lab_orchestrator_ws_proxy"]);
    cmd
}

fn ours_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"))
}

fn start_python(python: &Path, up: &StandIn, prefix: Option<&str>) -> Server {
    let env = environment(up, free_port(), prefix);
    Server::start(PY, python_command(python), &env)
}

fn start_ours(up: &StandIn, prefix: Option<&str>) -> Server {
    // PORT=0: ours logs the port it got.
    Server::start(OURS, ours_command(), &environment(up, 0, prefix))
}

/// Starts `cmd` with exactly `env` and says whether it comes to listen (`listens`, then it is
/// stopped) or exits first (`exits with status N: "its last log line"`), within [`STARTUP`].
fn startup(what: &str, mut cmd: Command, env: &[(&str, String)]) -> String {
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {what}: {e}"));
    // Killed by PID when dropped, also on panic.
    let mut server = Server {
        child,
        addr: "127.0.0.1:0".parse().expect("an address"),
        log: Arc::new(Mutex::new(Vec::new())),
    };
    let stderr = server.child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + STARTUP;
    let mut last = String::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains("listening on ") => return "listens".to_owned(),
            Ok(line) if !line.trim().is_empty() => last = line.trim().to_owned(),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stderr is closed: the process has ended or is about to.
                let status = server.child.wait().expect("wait for the process");
                let code = status
                    .code()
                    .map_or_else(|| "?".to_owned(), |c| c.to_string());
                return format!("exits with status {code}: \"{last}\"");
            }
        }
    }
    format!("neither listens nor exits within {} s", STARTUP.as_secs())
}

// ---------------------------------------------------------------------------------------------
// A client that writes down what it sees

/// What the client got in answer to its upgrade request.
enum Answer {
    Http(String),
    Upgraded {
        ws: Box<WebSocket<TcpStream>>,
        /// `101` or `101 with subprotocol P`.
        head: String,
    },
}

fn upgrade(addr: SocketAddr, path: &str, extra_headers: &str) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(QUIET)).expect("read timeout");
    s.set_write_timeout(Some(QUIET)).expect("write timeout");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         {extra_headers}\r\n"
    );
    s.write_all(request.as_bytes()).expect("send the request");
    let (head, rest) = match read_head(&mut s) {
        Ok(x) => x,
        Err(what) => return Answer::Http(what),
    };
    let status = status_of(&head);
    if status != Some(101) {
        return Answer::Http(http_outcome(&head, rest, &mut s));
    }
    let head = match header(&head, "sec-websocket-protocol") {
        Some(p) => format!("101 with subprotocol {p}"),
        None => "101".to_owned(),
    };
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let ws = Box::new(WebSocket::from_partially_read(
        s,
        rest,
        Role::Client,
        Some(config),
    ));
    Answer::Upgraded { ws, head }
}

/// A plain HTTP request (no upgrade).
fn plain_get(addr: SocketAddr, path: &str) -> String {
    http_request(addr, "GET", path, "")
}

/// `METHOD PATH` with `extra_headers` (each ending in CRLF) after Host; what comes back.
fn http_request(addr: SocketAddr, method: &str, path: &str, extra_headers: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(QUIET)).expect("read timeout");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra_headers}\r\n");
    s.write_all(request.as_bytes()).expect("send the request");
    match read_head(&mut s) {
        Ok((head, rest)) => http_outcome(&head, rest, &mut s),
        Err(what) => what,
    }
}

/// Reads up to the blank line; the head and the bytes after it, or an outcome when the head
/// never came.
fn read_head(s: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + QUIET;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if Instant::now() >= deadline || buf.len() > 64 * 1024 {
            return Err(format!("no HTTP answer within {}s", QUIET.as_secs()));
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("TCP closed without an HTTP answer".to_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("no HTTP answer within {}s", QUIET.as_secs()));
            }
            Err(e) => return Err(format!("TCP error before an HTTP answer ({:?})", e.kind())),
        }
    }
}

fn status_of(head: &str) -> Option<u16> {
    head.split(' ').nth(1).and_then(|s| s.parse().ok())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `HTTP 401 "first line of the body"`: the body is read to its length, EOF, or [`QUIET`].
fn http_outcome(head: &str, mut body: Vec<u8>, s: &mut TcpStream) -> String {
    let status = status_of(head).map_or_else(|| "?".to_owned(), |c| c.to_string());
    let want = header(head, "content-length").and_then(|v| v.parse::<usize>().ok());
    let deadline = Instant::now() + QUIET;
    let mut chunk = [0u8; 4096];
    while want.is_none_or(|w| body.len() < w) && Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let reason = text.lines().next().unwrap_or("").trim();
    if reason.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} \"{reason}\"")
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// One thing the client saw after the upgrade.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Binary(Vec<u8>),
    Text(String),
    Close(Option<(u16, String)>),
    /// TCP ended without a close frame (EOF or reset).
    Gone,
    /// Nothing within [`QUIET`].
    Quiet,
    Other(String),
}

impl Seen {
    fn is_final(&self) -> bool {
        !matches!(self, Seen::Binary(_) | Seen::Text(_))
    }

    fn describe(&self) -> String {
        match self {
            Seen::Binary(b) if b.len() <= 16 => format!("binary \"{}\"", b.escape_ascii()),
            Seen::Binary(b) => format!("binary {} bytes", b.len()),
            Seen::Text(t) if t.chars().count() <= 32 => format!("text {t:?}"),
            Seen::Text(t) => format!("text {} bytes", t.len()),
            Seen::Close(Some((code, reason))) => format!("close {code} {reason:?}"),
            Seen::Close(None) => "close without a code".to_owned(),
            Seen::Gone => "TCP closed without a close frame".to_owned(),
            Seen::Quiet => format!("nothing within {} s", QUIET.as_secs()),
            Seen::Other(e) => e.clone(),
        }
    }
}

/// The next message, close, end or silence (pings and pongs are skipped).
fn next_seen(ws: &mut WebSocket<TcpStream>, quiet: Duration) -> Seen {
    let deadline = Instant::now() + quiet;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Seen::Quiet;
        }
        if ws.get_mut().set_read_timeout(Some(left)).is_err() {
            return Seen::Gone;
        }
        match ws.read() {
            Ok(Message::Binary(b)) => return Seen::Binary(b.to_vec()),
            Ok(Message::Text(t)) => return Seen::Text(t.as_str().to_owned()),
            Ok(Message::Close(f)) => {
                // Let tungstenite send the close reply it queued.
                let _ = ws.flush();
                return Seen::Close(f.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())));
            }
            Ok(_) => {}
            Err(WsError::Io(e)) if is_timeout(&e) => return Seen::Quiet,
            Err(WsError::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
            Err(
                WsError::Io(_)
                | WsError::ConnectionClosed
                | WsError::AlreadyClosed
                | WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
            ) => return Seen::Gone,
            Err(e) => return Seen::Other(format!("client error: {e}")),
        }
    }
}

/// Reads until something final or `max_messages` messages.
fn read_until_final(ws: &mut WebSocket<TcpStream>, max_messages: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let s = next_seen(ws, QUIET);
        let done = s.is_final();
        seen.push(s);
        if done || seen.len() >= max_messages {
            return seen;
        }
    }
}

fn join(head: &str, seen: &[Seen]) -> String {
    let mut out = head.to_owned();
    for s in seen {
        out.push_str(" then ");
        out.push_str(&s.describe());
    }
    out
}

/// Ends a session that is still open with close 1000 and waits (bounded) for the reply, so it
/// does not linger into the next case.
fn goodbye(ws: &mut WebSocket<TcpStream>, seen: &[Seen]) {
    if seen.last().is_some_and(Seen::is_final) {
        return;
    }
    if ws.close(None).and_then(|_| ws.flush()).is_ok() {
        let _ = read_until_final(ws, 16);
    }
}

fn send(ws: &mut WebSocket<TcpStream>, m: Message) -> Option<Seen> {
    match ws.send(m) {
        Ok(()) => None,
        Err(e) => Some(Seen::Other(format!("client could not send ({e})"))),
    }
}

/// Upgrades; on 101 sends a binary and a text message and reads what comes back.
fn session_outcome(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    match upgrade(addr, path, extra_headers) {
        Answer::Http(h) => h,
        Answer::Upgraded { mut ws, head } => {
            let mut seen = Vec::new();
            for m in [Message::binary(BIN_PAYLOAD), Message::text(TEXT_PAYLOAD)] {
                if let Some(failed) = send(&mut ws, m) {
                    seen.push(failed);
                }
            }
            seen.extend(read_until_final(&mut ws, 2));
            let echoed = [
                Seen::Binary(BIN_PAYLOAD.to_vec()),
                Seen::Text(TEXT_PAYLOAD.to_owned()),
            ];
            let outcome = if seen == echoed {
                format!("{head}, echo binary+text")
            } else {
                join(&head, &seen)
            };
            goodbye(&mut ws, &seen);
            outcome
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cases

struct Ctx<'a> {
    up: &'a StandIn,
    python: PathBuf,
    valid: String,
    expired: String,
    other_secret: String,
}

impl Ctx<'_> {
    /// The request targets the upstream saw after the first `from`, as `…/VMI/vnc?QUERY`.
    fn upstream_since(&self, from: usize) -> String {
        // A dial that is still on its way must count for this case, not the next.
        thread::sleep(Duration::from_millis(200));
        let seen = self.up.seen();
        let targets: Vec<String> = seen[from.min(seen.len())..]
            .iter()
            .map(|r| match r.path.split_once("/virtualmachineinstances/") {
                Some((_, vmi)) => format!("…/{vmi}"),
                None => r.path.clone(),
            })
            .collect();
        if targets.is_empty() {
            "upstream: none".to_owned()
        } else {
            format!("upstream: {}", targets.join(", "))
        }
    }

    /// [`session_outcome`] plus what the upstream saw.
    fn session(&self, addr: SocketAddr, path: &str, extra_headers: &str) -> String {
        let from = self.up.seen().len();
        let client = session_outcome(addr, path, extra_headers);
        format!("{client}; {}", self.upstream_since(from))
    }

    /// Waits (bounded) for the next close the stand-in's `Sink` records after the first `from`.
    fn sink_close_since(&self, from: usize) -> String {
        let mut got = None;
        upstream::wait_until(QUIET, || {
            got = self.up.close_codes().get(from).copied();
            got.is_some()
        });
        match got {
            Some(Some(code)) => format!("upstream got close {code}"),
            Some(None) => "upstream: TCP closed without a close frame".to_owned(),
            None => format!("upstream got nothing within {} s", QUIET.as_secs()),
        }
    }
}

/// Which proxy a case runs against, and where it listens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Python,
    Ours,
}

struct Side {
    kind: Kind,
    addr: SocketAddr,
}

type Run = fn(&Ctx, &Side) -> String;

struct Case {
    name: &'static str,
    /// Run against the pair started with `HOST_PATH_PREFIX=vnc`.
    prefixed: bool,
    run: Run,
}

fn cases() -> Vec<Case> {
    let case = |name, prefixed, run: Run| Case {
        name,
        prefixed,
        run,
    };
    vec![
        case("valid token `/TOKEN/echo`", false, |c, s| {
            c.session(s.addr, &format!("/{}/echo", c.valid), "")
        }),
        case("expired token (exp 10 min ago)", false, |c, s| {
            c.session(s.addr, &format!("/{}/echo", c.expired), "")
        }),
        case(
            "token for other VMIs `/TOKEN/echo-unlisted`",
            false,
            |c, s| c.session(s.addr, &format!("/{}/echo-unlisted", c.valid), ""),
        ),
        case(
            "bad signature (minted with another secret)",
            false,
            |c, s| c.session(s.addr, &format!("/{}/echo", c.other_secret), ""),
        ),
        case("garbage token `/not-a-jwt/echo`", false, |c, s| {
            c.session(s.addr, "/not-a-jwt/echo", "")
        }),
        case(
            "VMI name not a DNS-1123 subdomain `/TOKEN/ECHO` (listed in the token)",
            false,
            |c, s| c.session(s.addr, &format!("/{}/ECHO", c.valid), ""),
        ),
        case("no token `/echo`", false, |c, s| {
            c.session(s.addr, "/echo", "")
        }),
        case("extra path segment `/TOKEN/echo/extra`", false, |c, s| {
            c.session(s.addr, &format!("/{}/echo/extra", c.valid), "")
        }),
        case("`HOST_PATH_PREFIX=vnc`: `/vnc/TOKEN/echo`", true, |c, s| {
            c.session(s.addr, &format!("/vnc/{}/echo", c.valid), "")
        }),
        case(
            "`HOST_PATH_PREFIX=vnc`: `/TOKEN/echo` (prefix missing)",
            true,
            |c, s| c.session(s.addr, &format!("/{}/echo", c.valid), ""),
        ),
        case(
            "`HOST_PATH_PREFIX=vnc`: `/other/TOKEN/echo` (wrong prefix)",
            true,
            |c, s| c.session(s.addr, &format!("/other/{}/echo", c.valid), ""),
        ),
        case(
            "query `/TOKEN/echo-preserve?preserveSession=true`",
            false,
            |c, s| {
                c.session(
                    s.addr,
                    &format!("/{}/echo-preserve?preserveSession=true", c.valid),
                    "",
                )
            },
        ),
        case("query `/TOKEN/echo?x=1`", false, |c, s| {
            c.session(s.addr, &format!("/{}/echo?x=1", c.valid), "")
        }),
        case(
            "upstream request: API path and subprotocol offered",
            false,
            |c, s| {
                let from = c.up.seen().len();
                let client = session_outcome(s.addr, &format!("/{}/echo", c.valid), "");
                thread::sleep(Duration::from_millis(200));
                let seen = c.up.seen();
                let upstream = match seen.get(from) {
                    Some(r) => format!(
                        "upstream: {}, subprotocol offered: {}",
                        r.path,
                        r.header("sec-websocket-protocol").unwrap_or("none")
                    ),
                    None => "upstream: none".to_owned(),
                };
                format!("{client}; {upstream}")
            },
        ),
        case("client offers subprotocol `binary`", false, |c, s| {
            c.session(
                s.addr,
                &format!("/{}/echo", c.valid),
                "Sec-WebSocket-Protocol: binary\r\n",
            )
        }),
        case("a binary and a text message, echoed", false, |c, s| {
            // The opcode and payload of each message that came back, spelled out.
            match upgrade(s.addr, &format!("/{}/echo", c.valid), "") {
                Answer::Http(h) => h,
                Answer::Upgraded { mut ws, head } => {
                    let mut seen = Vec::new();
                    for m in [Message::binary(BIN_PAYLOAD), Message::text(TEXT_PAYLOAD)] {
                        seen.extend(send(&mut ws, m));
                    }
                    seen.extend(read_until_final(&mut ws, 2));
                    join(&head, &seen)
                }
            }
        }),
        case("a 2 MiB binary message, echoed", false, |c, s| {
            big_message(s.addr, &format!("/{}/echo", c.valid), 2 << 20)
        }),
        case("client sends close 1000 \"bye\"", false, |c, s| {
            let from = c.up.close_codes().len();
            let client = match upgrade(s.addr, &format!("/{}/sink", c.valid), "") {
                Answer::Http(h) => h,
                Answer::Upgraded { mut ws, head } => {
                    let mut seen = Vec::new();
                    let bye = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "bye".into(),
                    };
                    if let Err(e) = ws.close(Some(bye)).and_then(|_| ws.flush()) {
                        seen.push(Seen::Other(format!("client could not close ({e})")));
                    }
                    seen.extend(read_until_final(&mut ws, 1));
                    join(&head, &seen)
                }
            };
            format!("{client}; {}", c.sink_close_since(from))
        }),
        case("client drops TCP without a close frame", false, |c, s| {
            let from = c.up.close_codes().len();
            let client = match upgrade(s.addr, &format!("/{}/sink", c.valid), "") {
                Answer::Http(h) => h,
                Answer::Upgraded { ws, head } => {
                    // Let the proxy reach the upstream before the client vanishes.
                    thread::sleep(Duration::from_millis(300));
                    let _ = ws.get_ref().shutdown(Shutdown::Both);
                    head
                }
            };
            format!("{client}; {}", c.sink_close_since(from))
        }),
        case(
            "upstream sends 32 bytes, then closes 1000 \"done\"",
            false,
            |c, s| match upgrade(s.addr, &format!("/{}/closeafter-32", c.valid), "") {
                Answer::Http(h) => h,
                Answer::Upgraded { mut ws, head } => join(&head, &read_until_final(&mut ws, 4)),
            },
        ),
        case(
            "upstream sends 32 bytes, then drops TCP",
            false,
            |c, s| match upgrade(s.addr, &format!("/{}/dropafter-32", c.valid), "") {
                Answer::Http(h) => h,
                Answer::Upgraded { mut ws, head } => join(&head, &read_until_final(&mut ws, 4)),
            },
        ),
        case("start with a 16-byte `SECRET_KEY`", false, |c, s| {
            let (what, cmd) = match s.kind {
                Kind::Python => (PY, python_command(&c.python)),
                Kind::Ours => (OURS, ours_command()),
            };
            let mut env = environment(c.up, free_port(), None);
            for (k, v) in &mut env {
                if *k == "SECRET_KEY" {
                    *v = SHORT_SECRET.to_owned();
                }
            }
            startup(what, cmd, &env)
        }),
        case("plain `GET /healthz` (no upgrade)", false, |_, s| {
            plain_get(s.addr, "/healthz")
        }),
        case(
            "the console's URL opened as a page: `GET /TOKEN/echo`, no upgrade",
            false,
            |c, s| plain_get(s.addr, &format!("/{}/echo", c.valid)),
        ),
        case("an upgrade with `POST /TOKEN/echo`", false, |c, s| {
            let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                           Sec-WebSocket-Version: 13\r\n";
            http_request(s.addr, "POST", &format!("/{}/echo", c.valid), upgrade)
        }),
    ]
}

/// Sends one binary message of `len` bytes, written raw from a thread (a proxy that refuses it
/// may stop reading, and the client must still see its close), then reads what comes back.
fn big_message(addr: SocketAddr, path: &str, len: usize) -> String {
    let (mut ws, head) = match upgrade(addr, path, "") {
        Answer::Http(h) => return h,
        Answer::Upgraded { ws, head } => (ws, head),
    };
    let payload = upstream::pattern_vec(0, len);
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    let key = [0x12u8, 0x34, 0x56, 0x78];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    let mut raw = ws.get_ref().try_clone().expect("clone the client socket");
    let writer = thread::spawn(move || raw.write_all(&frame).is_ok());
    let mut seen = read_until_final(&mut ws, 1);
    let _ = ws.get_ref().shutdown(Shutdown::Both);
    let _ = writer.join();
    if let [Seen::Binary(b)] = &seen[..] {
        let same = if b[..] == payload[..] {
            "same payload"
        } else {
            "different payload"
        };
        seen[0] = Seen::Other(format!("binary {} bytes ({same})", b.len()));
    }
    join(&head, &seen)
}

// ---------------------------------------------------------------------------------------------
// Tables

struct Row {
    case: String,
    python: String,
    ours: String,
}

impl Row {
    fn differs(&self) -> bool {
        self.python != self.ours
    }
}

/// A cell as written in a table: code spans for outcomes, `|` escaped.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn code(s: &str) -> String {
    format!("`{}`", cell(s))
}

/// A cell as read back: code-span backticks dropped, `\|` unescaped, trimmed.
fn uncell(s: &str) -> String {
    s.trim().replace('`', "").replace("\\|", "|")
}

fn full_table(rows: &[Row]) -> String {
    let mut t = format!("| case | {PY} | {OURS} | same? |\n|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |",
            cell(r.case.as_str()),
            code(&r.python),
            code(&r.ours),
            if r.differs() { "no" } else { "yes" }
        );
    }
    t
}

/// The README's table, with the bullets already listed there kept and `?` for new rows.
fn readme_table(rows: &[Row], listed: &BTreeMap<String, ReadmeRow>) -> String {
    let mut t = format!("| case | {PY} | {OURS} | explained by |\n|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r.differs()) {
        let bullet = listed
            .get(&uncell(&r.case))
            .map_or("?", |l| l.bullet.as_str());
        let _ = writeln!(
            t,
            "| {} | {} | {} | {bullet} |",
            cell(r.case.as_str()),
            code(&r.python),
            code(&r.ours)
        );
    }
    t
}

struct ReadmeRow {
    python: String,
    ours: String,
    bullet: String,
}

/// The migration section of README.md and the rows of its "Measured side by side" table,
/// by case.
fn readme() -> (String, BTreeMap<String, ReadmeRow>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    parse_readme(&std::fs::read_to_string(&path).expect("read README.md"))
}

fn parse_readme(text: &str) -> (String, BTreeMap<String, ReadmeRow>) {
    let section: String = text
        .split("\n## ")
        .find(|s| s.starts_with("Migrating from the Python WebsocketProxy"))
        .expect("README.md has a section \"Migrating from the Python WebsocketProxy\"")
        .to_owned();
    let mut rows = BTreeMap::new();
    if let Some((_, after)) = section.split_once("### Measured side by side") {
        for line in after
            .lines()
            .skip_while(|l| !l.trim_start().starts_with('|'))
            .take_while(|l| l.trim_start().starts_with('|'))
            .skip(2)
        {
            let cells = split_row(line);
            if cells.len() >= 4 {
                rows.insert(
                    uncell(&cells[0]),
                    ReadmeRow {
                        python: uncell(&cells[1]),
                        ours: uncell(&cells[2]),
                        bullet: uncell(&cells[3]),
                    },
                );
            }
        }
    }
    (section, rows)
}

/// What makes the README's table untrue to what was measured (empty when it is true).
fn mismatches(rows: &[Row], section: &str, listed: &BTreeMap<String, ReadmeRow>) -> Vec<String> {
    let mut problems = Vec::new();
    for r in rows {
        let key = uncell(&r.case);
        match listed.get(&key) {
            None if r.differs() => problems.push(format!(
                "measured difference not in the README table: {}",
                r.case
            )),
            None => {}
            Some(_) if !r.differs() => problems.push(format!(
                "README lists {} as a difference, but both answer `{}`",
                r.case, r.ours
            )),
            Some(l) => {
                if l.python != r.python || l.ours != r.ours {
                    problems.push(format!(
                        "README row {} says `{}` / `{}`, measured `{}` / `{}`",
                        r.case, l.python, l.ours, r.python, r.ours
                    ));
                }
                if !BULLETS.contains(&l.bullet.as_str())
                    || !section.contains(&format!("{}:", l.bullet))
                {
                    problems.push(format!(
                        "README row {} names `{}`, not a bullet of the migration section \
                     (one of {BULLETS:?})",
                        r.case, l.bullet
                    ));
                }
            }
        }
    }
    for case in listed.keys() {
        if !rows.iter().any(|r| uncell(&r.case) == *case) {
            problems.push(format!("README row {case} is not a measured case"));
        }
    }
    problems
}

/// The cells of a markdown table row (`\|` does not split).
fn split_row(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut escaped = false;
    for ch in inner.chars() {
        match ch {
            '|' if !escaped => cells.push(String::new()),
            _ => {
                let last = cells.last_mut().expect("one cell at least");
                last.push(ch);
            }
        }
        escaped = ch == '\\';
    }
    cells
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------------------------

#[test]
fn python_proxy_and_ours_side_by_side() {
    if !labo::available() {
        return;
    }
    let Some(python) = labo::python("ws-proxy") else {
        return;
    };

    // Echo for `echo`, `echo-preserve`, `ECHO` and any other name either proxy may send on.
    let up = StandIn::start_with(
        StandInOptions::serving(B::Echo)
            .vmi("sink", B::Sink)
            .vmi("closeafter-32", B::CloseAfter(32))
            .vmi("dropafter-32", B::DropAfter(32)),
    );
    let ctx = Ctx {
        up: &up,
        python: python.clone(),
        valid: Mint::new(SECRET, &VMIS).with(LibAuth::V0_0_5),
        expired: Mint::new(SECRET, &VMIS)
            .expires_in(-600.0)
            .with(LibAuth::V0_0_5),
        other_secret: Mint::new(OTHER_SECRET, &VMIS).with(LibAuth::V0_0_5),
    };

    let py = start_python(&python, &up, None);
    let ours = start_ours(&up, None);
    let py_prefixed = start_python(&python, &up, Some("vnc"));
    let ours_prefixed = start_ours(&up, Some("vnc"));

    let mut rows = Vec::new();
    for c in cases() {
        let (p, o) = if c.prefixed {
            (&py_prefixed, &ours_prefixed)
        } else {
            (&py, &ours)
        };
        // Ours first: a session the Python proxy leaves open must not blur ours.
        let ours_outcome = (c.run)(
            &ctx,
            &Side {
                kind: Kind::Ours,
                addr: o.addr,
            },
        );
        let python_outcome = (c.run)(
            &ctx,
            &Side {
                kind: Kind::Python,
                addr: p.addr,
            },
        );
        rows.push(Row {
            case: c.name.to_owned(),
            python: python_outcome,
            ours: ours_outcome,
        });
    }
    for outcome in rows.iter().flat_map(|r| [&r.python, &r.ours]) {
        for token in [&ctx.valid, &ctx.expired, &ctx.other_secret] {
            assert!(!outcome.contains(token.as_str()), "a token in an outcome");
        }
    }

    let table = full_table(&rows);
    let out = target_dir().join("differential.md");
    let doc = format!(
        "# The Python WebsocketProxy and kubevirt-vnc-proxy, side by side\n\n\
         Generated by `{REPRODUCE}` (tests/differential.rs): lab-orchestrator-ws-proxy 1.0.0 \
         and kubevirt-vnc-proxy with the same environment, in front of the same stand-in \
         upstream, tokens from lab-orchestrator-lib-auth 0.0.5.\n\n{table}"
    );
    std::fs::create_dir_all(out.parent().expect("a parent")).expect("create target/");
    std::fs::write(&out, &doc).expect("write target/differential.md");
    eprintln!("{doc}");

    let (section, listed) = readme();
    let problems = mismatches(&rows, &section, &listed);
    assert!(
        problems.is_empty(),
        "the README's \"Measured side by side\" table (in \"Migrating from the Python \
         WebsocketProxy\") does not match what was measured:\n- {}\n\nThe differences as \
         measured, for the README (explain each with a bullet):\n\n{}\nAll cases \
         (target/differential.md):\n\n{}\nThe end of the {PY}'s log:\n{}\n\nThe end of the \
         {OURS}'s log:\n{}",
        problems.join("\n- "),
        readme_table(&rows, &listed),
        table,
        py.log_tail(40),
        ours.log_tail(40)
    );
    drop((py, ours, py_prefixed, ours_prefixed));
}

/// The README check itself, on made-up measurements: the table it prints for the README is read
/// back as it was written, and each way the README can be untrue is caught.
#[test]
fn readme_check_catches_every_mismatch() {
    let row = |case: &str, python: &str, ours: &str| Row {
        case: case.to_owned(),
        python: python.to_owned(),
        ours: ours.to_owned(),
    };
    let rows = vec![
        row(
            "same `/a`",
            "101, echo binary+text",
            "101, echo binary+text",
        ),
        row(
            "refused `/TOKEN/b`",
            "101 then close 1000 \"x|y\"",
            "HTTP 401 \"no\"",
        ),
        row("new", "HTTP 426", "HTTP 200 \"ok\""),
    ];
    let mut listed = BTreeMap::new();
    listed.insert(
        "refused /TOKEN/b".to_owned(),
        ReadmeRow {
            python: String::new(),
            ours: String::new(),
            bullet: "What is stricter".to_owned(),
        },
    );
    let table = readme_table(&rows, &listed).replace("| ? |", "| What is new |");
    let doc = |table: &str| {
        format!(
            "# x\n\n## Migrating from the Python WebsocketProxy\n\nWhat is stricter:\n- a\n\n\
             What is new: b\n\n### Measured side by side\n\ntext\n\n{table}\n## Next\n\n| a | b |\n"
        )
    };
    let (section, parsed) = parse_readme(&doc(&table));
    assert!(!section.contains("## Next"));
    assert_eq!(parsed.len(), 2, "{table}");
    assert_eq!(
        parsed["refused /TOKEN/b"].python,
        "101 then close 1000 \"x|y\""
    );
    assert_eq!(parsed["new"].bullet, "What is new");
    assert_eq!(mismatches(&rows, &section, &parsed), Vec::<String>::new());

    // A measured difference missing, an outcome changed, a row that no longer differs,
    // an unknown case, a bullet that does not exist.
    let broken = table
        .lines()
        .filter(|l| !l.starts_with("| new "))
        .map(|l| l.replace("HTTP 401", "HTTP 403"))
        .chain([
            "| same `/a` | `101, echo binary+text` | `101, echo binary+text` | What is new |"
                .to_owned(),
            "| gone | `a` | `b` | What is new |".to_owned(),
        ])
        .collect::<Vec<_>>()
        .join("\n")
        .replace("What is stricter |", "What is odd |");
    let (section, parsed) = parse_readme(&doc(&broken));
    let problems = mismatches(&rows, &section, &parsed);
    for expected in [
        "measured difference not in the README table: new",
        "README row refused `/TOKEN/b` says",
        "names `What is odd`",
        "README lists same `/a` as a difference",
        "README row gone is not a measured case",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected:?} not in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 5, "{problems:#?}");
}
