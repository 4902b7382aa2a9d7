//! The event loop: one mio `Poll`, the listener, a slab of sessions, a heap
//! of deadlines, and a handle to stop it from another thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::auth::JwtVerifier;
use crate::buffer::BufferPool;
use crate::config::{Config, ConfigError};
use crate::http::Refusal;
use crate::session::{Ctx, FIRST_SESSION_TOKEN, Session, Side};
use crate::upstream::Credentials;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// Connections accepted per pass before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;

/// How long to back off when accept fails for lack of resources (EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Spare relay buffers kept for reuse.
const SPARE_BUFFERS: usize = 64;

/// Why the proxy could not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// The upstream host name did not resolve.
    Resolve(String),
    /// Binding or setting up the event loop failed.
    Io(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Resolve(m) => write!(f, "cannot resolve the upstream: {m}"),
            StartError::Io(e) => write!(f, "cannot start: {e}"),
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
    limits_hit: AtomicU64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Sessions currently open (any state).
    pub open_sessions: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Relay buffers currently held by sessions.
    pub buffers_in_use: usize,
    /// Times a connection limit was hit (MAX_CONNECTIONS reached, or a
    /// client refused by MAX_CONNECTIONS_PER_IP).
    pub limits_hit: u64,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    waker: Waker,
    counters: Counters,
}

/// A cloneable, thread-safe handle to a running proxy.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Ask the loop to stop. It closes every session and returns promptly.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.waker.wake() {
            error!("cannot wake the proxy loop: {e}");
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            open_sessions: c.open.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            buffers_in_use: c.buffers_in_use.load(Ordering::Relaxed),
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
}

impl Running {
    /// A handle to stop it or read its counters.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop it and wait for the thread to end.
    pub fn shutdown(self) -> io::Result<()> {
        self.handle.shutdown();
        self.wait()
    }

    /// Wait for the thread to end (after someone called `shutdown`).
    pub fn wait(self) -> io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("proxy thread panicked")))
    }
}

/// The proxy: a listener and every session, served by one event loop on
/// whichever thread runs it.
pub struct Proxy {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    local_addr: SocketAddr,
    listener_ready: bool,
    accept_paused_until: Option<Instant>,
    /// MAX_CONNECTIONS reached; accepting resumes at 90 %.
    at_capacity: bool,
    /// Open connections per client address (MAX_CONNECTIONS_PER_IP).
    per_ip: HashMap<IpAddr, usize>,
    sessions: Slab<Session>,
    /// Deadlines as (when, slab key, session id); stale entries are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Sessions that ran out of budget with work left.
    again: Vec<usize>,
    pool: BufferPool,
    config: Config,
    verifier: JwtVerifier,
    upstream_addrs: Vec<SocketAddr>,
    upstream_host: String,
    credentials: Credentials,
    next_id: u64,
    shared: Arc<Shared>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Proxy {
    /// Validate the configuration, resolve the upstream once, and bind the
    /// listener. Nothing is served until the loop runs.
    pub fn bind(config: Config) -> Result<Proxy, StartError> {
        config.validate()?;
        let verifier = JwtVerifier::new(&config.jwt).map_err(|(var, m)| {
            StartError::Config(ConfigError {
                var: var.into(),
                message: m,
            })
        })?;
        // The only DNS lookup: at start, never per session.
        let up = &config.upstream;
        let upstream_addrs: Vec<SocketAddr> = (up.host.as_str(), up.port)
            .to_socket_addrs()
            .map_err(|e| StartError::Resolve(format!("{}: {e}", up.host)))?
            .collect();
        if upstream_addrs.is_empty() {
            return Err(StartError::Resolve(format!("{}: no addresses", up.host)));
        }
        let listen: SocketAddr = (config.host.as_str(), config.port)
            .to_socket_addrs()
            .map_err(|e| {
                StartError::Config(ConfigError {
                    var: "HOST".into(),
                    message: format!("'{}': {e}", config.host),
                })
            })?
            .next()
            .ok_or_else(|| {
                StartError::Config(ConfigError {
                    var: "HOST".into(),
                    message: "no address".into(),
                })
            })?;
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
        // Credential files are read now, so a missing one stops the start.
        let credentials = Credentials::load(&config, Instant::now())?;
        let mut listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        Ok(Proxy {
            poll,
            events: Events::with_capacity(1024),
            listener,
            local_addr,
            listener_ready: false,
            accept_paused_until: None,
            at_capacity: false,
            per_ip: HashMap::new(),
            sessions: Slab::new(),
            timers: BinaryHeap::new(),
            again: Vec::new(),
            pool: BufferPool::new(config.buffer_size, SPARE_BUFFERS),
            upstream_host: config.upstream.host_header(),
            credentials,
            config,
            verifier,
            upstream_addrs,
            next_id: 1,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                waker,
                counters: Counters::default(),
            }),
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to stop the loop from another thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serve on the calling thread until a handle asks to stop.
    pub fn run(mut self) -> io::Result<()> {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = self.next_timeout();
            self.poll_once(timeout)?;
        }
        self.close_all();
        Ok(())
    }

    /// Serve on a new thread; the returned value stops it.
    pub fn spawn(self) -> io::Result<Running> {
        let handle = self.handle();
        let local_addr = self.local_addr;
        let thread = std::thread::Builder::new()
            .name("kubevirt-vnc-proxy".into())
            .spawn(move || self.run())?;
        Ok(Running {
            handle,
            thread,
            local_addr,
        })
    }

    /// How long the loop may sleep before a deadline is due (`None`: no
    /// deadline, sleep until an event).
    pub fn next_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let accept = self.accept_paused_until;
        [timer, accept]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Wait for events (at most `timeout`), then handle them and every due
    /// deadline, and return.
    pub fn poll_once(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let mut touched: Vec<(usize, Side, bool, bool)> =
            Vec::with_capacity(self.events.iter().count());
        for event in self.events.iter() {
            match event.token() {
                LISTENER => self.listener_ready = true,
                WAKER => {}
                Token(t) => {
                    let rel = t - FIRST_SESSION_TOKEN;
                    let side = if rel.is_multiple_of(2) {
                        Side::Client
                    } else {
                        Side::Upstream
                    };
                    let readable =
                        event.is_readable() || event.is_read_closed() || event.is_error();
                    let writable =
                        event.is_writable() || event.is_write_closed() || event.is_error();
                    touched.push((rel / 2, side, readable, writable));
                }
            }
        }
        let now = Instant::now();
        for (key, side, readable, writable) in touched {
            if let Some(s) = self.sessions.get_mut(key) {
                s.ready(side, readable, writable);
                self.drive(key, now);
            }
        }
        for key in std::mem::take(&mut self.again) {
            if self.sessions.contains(key) {
                self.drive(key, now);
            }
        }
        self.fire_timers(now);
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        if self.listener_ready && self.accept_paused_until.is_none() {
            self.accept(now);
        }
        self.shared
            .counters
            .buffers_in_use
            .store(self.pool.in_use(), Ordering::Relaxed);
        Ok(())
    }

    fn ctx(&mut self, now: Instant) -> (&mut Slab<Session>, Ctx<'_>) {
        (
            &mut self.sessions,
            Ctx {
                registry: self.poll.registry(),
                pool: &mut self.pool,
                config: &self.config,
                verifier: &self.verifier,
                upstream_addrs: &self.upstream_addrs,
                upstream_host: &self.upstream_host,
                credentials: &mut self.credentials,
                now,
            },
        )
    }

    fn drive(&mut self, key: usize, now: Instant) {
        let (sessions, mut ctx) = self.ctx(now);
        let Some(s) = sessions.get_mut(key) else {
            return;
        };
        let deadline_before = s.deadline;
        let more = s.drive(&mut ctx);
        let done = s.is_done();
        let deadline = s.deadline;
        let id = s.id;
        if done {
            self.remove(key, now);
            return;
        }
        if more {
            self.again.push(key);
        }
        if let Some(at) = deadline.filter(|_| deadline != deadline_before) {
            self.timers.push(Reverse((at, key, id)));
        }
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
            s.on_deadline(&mut ctx);
            let (done, deadline) = (s.is_done(), s.deadline);
            if done {
                self.remove(key, now);
            } else if let Some(next) = deadline {
                self.timers.push(Reverse((next, key, id)));
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BUDGET {
            if self.sessions.len() >= self.config.max_connections {
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
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let id = self.next_id;
                    self.next_id += 1;
                    let entry = self.sessions.vacant_entry();
                    let key = entry.key();
                    let mut session = Session::new(id, key, stream, peer, now, &self.config);
                    if let Err(e) = session.register(self.poll.registry()) {
                        warn!("cannot register connection from {peer}: {e}");
                        continue;
                    }
                    if let Some(at) = session.deadline {
                        self.timers.push(Reverse((at, key, id)));
                    }
                    entry.insert(session);
                    let c = &self.shared.counters;
                    c.open.fetch_add(1, Ordering::Relaxed);
                    c.accepted.fetch_add(1, Ordering::Relaxed);
                    let per_ip = self.per_ip.entry(peer.ip()).or_insert(0);
                    *per_ip += 1;
                    let limit = self.config.max_connections_per_ip;
                    if limit > 0 && *per_ip > limit {
                        c.limits_hit.fetch_add(1, Ordering::Relaxed);
                        let (sessions, mut ctx) = self.ctx(now);
                        if let Some(s) = sessions.get_mut(key) {
                            let r = Refusal::new(
                                503,
                                format!(
                                    "too many connections from {} (MAX_CONNECTIONS_PER_IP={limit})",
                                    peer.ip()
                                ),
                            );
                            s.reject(&mut ctx, r);
                        }
                        self.drive(key, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors or similar: the connection
                    // stays queued in the kernel; try again shortly.
                    error!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
        // Budget spent with the listener still ready: come back next pass.
        self.accept_paused_until = Some(now);
    }

    fn remove(&mut self, key: usize, now: Instant) {
        let (sessions, mut ctx) = self.ctx(now);
        if !sessions.contains(key) {
            return;
        }
        let mut s = sessions.remove(key);
        s.close(&mut ctx);
        self.shared.counters.open.fetch_sub(1, Ordering::Relaxed);
        let ip = s.peer().ip();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        // Hysteresis: resume at 90 %, so a full proxy does not flap.
        if self.at_capacity && self.sessions.len() <= self.resume_at() {
            self.at_capacity = false;
            info!(
                "open connections down to {}: accepting again",
                self.sessions.len()
            );
            // Clients may be waiting in the backlog; no new edge will come
            // for them, so look now.
            self.listener_ready = true;
        }
    }

    fn resume_at(&self) -> usize {
        self.config.max_connections * 9 / 10
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key, now);
        }
        self.shared
            .counters
            .buffers_in_use
            .store(self.pool.in_use(), Ordering::Relaxed);
    }
}
