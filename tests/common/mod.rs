//! Shared harness for the integration tests: the proxy on a thread of its own
//! in front of the stand-in upstream, WebSocket and raw HTTP clients, and a
//! count of the sockets the proxy holds.
#![allow(dead_code)]

#[path = "../support/fdlimit.rs"]
pub mod fdlimit;
#[path = "../support/pki.rs"]
pub mod pki;
#[path = "../support/tokens.rs"]
pub mod tokens;
#[path = "../support/upstream.rs"]
pub mod upstream;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubevirt_vnc_proxy::{Config, Handle, Proxy, Running};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

pub use tokens::SECRET;
// Not every test binary names a behaviour or options itself.
#[allow(unused_imports)]
pub use upstream::{Behaviour, StandIn, StandInOptions};

pub const NS: &str = "lab-ns";

/// Descriptors a test that opens many sockets leaves free for everything else this process
/// does meanwhile: the other tests of the same binary run on parallel threads and share the
/// process's descriptor table (and its `RLIMIT_NOFILE`).
pub const FD_RESERVE: u64 = 256;

/// How many of `wanted` units `test` can hold open beside [`FD_RESERVE`] (see
/// [`fdlimit::fit_to_nofile_limit`]).
pub fn fit_to_nofile_limit(test: &str, wanted: usize, per_unit: usize) -> usize {
    fdlimit::fit_to_nofile_limit(test, wanted, per_unit, FD_RESERVE)
}

/// The proxy binary in local dev mode in front of `upstream`, listening on a free port of
/// 127.0.0.1, its stderr lines delivered on a channel (each one as written); killed (by its
/// PID) when dropped.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    /// The lines up to and including the one that says where it listens.
    pub startup: Vec<String>,
}

impl Binary {
    pub fn start(upstream: SocketAddr, env: &[(&str, &str)]) -> Binary {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
        cmd.env_clear()
            .env("SECRET_KEY", SECRET)
            .env("LOCAL_DEV_MODE", "true")
            .env("WS_REMOTE_URL", format!("ws://{upstream}"))
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut startup = Vec::new();
        let addr = loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no 'listening on' line in {startup:#?}"));
            startup.push(line.clone());
            if let Some(a) = line.split("listening on ").nth(1) {
                // With LOG_FORMAT=json the address ends a JSON string.
                let a = a.trim().trim_end_matches("\"}").trim_end_matches('"');
                break a.parse().unwrap();
            }
        };
        Binary {
            child,
            addr,
            lines,
            startup,
        }
    }

    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    /// Wait (bounded) for the process to exit; its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Every line that comes within `for_at_most`.
    pub fn drain_lines(&self, for_at_most: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = Instant::now() + for_at_most;
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(l);
        }
        out
    }

    /// Lines until `done` has seen what it wants (at most 10 s).
    pub fn lines_until(&self, mut done: impl FnMut(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while !done(&out) {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => out.push(l),
                Err(_) => panic!("timed out; lines so far: {out:#?}"),
            }
        }
        out
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy in front of a fresh stand-in upstream.
pub struct Harness {
    pub upstream: StandIn,
    pub proxy: Option<Running>,
    pub addr: SocketAddr,
}

impl Harness {
    /// The proxy with its default configuration in front of a stand-in that serves `upstream`:
    /// a [`Behaviour`] for every VMI name, or [`StandInOptions`] naming one per VMI.
    pub fn start(upstream: impl Into<StandInOptions>) -> Harness {
        Self::start_with(upstream, |_| {})
    }

    /// Like [`start`](Self::start), with the proxy's configuration adjusted first.
    pub fn start_with(
        upstream: impl Into<StandInOptions>,
        adjust: impl FnOnce(&mut Config),
    ) -> Harness {
        let upstream = StandIn::start_with(upstream.into());
        let mut config = Config::local_dev(&format!("ws://{}", upstream.addr()), SECRET.as_bytes())
            .expect("config");
        adjust(&mut config);
        let proxy = Proxy::bind(config).expect("bind").spawn().expect("spawn");
        let addr = proxy.local_addr();
        Harness {
            upstream,
            proxy: Some(proxy),
            addr,
        }
    }

    pub fn handle(&self) -> Handle {
        self.proxy.as_ref().expect("running").handle()
    }

    /// A valid token for `vmis` in [`NS`].
    pub fn token(vmis: &[&str]) -> String {
        tokens::mint(SECRET, NS, vmis, tokens::now() + 600)
    }

    /// Open a WebSocket through the proxy to `vmi` with a token allowing it.
    pub fn ws(&self, vmi: &str) -> WebSocket<TcpStream> {
        self.ws_path(&format!("/{}/{vmi}", Self::token(&[vmi])))
    }

    pub fn ws_path(&self, path: &str) -> WebSocket<TcpStream> {
        ws_connect(self.addr, path).unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }

    /// Sockets the proxy holds open (client side and upstream side).
    pub fn proxy_sockets(&self) -> usize {
        proxy_sockets(self.addr.port(), self.upstream.addr().port())
    }

    /// Wait until the proxy holds no session and no socket.
    pub fn wait_idle(&self) -> bool {
        let h = self.handle();
        upstream::wait_until(Duration::from_secs(10), || {
            h.stats().open_sessions == 0 && self.proxy_sockets() == 0
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            let _ = p.shutdown();
        }
    }
}

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

pub fn ws_connect(
    addr: SocketAddr,
    path: &str,
) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let url = format!("ws://{addr}{path}");
    let (ws, _resp) =
        tungstenite::client::client_with_config(url.as_str(), stream, Some(client_config()))
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
            })?;
    Ok(ws)
}

/// Read the next data message (skipping nothing: pings are surfaced too).
pub fn next_message(ws: &mut WebSocket<TcpStream>) -> Message {
    ws.read().expect("read message")
}

/// An HTTP answer as read from a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Send raw bytes and read the answer until the proxy closes the connection.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> RawAnswer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(request).expect("write request");
    read_answer(&mut s)
}

pub fn read_answer(s: &mut TcpStream) -> RawAnswer {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read answer until close");
    parse_answer(&all)
}

/// An HTTP answer from the bytes read until the connection closed.
pub fn parse_answer(all: &[u8]) -> RawAnswer {
    let text = String::from_utf8_lossy(all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    RawAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// A well-formed upgrade request for `path`, with `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// TCP sockets this process holds whose local port is `proxy_port` (the
/// proxy's accepted connections) or whose remote port is `upstream_port`
/// (the proxy's upstream connections). Matches /proc/net/tcp entries against
/// this process's own file descriptors, so sockets of other tests running in
/// parallel, and TIME_WAIT leftovers without a descriptor, are not counted.
pub fn proxy_sockets(proxy_port: u16, upstream_port: u16) -> usize {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_owned());
                }
            }
        }
    }
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let listening = f[3] == "0A";
            if (port(f[1]) == Some(proxy_port) && !listening) || port(f[2]) == Some(upstream_port) {
                count += 1;
            }
        }
    }
    count
}

/// The proxy binary as a child process, killed when dropped.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line the proxy logged, for failure messages.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// The binary in local dev mode in front of `upstream`.
    pub fn local_dev(upstream: SocketAddr, extra_env: &[(&str, &str)]) -> ProxyProcess {
        let mut env = vec![
            ("LOCAL_DEV_MODE", "true".to_owned()),
            ("WS_REMOTE_URL", format!("ws://{upstream}")),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (*k, v.to_string())));
        Self::start(&env)
    }

    /// The binary with `SECRET_KEY`, `HOST=127.0.0.1`, `PORT=0`, `LOGLEVEL=INFO`
    /// and `env`, nothing else from the environment.
    pub fn start(env: &[(&str, String)]) -> ProxyProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
        cmd.env_clear()
            .env("SECRET_KEY", SECRET)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("LOGLEVEL", "INFO")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the proxy binary");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = log.clone();
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_owned());
                }
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the proxy logs its address")
            .parse()
            .expect("an address");
        ProxyProcess { child, addr, log }
    }

    pub fn status_field(&self, name: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc status"))
    }

    pub fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    /// RSS in KiB once it has stopped moving for 100 ms (at most 5 s).
    pub fn settled_rss_kib(&self) -> u64 {
        let mut last = self.rss_kib();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.rss_kib();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    /// The proxy's log so far, for a failure message.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kvp-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Replace `name` atomically (write aside, rename), as Kubernetes swaps
    /// projected files.
    pub fn write(&self, name: &str, contents: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write temp file");
        std::fs::rename(&tmp, self.0.join(name)).expect("rename into place");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Read a `stream-TOTAL-F` session through `proxy`: a little, then stall for
/// two seconds while sampling the proxy's RSS, then everything, checking
/// every byte's order and the stream's checksum. Returns (RSS when flowing,
/// peak RSS while stalled), in KiB.
pub fn stall_then_read_all(
    ws: &mut WebSocket<TcpStream>,
    proxy: &ProxyProcess,
    total: u64,
) -> (u64, u64) {
    use upstream::{FNV_OFFSET, fnv1a, pattern};
    let mut received = 0u64;
    let mut sum = FNV_OFFSET;
    let mut expect = Vec::new();
    let mut take = |m: Message, received: &mut u64, sum: &mut u64| match m {
        Message::Binary(b) => {
            expect.resize(b.len(), 0);
            pattern(*received, &mut expect);
            assert!(
                b[..] == expect[..],
                "bytes out of order at offset {received}"
            );
            *sum = fnv1a(*sum, &b);
            *received += b.len() as u64;
        }
        // The proxy's keepalive pings a client that has been silent for a
        // while; tungstenite answers them by itself.
        Message::Ping(_) | Message::Pong(_) => {}
        other => panic!("unexpected {other:?}"),
    };
    // Read a little so the stream is flowing, then stop reading.
    for _ in 0..4 {
        let m = ws.read().expect("read");
        take(m, &mut received, &mut sum);
    }
    let flowing = proxy.rss_kib();
    let stall = std::time::Instant::now();
    let mut peak = 0;
    while stall.elapsed() < Duration::from_secs(2) {
        peak = peak.max(proxy.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    while received < total {
        let m = ws.read().expect("read");
        take(m, &mut received, &mut sum);
    }
    let mut whole = FNV_OFFSET;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < total {
        pattern(off, &mut chunk);
        whole = fnv1a(whole, &chunk);
        off += chunk.len() as u64;
    }
    assert_eq!(received, total);
    assert_eq!(sum, whole, "checksum of the relayed stream");
    (flowing, peak)
}

/// Segments the kernel has received on `s` (TCP_INFO's `tcpi_segs_in`, Linux 4.2+).
pub fn segments_in(s: &std::net::TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the borrow of `s`; the kernel writes at most `len`
    // bytes into `info`, which is that large, and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    let wanted = std::mem::offset_of!(libc::tcp_info, tcpi_segs_in) + 4;
    assert!(len as usize >= wanted, "TCP_INFO without tcpi_segs_in");
    info.tcpi_segs_in
}

/// Read an HTTP head byte by byte (nothing after it is consumed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "closed inside the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap_or_else(|e| panic!("a head that is not UTF-8: {e}"))
}

/// Connect to `addr`, send an upgrade request for `path` with `extra` header
/// lines, and read the answer's head (nothing after it), with a 10 s read
/// timeout on the socket that is returned.
pub fn upgrade_head(addr: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(&upgrade_request(path, extra))
        .expect("send the upgrade");
    let head = read_head(&mut s);
    (s, head)
}

/// A raw socket upgraded to a WebSocket for `path` (the 101 head consumed).
pub fn upgraded(addr: SocketAddr, path: &str) -> TcpStream {
    let (s, head) = upgrade_head(addr, path, "");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s
}

/// The status code in a response head (0 when there is none).
pub fn status_in(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Segment counts are exact only if no thread involved is kept off the CPU for the kernel's
/// 200 ms delayed-ACK and cork timers at the wrong moment, which a loaded machine can do once.
/// So a count gets three tries: `attempt` returns the count seen, and the first that equals
/// `want` passes. Code that sends a segment too many every time still fails; a fault that
/// adds one only now and then would mostly pass (the price of not failing on the machine).
pub fn segments_within_three_tries(
    want: u32,
    mut attempt: impl FnMut() -> u32,
) -> Result<(), Vec<u32>> {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let n = attempt();
        if n == want {
            return Ok(());
        }
        seen.push(n);
    }
    Err(seen)
}

/// Send signal `name` (`TERM`, `INT`, `HUP`) to `pid` with kill(2) itself: spawning `kill`
/// took part of the bound a test times from before the signal.
pub fn signal(pid: u32, name: &str) {
    let sig = match name {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        other => panic!("no signal {other} here"),
    };
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill -{name} {pid}: {}",
        std::io::Error::last_os_error()
    );
}
