//! The proxy against nginx as a WebSocket reverse proxy, and both against a direct connection,
//! to the same upstream, in one run.
//!
//! Run with `bash benches/nginx-setup.sh && cargo bench --bench nginx` (the script installs
//! Debian's nginx if it is missing). Three routes reach one upstream:
//!
//! - **direct**: the client dials the upstream itself, on the KubeVirt path;
//! - **ours**: the release binary of this crate as a child process, with a fresh HS256 token
//!   per session;
//! - **nginx**: `nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'` as a child process, one
//!   worker, `proxy_buffering off`, the usual `Upgrade`/`Connection` headers, a regex location
//!   that maps `/TOKEN/VMI` to the same KubeVirt path our proxy sends. nginx checks no token:
//!   it does strictly less work per session than our proxy.
//!
//! The upstream ("origin") is written here, not taken from `tests/support/upstream.rs`: that
//! stand-in runs a thread per connection, generates its stream byte by byte and hashes what it
//! sinks, which caps throughput well below what the proxies can do, and 9,000 idle sessions
//! would be 9,000 threads. The origin is one mio thread in the bench process: it writes a
//! pre-built stream of frames, compares what it sinks with a pre-built masked stream (memcmp),
//! echoes, and serves plain TCP or TLS (rustls, the certificates of `tests/support/pki.rs`).
//! It accepts only the KubeVirt VNC path for namespace `lab-ns`, so every route must present
//! the same upstream request; in the TLS variant it also requires the service-account bearer.
//!
//! Workloads, identical on every route (R rounds, the order of the routes rotating per round,
//! medians reported):
//!
//! 1. downstream: S MiB in 64 KiB binary frames from the origin, compared byte for byte;
//! 2. upstream: S MiB in 64 KiB masked frames to the origin's sink, clock stopped by its close
//!    reply (it checks everything before answering);
//! 3. N sequential 32-byte echo round trips on one session per route (p50, p99, added over
//!    direct), the routes taking turns in batches of 500 so that noise from elsewhere on the
//!    machine lands on all of them alike;
//! 4. C concurrent sessions doing T round trips each, driven by one mio client thread (total
//!    time, p50, p99);
//! 5. new sessions: 16 client threads, each session connect + upgrade + one echo + close,
//!    M sessions in all (sessions per second, p50/p99 of a whole session);
//! 6. K idle sessions (one echo each) on a *fresh* proxy and a fresh nginx per round: RSS of
//!    our process and of the nginx worker at 0, K/2 and K sessions (the allocator keeps freed
//!    memory, so a reused process would measure almost nothing).
//!
//! Scaling (plain variant only, after its rounds): workloads 4 and 5 again on two more processes
//! of ours, started with `WORKERS=1` and `WORKERS=2`, taking turns in each round (the order
//! alternating), with the pinning undone so that every CPU is available to them (the rest of the
//! run stays placed as `BENCH_PIN` says). A worker is a thread; the proxy's thread names cannot
//! tell a loop from its signal thread, so in every sample at least WORKERS of its threads must
//! have run (`/proc/PID/task/*/schedstat`), or the bench fails. The load generator (client
//! threads, the origin) runs on the same CPUs, so the ratio 2/1 is a lower bound of what a
//! second core gives the proxy.
//!
//! Costs are read from `/proc`: our proxy process, the nginx *worker* (the child of the
//! master; the master does nothing per connection). CPU is the run time the scheduler
//! accounted (`/proc/PID/task/*/schedstat`, nanoseconds) with its user/system split from
//! utime/stime in `/proc/PID/stat` (clock ticks, too coarse alone for a 0.1 s transfer).
//!
//! Both variants run: plain `ws://` upstream (our proxy in local dev mode) and TLS upstream
//! (our proxy in in-cluster mode with a service-account directory; nginx with `proxy_ssl_verify
//! on`, the same CA and bearer, TLS 1.2 and 1.3 allowed). The client side is plain in both
//! (the direct route speaks TLS itself in the TLS variant).
//!
//! Knobs (environment): `BENCH_MIB` (S, 256), `BENCH_RTT` (N, 20000), `BENCH_CONC` (C, 1000),
//! `BENCH_CONC_TRIPS` (T, 100), `BENCH_NEW` (M, 4000), `BENCH_IDLE` (K, 9000), `BENCH_ROUNDS`
//! (R, 3), `BENCH_TLS` (1; 0 skips the TLS variant), `BENCH_WORKERS` (1; 0 skips the scaling
//! section), `BENCH_LOGLEVEL` (our proxy's LOGLEVEL, WARNING: nginx runs with `access_log off`,
//! so our per-session INFO lines would be extra work), `NGINX` (the nginx binary). For experiments: `BENCH_PROXY_ENV=K=V,K=V` (extra
//! environment for our proxy, e.g. `RELAY_BUFFER_BYTES=262144`) and `BENCH_NGINX_DIRECTIVES`
//! (extra directives in nginx's server block, e.g. `proxy_buffer_size 64k; proxy_buffers 4
//! 64k; proxy_busy_buffers_size 64k;`); both appear in the reported command line.
//! `BENCH_PROXY_BIN` measures another build of the proxy (one with symbols, for perf).
//! `BENCH_PIN` places the processes with taskset(1) for the whole run but the scaling section:
//! `one` (default) puts the bench, our proxy and the nginx worker on the last CPU, `split` the
//! proxies on the last CPU and the bench on the others, `off` leaves it to the scheduler. On a small VM a wakeup across
//! CPUs costs tens of microseconds and is charged, inflated, to the woken process, so without
//! pinning the latency and CPU figures depend on where each process happened to land (a round
//! trip's p50 flips between ~18 and ~90 µs from one round to the next).
//! `BENCH_SMOKE=1` (or no `--bench` argument, as under `cargo test --benches`) makes every
//! default tiny; explicit knobs still win.
//!
//! Every transfer, echo and close is verified; a mismatch, a refusal at the origin, a process
//! that died or a stuck socket (every socket has a timeout) makes the bench exit non-zero.
//! The report goes to stdout and `target/bench-nginx.md` (`bench-nginx-smoke.md` in smoke
//! mode). The targets section only reports whether each target is met.

#[path = "../tests/support/pki.rs"]
mod pki;
#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

mod support;

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};
use slab::Slab;

/// The proxy binary, built by Cargo for this bench (same profile).
const PROXY_BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");
/// The proxy binary to measure: `BENCH_PROXY_BIN` (for profiling a build with symbols) or the
/// one Cargo built.
fn proxy_bin() -> PathBuf {
    std::env::var_os("BENCH_PROXY_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(PROXY_BIN), PathBuf::from)
}
/// Namespace in the tokens, in nginx's rewrite and the only one the origin serves.
const NS: &str = "lab-ns";
/// The KubeVirt path prefix every route must present to the origin.
const KUBEVIRT_PREFIX: &str =
    "/apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/";
/// The service-account token in the TLS variant (the origin requires it as bearer).
const SA_TOKEN: &str = "bench-service-account-token-0123456789";
/// Size of each binary frame in the throughput workloads.
const FRAME: usize = 64 * 1024;
/// Size of each echo message.
const ECHO_LEN: usize = 32;
/// Untimed round trips before the timed sequential ones.
const WARMUP_TRIPS: usize = 200;
/// Sequential round trips per route before the next route takes its turn.
const RTT_BATCH: usize = 500;
/// Client threads opening new sessions.
const NEW_THREADS: usize = 16;
/// Read/write timeout on every blocking client socket: bounds every blocking loop.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started proxy or nginx has to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// RSS counts as settled after this many equal samples this far apart, or after the limit.
const SETTLE_SAMPLES: usize = 3;
const SETTLE_INTERVAL: Duration = Duration::from_millis(100);
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
/// How long closed sessions may take to disappear from the origin.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Most frames read while waiting for a close reply.
const CLOSE_READ_LIMIT: usize = 1024;
/// Largest frame payload a client accepts outside the streaming workload.
const MAX_CLIENT_FRAME: usize = 1 << 20;
/// Largest request head the origin accepts.
const MAX_HEAD: usize = 16 * 1024;
/// The origin stops reading a connection while this much output is queued.
const ORIGIN_OUT_LIMIT: usize = 1 << 20;
/// Rounds of read/write per connection per event before others get a turn.
const DRIVE_LIMIT: usize = 64;
/// Bytes per write() of the pre-built downstream stream.
const STREAM_CHUNK: usize = 4 << 20;
/// Descriptors kept in reserve beyond two per idle session.
const FD_RESERVE: u64 = 400;
/// nginx's worker_connections when sized small, to measure its preallocated slots.
const NGINX_SMALL_CONNECTIONS: usize = 128;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench nginx FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let started = Instant::now();
    let load_before = support::load_average();
    let limits = raise_nofile_limit()?;
    let mut knobs = Knobs::from_env()?;
    knobs.fit_idle_to(limits.0);
    let nginx_bin = find_nginx()?;
    let nginx_version = nginx_version(&nginx_bin);
    eprintln!("bench nginx: {} ({nginx_version})", knobs.describe());

    let t = Instant::now();
    let wire = Arc::new(Wire::build(knobs.mib as usize * (1 << 20)));
    eprintln!(
        "bench nginx: built the {} MiB streams in {:.1} s",
        knobs.mib,
        t.elapsed().as_secs_f64()
    );

    let mut variants = vec![run_variant(&knobs, &wire, &nginx_bin, false)?];
    if knobs.tls {
        variants.push(run_variant(&knobs, &wire, &nginx_bin, true)?);
    }
    let report = Report {
        knobs: &knobs,
        variants: &variants,
        nginx_version,
        load_before,
        load_after: support::load_average(),
        limits,
        elapsed: started.elapsed(),
    }
    .render();
    println!("{report}");
    let path = support::report_path("nginx", knobs.smoke);
    std::fs::write(&path, &report).map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("bench nginx: report written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    mib: u64,
    rtt: usize,
    conc: usize,
    conc_trips: usize,
    new_sessions: usize,
    idle: usize,
    rounds: usize,
    tls: bool,
    /// The scaling section: our proxy with WORKERS=1 against WORKERS=2 (`BENCH_WORKERS`).
    scaling: bool,
    loglevel: String,
    /// Extra environment for our proxy (`BENCH_PROXY_ENV=K=V,K=V`), for experiments.
    proxy_env: Vec<(String, String)>,
    /// Extra nginx directives in the server block (`BENCH_NGINX_DIRECTIVES`), for experiments.
    nginx_directives: String,
    /// CPU placement during the sequential round trips (`BENCH_PIN`).
    pin: Pin,
    smoke: bool,
    /// Why `idle` is smaller than asked, if it is.
    idle_note: Option<String>,
}

impl Knobs {
    fn from_env() -> Res<Knobs> {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants it quick.
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let smoke = !bench_mode || env_flag("BENCH_SMOKE");
        let d = if smoke {
            (8, 500, 50, 10, 200, 200, 1)
        } else {
            (256, 20_000, 1000, 100, 4000, 9000, 3)
        };
        Ok(Knobs {
            mib: env_num("BENCH_MIB", d.0)?,
            rtt: env_num("BENCH_RTT", d.1)?,
            conc: env_num("BENCH_CONC", d.2)?,
            conc_trips: env_num("BENCH_CONC_TRIPS", d.3)?,
            new_sessions: env_num("BENCH_NEW", d.4)?,
            idle: env_num("BENCH_IDLE", d.5)?,
            rounds: env_num("BENCH_ROUNDS", d.6)?,
            tls: std::env::var("BENCH_TLS").map_or(true, |v| v != "0" && v != "false"),
            scaling: std::env::var("BENCH_WORKERS").map_or(true, |v| v != "0" && v != "false"),
            loglevel: std::env::var("BENCH_LOGLEVEL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "WARNING".into()),
            proxy_env: std::env::var("BENCH_PROXY_ENV")
                .unwrap_or_default()
                .split(',')
                .filter(|kv| !kv.trim().is_empty())
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .ok_or_else(|| format!("BENCH_PROXY_ENV: {kv:?} is not K=V"))
                })
                .collect::<Res<_>>()?,
            nginx_directives: std::env::var("BENCH_NGINX_DIRECTIVES")
                .unwrap_or_default()
                .trim()
                .to_string(),
            pin: match std::env::var("BENCH_PIN").as_deref() {
                Ok("one") => Pin::One,
                Ok("split") => Pin::Split,
                Ok("off") => Pin::Off,
                Ok(other) if !other.is_empty() => {
                    return Err(format!("BENCH_PIN={other:?}: expected one, split or off"));
                }
                _ => Pin::One,
            },
            smoke,
            idle_note: None,
        })
    }

    /// The idle workload holds two descriptors per session in this process (client socket and
    /// origin socket) and two in the proxy; shrink it, with a note, if the limit is lower.
    fn fit_idle_to(&mut self, soft_limit: u64) {
        let fits = (soft_limit.saturating_sub(FD_RESERVE) / 2) as usize;
        if self.idle > fits {
            self.idle_note = Some(format!(
                "idle sessions reduced from {} to {fits}: the open-files limit is {soft_limit} \
                 and each idle session holds two descriptors in the bench process (client and \
                 origin) and two in the proxy",
                self.idle
            ));
            eprintln!("bench nginx: {}", self.idle_note.as_deref().unwrap_or(""));
            self.idle = fits.max(2);
        }
    }

    /// The command line that reproduces this run.
    fn command_line(&self) -> String {
        let smoke = if self.smoke { "BENCH_SMOKE=1 " } else { "" };
        format!(
            "bash benches/nginx-setup.sh && {smoke}BENCH_MIB={} BENCH_RTT={} BENCH_CONC={} \
             BENCH_CONC_TRIPS={} BENCH_NEW={} BENCH_IDLE={} BENCH_ROUNDS={} BENCH_TLS={} \
             BENCH_WORKERS={} BENCH_LOGLEVEL={} BENCH_PIN={}{}{}{} cargo bench --bench nginx",
            self.mib,
            self.rtt,
            self.conc,
            self.conc_trips,
            self.new_sessions,
            self.idle,
            self.rounds,
            u8::from(self.tls),
            u8::from(self.scaling),
            self.loglevel,
            match self.pin {
                Pin::One => "one",
                Pin::Split => "split",
                Pin::Off => "off",
            },
            if self.proxy_env.is_empty() {
                String::new()
            } else {
                let kv: Vec<String> = self
                    .proxy_env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!(" BENCH_PROXY_ENV={}", kv.join(","))
            },
            if self.nginx_directives.is_empty() {
                String::new()
            } else {
                format!(" BENCH_NGINX_DIRECTIVES='{}'", self.nginx_directives)
            },
            // Another build was measured: say which.
            std::env::var_os("BENCH_PROXY_BIN")
                .filter(|p| !p.is_empty())
                .map_or_else(String::new, |_| format!(
                    " BENCH_PROXY_BIN={}",
                    proxy_bin().display()
                ))
        )
    }

    fn describe(&self) -> String {
        format!(
            "S={} MiB, N={} round trips, C={} concurrent x T={}, M={} new sessions, K={} idle, \
             R={} rounds, TLS variant {}, workers scaling {}{}",
            self.mib,
            self.rtt,
            self.conc,
            self.conc_trips,
            self.new_sessions,
            self.idle,
            self.rounds,
            if self.tls { "on" } else { "off" },
            if self.scaling { "on" } else { "off" },
            if self.smoke { " (smoke)" } else { "" }
        )
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A positive integer from the environment, or `default` when unset or empty.
fn env_num<T: std::str::FromStr + PartialOrd + From<u8>>(name: &str, default: T) -> Res<T> {
    let value = match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<T>()
            .map_err(|_| format!("{name}={v:?}: not a number"))?,
        _ => default,
    };
    if value < T::from(1) {
        return Err(format!("{name} must be at least 1"));
    }
    Ok(value)
}

/// (soft, hard) open-files limits of this process.
fn nofile_limits() -> Res<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("read /proc/self/limits: {e}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or("no open-files line in /proc/self/limits")?;
    let num = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    match (
        fields.first().and_then(|s| num(s)),
        fields.get(1).and_then(|s| num(s)),
    ) {
        (Some(soft), Some(hard)) => Ok((soft, hard)),
        _ => Err(format!("cannot parse {line:?}")),
    }
}

/// Raises the soft open-files limit to the hard one (children, our proxy included, inherit
/// it). Returns the limits in force afterwards.
fn raise_nofile_limit() -> Res<(u64, u64)> {
    support::raise_nofile_limit();
    nofile_limits()
}

/// Where the processes run during the sequential round trips.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pin {
    /// Wherever the scheduler puts them.
    Off,
    /// Everything (bench threads, our proxy, the nginx worker) on the last CPU: no cross-CPU
    /// wakeups, so a round trip costs the work along its path and nothing depends on placement.
    One,
    /// The proxies on the last CPU, the bench (client and origin) on the others.
    Split,
}

/// CPU affinity set with taskset(1) for the duration of a workload; restored on drop.
struct Pinning {
    pids: Vec<u32>,
    all: String,
}

impl Pinning {
    fn apply(pin: Pin, proxies: &[u32]) -> Option<Pinning> {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if pin == Pin::Off || cpus < 2 {
            return None;
        }
        let last = (cpus - 1).to_string();
        let rest = if cpus == 2 {
            "0".to_string()
        } else {
            format!("0-{}", cpus - 2)
        };
        let me = std::process::id();
        let bench_cpus = if pin == Pin::One { &last } else { &rest };
        taskset(me, bench_cpus);
        for &p in proxies {
            taskset(p, &last);
        }
        let mut pids = vec![me];
        pids.extend_from_slice(proxies);
        Some(Pinning {
            pids,
            all: format!("0-{}", cpus - 1),
        })
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        for &p in &self.pids {
            taskset(p, &self.all);
        }
    }
}

/// Sets the affinity of all threads of `pid` (best effort: pinning only steadies numbers).
fn taskset(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("bench nginx: could not pin pid {pid} to CPUs {cpus} (taskset)");
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket frames

/// Appends a frame: `b0` is FIN + opcode; masked with `mask` when given (client to server).
fn push_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], mask: Option<[u8; 4]>) {
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

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
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
struct Head {
    b0: u8,
    mask: Option<[u8; 4]>,
    len: usize,
    header_len: usize,
}

impl Head {
    fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }

    fn total(&self) -> usize {
        self.header_len + self.len
    }
}

/// The header at the start of `buf`, or `None` when it is not complete yet.
fn parse_head(buf: &[u8]) -> Option<Head> {
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
fn echo_payload(seq: u64) -> [u8; ECHO_LEN] {
    let mut payload = [0u8; ECHO_LEN];
    for (i, chunk) in payload.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq ^ ((i as u64) << 56)).to_le_bytes());
    }
    payload
}

/// A client mask key; any value is valid on the wire, these just vary.
fn mask_for(seq: u64) -> [u8; 4] {
    ((seq as u32).wrapping_mul(0x9E37_79B9) ^ 0x5A5A_1234).to_be_bytes()
}

/// The throughput streams, built once: `down` is what the origin sends (unmasked 64 KiB
/// frames of `upstream::pattern`, then close 1000), `up` what the client sends (the same
/// payload in masked frames). Every route forwards frame bytes verbatim, so both ends compare
/// the raw bytes with these.
struct Wire {
    down: Vec<u8>,
    /// Length of `down` without the final close frame.
    down_data: usize,
    up: Vec<u8>,
}

impl Wire {
    fn build(payload: usize) -> Wire {
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

fn kubevirt_path(vmi: &str) -> String {
    format!("{KUBEVIRT_PREFIX}{vmi}/vnc")
}

// ---------------------------------------------------------------------------------------------
// The origin: a mio WebSocket server in the bench process

#[derive(Default)]
struct OriginStats {
    open: AtomicUsize,
    upgrades: AtomicUsize,
    /// Requests answered with an HTTP error (wrong path, missing bearer, bad upgrade).
    refused: AtomicUsize,
    /// Protocol violations seen (unmasked client frames, unexpected opcodes, ...).
    errors: AtomicUsize,
    /// Connections that ended in an I/O error (resets).
    io_errors: AtomicUsize,
    tls_full: AtomicUsize,
    tls_resumed: AtomicUsize,
    /// (payload bytes accepted, all equal to the expected stream) per finished sink.
    sinks: Mutex<Vec<(usize, bool)>>,
    last_problem: Mutex<Option<String>>,
}

impl OriginStats {
    fn problem(&self, counter: &AtomicUsize, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    }

    /// Fails if the origin refused a request or saw a protocol error.
    fn check(&self) -> Res<()> {
        let refused = self.refused.load(Ordering::Relaxed);
        let errors = self.errors.load(Ordering::Relaxed);
        if refused + errors > 0 {
            let last = self
                .last_problem
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(format!(
                "the origin refused {refused} requests and saw {errors} protocol errors; last: {}",
                last.unwrap_or_default()
            ));
        }
        Ok(())
    }

    fn resumed(&self) -> (usize, usize) {
        (
            self.tls_resumed.load(Ordering::Relaxed),
            self.tls_full.load(Ordering::Relaxed) + self.tls_resumed.load(Ordering::Relaxed),
        )
    }
}

struct OriginOptions {
    tls: Option<Arc<ServerConfig>>,
    bearer: Option<String>,
}

/// The origin's thread; stopped and joined on drop (its connections close with it).
struct Origin {
    addr: SocketAddr,
    stats: Arc<OriginStats>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

impl Origin {
    fn start(opts: OriginOptions, wire: Arc<Wire>) -> Res<Origin> {
        let std_listener =
            StdListener::bind("127.0.0.1:0").map_err(|e| format!("origin: bind: {e}"))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| format!("origin: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("origin: {e}"))?;
        let mut listener = mio::net::TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(|e| format!("origin: poll: {e}"))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| format!("origin: register: {e}"))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| format!("origin: {e}"))?);
        let stats = Arc::new(OriginStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut looper = OriginLoop {
            poll,
            listener,
            conns: Slab::new(),
            opts,
            wire,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            scratch: vec![0; 256 * 1024],
        };
        let thread = thread::Builder::new()
            .name("origin".into())
            .spawn(move || looper.run())
            .map_err(|e| format!("origin: spawn: {e}"))?;
        Ok(Origin {
            addr,
            stats,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    fn open(&self) -> usize {
        self.stats.open.load(Ordering::Relaxed)
    }

    fn sinks(&self) -> Vec<(usize, bool)> {
        self.stats
            .sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wait_drained(&self, open_before: usize, what: &str) -> Res<()> {
        if upstream::wait_until(DRAIN_LIMIT, || self.open() <= open_before) {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} origin connections still open {DRAIN_LIMIT:?} after closing",
                self.open().saturating_sub(open_before)
            ))
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct OriginLoop {
    poll: Poll,
    listener: mio::net::TcpListener,
    conns: Slab<OConn>,
    opts: OriginOptions,
    wire: Arc<Wire>,
    stats: Arc<OriginStats>,
    stop: Arc<AtomicBool>,
    scratch: Vec<u8>,
}

enum Drive {
    Wait,
    Again,
    Done,
}

impl OriginLoop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut again: Vec<usize> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = if again.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stats
                    .problem(&self.stats.errors, format!("origin poll: {e}"));
                return;
            }
            let mut todo = std::mem::take(&mut again);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => todo.push(t - FIRST_CONN),
                }
            }
            todo.sort_unstable();
            todo.dedup();
            for key in todo {
                let Some(conn) = self.conns.get_mut(key) else {
                    continue;
                };
                let ctx = Ctx {
                    opts: &self.opts,
                    wire: &self.wire,
                    stats: &self.stats,
                };
                match conn.drive(&ctx, &mut self.scratch) {
                    Drive::Wait => {}
                    Drive::Again => again.push(key),
                    Drive::Done => {
                        let mut conn = self.conns.remove(key);
                        conn.finish();
                        let _ = self.poll.registry().deregister(&mut conn.sock);
                        self.stats.open.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        // Bounded by the backlog: accept() ends in WouldBlock once it is empty.
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let tls = match &self.opts.tls {
                        Some(cfg) => match ServerConnection::new(Arc::clone(cfg)) {
                            Ok(c) => Some(Box::new(c)),
                            Err(e) => {
                                self.stats
                                    .problem(&self.stats.errors, format!("origin tls: {e}"));
                                continue;
                            }
                        },
                        None => None,
                    };
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key() + FIRST_CONN);
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(OConn {
                        sock,
                        tls,
                        phase: Phase::Head,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_pos: 0,
                    });
                    self.stats.open.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats
                        .problem(&self.stats.io_errors, format!("origin accept: {e}"));
                    return;
                }
            }
        }
    }
}

struct Ctx<'a> {
    opts: &'a OriginOptions,
    wire: &'a Wire,
    stats: &'a OriginStats,
}

#[derive(Debug)]
enum Phase {
    /// Reading the upgrade request.
    Head,
    /// Echoing every data frame.
    Echo,
    /// Writing `wire.down` from this offset.
    Stream { off: usize },
    /// Stream written (it ends with a close frame): waiting for the client's close reply.
    AwaitClose,
    /// Comparing what arrives with `wire.up`; `ok` until a byte differs.
    Sink { off: usize, ok: bool },
    /// The last bytes (close reply, HTTP error) are queued: flush, then close.
    Closing,
}

struct OConn {
    sock: mio::net::TcpStream,
    tls: Option<Box<ServerConnection>>,
    phase: Phase,
    /// Unparsed input: a partial request head or partial frames.
    inbuf: Vec<u8>,
    /// Output not yet written (plaintext under TLS).
    out: Vec<u8>,
    out_pos: usize,
}

enum Got {
    Data(usize),
    Eof,
    Blocked,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl OConn {
    /// Reads and writes until nothing moves (or the per-turn bound is hit).
    fn drive(&mut self, ctx: &Ctx, scratch: &mut [u8]) -> Drive {
        for _ in 0..DRIVE_LIMIT {
            let mut progress = match self.write_some(ctx.wire) {
                Ok(p) => p,
                Err(e) => return self.io_failed(ctx, &e),
            };
            if matches!(self.phase, Phase::Closing) && self.out_pos == self.out.len() {
                return Drive::Done;
            }
            if self.out.len() - self.out_pos < ORIGIN_OUT_LIMIT {
                match self.read_some(scratch) {
                    Ok(Got::Data(n)) => {
                        progress = true;
                        match self.handle(&scratch[..n], ctx) {
                            Ok(true) => return Drive::Done,
                            Ok(false) => {}
                            Err(what) => {
                                ctx.stats.problem(&ctx.stats.errors, what);
                                return Drive::Done;
                            }
                        }
                    }
                    Ok(Got::Eof) => {
                        if let Phase::Sink { off, .. } = self.phase {
                            ctx.stats
                                .sinks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((off, false));
                        }
                        return Drive::Done;
                    }
                    Ok(Got::Blocked) => {}
                    Err(e) => return self.io_failed(ctx, &e),
                }
            }
            if self.tls.as_ref().is_some_and(|t| t.wants_write()) {
                progress = true;
            }
            if !progress {
                return Drive::Wait;
            }
        }
        Drive::Again
    }

    fn io_failed(&mut self, ctx: &Ctx, e: &io::Error) -> Drive {
        ctx.stats.problem(
            &ctx.stats.io_errors,
            format!("origin connection in {:?}: {e}", self.phase),
        );
        Drive::Done
    }

    /// Best-effort TLS close_notify before the socket is dropped.
    fn finish(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut self.sock);
        }
    }

    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<Got> {
        let Some(tls) = self.tls.as_mut() else {
            return match self.sock.read(buf) {
                Ok(0) => Ok(Got::Eof),
                Ok(n) => Ok(Got::Data(n)),
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    Ok(Got::Blocked)
                }
                Err(e) => Err(e),
            };
        };
        for _ in 0..DRIVE_LIMIT {
            match tls.reader().read(buf) {
                Ok(0) => return Ok(Got::Eof),
                Ok(n) => return Ok(Got::Data(n)),
                Err(e) if would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Got::Eof),
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(Got::Eof),
                Ok(_) => {
                    tls.process_new_packets().map_err(io::Error::other)?;
                }
                Err(e) if would_block(&e) => return Ok(Got::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Got::Blocked)
    }

    /// Writes queued output, then more of the stream. Returns whether anything moved.
    fn write_some(&mut self, wire: &Wire) -> io::Result<bool> {
        let mut progress = false;
        for _ in 0..DRIVE_LIMIT {
            if let Some(tls) = self.tls.as_mut() {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.sock) {
                        Ok(_) => progress = true,
                        Err(e) if would_block(&e) => return Ok(progress),
                        Err(e) => return Err(e),
                    }
                }
            }
            let src: &[u8] = if self.out_pos < self.out.len() {
                &self.out[self.out_pos..]
            } else if let Phase::Stream { off } = self.phase {
                &wire.down[off..(off + STREAM_CHUNK).min(wire.down.len())]
            } else {
                break;
            };
            let written = match self.tls.as_mut() {
                Some(tls) => tls.writer().write(src)?,
                None => match self.sock.write(src) {
                    Ok(n) => n,
                    Err(e) if would_block(&e) => return Ok(progress),
                    Err(e) => return Err(e),
                },
            };
            if written == 0 && self.tls.is_none() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            progress |= written > 0;
            if self.out_pos < self.out.len() {
                self.out_pos += written;
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                    if self.out.capacity() > 4096 {
                        self.out = Vec::new();
                    }
                }
            } else if let Phase::Stream { off } = &mut self.phase {
                *off += written;
                if *off == wire.down.len() {
                    self.phase = Phase::AwaitClose;
                }
            }
        }
        Ok(progress)
    }

    /// Handles bytes read; `Ok(true)` when the connection is finished.
    fn handle(&mut self, data: &[u8], ctx: &Ctx) -> Result<bool, String> {
        if let Phase::Head = self.phase {
            self.inbuf.extend_from_slice(data);
            let Some(consumed) = self.upgrade(ctx)? else {
                return Ok(false);
            };
            let rest = self.inbuf.split_off(consumed);
            self.inbuf = Vec::new();
            return if rest.is_empty() || matches!(self.phase, Phase::Closing) {
                Ok(false)
            } else {
                self.handle_upgraded(&rest, ctx)
            };
        }
        self.handle_upgraded(data, ctx)
    }

    /// Parses the request head; answers 101 (choosing the behaviour from the VMI name) or an
    /// HTTP error. Returns the head's length once it is complete.
    fn upgrade(&mut self, ctx: &Ctx) -> Result<Option<usize>, String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let consumed = match req.parse(&self.inbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.inbuf.len() < MAX_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err("origin: request head too large".into()),
            Err(e) => return Err(format!("origin: bad request head: {e}")),
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let path = req.path.unwrap_or("").to_string();
        let key = header("sec-websocket-key");
        let auth = header("authorization");
        let offers_kubevirt = header("sec-websocket-protocol").is_some_and(|p| {
            p.split(',')
                .any(|s| s.trim() == upstream::KUBEVIRT_SUBPROTOCOL)
        });
        if let Some(tls) = &self.tls {
            match tls.handshake_kind() {
                Some(HandshakeKind::Resumed) => &ctx.stats.tls_resumed,
                _ => &ctx.stats.tls_full,
            }
            .fetch_add(1, Ordering::Relaxed);
        }

        let bare = path.split('?').next().unwrap_or("");
        let vmi = bare
            .strip_prefix(KUBEVIRT_PREFIX)
            .and_then(|rest| rest.strip_suffix("/vnc"))
            .filter(|v| !v.is_empty() && !v.contains('/'));
        let refusal = match (&vmi, &key, &ctx.opts.bearer) {
            (None, _, _) => Some((
                "404 Not Found",
                format!("origin: not a KubeVirt VNC path: {path}"),
            )),
            (_, None, _) => Some((
                "400 Bad Request",
                "origin: no Sec-WebSocket-Key".to_string(),
            )),
            (_, _, Some(b)) if auth.as_deref() != Some(&format!("Bearer {b}")) => Some((
                "401 Unauthorized",
                format!("origin: wrong bearer on {path}"),
            )),
            _ => None,
        };
        if let Some((status, why)) = refusal {
            ctx.stats.problem(&ctx.stats.refused, why);
            let _ = write!(
                VecWriter(&mut self.out),
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            self.phase = Phase::Closing;
            return Ok(Some(consumed));
        }
        let (Some(vmi), Some(key)) = (vmi, key) else {
            unreachable!("refused above")
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let protocol = if offers_kubevirt {
            format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                upstream::KUBEVIRT_SUBPROTOCOL
            )
        } else {
            String::new()
        };
        let _ = write!(
            VecWriter(&mut self.out),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
        );
        self.phase = if vmi.starts_with("stream") {
            Phase::Stream { off: 0 }
        } else if vmi.starts_with("sink") {
            Phase::Sink { off: 0, ok: true }
        } else {
            Phase::Echo
        };
        ctx.stats.upgrades.fetch_add(1, Ordering::Relaxed);
        Ok(Some(consumed))
    }

    fn handle_upgraded(&mut self, mut data: &[u8], ctx: &Ctx) -> Result<bool, String> {
        match &mut self.phase {
            Phase::Sink { off, ok } => {
                let take = (ctx.wire.up.len() - *off).min(data.len());
                if *ok && data[..take] != ctx.wire.up[*off..*off + take] {
                    *ok = false;
                }
                *off += take;
                data = &data[take..];
                if data.is_empty() {
                    return Ok(false);
                }
            }
            Phase::Closing => return Ok(false),
            // A client speaking while the stream is still going out: it gave up; so do we.
            Phase::Stream { .. } => return Ok(true),
            _ => {}
        }
        self.inbuf.extend_from_slice(data);
        let mut pos = 0;
        let mut done = false;
        while let Some(h) = parse_head(&self.inbuf[pos..]) {
            if h.len > MAX_CLIENT_FRAME {
                return Err(format!("origin: client frame of {} bytes", h.len));
            }
            if self.inbuf.len() - pos < h.total() {
                break;
            }
            let Some(key) = h.mask else {
                return Err("origin: unmasked client frame".into());
            };
            let mut payload = self.inbuf[pos + h.header_len..pos + h.total()].to_vec();
            apply_mask(&mut payload, key);
            pos += h.total();
            match (h.opcode(), &self.phase) {
                (0x8, Phase::AwaitClose) => {
                    done = true;
                    break;
                }
                (0x8, phase) => {
                    if let Phase::Sink { off, ok } = phase {
                        let good = *ok && *off == ctx.wire.up.len();
                        ctx.stats
                            .sinks
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((*off, good));
                    }
                    payload.truncate(125);
                    push_frame(&mut self.out, 0x88, &payload, None);
                    self.phase = Phase::Closing;
                    break;
                }
                (0x9, _) => push_frame(&mut self.out, 0x8A, &payload, None),
                (0xA, _) => {}
                (0x0..=0x2, Phase::Echo) => push_frame(&mut self.out, h.b0, &payload, None),
                (op, phase) => {
                    return Err(format!("origin: unexpected opcode {op:#x} in {phase:?}"));
                }
            }
        }
        self.inbuf.drain(..pos);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 4096 {
            self.inbuf = Vec::new();
        }
        Ok(done)
    }
}

/// `write!` into a `Vec<u8>` without the io::Write error plumbing.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: reading /proc

/// CPU time of a process (or a difference of two readings), in seconds.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// Scheduler run time of all its threads (ns precision).
    run: f64,
    /// utime and stime (clock ticks), for the user/system split.
    user: f64,
    sys: f64,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            run: self.run - earlier.run,
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }

    fn sys_share(self) -> f64 {
        let ticks = self.user + self.sys;
        if ticks > 0.0 {
            self.sys / ticks
        } else {
            f64::NAN
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&t| t > 0.0)
            .unwrap_or(100.0)
    })
}

fn read_proc(path: &str) -> Res<String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Res<Vec<String>> {
    let text = read_proc(&format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

fn cpu_of(pid: u32) -> Res<Cpu> {
    let fields = stat_fields(pid)?;
    let ticks = |i: usize| -> Res<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| format!("malformed /proc/{pid}/stat"))
    };
    let (user, sys) = (
        ticks(11)? / clock_ticks_per_second(),
        ticks(12)? / clock_ticks_per_second(),
    );
    let run_ns: u64 = thread_run_ns(pid)?.iter().map(|&(_, ns)| ns).sum();
    // Without schedstat (unusual kernels) fall back to the tick counts.
    let run = if run_ns > 0 {
        run_ns as f64 / 1e9
    } else {
        user + sys
    };
    Ok(Cpu { run, user, sys })
}

/// Scheduler run time (ns, `/proc/PID/task/TID/schedstat`) of each thread of `pid`, by thread
/// id; a thread that ends while being read is left out.
fn thread_run_ns(pid: u32) -> Res<Vec<(u32, u64)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("read /proc/{pid}/task: {e}"))?;
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        out.push((tid, ns));
    }
    Ok(out)
}

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM, ...).
fn status_kib(pid: u32, field: &str) -> Res<u64> {
    let path = format!("/proc/{pid}/status");
    read_proc(&path)?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in {path}"))
}

/// VmRSS once it has stopped moving.
fn settled_rss_kib(pid: u32) -> Res<u64> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut last = status_kib(pid, "VmRSS")?;
    let mut same = 0;
    while same < SETTLE_SAMPLES && Instant::now() < deadline {
        thread::sleep(SETTLE_INTERVAL);
        let now = status_kib(pid, "VmRSS")?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// A port that was free a moment ago (for programs that need it in their configuration).
fn free_port() -> Res<u16> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Waits until `addr` accepts a TCP connection, failing early if `alive` says the server is
/// gone.
fn wait_listening(addr: SocketAddr, mut alive: impl FnMut() -> Res<()>) -> Res<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "nothing listening on {addr} after {START_TIMEOUT:?}"
    ))
}

/// Sends a signal by PID with kill(1) (no libc binding in this crate).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// Our proxy as a child process

/// The proxy binary as a child process; killed by PID when dropped.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
}

impl ProxyProcess {
    /// Starts the proxy with `env` (plus HOST, PORT, LOGLEVEL) on a free port; retries with
    /// another port if it cannot bind (the port was taken between probe and start).
    fn start(env: &[(String, String)], loglevel: &str) -> Res<ProxyProcess> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let bin = proxy_bin();
            let mut child = Command::new(&bin)
                // A clean environment: an inherited RUST_LOG or KUBERNETES_* must not change it.
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("HOST", "127.0.0.1")
                .env("PORT", port.to_string())
                .env("LOGLEVEL", loglevel)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("start {}: {e}", bin.display()))?;
            let stderr = child.stderr.take().expect("stderr is piped");
            // Echo the proxy's log (warnings and errors at the default level) and keep the pipe
            // drained so that it never blocks on it.
            let _ = thread::Builder::new()
                .name("proxy-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        eprintln!("proxy: {line}");
                    }
                });
            let mut proxy = ProxyProcess {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let addr = proxy.addr;
            match wait_listening(addr, || proxy.check_alive()) {
                Ok(()) => return Ok(proxy),
                Err(e) => last = e,
            }
        }
        Err(format!("the proxy did not start: {last}"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the proxy exited: {status}")),
            Err(e) => Err(format!("cannot check the proxy process: {e}")),
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// nginx as a child process

fn find_nginx() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or_else(|| "nginx not found: run `bash benches/nginx-setup.sh` (or set NGINX)".into())
}

fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|s| s.strip_prefix("nginx version: ").map(str::to_string))
        .unwrap_or_else(|| "nginx, version unknown".into())
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Res<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bench-nginx-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // nginx's workers run as another user when the master is root: let them look inside.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone)]
struct NginxConfig {
    bin: PathBuf,
    origin: SocketAddr,
    /// CA file and bearer for an https origin.
    tls: Option<(PathBuf, String)>,
    worker_connections: usize,
    rlimit_nofile: u64,
    /// Extra directives for the server block (`BENCH_NGINX_DIRECTIVES`), for experiments.
    extra: String,
}

impl NginxConfig {
    fn render(&self, dir: &Path, port: u16) -> String {
        let d = dir.display();
        let origin = self.origin;
        let (scheme, tls_lines) = match &self.tls {
            Some((ca, bearer)) => (
                "https",
                format!(
                    "        proxy_set_header Authorization \"Bearer {bearer}\";\n\
                     \x20       proxy_ssl_trusted_certificate {};\n\
                     \x20       proxy_ssl_verify on;\n\
                     \x20       proxy_ssl_name localhost;\n\
                     \x20       proxy_ssl_protocols TLSv1.2 TLSv1.3;\n\
                     \x20       proxy_ssl_session_reuse on;\n",
                    ca.display()
                ),
            ),
            None => ("http", String::new()),
        };
        format!(
            "# Written by benches/nginx.rs.\n\
             worker_processes 1;\n\
             worker_rlimit_nofile {rlimit};\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{\n    worker_connections {wc};\n}}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/tmp-client-body;\n\
             \x20   proxy_temp_path {d}/tmp-proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp-fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp-uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp-scgi;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       proxy_http_version 1.1;\n\
             \x20       proxy_set_header Upgrade $http_upgrade;\n\
             \x20       proxy_set_header Connection \"upgrade\";\n\
             \x20       proxy_buffering off;\n\
             \x20       proxy_read_timeout 3600s;\n\
             \x20       proxy_send_timeout 3600s;\n\
             {tls_lines}\
             {extra}\
             \x20       # No token check: nginx cannot verify the JWT; it only maps the path.\n\
             \x20       location ~ ^/[^/]+/(?<vmi>[^/]+)$ {{\n\
             \x20           proxy_pass {scheme}://{origin}{KUBEVIRT_PREFIX}$vmi/vnc;\n\
             \x20       }}\n\
             \x20       location / {{\n\
             \x20           proxy_pass {scheme}://{origin};\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            rlimit = self.rlimit_nofile,
            wc = self.worker_connections,
            extra = if self.extra.is_empty() {
                String::new()
            } else {
                format!("        {}\n", self.extra)
            },
        )
    }
}

/// nginx (master + one worker) as child processes in their own temp dir.
struct Nginx {
    child: Child,
    worker: u32,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    fn start(cfg: &NginxConfig) -> Res<Nginx> {
        let mut last = String::new();
        for _ in 0..3 {
            match Nginx::try_start(cfg) {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
        }
        Err(format!("nginx did not start: {last}"))
    }

    fn try_start(cfg: &NginxConfig) -> Res<Nginx> {
        let dir = TempDir::new("nginx")?;
        let port = free_port()?;
        let conf = dir.0.join("nginx.conf");
        std::fs::write(&conf, cfg.render(&dir.0, port))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let stderr = std::fs::File::create(dir.0.join("stderr.log"))
            .map_err(|e| format!("create stderr.log: {e}"))?;
        let child = Command::new(&cfg.bin)
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("start {}: {e}", cfg.bin.display()))?;
        let mut nginx = Nginx {
            child,
            worker: 0,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let addr = nginx.addr;
        wait_listening(addr, || nginx.check_master())?;
        // The worker is the master's child whose command line says so.
        let deadline = Instant::now() + START_TIMEOUT;
        while nginx.worker == 0 {
            nginx.check_master()?;
            nginx.worker = nginx.find_worker().unwrap_or(0);
            if nginx.worker == 0 {
                if Instant::now() > deadline {
                    return Err("no nginx worker process appeared".into());
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(nginx)
    }

    fn master(&self) -> u32 {
        self.child.id()
    }

    fn find_worker(&self) -> Option<u32> {
        let m = self.master();
        let from_children = std::fs::read_to_string(format!("/proc/{m}/task/{m}/children"))
            .ok()
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            });
        let candidates = from_children.unwrap_or_else(|| {
            // Without /proc/PID/task/PID/children: scan for processes whose parent is the master.
            std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                        .filter(|&p| {
                            stat_fields(p)
                                .ok()
                                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                                == Some(m)
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        candidates.into_iter().find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
        })
    }

    fn check_master(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "nginx exited ({status}): {}{}",
                std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default(),
                self.error_log_tail()
            )),
            Err(e) => Err(format!("cannot check nginx: {e}")),
        }
    }

    /// Fails if the master exited or the worker was replaced (crashed and respawned).
    fn check_alive(&mut self) -> Res<()> {
        self.check_master()?;
        match self.find_worker() {
            Some(w) if w == self.worker => Ok(()),
            other => Err(format!(
                "the nginx worker {} is gone (now {other:?}): {}",
                self.worker,
                self.error_log_tail()
            )),
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }

    fn error_log_tail(&self) -> String {
        let log = self.error_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Lines of the error log at `[error]` or worse.
    fn serious_log_lines(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| {
                ["[error]", "[crit]", "[alert]", "[emerg]"]
                    .iter()
                    .any(|t| l.contains(t))
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown, the master stops its worker and exits.
        signal(self.master(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A worker orphaned by a killed master would otherwise keep running.
        if std::fs::read(format!("/proc/{}/cmdline", self.worker))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("nginx"))
        {
            signal(self.worker, "KILL");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Direct,
    Ours,
    Nginx,
}

impl Route {
    const ALL: [Route; 3] = [Route::Ours, Route::Nginx, Route::Direct];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Ours => "ours",
            Route::Nginx => "nginx",
        }
    }

    /// The routes in the order of round `r`: rotating, so none always goes first.
    fn rotation(r: usize) -> [Route; 3] {
        let mut order = Route::ALL;
        order.rotate_left(r % 3);
        order
    }
}

/// How a client reaches the origin on one route.
#[derive(Clone)]
struct Endpoint {
    route: Route,
    addr: SocketAddr,
    /// TLS client configuration (direct route to a TLS origin).
    tls: Option<Arc<ClientConfig>>,
    /// Bearer the client sends itself (direct route to an origin that requires one).
    bearer: Option<String>,
}

impl Endpoint {
    fn path(&self, vmi: &str, token: Option<&str>) -> String {
        match self.route {
            Route::Direct => kubevirt_path(vmi),
            // nginx gets the same request shape (it ignores the token) so that request sizes match.
            Route::Ours | Route::Nginx => match token {
                Some(t) => format!("/{t}/{vmi}"),
                None => format!(
                    "/{}/{vmi}",
                    tokens::mint(tokens::SECRET, NS, &[vmi], tokens::now() + 3600)
                ),
            },
        }
    }

    /// Opens a WebSocket session to `vmi`; `token` is minted when not given.
    fn open(&self, vmi: &str, token: Option<&str>) -> Res<Client> {
        let fail = |e: String| format!("{}: open {vmi}: {e}", self.route.name());
        let tcp = TcpStream::connect(self.addr).map_err(|e| fail(e.to_string()))?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| tcp.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| tcp.set_nodelay(true))
            .map_err(|e| fail(e.to_string()))?;
        let stream = match &self.tls {
            Some(cfg) => {
                let name = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let conn = ClientConnection::new(Arc::clone(cfg), name)
                    .map_err(|e| fail(e.to_string()))?;
                ClientStream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
            None => ClientStream::Plain(tcp),
        };
        let mut client = Client {
            s: stream,
            buf: Vec::new(),
            start: 0,
            wbuf: Vec::new(),
            seq: 0,
        };
        client
            .handshake(
                &self.addr.to_string(),
                &self.path(vmi, token),
                self.bearer.as_deref(),
            )
            .map_err(fail)?;
        Ok(client)
    }
}

enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(s) => s.flush(),
        }
    }
}

/// A blocking WebSocket client over raw frames: masks what it sends, checks what it gets.
struct Client {
    s: ClientStream,
    /// Received, not yet consumed: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    wbuf: Vec<u8>,
    seq: u64,
}

impl Client {
    fn handshake(&mut self, host: &str, path: &str, bearer: Option<&str>) -> Res<()> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nonce = (NEXT.fetch_add(1, Ordering::Relaxed) as u128)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
        let key = base64::engine::general_purpose::STANDARD.encode(nonce.to_le_bytes());
        let auth = bearer.map_or(String::new(), |b| format!("Authorization: Bearer {b}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        );
        self.s
            .write_all(request.as_bytes())
            .and_then(|_| self.s.flush())
            .map_err(|e| format!("send the upgrade request: {e}"))?;
        // Bounded: each pass reads more bytes or fails; the head is capped.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    if resp.code != Some(101) {
                        return Err(format!(
                            "upgrade answered {:?} {:?}",
                            resp.code,
                            resp.reason.unwrap_or("")
                        ));
                    }
                    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
                    let accept = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                        .map(|h| h.value);
                    if accept != Some(expected.as_bytes()) {
                        return Err("wrong Sec-WebSocket-Accept".into());
                    }
                    self.start = n;
                    return Ok(());
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => return Err("response head too large".into()),
                Err(e) => return Err(format!("bad response head: {e}")),
            }
            if self
                .fill(4096)
                .map_err(|e| format!("read the upgrade response: {e}"))?
                == 0
            {
                return Err("connection closed during the upgrade".into());
            }
        }
    }

    /// Reads more bytes into `buf` (up to `chunk`); 0 at EOF.
    fn fill(&mut self, chunk: usize) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + chunk, 0);
        let r = self.s.read(&mut self.buf[old..]);
        self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
        r
    }

    fn send(&mut self, b0: u8, payload: &[u8]) -> Res<()> {
        self.seq += 1;
        self.wbuf.clear();
        push_frame(&mut self.wbuf, b0, payload, Some(mask_for(self.seq)));
        self.s
            .write_all(&self.wbuf)
            .and_then(|_| self.s.flush())
            .map_err(|e| format!("send: {e}"))
    }

    /// The next whole frame from the server: (opcode, payload).
    fn recv(&mut self) -> Res<(u8, Vec<u8>)> {
        loop {
            if let Some(h) = parse_head(&self.buf[self.start..]) {
                if h.mask.is_some() {
                    return Err("masked frame from the server".into());
                }
                if h.len > MAX_CLIENT_FRAME {
                    return Err(format!("unexpected frame of {} bytes", h.len));
                }
                if self.buf.len() - self.start >= h.total() {
                    let at = self.start + h.header_len;
                    let payload = self.buf[at..at + h.len].to_vec();
                    self.start += h.total();
                    return Ok((h.opcode(), payload));
                }
            }
            match self.fill(16 * 1024) {
                Ok(0) => return Err("connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// One 32-byte round trip, checked.
    fn echo(&mut self, seq: u64) -> Res<()> {
        let payload = echo_payload(seq);
        self.send(0x82, &payload)?;
        match self.recv()? {
            (0x2, got) if got == payload => Ok(()),
            (op, got) => Err(format!(
                "echo #{seq} came back as opcode {op:#x}, {} bytes",
                got.len()
            )),
        }
    }

    /// Sends close 1000 without waiting.
    fn start_close(&mut self) -> Res<()> {
        self.send(0x88, &1000u16.to_be_bytes())
    }

    /// Waits for the close reply, then for the server to close TCP.
    fn finish_close(&mut self) -> Res<()> {
        for _ in 0..CLOSE_READ_LIMIT {
            let (op, payload) = self.recv()?;
            if op == 0x8 {
                if payload.len() >= 2 && payload[..2] != 1000u16.to_be_bytes() {
                    return Err(format!(
                        "closed with code {}",
                        u16::from_be_bytes([payload[0], payload[1]])
                    ));
                }
                return self.await_eof();
            }
        }
        Err("no close reply".into())
    }

    fn close(&mut self) -> Res<()> {
        self.start_close()?;
        self.finish_close()
    }

    /// Reads until the server closes TCP (bounded by the read timeout per read).
    fn await_eof(&mut self) -> Res<()> {
        let mut scratch = [0u8; 256];
        for _ in 0..CLOSE_READ_LIMIT {
            match self.s.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // TLS peers may close without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("waiting for the server to close: {e}")),
            }
        }
        Err("the server kept sending after the close".into())
    }

    /// Gives the read buffer back (idle sessions should cost the bench little).
    fn shrink(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
        self.wbuf = Vec::new();
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// One throughput sample.
#[derive(Clone, Copy)]
struct Transfer {
    elapsed: Duration,
    cpu: Cpu,
}

/// Reads the CPU time of the process behind a route (nothing for direct).
#[derive(Clone, Copy)]
struct Meter(Option<u32>);

impl Meter {
    fn read(self) -> Res<Cpu> {
        self.0.map_or(Ok(Cpu::default()), cpu_of)
    }
}

/// The origin streams `wire.down`; the client compares every byte.
fn downstream(ep: &Endpoint, meter: Meter, wire: &Wire) -> Res<Transfer> {
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
fn upstream_to_sink(ep: &Endpoint, meter: Meter, wire: &Wire, origin: &Origin) -> Res<Transfer> {
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
struct Latency {
    samples: Vec<u64>,
    cpu: Cpu,
    elapsed: Duration,
}

/// `n` sequential 32-byte round trips on one session per route, the routes taking turns in
/// batches of `RTT_BATCH` (in rotating order) so that a burst of noise from elsewhere on the
/// machine lands on all of them alike instead of spoiling one route's percentiles.
fn round_trips(routes: &[(&Endpoint, Meter)], n: usize) -> Res<Vec<(Route, Latency)>> {
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
struct CSession {
    sock: mio::net::TcpStream,
    rbuf: [u8; 64],
    rlen: usize,
    sent_at: Instant,
    done: usize,
    /// Bytes of the current request not yet written.
    pending: Vec<u8>,
    finished: bool,
}

const ECHO_REPLY: usize = 2 + ECHO_LEN;

impl CSession {
    fn send_next(&mut self, id: usize) -> io::Result<()> {
        let seq = ((id as u64) << 32) | self.done as u64;
        self.pending.clear();
        push_frame(
            &mut self.pending,
            0x82,
            &echo_payload(seq),
            Some(mask_for(seq)),
        );
        self.sent_at = Instant::now();
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.sock.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `k` sessions, each doing `trips` sequential round trips, all at once, from one mio thread.
/// Only plain client connections (not the direct route to a TLS origin).
fn concurrent(
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
    })
}

/// `m` sessions from `NEW_THREADS` threads: connect, upgrade, one echo, close. Tokens are
/// minted beforehand (nginx gets the same request shape).
fn new_sessions(ep: &Endpoint, meter: Meter, m: usize, origin: &Origin) -> Res<Latency> {
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
            .spawn(move || -> Res<Vec<u64>> {
                barrier.wait();
                let mut samples = Vec::new();
                // Bounded: each pass takes one of the m sessions.
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((vmi, token)) = work.get(i) else {
                        return Ok(samples);
                    };
                    let t = Instant::now();
                    let mut c = ep.open(vmi, token.as_deref())?;
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
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => samples.extend(s),
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
    })
}

/// One idle-memory sample on a fresh process.
struct Idle {
    /// Connect to 101, per session, as they were opened one after the other (ns).
    upgrade_ns: Vec<u64>,
    start: u64,
    half: u64,
    full: u64,
    sessions: usize,
    idle_cpu: Cpu,
    idle_wall: Duration,
    open_wall: Duration,
    peak: u64,
}

impl Idle {
    fn per_session_kib(&self) -> f64 {
        (self.full as f64 - self.start as f64) / self.sessions as f64
    }

    fn marginal_kib(&self) -> f64 {
        let added = self.sessions - self.sessions / 2;
        (self.full as f64 - self.half as f64) / added.max(1) as f64
    }

    fn idle_cpu_percent(&self) -> f64 {
        100.0 * self.idle_cpu.run / self.idle_wall.as_secs_f64()
    }
}

/// Opens `k` sessions (one echo each) through `ep`, reads `pid`'s settled RSS at 0, k/2 and
/// k sessions, then closes them all and waits until the origin has seen them go.
fn idle_sessions(ep: &Endpoint, pid: u32, k: usize, origin: &Origin) -> Res<Idle> {
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

// ---------------------------------------------------------------------------------------------
// One variant (plain or TLS upstream): all routes, all rounds

/// Samples per route.
struct PerRoute<T> {
    direct: Vec<T>,
    ours: Vec<T>,
    nginx: Vec<T>,
}

impl<T> Default for PerRoute<T> {
    fn default() -> Self {
        PerRoute {
            direct: Vec::new(),
            ours: Vec::new(),
            nginx: Vec::new(),
        }
    }
}

impl<T> PerRoute<T> {
    fn get(&self, r: Route) -> &[T] {
        match r {
            Route::Direct => &self.direct,
            Route::Ours => &self.ours,
            Route::Nginx => &self.nginx,
        }
    }

    fn push(&mut self, r: Route, v: T) {
        match r {
            Route::Direct => self.direct.push(v),
            Route::Ours => self.ours.push(v),
            Route::Nginx => self.nginx.push(v),
        }
    }
}

struct VariantResults {
    tls: bool,
    down: PerRoute<Transfer>,
    up: PerRoute<Transfer>,
    rtt: PerRoute<Latency>,
    conc: PerRoute<Latency>,
    news: PerRoute<Latency>,
    idle: PerRoute<Idle>,
    /// Settled RSS (KiB) of an nginx worker at start with worker_connections 1024 and with the
    /// idle-sized value: the difference is the connection slots nginx preallocates.
    nginx_start_small: u64,
    nginx_start_big: u64,
    nginx_big_connections: usize,
    /// TLS handshakes at the origin: (resumed, all) per route, over the whole variant.
    tls_resumed: [(Route, usize, usize); 3],
    /// Proxy log and nginx error log lines worth reading.
    nginx_log: Vec<String>,
    ours_peak_kib: u64,
    /// WORKERS=1 against WORKERS=2 (plain variant, unless `BENCH_WORKERS=0`).
    scaling: Option<Scaling>,
}

fn run_variant(
    knobs: &Knobs,
    wire: &Arc<Wire>,
    nginx_bin: &Path,
    tls: bool,
) -> Res<VariantResults> {
    let label = if tls { "TLS" } else { "plain" };
    let pki = tls.then(pki::TestPki::new);
    let sa_dir = TempDir::new("sa")?;
    let origin_tls = match &pki {
        Some(p) => Some(
            p.server_tls()
                .server_config()
                .map_err(|e| format!("origin TLS config: {e}"))?,
        ),
        None => None,
    };
    let origin = Origin::start(
        OriginOptions {
            tls: origin_tls,
            bearer: tls.then(|| SA_TOKEN.to_string()),
        },
        Arc::clone(wire),
    )?;
    let max_conn = (knobs.idle + knobs.conc + 1024).max(10_000);
    let mut proxy_env: Vec<(String, String)> = vec![
        ("SECRET_KEY".into(), tokens::SECRET.into()),
        ("MAX_CONNECTIONS".into(), max_conn.to_string()),
    ];
    proxy_env.extend(knobs.proxy_env.iter().cloned());
    let mut nginx_tls = None;
    if let Some(p) = &pki {
        let ca = sa_dir.0.join("ca.crt");
        p.write_ca(&ca).map_err(|e| format!("write ca.crt: {e}"))?;
        std::fs::write(sa_dir.0.join("token"), SA_TOKEN)
            .map_err(|e| format!("write token: {e}"))?;
        proxy_env.extend([
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                origin.addr.port().to_string(),
            ),
            ("SERVICE_ACCOUNT_DIR".into(), sa_dir.0.display().to_string()),
        ]);
        nginx_tls = Some((ca, SA_TOKEN.to_string()));
    } else {
        proxy_env.extend([
            ("LOCAL_DEV_MODE".into(), "true".into()),
            ("WS_REMOTE_URL".into(), format!("ws://{}", origin.addr)),
        ]);
    }
    let (_, hard) = nofile_limits()?;
    // CAP_SYS_RESOURCE (bit 24 of the effective set), not root as such: root in a container
    // or user namespace often lacks it, and then cannot go past the hard limit either.
    let may_exceed_hard = read_proc("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0);
    let wc = 2 * (knobs.idle.max(knobs.conc)) + 512;
    let want_rlimit = wc as u64 + 512;
    let nginx_cfg = NginxConfig {
        bin: nginx_bin.to_path_buf(),
        origin: origin.addr,
        tls: nginx_tls,
        worker_connections: wc,
        // A master without CAP_SYS_RESOURCE cannot raise the worker's limit above the hard
        // limit (nginx logs an [alert] when it tries).
        rlimit_nofile: if may_exceed_hard {
            want_rlimit
        } else {
            want_rlimit.min(hard)
        },
        extra: knobs.nginx_directives.clone(),
    };

    let mut ours = ProxyProcess::start(&proxy_env, &knobs.loglevel)?;
    let mut nginx = Nginx::start(&nginx_cfg)?;
    eprintln!(
        "bench nginx [{label}]: origin {} | ours pid {} on {} | nginx master {} worker {} on {}",
        origin.addr,
        ours.pid(),
        ours.addr,
        nginx.master(),
        nginx.worker,
        nginx.addr
    );
    // Processes started from here on (fresh proxies and nginx for the idle workload) inherit
    // the bench's placement.
    let pinned = Pinning::apply(knobs.pin, &[ours.pid(), nginx.worker]);
    let client_tls = pki.as_ref().map(|p| p.client_config());
    let endpoint = |route: Route, addr: SocketAddr| Endpoint {
        route,
        addr,
        tls: if route == Route::Direct {
            client_tls.clone()
        } else {
            None
        },
        bearer: if route == Route::Direct && tls {
            Some(SA_TOKEN.into())
        } else {
            None
        },
    };

    let mut res = VariantResults {
        tls,
        down: PerRoute::default(),
        up: PerRoute::default(),
        rtt: PerRoute::default(),
        conc: PerRoute::default(),
        news: PerRoute::default(),
        idle: PerRoute::default(),
        nginx_start_small: 0,
        nginx_start_big: 0,
        nginx_big_connections: wc,
        tls_resumed: [
            (Route::Ours, 0, 0),
            (Route::Nginx, 0, 0),
            (Route::Direct, 0, 0),
        ],
        nginx_log: Vec::new(),
        ours_peak_kib: 0,
        scaling: None,
    };
    let mut resumed = PerRoute::<(usize, usize)>::default();
    for round in 0..knobs.rounds {
        let order = Route::rotation(round);
        let (ours_ep, nginx_ep) = (
            endpoint(Route::Ours, ours.addr),
            endpoint(Route::Nginx, nginx.addr),
        );
        let direct_ep = endpoint(Route::Direct, origin.addr);
        let pick = |r: Route| -> (&Endpoint, Meter) {
            match r {
                Route::Direct => (&direct_ep, Meter(None)),
                Route::Ours => (&ours_ep, Meter(Some(ours.pid()))),
                Route::Nginx => (&nginx_ep, Meter(Some(nginx.worker))),
            }
        };
        let step = |what: &str| {
            eprintln!(
                "bench nginx [{label}] round {}/{}: {what}",
                round + 1,
                knobs.rounds
            );
        };
        step("downstream");
        for r in order {
            let (ep, m) = pick(r);
            res.down.push(r, downstream(ep, m, wire)?);
        }
        step("upstream");
        for r in order {
            let (ep, m) = pick(r);
            res.up.push(r, upstream_to_sink(ep, m, wire, &origin)?);
        }
        step("sequential round trips (routes interleaved)");
        let routes: Vec<(&Endpoint, Meter)> = order.iter().map(|&r| pick(r)).collect();
        for (r, lat) in round_trips(&routes, knobs.rtt)? {
            res.rtt.push(r, lat);
        }
        step("concurrent sessions");
        for r in order {
            if r == Route::Direct && tls {
                continue; // the mio client speaks plain TCP only
            }
            let (ep, m) = pick(r);
            res.conc
                .push(r, concurrent(ep, m, knobs.conc, knobs.conc_trips, &origin)?);
        }
        step("new sessions");
        for r in order {
            let (ep, m) = pick(r);
            let before = origin.stats.resumed();
            res.news
                .push(r, new_sessions(ep, m, knobs.new_sessions, &origin)?);
            let after = origin.stats.resumed();
            let acc = match r {
                Route::Direct => &mut resumed.direct,
                Route::Ours => &mut resumed.ours,
                Route::Nginx => &mut resumed.nginx,
            };
            acc.push((after.0 - before.0, after.1 - before.1));
        }
        ours.check_alive()?;
        nginx.check_alive()?;
        step("idle sessions (fresh processes)");
        for r in order {
            match r {
                Route::Direct => {}
                Route::Ours => {
                    let mut fresh = ProxyProcess::start(&proxy_env, &knobs.loglevel)?;
                    let ep = endpoint(Route::Ours, fresh.addr);
                    res.idle
                        .push(r, idle_sessions(&ep, fresh.pid(), knobs.idle, &origin)?);
                    fresh.check_alive()?;
                }
                Route::Nginx => {
                    if round == 0 {
                        let small = NginxConfig {
                            worker_connections: NGINX_SMALL_CONNECTIONS,
                            ..nginx_cfg.clone()
                        };
                        let n = Nginx::start(&small)?;
                        res.nginx_start_small = settled_rss_kib(n.worker)?;
                    }
                    let mut fresh = Nginx::start(&nginx_cfg)?;
                    let ep = endpoint(Route::Nginx, fresh.addr);
                    let sample = idle_sessions(&ep, fresh.worker, knobs.idle, &origin)?;
                    if round == 0 {
                        res.nginx_start_big = sample.start;
                    }
                    res.idle.push(r, sample);
                    fresh.check_alive()?;
                    res.nginx_log.extend(fresh.serious_log_lines());
                }
            }
        }
    }
    ours.check_alive()?;
    nginx.check_alive()?;
    // The scaling section is about using more than one CPU: undo the placement first (the
    // processes it starts then inherit the bench's restored affinity).
    drop(pinned);
    if knobs.scaling && !tls {
        res.scaling = Some(run_scaling(knobs, &proxy_env, &endpoint, &origin)?);
    }
    origin.stats.check()?;
    res.ours_peak_kib = status_kib(ours.pid(), "VmHWM")?;
    res.nginx_log.extend(nginx.serious_log_lines());
    for line in res.nginx_log.iter().take(10) {
        eprintln!("nginx error.log: {line}");
    }
    if res.nginx_log.iter().any(|l| {
        ["[crit]", "[alert]", "[emerg]"]
            .iter()
            .any(|t| l.contains(t))
    }) {
        return Err(format!(
            "nginx logged critical errors, e.g. {}",
            res.nginx_log[0]
        ));
    }
    let sum = |v: &[(usize, usize)]| v.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    for slot in &mut res.tls_resumed {
        let (a, b) = sum(resumed.get(slot.0));
        slot.1 = a;
        slot.2 = b;
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Scaling: our proxy with one worker against two

/// The worker counts compared; the arrays in `Scaling` follow this order.
const SCALING_WORKERS: [usize; 2] = [1, 2];
/// A single loop busy less than this (% of one core) was waiting for the load, not limiting it.
const SATURATED_PERCENT: f64 = 90.0;

/// Samples of the scaling section, per worker count (indexed as `SCALING_WORKERS`).
#[derive(Default)]
struct Scaling {
    conc: [Vec<Latency>; 2],
    news: [Vec<Latency>; 2],
    /// With two workers, the less busy worker thread's share of the proxy's CPU per sample:
    /// how evenly SO_REUSEPORT spread the connections.
    conc_share: Vec<f64>,
    news_share: Vec<f64>,
}

/// Workloads 4 and 5 on two more processes of ours, `WORKERS=1` and `WORKERS=2`, taking turns
/// in each round (the order alternating). The caller has undone the pinning: the point is what
/// a second loop adds when it can have a CPU of its own.
fn run_scaling(
    knobs: &Knobs,
    proxy_env: &[(String, String)],
    endpoint: &dyn Fn(Route, SocketAddr) -> Endpoint,
    origin: &Origin,
) -> Res<Scaling> {
    let mut proxies = Vec::with_capacity(SCALING_WORKERS.len());
    for w in SCALING_WORKERS {
        let mut env = proxy_env.to_vec();
        // Last, so that it wins over a WORKERS in BENCH_PROXY_ENV.
        env.push(("WORKERS".into(), w.to_string()));
        proxies.push(ProxyProcess::start(&env, &knobs.loglevel)?);
    }
    let started: Vec<String> = SCALING_WORKERS
        .iter()
        .zip(&proxies)
        .map(|(w, p)| format!("WORKERS={w} pid {} on {}", p.pid(), p.addr))
        .collect();
    eprintln!("bench nginx [plain] scaling: {}", started.join(" | "));
    let mut res = Scaling::default();
    for round in 0..knobs.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let step = |what: &str| {
            eprintln!(
                "bench nginx [plain] scaling round {}/{}: {what}",
                round + 1,
                knobs.rounds
            );
        };
        step("concurrent sessions, WORKERS=1 and 2");
        for i in order {
            let (pid, ep) = (proxies[i].pid(), endpoint(Route::Ours, proxies[i].addr));
            let (lat, share) = on_every_worker(pid, SCALING_WORKERS[i], || {
                concurrent(&ep, Meter(Some(pid)), knobs.conc, knobs.conc_trips, origin)
            })?;
            res.conc[i].push(lat);
            if SCALING_WORKERS[i] > 1 {
                res.conc_share.push(share);
            }
        }
        step("new sessions, WORKERS=1 and 2");
        for i in order {
            let (pid, ep) = (proxies[i].pid(), endpoint(Route::Ours, proxies[i].addr));
            let (lat, share) = on_every_worker(pid, SCALING_WORKERS[i], || {
                new_sessions(&ep, Meter(Some(pid)), knobs.new_sessions, origin)
            })?;
            res.news[i].push(lat);
            if SCALING_WORKERS[i] > 1 {
                res.news_share.push(share);
            }
        }
        for p in &mut proxies {
            p.check_alive()?;
        }
    }
    Ok(res)
}

/// Runs `workload` on our proxy `pid` started with `workers` loops and fails unless every loop
/// ran meanwhile. The threads cannot be told apart by name (the loops are named
/// `kubevirt-vnc-proxy`, which the kernel cuts to the 15 bytes the main thread and the signal
/// thread carry from the binary's name), so they are told apart by what they did: the signal
/// thread sleeps until a signal comes, and a loop with no connection sleeps in epoll, so at
/// least `workers` threads must have run. Returns the workload's result and the share of the
/// proxy's CPU taken by the least busy of the `workers` busiest threads.
fn on_every_worker<T>(
    pid: u32,
    workers: usize,
    workload: impl FnOnce() -> Res<T>,
) -> Res<(T, f64)> {
    let fail = |e: String| format!("WORKERS={workers}: {e}");
    let before = thread_run_ns(pid).map_err(fail)?;
    let out = workload().map_err(fail)?;
    let after = thread_run_ns(pid).map_err(fail)?;
    let mut ran: Vec<u64> = after
        .iter()
        .map(|&(tid, ns)| {
            let was = before
                .iter()
                .find(|&&(t, _)| t == tid)
                .map_or(0, |&(_, ns)| ns);
            ns.saturating_sub(was)
        })
        .filter(|&ns| ns > 0)
        .collect();
    if ran.len() < workers {
        return Err(fail(format!(
            "only {} of the proxy's threads ran during the workload: a loop served nothing",
            ran.len()
        )));
    }
    ran.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = ran.iter().sum();
    Ok((out, ran[workers - 1] as f64 / total as f64))
}

// ---------------------------------------------------------------------------------------------
// Statistics and report

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile `q` of `samples` (ns), in microseconds.
fn percentile_us(samples: &[u64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64 / 1000.0
}

/// Median over the rounds of each round's percentile `q`, in microseconds.
fn median_percentile_us(l: &[Latency], q: f64) -> f64 {
    median(l.iter().map(|l| percentile_us(&l.samples, q)))
}

/// Median rate of a latency workload: operations per second of its wall time.
fn per_second(l: &[Latency]) -> f64 {
    median(
        l.iter()
            .map(|l| l.samples.len() as f64 / l.elapsed.as_secs_f64()),
    )
}

/// Median CPU time of the measured process per `per` operations (1e6: µs per operation).
fn cpu_per(l: &[Latency], per: f64) -> f64 {
    median(l.iter().map(|l| per * l.cpu.run / l.samples.len() as f64))
}

/// Median CPU busy time of the measured process, in % of one core (above 100: several).
fn busy_percent(l: &[Latency]) -> f64 {
    median(
        l.iter()
            .map(|l| 100.0 * l.cpu.run / l.elapsed.as_secs_f64()),
    )
}

/// Values of every round, comma-separated, or a dash when there are none.
fn list_or_dash(vals: Vec<String>) -> String {
    if vals.is_empty() {
        "—".into()
    } else {
        vals.join(", ")
    }
}

fn fmt_num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "—".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

struct Report<'a> {
    knobs: &'a Knobs,
    variants: &'a [VariantResults],
    nginx_version: String,
    load_before: String,
    load_after: String,
    limits: (u64, u64),
    elapsed: Duration,
}

/// Medians of one variant, computed once for the tables and the targets.
struct Summary {
    down_rate: [f64; 3],
    up_rate: [f64; 3],
    down_cpu: [f64; 3],
    down_sys: [f64; 3],
    up_cpu: [f64; 3],
    up_sys: [f64; 3],
    down_busy: [f64; 3],
    up_busy: [f64; 3],
    rtt_p50: [f64; 3],
    rtt_p99: [f64; 3],
    rtt_cpu_us: [f64; 3],
    rtt_sys: [f64; 3],
    conc_sys: [f64; 3],
    new_sys: [f64; 3],
    conc_total: [f64; 3],
    conc_rate: [f64; 3],
    conc_p50: [f64; 3],
    conc_p99: [f64; 3],
    conc_cpu_us: [f64; 3],
    new_rate: [f64; 3],
    new_p50: [f64; 3],
    new_p99: [f64; 3],
    new_cpu: [f64; 3],
    idle_start: [f64; 3],
    idle_half: [f64; 3],
    idle_full: [f64; 3],
    idle_avg: [f64; 3],
    idle_marginal: [f64; 3],
    idle_cpu: [f64; 3],
    idle_open_rate: [f64; 3],
    idle_peak: [f64; 3],
    idle_upgrade_p50: [f64; 3],
    idle_upgrade_p99: [f64; 3],
    /// nginx's preallocated connection slots, KiB per idle session (two slots each).
    nginx_slots_per_session: f64,
}

/// Index of a route in the summary arrays: direct, ours, nginx.
fn ix(r: Route) -> usize {
    match r {
        Route::Direct => 0,
        Route::Ours => 1,
        Route::Nginx => 2,
    }
}

impl Summary {
    fn new(v: &VariantResults, payload: usize) -> Summary {
        let gib = payload as f64 / GIB;
        let each = |f: &dyn Fn(Route) -> f64| -> [f64; 3] {
            let mut out = [f64::NAN; 3];
            for r in Route::ALL {
                out[ix(r)] = f(r);
            }
            out
        };
        let proxied = |r: Route, x: f64| if r == Route::Direct { f64::NAN } else { x };
        let rate = |t: &[Transfer]| {
            median(
                t.iter()
                    .map(|t| payload as f64 / MIB / t.elapsed.as_secs_f64()),
            )
        };
        let per_gib = |t: &[Transfer]| median(t.iter().map(|t| t.cpu.run / gib));
        let sys = |t: &[Transfer]| median(t.iter().map(|t| t.cpu.sys_share()));
        let busy = |t: &[Transfer]| {
            median(
                t.iter()
                    .map(|t| 100.0 * t.cpu.run / t.elapsed.as_secs_f64()),
            )
        };
        let pct = median_percentile_us;
        let lat_sys = |l: &[Latency]| median(l.iter().map(|l| l.cpu.sys_share()));
        let per_op_us = |l: &[Latency]| cpu_per(l, 1e6);
        let idle = |r: Route, f: &dyn Fn(&Idle) -> f64| median(v.idle.get(r).iter().map(f));
        let slots = v
            .nginx_big_connections
            .saturating_sub(NGINX_SMALL_CONNECTIONS);
        Summary {
            down_rate: each(&|r| rate(v.down.get(r))),
            up_rate: each(&|r| rate(v.up.get(r))),
            down_cpu: each(&|r| proxied(r, per_gib(v.down.get(r)))),
            down_sys: each(&|r| proxied(r, sys(v.down.get(r)))),
            up_cpu: each(&|r| proxied(r, per_gib(v.up.get(r)))),
            up_sys: each(&|r| proxied(r, sys(v.up.get(r)))),
            down_busy: each(&|r| proxied(r, busy(v.down.get(r)))),
            up_busy: each(&|r| proxied(r, busy(v.up.get(r)))),
            rtt_p50: each(&|r| pct(v.rtt.get(r), 0.50)),
            rtt_p99: each(&|r| pct(v.rtt.get(r), 0.99)),
            rtt_cpu_us: each(&|r| proxied(r, per_op_us(v.rtt.get(r)))),
            rtt_sys: each(&|r| proxied(r, lat_sys(v.rtt.get(r)))),
            conc_sys: each(&|r| proxied(r, lat_sys(v.conc.get(r)))),
            new_sys: each(&|r| proxied(r, lat_sys(v.news.get(r)))),
            conc_total: each(&|r| median(v.conc.get(r).iter().map(|l| l.elapsed.as_secs_f64()))),
            conc_rate: each(&|r| per_second(v.conc.get(r))),
            conc_p50: each(&|r| pct(v.conc.get(r), 0.50)),
            conc_p99: each(&|r| pct(v.conc.get(r), 0.99)),
            conc_cpu_us: each(&|r| proxied(r, per_op_us(v.conc.get(r)))),
            new_rate: each(&|r| per_second(v.news.get(r))),
            new_p50: each(&|r| pct(v.news.get(r), 0.50) / 1000.0),
            new_p99: each(&|r| pct(v.news.get(r), 0.99) / 1000.0),
            new_cpu: each(&|r| proxied(r, cpu_per(v.news.get(r), 1000.0))),
            idle_start: each(&|r| idle(r, &|i| i.start as f64)),
            idle_half: each(&|r| idle(r, &|i| i.half as f64)),
            idle_full: each(&|r| idle(r, &|i| i.full as f64)),
            idle_avg: each(&|r| idle(r, &|i| i.per_session_kib())),
            idle_marginal: each(&|r| idle(r, &|i| i.marginal_kib())),
            idle_cpu: each(&|r| idle(r, &|i| i.idle_cpu_percent())),
            idle_open_rate: each(&|r| idle(r, &|i| i.sessions as f64 / i.open_wall.as_secs_f64())),
            idle_peak: each(&|r| idle(r, &|i| i.peak as f64)),
            idle_upgrade_p50: each(&|r| idle(r, &|i| percentile_us(&i.upgrade_ns, 0.50))),
            idle_upgrade_p99: each(&|r| idle(r, &|i| percentile_us(&i.upgrade_ns, 0.99))),
            nginx_slots_per_session: if slots > 0 && v.nginx_start_big > 0 {
                2.0 * (v.nginx_start_big as f64 - v.nginx_start_small as f64) / slots as f64
            } else {
                f64::NAN
            },
        }
    }
}

impl Report<'_> {
    fn render(&self) -> String {
        let mut out = String::new();
        let k = self.knobs;
        let _ = writeln!(
            out,
            "### Our proxy against nginx (and a direct connection)\n"
        );
        let _ = writeln!(out, "`{}`\n", k.command_line());
        let _ = writeln!(
            out,
            "{}; {}; load average (1 min) before {}, after {}; open-files limit {} (hard {}); \
             total run time {:.0} s.\n",
            support::machine(),
            self.nginx_version,
            self.load_before,
            self.load_after,
            self.limits.0,
            self.limits.1,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(out, "{}.\n", k.describe());
        if let Some(note) = &k.idle_note {
            let _ = writeln!(out, "**Note:** {note}.\n");
        }
        let _ = writeln!(
            out,
            "**nginx does no token check**: it maps `/TOKEN/VMI` to the KubeVirt path with a regex \
             location and forwards; our proxy verifies an HS256 JWT and the VMI allow-list on every \
             session. One nginx worker (`worker_processes 1`, `proxy_buffering off`, `access_log \
             off`, otherwise defaults: it relays through `proxy_buffer_size` buffers, one page) \
             against our single-threaded loop at LOGLEVEL={} (64 KiB relay buffers by default). \
             CPU figures are the nginx *worker*'s and our process's run time \
             (`/proc/PID/task/*/schedstat`; the sys share from utime/stime in `/proc/PID/stat`); \
             memory is resident pages (VmRSS), i.e. what was touched, not what was reserved. The \
             origin (one mio thread in the bench process) and the clients share the machine with \
             the proxies: throughput and latency depend on what else runs there (compare the load \
             average), CPU per unit of work less so. Sequential round trips interleave the routes \
             in batches of {RTT_BATCH}. {}\n",
            k.loglevel,
            match k.pin {
                Pin::One =>
                    "**Placement** (`BENCH_PIN=one`): the bench (clients and origin), our \
                    proxy and the nginx worker all run on the last CPU (taskset), so that no \
                    number depends on where the scheduler happened to put whom: on this kind of \
                    VM a wakeup across CPUs costs tens of µs and inflates the woken process's \
                    accounted CPU time several times over. Throughput is then that of one core \
                    shared by client, proxy and origin; CPU per unit of work is the proxy's own.",
                Pin::Split =>
                    "**Placement** (`BENCH_PIN=split`): our proxy and the nginx worker on \
                    the last CPU, the bench on the others; every hop through a proxy crosses \
                    CPUs.",
                Pin::Off =>
                    "**Placement** (`BENCH_PIN=off`): wherever the scheduler puts the \
                    processes; expect spread between rounds.",
            }
        );
        let summaries: Vec<Summary> = self
            .variants
            .iter()
            .map(|v| Summary::new(v, k.mib as usize * (1 << 20)))
            .collect();
        for (v, s) in self.variants.iter().zip(&summaries) {
            self.render_variant(&mut out, v, s);
        }
        self.render_targets(&mut out, &summaries);
        for v in self.variants {
            self.render_rounds(&mut out, v);
        }
        out
    }

    fn render_variant(&self, out: &mut String, v: &VariantResults, s: &Summary) {
        let k = self.knobs;
        let title = if v.tls {
            "TLS upstream (`wss://`: our proxy in-cluster mode with a service-account CA and bearer; \
             nginx `proxy_pass https://` with `proxy_ssl_verify on`, the same CA and bearer)"
        } else {
            "Plain upstream (`ws://`: our proxy in local dev mode; nginx `proxy_pass http://`)"
        };
        let _ = writeln!(out, "#### {title}\n");
        let _ = writeln!(
            out,
            "| workload (median of {} rounds) | direct | ours | nginx | ours/nginx |",
            k.rounds
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        let row = |out: &mut String, name: &str, vals: [f64; 3], d: usize| {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                fmt_num(vals[0], d),
                fmt_num(vals[1], d),
                fmt_num(vals[2], d),
                ratio(vals[1], vals[2])
            );
        };
        let mib = k.mib;
        row(
            out,
            &format!("downstream {mib} MiB, 64 KiB frames (MiB/s)"),
            s.down_rate,
            0,
        );
        row(
            out,
            &format!("upstream {mib} MiB, 64 KiB frames (MiB/s)"),
            s.up_rate,
            0,
        );
        row(
            out,
            &format!("{} sequential round trips, p50 (µs)", k.rtt),
            s.rtt_p50,
            1,
        );
        row(out, "… p99 (µs)", s.rtt_p99, 1);
        let added = |p: [f64; 3]| [f64::NAN, p[1] - p[0], p[2] - p[0]];
        row(out, "… added over direct, p50 (µs)", added(s.rtt_p50), 1);
        row(out, "… added over direct, p99 (µs)", added(s.rtt_p99), 1);
        let conc = format!("{} sessions × {} round trips", k.conc, k.conc_trips);
        row(out, &format!("{conc}: total (s)"), s.conc_total, 2);
        row(out, "… round trips per second", s.conc_rate, 0);
        row(out, "… p50 (µs)", s.conc_p50, 1);
        row(out, "… p99 (µs)", s.conc_p99, 1);
        row(
            out,
            &format!(
                "new sessions per second ({NEW_THREADS} threads, {} sessions)",
                k.new_sessions
            ),
            s.new_rate,
            0,
        );
        row(
            out,
            "… one session (connect, upgrade, echo, close), p50 (ms)",
            s.new_p50,
            2,
        );
        row(out, "… p99 (ms)", s.new_p99, 2);
        row(
            out,
            &format!(
                "opening {} idle sessions, sequentially (sessions/s)",
                k.idle
            ),
            s.idle_open_rate,
            0,
        );
        row(
            out,
            "… upgrade alone (connect → 101), p50 (µs)",
            s.idle_upgrade_p50,
            1,
        );
        row(out, "… p99 (µs)", s.idle_upgrade_p99, 1);
        if v.tls {
            let _ = writeln!(
                out,
                "\nThe direct route speaks TLS itself here (the others are plain to the client), and \
                 the concurrent client is plain-only, hence no direct figure there."
            );
        }

        let _ = writeln!(
            out,
            "\n| cost in the proxy (ours: our process; nginx: its worker) | ours | nginx | ours/nginx |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let row2 =
            |out: &mut String, name: &str, vals: [f64; 3], d: usize, extra: Option<[f64; 3]>| {
                let cell = |i: usize| match extra {
                    Some(e) if e[i].is_finite() => {
                        format!("{} ({:.0} % sys)", fmt_num(vals[i], d), 100.0 * e[i])
                    }
                    _ => fmt_num(vals[i], d),
                };
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} |",
                    cell(1),
                    cell(2),
                    ratio(vals[1], vals[2])
                );
            };
        row2(
            out,
            "CPU per GiB downstream (s)",
            s.down_cpu,
            3,
            Some(s.down_sys),
        );
        row2(out, "CPU per GiB upstream (s)", s.up_cpu, 3, Some(s.up_sys));
        row2(
            out,
            "CPU busy while streaming downstream (% of a core)",
            s.down_busy,
            0,
            None,
        );
        row2(
            out,
            "CPU busy while streaming upstream (% of a core)",
            s.up_busy,
            0,
            None,
        );
        row2(
            out,
            "CPU per sequential round trip (µs)",
            s.rtt_cpu_us,
            1,
            Some(s.rtt_sys),
        );
        row2(
            out,
            "CPU per concurrent round trip (µs)",
            s.conc_cpu_us,
            1,
            Some(s.conc_sys),
        );
        row2(
            out,
            "CPU per 1,000 new sessions (s)",
            s.new_cpu,
            3,
            Some(s.new_sys),
        );
        row2(
            out,
            &format!("CPU while {} sessions sit idle (% of a core)", k.idle),
            s.idle_cpu,
            2,
            None,
        );
        let half = k.idle / 2;
        row2(
            out,
            "idle sessions, fresh process: RSS at start (KiB)",
            s.idle_start,
            0,
            None,
        );
        row2(
            out,
            &format!("… RSS with {half} sessions (KiB)"),
            s.idle_half,
            0,
            None,
        );
        row2(
            out,
            &format!("… RSS with {} sessions (KiB)", k.idle),
            s.idle_full,
            0,
            None,
        );
        row2(
            out,
            &format!("… memory per idle session, average over {} (KiB)", k.idle),
            s.idle_avg,
            2,
            None,
        );
        row2(
            out,
            &format!(
                "… memory per idle session, marginal {half} → {} (KiB)",
                k.idle
            ),
            s.idle_marginal,
            2,
            None,
        );
        let with_slots = [
            f64::NAN,
            s.idle_avg[1],
            s.idle_avg[2] + s.nginx_slots_per_session,
        ];
        row2(
            out,
            "… per idle session incl. nginx's preallocated connection slots (KiB)",
            with_slots,
            2,
            None,
        );
        row2(out, "… peak RSS, VmHWM (KiB)", s.idle_peak, 0, None);
        let _ = writeln!(
            out,
            "\nnginx allocates and touches its `worker_connections` ({}) slots at start: RSS at \
             start was {} KiB with {} against {} KiB with {NGINX_SMALL_CONNECTIONS}, i.e. {} KiB \
             per idle session (two slots each) that the average above does not see. Our \
             long-running proxy's peak RSS (VmHWM) over all other workloads: {} KiB.",
            v.nginx_big_connections,
            v.nginx_start_big,
            v.nginx_big_connections,
            v.nginx_start_small,
            fmt_num(s.nginx_slots_per_session, 2),
            v.ours_peak_kib
        );
        if v.tls {
            let parts: Vec<String> = v
                .tls_resumed
                .iter()
                .filter(|(_, _, all)| *all > 0)
                .map(|(r, resumed, all)| format!("{} {resumed} of {all}", r.name()))
                .collect();
            let _ = writeln!(
                out,
                "\nTLS handshakes resumed at the origin during the new-session workload: {}.",
                parts.join(", ")
            );
        }
        if !v.nginx_log.is_empty() {
            let _ = writeln!(
                out,
                "\nnginx logged {} lines at `[error]` or worse, e.g. `{}`.",
                v.nginx_log.len(),
                v.nginx_log[0]
            );
        }
        let _ = writeln!(out);
        if let Some(sc) = &v.scaling {
            self.render_scaling(out, sc);
        }
    }

    /// WORKERS=1 against WORKERS=2: medians, the caveat that the load shares the CPUs, how the
    /// work split between the two loops, and every round.
    fn render_scaling(&self, out: &mut String, sc: &Scaling) {
        let k = self.knobs;
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let _ = writeln!(
            out,
            "##### Scaling: our proxy with `WORKERS=1` against `WORKERS=2` (plain upstream, all \
             {cpus} CPUs)\n"
        );
        let _ = writeln!(
            out,
            "| workload (median of {} rounds) | WORKERS=1 | WORKERS=2 | 2/1 |",
            k.rounds
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let row = |out: &mut String,
                   name: &str,
                   f: &dyn Fn(&[Latency]) -> f64,
                   samples: &[Vec<Latency>; 2],
                   d: usize| {
            let (one, two) = (f(&samples[0]), f(&samples[1]));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                fmt_num(one, d),
                fmt_num(two, d),
                ratio(two, one)
            );
        };
        let conc = format!("{} sessions × {} round trips", k.conc, k.conc_trips);
        row(
            out,
            &format!("{conc}: round trips per second"),
            &per_second,
            &sc.conc,
            0,
        );
        row(
            out,
            "… p50 (µs)",
            &|l| median_percentile_us(l, 0.50),
            &sc.conc,
            1,
        );
        row(
            out,
            "… proxy CPU per round trip (µs)",
            &|l| cpu_per(l, 1e6),
            &sc.conc,
            1,
        );
        row(
            out,
            "… proxy CPU busy (% of one core)",
            &busy_percent,
            &sc.conc,
            0,
        );
        row(
            out,
            &format!(
                "new sessions per second ({NEW_THREADS} threads, {} sessions)",
                k.new_sessions
            ),
            &per_second,
            &sc.news,
            0,
        );
        row(
            out,
            "… one session, p50 (ms)",
            &|l| median_percentile_us(l, 0.50) / 1000.0,
            &sc.news,
            2,
        );
        row(
            out,
            "… proxy CPU per 1,000 new sessions (s)",
            &|l| cpu_per(l, 1000.0),
            &sc.news,
            3,
        );
        row(
            out,
            "… proxy CPU busy (% of one core)",
            &busy_percent,
            &sc.news,
            0,
        );
        let pct = |v: &[f64]| list_or_dash(v.iter().map(|s| format!("{:.0}", 100.0 * s)).collect());
        let _ = writeln!(
            out,
            "\nNo pinning in this section: the proxy and the load it serves may use every CPU \
             ({cpus} here). The load generator runs on the same CPUs — the client threads (one \
             mio thread for the concurrent sessions, {NEW_THREADS} for the new sessions) and the \
             origin (one thread), all in the bench process — so with two workers the proxy never \
             has two cores to itself, and **2/1 is a lower bound** of what a second core gives \
             it. Proxy CPU is the sum over its threads (`/proc/PID/task/*/schedstat`); unpinned, \
             it includes wakeups across CPUs, so it does not compare with the pinned figures \
             above. Every worker thread ran during every sample (checked; the bench fails \
             otherwise); with two workers the less busy one took this share of the proxy's CPU, \
             per round: concurrent {} %, new sessions {} %.\n",
            pct(&sc.conc_share),
            pct(&sc.news_share)
        );
        // A ratio near 1 means nothing if one worker was not saturated to begin with: say so
        // rather than let it read as "a second worker does not help".
        let idle_loop: Vec<String> = [
            ("the concurrent sessions", &sc.conc[0]),
            ("the new sessions", &sc.news[0]),
        ]
        .into_iter()
        .map(|(name, l)| (name, busy_percent(l)))
        .filter(|&(_, busy)| busy < SATURATED_PERCENT)
        .map(|(name, busy)| format!("{name} ({} %)", fmt_num(busy, 0)))
        .collect();
        if !idle_loop.is_empty() {
            let _ = writeln!(
                out,
                "**With one worker the proxy was not saturated**: busy less than \
                 {SATURATED_PERCENT:.0} % of one core with {}. There the load generator, not the \
                 proxy, set the pace, and the ratio says little about what the second worker can \
                 add.\n",
                idle_loop.join(" and ")
            );
        }
        let _ = writeln!(
            out,
            "<details><summary>scaling, all rounds (WORKERS=1 first in odd rounds, WORKERS=2 in \
             even ones)</summary>\n"
        );
        let _ = writeln!(out, "| per round | WORKERS=1 | WORKERS=2 |");
        let _ = writeln!(out, "|---|---|---|");
        let per_round = |l: &[Latency], f: &dyn Fn(&Latency) -> f64, d: usize| {
            list_or_dash(l.iter().map(|l| fmt_num(f(l), d)).collect())
        };
        let rate = |l: &Latency| l.samples.len() as f64 / l.elapsed.as_secs_f64();
        let per_1000 = |l: &Latency| 1000.0 * l.cpu.run / l.samples.len() as f64;
        let mut line =
            |name: &str, samples: &[Vec<Latency>; 2], f: &dyn Fn(&Latency) -> f64, d: usize| {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} |",
                    per_round(&samples[0], f, d),
                    per_round(&samples[1], f, d)
                );
            };
        line("concurrent round trips/s", &sc.conc, &rate, 0);
        line("new sessions/s", &sc.news, &rate, 0);
        line("proxy CPU s per 1,000 new sessions", &sc.news, &per_1000, 3);
        let _ = writeln!(out, "\n</details>\n");
    }

    fn render_targets(&self, out: &mut String, summaries: &[Summary]) {
        let _ = writeln!(out, "#### Targets\n");
        let _ = writeln!(out, "| target | ours | nginx | limit | |");
        let _ = writeln!(out, "|---|---:|---:|---:|---|");
        let mut row = |name: &str, ours: f64, nginx: f64, factor: f64, d: usize| {
            let limit = factor * nginx;
            let verdict = if !(ours.is_finite() && limit.is_finite()) {
                "not measured"
            } else if ours <= limit {
                "met"
            } else {
                "not met"
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {verdict} |",
                fmt_num(ours, d),
                fmt_num(nginx, d),
                fmt_num(limit, d)
            );
        };
        for (v, s) in self.variants.iter().zip(summaries) {
            let (o, n) = (ix(Route::Ours), ix(Route::Nginx));
            if !v.tls {
                row(
                    "CPU per GiB downstream ≤ 0.8 × nginx (s)",
                    s.down_cpu[o],
                    s.down_cpu[n],
                    0.8,
                    3,
                );
                row(
                    "CPU per GiB upstream ≤ 0.8 × nginx (s)",
                    s.up_cpu[o],
                    s.up_cpu[n],
                    0.8,
                    3,
                );
                row(
                    "CPU per 1,000 new sessions ≤ nginx (s)",
                    s.new_cpu[o],
                    s.new_cpu[n],
                    1.0,
                    3,
                );
                let d = ix(Route::Direct);
                row(
                    "round trip added over direct, p50 ≤ nginx (µs)",
                    s.rtt_p50[o] - s.rtt_p50[d],
                    s.rtt_p50[n] - s.rtt_p50[d],
                    1.0,
                    1,
                );
                row(
                    "round trip added over direct, p99 ≤ nginx (µs)",
                    s.rtt_p99[o] - s.rtt_p99[d],
                    s.rtt_p99[n] - s.rtt_p99[d],
                    1.0,
                    1,
                );
                row(
                    "memory per idle session ≤ 0.25 × nginx (KiB)",
                    s.idle_avg[o],
                    s.idle_avg[n],
                    0.25,
                    2,
                );
            } else {
                row(
                    "TLS: CPU per GiB downstream ≤ nginx (s)",
                    s.down_cpu[o],
                    s.down_cpu[n],
                    1.0,
                    3,
                );
                row(
                    "TLS: CPU per GiB upstream ≤ nginx (s)",
                    s.up_cpu[o],
                    s.up_cpu[n],
                    1.0,
                    3,
                );
                row(
                    "TLS: memory per idle session ≤ 0.5 × nginx (KiB)",
                    s.idle_avg[o],
                    s.idle_avg[n],
                    0.5,
                    2,
                );
            }
        }
        let _ = writeln!(
            out,
            "\nMemory targets use the average over the idle sessions from each process's own start, \
             which leaves out nginx's preallocated connection slots (counting them would favour \
             us). Targets are reported, not enforced.\n"
        );
    }

    /// Every round, so the spread behind the medians is visible.
    fn render_rounds(&self, out: &mut String, v: &VariantResults) {
        let payload = self.knobs.mib as f64;
        let list = list_or_dash;
        let rate = |t: &[Transfer]| {
            list(
                t.iter()
                    .map(|t| format!("{:.0}", payload / t.elapsed.as_secs_f64()))
                    .collect(),
            )
        };
        let cpu = |t: &[Transfer]| {
            list(
                t.iter()
                    .map(|t| format!("{:.3}", t.cpu.run / (payload / 1024.0)))
                    .collect(),
            )
        };
        let pct = |l: &[Latency], q| {
            list(
                l.iter()
                    .map(|l| format!("{:.1}", percentile_us(&l.samples, q)))
                    .collect(),
            )
        };
        let per_s = |l: &[Latency]| {
            list(
                l.iter()
                    .map(|l| format!("{:.0}", l.samples.len() as f64 / l.elapsed.as_secs_f64()))
                    .collect(),
            )
        };
        let idle = |i: &[Idle]| {
            list(
                i.iter()
                    .map(|i| format!("{:.2}", i.per_session_kib()))
                    .collect(),
            )
        };
        let _ = writeln!(
            out,
            "<details><summary>all rounds, {} upstream</summary>\n",
            if v.tls { "TLS" } else { "plain" }
        );
        let _ = writeln!(out, "| per round | direct | ours | nginx |");
        let _ = writeln!(out, "|---|---|---|---|");
        let mut line = |name: &str, f: &dyn Fn(Route) -> String| {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                f(Route::Direct),
                f(Route::Ours),
                f(Route::Nginx)
            );
        };
        line("downstream MiB/s", &|r| rate(v.down.get(r)));
        let proxied = |r: Route, s: String| {
            if r == Route::Direct {
                "—".to_string()
            } else {
                s
            }
        };
        line("downstream CPU s/GiB", &|r| proxied(r, cpu(v.down.get(r))));
        line("upstream MiB/s", &|r| rate(v.up.get(r)));
        line("upstream CPU s/GiB", &|r| proxied(r, cpu(v.up.get(r))));
        line("sequential p50 µs", &|r| pct(v.rtt.get(r), 0.5));
        line("sequential p99 µs", &|r| pct(v.rtt.get(r), 0.99));
        line("concurrent p50 µs", &|r| pct(v.conc.get(r), 0.5));
        line("concurrent p99 µs", &|r| pct(v.conc.get(r), 0.99));
        line("new sessions/s", &|r| per_s(v.news.get(r)));
        line("idle KiB/session", &|r| idle(v.idle.get(r)));
        let _ = writeln!(out, "\n</details>\n");
    }
}
