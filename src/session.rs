//! One client's session, as a state machine driven by readiness events and
//! one deadline. See `LIFECYCLE.md` beside this file for the states.
//!
//! What a state needs lives in its variant of [`State`], and a transition
//! takes the state by value and returns the next one: while it runs,
//! `self.state` holds the visible marker `State::Poisoned` (a transition that
//! failed to put a state back is caught, not left looking like another
//! state). The relay itself, both directions and their closing rules, is a
//! [`Relay`] (src/relay.rs); this file never touches a pipe.
//!
//! Every way a session can fail maps to exactly one client-visible outcome
//! (an HTTP status before the upgrade, a close code after it) and one log line.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, error, info};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::auth::Grant;
use crate::authorize::{AuthRequest, Authorizer, Decision, Ticket};
use crate::buffer::BufferPool;
use crate::config::Config;
use crate::conn::{Conn, Io, Readiness, Transport};
use crate::events::{Event, namespace_field, text_value, vmi_field};
use crate::http::{self, Refusal, Status, UpstreamAnswer};
pub(crate) use crate::relay::Side;
use crate::relay::{Fired, PUMP_BUDGET, Relay, Report, Step, Timers};
use crate::route::{filter_query, is_dns1123_label, is_dns1123_subdomain};
use crate::upstream::Credentials;

/// First token used by sessions; lower ones belong to the server.
pub(crate) const FIRST_SESSION_TOKEN: usize = 4;

pub(crate) fn client_token(key: usize) -> Token {
    Token(FIRST_SESSION_TOKEN + 2 * key)
}

pub(crate) fn upstream_token(key: usize) -> Token {
    Token(FIRST_SESSION_TOKEN + 2 * key + 1)
}

/// What a session needs from the server while it is driven.
pub(crate) struct Ctx<'a> {
    pub registry: &'a Registry,
    pub pool: &'a mut BufferPool,
    pub config: &'a Config,
    pub authorizer: &'a mut dyn Authorizer,
    /// Events produced while driving; the server hands them to observers.
    pub events: &'a mut Vec<Event>,
    /// The loop is shutting down (a signal, or a drain it has taken in).
    pub draining: bool,
    /// A drain asked for through a handle, seen before the loop takes it
    /// in (see [`Ctx::draining`]).
    pub drain_requested: &'a AtomicBool,
    /// Counters for /metrics (sessions add what events do not carry).
    pub metrics: &'a mut crate::metrics::Metrics,
    /// Live values for /metrics.
    pub gauges: crate::metrics::Gauges,
    /// The other workers of the process, whose sessions /metrics shows too.
    pub workers: &'a [crate::server::Handle],
    pub upstream_addrs: &'a [SocketAddr],
    pub upstream_host: &'a str,
    pub credentials: &'a mut Credentials,
    /// Scratch space for reads whose bytes are copied elsewhere or dropped
    /// (handshake heads, lingering input): one per loop, so no session
    /// zeroes a stack array of its own per read.
    pub scratch: &'a mut [u8],
    pub now: Instant,
}

impl Ctx<'_> {
    /// Shutting down: new sessions are refused with 503 and `/readyz` says
    /// not ready. Read live, not once per pass: `Handle::drain` promises
    /// that no session is let through to the upstream after it returned.
    pub fn draining(&self) -> bool {
        self.draining || self.drain_requested.load(Ordering::SeqCst)
    }
}

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The main listener: WebSocket sessions, /healthz, /readyz.
    Main,
    /// `METRICS_ADDR`, the probe path outside MAX_CONNECTIONS: `GET
    /// /metrics`, `/healthz` and `/readyz`.
    Metrics,
}

/// What the operator learns about a refusal besides its status and reason
/// (never sent).
#[derive(Debug, Default)]
struct RefusalContext {
    detail: Option<String>,
    vmi: Option<String>,
    namespace: Option<String>,
}

impl RefusalContext {
    /// A grant's names as they are: it was checked (src/route.rs) before
    /// the upstream was dialed for it.
    fn of_grant(grant: &Grant) -> Self {
        RefusalContext {
            detail: None,
            vmi: Some(grant.vmi.clone()),
            namespace: Some(grant.namespace.clone()),
        }
    }

    /// A grant's names when they are names (the grant is being refused,
    /// possibly for a name that is not one).
    fn of_unchecked_grant(grant: &Grant) -> Self {
        RefusalContext {
            detail: None,
            vmi: vmi_field(&grant.vmi),
            namespace: namespace_field(&grant.namespace),
        }
    }
}

/// What the upstream handshake needs, from the grant to the first relayed
/// byte.
#[derive(Debug)]
struct Handshake {
    grant: Grant,
    /// The client's Sec-WebSocket-Key, for its 101 (or a close-frame refusal).
    client_key: String,
    /// The subprotocol the client will be answered with.
    client_protocol: Option<String>,
    /// TLS configuration for a `wss://` upstream.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Frame bytes the client sent right after its request head.
    early: Vec<u8>,
    /// The upgrade request for the upstream.
    request: Vec<u8>,
    upstream_key: String,
    /// When dialing started (for the dial latency).
    dial_started: Instant,
}

/// Connecting to the upstream.
#[derive(Debug)]
struct Dialing<S> {
    hs: Handshake,
    upstream: Conn<S>,
    /// The address to try if this one fails.
    next_addr: usize,
}

/// Sending the upgrade to the upstream and reading its answer.
#[derive(Debug)]
struct UpstreamHandshake<S> {
    hs: Handshake,
    upstream: Conn<S>,
    /// Bytes of `hs.request` written so far.
    sent: usize,
    response: Vec<u8>,
}

/// Relaying frames both ways.
#[derive(Debug)]
struct Relaying<S> {
    relay: Relay,
    upstream: Conn<S>,
    grant: Grant,
}

/// A relayed session's last words, for the closing event once its sockets
/// are closed.
#[derive(Debug)]
struct Closed {
    grant: Grant,
    report: Report,
}

#[derive(Debug)]
enum State<S> {
    /// Reading the client's request head.
    ReadingRequest { head: Vec<u8> },
    /// Waiting for a deferred authorization decision.
    Authorizing {
        req: Box<http::UpgradeRequest>,
        early: Vec<u8>,
    },
    /// Connecting to the upstream.
    Dialing(Box<Dialing<S>>),
    /// Sending the upgrade to the upstream and reading its answer.
    UpstreamHandshake(Box<UpstreamHandshake<S>>),
    /// Relaying frames both ways.
    Relaying(Box<Relaying<S>>),
    /// Writing an HTTP refusal (or a probe's answer) to the client.
    Refusing { out: Vec<u8>, written: usize },
    /// Our side is shut down for writing; draining what the peers still send
    /// until they close too (so the kernel does not answer with a reset that
    /// could destroy our last words), bounded by the deadline.
    Lingering {
        upstream: Option<Conn<S>>,
        closed: Option<Box<Closed>>,
        /// A close frame went each way (`finish_closed`): the client is
        /// owed nothing, and only unread bytes keep its socket open once
        /// the upstream's end is in.
        clean: bool,
    },
    /// Nothing left to do: the server drops the session.
    Done(Option<Box<Closed>>),
    /// A transition is running (it took the state by value). Seen from
    /// outside one, it means a transition returned without a state: a bug,
    /// closed at once (and a panic in debug builds).
    Poisoned,
}

/// One client connection and, once authorized, its upstream connection,
/// over TCP (or, in the unit tests below, in-memory sockets).
#[derive(Debug)]
pub(crate) struct Session<S = TcpStream> {
    pub id: u64,
    key: usize,
    kind: Kind,
    peer: SocketAddr,
    client: Conn<S>,
    state: State<S>,
    /// When the current state gives up.
    pub deadline: Option<Instant>,
    started: Instant,
    /// Counted in the server's relaying gauge (the server keeps this).
    pub(crate) counted_relaying: bool,
    /// In the server's queue for relay memory (the server keeps this).
    pub(crate) waiting_memory: bool,
    /// Bytes (up, down) already in the metrics' live count.
    bytes_counted: (u64, u64),
}

impl<S: Transport> Session<S> {
    /// Which listener accepted it.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn new(
        id: u64,
        key: usize,
        kind: Kind,
        client: Conn<S>,
        peer: SocketAddr,
        now: Instant,
        config: &Config,
    ) -> Self {
        Session {
            id,
            key,
            kind,
            peer,
            client,
            state: State::ReadingRequest { head: Vec::new() },
            deadline: Some(now + config.handshake_timeout),
            started: now,
            counted_relaying: false,
            waiting_memory: false,
            bytes_counted: (0, 0),
        }
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        self.client.stream.register(
            registry,
            client_token(self.key),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Take the state for a transition, leaving the marker.
    fn take_state(&mut self) -> State<S> {
        std::mem::replace(&mut self.state, State::Poisoned)
    }

    /// The shutdown grace is over: relaying sessions get 1001 `going away`
    /// on both sides, sessions still in the handshake a 503.
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn go_away(&mut self, ctx: &mut Ctx<'_>) -> bool {
        match &mut self.state {
            State::Relaying(r) => {
                r.relay.go_away(ctx.now);
                self.deadline = r.relay.deadline();
            }
            State::Refusing { .. } | State::Lingering { .. } | State::Done(_) | State::Poisoned => {
            }
            State::ReadingRequest { .. }
            | State::Authorizing { .. }
            | State::Dialing(_)
            | State::UpstreamHandshake(_) => {
                let state = self.take_state();
                self.state = self.refuse_in(ctx, state, shutting_down());
            }
        }
        self.drive(ctx)
    }

    /// The proxy stops at once: a relay cut here ended by a shutdown (for
    /// the access log and `/metrics`), not by either side failing.
    pub fn cut_by_shutdown(&mut self) {
        if let State::Relaying(r) = &mut self.state {
            r.relay.cut_by_shutdown();
        }
    }

    /// True while frames are relayed.
    pub fn is_relaying(&self) -> bool {
        matches!(self.state, State::Relaying(_))
    }

    /// Bytes relayed since the last call (up, down), for the metrics' live
    /// count; `close` moves what was counted to the ended sessions' count.
    pub fn take_new_bytes(&mut self) -> (u64, u64) {
        let now = match &self.state {
            State::Relaying(r) => r.relay.bytes(),
            State::Lingering {
                closed: Some(c), ..
            }
            | State::Done(Some(c)) => (c.report.bytes_up, c.report.bytes_down),
            _ => return (0, 0),
        };
        let (up, down) = self.bytes_counted;
        self.bytes_counted = now;
        (now.0.saturating_sub(up), now.1.saturating_sub(down))
    }

    /// The client has sent something (a request's first bytes, a TLS
    /// ClientHello): the probe port gives way to silent connections first.
    pub fn client_heard(&self) -> bool {
        self.client.heard()
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Refuse before reading anything (a limit was hit).
    pub fn reject(&mut self, ctx: &mut Ctx<'_>, r: Refusal) {
        self.state = self.refuse(ctx, r, None, RefusalContext::default());
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// The upstream connection, in the states that have one.
    fn upstream_mut(&mut self) -> Option<&mut Conn<S>> {
        match &mut self.state {
            State::Dialing(d) => Some(&mut d.upstream),
            State::UpstreamHandshake(h) => Some(&mut h.upstream),
            State::Relaying(r) => Some(&mut r.upstream),
            State::Lingering { upstream, .. } => upstream.as_mut(),
            _ => None,
        }
    }

    /// Record readiness from an event.
    pub fn ready(&mut self, side: Side, readiness: Readiness) {
        let conn = match side {
            Side::Client => Some(&mut self.client),
            Side::Upstream => self.upstream_mut(),
        };
        if let Some(c) = conn {
            c.note(readiness);
        }
    }

    /// Make all the progress possible now. Returns true when the session
    /// stopped with work left (a budget ran out) and must be driven again
    /// soon, without waiting for an event.
    ///
    /// The handshake steps are kept out of line (`#[inline(never)]`): their
    /// parsers need kilobytes of stack, and inlined here they would make
    /// every relayed message pay for setting up that frame.
    pub fn drive(&mut self, ctx: &mut Ctx<'_>) -> bool {
        // Each transition either waits for an event or moves to a state that
        // gets its own pass; a handful of passes covers the longest chain
        // (request -> dial -> handshake -> relay).
        for _ in 0..8 {
            // The common case, a message to relay, needs no transition.
            if self.is_relaying() {
                let more = self.relay(ctx);
                if more || self.is_relaying() {
                    return more;
                }
                continue;
            }
            let before = std::mem::discriminant(&self.state);
            let state = self.take_state();
            self.state = match state {
                State::ReadingRequest { head } => self.read_request(ctx, head),
                State::Authorizing { req, mut early } => {
                    if self.client_left_early(ctx, &mut early) {
                        State::Done(None)
                    } else {
                        State::Authorizing { req, early }
                    }
                }
                State::Dialing(d) => self.check_dial(ctx, d),
                State::UpstreamHandshake(h) => self.upstream_handshake(ctx, h),
                State::Refusing { out, written } => self.write_refusal(ctx, out, written),
                State::Lingering {
                    upstream,
                    closed,
                    clean,
                } => {
                    let (state, more) = self.linger(ctx, upstream, closed, clean);
                    if more {
                        self.state = state;
                        return true;
                    }
                    state
                }
                State::Done(closed) => return self.keep(State::Done(closed)),
                State::Poisoned => self.poisoned(),
                // Handled above; put back as it was.
                relaying @ State::Relaying(_) => relaying,
            };
            if std::mem::discriminant(&self.state) == before {
                return false;
            }
        }
        true
    }

    /// Put `state` back and report no work left.
    fn keep(&mut self, state: State<S>) -> bool {
        self.state = state;
        false
    }

    /// A transition left no state behind: close the session rather than
    /// let it hang, and make the bug loud where tests run.
    fn poisoned(&self) -> State<S> {
        error!(
            "session {} {}: lost its state in a transition; closing it",
            self.id, self.peer
        );
        if cfg!(debug_assertions) {
            panic!("session {}: state poisoned", self.id);
        }
        State::Done(None)
    }

    /// The deadline passed: give up on the current state.
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn on_deadline(&mut self, ctx: &mut Ctx<'_>) -> bool {
        self.deadline = None;
        let state = self.take_state();
        self.state = match state {
            // Stalled inside the TLS handshake: no channel to answer on.
            State::ReadingRequest { .. } if self.client.is_handshaking() => {
                debug!(
                    "session {} {}: TLS handshake not done within the handshake timeout",
                    self.id, self.peer
                );
                self.finish(ctx, None, None)
            }
            State::ReadingRequest { head } => {
                if head.is_empty() {
                    debug!(
                        "session {} {}: no request within the handshake timeout",
                        self.id, self.peer
                    );
                }
                let r = Refusal::new(
                    Status::RequestTimeout,
                    "timed out waiting for the request head",
                );
                self.refuse(ctx, r, None, RefusalContext::default())
            }
            State::Authorizing { req, .. } => {
                let r = Refusal::new(
                    Status::GatewayTimeout,
                    "authorization did not answer in time",
                );
                self.refuse(
                    ctx,
                    r,
                    Some(upgrade_of(&req, ctx.config)),
                    RefusalContext::default(),
                )
            }
            // A connect that did not complete in its share of the time:
            // the next address gets the rest (see `attempt_deadline`).
            State::Dialing(d)
                if d.next_addr < ctx.upstream_addrs.len() && ctx.now < upstream_end(ctx, &d.hs) =>
            {
                let Dialing { hs, next_addr, .. } = *d;
                let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                self.dial(ctx, hs, next_addr, Some(e))
            }
            s @ (State::Dialing(_) | State::UpstreamHandshake(_)) => {
                let secs = ctx.config.upstream_timeout.as_secs();
                let r = Refusal::new(
                    Status::GatewayTimeout,
                    format!("upstream did not answer within {secs} s"),
                );
                self.refuse_in(ctx, s, r)
            }
            State::Relaying(mut r) => match r.relay.on_timer(ctx.now, ctx.pool) {
                Fired::ClosingTimedOut => self.leave_relaying(ctx, *r, false),
                fired => {
                    match fired {
                        Fired::PeerGone(side) => {
                            ctx.metrics.keepalive_timeouts += 1;
                            info!(
                                "session {} {}: {side} stopped answering, closing",
                                self.id, self.peer
                            );
                        }
                        Fired::PeerStalled(side) => {
                            ctx.metrics.keepalive_timeouts += 1;
                            info!(
                                "session {} {}: {side} stopped reading, closing",
                                self.id, self.peer
                            );
                        }
                        Fired::TokenExpired => {
                            info!("session {} {}: token expired, closing", self.id, self.peer);
                        }
                        Fired::Nothing | Fired::ClosingTimedOut => {}
                    }
                    self.deadline = r.relay.deadline();
                    State::Relaying(r)
                }
            },
            State::Refusing { .. } => self.finish(ctx, None, None),
            // The peers had their chance to close; close regardless.
            State::Lingering { closed, .. } => State::Done(closed),
            State::Done(closed) => State::Done(closed),
            State::Poisoned => self.poisoned(),
        };
        self.drive(ctx)
    }

    #[inline(never)]
    fn read_request(&mut self, ctx: &mut Ctx<'_>, mut head: Vec<u8>) -> State<S> {
        let max = ctx.config.max_head_bytes;
        // A head is at most `max` bytes; reading stops there either way.
        // A client may send its request and its FIN at once (`nc -N`, some
        // health checkers): the request is still answered, over the half of
        // the connection that is open.
        let ended = match gather(&mut self.client, ctx.scratch, &mut head, max) {
            Gathered::Open => false,
            Gathered::Failed(e) if self.client.is_handshaking() => {
                self.tls_failed(ctx, &e);
                return self.finish(ctx, None, None);
            }
            Gathered::Eof if !head.is_empty() => true,
            Gathered::Eof | Gathered::Failed(_) => {
                debug!(
                    "session {} {}: client left before sending a request",
                    self.id, self.peer
                );
                return self.finish(ctx, None, None);
            }
        };
        let probe_only = || {
            http::plain_response(
                Status::NotFound,
                "text/plain",
                "only GET /metrics, /healthz and /readyz here\n",
            )
        };
        let head_only = http::is_head(&head);
        let mut next = match http::parse_request(&head, max) {
            Ok(None) if ended => {
                debug!(
                    "session {} {}: client left before finishing its request",
                    self.id, self.peer
                );
                self.finish(ctx, None, None)
            }
            Ok(None) => State::ReadingRequest { head },
            Err(_) if self.kind == Kind::Metrics => self.answer(ctx, probe_only()),
            Err(refusal) => self.refuse(ctx, refusal, None, RefusalContext::default()),
            Ok(Some(http::Request::Probe(p))) => self.answer_probe(ctx, p),
            Ok(Some(http::Request::Upgrade(_))) if self.kind == Kind::Metrics => {
                self.answer(ctx, probe_only())
            }
            // A WebSocket whose client can no longer send is no session:
            // nothing is dialed for it.
            Ok(Some(http::Request::Upgrade(_))) if ended => {
                let r = Refusal::new(
                    Status::BadRequest,
                    "the client closed its side right after the upgrade request",
                );
                self.refuse(ctx, r, None, RefusalContext::default())
            }
            Ok(Some(http::Request::Upgrade(req))) => {
                let early = head[req.head_len..].to_vec();
                self.authorize(ctx, req, early)
            }
        };
        // A HEAD gets the head of its answer only (an upgrade is never one:
        // it must be a GET, so only probes and refusals come here).
        if let State::Refusing { out, written: 0 } = &mut next
            && head_only
        {
            http::strip_content(out);
        }
        next
    }

    fn authorize(
        &mut self,
        ctx: &mut Ctx<'_>,
        req: http::UpgradeRequest,
        early: Vec<u8>,
    ) -> State<S> {
        // From here on the client sent a valid upgrade: refusals may be
        // given as a close frame a web page can read (REJECT_WITH=close).
        let config = ctx.config;
        if ctx.draining() {
            return self.refuse(
                ctx,
                shutting_down(),
                Some(upgrade_of(&req, ctx.config)),
                RefusalContext::default(),
            );
        }
        // Origin first: a page from a foreign site learns nothing else.
        if !config.allowed_origins.is_empty()
            && !req
                .origin()
                .is_some_and(|o| config.allowed_origins.iter().any(|a| a == o))
        {
            let what = req
                .origin()
                .map_or("missing".into(), |o| format!("'{o}' not allowed"));
            let r = Refusal::new(Status::Forbidden, format!("origin {what}"));
            return self.refuse(
                ctx,
                r,
                Some(upgrade_of(&req, ctx.config)),
                RefusalContext::default(),
            );
        }
        let decision = ctx.authorizer.authorize(
            &AuthRequest {
                target: &req.target,
                headers: &req.headers,
                protocols: &req.protocols,
                peer: self.peer,
            },
            Ticket {
                key: self.key,
                id: self.id,
            },
        );
        self.decided(ctx, Box::new(req), early, decision)
    }

    /// A decision came later, through the handle.
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn decide(&mut self, ctx: &mut Ctx<'_>, decision: Decision) -> bool {
        let state = self.take_state();
        self.state = match state {
            State::Authorizing { req, early } => self.decided(ctx, req, early, decision),
            // Decided too late (the session moved on): nothing to do.
            other => return self.keep(other),
        };
        self.drive(ctx)
    }

    fn decided(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut req: Box<http::UpgradeRequest>,
        early: Vec<u8>,
        decision: Decision,
    ) -> State<S> {
        let grant = match decision {
            Decision::Allow(g) => g,
            Decision::Deny {
                refusal,
                log,
                vmi,
                namespace,
            } => {
                let about = RefusalContext {
                    detail: log,
                    vmi,
                    namespace,
                };
                return self.refuse(ctx, refusal, Some(upgrade_of(&req, ctx.config)), about);
            }
            Decision::Pending => {
                // Bounded like the upstream: no decision in time is a 504.
                self.deadline = Some(ctx.now + ctx.config.upstream_timeout);
                return State::Authorizing { req, early };
            }
        };
        let refuse_grant = |s: &mut Self, ctx: &mut Ctx<'_>, r: Refusal| {
            s.refuse(
                ctx,
                r,
                Some(upgrade_of(&req, ctx.config)),
                RefusalContext::of_unchecked_grant(&grant),
            )
        };
        // The drain may have come while the authorizer decided (a deferred
        // decision, or a host's authorizer that drains): no new dial then.
        if ctx.draining() {
            return refuse_grant(self, ctx, shutting_down());
        }
        // Whoever decided, no URL is built from a name that could change
        // its path.
        if !is_dns1123_subdomain(&grant.vmi) {
            return refuse_grant(
                self,
                ctx,
                Refusal::new(Status::Forbidden, "invalid VMI name"),
            );
        }
        if !is_dns1123_label(&grant.namespace) {
            return refuse_grant(
                self,
                ctx,
                Refusal::new(Status::Forbidden, "invalid namespace"),
            );
        }
        // Only allow-listed query parameters reach the upstream.
        let query = match req.target.split_once('?') {
            None => None,
            Some((_, q)) => match filter_query(q, &ctx.config.upstream_query_params) {
                Ok(q) => q,
                Err(e) => {
                    return refuse_grant(
                        self,
                        ctx,
                        Refusal::new(Status::BadRequest, e.to_string()),
                    );
                }
            },
        };
        let creds = match ctx.credentials.current(ctx.now) {
            Ok(c) => c,
            Err(e) => {
                let r = Refusal::new(
                    Status::BadGateway,
                    format!("upstream credentials unavailable: {e}"),
                );
                return refuse_grant(self, ctx, r);
            }
        };
        let upstream_key = http::new_key();
        let mut path = ctx.config.upstream_path(&grant.namespace, &grant.vmi);
        if let Some(q) = query {
            path.push('?');
            path.push_str(&q);
        }
        let bearer = creds.bearer.map(|t| format!("Bearer {t}"));
        let protocols = ctx.config.upstream_subprotocols.join(", ");
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("Authorization", b));
        }
        if !protocols.is_empty() {
            headers.push(("Sec-WebSocket-Protocol", &protocols));
        }
        let request = http::upstream_request(&path, ctx.upstream_host, &upstream_key, &headers);
        debug!(
            "session {} {}: token id {} allows {}/{}; dialing upstream",
            self.id,
            self.peer,
            text_value(&grant.token_id),
            grant.namespace,
            grant.vmi
        );
        let client_protocol = upgrade_of(&req, ctx.config).1.map(str::to_owned);
        let hs = Handshake {
            grant,
            client_key: std::mem::take(&mut req.key),
            client_protocol,
            tls: creds.tls,
            early,
            request,
            upstream_key,
            dial_started: ctx.now,
        };
        // `dial` sets the deadline: the first connect's share of the time.
        self.dial(ctx, hs, 0, None)
    }

    /// Start connecting to the `index`th upstream address (the host was
    /// resolved once at start; no DNS here).
    fn dial(
        &mut self,
        ctx: &mut Ctx<'_>,
        hs: Handshake,
        index: usize,
        last_error: Option<io::Error>,
    ) -> State<S> {
        let mut last_error = last_error;
        for (i, addr) in ctx.upstream_addrs.iter().enumerate().skip(index) {
            match S::connect(*addr) {
                Ok(mut stream) => {
                    if let Err(e) = stream.register(
                        ctx.registry,
                        upstream_token(self.key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        last_error = Some(e);
                        continue;
                    }
                    let left = ctx.upstream_addrs.len() - i;
                    self.deadline = Some(attempt_deadline(ctx.now, upstream_end(ctx, &hs), left));
                    return State::Dialing(Box::new(Dialing {
                        hs,
                        upstream: Conn::new(stream),
                        next_addr: i + 1,
                    }));
                }
                Err(e) => last_error = Some(e),
            }
        }
        let why = last_error.map_or_else(|| "no address".to_owned(), |e| e.to_string());
        let r = Refusal::new(Status::BadGateway, format!("upstream unreachable: {why}"));
        self.refuse_handshake(ctx, &hs, r)
    }

    #[inline(never)]
    fn check_dial(&mut self, ctx: &mut Ctx<'_>, mut d: Box<Dialing<S>>) -> State<S> {
        if self.client_left_early(ctx, &mut d.hs.early) {
            return State::Done(None);
        }
        let up = &mut d.upstream;
        if !up.writable && !up.readable && !up.error_seen {
            return State::Dialing(d);
        }
        // mio: a connect has finished when the socket is writable and has
        // failed when an event reports an error, so no syscall is spent
        // asking unless it failed. A wake-up that was not the connect
        // finishing is harmless: until the connection is established the
        // kernel answers a write with EAGAIN, and the handshake waits on.
        let failed = if up.error_seen {
            match up.stream.take_error() {
                Ok(Some(e)) | Err(e) => Some(e),
                Ok(None) => None,
            }
        } else {
            None
        };
        let Dialing {
            hs,
            mut upstream,
            next_addr,
        } = *d;
        if let Some(e) = failed {
            // Closing the socket removes it from epoll; the next address
            // gets a socket of its own.
            drop(upstream);
            return self.dial(ctx, hs, next_addr, Some(e));
        }
        // The handshake has what is left of UPSTREAM_TIMEOUT_SECONDS, not
        // this connect's share of it.
        self.deadline = Some(upstream_end(ctx, &hs));
        if let (Some(tls), Some(name)) = (&hs.tls, &ctx.credentials.server_name) {
            match rustls::ClientConnection::new(tls.clone(), name.clone()) {
                Ok(conn) => upstream = upstream.into_tls(conn, ctx.config.buffer_size),
                Err(e) => {
                    let r = Refusal::new(
                        Status::BadGateway,
                        format!("upstream TLS setup failed: {e}"),
                    );
                    return self.refuse_handshake(ctx, &hs, r);
                }
            }
        }
        State::UpstreamHandshake(Box::new(UpstreamHandshake {
            hs,
            upstream,
            sent: 0,
            response: Vec::new(),
        }))
    }

    #[inline(never)]
    fn upstream_handshake(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut h: Box<UpstreamHandshake<S>>,
    ) -> State<S> {
        if self.client_left_early(ctx, &mut h.hs.early) {
            return State::Done(None);
        }
        let failed = |up: &Conn<S>, e: io::Error| {
            let what = if up.is_handshaking() {
                "TLS handshake"
            } else {
                "handshake"
            };
            Refusal::new(
                Status::BadGateway,
                format!("upstream failed during the {what}: {e}"),
            )
        };
        let UpstreamHandshake {
            hs,
            upstream: up,
            sent,
            response,
        } = &mut *h;
        if let Err(e) = up.flush() {
            let r = failed(up, e);
            return self.refuse_handshake(ctx, &h.hs, r);
        }
        while up.writable && *sent < hs.request.len() {
            match up.write(&hs.request[*sent..]) {
                Io::Done(n) => *sent += n,
                Io::WouldBlock | Io::Eof => break,
                Io::Failed(e) => {
                    let r = failed(up, e);
                    return self.refuse_handshake(ctx, &h.hs, r);
                }
            }
        }
        let max = ctx.config.max_head_bytes;
        // A reset may come in the same event as a whole answer (a load
        // balancer that aborts after a 404, an upstream killed after its
        // 101): what was read before it is the answer, and is judged as if
        // the connection had ended there. The reset is the reason only when
        // the answer is not whole.
        let (eof, reset) = match gather(up, ctx.scratch, response, max) {
            Gathered::Open => (false, None),
            Gathered::Eof => (true, None),
            Gathered::Failed(e) if response.is_empty() => {
                let r = failed(up, e);
                return self.refuse_handshake(ctx, &h.hs, r);
            }
            Gathered::Failed(e) => (true, Some(e)),
        };
        if response.is_empty() && !eof {
            return State::UpstreamHandshake(h);
        }
        let (head_len, protocol) =
            match http::parse_upstream_response(response, &hs.upstream_key, max, eof) {
                Ok(None) => return State::UpstreamHandshake(h),
                Err(r) => {
                    let r = reset.map_or(r, |e| failed(up, e));
                    return self.refuse_handshake(ctx, &h.hs, r);
                }
                Ok(Some(UpstreamAnswer::Refused(r))) => {
                    return self.refuse_handshake(ctx, &h.hs, r);
                }
                Ok(Some(UpstreamAnswer::Upgraded { head_len, protocol })) => (head_len, protocol),
            };
        if let Some(p) = protocol.filter(|p| !ctx.config.upstream_subprotocols.contains(p)) {
            let r = Refusal::new(
                Status::BadGateway,
                format!("upstream chose subprotocol '{p}' that was not offered"),
            );
            return self.refuse_handshake(ctx, &h.hs, r);
        }
        let accept = http::switching_protocols(&hs.client_key, hs.client_protocol.as_deref());
        // What rustls decrypted past the head goes with it, as far as the
        // buffer that carries the 101 holds: else a console whose relay
        // waits for memory keeps it there (up to a record, 16 KiB). Bounded:
        // each round takes bytes already decrypted, or ends.
        let mut room = ctx
            .pool
            .regular_size()
            .saturating_sub(accept.len() + response.len() - head_len);
        while room > 0 {
            let want = room.min(ctx.scratch.len());
            let n = up.take_decrypted(&mut ctx.scratch[..want]);
            if n == 0 {
                break;
            }
            response.extend_from_slice(&ctx.scratch[..n]);
            room -= n;
        }
        let UpstreamHandshake {
            hs,
            upstream,
            response,
            ..
        } = *h;
        let expires = if ctx.config.close_on_token_expiry {
            // exp is wall-clock time; the loop's timers are monotonic. The
            // fraction of exp counts: a token minted for 2.5 s ends at 2.5 s.
            // What is left is counted from a monotonic instant read just after
            // the wall clock, not from `ctx.now`: the pass may have begun a
            // while ago, and the session would end early by the pass's age.
            // Wall first: time passing between the two reads can then only
            // make the deadline later, never earlier.
            let leeway = std::time::Duration::from_secs(ctx.config.jwt.leeway_secs);
            let wall = std::time::SystemTime::now();
            let mono = Instant::now();
            let left = hs
                .grant
                .expires_at
                .checked_add(leeway)
                .map(|end| end.duration_since(wall).unwrap_or_default());
            // A grant too far in the future to represent never expires. (In
            // the loop `ctx.now` is never ahead of `mono`; the unit tests'
            // clock may be.)
            left.and_then(|left| mono.max(ctx.now).checked_add(left))
        } else {
            None
        };
        let mut relay = Relay::new(
            self.id,
            ctx.config.max_frame_size,
            Timers::of(ctx.config),
            ctx.now,
            expires,
        );
        relay.preload(ctx.pool, &accept, &response[head_len..], &hs.early);
        self.deadline = relay.deadline();
        let g = hs.grant;
        debug!(
            "session {} {}: relaying to {}/{} (token id {})",
            self.id,
            self.peer,
            g.namespace,
            g.vmi,
            text_value(&g.token_id)
        );
        ctx.events.push(Event::Opened {
            id: self.id,
            peer: self.peer,
            namespace: g.namespace.clone(),
            vmi: g.vmi.clone(),
            token_id: g.token_id.clone(),
            handshake: ctx.now.saturating_duration_since(self.started),
            upstream_dial: ctx.now.saturating_duration_since(hs.dial_started),
        });
        State::Relaying(Box::new(Relaying {
            relay,
            upstream,
            grant: g,
        }))
    }

    /// Between the client's request and its 101 the client should say
    /// nothing, but it may leave: notice at once rather than at the upstream
    /// timeout. Whatever it sends meanwhile is kept (bounded, in `early`) and
    /// relayed after the 101. True when the client left: the session is
    /// done (the upstream socket, if any, closes with the state).
    #[inline(never)]
    fn client_left_early(&mut self, ctx: &mut Ctx<'_>, early: &mut Vec<u8>) -> bool {
        let max = ctx.config.max_head_bytes;
        if matches!(
            gather(&mut self.client, ctx.scratch, early, max),
            Gathered::Open
        ) {
            return false;
        }
        info!(
            "session {} {}: client left before the upstream answered",
            self.id, self.peer
        );
        true
    }

    /// The loop's path for an event on a relaying session: pump both
    /// directions (see [`Relay::pump`]). `None` when the session is not
    /// relaying or a source has ended: then the whole [`drive`] must run.
    /// It needs no context, and leaves the state and the deadline as they
    /// were.
    ///
    /// [`drive`]: Self::drive
    pub fn relay_messages(&mut self, pool: &mut BufferPool, now: Instant) -> Option<bool> {
        let State::Relaying(r) = &mut self.state else {
            return None;
        };
        r.relay.pump(&mut self.client, &mut r.upstream, pool, now)
    }

    /// Pump both directions and run the closing rules; leave the state when
    /// the relay is over. Returns true when a budget ran out with work left.
    fn relay(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let State::Relaying(r) = &mut self.state else {
            return false;
        };
        match r
            .relay
            .step(&mut self.client, &mut r.upstream, ctx.pool, ctx.now)
        {
            Step::Relaying { more } => {
                // Bytes written to leave with the client's FIN, and the relay
                // goes on (`Relay::pump`'s `fin_follows` guessed wrong): they
                // must not wait for an event.
                self.client.push_held();
                self.deadline = r.relay.deadline();
                more
            }
            Step::Over { clean } => {
                if let State::Relaying(r) = self.take_state() {
                    self.state = self.leave_relaying(ctx, *r, clean);
                }
                false
            }
        }
    }

    /// The relay is over: keep its report for the closing event, then
    /// close (`clean`: a close frame went each way) or linger.
    fn leave_relaying(&mut self, ctx: &mut Ctx<'_>, r: Relaying<S>, clean: bool) -> State<S> {
        let Relaying {
            relay,
            upstream,
            grant,
        } = r;
        let report = relay.finish(ctx.pool);
        ctx.metrics.backpressure_pauses += report.pauses;
        let closed = Some(Box::new(Closed { grant, report }));
        if clean {
            self.finish_closed(ctx, upstream, closed)
        } else {
            self.finish(ctx, Some(upstream), closed)
        }
    }

    /// Health, readiness and metrics, answered without an upgrade.
    fn answer_probe(&mut self, ctx: &mut Ctx<'_>, probe: http::Probe) -> State<S> {
        let text = "text/plain; charset=utf-8";
        let out = match (self.kind, probe) {
            (_, http::Probe::Health) => crate::server::health_response(ctx.workers),
            (_, http::Probe::Ready) => {
                // Readiness looks at the credentials itself (rate-limited by
                // CREDENTIALS_CHECK_SECONDS), so a pod with no sessions still
                // notices a vanished token.
                let draining = ctx.draining().then(|| SHUTTING_DOWN.to_owned());
                let why = draining.or_else(|| {
                    ctx.credentials
                        .current(ctx.now)
                        .err()
                        .map(|e| format!("upstream credentials unavailable: {e}"))
                });
                match why {
                    None => http::plain_response(Status::Ok, text, "ready\n"),
                    Some(why) => http::plain_response(
                        Status::ServiceUnavailable,
                        text,
                        &format!("not ready: {why}\n"),
                    ),
                }
            }
            (Kind::Metrics, http::Probe::Metrics) => http::plain_response(
                Status::Ok,
                "text/plain; version=0.0.4; charset=utf-8",
                &crate::server::process_metrics(ctx.metrics, ctx.gauges, ctx.workers),
            ),
            _ => http::plain_response(Status::NotFound, text, "not found\n"),
        };
        self.answer(ctx, out)
    }

    /// Write `out` to the client, then close (no event: probes are not
    /// sessions).
    fn answer(&mut self, ctx: &mut Ctx<'_>, out: Vec<u8>) -> State<S> {
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
        State::Refusing { out, written: 0 }
    }

    /// Refuse a session that is in `state` (a handshake state), naming what
    /// it knows: the client's key (for a close-frame refusal) and, once
    /// granted, the VMI and namespace.
    fn refuse_in(&mut self, ctx: &mut Ctx<'_>, state: State<S>, r: Refusal) -> State<S> {
        match state {
            State::Authorizing { req, .. } => self.refuse(
                ctx,
                r,
                Some(upgrade_of(&req, ctx.config)),
                RefusalContext::default(),
            ),
            State::Dialing(d) => self.refuse_handshake(ctx, &d.hs, r),
            State::UpstreamHandshake(h) => self.refuse_handshake(ctx, &h.hs, r),
            _ => self.refuse(ctx, r, None, RefusalContext::default()),
        }
    }

    /// Refuse a granted session whose upstream failed (or did not answer).
    fn refuse_handshake(&mut self, ctx: &mut Ctx<'_>, hs: &Handshake, r: Refusal) -> State<S> {
        let about = RefusalContext::of_grant(&hs.grant);
        let upgrade = (hs.client_key.as_str(), hs.client_protocol.as_deref());
        self.refuse(ctx, r, Some(upgrade), about)
    }

    /// The one place a refusal is decided: one event (the access log line),
    /// one answer to the client. `upgrade` is what a 101 would answer once
    /// the client sent a valid upgrade: its Sec-WebSocket-Key and the
    /// subprotocol chosen from its offer (then the refusal may be a close
    /// frame, REJECT_WITH=close).
    fn refuse(
        &mut self,
        ctx: &mut Ctx<'_>,
        r: Refusal,
        upgrade: Option<(&str, Option<&str>)>,
        about: RefusalContext,
    ) -> State<S> {
        let close = http::refusal_close_code(r.status).filter(|_| ctx.config.reject_with_close);
        let out = match (close, upgrade) {
            // A browser sees every HTTP refusal as 1006; a completed upgrade
            // followed by a close frame lets the page read code and reason.
            // The 101 names the subprotocol a success would: a browser that
            // offered one fails a 101 without it (1006 again).
            (Some(code), Some((key, protocol))) => {
                let mut out = http::switching_protocols(key, protocol);
                let mut frame = [0u8; 131];
                let n = crate::frame::close_frame(code, &r.reason, None, &mut frame);
                out.extend_from_slice(&frame[..n]);
                out
            }
            _ => http::refusal_response(&r),
        };
        ctx.events.push(Event::Refused {
            id: self.id,
            peer: self.peer,
            status: r.status,
            reason: r.reason,
            vmi: about.vmi,
            namespace: about.namespace,
            detail: about.detail,
        });
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
        State::Refusing { out, written: 0 }
    }

    #[inline(never)]
    fn write_refusal(&mut self, ctx: &mut Ctx<'_>, out: Vec<u8>, mut written: usize) -> State<S> {
        // A TLS client refused before its handshake finished (the per-IP
        // limit refuses at accept) is answered once the handshake is done:
        // reading drives it (bounded, as in `gather`); a request arriving
        // behind it is dropped. Handshake records the socket did not take
        // go out first: the event that lets them may say nothing of reading.
        if self.client.flush().is_err() {
            return State::Done(None);
        }
        for _ in 0..64 {
            if !self.client.is_handshaking() || !self.client.can_read() {
                break;
            }
            match self.client.read(ctx.scratch) {
                Io::Done(_) | Io::WouldBlock => {}
                Io::Eof => return State::Done(None),
                Io::Failed(e) => {
                    self.tls_failed(ctx, &e);
                    return State::Done(None);
                }
            }
        }
        if self.client.is_handshaking() {
            return State::Refusing { out, written };
        }
        // The answer is all this connection will carry: `finish` sends the
        // FIN as soon as it is written, so it may wait for it (one segment).
        while self.client.writable && written < out.len() {
            match self.client.write_before_fin(&out[written..]) {
                Io::Done(n) => written += n,
                Io::WouldBlock | Io::Eof => return State::Refusing { out, written },
                Io::Failed(_) => return State::Done(None),
            }
        }
        // With TLS, rustls may still hold records the socket did not take.
        if self.client.flush().is_err() {
            return State::Done(None);
        }
        if written == out.len() && !self.client.has_pending_output() {
            self.finish(ctx, None, None)
        } else {
            State::Refusing { out, written }
        }
    }

    /// No HTTP answer can reach a client that failed TLS (a missing or
    /// untrusted client certificate, no common version or ALPN, cleartext
    /// on the TLS port): rustls sent its alert, and the operator gets one
    /// line and a count.
    fn tls_failed(&self, ctx: &mut Ctx<'_>, e: &io::Error) {
        ctx.metrics.tls_handshake_failures += 1;
        info!(
            "session {} {}: TLS handshake failed: {e}",
            self.id, self.peer
        );
    }

    /// Shut our sides down for writing and wait (bounded) for the peers to
    /// close theirs.
    fn finish(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut upstream: Option<Conn<S>>,
        closed: Option<Box<Closed>>,
    ) -> State<S> {
        self.client.shutdown_write();
        self.client.readable = true;
        if let Some(up) = upstream.as_mut() {
            up.shutdown_write();
            up.readable = true;
        }
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
        State::Lingering {
            upstream,
            closed,
            clean: false,
        }
    }

    /// Both close frames went through: the WebSocket is closed and nothing
    /// more is owed to anyone. Towards the client the proxy is the server,
    /// which closes its TCP connection first (RFC 6455 7.1.1, so TIME_WAIT
    /// stays here); towards the upstream it is the client, which waits for
    /// the server's FIN. A socket with no unread bytes needs no shutdown
    /// before close(): the FIN goes out behind anything still unsent, and
    /// only unread bytes would turn it into a reset. So when the client has
    /// nothing unread and the upstream's FIN is in, both close at once;
    /// otherwise the client gets its FIN now and the session lingers.
    /// "Nothing unread" is as of the last event: a client that sends after
    /// its own close frame, racing this close, may get a reset after its FIN
    /// (no more than it asked for: both close frames have gone by, the last
    /// one with a shutdown when it was held for the FIN).
    fn finish_closed(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut upstream: Conn<S>,
        closed: Option<Box<Closed>>,
    ) -> State<S> {
        let client_done =
            !self.client.readable || discard_input(&mut self.client, ctx.scratch) != Input::More;
        // The upstream's last read may already have emptied the socket down
        // to its FIN: then there is no need to read the 0. Over TLS that
        // read may have read the 0 too (rustls reads on to the socket's
        // end), and left the socket unreadable.
        let upstream_done = upstream.input_ended
            || upstream.drained_to_fin()
            || (upstream.readable && discard_input(&mut upstream, ctx.scratch) == Input::Eof);
        if client_done && upstream_done {
            // "Nothing unread" is as of the last event: should the client
            // have sent more since, close() resets the connection and drops
            // what the kernel still holds, so a close answer held for the FIN
            // is sent with it now. Over TLS, close_notify goes first.
            if self.client.owes_shutdown() {
                self.client.shutdown_write();
            }
            // Closing the descriptors removes them from epoll (no other
            // handle to them exists), so no deregister call is spent.
            return State::Done(closed);
        }
        self.client.shutdown_write();
        self.client.readable = true;
        upstream.readable = true;
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
        State::Lingering {
            upstream: Some(upstream),
            closed,
            clean: true,
        }
    }

    /// Read and drop what the lingering sides send, until both FINs are in,
    /// or, after a clean close, until the upstream's FIN is in and nothing
    /// is left unread on the client's socket (the rule of `finish_closed`,
    /// for an upstream whose FIN came after its last frame).
    /// Also returns whether a side had at least one budget's worth queued:
    /// the loop then drives the session again on its next pass, as epoll
    /// (edge-triggered) raises no new event for bytes already queued.
    #[inline(never)]
    fn linger(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut upstream: Option<Conn<S>>,
        closed: Option<Box<Closed>>,
        clean: bool,
    ) -> (State<S>, bool) {
        let mut open = false;
        let mut more = false;
        for conn in [Some(&mut self.client), upstream.as_mut()]
            .into_iter()
            .flatten()
        {
            // Its FIN (or an error) was read, by any earlier read of the
            // socket, TLS or not: nothing more will come.
            if conn.input_ended {
                continue;
            }
            match discard_input(conn, ctx.scratch) {
                Input::Eof => {}
                // Whatever comes next waits for the next event (or the
                // deadline).
                Input::Empty => {
                    open = true;
                    conn.readable = false;
                }
                // Still readable: the rest is read on the next pass.
                Input::More => {
                    open = true;
                    more = true;
                }
            }
        }
        let upstream_ended = upstream.as_ref().is_none_or(|u| u.input_ended);
        if !open || (clean && upstream_ended && !more) {
            (State::Done(closed), false)
        } else {
            (
                State::Lingering {
                    upstream,
                    closed,
                    clean,
                },
                more,
            )
        }
    }

    /// Release everything (called by the server when the session is
    /// removed). A relayed session's closing event goes out here, once its
    /// sockets are closed (the client's closes when the session is dropped).
    pub fn close(&mut self, ctx: &mut Ctx<'_>) {
        let closed = match std::mem::replace(&mut self.state, State::Done(None)) {
            State::Relaying(r) => {
                let Relaying { relay, grant, .. } = *r;
                let report = relay.finish(ctx.pool);
                ctx.metrics.backpressure_pauses += report.pauses;
                Some(Box::new(Closed { grant, report }))
            }
            State::Lingering { closed, .. } | State::Done(closed) => closed,
            _ => None,
        };
        let Some(closed) = closed else {
            return;
        };
        let Closed { grant: g, report } = *closed;
        ctx.metrics.end_session(
            std::mem::take(&mut self.bytes_counted),
            (report.bytes_up, report.bytes_down),
        );
        ctx.events.push(Event::Closed {
            id: self.id,
            peer: self.peer,
            namespace: g.namespace,
            vmi: g.vmi,
            token_id: g.token_id,
            end: report.end,
            outcome: report.outcome,
            duration: ctx.now.saturating_duration_since(self.started),
            bytes_up: report.bytes_up,
            bytes_down: report.bytes_down,
            client_close: report.client_close,
            upstream_close: report.upstream_close,
        });
    }
}

/// Why new sessions are refused (503) and `/readyz` says not ready while
/// the loop drains.
const SHUTTING_DOWN: &str = "shutting down";

fn shutting_down() -> Refusal {
    Refusal::new(Status::ServiceUnavailable, SHUTTING_DOWN)
}

/// How gathering handshake bytes ended.
enum Gathered {
    /// The socket may say more (or the limit was reached).
    Open,
    Eof,
    Failed(io::Error),
}

/// What a 101 to `req` answers, a success's or a refusal's
/// (REJECT_WITH=close): its key and the subprotocol chosen from its offer.
fn upgrade_of<'r>(req: &'r http::UpgradeRequest, config: &Config) -> (&'r str, Option<&'r str>) {
    let protocol = http::select_client_protocol(&req.protocols, &config.client_subprotocols);
    (&req.key, protocol)
}

/// Read what `conn` has (through `scratch`) onto `out`, up to `max` bytes
/// in all: request and response heads, and what a client sends before its
/// 101.
fn gather<S: Transport>(
    conn: &mut Conn<S>,
    scratch: &mut [u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Gathered {
    // TLS handshake records the socket did not take yet: the event that
    // says it takes them now may say nothing about reading.
    if let Err(e) = conn.flush() {
        return Gathered::Failed(e);
    }
    // Bounded: a head is at most `max` bytes, and a read that brought
    // nothing while more is buffered (TLS records, see `Conn::read`) is
    // retried a few times only.
    for _ in 0..64 {
        if !conn.can_read() || out.len() >= max {
            break;
        }
        let want = (max - out.len()).min(scratch.len());
        match conn.read(&mut scratch[..want]) {
            Io::Done(n) => out.extend_from_slice(&scratch[..n]),
            Io::WouldBlock => {}
            Io::Eof => return Gathered::Eof,
            Io::Failed(e) => return Gathered::Failed(e),
        }
    }
    Gathered::Open
}

/// When the upstream must have answered: `UPSTREAM_TIMEOUT_SECONDS` from
/// the first dial.
fn upstream_end(ctx: &Ctx<'_>, hs: &Handshake) -> Instant {
    hs.dial_started + ctx.config.upstream_timeout
}

/// The least time a connect is given while another address waits (Go's
/// net.Dialer gives the same): a busy upstream's SYN-ACK is not cut short.
const MIN_CONNECT_SHARE: Duration = Duration::from_secs(2);

/// When to give up this connect for the next address: the time left is
/// spread over the `addrs_left` addresses (this one included), as Go's
/// net.Dialer does, so an address that drops SYNs (a node gone, a
/// firewall) cannot spend all of `UPSTREAM_TIMEOUT_SECONDS` while the next
/// would answer. The last address gets all that is left.
fn attempt_deadline(now: Instant, end: Instant, addrs_left: usize) -> Instant {
    let left = end.saturating_duration_since(now);
    let share = left / u32::try_from(addrs_left.max(1)).unwrap_or(u32::MAX);
    now + share.max(MIN_CONNECT_SHARE.min(left))
}

/// What reading a closing socket's input (and dropping it) found.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    /// Nothing unread is left.
    Empty,
    /// The peer's FIN (or an error: nothing more will come).
    Eof,
    /// The budget ran out with bytes still coming.
    More,
}

/// Read and drop a closing socket's input (the bytes on the wire, TLS
/// records included), bounded.
fn discard_input<S: Transport>(conn: &mut Conn<S>, sink: &mut [u8]) -> Input {
    for _ in 0..PUMP_BUDGET {
        match conn.read_socket(sink) {
            Io::Done(_) if !conn.readable => return Input::Empty,
            Io::Done(_) => {}
            Io::WouldBlock => return Input::Empty,
            Io::Eof | Io::Failed(_) => return Input::Eof,
        }
    }
    Input::More
}

/// Whole sessions over in-memory sockets: the client and the upstream are
/// scripted byte by byte, the clock is the test's, and every state is
/// entered and left through the same calls the loop makes (`ready`, `drive`,
/// `on_deadline`, `decide`, `go_away`, `close`).
#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use crate::events::SessionEnd;
    use crate::relay::tests::{DIALS, Mem, Wire, frame, frames};

    /// What the authorizer answers: allow (the grant expiring then), or
    /// leave the decision for later.
    enum Answer {
        Allow(SystemTime),
        Pending,
    }

    struct Fixed(Answer);

    impl Authorizer for Fixed {
        fn authorize(&mut self, _: &AuthRequest<'_>, _: Ticket) -> Decision {
            match self.0 {
                Answer::Allow(expires_at) => Decision::Allow(grant(expires_at)),
                Answer::Pending => Decision::Pending,
            }
        }
    }

    fn grant(expires_at: SystemTime) -> Grant {
        Grant {
            namespace: "lab-ns".into(),
            vmi: "vm-1".into(),
            token_id: "7".into(),
            expires_at,
        }
    }

    /// The loop's side of things: what a `Ctx` lends a session.
    struct World {
        poll: mio::Poll,
        pool: BufferPool,
        config: Config,
        authorizer: Fixed,
        events: Vec<Event>,
        metrics: crate::metrics::Metrics,
        credentials: Credentials,
        scratch: Vec<u8>,
        addrs: Vec<SocketAddr>,
        drain_requested: AtomicBool,
        now: Instant,
    }

    impl World {
        fn new(answer: Answer) -> Self {
            let mut config = Config::local_dev("ws://127.0.0.1:9", &[b'k'; 32]).expect("config");
            config.jwt.leeway_secs = 0;
            let now = Instant::now();
            World {
                poll: mio::Poll::new().expect("poll"),
                pool: BufferPool::new(config.buffer_size, 4),
                credentials: Credentials::load(&config, now).expect("credentials"),
                config,
                authorizer: Fixed(answer),
                events: Vec::new(),
                metrics: Default::default(),
                scratch: vec![0; 4096],
                addrs: vec!["127.0.0.1:9".parse().expect("addr")],
                drain_requested: AtomicBool::new(false),
                now,
            }
        }

        fn ctx(&mut self) -> Ctx<'_> {
            Ctx {
                registry: self.poll.registry(),
                pool: &mut self.pool,
                config: &self.config,
                authorizer: &mut self.authorizer,
                events: &mut self.events,
                draining: false,
                drain_requested: &self.drain_requested,
                metrics: &mut self.metrics,
                gauges: Default::default(),
                workers: &[],
                upstream_addrs: &self.addrs,
                upstream_host: "127.0.0.1:9",
                credentials: &mut self.credentials,
                scratch: &mut self.scratch,
                now: self.now,
            }
        }
    }

    /// A session, its client's wire and (once dialed) its upstream's.
    struct Rig {
        world: World,
        session: Session<Mem>,
        client: Rc<RefCell<Wire>>,
        upstream: Rc<RefCell<Wire>>,
    }

    const KEY: [u8; 4] = [9, 8, 7, 6];
    /// A browser's upgrade for the VMI the authorizer grants.
    const UPGRADE: &[u8] = b"GET /token/vm-1 HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    const BINARY: u8 = 2;
    const CLOSE: u8 = 8;

    impl Rig {
        /// A session whose client and upstream take one byte per write.
        fn new(answer: Answer) -> Self {
            Self::with_client(answer, Conn::new)
        }

        /// The same, the client's socket wrapped by `wrap` (e.g. in TLS).
        fn with_client(answer: Answer, wrap: impl FnOnce(Mem) -> Conn<Mem>) -> Self {
            let world = World::new(answer);
            let (mem, client) = Mem::open();
            client.borrow_mut().max_write = 1;
            let (up, upstream) = Mem::open();
            upstream.borrow_mut().max_write = 1;
            DIALS.with(|d| d.borrow_mut().push_back(up));
            let peer = "127.0.0.1:40000".parse().expect("peer");
            let session = Session::new(1, 0, Kind::Main, wrap(mem), peer, world.now, &world.config);
            let mut rig = Rig {
                world,
                session,
                client,
                upstream,
            };
            rig.event(Side::Client, true, true);
            rig
        }

        fn event(&mut self, side: Side, readable: bool, writable: bool) {
            // As epoll says with EPOLLRDHUP: the peer's FIN is queued.
            let read_closed = readable && self.wire(side).borrow().eof;
            self.session.ready(
                side,
                Readiness {
                    readable,
                    writable,
                    read_closed,
                    ..Readiness::default()
                },
            );
        }

        /// Drive as the loop does: again while work is left (bounded).
        fn drive(&mut self) {
            for _ in 0..10_000 {
                if !self.session.drive(&mut self.world.ctx()) {
                    self.nothing_held();
                    return;
                }
            }
            panic!("the session never settled");
        }

        /// Bytes written to wait for a FIN (MSG_MORE) never wait for an
        /// event: by the time the session settles the FIN is sent, or the
        /// session is done (the server closes its sockets at once).
        fn nothing_held(&self) {
            for (side, wire) in [("client", &self.client), ("upstream", &self.upstream)] {
                let w = wire.borrow();
                // A full socket (no room) sends what it holds as the peer's
                // ACKs come in; only one with room could keep it back.
                assert!(
                    !w.held || w.fin || w.room == 0 || self.session.is_done(),
                    "bytes held back from the {side} with no FIN to follow: {:?}",
                    self.session.state
                );
            }
        }

        /// The in-memory socket of `side`, as the test's end sees it.
        fn wire(&self, side: Side) -> &Rc<RefCell<Wire>> {
            match side {
                Side::Client => &self.client,
                Side::Upstream => &self.upstream,
            }
        }

        fn client_sends(&mut self, bytes: &[u8]) {
            self.client.borrow_mut().inbox.extend(bytes);
            self.event(Side::Client, true, false);
            self.drive();
        }

        fn upstream_sends(&mut self, bytes: &[u8]) {
            self.upstream.borrow_mut().inbox.extend(bytes);
            self.event(Side::Upstream, true, false);
            self.drive();
        }

        /// The deadline passes (the loop's timer fired).
        fn deadline(&mut self) {
            let at = self.session.deadline.expect("a deadline");
            self.world.now = self.world.now.max(at);
            let more = self.session.on_deadline(&mut self.world.ctx());
            if more {
                self.drive();
            }
        }

        /// The client's upgrade, the dial, the upstream's 101: relaying.
        fn open(&mut self) {
            self.client_sends(UPGRADE);
            assert!(matches!(self.session.state, State::Dialing(_)));
            // The connect completes.
            self.event(Side::Upstream, false, true);
            self.drive();
            let request = String::from_utf8(self.upstream.borrow().outbox.clone()).expect("utf-8");
            assert!(
                request.starts_with(
                    "GET /apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/vm-1/vnc"
                ),
                "{request}"
            );
            let answer = switching_protocols_for(&request);
            self.upstream.borrow_mut().outbox.clear();
            self.upstream_sends(&answer);
            assert!(self.session.is_relaying());
            let to_client = self.client.borrow().outbox.clone();
            assert!(to_client.starts_with(b"HTTP/1.1 101 "), "{to_client:?}");
            assert!(
                matches!(self.world.events.as_slice(), [Event::Opened { vmi, .. }] if vmi == "vm-1")
            );
            self.client.borrow_mut().outbox.clear();
        }

        /// Remove the session as the server does; its closing event.
        fn close(&mut self) -> Option<Event> {
            self.session.close(&mut self.world.ctx());
            self.world
                .events
                .iter()
                .find(|e| matches!(e, Event::Closed { .. }))
                .cloned()
        }

        /// The session closes with a complete close handshake: a normal
        /// end, 1000 each way, every buffer back in the pool.
        fn assert_closed_cleanly(&mut self) {
            let Some(Event::Closed {
                end,
                client_close,
                upstream_close,
                ..
            }) = self.close()
            else {
                panic!("no closing event: {:?}", self.world.events);
            };
            assert_eq!(end, SessionEnd::Normal);
            assert_eq!((client_close, upstream_close), (Some(1000), Some(1000)));
            assert_eq!(self.world.pool.in_use(), 0);
        }
    }

    fn in_an_hour() -> Answer {
        Answer::Allow(SystemTime::now() + Duration::from_secs(3600))
    }

    /// Request, dial, upstream handshake, relay and a close handshake, with
    /// every write taking one byte: the session ends cleanly, at once (no
    /// lingering), and its closing event says so.
    #[test]
    fn a_whole_session_with_a_partial_write_at_every_step() {
        let mut rig = Rig::new(in_an_hour());
        rig.open();
        rig.client_sends(&frame(BINARY, b"key event", Some(KEY)));
        rig.upstream_sends(&frame(BINARY, b"framebuffer update", None));
        assert_eq!(
            frames(&rig.upstream.borrow().outbox).0,
            vec![(BINARY, b"key event".to_vec())]
        );
        assert_eq!(
            frames(&rig.client.borrow().outbox).0,
            vec![(BINARY, b"framebuffer update".to_vec())]
        );
        rig.client_sends(&frame(CLOSE, &1000u16.to_be_bytes(), Some(KEY)));
        rig.upstream.borrow_mut().eof = true;
        rig.upstream_sends(&frame(CLOSE, &1000u16.to_be_bytes(), None));
        assert!(rig.session.is_done(), "{:?}", rig.session.state);
        // The close answer went to the client to leave with its FIN (one
        // segment), and the upstream's FIN, known queued behind its close
        // frame, cost no read of its own.
        assert!(rig.client.borrow().before_fin_writes > 0);
        // ... and the FIN went with it before close(): a reset from close()
        // (bytes the client sent after its close) cannot drop it.
        assert!(rig.client.borrow().fin && !rig.client.borrow().held);
        assert_eq!(rig.upstream.borrow().before_fin_writes, 0);
        assert_eq!(rig.upstream.borrow().eof_reads, 0);
        rig.assert_closed_cleanly();
    }

    /// The upstream closes first: the client's close answer goes upstream
    /// at once, not held back for a FIN (towards the upstream the proxy is
    /// the client, which waits for the server's FIN), and the session ends
    /// with the upstream's FIN: the client, which has its FIN and left
    /// nothing unread, is owed nothing more, so its FIN is not waited for.
    #[test]
    fn an_upstream_that_closes_first_gets_the_client_answer_at_once() {
        let mut rig = Rig::new(in_an_hour());
        rig.open();
        let close = (CLOSE, 1000u16.to_be_bytes().to_vec());
        rig.upstream_sends(&frame(CLOSE, &1000u16.to_be_bytes(), None));
        assert_eq!(frames(&rig.client.borrow().outbox).0, vec![close.clone()]);
        assert_eq!(rig.client.borrow().before_fin_writes, 0);
        rig.client_sends(&frame(CLOSE, &1000u16.to_be_bytes(), Some(KEY)));
        assert_eq!(frames(&rig.upstream.borrow().outbox).0, vec![close]);
        assert_eq!(rig.upstream.borrow().before_fin_writes, 0);
        assert!(matches!(rig.session.state, State::Lingering { .. }));
        assert!(rig.client.borrow().fin && !rig.upstream.borrow().fin);
        rig.upstream.borrow_mut().eof = true;
        rig.event(Side::Upstream, true, false);
        rig.drive();
        assert!(rig.session.is_done(), "{:?}", rig.session.state);
        assert_eq!(rig.client.borrow().eof_reads, 0);
    }

    /// The client breaks the protocol while the upstream's close arrives, in
    /// one pass, and the upstream takes nothing: the client's side looked
    /// finished before the closing rules gave it a close for the upstream,
    /// which now waits. The upstream's close answer to the client must not
    /// wait with it (`nothing_held`).
    #[test]
    fn a_close_answer_is_not_held_while_the_relay_goes_on() {
        let mut rig = Rig::new(in_an_hour());
        rig.open();
        rig.upstream.borrow_mut().room = 0;
        rig.upstream
            .borrow_mut()
            .inbox
            .extend(frame(CLOSE, &1000u16.to_be_bytes(), None));
        rig.event(Side::Upstream, true, false);
        // Unmasked: a violation from a client.
        rig.client_sends(&frame(BINARY, b"x", None));
        assert!(rig.session.is_relaying(), "{:?}", rig.session.state);
        assert!(!frames(&rig.client.borrow().outbox).0.is_empty());
        assert!(!rig.client.borrow().held);
    }

    /// The token expires while relaying: the deadline the session asks for
    /// is the expiry; the client gets 1008, the upstream 1000, and the
    /// closing event counts the session as expired.
    #[test]
    fn the_token_expiry_is_the_session_deadline_and_ends_it_with_1008() {
        let mut rig = Rig::new(Answer::Allow(SystemTime::now() + Duration::from_secs(2)));
        rig.open();
        let at = rig.session.deadline.expect("the expiry is a deadline");
        assert!(at > rig.world.now + Duration::from_millis(1500), "{at:?}");
        rig.deadline();
        let to_client = frames(&rig.client.borrow().outbox).0;
        assert_eq!(to_client.len(), 1);
        assert_eq!(&to_client[0].1[..2], &1008u16.to_be_bytes());
        let to_upstream = frames(&rig.upstream.borrow().outbox).0;
        assert_eq!(&to_upstream[0].1[..2], &1000u16.to_be_bytes());
        // Both told: the session lingers for the peers' FINs, bounded.
        assert!(matches!(rig.session.state, State::Lingering { .. }));
        assert!(rig.client.borrow().fin && rig.upstream.borrow().fin);
        rig.deadline();
        assert!(rig.session.is_done());
        let Some(Event::Closed { end, .. }) = rig.close() else {
            panic!("no closing event");
        };
        assert_eq!(end, SessionEnd::TokenExpired);
    }

    /// The loop reads its clock once per pass, so the upstream's 101 may be
    /// handled well after `ctx.now`: the expiry deadline counts from the
    /// moment the wall clock is read, never from the pass's start, or the
    /// session would end before the token's `exp` by the pass's age (as it
    /// did in CI, on a loaded machine, by a fraction of a millisecond).
    #[test]
    fn the_expiry_deadline_does_not_start_early_when_the_pass_began_long_ago() {
        // The grant ends 2 s after `before` (both clocks read together).
        let before = Instant::now();
        let mut rig = Rig::new(Answer::Allow(SystemTime::now() + Duration::from_secs(2)));
        // A pass that began a second ago (the clock is read once per pass).
        rig.world.now = Instant::now() - Duration::from_secs(1);
        rig.open();
        let at = rig.session.deadline.expect("the expiry is a deadline");
        assert!(
            at >= before + Duration::from_millis(1990),
            "deadline {:?} after the read, 2 s asked",
            at.saturating_duration_since(before)
        );
    }

    /// Lingering on both sides, the peers closing in either order: the
    /// session ends with the second FIN, and a side whose FIN was read is
    /// not read again while the other keeps the session.
    #[test]
    fn lingering_ends_when_both_sides_have_closed_in_either_order() {
        for client_first in [true, false] {
            let mut rig = Rig::new(in_an_hour());
            rig.open();
            // The upstream breaks the protocol (a reserved opcode): both
            // sides get their close and the session lingers for the FINs.
            rig.upstream_sends(&[0x8f, 0x00]);
            assert!(
                matches!(rig.session.state, State::Lingering { .. }),
                "{:?}",
                rig.session.state
            );
            let (first, second) = if client_first {
                (Side::Client, Side::Upstream)
            } else {
                (Side::Upstream, Side::Client)
            };
            for (n, side) in [first, second].into_iter().enumerate() {
                let wire = match side {
                    Side::Client => rig.client.clone(),
                    Side::Upstream => rig.upstream.clone(),
                };
                wire.borrow_mut().eof = true;
                rig.event(side, true, false);
                rig.drive();
                assert_eq!(
                    rig.session.is_done(),
                    n == 1,
                    "client first: {client_first}"
                );
            }
            for (side, wire) in [("client", &rig.client), ("upstream", &rig.upstream)] {
                let w = wire.borrow();
                assert!(w.fin, "{side}: no FIN");
                assert_eq!(w.eof_reads, 1, "{side}: its FIN read once");
            }
        }
    }

    /// A lingering client that sends more than one pass reads (and then its
    /// FIN) in one burst is read on to its FIN over the next passes: epoll
    /// would raise no new event for bytes already queued, and the session
    /// would wait for the close timeout and end in a reset.
    #[test]
    fn a_lingering_side_with_more_queued_than_one_pass_reads_is_read_on() {
        let mut rig = Rig::new(in_an_hour());
        rig.open();
        rig.upstream_sends(&[0x8f, 0x00]);
        assert!(matches!(rig.session.state, State::Lingering { .. }));
        rig.upstream.borrow_mut().eof = true;
        rig.event(Side::Upstream, true, false);
        rig.drive();
        assert!(!rig.session.is_done(), "the client's FIN is not in yet");
        let burst = 3 * PUMP_BUDGET * rig.world.scratch.len();
        {
            let mut c = rig.client.borrow_mut();
            c.inbox.extend(std::iter::repeat_n(0u8, burst));
            c.eof = true;
        }
        rig.event(Side::Client, true, false);
        // One event, then the passes the session asks for: no deadline.
        rig.drive();
        assert!(rig.session.is_done(), "{:?}", rig.session.state);
        assert!(rig.client.borrow().inbox.is_empty());
        assert_eq!(rig.client.borrow().eof_reads, 1);
    }

    /// A deferred decision that comes after the session gave up waiting
    /// (504) changes nothing: the state is the refusal's, not lost.
    #[test]
    fn a_decision_that_comes_too_late_leaves_the_refusal_alone() {
        let mut rig = Rig::new(Answer::Pending);
        rig.client_sends(UPGRADE);
        assert!(matches!(rig.session.state, State::Authorizing { .. }));
        // The client cannot take the answer yet.
        rig.client.borrow_mut().room = 0;
        rig.deadline();
        assert!(matches!(rig.session.state, State::Refusing { .. }));
        assert!(matches!(
            rig.world.events.as_slice(),
            [Event::Refused {
                status: Status::GatewayTimeout,
                ..
            }]
        ));
        let late = rig.session.decide(
            &mut rig.world.ctx(),
            Decision::Allow(grant(SystemTime::now())),
        );
        assert!(!late);
        assert!(matches!(rig.session.state, State::Refusing { .. }));
        rig.client.borrow_mut().room = usize::MAX;
        rig.event(Side::Client, false, true);
        rig.drive();
        let out = String::from_utf8(rig.client.borrow().outbox.clone()).expect("utf-8");
        assert!(out.starts_with("HTTP/1.1 504 "), "{out}");
        assert_eq!(rig.world.events.len(), 1, "one refusal, nothing else");
        // Every byte of the answer (one per write here) was written to wait
        // for the FIN, which followed it.
        let w = rig.client.borrow();
        assert_eq!(w.before_fin_writes, w.outbox.len());
        assert!(w.fin && !w.held);
    }

    /// The client leaves while the upstream is being dialed: the session is
    /// done at once (the upstream socket closes with it), and no refusal or
    /// closing event is reported for a client that asked for nothing more.
    #[test]
    fn a_client_that_leaves_while_dialing_ends_the_session_quietly() {
        let mut rig = Rig::new(in_an_hour());
        rig.client_sends(UPGRADE);
        assert!(matches!(rig.session.state, State::Dialing(_)));
        rig.client.borrow_mut().eof = true;
        rig.client_sends(&[]);
        assert!(rig.session.is_done());
        assert_eq!(rig.close(), None);
        assert!(rig.world.events.is_empty(), "{:?}", rig.world.events);
    }

    /// The drain's grace ends while a session waits for the upstream's 101:
    /// the client gets 503 and the refusal names the granted VMI.
    #[test]
    fn going_away_during_the_upstream_handshake_is_a_503_naming_the_vmi() {
        let mut rig = Rig::new(in_an_hour());
        rig.client_sends(UPGRADE);
        rig.event(Side::Upstream, false, true);
        rig.drive();
        assert!(matches!(rig.session.state, State::UpstreamHandshake(_)));
        rig.session.go_away(&mut rig.world.ctx());
        rig.drive();
        let out = String::from_utf8(rig.client.borrow().outbox.clone()).expect("utf-8");
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(matches!(
            rig.world.events.as_slice(),
            [Event::Refused { status: Status::ServiceUnavailable, vmi: Some(v), namespace: Some(n), .. }]
                if v == "vm-1" && n == "lab-ns"
        ));
    }

    /// Two upstream addresses, the first silent (its SYNs dropped: a node
    /// gone). The first connect is given half of UPSTREAM_TIMEOUT_SECONDS
    /// (Go's net.Dialer rule), then the second address is dialed, and once
    /// it connects the handshake has what is left of the whole timeout.
    /// Before, the first address took it all and the client got 504.
    #[test]
    fn a_silent_first_address_gives_way_to_the_next() {
        let mut rig = Rig::new(in_an_hour());
        rig.world.addrs.push("127.0.0.2:9".parse().expect("addr"));
        let (second, second_wire) = Mem::open();
        DIALS.with(|d| d.borrow_mut().push_back(second));
        let started = rig.world.now;
        let timeout = rig.world.config.upstream_timeout;
        rig.client_sends(UPGRADE);
        assert!(matches!(rig.session.state, State::Dialing(_)));
        assert_eq!(rig.session.deadline, Some(started + timeout / 2));
        // The first connect never completes: no event at all.
        rig.deadline();
        assert_eq!(
            DIALS.with(|d| d.borrow().len()),
            0,
            "the second address is dialed"
        );
        assert!(matches!(rig.session.state, State::Dialing(_)));
        assert!(rig.client.borrow().outbox.is_empty(), "no answer yet");
        assert_eq!(rig.session.deadline, Some(started + timeout), "the rest");
        // The second connects and answers: the session relays.
        rig.upstream = second_wire;
        rig.world.now += Duration::from_millis(10);
        rig.event(Side::Upstream, false, true);
        rig.drive();
        assert_eq!(rig.session.deadline, Some(started + timeout));
        let request = String::from_utf8(rig.upstream.borrow().outbox.clone()).expect("utf-8");
        assert!(
            request.starts_with("GET "),
            "the upgrade went to the second address"
        );
        rig.upstream_sends(&switching_protocols_for(&request));
        assert!(rig.session.is_relaying());
    }

    #[test]
    fn each_connect_gets_its_share_of_the_time_left_and_the_last_all_of_it() {
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(attempt_deadline(now, now + s(10), 2), now + s(5));
        assert_eq!(attempt_deadline(now, now + s(10), 1), now + s(10));
        // At least 2 s each, while there is that much left.
        assert_eq!(attempt_deadline(now, now + s(10), 8), now + s(2));
        assert_eq!(attempt_deadline(now, now + s(1), 3), now + s(1));
        assert_eq!(attempt_deadline(now, now, 3), now);
    }

    /// The test's TLS end on one `side` of the session, over the in-memory
    /// wire: a rustls client facing the session's TLS server, or a rustls
    /// server facing the session's upstream TLS client.
    struct TlsEnd<C> {
        tls: C,
        side: Side,
        /// Plaintext the session sent this way, decrypted.
        received: Vec<u8>,
    }

    /// The session's TLS client (`tls_rig`).
    type TlsPeer = TlsEnd<rustls::ClientConnection>;
    /// The session's `wss://` upstream (`tls_upstream`).
    type TlsUpstream = TlsEnd<rustls::ServerConnection>;

    impl<C, D> TlsEnd<C>
    where
        C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    {
        /// Shuttle records both ways until neither side has more to say.
        fn pump(&mut self, rig: &mut Rig) {
            pump_tls(&mut self.tls, &mut self.received, rig, self.side);
        }

        /// Write `plaintext` to the session, and pump.
        fn send(&mut self, rig: &mut Rig, plaintext: &[u8]) {
            std::io::Write::write_all(&mut self.tls.writer(), plaintext)
                .unwrap_or_else(|e| panic!("{:?} side write: {e}", self.side));
            self.pump(rig);
        }

        /// Take in records the session sent; keep what they decrypt to.
        fn decrypt(&mut self, records: &[u8]) {
            decrypt(&mut self.tls, records, &mut self.received);
        }

        /// The TLS records this end makes of `stream` (see `encrypt`).
        fn records(&mut self, stream: &[u8], first: usize) -> Vec<u8> {
            encrypt(&mut self.tls, stream, first)
        }
    }

    impl TlsPeer {
        /// The TLS handshake, the upgrade, the dial and the upstream's 101:
        /// relaying, with nothing received yet.
        fn open(&mut self, rig: &mut Rig, what: &str) {
            self.pump(rig);
            assert!(!self.tls.is_handshaking(), "{what}: handshake not done");
            assert!(matches!(rig.session.state, State::ReadingRequest { .. }));
            self.send(rig, UPGRADE);
            assert!(matches!(rig.session.state, State::Dialing(_)), "{what}");
            rig.event(Side::Upstream, false, true);
            rig.drive();
            let request = String::from_utf8(rig.upstream.borrow().outbox.clone()).expect("utf-8");
            rig.upstream.borrow_mut().outbox.clear();
            rig.upstream_sends(&switching_protocols_for(&request));
            self.pump(rig);
            assert!(rig.session.is_relaying(), "{what}");
            assert!(self.received.starts_with(b"HTTP/1.1 101 "), "{what}");
            self.received.clear();
        }
    }

    /// The upstream's 101 for `request`, the session's upgrade: its
    /// Sec-WebSocket-Key answered.
    fn switching_protocols_for(request: &str) -> Vec<u8> {
        let key = request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key in the upgrade request");
        http::switching_protocols(key, None)
    }

    /// Shuttle records between a test peer's rustls on the session's `side`
    /// and the session until neither has more to say (bounded): the peer's
    /// records in, the session's out, with a writable event each round
    /// (each write may take one byte). rustls on the session's side may
    /// still hold records its socket has not taken: only a writable event
    /// moves them, so those count as more to say.
    fn pump_tls<D>(
        tls: &mut rustls::ConnectionCommon<D>,
        received: &mut Vec<u8>,
        rig: &mut Rig,
        side: Side,
    ) {
        for _ in 0..20_000 {
            let mut out = Vec::new();
            while tls.wants_write() {
                tls.write_tls(&mut out).expect("peer write_tls");
            }
            let sent = std::mem::take(&mut rig.wire(side).borrow_mut().outbox);
            if out.is_empty() && sent.is_empty() && !rig.owes_records(side) {
                return;
            }
            if !out.is_empty() {
                rig.wire(side).borrow_mut().inbox.extend(&out);
                rig.event(side, true, false);
                rig.drive();
            }
            decrypt(tls, &sent, received);
            rig.event(side, false, true);
            rig.drive();
        }
        panic!("the TLS exchange on the {side:?} side never settled");
    }

    /// Where each TLS record of `stream` ends (its 5-byte header says its
    /// length), and so how many it holds.
    fn record_ends(stream: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        while at + 5 <= stream.len() {
            at += 5 + usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
            ends.push(at);
        }
        ends
    }

    /// Take in `records` a peer of the session received; keep what they
    /// decrypt to. (Shared by the test's TLS client and TLS upstream.)
    fn decrypt<D>(tls: &mut rustls::ConnectionCommon<D>, mut records: &[u8], into: &mut Vec<u8>) {
        let mut buf = [0u8; 4096];
        loop {
            // rustls holds 16 KiB of plaintext at most: read as it comes.
            loop {
                match std::io::Read::read(&mut tls.reader(), &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => into.extend_from_slice(&buf[..n]),
                }
            }
            if records.is_empty() {
                return;
            }
            tls.read_tls(&mut records).expect("peer read_tls");
            tls.process_new_packets().expect("peer TLS");
        }
    }

    /// The TLS records a peer of the session makes of `stream`, without
    /// sending them: a first write of `first` bytes, then the rest (rustls
    /// cuts records of 16 KiB of plaintext at most from each write).
    fn encrypt<D>(tls: &mut rustls::ConnectionCommon<D>, stream: &[u8], first: usize) -> Vec<u8> {
        let mut records = Vec::new();
        let mut rest = stream;
        let mut most = first;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(std::mem::replace(&mut most, usize::MAX))];
            let n = std::io::Write::write(&mut tls.writer(), chunk).expect("peer write");
            assert!(n > 0, "rustls took nothing: the handshake is not done");
            rest = &rest[n..];
            while tls.wants_write() {
                tls.write_tls(&mut records).expect("peer write_tls");
            }
        }
        records
    }

    /// Binary frames as a client sends them (masked), carrying `payload`
    /// cut every `chunk` bytes.
    fn client_frames(payload: &[u8], chunk: usize) -> Vec<u8> {
        payload
            .chunks(chunk)
            .flat_map(|c| frame(BINARY, c, Some(KEY)))
            .collect()
    }

    /// Every frame the upstream received, whole, their payloads in order.
    fn upstream_payload(rig: &Rig) -> Vec<u8> {
        payload_of(&rig.upstream.borrow().outbox)
    }

    /// A rig whose client speaks TLS (`versions`) to the session's TLS
    /// server (with an RSA or ECDSA key), and the test's end of it.
    fn tls_rig(
        rsa: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (TlsPeer, Rig) {
        let (server, roots) = listener_tls(rsa);
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let peer = TlsPeer {
            tls: rustls::ClientConnection::new(Arc::new(config), name).expect("client"),
            side: Side::Client,
            received: Vec::new(),
        };
        let accepted = server
            .accept(Instant::now(), Kind::Main)
            .1
            .expect("server side");
        let buffer = World::new(in_an_hour()).config.buffer_size;
        let rig = Rig::with_client(in_an_hour(), |mem| {
            Conn::new(mem).into_tls(accepted, buffer)
        });
        (peer, rig)
    }

    /// A certificate for `localhost` with a `kind` key, as the files
    /// `TLS_CERT_FILE` and `TLS_KEY_FILE` would hold it, loaded by the
    /// listener's own code.
    fn listener_tls(rsa: bool) -> (Arc<crate::listener_tls::SharedTls>, rustls::RootCertStore) {
        let key = if rsa {
            rcgen::KeyPair::from_pem_and_sign_algo(
                include_str!("../tests/fixtures/rsa_private.pem"),
                &rcgen::PKCS_RSA_SHA256,
            )
        } else {
            rcgen::KeyPair::generate()
        }
        .expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("certificate");
        // One directory per call: tests run in parallel and each removes its own.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvp-session-tls-{}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key");
        let mut config = Config::local_dev("ws://127.0.0.1:9", &[b'k'; 32]).expect("config");
        config.tls_cert_file = Some(dir.join("cert.pem"));
        config.tls_key_file = Some(dir.join("key.pem"));
        let tls = crate::listener_tls::SharedTls::load(&config, Instant::now())
            .expect("loads")
            .expect("configured");
        let _ = std::fs::remove_dir_all(&dir);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        (tls, roots)
    }

    /// A TLS client that completes its handshake and closes without a
    /// request (a browser's preconnect, a load balancer's check): the FIN
    /// that TLS read ends the session at once. It is not waited for again
    /// while lingering, where no event would ever repeat it.
    #[test]
    fn a_tls_client_that_closes_without_a_request_is_done_at_once() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        peer.pump(&mut rig);
        assert!(!peer.tls.is_handshaking());
        assert!(matches!(rig.session.state, State::ReadingRequest { .. }));
        rig.client.borrow_mut().eof = true;
        rig.client_sends(&[]);
        assert!(rig.session.is_done(), "{:?}", rig.session.state);
        assert_eq!(rig.client.borrow().eof_reads, 1);
    }

    /// TLS 1.2 and 1.3, RSA and ECDSA keys, over the in-memory wire with
    /// every write taking one byte: the handshake, the upgrade, frames both
    /// ways and a clean close all go through the session's TLS, and the
    /// upstream sees exactly what the client sent in the clear.
    #[test]
    fn a_whole_session_over_tls_1_2_and_1_3_with_rsa_and_ecdsa_keys() {
        for rsa in [false, true] {
            for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
                let what = format!("rsa {rsa}, {:?}", version.version);
                let (mut peer, mut rig) = tls_rig(rsa, &[version]);
                peer.open(&mut rig, &what);
                assert_eq!(peer.tls.protocol_version(), Some(version.version), "{what}");
                assert_eq!(peer.tls.alpn_protocol(), Some(&b"http/1.1"[..]), "{what}");

                peer.send(&mut rig, &frame(BINARY, b"key event", Some(KEY)));
                rig.upstream_sends(&frame(BINARY, b"framebuffer update", None));
                peer.pump(&mut rig);
                assert_eq!(
                    frames(&rig.upstream.borrow().outbox).0,
                    vec![(BINARY, b"key event".to_vec())],
                    "{what}"
                );
                assert_eq!(
                    frames(&peer.received).0,
                    vec![(BINARY, b"framebuffer update".to_vec())],
                    "{what}"
                );
                peer.send(&mut rig, &frame(CLOSE, &1000u16.to_be_bytes(), Some(KEY)));
                rig.upstream.borrow_mut().eof = true;
                rig.upstream_sends(&frame(CLOSE, &1000u16.to_be_bytes(), None));
                peer.pump(&mut rig);
                let Some(Event::Closed { end, .. }) = rig.close() else {
                    panic!("{what}: no closing event: {:?}", rig.world.events);
                };
                assert_eq!(end, SessionEnd::Normal, "{what}");
                assert_eq!(rig.world.pool.in_use(), 0, "{what}");
            }
        }
    }

    /// A clean close over a TLS listener ends the client's TLS connection
    /// with close_notify (RFC 8446 §6.1), as every other way out does
    /// (`Conn::shutdown_write`); the fast exit after a whole close
    /// handshake skipped it (found in review).
    #[test]
    fn a_clean_close_over_tls_sends_close_notify() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        peer.open(&mut rig, "open");
        peer.send(&mut rig, &frame(CLOSE, &1000u16.to_be_bytes(), Some(KEY)));
        rig.upstream.borrow_mut().eof = true;
        rig.upstream_sends(&frame(CLOSE, &1000u16.to_be_bytes(), None));
        peer.pump(&mut rig);
        assert!(rig.session.is_done(), "{:?}", rig.session.state);
        let (got, _) = frames(&peer.received);
        assert_eq!(got.last().map(|f| f.0), Some(CLOSE));
        // After close_notify rustls' reader says Ok(0); without, WouldBlock.
        let mut b = [0u8; 16];
        let r = std::io::Read::read(&mut peer.tls.reader(), &mut b);
        assert!(matches!(r, Ok(0)), "no close_notify from the proxy: {r:?}");
    }

    /// RELAY_BUFFER_BYTES at 16 KiB (at least MAX_REQUEST_HEAD_BYTES + 1024
    /// is valid) with a TLS client: one record brings a whole frame and the
    /// first byte of the next one's header, the next record the rest. The
    /// buffer then holds only that byte, which nothing frees but reading on;
    /// waiting for a record's worth of room (all of this buffer) stalled the
    /// direction for good (found in review).
    #[test]
    fn a_frame_header_split_across_tls_records_goes_on_in_a_small_buffer() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        rig.world.config.buffer_size = 16 << 10;
        rig.world.pool = BufferPool::new(16 << 10, 4);
        peer.open(&mut rig, "open");
        rig.upstream.borrow_mut().max_write = 0;
        let first = frame(BINARY, b"first", Some(KEY));
        let second = frame(BINARY, b"second", Some(KEY));
        peer.send(&mut rig, &[&first[..], &second[..1]].concat());
        assert_eq!(
            frames(&rig.upstream.borrow().outbox).0,
            vec![(BINARY, b"first".to_vec())]
        );
        peer.send(&mut rig, &second[1..]);
        for _ in 0..10 {
            rig.event(Side::Client, true, true);
            rig.drive();
        }
        assert_eq!(
            frames(&rig.upstream.borrow().outbox).0,
            vec![(BINARY, b"first".to_vec()), (BINARY, b"second".to_vec())],
            "the second frame never reached the upstream; {} bytes unread",
            rig.client.borrow().inbox.len()
        );
    }

    /// A client that reads slowly over TLS: the records TLS holds for its
    /// full socket count as the buffer's. The session reads from the
    /// upstream no more than buffer and records together hold (one buffer),
    /// keeps the buffer, counted in the pool, until the records are on the
    /// wire, and every byte arrives in order once the client reads.
    /// (Without this each slow TLS reader held up to RELAY_BUFFER_BYTES of
    /// records beside a full buffer, outside RELAY_MEMORY_BYTES.)
    #[test]
    fn tls_records_waiting_for_a_full_socket_stay_within_the_buffer() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        peer.open(&mut rig, "open");
        let buffer = rig.world.config.buffer_size;
        // From now on the client's socket takes 16 KiB, then nothing.
        {
            let mut c = rig.client.borrow_mut();
            c.max_write = 0;
            c.room = 16 << 10;
        }
        let payload: Vec<u8> = (0..8 * buffer).map(|i| (i % 251) as u8).collect();
        let stream: Vec<u8> = payload
            .chunks(16 << 10)
            .flat_map(|c| frame(BINARY, c, None))
            .collect();
        rig.upstream_sends(&stream);
        for _ in 0..3 {
            rig.event(Side::Client, false, true);
            rig.drive();
        }
        let read = stream.len() - rig.upstream.borrow().inbox.len();
        let sent = std::mem::take(&mut rig.client.borrow_mut().outbox);
        assert_eq!(sent.len(), 16 << 10, "the client's socket is full");
        peer.decrypt(&sent);
        // Held by the session: what it read less what the client could
        // decrypt (a record cut by the full socket is on the wire, not held).
        let held = read - peer.received.len();
        let cut_record = (16 << 10) + 64;
        assert!(
            held <= buffer + cut_record,
            "read {read} bytes, the client got {}: {held} held, more than a {buffer}-byte buffer",
            peer.received.len()
        );
        assert!(held >= buffer / 2, "the buffer is used: {held} held");
        assert!(rig.session.client.has_pending_output());
        assert_eq!(
            (rig.world.pool.in_use(), rig.world.pool.bytes_in_use()),
            (1, buffer),
            "the buffer stays counted while TLS holds its records"
        );
        // The client reads: everything arrives, in order, and the buffer
        // goes back once nothing waits.
        rig.client.borrow_mut().room = usize::MAX;
        peer.pump(&mut rig);
        let (got, rest) = frames(&peer.received);
        assert_eq!(rest, 0);
        let got: Vec<u8> = got.into_iter().flat_map(|(_, p)| p).collect();
        assert!(got == payload, "bytes lost or out of order");
        assert_eq!(rig.world.pool.in_use(), 0);
    }

    /// A client streaming over TLS: rustls hands over one record (16 KiB of
    /// plaintext) a read, and the session reads on while more has come and
    /// the buffer has room for another, then writes once: four records'
    /// worth reach the upstream in two writes, not one a record (a write
    /// is a system call, and on loopback the reader's wake-up too).
    #[test]
    fn records_read_from_tls_together_go_out_in_one_write() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        peer.open(&mut rig, "open");
        assert_eq!(rig.world.config.buffer_size, 64 << 10);
        rig.upstream.borrow_mut().max_write = 0;
        let payload: Vec<u8> = (0..64 << 10).map(|i| (i % 249) as u8).collect();
        let records = peer.records(&client_frames(&payload, 4000), usize::MAX);
        assert!(record_ends(&records).len() >= 5, "at least five records");
        let before = rig.upstream.borrow().writes;
        rig.client_sends(&records);
        for _ in 0..4 {
            rig.event(Side::Client, true, true);
            rig.drive();
        }
        assert!(
            upstream_payload(&rig) == payload,
            "bytes lost or out of order"
        );
        let writes = rig.upstream.borrow().writes - before;
        assert!(writes <= 2, "{writes} writes for five records");
    }

    /// Which TLS traffic takes a bulk buffer: reads that filled the regular
    /// buffer as far as TLS reads go (all but the room a record needs) and
    /// brought more than one record. A single record does not (half a
    /// buffer did: one 9,000-byte message switched a 16 KiB buffer to
    /// 256 KiB ones, one 16 KiB frame a 32 KiB buffer); a message of
    /// 96 KiB through 64 KiB buffers does (a last read under a quarter
    /// buffer would have ended it). Seen from the buffer the next message
    /// takes, while the upstream reads nothing.
    #[test]
    fn a_tls_source_takes_a_bulk_buffer_only_after_filling_its_own() {
        for (regular, message, bulk) in [
            (16 << 10, 9_000, 0),
            (32 << 10, 16_376, 0), // one record: 16 KiB with its header
            (64 << 10, 40_000, 0),
            // Three records gathered (48 KiB), then the 48 KiB rest.
            (64 << 10, 96 << 10, 1),
        ] {
            let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
            peer.open(&mut rig, "open");
            rig.upstream.borrow_mut().max_write = 0;
            rig.world.pool = BufferPool::with_bulk(regular, 4, 256 << 10, 4);
            let payload: Vec<u8> = (0..message).map(|i| (i % 251) as u8).collect();
            let records = peer.records(&frame(BINARY, &payload, Some(KEY)), usize::MAX);
            rig.client_sends(&records);
            for _ in 0..4 {
                rig.event(Side::Client, true, true);
                rig.drive();
            }
            assert!(upstream_payload(&rig) == payload, "{message} bytes relayed");
            rig.upstream.borrow_mut().room = 0;
            peer.send(&mut rig, &frame(BINARY, b"next", Some(KEY)));
            assert_eq!(
                rig.world.pool.bulk_in_use(),
                bulk,
                "{regular}-byte buffers, a {message}-byte message"
            );
        }
    }

    /// A client sending over TLS faster than the upstream takes: the read
    /// that fills the buffer ends on a record boundary, so while reading
    /// pauses rustls keeps nothing of the stream (no plaintext that did not
    /// fit, no part of a record: it can give its record buffer back), and
    /// the rest waits in the socket. Every byte arrives once the upstream
    /// reads. (Before, a stalled TLS source kept up to 16 KiB of plaintext
    /// and a 17-20 KiB record buffer, outside RELAY_MEMORY_BYTES.)
    #[test]
    fn reading_from_tls_pauses_on_a_record_boundary() {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        peer.open(&mut rig, "open");
        let buffer = rig.world.config.buffer_size;
        {
            let mut up = rig.upstream.borrow_mut();
            up.max_write = 0;
            up.room = 0;
        }
        let payload: Vec<u8> = (0..4 * buffer).map(|i| (i % 253) as u8).collect();
        // A small first write: the records (16 KiB of plaintext each) then
        // do not end where the buffer does.
        let records = peer.records(&client_frames(&payload, 10_000), 1000);
        let mut ends = Vec::new();
        let mut at = 0;
        while at + 5 <= records.len() {
            at += 5 + usize::from(u16::from_be_bytes([records[at + 3], records[at + 4]]));
            ends.push(at);
        }
        rig.client_sends(&records);
        let taken = records.len() - rig.client.borrow().inbox.len();
        assert!(taken > buffer / 2 && taken < records.len(), "read {taken}");
        assert!(
            ends.contains(&taken),
            "reading paused {taken} bytes into the TLS stream, not at a record's end"
        );
        assert!(rig.session.client.tls_keeps_nothing_read());
        assert_eq!(rig.world.pool.in_use(), 1, "a full buffer");
        // The upstream reads: all of it arrives, in order.
        rig.upstream.borrow_mut().room = usize::MAX;
        for _ in 0..100 {
            rig.event(Side::Upstream, false, true);
            rig.drive();
        }
        assert!(rig.client.borrow().inbox.is_empty());
        assert!(
            upstream_payload(&rig) == payload,
            "bytes lost or out of order"
        );
    }

    /// The test's end of a `wss://` upstream: a rustls server on the rig's
    /// upstream wire. The session reaches it by its production path: the
    /// CA file loaded by `Credentials`, the server name from the URL, and
    /// `Conn::into_tls` in `check_dial`, as in-cluster mode reaches KubeVirt
    /// with the service-account CA.
    impl TlsUpstream {
        /// The dial completes: the TLS handshake, the session's upgrade
        /// request over it, and the 101. The client's side is the caller's.
        fn accept(&mut self, rig: &mut Rig) {
            assert!(matches!(rig.session.state, State::Dialing(_)));
            rig.event(Side::Upstream, false, true);
            rig.drive();
            self.pump(rig);
            assert!(!self.tls.is_handshaking(), "upstream handshake not done");
            let request = String::from_utf8(std::mem::take(&mut self.received)).expect("utf-8");
            assert!(
                request.starts_with(
                    "GET /apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/vm-1/vnc"
                ),
                "{request}"
            );
            self.send(rig, &switching_protocols_for(&request));
            assert!(
                matches!(&rig.session.state, State::Relaying(r) if r.upstream.is_tls()),
                "{:?}",
                rig.session.state
            );
        }
    }

    impl Rig {
        /// The session's rustls on `side` holds records its socket has not
        /// taken yet (only a writable event moves them).
        fn owes_records(&self, side: Side) -> bool {
            if side == Side::Client {
                return self.session.client.has_pending_output();
            }
            match &self.session.state {
                State::UpstreamHandshake(h) => h.upstream.has_pending_output(),
                State::Relaying(r) => r.upstream.has_pending_output(),
                State::Lingering {
                    upstream: Some(u), ..
                } => u.has_pending_output(),
                _ => false,
            }
        }
    }

    /// Make the rig's upstream `wss://localhost` before it is dialed, and
    /// return the test's end of it. The session is given only the CA (as a
    /// pod only its service account's `ca.crt`), which signed the server's
    /// certificate for `localhost`: the session's check of the chain and
    /// name is the real one.
    fn tls_upstream(rig: &mut Rig) -> TlsUpstream {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
            .expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("certificate");
        // One file per call: tests run in parallel and each removes its own.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let ca_file = std::env::temp_dir().join(format!(
            "kvp-session-upstream-ca-{}-{}.crt",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&ca_file, ca.pem()).expect("CA file");
        // A wss:// URL makes the session dial with TLS; UPSTREAM_CA_FILE
        // (by default SERVICE_ACCOUNT_DIR/ca.crt) is its only trust anchor.
        let mut config = Config::local_dev("wss://localhost:9", &[b'k'; 32]).expect("config");
        config.jwt.leeway_secs = rig.world.config.jwt.leeway_secs;
        config.ca_file = Some(ca_file.clone());
        rig.world.credentials = Credentials::load(&config, rig.world.now).expect("credentials");
        rig.world.config = config;
        let _ = std::fs::remove_file(&ca_file);
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                )
                .expect("server config");
        TlsUpstream {
            tls: rustls::ServerConnection::new(Arc::new(server)).expect("server"),
            side: Side::Upstream,
            received: Vec::new(),
        }
    }

    /// TLS on both sides, relaying, the client's 101 taken: the TLS client
    /// of `tls_rig` and the `wss://` upstream of `tls_upstream`.
    fn tls_both_ways() -> (TlsPeer, TlsUpstream, Rig) {
        let (mut peer, mut rig) = tls_rig(false, rustls::DEFAULT_VERSIONS);
        let mut upstream = tls_upstream(&mut rig);
        peer.pump(&mut rig);
        peer.send(&mut rig, UPGRADE);
        upstream.accept(&mut rig);
        peer.pump(&mut rig);
        assert!(peer.received.starts_with(b"HTTP/1.1 101 "));
        peer.received.clear();
        (peer, upstream, rig)
    }

    /// Binary frames as the upstream sends them (unmasked), carrying
    /// `payload` cut every `chunk` bytes.
    fn server_frames(payload: &[u8], chunk: usize) -> Vec<u8> {
        payload
            .chunks(chunk)
            .flat_map(|c| frame(BINARY, c, None))
            .collect()
    }

    /// The payloads of whole frames, in order.
    fn payload_of(stream: &[u8]) -> Vec<u8> {
        let (got, rest) = frames(stream);
        assert_eq!(rest, 0, "a frame cut short");
        got.into_iter().flat_map(|(_, p)| p).collect()
    }

    /// The session's handshake with a `wss://` upstream agrees on X25519:
    /// rustls sends one key share, for the first of the provider's groups,
    /// and since rustls 0.23.48 *ring*'s default list starts with P-384,
    /// which tripled the proxy's CPU per new TLS-upstream session
    /// (`crate::crypto::provider` puts X25519 first again).
    #[test]
    fn the_upstream_handshake_agrees_on_x25519() {
        let mut rig = Rig::new(in_an_hour());
        let mut upstream = tls_upstream(&mut rig);
        rig.client_sends(UPGRADE);
        upstream.accept(&mut rig);
        let group = upstream
            .tls
            .negotiated_key_exchange_group()
            .expect("a group");
        assert_eq!(group.name(), rustls::NamedGroup::X25519);
    }

    /// A `wss://` upstream streaming to a plain client: rustls hands over a
    /// record a read, and towards the plain socket the session reads on and
    /// writes once (33014bf): five records reach the client in at most two
    /// writes, every byte in order. (The mirror of
    /// `records_read_from_tls_together_go_out_in_one_write`.)
    #[test]
    fn records_read_from_a_tls_upstream_go_to_a_plain_client_together() {
        let mut rig = Rig::new(in_an_hour());
        let mut upstream = tls_upstream(&mut rig);
        rig.client_sends(UPGRADE);
        upstream.accept(&mut rig);
        assert!(!rig.session.client.is_tls());
        {
            let mut c = rig.client.borrow_mut();
            assert!(c.outbox.starts_with(b"HTTP/1.1 101 "));
            c.outbox.clear();
            c.max_write = 0;
        }
        assert_eq!(rig.world.config.buffer_size, 64 << 10);
        let payload: Vec<u8> = (0..64 << 10).map(|i| (i % 247) as u8).collect();
        let records = encrypt(
            &mut upstream.tls,
            &server_frames(&payload, 4000),
            usize::MAX,
        );
        assert!(record_ends(&records).len() >= 5, "at least five records");
        let before = rig.client.borrow().writes;
        rig.upstream_sends(&records);
        for _ in 0..4 {
            rig.event(Side::Upstream, true, true);
            rig.drive();
        }
        assert!(rig.upstream.borrow().inbox.is_empty());
        assert!(
            payload_of(&rig.client.borrow().outbox) == payload,
            "bytes lost or out of order"
        );
        let writes = rig.client.borrow().writes - before;
        assert!(writes <= 2, "{writes} writes for five records");
    }

    /// TLS on both sides, the upstream streaming: towards a TLS client the
    /// session writes each record as it comes, not gathered (33014bf:
    /// gathering cost CPU there). Seen with the client's socket full: the
    /// first record read goes to the client's TLS at once, which then holds
    /// it, so the session reads no second one (gathering would read three
    /// before writing). Once the client reads, every byte arrives in order.
    #[test]
    fn a_tls_upstream_streams_to_a_tls_client_record_by_record() {
        let (mut peer, mut upstream, mut rig) = tls_both_ways();
        {
            let mut c = rig.client.borrow_mut();
            c.max_write = 0;
            c.room = 0;
        }
        let payload: Vec<u8> = (0..64 << 10).map(|i| (i % 241) as u8).collect();
        let records = encrypt(
            &mut upstream.tls,
            &server_frames(&payload, 4000),
            usize::MAX,
        );
        let ends = record_ends(&records);
        assert!(ends.len() >= 5, "at least five records: {ends:?}");
        rig.upstream_sends(&records);
        for _ in 0..4 {
            rig.event(Side::Upstream, true, true);
            rig.drive();
        }
        let taken = records.len() - rig.upstream.borrow().inbox.len();
        assert!(rig.session.client.has_pending_output(), "a record waits");
        assert!(
            taken >= ends[0] && taken < ends[1],
            "{taken} bytes of the upstream's TLS stream read before writing \
             (records end at {ends:?}): records gathered towards TLS"
        );
        rig.client.borrow_mut().room = usize::MAX;
        peer.pump(&mut rig);
        assert!(rig.upstream.borrow().inbox.is_empty());
        assert!(
            payload_of(&peer.received) == payload,
            "bytes lost or out of order"
        );
        assert_eq!(rig.world.pool.in_use(), 0);
    }

    /// TLS on both sides: a message each way, then a close handshake begun
    /// by the client, the upstream answering with its close frame, its
    /// close_notify and its FIN. The session ends at once, cleanly, both
    /// codes 1000; the client gets close_notify, the upstream none.
    #[test]
    fn a_message_round_trip_and_a_clean_close_over_tls_on_both_sides() {
        let (mut peer, mut upstream, mut rig) = tls_both_ways();

        peer.send(&mut rig, &frame(BINARY, b"key event", Some(KEY)));
        upstream.pump(&mut rig);
        assert_eq!(
            frames(&upstream.received).0,
            vec![(BINARY, b"key event".to_vec())]
        );
        upstream.send(&mut rig, &frame(BINARY, b"framebuffer update", None));
        peer.pump(&mut rig);
        assert_eq!(
            frames(&peer.received).0,
            vec![(BINARY, b"framebuffer update".to_vec())]
        );

        let close = (CLOSE, 1000u16.to_be_bytes().to_vec());
        peer.send(&mut rig, &frame(CLOSE, &1000u16.to_be_bytes(), Some(KEY)));
        upstream.pump(&mut rig);
        assert_eq!(frames(&upstream.received).0.last(), Some(&close));
        std::io::Write::write_all(
            &mut upstream.tls.writer(),
            &frame(CLOSE, &1000u16.to_be_bytes(), None),
        )
        .expect("upstream write");
        upstream.tls.send_close_notify();
        rig.upstream.borrow_mut().eof = true;
        upstream.pump(&mut rig);
        assert!(
            rig.session.is_done(),
            "no lingering: {:?}",
            rig.session.state
        );
        // The upstream, closing, gets no close_notify (src/LIFECYCLE.md).
        let mut b = [0u8; 16];
        let r = std::io::Read::read(&mut upstream.tls.reader(), &mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        peer.pump(&mut rig);
        assert_eq!(frames(&peer.received).0.last(), Some(&close));
        let mut b = [0u8; 16];
        let r = std::io::Read::read(&mut peer.tls.reader(), &mut b);
        assert!(matches!(r, Ok(0)), "no close_notify to the client: {r:?}");
        rig.assert_closed_cleanly();
    }

    /// Every open console holds its session (in the server's slab) and its
    /// relay state (boxed) for as long as it is open, idle or not: the
    /// memory per idle session in the README is mostly these two. Frames
    /// of the proxy's own (a ping, a close) are rare and live on the heap
    /// only while one is on its way; held inline in both pipes they made
    /// this 1,736 bytes.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_idle_relaying_session_holds_no_frame_of_the_proxys_own_inline() {
        let held = std::mem::size_of::<Session<mio::net::TcpStream>>()
            + std::mem::size_of::<Relaying<mio::net::TcpStream>>();
        assert!(held <= 1_200, "an open session holds {held} bytes");
    }
}
