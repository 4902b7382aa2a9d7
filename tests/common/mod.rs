//! Shared harness for the integration tests: the proxy on a thread of its own
//! in front of the stand-in upstream, WebSocket and raw HTTP clients, and a
//! count of the sockets the proxy holds.
#![allow(dead_code)]

#[path = "../support/tokens.rs"]
pub mod tokens;
#[path = "../support/upstream.rs"]
pub mod upstream;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kubevirt_vnc_proxy::{Config, Handle, Proxy, Running};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

pub use tokens::SECRET;
pub use upstream::StandIn;

pub const NS: &str = "lab-ns";

/// The proxy in front of a fresh stand-in upstream.
pub struct Harness {
    pub upstream: StandIn,
    pub proxy: Option<Running>,
    pub addr: SocketAddr,
}

impl Harness {
    pub fn start() -> Harness {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Harness {
        let upstream = StandIn::start();
        let mut config = Config::local_dev(&format!("ws://{}", upstream.addr()), SECRET.as_bytes())
            .expect("config");
        adjust(&mut config);
        let proxy = Proxy::bind(config).expect("bind").spawn().expect("spawn");
        let addr = proxy.local_addr();
        Harness {
            upstream,
            proxy: Some(proxy),
            addr,
        }
    }

    pub fn handle(&self) -> Handle {
        self.proxy.as_ref().expect("running").handle()
    }

    /// A valid token for `vmis` in [`NS`].
    pub fn token(vmis: &[&str]) -> String {
        tokens::mint(SECRET, NS, vmis, tokens::now() + 600)
    }

    /// Open a WebSocket through the proxy to `vmi` with a token allowing it.
    pub fn ws(&self, vmi: &str) -> WebSocket<TcpStream> {
        self.ws_path(&format!("/{}/{vmi}", Self::token(&[vmi])))
    }

    pub fn ws_path(&self, path: &str) -> WebSocket<TcpStream> {
        ws_connect(self.addr, path).unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }

    /// Sockets the proxy holds open (client side and upstream side).
    pub fn proxy_sockets(&self) -> usize {
        proxy_sockets(self.addr.port(), self.upstream.addr().port())
    }

    /// Wait until the proxy holds no session and no socket.
    pub fn wait_idle(&self) -> bool {
        let h = self.handle();
        upstream::wait_until(Duration::from_secs(10), || {
            h.stats().open_sessions == 0 && self.proxy_sockets() == 0
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            let _ = p.shutdown();
        }
    }
}

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

pub fn ws_connect(
    addr: SocketAddr,
    path: &str,
) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let url = format!("ws://{addr}{path}");
    let (ws, _resp) =
        tungstenite::client::client_with_config(url.as_str(), stream, Some(client_config()))
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
            })?;
    Ok(ws)
}

/// Read the next data message (skipping nothing: pings are surfaced too).
pub fn next_message(ws: &mut WebSocket<TcpStream>) -> Message {
    ws.read().expect("read message")
}

/// An HTTP answer as read from a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Send raw bytes and read the answer until the proxy closes the connection.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> RawAnswer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(request).expect("write request");
    read_answer(&mut s)
}

pub fn read_answer(s: &mut TcpStream) -> RawAnswer {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read answer until close");
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    RawAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// A well-formed upgrade request for `path`, with `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// TCP sockets this process holds whose local port is `proxy_port` (the
/// proxy's accepted connections) or whose remote port is `upstream_port`
/// (the proxy's upstream connections). Matches /proc/net/tcp entries against
/// this process's own file descriptors, so sockets of other tests running in
/// parallel, and TIME_WAIT leftovers without a descriptor, are not counted.
pub fn proxy_sockets(proxy_port: u16, upstream_port: u16) -> usize {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_owned());
                }
            }
        }
    }
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let listening = f[3] == "0A";
            if (port(f[1]) == Some(proxy_port) && !listening) || port(f[2]) == Some(upstream_port) {
                count += 1;
            }
        }
    }
    count
}
