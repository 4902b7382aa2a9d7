//! Footprint benchmark: how big the release binary is, how fast it listens, how little memory
//! it holds.
//!
//! Run with `cargo bench --bench footprint`. It measures, against the targets of the release
//! profile (LTO, one codegen unit, stripped):
//!
//! 1. the size of `target/release/kubevirt-vnc-proxy` (built with `cargo build --release --bin
//!    kubevirt-vnc-proxy` when missing); target at most 4 MiB;
//! 2. the time from `spawn` to the port accepting a TCP connection: the proxy is started with
//!    `PORT` set to a port picked free beforehand and the bench tries to connect every 0.5 ms;
//!    median of N starts; target at most 20 ms;
//! 3. VmRSS (`/proc/PID/status`) 200 ms after `spawn`, median of the same N starts; target at
//!    most 4 MiB;
//! 4. VmRSS with K idle sessions open (each relaying to the stand-in upstream after one echo),
//!    on a fresh process, next to its settled VmRSS before them (no target: for context).
//!
//! Every start runs in the production configuration a test can give it: local dev mode to the
//! stand-in upstream (in this process), `LOGLEVEL=INFO`, stderr read by the bench.
//!
//! It reports and does not judge: the exit status is 0 whatever the numbers, and non-zero only
//! when something is broken (the binary cannot be built or found, does not start or listen,
//! dies, or a session fails).
//!
//! Knobs (environment): `FOOTPRINT_STARTS` (N, default 20), `BENCH_IDLE` (K, 1000).
//! `BENCH_SMOKE=1` makes them 3 and 50; explicit knobs still win. Without `--bench` on the
//! command line (`cargo test --benches`) it also runs in smoke mode.
//!
//! The report, a markdown table, goes to stdout and to `target/bench-footprint.md`
//! (`bench-footprint-smoke.md` in smoke mode, so that a CI run never replaces real figures).

#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

mod support;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, Message, WebSocket};

use support::knobs::{env_flag, env_num};
use support::procfs::{self, Settle};
use support::proxy::{self, ProxyChild};
use support::report::target_dir;
use support::stats::{max, median, min};
use upstream::{Behaviour, StandIn};

/// The measured binary, always the release one in the target directory (found from the one
/// Cargo built for this bench, see `support::report::target_dir`).
const BIN_NAME: &str = "kubevirt-vnc-proxy";
/// Namespace put in the tokens.
const NS: &str = "footprint-ns";

/// The targets.
const MAX_BINARY_BYTES: u64 = 4 * 1024 * 1024;
const MAX_RSS_KIB: u64 = 4 * 1024;
const MAX_LISTEN: Duration = Duration::from_millis(20);

/// When VmRSS is read after `spawn`.
const RSS_AFTER: Duration = Duration::from_millis(200);
/// How often the bench tries to connect while the proxy starts.
const CONNECT_EVERY: Duration = Duration::from_micros(500);
/// How long a start may take before the proxy counts as broken.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long `cargo build --release` may take when the binary is missing.
const BUILD_LIMIT: Duration = Duration::from_secs(1200);
/// Read/write timeout on every client socket: bounds every blocking call on them.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// RSS counts as settled after this many equal samples this far apart (or at the limit).
const SETTLE: Settle = Settle {
    samples: 3,
    interval: Duration::from_millis(100),
    limit: Duration::from_secs(5),
};
/// How long closed idle sessions may take to disappear from the stand-in.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Largest number of messages read while waiting for a close reply.
const CLOSE_READ_LIMIT: usize = 16;
/// Lines of a failed proxy's stderr kept for the error message.
const KEEP_LOG_LINES: usize = 20;

const MIB: f64 = 1024.0 * 1024.0;

type Res<T> = Result<T, String>;
type Ws = WebSocket<TcpStream>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench footprint FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let mut knobs = Knobs::from_env()?;
    // Before the proxy starts, so that it inherits the raised limit. Each idle session holds
    // three descriptors here (the client's socket, the stand-in's and the clone it keeps) and
    // two in the proxy.
    knobs.idle = support::fit_to_nofile_limit("footprint", knobs.idle, 3);
    let started = Instant::now();
    let load_before = support::load_average();
    eprintln!("bench footprint: {}", knobs.describe());

    let bin = release_binary()?;
    let size = std::fs::metadata(&bin)
        .map_err(|e| format!("{}: {e}", bin.display()))?
        .len();
    eprintln!("bench footprint: {} is {size} bytes", bin.display());

    // Declared before every proxy so that it is dropped after them.
    let standin = StandIn::serving(Behaviour::Echo);
    let mut starts = Vec::with_capacity(knobs.starts);
    for i in 0..knobs.starts {
        let s = one_start(&bin, standin.addr())?;
        eprintln!(
            "bench footprint: start {}: listening after {:.2} ms, VmRSS {} KiB at {} ms",
            i + 1,
            s.listen.as_secs_f64() * 1e3,
            s.rss,
            RSS_AFTER.as_millis()
        );
        starts.push(s);
    }
    let idle = idle_sessions(&bin, &standin, knobs.idle)?;
    eprintln!(
        "bench footprint: {} idle sessions: VmRSS {} KiB (settled at start: {} KiB)",
        knobs.idle, idle.full, idle.start
    );

    let results = Results {
        bin,
        size,
        starts,
        idle,
        knobs,
        load_before,
        load_after: support::load_average(),
        elapsed: started.elapsed(),
    };
    let report = results.render();
    println!("{report}");
    let path = support::write_report("footprint", results.knobs.smoke, &report)?;
    eprintln!("bench footprint: report written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    starts: usize,
    idle: usize,
    smoke: bool,
}

impl Knobs {
    fn from_env() -> Res<Knobs> {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants it quick.
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let smoke = !bench_mode || env_flag("BENCH_SMOKE");
        let (starts, idle) = if smoke { (3, 50) } else { (20, 1000) };
        Ok(Knobs {
            starts: env_num("FOOTPRINT_STARTS", starts)?,
            idle: env_num("BENCH_IDLE", idle)?,
            smoke,
        })
    }

    fn command_line(&self) -> String {
        let smoke = if self.smoke { "BENCH_SMOKE=1 " } else { "" };
        format!(
            "{smoke}FOOTPRINT_STARTS={} BENCH_IDLE={} cargo bench --bench footprint",
            self.starts, self.idle
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} starts, {} idle sessions{}",
            self.starts,
            self.idle,
            if self.smoke { " (smoke)" } else { "" }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The release binary

/// `target/release/kubevirt-vnc-proxy`, built first if it is missing. Under `cargo bench` it
/// is the binary Cargo just built for this bench (the bench profile inherits release).
fn release_binary() -> Res<PathBuf> {
    let bin = target_dir().join("release").join(BIN_NAME);
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "bench footprint: {} is missing; building it (cargo build --release --bin {BIN_NAME})",
        bin.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let child = Command::new(cargo)
        .args(["build", "--release", "--bin", BIN_NAME])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start cargo build: {e}"))?;
    // The guard kills the build (by PID) if it overruns or this function returns early.
    let mut build = ChildGuard(child);
    let deadline = Instant::now() + BUILD_LIMIT;
    let status = loop {
        match build.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                return Err(format!(
                    "cargo build --release did not finish within {BUILD_LIMIT:?} (under `cargo \
                     test --benches` Cargo may hold the build directory lock: build the release \
                     binary first)"
                ));
            }
            Err(e) => return Err(format!("wait for cargo build: {e}")),
        }
    };
    if !status.success() {
        return Err(format!("cargo build --release failed: {status}"));
    }
    if !bin.is_file() {
        return Err(format!(
            "{} is still missing after the build",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Kills (by PID) and reaps a child process when dropped, on every path.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// A started proxy; killed (by PID) when dropped.
struct ProxyProcess {
    child: ProxyChild,
    /// When `spawn` was called.
    spawned: Instant,
    /// The address from its "listening on" line, once seen.
    announced: mpsc::Receiver<SocketAddr>,
    /// The last lines of its stderr, for error messages.
    log: Arc<Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// Starts the binary on `port` (0: let it pick) in local dev mode to `upstream`.
    fn spawn(bin: &Path, upstream: SocketAddr, port: u16) -> Res<ProxyProcess> {
        let spawned = Instant::now();
        let mut env = proxy::local_dev_env(tokens::SECRET, upstream);
        env.push(("PORT".into(), port.to_string()));
        env.push(("LOGLEVEL".into(), "INFO".into()));
        let (tx, announced) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_writer = Arc::clone(&log);
        // Keeps the last lines, hands over the address of the "listening on" line, and echoes
        // what is not an INFO line.
        let child = ProxyChild::spawn(bin, &env, move |line| {
            if let Some(addr) = proxy::announced_addr(&line, proxy::LISTENING) {
                let _ = tx.send(addr);
            }
            if !line.contains(" INFO ") {
                eprintln!("proxy: {line}");
            }
            let mut log = log_writer.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() == KEEP_LOG_LINES {
                log.remove(0);
            }
            log.push(line);
        })?;
        Ok(ProxyProcess {
            child,
            spawned,
            announced,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Fails, with the end of its log, if the proxy has exited.
    fn check_alive(&mut self) -> Res<()> {
        match self.child.exited()? {
            None => Ok(()),
            Some(status) => {
                // Give the stderr reader a moment to take in the last lines.
                thread::sleep(Duration::from_millis(50));
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                Err(format!(
                    "the proxy exited ({status}); its log ends with:\n  {}",
                    log.join("\n  ")
                ))
            }
        }
    }

    /// The address from the "listening on" line.
    fn wait_for_address(&mut self) -> Res<SocketAddr> {
        let deadline = self.spawned + START_LIMIT;
        while Instant::now() < deadline {
            if let Ok(addr) = self.announced.recv_timeout(Duration::from_millis(50)) {
                return Ok(addr);
            }
            self.check_alive()?;
        }
        Err("the proxy did not print its listening address".into())
    }

    /// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM, ...).
    fn status_kib(&self, field: &str) -> Res<u64> {
        procfs::status_kib(self.pid(), field)
    }

    /// VmRSS once it has stopped moving.
    fn settled_rss_kib(&self) -> Res<u64> {
        procfs::settled_rss_kib(self.pid(), SETTLE)
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound, read, released).
fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One start: time from `spawn` to the first accepted connection, and VmRSS at [`RSS_AFTER`].
struct Start {
    listen: Duration,
    rss: u64,
    /// VmRSS split: anonymous memory (heap, stacks) and file-backed pages (mostly the binary's
    /// own code and data, mapped from the page cache).
    anon: u64,
    file: u64,
}

fn one_start(bin: &Path, upstream: SocketAddr) -> Res<Start> {
    let port = free_port()?;
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let mut proxy = ProxyProcess::spawn(bin, upstream, port)?;
    // Bounded by START_LIMIT; on loopback a closed port refuses at once.
    let listen = loop {
        if TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok() {
            break proxy.spawned.elapsed();
        }
        if proxy.spawned.elapsed() > START_LIMIT {
            return Err(format!(
                "the proxy did not accept on {target} within {START_LIMIT:?}"
            ));
        }
        proxy.check_alive()?;
        thread::sleep(CONNECT_EVERY);
    };
    // The connection must have been the proxy's, not something else that took the port.
    let announced = proxy.wait_for_address()?;
    if announced != target {
        return Err(format!(
            "the proxy listens on {announced}, asked for {target}"
        ));
    }
    let at = proxy.spawned + RSS_AFTER;
    thread::sleep(at.saturating_duration_since(Instant::now()));
    proxy.check_alive()?;
    let rss = proxy.status_kib("VmRSS")?;
    let anon = proxy.status_kib("RssAnon")?;
    let file = proxy.status_kib("RssFile")?;
    Ok(Start {
        listen,
        rss,
        anon,
        file,
    })
}

/// VmRSS of a fresh proxy, settled, before and with the idle sessions.
struct Idle {
    start: u64,
    full: u64,
    sessions: usize,
}

impl Idle {
    fn per_session_kib(&self) -> f64 {
        (self.full as f64 - self.start as f64) / self.sessions as f64
    }
}

/// Starts a proxy, opens `k` sessions through it (one echo each, so each is relaying), reads
/// the settled VmRSS before and after, then closes them and waits for the stand-in to see them
/// go.
fn idle_sessions(bin: &Path, standin: &StandIn, k: usize) -> Res<Idle> {
    let mut proxy = ProxyProcess::spawn(bin, standin.addr(), 0)?;
    let addr = proxy.wait_for_address()?;
    let open_before = standin.connections_open();
    let start = proxy.settled_rss_kib()?;
    let mut held = Vec::with_capacity(k);
    for i in 0..k {
        let vmi = format!("echo-idle-{i}");
        let mut ws = connect(addr, &vmi).map_err(|e| format!("idle session {i}: {e}"))?;
        echo_once(&mut ws, i as u64).map_err(|e| format!("idle session {i}: {e}"))?;
        held.push(ws);
    }
    let full = proxy.settled_rss_kib()?;
    proxy.check_alive()?;
    // Close in two passes so the proxy handles the closing handshakes concurrently.
    for ws in &mut held {
        ws.close(None)
            .and_then(|_| ws.flush())
            .map_err(|e| format!("send close: {e}"))?;
    }
    for ws in &mut held {
        finish_close(ws)?;
    }
    drop(held);
    if !upstream::wait_until(DRAIN_LIMIT, || standin.connections_open() <= open_before) {
        return Err(format!(
            "{} upstream connections still open after closing the idle sessions",
            standin.connections_open() - open_before
        ));
    }
    proxy.check_alive()?;
    Ok(Idle {
        start,
        full,
        sessions: k,
    })
}

/// A WebSocket through the proxy to `vmi`, with a fresh token for it.
fn connect(proxy: SocketAddr, vmi: &str) -> Res<Ws> {
    let token = tokens::mint(tokens::SECRET, NS, &[vmi], tokens::now() + 3600);
    let stream = TcpStream::connect_timeout(&proxy, IO_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|_| stream.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    // Small buffers: a thousand idle clients should not cost the bench 128 KiB each.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = format!("ws://{proxy}/{token}/{vmi}");
    let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Sends one 16-byte message derived from `seq` and checks that it comes back.
fn echo_once(ws: &mut Ws, seq: u64) -> Res<()> {
    let payload = [seq.to_le_bytes(), (!seq).to_le_bytes()].concat();
    ws.send(Message::binary(payload.clone()))
        .map_err(|e| format!("send: {e}"))?;
    match ws.read() {
        Ok(Message::Binary(b)) if b[..] == payload[..] => Ok(()),
        Ok(other) => Err(format!("echo came back as {other:?}")),
        Err(e) => Err(format!("echo: {e}")),
    }
}

/// Reads until the peer's close reply has arrived.
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

// ---------------------------------------------------------------------------------------------
// Report

struct Results {
    bin: PathBuf,
    size: u64,
    starts: Vec<Start>,
    idle: Idle,
    knobs: Knobs,
    load_before: String,
    load_after: String,
    elapsed: Duration,
}

impl Results {
    fn render(&self) -> String {
        let mut out = String::new();
        let k = &self.knobs;
        let n = self.starts.len();
        let listen_ms: Vec<f64> = self
            .starts
            .iter()
            .map(|s| s.listen.as_secs_f64() * 1e3)
            .collect();
        let rss: Vec<f64> = self.starts.iter().map(|s| s.rss as f64).collect();
        let (listen_med, rss_med) = (
            median(listen_ms.iter().copied()),
            median(rss.iter().copied()),
        );
        let anon_med = median(self.starts.iter().map(|s| s.anon as f64));
        let file_med = median(self.starts.iter().map(|s| s.file as f64));
        let verdict = |met: bool| if met { "met" } else { "**not met**" };

        let _ = writeln!(out, "### Footprint\n");
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
        let _ = writeln!(out, "| measure | target | measured | |");
        let _ = writeln!(out, "|---|---|---|---|");
        let _ = writeln!(
            out,
            "| release binary (`{}`) | ≤ 4 MiB | {:.2} MiB ({} bytes) | {} |",
            self.bin.file_name().unwrap_or_default().to_string_lossy(),
            self.size as f64 / MIB,
            self.size,
            verdict(self.size <= MAX_BINARY_BYTES)
        );
        let _ = writeln!(
            out,
            "| spawn to accepting TCP, median of {n} (min–max) | ≤ 20 ms | {listen_med:.2} ms \
             ({:.2}–{:.2}) | {} |",
            min(&listen_ms),
            max(&listen_ms),
            verdict(listen_med <= MAX_LISTEN.as_secs_f64() * 1e3)
        );
        let _ = writeln!(
            out,
            "| VmRSS {} ms after spawn, median of {n} (min–max) | ≤ 4 MiB | {:.2} MiB ({rss_med:.0} \
             KiB; {:.0}–{:.0}) | {} |",
            RSS_AFTER.as_millis(),
            rss_med / 1024.0,
            min(&rss),
            max(&rss),
            verdict(rss_med <= MAX_RSS_KIB as f64)
        );
        let _ = writeln!(
            out,
            "| VmRSS with {} idle sessions (settled; {} KiB before them) | — | {:.2} MiB ({} \
             KiB; {:.2} KiB per session) | |",
            self.idle.sessions,
            self.idle.start,
            self.idle.full as f64 / 1024.0,
            self.idle.full,
            self.idle.per_session_kib()
        );
        let _ = writeln!(
            out,
            "\nVmRSS {} ms after spawn, split (medians): {anon_med:.0} KiB anonymous (heap, \
             stacks), {file_med:.0} KiB file-backed (the binary's and libc's pages).",
            RSS_AFTER.as_millis()
        );
        let _ = writeln!(
            out,
            "\nEach start: `PORT` set to a port picked free just before, a TCP connect tried \
             every {} µs from just before `spawn` until one is accepted (so exec, dynamic \
             loading, configuration and bind all count). Local dev mode, `LOGLEVEL=INFO`, \
             stderr read by the bench.",
            CONNECT_EVERY.as_micros()
        );
        out
    }
}
