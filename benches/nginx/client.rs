//! The clients: the four routes to the origin, and a blocking WebSocket client over plain TCP or TLS.

use std::io;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

use crate::frames::{echo_payload, kubevirt_path, mask_for, parse_head, push_frame};
use crate::{CLOSE_READ_LIMIT, IO_TIMEOUT, MAX_CLIENT_FRAME, MAX_HEAD, NS, Res, tokens};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Route {
    Direct,
    Ours,
    Nginx,
    Haproxy,
}

impl Route {
    pub(crate) const ALL: [Route; 4] = [Route::Ours, Route::Nginx, Route::Haproxy, Route::Direct];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Ours => "ours",
            Route::Nginx => "nginx",
            Route::Haproxy => "HAProxy",
        }
    }

    /// The routes in the order of round `r`: rotating, so none always goes first.
    pub(crate) fn rotation(r: usize) -> [Route; 4] {
        let mut order = Route::ALL;
        order.rotate_left(r % 4);
        order
    }
}

/// How a client reaches the origin on one route.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) route: Route,
    pub(crate) addr: SocketAddr,
    /// TLS client configuration: the direct route to a TLS origin, and every route in the
    /// client-TLS variants (one configuration, so one session cache, per route: rustls keys
    /// its cache by server name, and every route is 127.0.0.1).
    pub(crate) tls: Option<Arc<ClientConfig>>,
    /// Bearer the client sends itself (direct route to an origin that requires one).
    pub(crate) bearer: Option<String>,
}

impl Endpoint {
    pub(crate) fn path(&self, vmi: &str, token: Option<&str>) -> String {
        match self.route {
            Route::Direct => kubevirt_path(vmi),
            // nginx and HAProxy get the same request shape (they ignore the token) so that
            // request sizes match.
            Route::Ours | Route::Nginx | Route::Haproxy => match token {
                Some(t) => format!("/{t}/{vmi}"),
                None => format!(
                    "/{}/{vmi}",
                    tokens::mint(tokens::SECRET, NS, &[vmi], tokens::now() + 3600)
                ),
            },
        }
    }

    /// Opens a WebSocket session to `vmi`; `token` is minted when not given.
    pub(crate) fn open(&self, vmi: &str, token: Option<&str>) -> Res<Client> {
        let fail = |e: String| format!("{}: open {vmi}: {e}", self.route.name());
        let tcp = TcpStream::connect(self.addr).map_err(|e| fail(e.to_string()))?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| tcp.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| tcp.set_nodelay(true))
            .map_err(|e| fail(e.to_string()))?;
        let mut stream = match &self.tls {
            Some(cfg) => {
                let name = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let conn = ClientConnection::new(Arc::clone(cfg), name)
                    .map_err(|e| fail(e.to_string()))?;
                ClientStream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
            None => ClientStream::Plain(tcp),
        };
        // The TLS handshake by itself first, so that its kind (full or resumed) is known.
        let resumed = match &mut stream {
            ClientStream::Tls(s) => {
                while s.conn.is_handshaking() {
                    s.conn
                        .complete_io(&mut s.sock)
                        .map_err(|e| fail(format!("TLS handshake: {e}")))?;
                }
                s.conn.handshake_kind() == Some(HandshakeKind::Resumed)
            }
            ClientStream::Plain(_) => false,
        };
        let mut client = Client {
            s: stream,
            resumed,
            buf: Vec::new(),
            start: 0,
            wbuf: Vec::new(),
            seq: 0,
        };
        client
            .handshake(
                &self.addr.to_string(),
                &self.path(vmi, token),
                self.bearer.as_deref(),
            )
            .map_err(fail)?;
        Ok(client)
    }
}

pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(s) => s.flush(),
        }
    }
}

/// A blocking WebSocket client over raw frames: masks what it sends, checks what it gets.
pub(crate) struct Client {
    pub(crate) s: ClientStream,
    /// The TLS handshake resumed a session (false for a full handshake or plain TCP).
    pub(crate) resumed: bool,
    /// Received, not yet consumed: `buf[start..]`.
    pub(crate) buf: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) wbuf: Vec<u8>,
    pub(crate) seq: u64,
}

impl Client {
    pub(crate) fn handshake(&mut self, host: &str, path: &str, bearer: Option<&str>) -> Res<()> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nonce = (NEXT.fetch_add(1, Ordering::Relaxed) as u128)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
        let key = base64::engine::general_purpose::STANDARD.encode(nonce.to_le_bytes());
        let auth = bearer.map_or(String::new(), |b| format!("Authorization: Bearer {b}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        );
        self.s
            .write_all(request.as_bytes())
            .and_then(|_| self.s.flush())
            .map_err(|e| format!("send the upgrade request: {e}"))?;
        // Bounded: each pass reads more bytes or fails; the head is capped.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    if resp.code != Some(101) {
                        return Err(format!(
                            "upgrade answered {:?} {:?}",
                            resp.code,
                            resp.reason.unwrap_or("")
                        ));
                    }
                    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
                    let accept = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                        .map(|h| h.value);
                    if accept != Some(expected.as_bytes()) {
                        return Err("wrong Sec-WebSocket-Accept".into());
                    }
                    self.start = n;
                    return Ok(());
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => return Err("response head too large".into()),
                Err(e) => return Err(format!("bad response head: {e}")),
            }
            if self
                .fill(4096)
                .map_err(|e| format!("read the upgrade response: {e}"))?
                == 0
            {
                return Err("connection closed during the upgrade".into());
            }
        }
    }

    /// Reads more bytes into `buf` (up to `chunk`); 0 at EOF.
    pub(crate) fn fill(&mut self, chunk: usize) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + chunk, 0);
        let r = self.s.read(&mut self.buf[old..]);
        self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
        r
    }

    pub(crate) fn send(&mut self, b0: u8, payload: &[u8]) -> Res<()> {
        self.seq += 1;
        self.wbuf.clear();
        push_frame(&mut self.wbuf, b0, payload, Some(mask_for(self.seq)));
        self.s
            .write_all(&self.wbuf)
            .and_then(|_| self.s.flush())
            .map_err(|e| format!("send: {e}"))
    }

    /// The next whole frame from the server: (opcode, payload).
    pub(crate) fn recv(&mut self) -> Res<(u8, Vec<u8>)> {
        loop {
            if let Some(h) = parse_head(&self.buf[self.start..]) {
                if h.mask.is_some() {
                    return Err("masked frame from the server".into());
                }
                if h.len > MAX_CLIENT_FRAME {
                    return Err(format!("unexpected frame of {} bytes", h.len));
                }
                if self.buf.len() - self.start >= h.total() {
                    let at = self.start + h.header_len;
                    let payload = self.buf[at..at + h.len].to_vec();
                    self.start += h.total();
                    return Ok((h.opcode(), payload));
                }
            }
            match self.fill(16 * 1024) {
                Ok(0) => return Err("connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// One 32-byte round trip, checked.
    pub(crate) fn echo(&mut self, seq: u64) -> Res<()> {
        let payload = echo_payload(seq);
        self.send(0x82, &payload)?;
        match self.recv()? {
            (0x2, got) if got == payload => Ok(()),
            (op, got) => Err(format!(
                "echo #{seq} came back as opcode {op:#x}, {} bytes",
                got.len()
            )),
        }
    }

    /// Sends close 1000 without waiting.
    pub(crate) fn start_close(&mut self) -> Res<()> {
        self.send(0x88, &1000u16.to_be_bytes())
    }

    /// Waits for the close reply, then for the server to close TCP.
    pub(crate) fn finish_close(&mut self) -> Res<()> {
        for _ in 0..CLOSE_READ_LIMIT {
            let (op, payload) = self.recv()?;
            if op == 0x8 {
                if payload.len() >= 2 && payload[..2] != 1000u16.to_be_bytes() {
                    return Err(format!(
                        "closed with code {}",
                        u16::from_be_bytes([payload[0], payload[1]])
                    ));
                }
                return self.await_eof();
            }
        }
        Err("no close reply".into())
    }

    pub(crate) fn close(&mut self) -> Res<()> {
        self.start_close()?;
        self.finish_close()
    }

    /// Reads until the server closes TCP (bounded by the read timeout per read).
    pub(crate) fn await_eof(&mut self) -> Res<()> {
        let mut scratch = [0u8; 256];
        for _ in 0..CLOSE_READ_LIMIT {
            match self.s.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // TLS peers may close without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("waiting for the server to close: {e}")),
            }
        }
        Err("the server kept sending after the close".into())
    }

    /// Gives the read buffer back (idle sessions should cost the bench little).
    pub(crate) fn shrink(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
        self.wbuf = Vec::new();
    }
}
