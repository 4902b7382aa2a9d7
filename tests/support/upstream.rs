#![allow(dead_code)]
//! A stand-in for KubeVirt's VNC WebSocket subresource, for tests, examples and benches.
//!
//! It listens on `127.0.0.1:0`, runs one thread per connection, reads the HTTP request head
//! itself (raw, up to [`MAX_HEAD`] bytes), records it (see [`StandIn::seen`]) and then serves
//! the [`Behaviour`] that the caller declared for the VMI name in the request path: each test
//! says what it relies on, in [`StandInOptions`] (`vmi(NAME, BEHAVIOUR)` entries, and an
//! optional default for every other name), so a name never picks a behaviour by its spelling.
//!
//! | [`Behaviour`]         | what the stand-in does                                               |
//! |-----------------------|----------------------------------------------------------------------|
//! | `Echo`                | upgrade, echo every text/binary message back                         |
//! | `Vnc`                 | upgrade, send binary `RFB 003.008\n` at once, then echo              |
//! | `Stream { total, frame }` | upgrade, send `total` [`pattern`] bytes in binary messages of `frame` bytes, close 1000 |
//! | `Sink`                | upgrade, count + [`fnv1a`] every payload byte, see [`StandIn::sink_results`] |
//! | `DropAfter(N)`        | upgrade, send one binary message of N pattern bytes, drop TCP (no close frame) |
//! | `CloseAfter(N)`       | upgrade, send one binary message of N pattern bytes, close 1000 "done" |
//! | `Status(CODE)`        | no upgrade: HTTP CODE with a Kubernetes `Status` JSON body           |
//! | `KubeStatus { code, reason, message }` | no upgrade: HTTP `code` with a Kubernetes `Status` carrying this `reason` and `message` (hand-made in the shape virt-api writes, for its refusals) |
//! | `Silent`              | never answer; hold the socket until the peer closes it (max 60 s)     |
//! | `BadAccept`           | 101 with a wrong `Sec-WebSocket-Accept`                              |
//! | `Masked`              | upgrade, then a *masked* server frame (protocol violation)           |
//! | `Bridge`              | upgrade, then relay to the TCP server at [`StandInOptions::bridge_to`] (like websockify); 502 when that is not set or cannot be reached |
//!
//! A name that is neither listed nor covered by a default gets a 404 Kubernetes `Status`
//! ("no behaviour declared for VMI ..."), the answer virt-api gives for a VMI it does not know.
//! A request that is not a valid WebSocket upgrade gets a 400 (except for `Status`, `KubeStatus` and
//! `Silent`, which do not look at the upgrade headers). A declaration that cannot be served
//! (a `Stream` frame of 0 bytes, a status outside 100..=999) panics in [`StandIn::start_with`].
//!
//! The VMI name is the path segment after `virtualmachineinstances/`, or else the last path
//! segment (so `/` is the empty name). The query string is ignored for the choice but recorded.
//!
//! Like KubeVirt, every upgrade:
//! - answers `Sec-WebSocket-Protocol: plain.kubevirt.io` when the client offers that
//!   subprotocol, and no subprotocol otherwise;
//! - with `?preserveSession=true` in the query (or another spelling Go's `ParseBool` takes as
//!   true), answers 500 with [`CONSOLE_IN_USE`] (virt-handler's refusal as current virt-api
//!   passes it on) while another WebSocket session to the same VMI is open on this stand-in.
//!   Without the flag a second session simply proceeds (real KubeVirt would kick the first one,
//!   dropping its connection without a close frame).
//!
//! [`StandIn::start_with`] adds, in the order they are checked, after the request is recorded:
//! a required bearer token (else 401), KubeVirt paths only (else 404), and TLS around it all
//! (see [`StandInOptions`]). The behaviours are written once, generic over the connection
//! (plain TCP or rustls over TCP).
//!
//! Every socket has read and write timeouts ([`IO_TIMEOUT`]) and every loop ends on EOF, error,
//! timeout or a deadline, so no handler thread can hang forever. Dropping the [`StandIn`] stops
//! the accept loop and shuts down the connections still open (as if the upstream died).
//!
//! Depends only on std, tungstenite, log and rustls: it is included by `#[path]` from tests,
//! examples and benches. The certificates for the TLS option come from `pki.rs` beside it,
//! which callers include next to this module when they need them.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// The message of the 500 the stand-in answers a `preserveSession=true` request with while
/// another session to the VMI is open: virt-handler's refusal as current virt-api passes it on,
/// wrapped in an InternalError Status (`pkg/virt-api/rest/dialers.go` with client-go's
/// `EnrichError`). Hand-made in that shape: KubeVirt's Go code cannot run here.
pub const CONSOLE_IN_USE: &str = "Internal error occurred: Can't connect to websocket (503): \
     websocket: bad handshake: application info: Active VNC connection. Request denied.";

/// Largest request head the stand-in accepts (bytes, including the blank line).
pub const MAX_HEAD: usize = 16 * 1024;
/// Read and write timeout on every accepted socket: a peer that neither sends nor reads for
/// this long is abandoned.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server-initiated close waits for the peer's close reply.
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long `Silent`, `BadAccept` and `Masked` hold the socket waiting for EOF.
pub const HOLD_LIMIT: Duration = Duration::from_secs(60);
/// How long a plain HTTP answer waits for the peer to close before dropping the socket.
const LINGER_LIMIT: Duration = Duration::from_secs(10);
/// tungstenite writes to the socket once this much is buffered.
const WRITE_BUFFER: usize = 128 * 1024;
/// Cap on tungstenite's write buffer (raised per frame only for a single larger frame).
const MAX_WRITE_BUFFER: usize = 1024 * 1024;
/// `Stream` flushes at least this often.
const FLUSH_EVERY: usize = 256 * 1024;
/// How long a `Bridge` session waits for a client message before it looks at the VNC side
/// again: the latency that the VNC-to-client direction can gain when the client is quiet.
const BRIDGE_POLL: Duration = Duration::from_millis(5);
/// How long a `Bridge` session tries to connect to the VNC server.
const BRIDGE_CONNECT: Duration = Duration::from_secs(5);
/// Read size and number of chunks in flight from the VNC server to the client in `Bridge`.
const BRIDGE_CHUNK: usize = 64 * 1024;
const BRIDGE_QUEUE: usize = 16;

/// The subprotocol KubeVirt's VNC endpoint speaks when asked to.
pub const KUBEVIRT_SUBPROTOCOL: &str = "plain.kubevirt.io";

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

/// The deterministic byte stream sent by `Stream`, `DropAfter` and `CloseAfter`:
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
    /// For each finished `Sink` session: the close code its peer sent, or
    /// `None` when the peer vanished without a close frame.
    closes: Mutex<Vec<Option<u16>>>,
    /// Clones of the open sockets, so that `Drop` can shut them down.
    live: Mutex<Vec<(usize, TcpStream)>>,
    /// Open WebSocket sessions per VMI (`namespace/name`), for `preserveSession`.
    sessions: Mutex<HashMap<String, usize>>,
    settings: Settings,
}

/// A certificate chain (leaf first) and its private key, for [`StandInOptions::tls`].
///
/// Built by `pki.rs` (`TestPki::server_tls`), or from any rustls-compatible DER material.
pub struct ServerTls {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The crypto provider of the proxy (rustls over *ring*, X25519 first), for the tests' and the
/// benches' own TLS ends, which speak what the proxy speaks and offer key shares as browsers
/// and Go do (rustls 0.23.48's default for *ring* puts P-384 first, which would make every
/// handshake of the bench's clients and origin several times dearer than a browser's).
/// `src/crypto.rs` says why *ring* stays, deprecated as it is.
#[allow(deprecated)]
pub fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..rustls::crypto::ring::default_provider()
    })
}

impl ServerTls {
    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, no client auth).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = ring_provider();
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

impl Clone for ServerTls {
    fn clone(&self) -> Self {
        ServerTls {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// How a [`StandIn`] serves; `Default` is what [`StandIn::start`] does (plain TCP, no checks).
#[derive(Debug, Clone, Default)]
pub struct StandInOptions {
    /// Serve TLS with this certificate chain and key (then `wss://`), the same behaviours inside.
    pub tls: Option<ServerTls>,
    /// Require exactly `Authorization: Bearer <token>` on every request, else 401 with a
    /// Kubernetes Status body (`"message":"Unauthorized"`). The request is recorded either way.
    pub bearer: Option<String>,
    /// Serve only `/apis/subresources.kubevirt.io/{v1,v1alpha3}/namespaces/NS/
    /// virtualmachineinstances/VMI/vnc` (any query); every other path gets 404.
    pub kubevirt_paths_only: bool,
    /// The plain TCP server (a real VNC server, e.g. QEMU's `-vnc 127.0.0.1:N`) that
    /// [`Behaviour::Bridge`] sessions relay to.
    pub bridge_to: Option<SocketAddr>,
    /// The behaviour of each VMI name the test uses (exact names; see [`StandInOptions::vmi`]).
    pub vmis: Vec<(String, Behaviour)>,
    /// The behaviour of every name not in `vmis`; `None` answers those 404.
    pub default: Option<Behaviour>,
}

/// A behaviour alone means: that behaviour for every VMI name.
impl From<Behaviour> for StandInOptions {
    fn from(behaviour: Behaviour) -> StandInOptions {
        StandInOptions::serving(behaviour)
    }
}

impl StandInOptions {
    /// Options that serve `behaviour` for every VMI name (more entries can be added).
    pub fn serving(behaviour: Behaviour) -> StandInOptions {
        StandInOptions {
            default: Some(behaviour),
            ..StandInOptions::default()
        }
    }

    /// Adds an entry: requests for VMI `name` get `behaviour`.
    pub fn vmi(mut self, name: impl Into<String>, behaviour: Behaviour) -> StandInOptions {
        self.vmis.push((name.into(), behaviour));
        self
    }
}

/// [`StandInOptions`] as the connection threads use them.
#[derive(Default)]
struct Settings {
    tls: Option<Arc<ServerConfig>>,
    bearer: Option<String>,
    kubevirt_paths_only: bool,
    bridge_to: Option<SocketAddr>,
    vmis: Vec<(String, Behaviour)>,
    default: Option<Behaviour>,
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
    /// Binds `127.0.0.1:0` and starts the accept loop: plain TCP, no checks, `behaviour` for
    /// every VMI name.
    pub fn serving(behaviour: Behaviour) -> StandIn {
        StandIn::start_with(StandInOptions::serving(behaviour))
    }

    /// Binds `127.0.0.1:0` and starts the accept loop with `opts`. Panics if the TLS material
    /// is unusable or a declared behaviour cannot be served.
    pub fn start_with(opts: StandInOptions) -> StandIn {
        let declared = opts.vmis.iter().map(|(n, b)| (n.as_str(), b));
        let default = opts.default.iter().map(|b| ("(default)", b));
        for (name, b) in declared.chain(default) {
            if let Some(why) = b.invalid() {
                panic!("stand-in: cannot serve {b:?} for VMI {name}: {why}");
            }
        }
        let tls = opts.tls.as_ref().map(|t| {
            t.server_config()
                .unwrap_or_else(|e| panic!("stand-in: unusable TLS certificate or key: {e}"))
        });
        let settings = Settings {
            tls,
            bearer: opts.bearer,
            kubevirt_paths_only: opts.kubevirt_paths_only,
            bridge_to: opts.bridge_to,
            vmis: opts.vmis,
            default: opts.default,
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("stand-in: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("stand-in: local_addr");
        let shared = Arc::new(Shared {
            settings,
            ..Shared::default()
        });
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

    /// The address to dial (`ws://ADDR/...`, or `wss://` with TLS).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this stand-in serves TLS.
    pub fn is_tls(&self) -> bool {
        self.shared.settings.tls.is_some()
    }

    /// `ws://127.0.0.1:PORT`, or `wss://127.0.0.1:PORT` with TLS (no trailing slash).
    pub fn base_url(&self) -> String {
        let scheme = if self.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}", self.addr)
    }

    /// WebSocket sessions currently open (upgraded and not yet ended), over all VMIs.
    pub fn sessions_open(&self) -> usize {
        lock(&self.shared.sessions).values().sum()
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

    /// `(payload bytes, fnv1a checksum)` for each finished `Sink` session, in order of finish.
    /// A session is recorded when its peer's close frame arrives (before the close reply is
    /// sent), or on EOF/error/timeout if it never closed properly.
    pub fn sink_results(&self) -> Vec<(u64, u64)> {
        lock(&self.shared.sinks).clone()
    }

    /// For each finished `Sink` session, in the same order as
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

    /// Whether the client offers subprotocol `proto` (names are case-sensitive, RFC 6455).
    fn offers_protocol(&self, proto: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == "sec-websocket-protocol")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim() == proto)
    }

    /// Whether the request carries exactly one `Authorization: Bearer <token>`.
    fn has_bearer(&self, token: &str) -> bool {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .map(|(_, v)| v.as_str());
        let first = values.next();
        values.next().is_none()
            && first
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| t == token)
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
fn read_head(stream: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
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

/// Whether `target` is a path KubeVirt's virt-api serves the VNC subresource at:
/// `/apis/subresources.kubevirt.io/{v1,v1alpha3}/namespaces/NS/virtualmachineinstances/VMI/vnc`,
/// with any query.
pub fn is_kubevirt_vnc_path(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').collect();
    matches!(
        segments.as_slice(),
        ["", "apis", "subresources.kubevirt.io", "v1" | "v1alpha3", "namespaces", ns,
         "virtualmachineinstances", vmi, "vnc"] if !ns.is_empty() && !vmi.is_empty()
    )
}

/// Whether the query of `target` has `name` set to a value Go's `strconv.ParseBool` reads as
/// true, as virt-api and virt-handler read `preserveSession` (`QueryParameter`, that is Go's
/// `url.Query().Get`).
fn query_flag(target: &str, name: &str) -> bool {
    query_get(target, name)
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

/// Go's `url.Query().Get(name)`: the value of the first pair named `name`, with `+` read as a
/// space and `%XX` decoded; a pair that does not decode, or holds a `;`, is skipped, as Go's
/// `url.ParseQuery` skips it (since Go 1.17 a `;` no longer separates pairs).
fn query_get(target: &str, name: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.contains(';'))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((go_query_unescape(k)?, go_query_unescape(v)?))
        })
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Go's `url.QueryUnescape`: `+` is a space, `%XX` a byte; a broken escape fails.
fn go_query_unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Which VMI a request is for, for `preserveSession`: `namespace/name` (the namespace is empty
/// when the path has none), the same for `v1` and `v1alpha3`.
fn vmi_key(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let ns = path
        .split_once("/namespaces/")
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or("");
    format!("{ns}/{}", vmi_name(target))
}

// ---------------------------------------------------------------------------------------------
// Connections: plain TCP or TLS over TCP

/// What the behaviours need from a connection beyond `Read + Write`, so that they are written
/// once for plain TCP and for TLS.
trait Conn: Read + Write {
    /// The TCP socket underneath: timeouts, shutdown, and raw reads that bypass TLS.
    fn tcp(&self) -> &TcpStream;
    /// Queues and sends a TLS `close_notify`, best effort; nothing for plain TCP. Called before
    /// a polite end, so that a TLS peer sees a clean EOF rather than a truncation.
    fn close_notify(&mut self);
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn close_notify(&mut self) {}
}

type TlsStream = StreamOwned<ServerConnection, TcpStream>;

impl Conn for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    fn close_notify(&mut self) {
        if !self.conn.is_handshaking() {
            self.conn.send_close_notify();
            let _ = self.flush();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviours

/// What the stand-in does with a request for one VMI (see the module docs' table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Upgrade, echo every text/binary message back.
    Echo,
    /// Upgrade, send binary `RFB 003.008\n` at once, then echo.
    Vnc,
    /// Upgrade, send `total` [`pattern`] bytes in binary messages of `frame` bytes, close 1000.
    Stream { total: u64, frame: usize },
    /// Upgrade, count and checksum every payload byte ([`StandIn::sink_results`]).
    Sink,
    /// Upgrade, send one binary message of N pattern bytes, drop TCP without a close frame.
    DropAfter(u64),
    /// Upgrade, send one binary message of N pattern bytes, close 1000 "done".
    CloseAfter(u64),
    /// No upgrade: this HTTP status with a Kubernetes `Status` body.
    Status(u16),
    /// No upgrade: this HTTP status with a Kubernetes `Status` body carrying
    /// this `reason` and `message`, in the shape virt-api's `StatusError`s
    /// take (hand-made: KubeVirt's Go code cannot run here).
    KubeStatus {
        code: u16,
        reason: &'static str,
        message: &'static str,
    },
    /// Never answer; hold the socket until the peer closes it (at most [`HOLD_LIMIT`]).
    Silent,
    /// 101 with a wrong `Sec-WebSocket-Accept`.
    BadAccept,
    /// Upgrade, then a masked server frame (a protocol violation).
    Masked,
    /// Upgrade, then relay to [`StandInOptions::bridge_to`].
    Bridge,
}

impl Behaviour {
    /// KubeVirt's answer for a console already open with `preserveSession=true`, as current
    /// virt-api sends it: a 500 InternalError Status carrying [`CONSOLE_IN_USE`].
    pub fn console_in_use() -> Behaviour {
        Behaviour::KubeStatus {
            code: 500,
            reason: "InternalError",
            message: CONSOLE_IN_USE,
        }
    }

    /// Why this declaration cannot be served, if it cannot.
    fn invalid(&self) -> Option<String> {
        match self {
            Behaviour::Stream { frame: 0, .. } => Some("a Stream frame of 0 bytes".into()),
            Behaviour::Status(code) | Behaviour::KubeStatus { code, .. }
                if !(100..=999).contains(code) =>
            {
                Some(format!("HTTP status {code}, outside 100..=999"))
            }
            _ => None,
        }
    }
}

/// The behaviour declared for `name`: its own entry (the last one, if listed twice), else the
/// default, else none (answered 404).
fn behaviour<'a>(settings: &'a Settings, name: &str) -> Option<&'a Behaviour> {
    settings
        .vmis
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b)
        .or(settings.default.as_ref())
}

type Ws<S> = WebSocket<S>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(None)
        .max_frame_size(None)
}

fn handle(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    match &shared.settings.tls {
        None => serve(shared, stream),
        // The TLS handshake runs inside the first read of the request head, on this thread,
        // under the same timeouts; a client that rejects the certificate just ends the
        // connection (nothing is recorded in `seen`).
        Some(config) => match ServerConnection::new(Arc::clone(config)) {
            Ok(conn) => serve(shared, StreamOwned::new(conn, stream)),
            Err(e) => log::warn!("stand-in: cannot start a TLS connection: {e}"),
        },
    }
}

/// Open-session registration for `preserveSession`; removed when the session ends.
struct SessionGuard<'a> {
    shared: &'a Shared,
    key: String,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut sessions = lock(&self.shared.sessions);
        if let Some(n) = sessions.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.key);
            }
        }
    }
}

/// Registers a session to the VMI of `target`, or `None` when `preserveSession=true` is asked
/// for and one is already open. Check and registration happen under one lock.
fn open_session<'a>(shared: &'a Shared, target: &str) -> Option<SessionGuard<'a>> {
    let key = vmi_key(target);
    let mut sessions = lock(&shared.sessions);
    let open = sessions.entry(key.clone()).or_insert(0);
    if *open > 0 && query_flag(target, "preserveSession") {
        return None;
    }
    *open += 1;
    Some(SessionGuard { shared, key })
}

fn serve<S: Conn>(shared: &Shared, mut stream: S) {
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

    let settings = &shared.settings;
    if let Some(token) = &settings.bearer
        && !head.has_bearer(token)
    {
        log::debug!("stand-in: {} {} -> 401", head.method, head.target);
        respond_kube_status(&mut stream, 401, "Unauthorized", "Unauthorized");
        return;
    }
    if settings.kubevirt_paths_only && !is_kubevirt_vnc_path(&head.target) {
        log::debug!("stand-in: {} {} -> 404", head.method, head.target);
        let path = head.target.split('?').next().unwrap_or("");
        respond_kube_status(
            &mut stream,
            404,
            &format!("the server could not find the requested resource: path {path:?} not found"),
            "NotFound",
        );
        return;
    }

    let name = vmi_name(&head.target);
    let Some(what) = behaviour(settings, name).cloned() else {
        log::debug!(
            "stand-in: {} {} -> no behaviour, 404",
            head.method,
            head.target
        );
        respond_kube_status(
            &mut stream,
            404,
            &format!("stand-in: no behaviour declared for VMI {name:?}"),
            "NotFound",
        );
        return;
    };
    log::debug!("stand-in: {} {} -> {what:?}", head.method, head.target);

    match what {
        Behaviour::Status(code) => {
            respond_status(&mut stream, code, &format!("stand-in says {code}"));
            return;
        }
        Behaviour::KubeStatus {
            code,
            reason,
            message,
        } => {
            respond_kube_status(&mut stream, code, message, reason);
            return;
        }
        Behaviour::Silent => {
            drain_until_eof(&mut stream, HOLD_LIMIT);
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

    let Some(_session) = open_session(shared, &head.target) else {
        respond_kube_status(&mut stream, 500, CONSOLE_IN_USE, "InternalError");
        return;
    };

    // Like virt-api, reach the VNC side before upgrading the client.
    let vnc = if what == Behaviour::Bridge {
        let Some(to) = settings.bridge_to else {
            respond_status(&mut stream, 502, "stand-in: bridge_to is not configured");
            return;
        };
        match TcpStream::connect_timeout(&to, BRIDGE_CONNECT) {
            Ok(vnc) => Some(vnc),
            Err(e) => {
                respond_status(
                    &mut stream,
                    502,
                    &format!("stand-in: cannot connect to the VNC server at {to}: {e}"),
                );
                return;
            }
        }
    } else {
        None
    };

    let protocol = head
        .offers_protocol(KUBEVIRT_SUBPROTOCOL)
        .then_some(KUBEVIRT_SUBPROTOCOL);

    if what == Behaviour::BadAccept {
        let wrong = derive_accept_key(format!("{key}-wrong").as_bytes());
        if write_101(&mut stream, &wrong, protocol).is_ok() {
            drain_until_eof(&mut stream, HOLD_LIMIT);
        }
        return;
    }
    if write_101(&mut stream, &derive_accept_key(key.as_bytes()), protocol).is_err() {
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
        // Drops the connection on purpose: no close_notify either.
        Behaviour::DropAfter(n) => return log_err(name, drop_after(ws, n)),
        Behaviour::CloseAfter(n) => send_now(&mut ws, Message::binary(pattern_vec(0, n as usize)))
            .map(|_| close_and_wait(&mut ws, "done")),
        Behaviour::Bridge => bridge(&mut ws, vnc.expect("connected above")),
        _ => unreachable!("handled above"),
    };
    log_err(name, result);
    ws.get_mut().close_notify();
}

fn log_err(name: &str, result: Result<(), WsError>) {
    if let Err(e) = result {
        log::debug!("stand-in: {name}: {e}");
    }
}

fn write_101(stream: &mut impl Write, accept: &str, protocol: Option<&str>) -> io::Result<()> {
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    );
    stream.write_all(resp.as_bytes())?;
    stream.flush()
}

/// Answers with a Kubernetes `Status` body, then closes politely (FIN, wait for the peer's).
fn respond_status(stream: &mut impl Conn, code: u16, message: &str) {
    respond(stream, code, message, None);
}

/// Like [`respond_status`], with the Status `reason` the API server would put there.
fn respond_kube_status(stream: &mut impl Conn, code: u16, message: &str, reason: &str) {
    respond(stream, code, message, Some(reason));
}

fn respond(stream: &mut impl Conn, code: u16, message: &str, reason_field: Option<&str>) {
    let reason = tungstenite::http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let message = message.replace('\\', "\\\\").replace('"', "\\\"");
    let reason_field = reason_field
        .map(|r| format!(",\"reason\":\"{r}\""))
        .unwrap_or_default();
    let body = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\
         \"message\":\"{message}\"{reason_field},\"code\":{code}}}"
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
        stream.close_notify();
        let _ = stream.tcp().shutdown(Shutdown::Write);
        // Reading to EOF before dropping avoids an RST that could destroy the response.
        drain_until_eof(stream, LINGER_LIMIT);
    }
}

/// Reads and discards until EOF, an error, or `limit` elapses.
fn drain_until_eof(stream: &mut impl Conn, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.tcp().set_read_timeout(Some(left)).is_err() {
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
fn send<S: Conn>(ws: &mut Ws<S>, msg: Message) -> Result<(), WsError> {
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

fn send_now<S: Conn>(ws: &mut Ws<S>, msg: Message) -> Result<(), WsError> {
    send(ws, msg)?;
    ws.flush()
}

fn echo<S: Conn>(ws: &mut Ws<S>) -> Result<(), WsError> {
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

fn stream_pattern<S: Conn>(ws: &mut Ws<S>, total: u64, frame: usize) -> Result<(), WsError> {
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
fn close_and_wait<S: Conn>(ws: &mut Ws<S>, reason: &str) {
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
        if left.is_zero() || ws.get_ref().tcp().set_read_timeout(Some(left)).is_err() {
            return;
        }
        if ws.read().is_err() {
            return; // ConnectionClosed after the reply, or EOF/timeout/error
        }
    }
}

/// A sink session's close code and result, recorded together: both are pushed while the
/// `closes` lock is held, so a test that saw the close code also sees the result at the
/// same index, whatever other sessions finish meanwhile.
fn record(shared: &Shared, close: Option<u16>, result: (u64, u64)) {
    let mut closes = lock(&shared.closes);
    lock(&shared.sinks).push(result);
    closes.push(close);
}

fn sink<S: Conn>(shared: &Shared, ws: &mut Ws<S>) {
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
                record(
                    shared,
                    Some(frame.map_or(1005, |f| u16::from(f.code))),
                    (bytes, sum),
                );
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
        record(shared, None, (bytes, sum));
    }
}

fn drop_after<S: Conn>(mut ws: Ws<S>, n: u64) -> Result<(), WsError> {
    send_now(&mut ws, Message::binary(pattern_vec(0, n as usize)))?;
    let stream = ws.into_inner();
    let mut tcp = stream.tcp();
    // Discard what the peer already sent so that closing does not turn into an RST
    // (which could destroy the bytes just sent before the peer reads them). Raw reads: with
    // TLS the records are discarded undecrypted, which is all that is needed here.
    if tcp.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        for _ in 0..1024 {
            match tcp.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
    let _ = tcp.shutdown(Shutdown::Both);
    Ok(())
}

/// Shuts the VNC socket down (unblocking the reader thread) and joins that thread.
struct BridgeGuard {
    vnc: TcpStream,
    reader: Option<JoinHandle<()>>,
}

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = self.vnc.shutdown(Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// Relays between the WebSocket client and a plain TCP server, like websockify: binary
/// messages from the client become raw bytes to the server (text messages are dropped, as
/// virt-handler does), raw bytes from the server become binary messages to the client. Either
/// side ending ends both: the client gets close 1000 when the server goes away, the server gets
/// a shutdown when the client closes or vanishes.
///
/// A reader thread does blocking reads on the server socket and hands chunks over through a
/// bounded channel (backpressure); this thread writes to the server and polls the client with
/// a [`BRIDGE_POLL`] read timeout, so it never spins.
fn bridge<S: Conn>(ws: &mut Ws<S>, vnc: TcpStream) -> Result<(), WsError> {
    let _ = vnc.set_nodelay(true);
    vnc.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut vnc_write = vnc.try_clone()?;
    let mut vnc_read = vnc.try_clone()?;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(BRIDGE_QUEUE);
    let reader = thread::Builder::new()
        .name("stand-in-bridge".into())
        .spawn(move || {
            let mut buf = vec![0u8; BRIDGE_CHUNK];
            loop {
                match vnc_read.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    // Dropping the sender (reader thread ended) is how the server's EOF arrives here.
    let _guard = BridgeGuard {
        vnc,
        reader: Some(reader),
    };

    ws.get_ref().tcp().set_read_timeout(Some(BRIDGE_POLL))?;
    loop {
        // Server -> client: everything queued so far, without waiting.
        let mut server_gone = false;
        loop {
            match rx.try_recv() {
                Ok(chunk) => send(ws, Message::binary(chunk))?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    server_gone = true;
                    break;
                }
            }
        }
        ws.flush()?;
        if server_gone {
            close_and_wait(ws, "");
            return Ok(());
        }

        // Client -> server: at most one message, waiting at most BRIDGE_POLL for it.
        match ws.read() {
            Ok(Message::Binary(b)) => vnc_write.write_all(&b)?,
            Ok(Message::Close(_)) => {
                // tungstenite queued the close reply; send it and end.
                let _ = ws.flush();
                return Ok(());
            }
            Ok(_) => {}
            Err(WsError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
