//! A WebSocket proxy that lets a browser's VNC client (noVNC) reach a
//! KubeVirt virtual machine's console, guarded by JWT tokens.
//!
//! A browser opens `ws://HOST:5001/[PREFIX/]TOKEN/VMI_NAME`. The proxy
//! verifies the token before any upstream work, dials the upstream (KubeVirt's
//! VNC subresource, `kubectl proxy`, or any WebSocket server speaking the same
//! path), and relays frames both ways through fixed buffers until either side
//! closes. It is one single-threaded mio event loop, no async runtime.
//!
//! The `kubevirt-vnc-proxy` binary is one host of this library. A program of
//! your own can host it too: build a [`Config`], [`bind`](ProxyBuilder::bind)
//! a [`Proxy`], and run its loop in one of three ways. Optionally replace the
//! JWT check with an [`Authorizer`] of your own, and watch sessions through an
//! [`Observer`].
//!
//! # Configuration
//!
//! - [`Config::local_dev`]: for use in code. The upstream at a `ws://` URL,
//!   HS256 tokens with one secret, listening on `127.0.0.1` on a free port.
//!   Adjust the public fields afterwards (`port`, timeouts, limits, …).
//! - [`Config::from_env`]: the process environment and command line. The
//!   environment variables and flags listed by [`config::help_text`].
//! - [`Config::from_sources`]: the same from explicit `(name, value)` pairs
//!   and flags, e.g. from a host's own configuration file;
//!   [`Config::from_sources_all`] reports every problem at once (what the
//!   binary does, after taking its own subcommands and `--help` off argv).
//!
//! Every problem is a [`ConfigError`] naming the variable to fix.
//! [`Proxy::check`] runs every start-up check without listening.
//! [`ProxyBuilder::bind`] (or [`Proxy::bind`]) fails with a [`StartError`]:
//! an invalid configuration, an upstream name that does not resolve (the
//! only DNS lookup; it happens at start, never per session), or a socket
//! that cannot be bound.
//!
//! ```
//! use kubevirt_vnc_proxy::{Config, Proxy, StartError};
//!
//! let mut config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! config.max_connections = 0;
//! match Proxy::bind(config) {
//!     Err(StartError::Config(e)) => assert_eq!(e.var, "MAX_CONNECTIONS"),
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Three ways to run the loop
//!
//! All three serve the same way; they differ in who owns the thread. A
//! [`Handle`] (from [`Proxy::handle`] or [`Running::handle`]) is `Clone` and
//! `Send`: from any thread it stops the loop ([`Handle::shutdown`]), drains
//! it ([`Handle::drain`]: new sessions get 503 at once, open ones run for a
//! grace period and then get close 1001 `going away`), completes deferred
//! authorizations ([`Handle::decide`]) and reads counters ([`Handle::stats`]).
//!
//! ## On the calling thread: [`Proxy::run`]
//!
//! `run` serves until the loop is stopped or drained, then returns.
//!
//! ```
//! use kubevirt_vnc_proxy::{Config, Proxy};
//!
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let proxy = Proxy::bind(config)?;
//! println!("listening on {}", proxy.local_addr());
//! let handle = proxy.handle();
//! // Stopped from another thread (a signal handler, an admin command, …).
//! std::thread::spawn(move || handle.shutdown());
//! proxy.run()?; // returns once stopped
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## On a thread of its own: [`Proxy::spawn`]
//!
//! `spawn` returns a [`Running`]: its handle, its addresses, and
//! [`Running::wait`] (or [`Running::shutdown`], which stops and waits).
//!
//! ```
//! use std::time::Duration;
//! use kubevirt_vnc_proxy::{Config, Proxy};
//!
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let running = Proxy::bind(config)?.spawn()?;
//! let handle = running.handle();
//! println!("listening on {}, {:?}", running.local_addr(), handle.stats());
//! // Graceful: refuse new sessions, give open ones 100 ms, then close them.
//! handle.drain(Duration::from_millis(100));
//! running.wait()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Step by step, from the host's loop: [`Proxy::poll_once`]
//!
//! `poll_once(timeout)` waits at most `timeout` for events, handles them and
//! every due deadline, and returns. [`Proxy::next_timeout`] says how long the
//! host may wait before the proxy's next deadline (`None`: no deadline). The
//! proxy implements [`AsRawFd`](std::os::fd::AsRawFd): its epoll descriptor
//! is readable whenever it has work, so a host with its own mio `Poll` puts it
//! there with `mio::unix::SourceFd` (mio's `os-ext` feature, enabled in the
//! host's own `Cargo.toml`) and serves its own sources and the proxy on one
//! thread. The host stops once [`Proxy::is_finished`]; to stop, it drains
//! through a handle, so every open session is closed and reported.
//!
//! ```
//! use std::os::fd::AsRawFd;
//! use std::time::Duration;
//! use kubevirt_vnc_proxy::{Config, Proxy};
//! use mio::unix::SourceFd;
//! use mio::{Events, Interest, Poll, Token};
//!
//! const PROXY: Token = Token(0);
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let mut proxy = Proxy::bind(config)?;
//! let mut poll = Poll::new()?;
//! poll.registry()
//!     .register(&mut SourceFd(&proxy.as_raw_fd()), PROXY, Interest::READABLE)?;
//! // ... the host registers its own sources under other tokens ...
//!
//! # proxy.handle().drain(Duration::ZERO); // so that this example ends
//! let mut events = Events::with_capacity(128);
//! while !proxy.is_finished() {
//!     // Wait for anything, no longer than the proxy's next deadline.
//!     poll.poll(&mut events, proxy.next_timeout())?;
//!     for event in events.iter() {
//!         if event.token() != PROXY {
//!             // ... the host's own work ...
//!         }
//!     }
//!     // Then give the proxy a turn that does not wait.
//!     proxy.poll_once(Some(Duration::ZERO))?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A host without a `Poll` of its own can also alternate: `poll_once` with
//! the sooner of [`Proxy::next_timeout`] and its own next deadline (mind that
//! `None` means "no deadline", which `Option::min` would pick), then its own
//! work. `examples/embed.rs` is a complete host: its own admin listener and
//! the proxy in one `Poll`, with a custom authorizer.
//!
//! # Authorization
//!
//! Once per session, after the upgrade request was read and the Origin
//! checked, the proxy asks an [`Authorizer`]: from the request ([`AuthRequest`]:
//! target, headers, subprotocols, the client's address) it returns a
//! [`Decision`]. [`Decision::Allow`] with a [`Grant`] names the
//! namespace and VMI the session may reach (the proxy still checks both
//! names against the Kubernetes naming rules before building any URL), and
//! when the grant expires (the session then ends with close 1008 once
//! `jwt.leeway_secs` (`JWT_LEEWAY_SECONDS`) more have passed, whichever
//! authorizer made the grant, unless `close_on_token_expiry` is off); [`Decision::deny`] refuses with a status
//! ([`Status`]) and a reason sent to the client.
//! The built-in [`JwtAuthorizer`], used unless [`ProxyBuilder::authorizer`]
//! names another, verifies LabOrchestrator's JWTs; a custom authorizer may
//! wrap it.
//!
//! An authorizer runs on the loop: it must return quickly and never block.
//! One that needs I/O answers [`Decision::Pending`], hands the [`Ticket`] to a
//! thread of its own, and that thread completes it with [`Handle::decide`].
//! Other sessions are served meanwhile; a session with no decision within
//! `upstream_timeout` (`UPSTREAM_TIMEOUT_SECONDS`) gets 504, and a decision
//! for a session that is gone is ignored.
//!
//! ```
//! use std::sync::mpsc::{self, Sender};
//! use kubevirt_vnc_proxy::{AuthRequest, Authorizer, Config, Decision, Grant, Proxy, Status, Ticket};
//!
//! /// `/console/NAMESPACE/VMI` for requests that carry an `X-User` header
//! /// (set by an authenticating reverse proxy); the policy service decides.
//! struct Console(Sender<(Ticket, Grant, String)>);
//!
//! impl Authorizer for Console {
//!     fn authorize(&mut self, req: &AuthRequest<'_>, ticket: Ticket) -> Decision {
//!         let Some((namespace, vmi)) =
//!             req.path().strip_prefix("/console/").and_then(|p| p.split_once('/'))
//!         else {
//!             return Decision::deny(Status::NotFound, "use /console/NAMESPACE/VMI");
//!         };
//!         let Some(user) = req.header("x-user") else {
//!             return Decision::deny(Status::Forbidden, "not signed in");
//!         };
//!         let grant = Grant {
//!             namespace: namespace.into(),
//!             vmi: vmi.into(),
//!             token_id: user.into(), // the session's label in events and logs
//!             expires_at: std::time::SystemTime::now() + std::time::Duration::from_secs(8 * 3600),
//!         };
//!         // Asking the policy service is I/O: not on the loop.
//!         match self.0.send((ticket, grant, user.to_owned())) {
//!             Ok(()) => Decision::Pending,
//!             Err(_) => Decision::deny(Status::ServiceUnavailable, "policy service unavailable"),
//!         }
//!     }
//! }
//!
//! let (tx, rx) = mpsc::channel();
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let proxy = Proxy::builder(config).authorizer(Console(tx)).bind()?;
//! let handle = proxy.handle();
//! std::thread::spawn(move || {
//!     for (ticket, grant, user) in rx {
//!         let allowed = user == "alice"; // ... ask the policy service ...
//!         let decision = if allowed {
//!             Decision::Allow(grant)
//!         } else {
//!             Decision::deny(Status::Forbidden, format!("{user} may not open this console"))
//!         };
//!         handle.decide(ticket, decision);
//!     }
//! });
//! let running = proxy.spawn()?;
//! // ...
//! running.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Session events
//!
//! Every [`Observer`] added with [`ProxyBuilder::observer`] sees each
//! [`Event`]: a session [opened](Event::Opened) (namespace, VMI, label,
//! handshake times), [refused](Event::Refused) (status, the reason the client
//! got, operator-only detail), and [closed](Event::Closed) (bytes each way,
//! both close codes, duration, outcome). Observers run on the loop too, after
//! each pass: they must not block. The access log is the built-in observer
//! [`events::AccessLog`], always present.
//!
//! ```
//! use std::sync::mpsc::{self, Sender};
//! use kubevirt_vnc_proxy::{Config, Event, Observer, Proxy};
//!
//! /// Hands events to a thread that may block (a database, a billing API).
//! struct Forward(Sender<Event>);
//!
//! impl Observer for Forward {
//!     fn on_event(&mut self, event: &Event) {
//!         let _ = self.0.send(event.clone());
//!     }
//! }
//!
//! let (tx, rx) = mpsc::channel();
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let running = Proxy::builder(config).observer(Forward(tx)).bind()?.spawn()?;
//! std::thread::spawn(move || {
//!     for event in rx {
//!         if let Event::Closed { vmi, bytes_down, duration, .. } = event {
//!             println!("{vmi}: {bytes_down} bytes in {duration:?}");
//!         }
//!     }
//! });
//! running.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

// The embedding API is what the crate root re-exports, plus `config` and
// `events` for the binary's own needs (`--help`, JSON log lines). Everything
// else is the proxy's inside: crate-private, so it can change without a
// semver promise. The parsers are reachable for fuzz/ and the corpus replay
// only through the hidden `fuzzing` module below.
mod auth;
mod authorize;
mod buffer;
pub mod config;
mod conn;
mod crypto;
pub mod events;
mod frame;
mod http;
mod listener_tls;
mod metrics;
mod pipe;
mod relay;
mod route;
mod server;
mod session;
mod tls_records;
mod token;
mod upstream;
mod x509;

pub use auth::{Grant, JwtSettings, KeyMaterial};
pub use authorize::{AuthRequest, Authorizer, Decision, JwtAuthorizer, Ticket};
pub use config::{Config, ConfigError};
pub use events::{Event, Observer, SessionEnd};
pub use http::{Headers, Refusal, Status};
pub use server::{Handle, Proxy, ProxyBuilder, Running, SHUTDOWN_CLOSE_TIME, StartError, Stats};
pub use token::TokenSource;

/// The parsers the proxy runs on bytes from the network and from tokens,
/// for the fuzz targets (`fuzz/`) and the corpus replay
/// (`tests/fuzz_corpus.rs`). Not part of the API: hidden, behind the
/// `fuzzing` feature, and free to change with the code it exposes.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    // Each module's public items, under the module's own name, so the
    // checks read `http::parse_request` as the proxy's code does.
    pub mod auth {
        pub use crate::auth::*;
    }
    pub mod frame {
        pub use crate::frame::*;
    }
    pub mod http {
        pub use crate::http::*;
    }
    pub mod route {
        pub use crate::route::*;
    }
    pub mod token {
        pub use crate::token::*;
    }

    /// A ticket for calling an [`Authorizer`](crate::Authorizer) outside a
    /// session, as the session does with its own key and id.
    pub fn ticket(id: u64) -> crate::Ticket {
        crate::Ticket { key: 0, id }
    }

    /// What the session hands its authorizer for a parsed upgrade request
    /// (`AuthRequest` is `non_exhaustive`: hosts never build one).
    pub fn auth_request(
        req: &crate::http::UpgradeRequest,
        peer: std::net::SocketAddr,
    ) -> crate::AuthRequest<'_> {
        crate::AuthRequest {
            target: &req.target,
            headers: &req.headers,
            protocols: &req.protocols,
            peer,
        }
    }
}
