//! WebSocket frame headers as they pass through the relay (RFC 6455 §5).
//!
//! The relay never re-encodes a message: client frames arrive masked, which is
//! exactly what the upstream (a server) must receive, and upstream frames arrive
//! unmasked, which is exactly what the client must receive. So the proxy only
//! *reads* frame headers, to validate them per direction and to know where
//! frames start and end. Everything here is pure: no I/O, no allocation on the
//! scanning path, so it can be fuzzed and unit-tested in isolation.

/// Which way bytes travel; each direction has its own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Browser to upstream: every frame must be masked.
    ClientToUpstream,
    /// Upstream to browser: no frame may be masked.
    UpstreamToClient,
}

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text data frame.
    pub const TEXT: u8 = 0x1;
    /// A binary data frame.
    pub const BINARY: u8 = 0x2;
    /// Close control frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping control frame.
    pub const PING: u8 = 0x9;
    /// Pong control frame.
    pub const PONG: u8 = 0xA;
}

/// The largest control-frame payload RFC 6455 allows.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The longest possible frame header: 2 + 8 (length) + 4 (mask). Only the
/// checks need it (the scanner keeps a partial header in the buffer).
#[cfg(any(test, feature = "fuzzing"))]
pub const MAX_HEADER_LEN: usize = 14;

/// One parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN bit: last frame of its message.
    pub fin: bool,
    /// The three RSV bits, in the low bits.
    pub rsv: u8,
    /// The opcode.
    pub opcode: u8,
    /// The masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Length of the header itself in bytes (2 to 14).
    pub header_len: usize,
}

impl FrameHeader {
    /// Parse a header from the start of `buf`. Returns `Ok(None)` when `buf`
    /// holds only part of a header (nothing is consumed; call again with more).
    pub fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, Violation> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        let (payload_len, len_bytes) = match len7 {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                let len = u64::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                if len < 126 {
                    return Err(Violation::NonMinimalLength);
                }
                (len, 2)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(Violation::LengthTooLarge);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(Violation::NonMinimalLength);
                }
                (len, 8)
            }
            n => (u64::from(n), 0),
        };
        let mask_at = 2 + len_bytes;
        let (mask, header_len) = if masked {
            let Some(key) = buf.get(mask_at..mask_at + 4) else {
                return Ok(None);
            };
            ([key[0], key[1], key[2], key[3]].into(), mask_at + 4)
        } else {
            (None, mask_at)
        };
        Ok(Some(FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode: b0 & 0x0F,
            mask,
            payload_len,
            header_len,
        }))
    }

    /// True for close, ping and pong.
    pub fn is_control(&self) -> bool {
        self.opcode & 0x08 != 0
    }
}

/// A frame that breaks RFC 6455 or the proxy's limits. Each maps to a close
/// code and a short reason the peer (and the log) can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Client frame without mask, or upstream frame with one.
    WrongMasking,
    /// RSV bits set although no extension was negotiated.
    ReservedBits,
    /// Opcode 3-7 or B-F.
    ReservedOpcode,
    /// Control frame with more than 125 payload bytes.
    ControlTooLong,
    /// Control frame with FIN clear.
    FragmentedControl,
    /// Continuation frame outside a fragmented message.
    UnexpectedContinuation,
    /// New text/binary frame while a fragmented message is still open.
    ExpectedContinuation,
    /// 64-bit length with the most significant bit set.
    LengthTooLarge,
    /// A length that could have been encoded in fewer bytes.
    NonMinimalLength,
    /// A close frame whose payload is one byte (a code needs two).
    BadClosePayload,
    /// A frame larger than the configured maximum.
    FrameTooLarge,
    /// A close code that may not be sent (RFC 6455 §7.4).
    BadCloseCode,
    /// A close reason that is not UTF-8.
    BadCloseReason,
}

impl Violation {
    /// The close code to send to the peer that broke the rule.
    pub fn close_code(self) -> u16 {
        match self {
            Violation::FrameTooLarge => 1009,
            Violation::BadCloseReason => 1007,
            _ => 1002,
        }
    }

    /// True for the rules about close frames (the sender was closing).
    pub fn in_close_frame(self) -> bool {
        matches!(
            self,
            Violation::BadClosePayload | Violation::BadCloseCode | Violation::BadCloseReason
        )
    }

    /// A short, human-readable reason (fits a close frame).
    pub fn reason(self) -> &'static str {
        match self {
            Violation::WrongMasking => "wrong frame masking",
            Violation::ReservedBits => "reserved bits set",
            Violation::ReservedOpcode => "reserved opcode",
            Violation::ControlTooLong => "control frame too long",
            Violation::FragmentedControl => "fragmented control frame",
            Violation::UnexpectedContinuation => "unexpected continuation frame",
            Violation::ExpectedContinuation => "expected continuation frame",
            Violation::LengthTooLarge => "frame length out of range",
            Violation::NonMinimalLength => "non-minimal frame length",
            Violation::BadClosePayload => "invalid close payload",
            Violation::FrameTooLarge => "frame too large",
            Violation::BadCloseCode => "invalid close code",
            Violation::BadCloseReason => "close reason is not UTF-8",
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Check one header against the rules of its direction.
pub fn validate(
    h: &FrameHeader,
    dir: Direction,
    max_frame: u64,
    in_fragmented_message: bool,
) -> Result<(), Violation> {
    let must_mask = dir == Direction::ClientToUpstream;
    if h.mask.is_some() != must_mask {
        return Err(Violation::WrongMasking);
    }
    if h.rsv != 0 {
        return Err(Violation::ReservedBits);
    }
    match h.opcode {
        opcode::CONTINUATION => {
            if !in_fragmented_message {
                return Err(Violation::UnexpectedContinuation);
            }
        }
        opcode::TEXT | opcode::BINARY => {
            if in_fragmented_message {
                return Err(Violation::ExpectedContinuation);
            }
        }
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(Violation::ControlTooLong);
            }
            if !h.fin {
                return Err(Violation::FragmentedControl);
            }
            if h.opcode == opcode::CLOSE && h.payload_len == 1 {
                return Err(Violation::BadClosePayload);
            }
        }
        _ => return Err(Violation::ReservedOpcode),
    }
    if h.payload_len > max_frame {
        return Err(Violation::FrameTooLarge);
    }
    Ok(())
}

/// What one call to [`FrameScanner::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// How many bytes from the start of the input are validated and may be
    /// forwarded. Always ends at a frame boundary or inside a payload, never
    /// inside a header.
    pub forwardable: usize,
    /// What stopped the scan before the end of the input, if anything.
    pub stop: Option<ScanStop>,
}

/// Why a scan stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// A complete close frame ends at `forwardable`; nothing after it may be
    /// forwarded (RFC 6455 §5.5.1: no data after close).
    Close {
        /// The close code, if the payload carried one.
        code: Option<u16>,
    },
    /// The frame starting at `forwardable` breaks the rules.
    Violation(Violation),
}

/// Tracks frame boundaries in one direction of the relay, across reads.
///
/// Feed it every byte exactly once, in order, via [`scan`](Self::scan); it
/// remembers how much of the current frame's payload is still to come and
/// whether a fragmented message is open. It never copies the payload.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    dir: Direction,
    max_frame: u64,
    /// Payload bytes of the current frame not yet seen.
    remaining: u64,
    /// A text/binary message was started without FIN and is not finished.
    fragmented: bool,
    /// A close frame was completed: nothing more is scanned.
    closed: bool,
    /// Where, in the last scanned input, the last complete frame ended.
    last_boundary: Option<usize>,
    /// Where, in the last scanned input, the last frame header began.
    last_start: usize,
    /// The payload of the proxy's own pings, while pongs to them are due
    /// (how many), so those pongs can be taken out of the stream.
    own_pong: Option<([u8; PING_PAYLOAD_LEN], u32)>,
    /// Where an own pong was found in the last scanned input: (offset, len).
    found_pong: Option<(usize, usize)>,
}

/// Length of the payload of the proxy's own pings.
pub const PING_PAYLOAD_LEN: usize = 8;

impl FrameScanner {
    /// A scanner for `dir`, refusing frames over `max_frame` payload bytes.
    pub fn new(dir: Direction, max_frame: u64) -> Self {
        FrameScanner {
            dir,
            max_frame,
            remaining: 0,
            fragmented: false,
            closed: false,
            last_boundary: None,
            last_start: 0,
            own_pong: None,
            found_pong: None,
        }
    }

    /// Expect one more pong carrying `payload` (the proxy sent a ping).
    /// Only one payload is awaited at a time, so a ping sent while another
    /// is unanswered must carry the same one ([`awaited_pong`](Self::awaited_pong)).
    pub fn expect_pong(&mut self, payload: [u8; PING_PAYLOAD_LEN]) {
        let due = self.own_pong.map_or(0, |(_, n)| n);
        self.own_pong = Some((payload, due + 1));
    }

    /// The payload of the proxy's pings still unanswered, if any.
    pub fn awaited_pong(&self) -> Option<[u8; PING_PAYLOAD_LEN]> {
        self.own_pong.map(|(p, _)| p)
    }

    /// Where the last scan stopped at one of the proxy's own pongs, as
    /// (offset in that input, length): the caller removes those bytes and
    /// scans the rest again.
    pub fn take_own_pong(&mut self) -> Option<(usize, usize)> {
        self.found_pong.take()
    }

    /// Where, in the last scanned input, the last frame header began (after
    /// a `Close` stop: where the close frame starts).
    pub fn last_frame_start(&self) -> usize {
        self.last_start
    }

    /// Where, in the last scanned input, the last complete frame ended.
    pub fn last_boundary(&self) -> Option<usize> {
        self.last_boundary
    }

    /// True when the bytes validated so far end exactly at a frame boundary,
    /// so the relay may insert a frame of its own after them.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Payload bytes of the current frame still to come (0 at a boundary).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// True once a complete close frame has been scanned. The relay learns
    /// it from the scan's stop; the checks compare the two.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// The length of the frame at the start of `input` if it is the common
    /// case, checked in a few comparisons: a whole, final, unfragmented text
    /// or binary frame with a 7-bit length, masked as its direction must be,
    /// within `max_frame`. Such a frame passes every rule of [`validate`]
    /// and is neither a pong nor a close, so nothing else need look at it;
    /// anything else (`None`) takes the general path.
    #[inline(always)]
    fn whole_small_data_frame(&self, input: &[u8]) -> Option<usize> {
        let [b0, b1, ..] = *input else {
            return None;
        };
        // FIN, no RSV bits, opcode 1 or 2 (and not inside a fragmented
        // message, where only a continuation may come).
        if (b0 != 0x81 && b0 != 0x82) || self.fragmented {
            return None;
        }
        let masked = b1 & 0x80 != 0;
        let payload = usize::from(b1 & 0x7F);
        if masked != (self.dir == Direction::ClientToUpstream)
            || payload >= 126
            || payload as u64 > self.max_frame
        {
            return None;
        }
        let len = 2 + if masked { 4 } else { 0 } + payload;
        (len <= input.len()).then_some(len)
    }

    /// The common case of [`scan`](Self::scan), decided without changing
    /// anything: when the scanner is at a frame boundary and `input` is
    /// nothing but whole, final, unfragmented text or binary frames with a
    /// 7-bit length, masked as the direction requires and within the frame
    /// limit, their length (all of `input`, every byte forwardable, the end
    /// a frame boundary). `None` otherwise: call `scan`.
    #[inline]
    pub fn whole_data_frames(&self, input: &[u8]) -> Option<usize> {
        if self.remaining != 0 || self.closed || input.is_empty() {
            return None;
        }
        let mut pos = 0;
        // Each round moves past one frame of at least two bytes.
        while pos < input.len() {
            pos += self.whole_small_data_frame(&input[pos..])?;
        }
        Some(pos)
    }

    /// Scan `input`, which must start right after the last byte any previous
    /// call reported as forwardable. Bytes past `forwardable` (an incomplete
    /// header) must be presented again, with more, on the next call.
    pub fn scan(&mut self, input: &[u8]) -> Scan {
        let mut pos = 0usize;
        self.last_boundary = None;
        self.found_pong = None;
        if self.closed {
            return Scan {
                forwardable: 0,
                stop: Some(ScanStop::Close { code: None }),
            };
        }
        loop {
            if self.remaining > 0 {
                let avail = input.len() - pos;
                let take = usize::try_from(self.remaining).map_or(avail, |r| r.min(avail));
                pos += take;
                self.remaining -= take as u64;
                if self.remaining > 0 {
                    return Scan {
                        forwardable: pos,
                        stop: None,
                    };
                }
                self.last_boundary = Some(pos);
            }
            if pos == input.len() {
                return Scan {
                    forwardable: pos,
                    stop: None,
                };
            }
            self.last_start = pos;
            if let Some(len) = self.whole_small_data_frame(&input[pos..]) {
                pos += len;
                self.last_boundary = Some(pos);
                continue;
            }
            let header = match FrameHeader::parse(&input[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return Scan {
                        forwardable: pos,
                        stop: None,
                    };
                }
                Err(v) => {
                    return Scan {
                        forwardable: pos,
                        stop: Some(ScanStop::Violation(v)),
                    };
                }
            };
            if let Err(v) = validate(&header, self.dir, self.max_frame, self.fragmented) {
                return Scan {
                    forwardable: pos,
                    stop: Some(ScanStop::Violation(v)),
                };
            }
            if header.opcode == opcode::PONG
                && header.payload_len == PING_PAYLOAD_LEN as u64
                && let Some((expected, due)) = self.own_pong
            {
                // Pongs answering the proxy's pings must not reach the other
                // side: hold the (tiny) frame until it is whole, then compare.
                let len = header.header_len + PING_PAYLOAD_LEN;
                let Some(frame) = input.get(pos..pos + len) else {
                    return Scan {
                        forwardable: pos,
                        stop: None,
                    };
                };
                let mut payload = [0u8; PING_PAYLOAD_LEN];
                for (i, b) in frame[header.header_len..].iter().enumerate() {
                    payload[i] = b ^ header.mask.map_or(0, |k| k[i % 4]);
                }
                if payload == expected {
                    self.own_pong = (due > 1).then_some((expected, due - 1));
                    self.found_pong = Some((pos, len));
                    return Scan {
                        forwardable: pos,
                        stop: None,
                    };
                }
            }
            if header.opcode == opcode::CLOSE {
                // A close frame is held until it is whole (at most 131
                // bytes) and checked before any of it is forwarded: a bad
                // code or reason is the sender's protocol error, answered by
                // the proxy instead of being passed on.
                let len = header.header_len + header.payload_len as usize;
                let Some(frame) = input.get(pos..pos + len) else {
                    return Scan {
                        forwardable: pos,
                        stop: None,
                    };
                };
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let payload = &mut payload[..header.payload_len as usize];
                for (i, b) in frame[header.header_len..].iter().enumerate() {
                    payload[i] = b ^ header.mask.map_or(0, |k| k[i % 4]);
                }
                let code = match check_close_payload(payload) {
                    Ok(code) => code,
                    Err(v) => {
                        return Scan {
                            forwardable: pos,
                            stop: Some(ScanStop::Violation(v)),
                        };
                    }
                };
                self.closed = true;
                self.last_boundary = Some(pos + len);
                return Scan {
                    forwardable: pos + len,
                    stop: Some(ScanStop::Close { code }),
                };
            }
            if !header.is_control() {
                self.fragmented = !header.fin;
            }
            pos += header.header_len;
            self.remaining = header.payload_len;
            if self.remaining == 0 {
                self.last_boundary = Some(pos);
            }
        }
    }
}

/// Check a close frame's (unmasked) payload: empty, or a code that may be
/// sent (1000-1003, 1007-1014, 3000-4999) and a UTF-8 reason. Returns the code.
pub fn check_close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::BadClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(Violation::BadCloseCode);
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Violation::BadCloseReason);
            }
            Ok(Some(code))
        }
    }
}

/// Build a close frame (unmasked, to the client; masked with `mask`, to the
/// upstream) into `out`, returning its length. The reason is cut to fit the
/// 125-byte control-frame limit at a character boundary.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>, out: &mut [u8; 131]) -> usize {
    let mut reason_len = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    let payload_len = 2 + reason_len;
    out[0] = 0x80 | opcode::CLOSE;
    out[1] = payload_len as u8;
    let mut at = 2;
    if let Some(key) = mask {
        out[1] |= 0x80;
        out[2..6].copy_from_slice(&key);
        at = 6;
    }
    out[at..at + 2].copy_from_slice(&code.to_be_bytes());
    out[at + 2..at + payload_len].copy_from_slice(&reason.as_bytes()[..reason_len]);
    if let Some(key) = mask {
        for (i, b) in out[at..at + payload_len].iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    at + payload_len
}

/// Build a ping frame of the proxy's own (masked toward the upstream).
pub fn ping_frame(
    payload: [u8; PING_PAYLOAD_LEN],
    mask: Option<[u8; 4]>,
    out: &mut [u8; 131],
) -> usize {
    out[0] = 0x80 | opcode::PING;
    out[1] = PING_PAYLOAD_LEN as u8;
    let mut at = 2;
    if let Some(key) = mask {
        out[1] |= 0x80;
        out[2..6].copy_from_slice(&key);
        at = 6;
    }
    for (i, b) in payload.iter().enumerate() {
        out[at + i] = b ^ mask.map_or(0, |k| k[i % 4]);
    }
    at + PING_PAYLOAD_LEN
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame as a peer sends it (`mask`: from a client). Also the relay's
    /// and the session's tests' frame builder.
    pub(crate) fn frame(fin: bool, op: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | n as u8),
            n if n <= 0xFFFF => {
                v.push(m | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(m | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = mask {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        } else {
            v.extend_from_slice(payload);
        }
        v
    }

    const K: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    #[test]
    fn parses_all_length_forms() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let f = frame(true, opcode::BINARY, None, &vec![7; n]);
            let h = FrameHeader::parse(&f).unwrap().unwrap();
            assert_eq!(h.payload_len, n as u64);
            assert_eq!(h.header_len + n, f.len());
            // Every strict prefix of the header is incomplete, never an error.
            for cut in 0..h.header_len {
                assert_eq!(FrameHeader::parse(&f[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn rejects_non_minimal_and_huge_lengths() {
        assert_eq!(
            FrameHeader::parse(&[0x82, 126, 0, 5]),
            Err(Violation::NonMinimalLength)
        );
        let mut f = vec![0x82, 127];
        f.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(FrameHeader::parse(&f), Err(Violation::LengthTooLarge));
    }

    #[test]
    fn scanner_splits_anywhere() {
        let mut stream = frame(false, opcode::TEXT, K, b"hello ");
        stream.extend(frame(true, opcode::PING, K, b"p"));
        stream.extend(frame(true, opcode::CONTINUATION, K, b"world"));
        stream.extend(frame(true, opcode::BINARY, K, &[9; 300]));
        let close_at = stream.len();
        stream.extend(frame(true, opcode::CLOSE, K, &[0x03, 0xE8, b'o', b'k']));
        let total = stream.len();
        stream.extend(frame(true, opcode::BINARY, K, b"after close"));
        for split in 0..total {
            let mut s = FrameScanner::new(Direction::ClientToUpstream, 1 << 20);
            let first = s.scan(&stream[..split]);
            assert_eq!(first.stop, None, "split {split}");
            let rest = s.scan(&stream[first.forwardable..]);
            assert_eq!(first.forwardable + rest.forwardable, total, "split {split}");
            assert_eq!(rest.stop, Some(ScanStop::Close { code: Some(1000) }));
            assert!(s.closed());
            assert!(close_at < total);
        }
    }

    /// The fast path takes a frame exactly when the general rules (parse,
    /// validate) find it a whole, final text or binary frame with a 7-bit
    /// length: every first and second byte, both directions, inside and
    /// outside a fragmented message, a frame limit below and above the
    /// length, the frame whole or cut short.
    #[test]
    fn fast_path_agrees_with_the_rules_for_every_header() {
        let mut taken = 0;
        for dir in [Direction::ClientToUpstream, Direction::UpstreamToClient] {
            for fragmented in [false, true] {
                for max_frame in [3, 1 << 20] {
                    let mut s = FrameScanner::new(dir, max_frame);
                    s.fragmented = fragmented;
                    for b0 in 0..=255u8 {
                        for b1 in 0..=255u8 {
                            let mut input = vec![b0, b1];
                            // Room for any mask, extended length and short payload.
                            input.extend((0..140u8).map(|i| i.wrapping_mul(7)));
                            let rules = match FrameHeader::parse(&input) {
                                Ok(Some(h))
                                    if validate(&h, dir, max_frame, fragmented).is_ok()
                                        && h.fin
                                        && matches!(h.opcode, opcode::TEXT | opcode::BINARY)
                                        && b1 & 0x7F < 126 =>
                                {
                                    Some(h.header_len + h.payload_len as usize)
                                }
                                _ => None,
                            };
                            let fast = s.whole_small_data_frame(&input);
                            assert_eq!(fast, rules, "{dir:?} {fragmented} {max_frame} {b0} {b1}");
                            if let Some(len) = fast {
                                taken += 1;
                                assert_eq!(s.whole_small_data_frame(&input[..len - 1]), None);
                                assert_eq!(s.whole_data_frames(&input[..len]), Some(len));
                            }
                        }
                    }
                }
            }
        }
        assert!(taken > 0);
    }

    #[test]
    fn whole_data_frames_only_when_all_of_the_input_is_such_frames() {
        let s = FrameScanner::new(Direction::ClientToUpstream, 1 << 20);
        let mut two = frame(true, opcode::BINARY, K, b"ab");
        two.extend(frame(true, opcode::TEXT, K, b"cd"));
        assert_eq!(s.whole_data_frames(&two), Some(two.len()));
        assert_eq!(s.whole_data_frames(&two[..two.len() - 1]), None);
        assert_eq!(s.whole_data_frames(&[]), None);
        let mut then_ping = two.clone();
        then_ping.extend(frame(true, opcode::PING, K, b"p"));
        assert_eq!(s.whole_data_frames(&then_ping), None);
        // Inside a frame's payload the fast path never applies.
        let mut s = FrameScanner::new(Direction::ClientToUpstream, 1 << 20);
        let big = frame(true, opcode::BINARY, K, &[1; 300]);
        assert_eq!(s.scan(&big[..20]).forwardable, 20);
        assert_eq!(s.whole_data_frames(&two), None);
    }

    #[test]
    fn direction_rules() {
        let mut s = FrameScanner::new(Direction::ClientToUpstream, 1 << 20);
        let r = s.scan(&frame(true, opcode::BINARY, None, b"x"));
        assert_eq!(r.stop, Some(ScanStop::Violation(Violation::WrongMasking)));
        let mut s = FrameScanner::new(Direction::UpstreamToClient, 1 << 20);
        let r = s.scan(&frame(true, opcode::BINARY, K, b"x"));
        assert_eq!(r.stop, Some(ScanStop::Violation(Violation::WrongMasking)));
    }

    #[test]
    fn control_and_opcode_rules() {
        let cases: Vec<(Vec<u8>, Violation)> = vec![
            (
                frame(true, opcode::PING, K, &[0; 126]),
                Violation::ControlTooLong,
            ),
            (
                frame(false, opcode::PING, K, b""),
                Violation::FragmentedControl,
            ),
            (frame(true, 0x3, K, b""), Violation::ReservedOpcode),
            (frame(true, 0xB, K, b""), Violation::ReservedOpcode),
            (
                frame(true, opcode::CONTINUATION, K, b""),
                Violation::UnexpectedContinuation,
            ),
            (
                frame(true, opcode::CLOSE, K, b"x"),
                Violation::BadClosePayload,
            ),
            (
                {
                    let mut f = frame(true, opcode::BINARY, K, b"");
                    f[0] |= 0x40;
                    f
                },
                Violation::ReservedBits,
            ),
            (
                frame(true, opcode::BINARY, K, &[0; 2000]),
                Violation::FrameTooLarge,
            ),
        ];
        for (bytes, want) in cases {
            let mut s = FrameScanner::new(Direction::ClientToUpstream, 1000);
            let r = s.scan(&bytes);
            assert_eq!(r.forwardable, 0);
            assert_eq!(r.stop, Some(ScanStop::Violation(want)));
        }
        let mut s = FrameScanner::new(Direction::ClientToUpstream, 1000);
        let mut two = frame(false, opcode::TEXT, K, b"a");
        let first_len = two.len();
        two.extend(frame(true, opcode::TEXT, K, b"b"));
        let r = s.scan(&two);
        assert_eq!(r.forwardable, first_len);
        assert_eq!(
            r.stop,
            Some(ScanStop::Violation(Violation::ExpectedContinuation))
        );
    }

    #[test]
    fn own_pongs_are_found_whole_and_other_pongs_pass() {
        let ours = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut stream = frame(true, opcode::BINARY, K, b"data");
        let pong_at = stream.len();
        stream.extend(frame(true, opcode::PONG, K, &ours));
        let pong_len = stream.len() - pong_at;
        stream.extend(frame(true, opcode::PONG, K, b"theirs!!"));
        let mut s = FrameScanner::new(Direction::ClientToUpstream, 1000);
        s.expect_pong(ours);
        // Split inside our pong: nothing of it is forwarded yet.
        let r = s.scan(&stream[..pong_at + 3]);
        assert_eq!((r.forwardable, s.take_own_pong()), (pong_at, None));
        assert_eq!(s.last_boundary(), Some(pong_at));
        let r = s.scan(&stream[pong_at..]);
        assert_eq!(r.forwardable, 0);
        assert_eq!(s.take_own_pong(), Some((0, pong_len)));
        // The caller removes it; the next pong is not ours and passes.
        let rest = &stream[pong_at + pong_len..];
        let r = s.scan(rest);
        assert_eq!((r.forwardable, s.take_own_pong()), (rest.len(), None));
        let mut out = [0u8; 131];
        let n = ping_frame(ours, K, &mut out);
        let h = FrameHeader::parse(&out[..n]).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len), (opcode::PING, 8));
    }

    #[test]
    fn close_frames_are_held_whole_and_checked() {
        let good = frame(true, opcode::CLOSE, K, &[0x03, 0xE8, b'o', b'k']);
        let mut s = FrameScanner::new(Direction::ClientToUpstream, 1000);
        let r = s.scan(&good[..good.len() - 1]);
        assert_eq!(
            (r.forwardable, r.stop),
            (0, None),
            "nothing of a partial close passes"
        );
        let r = s.scan(&good);
        assert_eq!(r.stop, Some(ScanStop::Close { code: Some(1000) }));
        for (payload, want) in [
            (vec![0x03, 0xE7], Violation::BadCloseCode), // 999
            (vec![0x03, 0xED], Violation::BadCloseCode), // 1005
            (vec![0x03, 0xEE], Violation::BadCloseCode), // 1006
            (vec![0x03, 0xF7], Violation::BadCloseCode), // 1015
            (vec![0x07, 0xD0], Violation::BadCloseCode), // 2000
            (vec![0x13, 0x88], Violation::BadCloseCode), // 5000
            (vec![0x03, 0xE8, 0xFF], Violation::BadCloseReason),
        ] {
            let mut s = FrameScanner::new(Direction::ClientToUpstream, 1000);
            let r = s.scan(&frame(true, opcode::CLOSE, K, &payload));
            assert_eq!(
                (r.forwardable, r.stop),
                (0, Some(ScanStop::Violation(want)))
            );
        }
        assert_eq!(Violation::BadCloseReason.close_code(), 1007);
        for ok in [1000u16, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(check_close_payload(&ok.to_be_bytes()), Ok(Some(ok)));
        }
    }

    #[test]
    fn close_frames_round_trip() {
        let mut out = [0u8; 131];
        let long = "é".repeat(100);
        for mask in [None, K] {
            let n = close_frame(1011, &long, mask, &mut out);
            let dir = if mask.is_some() {
                Direction::ClientToUpstream
            } else {
                Direction::UpstreamToClient
            };
            let mut s = FrameScanner::new(dir, 1000);
            let r = s.scan(&out[..n]);
            assert_eq!(r.forwardable, n);
            assert_eq!(r.stop, Some(ScanStop::Close { code: Some(1011) }));
            let h = FrameHeader::parse(&out[..n]).unwrap().unwrap();
            assert!(h.payload_len <= 125);
        }
    }
}
