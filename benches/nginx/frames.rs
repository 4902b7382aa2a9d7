//! WebSocket frames as the clients and the origin write and read them, and the pre-built wire bytes.

use crate::{ECHO_LEN, FRAME, KUBEVIRT_PREFIX, upstream};

/// Appends a frame: `b0` is FIN + opcode; masked with `mask` when given (client to server).
pub(crate) fn push_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let m = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    out.push(b0);
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xFFFF {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.extend_from_slice(payload),
    }
}

pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// A parsed frame header.
pub(crate) struct Head {
    pub(crate) b0: u8,
    pub(crate) mask: Option<[u8; 4]>,
    pub(crate) len: usize,
    pub(crate) header_len: usize,
}

impl Head {
    pub(crate) fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }

    pub(crate) fn total(&self) -> usize {
        self.header_len + self.len
    }
}

/// The header at the start of `buf`, or `None` when it is not complete yet.
pub(crate) fn parse_head(buf: &[u8]) -> Option<Head> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = if masked {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    Some(Head {
        b0,
        mask,
        len,
        header_len: at,
    })
}

/// The 32 bytes of echo message `seq`.
pub(crate) fn echo_payload(seq: u64) -> [u8; ECHO_LEN] {
    let mut payload = [0u8; ECHO_LEN];
    for (i, chunk) in payload.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq ^ ((i as u64) << 56)).to_le_bytes());
    }
    payload
}

/// A client mask key; any value is valid on the wire, these just vary.
pub(crate) fn mask_for(seq: u64) -> [u8; 4] {
    ((seq as u32).wrapping_mul(0x9E37_79B9) ^ 0x5A5A_1234).to_be_bytes()
}

/// The throughput streams, built once: `down` is what the origin sends (unmasked 64 KiB
/// frames of `upstream::pattern`, then close 1000), `up` what the client sends (the same
/// payload in masked frames). Every route forwards frame bytes verbatim, so both ends compare
/// the raw bytes with these.
pub(crate) struct Wire {
    pub(crate) down: Vec<u8>,
    /// Length of `down` without the final close frame.
    pub(crate) down_data: usize,
    pub(crate) up: Vec<u8>,
}

impl Wire {
    pub(crate) fn build(payload: usize) -> Wire {
        let frames = payload.div_ceil(FRAME);
        let mut down = Vec::with_capacity(payload + frames * 10 + 4);
        let mut up = Vec::with_capacity(payload + frames * 14);
        let mut chunk = vec![0u8; FRAME];
        for (i, off) in (0..payload).step_by(FRAME).enumerate() {
            let len = FRAME.min(payload - off);
            upstream::pattern(off as u64, &mut chunk[..len]);
            push_frame(&mut down, 0x82, &chunk[..len], None);
            push_frame(&mut up, 0x82, &chunk[..len], Some(mask_for(i as u64)));
        }
        let down_data = down.len();
        down.extend_from_slice(&[0x88, 0x02, 0x03, 0xE8]);
        Wire {
            down,
            down_data,
            up,
        }
    }
}

pub(crate) fn kubevirt_path(vmi: &str) -> String {
    format!("{KUBEVIRT_PREFIX}{vmi}/vnc")
}
