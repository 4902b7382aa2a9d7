//! HAProxy as a child process: the second reference (issue 16, point 1).
//!
//! Debian's `haproxy` in HTTP mode, one process with one thread (`nbthread 1`, no master), in
//! the foreground (`-db`), with `option splice-auto` (the kernel moves a tunnel's bytes
//! between the sockets when it can: plain on both sides), no token check (like nginx it only
//! maps `/TOKEN/VMI` to the KubeVirt path, with `http-request replace-path`), no logging.
//! After the 101 HAProxy relays the WebSocket as a tunnel (`timeout tunnel`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::nginx::TempDir;
use crate::process::{free_port, terminate, wait_listening};
use crate::{KUBEVIRT_PREFIX, Res};

/// Kernel pipes HAProxy may keep for splicing (`maxpipes`). Its default, a quarter of
/// maxconn, takes two descriptors each and would push its open-files need past the bench's
/// hard limit with 9,000 idle sessions; the bulk transfers splice one session at a time.
pub(crate) const HAPROXY_MAXPIPES: usize = 256;

pub(crate) fn find_haproxy() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("HAPROXY").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "haproxy not found: run `bash benches/nginx-setup.sh` (or set HAPROXY)".into()
        })
}

/// "HAProxy 2.6.12-1+deb12u4", from `haproxy -v`.
pub(crate) fn haproxy_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let first = text.lines().next()?.to_string();
            let version = first.strip_prefix("HAProxy version ")?;
            Some(format!(
                "HAProxy {}",
                version.split_whitespace().next().unwrap_or(version)
            ))
        })
        .unwrap_or_else(|| "HAProxy, version unknown".into())
}

#[derive(Clone)]
pub(crate) struct HaproxyConfig {
    pub(crate) bin: PathBuf,
    pub(crate) origin: SocketAddr,
    /// CA file and bearer for a TLS origin.
    pub(crate) tls: Option<(PathBuf, String)>,
    /// Certificate chain followed by its key, one PEM file (HAProxy's `crt`), for the
    /// client-TLS variants.
    pub(crate) listen_pem: Option<PathBuf>,
    /// Sessions (client connections) it must hold at once.
    pub(crate) maxconn: usize,
    /// Its open-files limit: two descriptors per session and a margin, at most what it may
    /// set. Without it HAProxy asks for more than twice maxconn (room for its own pipes for
    /// splicing) and refuses to start when the hard limit is lower.
    pub(crate) ulimit_n: u64,
}

impl HaproxyConfig {
    pub(crate) fn render(&self, port: u16) -> String {
        let origin = self.origin;
        // Verification as nginx does it: the same CA, the name `localhost`, TLS 1.2 and 1.3;
        // HAProxy reuses TLS sessions to a server by default, as nginx's
        // `proxy_ssl_session_reuse on`.
        let (server_tls, bearer) = match &self.tls {
            Some((ca, bearer)) => (
                format!(
                    " ssl verify required ca-file {} verifyhost localhost sni str(localhost) \
                     ssl-min-ver TLSv1.2",
                    ca.display()
                ),
                format!("    http-request set-header Authorization \"Bearer {bearer}\"\n"),
            ),
            None => (String::new(), String::new()),
        };
        // The client side over TLS as ours and nginx serve it: TLS 1.2 and 1.3, ALPN
        // http/1.1, resumption by tickets and by session ID (HAProxy's defaults:
        // `tune.ssl.cachesize` 20,000 sessions, tickets on).
        let bind_tls = match &self.listen_pem {
            Some(pem) => format!(
                " ssl crt {} alpn http/1.1 ssl-min-ver TLSv1.2",
                pem.display()
            ),
            None => String::new(),
        };
        format!(
            "# Written by benches/nginx/.\n\
             global\n\
             \x20   nbthread 1\n\
             \x20   maxconn {maxconn}\n\
             \x20   ulimit-n {ulimit_n}\n\
             \x20   maxpipes {HAPROXY_MAXPIPES}\n\
             defaults\n\
             \x20   mode http\n\
             \x20   option splice-auto\n\
             \x20   timeout connect 10s\n\
             \x20   timeout client 1h\n\
             \x20   timeout server 1h\n\
             \x20   timeout tunnel 1h\n\
             \x20   timeout http-request 30s\n\
             frontend bench\n\
             \x20   bind 127.0.0.1:{port}{bind_tls}\n\
             \x20   maxconn {maxconn}\n\
             \x20   default_backend origin\n\
             backend origin\n\
             \x20   # No token check: HAProxy cannot verify the JWT; it only maps the path.\n\
             \x20   http-request replace-path ^/[^/]+/([^/]+)$ {KUBEVIRT_PREFIX}\\1/vnc\n\
             {bearer}\
             \x20   server origin {origin}{server_tls} maxconn {maxconn}\n",
            maxconn = self.maxconn,
            ulimit_n = self.ulimit_n,
        )
    }
}

/// HAProxy (one process, one thread) as a child process in its own temp dir.
pub(crate) struct Haproxy {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) dir: TempDir,
}

impl Haproxy {
    pub(crate) fn start(cfg: &HaproxyConfig) -> Res<Haproxy> {
        let mut last = String::new();
        for _ in 0..3 {
            match Haproxy::try_start(cfg) {
                Ok(h) => return Ok(h),
                Err(e) => last = e,
            }
        }
        Err(format!("haproxy did not start: {last}"))
    }

    fn try_start(cfg: &HaproxyConfig) -> Res<Haproxy> {
        let dir = TempDir::new("haproxy")?;
        let port = free_port()?;
        let conf = dir.0.join("haproxy.cfg");
        std::fs::write(&conf, cfg.render(port))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let stderr = std::fs::File::create(dir.0.join("stderr.log"))
            .map_err(|e| format!("create stderr.log: {e}"))?;
        // -db: foreground, no master process; the child is the process that does the work.
        let child = Command::new(&cfg.bin)
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("start {}: {e}", cfg.bin.display()))?;
        let mut h = Haproxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let addr = h.addr;
        wait_listening(addr, || h.check_alive())?;
        Ok(h)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("haproxy exited ({status}): {}", self.stderr_log())),
            Err(e) => Err(format!("cannot check haproxy: {e}")),
        }
    }

    pub(crate) fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default()
    }

    /// Lines HAProxy wrote at ALERT level (it logs nothing per connection here).
    pub(crate) fn serious_log_lines(&self) -> Vec<String> {
        self.stderr_log()
            .lines()
            .filter(|l| l.contains("[ALERT]"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGUSR1 is a soft stop (waits for sessions); SIGTERM stops at once.
        let pid = self.pid();
        terminate(&mut self.child, pid);
    }
}
