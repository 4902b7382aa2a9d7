//! Where TLS records end in the bytes a TLS connection reads from its socket.
//!
//! rustls decrypts whole records only. It takes bytes from the socket up to
//! 4 KiB a read and keeps those of a record not yet whole in a buffer that
//! grows to a record's size (about 17 KiB) and shrinks again only on a read
//! that finds it empty. A relay direction whose buffer is full stops
//! reading; had its last read ended inside a record, that buffer (and the
//! plaintext of a record that did not fit) would stay with the session for as
//! long as its reader is slow: 30 KiB or so per stalled console, outside
//! `RELAY_MEMORY_BYTES`. So when a direction nears the end of its buffer,
//! [`Conn`](crate::conn::Conn) reads to the end of the record in progress
//! and no further: the last read before it stops ends on a boundary, and
//! rustls holds nothing it could not hand over.
//!
//! Pure bookkeeping over the bytes read, so it cannot break a connection:
//! should it lose track (input it cannot see, such as bytes read around TLS
//! to be dropped), reads merely stop at other places.

/// Bytes of a record header: content type, version, length (the same in
/// TLS 1.2 and 1.3).
const HEADER: usize = 5;

/// The record framing of a byte stream, as far as it has been read.
#[derive(Debug, Default)]
pub(crate) struct RecordEdges {
    /// The header of the next record, as far as it has been read.
    header: [u8; HEADER],
    header_len: usize,
    /// Bytes of the current record's body not yet read.
    body_left: usize,
}

impl RecordEdges {
    /// How many bytes a read may take to end exactly where the record in
    /// progress ends; `None` between records, or inside a header (the
    /// record's length is not known yet), where any read is as good.
    pub fn to_record_end(&self) -> Option<usize> {
        (self.body_left > 0).then_some(self.body_left)
    }

    /// True when the bytes read so far end on a record boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Take in bytes as they were read from the socket.
    pub fn saw(&mut self, mut bytes: &[u8]) {
        // Bounded: each round takes at least one byte (a body's worth at once).
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            // A whole header in view (the usual case: a read starts on a
            // record's edge): its length straight from the bytes.
            if self.header_len == 0
                && let [_, _, _, hi, lo, ..] = *bytes
            {
                self.body_left = usize::from(u16::from_be_bytes([hi, lo]));
                bytes = &bytes[HEADER..];
                continue;
            }
            let n = (HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == HEADER {
                self.header_len = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
        r.extend(std::iter::repeat_n(0xab, len));
        r
    }

    #[test]
    fn reads_in_any_pieces_find_the_same_boundaries() {
        let stream: Vec<u8> = [record(100), record(0), record(16_401), record(7)].concat();
        let ends = [105, 110, 110 + 5 + 16_401, stream.len()];
        for piece in [1, 2, 4, 5, 6, 4096, stream.len()] {
            let mut edges = RecordEdges::default();
            let mut at = 0;
            let mut seen = Vec::new();
            while at < stream.len() {
                // As the reader does when it aligns: never past the end.
                let n = edges.to_record_end().map_or(piece, |e| e.min(piece));
                let n = n.min(stream.len() - at);
                edges.saw(&stream[at..at + n]);
                at += n;
                if edges.at_boundary() {
                    seen.push(at);
                }
            }
            // Every end is found when reads stop at them; small pieces
            // find them all, large ones those they happen to end on.
            assert!(seen.iter().all(|e| ends.contains(e)), "{piece}: {seen:?}");
            assert_eq!(seen.last(), Some(&stream.len()), "{piece}");
            if piece == 1 {
                assert_eq!(seen, ends, "{piece}");
            }
        }
    }

    #[test]
    fn a_read_limited_to_the_record_end_stops_on_it() {
        let stream: Vec<u8> = [record(16_384), record(16_384)].concat();
        let mut edges = RecordEdges::default();
        // rustls reads 4 KiB: the first read learns the length.
        edges.saw(&stream[..4096]);
        assert_eq!(edges.to_record_end(), Some(5 + 16_384 - 4096));
        edges.saw(&stream[4096..5 + 16_384]);
        assert!(edges.at_boundary());
        assert_eq!(edges.to_record_end(), None);
        // A header read in two pieces.
        edges.saw(&stream[5 + 16_384..5 + 16_384 + 3]);
        assert!(!edges.at_boundary());
        assert_eq!(edges.to_record_end(), None);
        edges.saw(&stream[5 + 16_384 + 3..5 + 16_384 + 5]);
        assert_eq!(edges.to_record_end(), Some(16_384));
    }
}
