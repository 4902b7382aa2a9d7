//! The proxy binary as a child process of a bench: started with a clean environment, its
//! stderr read line by line on a thread of its own, killed and reaped when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;

type Res<T> = Result<T, String>;

/// The proxy binary Cargo built for this bench (`target/release/...` under `cargo bench`).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");

/// The log line that says where the proxy listens.
pub const LISTENING: &str = "listening on ";

/// The address after `mark` in a log line (`"listening on "`, or the probe path's line).
pub fn announced_addr(line: &str, mark: &str) -> Option<SocketAddr> {
    line.split_once(mark)
        .and_then(|(_, a)| a.trim().parse::<SocketAddr>().ok())
}

/// The environment of a proxy in local dev mode in front of `upstream` on 127.0.0.1, signing
/// tokens with `secret` (PORT, LOGLEVEL and the rest are the caller's).
pub fn local_dev_env(secret: &str, upstream: SocketAddr) -> Vec<(String, String)> {
    [
        ("SECRET_KEY", secret.to_string()),
        ("LOCAL_DEV_MODE", "true".to_string()),
        ("WS_REMOTE_URL", format!("ws://{upstream}")),
        ("HOST", "127.0.0.1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A started proxy; killed (SIGKILL to its PID) and reaped when dropped, on every path.
pub struct ProxyChild {
    child: Child,
}

impl ProxyChild {
    /// Starts `bin` with `env` alone (a clean environment: an inherited RUST_LOG or
    /// KUBERNETES_* must not change it), stdin and stdout closed, and hands each line of its
    /// stderr to `on_line` on a thread named `proxy-stderr`, which also keeps the pipe drained
    /// so the proxy never blocks on it.
    pub fn spawn(
        bin: &Path,
        env: &[(String, String)],
        mut on_line: impl FnMut(String) + Send + 'static,
    ) -> Res<ProxyChild> {
        let mut child = Command::new(bin)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        // From here on the guard owns the child, so an early return kills it.
        let proxy = ProxyChild { child };
        thread::Builder::new()
            .name("proxy-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    on_line(line);
                }
            })
            .map_err(|e| format!("spawn stderr reader: {e}"))?;
        Ok(proxy)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `None` while it runs; its exit status once it has exited.
    pub fn exited(&mut self) -> Res<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .map_err(|e| format!("cannot check the proxy process: {e}"))
    }

    /// Fails if the proxy has exited (crashed, or refused its configuration).
    pub fn check_alive(&mut self) -> Res<()> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => Err(format!("the proxy exited: {status}")),
        }
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
