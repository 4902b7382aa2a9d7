//! Our proxy as a child process.

use std::net::SocketAddr;

use crate::process::{free_port, wait_listening};
use crate::support::proxy::ProxyChild;
use crate::{Res, proxy_bin};

/// The proxy binary as a child process; killed by PID when dropped.
pub(crate) struct ProxyProcess {
    pub(crate) child: ProxyChild,
    pub(crate) addr: SocketAddr,
}

impl ProxyProcess {
    /// Starts the proxy with `env` (plus HOST, PORT, LOGLEVEL) on a free port; retries with
    /// another port if it cannot bind (the port was taken between probe and start).
    pub(crate) fn start(env: &[(String, String)], loglevel: &str) -> Res<ProxyProcess> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut env = env.to_vec();
            env.extend(
                [
                    ("HOST", "127.0.0.1".to_string()),
                    ("PORT", port.to_string()),
                    ("LOGLEVEL", loglevel.to_string()),
                ]
                .map(|(k, v)| (k.to_string(), v)),
            );
            // Echo the proxy's log (warnings and errors at the default level).
            let child = ProxyChild::spawn(&proxy_bin(), &env, |line| eprintln!("proxy: {line}"))?;
            let mut proxy = ProxyProcess {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let addr = proxy.addr;
            match wait_listening(addr, || proxy.check_alive()) {
                Ok(()) => return Ok(proxy),
                Err(e) => last = e,
            }
        }
        Err(format!("the proxy did not start: {last}"))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub(crate) fn check_alive(&mut self) -> Res<()> {
        self.child.check_alive()
    }
}
