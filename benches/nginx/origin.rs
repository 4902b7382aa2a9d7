//! The origin: a mio WebSocket server in the bench process.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use std::{io, thread};

use mio::{Events, Interest, Poll, Token, Waker};
use rustls::{HandshakeKind, ServerConfig, ServerConnection};
use slab::Slab;

use crate::frames::{Wire, apply_mask, parse_head, push_frame};
use crate::{
    DRAIN_LIMIT, DRIVE_LIMIT, KUBEVIRT_PREFIX, MAX_CLIENT_FRAME, MAX_HEAD, ORIGIN_OUT_LIMIT, Res,
    STREAM_CHUNK, upstream,
};

#[derive(Default)]
pub(crate) struct OriginStats {
    pub(crate) open: AtomicUsize,
    pub(crate) upgrades: AtomicUsize,
    /// Requests answered with an HTTP error (wrong path, missing bearer, bad upgrade).
    pub(crate) refused: AtomicUsize,
    /// Protocol violations seen (unmasked client frames, unexpected opcodes, ...).
    pub(crate) errors: AtomicUsize,
    /// Connections that ended in an I/O error (resets).
    pub(crate) io_errors: AtomicUsize,
    pub(crate) tls_full: AtomicUsize,
    pub(crate) tls_resumed: AtomicUsize,
    /// (payload bytes accepted, all equal to the expected stream) per finished sink.
    pub(crate) sinks: Mutex<Vec<(usize, bool)>>,
    pub(crate) last_problem: Mutex<Option<String>>,
}

impl OriginStats {
    pub(crate) fn problem(&self, counter: &AtomicUsize, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    }

    /// Fails if the origin refused a request or saw a protocol error.
    pub(crate) fn check(&self) -> Res<()> {
        let refused = self.refused.load(Ordering::Relaxed);
        let errors = self.errors.load(Ordering::Relaxed);
        if refused + errors > 0 {
            let last = self
                .last_problem
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(format!(
                "the origin refused {refused} requests and saw {errors} protocol errors; last: {}",
                last.unwrap_or_default()
            ));
        }
        Ok(())
    }

    pub(crate) fn resumed(&self) -> (usize, usize) {
        (
            self.tls_resumed.load(Ordering::Relaxed),
            self.tls_full.load(Ordering::Relaxed) + self.tls_resumed.load(Ordering::Relaxed),
        )
    }
}

pub(crate) struct OriginOptions {
    pub(crate) tls: Option<Arc<ServerConfig>>,
    pub(crate) bearer: Option<String>,
}

/// The origin's thread; stopped and joined on drop (its connections close with it).
pub(crate) struct Origin {
    pub(crate) addr: SocketAddr,
    pub(crate) stats: Arc<OriginStats>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) thread: Option<JoinHandle<()>>,
}

pub(crate) const LISTENER: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
pub(crate) const FIRST_CONN: usize = 2;

impl Origin {
    pub(crate) fn start(opts: OriginOptions, wire: Arc<Wire>) -> Res<Origin> {
        let std_listener =
            StdListener::bind("127.0.0.1:0").map_err(|e| format!("origin: bind: {e}"))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| format!("origin: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("origin: {e}"))?;
        let mut listener = mio::net::TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(|e| format!("origin: poll: {e}"))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| format!("origin: register: {e}"))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| format!("origin: {e}"))?);
        let stats = Arc::new(OriginStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut looper = OriginLoop {
            poll,
            listener,
            conns: Slab::new(),
            opts,
            wire,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            scratch: vec![0; 256 * 1024],
        };
        let thread = thread::Builder::new()
            .name("origin".into())
            .spawn(move || looper.run())
            .map_err(|e| format!("origin: spawn: {e}"))?;
        Ok(Origin {
            addr,
            stats,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    pub(crate) fn open(&self) -> usize {
        self.stats.open.load(Ordering::Relaxed)
    }

    pub(crate) fn sinks(&self) -> Vec<(usize, bool)> {
        self.stats
            .sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn wait_drained(&self, open_before: usize, what: &str) -> Res<()> {
        if upstream::wait_until(DRAIN_LIMIT, || self.open() <= open_before) {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} origin connections still open {DRAIN_LIMIT:?} after closing",
                self.open().saturating_sub(open_before)
            ))
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) struct OriginLoop {
    pub(crate) poll: Poll,
    pub(crate) listener: mio::net::TcpListener,
    pub(crate) conns: Slab<OConn>,
    pub(crate) opts: OriginOptions,
    pub(crate) wire: Arc<Wire>,
    pub(crate) stats: Arc<OriginStats>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) scratch: Vec<u8>,
}

pub(crate) enum Drive {
    Wait,
    Again,
    Done,
}

impl OriginLoop {
    pub(crate) fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut again: Vec<usize> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = if again.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stats
                    .problem(&self.stats.errors, format!("origin poll: {e}"));
                return;
            }
            let mut todo = std::mem::take(&mut again);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => todo.push(t - FIRST_CONN),
                }
            }
            todo.sort_unstable();
            todo.dedup();
            for key in todo {
                let Some(conn) = self.conns.get_mut(key) else {
                    continue;
                };
                let ctx = Ctx {
                    opts: &self.opts,
                    wire: &self.wire,
                    stats: &self.stats,
                };
                match conn.drive(&ctx, &mut self.scratch) {
                    Drive::Wait => {}
                    Drive::Again => again.push(key),
                    Drive::Done => {
                        let mut conn = self.conns.remove(key);
                        conn.finish();
                        let _ = self.poll.registry().deregister(&mut conn.sock);
                        self.stats.open.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    pub(crate) fn accept(&mut self) {
        // Bounded by the backlog: accept() ends in WouldBlock once it is empty.
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let tls = match &self.opts.tls {
                        Some(cfg) => match ServerConnection::new(Arc::clone(cfg)) {
                            Ok(c) => Some(Box::new(c)),
                            Err(e) => {
                                self.stats
                                    .problem(&self.stats.errors, format!("origin tls: {e}"));
                                continue;
                            }
                        },
                        None => None,
                    };
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key() + FIRST_CONN);
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(OConn {
                        sock,
                        tls,
                        phase: Phase::Head,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_pos: 0,
                    });
                    self.stats.open.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats
                        .problem(&self.stats.io_errors, format!("origin accept: {e}"));
                    return;
                }
            }
        }
    }
}

pub(crate) struct Ctx<'a> {
    pub(crate) opts: &'a OriginOptions,
    pub(crate) wire: &'a Wire,
    pub(crate) stats: &'a OriginStats,
}

#[derive(Debug)]
pub(crate) enum Phase {
    /// Reading the upgrade request.
    Head,
    /// Echoing every data frame.
    Echo,
    /// Writing `wire.down` from this offset.
    Stream { off: usize },
    /// Stream written (it ends with a close frame): waiting for the client's close reply.
    AwaitClose,
    /// Comparing what arrives with `wire.up`; `ok` until a byte differs.
    Sink { off: usize, ok: bool },
    /// The last bytes (close reply, HTTP error) are queued: flush, then close.
    Closing,
}

pub(crate) struct OConn {
    pub(crate) sock: mio::net::TcpStream,
    pub(crate) tls: Option<Box<ServerConnection>>,
    pub(crate) phase: Phase,
    /// Unparsed input: a partial request head or partial frames.
    pub(crate) inbuf: Vec<u8>,
    /// Output not yet written (plaintext under TLS).
    pub(crate) out: Vec<u8>,
    pub(crate) out_pos: usize,
}

pub(crate) enum Got {
    Data(usize),
    Eof,
    Blocked,
}

pub(crate) fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl OConn {
    /// Reads and writes until nothing moves (or the per-turn bound is hit).
    pub(crate) fn drive(&mut self, ctx: &Ctx, scratch: &mut [u8]) -> Drive {
        for _ in 0..DRIVE_LIMIT {
            let mut progress = match self.write_some(ctx.wire) {
                Ok(p) => p,
                Err(e) => return self.io_failed(ctx, &e),
            };
            if matches!(self.phase, Phase::Closing) && self.out_pos == self.out.len() {
                return Drive::Done;
            }
            if self.out.len() - self.out_pos < ORIGIN_OUT_LIMIT {
                match self.read_some(scratch) {
                    Ok(Got::Data(n)) => {
                        progress = true;
                        match self.handle(&scratch[..n], ctx) {
                            Ok(true) => return Drive::Done,
                            Ok(false) => {}
                            Err(what) => {
                                ctx.stats.problem(&ctx.stats.errors, what);
                                return Drive::Done;
                            }
                        }
                    }
                    Ok(Got::Eof) => {
                        if let Phase::Sink { off, .. } = self.phase {
                            ctx.stats
                                .sinks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((off, false));
                        }
                        return Drive::Done;
                    }
                    Ok(Got::Blocked) => {}
                    Err(e) => return self.io_failed(ctx, &e),
                }
            }
            if self.tls.as_ref().is_some_and(|t| t.wants_write()) {
                progress = true;
            }
            if !progress {
                return Drive::Wait;
            }
        }
        Drive::Again
    }

    pub(crate) fn io_failed(&mut self, ctx: &Ctx, e: &io::Error) -> Drive {
        ctx.stats.problem(
            &ctx.stats.io_errors,
            format!("origin connection in {:?}: {e}", self.phase),
        );
        Drive::Done
    }

    /// Best-effort TLS close_notify before the socket is dropped.
    pub(crate) fn finish(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut self.sock);
        }
    }

    pub(crate) fn read_some(&mut self, buf: &mut [u8]) -> io::Result<Got> {
        let Some(tls) = self.tls.as_mut() else {
            return match self.sock.read(buf) {
                Ok(0) => Ok(Got::Eof),
                Ok(n) => Ok(Got::Data(n)),
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    Ok(Got::Blocked)
                }
                Err(e) => Err(e),
            };
        };
        for _ in 0..DRIVE_LIMIT {
            match tls.reader().read(buf) {
                Ok(0) => return Ok(Got::Eof),
                Ok(n) => return Ok(Got::Data(n)),
                Err(e) if would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Got::Eof),
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(Got::Eof),
                Ok(_) => {
                    tls.process_new_packets().map_err(io::Error::other)?;
                }
                Err(e) if would_block(&e) => return Ok(Got::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Got::Blocked)
    }

    /// Writes queued output, then more of the stream. Returns whether anything moved.
    pub(crate) fn write_some(&mut self, wire: &Wire) -> io::Result<bool> {
        let mut progress = false;
        for _ in 0..DRIVE_LIMIT {
            if let Some(tls) = self.tls.as_mut() {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.sock) {
                        Ok(_) => progress = true,
                        Err(e) if would_block(&e) => return Ok(progress),
                        Err(e) => return Err(e),
                    }
                }
            }
            let src: &[u8] = if self.out_pos < self.out.len() {
                &self.out[self.out_pos..]
            } else if let Phase::Stream { off } = self.phase {
                &wire.down[off..(off + STREAM_CHUNK).min(wire.down.len())]
            } else {
                break;
            };
            let written = match self.tls.as_mut() {
                Some(tls) => tls.writer().write(src)?,
                None => match self.sock.write(src) {
                    Ok(n) => n,
                    Err(e) if would_block(&e) => return Ok(progress),
                    Err(e) => return Err(e),
                },
            };
            if written == 0 && self.tls.is_none() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            progress |= written > 0;
            if self.out_pos < self.out.len() {
                self.out_pos += written;
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                    if self.out.capacity() > 4096 {
                        self.out = Vec::new();
                    }
                }
            } else if let Phase::Stream { off } = &mut self.phase {
                *off += written;
                if *off == wire.down.len() {
                    self.phase = Phase::AwaitClose;
                }
            }
        }
        Ok(progress)
    }

    /// Handles bytes read; `Ok(true)` when the connection is finished.
    pub(crate) fn handle(&mut self, data: &[u8], ctx: &Ctx) -> Result<bool, String> {
        if let Phase::Head = self.phase {
            self.inbuf.extend_from_slice(data);
            let Some(consumed) = self.upgrade(ctx)? else {
                return Ok(false);
            };
            let rest = self.inbuf.split_off(consumed);
            self.inbuf = Vec::new();
            return if rest.is_empty() || matches!(self.phase, Phase::Closing) {
                Ok(false)
            } else {
                self.handle_upgraded(&rest, ctx)
            };
        }
        self.handle_upgraded(data, ctx)
    }

    /// Parses the request head; answers 101 (choosing the behaviour from the VMI name) or an
    /// HTTP error. Returns the head's length once it is complete.
    pub(crate) fn upgrade(&mut self, ctx: &Ctx) -> Result<Option<usize>, String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let consumed = match req.parse(&self.inbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.inbuf.len() < MAX_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err("origin: request head too large".into()),
            Err(e) => return Err(format!("origin: bad request head: {e}")),
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let path = req.path.unwrap_or("").to_string();
        let key = header("sec-websocket-key");
        let auth = header("authorization");
        let offers_kubevirt = header("sec-websocket-protocol").is_some_and(|p| {
            p.split(',')
                .any(|s| s.trim() == upstream::KUBEVIRT_SUBPROTOCOL)
        });
        if let Some(tls) = &self.tls {
            match tls.handshake_kind() {
                Some(HandshakeKind::Resumed) => &ctx.stats.tls_resumed,
                _ => &ctx.stats.tls_full,
            }
            .fetch_add(1, Ordering::Relaxed);
        }

        let bare = path.split('?').next().unwrap_or("");
        let vmi = bare
            .strip_prefix(KUBEVIRT_PREFIX)
            .and_then(|rest| rest.strip_suffix("/vnc"))
            .filter(|v| !v.is_empty() && !v.contains('/'));
        let refusal = match (&vmi, &key, &ctx.opts.bearer) {
            (None, _, _) => Some((
                "404 Not Found",
                format!("origin: not a KubeVirt VNC path: {path}"),
            )),
            (_, None, _) => Some((
                "400 Bad Request",
                "origin: no Sec-WebSocket-Key".to_string(),
            )),
            (_, _, Some(b)) if auth.as_deref() != Some(&format!("Bearer {b}")) => Some((
                "401 Unauthorized",
                format!("origin: wrong bearer on {path}"),
            )),
            _ => None,
        };
        if let Some((status, why)) = refusal {
            ctx.stats.problem(&ctx.stats.refused, why);
            let _ = write!(
                VecWriter(&mut self.out),
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            self.phase = Phase::Closing;
            return Ok(Some(consumed));
        }
        let (Some(vmi), Some(key)) = (vmi, key) else {
            unreachable!("refused above")
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let protocol = if offers_kubevirt {
            format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                upstream::KUBEVIRT_SUBPROTOCOL
            )
        } else {
            String::new()
        };
        let _ = write!(
            VecWriter(&mut self.out),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
        );
        self.phase = if vmi.starts_with("stream") {
            Phase::Stream { off: 0 }
        } else if vmi.starts_with("sink") {
            Phase::Sink { off: 0, ok: true }
        } else {
            Phase::Echo
        };
        ctx.stats.upgrades.fetch_add(1, Ordering::Relaxed);
        Ok(Some(consumed))
    }

    pub(crate) fn handle_upgraded(&mut self, mut data: &[u8], ctx: &Ctx) -> Result<bool, String> {
        match &mut self.phase {
            Phase::Sink { off, ok } => {
                let take = (ctx.wire.up.len() - *off).min(data.len());
                if *ok && data[..take] != ctx.wire.up[*off..*off + take] {
                    *ok = false;
                }
                *off += take;
                data = &data[take..];
                if data.is_empty() {
                    return Ok(false);
                }
            }
            Phase::Closing => return Ok(false),
            // A client speaking while the stream is still going out: it gave up; so do we.
            Phase::Stream { .. } => return Ok(true),
            _ => {}
        }
        self.inbuf.extend_from_slice(data);
        let mut pos = 0;
        let mut done = false;
        while let Some(h) = parse_head(&self.inbuf[pos..]) {
            if h.len > MAX_CLIENT_FRAME {
                return Err(format!("origin: client frame of {} bytes", h.len));
            }
            if self.inbuf.len() - pos < h.total() {
                break;
            }
            let Some(key) = h.mask else {
                return Err("origin: unmasked client frame".into());
            };
            let mut payload = self.inbuf[pos + h.header_len..pos + h.total()].to_vec();
            apply_mask(&mut payload, key);
            pos += h.total();
            match (h.opcode(), &self.phase) {
                (0x8, Phase::AwaitClose) => {
                    done = true;
                    break;
                }
                (0x8, phase) => {
                    if let Phase::Sink { off, ok } = phase {
                        let good = *ok && *off == ctx.wire.up.len();
                        ctx.stats
                            .sinks
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((*off, good));
                    }
                    payload.truncate(125);
                    push_frame(&mut self.out, 0x88, &payload, None);
                    self.phase = Phase::Closing;
                    break;
                }
                (0x9, _) => push_frame(&mut self.out, 0x8A, &payload, None),
                (0xA, _) => {}
                (0x0..=0x2, Phase::Echo) => push_frame(&mut self.out, h.b0, &payload, None),
                (op, phase) => {
                    return Err(format!("origin: unexpected opcode {op:#x} in {phase:?}"));
                }
            }
        }
        self.inbuf.drain(..pos);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 4096 {
            self.inbuf = Vec::new();
        }
        Ok(done)
    }
}

/// `write!` into a `Vec<u8>` without the io::Write error plumbing.
pub(crate) struct VecWriter<'a>(pub(crate) &'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
