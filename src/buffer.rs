//! Fixed-capacity relay buffers and the pool they come from.
//!
//! Each relay direction holds at most one buffer, and only while bytes are in
//! flight: an idle session holds none. The pool keeps a bounded number of free
//! buffers so a busy proxy does not allocate per read.

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

/// A pool of equally sized buffers with a bounded free list.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    free: Vec<Buffer>,
    max_free: usize,
    in_use: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers keeping at most `max_free` spares.
    pub fn new(size: usize, max_free: usize) -> Self {
        BufferPool {
            size,
            free: Vec::new(),
            max_free,
            in_use: 0,
        }
    }

    /// A buffer, empty.
    pub fn get(&mut self) -> Buffer {
        self.in_use += 1;
        self.free.pop().unwrap_or_else(|| Buffer::new(self.size))
    }

    /// Give a buffer back. Its contents are discarded.
    pub fn put(&mut self, mut buf: Buffer) {
        debug_assert!(self.in_use > 0);
        self.in_use -= 1;
        if self.free.len() < self.max_free {
            buf.start = 0;
            buf.end = 0;
            self.free.push(buf);
        }
    }

    /// Buffers currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Spare buffers kept for reuse.
    pub fn spare(&self) -> usize {
        self.free.len()
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
}
