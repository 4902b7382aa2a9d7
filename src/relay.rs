//! An established session's relay: both pipes, the closing rules (what one
//! side is told when the other ends), keepalive, and the timers that end a
//! relay (token expiry, a closing handshake nobody finishes). It sees the two
//! connections only as [`Conn`]s over a [`Transport`], so the rules are
//! unit-tested over in-memory sockets (the tests at the end of this file).
//!
//! The session (src/session.rs) owns one `Relay` while it is `Relaying`. It
//! drives it with [`Relay::pump`] (every message), [`Relay::step`] (when a
//! source ended: closing rules, and whether the relay is over) and
//! [`Relay::on_timer`] (its deadline passed), and turns it into a [`Report`]
//! when it leaves the state. It never reaches into a pipe.

use std::time::{Duration, Instant};

use log::debug;

use crate::buffer::BufferPool;
use crate::config::Config;
use crate::conn::{Conn, Transport};
use crate::events::SessionEnd;
use crate::frame::{Direction, PING_PAYLOAD_LEN};
use crate::pipe::{Pipe, SourceEnd};

/// Rounds of reads and writes one pipe may do per drive before yielding to
/// other sessions.
pub(crate) const PUMP_BUDGET: usize = 16;

/// Which end of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// The relay's durations, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timers {
    /// How long a started closing handshake may take.
    pub close_timeout: Duration,
    /// Ping a side silent this long (zero: no keepalive).
    pub ping_interval: Duration,
    /// Give up on a side silent this long.
    pub peer_timeout: Duration,
}

impl Timers {
    pub fn of(config: &Config) -> Self {
        Timers {
            close_timeout: config.close_timeout,
            ping_interval: config.ping_interval,
            peer_timeout: config.peer_timeout,
        }
    }
}

/// What one [`Relay::step`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Still relaying; `more` asks for another drive soon (a budget ran out).
    Relaying { more: bool },
    /// Both directions are finished and flushed. `clean`: a close frame went
    /// each way (the session may skip lingering, see `Session::finish_closed`).
    Over { clean: bool },
}

/// What a passed deadline did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fired {
    /// Nothing was due (or only the next keepalive check was planned).
    Nothing,
    /// The closing handshake took longer than the close timeout: the relay
    /// is over, without the peers' last words.
    ClosingTimedOut,
    /// This side sent nothing, not even a pong, for PEER_TIMEOUT: the other
    /// side is being told (close 1001).
    PeerGone(Side),
    /// This side took nothing of what waits for it for PEER_TIMEOUT (it
    /// does not read): the other side is being told (close 1001).
    PeerStalled(Side),
    /// The token expired (CLOSE_ON_TOKEN_EXPIRY): the client is being told
    /// (1008), the upstream gets a normal goodbye.
    TokenExpired,
}

/// What a finished relay leaves for the access log and `/metrics`.
#[derive(Debug)]
pub(crate) struct Report {
    pub end: SessionEnd,
    pub outcome: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Close codes each side sent (1005 for a close frame without a code).
    pub client_close: Option<u16>,
    pub upstream_close: Option<u16>,
    /// Times a direction's buffer filled up and reading paused.
    pub pauses: u64,
}

/// Both directions of an established session and the rules between them.
#[derive(Debug)]
pub(crate) struct Relay {
    /// For log lines.
    id: u64,
    /// Client to upstream.
    up: Pipe,
    /// Upstream to client.
    down: Pipe,
    timers: Timers,
    /// When the token expires (the relay ends then), if it is to.
    expires: Option<Instant>,
    /// When a started closing handshake is given up.
    closing_by: Option<Instant>,
    /// When keepalive next looks at the two sides.
    keepalive_at: Option<Instant>,
    /// When the proxy last pinged the client, and the upstream.
    ping_client: Option<Instant>,
    ping_upstream: Option<Instant>,
    /// The proxy is shutting down and ended this relay.
    going_away: bool,
    /// How the session ended, once something other than the pipes decided
    /// it (a timeout, the token's expiry, a shutdown).
    end: Option<SessionEnd>,
    /// What the log line says, once decided.
    outcome: Option<String>,
}

impl Relay {
    /// A relay starting `now`; `expires` is when the token's grant ends.
    pub fn new(
        id: u64,
        max_frame: u64,
        timers: Timers,
        now: Instant,
        expires: Option<Instant>,
    ) -> Self {
        Relay {
            id,
            up: Pipe::new(Direction::ClientToUpstream, max_frame, now),
            down: Pipe::new(Direction::UpstreamToClient, max_frame, now),
            timers,
            expires,
            closing_by: None,
            keepalive_at: (!timers.ping_interval.is_zero()).then(|| now + timers.ping_interval),
            ping_client: None,
            ping_upstream: None,
            going_away: false,
            end: None,
            outcome: None,
        }
    }

    /// Put the handshake's leftovers in front: `accept` (the client's 101)
    /// and what the upstream sent behind its own 101 go to the client;
    /// `early`, what the client sent before its 101, goes upstream.
    pub fn preload(
        &mut self,
        pool: &mut BufferPool,
        accept: &[u8],
        after_upstream_head: &[u8],
        early: &[u8],
    ) {
        self.down.preload(pool, accept, after_upstream_head);
        self.up.preload(pool, &[], early);
    }

    /// When the relay next needs [`on_timer`](Self::on_timer).
    pub fn deadline(&self) -> Option<Instant> {
        [self.expires, self.closing_by, self.keepalive_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Pump both directions as far as they go. While both sources deliver
    /// (every relayed message) that is all there is to do: `Some(more)`,
    /// where `more` asks for another drive soon (a budget ran out). `None`
    /// when a source has ended: [`step`](Self::step) must run. Leaves the
    /// timers as they were.
    #[inline]
    pub fn pump<S: Transport>(
        &mut self,
        client: &mut Conn<S>,
        upstream: &mut Conn<S>,
        pool: &mut BufferPool,
        now: Instant,
    ) -> Option<bool> {
        let (up, down) = (&mut self.up, &mut self.down);
        // An event concerns one socket and usually one direction: the other
        // pipe is only pumped when it has something to do.
        let a = up.pump_if_due(client, upstream, pool, PUMP_BUDGET, now, false);
        // Once the client's side is finished with its close gone upstream and
        // nothing left for the upstream's socket, no closing rule can give
        // `up` new work: `down` finishing ends the relay, and every way out
        // of it (`Session::leave_relaying`) sends the client its FIN at once,
        // so the last bytes may wait for it (should the relay go on after
        // all, `Session::relay` pushes them). Not so upstream: after the
        // client's close answer the session may linger without a FIN to the
        // upstream, waiting for the server to close first.
        let fin_follows = up.finished() && up.close_sent() && !upstream.has_pending_output();
        let b = down.pump_if_due(upstream, client, pool, PUMP_BUDGET, now, fin_follows);
        if let Some(e) = a.dst_failed {
            // Writing to the upstream failed: it is gone.
            debug!("session {}: upstream write failed: {e}", self.id);
            up.abort(pool);
            down.source_failed(e.to_string());
        }
        if let Some(e) = b.dst_failed {
            debug!("session {}: client write failed: {e}", self.id);
            down.abort(pool);
            up.source_failed(e.to_string());
        }
        if up.ended() || down.ended() {
            return None;
        }
        Some(up.has_pending_work(client, upstream) || down.has_pending_work(upstream, client))
    }

    /// Pump both directions and run the closing rules.
    pub fn step<S: Transport>(
        &mut self,
        client: &mut Conn<S>,
        upstream: &mut Conn<S>,
        pool: &mut BufferPool,
        now: Instant,
    ) -> Step {
        if let Some(more) = self.pump(client, upstream, pool, now) {
            return Step::Relaying { more };
        }
        // Each pump moves its direction as far as it can; only the closing
        // rules (a close to inject, a pipe aborted) give the pumps new work.
        for _ in 0..4 {
            if !apply_closing_rules(&mut self.up, &mut self.down, pool) {
                break;
            }
            self.pump(client, upstream, pool, now);
        }
        let (up, down) = (&self.up, &self.down);
        // With TLS, bytes rustls accepted must reach the wire before the
        // session may end.
        let flushed = !client.has_pending_output() && !upstream.has_pending_output();
        if up.finished() && down.finished() && flushed {
            // A timeout named earlier says more than the pipes' ends (both
            // "stopped by the proxy" then).
            if self.outcome.is_none() {
                self.outcome = Some(if self.going_away {
                    "going away (shutdown)".to_owned()
                } else {
                    describe_end(up, down)
                });
            }
            self.end.get_or_insert_with(|| end_of(up, down));
            let clean = matches!(up.end(), Some(SourceEnd::Close(_)))
                && matches!(down.end(), Some(SourceEnd::Close(_)));
            return Step::Over { clean };
        }
        let more = up.has_pending_work(client, upstream) || down.has_pending_work(upstream, client);
        if (up.ended() || down.ended()) && self.closing_by.is_none() {
            self.start_closing(now);
        }
        Step::Relaying { more }
    }

    /// The closing handshake has begun: it gets the close timeout, and
    /// keepalive stops (a side that is leaving need not be pinged).
    fn start_closing(&mut self, now: Instant) {
        self.closing_by = Some(now + self.timers.close_timeout);
        self.keepalive_at = None;
    }

    /// The deadline passed: do what is due. The closing timer comes first;
    /// keepalive and the token's expiry only act while nobody is closing, so
    /// neither renames an ending already under way.
    pub fn on_timer(&mut self, now: Instant, pool: &mut BufferPool) -> Fired {
        if self.closing_by.is_some_and(|t| t <= now) {
            self.outcome = Some("closing handshake timed out".into());
            // A violation stays a violation even when the violator never
            // answers the close it was sent.
            let violation = [self.up.end(), self.down.end()]
                .iter()
                .any(|e| matches!(e, Some(SourceEnd::Violation(_))));
            self.end.get_or_insert(if violation {
                SessionEnd::Violation
            } else {
                SessionEnd::Timeout
            });
            return Fired::ClosingTimedOut;
        }
        if self.closing_by.is_some() {
            // Closing is under way and bounded by its own timer: whatever
            // else was due no longer matters.
            self.expires = None;
            self.keepalive_at = None;
            return Fired::Nothing;
        }
        if self.keepalive_at.is_some_and(|t| t <= now) {
            match self.keepalive(now, pool) {
                Keepalive::Next(at) => self.keepalive_at = Some(at),
                Keepalive::Gone(side, stalled) => {
                    self.outcome = Some(if stalled {
                        format!("{side} timed out (takes no bytes)")
                    } else {
                        format!("{side} timed out (no answer to pings)")
                    });
                    self.end = Some(SessionEnd::Timeout);
                    self.start_closing(now);
                    return if stalled {
                        Fired::PeerStalled(side)
                    } else {
                        Fired::PeerGone(side)
                    };
                }
            }
        }
        if self.expires.is_some_and(|t| t <= now) {
            // The grant ends with the token: the page learns why (1008), the
            // upstream gets a normal goodbye.
            self.end = Some(SessionEnd::TokenExpired);
            self.down.finish_with_close(1008, "token expired");
            self.up.finish_with_close(1000, "token expired");
            self.expires = None;
            self.start_closing(now);
            return Fired::TokenExpired;
        }
        Fired::Nothing
    }

    /// The shutdown grace is over: both sides get 1001 `going away` at a
    /// frame boundary, then the closing rules as usual.
    pub fn go_away(&mut self, now: Instant) {
        self.down.finish_with_close(1001, "going away");
        self.up.finish_with_close(1001, "going away");
        self.going_away = true;
        // Unless a side had already timed out or the token expired, this
        // is how the session ends, however its closing goes.
        self.end.get_or_insert(SessionEnd::Shutdown);
        self.expires = None;
        self.start_closing(now);
    }

    /// The proxy stops at once (`Handle::shutdown`, a second signal): the
    /// relay is cut where it stands, and that is a shutdown, not a failure
    /// of either side.
    pub fn cut_by_shutdown(&mut self) {
        self.end.get_or_insert(SessionEnd::Shutdown);
    }

    /// Ping sides that have been silent for PING_INTERVAL (the pong comes
    /// back through the other pipe and is taken out of the stream there),
    /// and give up on a side silent for PEER_TIMEOUT, or that took nothing
    /// of what waits for it for as long (it may talk, but it does not read,
    /// and its buffer would be held for good): the other side gets close
    /// 1001.
    fn keepalive(&mut self, now: Instant, pool: &mut BufferPool) -> Keepalive {
        let Timers {
            ping_interval: interval,
            peer_timeout: timeout,
            ..
        } = self.timers;
        let mut next = now + interval;
        for side in [Side::Client, Side::Upstream] {
            let (from, toward, last_ping) = match side {
                Side::Client => (&mut self.up, &mut self.down, &mut self.ping_client),
                Side::Upstream => (&mut self.down, &mut self.up, &mut self.ping_upstream),
            };
            let silence = from.silence(now);
            let stalled = toward.stalled_since();
            if silence >= timeout
                || stalled.is_some_and(|t| now.saturating_duration_since(t) >= timeout)
            {
                // The side still there is told; the silent one just loses TCP.
                toward.abort(pool);
                from.finish_with_close(1001, timed_out(side));
                return Keepalive::Gone(side, silence < timeout);
            }
            if let Some(t) = stalled {
                next = next.min(t + timeout);
            }
            let due = last_ping
                .is_none_or(|p| p < from.last_rx() || now.saturating_duration_since(p) >= interval);
            if silence >= interval && due {
                // A ping while another is unanswered carries its payload:
                // the scanner awaits one payload, and a pong answering the
                // first must not pass for the peer's own (found in review).
                let payload = from.awaited_pong().unwrap_or_else(ping_payload);
                if toward.queue_ping(payload) {
                    from.expect_pong(payload);
                    *last_ping = Some(now);
                }
            }
            let ping_at = if silence < interval {
                from.last_rx() + interval
            } else {
                last_ping.unwrap_or(now) + interval
            };
            next = next.min(ping_at).min(from.last_rx() + timeout);
        }
        Keepalive::Next(next.max(now + Duration::from_millis(10)))
    }

    /// Frame bytes relayed so far: (client to upstream, upstream to client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes(), self.down.bytes())
    }

    /// The relay is over, however it ended: what it counted, with the
    /// buffers given back to the pool (a pipe dropped with its buffer would
    /// leak the pool's count, and a bulk buffer's slot with it).
    pub fn finish(mut self, pool: &mut BufferPool) -> Report {
        let (up, down) = (&self.up, &self.down);
        let end = self.end.unwrap_or_else(|| end_of(up, down));
        let outcome = self.outcome.take().unwrap_or_else(|| {
            if self.going_away {
                // Cut off at the end of a drain with its close frames still
                // on their way.
                "going away (shutdown; closing cut short)".to_owned()
            } else {
                format!("{} (closed by the proxy)", describe_end(up, down))
            }
        });
        let report = Report {
            end,
            outcome,
            bytes_up: up.bytes(),
            bytes_down: down.bytes(),
            client_close: close_code(up),
            upstream_close: close_code(down),
            pauses: self.up.take_pauses() + self.down.take_pauses(),
        };
        self.up.release(pool);
        self.down.release(pool);
        report
    }
}

/// What a keepalive check found.
enum Keepalive {
    /// Both sides are alive; look again then.
    Next(Instant),
    /// This side sent nothing, not even a pong, for PEER_TIMEOUT; or took
    /// nothing of what waits for it (the `bool`) for as long.
    Gone(Side, bool),
}

/// The reason the other side is given when `side` stopped answering.
fn timed_out(side: Side) -> &'static str {
    match side {
        Side::Client => "client timed out",
        Side::Upstream => "upstream timed out",
    }
}

fn ping_payload() -> [u8; PING_PAYLOAD_LEN] {
    let mut p = *b"kvp-ping";
    // Unpredictable payloads make a peer's own pong unlikely to match ours.
    let _ = getrandom::fill(&mut p);
    p
}

/// When one direction ends, decide what the other side is told. Returns true
/// if anything changed.
fn apply_closing_rules(up: &mut Pipe, down: &mut Pipe, pool: &mut BufferPool) -> bool {
    // While both sources deliver (every relayed message) no rule applies.
    if !up.ended() && !down.ended() {
        return false;
    }
    let snapshot = |up: &Pipe, down: &Pipe| {
        (
            up.close_sent(),
            down.close_sent(),
            up.end().cloned(),
            down.end().cloned(),
        )
    };
    let before = snapshot(up, down);
    match up.end().cloned() {
        // The client's close frame goes upstream as is; its answer comes back
        // through `down` on its own.
        None | Some(SourceEnd::Close(_)) | Some(SourceEnd::Stopped) => {}
        Some(SourceEnd::Eof) | Some(SourceEnd::Failed(_)) => {
            // The client is gone: nothing more can reach it.
            down.abort(pool);
            up.finish_with_close(1001, "client went away");
        }
        Some(SourceEnd::Violation(v)) if v.in_close_frame() => {
            // A broken close frame: the client was leaving anyway; it gets
            // the code its close deserves at once, the upstream a goodbye.
            down.finish_with_close(v.close_code(), v.reason());
            up.finish_with_close(1001, "client broke the protocol");
        }
        Some(SourceEnd::Violation(v)) => {
            // As with a direct connection: the upstream is told (with the
            // violation's code), what it still sends - replies to the
            // client's valid frames - reaches the client, and the client's
            // last frame is the proxy's close with that code, in place of
            // the upstream's close answer.
            if up.finish_with_close(v.close_code(), v.reason()) {
                down.replace_close_with(v.close_code(), v.reason());
            }
        }
    }
    // If the upstream vanishes after a client violation, that violation is
    // still what the client is told.
    let client_fault = match up.end() {
        Some(SourceEnd::Violation(v)) if !v.in_close_frame() => Some((v.close_code(), v.reason())),
        _ => None,
    };
    match down.end().cloned() {
        None | Some(SourceEnd::Close(_)) | Some(SourceEnd::Stopped) => {}
        Some(SourceEnd::Eof) => {
            up.abort(pool);
            let (code, reason) = client_fault.unwrap_or((1001, "upstream closed the connection"));
            down.finish_with_close(code, reason);
        }
        Some(SourceEnd::Failed(_)) => {
            up.abort(pool);
            let (code, reason) = client_fault.unwrap_or((1011, "upstream connection failed"));
            down.finish_with_close(code, reason);
        }
        Some(SourceEnd::Violation(v)) => {
            up.finish_with_close(v.close_code(), v.reason());
            down.finish_with_close(1011, "upstream broke the protocol");
        }
    }
    before != snapshot(up, down)
}

/// The close code a pipe's source sent, if it sent a close frame.
fn close_code(p: &Pipe) -> Option<u16> {
    match p.end() {
        Some(SourceEnd::Close(code)) => Some(code.unwrap_or(1005)),
        _ => None,
    }
}

/// How a relay ended, from how its pipes did, when nothing decided it before.
fn end_of(up: &Pipe, down: &Pipe) -> SessionEnd {
    let ends = [up.end(), down.end()];
    if ends
        .iter()
        .any(|e| matches!(e, Some(SourceEnd::Violation(_))))
    {
        SessionEnd::Violation
    } else if ends.iter().all(|e| matches!(e, Some(SourceEnd::Close(_)))) {
        SessionEnd::Normal
    } else {
        SessionEnd::Abnormal
    }
}

fn describe_end(up: &Pipe, down: &Pipe) -> String {
    use std::fmt::Write;
    // Written into one string: this runs once per session.
    let side = |out: &mut String, end: Option<&SourceEnd>| {
        let _ = match end {
            Some(SourceEnd::Close(Some(code))) => write!(out, "close {code}"),
            Some(SourceEnd::Close(None)) => write!(out, "close"),
            Some(SourceEnd::Eof) => write!(out, "dropped the connection"),
            Some(SourceEnd::Failed(e)) => write!(out, "failed ({e})"),
            Some(SourceEnd::Violation(v)) => write!(out, "protocol violation ({v})"),
            Some(SourceEnd::Stopped) | None => write!(out, "stopped by the proxy"),
        };
    };
    let mut out = String::with_capacity(64);
    out.push_str("client ");
    side(&mut out, up.end());
    out.push_str(", upstream ");
    side(&mut out, down.end());
    out
}

/// The relay over in-memory sockets: every partial write, `WouldBlock` and
/// timer the tests script happens exactly where they say, which real sockets
/// cannot promise. (The same rules over real sockets: tests/relay.rs,
/// tests/backpressure.rs, tests/shutdown.rs.)
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io::{self, Read, Write};
    use std::rc::Rc;

    use crate::conn::Readiness;

    /// One end of an in-memory connection as the proxy sees it.
    #[derive(Debug, Default)]
    pub(crate) struct Wire {
        /// What the peer sent, not yet read by the proxy.
        pub inbox: VecDeque<u8>,
        /// The peer closed its side (read returns 0 once `inbox` is empty).
        pub eof: bool,
        /// What the proxy wrote.
        pub outbox: Vec<u8>,
        /// Bytes the peer accepts before a write would block.
        pub room: usize,
        /// Most bytes one write call takes (0: no limit).
        pub max_write: usize,
        /// The proxy shut its write side.
        pub fin: bool,
        /// Bytes written with `write_before_fin` that a real socket may hold
        /// back until the next write or the FIN.
        pub held: bool,
        /// How many writes were `write_before_fin`.
        pub before_fin_writes: usize,
        /// Reads that returned 0 (the peer's FIN seen).
        pub eof_reads: usize,
        /// Write calls that took bytes.
        pub writes: usize,
    }

    #[derive(Debug, Clone)]
    pub(crate) struct Mem(pub Rc<RefCell<Wire>>);

    impl Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut w = self.0.borrow_mut();
            if w.inbox.is_empty() {
                return if w.eof {
                    w.eof_reads += 1;
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(w.inbox.len());
            for (b, v) in buf.iter_mut().zip(w.inbox.drain(..n)) {
                *b = v;
            }
            Ok(n)
        }
    }

    impl Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut w = self.0.borrow_mut();
            let cap = if w.max_write == 0 {
                usize::MAX
            } else {
                w.max_write
            };
            let n = buf.len().min(w.room).min(cap);
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            w.room -= n;
            w.writes += 1;
            w.outbox.extend_from_slice(&buf[..n]);
            // A write without MSG_MORE pushes out whatever was held.
            w.held = false;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    thread_local! {
        /// The sockets the next `Mem::connect` calls return, in order (a
        /// session's upstream, prepared by the test).
        pub(crate) static DIALS: RefCell<VecDeque<Mem>> = RefCell::default();
    }

    impl Transport for Mem {
        fn connect(_: std::net::SocketAddr) -> io::Result<Self> {
            DIALS
                .with(|d| d.borrow_mut().pop_front())
                .ok_or_else(|| io::ErrorKind::ConnectionRefused.into())
        }
        fn register(
            &mut self,
            _: &mio::Registry,
            _: mio::Token,
            _: mio::Interest,
        ) -> io::Result<()> {
            Ok(())
        }
        fn take_error(&self) -> io::Result<Option<io::Error>> {
            Ok(None)
        }
        fn set_nodelay(&self) -> io::Result<()> {
            // As Linux does when TCP_NODELAY is set: held bytes go out.
            self.0.borrow_mut().held = false;
            Ok(())
        }
        fn shutdown_write(&mut self) {
            let mut w = self.0.borrow_mut();
            w.fin = true;
            w.held = false;
        }
        fn write_before_fin(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.write(buf)?;
            let mut w = self.0.borrow_mut();
            w.held = true;
            w.before_fin_writes += 1;
            Ok(n)
        }
    }

    impl Mem {
        /// A connection whose peer takes everything, with no limit per write.
        pub(crate) fn open() -> (Mem, Rc<RefCell<Wire>>) {
            let wire = Rc::new(RefCell::new(Wire {
                room: usize::MAX,
                ..Wire::default()
            }));
            (Mem(wire.clone()), wire)
        }
    }

    /// A whole frame as a peer sends it (`mask`: from a client), built by
    /// frame.rs's test builder.
    pub(crate) fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        crate::frame::tests::frame(true, opcode, mask, payload)
    }

    const KEY: [u8; 4] = [1, 2, 3, 4];

    fn close_payload(code: u16) -> Vec<u8> {
        code.to_be_bytes().to_vec()
    }

    /// The frames in `bytes` (opcode, unmasked payload), and what is left
    /// of an unfinished one.
    pub(crate) fn frames(mut bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, usize) {
        let mut out = Vec::new();
        loop {
            if bytes.len() < 2 {
                return (out, bytes.len());
            }
            let masked = bytes[1] & 0x80 != 0;
            let (len, mut at) = match bytes[1] & 0x7f {
                126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 if bytes.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&bytes[2..10]);
                    (u64::from_be_bytes(l) as usize, 10)
                }
                126 | 127 => return (out, bytes.len()),
                n => (n as usize, 2),
            };
            let key = if masked {
                if bytes.len() < at + 4 {
                    return (out, bytes.len());
                }
                at += 4;
                Some([bytes[at - 4], bytes[at - 3], bytes[at - 2], bytes[at - 1]])
            } else {
                None
            };
            if bytes.len() < at + len {
                return (out, bytes.len());
            }
            let payload = bytes[at..at + len]
                .iter()
                .enumerate()
                .map(|(i, b)| key.map_or(*b, |k| b ^ k[i % 4]))
                .collect();
            out.push((bytes[0] & 0x0f, payload));
            bytes = &bytes[at + len..];
        }
    }

    /// A relay between two in-memory peers, with a clock the test moves.
    struct Rig {
        relay: Relay,
        client: Conn<Mem>,
        upstream: Conn<Mem>,
        /// The client's side of its connection, and the upstream's.
        c: Rc<RefCell<Wire>>,
        u: Rc<RefCell<Wire>>,
        pool: BufferPool,
        now: Instant,
    }

    const TIMERS: Timers = Timers {
        close_timeout: Duration::from_secs(5),
        ping_interval: Duration::ZERO,
        peer_timeout: Duration::from_secs(60),
    };

    impl Rig {
        /// A rig whose relay pings after 1 s of silence and gives a
        /// side up after `peer_timeout`.
        fn with_keepalive(buffer: usize, peer_timeout: Duration) -> Self {
            let mut rig = Rig::new(buffer, None);
            let timers = Timers {
                ping_interval: Duration::from_secs(1),
                peer_timeout,
                ..TIMERS
            };
            rig.relay = Relay::new(7, 1 << 20, timers, rig.now, None);
            rig
        }

        /// The client answers every ping it got since frame `seen` of its
        /// outbox; `seen` moves past them. Returns the pings it got in all.
        fn client_answers_pings(&mut self, seen: &mut usize) -> usize {
            let out = self.c.borrow().outbox.clone();
            let (got, _) = frames(&out);
            for (op, payload) in &got[*seen..] {
                if *op == 9 {
                    self.client_sends(&frame(10, payload, Some(KEY)));
                }
            }
            *seen = got.len();
            got.iter().filter(|(op, _)| *op == 9).count()
        }

        /// Buffers of `buffer` bytes; the token expires after `expires_in`.
        fn new(buffer: usize, expires_in: Option<Duration>) -> Self {
            let now = Instant::now();
            let (c, u) = (Mem::open().1, Mem::open().1);
            let conn = |w: &Rc<RefCell<Wire>>| {
                let mut conn = Conn::new(Mem(w.clone()));
                conn.note(Readiness {
                    readable: true,
                    writable: true,
                    ..Readiness::default()
                });
                conn
            };
            Rig {
                relay: Relay::new(7, 1 << 20, TIMERS, now, expires_in.map(|d| now + d)),
                client: conn(&c),
                upstream: conn(&u),
                c,
                u,
                pool: BufferPool::new(buffer, 4),
                now,
            }
        }

        /// The client sends `bytes` (and the proxy gets a readable event).
        fn client_sends(&mut self, bytes: &[u8]) {
            self.c.borrow_mut().inbox.extend(bytes);
            self.client.note(Readiness {
                readable: true,
                ..Readiness::default()
            });
        }

        fn upstream_sends(&mut self, bytes: &[u8]) {
            self.u.borrow_mut().inbox.extend(bytes);
            self.upstream.note(Readiness {
                readable: true,
                ..Readiness::default()
            });
        }

        /// The peer makes `room` bytes of space (and a writable event).
        fn client_reads(&mut self, room: usize) {
            self.c.borrow_mut().room = room;
            self.client.note(Readiness {
                writable: true,
                ..Readiness::default()
            });
        }

        fn upstream_reads(&mut self, room: usize) {
            self.u.borrow_mut().room = room;
            self.upstream.note(Readiness {
                writable: true,
                ..Readiness::default()
            });
        }

        /// Drive as the loop does, until the relay waits for an event (or
        /// is over); bounded.
        fn run(&mut self) -> Step {
            for _ in 0..10_000 {
                let step = self.relay.step(
                    &mut self.client,
                    &mut self.upstream,
                    &mut self.pool,
                    self.now,
                );
                if step != (Step::Relaying { more: true }) {
                    return step;
                }
            }
            panic!("the relay never settled");
        }

        fn advance(&mut self, by: Duration) -> Fired {
            self.now += by;
            self.relay.on_timer(self.now, &mut self.pool)
        }

        fn to_client(&self) -> (Vec<(u8, Vec<u8>)>, usize) {
            frames(&self.c.borrow().outbox)
        }

        fn to_upstream(&self) -> (Vec<(u8, Vec<u8>)>, usize) {
            frames(&self.u.borrow().outbox)
        }

        fn finish(self) -> (Report, BufferPool) {
            let mut pool = self.pool;
            let report = self.relay.finish(&mut pool);
            (report, pool)
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const BINARY: u8 = 2;
    const CLOSE: u8 = 8;

    /// Two keepalive pings unanswered (the first sat behind a backlog):
    /// the pongs to both are the proxy's, and neither crosses the relay.
    /// The second ping used to take a fresh payload and the scanner then
    /// awaited that one only, so the pong to the first went to the upstream.
    #[test]
    fn pongs_to_two_unanswered_pings_are_both_taken_out() {
        let mut rig = Rig::with_keepalive(1024, Duration::from_secs(30));
        rig.upstream_sends(&frame(BINARY, b"a", None));
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        rig.upstream_sends(&frame(BINARY, b"b", None));
        rig.run();
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        rig.upstream_sends(&frame(BINARY, b"c", None));
        rig.run();
        let pings: Vec<Vec<u8>> = rig
            .to_client()
            .0
            .into_iter()
            .filter(|(op, _)| *op == 9)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(pings.len(), 2, "two pings unanswered");
        for p in &pings {
            rig.client_sends(&frame(10, p, Some(KEY)));
        }
        rig.client_sends(&frame(BINARY, b"after", Some(KEY)));
        rig.run();
        // (The proxy's own pings to the upstream aside.)
        let (to_upstream, _) = rig.to_upstream();
        let relayed: Vec<_> = to_upstream.into_iter().filter(|(op, _)| *op != 9).collect();
        assert_eq!(
            relayed,
            vec![(BINARY, b"after".to_vec())],
            "pongs to the proxy's own pings reached the upstream"
        );
    }

    /// Both peers take one byte per write call: every frame, the 101 head
    /// and the handshake leftovers still arrive whole and in order, and a
    /// close handshake through it ends the relay cleanly.
    #[test]
    fn a_partial_write_at_every_step_loses_and_reorders_nothing() {
        let mut rig = Rig::new(64, None);
        rig.c.borrow_mut().max_write = 1;
        rig.u.borrow_mut().max_write = 1;
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let leftover = frame(BINARY, b"RFB 003.008\n", None);
        let early = frame(BINARY, b"early", Some(KEY));
        rig.relay.preload(&mut rig.pool, head, &leftover, &early);
        let a = pattern(300, 1);
        let b = pattern(70, 2);
        rig.client_sends(&[frame(BINARY, &a, Some(KEY)), frame(BINARY, &b, Some(KEY))].concat());
        rig.upstream_sends(&frame(BINARY, &a, None));
        assert_eq!(rig.run(), Step::Relaying { more: false });

        let client_bytes = rig.c.borrow().outbox.clone();
        assert!(client_bytes.starts_with(head), "the 101 head comes first");
        let (to_client, partial) = frames(&client_bytes[head.len()..]);
        assert_eq!(partial, 0);
        assert_eq!(
            to_client,
            vec![(BINARY, b"RFB 003.008\n".to_vec()), (BINARY, a.clone())]
        );
        let (to_upstream, partial) = rig.to_upstream();
        assert_eq!(partial, 0);
        assert_eq!(
            to_upstream,
            vec![(BINARY, b"early".to_vec()), (BINARY, a), (BINARY, b)]
        );

        rig.client_sends(&frame(CLOSE, &close_payload(1000), Some(KEY)));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(
            rig.to_upstream().0.last().unwrap(),
            &(CLOSE, close_payload(1000))
        );
        rig.upstream_sends(&frame(CLOSE, &close_payload(1000), None));
        assert_eq!(rig.run(), Step::Over { clean: true });
        let (to_client, _) = frames(&rig.c.borrow().outbox[head.len()..]);
        assert_eq!(to_client.last().unwrap(), &(CLOSE, close_payload(1000)));
        let (report, pool) = rig.finish();
        assert_eq!(report.end, SessionEnd::Normal);
        assert_eq!(
            (report.client_close, report.upstream_close),
            (Some(1000), Some(1000))
        );
        // Frame bytes as they went: early 5 + 6, 300 + 8, 70 + 6, close 2 + 6.
        assert_eq!(report.bytes_up, 11 + 308 + 76 + 8);
        assert_eq!(pool.in_use(), 0, "every buffer went back to the pool");
    }

    /// A destination that takes nothing (`WouldBlock`) stops the reading of
    /// its source once the buffer is full, each way; what waits is
    /// delivered once it takes bytes again.
    #[test]
    fn would_block_on_either_side_pauses_its_source_and_resumes() {
        for blocked in [Side::Client, Side::Upstream] {
            let mut rig = Rig::new(64, None);
            let data = pattern(1_000, 3);
            match blocked {
                Side::Upstream => {
                    rig.upstream_reads(0);
                    rig.client_sends(&frame(BINARY, &data, Some(KEY)));
                }
                Side::Client => {
                    rig.client_reads(0);
                    rig.upstream_sends(&frame(BINARY, &data, None));
                }
            }
            assert_eq!(rig.run(), Step::Relaying { more: false });
            let source = match blocked {
                Side::Upstream => rig.c.clone(),
                Side::Client => rig.u.clone(),
            };
            // Backpressure: one buffer read, the rest left in the peer's
            // socket for TCP flow control.
            let waiting = source.borrow().inbox.len();
            assert!(
                waiting >= 1_000 - 64,
                "{blocked}: read only {waiting} short"
            );
            // The other direction still flows.
            match blocked {
                Side::Upstream => rig.upstream_sends(&frame(BINARY, b"down", None)),
                Side::Client => rig.client_sends(&frame(BINARY, b"up", Some(KEY))),
            }
            assert_eq!(rig.run(), Step::Relaying { more: false });
            match blocked {
                Side::Upstream => assert_eq!(rig.to_client().0, vec![(BINARY, b"down".to_vec())]),
                Side::Client => assert_eq!(rig.to_upstream().0, vec![(BINARY, b"up".to_vec())]),
            }
            // Room again, in small steps (each a writable event).
            for _ in 0..100 {
                match blocked {
                    Side::Upstream => rig.upstream_reads(50),
                    Side::Client => rig.client_reads(50),
                }
                rig.run();
            }
            let (got, partial) = match blocked {
                Side::Upstream => rig.to_upstream(),
                Side::Client => rig.to_client(),
            };
            assert_eq!((got, partial), (vec![(BINARY, data)], 0), "{blocked}");
            assert_eq!(source.borrow().inbox.len(), 0);
        }
    }

    /// The client's close frame arrives behind data the upstream cannot take
    /// yet: the upstream gets all the data, then the close, and nothing
    /// after it.
    #[test]
    fn a_close_arriving_during_backpressure_follows_the_data() {
        let mut rig = Rig::new(64, None);
        rig.upstream_reads(0);
        let data: Vec<Vec<u8>> = (0..5).map(|i| pattern(100, i)).collect();
        let mut sent: Vec<u8> = data
            .iter()
            .flat_map(|d| frame(BINARY, d, Some(KEY)))
            .collect();
        sent.extend(frame(CLOSE, &close_payload(1000), Some(KEY)));
        // Anything after a close frame is not relayed.
        sent.extend(frame(BINARY, b"after the close", Some(KEY)));
        rig.client_sends(&sent);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert!(rig.to_upstream().0.is_empty());
        for _ in 0..200 {
            rig.upstream_reads(7);
            rig.run();
        }
        let mut expected: Vec<(u8, Vec<u8>)> = data.into_iter().map(|d| (BINARY, d)).collect();
        expected.push((CLOSE, close_payload(1000)));
        assert_eq!(rig.to_upstream(), (expected, 0));
        rig.upstream_sends(&frame(CLOSE, &close_payload(1000), None));
        assert_eq!(rig.run(), Step::Over { clean: true });
        assert_eq!(rig.finish().0.end, SessionEnd::Normal);
    }

    /// The token expires while the client is not reading, in the middle of
    /// a large frame: the upstream is told at once (1000, its direction is
    /// at a frame boundary), the client gets the rest of the frame first,
    /// then 1008 "token expired". The session counts as expired.
    #[test]
    fn token_expiry_while_the_destination_is_blocked_waits_for_the_frame_boundary() {
        let mut rig = Rig::new(256, Some(Duration::from_secs(3)));
        assert_eq!(rig.relay.deadline(), Some(rig.now + Duration::from_secs(3)));
        let big = pattern(5_000, 9);
        rig.client_reads(100);
        rig.upstream_sends(&frame(BINARY, &big, None));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(rig.c.borrow().outbox.len(), 100, "blocked mid-frame");

        assert_eq!(rig.advance(Duration::from_secs(3)), Fired::TokenExpired);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let (to_upstream, _) = rig.to_upstream();
        assert_eq!(to_upstream.len(), 1);
        assert_eq!(to_upstream[0].0, CLOSE);
        assert_eq!(&to_upstream[0].1[..2], &1000u16.to_be_bytes());
        assert_eq!(&to_upstream[0].1[2..], b"token expired");
        // The closing handshake is bounded from now on.
        assert_eq!(rig.relay.deadline(), Some(rig.now + TIMERS.close_timeout));

        for _ in 0..200 {
            rig.client_reads(64);
            rig.run();
        }
        let (to_client, partial) = rig.to_client();
        assert_eq!(partial, 0);
        assert_eq!(to_client.len(), 2, "the whole frame, then the close");
        assert_eq!(to_client[0], (BINARY, big));
        assert_eq!(&to_client[1].1[..2], &1008u16.to_be_bytes());
        // Both sides were told by the proxy: nothing more is relayed (their
        // answers are read and dropped while the session lingers).
        assert_eq!(rig.run(), Step::Over { clean: false });
        assert_eq!(rig.finish().0.end, SessionEnd::TokenExpired);
    }

    /// The client breaks the protocol while a large upstream frame is half
    /// delivered to it: the upstream gets 1002 at once; the frame in flight
    /// still reaches the client whole, and the client's last frame is the
    /// proxy's 1002 in place of the upstream's close answer.
    #[test]
    fn a_violation_mid_frame_lets_the_frame_in_flight_finish() {
        let mut rig = Rig::new(256, None);
        let big = pattern(3_000, 4);
        rig.client_reads(500);
        rig.upstream_sends(&frame(BINARY, &big, None));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        // An unmasked frame from a client is a protocol violation.
        rig.client_sends(&frame(BINARY, b"unmasked", None));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let (to_upstream, _) = rig.to_upstream();
        assert_eq!(to_upstream.len(), 1);
        assert_eq!(to_upstream[0].0, CLOSE);
        assert_eq!(&to_upstream[0].1[..2], &1002u16.to_be_bytes());

        rig.upstream_sends(&frame(CLOSE, &close_payload(1002), None));
        for _ in 0..200 {
            rig.client_reads(64);
            if rig.run() != (Step::Relaying { more: false }) {
                break;
            }
        }
        let (to_client, partial) = rig.to_client();
        assert_eq!(partial, 0);
        assert_eq!(to_client[0], (BINARY, big));
        assert_eq!(to_client.len(), 2);
        assert_eq!(to_client[1].0, CLOSE);
        assert_eq!(&to_client[1].1[..2], &1002u16.to_be_bytes());
        assert_eq!(rig.finish().0.end, SessionEnd::Violation);
    }

    /// A client that broke the protocol and never answers the close it was
    /// sent: the relay ends at the close timeout, and it is still counted
    /// as a violation, not a timeout.
    #[test]
    fn an_unanswered_close_after_a_violation_is_still_a_violation() {
        let mut rig = Rig::new(256, None);
        rig.client_sends(&frame(BINARY, b"unmasked", None));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        // The upstream never answers the 1002 either.
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        assert_eq!(rig.advance(TIMERS.close_timeout), Fired::ClosingTimedOut);
        let (report, _) = rig.finish();
        assert_eq!(report.end, SessionEnd::Violation);
        assert_eq!(report.outcome, "closing handshake timed out");
    }

    /// A drain's going-away is under way when the token's expiry comes: the
    /// session ended by the shutdown, and the expiry neither renames it nor
    /// sends a second close.
    #[test]
    fn token_expiry_does_not_rename_a_shutdown_under_way() {
        let mut rig = Rig::new(256, Some(Duration::from_secs(2)));
        // The client reads nothing: its going-away close waits.
        rig.client_reads(0);
        rig.relay.go_away(rig.now);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(rig.advance(Duration::from_secs(2)), Fired::Nothing);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        rig.client_reads(usize::MAX);
        assert_eq!(rig.run(), Step::Over { clean: false });
        let (to_client, _) = rig.to_client();
        assert_eq!(to_client.len(), 1, "one close frame: {to_client:?}");
        assert_eq!(&to_client[0].1[..2], &1001u16.to_be_bytes());
        assert_eq!(rig.finish().0.end, SessionEnd::Shutdown);
    }

    /// Keepalive while the upstream streams and the client says nothing
    /// but answers pings: the client is alive, however long it lasts.
    #[test]
    fn a_client_that_only_reads_and_answers_pings_stays_alive() {
        let mut rig = Rig::with_keepalive(4096, Duration::from_secs(3));
        let mut seen = 0;
        for round in 0..40u8 {
            rig.upstream_sends(&frame(BINARY, &pattern(10_000, round), None));
            rig.run();
            rig.client_answers_pings(&mut seen);
            rig.run();
            let fired = rig.advance(Duration::from_millis(500));
            assert!(
                !matches!(fired, Fired::PeerGone(_)),
                "round {round}: {fired:?}"
            );
            rig.run();
        }
    }

    /// A client that reads a continuous stream slowly (each writable
    /// event frees a little room) and answers every ping it gets. The ping
    /// must reach it at a frame boundary; it must not be declared gone.
    #[test]
    fn a_ping_is_not_starved_by_a_slow_reader_of_a_stream() {
        let mut rig = Rig::with_keepalive(1024, Duration::from_secs(3));
        // Far more than the client will read in the test: small whole frames.
        let stream: Vec<u8> = (0..4000u32)
            .flat_map(|i| frame(BINARY, &pattern(40, i as u8), None))
            .collect();
        rig.client_reads(0);
        rig.upstream_sends(&stream);
        rig.run();
        let mut seen = 0;
        for round in 0..16 {
            rig.client_reads(300);
            rig.run();
            let pings = rig.client_answers_pings(&mut seen);
            rig.run();
            let fired = rig.advance(Duration::from_millis(500));
            assert!(
                !matches!(fired, Fired::PeerGone(_)),
                "round {round}: {fired:?}; pings seen by the client: {pings}"
            );
        }
    }

    /// A keepalive ping to the client is queued, then the upstream
    /// sends a burst that takes exactly the pump budget to relay, the last
    /// read emptying its socket. The client's socket takes everything: the
    /// ping must go out in this drive, or the relay must ask for another
    /// one (`more`); no event will come for it.
    #[test]
    fn a_ping_due_when_the_budget_runs_out_is_not_stranded() {
        let mut rig = Rig::with_keepalive(1024, Duration::from_secs(30));
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        // 64-byte frames, 16 to a buffer: 15 full reads and a short one.
        let burst: Vec<u8> = (0..(15 * 16 + 8))
            .flat_map(|i: u32| frame(BINARY, &pattern(62, i as u8), None))
            .collect();
        rig.upstream_sends(&burst);
        let step = rig.run();
        let (got, partial) = rig.to_client();
        assert_eq!(partial, 0);
        let data = got.iter().filter(|(op, _)| *op == BINARY).count();
        let pings = got.iter().filter(|(op, _)| *op == 9).count();
        assert_eq!(data, 15 * 16 + 8);
        assert_eq!(
            pings, 1,
            "the ping was not written and the relay waits for an event ({step:?})"
        );
        // Then one frame that takes the whole budget (15 full reads and a
        // short one): its end, the only boundary, comes with the last read.
        rig.c.borrow_mut().outbox.clear();
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        rig.upstream_sends(&frame(BINARY, &pattern(15 * 1024 + 512 - 4, 3), None));
        let step = rig.run();
        let (got, partial) = rig.to_client();
        let ops: Vec<u8> = got.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            (ops, partial),
            (vec![BINARY, 9], 0),
            "the ping was not written and the relay waits for an event ({step:?})"
        );
    }

    /// The proxy's ping to the client is half written when the
    /// client's socket fills up; meanwhile the upstream sends a frame. Once
    /// the client reads again, the rest of the ping must come before that
    /// frame: nothing may be written inside the ping.
    #[test]
    fn a_half_written_ping_is_finished_before_more_data() {
        let mut rig = Rig::with_keepalive(1024, Duration::from_secs(30));
        // The client's socket takes 4 bytes, then is full.
        rig.client_reads(4);
        assert_eq!(rig.advance(Duration::from_secs(1)), Fired::Nothing);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(rig.c.borrow().outbox.len(), 4, "ping half written");
        let data = pattern(20, 5);
        rig.upstream_sends(&frame(BINARY, &data, None));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        rig.client_reads(usize::MAX);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let (got, partial) = rig.to_client();
        let ops: Vec<u8> = got.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            (ops, partial),
            (vec![9, BINARY], 0),
            "client stream: {:?}",
            rig.c.borrow().outbox
        );
        assert_eq!(got[1].1, data);
    }

    /// The upstream vanishes (EOF without a close frame): the client is told
    /// 1001, and the relay is over (nothing the client says can reach the
    /// upstream any more).
    #[test]
    fn an_upstream_gone_without_a_close_is_told_to_the_client() {
        let mut rig = Rig::new(256, None);
        rig.u.borrow_mut().eof = true;
        rig.upstream_sends(&[]);
        assert_eq!(rig.run(), Step::Over { clean: false });
        let (to_client, _) = rig.to_client();
        assert_eq!(&to_client[0].1[..2], &1001u16.to_be_bytes());
        assert_eq!(&to_client[0].1[2..], b"upstream closed the connection");
        assert_eq!(rig.finish().0.end, SessionEnd::Abnormal);
    }

    /// With the pool's memory taken (`RELAY_MEMORY_BYTES`): the 101 goes
    /// out through a buffer lent over the limit, into which nothing more is
    /// read; the source then waits for memory (reported to the loop, which
    /// queues the session), is not taken for silent meanwhile, and is read
    /// once a buffer frees.
    #[test]
    fn a_direction_waits_for_memory_and_reads_once_a_buffer_frees() {
        let mut rig = Rig::with_keepalive(64, Duration::from_secs(3));
        rig.pool = BufferPool::new(64, 4).with_limit(64);
        // The client has nothing to say: its socket is found empty first.
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let other = rig.pool.take(false).expect("another session's buffer");
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        rig.client_reads(0);
        rig.relay.preload(&mut rig.pool, head, &[], &[]);
        let data = pattern(40, 5);
        let sent = frame(BINARY, &data, None);
        rig.upstream_sends(&sent);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(
            rig.u.borrow().inbox.len(),
            sent.len(),
            "nothing read into the lent buffer"
        );
        assert_eq!(rig.pool.in_use(), 2);
        assert!(
            !rig.pool.take_refused(),
            "the lent buffer waits for the client, not for memory"
        );

        rig.client_reads(1 << 20);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(rig.c.borrow().outbox, head, "the 101 went, the data waits");
        assert_eq!(rig.pool.in_use(), 1, "the lent buffer went back");
        assert!(rig.pool.take_refused(), "the source waits for memory");
        let up = pattern(20, 6);
        rig.client_sends(&frame(BINARY, &up, Some(KEY)));
        assert_eq!(rig.run(), Step::Relaying { more: false });
        // Both sources wait for us: longer than the peer timeout is not
        // silence.
        assert_eq!(rig.advance(Duration::from_secs(4)), Fired::Nothing);
        assert_eq!(rig.u.borrow().inbox.len(), sent.len());
        assert!(rig.to_upstream().0.is_empty());

        rig.pool.put(other);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let (to_client, partial) = frames(&rig.c.borrow().outbox[head.len()..]);
        assert_eq!((to_client, partial), (vec![(BINARY, data)], 0));
        assert_eq!(rig.to_upstream(), (vec![(BINARY, up)], 0));
        let (_, pool) = rig.finish();
        assert_eq!(pool.in_use(), 0);
    }

    /// A client that keeps talking but reads nothing: what waits for it
    /// would hold its buffer for good (and, under RELAY_MEMORY_BYTES, keep
    /// others waiting). Taking nothing for PEER_TIMEOUT is gone, as silence
    /// is: the upstream gets close 1001.
    #[test]
    fn a_side_that_talks_but_takes_nothing_is_given_up_after_the_peer_timeout() {
        let mut rig = Rig::with_keepalive(1024, Duration::from_secs(3));
        rig.client_reads(0);
        rig.upstream_sends(&frame(BINARY, &pattern(4_000, 1), None));
        rig.run();
        let mut fired = Fired::Nothing;
        for round in 0..8u8 {
            rig.client_sends(&frame(BINARY, &[round], Some(KEY)));
            rig.run();
            fired = rig.advance(Duration::from_millis(500));
            if fired != Fired::Nothing {
                assert!(round >= 5, "given up after {round} rounds of 500 ms");
                break;
            }
        }
        assert_eq!(fired, Fired::PeerStalled(Side::Client));
        rig.run();
        let (to_upstream, _) = rig.to_upstream();
        let last = to_upstream.last().expect("frames to the upstream");
        assert_eq!(last.0, CLOSE);
        assert_eq!(&last.1[..2], &1001u16.to_be_bytes());
        assert_eq!(&last.1[2..], b"client timed out");
        let (report, pool) = rig.finish();
        assert_eq!(report.end, SessionEnd::Timeout);
        assert_eq!(report.outcome, "client timed out (takes no bytes)");
        assert_eq!(pool.in_use(), 0);
    }

    /// A handshake's leftovers ending inside a frame, in a buffer lent over
    /// the limit: once the rest is written, the start of a frame left in it
    /// waits until the buffer can be counted within the limit (another
    /// frees), then its rest is read and the frame arrives whole.
    #[test]
    fn the_start_of_a_frame_left_in_a_lent_buffer_is_read_on_once_it_fits_the_limit() {
        let mut rig = Rig::new(64, None);
        rig.pool = BufferPool::new(64, 4).with_limit(64);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let other = rig.pool.take(false).expect("another session's buffer");
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let data = pattern(40, 7);
        let whole = frame(BINARY, &data, None);
        rig.relay.preload(&mut rig.pool, head, &whole[..1], &[]);
        rig.upstream_sends(&whole[1..]);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(rig.c.borrow().outbox, head);
        assert!(rig.pool.take_refused(), "the rest waits for memory");
        assert_eq!(rig.pool.in_use(), 2);
        rig.pool.put(other);
        eprintln!(
            "before: {:?} readable {}",
            rig.relay.down,
            rig.upstream.can_read()
        );
        assert_eq!(rig.run(), Step::Relaying { more: false });
        eprintln!(
            "after: {:?} inbox {}",
            rig.relay.down,
            rig.u.borrow().inbox.len()
        );
        let (to_client, partial) = frames(&rig.c.borrow().outbox[head.len()..]);
        assert_eq!((to_client, partial), (vec![(BINARY, data)], 0));
        let (_, pool) = rig.finish();
        assert_eq!(pool.in_use(), 0);
    }

    /// Room in the pool, but another direction waits for memory: a new
    /// session's 101 buffer is lent all the same (the queue goes first),
    /// so nothing is read into it.
    #[test]
    fn a_new_session_does_not_read_ahead_of_a_direction_waiting_for_memory() {
        let mut rig = Rig::new(64, None);
        rig.pool = BufferPool::new(64, 4).with_limit(128);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        rig.pool.set_queue(1, false);
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        rig.client_reads(0);
        rig.relay.preload(&mut rig.pool, head, &[], &[]);
        let sent = frame(BINARY, &pattern(20, 8), None);
        rig.upstream_sends(&sent);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        assert_eq!(
            rig.u.borrow().inbox.len(),
            sent.len(),
            "nothing read ahead of the queue"
        );
        rig.pool.set_queue(0, false);
        rig.client_reads(1 << 20);
        assert_eq!(rig.run(), Step::Relaying { more: false });
        let (to_client, _) = frames(&rig.c.borrow().outbox[head.len()..]);
        assert_eq!(to_client.len(), 1);
    }
}
