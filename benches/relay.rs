//! Relay benchmark: the proxy against a direct connection to the same stand-in upstream.
//!
//! Run with `cargo bench --bench relay`. In one run it measures, for R rounds that alternate
//! which route goes first, and reports medians:
//!
//! 1. downstream throughput: the stand-in streams S MiB in 64 KiB binary frames to the client;
//! 2. upstream throughput: the client sends S MiB in 64 KiB frames to the stand-in's sink,
//!    timed until the sink has counted all of it;
//! 3. round-trip latency of N sequential 32-byte echoes (p50, p99) and what the proxy adds;
//! 4. the proxy's resident memory per idle session (K sessions open, each after one echo), on a
//!    fresh proxy process per round: the allocator keeps freed memory, so a second round on the
//!    same process would reuse the first round's pages and measure almost nothing;
//! 5. the proxy's CPU time per GiB relayed, for the two throughput workloads.
//!
//! The proxy runs as a separate process (the binary Cargo built for this bench, release under
//! `cargo bench`), so that its RSS and CPU time can be read from `/proc`. Every transfer is
//! verified; a mismatch, a refused connection or a proxy that died makes the bench exit
//! non-zero.
//!
//! Knobs (environment): `BENCH_MIB` (S, default 256), `BENCH_RTT` (N, 20000), `BENCH_IDLE`
//! (K, 1000), `BENCH_ROUNDS` (R, 3). `BENCH_SMOKE=1` makes every default tiny so CI can prove
//! the bench still works in seconds; explicit knobs still win. Without `--bench` on the command
//! line (i.e. under `cargo test --benches`) it also runs in smoke mode.
//!
//! The report, a markdown table, goes to stdout and to `target/bench-relay.md`
//! (`bench-relay-smoke.md` in smoke mode). The bench keeps one copy of the S-byte reference
//! pattern in memory.

#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

mod support;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Bytes, Error as WsError, Message, WebSocket};

use support::knobs::{env_flag, env_num};
use support::procfs::{self, Settle};
use support::proxy::{self, PROXY_BIN, ProxyChild};
use support::stats::{median, percentile_us};
use upstream::{Behaviour, StandIn, StandInOptions};

/// The proxy binary, built by Cargo for this bench (same profile).
/// Namespace put in the tokens and in direct request paths.
const NS: &str = "bench-ns";
/// Size of each binary frame in the throughput workloads.
const FRAME: usize = 64 * 1024;
/// Size of each echo message in the latency workload.
const ECHO_LEN: usize = 32;
/// Untimed round trips before the timed ones, to warm caches and the connection.
const WARMUP_TRIPS: usize = 200;
/// Read/write timeout on every client socket: bounds every blocking loop in the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the proxy to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// RSS counts as settled when it has not changed for 3 consecutive samples 100 ms apart, or
/// after 5 s.
const SETTLE: Settle = Settle {
    samples: 3,
    interval: Duration::from_millis(100),
    limit: Duration::from_secs(5),
};
/// How long closed idle sessions may take to disappear from the stand-in.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Largest number of messages read while waiting for a close reply.
const CLOSE_READ_LIMIT: usize = 1024;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

type Res<T> = Result<T, String>;
type Ws = WebSocket<TcpStream>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench relay FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let mut knobs = Knobs::from_env()?;
    // Before the proxy starts, so that it inherits the raised limit. Each idle session holds
    // three descriptors here (the client's socket, the stand-in's and the clone it keeps) and
    // two in the proxy.
    knobs.idle = support::fit_to_nofile_limit("relay", knobs.idle, 3);
    let started = Instant::now();
    let load_before = support::load_average();
    eprintln!("bench relay: {}", knobs.describe());

    let reference = Reference::new(knobs.mib);
    // Declared before the proxy so that it is dropped after it (locals drop in reverse order).
    // Echo for the round trips and idle sessions; the stream and sink workloads by name.
    let standin = StandIn::start_with(
        StandInOptions::serving(Behaviour::Echo)
            .vmi(
                stream_vmi(&reference),
                Behaviour::Stream {
                    total: reference.bytes.len() as u64,
                    frame: FRAME,
                },
            )
            .vmi("sink-bench", Behaviour::Sink),
    );
    let mut proxy = ProxyProcess::start(standin.addr())?;
    let target = Target {
        upstream: standin.addr(),
        proxy: proxy.addr,
    };
    let rss_start = proxy.settled_rss_kib()?;
    eprintln!("bench relay: proxy pid {} on {}", proxy.pid(), proxy.addr);

    let idle = repeat(knobs.rounds, || idle_sessions(&standin, knobs.idle))?;
    eprintln!("bench relay: idle sessions done");
    let down = both_routes(knobs.rounds, |route| {
        with_proxy_cpu(&proxy, || downstream(&target, route, &reference))
    })?;
    eprintln!("bench relay: downstream done");
    let up = both_routes(knobs.rounds, |route| {
        with_proxy_cpu(&proxy, || {
            upstream_to_sink(&target, route, &reference, &standin)
        })
    })?;
    eprintln!("bench relay: upstream done");
    let rtt = both_routes(knobs.rounds, |route| round_trips(&target, route, knobs.rtt))?;
    eprintln!("bench relay: latency done");

    proxy.check_alive()?;
    let results = Results {
        ceilings: (reference.pattern_rate, reference.fnv_rate),
        load_before,
        load_after: support::load_average(),
        knobs,
        bytes: reference.bytes.len() as u64,
        rss_start,
        rss_peak: proxy.status_kib("VmHWM")?,
        idle,
        down,
        up,
        rtt,
        elapsed: started.elapsed(),
    };
    let report = results.render();
    println!("{report}");
    let path = support::write_report("relay", results.knobs.smoke, &report)?;
    eprintln!("bench relay: report written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    mib: u64,
    rtt: usize,
    idle: usize,
    rounds: usize,
    smoke: bool,
}

impl Knobs {
    fn from_env() -> Res<Knobs> {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants it quick.
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let smoke = !bench_mode || env_flag("BENCH_SMOKE");
        let (mib, rtt, idle, rounds) = if smoke {
            (4, 500, 50, 1)
        } else {
            (256, 20_000, 1000, 3)
        };
        Ok(Knobs {
            mib: env_num("BENCH_MIB", mib)?,
            rtt: env_num("BENCH_RTT", rtt)?,
            idle: env_num("BENCH_IDLE", idle)?,
            rounds: env_num("BENCH_ROUNDS", rounds)?,
            smoke,
        })
    }

    /// The command line that reproduces this run.
    fn command_line(&self) -> String {
        let smoke = if self.smoke { "BENCH_SMOKE=1 " } else { "" };
        format!(
            "{smoke}BENCH_MIB={} BENCH_RTT={} BENCH_IDLE={} BENCH_ROUNDS={} cargo bench --bench relay",
            self.mib, self.rtt, self.idle, self.rounds
        )
    }

    fn describe(&self) -> String {
        format!(
            "S={} MiB, N={} round trips, K={} idle sessions, R={} rounds{}",
            self.mib,
            self.rtt,
            self.idle,
            self.rounds,
            if self.smoke { " (smoke)" } else { "" }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// The proxy binary running as a child process; killed when dropped, on every path.
struct ProxyProcess {
    child: ProxyChild,
    addr: SocketAddr,
}

impl ProxyProcess {
    fn start(upstream: SocketAddr) -> Res<ProxyProcess> {
        let mut env = proxy::local_dev_env(tokens::SECRET, upstream);
        env.push(("PORT".into(), "0".into()));
        // INFO, the production default; it also prints the "listening on" line that tells us
        // the port.
        env.push(("LOGLEVEL".into(), "INFO".into()));
        let (tx, rx) = mpsc::channel();
        // The proxy's log: the listening address is handed over; anything that is not an INFO
        // line is echoed (warnings and errors are worth seeing; the per-session INFO lines,
        // thousands of them, are not).
        let child =
            ProxyChild::spawn(
                Path::new(PROXY_BIN),
                &env,
                move |line| match proxy::announced_addr(&line, proxy::LISTENING) {
                    Some(addr) => {
                        let _ = tx.send(addr);
                    }
                    None if line.contains(" INFO ") => {}
                    None => eprintln!("proxy: {line}"),
                },
            )?;
        let mut proxy = ProxyProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        proxy.addr = proxy.wait_for_address(&rx)?;
        Ok(proxy)
    }

    /// Waits for the "listening on" line, failing early if the proxy exits instead (e.g. on a
    /// configuration error, which it prints and the stderr thread echoes).
    fn wait_for_address(&mut self, rx: &mpsc::Receiver<SocketAddr>) -> Res<SocketAddr> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(50)) {
                return Ok(addr);
            }
            self.check_alive()?;
        }
        Err("the proxy did not print its listening address".into())
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Fails if the proxy has exited (crashed) during the run.
    fn check_alive(&mut self) -> Res<()> {
        self.child.check_alive()
    }

    /// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM, ...).
    fn status_kib(&self, field: &str) -> Res<u64> {
        procfs::status_kib(self.pid(), field)
    }

    /// VmRSS once it has stopped moving (freed memory and lazily touched pages take a moment).
    fn settled_rss_kib(&self) -> Res<u64> {
        procfs::settled_rss_kib(self.pid(), SETTLE)
    }

    /// (utime, stime) of the proxy, in seconds.
    fn cpu_seconds(&self) -> Res<Cpu> {
        let (user, sys) = procfs::user_sys_seconds(self.pid())?;
        Ok(Cpu { user, sys })
    }
}

/// CPU time of a process, or a difference of two readings, in seconds.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }

    fn total(self) -> f64 {
        self.user + self.sys
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Proxied,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Proxied => "proxied",
        }
    }
}

/// The two ways to reach the stand-in.
struct Target {
    upstream: SocketAddr,
    proxy: SocketAddr,
}

impl Target {
    /// Opens a WebSocket to `vmi`, directly (the path the proxy would use upstream) or through
    /// the proxy (with a fresh token allowing just that VMI).
    fn connect(&self, route: Route, vmi: &str, config: WebSocketConfig, nodelay: bool) -> Res<Ws> {
        let (addr, path) = match route {
            Route::Direct => (
                self.upstream,
                format!(
                    "/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/{vmi}/vnc"
                ),
            ),
            Route::Proxied => {
                let token = tokens::mint(tokens::SECRET, NS, &[vmi], tokens::now() + 3600);
                (self.proxy, format!("/{token}/{vmi}"))
            }
        };
        let fail = |e: String| format!("{}: connect to {vmi}: {e}", route.name());
        let stream = TcpStream::connect(addr).map_err(|e| fail(e.to_string()))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| stream.set_nodelay(nodelay))
            .map_err(|e| fail(e.to_string()))?;
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
            .map_err(|e| fail(e.to_string()))?;
        Ok(ws)
    }
}

/// Large frames both ways, nothing capped.
fn bulk_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

/// Small buffers: a thousand idle clients should not cost the bench process 128 KiB each.
fn small_config() -> WebSocketConfig {
    bulk_config().read_buffer_size(4096).write_buffer_size(0)
}

/// Starts the closing handshake (close 1000) without waiting for the reply.
fn start_close(ws: &mut Ws) -> Res<()> {
    match ws.close(None).and_then(|_| ws.flush()) {
        Ok(()) | Err(WsError::ConnectionClosed) => Ok(()),
        Err(e) => Err(format!("send close: {e}")),
    }
}

/// Reads until the peer's close reply has arrived. Data arriving meanwhile is discarded.
fn finish_close(ws: &mut Ws) -> Res<()> {
    for _ in 0..CLOSE_READ_LIMIT {
        match ws.read() {
            Ok(_) => {}
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Ok(()),
            Err(e) => return Err(format!("waiting for the close reply: {e}")),
        }
    }
    Err("no close reply".into())
}

fn close(ws: &mut Ws) -> Res<()> {
    start_close(ws)?;
    finish_close(ws)
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// The S bytes both throughput workloads move: `pattern(0..S)` and its FNV-1a.
struct Reference {
    bytes: Bytes,
    fnv: u64,
    /// How fast one core runs `pattern` and `fnv1a` (MiB/s): the stand-in does the same work
    /// per byte when it streams and sinks, so these are ceilings for both routes.
    pattern_rate: f64,
    fnv_rate: f64,
}

impl Reference {
    fn new(mib: u64) -> Reference {
        let t0 = Instant::now();
        let bytes = Bytes::from(upstream::pattern_vec(0, (mib << 20) as usize));
        let t1 = Instant::now();
        let fnv = upstream::fnv1a(upstream::FNV_OFFSET, &bytes);
        let rate = |d: Duration| mib as f64 / d.as_secs_f64();
        Reference {
            bytes,
            fnv,
            pattern_rate: rate(t1 - t0),
            fnv_rate: rate(t1.elapsed()),
        }
    }
}

/// One throughput sample: wall time and the proxy's CPU time meanwhile.
#[derive(Clone, Copy)]
struct Transfer {
    elapsed: Duration,
    proxy_cpu: Cpu,
}

fn with_proxy_cpu(proxy: &ProxyProcess, f: impl FnOnce() -> Res<Duration>) -> Res<Transfer> {
    let before = proxy.cpu_seconds()?;
    let elapsed = f()?;
    let proxy_cpu = proxy.cpu_seconds()?.since(before);
    Ok(Transfer { elapsed, proxy_cpu })
}

/// The VMI the downstream workload asks for: the stand-in streams the reference to it.
fn stream_vmi(reference: &Reference) -> String {
    format!("stream-{}-{FRAME}", reference.bytes.len())
}

/// The stand-in streams the reference in 64 KiB frames; the client checks every byte.
///
/// The check compares each frame with the reference (memcmp) instead of running FNV-1a over
/// the received bytes: byte-equal to `pattern(0..S)` implies the same checksum, and FNV-1a
/// runs at well under 1 GiB/s, which would make the client the bottleneck being measured.
/// The clock includes the handshake (negligible next to S), the same for both routes.
fn downstream(target: &Target, route: Route, reference: &Reference) -> Res<Duration> {
    let total = reference.bytes.len();
    let vmi = stream_vmi(reference);
    let fail = |what: String| format!("{}: downstream: {what}", route.name());
    let t0 = Instant::now();
    let mut ws = target.connect(route, &vmi, bulk_config(), false)?;
    let mut got = 0usize;
    let mut elapsed = None;
    let mut close_code = None;
    // Bounded: every iteration consumes a message or ends; a stall ends in the read timeout.
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                let end = got + b.len();
                if end > total || b[..] != reference.bytes[got..end] {
                    return Err(fail(format!("data differs from the pattern at byte {got}")));
                }
                got = end;
                if got == total {
                    elapsed = Some(t0.elapsed());
                }
            }
            Ok(Message::Close(frame)) => close_code = Some(frame.map(|f| f.code)),
            Ok(Message::Text(_)) => return Err(fail("unexpected text message".into())),
            Ok(_) => {}
            Err(WsError::ConnectionClosed) => break,
            Err(e) => return Err(fail(format!("after {got} of {total} bytes: {e}"))),
        }
    }
    match (elapsed, close_code) {
        (Some(elapsed), Some(None | Some(CloseCode::Normal))) => Ok(elapsed),
        (Some(_), code) => Err(fail(format!("closed with {code:?}, expected 1000"))),
        (None, _) => Err(fail(format!("stream ended after {got} of {total} bytes"))),
    }
}

/// The client sends the reference in 64 KiB frames to the sink, then closes. The sink records
/// (bytes, checksum) before it answers the close, so the close reply marks the moment it has
/// counted everything: that is where the clock stops.
fn upstream_to_sink(
    target: &Target,
    route: Route,
    reference: &Reference,
    standin: &StandIn,
) -> Res<Duration> {
    let fail = |what: String| format!("{}: upstream: {what}", route.name());
    let recorded = standin.sink_results().len();
    let total = reference.bytes.len();
    let t0 = Instant::now();
    let mut ws = target.connect(route, "sink-bench", bulk_config(), false)?;
    for off in (0..total).step_by(FRAME) {
        let frame = reference.bytes.slice(off..(off + FRAME).min(total));
        // write() sends whenever tungstenite's write buffer fills; flush once at the end.
        ws.write(Message::Binary(frame))
            .map_err(|e| fail(format!("send at byte {off}: {e}")))?;
    }
    ws.flush().map_err(|e| fail(format!("flush: {e}")))?;
    close(&mut ws).map_err(fail)?;
    let elapsed = t0.elapsed();

    let results = standin.sink_results();
    let Some(&(bytes, sum)) = results.get(recorded) else {
        return Err(fail("the sink recorded no result".into()));
    };
    if (bytes, sum) != (total as u64, reference.fnv) {
        return Err(fail(format!(
            "the sink got {bytes} bytes with checksum {sum:#x}, sent {total} with {:#x}",
            reference.fnv
        )));
    }
    Ok(elapsed)
}

/// `n` sequential 32-byte echo round trips; returns each one's duration in nanoseconds.
fn round_trips(target: &Target, route: Route, n: usize) -> Res<Vec<u64>> {
    let fail = |what: String| format!("{}: round trips: {what}", route.name());
    let mut ws = target.connect(route, "echo-rtt", small_config(), true)?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP_TRIPS + n {
        let t0 = Instant::now();
        echo_once(&mut ws, i as u64).map_err(fail)?;
        if i >= WARMUP_TRIPS {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    close(&mut ws).map_err(fail)?;
    Ok(samples)
}

/// Sends one 32-byte message derived from `seq` and checks that the same bytes come back.
fn echo_once(ws: &mut Ws, seq: u64) -> Res<()> {
    let mut payload = [0u8; ECHO_LEN];
    for (i, chunk) in payload.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq ^ ((i as u64) << 56)).to_le_bytes());
    }
    ws.send(Message::binary(payload.to_vec()))
        .map_err(|e| format!("send #{seq}: {e}"))?;
    match ws.read() {
        Ok(Message::Binary(b)) if b[..] == payload => Ok(()),
        Ok(other) => Err(format!("echo #{seq} came back as {other:?}")),
        Err(e) => Err(format!("echo #{seq}: {e}")),
    }
}

/// One idle-memory sample, on a fresh proxy process: its settled RSS (KiB) at start, with
/// half of the sessions open and with all of them, and its CPU time while they sat idle.
#[derive(Clone, Copy)]
struct Idle {
    start: u64,
    half: u64,
    full: u64,
    sessions: usize,
    idle_cpu: Cpu,
    idle_wall: Duration,
}

impl Idle {
    /// Everything the sessions added, averaged over them (includes one-time growth).
    fn per_session_kib(&self) -> f64 {
        (self.full as f64 - self.start as f64) / self.sessions as f64
    }

    /// Growth from K/2 to K sessions: the cost of one more session, without the one-time part.
    fn marginal_kib(&self) -> f64 {
        let added = self.sessions - self.sessions / 2;
        (self.full as f64 - self.half as f64) / added.max(1) as f64
    }

    /// Proxy CPU while the sessions sat idle, in percent of one core.
    fn idle_cpu_percent(&self) -> f64 {
        100.0 * self.idle_cpu.total() / self.idle_wall.as_secs_f64()
    }
}

/// Starts a proxy of its own, opens `k` sessions through it (one echo each, so each is fully
/// relaying), reads the settled RSS at 0, k/2 and k sessions, then closes them all and waits
/// until the stand-in has seen them go.
fn idle_sessions(standin: &StandIn, k: usize) -> Res<Idle> {
    let mut proxy = ProxyProcess::start(standin.addr())?;
    let target = Target {
        upstream: standin.addr(),
        proxy: proxy.addr,
    };
    let open_before = standin.connections_open();
    let start = proxy.settled_rss_kib()?;
    let mut held = open_idle(&target, 0..k / 2)?;
    let half = proxy.settled_rss_kib()?;
    held.extend(open_idle(&target, k / 2..k)?);
    // The settling wait doubles as the idle window: nothing is sent, so the CPU the proxy
    // spends meanwhile is what idle sessions cost it (timers, wakeups).
    let (cpu_before, t0) = (proxy.cpu_seconds()?, Instant::now());
    let full = proxy.settled_rss_kib()?;
    let (idle_cpu, idle_wall) = (proxy.cpu_seconds()?.since(cpu_before), t0.elapsed());

    // Close in two passes so the proxy handles the k closing handshakes concurrently.
    for ws in &mut held {
        start_close(ws)?;
    }
    for ws in &mut held {
        finish_close(ws)?;
    }
    drop(held);
    if !upstream::wait_until(DRAIN_LIMIT, || standin.connections_open() <= open_before) {
        return Err(format!(
            "idle sessions: {} upstream connections still open after closing",
            standin.connections_open() - open_before
        ));
    }
    proxy.check_alive()?;
    Ok(Idle {
        start,
        half,
        full,
        sessions: k,
        idle_cpu,
        idle_wall,
    })
}

/// Opens one session per index through the proxy, each to its own echo VMI, and completes one
/// echo on each.
fn open_idle(target: &Target, range: std::ops::Range<usize>) -> Res<Vec<Ws>> {
    range
        .map(|i| {
            let vmi = format!("echo-idle-{i}");
            let mut ws = target.connect(Route::Proxied, &vmi, small_config(), true)?;
            echo_once(&mut ws, i as u64).map_err(|e| format!("idle session {i}: {e}"))?;
            Ok(ws)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rounds and statistics

/// Runs `f` once per round.
fn repeat<T>(rounds: usize, mut f: impl FnMut() -> Res<T>) -> Res<Vec<T>> {
    (0..rounds).map(|_| f()).collect()
}

/// Samples per route.
struct PerRoute<T> {
    direct: Vec<T>,
    proxied: Vec<T>,
}

/// Runs `f` for both routes in every round, alternating which goes first so that neither
/// always runs on a warmer (or more tired) machine.
fn both_routes<T>(rounds: usize, mut f: impl FnMut(Route) -> Res<T>) -> Res<PerRoute<T>> {
    let mut out = PerRoute {
        direct: Vec::with_capacity(rounds),
        proxied: Vec::with_capacity(rounds),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Route::Direct, Route::Proxied]
        } else {
            [Route::Proxied, Route::Direct]
        };
        for route in order {
            let sample = f(route)?;
            match route {
                Route::Direct => out.direct.push(sample),
                Route::Proxied => out.proxied.push(sample),
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Report

struct Results {
    ceilings: (f64, f64),
    load_before: String,
    load_after: String,
    knobs: Knobs,
    bytes: u64,
    rss_start: u64,
    rss_peak: u64,
    idle: Vec<Idle>,
    down: PerRoute<Transfer>,
    up: PerRoute<Transfer>,
    rtt: PerRoute<Vec<u64>>,
    elapsed: Duration,
}

impl Results {
    fn mib_per_s(&self, t: &Transfer) -> f64 {
        self.bytes as f64 / MIB / t.elapsed.as_secs_f64()
    }

    /// Proxy CPU seconds (user, sys) per GiB relayed.
    fn cpu_per_gib(&self, t: &Transfer) -> (f64, f64) {
        let gib = self.bytes as f64 / GIB;
        (t.proxy_cpu.user / gib, t.proxy_cpu.sys / gib)
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let k = &self.knobs;
        let _ = writeln!(out, "### Relay benchmark\n");
        let _ = writeln!(out, "`{}`\n", k.command_line());
        let _ = writeln!(
            out,
            "{}; {}; total run time {:.1} s; load average before {}, after {}.\n",
            support::machine(),
            k.describe(),
            self.elapsed.as_secs_f64(),
            self.load_before,
            self.load_after
        );
        self.render_routes(&mut out);
        self.render_proxy(&mut out);
        let _ = writeln!(
            out,
            "The stand-in generates what it streams ({:.0} MiB/s on one core here) and hashes \
             what it sinks (FNV-1a, {:.0} MiB/s): ceilings for both routes. CPU times are \
             utime + stime from `/proc/PID/stat`, counted in clock ticks.\n",
            self.ceilings.0, self.ceilings.1
        );
        self.render_rounds(&mut out);
        out
    }

    /// Direct against proxied, with ratios.
    fn render_routes(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "| workload (median of {} rounds) | direct | proxied | proxied/direct |",
            self.knobs.rounds
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let mut row = |name: String, d: f64, p: f64, digits: usize| {
            let _ = writeln!(
                out,
                "| {name} | {d:.digits$} | {p:.digits$} | {:.2} |",
                p / d
            );
        };
        let (down_d, down_p) = (
            median(self.down.direct.iter().map(|t| self.mib_per_s(t))),
            median(self.down.proxied.iter().map(|t| self.mib_per_s(t))),
        );
        let (up_d, up_p) = (
            median(self.up.direct.iter().map(|t| self.mib_per_s(t))),
            median(self.up.proxied.iter().map(|t| self.mib_per_s(t))),
        );
        let mib = self.knobs.mib;
        row(
            format!("downstream {mib} MiB, 64 KiB frames (MiB/s)"),
            down_d,
            down_p,
            0,
        );
        row(
            format!("upstream {mib} MiB to sink, 64 KiB frames (MiB/s)"),
            up_d,
            up_p,
            0,
        );
        let [p50_d, p50_p, p99_d, p99_p] = self.latencies();
        row(
            format!("echo {ECHO_LEN} B round trip p50 (µs)"),
            p50_d,
            p50_p,
            1,
        );
        row(
            format!("echo {ECHO_LEN} B round trip p99 (µs)"),
            p99_d,
            p99_p,
            1,
        );
        let _ = writeln!(
            out,
            "| latency added by the proxy, p50 / p99 (µs) | | {:.1} / {:.1} | |\n",
            p50_p - p50_d,
            p99_p - p99_d
        );
    }

    /// Median p50 and p99 per route: `[p50 direct, p50 proxied, p99 direct, p99 proxied]`.
    fn latencies(&self) -> [f64; 4] {
        let pct = |runs: &[Vec<u64>], q| median(runs.iter().map(|s| percentile_us(s, q)));
        [
            pct(&self.rtt.direct, 0.50),
            pct(&self.rtt.proxied, 0.50),
            pct(&self.rtt.direct, 0.99),
            pct(&self.rtt.proxied, 0.99),
        ]
    }

    /// The proxy process's own costs.
    fn render_proxy(&self, out: &mut String) {
        let med_idle = |f: &dyn Fn(&Idle) -> f64| median(self.idle.iter().map(f));
        let cpu = |runs: &[Transfer]| {
            let per_gib: Vec<(f64, f64)> = runs.iter().map(|t| self.cpu_per_gib(t)).collect();
            let (user, sys) = (
                median(per_gib.iter().map(|c| c.0)),
                median(per_gib.iter().map(|c| c.1)),
            );
            format!("{:.2} ({user:.2} user + {sys:.2} sys)", user + sys)
        };
        let busy = |runs: &[Transfer]| {
            median(
                runs.iter()
                    .map(|t| 100.0 * t.proxy_cpu.total() / t.elapsed.as_secs_f64()),
            )
        };
        let k = self.knobs.idle;
        let _ = writeln!(out, "| proxy process | value |");
        let _ = writeln!(out, "|---|---:|");
        let _ = writeln!(out, "| RSS at start | {} KiB |", self.rss_start);
        let _ = writeln!(
            out,
            "| RSS with 0 / {} / {k} idle sessions (fresh process) | {:.0} / {:.0} / {:.0} KiB |",
            k / 2,
            med_idle(&|i| i.start as f64),
            med_idle(&|i| i.half as f64),
            med_idle(&|i| i.full as f64)
        );
        let _ = writeln!(
            out,
            "| memory per idle session: average over {k} / marginal from {} to {k} | {:.2} / {:.2} KiB |",
            k / 2,
            med_idle(&|i| i.per_session_kib()),
            med_idle(&|i| i.marginal_kib())
        );
        let _ = writeln!(
            out,
            "| CPU while {k} sessions sit idle | {:.1} % of a core |",
            med_idle(&|i| i.idle_cpu_percent())
        );
        let _ = writeln!(
            out,
            "| peak RSS (VmHWM) after the throughput and latency runs | {} KiB |",
            self.rss_peak
        );
        let _ = writeln!(
            out,
            "| CPU per GiB downstream | {} s |",
            cpu(&self.down.proxied)
        );
        let _ = writeln!(
            out,
            "| CPU per GiB upstream | {} s |",
            cpu(&self.up.proxied)
        );
        let _ = writeln!(
            out,
            "| CPU busy while relaying downstream / upstream | {:.0} / {:.0} % of a core |\n",
            busy(&self.down.proxied),
            busy(&self.up.proxied)
        );
    }

    /// Every round, so the spread behind the medians is visible.
    fn render_rounds(&self, out: &mut String) {
        let list = |v: Vec<String>| v.join(", ");
        let rate = |runs: &[Transfer]| {
            list(
                runs.iter()
                    .map(|t| format!("{:.0}", self.mib_per_s(t)))
                    .collect(),
            )
        };
        let pct = |runs: &[Vec<u64>], q| {
            list(
                runs.iter()
                    .map(|s| format!("{:.1}", percentile_us(s, q)))
                    .collect(),
            )
        };
        let _ = writeln!(out, "<details><summary>all rounds</summary>\n");
        let _ = writeln!(out, "| per round | direct | proxied |");
        let _ = writeln!(out, "|---|---|---|");
        let _ = writeln!(
            out,
            "| downstream MiB/s | {} | {} |",
            rate(&self.down.direct),
            rate(&self.down.proxied)
        );
        let _ = writeln!(
            out,
            "| upstream MiB/s | {} | {} |",
            rate(&self.up.direct),
            rate(&self.up.proxied)
        );
        let _ = writeln!(
            out,
            "| p50 µs | {} | {} |",
            pct(&self.rtt.direct, 0.5),
            pct(&self.rtt.proxied, 0.5)
        );
        let _ = writeln!(
            out,
            "| p99 µs | {} | {} |",
            pct(&self.rtt.direct, 0.99),
            pct(&self.rtt.proxied, 0.99)
        );
        let idle = list(
            self.idle
                .iter()
                .map(|i| format!("{:.2}", i.per_session_kib()))
                .collect(),
        );
        let _ = writeln!(out, "| idle KiB/session | | {idle} |");
        let _ = writeln!(out, "\n</details>");
    }
}
