//! The workloads: each measured transfer, round trip, burst of sessions and set of idle sessions.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use std::{io, thread};

use mio::{Events, Interest, Poll, Token};

use crate::client::{Client, ClientStream, Endpoint, Route};
use crate::frames::{Wire, echo_payload, mask_for, push_frame};
use crate::origin::{Origin, would_block};
use crate::process::{Cpu, cpu_of, settled_rss_kib};
use crate::support::procfs::status_kib;
use crate::{ECHO_LEN, IO_TIMEOUT, NEW_THREADS, NS, RTT_BATCH, Res, WARMUP_TRIPS, tokens};

/// One throughput sample.
#[derive(Clone, Copy)]
pub(crate) struct Transfer {
    pub(crate) elapsed: Duration,
    pub(crate) cpu: Cpu,
}

/// Reads the CPU time of the process behind a route (nothing for direct).
#[derive(Clone, Copy)]
pub(crate) struct Meter(pub(crate) Option<u32>);

impl Meter {
    pub(crate) fn read(self) -> Res<Cpu> {
        self.0.map_or(Ok(Cpu::default()), cpu_of)
    }
}

/// The origin streams `wire.down`; the client compares every byte.
pub(crate) fn downstream(ep: &Endpoint, meter: Meter, wire: &Wire) -> Res<Transfer> {
    let fail = |what: String| format!("{}: downstream: {what}", ep.route.name());
    let before = meter.read()?;
    let t0 = Instant::now();
    let mut c = ep.open("stream-bench", None).map_err(fail)?;
    let total = wire.down_data;
    let mut got = c.buf.len() - c.start;
    if got > total || c.buf[c.start..] != wire.down[..got] {
        return Err(fail("data differs right after the upgrade".into()));
    }
    c.buf.clear();
    c.start = 0;
    let mut big = vec![0u8; 1 << 20];
    // Bounded: every read returns data, EOF or an error (timeout included).
    while got < total {
        let n =
            c.s.read(&mut big[..(total - got).min(1 << 20)])
                .map_err(|e| fail(format!("after {got} of {total} bytes: {e}")))?;
        if n == 0 {
            return Err(fail(format!("stream ended after {got} of {total} bytes")));
        }
        if big[..n] != wire.down[got..got + n] {
            return Err(fail(format!(
                "data differs from the stream near byte {got}"
            )));
        }
        got += n;
    }
    let elapsed = t0.elapsed();
    let cpu = meter.read()?.since(before);
    match c.recv().map_err(fail)? {
        (0x8, p) if p.len() < 2 || p[..2] == 1000u16.to_be_bytes() => {}
        (op, p) => {
            return Err(fail(format!(
                "expected close 1000, got opcode {op:#x} {p:?}"
            )));
        }
    }
    c.send(0x88, &1000u16.to_be_bytes()).map_err(fail)?;
    c.await_eof().map_err(fail)?;
    Ok(Transfer { elapsed, cpu })
}

/// The client sends `wire.up` to the sink and closes; the sink's close reply stops the clock.
pub(crate) fn upstream_to_sink(
    ep: &Endpoint,
    meter: Meter,
    wire: &Wire,
    origin: &Origin,
) -> Res<Transfer> {
    let fail = |what: String| format!("{}: upstream: {what}", ep.route.name());
    let recorded = origin.sinks().len();
    let before = meter.read()?;
    let t0 = Instant::now();
    let mut c = ep.open("sink-bench", None).map_err(fail)?;
    for chunk in wire.up.chunks(1 << 20) {
        c.s.write_all(chunk)
            .map_err(|e| fail(format!("send: {e}")))?;
    }
    c.s.flush().map_err(|e| fail(format!("flush: {e}")))?;
    c.close().map_err(fail)?;
    let elapsed = t0.elapsed();
    let cpu = meter.read()?.since(before);
    match origin.sinks().get(recorded) {
        Some(&(bytes, true)) if bytes == wire.up.len() => Ok(Transfer { elapsed, cpu }),
        Some(&(bytes, ok)) => Err(fail(format!(
            "the sink got {bytes} of {} bytes, {}",
            wire.up.len(),
            if ok {
                "equal so far"
            } else {
                "and they differ"
            }
        ))),
        None => Err(fail("the sink recorded no result".into())),
    }
}

/// Latency samples (ns) and the CPU spent meanwhile.
pub(crate) struct Latency {
    pub(crate) samples: Vec<u64>,
    pub(crate) cpu: Cpu,
    pub(crate) elapsed: Duration,
    /// Sessions whose TLS handshake with the client resumed (new sessions over TLS only).
    pub(crate) resumed: usize,
}

/// `n` sequential 32-byte round trips on one session per route, the routes taking turns in
/// batches of `RTT_BATCH` (in rotating order) so that a burst of noise from elsewhere on the
/// machine lands on all of them alike instead of spoiling one route's percentiles.
pub(crate) fn round_trips(routes: &[(&Endpoint, Meter)], n: usize) -> Res<Vec<(Route, Latency)>> {
    let fail = |r: Route, what: String| format!("{}: round trips: {what}", r.name());
    let mut sessions = Vec::with_capacity(routes.len());
    for (ep, meter) in routes {
        let r = ep.route;
        let mut c = ep.open("echo-rtt", None).map_err(|e| fail(r, e))?;
        for i in 0..WARMUP_TRIPS {
            c.echo(i as u64).map_err(|e| fail(r, e))?;
        }
        let lat = Latency {
            samples: Vec::with_capacity(n),
            cpu: Cpu::default(),
            elapsed: Duration::ZERO,
            resumed: 0,
        };
        sessions.push((r, *meter, c, lat));
    }
    let batches = n.div_ceil(RTT_BATCH);
    for b in 0..batches {
        let count = RTT_BATCH.min(n - b * RTT_BATCH);
        let len = sessions.len();
        for turn in 0..len {
            let (r, meter, c, lat) = &mut sessions[(turn + b) % len];
            let before = meter.read()?;
            let t0 = Instant::now();
            for i in 0..count {
                let t = Instant::now();
                c.echo((b * RTT_BATCH + i) as u64)
                    .map_err(|e| fail(*r, e))?;
                lat.samples.push(t.elapsed().as_nanos() as u64);
            }
            lat.elapsed += t0.elapsed();
            let cpu = meter.read()?.since(before);
            lat.cpu = Cpu {
                run: lat.cpu.run + cpu.run,
                user: lat.cpu.user + cpu.user,
                sys: lat.cpu.sys + cpu.sys,
            };
        }
    }
    let mut out = Vec::with_capacity(sessions.len());
    for (r, _, mut c, lat) in sessions {
        c.close().map_err(|e| fail(r, e))?;
        out.push((r, lat));
    }
    Ok(out)
}

/// One session of the concurrent workload, driven by the mio client.
pub(crate) struct CSession {
    pub(crate) sock: mio::net::TcpStream,
    pub(crate) rbuf: [u8; 64],
    pub(crate) rlen: usize,
    pub(crate) sent_at: Instant,
    pub(crate) done: usize,
    /// Bytes of the current request not yet written.
    pub(crate) pending: Vec<u8>,
    pub(crate) finished: bool,
}

pub(crate) const ECHO_REPLY: usize = 2 + ECHO_LEN;

impl CSession {
    pub(crate) fn send_next(&mut self, id: usize) -> io::Result<()> {
        echo_request(&mut self.pending, ((id as u64) << 32) | self.done as u64);
        self.sent_at = Instant::now();
        self.flush()
    }

    pub(crate) fn flush(&mut self) -> io::Result<()> {
        write_pending(&mut self.sock, &mut self.pending)
    }
}

/// Replace `pending` with the masked echo request numbered `seq`.
pub(crate) fn echo_request(pending: &mut Vec<u8>, seq: u64) {
    pending.clear();
    push_frame(pending, 0x82, &echo_payload(seq), Some(mask_for(seq)));
}

/// Write as much of `pending` as the non-blocking `sock` takes (the rest
/// waits for its writable event).
pub(crate) fn write_pending(sock: &mut impl Write, pending: &mut Vec<u8>) -> io::Result<()> {
    while !pending.is_empty() {
        match sock.write(pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `k` sessions, each doing `trips` sequential round trips, all at once, from one mio thread.
/// Only plain client connections (not the direct route to a TLS origin).
pub(crate) fn concurrent(
    ep: &Endpoint,
    meter: Meter,
    k: usize,
    trips: usize,
    origin: &Origin,
) -> Res<Latency> {
    let fail = |what: String| format!("{}: concurrent: {what}", ep.route.name());
    let open_before = origin.open();
    let mut poll = Poll::new().map_err(|e| fail(e.to_string()))?;
    let mut sessions = Vec::with_capacity(k);
    for i in 0..k {
        let c = ep.open(&format!("echo-conc-{i}"), None).map_err(fail)?;
        let ClientStream::Plain(tcp) = c.s else {
            return Err(fail("the concurrent client speaks plain TCP only".into()));
        };
        if c.start != c.buf.len() {
            return Err(fail("bytes before the first request".into()));
        }
        tcp.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let mut sock = mio::net::TcpStream::from_std(tcp);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| fail(e.to_string()))?;
        sessions.push(CSession {
            sock,
            rbuf: [0; 64],
            rlen: 0,
            sent_at: Instant::now(),
            done: 0,
            pending: Vec::with_capacity(64),
            finished: false,
        });
    }
    let mut samples = Vec::with_capacity(k * trips);
    let mut events = Events::with_capacity(1024);
    let before = meter.read()?;
    let t0 = Instant::now();
    for (i, s) in sessions.iter_mut().enumerate() {
        s.send_next(i).map_err(|e| fail(format!("send: {e}")))?;
    }
    let mut remaining = k;
    let deadline = t0 + IO_TIMEOUT * 4;
    while remaining > 0 {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "{remaining} sessions unfinished after {:?}",
                IO_TIMEOUT * 4
            )));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| fail(format!("poll: {e}")))?;
        for ev in events.iter() {
            let i = ev.token().0;
            let s = &mut sessions[i];
            s.flush()
                .map_err(|e| fail(format!("session {i}: send: {e}")))?;
            // Bounded: each read fills rbuf further or ends in WouldBlock.
            loop {
                if s.rlen == s.rbuf.len() {
                    return Err(fail(format!("session {i}: more than one reply")));
                }
                match s.sock.read(&mut s.rbuf[s.rlen..]) {
                    Ok(0) => return Err(fail(format!("session {i}: closed early"))),
                    Ok(n) => s.rlen += n,
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(fail(format!("session {i}: read: {e}"))),
                }
                if s.rlen >= ECHO_REPLY {
                    let seq = ((i as u64) << 32) | s.done as u64;
                    if s.rlen > ECHO_REPLY
                        || s.rbuf[..2] != [0x82, ECHO_LEN as u8]
                        || s.rbuf[2..ECHO_REPLY] != echo_payload(seq)
                    {
                        return Err(fail(format!("session {i}: wrong echo #{}", s.done)));
                    }
                    samples.push(s.sent_at.elapsed().as_nanos() as u64);
                    s.rlen = 0;
                    s.done += 1;
                    if s.done < trips {
                        s.send_next(i).map_err(|e| fail(format!("send: {e}")))?;
                    } else if !s.finished {
                        s.finished = true;
                        remaining -= 1;
                    }
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    let cpu = meter.read()?.since(before);

    // Close every session (close 1000), then wait for each to be closed by the server.
    for (i, s) in sessions.iter_mut().enumerate() {
        s.pending.clear();
        push_frame(
            &mut s.pending,
            0x88,
            &1000u16.to_be_bytes(),
            Some(mask_for(i as u64)),
        );
        s.flush()
            .map_err(|e| fail(format!("session {i}: send close: {e}")))?;
    }
    let mut open = k;
    let mut closed = vec![false; k];
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut scratch = [0u8; 256];
    while open > 0 {
        if Instant::now() > deadline {
            return Err(fail(format!("{open} sessions not closed by the server")));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| fail(format!("poll: {e}")))?;
        for ev in events.iter() {
            let i = ev.token().0;
            if closed[i] {
                continue;
            }
            let s = &mut sessions[i];
            s.flush()
                .map_err(|e| fail(format!("session {i}: send close: {e}")))?;
            loop {
                match s.sock.read(&mut scratch) {
                    Ok(0) => {
                        closed[i] = true;
                        open -= 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(fail(format!("session {i}: closing: {e}"))),
                }
            }
        }
    }
    drop(sessions);
    origin.wait_drained(open_before, &fail("closing".into()))?;
    Ok(Latency {
        samples,
        cpu,
        elapsed,
        resumed: 0,
    })
}

/// `m` sessions from `NEW_THREADS` threads: connect, upgrade, one echo, close. Tokens are
/// minted beforehand (nginx gets the same request shape).
pub(crate) fn new_sessions(ep: &Endpoint, meter: Meter, m: usize, origin: &Origin) -> Res<Latency> {
    let fail = |what: String| format!("{}: new sessions: {what}", ep.route.name());
    let open_before = origin.open();
    let exp = tokens::now() + 3600;
    let work: Arc<Vec<(String, Option<String>)>> = Arc::new(
        (0..m)
            .map(|i| {
                let vmi = format!("echo-new-{i}");
                let token = match ep.route {
                    Route::Direct => None,
                    _ => Some(tokens::mint(tokens::SECRET, NS, &[&vmi], exp)),
                };
                (vmi, token)
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(NEW_THREADS + 1));
    let mut handles = Vec::with_capacity(NEW_THREADS);
    for _ in 0..NEW_THREADS {
        let (ep, work, next, barrier) = (ep.clone(), work.clone(), next.clone(), barrier.clone());
        let h = thread::Builder::new()
            .name("new-sessions".into())
            .spawn(move || -> Res<(Vec<u64>, usize)> {
                barrier.wait();
                let mut samples = Vec::new();
                let mut resumed = 0;
                // Bounded: each pass takes one of the m sessions.
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((vmi, token)) = work.get(i) else {
                        return Ok((samples, resumed));
                    };
                    let t = Instant::now();
                    let mut c = ep.open(vmi, token.as_deref())?;
                    resumed += usize::from(c.resumed);
                    c.echo(i as u64)?;
                    c.close()?;
                    samples.push(t.elapsed().as_nanos() as u64);
                }
            })
            .map_err(|e| fail(format!("spawn: {e}")))?;
        handles.push(h);
    }
    let before = meter.read()?;
    barrier.wait();
    let t0 = Instant::now();
    let mut samples = Vec::with_capacity(m);
    let mut resumed = 0;
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok((s, n))) => {
                samples.extend(s);
                resumed += n;
            }
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => first_error = first_error.or(Some("a client thread panicked".into())),
        }
    }
    let elapsed = t0.elapsed();
    let cpu = meter.read()?.since(before);
    if let Some(e) = first_error {
        return Err(fail(e));
    }
    origin.wait_drained(open_before, &fail("closing".into()))?;
    Ok(Latency {
        samples,
        cpu,
        elapsed,
        resumed,
    })
}

/// One idle-memory sample on a fresh process.
pub(crate) struct Idle {
    /// Connect to 101, per session, as they were opened one after the other (ns).
    pub(crate) upgrade_ns: Vec<u64>,
    pub(crate) start: u64,
    pub(crate) half: u64,
    pub(crate) full: u64,
    pub(crate) sessions: usize,
    pub(crate) idle_cpu: Cpu,
    pub(crate) idle_wall: Duration,
    pub(crate) open_wall: Duration,
    pub(crate) peak: u64,
}

impl Idle {
    pub(crate) fn per_session_kib(&self) -> f64 {
        (self.full as f64 - self.start as f64) / self.sessions as f64
    }

    pub(crate) fn marginal_kib(&self) -> f64 {
        let added = self.sessions - self.sessions / 2;
        (self.full as f64 - self.half as f64) / added.max(1) as f64
    }

    pub(crate) fn idle_cpu_percent(&self) -> f64 {
        100.0 * self.idle_cpu.run / self.idle_wall.as_secs_f64()
    }
}

/// Opens `k` sessions (one echo each) through `ep`, reads `pid`'s settled RSS at 0, k/2 and
/// k sessions, then closes them all and waits until the origin has seen them go.
pub(crate) fn idle_sessions(ep: &Endpoint, pid: u32, k: usize, origin: &Origin) -> Res<Idle> {
    let fail = |what: String| format!("{}: idle sessions: {what}", ep.route.name());
    let open_before = origin.open();
    let exp = tokens::now() + 3600;
    let mut upgrade_ns = Vec::with_capacity(k);
    let mut open = |range: std::ops::Range<usize>| -> Res<Vec<Client>> {
        range
            .map(|i| {
                let vmi = format!("echo-idle-{i}");
                let token = tokens::mint(tokens::SECRET, NS, &[&vmi], exp);
                let t = Instant::now();
                let mut c = ep.open(&vmi, Some(&token))?;
                upgrade_ns.push(t.elapsed().as_nanos() as u64);
                c.echo(i as u64)?;
                c.shrink();
                Ok(c)
            })
            .collect::<Res<Vec<Client>>>()
            .map_err(fail)
    };
    let start = settled_rss_kib(pid)?;
    let t0 = Instant::now();
    let mut held = open(0..k / 2)?;
    let mut open_wall = t0.elapsed();
    let half = settled_rss_kib(pid)?;
    let t1 = Instant::now();
    held.extend(open(k / 2..k)?);
    open_wall += t1.elapsed();
    // The settling wait doubles as the idle window: nothing is sent meanwhile.
    let (cpu_before, t2) = (cpu_of(pid)?, Instant::now());
    let full = settled_rss_kib(pid)?;
    let (idle_cpu, idle_wall) = (cpu_of(pid)?.since(cpu_before), t2.elapsed());
    let peak = status_kib(pid, "VmHWM")?;
    // Two passes, so the server handles the closing handshakes concurrently.
    for c in &mut held {
        c.start_close().map_err(fail)?;
    }
    for c in &mut held {
        c.finish_close().map_err(fail)?;
    }
    drop(held);
    origin.wait_drained(open_before, &fail("closing".into()))?;
    Ok(Idle {
        upgrade_ns,
        start,
        half,
        full,
        sessions: k,
        idle_cpu,
        idle_wall,
        open_wall,
        peak,
    })
}
