//! A non-blocking socket as the session sees it: plain TCP, or TLS (rustls)
//! over TCP, with the readiness the proxy has seen but not yet used up.
//!
//! Both kinds offer the same three operations (read, write, flush) with the
//! same outcomes, so the relay does not care which one it pumps. TLS is a
//! rustls client towards a `wss://` upstream, a rustls server towards a
//! client when the listener speaks TLS (`TLS_CERT_FILE`). Under both
//! is a [`Transport`]: a mio `TcpStream` in the proxy, an in-memory socket in
//! the relay's unit tests (so partial writes and `WouldBlock` at every step
//! can be scripted). With TLS,
//! rustls' buffers are bounded (`set_buffer_limit`) so backpressure holds end
//! to end: a full TLS send buffer reads as `WouldBlock`, like a full socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::Connection;

use crate::tls_records::RecordEdges;

/// The byte stream under a [`Conn`]: non-blocking reads and writes
/// (`WouldBlock` when the kernel has nothing or takes nothing), a
/// half-close, and what a session asks of a socket while connecting.
pub(crate) trait Transport: Read + Write + Sized {
    /// Start a non-blocking connect.
    fn connect(addr: SocketAddr) -> io::Result<Self>;
    /// Register with the loop's poll.
    fn register(&mut self, registry: &Registry, token: Token, interest: Interest)
    -> io::Result<()>;
    /// The socket's pending error (how a failed connect is learnt).
    fn take_error(&self) -> io::Result<Option<io::Error>>;
    /// Disable Nagle's algorithm (small VNC messages go out at once).
    fn set_nodelay(&self) -> io::Result<()>;
    /// Send FIN: nothing more will be written (best effort).
    fn shutdown_write(&mut self);
    /// A write whose bytes may wait in the kernel for what follows at once
    /// (`MSG_MORE`): the caller sends its FIN next, which then leaves in the
    /// same segment as these bytes.
    fn write_before_fin(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
}

impl Transport for TcpStream {
    /// TCP_NODELAY: relayed messages are small and latency-bound.
    /// TCP_QUICKACK off (what HAProxy calls `tcp-smart-connect`), which must
    /// be set before the SYN-ACK comes: the last ACK of the three-way
    /// handshake is not sent on its own but rides on the first bytes we
    /// send (the upgrade request or the TLS ClientHello, written as soon as
    /// the connect completes; alone after 200 ms, TCP_DELACK_MAX, should
    /// nothing be written by then), so one segment fewer per session for the
    /// upstream to take, and on loopback for us to run its receive path.
    /// It changes nothing after that: taking the SYN-ACK, the kernel puts
    /// the socket back in quick-ACK mode (`tcp_enter_quickack_mode`).
    /// Both options are best effort, as mio's connect sets neither.
    fn connect(addr: SocketAddr) -> io::Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        let _ = socket.set_tcp_nodelay(true);
        let _ = socket.set_tcp_quickack(false);
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(socket.into()))
    }
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        registry.register(self, token, interest)
    }
    fn take_error(&self) -> io::Result<Option<io::Error>> {
        TcpStream::take_error(self)
    }
    fn set_nodelay(&self) -> io::Result<()> {
        TcpStream::set_nodelay(self, true)
    }
    fn shutdown_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn write_before_fin(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_MORE holds a last partial segment back until the next send,
        // and close() or shutdown() tack the FIN onto it (tcp_send_fin): one
        // segment, one wake-up of the peer, one ACK, where a separate FIN
        // costs each twice. MSG_NOSIGNAL as std's own send: a gone peer is an
        // EPIPE error, not a signal.
        socket2::SockRef::from(&*self).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    }
}

/// The result of one read or write.
pub(crate) enum Io {
    Done(usize),
    WouldBlock,
    Eof,
    Failed(io::Error),
}

/// What one readiness event said about a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN (or a reset) has arrived, possibly behind data.
    pub read_closed: bool,
    /// The socket has a pending error (a refused connect, a reset).
    pub error: bool,
}

impl Readiness {
    pub fn of(event: &mio::event::Event) -> Self {
        let error = event.is_error();
        let read_closed = event.is_read_closed();
        Readiness {
            // Errors and hang-ups count as both: the next read or write
            // reports what happened.
            readable: event.is_readable() || read_closed || error,
            writable: event.is_writable() || event.is_write_closed() || error,
            read_closed,
            error,
        }
    }
}

/// A socket and the readiness the proxy has seen but not yet used up.
#[derive(Debug)]
pub(crate) struct Conn<S = TcpStream> {
    pub stream: S,
    tls: Option<Box<Connection>>,
    /// The socket may have bytes to read (edge-triggered readiness: set by an
    /// event, cleared only when a read would block).
    pub readable: bool,
    /// The socket may accept bytes.
    pub writable: bool,
    /// An event reported the peer's FIN or a reset. Until then a read that
    /// returns less than asked for has emptied the socket, and the kernel
    /// raises a new event for anything that arrives later (new data, or the
    /// FIN), so no read is spent just to see `EAGAIN`. Once the FIN is
    /// known to be queued, reading goes on until it is seen.
    pub read_closed: bool,
    /// An event reported an error on the socket (e.g. a refused connect).
    pub error_seen: bool,
    /// A read of the socket itself returned 0 (the peer's FIN, TLS or not)
    /// or failed: nothing more will come from it.
    pub input_ended: bool,
    /// A plain read emptied the socket after its FIN was known to be queued
    /// (`read_closed`, no error): the next read would return 0, so it need
    /// not be spent.
    drained_to_fin: bool,
    /// Bytes went out with `write_before_fin` and no write or FIN since:
    /// the kernel may still hold them for the FIN.
    held_for_fin: bool,
    /// rustls may hold decrypted bytes not yet read out (so the connection
    /// is readable even though the socket is drained).
    tls_plaintext: bool,
    /// rustls reported the end of the TLS stream: every later read says so
    /// again, with no event to wait for (the socket's FIN was read with the
    /// last records, and the kernel will not report it twice).
    tls_ended: bool,
    /// Where the TLS records read from the socket end (see `tls_records`).
    edges: RecordEdges,
    /// A read of the socket brought bytes, ever: the peer has said something.
    heard: bool,
}

/// The most plaintext one TLS record carries (RFC 8446 5.1, RFC 5246 6.2.1).
pub(crate) const TLS_RECORD_PLAINTEXT: usize = 16 << 10;

/// Room a read of decrypted bytes needs so that rustls keeps none of them:
/// a whole record's plaintext, plus small records that one of its 4 KiB
/// socket reads may complete with it.
const TLS_READ_ROOM: usize = TLS_RECORD_PLAINTEXT + (4 << 10);

/// The socket under TLS as rustls reads it, each read ending at the end of
/// the record in progress when `align` asks (the reader's buffer is nearly
/// full: see `tls_records`).
struct RecordReader<'a, S> {
    stream: &'a mut S,
    edges: &'a mut RecordEdges,
    align: bool,
}

impl<S: Read> Read for RecordReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let take = match self.edges.to_record_end() {
            Some(end) if self.align => end.min(buf.len()),
            _ => buf.len(),
        };
        let n = self.stream.read(&mut buf[..take])?;
        self.edges.saw(&buf[..n]);
        Ok(n)
    }
}

/// A socket with nothing to read yet: a rustls read from it does nothing
/// but let rustls give back the buffer it keeps for records in progress,
/// which it does only on a read that finds that buffer empty.
struct NothingYet;

impl Read for NothingYet {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl<S: Transport> Conn<S> {
    /// A plain connection.
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            tls: None,
            readable: false,
            writable: false,
            read_closed: false,
            error_seen: false,
            input_ended: false,
            drained_to_fin: false,
            held_for_fin: false,
            tls_plaintext: false,
            tls_ended: false,
            edges: RecordEdges::default(),
            heard: false,
        }
    }

    /// The same connection with TLS (a rustls client or server) over it,
    /// keeping the readiness seen so far; the handshake runs as the
    /// connection is read and written.
    pub fn into_tls(self, tls: impl Into<Connection>, buffer_limit: usize) -> Self {
        let mut tls = tls.into();
        tls.set_buffer_limit(Some(buffer_limit));
        Conn {
            tls: Some(Box::new(tls)),
            ..self
        }
    }

    /// Take in what an event said.
    pub fn note(&mut self, r: Readiness) {
        self.readable |= r.readable;
        self.writable |= r.writable;
        self.read_closed |= r.read_closed;
        self.error_seen |= r.error;
    }

    /// True when a read may return data without waiting for an event.
    pub fn can_read(&self) -> bool {
        self.readable || self.tls_plaintext || self.tls_ended
    }

    /// One read of decrypted (or plain) bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> Io {
        if self.tls.is_none() {
            return self.read_socket(buf);
        }
        // Handshake records that met a full socket go out first: a session
        // waiting for the client's next flight only reads, and would
        // otherwise never send them (the writable event lands here too).
        if let Err(e) = self.flush_tls() {
            return Io::Failed(e);
        }
        // Bounded: each round reads TLS records from the socket or returns.
        // rustls reads at most 4 KiB a time, and a handshake flight may be
        // 64 KiB (a client's certificate chain): while handshaking enough
        // rounds for a whole flight, so that no caller waits for an event
        // that will not come while the flight sits in the socket.
        let rounds = if self.is_handshaking() { 32 } else { 8 };
        for _ in 0..rounds {
            let Some(tls) = self.tls.as_mut() else {
                return Io::WouldBlock;
            };
            // Drain what rustls already decrypted before reading more TLS:
            // its plaintext buffer is bounded and read_tls will not overfill it.
            match tls.reader().read(buf) {
                Ok(0) if !buf.is_empty() => {
                    self.tls_ended = true;
                    return Io::Eof;
                }
                Ok(n) => {
                    self.tls_plaintext = n == buf.len();
                    return Io::Done(n);
                }
                Err(e) if would_block(&e) => self.tls_plaintext = false,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.tls_ended = true;
                    return Io::Eof;
                }
                Err(e) => return Io::Failed(e),
            }
            if !self.readable {
                return Io::WouldBlock;
            }
            // Near the end of the caller's buffer, read no further than the
            // record in progress, so that should the caller stop here, it
            // stops on a boundary (see `tls_records`).
            let mut socket = RecordReader {
                stream: &mut self.stream,
                edges: &mut self.edges,
                align: buf.len() < 2 * TLS_READ_ROOM,
            };
            match tls.read_tls(&mut socket) {
                Ok(n) => {
                    self.heard |= n > 0;
                    if n == 0 {
                        // TCP ended: rustls now reports the end, after any
                        // plaintext it still holds, on the next round.
                        self.readable = false;
                        self.input_ended = true;
                    }
                    if let Err(e) = tls.process_new_packets() {
                        // Send the alert rustls queued, best effort.
                        let _ = tls.write_tls(&mut self.stream);
                        return Io::Failed(io::Error::other(e));
                    }
                }
                Err(e) if would_block(&e) => {
                    self.readable = false;
                    return Io::WouldBlock;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Io::Failed(e),
            }
            // Handshake messages and alerts produced by reading go out now.
            if let Err(e) = self.flush_tls() {
                return Io::Failed(e);
            }
        }
        // Out of rounds with records still coming: stay readable.
        self.tls_plaintext = true;
        Io::WouldBlock
    }

    /// Plaintext rustls has already decrypted, without reading the socket:
    /// 0 when there is none (or no TLS). The end of the stream, or an error,
    /// is left for the next `read` to report.
    pub fn take_decrypted(&mut self, buf: &mut [u8]) -> usize {
        let Some(tls) = self.tls.as_mut() else {
            return 0;
        };
        // `tls_plaintext` says whether a read may return at once: more
        // plaintext, or the end waiting to be told.
        match tls.reader().read(buf) {
            Ok(0) => {
                self.tls_plaintext = !buf.is_empty();
                0
            }
            Ok(n) => {
                self.tls_plaintext = n == buf.len();
                n
            }
            Err(e) => {
                self.tls_plaintext = !would_block(&e);
                0
            }
        }
    }

    /// rustls runs over the socket.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The free bytes a buffer needs for a read into it: with TLS, room for
    /// whatever rustls may hand over at once (else rustls keeps the rest),
    /// within `capacity`; without, a byte.
    pub fn room_to_read(&self, capacity: usize) -> usize {
        if self.tls.is_some() {
            TLS_READ_ROOM.min(capacity)
        } else {
            1
        }
    }

    /// The caller stops reading for a while (its buffer is full): with TLS,
    /// if the last read ended on a record boundary, let rustls give back
    /// the buffer it keeps for a record in progress (17 KiB once a full
    /// record went through it; 4 KiB after).
    pub fn pause_reading(&mut self) {
        if let Some(tls) = self.tls.as_mut()
            && self.edges.at_boundary()
        {
            let _ = tls.read_tls(&mut NothingYet);
        }
    }

    /// True when rustls holds nothing read from the socket: no plaintext
    /// not yet taken, no part of a record (for the unit tests).
    #[cfg(test)]
    pub fn tls_keeps_nothing_read(&mut self) -> bool {
        let nothing_decrypted = self.tls.as_mut().is_none_or(|t| {
            t.process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() == 0)
        });
        nothing_decrypted && self.edges.at_boundary()
    }

    /// One read of the socket itself, bypassing TLS (for input that is
    /// only dropped), with the short-read rule of plain reads.
    pub fn read_socket(&mut self, buf: &mut [u8]) -> Io {
        let io = plain_read(&mut self.stream, &mut self.readable, self.read_closed, buf);
        match io {
            Io::Done(n) => {
                self.heard |= n > 0;
                self.drained_to_fin = n < buf.len() && self.read_closed && !self.error_seen;
            }
            Io::Eof | Io::Failed(_) => self.input_ended = true,
            Io::WouldBlock => {}
        }
        io
    }

    /// True once a read of the socket brought bytes.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// True when the socket holds nothing but the peer's FIN (see
    /// `drained_to_fin`); always false with TLS, whose end is rustls' to say.
    pub fn drained_to_fin(&self) -> bool {
        self.drained_to_fin && self.tls.is_none()
    }

    /// One write of plaintext. With TLS, `Done(n)` means rustls took `n`
    /// bytes; they reach the wire as the socket accepts them (see `flush`).
    pub fn write(&mut self, buf: &[u8]) -> Io {
        if self.tls.is_none() {
            let io = plain_write(&mut self.stream, &mut self.writable, buf);
            // An ordinary send pushes out whatever was held before it.
            if matches!(io, Io::Done(_)) {
                self.held_for_fin = false;
            }
            return io;
        }
        if let Err(e) = self.flush_tls() {
            return Io::Failed(e);
        }
        let Some(tls) = self.tls.as_mut() else {
            return Io::WouldBlock;
        };
        let n = match tls.writer().write(buf) {
            Ok(n) => n,
            Err(e) => return Io::Failed(e),
        };
        if let Err(e) = self.flush_tls() {
            return Io::Failed(e);
        }
        if n == 0 { Io::WouldBlock } else { Io::Done(n) }
    }

    /// A write of the last bytes before a FIN the caller sends right after
    /// (shutdown or close, in the same pass): plain TCP may then send them
    /// in one segment with the FIN. With TLS the same as `write`.
    pub fn write_before_fin(&mut self, buf: &[u8]) -> Io {
        if self.tls.is_some() {
            return self.write(buf);
        }
        let io = plain_io(|| self.stream.write_before_fin(buf), &mut self.writable);
        if matches!(io, Io::Done(_)) {
            self.held_for_fin = true;
        }
        io
    }

    /// Closing needs a [`shutdown_write`](Self::shutdown_write) first:
    /// bytes written with `write_before_fin` may still wait in the kernel
    /// for a FIN, or TLS owes the peer its close_notify (RFC 8446 §6.1:
    /// sent before closing the write side).
    pub fn owes_shutdown(&self) -> bool {
        self.held_for_fin || self.tls.is_some()
    }

    /// The FIN is not coming in this pass after all: send what the kernel
    /// holds. Setting TCP_NODELAY (already set) pushes the pending segments
    /// out (Linux: `tcp_push_pending_frames`); nothing to do, and no system
    /// call, when nothing is held.
    pub fn push_held(&mut self) {
        if std::mem::take(&mut self.held_for_fin) {
            let _ = self.stream.set_nodelay();
        }
    }

    /// True when bytes accepted earlier still wait to reach the socket.
    pub fn has_pending_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Push buffered TLS records to the socket while it accepts them
    /// (nothing to do, and no system call, without TLS or when none wait).
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }

    fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        // Bounded: each round either writes bytes or stops.
        for _ in 0..64 {
            if !tls.wants_write() || !self.writable {
                return Ok(());
            }
            match tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if would_block(&e) => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Say goodbye (TLS close_notify, best effort) and shut the write side.
    pub fn shutdown_write(&mut self) {
        self.held_for_fin = false;
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.flush_tls();
        }
        self.stream.shutdown_write();
    }

    /// True while the TLS handshake has not completed.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }
}

fn plain_read(
    stream: &mut impl Read,
    readable: &mut bool,
    read_closed: bool,
    buf: &mut [u8],
) -> Io {
    // EINTR is retried once; a second one is left for the next pass.
    for _ in 0..2 {
        match stream.read(buf) {
            Ok(0) => return Io::Eof,
            Ok(n) => {
                // A short read took everything the socket held (see
                // `Conn::read_closed`): wait for the next event.
                if n < buf.len() && !read_closed {
                    *readable = false;
                }
                return Io::Done(n);
            }
            Err(e) if would_block(&e) => {
                *readable = false;
                return Io::WouldBlock;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Io::Failed(e),
        }
    }
    Io::WouldBlock
}

fn plain_write(stream: &mut impl Write, writable: &mut bool, buf: &[u8]) -> Io {
    plain_io(|| stream.write(buf), writable)
}

fn plain_io(mut write: impl FnMut() -> io::Result<usize>, writable: &mut bool) -> Io {
    for _ in 0..2 {
        match write() {
            Ok(0) => return Io::Failed(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Io::Done(n),
            Err(e) if would_block(&e) => {
                *writable = false;
                return Io::WouldBlock;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Io::Failed(e),
        }
    }
    Io::WouldBlock
}
