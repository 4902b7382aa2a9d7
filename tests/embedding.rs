//! Embedding the proxy in a host program, through the public API only: the
//! three ways to run the loop (`run` on a thread of the host's, `spawn` with a
//! handle, `poll_once` from the host's own `Poll`), a custom authorizer with
//! immediate and deferred decisions, session events, and start errors.
//!
//! Everything runs on 127.0.0.1 against the stand-in upstream; every wait is
//! bounded.

mod common;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant, SystemTime};

use kubevirt_vnc_proxy::{
    AuthRequest, Authorizer, Config, Decision, Event, Grant, Handle, JwtAuthorizer, Observer,
    Proxy, SessionEnd, StartError, Status, Ticket,
};
use mio::net::{TcpListener as MioListener, TcpStream as MioStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use common::tokens::{self, SECRET};
use common::upstream::{StandIn, wait_until};
use common::{Behaviour as B, NS, raw_request, upgrade_request, ws_connect};

/// Generous bound for anything that should take milliseconds.
const BOUND: Duration = Duration::from_secs(10);

fn config(standin: &StandIn) -> Config {
    Config::local_dev(&format!("ws://{}", standin.addr()), SECRET.as_bytes()).expect("config")
}

// ---------------------------------------------------------------------------
// A custom authorizer and an observer, as a host would write them.
// ---------------------------------------------------------------------------

/// What the authorizer saw of one request, and on which thread.
#[derive(Debug, Clone)]
struct Seen {
    peer: SocketAddr,
    path: String,
    query: Option<String>,
    thread: ThreadId,
}

/// Routes `/console/NAMESPACE/VMI` for the users in `users`, named by the
/// `X-User` header (as an authenticating reverse proxy would set it), for
/// loopback clients only. VMIs named `later…` are decided elsewhere: the
/// ticket and the grant go to `deferred` and the answer is `Pending`.
struct ConsoleAuth {
    users: Vec<&'static str>,
    deferred: Option<Sender<(Ticket, Grant)>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ConsoleAuth {
    fn new(seen: &Arc<Mutex<Vec<Seen>>>) -> Self {
        ConsoleAuth {
            users: vec!["alice"],
            deferred: None,
            seen: seen.clone(),
        }
    }

    fn deferring_to(mut self, tx: Sender<(Ticket, Grant)>) -> Self {
        self.deferred = Some(tx);
        self
    }
}

impl Authorizer for ConsoleAuth {
    fn authorize(&mut self, req: &AuthRequest<'_>, ticket: Ticket) -> Decision {
        self.seen.lock().unwrap().push(Seen {
            peer: req.peer,
            path: req.path().to_owned(),
            query: req.query().map(str::to_owned),
            thread: thread::current().id(),
        });
        if !req.peer.ip().is_loopback() {
            return Decision::deny(
                Status::Forbidden,
                format!("{} is not a local client", req.peer.ip()),
            );
        }
        let Some((namespace, vmi)) = req
            .path()
            .strip_prefix("/console/")
            .and_then(|rest| rest.split_once('/'))
        else {
            return Decision::deny(
                Status::NotFound,
                "not a console path: use /console/NAMESPACE/VMI",
            );
        };
        let user = match req.header("x-user") {
            Some(u) if self.users.contains(&u) => u,
            Some(u) => {
                return Decision::deny(
                    Status::Forbidden,
                    format!("user {u} may not open consoles"),
                );
            }
            None => return Decision::deny(Status::Forbidden, "who are you? (no X-User header)"),
        };
        let grant = Grant {
            namespace: namespace.to_owned(),
            vmi: vmi.to_owned(),
            token_id: user.to_owned(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        };
        match &self.deferred {
            Some(tx) if vmi.starts_with("later") => {
                tx.send((ticket, grant)).expect("the decider is listening");
                Decision::Pending
            }
            _ => Decision::Allow(grant),
        }
    }
}

/// Collects every event (and the thread it was delivered on).
#[derive(Clone, Default)]
struct Collector {
    events: Arc<Mutex<Vec<Event>>>,
    threads: Arc<Mutex<Vec<ThreadId>>>,
}

impl Observer for Collector {
    fn on_event(&mut self, event: &Event) {
        self.events.lock().unwrap().push(event.clone());
        self.threads.lock().unwrap().push(thread::current().id());
    }
}

impl Collector {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The first event matching `what`, waiting for it (bounded).
    fn wait_for(&self, what: impl Fn(&Event) -> bool) -> Event {
        let mut found = None;
        wait_until(BOUND, || {
            found = self.events().into_iter().find(|e| what(e));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no such event among {:#?}", self.events()))
    }
}

fn event_id(e: &Event) -> u64 {
    match e {
        Event::Opened { id, .. } | Event::Refused { id, .. } | Event::Closed { id, .. } => *id,
        // Event is non_exhaustive: a kind added later needs a line here.
        other => panic!("an event this test does not know: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Client helpers.
// ---------------------------------------------------------------------------

/// A WebSocket through the proxy, as `user` (the `X-User` header).
fn ws_as(
    addr: SocketAddr,
    path: &str,
    user: &str,
) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    request
        .headers_mut()
        .insert("X-User", user.parse().expect("header value"));
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(BOUND)).expect("timeout");
    tungstenite::client::client(request, stream)
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })
}

fn echo(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::text(text)).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text(text));
}

/// Close with 1000 and read until the closing handshake is done.
fn close_cleanly(mut ws: WebSocket<TcpStream>) {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .expect("send close");
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing handshake: {e}"),
        }
    }
}

/// Run `f` on a thread and wait for its result at most `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn is_refused(e: &Event, want: u16) -> bool {
    matches!(e, Event::Refused { status, .. } if status.code() == want)
}

// ---------------------------------------------------------------------------
// 1. Three ways to run the loop.
// ---------------------------------------------------------------------------

/// `Proxy::run` on a thread the host made, stopped by `Handle::shutdown`: the
/// loop returns, the open session is ended (and reported), the port is free.
#[test]
fn run_on_a_host_thread_until_shutdown() {
    let standin = StandIn::serving(B::Echo);
    let seen = Arc::default();
    let events = Collector::default();
    let proxy = Proxy::builder(config(&standin))
        .authorizer(ConsoleAuth::new(&seen))
        .observer(events.clone())
        .bind()
        .expect("bind");
    let addr = proxy.local_addr();
    let handle: Handle = proxy.handle();
    assert!(!proxy.is_finished());
    let (done_tx, done_rx) = mpsc::channel();
    let host = thread::spawn(move || {
        let result = proxy.run();
        let _ = done_tx.send(());
        result
    });

    let mut ws = ws_as(addr, "/console/lab-ns/echo-run", "alice").expect("session");
    echo(&mut ws, "served by run()");
    assert_eq!(handle.stats().open_sessions, 1);
    assert_eq!(
        done_rx.try_recv(),
        Err(mpsc::TryRecvError::Empty),
        "run() serves until stopped"
    );

    handle.shutdown();
    done_rx.recv_timeout(BOUND).expect("run() returns promptly");
    host.join().expect("no panic").expect("run() returns Ok");

    // The session was ended by the proxy, and the host was told.
    match ws.read() {
        Ok(Message::Close(_)) | Err(_) => {}
        Ok(other) => panic!("expected the session to end, got {other:?}"),
    }
    let closed = events.wait_for(|e| matches!(e, Event::Closed { .. }));
    let Event::Closed {
        vmi, outcome, end, ..
    } = closed
    else {
        unreachable!()
    };
    assert_eq!(vmi, "echo-run");
    assert!(outcome.contains("closed by the proxy"), "{outcome}");
    // Stopped at once by the host: a shutdown, not a failure of either side.
    assert_eq!(end, SessionEnd::Shutdown);
    assert_eq!(handle.stats().open_sessions, 0);
    // The listener went with the proxy.
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens on {addr} any more"
    );
}

/// `Proxy::spawn` → `Running`; `Handle::drain(grace)`: new sessions get 503
/// (and `/readyz` says not ready) at once, the open one is served until the
/// grace is over, then gets close 1001 `going away`; `Running::wait` returns.
#[test]
fn spawn_then_drain_and_wait() {
    let standin = StandIn::serving(B::Echo);
    let events = Collector::default();
    let mut cfg = config(&standin);
    cfg.metrics_addr = Some("127.0.0.1:0".into());
    let proxy = Proxy::builder(cfg)
        .observer(events.clone())
        .bind()
        .expect("bind");
    let metrics = proxy.metrics_addr().expect("metrics listener");
    let running = proxy.spawn().expect("spawn");
    assert_eq!(running.metrics_addr(), Some(metrics));
    let addr = running.local_addr();
    let handle = running.handle();
    let token = tokens::mint(SECRET, NS, &["echo-drain"], tokens::now() + 600);
    let path = format!("/{token}/echo-drain");

    let mut ws = ws_connect(addr, &path).expect("session");
    echo(&mut ws, "before the drain");
    assert_eq!(
        raw_request(addr, b"GET /readyz HTTP/1.1\r\n\r\n").status,
        200
    );

    // Long enough for two requests and an echo on a loaded machine.
    let grace = Duration::from_secs(3);
    let drained_at = Instant::now();
    handle.drain(grace);
    // New sessions are refused at once; the proxy says it is not ready.
    let refused = raw_request(addr, &upgrade_request(&path, ""));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("shutting down"), "{refused:?}");
    let ready = raw_request(addr, b"GET /readyz HTTP/1.1\r\n\r\n");
    assert_eq!(ready.status, 503, "{ready:?}");
    // The open session is still served.
    echo(&mut ws, "during the grace");
    assert!(drained_at.elapsed() < grace, "the test itself was too slow");

    // After the grace: close 1001 going away.
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Away);
            assert_eq!(f.reason.as_str(), "going away");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert!(
        drained_at.elapsed() >= grace,
        "closed after {:?}, before the grace of {grace:?}",
        drained_at.elapsed()
    );
    let _ = ws.flush(); // our close reply
    drop(ws);

    within(BOUND, move || running.wait()).expect("the loop ends cleanly");
    let Event::Refused { reason, .. } = events.wait_for(|e| is_refused(e, 503)) else {
        unreachable!()
    };
    assert_eq!(reason, "shutting down");
    let Event::Closed { outcome, .. } = events.wait_for(|e| matches!(e, Event::Closed { .. }))
    else {
        unreachable!()
    };
    assert!(outcome.contains("going away"), "{outcome}");
    assert_eq!(handle.stats().open_sessions, 0);
}

/// A host's authorizer that asks its own loop to drain while it decides (as
/// an admin hook might), then allows.
struct DrainsWhileDeciding {
    handle: Arc<Mutex<Option<Handle>>>,
    calls: Arc<AtomicUsize>,
}

impl Authorizer for DrainsWhileDeciding {
    fn authorize(&mut self, _: &AuthRequest<'_>, _: Ticket) -> Decision {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(h) = self.handle.lock().unwrap().as_ref() {
            h.drain(Duration::from_secs(5));
        }
        Decision::Allow(Grant {
            namespace: NS.to_owned(),
            vmi: "echo".to_owned(),
            token_id: "host".to_owned(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
    }
}

/// `Handle::drain` is seen by the next dial, not by the loop's next pass:
/// two requests read in one pass, during which the drain is asked for
/// (before the first one's decision), both get 503 and nothing goes
/// upstream. The loop took its events in before the drain, so without a
/// live check both would be dialed; so would a request a client sent after
/// `drain` returned, read by a pass that was already under way (a TLS
/// handshake finished in one pass made that visible).
#[test]
fn a_drain_asked_for_during_a_pass_stops_every_dial_after_it() {
    let standin = StandIn::serving(B::Echo);
    let slot: Arc<Mutex<Option<Handle>>> = Arc::default();
    let calls: Arc<AtomicUsize> = Arc::default();
    let mut proxy = Proxy::builder(config(&standin))
        .authorizer(DrainsWhileDeciding {
            handle: slot.clone(),
            calls: calls.clone(),
        })
        .bind()
        .expect("bind");
    *slot.lock().unwrap() = Some(proxy.handle());
    // Both requests are whole in the kernel before the loop runs: the pass
    // that accepts them is followed by one that reads both.
    let mut clients: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(proxy.local_addr()).expect("connect");
            c.write_all(&upgrade_request("/console/echo", ""))
                .expect("write request");
            c.set_nonblocking(true).expect("nonblocking");
            c
        })
        .collect();
    let mut answers = vec![Vec::new(); 2];
    let deadline = Instant::now() + BOUND;
    while !answers
        .iter()
        .all(|a| a.windows(4).any(|w| w == b"\r\n\r\n"))
    {
        assert!(
            Instant::now() < deadline,
            "no answers: {:?}",
            answers
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
        );
        proxy
            .poll_once(Some(Duration::from_millis(50)))
            .expect("poll_once");
        for (c, a) in clients.iter_mut().zip(&mut answers) {
            let mut buf = [0u8; 1024];
            match c.read(&mut buf) {
                Ok(n) => a.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    for a in &answers {
        let a = common::parse_answer(a);
        assert_eq!(a.status, 503, "{a:?}");
        assert!(a.body.contains("shutting down"), "{a:?}");
    }
    assert_eq!(standin.seen().len(), 0, "nothing dialed after the drain");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the second request is refused before the authorizer"
    );
    // The loop then takes the drain in and, with nothing open, is done.
    let deadline = Instant::now() + BOUND;
    while !proxy.is_finished() {
        assert!(Instant::now() < deadline, "the drained loop did not finish");
        proxy
            .poll_once(Some(Duration::from_millis(50)))
            .expect("poll_once");
    }
}

/// A deferred decision that allows a session after a drain began is a 503,
/// not a dial: the session would only be cut off at the grace's end, and
/// its client is better off reconnecting to a pod that stays.
#[test]
fn a_deferred_decision_after_a_drain_refuses_with_503() {
    let standin = StandIn::serving(B::Echo);
    let seen = Arc::default();
    let (ticket_tx, ticket_rx) = mpsc::channel::<(Ticket, Grant)>();
    let running = Proxy::builder(config(&standin))
        .authorizer(ConsoleAuth::new(&seen).deferring_to(ticket_tx))
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = running.local_addr();
    let handle = running.handle();
    let client = thread::spawn(move || {
        raw_request(
            addr,
            &upgrade_request("/console/lab-ns/later-echo", "X-User: alice\r\n"),
        )
    });
    let (ticket, grant) = ticket_rx.recv_timeout(BOUND).expect("the ticket");
    handle.drain(Duration::from_secs(2));
    handle.decide(ticket, Decision::Allow(grant));
    let answer = within(BOUND, move || client.join().expect("client"));
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("shutting down"), "{answer:?}");
    assert_eq!(standin.seen().len(), 0, "nothing dialed after the drain");
    within(BOUND, move || running.wait()).expect("the loop ends cleanly");
}

/// `Running::shutdown` stops at once and waits, whatever is open.
#[test]
fn running_shutdown_stops_at_once() {
    let standin = StandIn::serving(B::Echo);
    let running = Proxy::bind(config(&standin))
        .expect("bind")
        .spawn()
        .expect("spawn");
    let handle = running.handle();
    let token = tokens::mint(SECRET, NS, &["echo-stop"], tokens::now() + 600);
    let mut ws = ws_connect(running.local_addr(), &format!("/{token}/echo-stop")).expect("ws");
    echo(&mut ws, "hello");
    let started = Instant::now();
    within(BOUND, move || running.shutdown()).expect("stopped");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(handle.stats().open_sessions, 0);
    assert_eq!(handle.stats().buffers_in_use, 0);
}

/// Step by step on the test thread: `next_timeout` is `None` when nothing is
/// due, names the handshake deadline once a client connected, and
/// `poll_once` fires that deadline when it is due (408), without the loop
/// ever running on a thread of its own.
#[test]
fn poll_once_fires_due_timers_and_next_timeout_names_them() {
    let standin = StandIn::serving(B::Echo);
    let mut cfg = config(&standin);
    cfg.handshake_timeout = Duration::from_millis(300);
    let mut proxy = Proxy::bind(cfg).expect("bind");
    let handle = proxy.handle();
    assert_eq!(proxy.next_timeout(), None, "idle: no deadline");

    // A client that connects and says nothing.
    let mut client = TcpStream::connect(proxy.local_addr()).expect("connect");
    let connected = Instant::now();
    client.set_nonblocking(true).expect("nonblocking");
    proxy.poll_once(Some(BOUND)).expect("the listener is ready");
    assert_eq!(handle.stats().accepted, 1);
    let next = proxy.next_timeout().expect("the handshake deadline");
    assert!(
        !next.is_zero() && next <= Duration::from_millis(300),
        "{next:?}"
    );

    // Drive the loop with its own timeout until the client has its 408.
    let mut answer = Vec::new();
    let deadline = Instant::now() + BOUND;
    while !answer.ends_with(b"\n") || !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "no answer: {answer:?}");
        proxy.poll_once(proxy.next_timeout()).expect("poll_once");
        let mut buf = [0u8; 1024];
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(connected.elapsed() >= Duration::from_millis(300));

    // The client leaves; the session is gone a few turns later.
    drop(client);
    let deadline = Instant::now() + BOUND;
    while handle.stats().open_sessions > 0 {
        assert!(Instant::now() < deadline, "session not removed");
        proxy
            .poll_once(proxy.next_timeout().or(Some(Duration::from_millis(50))))
            .expect("poll_once");
    }
    assert!(!proxy.is_finished());
    handle.shutdown();
    assert!(proxy.is_finished(), "a host stops calling poll_once now");
}

/// An authorizer that panics on paths containing `boom` (a host's bug).
struct PanicsOnBoom(ConsoleAuth);

impl Authorizer for PanicsOnBoom {
    fn authorize(&mut self, req: &AuthRequest<'_>, ticket: Ticket) -> Decision {
        assert!(!req.path().contains("boom"), "the host's authorizer panics");
        self.0.authorize(req, ticket)
    }
}

/// A host that catches a panic from its own authorizer and goes on calling
/// `poll_once` keeps a working proxy. The panic comes while the loop drives
/// a session from a poll's events (the request arrives after the accept),
/// so the pass never finishes; the next pass must still be able to poll.
#[test]
fn a_host_that_catches_its_authorizers_panic_keeps_serving() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let standin = StandIn::serving(B::Echo);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut proxy = Proxy::builder(config(&standin))
        .authorizer(PanicsOnBoom(ConsoleAuth::new(&seen)))
        .bind()
        .expect("bind");
    let handle = proxy.handle();
    let addr = proxy.local_addr();

    let mut first = TcpStream::connect(addr).expect("connect");
    let deadline = Instant::now() + BOUND;
    while handle.stats().accepted == 0 {
        assert!(Instant::now() < deadline, "never accepted");
        proxy
            .poll_once(Some(Duration::from_millis(50)))
            .expect("poll_once");
    }
    first
        .write_all(&upgrade_request(
            "/console/lab-ns/boom",
            "X-User: alice\r\n",
        ))
        .expect("request");
    let mut panicked = false;
    while !panicked {
        assert!(Instant::now() < deadline, "the authorizer never ran");
        match catch_unwind(AssertUnwindSafe(|| {
            proxy.poll_once(Some(Duration::from_millis(50)))
        })) {
            Ok(polled) => polled.expect("poll_once"),
            Err(_) => panicked = true,
        }
    }

    // The host carries on: a console session works end to end.
    let client = thread::spawn(move || {
        let mut ws = ws_as(addr, "/console/lab-ns/after-the-panic", "alice").expect("upgrade");
        echo(&mut ws, "still here");
        close_cleanly(ws);
    });
    while !client.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the session after the panic stalled"
        );
        proxy
            .poll_once(Some(Duration::from_millis(50)))
            .expect("poll_once after the panic");
    }
    client.join().expect("the client after the panic");
    drop(first);
}

/// What the host loop did, for the assertions.
#[derive(Debug)]
struct HostReport {
    thread: ThreadId,
    proxy_wakeups: usize,
    admin_lines: usize,
}

const PROXY: Token = Token(0);
const ADMIN: Token = Token(1);

/// A host with its own mio `Poll`: its own line-based admin listener
/// (`stats`, `quit`) and the proxy's descriptor, on one thread. Every
/// wake-up gives the proxy a turn that does not wait.
fn host_loop(mut proxy: Proxy, mut admin: MioListener) -> io::Result<HostReport> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&proxy.as_raw_fd()), PROXY, Interest::READABLE)?;
    poll.registry()
        .register(&mut admin, ADMIN, Interest::READABLE)?;
    let handle = proxy.handle();
    let mut conns: HashMap<Token, (MioStream, Vec<u8>)> = HashMap::new();
    let mut next_token = 2;
    let mut events = Events::with_capacity(64);
    let mut report = HostReport {
        thread: thread::current().id(),
        proxy_wakeups: 0,
        admin_lines: 0,
    };
    let mut quit = false;
    while !quit {
        // The proxy's next deadline bounds the host's wait.
        poll.poll(&mut events, proxy.next_timeout())?;
        for event in events.iter() {
            match event.token() {
                PROXY => report.proxy_wakeups += 1,
                ADMIN => loop {
                    match admin.accept() {
                        Ok((mut s, _)) => {
                            let t = Token(next_token);
                            next_token += 1;
                            poll.registry().register(&mut s, t, Interest::READABLE)?;
                            conns.insert(t, (s, Vec::new()));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                },
                t => {
                    let Some((s, buf)) = conns.get_mut(&t) else {
                        continue;
                    };
                    let mut chunk = [0u8; 512];
                    let mut gone = false;
                    loop {
                        match s.read(&mut chunk) {
                            Ok(0) => {
                                gone = true;
                                break;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => {
                                gone = true;
                                break;
                            }
                        }
                    }
                    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=end).collect();
                        report.admin_lines += 1;
                        // Replies are a few bytes on loopback: they fit the
                        // socket buffer, so one write does it.
                        let reply = match line.trim_ascii() {
                            b"stats" => {
                                let st = handle.stats();
                                format!(
                                    "open_sessions={} accepted={} thread={:?}\n",
                                    st.open_sessions,
                                    st.accepted,
                                    thread::current().id()
                                )
                            }
                            b"quit" => {
                                quit = true;
                                "bye\n".to_owned()
                            }
                            _ => "unknown command\n".to_owned(),
                        };
                        s.write_all(reply.as_bytes())?;
                    }
                    if gone {
                        conns.remove(&t);
                    }
                }
            }
        }
        proxy.poll_once(Some(Duration::ZERO))?;
    }
    Ok(report)
}

fn admin_command(addr: SocketAddr, line: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("admin connect");
    s.set_read_timeout(Some(BOUND)).expect("timeout");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    reply
}

/// `poll_once` from a host's own `Poll` (the proxy's epoll descriptor in it
/// through `SourceFd`), the host's own listener served in the same loop, on
/// one thread: the admin port sees the session open while it relays, and the
/// authorizer, the observer and the admin handler all run on the host thread.
#[test]
fn a_host_serves_its_own_listener_and_the_proxy_in_one_poll() {
    let standin = StandIn::serving(B::Echo);
    let seen = Arc::default();
    let events = Collector::default();
    let proxy = Proxy::builder(config(&standin))
        .authorizer(ConsoleAuth::new(&seen))
        .observer(events.clone())
        .bind()
        .expect("bind");
    let proxy_addr = proxy.local_addr();
    let admin = MioListener::bind("127.0.0.1:0".parse().unwrap()).expect("admin listener");
    let admin_addr = admin.local_addr().expect("admin addr");
    let (report_tx, report_rx) = mpsc::channel();
    let host = thread::spawn(move || {
        let _ = report_tx.send(host_loop(proxy, admin));
    });

    let before = admin_command(admin_addr, "stats");
    assert!(before.starts_with("open_sessions=0 accepted=0"), "{before}");

    let mut ws = ws_as(proxy_addr, "/console/lab-ns/echo-host", "alice").expect("session");
    echo(&mut ws, "through the host's loop");
    let during = admin_command(admin_addr, "stats");
    assert!(during.starts_with("open_sessions=1 accepted=1"), "{during}");
    echo(&mut ws, "still there");
    close_cleanly(ws);
    events.wait_for(|e| matches!(e, Event::Closed { .. }));

    assert_eq!(admin_command(admin_addr, "quit"), "bye\n");
    let report = report_rx
        .recv_timeout(BOUND)
        .expect("the host loop ends")
        .expect("the host loop ran without errors");
    host.join().expect("no panic");

    assert!(report.proxy_wakeups > 0, "{report:?}");
    assert_eq!(report.admin_lines, 3, "{report:?}");
    assert!(
        during.contains(&format!("thread={:?}", report.thread)),
        "{during}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].thread, report.thread,
        "the authorizer ran on the host thread"
    );
    let threads = events.threads.lock().unwrap();
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| *t == report.thread),
        "observers ran on the host thread"
    );
}

// ---------------------------------------------------------------------------
// 2. A custom authorizer.
// ---------------------------------------------------------------------------

/// The authorizer maps `/console/NS/VMI` + `X-User: alice` to a grant, sees
/// the client's real address, path and query, and refuses everything else
/// with its own status and reason; the proxy still checks the names it is
/// given, and filters the query before it goes upstream.
#[test]
fn a_custom_authorizer_decides_from_path_headers_and_peer() {
    let standin = StandIn::serving(B::Echo);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let events = Collector::default();
    let running = Proxy::builder(config(&standin))
        .authorizer(ConsoleAuth::new(&seen))
        .observer(events.clone())
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = running.local_addr();

    // Allowed: through to lab-ns/echo-custom, query filtered on the way.
    let mut ws = ws_as(
        addr,
        "/console/lab-ns/echo-custom?preserveSession=true&debug=1",
        "alice",
    )
    .expect("alice may");
    let client_addr = ws.get_ref().local_addr().expect("local addr");
    echo(&mut ws, "hello alice");
    let up = standin.seen();
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].path,
        "/apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/echo-custom/vnc?preserveSession=true"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0].peer, client_addr,
            "the authorizer sees the real peer"
        );
        assert!(seen[0].peer.ip().is_loopback());
        assert_eq!(seen[0].path, "/console/lab-ns/echo-custom");
        assert_eq!(
            seen[0].query.as_deref(),
            Some("preserveSession=true&debug=1")
        );
    }
    let Event::Opened {
        namespace,
        vmi,
        token_id,
        peer,
        ..
    } = events.wait_for(|e| matches!(e, Event::Opened { .. }))
    else {
        unreachable!()
    };
    assert_eq!(
        (namespace.as_str(), vmi.as_str(), token_id.as_str()),
        ("lab-ns", "echo-custom", "alice")
    );
    assert_eq!(peer, client_addr);
    close_cleanly(ws);

    // Refused, with the authorizer's status and reason.
    let cases: [(&str, &str, u16, &str); 4] = [
        (
            "/console/lab-ns/echo",
            "X-User: mallory\r\n",
            403,
            "user mallory may not open consoles",
        ),
        ("/console/lab-ns/echo", "", 403, "no X-User header"),
        (
            "/somewhere/else",
            "X-User: alice\r\n",
            404,
            "not a console path",
        ),
        // The authorizer's names are checked before any URL is built.
        (
            "/console/Bad_NS/echo",
            "X-User: alice\r\n",
            403,
            "invalid namespace",
        ),
    ];
    for (path, headers, status, reason) in cases {
        let answer = raw_request(addr, &upgrade_request(path, headers));
        assert_eq!(answer.status, status, "{path} {headers:?}: {answer:?}");
        assert!(answer.body.contains(reason), "{path}: {answer:?}");
        events.wait_for(|e| {
            matches!(e, Event::Refused { status: s, reason: r, .. } if s.code() == status && r.contains(reason))
        });
    }
    assert_eq!(standin.seen().len(), 1, "no refused request went upstream");
    running.shutdown().expect("stopped");
}

/// The built-in `JwtAuthorizer` is one implementation among others: a host
/// can wrap it, adding its own rule before the token check.
#[test]
fn the_jwt_authorizer_can_be_wrapped() {
    struct OnlyLoopbackThenJwt(JwtAuthorizer);
    impl Authorizer for OnlyLoopbackThenJwt {
        fn authorize(&mut self, req: &AuthRequest<'_>, ticket: Ticket) -> Decision {
            if req.header("x-block").is_some() {
                return Decision::deny(Status::Forbidden, "blocked by the host");
            }
            self.0.authorize(req, ticket)
        }
    }
    let standin = StandIn::serving(B::Echo);
    let cfg = config(&standin);
    let jwt = JwtAuthorizer::new(&cfg).expect("keys");
    let running = Proxy::builder(cfg)
        .authorizer(OnlyLoopbackThenJwt(jwt))
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = running.local_addr();
    let token = tokens::mint(SECRET, NS, &["echo-jwt"], tokens::now() + 600);
    let path = format!("/{token}/echo-jwt");
    let mut ws = ws_connect(addr, &path).expect("a valid token passes");
    echo(&mut ws, "jwt");
    close_cleanly(ws);
    let blocked = raw_request(addr, &upgrade_request(&path, "X-Block: 1\r\n"));
    assert_eq!(blocked.status, 403, "{blocked:?}");
    assert!(blocked.body.contains("blocked by the host"));
    let forged = raw_request(addr, &upgrade_request("/not.a.token/echo-jwt", ""));
    assert_eq!(forged.status, 401, "{forged:?}");
    running.shutdown().expect("stopped");
}

/// A deferred decision: the authorizer answers `Pending` and hands the ticket
/// to another thread, which decides 300 ms later through `Handle::decide`.
/// Meanwhile a session decided at once goes through without waiting; a
/// deferred denial reaches its client; a pending session never decided gets
/// 504 after `upstream_timeout`, and a decision arriving after that is
/// ignored.
#[test]
fn deferred_decisions_do_not_stall_other_sessions() {
    let standin = StandIn::serving(B::Echo);
    let seen = Arc::default();
    let events = Collector::default();
    let mut cfg = config(&standin);
    // Long enough that B, were it stalled behind A, would take far longer than
    // its bound below, even on a loaded machine.
    cfg.upstream_timeout = Duration::from_secs(3);
    let (ticket_tx, ticket_rx) = mpsc::channel::<(Ticket, Grant)>();
    let running = Proxy::builder(cfg)
        .authorizer(ConsoleAuth::new(&seen).deferring_to(ticket_tx))
        .observer(events.clone())
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = running.local_addr();
    let handle = running.handle();

    // A: deferred, allowed 300 ms later (and not before B is through).
    let (b_done_tx, b_done_rx) = mpsc::channel::<()>();
    let (decided_tx, decided_rx) = mpsc::channel::<Ticket>();
    let decider_handle = handle.clone();
    let decider = thread::spawn(move || {
        let (ticket, grant) = ticket_rx.recv_timeout(BOUND).expect("A's ticket");
        thread::sleep(Duration::from_millis(300));
        let _ = b_done_rx.recv_timeout(BOUND);
        decider_handle.decide(ticket, Decision::Allow(grant));
        let _ = decided_tx.send(ticket);
        ticket_rx
    });
    let a_started = Instant::now();
    let a = thread::spawn(move || {
        let mut ws = ws_as(addr, "/console/lab-ns/later-echo", "alice").expect("A allowed");
        let waited = a_started.elapsed();
        echo(&mut ws, "A, decided later");
        close_cleanly(ws);
        waited
    });
    assert!(
        wait_until(BOUND, || !seen.lock().unwrap().is_empty()),
        "A reached the authorizer"
    );
    assert_eq!(handle.stats().open_sessions, 1, "A waits for its decision");

    // B: decided at once, through while A still waits.
    let b_started = Instant::now();
    let mut b = ws_as(addr, "/console/lab-ns/echo-now", "alice").expect("B allowed");
    echo(&mut b, "B, decided at once");
    let b_took = b_started.elapsed();
    assert!(!a.is_finished(), "B went through while A was still pending");
    // Had B waited behind A, it would have waited for A's 504 (the 3 s
    // upstream timeout, counted from just before `b_started`).
    assert!(b_took < Duration::from_secs(2), "B waited {b_took:?}");
    close_cleanly(b);
    b_done_tx.send(()).expect("decider waits");

    let a_waited = a.join().expect("A ran");
    assert!(
        a_waited >= Duration::from_millis(300),
        "A was let in after {a_waited:?}"
    );
    let a_ticket = decided_rx.recv_timeout(BOUND).expect("A decided");
    let ticket_rx = decider.join().expect("decider ran");
    // A's ticket names A's session, as events do.
    let Event::Opened { id, .. } =
        events.wait_for(|e| matches!(e, Event::Opened { vmi, .. } if vmi == "later-echo"))
    else {
        unreachable!()
    };
    assert_eq!(a_ticket.session_id(), id);

    // C: deferred, then denied from the other thread.
    let c = thread::spawn(move || {
        raw_request(
            addr,
            &upgrade_request("/console/lab-ns/later-deny", "X-User: alice\r\n"),
        )
    });
    let (ticket, _) = ticket_rx.recv_timeout(BOUND).expect("C's ticket");
    handle.decide(
        ticket,
        Decision::deny(Status::Forbidden, "the policy service says no"),
    );
    let answer = c.join().expect("C ran");
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.body.contains("the policy service says no"));

    // D: deferred and never decided: 504 after upstream_timeout (3 s).
    let d_started = Instant::now();
    let d = thread::spawn(move || {
        raw_request(
            addr,
            &upgrade_request("/console/lab-ns/later-never", "X-User: alice\r\n"),
        )
    });
    let (ticket, grant) = ticket_rx.recv_timeout(BOUND).expect("D's ticket");
    let answer = d.join().expect("D ran");
    let waited = d_started.elapsed();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(
        answer.body.contains("authorization did not answer in time"),
        "{answer:?}"
    );
    assert!(
        waited >= Duration::from_millis(2950) && waited < Duration::from_secs(8),
        "504 after {waited:?}"
    );
    let Event::Refused { id, .. } = events.wait_for(|e| is_refused(e, 504)) else {
        unreachable!()
    };
    assert_eq!(ticket.session_id(), id);
    // Too late: ignored, and the proxy carries on.
    handle.decide(ticket, Decision::Allow(grant));
    let mut e = ws_as(addr, "/console/lab-ns/echo-after", "alice").expect("E allowed");
    echo(&mut e, "still serving");
    close_cleanly(e);
    assert!(wait_until(BOUND, || handle.stats().open_sessions == 0));
    assert_eq!(
        standin.seen().len(),
        3,
        "A, B and E went upstream; C and D never did"
    );
    running.shutdown().expect("stopped");
}

// ---------------------------------------------------------------------------
// 3. Session events.
// ---------------------------------------------------------------------------

/// An observer sees a session open (namespace, VMI, token id), refusals with
/// their status and reason, and the close with the bytes each way as on the
/// wire, both close codes and the duration.
#[test]
fn an_observer_sees_sessions_open_refused_and_closed() {
    let standin = StandIn::serving(B::Echo);
    let events = Collector::default();
    let running = Proxy::builder(config(&standin))
        .observer(events.clone())
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = running.local_addr();
    let token = tokens::mint(SECRET, NS, &["echo-events"], tokens::now() + 600);

    // Refused: no such VMI in the token, and a token that does not verify.
    let forbidden = raw_request(addr, &upgrade_request(&format!("/{token}/other"), ""));
    assert_eq!(forbidden.status, 403);
    let bad = raw_request(addr, &upgrade_request("/x.y.z/echo-events", ""));
    assert_eq!(bad.status, 401);
    let Event::Refused { reason, detail, .. } = events.wait_for(|e| is_refused(e, 403)) else {
        unreachable!()
    };
    assert!(!reason.is_empty());
    assert_eq!(
        forbidden.body.trim(),
        reason,
        "the reason is what the client got"
    );
    assert!(
        detail.is_some_and(|d| !d.contains(&token)),
        "never the token"
    );
    events.wait_for(|e| is_refused(e, 401));

    // One session: 5 bytes of text and 300 of binary each way, close 1000.
    let mut ws = ws_connect(addr, &format!("/{token}/echo-events")).expect("session");
    let client_addr = ws.get_ref().local_addr().expect("local addr");
    echo(&mut ws, "hello");
    ws.send(Message::binary(vec![7u8; 300])).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::binary(vec![7u8; 300]));
    let Event::Opened {
        id: opened_id,
        peer,
        namespace,
        vmi,
        token_id,
        handshake,
        upstream_dial,
        ..
    } = events.wait_for(|e| matches!(e, Event::Opened { .. }))
    else {
        unreachable!()
    };
    assert_eq!(peer, client_addr);
    assert_eq!((namespace.as_str(), vmi.as_str()), (NS, "echo-events"));
    assert_eq!(token_id, "5", "the token's id claim");
    assert!(upstream_dial <= handshake);
    close_cleanly(ws);

    let Event::Closed {
        id,
        peer,
        namespace,
        vmi,
        bytes_up,
        bytes_down,
        client_close,
        upstream_close,
        duration,
        ..
    } = events.wait_for(|e| matches!(e, Event::Closed { .. }))
    else {
        unreachable!()
    };
    assert_eq!(id, opened_id);
    assert_eq!(peer, client_addr);
    assert_eq!((namespace.as_str(), vmi.as_str()), (NS, "echo-events"));
    assert_eq!(client_close, Some(1000));
    assert_eq!(upstream_close, Some(1000));
    assert!(duration > Duration::ZERO);
    // Frames as on the wire. Client frames are masked (4-byte key): text 5
    // (2+4+5), binary 300 (2+2+4+300), close 1000 (2+4+2).
    assert_eq!(bytes_up, 11 + 308 + 8);
    // Upstream frames are not: text 5 (2+5), binary 300 (2+2+300), the close
    // reply 1000 (2+2). At least that: the exact count is checked by
    // `bytes_down_counts_frames_only`, ignored until the 101 response head
    // stops being counted as relayed bytes.
    assert!(bytes_down >= 7 + 304 + 4, "{bytes_down}");

    // Opened comes before Closed, and each session has one of each.
    let all = events.events();
    let mine: Vec<&Event> = all.iter().filter(|e| event_id(e) == opened_id).collect();
    assert_eq!(mine.len(), 2, "{mine:#?}");
    assert!(matches!(mine[0], Event::Opened { .. }));
    assert!(matches!(mine[1], Event::Closed { .. }));
    running.shutdown().expect("stopped");
}

// ---------------------------------------------------------------------------
// 4. Workers: loops of one process, as the binary runs them (`WORKERS`).
// ---------------------------------------------------------------------------

/// `/metrics` sample `name` (a line `name value`) from the probe path.
fn sample(probes: SocketAddr, name: &str) -> f64 {
    let body = raw_request(probes, b"GET /metrics HTTP/1.1\r\n\r\n").body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// The binary's setup: the first loop answers signals for every worker.
/// Drained by a first signal with no session of its own, it must not return
/// while a worker still drains: a second signal, which can only come
/// through it, stops that worker's sessions at once, not at the end of the
/// grace. (The worker listens on a port of its own here, so the session is
/// on it for sure; the binary's workers share one.)
#[test]
fn a_second_signal_stops_the_workers_after_the_first_loop_drained() {
    use signal_hook::consts::SIGUSR1;
    let standin = StandIn::serving(B::Echo);
    let mut cfg = config(&standin);
    cfg.shutdown_grace = Duration::from_secs(60);
    // SIGUSR1, not SIGTERM: the handler is this test process's, and another
    // test's stray SIGTERM must not reach it (nor this test's anyone else).
    let mut first = Proxy::builder(cfg.clone())
        .stop_on_signals(&[SIGUSR1])
        .bind()
        .expect("bind");
    let worker = Proxy::bind(cfg).expect("bind worker");
    first.add_worker(worker.handle());
    let worker = worker.spawn().expect("spawn worker");
    let first = first.spawn().expect("spawn");
    let token = tokens::mint(SECRET, NS, &["echo-signals"], tokens::now() + 600);
    let mut ws = ws_connect(worker.local_addr(), &format!("/{token}/echo-signals")).expect("ws");
    echo(&mut ws, "before the signals");

    signal_hook::low_level::raise(SIGUSR1).expect("raise");
    // The worker drains (its session goes on for the grace)... The drain
    // reaches it through the first loop, a moment later: asked with an
    // upgrade before then, it would open a session that holds the request
    // open, so it is asked with /readyz until it says so.
    assert!(wait_until(BOUND, || raw_request(
        worker.local_addr(),
        b"GET /readyz HTTP/1.1\r\n\r\n"
    )
    .status
        == 503));
    let path = format!("/{token}/echo-signals");
    assert_eq!(
        raw_request(worker.local_addr(), &upgrade_request(&path, "")).status,
        503,
        "new sessions are refused while draining"
    );
    echo(&mut ws, "during the grace");
    // ...and the first loop, with nothing of its own, is done draining
    // (given time to return, which it must not).
    thread::sleep(Duration::from_millis(300));

    let second = Instant::now();
    signal_hook::low_level::raise(SIGUSR1).expect("raise");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    match ws.read() {
        Ok(Message::Close(_)) | Err(_) => {}
        other => panic!("expected the session to end, got {other:?}"),
    }
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "the session ended {:?} after the second signal",
        second.elapsed()
    );
    within(BOUND, move || worker.wait()).expect("the worker stops");
    within(BOUND, move || first.wait()).expect("the first loop stops");
}

/// Observes as a host's buggy observer would: panics on a session to a VMI
/// named `boom`.
struct PanicsOnBoomEvents;

impl Observer for PanicsOnBoomEvents {
    fn on_event(&mut self, event: &Event) {
        if let Event::Opened { vmi, .. } = event {
            assert_ne!(vmi, "boom", "the host's observer panics");
        }
    }
}

/// A worker whose thread panics is dead: the loop serving `/metrics` stops
/// counting its connections and says one worker is not alive, and
/// `/healthz` answers 503 so kubelet restarts the pod.
#[test]
fn a_worker_that_panics_shows_in_metrics_and_fails_healthz() {
    let standin = StandIn::serving(B::Echo);
    let mut cfg = config(&standin);
    cfg.metrics_addr = Some("127.0.0.1:0".into());
    let mut first = Proxy::bind(cfg).expect("bind");
    let worker = Proxy::builder(config(&standin))
        .observer(PanicsOnBoomEvents)
        .bind()
        .expect("bind worker");
    first.add_worker(worker.handle());
    let probes = first.metrics_addr().expect("probe path");
    let (worker, first) = (
        worker.spawn().expect("spawn worker"),
        first.spawn().expect("spawn"),
    );
    let token = tokens::mint(SECRET, NS, &["echo", "boom"], tokens::now() + 600);
    let mut ws = ws_connect(worker.local_addr(), &format!("/{token}/echo")).expect("ws");
    echo(&mut ws, "on the worker");
    assert!(wait_until(BOUND, || sample(
        probes,
        "kubevirt_vnc_proxy_open_sessions"
    ) == 1.0));
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_workers"), 2.0);
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_workers_alive"), 2.0);
    let health = raw_request(probes, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    // The worker's thread panics (the session may or may not see its 101).
    let _ = ws_connect(worker.local_addr(), &format!("/{token}/boom"));
    let died = within(BOUND, move || worker.wait());
    assert!(died.is_err(), "{died:?}");

    // Its session is gone with it, and so are its gauges.
    assert!(matches!(ws.read(), Err(_) | Ok(Message::Close(_))));
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_open_sessions"), 0.0);
    // The scrape's own connection is the probe port's, not counted.
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_open_connections"), 0.0);
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_workers"), 2.0);
    assert_eq!(sample(probes, "kubevirt_vnc_proxy_workers_alive"), 1.0);
    // Its counters stay as it last published them (the pass that panicked
    // published nothing): the sessions happened.
    assert_eq!(
        sample(probes, "kubevirt_vnc_proxy_handshake_seconds_count"),
        1.0
    );
    let health = raw_request(probes, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(health.status, 503, "{health:?}");
    assert!(health.body.contains("panicked"), "{health:?}");
    within(BOUND, move || first.shutdown()).expect("the first loop stops");
}

// ---------------------------------------------------------------------------
// 5. Starting: errors a host (and its operator) can act on.
// ---------------------------------------------------------------------------

#[test]
fn start_errors_are_typed_and_say_what_to_fix() {
    let standin = StandIn::serving(B::Echo);

    let summary = Proxy::check(&config(&standin)).expect("a valid configuration");
    assert!(summary.contains(&standin.addr().to_string()), "{summary}");

    let mut cfg = config(&standin);
    cfg.max_connections = 0;
    match Proxy::bind(cfg) {
        Err(StartError::Config(e)) => {
            assert_eq!(e.var, "MAX_CONNECTIONS");
            assert_eq!(
                StartError::Config(e).to_string(),
                "configuration error: MAX_CONNECTIONS: must be at least 1"
            );
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut cfg = config(&standin);
    cfg.port = taken.local_addr().unwrap().port();
    match Proxy::bind(cfg) {
        Err(e @ StartError::Bind(..)) => {
            // The message names the address and the setting to change.
            let text = e.to_string();
            assert!(text.starts_with("cannot listen on 127.0.0.1:"), "{text}");
            assert!(text.contains("HOST/PORT"), "{text}");
            let _: &dyn std::error::Error = &e;
        }
        other => panic!("expected a bind error, got {other:?}"),
    }

    // Two missing files: both named, each its own error, and the whole in
    // one line (a host logging `{e}` writes one record).
    let mut cfg = config(&standin);
    cfg.tls_cert_file = Some("/nonexistent/cert.pem".into());
    cfg.tls_key_file = Some("/nonexistent/key.pem".into());
    cfg.token_file = Some("/nonexistent/token".into());
    cfg.allow_cleartext_bearer_token = true;
    match Proxy::check(&cfg) {
        Err(e @ StartError::Several(_)) => {
            let StartError::Several(all) = &e else {
                unreachable!()
            };
            assert_eq!(all.len(), 2, "{e:?}");
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            assert!(text.starts_with("2 start-up problems: "), "{text}");
            assert!(text.contains("/nonexistent/cert.pem"), "{text}");
            assert!(text.contains("; "), "{text}");
            assert!(text.contains("/nonexistent/token"), "{text}");
        }
        other => panic!("expected both files named, got {other:?}"),
    }
}

/// `Event::Closed::bytes_down` counts frames only, not the proxy's own 101
/// response head (it once did).
#[test]
fn bytes_down_counts_frames_only() {
    let standin = StandIn::serving(B::Echo);
    let events = Collector::default();
    let running = Proxy::builder(config(&standin))
        .observer(events.clone())
        .bind()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let token = tokens::mint(SECRET, NS, &["echo-bytes"], tokens::now() + 600);
    let mut ws = ws_connect(running.local_addr(), &format!("/{token}/echo-bytes")).expect("ws");
    echo(&mut ws, "hello");
    close_cleanly(ws);
    let Event::Closed {
        bytes_up,
        bytes_down,
        ..
    } = events.wait_for(|e| matches!(e, Event::Closed { .. }))
    else {
        unreachable!()
    };
    // Client: text 5 masked (2+4+5), close 1000 masked (2+4+2).
    assert_eq!(bytes_up, 11 + 8);
    // Upstream: text 5 (2+5), close 1000 (2+2).
    assert_eq!(bytes_down, 7 + 4);
    running.shutdown().expect("stopped");
}

/// A worker stopped at once (`Handle::shutdown`) closes its sessions in its last pass;
/// those sessions happened, so the `/metrics` of the loop it is a worker of must count them.
#[test]
fn sessions_a_worker_closes_as_it_stops_reach_the_first_loops_metrics() {
    let standin = StandIn::serving(B::Echo);
    let mut cfg = config(&standin);
    cfg.metrics_addr = Some("127.0.0.1:0".into());
    let mut first = Proxy::bind(cfg).expect("bind");
    let worker = Proxy::bind(config(&standin)).expect("bind worker");
    first.add_worker(worker.handle());
    let probes = first.metrics_addr().expect("probe path");
    let (worker, first) = (
        worker.spawn().expect("spawn worker"),
        first.spawn().expect("spawn"),
    );
    let token = tokens::mint(SECRET, NS, &["echo"], tokens::now() + 600);
    let mut ws = ws_connect(worker.local_addr(), &format!("/{token}/echo")).expect("ws");
    echo(&mut ws, "on the worker");
    assert!(wait_until(BOUND, || sample(
        probes,
        "kubevirt_vnc_proxy_open_sessions"
    ) == 1.0));
    within(BOUND, move || worker.shutdown()).expect("the worker stops");
    assert!(matches!(ws.read(), Err(_) | Ok(Message::Close(_))));
    let ended = sample(
        probes,
        "kubevirt_vnc_proxy_sessions_total{outcome=\"shutdown\"}",
    );
    within(BOUND, move || first.shutdown()).expect("the first loop stops");
    assert_eq!(
        ended, 1.0,
        "the worker's last session is missing from /metrics"
    );
}

/// A host that builds its Config in code is held to what the binary is: a bearer token over a
/// ws:// upstream is refused at bind unless asked for, and then sent.
#[test]
fn a_bearer_token_over_ws_needs_the_host_to_ask_for_it() {
    let standin = StandIn::serving(B::Echo);
    let dir = common::TempDir::new("embedding-bearer");
    dir.write("token", "upstream-bearer-token\n");
    let mut c = config(&standin);
    c.token_file = Some(dir.path().join("token"));
    match Proxy::bind(c.clone()) {
        Err(StartError::Config(e)) => {
            assert_eq!(e.var, "WS_REMOTE_URL", "{e}");
            assert!(e.message.contains("unencrypted"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a bearer token over ws:// was accepted without being asked for"),
    }
    c.allow_cleartext_bearer_token = true;
    let proxy = Proxy::bind(c).expect("asked for");
    let addr = proxy.local_addr();
    let handle = proxy.handle();
    let runner = thread::spawn(move || proxy.run());
    let t = tokens::mint(SECRET, NS, &["echo"], tokens::now() + 600);
    let mut ws = ws_connect(addr, &format!("/{t}/echo")).expect("session");
    echo(&mut ws, "over ws://");
    let seen = standin.seen();
    assert_eq!(
        seen.last().and_then(|r| r.header("authorization")),
        Some("Bearer upstream-bearer-token")
    );
    drop(ws);
    handle.shutdown();
    runner.join().expect("loop thread").expect("loop");
}
