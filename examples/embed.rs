//! A host program that embeds the proxy in its own event loop: one thread,
//! one mio `Poll` holding the host's own listener (a line-based admin port)
//! and the proxy (its epoll descriptor, through `SourceFd`). Sessions are
//! authorized by a static allow-list instead of JWTs, and every session
//! event is printed. A stand-in KubeVirt upstream on loopback stands in for
//! the cluster.
//!
//! ```text
//! cargo run --example embed -- [--allow NS/VMI,...] [--exit-after SECS]
//! ```
//!
//! It prints what to try. The admin port answers `stats` (the proxy's
//! counters) and `quit` (drain, then exit). `--exit-after SECS` does the
//! same after SECS seconds; `RUST_LOG` is honoured.

#[path = "../tests/support/upstream.rs"]
mod upstream;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

use kubevirt_vnc_proxy::{
    AuthRequest, Authorizer, Config, Decision, Event, Grant, Observer, Proxy, Status, Ticket,
};
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// How long open sessions may run once the host decides to stop.
const GRACE: Duration = Duration::from_secs(1);

/// Consoles at `/console/NAMESPACE/VMI`, for the pairs on the list.
///
/// It runs on the loop, so it only looks at the request; a check that needs
/// I/O would answer `Decision::Pending` and decide later through
/// `Handle::decide` (see the crate docs).
struct AllowList(Vec<String>);

impl Authorizer for AllowList {
    fn authorize(&mut self, req: &AuthRequest<'_>, _ticket: Ticket) -> Decision {
        let Some(pair) = req.path().strip_prefix("/console/") else {
            return Decision::deny(Status::NotFound, "not found: use /console/NAMESPACE/VMI");
        };
        let Some((namespace, vmi)) = pair.split_once('/') else {
            return Decision::deny(Status::NotFound, "not found: use /console/NAMESPACE/VMI");
        };
        if !self.0.iter().any(|allowed| allowed == pair) {
            return Decision::deny(
                Status::Forbidden,
                format!("{pair} is not on the allow-list"),
            );
        }
        Decision::Allow(Grant {
            namespace: namespace.to_owned(),
            vmi: vmi.to_owned(),
            // Shown in events and the access log as the session's label.
            token_id: format!("allow-list:{}", req.peer.ip()),
            // The proxy ends the session (close 1008) when this passes.
            expires_at: SystemTime::now() + Duration::from_secs(8 * 3600),
        })
    }
}

/// Prints session events (observers run on the loop too: no blocking).
struct PrintEvents;

impl Observer for PrintEvents {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Opened {
                id, namespace, vmi, ..
            } => {
                println!("event: session {id} opened to {namespace}/{vmi}")
            }
            Event::Refused {
                id, status, reason, ..
            } => {
                println!("event: session {id} refused: {status} {reason}")
            }
            Event::Closed {
                id,
                bytes_up,
                bytes_down,
                duration,
                outcome,
                ..
            } => println!(
                "event: session {id} closed after {duration:.1?}: {bytes_up} B up, \
                 {bytes_down} B down, {outcome}"
            ),
            // Event is non_exhaustive: kinds added later are not printed.
            _ => {}
        }
    }
}

const PROXY: Token = Token(0);
const ADMIN: Token = Token(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("RUST_LOG")
        .init();
    let mut allow = vec!["lab-ns/vnc-demo".to_owned(), "lab-ns/echo".to_owned()];
    let mut exit_after = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--allow", Some(v)) => allow = v.split(',').map(str::to_owned).collect(),
            ("--exit-after", Some(v)) => exit_after = Some(Duration::from_secs(v.parse()?)),
            _ => return Err("usage: embed [--allow NS/VMI,...] [--exit-after SECS]".into()),
        }
    }

    // The default allow-list's VMIs: `vnc-demo` speaks VNC first, any other name echoes.
    let standin = upstream::StandIn::start_with(
        upstream::StandInOptions::serving(upstream::Behaviour::Echo)
            .vmi("vnc-demo", upstream::Behaviour::Vnc),
    );
    // `Config::local_dev` takes a JWT secret; with a custom authorizer it is
    // never used.
    let config = Config::local_dev(
        &format!("ws://{}", standin.addr()),
        b"unused: the allow-list decides, not JWTs",
    )?;
    let mut proxy = Proxy::builder(config)
        .authorizer(AllowList(allow.clone()))
        .observer(PrintEvents)
        .bind()?;
    let handle = proxy.handle();
    let mut admin = TcpListener::bind("127.0.0.1:0".parse()?)?;

    // The host's Poll: its own listener and the proxy's epoll descriptor,
    // which is readable whenever the proxy has work.
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&proxy.as_raw_fd()), PROXY, Interest::READABLE)?;
    poll.registry()
        .register(&mut admin, ADMIN, Interest::READABLE)?;

    let url = format!("ws://{}/console/{}", proxy.local_addr(), allow[0]);
    println!(
        "proxy listening on {} (allow-list: {})",
        proxy.local_addr(),
        allow.join(", ")
    );
    println!("URL to open with a WebSocket/noVNC client:\n  {url}");
    println!("try it:\n  cargo run --example client -- '{url}'");
    println!(
        "admin port {}: send `stats` or `quit`, e.g.",
        admin.local_addr()?
    );
    println!(
        "  exec 3<>/dev/tcp/127.0.0.1/{0}; echo stats >&3; head -n1 <&3",
        admin.local_addr()?.port()
    );

    let stop_at = exit_after.map(|d| Instant::now() + d);
    let mut draining = false;
    let mut conns: HashMap<Token, (TcpStream, Vec<u8>)> = HashMap::new();
    let mut next_token = 2;
    let mut events = Events::with_capacity(128);
    // The host's loop: wait for either side, no longer than the proxy's next
    // deadline (or the host's own), then give the proxy a turn.
    while !proxy.is_finished() {
        let now = Instant::now();
        if !draining && stop_at.is_some_and(|t| t <= now) {
            println!("--exit-after reached: draining for {GRACE:?}");
            handle.drain(GRACE);
            draining = true;
        }
        let host_deadline = stop_at
            .filter(|_| !draining)
            .map(|t| t.saturating_duration_since(now));
        let timeout = match (proxy.next_timeout(), host_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        poll.poll(&mut events, timeout)?;
        for event in events.iter() {
            match event.token() {
                PROXY => {} // handled by poll_once below
                ADMIN => loop {
                    match admin.accept() {
                        Ok((mut stream, _)) => {
                            let token = Token(next_token);
                            next_token += 1;
                            poll.registry()
                                .register(&mut stream, token, Interest::READABLE)?;
                            conns.insert(token, (stream, Vec::new()));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                },
                token => {
                    let Some((stream, buf)) = conns.get_mut(&token) else {
                        continue;
                    };
                    let open = read_available(stream, buf);
                    while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=end).collect();
                        let reply = match line.trim_ascii() {
                            b"stats" => format!("{:?}\n", handle.stats()),
                            b"quit" => {
                                handle.drain(GRACE);
                                draining = true;
                                format!("draining for {GRACE:?}, then exiting\n")
                            }
                            _ => "commands: stats, quit\n".to_owned(),
                        };
                        // A short reply to a fresh loopback connection fits
                        // the socket buffer; a real host would queue it.
                        let _ = stream.write_all(reply.as_bytes());
                    }
                    if !open {
                        conns.remove(&token);
                    }
                }
            }
        }
        // Ready events and due timers; `Some(ZERO)`: never waits.
        proxy.poll_once(Some(Duration::ZERO))?;
    }
    println!("stopped: {:?}", handle.stats());
    Ok(())
}

/// Read what is there; false once the peer closed.
fn read_available(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) if buf.len() < 4096 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return false, // a line that long is not a command
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
