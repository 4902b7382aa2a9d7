//! Scaling: our proxy with one worker against two.

use std::net::SocketAddr;

use crate::Res;
use crate::client::{Endpoint, Route};
use crate::knobs::Knobs;
use crate::origin::Origin;
use crate::proxy::ProxyProcess;
use crate::support::procfs::thread_run_ns;
use crate::workloads::{Latency, Meter, concurrent, new_sessions};

/// The worker counts compared; the arrays in `Scaling` follow this order.
pub(crate) const SCALING_WORKERS: [usize; 2] = [1, 2];
/// A single loop busy less than this (% of one core) was waiting for the load, not limiting it.
pub(crate) const SATURATED_PERCENT: f64 = 90.0;

/// Samples of the scaling section, per worker count (indexed as `SCALING_WORKERS`).
#[derive(Default)]
pub(crate) struct Scaling {
    pub(crate) conc: [Vec<Latency>; 2],
    pub(crate) news: [Vec<Latency>; 2],
    /// With two workers, the less busy worker thread's share of the proxy's CPU per sample:
    /// how evenly SO_REUSEPORT spread the connections.
    pub(crate) conc_share: Vec<f64>,
    pub(crate) news_share: Vec<f64>,
}

/// Workloads 4 and 5 on two more processes of ours, `WORKERS=1` and `WORKERS=2`, taking turns
/// in each round (the order alternating). The caller has undone the pinning: the point is what
/// a second loop adds when it can have a CPU of its own.
pub(crate) fn run_scaling(
    knobs: &Knobs,
    proxy_env: &[(String, String)],
    endpoint: &dyn Fn(Route, SocketAddr) -> Endpoint,
    origin: &Origin,
) -> Res<Scaling> {
    let mut proxies = Vec::with_capacity(SCALING_WORKERS.len());
    for w in SCALING_WORKERS {
        let mut env = proxy_env.to_vec();
        // Last, so that it wins over a WORKERS in BENCH_PROXY_ENV.
        env.push(("WORKERS".into(), w.to_string()));
        proxies.push(ProxyProcess::start(&env, &knobs.loglevel)?);
    }
    let started: Vec<String> = SCALING_WORKERS
        .iter()
        .zip(&proxies)
        .map(|(w, p)| format!("WORKERS={w} pid {} on {}", p.pid(), p.addr))
        .collect();
    eprintln!("bench nginx [plain] scaling: {}", started.join(" | "));
    let mut res = Scaling::default();
    for round in 0..knobs.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let step = |what: &str| {
            eprintln!(
                "bench nginx [plain] scaling round {}/{}: {what}",
                round + 1,
                knobs.rounds
            );
        };
        step("concurrent sessions, WORKERS=1 and 2");
        for i in order {
            let (pid, ep) = (proxies[i].pid(), endpoint(Route::Ours, proxies[i].addr));
            let (lat, share) = on_every_worker(pid, SCALING_WORKERS[i], || {
                concurrent(&ep, Meter(Some(pid)), knobs.conc, knobs.conc_trips, origin)
            })?;
            res.conc[i].push(lat);
            if SCALING_WORKERS[i] > 1 {
                res.conc_share.push(share);
            }
        }
        step("new sessions, WORKERS=1 and 2");
        for i in order {
            let (pid, ep) = (proxies[i].pid(), endpoint(Route::Ours, proxies[i].addr));
            let (lat, share) = on_every_worker(pid, SCALING_WORKERS[i], || {
                new_sessions(&ep, Meter(Some(pid)), knobs.new_sessions, origin)
            })?;
            res.news[i].push(lat);
            if SCALING_WORKERS[i] > 1 {
                res.news_share.push(share);
            }
        }
        for p in &mut proxies {
            p.check_alive()?;
        }
    }
    Ok(res)
}

/// Runs `workload` on our proxy `pid` started with `workers` loops and fails unless every loop
/// ran meanwhile. The threads cannot be told apart by name (the loops are named
/// `kubevirt-vnc-proxy`, which the kernel cuts to the 15 bytes the main thread and the signal
/// thread carry from the binary's name), so they are told apart by what they did: the signal
/// thread sleeps until a signal comes, and a loop with no connection sleeps in epoll, so at
/// least `workers` threads must have run. Returns the workload's result and the share of the
/// proxy's CPU taken by the least busy of the `workers` busiest threads.
pub(crate) fn on_every_worker<T>(
    pid: u32,
    workers: usize,
    workload: impl FnOnce() -> Res<T>,
) -> Res<(T, f64)> {
    let fail = |e: String| format!("WORKERS={workers}: {e}");
    let before = thread_run_ns(pid).map_err(fail)?;
    let out = workload().map_err(fail)?;
    let after = thread_run_ns(pid).map_err(fail)?;
    let mut ran: Vec<u64> = after
        .iter()
        .map(|&(tid, ns)| {
            let was = before
                .iter()
                .find(|&&(t, _)| t == tid)
                .map_or(0, |&(_, ns)| ns);
            ns.saturating_sub(was)
        })
        .filter(|&ns| ns > 0)
        .collect();
    if ran.len() < workers {
        return Err(fail(format!(
            "only {} of the proxy's threads ran during the workload: a loop served nothing",
            ran.len()
        )));
    }
    ran.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = ran.iter().sum();
    Ok((out, ran[workers - 1] as f64 / total as f64))
}
