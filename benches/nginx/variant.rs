//! One variant (client side plain or TLS, upstream plain or TLS): all routes, all rounds.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::client::{Endpoint, Route};
use crate::frames::Wire;
use crate::haproxy::{HAPROXY_MAXPIPES, Haproxy, HaproxyConfig};
use crate::knobs::{Knobs, Pinning, nofile_limits};
use crate::nginx::{Nginx, NginxConfig, TempDir};
use crate::origin::{Origin, OriginOptions};
use crate::process::settled_rss_kib;
use crate::proxy::ProxyProcess;
use crate::scaling::{Scaling, run_scaling};
use crate::support::procfs::{read_proc, status_kib};
use crate::workloads::{
    Idle, Latency, Meter, Transfer, concurrent, downstream, idle_sessions, new_sessions,
    round_trips, upstream_to_sink,
};
use crate::{NGINX_SMALL_CONNECTIONS, Res, SA_TOKEN, pki, tokens};

/// Samples per route.
pub(crate) struct PerRoute<T> {
    pub(crate) direct: Vec<T>,
    pub(crate) ours: Vec<T>,
    pub(crate) nginx: Vec<T>,
    pub(crate) haproxy: Vec<T>,
}

impl<T> Default for PerRoute<T> {
    fn default() -> Self {
        PerRoute {
            direct: Vec::new(),
            ours: Vec::new(),
            nginx: Vec::new(),
            haproxy: Vec::new(),
        }
    }
}

impl<T> PerRoute<T> {
    pub(crate) fn get(&self, r: Route) -> &[T] {
        match r {
            Route::Direct => &self.direct,
            Route::Ours => &self.ours,
            Route::Nginx => &self.nginx,
            Route::Haproxy => &self.haproxy,
        }
    }

    pub(crate) fn push(&mut self, r: Route, v: T) {
        match r {
            Route::Direct => self.direct.push(v),
            Route::Ours => self.ours.push(v),
            Route::Nginx => self.nginx.push(v),
            Route::Haproxy => self.haproxy.push(v),
        }
    }
}

pub(crate) struct VariantResults {
    /// TLS between the proxies and the origin.
    pub(crate) tls: bool,
    /// TLS between the client and the proxies (our TLS_CERT_FILE, nginx `listen ssl`,
    /// HAProxy `bind ssl`).
    pub(crate) client_tls: bool,
    pub(crate) down: PerRoute<Transfer>,
    pub(crate) up: PerRoute<Transfer>,
    pub(crate) rtt: PerRoute<Latency>,
    pub(crate) conc: PerRoute<Latency>,
    pub(crate) news: PerRoute<Latency>,
    /// Client-TLS variants: new sessions with full handshakes only (no client session cache);
    /// `news` then holds the ones that resume.
    pub(crate) news_full: PerRoute<Latency>,
    pub(crate) idle: PerRoute<Idle>,
    /// Settled RSS (KiB) of an nginx worker at start with worker_connections 1024 and with the
    /// idle-sized value: the difference is the connection slots nginx preallocates.
    pub(crate) nginx_start_small: u64,
    pub(crate) nginx_start_big: u64,
    pub(crate) nginx_big_connections: usize,
    /// TLS handshakes at the origin: (resumed, all) per route, over the whole variant.
    pub(crate) tls_resumed: [(Route, usize, usize); 4],
    /// Proxy log and nginx error log lines worth reading.
    pub(crate) nginx_log: Vec<String>,
    pub(crate) ours_peak_kib: u64,
    /// WORKERS=1 against WORKERS=2 (plain variant, unless `BENCH_WORKERS=0`).
    pub(crate) scaling: Option<Scaling>,
    /// Latency at scale and the handshake flood (plain variant, unless `BENCH_SCALE=0`).
    pub(crate) scale: crate::scale::ScaleResults,
}

pub(crate) fn run_variant(
    knobs: &Knobs,
    wire: &Arc<Wire>,
    nginx_bin: &Path,
    haproxy_bin: &Path,
    tls: bool,
    client_tls: bool,
) -> Res<VariantResults> {
    let label = match (client_tls, tls) {
        (false, false) => "plain",
        (false, true) => "TLS upstream",
        (true, false) => "TLS client",
        (true, true) => "TLS both",
    };
    let pki = (tls || client_tls).then(pki::TestPki::new);
    let sa_dir = TempDir::new("sa")?;
    let origin_tls = match pki.as_ref().filter(|_| tls) {
        Some(p) => Some(
            p.server_tls()
                .server_config()
                .map_err(|e| format!("origin TLS config: {e}"))?,
        ),
        None => None,
    };
    let origin = Origin::start(
        OriginOptions {
            tls: origin_tls,
            bearer: tls.then(|| SA_TOKEN.to_string()),
        },
        Arc::clone(wire),
    )?;
    let max_conn = (knobs.idle.max(knobs.scale.peak()) + knobs.conc + 1024).max(10_000);
    let mut proxy_env: Vec<(String, String)> = vec![
        ("SECRET_KEY".into(), tokens::SECRET.into()),
        ("MAX_CONNECTIONS".into(), max_conn.to_string()),
    ];
    proxy_env.extend(knobs.proxy_env.iter().cloned());
    let mut nginx_tls = None;
    // The listeners' certificate: one ECDSA P-256 pair for 127.0.0.1 from the test CA, the
    // same files for the three proxies.
    let mut listen_tls = None;
    let mut listen_pem = None;
    if let Some(p) = pki.as_ref().filter(|_| client_tls) {
        let issued = p.issue_pem(pki::KeyKind::EcdsaP256, 4_102_444_800);
        let (cert, key, both) = (
            sa_dir.0.join("listen.crt"),
            sa_dir.0.join("listen.key"),
            sa_dir.0.join("listen.pem"),
        );
        std::fs::write(&cert, &issued.cert_pem)
            .and_then(|_| std::fs::write(&key, &issued.key_pem))
            .and_then(|_| std::fs::write(&both, format!("{}{}", issued.cert_pem, issued.key_pem)))
            .map_err(|e| format!("write the listener's certificate: {e}"))?;
        proxy_env.extend([
            ("TLS_CERT_FILE".into(), cert.display().to_string()),
            ("TLS_KEY_FILE".into(), key.display().to_string()),
        ]);
        listen_tls = Some((cert, key));
        listen_pem = Some(both);
    }
    if let Some(p) = pki.as_ref().filter(|_| tls) {
        let ca = sa_dir.0.join("ca.crt");
        p.write_ca(&ca).map_err(|e| format!("write ca.crt: {e}"))?;
        std::fs::write(sa_dir.0.join("token"), SA_TOKEN)
            .map_err(|e| format!("write token: {e}"))?;
        proxy_env.extend([
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                origin.addr.port().to_string(),
            ),
            ("SERVICE_ACCOUNT_DIR".into(), sa_dir.0.display().to_string()),
        ]);
        nginx_tls = Some((ca, SA_TOKEN.to_string()));
    } else {
        proxy_env.extend([
            ("LOCAL_DEV_MODE".into(), "true".into()),
            ("WS_REMOTE_URL".into(), format!("ws://{}", origin.addr)),
        ]);
    }
    let (_, hard) = nofile_limits()?;
    // CAP_SYS_RESOURCE (bit 24 of the effective set), not root as such: root in a container
    // or user namespace often lacks it, and then cannot go past the hard limit either.
    let may_exceed_hard = read_proc("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0);
    let wc = 2 * (knobs.idle.max(knobs.conc).max(knobs.scale.peak())) + 512;
    let want_rlimit = wc as u64 + 512;
    let nginx_cfg = NginxConfig {
        bin: nginx_bin.to_path_buf(),
        origin: origin.addr,
        tls: nginx_tls,
        listen_tls,
        worker_connections: wc,
        // A master without CAP_SYS_RESOURCE cannot raise the worker's limit above the hard
        // limit (nginx logs an [alert] when it tries).
        rlimit_nofile: if may_exceed_hard {
            want_rlimit
        } else {
            want_rlimit.min(hard)
        },
        extra: knobs.nginx_directives.clone(),
    };

    let haproxy_maxconn = knobs.idle.max(knobs.conc).max(knobs.scale.peak()) + 256;
    let haproxy_cfg = HaproxyConfig {
        bin: haproxy_bin.to_path_buf(),
        origin: origin.addr,
        tls: nginx_cfg.tls.clone(),
        listen_pem,
        maxconn: haproxy_maxconn,
        // Two descriptors per session, HAProxy's splice pipes (two each) and a margin.
        ulimit_n: {
            let want = 2 * (haproxy_maxconn + HAPROXY_MAXPIPES) as u64 + 512;
            if may_exceed_hard {
                want
            } else {
                want.min(hard)
            }
        },
    };

    let mut ours = ProxyProcess::start(&proxy_env, &knobs.loglevel)?;
    let mut nginx = Nginx::start(&nginx_cfg)?;
    let mut haproxy = Haproxy::start(&haproxy_cfg)?;
    eprintln!(
        "bench nginx [{label}]: origin {} | ours pid {} on {} | nginx master {} worker {} on {} \
         | haproxy pid {} on {}",
        origin.addr,
        ours.pid(),
        ours.addr,
        nginx.master(),
        nginx.worker,
        nginx.addr,
        haproxy.pid(),
        haproxy.addr
    );
    // Processes started from here on (fresh proxies, nginx and HAProxy for the idle workload)
    // inherit the bench's placement.
    let pinned = Pinning::apply(knobs.pin, &[ours.pid(), nginx.worker, haproxy.pid()]);
    // One client configuration per route (and per kind of handshake), each with its own
    // session cache: rustls keys the cache by server name, the same 127.0.0.1 for all.
    let client_config = |resume: bool| {
        pki.as_ref().map(|p| {
            let mut cfg = (*p.client_config()).clone();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            if !resume {
                cfg.resumption = rustls::client::Resumption::disabled();
            }
            Arc::new(cfg)
        })
    };
    let configs: Vec<(Route, Option<Arc<rustls::ClientConfig>>)> = Route::ALL
        .iter()
        .map(|&r| (r, client_config(true)))
        .collect();
    let full_configs: Vec<(Route, Option<Arc<rustls::ClientConfig>>)> = Route::ALL
        .iter()
        .map(|&r| (r, client_config(false)))
        .collect();
    let config_for = |route: Route, resume: bool| {
        let list = if resume { &configs } else { &full_configs };
        list.iter()
            .find(|(r, _)| *r == route)
            .and_then(|(_, c)| c.clone())
    };
    let endpoint_with = |route: Route, addr: SocketAddr, resume: bool| Endpoint {
        route,
        addr,
        tls: match route {
            Route::Direct if tls => config_for(route, resume),
            Route::Direct => None,
            _ if client_tls => config_for(route, resume),
            _ => None,
        },
        bearer: if route == Route::Direct && tls {
            Some(SA_TOKEN.into())
        } else {
            None
        },
    };

    let endpoint = |route: Route, addr: SocketAddr| endpoint_with(route, addr, true);

    let mut res = VariantResults {
        tls,
        client_tls,
        down: PerRoute::default(),
        up: PerRoute::default(),
        rtt: PerRoute::default(),
        conc: PerRoute::default(),
        news: PerRoute::default(),
        news_full: PerRoute::default(),
        idle: PerRoute::default(),
        nginx_start_small: 0,
        nginx_start_big: 0,
        nginx_big_connections: wc,
        tls_resumed: [
            (Route::Ours, 0, 0),
            (Route::Nginx, 0, 0),
            (Route::Haproxy, 0, 0),
            (Route::Direct, 0, 0),
        ],
        nginx_log: Vec::new(),
        ours_peak_kib: 0,
        scaling: None,
        scale: Default::default(),
    };
    let mut resumed = PerRoute::<(usize, usize)>::default();
    for round in 0..knobs.rounds {
        let order = Route::rotation(round);
        let (ours_ep, nginx_ep, haproxy_ep) = (
            endpoint(Route::Ours, ours.addr),
            endpoint(Route::Nginx, nginx.addr),
            endpoint(Route::Haproxy, haproxy.addr),
        );
        let direct_ep = endpoint(Route::Direct, origin.addr);
        let pick = |r: Route| -> (&Endpoint, Meter) {
            match r {
                Route::Direct => (&direct_ep, Meter(None)),
                Route::Ours => (&ours_ep, Meter(Some(ours.pid()))),
                Route::Nginx => (&nginx_ep, Meter(Some(nginx.worker))),
                Route::Haproxy => (&haproxy_ep, Meter(Some(haproxy.pid()))),
            }
        };
        let step = |what: &str| {
            eprintln!(
                "bench nginx [{label}] round {}/{}: {what}",
                round + 1,
                knobs.rounds
            );
        };
        step("downstream");
        for r in order {
            let (ep, m) = pick(r);
            res.down.push(r, downstream(ep, m, wire)?);
        }
        step("upstream");
        for r in order {
            let (ep, m) = pick(r);
            res.up.push(r, upstream_to_sink(ep, m, wire, &origin)?);
        }
        step("sequential round trips (routes interleaved)");
        let routes: Vec<(&Endpoint, Meter)> = order.iter().map(|&r| pick(r)).collect();
        for (r, lat) in round_trips(&routes, knobs.rtt)? {
            res.rtt.push(r, lat);
        }
        step("concurrent sessions");
        for r in order {
            let (ep, m) = pick(r);
            if ep.tls.is_some() {
                continue; // the mio client speaks plain TCP only
            }
            res.conc
                .push(r, concurrent(ep, m, knobs.conc, knobs.conc_trips, &origin)?);
        }
        step("new sessions");
        for r in order {
            let (ep, m) = pick(r);
            let before = origin.stats.resumed();
            res.news
                .push(r, new_sessions(ep, m, knobs.new_sessions, &origin)?);
            let after = origin.stats.resumed();
            resumed.push(r, (after.0 - before.0, after.1 - before.1));
        }
        if client_tls {
            step("new sessions, full TLS handshakes");
            for r in order {
                let (ep, m) = pick(r);
                let full = endpoint_with(r, ep.addr, false);
                res.news_full
                    .push(r, new_sessions(&full, m, knobs.new_sessions, &origin)?);
            }
        }
        ours.check_alive()?;
        nginx.check_alive()?;
        haproxy.check_alive()?;
        step("idle sessions (fresh processes)");
        for r in order {
            match r {
                Route::Direct => {}
                Route::Ours => {
                    let mut fresh = ProxyProcess::start(&proxy_env, &knobs.loglevel)?;
                    let ep = endpoint(Route::Ours, fresh.addr);
                    res.idle
                        .push(r, idle_sessions(&ep, fresh.pid(), knobs.idle, &origin)?);
                    fresh.check_alive()?;
                }
                Route::Nginx => {
                    if round == 0 {
                        let small = NginxConfig {
                            worker_connections: NGINX_SMALL_CONNECTIONS,
                            ..nginx_cfg.clone()
                        };
                        let n = Nginx::start(&small)?;
                        res.nginx_start_small = settled_rss_kib(n.worker)?;
                    }
                    let mut fresh = Nginx::start(&nginx_cfg)?;
                    let ep = endpoint(Route::Nginx, fresh.addr);
                    let sample = idle_sessions(&ep, fresh.worker, knobs.idle, &origin)?;
                    if round == 0 {
                        res.nginx_start_big = sample.start;
                    }
                    res.idle.push(r, sample);
                    fresh.check_alive()?;
                    res.nginx_log.extend(fresh.serious_log_lines());
                }
                Route::Haproxy => {
                    let mut fresh = Haproxy::start(&haproxy_cfg)?;
                    let ep = endpoint(Route::Haproxy, fresh.addr);
                    res.idle
                        .push(r, idle_sessions(&ep, fresh.pid(), knobs.idle, &origin)?);
                    fresh.check_alive()?;
                    res.nginx_log.extend(fresh.serious_log_lines());
                }
            }
        }
        if knobs.scale.on && !tls {
            step("latency at scale, handshake flood");
            crate::scale::round(
                &mut res.scale,
                &knobs.scale,
                knobs.pin,
                &routes,
                &origin,
                round,
            )?;
        }
    }
    ours.check_alive()?;
    nginx.check_alive()?;
    haproxy.check_alive()?;
    // The scaling section is about using more than one CPU: undo the placement first (the
    // processes it starts then inherit the bench's restored affinity).
    drop(pinned);
    if knobs.scaling && !tls && !client_tls {
        res.scaling = Some(run_scaling(knobs, &proxy_env, &endpoint, &origin)?);
    }
    origin.stats.check()?;
    res.ours_peak_kib = status_kib(ours.pid(), "VmHWM")?;
    res.nginx_log.extend(nginx.serious_log_lines());
    res.nginx_log.extend(haproxy.serious_log_lines());
    for line in res.nginx_log.iter().take(10) {
        eprintln!("nginx error.log: {line}");
    }
    if res.nginx_log.iter().any(|l| {
        ["[crit]", "[alert]", "[emerg]", "[ALERT]"]
            .iter()
            .any(|t| l.contains(t))
    }) {
        return Err(format!(
            "nginx or haproxy logged critical errors, e.g. {}",
            res.nginx_log[0]
        ));
    }
    let sum = |v: &[(usize, usize)]| v.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    for slot in &mut res.tls_resumed {
        let (a, b) = sum(resumed.get(slot.0));
        slot.1 = a;
        slot.2 = b;
    }
    Ok(res)
}
