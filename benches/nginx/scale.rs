//! Latency at scale and a handshake flood beside real sessions (issue 16, points 3 and 4).
//!
//! Both run in every round of the plain variant, after the other workloads, on every route the
//! round measures whose client side is plain TCP (the routes come from the variant, so a route
//! added there is measured here too), the routes in the round's order.
//!
//! **At scale.** A sessions (`BENCH_SCALE_ACTIVE`, 1,000) each send a 32-byte message every
//! `BENCH_SCALE_GAP_MS` (100 ms; the sessions staggered evenly over the gap, so that the load is
//! a steady A/gap messages per second rather than bursts) and time its echo, `BENCH_SCALE_TRIPS`
//! (30) times per measurement, from one mio thread, while the other sessions of S in all
//! (`BENCH_SCALE_OPEN`, 9,000) stay open and silent (each did one echo when it was opened, so
//! both of its connections are established). The same A sessions are measured with only
//! themselves open and with S open (in even rounds A first, then the idle ones are opened; in
//! odd rounds all S first, then the idle ones are closed), and the proxy's CPU per round trip
//! is compared between the two: if the loop's work per event does not grow with the number of
//! idle sessions, the ratio S/A is about 1.
//!
//! **Flood.** `BENCH_FLOOD_ECHO` (100) sessions echo as above (every `BENCH_FLOOD_GAP_MS`, 10
//! ms, `BENCH_FLOOD_TRIPS`, 200, times) once without and once with 16 client threads opening
//! connections as fast as they can (the order alternating per round): each connects, sends a
//! WebSocket upgrade whose token is a well-formed HS256 JWT signed with the wrong key (the
//! route's usual request shape: our proxy must check the signature to refuse it), reads the
//! response head and drops the connection. Our proxy answers 401; nginx checks no token, so it
//! forwards the request, the origin answers 101, nginx relays the 101 and then, on the client's
//! FIN, closes its upstream connection; the direct route is the origin answering 101 itself.
//! The statuses seen are reported per route. Where the bench is pinned (`BENCH_PIN` one or
//! split) the flood threads run on the CPUs other than the last, so that they load the proxy
//! rather than take the CPU of the echo client they are meant to disturb.
//!
//! Every echo is checked; the flood's responses must be complete HTTP heads (our proxy's
//! must be 401), any I/O error fails the bench.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::client::{Client, ClientStream, Endpoint, Route};
use crate::frames::{echo_payload, mask_for, parse_head, push_frame};
use crate::knobs::{Pin, nofile_limits};
use crate::origin::{Origin, would_block};
use crate::process::Cpu;
use crate::support::knobs::env_num;
use crate::support::stats::{median, percentile_us};
use crate::variant::VariantResults;
use crate::workloads::{Meter, echo_request, write_pending};
use crate::{ECHO_LEN, FD_RESERVE, IO_TIMEOUT, MAX_HEAD, NEW_THREADS, NS, Res, tokens};

/// The HMAC key of the flood's tokens: not the proxy's, so every one fails the signature check.
const WRONG_SECRET: &str = "not-the-bench-secret-but-as-long-as-one-0123";
/// Distinct bad tokens the flood cycles through (a verifier may cache good tokens, and an
/// attacker would not repeat one).
const FLOOD_TOKENS: usize = 1024;
/// How long the flood runs before the echo measurement starts.
const FLOOD_RAMP: Duration = Duration::from_millis(200);
/// A ratio S/A of CPU per round trip up to this counts as "does not grow".
const FLAT_LIMIT: f64 = 1.10;
/// Echo p99 with the flood at most this times without it.
const FLOOD_LIMIT: f64 = 2.0;

/// The knobs of these two workloads (`BENCH_SCALE*`, `BENCH_FLOOD_*`).
pub(crate) struct ScaleKnobs {
    /// `BENCH_SCALE` (1; 0 skips both workloads).
    pub(crate) on: bool,
    /// S: sessions open at the higher level, active ones included.
    pub(crate) open: usize,
    /// A: sessions exchanging messages.
    pub(crate) active: usize,
    pub(crate) trips: usize,
    pub(crate) gap: Duration,
    pub(crate) flood_echo: usize,
    pub(crate) flood_trips: usize,
    pub(crate) flood_gap: Duration,
    /// Why S or A is smaller than asked, if it is.
    pub(crate) note: Option<String>,
}

impl ScaleKnobs {
    /// Reads the knobs (tiny defaults in smoke mode) and fits S to the open-files limit, which
    /// the caller has raised already.
    pub(crate) fn from_env(smoke: bool) -> Res<ScaleKnobs> {
        let d = if smoke {
            (60, 20, 5, 5, 10, 20, 5)
        } else {
            (9000, 1000, 30, 100, 100, 200, 10)
        };
        let mut k = ScaleKnobs {
            on: std::env::var("BENCH_SCALE").map_or(true, |v| v != "0" && v != "false"),
            open: env_num("BENCH_SCALE_OPEN", d.0)?,
            active: env_num("BENCH_SCALE_ACTIVE", d.1)?,
            trips: env_num("BENCH_SCALE_TRIPS", d.2)?,
            gap: Duration::from_millis(env_num("BENCH_SCALE_GAP_MS", d.3)?),
            flood_echo: env_num("BENCH_FLOOD_ECHO", d.4)?,
            flood_trips: env_num("BENCH_FLOOD_TRIPS", d.5)?,
            flood_gap: Duration::from_millis(env_num("BENCH_FLOOD_GAP_MS", d.6)?),
            note: None,
        };
        let (soft, _) = nofile_limits()?;
        // Two descriptors per session in this process (client and origin side), two in the
        // proxy (which inherits the limit).
        let fits = (soft.saturating_sub(FD_RESERVE) / 2) as usize;
        let mut notes = Vec::new();
        if k.open > fits {
            notes.push(format!(
                "open sessions at scale reduced from {} to {fits}: the open-files limit is \
                 {soft} and each holds two descriptors in the bench process (client and origin) \
                 and two in the proxy",
                k.open
            ));
            k.open = fits.max(2);
        }
        if k.active > k.open {
            notes.push(format!(
                "active sessions reduced from {} to {}, the open ones",
                k.active, k.open
            ));
            k.active = k.open;
        }
        if !notes.is_empty() {
            let note = notes.join("; ");
            eprintln!("bench nginx: {note}");
            k.note = Some(note);
        }
        Ok(k)
    }

    /// Sessions open at once through one proxy during these workloads (0 when skipped): the
    /// proxies' connection limits must hold them.
    pub(crate) fn peak(&self) -> usize {
        if self.on {
            self.open.max(self.flood_echo + NEW_THREADS)
        } else {
            0
        }
    }

    pub(crate) fn command_knobs(&self) -> String {
        format!(
            "BENCH_SCALE={} BENCH_SCALE_OPEN={} BENCH_SCALE_ACTIVE={} BENCH_SCALE_TRIPS={} \
             BENCH_SCALE_GAP_MS={} BENCH_FLOOD_ECHO={} BENCH_FLOOD_TRIPS={} BENCH_FLOOD_GAP_MS={}",
            u8::from(self.on),
            self.open,
            self.active,
            self.trips,
            self.gap.as_millis(),
            self.flood_echo,
            self.flood_trips,
            self.flood_gap.as_millis()
        )
    }
}

/// One paced echo measurement.
pub(crate) struct Paced {
    pub(crate) samples: Vec<u64>,
    /// CPU of the route's process meanwhile (zero for direct).
    pub(crate) cpu: Cpu,
}

impl Paced {
    pub(crate) fn p(&self, q: f64) -> f64 {
        percentile_us(&self.samples, q)
    }

    /// CPU per round trip in µs (NaN without a process to measure).
    pub(crate) fn cpu_per_trip_us(&self, measured: bool) -> f64 {
        if measured && !self.samples.is_empty() {
            1e6 * self.cpu.run / self.samples.len() as f64
        } else {
            f64::NAN
        }
    }
}

/// One round's sample of the at-scale workload on one route.
pub(crate) struct AtScale {
    /// Only the A active sessions open.
    pub(crate) low: Paced,
    /// S sessions open, A of them active.
    pub(crate) high: Paced,
    pub(crate) measured: bool,
}

/// One round's sample of the flood workload on one route.
pub(crate) struct Flooded {
    pub(crate) quiet: Paced,
    pub(crate) flooded: Paced,
    pub(crate) measured: bool,
    /// Flood connections answered, and over how long.
    pub(crate) attempts: usize,
    pub(crate) flood_wall: Duration,
    /// CPU of the route's process over the flood's whole duration.
    pub(crate) flood_cpu: Cpu,
    /// Response statuses the flood got, with counts.
    pub(crate) statuses: Vec<(u16, usize)>,
}

/// Samples of both workloads, per route, over the rounds.
#[derive(Default)]
pub(crate) struct ScaleResults {
    pub(crate) at_scale: Vec<(Route, AtScale)>,
    pub(crate) flood: Vec<(Route, Flooded)>,
}

/// One round of both workloads on every route in `routes` (in that order) whose client side is
/// plain TCP.
pub(crate) fn round(
    res: &mut ScaleResults,
    k: &ScaleKnobs,
    pin: Pin,
    routes: &[(&Endpoint, Meter)],
    origin: &Origin,
    round: usize,
) -> Res<()> {
    let plain: Vec<&(&Endpoint, Meter)> =
        routes.iter().filter(|(ep, _)| ep.tls.is_none()).collect();
    // Nothing to compare when only the direct route speaks plain TCP to this client.
    if plain.iter().all(|(ep, _)| ep.route == Route::Direct) {
        return Ok(());
    }
    for (ep, meter) in &plain {
        let s = at_scale(ep, *meter, k, origin, round % 2 == 1)?;
        eprintln!(
            "bench nginx [plain] at scale, {}: p99 {:.0} µs with {} open, {:.0} µs with {} open",
            ep.route.name(),
            s.low.p(0.99),
            k.active,
            s.high.p(0.99),
            k.open
        );
        res.at_scale.push((ep.route, s));
    }
    for (ep, meter) in &plain {
        let f = flood(ep, *meter, k, pin, origin, round % 2 == 1)?;
        eprintln!(
            "bench nginx [plain] flood, {}: echo p99 {:.0} µs quiet, {:.0} µs flooded ({:.0} \
             handshakes/s)",
            ep.route.name(),
            f.quiet.p(0.99),
            f.flooded.p(0.99),
            f.attempts as f64 / f.flood_wall.as_secs_f64()
        );
        res.flood.push((ep.route, f));
    }
    Ok(())
}

/// The at-scale workload on one route: A active sessions measured with A and with S open.
fn at_scale(
    ep: &Endpoint,
    meter: Meter,
    k: &ScaleKnobs,
    origin: &Origin,
    high_first: bool,
) -> Res<AtScale> {
    let fail = |what: String| format!("{}: at scale: {what}", ep.route.name());
    let open_before = origin.open();
    let mut active = Active::open(ep, "scale-active", k.active).map_err(fail)?;
    let idle_count = k.open - k.active;
    let (low, high);
    if high_first {
        let idle = open_idle(ep, idle_count).map_err(fail)?;
        high = active.measure(meter, k.trips, k.gap).map_err(fail)?;
        close_idle(idle).map_err(fail)?;
        origin.wait_drained(
            open_before + k.active,
            &fail("closing the idle ones".into()),
        )?;
        low = active.measure(meter, k.trips, k.gap).map_err(fail)?;
    } else {
        low = active.measure(meter, k.trips, k.gap).map_err(fail)?;
        let idle = open_idle(ep, idle_count).map_err(fail)?;
        high = active.measure(meter, k.trips, k.gap).map_err(fail)?;
        close_idle(idle).map_err(fail)?;
    }
    active.close().map_err(fail)?;
    origin.wait_drained(open_before, &fail("closing".into()))?;
    Ok(AtScale {
        low,
        high,
        measured: meter.0.is_some(),
    })
}

/// Opens `n` silent sessions, one echo each (so both of their connections are up).
fn open_idle(ep: &Endpoint, n: usize) -> Res<Vec<Client>> {
    (0..n)
        .map(|i| {
            let mut c = ep.open(&format!("scale-idle-{i}"), None)?;
            c.echo(i as u64)?;
            c.shrink();
            Ok(c)
        })
        .collect()
}

/// Closes silent sessions in two passes, so that the server handles the closes concurrently.
fn close_idle(mut idle: Vec<Client>) -> Res<()> {
    for c in &mut idle {
        c.start_close()?;
    }
    for c in &mut idle {
        c.finish_close()?;
    }
    Ok(())
}

/// One session of the paced echo client.
struct ASession {
    sock: mio::net::TcpStream,
    /// Received, not yet parsed.
    rbuf: Vec<u8>,
    /// Bytes of the current message not yet written.
    pending: Vec<u8>,
    sent_at: Instant,
    /// Echoes completed over the session's life (the sequence number of the next message).
    done: u64,
    /// Echoes completed in the current measurement.
    this_time: usize,
}

impl ASession {
    fn seq(&self, id: usize) -> u64 {
        ((id as u64) << 32) | self.done
    }

    fn send_next(&mut self, id: usize) -> Res<()> {
        let seq = self.seq(id);
        echo_request(&mut self.pending, seq);
        self.sent_at = Instant::now();
        self.flush()
    }

    fn flush(&mut self) -> Res<()> {
        write_pending(&mut self.sock, &mut self.pending).map_err(|e| format!("send: {e}"))
    }

    /// Reads what has arrived (until WouldBlock); `Ok(true)` at EOF.
    fn read_all(&mut self) -> Res<bool> {
        let mut scratch = [0u8; 4096];
        // Bounded: each read returns data, EOF or WouldBlock; the buffer is capped.
        loop {
            if self.rbuf.len() > MAX_HEAD {
                return Err("more unparsed input than any reply".into());
            }
            match self.sock.read(&mut scratch) {
                Ok(0) => return Ok(true),
                Ok(n) => self.rbuf.extend_from_slice(&scratch[..n]),
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The next whole frame in `rbuf`: (opcode, payload), removed from it.
    fn next_frame(&mut self) -> Res<Option<(u8, Vec<u8>)>> {
        let Some(h) = parse_head(&self.rbuf) else {
            return Ok(None);
        };
        if h.mask.is_some() || h.len > MAX_HEAD {
            return Err(format!(
                "unexpected frame from the server ({} bytes)",
                h.len
            ));
        }
        if self.rbuf.len() < h.total() {
            return Ok(None);
        }
        let payload = self.rbuf[h.header_len..h.total()].to_vec();
        self.rbuf.drain(..h.total());
        Ok(Some((h.opcode(), payload)))
    }
}

/// Sessions driven by one mio poll, pacing their messages.
struct Active {
    poll: Poll,
    sessions: Vec<ASession>,
}

impl Active {
    fn open(ep: &Endpoint, prefix: &str, n: usize) -> Res<Active> {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let mut sessions = Vec::with_capacity(n);
        for i in 0..n {
            let c = ep.open(&format!("{prefix}-{i}"), None)?;
            if c.start != c.buf.len() {
                return Err("bytes before the first message".into());
            }
            let ClientStream::Plain(tcp) = c.s else {
                return Err("the paced client speaks plain TCP only".into());
            };
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut sock = mio::net::TcpStream::from_std(tcp);
            poll.registry()
                .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| format!("register: {e}"))?;
            sessions.push(ASession {
                sock,
                rbuf: Vec::new(),
                pending: Vec::with_capacity(64),
                sent_at: Instant::now(),
                done: 0,
                this_time: 0,
            });
        }
        Ok(Active { poll, sessions })
    }

    /// Every session sends `trips` messages, one every `gap` (the sessions staggered over the
    /// gap; a message whose echo is late goes as soon as it is back), timing each echo.
    fn measure(&mut self, meter: Meter, trips: usize, gap: Duration) -> Res<Paced> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let n = self.sessions.len();
        let mut samples = Vec::with_capacity(n * trips);
        let mut events = Events::with_capacity(1024);
        let t0 = Instant::now();
        let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..n)
            .map(|i| Reverse((t0 + gap.mul_f64(i as f64 / n as f64), i)))
            .collect();
        for s in &mut self.sessions {
            s.this_time = 0;
        }
        let before = meter.read()?;
        let mut finished = 0;
        // Bounded by the deadline: the schedule takes trips x gap plus the echoes' time.
        let deadline = t0 + gap * trips as u32 + IO_TIMEOUT;
        while finished < n {
            let now = Instant::now();
            if now > deadline {
                return Err(format!(
                    "{} sessions unfinished at the deadline",
                    n - finished
                ));
            }
            while let Some(&Reverse((at, i))) = due.peek() {
                if at > now {
                    break;
                }
                due.pop();
                self.sessions[i].send_next(i)?;
            }
            let timeout = due
                .peek()
                .map_or(Duration::from_millis(100), |Reverse((at, _))| {
                    at.saturating_duration_since(now)
                        .min(Duration::from_millis(100))
                });
            self.poll
                .poll(&mut events, Some(timeout))
                .map_err(|e| format!("poll: {e}"))?;
            for ev in events.iter() {
                let i = ev.token().0;
                let s = &mut self.sessions[i];
                s.flush().map_err(|e| format!("session {i}: {e}"))?;
                if s.read_all().map_err(|e| format!("session {i}: {e}"))? {
                    return Err(format!("session {i}: closed by the server"));
                }
                while let Some((op, payload)) =
                    s.next_frame().map_err(|e| format!("session {i}: {e}"))?
                {
                    match op {
                        // Keepalive pings (the proxy pings a silent side): not an echo.
                        0x9 | 0xA => continue,
                        0x2 if payload.len() == ECHO_LEN && payload == echo_payload(s.seq(i)) => {}
                        _ => {
                            return Err(format!(
                                "session {i}: echo #{} came back as opcode {op:#x}, {} bytes",
                                s.done,
                                payload.len()
                            ));
                        }
                    }
                    samples.push(s.sent_at.elapsed().as_nanos() as u64);
                    s.done += 1;
                    s.this_time += 1;
                    if s.this_time < trips {
                        due.push(Reverse((s.sent_at + gap, i)));
                    } else {
                        finished += 1;
                    }
                }
            }
        }
        let cpu = meter.read()?.since(before);
        Ok(Paced { samples, cpu })
    }

    /// Sends close 1000 on every session, then waits for each to be closed by the server.
    fn close(self) -> Res<()> {
        let Active {
            mut poll,
            mut sessions,
        } = self;
        for (i, s) in sessions.iter_mut().enumerate() {
            s.pending.clear();
            push_frame(
                &mut s.pending,
                0x88,
                &1000u16.to_be_bytes(),
                Some(mask_for(i as u64)),
            );
            s.flush().map_err(|e| format!("session {i}: close: {e}"))?;
        }
        let mut open = sessions.len();
        let mut closed = vec![false; sessions.len()];
        let mut events = Events::with_capacity(1024);
        let deadline = Instant::now() + IO_TIMEOUT;
        // A session whose EOF came before this loop gets no new event: check each once first.
        let mut todo: Vec<usize> = (0..sessions.len()).collect();
        while open > 0 {
            for i in todo.drain(..) {
                if closed[i] {
                    continue;
                }
                let s = &mut sessions[i];
                s.flush().map_err(|e| format!("session {i}: close: {e}"))?;
                // What precedes EOF (the close reply, a late ping) is read and dropped.
                if s.read_all()
                    .map_err(|e| format!("session {i}: closing: {e}"))?
                {
                    closed[i] = true;
                    open -= 1;
                }
                s.rbuf.clear();
            }
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{open} sessions not closed by the server"));
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| format!("poll: {e}"))?;
            todo.extend(events.iter().map(|ev| ev.token().0));
        }
        Ok(())
    }
}

/// The flood workload on one route: the echo sessions measured without and with the flood.
fn flood(
    ep: &Endpoint,
    meter: Meter,
    k: &ScaleKnobs,
    pin: Pin,
    origin: &Origin,
    flooded_first: bool,
) -> Res<Flooded> {
    let fail = |what: String| format!("{}: flood: {what}", ep.route.name());
    let open_before = origin.open();
    let mut active = Active::open(ep, "flood-echo", k.flood_echo).map_err(fail)?;
    let mut quiet = None;
    if !flooded_first {
        quiet = Some(
            active
                .measure(meter, k.flood_trips, k.flood_gap)
                .map_err(fail)?,
        );
    }
    let flooder = Flooder::start(ep, pin, meter).map_err(fail)?;
    thread::sleep(FLOOD_RAMP);
    let measured = active.measure(meter, k.flood_trips, k.flood_gap);
    // Stop the flood whatever the measurement gave, then report the first failure.
    let (attempts, flood_wall, flood_cpu, statuses) = flooder.stop(meter).map_err(fail)?;
    let flooded = measured.map_err(fail)?;
    let quiet = match quiet {
        Some(q) => q,
        None => active
            .measure(meter, k.flood_trips, k.flood_gap)
            .map_err(fail)?,
    };
    active.close().map_err(fail)?;
    origin.wait_drained(open_before, &fail("closing".into()))?;
    if ep.route == Route::Ours && statuses.iter().any(|&(code, _)| code != 401) {
        return Err(fail(format!(
            "our proxy answered the bad tokens with {statuses:?}, not only 401"
        )));
    }
    Ok(Flooded {
        quiet,
        flooded,
        measured: meter.0.is_some(),
        attempts,
        flood_wall,
        flood_cpu,
        statuses,
    })
}

/// The flood's client threads.
struct Flooder {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
    statuses: Arc<Mutex<Vec<(u16, usize)>>>,
    threads: Vec<thread::JoinHandle<Res<()>>>,
    started: Instant,
    cpu_before: Cpu,
}

impl Flooder {
    fn start(ep: &Endpoint, pin: Pin, meter: Meter) -> Res<Flooder> {
        let exp = tokens::now() + 3600;
        // The route's usual path with a bad token in it (the direct route's has none).
        let requests: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..FLOOD_TOKENS)
                .map(|i| {
                    let vmi = format!("flood-{i}");
                    let token = tokens::mint(WRONG_SECRET, NS, &[&vmi], exp);
                    let auth = ep
                        .bearer
                        .as_deref()
                        .map_or(String::new(), |b| format!("Authorization: Bearer {b}\r\n"));
                    format!(
                        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: \
                         Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                         Sec-WebSocket-Version: 13\r\n{auth}\r\n",
                        ep.path(&vmi, Some(&token)),
                        ep.addr
                    )
                    .into_bytes()
                })
                .collect(),
        );
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let place = (pin != Pin::Off && cpus >= 2).then(|| {
            if cpus == 2 {
                "0".to_string()
            } else {
                format!("0-{}", cpus - 2)
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::with_capacity(NEW_THREADS);
        let cpu_before = meter.read()?;
        for t in 0..NEW_THREADS {
            let (stop, attempts, statuses, requests) = (
                Arc::clone(&stop),
                Arc::clone(&attempts),
                Arc::clone(&statuses),
                Arc::clone(&requests),
            );
            let (addr, place) = (ep.addr, place.clone());
            let h = thread::Builder::new()
                .name("flood".into())
                .spawn(move || -> Res<()> {
                    if let Some(cpus) = &place {
                        pin_this_thread(cpus);
                    }
                    let mut mine: Vec<(u16, usize)> = Vec::new();
                    let mut i = t;
                    // Bounded by the stop flag; every step is bounded by the socket timeouts.
                    while !stop.load(Ordering::Relaxed) {
                        let code = flood_once(addr, &requests[i % requests.len()])?;
                        match mine.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, n)) => *n += 1,
                            None => mine.push((code, 1)),
                        }
                        attempts.fetch_add(1, Ordering::Relaxed);
                        i += NEW_THREADS;
                    }
                    let mut all = statuses.lock().unwrap_or_else(|e| e.into_inner());
                    for (code, n) in mine {
                        match all.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, m)) => *m += n,
                            None => all.push((code, n)),
                        }
                    }
                    Ok(())
                })
                .map_err(|e| format!("spawn: {e}"))?;
            threads.push(h);
        }
        Ok(Flooder {
            stop,
            attempts,
            statuses,
            threads,
            started: Instant::now(),
            cpu_before,
        })
    }

    /// Stops and joins the threads: (attempts, wall time, CPU of the route's process, statuses).
    #[allow(clippy::type_complexity)]
    fn stop(self, meter: Meter) -> Res<(usize, Duration, Cpu, Vec<(u16, usize)>)> {
        self.stop.store(true, Ordering::Relaxed);
        let cpu = meter.read()?.since(self.cpu_before);
        let wall = self.started.elapsed();
        let mut first_error = None;
        for h in self.threads {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => first_error = first_error.or(Some("a flood thread panicked".into())),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut statuses = self
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        statuses.sort_unstable();
        Ok((self.attempts.load(Ordering::Relaxed), wall, cpu, statuses))
    }
}

/// One flood connection: connect, send the request, read the response head, drop. Returns
/// the status.
fn flood_once(addr: std::net::SocketAddr, request: &[u8]) -> Res<u16> {
    let mut tcp = TcpStream::connect(addr).map_err(|e| format!("flood: connect: {e}"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| tcp.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|_| tcp.set_nodelay(true))
        .map_err(|e| format!("flood: {e}"))?;
    tcp.write_all(request)
        .map_err(|e| format!("flood: send: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // Bounded: each read adds bytes or ends; the head is capped.
    loop {
        let n = tcp
            .read(&mut chunk)
            .map_err(|e| format!("flood: read: {e}"))?;
        if n == 0 {
            return Err("flood: closed before a response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return resp.code.ok_or_else(|| "flood: no status".to_string());
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("flood: response head too large".into()),
            Err(e) => return Err(format!("flood: bad response head: {e}")),
        }
    }
}

/// Moves the calling thread (not its process) to `cpus` (best effort, like `taskset`).
fn pin_this_thread(cpus: &str) {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let ok = tid.is_some_and(|tid| {
        std::process::Command::new("taskset")
            .args(["-c", "-p", cpus, &tid])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!("bench nginx: could not pin a flood thread to CPUs {cpus} (taskset)");
    }
}

/// The routes that have samples, in the bench's usual order.
fn present<T>(samples: &[(Route, T)]) -> Vec<Route> {
    Route::ALL
        .iter()
        .copied()
        .filter(|r| samples.iter().any(|(x, _)| x == r))
        .collect()
}

/// Median over the rounds of `f` of route `r`'s samples.
fn med<T>(samples: &[(Route, T)], r: Route, f: impl Fn(&T) -> f64) -> f64 {
    median(samples.iter().filter(|(x, _)| *x == r).map(|(_, s)| f(s)))
}

/// Each route's rounds, e.g. `ours 1 / 2, 3 / 4; nginx ...`.
fn per_round<T>(samples: &[(Route, T)], f: impl Fn(&T) -> String) -> String {
    present(samples)
        .into_iter()
        .map(|r| {
            let rounds: Vec<String> = samples
                .iter()
                .filter(|(x, _)| *x == r)
                .map(|(_, s)| f(s))
                .collect();
            format!("{} {}", r.name(), rounds.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "—".into()
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

/// The two workloads' section of the report (nothing when they did not run).
pub(crate) fn render(out: &mut String, k: &ScaleKnobs, variants: &[VariantResults]) {
    for v in variants {
        let (tls, res) = (v.tls, &v.scale);
        if res.at_scale.is_empty() && res.flood.is_empty() {
            continue;
        }
        let upstream = if tls {
            "TLS upstream"
        } else {
            "plain upstream"
        };
        let _ = writeln!(
            out,
            "#### Latency at scale and a handshake flood ({upstream}, issue 16 points 3 and 4)\n"
        );
        let _ = writeln!(out, "Knobs: `{}`.\n", k.command_knobs());
        if let Some(note) = &k.note {
            let _ = writeln!(out, "**Note:** {note}.\n");
        }
        render_at_scale(out, k, &res.at_scale);
        render_flood(out, k, &res.flood);
    }
}

fn render_at_scale(out: &mut String, k: &ScaleKnobs, s: &[(Route, AtScale)]) {
    if s.is_empty() {
        return;
    }
    let (a, open) = (k.active, k.open);
    let _ = writeln!(
        out,
        "{a} sessions each send a 32-byte message every {} ms and time its echo ({} per session \
         per measurement, medians of the rounds), once with only them open and once with {open} \
         open (the others silent). CPU is the route's process per round trip; S/A is the median \
         of each round's ratio of the two.\n",
        k.gap.as_millis(),
        k.trips
    );
    let _ = writeln!(
        out,
        "| route | p50 / p99, {a} open (µs) | p50 / p99, {open} open (µs) | CPU per round trip, \
         {a} / {open} open (µs) | CPU ratio {open}/{a} |\n|---|---:|---:|---:|---:|"
    );
    for r in present(s) {
        let _ = writeln!(
            out,
            "| {} | {} / {} | {} / {} | {} / {} | {} |",
            r.name(),
            num(med(s, r, |x| x.low.p(0.50)), 1),
            num(med(s, r, |x| x.low.p(0.99)), 1),
            num(med(s, r, |x| x.high.p(0.50)), 1),
            num(med(s, r, |x| x.high.p(0.99)), 1),
            num(med(s, r, |x| x.low.cpu_per_trip_us(x.measured)), 2),
            num(med(s, r, |x| x.high.cpu_per_trip_us(x.measured)), 2),
            num(med(s, r, flat_ratio), 2),
        );
    }
    let _ = writeln!(
        out,
        "Per round, p99 with {a} / {open} open (µs): {}.\n",
        per_round(s, |x| format!(
            "{:.0} / {:.0}",
            x.low.p(0.99),
            x.high.p(0.99)
        ))
    );
    let ours = |f: &dyn Fn(&AtScale) -> f64| med(s, Route::Ours, f);
    let peers: Vec<Route> = present(s)
        .into_iter()
        .filter(|&r| r != Route::Ours && r != Route::Direct)
        .collect();
    for (q, label) in [(0.50, "p50"), (0.99, "p99")] {
        let o = ours(&|x| x.high.p(q));
        let best = peers
            .iter()
            .map(|&r| med(s, r, |x| x.high.p(q)))
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "- Target: our round trip {label} with {open} open at most the best peer's \
             ({}): {} / {} µs, ratio {}: {}.",
            peers
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", "),
            num(o, 1),
            num(best, 1),
            num(o / best, 2),
            met(o <= best)
        );
    }
    let flat = ours(&flat_ratio);
    let _ = writeln!(
        out,
        "- Target: our CPU per round trip does not grow with the idle sessions (ratio {open}/{a} \
         at most {FLAT_LIMIT:.2}): {}: {}.\n",
        num(flat, 2),
        met(flat <= FLAT_LIMIT)
    );
}

fn flat_ratio(x: &AtScale) -> f64 {
    x.high.cpu_per_trip_us(x.measured) / x.low.cpu_per_trip_us(x.measured)
}

fn render_flood(out: &mut String, k: &ScaleKnobs, s: &[(Route, Flooded)]) {
    if s.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "{} sessions each send a 32-byte message every {} ms ({} per session), without and with \
         {NEW_THREADS} threads opening connections as fast as they can, each sending one \
         upgrade request with a wrongly signed HS256 token and dropping the connection once the \
         response head is in (our proxy checks the signature and answers 401; nginx checks no \
         token and forwards, the origin answers 101; direct is the origin answering 101). \
         Medians of the rounds; the ratio is the median of each round's flooded/quiet p99.\n",
        k.flood_echo,
        k.flood_gap.as_millis(),
        k.flood_trips
    );
    let _ = writeln!(
        out,
        "| route | echo p50 / p99, quiet (µs) | echo p50 / p99, flooded (µs) | p99 flooded/quiet \
         | flood connections/s | answered | CPU busy during the flood (% of a core) |\n\
         |---|---:|---:|---:|---:|---|---:|"
    );
    for r in present(s) {
        let statuses: Vec<String> = {
            let mut all: Vec<(u16, usize)> = Vec::new();
            for (_, f) in s.iter().filter(|(x, _)| *x == r) {
                for &(code, n) in &f.statuses {
                    match all.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, m)) => *m += n,
                        None => all.push((code, n)),
                    }
                }
            }
            all.sort_unstable();
            all.iter().map(|(c, n)| format!("{c} ×{n}")).collect()
        };
        let _ = writeln!(
            out,
            "| {} | {} / {} | {} / {} | {} | {} | {} | {} |",
            r.name(),
            num(med(s, r, |x| x.quiet.p(0.50)), 1),
            num(med(s, r, |x| x.quiet.p(0.99)), 1),
            num(med(s, r, |x| x.flooded.p(0.50)), 1),
            num(med(s, r, |x| x.flooded.p(0.99)), 1),
            num(med(s, r, flood_ratio), 2),
            num(
                med(s, r, |x| x.attempts as f64 / x.flood_wall.as_secs_f64()),
                0
            ),
            statuses.join(", "),
            num(
                med(s, r, |x| if x.measured {
                    100.0 * x.flood_cpu.run / x.flood_wall.as_secs_f64()
                } else {
                    f64::NAN
                }),
                0
            ),
        );
    }
    let _ = writeln!(
        out,
        "Per round, echo p99 quiet / flooded (µs): {}.\n",
        per_round(s, |x| format!(
            "{:.0} / {:.0}",
            x.quiet.p(0.99),
            x.flooded.p(0.99)
        ))
    );
    let ratio = med(s, Route::Ours, flood_ratio);
    let _ = writeln!(
        out,
        "- Target: our echo p99 with the flood at most {FLOOD_LIMIT:.0}x without it: {}: {}.",
        num(ratio, 2),
        met(ratio <= FLOOD_LIMIT)
    );
    let ours = med(s, Route::Ours, |x| x.flooded.p(0.99));
    for r in present(s)
        .into_iter()
        .filter(|&r| r != Route::Ours && r != Route::Direct)
    {
        let peer = med(s, r, |x| x.flooded.p(0.99));
        let _ = writeln!(
            out,
            "- Target: our echo p99 under the flood at most {}'s under the same flood: {} / {} \
             µs, ratio {}: {}.",
            r.name(),
            num(ours, 1),
            num(peer, 1),
            num(ours / peer, 2),
            met(ours <= peer)
        );
    }
    let _ = writeln!(out);
}

fn flood_ratio(x: &Flooded) -> f64 {
    x.flooded.p(0.99) / x.quiet.p(0.99)
}
