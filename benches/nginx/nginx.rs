//! nginx as a child process: finding it, its configuration, its master and worker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{free_port, signal, terminate, wait_listening};
use crate::support::procfs::stat_fields;
use crate::{KUBEVIRT_PREFIX, Res, START_TIMEOUT};

pub(crate) fn find_nginx() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or_else(|| "nginx not found: run `bash benches/nginx-setup.sh` (or set NGINX)".into())
}

pub(crate) fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|s| s.strip_prefix("nginx version: ").map(str::to_string))
        .unwrap_or_else(|| "nginx, version unknown".into())
}

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> Res<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bench-nginx-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // nginx's workers run as another user when the master is root: let them look inside.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone)]
pub(crate) struct NginxConfig {
    pub(crate) bin: PathBuf,
    pub(crate) origin: SocketAddr,
    /// CA file and bearer for an https origin.
    pub(crate) tls: Option<(PathBuf, String)>,
    /// Certificate chain and key (PEM files) for `listen ... ssl`: the client-TLS variants.
    pub(crate) listen_tls: Option<(PathBuf, PathBuf)>,
    pub(crate) worker_connections: usize,
    pub(crate) rlimit_nofile: u64,
    /// Extra directives for the server block (`BENCH_NGINX_DIRECTIVES`), for experiments.
    pub(crate) extra: String,
}

impl NginxConfig {
    pub(crate) fn render(&self, dir: &Path, port: u16) -> String {
        let d = dir.display();
        let origin = self.origin;
        let (scheme, tls_lines) = match &self.tls {
            Some((ca, bearer)) => (
                "https",
                format!(
                    "        proxy_set_header Authorization \"Bearer {bearer}\";\n\
                     \x20       proxy_ssl_trusted_certificate {};\n\
                     \x20       proxy_ssl_verify on;\n\
                     \x20       proxy_ssl_name localhost;\n\
                     \x20       proxy_ssl_protocols TLSv1.2 TLSv1.3;\n\
                     \x20       proxy_ssl_session_reuse on;\n",
                    ca.display()
                ),
            ),
            None => ("http", String::new()),
        };
        // The client side over TLS as our proxy serves it: TLS 1.2 and 1.3, the same
        // certificate, resumption both ways (tickets, on by default, and a session cache for
        // TLS 1.2 clients that resume by ID, as ours keeps one). nginx's default cache is
        // `none` (no resumption by ID); `shared` is what its documentation and common
        // configurations recommend, and 10 MB hold some 40,000 sessions.
        let (ssl, listen_tls_lines) = match &self.listen_tls {
            Some((cert, key)) => (
                " ssl",
                format!(
                    "        ssl_certificate {};\n\
                     \x20       ssl_certificate_key {};\n\
                     \x20       ssl_protocols TLSv1.2 TLSv1.3;\n\
                     \x20       ssl_session_cache shared:SSL:10m;\n\
                     \x20       ssl_session_timeout 1h;\n\
                     \x20       ssl_session_tickets on;\n",
                    cert.display(),
                    key.display()
                ),
            ),
            None => ("", String::new()),
        };
        format!(
            "# Written by benches/nginx/.\n\
             worker_processes 1;\n\
             worker_rlimit_nofile {rlimit};\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{\n    worker_connections {wc};\n}}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/tmp-client-body;\n\
             \x20   proxy_temp_path {d}/tmp-proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp-fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp-uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp-scgi;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port}{ssl};\n\
             {listen_tls_lines}\
             \x20       proxy_http_version 1.1;\n\
             \x20       proxy_set_header Upgrade $http_upgrade;\n\
             \x20       proxy_set_header Connection \"upgrade\";\n\
             \x20       proxy_buffering off;\n\
             \x20       proxy_read_timeout 3600s;\n\
             \x20       proxy_send_timeout 3600s;\n\
             {tls_lines}\
             {extra}\
             \x20       # No token check: nginx cannot verify the JWT; it only maps the path.\n\
             \x20       location ~ ^/[^/]+/(?<vmi>[^/]+)$ {{\n\
             \x20           proxy_pass {scheme}://{origin}{KUBEVIRT_PREFIX}$vmi/vnc;\n\
             \x20       }}\n\
             \x20       location / {{\n\
             \x20           proxy_pass {scheme}://{origin};\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            rlimit = self.rlimit_nofile,
            wc = self.worker_connections,
            extra = if self.extra.is_empty() {
                String::new()
            } else {
                format!("        {}\n", self.extra)
            },
        )
    }
}

/// nginx (master + one worker) as child processes in their own temp dir.
pub(crate) struct Nginx {
    pub(crate) child: Child,
    pub(crate) worker: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) dir: TempDir,
}

impl Nginx {
    pub(crate) fn start(cfg: &NginxConfig) -> Res<Nginx> {
        let mut last = String::new();
        for _ in 0..3 {
            match Nginx::try_start(cfg) {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
        }
        Err(format!("nginx did not start: {last}"))
    }

    pub(crate) fn try_start(cfg: &NginxConfig) -> Res<Nginx> {
        let dir = TempDir::new("nginx")?;
        let port = free_port()?;
        let conf = dir.0.join("nginx.conf");
        std::fs::write(&conf, cfg.render(&dir.0, port))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let stderr = std::fs::File::create(dir.0.join("stderr.log"))
            .map_err(|e| format!("create stderr.log: {e}"))?;
        let child = Command::new(&cfg.bin)
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("start {}: {e}", cfg.bin.display()))?;
        let mut nginx = Nginx {
            child,
            worker: 0,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let addr = nginx.addr;
        wait_listening(addr, || nginx.check_master())?;
        // The worker is the master's child whose command line says so.
        let deadline = Instant::now() + START_TIMEOUT;
        while nginx.worker == 0 {
            nginx.check_master()?;
            nginx.worker = nginx.find_worker().unwrap_or(0);
            if nginx.worker == 0 {
                if Instant::now() > deadline {
                    return Err("no nginx worker process appeared".into());
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(nginx)
    }

    pub(crate) fn master(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn find_worker(&self) -> Option<u32> {
        let m = self.master();
        let from_children = std::fs::read_to_string(format!("/proc/{m}/task/{m}/children"))
            .ok()
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            });
        let candidates = from_children.unwrap_or_else(|| {
            // Without /proc/PID/task/PID/children: scan for processes whose parent is the master.
            std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                        .filter(|&p| {
                            stat_fields(p)
                                .ok()
                                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                                == Some(m)
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        candidates.into_iter().find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
        })
    }

    pub(crate) fn check_master(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "nginx exited ({status}): {}{}",
                std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default(),
                self.error_log_tail()
            )),
            Err(e) => Err(format!("cannot check nginx: {e}")),
        }
    }

    /// Fails if the master exited or the worker was replaced (crashed and respawned).
    pub(crate) fn check_alive(&mut self) -> Res<()> {
        self.check_master()?;
        match self.find_worker() {
            Some(w) if w == self.worker => Ok(()),
            other => Err(format!(
                "the nginx worker {} is gone (now {other:?}): {}",
                self.worker,
                self.error_log_tail()
            )),
        }
    }

    pub(crate) fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }

    pub(crate) fn error_log_tail(&self) -> String {
        let log = self.error_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Lines of the error log at `[error]` or worse.
    pub(crate) fn serious_log_lines(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| {
                ["[error]", "[crit]", "[alert]", "[emerg]"]
                    .iter()
                    .any(|t| l.contains(t))
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown, the master stops its worker and exits.
        let master = self.master();
        terminate(&mut self.child, master);
        // A worker orphaned by a killed master would otherwise keep running.
        if std::fs::read(format!("/proc/{}/cmdline", self.worker))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("nginx"))
        {
            signal(self.worker, "KILL");
        }
    }
}
