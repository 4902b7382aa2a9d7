//! The knobs (`BENCH_*` environment variables), the open-files limits and CPU pinning.

use std::process::{Command, Stdio};
use std::thread;

use crate::support::knobs::{env_flag, env_num};
use crate::{FD_RESERVE, Res, proxy_bin, support};

pub(crate) struct Knobs {
    pub(crate) mib: u64,
    pub(crate) rtt: usize,
    pub(crate) conc: usize,
    pub(crate) conc_trips: usize,
    pub(crate) new_sessions: usize,
    pub(crate) idle: usize,
    pub(crate) rounds: usize,
    pub(crate) tls: bool,
    /// The client-TLS variants: the proxies' own TLS listeners (`BENCH_CLIENT_TLS`).
    pub(crate) client_tls: bool,
    /// The scaling section: our proxy with WORKERS=1 against WORKERS=2 (`BENCH_WORKERS`).
    pub(crate) scaling: bool,
    pub(crate) loglevel: String,
    /// Extra environment for our proxy (`BENCH_PROXY_ENV=K=V,K=V`), for experiments.
    pub(crate) proxy_env: Vec<(String, String)>,
    /// Extra nginx directives in the server block (`BENCH_NGINX_DIRECTIVES`), for experiments.
    pub(crate) nginx_directives: String,
    /// CPU placement during the sequential round trips (`BENCH_PIN`).
    pub(crate) pin: Pin,
    pub(crate) smoke: bool,
    /// Latency at scale and the handshake flood (`BENCH_SCALE*`, `BENCH_FLOOD_*`).
    pub(crate) scale: crate::scale::ScaleKnobs,
    /// Why `idle` is smaller than asked, if it is.
    pub(crate) idle_note: Option<String>,
}

impl Knobs {
    pub(crate) fn from_env() -> Res<Knobs> {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not and wants it quick.
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let smoke = !bench_mode || env_flag("BENCH_SMOKE");
        let d = if smoke {
            (8, 500, 50, 10, 200, 200, 1)
        } else {
            (256, 20_000, 1000, 100, 4000, 9000, 3)
        };
        Ok(Knobs {
            mib: env_num("BENCH_MIB", d.0)?,
            rtt: env_num("BENCH_RTT", d.1)?,
            conc: env_num("BENCH_CONC", d.2)?,
            conc_trips: env_num("BENCH_CONC_TRIPS", d.3)?,
            new_sessions: env_num("BENCH_NEW", d.4)?,
            idle: env_num("BENCH_IDLE", d.5)?,
            rounds: env_num("BENCH_ROUNDS", d.6)?,
            tls: std::env::var("BENCH_TLS").map_or(true, |v| v != "0" && v != "false"),
            client_tls: std::env::var("BENCH_CLIENT_TLS")
                .map_or(true, |v| v != "0" && v != "false"),
            scaling: std::env::var("BENCH_WORKERS").map_or(true, |v| v != "0" && v != "false"),
            loglevel: std::env::var("BENCH_LOGLEVEL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "WARNING".into()),
            proxy_env: std::env::var("BENCH_PROXY_ENV")
                .unwrap_or_default()
                .split(',')
                .filter(|kv| !kv.trim().is_empty())
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .ok_or_else(|| format!("BENCH_PROXY_ENV: {kv:?} is not K=V"))
                })
                .collect::<Res<_>>()?,
            nginx_directives: std::env::var("BENCH_NGINX_DIRECTIVES")
                .unwrap_or_default()
                .trim()
                .to_string(),
            pin: match std::env::var("BENCH_PIN").as_deref() {
                Ok("one") => Pin::One,
                Ok("split") => Pin::Split,
                Ok("off") => Pin::Off,
                Ok(other) if !other.is_empty() => {
                    return Err(format!("BENCH_PIN={other:?}: expected one, split or off"));
                }
                _ => Pin::One,
            },
            smoke,
            scale: crate::scale::ScaleKnobs::from_env(smoke)?,
            idle_note: None,
        })
    }

    /// The idle workload holds two descriptors per session in this process (client socket and
    /// origin socket) and two in the proxy; shrink it, with a note, if the limit is lower.
    pub(crate) fn fit_idle_to(&mut self, soft_limit: u64) {
        let fits = (soft_limit.saturating_sub(FD_RESERVE) / 2) as usize;
        if self.idle > fits {
            self.idle_note = Some(format!(
                "idle sessions reduced from {} to {fits}: the open-files limit is {soft_limit} \
                 and each idle session holds two descriptors in the bench process (client and \
                 origin) and two in the proxy",
                self.idle
            ));
            eprintln!("bench nginx: {}", self.idle_note.as_deref().unwrap_or(""));
            self.idle = fits.max(2);
        }
    }

    /// The command line that reproduces this run.
    pub(crate) fn command_line(&self) -> String {
        let smoke = if self.smoke { "BENCH_SMOKE=1 " } else { "" };
        format!(
            "bash benches/nginx-setup.sh && {smoke}BENCH_MIB={} BENCH_RTT={} BENCH_CONC={} \
             BENCH_CONC_TRIPS={} BENCH_NEW={} BENCH_IDLE={} BENCH_ROUNDS={} BENCH_TLS={} \
             BENCH_CLIENT_TLS={} BENCH_WORKERS={} BENCH_LOGLEVEL={} BENCH_PIN={}{}{}{} cargo bench --bench nginx",
            self.mib,
            self.rtt,
            self.conc,
            self.conc_trips,
            self.new_sessions,
            self.idle,
            self.rounds,
            u8::from(self.tls),
            u8::from(self.client_tls),
            u8::from(self.scaling),
            self.loglevel,
            match self.pin {
                Pin::One => "one",
                Pin::Split => "split",
                Pin::Off => "off",
            },
            if self.proxy_env.is_empty() {
                String::new()
            } else {
                let kv: Vec<String> = self
                    .proxy_env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!(" BENCH_PROXY_ENV={}", kv.join(","))
            },
            if self.nginx_directives.is_empty() {
                String::new()
            } else {
                format!(" BENCH_NGINX_DIRECTIVES='{}'", self.nginx_directives)
            },
            // Another build was measured: say which.
            std::env::var_os("BENCH_PROXY_BIN")
                .filter(|p| !p.is_empty())
                .map_or_else(String::new, |_| format!(
                    " BENCH_PROXY_BIN={}",
                    proxy_bin().display()
                ))
        )
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "S={} MiB, N={} round trips, C={} concurrent x T={}, M={} new sessions, K={} idle, \
             R={} rounds, TLS upstream variant {}, TLS client variants {}, workers scaling {}{}",
            self.mib,
            self.rtt,
            self.conc,
            self.conc_trips,
            self.new_sessions,
            self.idle,
            self.rounds,
            if self.tls { "on" } else { "off" },
            if self.client_tls { "on" } else { "off" },
            if self.scaling { "on" } else { "off" },
            if self.smoke { " (smoke)" } else { "" }
        )
    }
}

/// (soft, hard) open-files limits of this process.
pub(crate) fn nofile_limits() -> Res<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("read /proc/self/limits: {e}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or("no open-files line in /proc/self/limits")?;
    let num = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    match (
        fields.first().and_then(|s| num(s)),
        fields.get(1).and_then(|s| num(s)),
    ) {
        (Some(soft), Some(hard)) => Ok((soft, hard)),
        _ => Err(format!("cannot parse {line:?}")),
    }
}

/// Raises the soft open-files limit to the hard one (children, our proxy included, inherit
/// it). Returns the limits in force afterwards.
pub(crate) fn raise_nofile_limit() -> Res<(u64, u64)> {
    support::raise_nofile_limit();
    nofile_limits()
}

/// Where the processes run during the sequential round trips.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pin {
    /// Wherever the scheduler puts them.
    Off,
    /// Everything (bench threads, our proxy, the nginx worker, HAProxy) on the last CPU: no cross-CPU
    /// wakeups, so a round trip costs the work along its path and nothing depends on placement.
    One,
    /// The proxies on the last CPU, the bench (client and origin) on the others.
    Split,
}

/// CPU affinity set with taskset(1) for the duration of a workload; restored on drop.
pub(crate) struct Pinning {
    pub(crate) pids: Vec<u32>,
    pub(crate) all: String,
}

impl Pinning {
    pub(crate) fn apply(pin: Pin, proxies: &[u32]) -> Option<Pinning> {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if pin == Pin::Off || cpus < 2 {
            return None;
        }
        let last = (cpus - 1).to_string();
        let rest = if cpus == 2 {
            "0".to_string()
        } else {
            format!("0-{}", cpus - 2)
        };
        let me = std::process::id();
        let bench_cpus = if pin == Pin::One { &last } else { &rest };
        taskset(me, bench_cpus);
        for &p in proxies {
            taskset(p, &last);
        }
        let mut pids = vec![me];
        pids.extend_from_slice(proxies);
        Some(Pinning {
            pids,
            all: format!("0-{}", cpus - 1),
        })
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        for &p in &self.pids {
            taskset(p, &self.all);
        }
    }
}

/// Sets the affinity of all threads of `pid` (best effort: pinning only steadies numbers).
pub(crate) fn taskset(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("bench nginx: could not pin pid {pid} to CPUs {cpus} (taskset)");
    }
}
