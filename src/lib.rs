//! A WebSocket proxy that lets a browser's VNC client (noVNC) reach a
//! KubeVirt virtual machine's console, guarded by JWT tokens.
//!
//! A browser opens `ws://HOST:5001/[PREFIX/]TOKEN/VMI_NAME`. The proxy
//! verifies the token before any upstream work, dials the upstream (KubeVirt's
//! VNC subresource, `kubectl proxy`, or any WebSocket server speaking the same
//! path), and relays frames both ways through fixed buffers until either side
//! closes. It is one single-threaded mio event loop, no async runtime.
//!
//! # Running the loop
//!
//! ```no_run
//! use kubevirt_vnc_proxy::{Config, Proxy};
//!
//! let config = Config::local_dev("ws://127.0.0.1:8001", b"a-secret-of-at-least-32-bytes!!!")?;
//! let proxy = Proxy::bind(config)?;
//! println!("listening on {}", proxy.local_addr());
//! let running = proxy.spawn()?;          // or proxy.run() on this thread
//! // ... later, from anywhere:
//! running.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod auth;
pub mod authorize;
pub mod buffer;
pub mod config;
mod conn;
pub mod events;
pub mod frame;
pub mod http;
pub mod metrics;
mod relay;
pub mod route;
mod server;
mod session;
pub mod token;
mod upstream;

pub use authorize::{AuthRequest, Authorizer, Decision, JwtAuthorizer, Ticket};
pub use config::{Command, Config, ConfigError};
pub use events::{Event, Observer};
pub use server::{Handle, Proxy, ProxyBuilder, Running, StartError, Stats};
