//! Soak benchmark: many short sessions, opened and closed in waves, must leave the proxy where
//! it started.
//!
//! Run with `cargo bench --bench soak`. The release proxy runs as a child process in front of
//! the stand-in upstream (which runs in this process, one thread per connection). Sessions go
//! through it in waves of W (default 100 waves of 1,000); within a wave C client threads
//! (default 16) each run one session at a time, so at most C sessions are open at once. Each
//! session mints a fresh token, so every one goes through the token check. The mix, by session
//! number modulo 20:
//!
//! | share | session | what it soaks |
//! |---:|---|---|
//! | 11/20 | upgrade, 16-byte echo, client close 1000, read the reply, drop | the normal life |
//! | 1/20 | upgrade, echo, drop TCP without a close frame (FIN) | client went away |
//! | 1/20 | upgrade, echo, drop TCP with an RST (linger 0) | client reset |
//! | 1/20 | token signed with another secret: 401 | refusal before upstream work |
//! | 1/20 | token for another VMI: 403 | refusal after the token check |
//! | 1/20 | upstream sends 16 bytes then drops TCP: 1001 to the client, which answers | upstream went away |
//! | 1/20 | upstream says the console is in use: 503 to the client | upstream refusal |
//! | 1/20 | half a request head, then the client drops TCP | abandoned handshake |
//! | 1/20 | upstream never answers the upgrade; the client gives up and drops TCP | abandoned dial |
//! | 1/20 | token that expired an hour ago: 401 | refusal (expiry path) |
//!
//! Every session's outcome is checked (echo bytes, statuses, close codes). After each wave the
//! bench waits (at most [`DRAIN_LIMIT`]) until the proxy's open descriptors (`/proc/PID/fd`)
//! are back to their count before the first session and the stand-in has no connection left,
//! then reads the proxy's VmRSS (`/proc/PID/status`).
//!
//! It fails (exits non-zero) when
//! - a session did not end as its kind should (the first few are printed),
//! - the descriptors do not come back to the baseline after a wave within [`DRAIN_LIMIT`],
//! - the proxy dies, or
//! - with at least [`RSS_CHECK_MIN_WAVES`] waves: the RSS after the last wave exceeds the RSS
//!   after the first wave by more than [`RSS_ALLOWANCE_KIB`] (1 MiB).
//!
//! Knobs (environment): `SOAK_SESSIONS` (default 100,000), `SOAK_WAVE` (1,000), `SOAK_CLIENTS`
//! (16, at most 256), `SOAK_PROXY_ENV` (extra proxy settings, `VAR=value` separated by spaces,
//! e.g. `PING_INTERVAL_SECONDS=0`) and `SOAK_PROXY_BIN` (another build of the proxy, e.g. an
//! unstripped one for a heap profiler), for finding where memory goes. `BENCH_SMOKE=1` makes the defaults 2,000 sessions in waves of 500 (the
//! descriptor check still applies, the RSS check does not: too few waves); explicit knobs still
//! win. Without `--bench` on the command line (`cargo test --benches`) it also runs in smoke
//! mode.
//!
//! The report, a markdown table, goes to stdout and to `target/bench-soak.md`
//! (`bench-soak-smoke.md` in smoke mode).

#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

mod support;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, Message, WebSocket};

use support::knobs::{env_flag, env_num};
use support::procfs::{self, Settle};
use support::proxy::{self, PROXY_BIN, ProxyChild};
use upstream::{Behaviour, StandIn, StandInOptions};

/// Namespace put in the tokens.
const NS: &str = "soak-ns";
/// A secret the proxy does not know (for the bad-signature sessions).
const WRONG_SECRET: &str = "not-the-secret-the-proxy-was-given-at-all!!";
/// Size of the echo message.
const ECHO_LEN: usize = 16;
/// The VMI whose upstream never answers (the abandoned dials).
const SILENT_VMI: &str = "silent-soak";
/// Connect timeout, and read/write timeout on every client socket: bounds every blocking call.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an abandoned-dial session waits (for the proxy to be dialling) before it gives up.
const ABANDON_AFTER: Duration = Duration::from_millis(20);
/// The proxy's `UPSTREAM_TIMEOUT_SECONDS` in this bench (default 10).
const UPSTREAM_TIMEOUT_SECONDS: &str = "1";
/// How long to wait for the proxy to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy may take, after a wave, to close every descriptor it opened in it
/// (looked at every 5 ms).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// RSS counts as settled after this many equal samples this far apart (or at the limit).
const SETTLE: Settle = Settle {
    samples: 3,
    interval: Duration::from_millis(20),
    limit: Duration::from_secs(2),
};
/// The descriptor baseline counts as settled when it has not changed for this long.
const FD_SETTLE: Duration = Duration::from_millis(300);
/// Largest number of messages read while waiting for a close frame or reply.
const CLOSE_READ_LIMIT: usize = 16;
/// Allowed RSS growth from after the first wave to after the last.
const RSS_ALLOWANCE_KIB: u64 = 1024;
/// The RSS check needs this many waves to mean something.
const RSS_CHECK_MIN_WAVES: usize = 10;
/// Most client threads (concurrent sessions) allowed: the stand-in spends a thread on each.
const MAX_CLIENTS: usize = 256;
/// Session failures whose messages are kept for the report.
const KEEP_ERRORS: usize = 10;
/// Warning and error lines of the proxy echoed to stderr (the rest are only counted).
const ECHO_LOG_LINES: usize = 20;

type Res<T> = Result<T, String>;
type Ws = WebSocket<TcpStream>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench soak FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let knobs = Knobs::from_env()?;
    let started = Instant::now();
    let load_before = support::load_average();
    eprintln!("bench soak: {}", knobs.describe());

    // Up to MAX_CLIENTS sessions at once, three descriptors each here (the client's socket,
    // the stand-in's and the clone it keeps); the proxy, started next, inherits the limit.
    support::raise_nofile_limit();
    // Declared before the proxy so that it is dropped after it (locals drop in reverse order).
    // Echo for the sessions; the refusals and endings of the other kinds by name.
    let standin = StandIn::start_with(
        StandInOptions::serving(Behaviour::Echo)
            // KubeVirt's answer for a console in use (hand-made Status in virt-api's shape).
            .vmi("in-use", Behaviour::console_in_use())
            .vmi(
                format!("dropafter-{ECHO_LEN}"),
                Behaviour::DropAfter(ECHO_LEN as u64),
            )
            .vmi(SILENT_VMI, Behaviour::Silent),
    );
    let mut proxy = ProxyProcess::start(standin.addr(), &knobs.proxy_env)?;
    let target = Target { proxy: proxy.addr };
    // The binary logs "listening on" before it sets up its signal handling (a socket pair):
    // the baseline is the count once it has stopped moving.
    let fd_base = proxy.settled_fd_count()?;
    let standin_base = standin.connections_open();
    let rss_start = proxy.settled_rss_kib()?;
    eprintln!(
        "bench soak: proxy pid {} on {}: {fd_base} descriptors, VmRSS {rss_start} KiB",
        proxy.pid(),
        proxy.addr
    );

    let tally = Tally::default();
    let mut waves: Vec<Wave> = Vec::with_capacity(knobs.waves());
    let mut done = 0usize;
    for index in 0..knobs.waves() {
        let n = knobs.wave.min(knobs.sessions - done);
        let t0 = Instant::now();
        run_wave(&target, done as u64, n, knobs.clients, &tally);
        let elapsed = t0.elapsed();
        done += n;
        proxy.check_alive()?;
        let failed = tally.failed();
        if failed > 0 {
            return Err(format!(
                "wave {}: {failed} sessions did not end as expected; first ones:\n  {}",
                index + 1,
                tally.errors().join("\n  ")
            ));
        }
        // Drained: every descriptor the proxy opened is closed again, and the stand-in has no
        // connection left (so the proxy also let go of its upstream side).
        let t1 = Instant::now();
        let mut fds = proxy.fd_count()?;
        let drained = upstream::wait_until(DRAIN_LIMIT, || {
            fds = proxy.fd_count().unwrap_or(usize::MAX);
            fds == fd_base && standin.connections_open() == standin_base
        });
        let drain = t1.elapsed();
        if !drained {
            return Err(format!(
                "wave {}: after {DRAIN_LIMIT:?} the proxy still has {fds} descriptors \
                 (baseline {fd_base}: {}) and the stand-in {} connections (baseline \
                 {standin_base})",
                index + 1,
                proxy.fd_summary(),
                standin.connections_open()
            ));
        }
        let wave = Wave {
            index: index + 1,
            sessions: done,
            elapsed,
            drain,
            rss: proxy.settled_rss_kib()?,
            anon: proxy.status_kib("RssAnon")?,
            file: proxy.status_kib("RssFile")?,
            fds,
        };
        if wave.index == 1 || wave.index.is_multiple_of(10) || done == knobs.sessions {
            eprintln!("bench soak: {}", wave.progress_line());
        }
        waves.push(wave);
    }
    proxy.check_alive()?;
    let metrics = proxy
        .scrape_metrics()
        .unwrap_or_else(|e| vec![format!("(no metrics: {e})")]);
    // The proxy closes the metrics connection once it has seen ours go.
    if !upstream::wait_until(DRAIN_LIMIT, || proxy.fd_count() == Ok(fd_base)) {
        return Err(format!(
            "after reading /metrics the proxy has {} descriptors, baseline {fd_base}",
            proxy.fd_count()?
        ));
    }

    let results = Results {
        elapsed: started.elapsed(),
        load_before,
        load_after: support::load_average(),
        fd_base,
        rss_start,
        waves,
        per_kind: tally.per_kind(),
        metrics,
        log: proxy.log_summary(),
        knobs,
    };
    let report = results.render();
    println!("{report}");
    let path = support::write_report("soak", results.knobs.smoke, &report)?;
    eprintln!("bench soak: report written to {}", path.display());
    results.verdict()
}

// ---------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    sessions: usize,
    wave: usize,
    clients: usize,
    /// Extra environment for the proxy (`SOAK_PROXY_ENV`).
    proxy_env: Vec<(String, String)>,
    smoke: bool,
}

impl Knobs {
    fn from_env() -> Res<Knobs> {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants it quick.
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let smoke = !bench_mode || env_flag("BENCH_SMOKE");
        let (sessions, wave) = if smoke {
            (2_000, 500)
        } else {
            (100_000, 1_000)
        };
        let knobs = Knobs {
            sessions: env_num("SOAK_SESSIONS", sessions)?,
            wave: env_num("SOAK_WAVE", wave)?,
            clients: env_num("SOAK_CLIENTS", 16)?,
            proxy_env: proxy_env()?,
            smoke,
        };
        if knobs.clients > MAX_CLIENTS {
            return Err(format!("SOAK_CLIENTS must be at most {MAX_CLIENTS}"));
        }
        Ok(knobs)
    }

    fn waves(&self) -> usize {
        self.sessions.div_ceil(self.wave)
    }

    fn rss_checked(&self) -> bool {
        self.waves() >= RSS_CHECK_MIN_WAVES
    }

    /// The command line that reproduces this run.
    fn command_line(&self) -> String {
        let smoke = if self.smoke { "BENCH_SMOKE=1 " } else { "" };
        let extra = if self.proxy_env.is_empty() {
            String::new()
        } else {
            let vars: Vec<String> = self
                .proxy_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("SOAK_PROXY_ENV='{}' ", vars.join(" "))
        };
        let bin = std::env::var("SOAK_PROXY_BIN")
            .map(|b| format!("SOAK_PROXY_BIN={b} "))
            .unwrap_or_default();
        format!(
            "{smoke}{bin}{extra}SOAK_SESSIONS={} SOAK_WAVE={} SOAK_CLIENTS={} cargo bench --bench soak",
            self.sessions, self.wave, self.clients
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} sessions in {} waves of {}, {} client threads{}",
            self.sessions,
            self.waves(),
            self.wave,
            self.clients,
            if self.smoke { " (smoke)" } else { "" }
        )
    }
}

/// `SOAK_PROXY_ENV`: `VAR=value` pairs separated by whitespace.
fn proxy_env() -> Res<Vec<(String, String)>> {
    let text = std::env::var("SOAK_PROXY_ENV").unwrap_or_default();
    text.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("SOAK_PROXY_ENV: {pair:?} is not VAR=value")),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// What the stderr reader hands over: the listening and metrics addresses.
enum Announced {
    Listening(SocketAddr),
    Metrics(SocketAddr),
}

/// The proxy's log as seen by the stderr reader.
#[derive(Default)]
struct LogStats {
    lines: AtomicU64,
    warnings: AtomicU64,
    errors: AtomicU64,
}

/// The proxy binary running as a child process; killed (by PID) when dropped, on every path.
struct ProxyProcess {
    child: ProxyChild,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    log: Arc<LogStats>,
}

impl ProxyProcess {
    fn start(upstream: SocketAddr, extra_env: &[(String, String)]) -> Res<ProxyProcess> {
        let bin = std::env::var("SOAK_PROXY_BIN").unwrap_or_else(|_| PROXY_BIN.to_string());
        let mut env = proxy::local_dev_env(tokens::SECRET, upstream);
        env.extend(
            [
                ("PORT", "0"),
                ("METRICS_ADDR", "127.0.0.1:0"),
                // The proxy notices a client that left while it waits for the upstream only
                // when this fires (see `Kind::AbandonDial`); the default 10 s would make every
                // wave's drain take 10 s.
                ("UPSTREAM_TIMEOUT_SECONDS", UPSTREAM_TIMEOUT_SECONDS),
                // INFO, the production default: the access log line of every session is
                // written (and soaked) too.
                ("LOGLEVEL", "INFO"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env.extend_from_slice(extra_env);
        let log = Arc::new(LogStats::default());
        let (tx, rx) = mpsc::channel();
        let child = {
            let log = Arc::clone(&log);
            let mut echoed = 0;
            ProxyChild::spawn(Path::new(&bin), &env, move |line| {
                forward_line(&line, &tx, &log, &mut echoed)
            })?
        };
        let mut proxy = ProxyProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            log,
        };
        proxy.wait_for_addresses(&rx)?;
        Ok(proxy)
    }

    /// Waits for the "listening on" and "serving /metrics, /healthz and /readyz on" lines, failing early if the
    /// proxy exits instead (e.g. on a configuration error, which the stderr thread echoes).
    fn wait_for_addresses(&mut self, rx: &mpsc::Receiver<Announced>) -> Res<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut listening = None;
        while Instant::now() < deadline && (listening.is_none() || self.metrics.is_none()) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Announced::Listening(a)) => listening = Some(a),
                Ok(Announced::Metrics(a)) => self.metrics = Some(a),
                Err(_) => self.check_alive()?,
            }
        }
        self.addr = listening.ok_or("the proxy did not print its listening address")?;
        if self.metrics.is_none() {
            return Err("the proxy did not print its metrics address".into());
        }
        Ok(())
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

    /// VmRSS once it has stopped moving.
    fn settled_rss_kib(&self) -> Res<u64> {
        procfs::settled_rss_kib(self.pid(), SETTLE)
    }

    /// Open descriptors: entries of `/proc/PID/fd`.
    fn fd_count(&self) -> Res<usize> {
        procfs::fd_count(self.pid())
    }

    /// The descriptor count once it has not changed for [`FD_SETTLE`].
    fn settled_fd_count(&self) -> Res<usize> {
        let deadline = Instant::now() + SETTLE.limit;
        let mut last = self.fd_count()?;
        let mut since = Instant::now();
        while since.elapsed() < FD_SETTLE && Instant::now() < deadline {
            thread::sleep(SETTLE.interval);
            let now = self.fd_count()?;
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        Ok(last)
    }

    /// What the open descriptors are, grouped ("socket: 12, pipe: 1, ..."), for error messages.
    fn fd_summary(&self) -> String {
        procfs::fd_summary(self.pid())
    }

    /// The session, refusal and gauge lines of `GET /metrics`.
    fn scrape_metrics(&self) -> Res<Vec<String>> {
        let addr = self.metrics.ok_or("no metrics address")?;
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        // Bounded by the size cap, EOF and the read timeout.
        s.take(1 << 20)
            .read_to_string(&mut body)
            .map_err(|e| e.to_string())?;
        let wanted = [
            "sessions_total{",
            "refusals_total{",
            "open_connections ",
            "open_sessions ",
            "buffers_in_use ",
        ];
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.contains(w)))
            .map(str::to_string)
            .collect())
    }

    fn log_summary(&self) -> String {
        format!(
            "{} lines, {} warnings, {} errors",
            self.log.lines.load(Ordering::Relaxed),
            self.log.warnings.load(Ordering::Relaxed),
            self.log.errors.load(Ordering::Relaxed)
        )
    }
}

/// One line of the proxy's log: hands over the announced addresses, counts lines, echoes the
/// first few warnings and errors (the per-session INFO lines, a hundred thousand of them, are
/// only counted). `echoed` counts the lines echoed so far.
fn forward_line(line: &str, tx: &mpsc::Sender<Announced>, log: &LogStats, echoed: &mut usize) {
    log.lines.fetch_add(1, Ordering::Relaxed);
    if let Some(a) = proxy::announced_addr(line, proxy::LISTENING) {
        let _ = tx.send(Announced::Listening(a));
    } else if let Some(a) =
        proxy::announced_addr(line, "serving /metrics, /healthz and /readyz on ")
    {
        let _ = tx.send(Announced::Metrics(a));
    } else if !line.contains(" INFO ") {
        if line.contains(" ERROR ") {
            log.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            log.warnings.fetch_add(1, Ordering::Relaxed);
        }
        if *echoed < ECHO_LOG_LINES {
            *echoed += 1;
            eprintln!("proxy: {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// The kinds of session in the mix (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Clean,
    Vanish,
    Reset,
    BadSignature,
    Forbidden,
    UpstreamDrop,
    UpstreamRefuses,
    HalfHead,
    AbandonDial,
    Expired,
}

const KINDS: [Kind; 10] = [
    Kind::Clean,
    Kind::Vanish,
    Kind::Reset,
    Kind::BadSignature,
    Kind::Forbidden,
    Kind::UpstreamDrop,
    Kind::UpstreamRefuses,
    Kind::HalfHead,
    Kind::AbandonDial,
    Kind::Expired,
];

impl Kind {
    /// Session `seq`'s kind: 11 in 20 clean, one in 20 of each other kind, interleaved so that
    /// every wave of 20 or more gets all of them.
    fn for_seq(seq: u64) -> Kind {
        match seq % 20 {
            0..=10 => Kind::Clean,
            n => KINDS[n as usize - 10],
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).expect("listed")
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Clean => "echo, client close 1000, close reply",
            Kind::Vanish => "echo, client drops TCP (FIN), no close frame",
            Kind::Reset => "echo, client resets TCP (RST)",
            Kind::BadSignature => "token with a bad signature: 401",
            Kind::Forbidden => "token for another VMI: 403",
            Kind::UpstreamDrop => "upstream sends 16 B and drops TCP: 1001",
            Kind::UpstreamRefuses => "upstream says the console is in use: 503",
            Kind::HalfHead => "half a request head, client drops TCP",
            Kind::AbandonDial => "upstream silent, client gives up after 20 ms",
            Kind::Expired => "expired token: 401",
        }
    }
}

/// Where the sessions go.
struct Target {
    proxy: SocketAddr,
}

impl Target {
    /// A connected client socket with timeouts (every blocking call below is bounded by them).
    fn socket(&self) -> Res<TcpStream> {
        let s = TcpStream::connect_timeout(&self.proxy, IO_TIMEOUT)
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| format!("socket options: {e}"))?;
        Ok(s)
    }

    /// The client side of the upgrade through the proxy to `vmi` with `token`: the WebSocket,
    /// or the HTTP status the proxy refused with.
    fn upgrade(&self, token: &str, vmi: &str) -> Res<Result<Ws, u16>> {
        let stream = self.socket()?;
        let url = format!("ws://{}/{token}/{vmi}", self.proxy);
        match tungstenite::client::client_with_config(url.as_str(), stream, Some(small_config())) {
            Ok((ws, _)) => Ok(Ok(ws)),
            Err(HandshakeError::Failure(WsError::Http(resp))) => Ok(Err(resp.status().as_u16())),
            Err(HandshakeError::Failure(e)) => Err(format!("upgrade: {e}")),
            Err(HandshakeError::Interrupted(_)) => Err("upgrade: timed out".into()),
        }
    }

    /// Upgrades, failing on a refusal.
    fn open(&self, token: &str, vmi: &str) -> Res<Ws> {
        self.upgrade(token, vmi)?
            .map_err(|status| format!("refused with {status}, expected 101"))
    }
}

/// Small buffers: the bench runs many clients at once.
fn small_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

fn token_for(vmi: &str) -> String {
    tokens::mint(tokens::SECRET, NS, &[vmi], tokens::now() + 3600)
}

/// Runs session `seq` of kind `kind` and checks that it ended as that kind should.
fn session(target: &Target, kind: Kind, seq: u64) -> Res<()> {
    let echo_vmi = format!("echo-soak-{seq}");
    match kind {
        Kind::Clean => {
            let mut ws = target.open(&token_for(&echo_vmi), &echo_vmi)?;
            echo_once(&mut ws, seq)?;
            ws.close(None)
                .and_then(|_| ws.flush())
                .map_err(|e| format!("send close: {e}"))?;
            // The proxy relays the close upstream and the stand-in's reply back.
            for _ in 0..CLOSE_READ_LIMIT {
                match ws.read() {
                    Ok(Message::Close(_)) => {}
                    Ok(other) => return Err(format!("unexpected {other:?} while closing")),
                    Err(WsError::ConnectionClosed) => return Ok(()),
                    Err(e) => return Err(format!("waiting for the close reply: {e}")),
                }
            }
            Err("no close reply".into())
        }
        Kind::Vanish => {
            let mut ws = target.open(&token_for(&echo_vmi), &echo_vmi)?;
            echo_once(&mut ws, seq)?;
            drop(ws); // FIN, no close frame
            Ok(())
        }
        Kind::Reset => {
            let mut ws = target.open(&token_for(&echo_vmi), &echo_vmi)?;
            echo_once(&mut ws, seq)?;
            socket2::SockRef::from(ws.get_ref())
                .set_linger(Some(Duration::ZERO))
                .map_err(|e| format!("set linger: {e}"))?;
            drop(ws); // RST
            Ok(())
        }
        Kind::BadSignature => {
            let token = tokens::mint(WRONG_SECRET, NS, &[&echo_vmi], tokens::now() + 3600);
            expect_refusal(target.upgrade(&token, &echo_vmi)?, 401)
        }
        Kind::Forbidden => {
            let token = token_for("echo-someone-else");
            expect_refusal(target.upgrade(&token, &echo_vmi)?, 403)
        }
        Kind::Expired => {
            let token = tokens::mint(tokens::SECRET, NS, &[&echo_vmi], tokens::now() - 3600);
            expect_refusal(target.upgrade(&token, &echo_vmi)?, 401)
        }
        Kind::UpstreamRefuses => {
            let vmi = "in-use";
            expect_refusal(target.upgrade(&token_for(vmi), vmi)?, 503)
        }
        Kind::UpstreamDrop => {
            let vmi = format!("dropafter-{ECHO_LEN}");
            let mut ws = target.open(&token_for(&vmi), &vmi)?;
            match ws.read() {
                Ok(Message::Binary(b)) if b.len() == ECHO_LEN => {}
                Ok(other) => return Err(format!("expected {ECHO_LEN} bytes, got {other:?}")),
                Err(e) => return Err(format!("reading the upstream's bytes: {e}")),
            }
            let mut code = None;
            // tungstenite answers the close on the read after it (then: ConnectionClosed).
            for _ in 0..CLOSE_READ_LIMIT {
                match ws.read() {
                    Ok(Message::Close(frame)) => code = Some(frame.map(|f| u16::from(f.code))),
                    Ok(other) => return Err(format!("unexpected {other:?} before the close")),
                    Err(WsError::ConnectionClosed) => break,
                    Err(e) => return Err(format!("waiting for the proxy's close: {e}")),
                }
            }
            match code {
                Some(Some(1001 | 1011)) => Ok(()),
                other => Err(format!("closed with {other:?}, expected 1001 or 1011")),
            }
        }
        Kind::HalfHead => {
            let mut s = target.socket()?;
            let head = format!(
                "GET /{}/{echo_vmi} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n",
                token_for(&echo_vmi)
            );
            s.write_all(head.as_bytes())
                .map_err(|e| format!("send half a head: {e}"))?;
            drop(s);
            Ok(())
        }
        Kind::AbandonDial => {
            let vmi = SILENT_VMI;
            let mut s = target.socket()?;
            let head = format!(
                "GET /{}/{vmi} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                token_for(vmi)
            );
            s.write_all(head.as_bytes())
                .map_err(|e| format!("send the head: {e}"))?;
            // Give the proxy time to check the token and dial; the stand-in never answers.
            thread::sleep(ABANDON_AFTER);
            drop(s);
            Ok(())
        }
    }
}

fn expect_refusal(outcome: Result<Ws, u16>, want: u16) -> Res<()> {
    match outcome {
        Err(status) if status == want => Ok(()),
        Err(status) => Err(format!("refused with {status}, expected {want}")),
        Ok(_) => Err(format!("upgraded, expected {want}")),
    }
}

/// Sends one message derived from `seq` and checks that the same bytes come back.
fn echo_once(ws: &mut Ws, seq: u64) -> Res<()> {
    let mut payload = [0u8; ECHO_LEN];
    for (i, chunk) in payload.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq ^ ((i as u64) << 56)).to_le_bytes());
    }
    ws.send(Message::binary(payload.to_vec()))
        .map_err(|e| format!("send echo: {e}"))?;
    match ws.read() {
        Ok(Message::Binary(b)) if b[..] == payload => Ok(()),
        Ok(other) => Err(format!("echo came back as {other:?}")),
        Err(e) => Err(format!("echo: {e}")),
    }
}

/// Outcomes per kind, and the first few failure messages.
#[derive(Default)]
struct Tally {
    ok: [AtomicU64; KINDS.len()],
    failed: [AtomicU64; KINDS.len()],
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, kind: Kind, seq: u64, result: Res<()>) {
        match result {
            Ok(()) => self.ok[kind.index()].fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                if errors.len() < KEEP_ERRORS {
                    errors.push(format!("session {seq} ({kind:?}): {e}"));
                }
                self.failed[kind.index()].fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    fn failed(&self) -> u64 {
        self.failed.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn per_kind(&self) -> Vec<(Kind, u64)> {
        KINDS
            .iter()
            .map(|&k| (k, self.ok[k.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Runs sessions `first..first + n` on `clients` threads, one session at a time per thread.
fn run_wave(target: &Target, first: u64, n: usize, clients: usize, tally: &Tally) {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..clients.min(n) {
            scope.spawn(|| {
                // Bounded: every iteration claims one of the n session numbers.
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let seq = first + i as u64;
                    let kind = Kind::for_seq(seq);
                    tally.record(kind, seq, session(target, kind, seq));
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Report

/// The proxy after one wave had drained.
struct Wave {
    index: usize,
    /// Sessions run so far, this wave included.
    sessions: usize,
    elapsed: Duration,
    /// How long the descriptors took to come back to the baseline after the wave.
    drain: Duration,
    rss: u64,
    /// VmRSS split: anonymous memory (heap, stacks) and file-backed pages (the binary's code
    /// and data as it gets paged in).
    anon: u64,
    file: u64,
    fds: usize,
}

impl Wave {
    fn rate(&self, wave: usize) -> f64 {
        wave as f64 / self.elapsed.as_secs_f64()
    }

    fn progress_line(&self) -> String {
        format!(
            "wave {} ({} sessions): {:.2} s, drained in {} ms, VmRSS {} KiB, {} descriptors",
            self.index,
            self.sessions,
            self.elapsed.as_secs_f64(),
            self.drain.as_millis(),
            self.rss,
            self.fds
        )
    }
}

struct Results {
    elapsed: Duration,
    load_before: String,
    load_after: String,
    fd_base: usize,
    rss_start: u64,
    waves: Vec<Wave>,
    per_kind: Vec<(Kind, u64)>,
    metrics: Vec<String>,
    log: String,
    knobs: Knobs,
}

impl Results {
    fn first(&self) -> &Wave {
        &self.waves[0]
    }

    fn last(&self) -> &Wave {
        self.waves.last().expect("at least one wave")
    }

    /// RSS after the last wave minus RSS after the first (KiB, may be negative).
    fn growth_kib(&self) -> i64 {
        self.last().rss as i64 - self.first().rss as i64
    }

    /// Least-squares slope of RSS over the second half of the waves, in KiB per 1,000
    /// sessions: near zero when the proxy has reached its steady state; a steady climb is a
    /// leak (one-time growth early on is not).
    fn late_slope(&self) -> Option<f64> {
        let tail = &self.waves[self.waves.len() / 2..];
        if tail.len() < 3 {
            return None;
        }
        let n = tail.len() as f64;
        let xs: Vec<f64> = tail.iter().map(|w| w.sessions as f64 / 1000.0).collect();
        let ys: Vec<f64> = tail.iter().map(|w| w.rss as f64).collect();
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        (sxx > 0.0).then(|| sxy / sxx)
    }

    fn rss_ok(&self) -> bool {
        self.growth_kib() <= RSS_ALLOWANCE_KIB as i64
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let k = &self.knobs;
        let _ = writeln!(out, "### Soak benchmark\n");
        let _ = writeln!(out, "`{}`\n", k.command_line());
        let total: usize = self.last().sessions;
        let _ = writeln!(
            out,
            "{}; {}; wall time {:.1} s ({:.0} sessions/s overall, waits included); load \
             average before {}, after {}.\n",
            support::machine(),
            k.describe(),
            self.elapsed.as_secs_f64(),
            total as f64 / self.elapsed.as_secs_f64(),
            self.load_before,
            self.load_after
        );
        let _ = writeln!(
            out,
            "Proxy before the first session: {} descriptors, VmRSS {} KiB.\n",
            self.fd_base, self.rss_start
        );
        let _ = writeln!(
            out,
            "| wave | sessions so far | wave time (s) | sessions/s | drain (ms) | VmRSS (KiB) \
             | vs wave 1 (KiB) | anon / file (KiB) | descriptors |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let every = self.waves.len() <= 20;
        for (i, w) in self.waves.iter().enumerate() {
            if !(every || w.index == 1 || w.index.is_multiple_of(10) || i + 1 == self.waves.len()) {
                continue;
            }
            let size = w.sessions
                - if i == 0 {
                    0
                } else {
                    self.waves[i - 1].sessions
                };
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.0} | {} | {} | {:+} | {} / {} | {} |",
                w.index,
                w.sessions,
                w.elapsed.as_secs_f64(),
                w.rate(size),
                w.drain.as_millis(),
                w.rss,
                w.rss as i64 - self.first().rss as i64,
                w.anon,
                w.file,
                w.fds
            );
        }
        let _ = writeln!(out);
        self.render_checks(&mut out);
        let _ = writeln!(out, "| session kind | ended as expected |");
        let _ = writeln!(out, "|---|---:|");
        for (kind, n) in &self.per_kind {
            let _ = writeln!(out, "| {} | {n} |", kind.describe());
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Proxy log: {}. Its `/metrics` at the end:\n", self.log);
        let _ = writeln!(out, "```");
        for line in &self.metrics {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "```");
        out
    }

    fn render_checks(&self, out: &mut String) {
        let growth = self.growth_kib();
        let rss_verdict = if !self.knobs.rss_checked() {
            format!(
                "not checked: {} waves, the check needs at least {RSS_CHECK_MIN_WAVES}",
                self.waves.len()
            )
        } else if self.rss_ok() {
            "met".into()
        } else {
            "**NOT MET**".into()
        };
        let _ = writeln!(out, "| check | target | measured | |");
        let _ = writeln!(out, "|---|---|---|---|");
        let _ = writeln!(
            out,
            "| VmRSS after the last wave vs after the first | at most +{RSS_ALLOWANCE_KIB} KiB \
             | {growth:+} KiB ({} → {} KiB) | {rss_verdict} |",
            self.first().rss,
            self.last().rss
        );
        let _ = writeln!(
            out,
            "| descriptors after every wave | back to {} within {} s | all waves back, \
             slowest drain {} ms | met |",
            self.fd_base,
            DRAIN_LIMIT.as_secs(),
            self.waves
                .iter()
                .map(|w| w.drain.as_millis())
                .max()
                .unwrap_or(0)
        );
        if let Some(slope) = self.late_slope() {
            let _ = writeln!(
                out,
                "| VmRSS trend over the second half of the waves | (informative) | \
                 {slope:+.2} KiB per 1,000 sessions | |"
            );
        }
        let _ = writeln!(out);
    }

    /// The RSS check, where enforced (the descriptor check and the sessions were checked
    /// during the run).
    fn verdict(&self) -> Res<()> {
        if self.knobs.rss_checked() && !self.rss_ok() {
            return Err(format!(
                "VmRSS grew by {} KiB from after wave 1 ({} KiB) to after wave {} ({} KiB); \
                 allowed: {RSS_ALLOWANCE_KIB} KiB",
                self.growth_kib(),
                self.first().rss,
                self.last().index,
                self.last().rss
            ));
        }
        if !self.knobs.rss_checked() {
            eprintln!(
                "bench soak: RSS check skipped: {} waves (needs at least {RSS_CHECK_MIN_WAVES}); \
                 descriptor check passed",
                self.waves.len()
            );
        }
        Ok(())
    }
}
