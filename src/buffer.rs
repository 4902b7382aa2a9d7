//! Fixed-capacity relay buffers and the pool they come from.
//!
//! Each relay direction holds at most one buffer, and only while bytes are in
//! flight: an idle session holds none. The pool keeps a bounded number of free
//! buffers so a busy proxy does not allocate per read.
//!
//! Buffers come in two sizes. A direction streaming in bulk (its source
//! filled a whole buffer in one read) asks for a larger one: a quarter as
//! many reads and writes per byte, and, on a busy machine, as many fewer
//! wake-ups of the reader on the other side. Bulk buffers are few (a fixed
//! number in use at once); a direction that cannot have one keeps the
//! regular size.

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

    /// True when no more bytes fit.
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
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
        }
    }

    /// A regular buffer, empty.
    pub fn get(&mut self) -> Buffer {
        self.in_use += 1;
        self.free.pop().unwrap_or_else(|| Buffer::new(self.size))
    }

    /// A bulk buffer, empty, if one may be handed out; else a regular one.
    pub fn get_bulk(&mut self) -> Buffer {
        if self.bulk_size == 0 || self.bulk_in_use >= self.bulk_max {
            return self.get();
        }
        self.in_use += 1;
        self.bulk_in_use += 1;
        self.free_bulk
            .pop()
            .unwrap_or_else(|| Buffer::new(self.bulk_size))
    }

    /// Give a buffer back. Its contents are discarded.
    pub fn put(&mut self, mut buf: Buffer) {
        debug_assert!(self.in_use > 0);
        self.in_use -= 1;
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
        assert!(b.is_full());
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
}
