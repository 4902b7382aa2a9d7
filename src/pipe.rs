//! One direction of an established session: bytes from a source socket,
//! through one fixed buffer, to a destination socket, with every frame
//! header checked on the way.
//!
//! Backpressure: a pipe reads only while its buffer has room. With mio's
//! edge-triggered readiness a socket that stays readable raises no new
//! event, so the pipe remembers `readable` itself and resumes reading as
//! soon as a write makes room; the kernel's socket buffers and TCP flow
//! control then push back on the sender. Memory per pipe is one buffer.
//! A pipe with no buffer that finds the pool's memory limit reached
//! (`RELAY_MEMORY_BYTES`) waits the same way, its source unread, until the
//! loop drives it again with a buffer free.

use std::io;
use std::time::Instant;

use crate::buffer::{Buffer, BufferPool};
use crate::conn::{Conn, Io, TLS_RECORD_PLAINTEXT, Transport};
use crate::frame::{
    Direction, FrameScanner, PING_PAYLOAD_LEN, ScanStop, Violation, close_frame, ping_frame,
};

/// A frame of the proxy's own (a ping or a close), written whole, once.
#[derive(Debug, Clone)]
struct Control {
    bytes: [u8; 131],
    len: usize,
    written: usize,
}

impl Control {
    fn started(&self) -> bool {
        self.written > 0
    }

    /// Write what is left; `Ok(true)` when something was written.
    fn write_to<S: Transport>(&mut self, dst: &mut Conn<S>) -> Result<bool, io::Error> {
        match dst.write(&self.bytes[self.written..self.len]) {
            Io::Done(n) => {
                self.written += n;
                Ok(true)
            }
            Io::WouldBlock | Io::Eof => Ok(false),
            Io::Failed(e) => Err(e),
        }
    }

    fn done(&self) -> bool {
        self.written == self.len
    }
}

/// Why a pipe's source stopped delivering frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceEnd {
    /// A close frame was relayed (the normal end); its code if it had one.
    Close(Option<u16>),
    /// TCP ended without a close frame.
    Eof,
    /// The socket failed.
    Failed(String),
    /// The source broke the protocol.
    Violation(Violation),
    /// The proxy stopped reading (the session is ending for another reason).
    Stopped,
}

/// Where a pipe's source is: one value, so no combination of flags can say
/// two things at once.
#[derive(Debug)]
enum Phase {
    /// Frames flow from the source to the destination.
    Flowing,
    /// Read only to the end of the frame in flight, then stop (so a frame of
    /// the proxy's own can follow).
    Stopping,
    /// The source delivers nothing more, and why.
    Ended(SourceEnd),
}

/// One direction of the relay.
#[derive(Debug)]
pub(crate) struct Pipe {
    dir: Direction,
    buf: Option<Buffer>,
    /// Bytes at the head of `buf` that are validated and may be written.
    ready: usize,
    scanner: FrameScanner,
    phase: Phase,
    /// A close frame of the proxy's own, written once `ready` is drained
    /// at a frame boundary after the source ended. Boxed, as is `ping`:
    /// a frame of the proxy's own is rare (a close at the end, a ping after
    /// a silence), and held inline the two took 300 of a pipe's 584 bytes
    /// in every open session, idle ones included.
    inject: Option<Box<Control>>,
    /// Replace the source's close frame with a close of the proxy's own
    /// (code, reason): set when the other side broke the protocol.
    replace_close: Option<(u16, &'static str)>,
    /// A ping of the proxy's own, written at the next frame boundary.
    ping: Option<Box<Control>>,
    /// Offset in `buf` of a frame boundary within the `ready` bytes (where a
    /// frame of the proxy's own may go).
    boundary: Option<usize>,
    /// When the source last delivered bytes.
    last_rx: Instant,
    /// A close frame went (or is going) to the destination.
    close_sent: bool,
    /// Frame bytes written to the destination.
    bytes: u64,
    /// Bytes still to be written that are not frames (the 101 head).
    uncounted: u64,
    /// Times reading paused for the destination (a full buffer, or TLS
    /// records waiting for its socket).
    pauses: u64,
    /// The source streams in bulk: take a bulk buffer when taking one. Set
    /// when the reads between two writes (one read, but for TLS) fill a
    /// regular buffer (with TLS, as far as reads go: see `pump`); cleared
    /// when they bring less than a quarter of one (interactive traffic
    /// again).
    bulk: bool,
    /// The source has bytes but the pool had no buffer for them: the loop
    /// queued this session and drives it again when one frees.
    starved: bool,
    /// The buffer was handed out over the pool's limit (a handshake's
    /// leftovers cannot wait): nothing more is read into it; once emptied it
    /// goes back, and reading takes a buffer within the limit. Emptied but
    /// for the start of a frame, that start moves into one.
    lent: bool,
    /// TLS towards the destination still holds records it took from this
    /// pipe (its socket is full): reading waits until they are on the wire,
    /// so those records take the place of the bytes they came from and
    /// buffer and records together stay within the buffer's size.
    behind_tls: bool,
    /// Free bytes the buffer needs for a read from the source
    /// (`Conn::room_to_read`): with TLS, a record's worth and more.
    room: usize,
    /// Since when bytes owed to the destination wait for it to take any
    /// (it reads nothing): keepalive gives up on a destination stalled for
    /// PEER_TIMEOUT, as on a silent one.
    stalled_since: Option<Instant>,
}

/// What one [`Pipe::pump`] did.
#[derive(Default)]
pub(crate) struct Pump {
    /// The destination failed while writing.
    pub dst_failed: Option<io::Error>,
}

impl Pipe {
    pub fn new(dir: Direction, max_frame: u64, now: Instant) -> Self {
        Pipe {
            dir,
            buf: None,
            ready: 0,
            scanner: FrameScanner::new(dir, max_frame),
            phase: Phase::Flowing,
            inject: None,
            replace_close: None,
            ping: None,
            boundary: None,
            last_rx: now,
            close_sent: false,
            bytes: 0,
            uncounted: 0,
            pauses: 0,
            bulk: false,
            starved: false,
            lent: false,
            behind_tls: false,
            room: 1,
            stalled_since: None,
        }
    }

    /// Put bytes in front of everything else: `raw` is written as is (the
    /// 101 response), `frames` is frame data that arrived with a handshake
    /// and is scanned like anything read later.
    pub fn preload(&mut self, pool: &mut BufferPool, raw: &[u8], frames: &[u8]) {
        if raw.is_empty() && frames.is_empty() {
            return;
        }
        if self.buf.is_none() {
            let (buf, lent) = pool.get_for_leftovers();
            self.buf = Some(buf);
            self.lent = lent;
        }
        let Some(buf) = self.buf.as_mut() else {
            return;
        };
        let taken = buf.push(raw) + buf.push(frames);
        // Config validation keeps the buffer larger than any handshake
        // leftover, so nothing is cut here.
        debug_assert_eq!(taken, raw.len() + frames.len());
        self.ready += raw.len();
        // The 101 head is not frame traffic: leave it out of `bytes`.
        self.uncounted = raw.len() as u64;
        // The end of a handshake head is where frames begin.
        self.boundary = Some(self.ready);
        self.scan_new();
    }

    /// Validate newly buffered bytes and extend `ready`.
    #[inline]
    fn scan_new(&mut self) {
        // The common case, small whole data frames (a VNC message, an
        // input event), in a few comparisons per frame.
        if let Some(buf) = self.buf.as_ref()
            && matches!(self.phase, Phase::Flowing)
            && let Some(n) = self.scanner.whole_data_frames(&buf.data()[self.ready..])
        {
            let front = self.front_boundary();
            self.ready += n;
            self.boundary = front.or(Some(self.ready));
            return;
        }
        self.scan_any();
    }

    /// [`scan_new`](Self::scan_new) for whatever the stream holds: partial
    /// and large frames, closes, the proxy's own pongs, a stop at a boundary.
    #[inline(never)]
    fn scan_any(&mut self) {
        let Some(buf) = self.buf.as_mut() else {
            return;
        };
        if matches!(self.phase, Phase::Ended(_)) {
            buf.truncate(self.ready);
            return;
        }
        // Each round either stops or removes one of our pongs (at least a
        // few bytes), so it ends.
        let scan = loop {
            let mut unscanned = &buf.data()[self.ready..];
            if matches!(self.phase, Phase::Stopping) {
                let rest = self.scanner.remaining();
                let cut = usize::try_from(rest).map_or(unscanned.len(), |r| r.min(unscanned.len()));
                unscanned = &unscanned[..cut];
            }
            let scan = self.scanner.scan(unscanned);
            if let Some(b) = self.scanner.last_boundary() {
                // `front_boundary`, spelled out: `buf` borrows `self.buf`.
                let ready = self.ready;
                self.boundary = self.boundary.filter(|x| *x <= ready).or(Some(ready + b));
            }
            match self.scanner.take_own_pong() {
                Some((at, len)) => {
                    self.ready += scan.forwardable;
                    buf.remove(self.ready + at - scan.forwardable, len);
                }
                None => break scan,
            }
        };
        let ready_before = self.ready;
        let mut replace = None;
        self.ready += scan.forwardable;
        match scan.stop {
            Some(ScanStop::Close { code }) if self.replace_close.is_some() => {
                // The source's close frame is the answer to a close the
                // proxy sent for the other side's violation: the destination
                // gets the proxy's own close (with that violation's code)
                // in its place.
                let start = ready_before + self.scanner.last_frame_start();
                self.ready = start;
                self.phase = Phase::Ended(SourceEnd::Close(code));
                replace = self.replace_close.take();
            }
            Some(ScanStop::Close { code }) => {
                self.phase = Phase::Ended(SourceEnd::Close(code));
                self.close_sent = true;
                // Nothing may follow a close frame, not even our ping.
                self.ping.take_if(|p| !p.started());
            }
            Some(ScanStop::Violation(v)) => self.phase = Phase::Ended(SourceEnd::Violation(v)),
            None if matches!(self.phase, Phase::Stopping) && self.scanner.at_boundary() => {
                self.phase = Phase::Ended(SourceEnd::Stopped);
            }
            None => {}
        }
        if matches!(self.phase, Phase::Ended(_)) {
            buf.truncate(self.ready);
        }
        if let Some((code, reason)) = replace {
            self.finish_with_close(code, reason);
        }
    }

    /// Stop relaying from the source at the next frame boundary and then send
    /// the destination a close frame of the proxy's own (unless a close frame
    /// already went that way).
    /// Returns false when a close frame already went (or is queued) that
    /// way: nothing more to say, and the source keeps its stopping rule.
    pub fn finish_with_close(&mut self, code: u16, reason: &'static str) -> bool {
        if self.close_sent {
            return false;
        }
        self.close_sent = true;
        let mask = match self.dir {
            Direction::ClientToUpstream => Some(random_mask()),
            Direction::UpstreamToClient => None,
        };
        let mut bytes = [0u8; 131];
        let len = close_frame(code, reason, mask, &mut bytes);
        self.inject = Some(Box::new(Control {
            bytes,
            len,
            written: 0,
        }));
        // No ping after a close; one already half written is finished first.
        self.ping.take_if(|p| !p.started());
        if !self.ended() {
            if self.scanner.at_boundary() {
                self.phase = Phase::Ended(SourceEnd::Stopped);
                if let Some(buf) = self.buf.as_mut() {
                    buf.truncate(self.ready);
                }
            } else {
                self.phase = Phase::Stopping;
            }
        }
        true
    }

    /// Stop relaying at once: nothing more is read and nothing unsent is kept
    /// (the destination is gone or being dropped).
    pub fn abort(&mut self, pool: &mut BufferPool) {
        if !self.ended() {
            self.phase = Phase::Ended(SourceEnd::Stopped);
        }
        self.inject = None;
        self.ping = None;
        self.ready = 0;
        self.give_back(pool);
    }

    /// True when the source has ended and everything owed to the destination
    /// has been written (or can never be).
    pub fn finished(&self) -> bool {
        self.ended() && self.ready == 0 && self.inject.is_none() && self.ping.is_none()
    }

    /// [`pump`](Self::pump), unless it certainly has nothing to do: the
    /// source cannot be read and nothing can be written (or given back).
    /// Inlined so that the idle direction of every event costs a few
    /// comparisons, not a call into the pump.
    ///
    /// `fin_follows`: should this pump write the last bytes this direction
    /// owes, `dst` gets its FIN in the same pass (the relay is over), so
    /// those bytes may wait for it and leave in one segment.
    #[inline(always)]
    pub fn pump_if_due<S: Transport>(
        &mut self,
        src: &mut Conn<S>,
        dst: &mut Conn<S>,
        pool: &mut BufferPool,
        budget: usize,
        now: Instant,
        fin_follows: bool,
    ) -> Pump {
        let readable = !self.ended() && src.can_read();
        let idle_buffer =
            self.buf.as_ref().is_some_and(Buffer::is_empty) && !dst.has_pending_output();
        if readable || (dst.writable && self.owes(dst)) || idle_buffer {
            self.pump(src, dst, pool, budget, now, fin_follows)
        } else {
            Pump::default()
        }
    }

    /// Move bytes from `src` to `dst` until neither can make progress or
    /// `budget` rounds are spent (so one busy session cannot starve the loop).
    #[inline(never)]
    fn pump<S: Transport>(
        &mut self,
        src: &mut Conn<S>,
        dst: &mut Conn<S>,
        pool: &mut BufferPool,
        budget: usize,
        now: Instant,
        fin_follows: bool,
    ) -> Pump {
        let mut out = Pump::default();
        let was_writable = dst.writable;
        // Bytes read since the buffer last went to the destination.
        let mut gathered = 0;
        for round in 0..budget {
            let mut moved = false;
            // TLS records accepted earlier go out as the socket allows.
            if dst.writable
                && dst.has_pending_output()
                && let Err(e) = dst.flush()
            {
                out.dst_failed = Some(e);
                return out;
            }
            // Read while there is room and the source is still delivering,
            // and TLS towards the destination holds none of what it took
            // (see `behind_tls`): a buffer's bytes and the records made of
            // them are never both held, so what a slow TLS reader costs stays
            // within the buffer, and within RELAY_MEMORY_BYTES.
            self.behind_tls = dst.has_pending_output();
            if self.behind_tls && !self.ended() && src.can_read() {
                self.pauses += 1;
            } else if !self.ended() && src.can_read() {
                if self.buf.is_none() {
                    self.buf = pool.take(self.bulk);
                    self.starved = self.buf.is_none();
                } else if self.lent && self.ready == 0 {
                    // Emptied but for the start of a frame: reading its
                    // rest needs the buffer counted within the limit.
                    self.lent = !pool.adopt();
                    self.starved = self.lent;
                }
                if let Some(buf) = &self.buf {
                    self.room = src.room_to_read(buf.capacity());
                }
                let waits = self.buf.as_ref().is_some_and(|b| self.waits_for_room(b));
                match self.buf.as_mut() {
                    // Waiting for memory (queued by the loop), or for the
                    // destination to take a buffer lent over the limit:
                    // paused as behind a full buffer, so a TLS source gives
                    // back its record buffer (17-20 KiB a waiting console
                    // kept).
                    None => src.pause_reading(),
                    Some(_) if self.lent => src.pause_reading(),
                    // Full, for this source: with TLS, a read needs room for
                    // all rustls may hand over, and the last one ended on a
                    // record boundary (see `tls_records`), so rustls keeps
                    // nothing of the stream while reading pauses. (But for
                    // a buffer under a record's plaintext whose last read
                    // went into less room, see `waits_for_room`: then
                    // rustls keeps the rest of that one record.)
                    Some(_) if waits => {
                        self.pauses += 1;
                        src.pause_reading();
                    }
                    Some(buf) => match src.read(buf.space()) {
                        Io::Done(n) => {
                            buf.fill(n);
                            let room_left = buf.free() >= self.room;
                            gathered += n;
                            moved = true;
                            self.last_rx = now;
                            self.scan_new();
                            // A TLS source hands over one record (16 KiB
                            // at most) a read: after a full one (a stream,
                            // not a message), while more may come at once
                            // and the next one has its room, read on and
                            // write once, not once a record. A plain read
                            // takes all the socket holds; after a short
                            // record, write first (reading on would put
                            // the read that finds the socket empty before
                            // the write, on a message's round trip); in
                            // the last round, write, so the budget always
                            // ends on a write. Not towards TLS: there it
                            // cost CPU per GiB (4 % and 9 % more with TLS
                            // on both sides, the bulk buffers that follow
                            // included), where towards a plain socket it
                            // saves 8-15 %.
                            let more = src.is_tls()
                                && !dst.is_tls()
                                && n >= TLS_RECORD_PLAINTEXT
                                && room_left
                                && src.can_read()
                                && round + 1 < budget;
                            if more {
                                continue;
                            }
                        }
                        Io::WouldBlock => {}
                        Io::Eof => self.end_source(SourceEnd::Eof),
                        Io::Failed(e) => self.end_source(SourceEnd::Failed(e.to_string())),
                    },
                }
                // Bulk: the reads since the last write filled a regular
                // buffer (not a small read topping up a buffer a slow
                // destination left full). With TLS, filled as far as reads
                // go, a read needing room for a record (45 KiB of 64), and
                // by more than one record (unless the buffer holds only
                // one), so that a single message does not switch a small
                // buffer to bulk.
                let regular = pool.regular_size();
                let whole = regular
                    .saturating_sub(self.room.saturating_sub(1))
                    .max((TLS_RECORD_PLAINTEXT + 1).min(regular));
                if gathered >= whole {
                    self.bulk = true;
                } else if gathered > 0 && gathered < regular / 4 {
                    self.bulk = false;
                }
                gathered = 0;
            }
            // Write what is validated; a pending ping goes in at the next
            // frame boundary, so data is written only up to it. A ping the
            // destination took in part is finished before anything else:
            // bytes written into it would corrupt the stream.
            let boundary = self.boundary_now();
            let ping_started = self.ping.as_ref().is_some_and(|p| p.started());
            let limit = match (&self.ping, boundary) {
                _ if ping_started => 0,
                (Some(_), Some(b)) => b,
                _ => self.ready,
            };
            if dst.writable
                && self.ping_can_go()
                && let Some(ping) = self.ping.as_mut()
            {
                match ping.write_to(dst) {
                    Ok(wrote) => moved |= wrote,
                    Err(e) => {
                        out.dst_failed = Some(e);
                        return out;
                    }
                }
                self.ping.take_if(|p| p.done());
            }
            // The source has ended and these are the last bytes owed.
            let last = fin_follows
                && self.ended()
                && limit == self.ready
                && self.inject.is_none()
                && self.ping.is_none();
            if let Some(buf) = self.buf.as_mut().filter(|_| dst.writable && limit > 0) {
                let data = &buf.data()[..limit];
                let io = if last {
                    dst.write_before_fin(data)
                } else {
                    dst.write(data)
                };
                match io {
                    Io::Done(n) => {
                        buf.consume(n);
                        self.ready -= n;
                        self.boundary = self.boundary.and_then(|b| b.checked_sub(n));
                        let counted = (n as u64).saturating_sub(self.uncounted);
                        self.uncounted = self.uncounted.saturating_sub(n as u64);
                        self.bytes += counted;
                        moved = true;
                    }
                    Io::WouldBlock | Io::Eof => {}
                    Io::Failed(e) => {
                        out.dst_failed = Some(e);
                        return out;
                    }
                }
            }
            let may_inject = dst.writable && self.ready == 0 && self.ended() && self.ping.is_none();
            if let Some(close) = self.inject.as_mut().filter(|_| may_inject) {
                if !self.scanner.at_boundary() {
                    // The source ended inside a frame: a frame of our own
                    // cannot follow without corrupting the stream.
                    self.inject = None;
                } else {
                    match close.write_to(dst) {
                        Ok(wrote) => moved |= wrote,
                        Err(e) => {
                            out.dst_failed = Some(e);
                            return out;
                        }
                    }
                    self.inject.take_if(|c| c.done());
                }
            }
            // An idle pipe gives its buffer back: idle sessions hold none.
            // Not while TLS still holds records made of its bytes: they
            // count as the buffer's until they are on the wire (else every
            // slow TLS reader could hold a buffer's worth of records outside
            // the pool's count, one session after another).
            if self.buf.as_ref().is_some_and(Buffer::is_empty) && !dst.has_pending_output() {
                self.give_back(pool);
            }
            if !moved {
                break;
            }
            // Another round would find nothing to do: the source is drained
            // (or ended), everything read went out and nothing of the
            // proxy's own is waiting. The usual end of a relayed message.
            let drained = self.ended() || !src.can_read();
            if drained && !self.owes(dst) {
                break;
            }
        }
        // Bytes wait for a destination that takes none: since when. A
        // destination found writable took bytes since it last blocked (its
        // readiness comes back when the peer makes room), so that ends it,
        // as does nothing owed.
        let owes = self.owes(dst);
        if was_writable || !owes {
            self.stalled_since = None;
        }
        if owes && !dst.writable {
            self.stalled_since.get_or_insert(now);
        }
        out
    }

    /// Something waits to go to `dst`: validated bytes, a frame of the
    /// proxy's own, or TLS records not yet on the wire.
    #[inline(always)]
    fn owes<S: Transport>(&self, dst: &Conn<S>) -> bool {
        self.ready > 0 || self.ping.is_some() || self.inject.is_some() || dst.has_pending_output()
    }

    /// Where a frame of the proxy's own may be written now (offset in the
    /// ready bytes), if anywhere.
    /// The boundary already known within the validated bytes. Kept when
    /// more are validated: the boundary nearest the write position is where
    /// a pending ping goes soonest, and a later one, replaced on every read,
    /// would starve the ping while a slow reader never catches up with a
    /// stream.
    fn front_boundary(&self) -> Option<usize> {
        self.boundary.filter(|b| *b <= self.ready)
    }

    fn boundary_now(&self) -> Option<usize> {
        if self.ready == 0 && self.scanner.at_boundary() {
            Some(0)
        } else {
            self.front_boundary()
        }
    }

    /// True while reading pauses for the destination (a full buffer, TLS
    /// records not yet on the wire, or a lent buffer not yet written out) or
    /// for memory: the source has more to say, it is not silent.
    pub fn is_paused(&self) -> bool {
        !self.ended() && !self.may_read()
    }

    /// Reading may go on: there is room in the buffer, or no buffer and no
    /// wait for memory. (Whether the source has anything is the socket's.)
    fn may_read(&self) -> bool {
        !self.behind_tls
            && match &self.buf {
                Some(_) if self.lent => self.ready == 0 && !self.starved,
                Some(buf) => !self.waits_for_room(buf),
                None => !self.starved,
            }
    }

    /// Too little room for this source's next read, and writing out
    /// validated bytes will make more. With none validated, the buffer holds
    /// only the start of a frame (a header, or a control frame kept until
    /// whole), which nothing frees but reading its rest: then a read takes
    /// what room there is (with TLS and a buffer of at most a record's
    /// plaintext, waiting for the whole room stalled the direction for good;
    /// rustls keeps the rest of the record meanwhile).
    fn waits_for_room(&self, buf: &Buffer) -> bool {
        buf.free() < self.room && self.ready > 0
    }

    /// Send the destination a ping of the proxy's own at the next frame
    /// boundary (none while one is still on its way, or after a close).
    pub fn queue_ping(&mut self, payload: [u8; PING_PAYLOAD_LEN]) -> bool {
        if self.ping.is_some() || self.close_sent {
            return false;
        }
        let mut bytes = [0u8; 131];
        let mask = match self.dir {
            Direction::ClientToUpstream => Some(random_mask()),
            Direction::UpstreamToClient => None,
        };
        let len = ping_frame(payload, mask, &mut bytes);
        self.ping = Some(Box::new(Control {
            bytes,
            len,
            written: 0,
        }));
        true
    }

    /// Take pongs carrying `payload` out of this pipe's stream (they answer
    /// a ping the proxy sent the other way).
    pub fn expect_pong(&mut self, payload: [u8; PING_PAYLOAD_LEN]) {
        self.scanner.expect_pong(payload);
    }

    /// The payload of the pings still unanswered on this pipe's stream.
    pub fn awaited_pong(&self) -> Option<[u8; PING_PAYLOAD_LEN]> {
        self.scanner.awaited_pong()
    }

    fn end_source(&mut self, end: SourceEnd) {
        self.phase = Phase::Ended(end);
        if let Some(buf) = self.buf.as_mut() {
            buf.truncate(self.ready);
        }
    }

    /// True when the pipe stopped with rounds left but could still move bytes
    /// (its budget ran out): the session must be driven again soon.
    pub fn has_pending_work<S: Transport>(&self, src: &Conn<S>, dst: &Conn<S>) -> bool {
        let can_read = !self.ended() && src.can_read() && self.may_read();
        let can_write = dst.writable
            && (self.ready > 0 || self.ping_can_go() || (self.ended() && self.inject.is_some()));
        can_read || can_write
    }

    /// A ping is pending and may be written now: begun already, or the
    /// stream is at a frame boundary with nothing validated before it. (A
    /// ping waiting for the rest of a frame in flight is not work: the
    /// frame's next bytes bring an event.)
    fn ping_can_go(&self) -> bool {
        self.ping
            .as_ref()
            .is_some_and(|p| p.started() || self.boundary_now() == Some(0))
    }

    /// Why the source stopped delivering, once it has.
    pub fn end(&self) -> Option<&SourceEnd> {
        match &self.phase {
            Phase::Ended(end) => Some(end),
            Phase::Flowing | Phase::Stopping => None,
        }
    }

    /// True once the source delivers nothing more.
    pub fn ended(&self) -> bool {
        matches!(self.phase, Phase::Ended(_))
    }

    /// The destination is gone (a write to it failed, so the session ends):
    /// this source, still open, is recorded as failed with it.
    pub fn source_failed(&mut self, why: String) {
        if !self.ended() {
            self.end_source(SourceEnd::Failed(why));
        }
    }

    /// When this pipe's source answers the close the proxy sent the other
    /// way, the destination gets the proxy's own close (`code`, `reason`)
    /// in place of that answer: set when the other side broke the protocol.
    pub fn replace_close_with(&mut self, code: u16, reason: &'static str) {
        self.replace_close = Some((code, reason));
    }

    /// A close frame went (or is queued) to the destination.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Frame bytes written to the destination so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Times reading paused on a full buffer since the last call.
    pub fn take_pauses(&mut self) -> u64 {
        std::mem::take(&mut self.pauses)
    }

    /// How long the source has said nothing. A source the proxy stops
    /// reading (its destination is slow) is not silent: it is waiting for
    /// us, so a paused pipe counts as having heard from it now.
    pub fn silence(&mut self, now: Instant) -> std::time::Duration {
        if self.is_paused() {
            self.last_rx = now;
        }
        now.saturating_duration_since(self.last_rx)
    }

    /// Since when the destination has taken nothing of what waits for it.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// When the source last delivered bytes.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// Return the buffer to the pool (the session is over).
    pub fn release(&mut self, pool: &mut BufferPool) {
        self.give_back(pool);
    }

    /// The buffer goes back to the pool, as lent or as counted.
    fn give_back(&mut self, pool: &mut BufferPool) {
        if let Some(buf) = self.buf.take() {
            if std::mem::take(&mut self.lent) {
                pool.put_lent(buf);
            } else {
                pool.put(buf);
            }
        }
    }
}

/// A masking key for the proxy's own frames to the upstream. RFC 6455 asks
/// for unpredictable keys; these frames are tiny and rare, so the OS RNG is
/// fine here.
fn random_mask() -> [u8; 4] {
    let mut k = [0u8; 4];
    if getrandom::fill(&mut k).is_err() {
        k = [0x5a, 0x17, 0xc3, 0x8e];
    }
    k
}
