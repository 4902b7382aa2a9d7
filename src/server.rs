//! The event loop: one mio `Poll`, the listeners, a slab of sessions, a heap
//! of deadlines, and a handle to stop it (or feed it decisions) from
//! another thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::authorize::{Authorizer, Decision, JwtAuthorizer, Ticket};
use crate::buffer::BufferPool;
use crate::config::{Config, ConfigError};
use crate::conn::{Conn, Readiness};
use crate::events::{AccessLog, Event, Observer};
use crate::http::{Refusal, Status};
use crate::listener_tls::{Checked, SharedTls};
use crate::metrics::{Gauges, Metrics};
use crate::session::{Ctx, FIRST_SESSION_TOKEN, Kind, Session, Side};
use crate::upstream::Credentials;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const METRICS_LISTENER: Token = Token(2);
/// The read end of the self-pipe signal handlers write to
/// ([`ProxyBuilder::stop_on_signals`]).
const SIGNALS: Token = Token(3);

/// Connections accepted per pass before other work gets a turn. Each is
/// read, checked and often answered at once (tens of µs), so this bounds
/// what a flood of new connections adds to the open sessions' latency per
/// pass: with 256, 16 threads flooding bad tokens stretched passes to ~10 ms
/// (the echo p99 of open sessions 33 x its quiet value in the bench); with
/// 16, 2.8 x; with 4, 2.0 x (what the direct route shows on that machine),
/// at the same CPU and rate per new session. nginx takes one per pass
/// (`multi_accept off`).
const ACCEPT_BUDGET: usize = 4;

/// Readiness events taken from one poll.
const EVENTS_PER_POLL: usize = 1024;

/// How long to back off when accept fails for lack of resources (EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Once the shutdown grace is over and every session got its close 1001,
/// how long the closing handshakes (and the lingering after them) may take
/// before the loop closes what is left and returns. From the signal to the
/// end of the loop is thus at most `SHUTDOWN_GRACE_SECONDS` plus this,
/// whatever the peers do: a client that never answers a close frame used to
/// hold the process for the whole close timeout.
pub const SHUTDOWN_CLOSE_TIME: Duration = Duration::from_secs(1);

/// Connections the metrics listener (`METRICS_ADDR`, the probe path) holds
/// at once. They are not counted against `MAX_CONNECTIONS`, so `/healthz`,
/// `/readyz` and `/metrics` answer on that port while the sessions fill the
/// proxy (or slow clients flood it) and kubelet does not restart a full
/// proxy, dropping every console.
pub(crate) const PROBE_SLOTS: usize = 16;

/// How often open sessions' bytes are counted into `bytes_total`.
const BYTES_COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Spare relay buffers kept for reuse.
const SPARE_BUFFERS: usize = 64;
/// Bytes of the loop's scratch buffer (see `Ctx::scratch`).
const SCRATCH_BYTES: usize = 4096;

/// Why the proxy could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// The upstream host name did not resolve.
    Resolve(String),
    /// A listener could not be bound: the setting, the address, the error.
    Bind(&'static str, SocketAddr, io::Error),
    /// Setting up the event loop failed.
    Io(io::Error),
    /// More than one of the files and names the configuration points to
    /// failed (keys, certificates, CA, token, host names): every one is
    /// checked, so that one run names them all. In the order they are read.
    Several(Vec<StartError>),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Resolve(m) => write!(f, "cannot resolve the upstream: {m}"),
            StartError::Bind(var, addr, e) => write!(f, "cannot listen on {addr} ({var}): {e}"),
            StartError::Io(e) => write!(f, "cannot start: {e}"),
            // One line, as an error's text is by convention (a host logging
            // `{e}` gets one record); the binary logs each on its own.
            StartError::Several(all) => {
                write!(f, "{} start-up problems: ", all.len())?;
                for (i, e) in all.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    e.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Io(e)
    }
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// Counters shared with handles, readable from any thread.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicUsize,
    accepted: AtomicU64,
    buffers_in_use: AtomicUsize,
    bulk_buffers_in_use: AtomicUsize,
    buffer_bytes: AtomicUsize,
    waiting_for_memory: AtomicUsize,
    limits_hit: AtomicU64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections currently open (any state).
    pub open_sessions: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Relay buffers currently held by sessions.
    pub buffers_in_use: usize,
    /// Of those, bulk buffers (`RELAY_BULK_BUFFER_BYTES`).
    pub bulk_buffers_in_use: usize,
    /// Their bytes (at most `RELAY_MEMORY_BYTES`, but for a handshake's
    /// leftovers, which cannot wait).
    pub buffer_bytes: usize,
    /// Sessions waiting for relay memory (`RELAY_MEMORY_BYTES` reached).
    pub waiting_for_memory: usize,
    /// Times a connection limit was hit (MAX_CONNECTIONS reached, or a
    /// client refused by MAX_CONNECTIONS_PER_IP).
    pub limits_hit: u64,
}

/// What other threads ask of the loop.
#[derive(Debug, Default)]
struct Requests {
    /// Drain with this grace period.
    drain: Option<Duration>,
    /// Deferred authorization decisions.
    decisions: Vec<(Ticket, Decision)>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Set by [`Handle::drain`] before it wakes the loop, and read live by
    /// sessions (`Ctx::draining`): a pass already under way when the drain
    /// is asked for (its events polled before) must not let through to the
    /// upstream a request it reads after `drain` returned.
    drain_requested: AtomicBool,
    waker: Waker,
    counters: Counters,
    requests: Mutex<Requests>,
    /// Set when this loop is one worker of several ([`Proxy::add_worker`]):
    /// it then leaves its metrics and gauges in `published` after every
    /// pass that changed them, for the worker that serves `/metrics`.
    publish: AtomicBool,
    published: Mutex<Option<(Metrics, Gauges)>>,
    /// Set when the loop has ended: its `Proxy` was dropped, after `run`
    /// returned or failed, or while a panic unwound its thread.
    exited: AtomicBool,
    /// Why the loop ended abnormally (a panic, a failed poll), if it did:
    /// `/healthz` of the loop it is a worker of answers 503 with this.
    failure: Mutex<Option<String>>,
    /// The loop this one is a worker of ([`Proxy::add_worker`]), woken when
    /// this one ends: it may be waiting for its workers to answer a signal.
    owner: OnceLock<Weak<Shared>>,
    /// That loop's listener TLS, which this one uses instead of its own:
    /// one set of session tickets and one rotation check for the process.
    tls: OnceLock<Arc<SharedTls>>,
}

impl Shared {
    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the proxy loop: {e}");
        }
    }

    fn requests(&self) -> std::sync::MutexGuard<'_, Requests> {
        // A panic while holding this lock cannot leave it inconsistent (it
        // only holds plain values), so a poisoned lock is still usable.
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Option<(Metrics, Gauges)>> {
        // Plain values again: usable after a panic elsewhere.
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Why the loop died, if it did (the first reason given is kept).
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, why: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }
}

/// What `/metrics` shows for a loop and the other workers of its process:
/// its own counters and gauges plus what each worker published last (at
/// most one pass old).
///
/// A worker that has ended (a panic, or done draining) holds no connection
/// any more: its gauges are left out, and `…_workers_alive` counts it no
/// longer. Its counters stay: the sessions they count did happen, and a
/// Prometheus counter must not go back.
pub(crate) fn process_metrics(own: &Metrics, gauges: Gauges, workers: &[Handle]) -> String {
    let (mut m, mut g) = (own.clone(), gauges);
    g.workers = 1 + workers.len();
    g.workers_alive = 1;
    for w in workers {
        let alive = !w.shared.exited();
        if let Some((wm, wg)) = w.shared.published().as_ref() {
            m.merge(wm);
            if alive {
                g.add(wg);
            }
        }
        g.workers_alive += usize::from(alive);
    }
    m.render(g)
}

/// `/healthz`: 200 while every worker of the process runs, 503 once one
/// died (a panic, a failed poll). Such a process still answers on its
/// other loops, but the dead one's sessions are gone and nothing restarts
/// it: kubelet's restart of the pod is the remedy.
pub(crate) fn health_response(workers: &[Handle]) -> Vec<u8> {
    let text = "text/plain; charset=utf-8";
    match workers.iter().find_map(|w| w.shared.failure()) {
        None => crate::http::plain_response(Status::Ok, text, "ok\n"),
        Some(why) => crate::http::plain_response(
            Status::ServiceUnavailable,
            text,
            &format!("a worker died: {why}\n"),
        ),
    }
}

/// A cloneable, thread-safe handle to a running proxy.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Stop at once: every session is closed and the loop returns promptly.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Stop gracefully: new sessions are refused at once (503, and
    /// `/readyz` says not ready), open sessions run for up to `grace`, then
    /// get close 1001 `going away`; the loop returns when all are closed,
    /// and at the latest [`SHUTDOWN_CLOSE_TIME`] after the grace (peers
    /// that have not finished their closing handshake by then are cut off).
    ///
    /// "At once" holds even for a pass of the loop already under way: no
    /// session is let through to the upstream once this has returned, and
    /// a deferred decision that allows a session after it is a 503 too (a
    /// session already dialing may still try the upstream's next address).
    pub fn drain(&self, grace: Duration) {
        self.shared.drain_requested.store(true, Ordering::SeqCst);
        self.shared.requests().drain = Some(grace);
        self.shared.wake();
    }

    /// Complete a deferred authorization ([`Decision::Pending`]). Ignored if
    /// the session is gone (the client left, or the decision came too late).
    pub fn decide(&self, ticket: Ticket, decision: Decision) {
        self.shared.requests().decisions.push((ticket, decision));
        self.shared.wake();
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            open_sessions: c.open.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            buffers_in_use: c.buffers_in_use.load(Ordering::Relaxed),
            bulk_buffers_in_use: c.bulk_buffers_in_use.load(Ordering::Relaxed),
            buffer_bytes: c.buffer_bytes.load(Ordering::Relaxed),
            waiting_for_memory: c.waiting_for_memory.load(Ordering::Relaxed),
            limits_hit: c.limits_hit.load(Ordering::Relaxed),
        }
    }
}

/// A proxy running on a thread of its own.
#[derive(Debug)]
pub struct Running {
    handle: Handle,
    thread: JoinHandle<io::Result<()>>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

impl Running {
    /// A handle to stop it, drain it, or read its counters.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `/metrics` is served on, if `METRICS_ADDR` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stop it at once and wait for the thread to end.
    pub fn shutdown(self) -> io::Result<()> {
        self.handle.shutdown();
        self.wait()
    }

    /// Wait for the thread to end (after `shutdown` or `drain`).
    pub fn wait(self) -> io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("proxy thread panicked")))
    }
}

/// Builds a [`Proxy`] with a custom authorizer or extra observers.
pub struct ProxyBuilder {
    config: Config,
    authorizer: Option<Box<dyn Authorizer>>,
    observers: Vec<Box<dyn Observer>>,
    signals: Vec<i32>,
}

impl fmt::Debug for ProxyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyBuilder")
            .field("custom_authorizer", &self.authorizer.is_some())
            .field("observers", &self.observers.len())
            .finish()
    }
}

impl ProxyBuilder {
    /// Use `authorizer` instead of the built-in JWT check.
    pub fn authorizer(mut self, authorizer: impl Authorizer + 'static) -> Self {
        self.authorizer = Some(Box::new(authorizer));
        self
    }

    /// Also send every session event to `observer`.
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Box::new(observer));
        self
    }

    /// Let the loop itself answer `signals` (e.g. SIGTERM and SIGINT), with
    /// no thread of its own: the first drains for `SHUTDOWN_GRACE_SECONDS`,
    /// another one stops at once, this loop and its workers
    /// ([`Proxy::add_worker`]; after a first signal the loop runs until they
    /// all have returned, so that the second one reaches them). A process whose only loop does this stays
    /// single-threaded, which makes every socket call a little cheaper (the
    /// kernel takes no reference on a file while no other thread shares the
    /// descriptor table). The handlers stay installed until the proxy is
    /// dropped.
    pub fn stop_on_signals(mut self, signals: &[i32]) -> Self {
        self.signals = signals.to_vec();
        self
    }

    /// Validate, resolve the upstream once, read the credentials, bind.
    pub fn bind(self) -> Result<Proxy, StartError> {
        Proxy::build(self)
    }
}

/// The proxy: listeners and every session, served by one event loop on
/// whichever thread runs it.
///
/// Three ways to run it: [`run`](Self::run) on the calling thread,
/// [`spawn`](Self::spawn) on a thread of its own, or step by step with
/// [`poll_once`](Self::poll_once) from a host's loop (its file descriptor,
/// [`AsRawFd`], becomes readable when there is work, so a host can put it in
/// its own `Poll`).
pub struct Proxy {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    listener_ready: bool,
    metrics_ready: bool,
    accept_paused_until: Option<Instant>,
    /// MAX_CONNECTIONS reached; accepting resumes at 90 %.
    at_capacity: bool,
    /// Metrics-listener connections open, oldest first (their keys; at
    /// most [`PROBE_SLOTS`]).
    probes: VecDeque<usize>,
    /// Open connections per client address (MAX_CONNECTIONS_PER_IP).
    per_ip: HashMap<IpAddr, usize>,
    sessions: Slab<Session>,
    /// Sessions in the relaying state, kept up to date after every drive so
    /// that building a context (once per event) does not walk all sessions.
    relaying: usize,
    /// See `Ctx::scratch`.
    scratch: Box<[u8]>,
    /// When the last pass of `poll_once` started.
    pass_started: Instant,
    /// Deadlines as (when, slab key, session id); stale entries are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Sessions that ran out of budget with work left.
    again: Vec<usize>,
    /// Sessions with a direction waiting for relay memory
    /// (`RELAY_MEMORY_BYTES`), first come first served; each at most once
    /// (`Session::waiting_memory`), and taken out when it ends.
    waiting: VecDeque<usize>,
    pool: BufferPool,
    config: Config,
    authorizer: Box<dyn Authorizer>,
    observers: Vec<Box<dyn Observer>>,
    metrics: Metrics,
    /// The other workers of this process (see [`Proxy::add_worker`]).
    workers: Vec<Handle>,
    /// What this loop last published for the worker serving `/metrics`.
    last_published: Option<(Metrics, Gauges)>,
    /// When open sessions' bytes are next counted into the metrics.
    next_bytes_count: Instant,
    /// Events produced during a pass, handed to observers at its end.
    pending_events: Vec<Event>,
    upstream_addrs: Vec<SocketAddr>,
    upstream_host: String,
    credentials: Credentials,
    /// The listeners' own TLS (`TLS_CERT_FILE`), when configured; a
    /// worker uses its owner's instead (`Shared::tls`).
    tls: Option<Arc<SharedTls>>,
    /// Draining: when open sessions are told to go away; once they have
    /// been (`gone_away`), when what is left is closed regardless.
    drain_until: Option<Instant>,
    gone_away: bool,
    next_id: u64,
    shared: Arc<Shared>,
    /// Signals the loop answers itself (see `ProxyBuilder::stop_on_signals`).
    signals: Option<SignalPipe>,
}

/// Signal handlers that write a byte to a socket pair the loop polls.
#[derive(Debug)]
struct SignalPipe {
    rx: mio::net::UnixStream,
    ids: Vec<signal_hook::SigId>,
    /// Signals seen so far: the first drains, another one stops.
    seen: u32,
}

impl SignalPipe {
    fn install(registry: &mio::Registry, signals: &[i32]) -> io::Result<Option<SignalPipe>> {
        if signals.is_empty() {
            return Ok(None);
        }
        let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        let mut rx = mio::net::UnixStream::from_std(rx);
        registry.register(&mut rx, SIGNALS, Interest::READABLE)?;
        let mut pipe = SignalPipe {
            rx,
            ids: Vec::new(),
            seen: 0,
        };
        for &signal in signals {
            // The handler only sends one byte (async-signal-safe); dropping
            // `pipe` on an error unregisters what was installed.
            pipe.ids.push(signal_hook::low_level::pipe::register(
                signal,
                tx.try_clone()?,
            )?);
        }
        Ok(Some(pipe))
    }

    /// How many signals came since the last call (bounded reads).
    fn take(&mut self) -> u32 {
        let mut buf = [0u8; 64];
        let mut n = 0u32;
        for _ in 0..16 {
            match io::Read::read(&mut self.rx, &mut buf) {
                Ok(0) => break,
                Ok(k) => n = n.saturating_add(k as u32),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        n
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Drop for Proxy {
    /// However the loop ends (`run` returned or failed, or a panic unwinds
    /// its thread), the loop it is a worker of learns it: `/metrics` stops
    /// counting it as alive, a panic makes `/healthz` answer 503, and an
    /// owner waiting for its workers to drain is woken.
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(
                "the event loop serving {} panicked: its connections are closed",
                self.local_addr
            );
            self.shared.fail("its thread panicked".into());
        }
        self.shared.exited.store(true, Ordering::SeqCst);
        if let Some(owner) = self.shared.owner.get().and_then(Weak::upgrade) {
            owner.wake();
        }
    }
}

impl AsRawFd for Proxy {
    /// The loop's epoll descriptor: readable whenever `poll_once` has work.
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

/// Sockets accepted from the main listener have TCP_NODELAY already: Linux
/// copies it from the listening socket (a test below holds it to that).
const ACCEPTED_HAVE_NODELAY: bool = cfg!(target_os = "linux");

/// The main listener; with `reuse_port` (WORKERS > 1) several loops share
/// one port and the kernel spreads connections among them. Without it a
/// second proxy on the same port fails to start instead of silently
/// splitting traffic. socket2 sets the options mio and std do not expose.
///
/// TCP_NODELAY is set here once: Linux copies it to every accepted socket,
/// which spares a setsockopt per connection (see [`ACCEPTED_HAVE_NODELAY`]).
fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// What a start reads and resolves once the configuration's values are
/// right: the files they name (keys, credentials, certificates) and the host
/// names.
struct Ready {
    /// The embedder's authorizer, or the built-in one (its key files read).
    authorizer: Box<dyn Authorizer>,
    upstream_addrs: Vec<SocketAddr>,
    listen: SocketAddr,
    credentials: Credentials,
    tls: Option<Arc<SharedTls>>,
}

impl Ready {
    /// Every step, each whether or not another failed, so that a start (and
    /// `check-config`) names every missing file and unresolvable name at
    /// once, not one per run. The only DNS lookups: at start, never per
    /// session.
    /// `custom` is the embedder's authorizer; without one the built-in JWT
    /// authorizer is made here.
    fn check(config: &Config, custom: Option<Box<dyn Authorizer>>) -> Result<Ready, StartError> {
        let mut failed = Vec::new();
        fn keep<T>(failed: &mut Vec<StartError>, r: Result<T, StartError>) -> Option<T> {
            r.map_err(|e| failed.push(e)).ok()
        }
        let authorizer = match custom {
            Some(a) => Some(a),
            None => keep(
                &mut failed,
                JwtAuthorizer::new(config)
                    .map(|a| Box::new(a) as Box<dyn Authorizer>)
                    .map_err(StartError::from),
            ),
        };
        let up = &config.upstream;
        let upstream_addrs = keep(
            &mut failed,
            (up.host.as_str(), up.port)
                .to_socket_addrs()
                .map_err(|e| StartError::Resolve(format!("{}: {e}", up.host)))
                .map(Iterator::collect::<Vec<SocketAddr>>)
                .and_then(|addrs| {
                    if addrs.is_empty() {
                        Err(StartError::Resolve(format!("{}: no addresses", up.host)))
                    } else {
                        Ok(addrs)
                    }
                }),
        );
        let listen = keep(&mut failed, resolve_one(&config.host, config.port, "HOST"));
        let credentials = keep(
            &mut failed,
            Credentials::load(config, Instant::now()).map_err(StartError::from),
        );
        let tls = keep(
            &mut failed,
            SharedTls::load(config, Instant::now()).map_err(StartError::from),
        );
        match (authorizer, upstream_addrs, listen, credentials, tls) {
            (
                Some(authorizer),
                Some(upstream_addrs),
                Some(listen),
                Some(credentials),
                Some(tls),
            ) => Ok(Ready {
                authorizer,
                upstream_addrs,
                listen,
                credentials,
                tls,
            }),
            _ if failed.len() == 1 => Err(failed.remove(0)),
            _ => Err(StartError::Several(failed)),
        }
    }
}

fn resolve_one(host: &str, port: u16, var: &str) -> Result<SocketAddr, StartError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            StartError::Config(ConfigError {
                var: var.into(),
                message: format!("'{host}': {e}"),
            })
        })?
        .next()
        .ok_or_else(|| {
            StartError::Config(ConfigError {
                var: var.into(),
                message: format!("'{host}': no address"),
            })
        })
}

impl Proxy {
    /// The proxy with the built-in JWT authorizer and access log.
    pub fn bind(config: Config) -> Result<Proxy, StartError> {
        Self::builder(config).bind()
    }

    /// Everything [`bind`](Self::bind) checks, without listening: the
    /// configuration, the keys, the upstream's name, the credential files.
    /// Returns a one-line summary; past the configuration's values, every
    /// file or name that fails is in the error (`StartError::Several` for
    /// more than one).
    pub fn check(config: &Config) -> Result<String, StartError> {
        config.validate()?;
        let ready = Ready::check(config, None)?;
        let (up, addrs, tls) = (&config.upstream, &ready.upstream_addrs, &ready.tls);
        Ok(format!(
            "upstream {}://{} ({} address{}), {} mode, {} key(s), token sources {:?}, listener {}",
            if up.tls { "wss" } else { "ws" },
            up.host_header(),
            addrs.len(),
            if addrs.len() == 1 { "" } else { "es" },
            if config.in_cluster {
                "in-cluster"
            } else {
                "local dev"
            },
            config.jwt.secrets.len() + config.jwt.public_keys.len(),
            config
                .token_sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            match (&tls, &config.client_ca_file) {
                (None, _) => "plain",
                (Some(_), None) => "TLS",
                (Some(_), Some(_)) => "TLS with client certificates",
            },
        ))
    }

    /// Start building a proxy (custom authorizer, extra observers).
    pub fn builder(config: Config) -> ProxyBuilder {
        ProxyBuilder {
            config,
            authorizer: None,
            observers: Vec::new(),
            signals: Vec::new(),
        }
    }

    fn build(b: ProxyBuilder) -> Result<Proxy, StartError> {
        let config = b.config;
        match b.authorizer {
            Some(_) => config.validate_without_keys()?,
            None => config.validate()?,
        }
        let Ready {
            authorizer,
            upstream_addrs,
            listen,
            credentials,
            tls,
        } = Ready::check(&config, b.authorizer)?;
        for k in config
            .jwt
            .secrets
            .iter()
            .filter(|k| k.bytes.len() < crate::auth::MIN_SECRET_BYTES)
        {
            warn!(
                "the HMAC secret from {} is only {} bytes (ALLOW_WEAK_SECRET=true): tokens can be forged by brute force",
                k.source,
                k.bytes.len()
            );
        }
        let poll = Poll::new()?;
        let mut listener = bind_listener(listen, config.workers > 1)
            .map_err(|e| StartError::Bind("HOST/PORT", listen, e))?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut metrics_listener = match &config.metrics_addr {
            Some(addr) => {
                let addr: SocketAddr = addr.parse().map_err(|e| {
                    StartError::Config(ConfigError {
                        var: "METRICS_ADDR".into(),
                        message: format!("'{addr}' is not IP:PORT: {e}"),
                    })
                })?;
                Some(
                    TcpListener::bind(addr)
                        .map_err(|e| StartError::Bind("METRICS_ADDR", addr, e))?,
                )
            }
            None => None,
        };
        let metrics_addr = match metrics_listener.as_mut() {
            Some(l) => {
                poll.registry()
                    .register(l, METRICS_LISTENER, Interest::READABLE)?;
                Some(l.local_addr()?)
            }
            None => None,
        };
        let waker = Waker::new(poll.registry(), WAKER)?;
        let signals = SignalPipe::install(poll.registry(), &b.signals)?;
        let mut observers: Vec<Box<dyn Observer>> =
            vec![Box::new(AccessLog::new(config.log_format))];
        observers.extend(b.observers);
        Ok(Proxy {
            poll,
            events: Events::with_capacity(EVENTS_PER_POLL),
            listener,
            metrics_listener,
            local_addr,
            metrics_addr,
            listener_ready: false,
            metrics_ready: false,
            accept_paused_until: None,
            at_capacity: false,
            probes: VecDeque::with_capacity(PROBE_SLOTS + 1),
            per_ip: HashMap::new(),
            sessions: Slab::new(),
            relaying: 0,
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            pass_started: Instant::now(),
            timers: BinaryHeap::new(),
            again: Vec::new(),
            waiting: VecDeque::new(),
            pool: BufferPool::with_bulk(
                config.buffer_size,
                SPARE_BUFFERS,
                config.bulk_buffer_size,
                config.bulk_buffers,
            )
            .with_limit(config.relay_memory),
            upstream_host: config.upstream.host_header(),
            credentials,
            tls,
            authorizer,
            observers,
            metrics: Metrics::default(),
            workers: Vec::new(),
            last_published: None,
            next_bytes_count: Instant::now(),
            pending_events: Vec::new(),
            config,
            upstream_addrs,
            drain_until: None,
            gone_away: false,
            next_id: 1,
            signals,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                drain_requested: AtomicBool::new(false),
                waker,
                counters: Counters::default(),
                requests: Mutex::new(Requests::default()),
                publish: AtomicBool::new(false),
                published: Mutex::new(None),
                exited: AtomicBool::new(false),
                failure: Mutex::new(None),
                owner: OnceLock::new(),
                tls: OnceLock::new(),
            }),
        })
    }

    /// The address the main listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `/metrics` is served on, if `METRICS_ADDR` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A handle to stop or drain the loop, or to feed it decisions, from
    /// another thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Make `worker`, another loop of this process serving the same port
    /// (`WORKERS`), part of this one: its sessions count in the `/metrics`
    /// this loop serves, and the signals this loop answers
    /// ([`ProxyBuilder::stop_on_signals`]) drain or stop it too. The binary
    /// does this for every worker after the first, so one `/metrics` shows
    /// the whole process and one place answers signals. A worker whose loop
    /// dies (its thread panicked, or its poll failed) shows there: its
    /// gauges are left out, `…_workers_alive` drops, and this loop's
    /// `/healthz` answers 503. With a TLS listener the worker takes this
    /// loop's certificate, session tickets and rotation checks.
    pub fn add_worker(&mut self, worker: Handle) {
        worker.shared.publish.store(true, Ordering::Relaxed);
        // A worker has one owner; a second call keeps the first.
        let _ = worker.shared.owner.set(Arc::downgrade(&self.shared));
        if let Some(tls) = &self.tls {
            let _ = worker.shared.tls.set(tls.clone());
        }
        worker.shared.wake();
        self.workers.push(worker);
    }

    /// True once the loop has nothing left to do: stopped, or draining with
    /// every session closed. A loop that answers signals for its workers
    /// ([`ProxyBuilder::stop_on_signals`], [`add_worker`](Self::add_worker))
    /// and drains for a first signal is not finished while one of them still
    /// runs: the second signal, which stops them at once, reaches them only
    /// through it.
    pub fn is_finished(&self) -> bool {
        let draining = self.gone_away || self.drain_until.is_some();
        let done =
            self.shared.stop.load(Ordering::SeqCst) || (draining && self.sessions.is_empty());
        done && !self.answering_signals_for_workers()
    }

    /// Drained by a first signal, with a worker still running (and not
    /// stopped at once): this loop must go on reading its signal pipe.
    fn answering_signals_for_workers(&self) -> bool {
        self.signals.as_ref().is_some_and(|p| p.seen == 1)
            && !self.shared.stop.load(Ordering::SeqCst)
            && self.workers.iter().any(|w| !w.shared.exited())
    }

    /// Serve on the calling thread until stopped (or drained).
    pub fn run(mut self) -> io::Result<()> {
        while !self.is_finished() {
            // The time the last pass started is recent enough (a pass is
            // short, epoll counts in milliseconds) and spares a clock read.
            let timeout = self.timeout_from(self.pass_started);
            if let Err(e) = self.poll_once(timeout) {
                self.shared.fail(format!("its event loop failed: {e}"));
                return Err(e);
            }
        }
        self.close_all();
        Ok(())
    }

    /// Serve on a new thread; the returned value stops it.
    pub fn spawn(self) -> io::Result<Running> {
        let handle = self.handle();
        let local_addr = self.local_addr;
        let metrics_addr = self.metrics_addr;
        let thread = std::thread::Builder::new()
            .name("kubevirt-vnc-proxy".into())
            .spawn(move || self.run())?;
        Ok(Running {
            handle,
            thread,
            local_addr,
            metrics_addr,
        })
    }

    /// How long the loop may sleep before a deadline is due (`None`: no
    /// deadline, sleep until an event). A host driving the loop itself uses
    /// this as (an upper bound of) its own poll timeout.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.timeout_from(Instant::now())
    }

    /// [`next_timeout`](Self::next_timeout) as seen at `now`.
    fn timeout_from(&self, now: Instant) -> Option<Duration> {
        // A listener left ready by the accept budget raises no new edge for
        // the connections still queued: the next pass must not sleep.
        if !self.again.is_empty()
            || (!self.waiting.is_empty() && self.pool.has_room())
            || (self.listener_ready && self.can_accept())
            || self.can_accept_probe()
        {
            return Some(Duration::ZERO);
        }
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let next = earliest(earliest(timer, self.accept_paused_until), self.drain_until);
        // Bytes relayed before a quiet spell are counted a second later, not
        // at the next event.
        let count = (self.relaying > 0 && self.metrics_read()).then_some(self.next_bytes_count);
        let next = earliest(next, count);
        next.map(|at| at.saturating_duration_since(now))
    }

    fn can_accept(&self) -> bool {
        self.accept_paused_until.is_none() && !self.at_capacity
    }

    /// Probe connections queued (a full set of slots makes room, see
    /// `accept`). Not gated by MAX_CONNECTIONS (probes must answer a full
    /// proxy), but by the EMFILE backoff: out of descriptors, the probe's
    /// accept fails like any other, and retrying it on every pass would log
    /// an error per pass and push the pause back for both listeners.
    fn can_accept_probe(&self) -> bool {
        self.metrics_ready && self.accept_paused_until.is_none()
    }

    /// Open connections that count against MAX_CONNECTIONS: all but the
    /// probe path's.
    fn counted(&self) -> usize {
        self.sessions.len().saturating_sub(self.probes.len())
    }

    /// Wait for events (at most `timeout`; `Some(ZERO)` does not wait), handle
    /// them and every due deadline, and return.
    pub fn poll_once(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.shared.stop.load(Ordering::SeqCst) {
            // Stopped: close what is left (events included) and do no more.
            self.close_all();
            return Ok(());
        }
        // The events are lent out while a pass drives sessions; a pass that
        // panicked (an embedder may catch it and go on) did not return them.
        if self.events.capacity() == 0 {
            self.events = Events::with_capacity(EVENTS_PER_POLL);
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // The events are taken out while sessions are driven (driving needs
        // the whole proxy); an empty `Events` holds no allocation.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let mut signal_ready = false;
        let mut woken = false;
        for event in events.iter() {
            match event.token() {
                LISTENER => self.listener_ready = true,
                SIGNALS => signal_ready = true,
                METRICS_LISTENER => self.metrics_ready = true,
                WAKER => woken = true,
                Token(_) => {}
            }
        }
        let now = Instant::now();
        self.pass_started = now;
        if signal_ready {
            self.take_signals(now);
        }
        // Handles wake the loop after every request, so the lock is only
        // taken on passes the waker started.
        if woken {
            self.take_requests(now);
        }
        for event in events.iter() {
            let Some(rel) = event.token().0.checked_sub(FIRST_SESSION_TOKEN) else {
                continue;
            };
            let side = if rel.is_multiple_of(2) {
                Side::Client
            } else {
                Side::Upstream
            };
            if let Some(s) = self.sessions.get_mut(rel / 2) {
                s.ready(side, Readiness::of(event));
                self.drive(rel / 2, now);
            }
        }
        self.events = events;
        for key in std::mem::take(&mut self.again) {
            if self.sessions.contains(key) {
                self.drive(key, now);
            }
        }
        self.serve_waiting(now);
        self.fire_timers(now);
        self.compact_timers();
        if self.check_drain(now) {
            return Ok(());
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        if self.listener_ready && self.can_accept() {
            self.accept(now, Kind::Main);
        }
        if self.can_accept_probe() {
            self.accept(now, Kind::Metrics);
        }
        if !self.pending_events.is_empty() {
            self.dispatch_events();
        }
        self.publish_buffers();
        if now >= self.next_bytes_count && self.metrics_read() {
            self.count_live_bytes(now);
        }
        if self.shared.publish.load(Ordering::Relaxed) {
            self.publish_metrics();
        }
        Ok(())
    }

    /// Someone reads this loop's metrics: it serves `/metrics`, or
    /// publishes them for the loop that does.
    fn metrics_read(&self) -> bool {
        self.metrics_listener.is_some() || self.shared.publish.load(Ordering::Relaxed)
    }

    /// Count the bytes open sessions relayed since the last count into
    /// `bytes_total`, at most once a [`BYTES_COUNT_INTERVAL`] (one walk over
    /// the sessions, not work per message), so a console open for hours
    /// shows in the byte rate as it goes rather than all at once when it
    /// ends.
    fn count_live_bytes(&mut self, now: Instant) {
        for (_, s) in self.sessions.iter_mut() {
            self.metrics.count_live(s.take_new_bytes());
        }
        self.next_bytes_count = now + BYTES_COUNT_INTERVAL;
    }

    /// Let handles see the buffer counts (stats()).
    fn publish_buffers(&self) {
        let c = &self.shared.counters;
        c.buffers_in_use
            .store(self.pool.in_use(), Ordering::Relaxed);
        c.bulk_buffers_in_use
            .store(self.pool.bulk_in_use(), Ordering::Relaxed);
        c.buffer_bytes
            .store(self.pool.bytes_in_use(), Ordering::Relaxed);
        c.waiting_for_memory
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Signals answered by the loop itself: the first drains, another one
    /// stops at once (as `Handle::drain` and `Handle::shutdown` would).
    fn take_signals(&mut self, now: Instant) {
        let Some(pipe) = self.signals.as_mut() else {
            return;
        };
        let came = pipe.take();
        if came == 0 {
            return;
        }
        let first = pipe.seen == 0;
        pipe.seen = pipe.seen.saturating_add(came);
        let stop = pipe.seen > 1;
        let grace = self.config.shutdown_grace;
        if first {
            info!("signal: draining for up to {grace:?} (again to stop at once)");
            self.start_drain(now, grace);
            self.workers.iter().for_each(|w| w.drain(grace));
        }
        if stop {
            warn!("signal again: stopping now");
            self.shared.stop.store(true, Ordering::SeqCst);
            self.workers.iter().for_each(Handle::shutdown);
        }
    }

    /// Refuse new sessions; open ones get `grace`, then 1001 (once).
    fn start_drain(&mut self, now: Instant, grace: Duration) {
        if self.drain_until.is_some() || self.gone_away {
            return;
        }
        info!(
            "draining: refusing new sessions, {} open ones have {grace:?}",
            self.relaying
        );
        self.drain_until = Some(now + grace);
    }

    /// Drain requests and deferred decisions from other threads.
    fn take_requests(&mut self, now: Instant) {
        let (drain, decisions) = {
            let mut r = self.shared.requests();
            (r.drain.take(), std::mem::take(&mut r.decisions))
        };
        if let Some(grace) = drain {
            self.start_drain(now, grace);
        }
        for (ticket, decision) in decisions {
            let (sessions, mut ctx) = self.ctx(now);
            let more = match sessions.get_mut(ticket.key) {
                Some(s) if s.id == ticket.id => s.decide(&mut ctx, decision),
                _ => continue,
            };
            if more {
                self.again.push(ticket.key);
            }
            self.after_drive(ticket.key, None);
        }
    }

    /// The two ends of a drain: when the grace is over every session is
    /// told to go away (1001), and [`SHUTDOWN_CLOSE_TIME`] later whatever
    /// has not finished closing is closed regardless. Returns true at that
    /// second point: the loop is stopped and its pass must end.
    fn check_drain(&mut self, now: Instant) -> bool {
        if self.drain_until.is_none_or(|t| t > now) {
            return false;
        }
        if self.gone_away {
            // The closing handshakes had their time. A peer that never
            // answers our close (or never reads it) must not hold the
            // process past its grace: the kubelet's SIGKILL would follow.
            self.drain_until = None;
            if !self.sessions.is_empty() {
                info!(
                    "shutdown: {} connections did not finish closing within {SHUTDOWN_CLOSE_TIME:?}; closing them now",
                    self.sessions.len()
                );
            }
            // Stopped, unless workers drain on: then this loop goes on
            // (refusing new sessions, answering probes) for their sake.
            if !self.answering_signals_for_workers() {
                self.shared.stop.store(true, Ordering::SeqCst);
            }
            self.close_all();
            return true;
        }
        self.gone_away = true;
        self.drain_until = Some(now + SHUTDOWN_CLOSE_TIME);
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        if !keys.is_empty() {
            info!(
                "shutdown grace over: closing {} sessions with 1001 (at most {SHUTDOWN_CLOSE_TIME:?} for the closing handshakes)",
                keys.len()
            );
        }
        for key in keys {
            let (sessions, mut ctx) = self.ctx(now);
            if sessions.get_mut(key).is_some_and(|s| s.go_away(&mut ctx)) {
                self.again.push(key);
            }
            self.after_drive(key, None);
        }
        false
    }

    fn dispatch_events(&mut self) {
        for e in self.pending_events.drain(..) {
            self.metrics.on_event(&e);
            for o in &mut self.observers {
                o.on_event(&e);
            }
        }
    }

    fn draining(&self) -> bool {
        self.drain_until.is_some() || self.gone_away
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            // What MAX_CONNECTIONS counts (and the alert on it divides by):
            // the probe port's connections, the scrape's own, are not.
            open_connections: self.counted(),
            relaying: self.relaying,
            buffers_in_use: self.pool.in_use(),
            bulk_buffers_in_use: self.pool.bulk_in_use(),
            buffer_bytes: self.pool.bytes_in_use(),
            waiting_for_memory: self.waiting.len(),
            draining: self.draining(),
            // This loop; `process_metrics` counts the others.
            workers: 1,
            workers_alive: 1,
            max_connections: self.config.max_connections,
            tls_not_after: self.listener_tls_state().map(SharedTls::not_after),
        }
    }

    /// A worker's metrics and gauges for the one serving `/metrics`, when
    /// they changed since the last pass.
    fn publish_metrics(&mut self) {
        self.metrics.limits_hit = self.shared.counters.limits_hit.load(Ordering::Relaxed);
        let gauges = self.gauges();
        if self
            .last_published
            .as_ref()
            .is_some_and(|(m, g)| *g == gauges && *m == self.metrics)
        {
            return;
        }
        let now = (self.metrics.clone(), gauges);
        *self.shared.published() = Some(now.clone());
        self.last_published = Some(now);
    }

    fn ctx(&mut self, now: Instant) -> (&mut Slab<Session>, Ctx<'_>) {
        let draining = self.draining();
        let gauges = self.gauges();
        self.metrics.limits_hit = self.shared.counters.limits_hit.load(Ordering::Relaxed);
        (
            &mut self.sessions,
            Ctx {
                registry: self.poll.registry(),
                pool: &mut self.pool,
                config: &self.config,
                authorizer: self.authorizer.as_mut(),
                events: &mut self.pending_events,
                draining,
                drain_requested: &self.shared.drain_requested,
                metrics: &mut self.metrics,
                gauges,
                workers: &self.workers,
                upstream_addrs: &self.upstream_addrs,
                upstream_host: &self.upstream_host,
                credentials: &mut self.credentials,
                scratch: &mut self.scratch,
                now,
            },
        )
    }

    fn drive(&mut self, key: usize, now: Instant) {
        // A message on a relaying session (the common event) needs no
        // context and changes neither the state nor the deadline.
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some(more) = s.relay_messages(&mut self.pool, now) {
            if more {
                self.again.push(key);
            }
            if self.pool.take_refused() {
                self.queue_for_memory(key);
            }
            return;
        }
        let (sessions, mut ctx) = self.ctx(now);
        let Some(s) = sessions.get_mut(key) else {
            return;
        };
        let before = s.deadline;
        let more = s.drive(&mut ctx);
        if more {
            self.again.push(key);
        }
        self.after_drive(key, Some(before));
    }

    /// Queue a session whose pump found no buffer within the memory limit
    /// (once: a queued session is served before it could be refused again).
    #[cold]
    fn queue_for_memory(&mut self, key: usize) {
        if let Some(s) = self.sessions.get_mut(key)
            && !s.waiting_memory
        {
            s.waiting_memory = true;
            self.waiting.push_back(key);
            self.pool.set_queue(self.waiting.len(), false);
        }
    }

    /// Drive the sessions waiting for relay memory, oldest first, while a
    /// buffer fits. Bounded: each is driven at most once per pass (one
    /// refused again goes to the back of the queue).
    fn serve_waiting(&mut self, now: Instant) {
        for _ in 0..self.waiting.len() {
            if !self.pool.has_room() {
                break;
            }
            let Some(key) = self.waiting.pop_front() else {
                break;
            };
            if let Some(s) = self.sessions.get_mut(key) {
                s.waiting_memory = false;
            }
            // It alone may take a buffer while the others keep waiting.
            self.pool.set_queue(self.waiting.len(), true);
            self.drive(key, now);
            self.pool.set_queue(self.waiting.len(), false);
        }
    }

    /// Remove a finished session, or arm its deadline if it changed.
    fn after_drive(&mut self, key: usize, deadline_before: Option<Option<Instant>>) {
        if self.pool.take_refused() {
            self.queue_for_memory(key);
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.counted_relaying != s.is_relaying() {
            s.counted_relaying = !s.counted_relaying;
            if s.counted_relaying {
                self.relaying += 1;
            } else {
                self.relaying -= 1;
            }
        }
        if s.is_done() {
            self.remove(key, self.pass_started);
            return;
        }
        if let Some(at) = s.deadline
            && deadline_before != Some(Some(at))
        {
            self.timers.push(Reverse((at, key, s.id)));
        }
    }

    /// Entries of ended sessions stay in the heap until their time; under
    /// heavy churn that is many. Rebuild it from the live deadlines when
    /// stale entries dominate (amortised: at most once per as many removals).
    fn compact_timers(&mut self) {
        if self.timers.len() <= 4 * self.sessions.len() + 256 {
            return;
        }
        let sessions = &self.sessions;
        self.timers.retain(|Reverse((at, key, id))| {
            sessions
                .get(*key)
                .is_some_and(|s| s.id == *id && s.deadline == Some(*at))
        });
        self.timers.shrink_to(2 * self.timers.len() + 64);
    }

    fn fire_timers(&mut self, now: Instant) {
        // Bounded: each popped entry is either stale or fires once.
        while let Some(Reverse((at, key, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let (sessions, mut ctx) = self.ctx(now);
            let Some(s) = sessions.get_mut(key) else {
                continue;
            };
            if s.id != id || s.deadline != Some(at) {
                continue;
            }
            if s.on_deadline(&mut ctx) {
                self.again.push(key);
            }
            self.after_drive(key, None);
        }
    }

    fn accept(&mut self, now: Instant, kind: Kind) {
        for _ in 0..ACCEPT_BUDGET {
            if kind == Kind::Main && self.counted() >= self.config.max_connections {
                // Stop accepting: new clients wait in the kernel's backlog
                // (or get refused by it) instead of costing descriptors.
                if !self.at_capacity {
                    self.at_capacity = true;
                    self.shared
                        .counters
                        .limits_hit
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "MAX_CONNECTIONS ({}) reached: not accepting until {} are open",
                        self.config.max_connections,
                        self.resume_at()
                    );
                }
                return;
            }
            let listener = match kind {
                Kind::Main => &self.listener,
                Kind::Metrics => match &self.metrics_listener {
                    Some(l) => l,
                    None => return,
                },
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.admit(now, kind, stream, peer);
                    if kind == Kind::Metrics
                        && self.probes.len() > PROBE_SLOTS
                        && let Some(victim) = self.probe_to_close()
                    {
                        debug!(
                            "probe port: more than {PROBE_SLOTS} connections, closing the oldest silent one"
                        );
                        self.remove(victim, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match kind {
                        Kind::Main => self.listener_ready = false,
                        Kind::Metrics => self.metrics_ready = false,
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // That one connection failed before it was accepted (reset,
                // or a network error Linux passes on from it): the next one
                // is served at once; the budget bounds the retries.
                Err(e) if failed_before_accept(&e) => {
                    debug!("accept: a queued connection failed: {e}");
                }
                Err(e) => {
                    // Out of file descriptors or similar: the connection
                    // stays queued in the kernel; try again shortly.
                    error!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
        // Budget spent with the listener still ready: the next pass
        // continues (next_timeout returns zero while it is ready).
    }

    fn admit(&mut self, now: Instant, kind: Kind, stream: mio::net::TcpStream, peer: SocketAddr) {
        // Relayed messages are small and latency-bound: no Nagle delay.
        if kind == Kind::Metrics || !ACCEPTED_HAVE_NODELAY {
            let _ = stream.set_nodelay(true);
        }
        let tls = match self.listener_tls(now, kind) {
            Ok(tls) => tls,
            Err(e) => {
                error!("cannot start TLS for a connection from {peer}: {e}");
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let client = match tls {
            // rustls' buffers bounded like a relay buffer (see conn.rs).
            Some(tls) => Conn::new(stream).into_tls(tls, self.config.buffer_size),
            None => Conn::new(stream),
        };
        let mut session = Session::new(id, key, kind, client, peer, now, &self.config);
        if let Err(e) = session.register(self.poll.registry()) {
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        if let Some(at) = session.deadline {
            self.timers.push(Reverse((at, key, id)));
        }
        entry.insert(session);
        // Counted once it is in: a failed register above takes no slot.
        if kind == Kind::Metrics {
            self.probes.push_back(key);
        }
        let c = &self.shared.counters;
        c.open.fetch_add(1, Ordering::Relaxed);
        c.accepted.fetch_add(1, Ordering::Relaxed);
        // Counted only when limited (the setting never changes while the
        // loop runs): no hashing per connection otherwise. Probe-path
        // connections are not counted: kubelet probes from the node's
        // address would eat that address's budget.
        let limit = self.config.max_connections_per_ip;
        let per_ip = if limit > 0 && kind == Kind::Main {
            let n = self.per_ip.entry(peer.ip()).or_insert(0);
            *n += 1;
            *n
        } else {
            0
        };
        if kind == Kind::Main && limit > 0 && per_ip > limit {
            c.limits_hit.fetch_add(1, Ordering::Relaxed);
            let (sessions, mut ctx) = self.ctx(now);
            if let Some(s) = sessions.get_mut(key) {
                let r = Refusal::new(
                    Status::ServiceUnavailable,
                    format!(
                        "too many connections from {} (MAX_CONNECTIONS_PER_IP={limit})",
                        peer.ip()
                    ),
                );
                s.reject(&mut ctx, r);
            }
            // The refusal's deadline replaced the handshake's: arm it, or a
            // TLS client that never says hello waits in `Refusing` for good
            // (`drive` arms only a deadline that it changes itself).
            self.after_drive(key, None);
            self.drive(key, now);
            return;
        }
        // A client speaks first, and its request is sent right behind the
        // handshake that queued the connection: read it now instead of
        // after another trip through epoll (when it has not come yet, the
        // read costs an EAGAIN and its event comes as usual).
        // A fresh socket's send buffer is empty: it is writable too, so a
        // TLS server's first flight goes out in this pass, not after the
        // EPOLLOUT that registering raises.
        if let Some(s) = self.sessions.get_mut(key) {
            s.ready(
                Side::Client,
                Readiness {
                    readable: true,
                    writable: true,
                    ..Readiness::default()
                },
            );
        }
        self.drive(key, now);
    }

    /// The server side of TLS for a new connection, when the listeners
    /// speak TLS, with the certificate files checked for rotation first (at
    /// most every CREDENTIALS_CHECK_SECONDS).
    fn listener_tls(
        &mut self,
        now: Instant,
        kind: Kind,
    ) -> Result<Option<rustls::ServerConnection>, rustls::Error> {
        let Some(tls) = self.shared.tls.get().or(self.tls.as_ref()) else {
            return Ok(None);
        };
        let (checked, accepted) = tls.accept(now, kind);
        match checked {
            Checked::Unchanged => {}
            Checked::Reloaded { not_after } => {
                self.metrics.tls_reloads += 1;
                info!(
                    "TLS certificate reloaded for new connections (expires at {not_after}, Unix seconds); open sessions keep theirs"
                );
            }
            Checked::Failed(e) => {
                self.metrics.tls_reload_failures += 1;
                error!(
                    "{}: {}; the previous TLS certificate keeps serving",
                    e.var, e.message
                );
            }
        }
        accepted.map(Some)
    }

    /// The listener TLS this loop uses: its owner's when it is a worker.
    fn listener_tls_state(&self) -> Option<&SharedTls> {
        self.shared.tls.get().or(self.tls.as_ref()).map(|t| &**t)
    }

    fn remove(&mut self, key: usize, now: Instant) {
        let (sessions, mut ctx) = self.ctx(now);
        if !sessions.contains(key) {
            return;
        }
        let mut s = sessions.remove(key);
        s.close(&mut ctx);
        if s.counted_relaying {
            self.relaying -= 1;
        }
        if s.kind() == Kind::Metrics {
            self.probes.retain(|&k| k != key);
        }
        if s.waiting_memory {
            self.waiting.retain(|&k| k != key);
            self.pool.set_queue(self.waiting.len(), false);
        }
        self.shared.counters.open.fetch_sub(1, Ordering::Relaxed);
        let ip = s.peer().ip();
        if self.config.max_connections_per_ip > 0
            && s.kind() == Kind::Main
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        // Hysteresis: resume at 90 %, so a full proxy does not flap.
        if self.at_capacity && self.counted() <= self.resume_at() {
            self.at_capacity = false;
            info!(
                "open connections down to {}: accepting again",
                self.counted()
            );
            // Clients may be waiting in the backlog; no new edge will come
            // for them, so look now.
            self.listener_ready = true;
        }
    }

    /// Which probe-port connection gives way to the one just accepted
    /// when they are more than [`PROBE_SLOTS`]: the oldest that has sent
    /// nothing, else the oldest. A probe sends its request (or its TLS
    /// ClientHello) at once and is answered within a round trip or two, so
    /// a silent one is most likely not a probe, and one mid-handshake most
    /// likely is (a kubelet probe over TLS, which a flood of silent
    /// connections closed when the oldest always gave way). Waiting for a
    /// slot instead let 16 idle connections hold kubelet's probe in the
    /// backlog past its timeout. Bounded: at most `PROBE_SLOTS` + 1.
    fn probe_to_close(&self) -> Option<usize> {
        let older = self.probes.len().saturating_sub(1);
        self.probes
            .iter()
            .take(older)
            .copied()
            .find(|&k| self.sessions.get(k).is_some_and(|s| !s.client_heard()))
            .or_else(|| self.probes.front().copied())
    }

    fn resume_at(&self) -> usize {
        self.config.max_connections * 9 / 10
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            // Only a stopping loop closes everything: a relay cut here ended
            // by the shutdown, whatever state its pipes were in.
            if let Some(s) = self.sessions.get_mut(key) {
                s.cut_by_shutdown();
            }
            self.remove(key, now);
        }
        self.dispatch_events();
        self.publish_buffers();
        // A worker's last pass: the loop serving `/metrics` keeps what it
        // published last, so the sessions just ended are published now.
        if self.shared.publish.load(Ordering::Relaxed) {
            self.publish_metrics();
        }
    }
}

/// An accept error that belongs to the one connection being accepted, not
/// to the listener or the process: accept(2) says Linux passes a pending
/// network error of the new connection on as accept's own, to be retried
/// like EAGAIN; ECONNABORTED is a connection reset while queued. Pausing
/// every accept for these (as for EMFILE) would let any client that resets
/// its connections stall everyone's.
fn failed_before_accept(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// The earlier of two optional instants (`None`: no deadline). Spelled out:
/// it runs on every pass of the loop.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that failed while queued costs only itself; running out
    /// of descriptors or memory pauses accepting.
    #[test]
    fn only_a_lack_of_resources_pauses_accepting() {
        for errno in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
        ] {
            assert!(
                failed_before_accept(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
        ] {
            assert!(
                !failed_before_accept(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!failed_before_accept(&io::Error::other("no errno")));
    }

    /// `admit` leaves TCP_NODELAY to the listener where
    /// `ACCEPTED_HAVE_NODELAY` says the kernel copies it: hold the kernel to
    /// that, on real sockets.
    #[test]
    fn accepted_sockets_have_nodelay_from_the_listener() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        // The connection is queued once connect returns; a few tries at most.
        let accepted = (0..100_000)
            .find_map(|_| match listener.accept() {
                Ok((stream, _)) => Some(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                    None
                }
                Err(e) => panic!("accept: {e}"),
            })
            .expect("the connection was never accepted");
        if ACCEPTED_HAVE_NODELAY {
            assert!(accepted.nodelay().unwrap());
        }
    }
}
