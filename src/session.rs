//! One client's session, as a state machine driven by readiness events and
//! one deadline. See `LIFECYCLE.md` beside this file for the states.
//!
//! Every way a session can fail maps to exactly one client-visible outcome
//! (an HTTP status before the upgrade, a close code after it) and one log line.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, info};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::auth::Grant;
use crate::authorize::{AuthRequest, Authorizer, Decision, Ticket};
use crate::buffer::BufferPool;
use crate::config::Config;
use crate::conn::{Conn, Io, Readiness};
use crate::events::{Event, SessionEnd, namespace_field, text_value, vmi_field};
use crate::frame::Direction;
use crate::http::{self, Refusal, Status, UpstreamAnswer};
use crate::relay::{Pipe, SourceEnd};
use crate::route::{filter_query, is_dns1123_label, is_dns1123_subdomain};
use crate::upstream::Credentials;

/// Rounds of reads and writes one pipe may do per drive before yielding to
/// other sessions.
const PUMP_BUDGET: usize = 16;

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
    /// Shutting down: new sessions are refused with 503.
    pub draining: bool,
    /// Why /readyz says no (draining, credentials), if it does.
    pub not_ready: Option<String>,
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

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The main listener: WebSocket sessions, /healthz, /readyz.
    Main,
    /// `METRICS_ADDR`, the probe path outside MAX_CONNECTIONS: `GET
    /// /metrics`, `/healthz` and `/readyz`.
    Metrics,
}

/// Which socket of the session an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl Side {
    /// The index of per-side pairs (`[client, upstream]`).
    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Upstream => 1,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// What the operator learns about a refusal besides its status and reason
/// (never sent; boxed, as most sessions are never refused).
#[derive(Debug, Default)]
struct RefusalContext {
    detail: Option<String>,
    vmi: Option<String>,
    namespace: Option<String>,
}

/// The handshake in progress with the upstream.
#[derive(Debug)]
struct Handshake {
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
}

#[derive(Debug)]
enum State {
    /// Reading the client's request head.
    ReadingRequest { head: Vec<u8> },
    /// Waiting for a deferred authorization decision.
    Authorizing {
        req: Box<http::UpgradeRequest>,
        early: Vec<u8>,
    },
    /// Connecting to the upstream; `next_addr` is the address to try if this
    /// one fails.
    Dialing {
        hs: Box<Handshake>,
        next_addr: usize,
    },
    /// Sending the upgrade to the upstream and reading its answer.
    UpstreamHandshake {
        hs: Box<Handshake>,
        sent: usize,
        response: Vec<u8>,
    },
    /// Relaying frames both ways.
    Relaying { up: Box<Pipe>, down: Box<Pipe> },
    /// Writing an HTTP refusal to the client.
    Refusing { out: Vec<u8>, written: usize },
    /// Our side is shut down for writing; draining what the peers still send
    /// until they close too (so the kernel does not answer with a reset that
    /// could destroy our last words), bounded by the deadline.
    Lingering,
    /// Nothing left to do: the server drops the session.
    Done,
}

/// How a session ended, for the log line and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Handshake,
    Relayed,
}

/// One client connection and, once authorized, its upstream connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: u64,
    key: usize,
    kind: Kind,
    peer: SocketAddr,
    client: Conn,
    upstream: Option<Conn>,
    state: State,
    /// When the current state gives up.
    pub deadline: Option<Instant>,
    started: Instant,
    grant: Option<Grant>,
    /// The client's Sec-WebSocket-Key once a valid upgrade was read.
    client_key: Option<String>,
    /// When the token expires (session ends then, if configured).
    expires: Option<Instant>,
    /// When a started closing handshake is given up.
    closing_by: Option<Instant>,
    /// When keepalive next looks at the two sides.
    keepalive_at: Option<Instant>,
    /// When the proxy last pinged the client / the upstream.
    last_ping: [Option<Instant>; 2],
    /// When dialing the upstream started (for the dial latency).
    dial_started: Option<Instant>,
    /// Context for the operator about a refusal (never sent).
    refusal_context: Option<Box<RefusalContext>>,
    phase: Phase,
    /// Why the session ended (for the closing log line).
    outcome: Option<String>,
    /// How a relayed session ended, once something decided it (a timeout,
    /// the token's expiry); else read from how the pipes ended.
    end: Option<SessionEnd>,
    bytes_up: u64,
    bytes_down: u64,
    /// The proxy is shutting down and ended this session.
    going_away: bool,
    /// Close codes each side sent (1005 for a close frame without a code).
    client_close: Option<u16>,
    upstream_close: Option<u16>,
    /// Counted in the server's relaying gauge (the server keeps this).
    pub(crate) counted_relaying: bool,
}

impl Session {
    /// Which listener accepted it.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn new(
        id: u64,
        key: usize,
        kind: Kind,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
        config: &Config,
    ) -> Self {
        Session {
            id,
            key,
            kind,
            peer,
            client: Conn::new(stream),
            upstream: None,
            state: State::ReadingRequest { head: Vec::new() },
            deadline: Some(now + config.handshake_timeout),
            started: now,
            grant: None,
            client_key: None,
            expires: None,
            closing_by: None,
            keepalive_at: None,
            last_ping: [None, None],
            dial_started: None,
            refusal_context: None,
            phase: Phase::Handshake,
            outcome: None,
            end: None,
            bytes_up: 0,
            bytes_down: 0,
            going_away: false,
            client_close: None,
            upstream_close: None,
            counted_relaying: false,
        }
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(
            &mut self.client.stream,
            client_token(self.key),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// The shutdown grace is over: relaying sessions get 1001 `going away`
    /// on both sides, sessions still in the handshake a 503.
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn go_away(&mut self, ctx: &mut Ctx<'_>) -> bool {
        match &mut self.state {
            State::Relaying { up, down } => {
                down.finish_with_close(1001, "going away");
                up.finish_with_close(1001, "going away");
                self.going_away = true;
                self.closing_by = Some(ctx.now + ctx.config.close_timeout);
                self.keepalive_at = None;
                self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
            }
            State::Refusing { .. } | State::Lingering | State::Done => {}
            _ => self.refuse(
                ctx,
                Refusal::new(Status::ServiceUnavailable, "shutting down"),
            ),
        }
        self.drive(ctx)
    }

    /// True while frames are relayed.
    pub fn is_relaying(&self) -> bool {
        matches!(self.state, State::Relaying { .. })
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Refuse before reading anything (a limit was hit).
    pub fn reject(&mut self, ctx: &mut Ctx<'_>, r: Refusal) {
        self.refuse(ctx, r);
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Record readiness from an event.
    pub fn ready(&mut self, side: Side, readiness: Readiness) {
        let conn = match side {
            Side::Client => Some(&mut self.client),
            Side::Upstream => self.upstream.as_mut(),
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
        // The common case, a message to relay: no state loop when the
        // session stays in Relaying.
        if matches!(self.state, State::Relaying { .. }) {
            let more = self.relay(ctx);
            if more || matches!(self.state, State::Relaying { .. }) {
                return more;
            }
        }
        // Each transition either waits for an event or moves to a state that
        // gets its own pass; a handful of passes covers the longest chain
        // (request -> dial -> handshake -> relay).
        for _ in 0..8 {
            let before = std::mem::discriminant(&self.state);
            let more = match &mut self.state {
                State::ReadingRequest { .. } => {
                    self.read_request(ctx);
                    false
                }
                State::Authorizing { .. } => {
                    self.client_left_early(ctx);
                    false
                }
                State::Dialing { .. } => {
                    self.check_dial(ctx);
                    false
                }
                State::UpstreamHandshake { .. } => {
                    self.upstream_handshake(ctx);
                    false
                }
                State::Relaying { .. } => self.relay(ctx),
                State::Refusing { .. } => {
                    self.write_refusal(ctx);
                    false
                }
                State::Lingering => {
                    self.linger(ctx);
                    false
                }
                State::Done => return false,
            };
            if more {
                return true;
            }
            if std::mem::discriminant(&self.state) == before {
                return false;
            }
        }
        true
    }

    /// The deadline passed: give up on the current state.
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn on_deadline(&mut self, ctx: &mut Ctx<'_>) -> bool {
        self.deadline = None;
        match &mut self.state {
            State::ReadingRequest { head } => {
                if head.is_empty() {
                    debug!(
                        "session {} {}: no request within the handshake timeout",
                        self.id, self.peer
                    );
                }
                self.refuse(
                    ctx,
                    Refusal::new(
                        Status::RequestTimeout,
                        "timed out waiting for the request head",
                    ),
                );
            }
            State::Authorizing { .. } => {
                self.refuse(
                    ctx,
                    Refusal::new(
                        Status::GatewayTimeout,
                        "authorization did not answer in time",
                    ),
                );
            }
            State::Dialing { .. } | State::UpstreamHandshake { .. } => {
                let secs = ctx.config.upstream_timeout.as_secs();
                self.refuse(
                    ctx,
                    Refusal::new(
                        Status::GatewayTimeout,
                        format!("upstream did not answer within {secs} s"),
                    ),
                );
            }
            State::Relaying { up, down } => {
                let now = ctx.now;
                if self.closing_by.is_some_and(|t| t <= now) {
                    self.outcome = Some("closing handshake timed out".into());
                    self.end.get_or_insert(SessionEnd::Timeout);
                    self.finish(ctx);
                } else if self.keepalive_at.is_some_and(|t| t <= now) && self.closing_by.is_none() {
                    let ka = keepalive(ctx, up, down, &mut self.last_ping);
                    match ka {
                        Keepalive::Next(at) => self.keepalive_at = Some(at),
                        Keepalive::Gone(side) => {
                            info!(
                                "session {} {}: {side} stopped answering, closing",
                                self.id, self.peer
                            );
                            self.outcome = Some(format!("{side} timed out (no answer to pings)"));
                            self.end = Some(SessionEnd::Timeout);
                            self.keepalive_at = None;
                            self.closing_by = Some(now + ctx.config.close_timeout);
                        }
                    }
                    self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
                } else if self.expires.is_some_and(|t| t <= now) {
                    // The grant ends with the token: the page learns why
                    // (1008), the upstream gets a normal goodbye.
                    info!("session {} {}: token expired, closing", self.id, self.peer);
                    self.end = Some(SessionEnd::TokenExpired);
                    down.finish_with_close(1008, "token expired");
                    up.finish_with_close(1000, "token expired");
                    self.expires = None;
                    self.keepalive_at = None;
                    self.closing_by = Some(now + ctx.config.close_timeout);
                    self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
                }
                // Whatever fired, the next deadline is re-armed (on_deadline
                // cleared it); a keepalive check due while closing just
                // yields to the closing timer.
                if matches!(self.state, State::Relaying { .. }) {
                    self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
                }
            }
            State::Refusing { .. } => self.finish(ctx),
            State::Lingering => {
                // The peers had their chance to close; close regardless.
                self.drop_upstream(ctx);
                self.state = State::Done;
            }
            State::Done => {}
        }
        self.drive(ctx)
    }

    #[inline(never)]
    fn read_request(&mut self, ctx: &mut Ctx<'_>) {
        let State::ReadingRequest { head } = &mut self.state else {
            return;
        };
        let max = ctx.config.max_head_bytes;
        // A head is at most `max` bytes; reading stops there either way.
        if !matches!(
            gather(&mut self.client, ctx.scratch, head, max),
            Gathered::Open
        ) {
            debug!(
                "session {} {}: client left before sending a request",
                self.id, self.peer
            );
            self.outcome = Some("client left during the request".into());
            self.finish(ctx);
            return;
        }
        match http::parse_request(head, max) {
            Ok(None) => {}
            Err(_) if self.kind == Kind::Metrics => {
                self.answer(
                    ctx,
                    http::plain_response(
                        Status::NotFound,
                        "text/plain",
                        "only GET /metrics, /healthz and /readyz here\n",
                    ),
                );
            }
            Err(refusal) => self.refuse(ctx, refusal),
            Ok(Some(http::Request::Probe(p))) => self.answer_probe(ctx, p),
            Ok(Some(http::Request::Upgrade(_))) if self.kind == Kind::Metrics => {
                self.answer(
                    ctx,
                    http::plain_response(
                        Status::NotFound,
                        "text/plain",
                        "only GET /metrics, /healthz and /readyz here\n",
                    ),
                );
            }
            Ok(Some(http::Request::Upgrade(req))) => {
                let early = head[req.head_len..].to_vec();
                self.authorize(ctx, req, early);
            }
        }
    }

    fn authorize(&mut self, ctx: &mut Ctx<'_>, req: http::UpgradeRequest, early: Vec<u8>) {
        // From here on the client sent a valid upgrade: refusals may be
        // given as a close frame a web page can read (REJECT_WITH=close).
        self.client_key = Some(req.key.clone());
        let config = ctx.config;
        if ctx.draining {
            return self.refuse(
                ctx,
                Refusal::new(Status::ServiceUnavailable, "shutting down"),
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
            return self.refuse(
                ctx,
                Refusal::new(Status::Forbidden, format!("origin {what}")),
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
        self.decided(ctx, Box::new(req), early, decision);
    }

    /// A decision came (at once, or later through the handle).
    /// Returns true when work is left (see [`drive`](Self::drive)).
    pub fn decide(&mut self, ctx: &mut Ctx<'_>, decision: Decision) -> bool {
        if !matches!(self.state, State::Authorizing { .. }) {
            return false;
        }
        let State::Authorizing { req, early } =
            std::mem::replace(&mut self.state, State::Lingering)
        else {
            return false;
        };
        self.decided(ctx, req, early, decision);
        self.drive(ctx)
    }

    fn decided(
        &mut self,
        ctx: &mut Ctx<'_>,
        req: Box<http::UpgradeRequest>,
        early: Vec<u8>,
        decision: Decision,
    ) {
        let grant = match decision {
            Decision::Allow(g) => g,
            Decision::Deny {
                refusal,
                log,
                vmi,
                namespace,
            } => {
                self.refusal_context = Some(Box::new(RefusalContext {
                    detail: log,
                    vmi,
                    namespace,
                }));
                return self.refuse(ctx, refusal);
            }
            Decision::Pending => {
                // Bounded like the upstream: no decision in time is a 504.
                self.deadline = Some(ctx.now + ctx.config.upstream_timeout);
                self.state = State::Authorizing { req, early };
                return;
            }
        };
        // Whoever decided, no URL is built from a name that could change
        // its path.
        if !is_dns1123_subdomain(&grant.vmi) {
            return self.refuse_granted(
                ctx,
                &grant,
                Refusal::new(Status::Forbidden, "invalid VMI name"),
            );
        }
        if !is_dns1123_label(&grant.namespace) {
            return self.refuse_granted(
                ctx,
                &grant,
                Refusal::new(Status::Forbidden, "invalid namespace"),
            );
        }
        // Only allow-listed query parameters reach the upstream.
        let query = match req.target.split_once('?') {
            None => None,
            Some((_, q)) => match filter_query(q, &ctx.config.upstream_query_params) {
                Ok(q) => q,
                Err(e) => {
                    let r = Refusal::new(Status::BadRequest, format!("query: {e}"));
                    return self.refuse_granted(ctx, &grant, r);
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
                return self.refuse_granted(ctx, &grant, r);
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
        self.grant = Some(grant);
        let client_protocol =
            http::select_client_protocol(&req.protocols, &ctx.config.client_subprotocols)
                .map(str::to_owned);
        self.dial_started = Some(ctx.now);
        let mut req = req;
        let hs = Box::new(Handshake {
            client_key: std::mem::take(&mut req.key),
            client_protocol,
            tls: creds.tls,
            early,
            request,
            upstream_key,
        });
        self.deadline = Some(ctx.now + ctx.config.upstream_timeout);
        self.dial(ctx, hs, 0, None);
    }

    /// Start connecting to the `index`th upstream address (the host was
    /// resolved once at start; no DNS here).
    fn dial(
        &mut self,
        ctx: &mut Ctx<'_>,
        hs: Box<Handshake>,
        index: usize,
        last_error: Option<io::Error>,
    ) {
        let mut last_error = last_error;
        for (i, addr) in ctx.upstream_addrs.iter().enumerate().skip(index) {
            match TcpStream::connect(*addr) {
                Ok(mut stream) => {
                    if let Err(e) = ctx.registry.register(
                        &mut stream,
                        upstream_token(self.key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        last_error = Some(e);
                        continue;
                    }
                    self.upstream = Some(Conn::new(stream));
                    self.state = State::Dialing {
                        hs,
                        next_addr: i + 1,
                    };
                    return;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let why = last_error.map_or_else(|| "no address".to_owned(), |e| e.to_string());
        self.refuse(
            ctx,
            Refusal::new(Status::BadGateway, format!("upstream unreachable: {why}")),
        );
    }

    #[inline(never)]
    fn check_dial(&mut self, ctx: &mut Ctx<'_>) {
        if self.client_left_early(ctx) {
            return;
        }
        let Some(up) = self.upstream.as_mut() else {
            return;
        };
        if !up.writable && !up.readable && !up.error_seen {
            return;
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
        let State::Dialing { hs, next_addr } = std::mem::replace(&mut self.state, State::Lingering)
        else {
            return;
        };
        match failed {
            Some(e) => {
                self.drop_upstream(ctx);
                self.dial(ctx, hs, next_addr, Some(e));
            }
            None => {
                let _ = up.stream.set_nodelay(true);
                if let (Some(tls), Some(name)) = (&hs.tls, &ctx.credentials.server_name) {
                    match rustls::ClientConnection::new(tls.clone(), name.clone()) {
                        Ok(conn) => {
                            let Some(plain) = self.upstream.take() else {
                                return;
                            };
                            self.upstream = Some(plain.into_tls(conn, ctx.config.buffer_size));
                        }
                        Err(e) => {
                            return self.refuse(
                                ctx,
                                Refusal::new(
                                    Status::BadGateway,
                                    format!("upstream TLS setup failed: {e}"),
                                ),
                            );
                        }
                    }
                }
                self.state = State::UpstreamHandshake {
                    hs,
                    sent: 0,
                    response: Vec::new(),
                };
            }
        }
    }

    #[inline(never)]
    fn upstream_handshake(&mut self, ctx: &mut Ctx<'_>) {
        if self.client_left_early(ctx) {
            return;
        }
        let State::UpstreamHandshake { hs, sent, response } = &mut self.state else {
            return;
        };
        let Some(up) = self.upstream.as_mut() else {
            return;
        };
        let failed = |up: &Conn, e: io::Error| {
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
        if let Err(e) = up.flush() {
            let r = failed(up, e);
            return self.refuse(ctx, r);
        }
        while up.writable && *sent < hs.request.len() {
            match up.write(&hs.request[*sent..]) {
                Io::Done(n) => *sent += n,
                Io::WouldBlock | Io::Eof => break,
                Io::Failed(e) => {
                    let r = failed(up, e);
                    return self.refuse(ctx, r);
                }
            }
        }
        let max = ctx.config.max_head_bytes;
        let eof = match gather(up, ctx.scratch, response, max) {
            Gathered::Open => false,
            Gathered::Eof => true,
            Gathered::Failed(e) => {
                let r = failed(up, e);
                return self.refuse(ctx, r);
            }
        };
        if response.is_empty() && !eof {
            return;
        }
        let answer = match http::parse_upstream_response(response, &hs.upstream_key, max, eof) {
            Ok(None) => return,
            Err(r) | Ok(Some(UpstreamAnswer::Refused(r))) => return self.refuse(ctx, r),
            Ok(Some(UpstreamAnswer::Upgraded { head_len, protocol })) => (head_len, protocol),
        };
        let (head_len, protocol) = answer;
        if let Some(p) = protocol.filter(|p| !ctx.config.upstream_subprotocols.contains(p)) {
            let r = Refusal::new(
                Status::BadGateway,
                format!("upstream chose subprotocol '{p}' that was not offered"),
            );
            return self.refuse(ctx, r);
        }
        let max_frame = ctx.config.max_frame_size;
        let mut up_pipe = Box::new(Pipe::new(Direction::ClientToUpstream, max_frame, ctx.now));
        let mut down_pipe = Box::new(Pipe::new(Direction::UpstreamToClient, max_frame, ctx.now));
        let accept = http::switching_protocols(&hs.client_key, hs.client_protocol.as_deref());
        down_pipe.preload(ctx.pool, &accept, &response[head_len..]);
        up_pipe.preload(ctx.pool, &[], &hs.early);
        self.phase = Phase::Relayed;
        if ctx.config.close_on_token_expiry
            && let Some(g) = &self.grant
        {
            // exp is wall-clock time; the loop's timers are monotonic. The
            // fraction of exp counts: a token minted for 2.5 s ends at 2.5 s.
            let leeway = std::time::Duration::from_secs(ctx.config.jwt.leeway_secs);
            let left = g.expires_at.checked_add(leeway).map(|end| {
                end.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
            });
            // A grant too far in the future to represent never expires.
            self.expires = left.and_then(|left| ctx.now.checked_add(left));
        }
        if !ctx.config.ping_interval.is_zero() {
            self.keepalive_at = Some(ctx.now + ctx.config.ping_interval);
        }
        self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
        if let Some(g) = &self.grant {
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
                upstream_dial: self
                    .dial_started
                    .map_or_else(Default::default, |d| ctx.now.saturating_duration_since(d)),
            });
        }
        self.state = State::Relaying {
            up: up_pipe,
            down: down_pipe,
        };
    }

    /// Between the client's request and its 101 the client should say
    /// nothing, but it may leave: notice at once rather than at the upstream
    /// timeout. Whatever it sends meanwhile is kept (bounded) and relayed
    /// after the 101.
    #[inline(never)]
    fn client_left_early(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let early = match &mut self.state {
            State::Dialing { hs, .. } | State::UpstreamHandshake { hs, .. } => &mut hs.early,
            State::Authorizing { early, .. } => early,
            _ => return false,
        };
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
        self.outcome = Some("client left during the upstream handshake".into());
        self.drop_upstream(ctx);
        self.state = State::Done;
        true
    }

    /// Pump both directions as far as they go. While both sources deliver
    /// (every relayed message) that is all there is to do: `Some(more)`,
    /// where `more` asks for another drive soon (a budget ran out). `None`
    /// when a source has ended (or the session is not relaying): the
    /// closing rules and the end of the session need the whole [`drive`].
    ///
    /// This is the loop's path for an event on a relaying session: it needs
    /// no context, and leaves the state and the deadline as they were.
    ///
    /// [`drive`]: Self::drive
    pub fn relay_messages(&mut self, pool: &mut BufferPool, now: Instant) -> Option<bool> {
        let State::Relaying { up, down } = &mut self.state else {
            return None;
        };
        let upstream = self.upstream.as_mut()?;
        let client = &mut self.client;
        // An event concerns one socket and usually one direction: the other
        // pipe is only pumped when it has something to do.
        let a = up.pump_if_due(client, upstream, pool, PUMP_BUDGET, now);
        let b = down.pump_if_due(upstream, client, pool, PUMP_BUDGET, now);
        if let Some(e) = a.dst_failed {
            // Writing to the upstream failed: it is gone.
            debug!("session {}: upstream write failed: {e}", self.id);
            up.abort(pool);
            if down.end.is_none() {
                down.end = Some(SourceEnd::Failed(e.to_string()));
            }
        }
        if let Some(e) = b.dst_failed {
            debug!("session {}: client write failed: {e}", self.id);
            down.abort(pool);
            if up.end.is_none() {
                up.end = Some(SourceEnd::Failed(e.to_string()));
            }
        }
        if up.end.is_some() || down.end.is_some() {
            return None;
        }
        Some(up.has_pending_work(client, upstream) || down.has_pending_work(upstream, client))
    }

    /// Pump both directions and run the closing rules. Returns true when a
    /// budget ran out with work left.
    fn relay(&mut self, ctx: &mut Ctx<'_>) -> bool {
        if let Some(more) = self.relay_messages(ctx.pool, ctx.now) {
            return more;
        }
        // Each pump moves its direction as far as it can; only the closing
        // rules (a close to inject, a pipe aborted) give the pumps new work.
        for _ in 0..4 {
            let State::Relaying { up, down } = &mut self.state else {
                return false;
            };
            if !apply_closing_rules(up, down, ctx.pool) {
                break;
            }
            self.relay_messages(ctx.pool, ctx.now);
        }
        let State::Relaying { up, down } = &mut self.state else {
            return false;
        };
        let Some(upstream) = self.upstream.as_mut() else {
            return false;
        };
        let client = &mut self.client;
        // Totals and close codes are taken once, when the relay is left
        // (leave_relaying), not after every message.
        // With TLS, bytes rustls accepted must reach the wire before the
        // session may end.
        let flushed = !client.has_pending_output() && !upstream.has_pending_output();
        if up.finished() && down.finished() && flushed {
            self.outcome = Some(if self.going_away {
                "going away (shutdown)".to_owned()
            } else {
                describe_end(up, down)
            });
            self.end
                .get_or_insert_with(|| end_of(up, down, self.going_away));
            let clean = matches!(up.end, Some(SourceEnd::Close(_)))
                && matches!(down.end, Some(SourceEnd::Close(_)));
            if clean {
                self.finish_closed(ctx);
            } else {
                self.finish(ctx);
            }
            return false;
        }
        if (up.end.is_some() || down.end.is_some()) && self.closing_by.is_none() {
            self.closing_by = Some(ctx.now + ctx.config.close_timeout);
            self.keepalive_at = None;
            self.deadline = nearest(&[self.expires, self.closing_by, self.keepalive_at]);
        }
        up.has_pending_work(client, upstream) || down.has_pending_work(upstream, client)
    }

    /// Answer the client with an HTTP refusal and log it once.
    /// Health, readiness and metrics, answered without an upgrade.
    fn answer_probe(&mut self, ctx: &mut Ctx<'_>, probe: http::Probe) {
        let text = "text/plain; charset=utf-8";
        let out = match (self.kind, probe) {
            (_, http::Probe::Health) => crate::server::health_response(ctx.workers),
            (_, http::Probe::Ready) => {
                // Readiness looks at the credentials itself (rate-limited by
                // CREDENTIALS_CHECK_SECONDS), so a pod with no sessions still
                // notices a vanished token.
                let why = ctx.not_ready.clone().or_else(|| {
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
        self.answer(ctx, out);
    }

    /// Write `out` to the client, then close (no event: probes are not
    /// sessions).
    fn answer(&mut self, ctx: &mut Ctx<'_>, out: Vec<u8>) {
        self.outcome = Some("probe".into());
        self.state = State::Refusing { out, written: 0 };
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
    }

    /// The one place a refusal is decided: one event (the access log line),
    /// one answer to the client.
    fn refuse(&mut self, ctx: &mut Ctx<'_>, r: Refusal) {
        let c = self.refusal_context.take().map(|c| *c).unwrap_or_default();
        // Once granted, the names are the grant's (the upstream refused, or
        // did not answer, for that VMI).
        let (vmi, namespace) = match &self.grant {
            Some(g) => (Some(g.vmi.clone()), Some(g.namespace.clone())),
            None => (c.vmi, c.namespace),
        };
        ctx.events.push(Event::Refused {
            id: self.id,
            peer: self.peer,
            status: r.status,
            reason: r.reason.clone(),
            vmi,
            namespace,
            detail: c.detail,
        });
        self.drop_upstream(ctx);
        self.outcome = Some(format!("refused with {}", r.status));
        let close = http::refusal_close_code(r.status).filter(|_| ctx.config.reject_with_close);
        let out = match (close, &self.client_key) {
            // A browser sees every HTTP refusal as 1006; a completed upgrade
            // followed by a close frame lets the page read code and reason.
            (Some(code), Some(key)) => {
                let mut out = http::switching_protocols(key, None);
                let mut frame = [0u8; 131];
                let n = crate::frame::close_frame(code, &r.reason, None, &mut frame);
                out.extend_from_slice(&frame[..n]);
                out
            }
            _ => http::refusal_response(&r),
        };
        self.state = State::Refusing { out, written: 0 };
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
    }

    /// [`refuse`](Self::refuse) a session whose grant is not kept yet,
    /// naming the grant's VMI and namespace.
    fn refuse_granted(&mut self, ctx: &mut Ctx<'_>, grant: &Grant, r: Refusal) {
        self.refusal_context = Some(Box::new(RefusalContext {
            detail: None,
            vmi: vmi_field(&grant.vmi),
            namespace: namespace_field(&grant.namespace),
        }));
        self.refuse(ctx, r);
    }

    #[inline(never)]
    fn write_refusal(&mut self, ctx: &mut Ctx<'_>) {
        let State::Refusing { out, written } = &mut self.state else {
            return;
        };
        while self.client.writable && *written < out.len() {
            match self.client.write(&out[*written..]) {
                Io::Done(n) => *written += n,
                Io::WouldBlock | Io::Eof => return,
                Io::Failed(_) => {
                    self.state = State::Done;
                    return;
                }
            }
        }
        if *written == out.len() {
            self.finish(ctx);
        }
    }

    /// The relay is over, however it ended: keep what the pipes counted and
    /// give their buffers back (a pipe dropped with its buffer would leak
    /// the pool's count, and a bulk buffer's slot with it).
    fn leave_relaying(&mut self, ctx: &mut Ctx<'_>) {
        if let State::Relaying { up, down } = &mut self.state {
            ctx.metrics.backpressure_pauses += up.pauses + down.pauses;
            // Counted once: the state changes right after.
            up.pauses = 0;
            down.pauses = 0;
            self.bytes_up = up.bytes;
            self.bytes_down = down.bytes;
            self.client_close = close_code(up);
            self.upstream_close = close_code(down);
            self.end
                .get_or_insert_with(|| end_of(up, down, self.going_away));
            if self.outcome.is_none() {
                self.outcome = Some(if self.going_away {
                    // Cut off at the end of a drain with its close frames
                    // still on their way.
                    "going away (shutdown; closing cut short)".to_owned()
                } else {
                    format!("{} (closed by the proxy)", describe_end(up, down))
                });
            }
            up.release(ctx.pool);
            down.release(ctx.pool);
        }
    }

    /// Shut our sides down for writing and wait (bounded) for the peers to
    /// close theirs.
    fn finish(&mut self, ctx: &mut Ctx<'_>) {
        self.leave_relaying(ctx);
        self.client.shutdown_write();
        if let Some(up) = self.upstream.as_mut() {
            up.shutdown_write();
        }
        self.state = State::Lingering;
        self.client.readable = true;
        if let Some(up) = self.upstream.as_mut() {
            up.readable = true;
        }
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
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
    /// its own close frame, racing this close, may get a reset instead of a
    /// FIN (no more than it asked for: both close frames have gone by).
    fn finish_closed(&mut self, ctx: &mut Ctx<'_>) {
        self.leave_relaying(ctx);
        let client_done =
            !self.client.readable || discard_input(&mut self.client, ctx.scratch) != Input::More;
        let upstream_done = self
            .upstream
            .as_mut()
            .is_none_or(|up| up.readable && discard_input(up, ctx.scratch) == Input::Eof);
        if client_done && upstream_done {
            self.drop_upstream(ctx);
            self.state = State::Done;
            return;
        }
        self.client.shutdown_write();
        self.state = State::Lingering;
        self.client.readable = true;
        if let Some(up) = self.upstream.as_mut() {
            up.readable = true;
        }
        self.deadline = Some(ctx.now + ctx.config.close_timeout);
    }

    #[inline(never)]
    fn linger(&mut self, ctx: &mut Ctx<'_>) {
        let mut open = false;
        for conn in [Some(&mut self.client), self.upstream.as_mut()]
            .into_iter()
            .flatten()
        {
            open |= discard_input(conn, ctx.scratch) != Input::Eof;
            // Whatever is left waits for the next event (or the deadline).
            conn.readable = false;
        }
        if !open {
            self.drop_upstream(ctx);
            self.state = State::Done;
        }
    }

    /// Close the upstream socket. Closing the descriptor removes it from
    /// epoll (no other handle to it exists), so no deregister call is spent.
    fn drop_upstream(&mut self, _ctx: &mut Ctx<'_>) {
        self.upstream = None;
    }

    /// Release everything (called by the server when the session is removed).
    pub fn close(&mut self, ctx: &mut Ctx<'_>) {
        self.leave_relaying(ctx);
        // The client socket closes when the session is dropped (see
        // drop_upstream about epoll).
        self.drop_upstream(ctx);
        self.state = State::Done;
        // The session ends here: its grant and outcome move into the event.
        if self.phase == Phase::Relayed
            && let Some(g) = self.grant.take()
        {
            ctx.events.push(Event::Closed {
                id: self.id,
                peer: self.peer,
                namespace: g.namespace,
                vmi: g.vmi,
                token_id: g.token_id,
                // Left before the relay began (during the upstream's
                // handshake): no closing handshake.
                end: self.end.unwrap_or(SessionEnd::Abnormal),
                outcome: self.outcome.take().unwrap_or_else(|| "closed".into()),
                duration: ctx.now.saturating_duration_since(self.started),
                bytes_up: self.bytes_up,
                bytes_down: self.bytes_down,
                client_close: self.client_close,
                upstream_close: self.upstream_close,
            });
        }
    }
}

/// How gathering handshake bytes ended.
enum Gathered {
    /// The socket may say more (or the limit was reached).
    Open,
    Eof,
    Failed(io::Error),
}

/// Read what `conn` has (through `scratch`) onto `out`, up to `max` bytes
/// in all: request and response heads, and what a client sends before its
/// 101.
fn gather(conn: &mut Conn, scratch: &mut [u8], out: &mut Vec<u8>, max: usize) -> Gathered {
    while conn.can_read() && out.len() < max {
        let want = (max - out.len()).min(scratch.len());
        match conn.read(&mut scratch[..want]) {
            Io::Done(n) => out.extend_from_slice(&scratch[..n]),
            Io::WouldBlock => break,
            Io::Eof => return Gathered::Eof,
            Io::Failed(e) => return Gathered::Failed(e),
        }
    }
    Gathered::Open
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
fn discard_input(conn: &mut Conn, sink: &mut [u8]) -> Input {
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

/// The nearest of some optional instants.
fn nearest(times: &[Option<Instant>]) -> Option<Instant> {
    times.iter().flatten().min().copied()
}

/// What a keepalive check found.
enum Keepalive {
    /// Both sides are alive; look again then.
    Next(Instant),
    /// This side sent nothing, not even a pong, for PEER_TIMEOUT.
    Gone(Side),
}

/// Ping sides that have been silent for PING_INTERVAL (the pong comes back
/// through the other pipe and is taken out of the stream there), and give up
/// on a side silent for PEER_TIMEOUT: the other side gets close 1001.
fn keepalive(
    ctx: &mut Ctx<'_>,
    up: &mut Pipe,
    down: &mut Pipe,
    last_ping: &mut [Option<Instant>; 2],
) -> Keepalive {
    let now = ctx.now;
    let (interval, timeout) = (ctx.config.ping_interval, ctx.config.peer_timeout);
    let mut next = now + interval;
    for side in [Side::Client, Side::Upstream] {
        let (from, toward) = match side {
            Side::Client => (&mut *up, &mut *down),
            Side::Upstream => (&mut *down, &mut *up),
        };
        // A source the proxy stops reading (its destination is slow) is not
        // silent: it is waiting for us.
        if from.is_paused() {
            from.last_rx = now;
        }
        let silence = now.saturating_duration_since(from.last_rx);
        if silence >= timeout {
            ctx.metrics.keepalive_timeouts += 1;
            // The side still there is told; the silent one just loses TCP.
            match side {
                Side::Client => {
                    up.finish_with_close(1001, "client timed out");
                    down.abort(ctx.pool);
                }
                Side::Upstream => {
                    down.finish_with_close(1001, "upstream timed out");
                    up.abort(ctx.pool);
                }
            }
            return Keepalive::Gone(side);
        }
        let due = last_ping[side.index()]
            .is_none_or(|p| p < from.last_rx || now.saturating_duration_since(p) >= interval);
        if silence >= interval && due {
            let payload = ping_payload();
            if toward.queue_ping(payload) {
                from.expect_pong(payload);
                last_ping[side.index()] = Some(now);
            }
        }
        let ping_at = if silence < interval {
            from.last_rx + interval
        } else {
            last_ping[side.index()].unwrap_or(now) + interval
        };
        next = next.min(ping_at).min(from.last_rx + timeout);
    }
    Keepalive::Next(next.max(now + std::time::Duration::from_millis(10)))
}

fn ping_payload() -> [u8; crate::frame::PING_PAYLOAD_LEN] {
    let mut p = *b"kvp-ping";
    // Unpredictable payloads make a peer's own pong unlikely to match ours.
    let _ = getrandom::fill(&mut p);
    p
}

/// When one direction ends, decide what the other side is told. Returns true
/// if anything changed.
fn apply_closing_rules(up: &mut Pipe, down: &mut Pipe, pool: &mut BufferPool) -> bool {
    // While both sources deliver (every relayed message) no rule applies.
    if up.end.is_none() && down.end.is_none() {
        return false;
    }
    let before = (
        up.close_sent,
        down.close_sent,
        up.end.clone(),
        down.end.clone(),
    );
    match up.end.clone() {
        // The client's close frame goes upstream as is; its answer comes back
        // through `down` on its own.
        None | Some(SourceEnd::Close(_)) | Some(SourceEnd::Stopped) => {}
        Some(SourceEnd::Eof) | Some(SourceEnd::Failed(_)) => {
            // The client is gone: nothing more can reach it.
            down.abort(pool);
            up.finish_with_close(1001, "client went away");
        }
        Some(SourceEnd::Violation(v)) if v.in_close_frame() => {
            // A broken close frame: the client was leaving anyway; it gets
            // the code its close deserves at once, the upstream a goodbye.
            down.finish_with_close(v.close_code(), v.reason());
            up.finish_with_close(1001, "client broke the protocol");
        }
        Some(SourceEnd::Violation(v)) => {
            // As with a direct connection: the upstream is told (with the
            // violation's code), what it still sends - replies to the
            // client's valid frames - reaches the client, and the client's
            // last frame is the proxy's close with that code, in place of
            // the upstream's close answer.
            if up.finish_with_close(v.close_code(), v.reason()) {
                down.replace_close = Some((v.close_code(), v.reason()));
            }
        }
    }
    // If the upstream vanishes after a client violation, that violation is
    // still what the client is told.
    let client_fault = match up.end {
        Some(SourceEnd::Violation(v)) if !v.in_close_frame() => Some((v.close_code(), v.reason())),
        _ => None,
    };
    match down.end.clone() {
        None | Some(SourceEnd::Close(_)) | Some(SourceEnd::Stopped) => {}
        Some(SourceEnd::Eof) => {
            up.abort(pool);
            let (code, reason) = client_fault.unwrap_or((1001, "upstream closed the connection"));
            down.finish_with_close(code, reason);
        }
        Some(SourceEnd::Failed(_)) => {
            up.abort(pool);
            let (code, reason) = client_fault.unwrap_or((1011, "upstream connection failed"));
            down.finish_with_close(code, reason);
        }
        Some(SourceEnd::Violation(v)) => {
            up.finish_with_close(v.close_code(), v.reason());
            down.finish_with_close(1011, "upstream broke the protocol");
        }
    }
    before
        != (
            up.close_sent,
            down.close_sent,
            up.end.clone(),
            down.end.clone(),
        )
}

/// The close code a pipe's source sent, if it sent a close frame.
fn close_code(p: &Pipe) -> Option<u16> {
    match p.end {
        Some(SourceEnd::Close(code)) => Some(code.unwrap_or(1005)),
        _ => None,
    }
}

/// How a relay ended, from how its pipes did, when nothing decided it before.
fn end_of(up: &Pipe, down: &Pipe, going_away: bool) -> SessionEnd {
    let ends = [&up.end, &down.end];
    if going_away {
        SessionEnd::Shutdown
    } else if ends
        .iter()
        .any(|e| matches!(e, Some(SourceEnd::Violation(_))))
    {
        SessionEnd::Violation
    } else if ends.iter().all(|e| matches!(e, Some(SourceEnd::Close(_)))) {
        SessionEnd::Normal
    } else {
        SessionEnd::Abnormal
    }
}

fn describe_end(up: &Pipe, down: &Pipe) -> String {
    use std::fmt::Write;
    // Written into one string: this runs once per session.
    let side = |out: &mut String, end: &Option<SourceEnd>| {
        let _ = match end {
            Some(SourceEnd::Close(Some(code))) => write!(out, "close {code}"),
            Some(SourceEnd::Close(None)) => write!(out, "close"),
            Some(SourceEnd::Eof) => write!(out, "dropped the connection"),
            Some(SourceEnd::Failed(e)) => write!(out, "failed ({e})"),
            Some(SourceEnd::Violation(v)) => write!(out, "protocol violation ({v})"),
            Some(SourceEnd::Stopped) | None => write!(out, "stopped by the proxy"),
        };
    };
    let mut out = String::with_capacity(64);
    out.push_str("client ");
    side(&mut out, &up.end);
    out.push_str(", upstream ");
    side(&mut out, &down.end);
    out
}
