//! Fixed-capacity relay buffers and the pool they come from.
//!
//! Each relay direction holds at most one buffer, and only while bytes are in
//! flight: an idle session holds none. The pool keeps a bounded number of free
//! buffers so a busy proxy does not allocate per read.
//!
//! Buffers come in two sizes. A direction streaming in bulk (its source
//! filled a whole buffer between two writes) asks for a larger one: a
//! quarter as many reads and writes per byte, and, on a busy machine, as
//! many fewer wake-ups of the reader on the other side. Bulk buffers are few (a fixed
//! number in use at once); a direction that cannot have one keeps the
//! regular size.
//!
//! The pool can also bound the memory of the buffers in use at once
//! (`RELAY_MEMORY_BYTES`). A direction about to read asks with
//! [`BufferPool::take`], which refuses when no buffer fits, and when others
//! are already waiting (first come, first served): the direction then leaves
//! its source unread, which is backpressure like a full buffer's, and the
//! loop drives it again once a buffer comes back (see `server.rs`).

/// A fixed-capacity byte queue: bytes are appended at the end and consumed
/// from the front. It never grows.
#[derive(Debug)]
pub struct Buffer {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    fn new(capacity: usize) -> Self {
        Buffer {
            data: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Total capacity.
    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Bytes that still fit.
    pub fn free(&self) -> usize {
        self.capacity() - self.len()
    }

    /// The bytes held, oldest first.
    pub fn data(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Free space at the end, moving the held bytes to the front first if
    /// that makes room. Fill it, then call [`fill`](Self::fill).
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Mark `n` bytes of [`space`](Self::space) as filled.
    pub fn fill(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.data.len());
        self.end += n;
    }

    /// Append as much of `bytes` as fits; returns how much was taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let space = self.space();
        let n = bytes.len().min(space.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.fill(n);
        n
    }

    /// Drop `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Remove `len` bytes starting `at` bytes from the front (a frame the
    /// proxy takes out of the stream); the bytes after move up.
    pub fn remove(&mut self, at: usize, len: usize) {
        debug_assert!(at + len <= self.len());
        let from = self.start + at;
        self.data.copy_within(from + len..self.end, from);
        self.end -= len;
    }

    /// Drop the bytes after the first `keep` (used to discard unvalidated
    /// input when a session is being closed).
    pub fn truncate(&mut self, keep: usize) {
        debug_assert!(keep <= self.len());
        self.end = self.start + keep;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// A pool of regular and bulk buffers, each kind with a bounded free list.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    free: Vec<Buffer>,
    max_free: usize,
    in_use: usize,
    /// Bulk buffer size (0: no bulk buffers).
    bulk_size: usize,
    free_bulk: Vec<Buffer>,
    bulk_max: usize,
    bulk_in_use: usize,
    /// Bytes of the buffers handed out within the limit.
    bytes_in_use: usize,
    /// Bytes of the buffers lent over it ([`lend`](Self::lend)).
    lent_bytes: usize,
    /// At most this many bytes in use for [`take`](Self::take) to hand out
    /// another buffer (0: no limit).
    limit: usize,
    /// Directions queued for memory (kept by the loop): while any wait,
    /// [`take`](Self::take) refuses all but the one being served.
    waiting: usize,
    serving: bool,
    /// [`take`](Self::take) refused since the loop last asked.
    refused: bool,
}

/// Free bulk buffers kept for reuse, at most: enough that a few streams
/// pausing and resuming do not allocate each time, few enough that memory
/// comes back after a burst.
const SPARE_BULK: usize = 4;

impl BufferPool {
    /// A pool of `size`-byte buffers keeping at most `max_free` spares, and
    /// no bulk buffers. The proxy always sizes bulk buffers too: this is for
    /// the unit tests.
    #[cfg(test)]
    pub fn new(size: usize, max_free: usize) -> Self {
        Self::with_bulk(size, max_free, 0, 0)
    }

    /// As [`new`](Self::new), plus at most `bulk_max` buffers of
    /// `bulk_size` bytes in use at once (`bulk_size` 0: none).
    pub fn with_bulk(size: usize, max_free: usize, bulk_size: usize, bulk_max: usize) -> Self {
        BufferPool {
            size,
            free: Vec::new(),
            max_free,
            in_use: 0,
            bulk_size: if bulk_size > size { bulk_size } else { 0 },
            free_bulk: Vec::new(),
            bulk_max,
            bulk_in_use: 0,
            bytes_in_use: 0,
            lent_bytes: 0,
            limit: 0,
            waiting: 0,
            serving: false,
            refused: false,
        }
    }

    /// Bound the bytes of the buffers [`take`](Self::take) hands out
    /// (0: no bound).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// A regular buffer, empty, counted within the limit whatever it is
    /// (for the unit tests, and the way [`take`](Self::take) hands one out).
    pub fn get(&mut self) -> Buffer {
        self.in_use += 1;
        self.bytes_in_use += self.size;
        self.free.pop().unwrap_or_else(|| Buffer::new(self.size))
    }

    /// A bulk buffer, empty, if one may be handed out; else a regular one.
    /// Counted whatever the limit, like [`get`](Self::get).
    pub fn get_bulk(&mut self) -> Buffer {
        if self.bulk_size == 0 || self.bulk_in_use >= self.bulk_max {
            return self.get();
        }
        self.in_use += 1;
        self.bulk_in_use += 1;
        self.bytes_in_use += self.bulk_size;
        self.free_bulk
            .pop()
            .unwrap_or_else(|| Buffer::new(self.bulk_size))
    }

    /// A buffer to read into (a bulk one if `bulk` and one fits), or `None`
    /// when none fits the limit or others wait for memory first: the caller
    /// leaves its source unread and is queued (see [`take_refused`](Self::take_refused)).
    #[inline]
    pub fn take(&mut self, bulk: bool) -> Option<Buffer> {
        if self.limit == 0 {
            return Some(if bulk { self.get_bulk() } else { self.get() });
        }
        if self.would_refuse() {
            self.refused = true;
            return None;
        }
        Some(if bulk && self.fits(self.bulk_size) {
            self.get_bulk()
        } else {
            self.get()
        })
    }

    /// A regular buffer for bytes that cannot wait (what a handshake left:
    /// the 101 head), whatever the limit: counted within it when
    /// [`take`](Self::take) would have handed one out (`false`), else lent
    /// over it (`true`): nothing more may be read into a lent buffer until
    /// it is [adopted](Self::adopt), and it goes back with
    /// [`put_lent`](Self::put_lent).
    pub fn get_for_leftovers(&mut self) -> (Buffer, bool) {
        if !self.would_refuse() {
            return (self.get(), false);
        }
        self.in_use += 1;
        self.lent_bytes += self.size;
        (
            self.free.pop().unwrap_or_else(|| Buffer::new(self.size)),
            true,
        )
    }

    /// Count a lent buffer within the limit, if [`take`](Self::take) would
    /// hand one out now; else `false`, reported like a refusal.
    pub fn adopt(&mut self) -> bool {
        if self.would_refuse() {
            self.refused = true;
            return false;
        }
        self.lent_bytes -= self.size;
        self.bytes_in_use += self.size;
        true
    }

    /// Give back a lent buffer (see [`get_for_leftovers`](Self::get_for_leftovers)).
    pub fn put_lent(&mut self, buf: Buffer) {
        debug_assert!(self.lent_bytes >= buf.capacity());
        self.lent_bytes -= buf.capacity();
        self.bytes_in_use += buf.capacity();
        self.put(buf);
    }

    /// [`take`](Self::take) would refuse now.
    fn would_refuse(&self) -> bool {
        self.limit != 0 && (!self.fits(self.size) || (self.waiting > 0 && !self.serving))
    }

    /// `bytes` more would stay within the limit.
    fn fits(&self, bytes: usize) -> bool {
        self.limit == 0 || self.bytes_in_use + bytes <= self.limit
    }

    /// A regular buffer fits the limit: a waiting direction may be served.
    pub fn has_room(&self) -> bool {
        self.fits(self.size)
    }

    /// Whether [`take`](Self::take) refused since the last call: the session
    /// just driven must be queued.
    #[inline]
    pub fn take_refused(&mut self) -> bool {
        std::mem::take(&mut self.refused)
    }

    /// The loop's queue: `waiting` directions wait; `serving` while it
    /// drives the one at its head (which alone may then take).
    pub fn set_queue(&mut self, waiting: usize, serving: bool) {
        self.waiting = waiting;
        self.serving = serving;
    }

    /// Give a buffer back. Its contents are discarded.
    pub fn put(&mut self, mut buf: Buffer) {
        debug_assert!(self.in_use > 0);
        self.in_use -= 1;
        self.bytes_in_use -= buf.capacity();
        buf.start = 0;
        buf.end = 0;
        if self.bulk_size != 0 && buf.capacity() == self.bulk_size {
            debug_assert!(self.bulk_in_use > 0);
            self.bulk_in_use -= 1;
            if self.free_bulk.len() < SPARE_BULK {
                self.free_bulk.push(buf);
            }
        } else if self.free.len() < self.max_free {
            self.free.push(buf);
        }
    }

    /// The size of a regular buffer.
    pub fn regular_size(&self) -> usize {
        self.size
    }

    /// Buffers currently handed out (both sizes).
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Bulk buffers currently handed out.
    pub fn bulk_in_use(&self) -> usize {
        self.bulk_in_use
    }

    /// Bytes of the buffers currently handed out, lent ones included.
    pub fn bytes_in_use(&self) -> usize {
        self.bytes_in_use + self.lent_bytes
    }

    /// Spare buffers kept for reuse (both sizes): for the unit tests.
    #[cfg(test)]
    pub fn spare(&self) -> usize {
        self.free.len() + self.free_bulk.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_only_when_needed_and_never_grows() {
        let mut pool = BufferPool::new(8, 1);
        let mut b = pool.get();
        assert_eq!(b.push(b"abcdefghij"), 8);
        assert_eq!(b.free(), 0);
        b.consume(3);
        assert_eq!(b.data(), b"defgh");
        assert_eq!(b.space().len(), 3);
        assert_eq!(b.push(b"xyz!"), 3);
        assert_eq!(b.data(), b"defghxyz");
        b.remove(1, 3);
        assert_eq!(b.data(), b"dhxyz");
        b.truncate(2);
        assert_eq!(b.data(), b"dh");
        b.consume(2);
        assert!(b.is_empty());
        assert_eq!(b.capacity(), 8);
        pool.put(b);
        assert_eq!((pool.in_use(), pool.spare()), (0, 1));
        let a = pool.get();
        let c = pool.get();
        pool.put(a);
        pool.put(c);
        assert_eq!((pool.in_use(), pool.spare()), (0, 1));
    }

    #[test]
    fn bulk_buffers_are_bounded_and_fall_back_to_the_regular_size() {
        let mut pool = BufferPool::with_bulk(8, 2, 32, 2);
        let a = pool.get_bulk();
        let b = pool.get_bulk();
        let c = pool.get_bulk();
        assert_eq!((a.capacity(), b.capacity(), c.capacity()), (32, 32, 8));
        assert_eq!((pool.in_use(), pool.bulk_in_use()), (3, 2));
        pool.put(a);
        assert_eq!(pool.bulk_in_use(), 1);
        assert_eq!(
            pool.get_bulk().capacity(),
            32,
            "a returned bulk buffer is handed out again"
        );
        pool.put(b);
        pool.put(c);
        assert_eq!((pool.in_use(), pool.bulk_in_use()), (1, 1));
        // Off: every buffer is regular.
        let mut off = BufferPool::with_bulk(8, 2, 0, 2);
        assert_eq!(off.get_bulk().capacity(), 8);
        assert_eq!(off.bulk_in_use(), 0);
    }

    #[test]
    fn the_limit_bounds_what_take_hands_out_and_queued_directions_go_first() {
        let mut pool = BufferPool::with_bulk(8, 2, 32, 4).with_limit(48);
        // A bulk buffer while one fits, then regular ones, then none.
        let a = pool.take(true).expect("room for a bulk buffer");
        assert_eq!(a.capacity(), 32);
        let b = pool.take(true).expect("room for a regular buffer");
        assert_eq!(b.capacity(), 8);
        let c = pool.take(false).expect("room for a last regular buffer");
        assert_eq!(pool.bytes_in_use(), 48);
        assert!(!pool.take_refused());
        assert!(pool.take(false).is_none());
        assert!(pool.take_refused(), "the refusal is reported once");
        assert!(!pool.take_refused());
        // A handshake's leftovers cannot wait: lent over the limit, which
        // does not count it (so a waiting direction is not held up by it).
        let (head, lent) = pool.get_for_leftovers();
        assert!(lent);
        assert_eq!(pool.bytes_in_use(), 56);
        assert!(!pool.adopt(), "no room to count it within the limit");
        assert!(pool.take_refused());
        pool.put(c);
        assert!(pool.adopt(), "room again: counted within the limit");
        assert_eq!(pool.bytes_in_use(), 48);
        assert!(pool.take(false).is_none());
        assert!(pool.take_refused());
        pool.put(head);
        let (lent_again, lent) = pool.get_for_leftovers();
        assert!(!lent, "room: counted within the limit at once");
        pool.put(lent_again);
        let c = pool.take(false).expect("room again");
        let (head, lent) = pool.get_for_leftovers();
        assert!(lent);
        pool.put_lent(head);
        pool.put(c);
        assert!(pool.has_room());
        // One direction queued: only the one being served may take.
        pool.set_queue(1, false);
        let (head, lent) = pool.get_for_leftovers();
        assert!(lent, "lent while others wait, room or not");
        pool.put_lent(head);
        assert!(pool.take(false).is_none());
        assert!(pool.take_refused());
        pool.set_queue(1, true);
        let d = pool.take(false).expect("the head of the queue is served");
        pool.set_queue(0, false);
        for buf in [a, b, d] {
            pool.put(buf);
        }
        assert_eq!((pool.in_use(), pool.bytes_in_use()), (0, 0));
        // No limit: take never refuses.
        let mut open = BufferPool::new(8, 0);
        let held: Vec<_> = (0..100)
            .map(|_| open.take(false).expect("no limit"))
            .collect();
        assert_eq!(open.bytes_in_use(), 800);
        assert!(!open.take_refused());
        for buf in held {
            open.put(buf);
        }
    }
}
