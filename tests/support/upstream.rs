#![allow(dead_code)]
//! A stand-in for KubeVirt's VNC WebSocket subresource, for tests, examples and benches.
//!
//! It listens on `127.0.0.1:0`, runs one thread per connection, reads the HTTP request head
//! itself (raw, up to [`MAX_HEAD`] bytes), records it (see [`StandIn::seen`]) and then picks a
//! behaviour from the VMI name in the request path:
//!
//! | VMI name              | behaviour                                                            |
//! |-----------------------|----------------------------------------------------------------------|
//! | `echo…` / anything else | upgrade, echo every text/binary message back                       |
//! | `vnc…`                | upgrade, send binary `RFB 003.008\n` at once, then echo              |
//! | `stream-N-F`          | upgrade, send N [`pattern`] bytes in binary messages of F bytes, close 1000 |
//! | `sink`, `sink-…`      | upgrade, count + [`fnv1a`] every payload byte, see [`StandIn::sink_results`] |
//! | `dropafter-N`         | upgrade, send one binary message of N pattern bytes, drop TCP (no close frame) |
//! | `closeafter-N`        | upgrade, send one binary message of N pattern bytes, close 1000 "done" |
//! | `status-CODE`         | no upgrade: HTTP CODE with a Kubernetes `Status` JSON body           |
//! | `silent`, `silent-…`  | never answer; hold the socket until the peer closes it (max 60 s)     |
//! | `badaccept`, `badaccept-…` | 101 with a wrong `Sec-WebSocket-Accept`                         |
//! | `masked`, `masked-…`  | upgrade, then a *masked* server frame (protocol violation)           |
//!
//! A malformed parameter (`stream-x-1`, `status-abc`, a frame size of 0) gets a 400 Status.
//! A request that is not a valid WebSocket upgrade gets a 400 (except for `status-*` and
//! `silent`, which do not look at the upgrade headers).
//!
//! The VMI name is the path segment after `virtualmachineinstances/`, or else the last path
//! segment (so `/` means echo). The query string is ignored for the choice but recorded.
//!
//! Every socket has read and write timeouts ([`IO_TIMEOUT`]) and every loop ends on EOF, error,
//! timeout or a deadline, so no handler thread can hang forever. Dropping the [`StandIn`] stops
//! the accept loop and shuts down the connections still open (as if the upstream died).
//!
//! Depends only on std, tungstenite and log: it is included by `#[path]` from tests, examples
//! and benches.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// Largest request head the stand-in accepts (bytes, including the blank line).
pub const MAX_HEAD: usize = 16 * 1024;
/// Read and write timeout on every accepted socket: a peer that neither sends nor reads for
/// this long is abandoned.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server-initiated close waits for the peer's close reply.
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long `silent`, `badaccept` and `masked` hold the socket waiting for EOF.
pub const HOLD_LIMIT: Duration = Duration::from_secs(60);
/// How long a plain HTTP answer waits for the peer to close before dropping the socket.
const LINGER_LIMIT: Duration = Duration::from_secs(10);
/// tungstenite writes to the socket once this much is buffered.
const WRITE_BUFFER: usize = 128 * 1024;
/// Cap on tungstenite's write buffer (raised per frame only for a single larger frame).
const MAX_WRITE_BUFFER: usize = 1024 * 1024;
/// `stream-N-F` flushes at least this often.
const FLUSH_EVERY: usize = 256 * 1024;

/// Initial state of [`fnv1a`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Incremental FNV-1a (64-bit): `fnv1a(fnv1a(FNV_OFFSET, a), b) == fnv1a(FNV_OFFSET, a ++ b)`.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    let mut h = state;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The deterministic byte stream sent by `stream-*`, `dropafter-*` and `closeafter-*`:
/// fills `out` with the bytes at absolute offsets `offset..offset + out.len()`.
///
/// Byte `i` is the XOR of the low five bytes of `i`, times 31 (mod 256): not constant, and not
/// periodic with period 256 (or any power of two below 2^40), so a lost, duplicated or shifted
/// chunk changes the content.
pub fn pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in (offset..).zip(out.iter_mut()) {
        let x = i ^ (i >> 8) ^ (i >> 16) ^ (i >> 24) ^ (i >> 32);
        *b = (x as u8).wrapping_mul(31);
    }
}

/// Convenience: `len` pattern bytes starting at `offset`.
pub fn pattern_vec(offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    pattern(offset, &mut v);
    v
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// One request head as the stand-in received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// The full request target, including the query string.
    pub path: String,
    /// Header fields in order; names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    open: AtomicUsize,
    total: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
    sinks: Mutex<Vec<(u64, u64)>>,
    /// For each finished `sink` session: the close code its peer sent, or
    /// `None` when the peer vanished without a close frame.
    closes: Mutex<Vec<Option<u16>>>,
    /// Clones of the open sockets, so that `Drop` can shut them down.
    live: Mutex<Vec<(usize, TcpStream)>>,
}

/// Locks, ignoring poisoning (a panicking handler thread must not break the test's view).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stand-in upstream. See the module docs for the behaviours.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StandIn {
    /// Binds `127.0.0.1:0` and starts the accept loop.
    pub fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("stand-in: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("stand-in: local_addr");
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("stand-in-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("stand-in: spawn accept thread")
        };
        log::debug!("stand-in listening on {addr}");
        StandIn {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// The address to dial (`ws://ADDR/...`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request head received so far, in order of arrival.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// TCP connections currently open (handler threads alive).
    pub fn connections_open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections_total(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// `(payload bytes, fnv1a checksum)` for each finished `sink` session, in order of finish.
    /// A session is recorded when its peer's close frame arrives (before the close reply is
    /// sent), or on EOF/error/timeout if it never closed properly.
    pub fn sink_results(&self) -> Vec<(u64, u64)> {
        lock(&self.shared.sinks).clone()
    }

    /// For each finished `sink` session, in the same order as
    /// [`sink_results`](Self::sink_results): the close code the peer sent
    /// (`Some(1005)` for a close frame without a code), or `None` when the
    /// connection ended without a close frame.
    pub fn close_codes(&self) -> Vec<Option<u16>> {
        lock(&self.shared.closes).clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock `accept`; the loop sees the flag and leaves without counting this one.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Do not join connection threads: shut their sockets down so they end soon.
        for (_, s) in lock(&self.shared.live).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Decrements `open` and forgets the socket clone when a handler thread ends (or never starts).
struct ConnGuard {
    shared: Arc<Shared>,
    id: usize,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.live).retain(|(id, _)| *id != self.id);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("stand-in: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.total.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let guard = ConnGuard {
            shared: Arc::clone(&shared),
            id,
        };
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.live).push((id, clone));
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("stand-in-conn-{id}"))
            .spawn(move || {
                let _guard = guard;
                handle(&conn_shared, stream);
            });
        if let Err(e) = spawned {
            log::warn!("stand-in: cannot spawn connection thread: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request head

struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The `Sec-WebSocket-Key` if this is a valid RFC 6455 upgrade request.
    fn upgrade_key(&self) -> Option<&str> {
        let ok = self.method == "GET"
            && self.version == "HTTP/1.1"
            && self.has_token("upgrade", "websocket")
            && self.has_token("connection", "upgrade")
            && self.header("sec-websocket-version").map(str::trim) == Some("13");
        if !ok {
            return None;
        }
        self.header("sec-websocket-key").filter(|k| !k.is_empty())
    }
}

enum HeadError {
    /// EOF, timeout or I/O error before a complete head: nothing to answer.
    Gone,
    TooLarge,
}

/// Reads until the blank line; returns the head bytes and whatever was read past them.
fn read_head(stream: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(HeadError::Gone),
        };
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + pos + 4;
            if end > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?.to_string();
    let version = request_line.next()?.to_string();
    if request_line.next().is_some() || method.is_empty() || target.is_empty() {
        return None;
    }
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        if name.is_empty() || name.contains(' ') {
            return None;
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Some(Head {
        method,
        target,
        version,
        headers,
    })
}

/// The VMI name in a request target (see module docs).
pub fn vmi_name(target: &str) -> &str {
    let path = target.split(['?', '#']).next().unwrap_or("");
    const MARK: &str = "virtualmachineinstances/";
    match path.find(MARK) {
        Some(i) => path[i + MARK.len()..].split('/').next().unwrap_or(""),
        None => path.rsplit('/').next().unwrap_or(""),
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviours

#[derive(Debug, Clone, PartialEq, Eq)]
enum Behaviour {
    Echo,
    Vnc,
    Stream {
        total: u64,
        frame: usize,
    },
    Sink,
    DropAfter(u64),
    CloseAfter(u64),
    Status(u16),
    Silent,
    BadAccept,
    Masked,
    /// A recognised prefix with a malformed parameter.
    Invalid,
}

fn is_named(name: &str, base: &str) -> bool {
    name == base || name.strip_prefix(base).is_some_and(|r| r.starts_with('-'))
}

fn behaviour(name: &str) -> Behaviour {
    use Behaviour::*;
    if let Some(rest) = name.strip_prefix("stream-") {
        let parsed = rest.split_once('-').and_then(|(n, f)| {
            Some((
                n.parse::<u64>().ok()?,
                f.parse::<usize>().ok().filter(|&f| f > 0)?,
            ))
        });
        return parsed.map_or(Invalid, |(total, frame)| Stream { total, frame });
    }
    if let Some(rest) = name.strip_prefix("dropafter-") {
        return rest.parse().map_or(Invalid, DropAfter);
    }
    if let Some(rest) = name.strip_prefix("closeafter-") {
        return rest.parse().map_or(Invalid, CloseAfter);
    }
    if let Some(rest) = name.strip_prefix("status-") {
        return rest
            .parse()
            .ok()
            .filter(|c| (100..=999).contains(c))
            .map_or(Invalid, Status);
    }
    if is_named(name, "sink") {
        Sink
    } else if is_named(name, "silent") {
        Silent
    } else if is_named(name, "badaccept") {
        BadAccept
    } else if is_named(name, "masked") {
        Masked
    } else if name.starts_with("vnc") {
        Vnc
    } else {
        Echo
    }
}

type Ws = WebSocket<TcpStream>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(None)
        .max_frame_size(None)
}

fn handle(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);

    let (raw, rest) = match read_head(&mut stream) {
        Ok(x) => x,
        Err(HeadError::Gone) => return,
        Err(HeadError::TooLarge) => {
            respond_status(&mut stream, 431, "stand-in: request head too large");
            return;
        }
    };
    let Some(head) = parse_head(&raw) else {
        respond_status(&mut stream, 400, "stand-in: malformed request head");
        return;
    };
    lock(&shared.seen).push(SeenRequest {
        path: head.target.clone(),
        headers: head.headers.clone(),
    });

    let name = vmi_name(&head.target);
    let what = behaviour(name);
    log::debug!("stand-in: {} {} -> {what:?}", head.method, head.target);

    match what {
        Behaviour::Status(code) => {
            respond_status(&mut stream, code, &format!("stand-in says {code}"));
            return;
        }
        Behaviour::Silent => {
            drain_until_eof(&mut stream, HOLD_LIMIT);
            return;
        }
        Behaviour::Invalid => {
            respond_status(
                &mut stream,
                400,
                &format!("stand-in: malformed behaviour name {name:?}"),
            );
            return;
        }
        _ => {}
    }

    let Some(key) = head.upgrade_key() else {
        respond_status(
            &mut stream,
            400,
            "stand-in: not a WebSocket upgrade request",
        );
        return;
    };

    if what == Behaviour::BadAccept {
        let wrong = derive_accept_key(format!("{key}-wrong").as_bytes());
        if write_101(&mut stream, &wrong).is_ok() {
            drain_until_eof(&mut stream, HOLD_LIMIT);
        }
        return;
    }
    if write_101(&mut stream, &derive_accept_key(key.as_bytes())).is_err() {
        return;
    }
    if what == Behaviour::Masked {
        // FIN + binary, MASK bit + length 6, a masking key, the masked payload.
        let key = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x82, 0x80 | 6];
        frame.extend_from_slice(&key);
        frame.extend(b"masked".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        if stream
            .write_all(&frame)
            .and_then(|_| stream.flush())
            .is_ok()
        {
            drain_until_eof(&mut stream, HOLD_LIMIT);
        }
        return;
    }

    let mut ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(ws_config()));
    let result = match what {
        Behaviour::Echo => echo(&mut ws),
        Behaviour::Vnc => {
            send_now(&mut ws, Message::binary(&b"RFB 003.008\n"[..])).and_then(|_| echo(&mut ws))
        }
        Behaviour::Stream { total, frame } => stream_pattern(&mut ws, total, frame),
        Behaviour::Sink => {
            sink(shared, &mut ws);
            Ok(())
        }
        Behaviour::DropAfter(n) => drop_after(ws, n),
        Behaviour::CloseAfter(n) => send_now(&mut ws, Message::binary(pattern_vec(0, n as usize)))
            .map(|_| close_and_wait(&mut ws, "done")),
        _ => unreachable!("handled above"),
    };
    if let Err(e) = result {
        log::debug!("stand-in: {name}: {e}");
    }
}

fn write_101(stream: &mut TcpStream, accept: &str) -> io::Result<()> {
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(resp.as_bytes())?;
    stream.flush()
}

/// Answers with a Kubernetes `Status` body, then closes politely (FIN, wait for the peer's).
fn respond_status(stream: &mut TcpStream, code: u16, message: &str) {
    let reason = tungstenite::http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let message = message.replace('\\', "\\\\").replace('"', "\\\"");
    let body = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\
         \"message\":\"{message}\",\"code\":{code}}}"
    );
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream
        .write_all(resp.as_bytes())
        .and_then(|_| stream.flush())
        .is_ok()
    {
        let _ = stream.shutdown(Shutdown::Write);
        // Reading to EOF before dropping avoids an RST that could destroy the response.
        drain_until_eof(stream, LINGER_LIMIT);
    }
}

/// Reads and discards until EOF, an error, or `limit` elapses.
fn drain_until_eof(stream: &mut TcpStream, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Queues `msg`, coping with `WriteBufferFull`: flush (blocking, bounded by the write timeout),
/// and if one frame alone exceeds the cap, raise the cap for it. Does not flush on success.
fn send(ws: &mut Ws, msg: Message) -> Result<(), WsError> {
    let mut msg = msg;
    for _ in 0..3 {
        match ws.write(msg) {
            Ok(()) => return Ok(()),
            Err(WsError::WriteBufferFull(back)) => {
                ws.flush()?;
                let need = back.len();
                if need >= ws.get_config().max_write_buffer_size {
                    ws.set_config(|c| c.max_write_buffer_size = need + c.write_buffer_size + 1);
                }
                msg = *back;
            }
            Err(e) => return Err(e),
        }
    }
    Err(WsError::Io(io::Error::other(
        "stand-in: write buffer stayed full",
    )))
}

fn send_now(ws: &mut Ws, msg: Message) -> Result<(), WsError> {
    send(ws, msg)?;
    ws.flush()
}

fn echo(ws: &mut Ws) -> Result<(), WsError> {
    loop {
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => send_now(ws, m)?,
            // Pongs to pings and the close reply are queued by tungstenite and written by the
            // next `read`, which then reports `ConnectionClosed` once the handshake is done.
            Ok(_) => {}
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn stream_pattern(ws: &mut Ws, total: u64, frame: usize) -> Result<(), WsError> {
    let mut off = 0u64;
    let mut unflushed = 0usize;
    while off < total {
        let len = (total - off).min(frame as u64) as usize;
        send(ws, Message::binary(pattern_vec(off, len)))?;
        off += len as u64;
        unflushed += len;
        if unflushed >= FLUSH_EVERY {
            ws.flush()?;
            unflushed = 0;
        }
    }
    ws.flush()?;
    close_and_wait(ws, "");
    Ok(())
}

/// Sends close 1000 with `reason` and reads until the peer's close reply (or EOF, error,
/// [`CLOSE_WAIT`]). Messages arriving meanwhile are discarded.
fn close_and_wait(ws: &mut Ws, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: reason.to_string().into(),
    };
    if ws.close(Some(frame)).is_err() {
        return;
    }
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || ws.get_ref().set_read_timeout(Some(left)).is_err() {
            return;
        }
        if ws.read().is_err() {
            return; // ConnectionClosed after the reply, or EOF/timeout/error
        }
    }
}

fn sink(shared: &Shared, ws: &mut Ws) {
    let mut bytes = 0u64;
    let mut sum = FNV_OFFSET;
    let mut recorded = false;
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                bytes += b.len() as u64;
                sum = fnv1a(sum, &b);
            }
            Ok(Message::Text(t)) => {
                bytes += t.len() as u64;
                sum = fnv1a(sum, t.as_bytes());
            }
            Ok(Message::Close(frame)) if !recorded => {
                // Record before the close reply goes out, so a client that saw the reply
                // also sees the result.
                lock(&shared.closes).push(Some(frame.map_or(1005, |f| u16::from(f.code))));
                lock(&shared.sinks).push((bytes, sum));
                recorded = true;
            }
            Ok(_) => {}
            Err(e) => {
                if !matches!(e, WsError::ConnectionClosed | WsError::AlreadyClosed) {
                    log::debug!("stand-in: sink: {e}");
                }
                break;
            }
        }
    }
    if !recorded {
        lock(&shared.closes).push(None);
        lock(&shared.sinks).push((bytes, sum));
    }
}

fn drop_after(mut ws: Ws, n: u64) -> Result<(), WsError> {
    send_now(&mut ws, Message::binary(pattern_vec(0, n as usize)))?;
    let mut stream = ws.into_inner();
    // Discard what the peer already sent so that closing does not turn into an RST
    // (which could destroy the bytes just sent before the peer reads them).
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        for _ in 0..1024 {
            match stream.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}
