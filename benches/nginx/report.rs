//! Statistics over the rounds, and the report's tables.

use std::fmt::Write as _;
use std::thread;
use std::time::Duration;

use crate::client::Route;
use crate::knobs::{Knobs, Pin};
use crate::scaling::{SATURATED_PERCENT, Scaling};
use crate::support::stats::{median, percentile_us};
use crate::variant::VariantResults;
use crate::workloads::{Idle, Latency, Transfer};
use crate::{GIB, MIB, NEW_THREADS, NGINX_SMALL_CONNECTIONS, RTT_BATCH, support};

/// Median over the rounds of each round's percentile `q`, in microseconds.
pub(crate) fn median_percentile_us(l: &[Latency], q: f64) -> f64 {
    median(l.iter().map(|l| percentile_us(&l.samples, q)))
}

/// Median rate of a latency workload: operations per second of its wall time.
pub(crate) fn per_second(l: &[Latency]) -> f64 {
    median(
        l.iter()
            .map(|l| l.samples.len() as f64 / l.elapsed.as_secs_f64()),
    )
}

/// Median CPU time of the measured process per `per` operations (1e6: µs per operation).
pub(crate) fn cpu_per(l: &[Latency], per: f64) -> f64 {
    median(l.iter().map(|l| per * l.cpu.run / l.samples.len() as f64))
}

/// Median CPU busy time of the measured process, in % of one core (above 100: several).
pub(crate) fn busy_percent(l: &[Latency]) -> f64 {
    median(
        l.iter()
            .map(|l| 100.0 * l.cpu.run / l.elapsed.as_secs_f64()),
    )
}

/// Values of every round, comma-separated, or a dash when there are none.
pub(crate) fn list_or_dash(vals: Vec<String>) -> String {
    if vals.is_empty() {
        "—".into()
    } else {
        vals.join(", ")
    }
}

pub(crate) fn fmt_num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "—".into()
    }
}

/// The better of the two peers (nginx, HAProxy): the lower value, or the higher one for a
/// rate. NaN if neither was measured.
pub(crate) fn best_peer(vals: [f64; 4], higher_is_better: bool) -> f64 {
    let (n, h) = (vals[ix(Route::Nginx)], vals[ix(Route::Haproxy)]);
    match (n.is_finite(), h.is_finite()) {
        (true, true) if higher_is_better => n.max(h),
        (true, true) => n.min(h),
        (true, false) => n,
        (false, true) => h,
        (false, false) => f64::NAN,
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

pub(crate) struct Report<'a> {
    pub(crate) knobs: &'a Knobs,
    pub(crate) variants: &'a [VariantResults],
    pub(crate) nginx_version: String,
    pub(crate) haproxy_version: String,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) limits: (u64, u64),
    pub(crate) elapsed: Duration,
}

/// Medians of one variant, computed once for the tables and the targets.
pub(crate) struct Summary {
    pub(crate) down_rate: [f64; 4],
    pub(crate) up_rate: [f64; 4],
    pub(crate) down_cpu: [f64; 4],
    pub(crate) down_sys: [f64; 4],
    pub(crate) up_cpu: [f64; 4],
    pub(crate) up_sys: [f64; 4],
    pub(crate) down_busy: [f64; 4],
    pub(crate) up_busy: [f64; 4],
    pub(crate) rtt_p50: [f64; 4],
    pub(crate) rtt_p99: [f64; 4],
    pub(crate) rtt_cpu_us: [f64; 4],
    pub(crate) rtt_sys: [f64; 4],
    pub(crate) conc_sys: [f64; 4],
    pub(crate) new_sys: [f64; 4],
    pub(crate) conc_total: [f64; 4],
    pub(crate) conc_rate: [f64; 4],
    pub(crate) conc_p50: [f64; 4],
    pub(crate) conc_p99: [f64; 4],
    pub(crate) conc_cpu_us: [f64; 4],
    pub(crate) new_rate: [f64; 4],
    pub(crate) new_p50: [f64; 4],
    pub(crate) new_p99: [f64; 4],
    pub(crate) new_cpu: [f64; 4],
    /// Client-TLS variants: new sessions with full handshakes.
    pub(crate) new_full_rate: [f64; 4],
    pub(crate) new_full_p50: [f64; 4],
    pub(crate) new_full_cpu: [f64; 4],
    pub(crate) new_full_sys: [f64; 4],
    pub(crate) idle_start: [f64; 4],
    pub(crate) idle_half: [f64; 4],
    pub(crate) idle_full: [f64; 4],
    pub(crate) idle_avg: [f64; 4],
    pub(crate) idle_marginal: [f64; 4],
    pub(crate) idle_cpu: [f64; 4],
    pub(crate) idle_open_rate: [f64; 4],
    pub(crate) idle_peak: [f64; 4],
    pub(crate) idle_upgrade_p50: [f64; 4],
    pub(crate) idle_upgrade_p99: [f64; 4],
    /// nginx's preallocated connection slots, KiB per idle session (two slots each).
    pub(crate) nginx_slots_per_session: f64,
}

/// Index of a route in the summary arrays: direct, ours, nginx, HAProxy.
pub(crate) fn ix(r: Route) -> usize {
    match r {
        Route::Direct => 0,
        Route::Ours => 1,
        Route::Nginx => 2,
        Route::Haproxy => 3,
    }
}

impl Summary {
    pub(crate) fn new(v: &VariantResults, payload: usize) -> Summary {
        let gib = payload as f64 / GIB;
        let each = |f: &dyn Fn(Route) -> f64| -> [f64; 4] {
            let mut out = [f64::NAN; 4];
            for r in Route::ALL {
                out[ix(r)] = f(r);
            }
            out
        };
        let proxied = |r: Route, x: f64| if r == Route::Direct { f64::NAN } else { x };
        let rate = |t: &[Transfer]| {
            median(
                t.iter()
                    .map(|t| payload as f64 / MIB / t.elapsed.as_secs_f64()),
            )
        };
        let per_gib = |t: &[Transfer]| median(t.iter().map(|t| t.cpu.run / gib));
        let sys = |t: &[Transfer]| median(t.iter().map(|t| t.cpu.sys_share()));
        let busy = |t: &[Transfer]| {
            median(
                t.iter()
                    .map(|t| 100.0 * t.cpu.run / t.elapsed.as_secs_f64()),
            )
        };
        let pct = median_percentile_us;
        let lat_sys = |l: &[Latency]| median(l.iter().map(|l| l.cpu.sys_share()));
        let per_op_us = |l: &[Latency]| cpu_per(l, 1e6);
        let idle = |r: Route, f: &dyn Fn(&Idle) -> f64| median(v.idle.get(r).iter().map(f));
        let slots = v
            .nginx_big_connections
            .saturating_sub(NGINX_SMALL_CONNECTIONS);
        Summary {
            down_rate: each(&|r| rate(v.down.get(r))),
            up_rate: each(&|r| rate(v.up.get(r))),
            down_cpu: each(&|r| proxied(r, per_gib(v.down.get(r)))),
            down_sys: each(&|r| proxied(r, sys(v.down.get(r)))),
            up_cpu: each(&|r| proxied(r, per_gib(v.up.get(r)))),
            up_sys: each(&|r| proxied(r, sys(v.up.get(r)))),
            down_busy: each(&|r| proxied(r, busy(v.down.get(r)))),
            up_busy: each(&|r| proxied(r, busy(v.up.get(r)))),
            rtt_p50: each(&|r| pct(v.rtt.get(r), 0.50)),
            rtt_p99: each(&|r| pct(v.rtt.get(r), 0.99)),
            rtt_cpu_us: each(&|r| proxied(r, per_op_us(v.rtt.get(r)))),
            rtt_sys: each(&|r| proxied(r, lat_sys(v.rtt.get(r)))),
            conc_sys: each(&|r| proxied(r, lat_sys(v.conc.get(r)))),
            new_sys: each(&|r| proxied(r, lat_sys(v.news.get(r)))),
            conc_total: each(&|r| median(v.conc.get(r).iter().map(|l| l.elapsed.as_secs_f64()))),
            conc_rate: each(&|r| per_second(v.conc.get(r))),
            conc_p50: each(&|r| pct(v.conc.get(r), 0.50)),
            conc_p99: each(&|r| pct(v.conc.get(r), 0.99)),
            conc_cpu_us: each(&|r| proxied(r, per_op_us(v.conc.get(r)))),
            new_rate: each(&|r| per_second(v.news.get(r))),
            new_p50: each(&|r| pct(v.news.get(r), 0.50) / 1000.0),
            new_p99: each(&|r| pct(v.news.get(r), 0.99) / 1000.0),
            new_cpu: each(&|r| proxied(r, cpu_per(v.news.get(r), 1000.0))),
            new_full_rate: each(&|r| per_second(v.news_full.get(r))),
            new_full_p50: each(&|r| pct(v.news_full.get(r), 0.50) / 1000.0),
            new_full_cpu: each(&|r| proxied(r, cpu_per(v.news_full.get(r), 1000.0))),
            new_full_sys: each(&|r| proxied(r, lat_sys(v.news_full.get(r)))),
            idle_start: each(&|r| idle(r, &|i| i.start as f64)),
            idle_half: each(&|r| idle(r, &|i| i.half as f64)),
            idle_full: each(&|r| idle(r, &|i| i.full as f64)),
            idle_avg: each(&|r| idle(r, &|i| i.per_session_kib())),
            idle_marginal: each(&|r| idle(r, &|i| i.marginal_kib())),
            idle_cpu: each(&|r| idle(r, &|i| i.idle_cpu_percent())),
            idle_open_rate: each(&|r| idle(r, &|i| i.sessions as f64 / i.open_wall.as_secs_f64())),
            idle_peak: each(&|r| idle(r, &|i| i.peak as f64)),
            idle_upgrade_p50: each(&|r| idle(r, &|i| percentile_us(&i.upgrade_ns, 0.50))),
            idle_upgrade_p99: each(&|r| idle(r, &|i| percentile_us(&i.upgrade_ns, 0.99))),
            nginx_slots_per_session: if slots > 0 && v.nginx_start_big > 0 {
                2.0 * (v.nginx_start_big as f64 - v.nginx_start_small as f64) / slots as f64
            } else {
                f64::NAN
            },
        }
    }
}

impl Report<'_> {
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let k = self.knobs;
        let _ = writeln!(
            out,
            "### Our proxy against nginx and HAProxy (and a direct connection)\n"
        );
        let _ = writeln!(out, "`{}`\n", k.command_line());
        let _ = writeln!(
            out,
            "{}; {}; {}; load average (1 min) before {}, after {}; open-files limit {} (hard {}); \
             total run time {:.0} s.\n",
            support::machine(),
            self.nginx_version,
            self.haproxy_version,
            self.load_before,
            self.load_after,
            self.limits.0,
            self.limits.1,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(out, "{}.\n", k.describe());
        if let Some(note) = &k.idle_note {
            let _ = writeln!(out, "**Note:** {note}.\n");
        }
        let _ = writeln!(
            out,
            "**nginx does no token check**: it maps `/TOKEN/VMI` to the KubeVirt path with a regex \
             location and forwards; our proxy verifies an HS256 JWT and the VMI allow-list on every \
             session. One nginx worker (`worker_processes 1`, `proxy_buffering off`, `access_log \
             off`, otherwise defaults: it relays through `proxy_buffer_size` buffers, one page) \
             against our single-threaded loop at LOGLEVEL={} (64 KiB relay buffers by default). \
             CPU figures are the nginx *worker*'s and our process's run time \
             (`/proc/PID/task/*/schedstat`; the sys share from utime/stime in `/proc/PID/stat`); \
             memory is resident pages (VmRSS), i.e. what was touched, not what was reserved. The \
             origin (one mio thread in the bench process) and the clients share the machine with \
             the proxies: throughput and latency depend on what else runs there (compare the load \
             average), CPU per unit of work less so. Sequential round trips interleave the routes \
             in batches of {RTT_BATCH}. {}\n",
            k.loglevel,
            match k.pin {
                Pin::One =>
                    "**Placement** (`BENCH_PIN=one`): the bench (clients and origin), our \
                    proxy and the nginx worker all run on the last CPU (taskset), so that no \
                    number depends on where the scheduler happened to put whom: on this kind of \
                    VM a wakeup across CPUs costs tens of µs and inflates the woken process's \
                    accounted CPU time several times over. Throughput is then that of one core \
                    shared by client, proxy and origin; CPU per unit of work is the proxy's own.",
                Pin::Split =>
                    "**Placement** (`BENCH_PIN=split`): our proxy and the nginx worker on \
                    the last CPU, the bench on the others; every hop through a proxy crosses \
                    CPUs.",
                Pin::Off =>
                    "**Placement** (`BENCH_PIN=off`): wherever the scheduler puts the \
                    processes; expect spread between rounds.",
            }
        );
        let summaries: Vec<Summary> = self
            .variants
            .iter()
            .map(|v| Summary::new(v, k.mib as usize * (1 << 20)))
            .collect();
        for (v, s) in self.variants.iter().zip(&summaries) {
            self.render_variant(&mut out, v, s);
        }
        self.render_targets(&mut out, &summaries);
        crate::scale::render(&mut out, &k.scale, self.variants);
        self.render_readme(&mut out, &summaries);
        for v in self.variants {
            self.render_rounds(&mut out, v);
        }
        out
    }

    pub(crate) fn render_variant(&self, out: &mut String, v: &VariantResults, s: &Summary) {
        let k = self.knobs;
        let title = variant_title(v);
        let _ = writeln!(out, "#### {title}\n");
        let _ = writeln!(
            out,
            "| workload (median of {} rounds) | direct | ours | nginx | HAProxy | ours/nginx | ours/better peer |",
            k.rounds
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        let row = |out: &mut String, name: &str, vals: [f64; 4], d: usize| {
            // Rates: the better peer is the faster one; everything else here is a time.
            let higher = name.contains("MiB/s")
                || name.contains("per second")
                || name.contains("sessions/s");
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                fmt_num(vals[0], d),
                fmt_num(vals[1], d),
                fmt_num(vals[2], d),
                fmt_num(vals[3], d),
                ratio(vals[1], vals[2]),
                ratio(vals[1], best_peer(vals, higher))
            );
        };
        let mib = k.mib;
        row(
            out,
            &format!("downstream {mib} MiB, 64 KiB frames (MiB/s)"),
            s.down_rate,
            0,
        );
        row(
            out,
            &format!("upstream {mib} MiB, 64 KiB frames (MiB/s)"),
            s.up_rate,
            0,
        );
        row(
            out,
            &format!("{} sequential round trips, p50 (µs)", k.rtt),
            s.rtt_p50,
            1,
        );
        row(out, "… p99 (µs)", s.rtt_p99, 1);
        let added = |p: [f64; 4]| [f64::NAN, p[1] - p[0], p[2] - p[0], p[3] - p[0]];
        row(out, "… added over direct, p50 (µs)", added(s.rtt_p50), 1);
        row(out, "… added over direct, p99 (µs)", added(s.rtt_p99), 1);
        let conc = format!("{} sessions × {} round trips", k.conc, k.conc_trips);
        row(out, &format!("{conc}: total (s)"), s.conc_total, 2);
        row(out, "… round trips per second", s.conc_rate, 0);
        row(out, "… p50 (µs)", s.conc_p50, 1);
        row(out, "… p99 (µs)", s.conc_p99, 1);
        row(
            out,
            &format!(
                "new sessions per second ({NEW_THREADS} threads, {} sessions)",
                k.new_sessions
            ),
            s.new_rate,
            0,
        );
        row(
            out,
            "… one session (connect, upgrade, echo, close), p50 (ms)",
            s.new_p50,
            2,
        );
        row(out, "… p99 (ms)", s.new_p99, 2);
        if v.client_tls {
            row(
                out,
                &format!(
                    "new sessions per second, full TLS handshakes ({NEW_THREADS} threads, {} sessions)",
                    k.new_sessions
                ),
                s.new_full_rate,
                0,
            );
            row(out, "… one session, p50 (ms)", s.new_full_p50, 2);
        }
        row(
            out,
            &format!(
                "opening {} idle sessions, sequentially (sessions/s)",
                k.idle
            ),
            s.idle_open_rate,
            0,
        );
        row(
            out,
            "… upgrade alone (connect → 101), p50 (µs)",
            s.idle_upgrade_p50,
            1,
        );
        row(out, "… p99 (µs)", s.idle_upgrade_p99, 1);
        if v.tls || v.client_tls {
            let _ = writeln!(
                out,
                "\nThe direct route speaks TLS to the origin exactly when the upstream is TLS; the \
                 concurrent client is plain-only, hence no figure there for a route that speaks TLS \
                 to its client. The first new-session row lets sessions resume (each route has its \
                 own client session cache); \"full TLS handshakes\" runs without one."
            );
        }

        let _ = writeln!(
            out,
            "\n| cost in the proxy (ours: our process; nginx: its worker; HAProxy: its process) | ours | nginx | HAProxy | ours/nginx | ours/better peer |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        let row2 =
            |out: &mut String, name: &str, vals: [f64; 4], d: usize, extra: Option<[f64; 4]>| {
                let cell = |i: usize| match extra {
                    Some(e) if e[i].is_finite() => {
                        format!("{} ({:.0} % sys)", fmt_num(vals[i], d), 100.0 * e[i])
                    }
                    _ => fmt_num(vals[i], d),
                };
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} | {} |",
                    cell(1),
                    cell(2),
                    cell(3),
                    ratio(vals[1], vals[2]),
                    ratio(vals[1], best_peer(vals, false))
                );
            };
        row2(
            out,
            "CPU per GiB downstream (s)",
            s.down_cpu,
            3,
            Some(s.down_sys),
        );
        row2(out, "CPU per GiB upstream (s)", s.up_cpu, 3, Some(s.up_sys));
        row2(
            out,
            "CPU busy while streaming downstream (% of a core)",
            s.down_busy,
            0,
            None,
        );
        row2(
            out,
            "CPU busy while streaming upstream (% of a core)",
            s.up_busy,
            0,
            None,
        );
        row2(
            out,
            "CPU per sequential round trip (µs)",
            s.rtt_cpu_us,
            1,
            Some(s.rtt_sys),
        );
        row2(
            out,
            "CPU per concurrent round trip (µs)",
            s.conc_cpu_us,
            1,
            Some(s.conc_sys),
        );
        row2(
            out,
            "CPU per 1,000 new sessions (s)",
            s.new_cpu,
            3,
            Some(s.new_sys),
        );
        if v.client_tls {
            row2(
                out,
                "CPU per 1,000 new sessions, full TLS handshakes (s)",
                s.new_full_cpu,
                3,
                Some(s.new_full_sys),
            );
        }
        row2(
            out,
            &format!("CPU while {} sessions sit idle (% of a core)", k.idle),
            s.idle_cpu,
            2,
            None,
        );
        let half = k.idle / 2;
        row2(
            out,
            "idle sessions, fresh process: RSS at start (KiB)",
            s.idle_start,
            0,
            None,
        );
        row2(
            out,
            &format!("… RSS with {half} sessions (KiB)"),
            s.idle_half,
            0,
            None,
        );
        row2(
            out,
            &format!("… RSS with {} sessions (KiB)", k.idle),
            s.idle_full,
            0,
            None,
        );
        row2(
            out,
            &format!("… memory per idle session, average over {} (KiB)", k.idle),
            s.idle_avg,
            2,
            None,
        );
        row2(
            out,
            &format!(
                "… memory per idle session, marginal {half} → {} (KiB)",
                k.idle
            ),
            s.idle_marginal,
            2,
            None,
        );
        let with_slots = [
            f64::NAN,
            s.idle_avg[1],
            s.idle_avg[2] + s.nginx_slots_per_session,
            s.idle_avg[3],
        ];
        row2(
            out,
            "… per idle session incl. nginx's preallocated connection slots (KiB)",
            with_slots,
            2,
            None,
        );
        row2(out, "… peak RSS, VmHWM (KiB)", s.idle_peak, 0, None);
        let _ = writeln!(
            out,
            "\nnginx allocates and touches its `worker_connections` ({}) slots at start: RSS at \
             start was {} KiB with {} against {} KiB with {NGINX_SMALL_CONNECTIONS}, i.e. {} KiB \
             per idle session (two slots each) that the average above does not see. Our \
             long-running proxy's peak RSS (VmHWM) over all other workloads: {} KiB.",
            v.nginx_big_connections,
            v.nginx_start_big,
            v.nginx_big_connections,
            v.nginx_start_small,
            fmt_num(s.nginx_slots_per_session, 2),
            v.ours_peak_kib
        );
        if v.client_tls {
            let count = |p: &super::variant::PerRoute<Latency>, r: Route| {
                p.get(r)
                    .iter()
                    .fold((0, 0), |a, l| (a.0 + l.resumed, a.1 + l.samples.len()))
            };
            let parts: Vec<String> = [Route::Ours, Route::Nginx, Route::Haproxy]
                .iter()
                .map(|&r| {
                    let (a, b) = count(&v.news, r);
                    let (c, d) = count(&v.news_full, r);
                    format!("{} {a} of {b} (full-handshake run: {c} of {d})", r.name())
                })
                .collect();
            let _ = writeln!(
                out,
                "\nTLS handshakes with the client that resumed, new-session workload: {}.",
                parts.join(", ")
            );
        }
        if v.tls {
            let parts: Vec<String> = v
                .tls_resumed
                .iter()
                .filter(|(_, _, all)| *all > 0)
                .map(|(r, resumed, all)| format!("{} {resumed} of {all}", r.name()))
                .collect();
            let _ = writeln!(
                out,
                "\nTLS handshakes resumed at the origin during the new-session workload: {}.",
                parts.join(", ")
            );
        }
        if !v.nginx_log.is_empty() {
            let _ = writeln!(
                out,
                "\nnginx logged {} lines at `[error]` or worse, e.g. `{}`.",
                v.nginx_log.len(),
                v.nginx_log[0]
            );
        }
        let _ = writeln!(out);
        if let Some(sc) = &v.scaling {
            self.render_scaling(out, sc);
        }
    }

    /// WORKERS=1 against WORKERS=2: medians, the caveat that the load shares the CPUs, how the
    /// work split between the two loops, and every round.
    pub(crate) fn render_scaling(&self, out: &mut String, sc: &Scaling) {
        let k = self.knobs;
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let _ = writeln!(
            out,
            "##### Scaling: our proxy with `WORKERS=1` against `WORKERS=2` (plain upstream, all \
             {cpus} CPUs)\n"
        );
        let _ = writeln!(
            out,
            "| workload (median of {} rounds) | WORKERS=1 | WORKERS=2 | 2/1 |",
            k.rounds
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let row = |out: &mut String,
                   name: &str,
                   f: &dyn Fn(&[Latency]) -> f64,
                   samples: &[Vec<Latency>; 2],
                   d: usize| {
            let (one, two) = (f(&samples[0]), f(&samples[1]));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                fmt_num(one, d),
                fmt_num(two, d),
                ratio(two, one)
            );
        };
        let conc = format!("{} sessions × {} round trips", k.conc, k.conc_trips);
        row(
            out,
            &format!("{conc}: round trips per second"),
            &per_second,
            &sc.conc,
            0,
        );
        row(
            out,
            "… p50 (µs)",
            &|l| median_percentile_us(l, 0.50),
            &sc.conc,
            1,
        );
        row(
            out,
            "… proxy CPU per round trip (µs)",
            &|l| cpu_per(l, 1e6),
            &sc.conc,
            1,
        );
        row(
            out,
            "… proxy CPU busy (% of one core)",
            &busy_percent,
            &sc.conc,
            0,
        );
        row(
            out,
            &format!(
                "new sessions per second ({NEW_THREADS} threads, {} sessions)",
                k.new_sessions
            ),
            &per_second,
            &sc.news,
            0,
        );
        row(
            out,
            "… one session, p50 (ms)",
            &|l| median_percentile_us(l, 0.50) / 1000.0,
            &sc.news,
            2,
        );
        row(
            out,
            "… proxy CPU per 1,000 new sessions (s)",
            &|l| cpu_per(l, 1000.0),
            &sc.news,
            3,
        );
        row(
            out,
            "… proxy CPU busy (% of one core)",
            &busy_percent,
            &sc.news,
            0,
        );
        let pct = |v: &[f64]| list_or_dash(v.iter().map(|s| format!("{:.0}", 100.0 * s)).collect());
        let _ = writeln!(
            out,
            "\nNo pinning in this section: the proxy and the load it serves may use every CPU \
             ({cpus} here). The load generator runs on the same CPUs — the client threads (one \
             mio thread for the concurrent sessions, {NEW_THREADS} for the new sessions) and the \
             origin (one thread), all in the bench process — so with two workers the proxy never \
             has two cores to itself, and **2/1 is a lower bound** of what a second core gives \
             it. Proxy CPU is the sum over its threads (`/proc/PID/task/*/schedstat`); unpinned, \
             it includes wakeups across CPUs, so it does not compare with the pinned figures \
             above. Every worker thread ran during every sample (checked; the bench fails \
             otherwise); with two workers the less busy one took this share of the proxy's CPU, \
             per round: concurrent {} %, new sessions {} %.\n",
            pct(&sc.conc_share),
            pct(&sc.news_share)
        );
        // A ratio near 1 means nothing if one worker was not saturated to begin with: say so
        // rather than let it read as "a second worker does not help".
        let idle_loop: Vec<String> = [
            ("the concurrent sessions", &sc.conc[0]),
            ("the new sessions", &sc.news[0]),
        ]
        .into_iter()
        .map(|(name, l)| (name, busy_percent(l)))
        .filter(|&(_, busy)| busy < SATURATED_PERCENT)
        .map(|(name, busy)| format!("{name} ({} %)", fmt_num(busy, 0)))
        .collect();
        if !idle_loop.is_empty() {
            let _ = writeln!(
                out,
                "**With one worker the proxy was not saturated**: busy less than \
                 {SATURATED_PERCENT:.0} % of one core with {}. There the load generator, not the \
                 proxy, set the pace, and the ratio says little about what the second worker can \
                 add.\n",
                idle_loop.join(" and ")
            );
        }
        let _ = writeln!(
            out,
            "<details><summary>scaling, all rounds (WORKERS=1 first in odd rounds, WORKERS=2 in \
             even ones)</summary>\n"
        );
        let _ = writeln!(out, "| per round | WORKERS=1 | WORKERS=2 |");
        let _ = writeln!(out, "|---|---|---|");
        let per_round = |l: &[Latency], f: &dyn Fn(&Latency) -> f64, d: usize| {
            list_or_dash(l.iter().map(|l| fmt_num(f(l), d)).collect())
        };
        let rate = |l: &Latency| l.samples.len() as f64 / l.elapsed.as_secs_f64();
        let per_1000 = |l: &Latency| 1000.0 * l.cpu.run / l.samples.len() as f64;
        let mut line =
            |name: &str, samples: &[Vec<Latency>; 2], f: &dyn Fn(&Latency) -> f64, d: usize| {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} |",
                    per_round(&samples[0], f, d),
                    per_round(&samples[1], f, d)
                );
            };
        line("concurrent round trips/s", &sc.conc, &rate, 0);
        line("new sessions/s", &sc.news, &rate, 0);
        line("proxy CPU s per 1,000 new sessions", &sc.news, &per_1000, 3);
        let _ = writeln!(out, "\n</details>\n");
    }

    pub(crate) fn render_targets(&self, out: &mut String, summaries: &[Summary]) {
        let _ = writeln!(out, "#### Targets\n");
        let _ = writeln!(
            out,
            "Each target is judged against nginx (as issues 6 and 15 set them) and against the \
             better of nginx and HAProxy (issue 16).\n"
        );
        let _ = writeln!(
            out,
            "| target | ours | nginx | HAProxy | ours/nginx | vs nginx | ours/better peer | vs better peer |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---:|---|");
        let verdict = |ours: f64, limit: f64| {
            if !(ours.is_finite() && limit.is_finite()) {
                "not measured"
            } else if ours <= limit {
                "met"
            } else {
                "not met"
            }
        };
        // `vals` in summary order (direct, ours, nginx, HAProxy); lower is better for each.
        let mut row = |name: &str, vals: [f64; 4], factor: f64, d: usize| {
            let (ours, nginx) = (vals[ix(Route::Ours)], vals[ix(Route::Nginx)]);
            let best = best_peer(vals, false);
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_num(ours, d),
                fmt_num(nginx, d),
                fmt_num(vals[ix(Route::Haproxy)], d),
                ratio(ours, nginx),
                verdict(ours, factor * nginx),
                ratio(ours, best),
                verdict(ours, factor * best),
            );
        };
        let added = |p: [f64; 4]| {
            let d = p[ix(Route::Direct)];
            [f64::NAN, p[1] - d, p[2] - d, p[3] - d]
        };
        for (v, s) in self.variants.iter().zip(summaries) {
            let tag = match (v.client_tls, v.tls) {
                (false, false) => "",
                (false, true) => "TLS upstream: ",
                (true, false) => "TLS client, plain upstream: ",
                (true, true) => "TLS client, TLS upstream: ",
            };
            if !v.tls && !v.client_tls {
                row("CPU per GiB downstream ≤ 0.8 × (s)", s.down_cpu, 0.8, 3);
                row("CPU per GiB upstream ≤ 0.8 × (s)", s.up_cpu, 0.8, 3);
                row("CPU per 1,000 new sessions ≤ 1 × (s)", s.new_cpu, 1.0, 3);
                row(
                    "round trip added over direct, p50 ≤ 1 × (µs)",
                    added(s.rtt_p50),
                    1.0,
                    1,
                );
                row(
                    "round trip added over direct, p99 ≤ 1 × (µs)",
                    added(s.rtt_p99),
                    1.0,
                    1,
                );
                row(
                    "memory per idle session ≤ 0.25 × (KiB)",
                    s.idle_avg,
                    0.25,
                    2,
                );
                continue;
            }
            row(
                &format!("{tag}CPU per GiB downstream ≤ 1 × (s)"),
                s.down_cpu,
                1.0,
                3,
            );
            row(
                &format!("{tag}CPU per GiB upstream ≤ 1 × (s)"),
                s.up_cpu,
                1.0,
                3,
            );
            if v.client_tls {
                row(
                    &format!("{tag}CPU per 1,000 new TLS sessions, resumed ≤ 1 × (s)"),
                    s.new_cpu,
                    1.0,
                    3,
                );
                row(
                    &format!("{tag}CPU per 1,000 new TLS sessions, full handshakes ≤ 1 × (s)"),
                    s.new_full_cpu,
                    1.0,
                    3,
                );
                row(
                    &format!("{tag}round trip added over direct, p50 ≤ 1 × (µs)"),
                    added(s.rtt_p50),
                    1.0,
                    1,
                );
            }
            row(
                &format!("{tag}memory per idle session ≤ 0.5 × (KiB)"),
                s.idle_avg,
                0.5,
                2,
            );
        }
        let _ = writeln!(
            out,
            "\nMemory targets use the average over the idle sessions from each process's own start, \
             which leaves out nginx's preallocated connection slots (counting them would favour \
             us). Targets are reported, not enforced.\n"
        );
    }

    /// The README's tables (Performance, "Against nginx and HAProxy"), ready to paste: each
    /// variant's headline figures with ours, both peers and ours against the better peer.
    pub(crate) fn render_readme(&self, out: &mut String, summaries: &[Summary]) {
        let k = self.knobs;
        let _ = writeln!(
            out,
            "#### For the README (medians of {} rounds; `a / b` cells pair two figures)\n",
            k.rounds
        );
        let route_cell = |vals: &[[f64; 4]], r: Route, d: usize| {
            let parts: Vec<String> = vals.iter().map(|v| fmt_num(v[ix(r)], d)).collect();
            parts.join(" / ")
        };
        let ratio_cell = |vals: &[[f64; 4]], higher: bool| {
            let parts: Vec<String> = vals
                .iter()
                .map(|v| ratio(v[ix(Route::Ours)], best_peer(*v, higher)))
                .collect();
            parts.join(" / ")
        };
        for (v, s) in self.variants.iter().zip(summaries) {
            let name = match (v.client_tls, v.tls) {
                (false, false) => "plain `ws://`",
                (false, true) => "TLS upstream `wss://`",
                (true, false) => "TLS client side, plain upstream",
                (true, true) => "TLS client side and upstream",
            };
            let _ = writeln!(
                out,
                "| {name} | ours | nginx | HAProxy | ours/better peer |\n|---|---:|---:|---:|---:|"
            );
            let mut row = |label: &str, vals: &[[f64; 4]], d: usize, higher: bool| {
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} | {} | {} |",
                    route_cell(vals, Route::Ours, d),
                    route_cell(vals, Route::Nginx, d),
                    route_cell(vals, Route::Haproxy, d),
                    ratio_cell(vals, higher)
                );
            };
            let added = |p: [f64; 4]| {
                let d = p[ix(Route::Direct)];
                [f64::NAN, p[1] - d, p[2] - d, p[3] - d]
            };
            row(
                "CPU per GiB relayed, downstream / upstream (s)",
                &[s.down_cpu, s.up_cpu],
                3,
                false,
            );
            row(
                "throughput, downstream / upstream (MiB/s)",
                &[s.down_rate, s.up_rate],
                0,
                true,
            );
            row(
                "round-trip latency added over direct, p50 / p99 (µs)",
                &[added(s.rtt_p50), added(s.rtt_p99)],
                1,
                false,
            );
            if v.client_tls {
                row(
                    "CPU per sequential round trip (µs)",
                    &[s.rtt_cpu_us],
                    1,
                    false,
                );
                row(
                    &format!(
                        "new sessions/s from {NEW_THREADS} clients, resumed / full handshakes"
                    ),
                    &[s.new_rate, s.new_full_rate],
                    0,
                    true,
                );
                row(
                    "CPU per 1,000 new TLS sessions, resumed / full handshakes (s)",
                    &[s.new_cpu, s.new_full_cpu],
                    3,
                    false,
                );
            } else {
                row(
                    "CPU per sequential / concurrent round trip (µs)",
                    &[s.rtt_cpu_us, s.conc_cpu_us],
                    1,
                    false,
                );
                row(
                    &format!("new sessions/s from {NEW_THREADS} clients"),
                    &[s.new_rate],
                    0,
                    true,
                );
                row("CPU per 1,000 new sessions (s)", &[s.new_cpu], 3, false);
            }
            row(
                &format!("memory per idle session, {} sessions (KiB)", k.idle),
                &[s.idle_avg],
                2,
                false,
            );
            let _ = writeln!(out);
        }
    }

    /// Every round, so the spread behind the medians is visible.
    pub(crate) fn render_rounds(&self, out: &mut String, v: &VariantResults) {
        let payload = self.knobs.mib as f64;
        let list = list_or_dash;
        let rate = |t: &[Transfer]| {
            list(
                t.iter()
                    .map(|t| format!("{:.0}", payload / t.elapsed.as_secs_f64()))
                    .collect(),
            )
        };
        let cpu = |t: &[Transfer]| {
            list(
                t.iter()
                    .map(|t| format!("{:.3}", t.cpu.run / (payload / 1024.0)))
                    .collect(),
            )
        };
        let pct = |l: &[Latency], q| {
            list(
                l.iter()
                    .map(|l| format!("{:.1}", percentile_us(&l.samples, q)))
                    .collect(),
            )
        };
        let per_s = |l: &[Latency]| {
            list(
                l.iter()
                    .map(|l| format!("{:.0}", l.samples.len() as f64 / l.elapsed.as_secs_f64()))
                    .collect(),
            )
        };
        let idle = |i: &[Idle]| {
            list(
                i.iter()
                    .map(|i| format!("{:.2}", i.per_session_kib()))
                    .collect(),
            )
        };
        let _ = writeln!(
            out,
            "<details><summary>all rounds, {} client side, {} upstream</summary>\n",
            if v.client_tls { "TLS" } else { "plain" },
            if v.tls { "TLS" } else { "plain" }
        );
        let _ = writeln!(out, "| per round | direct | ours | nginx | HAProxy |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let mut line = |name: &str, f: &dyn Fn(Route) -> String| {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                f(Route::Direct),
                f(Route::Ours),
                f(Route::Nginx),
                f(Route::Haproxy)
            );
        };
        line("downstream MiB/s", &|r| rate(v.down.get(r)));
        let proxied = |r: Route, s: String| {
            if r == Route::Direct {
                "—".to_string()
            } else {
                s
            }
        };
        line("downstream CPU s/GiB", &|r| proxied(r, cpu(v.down.get(r))));
        line("upstream MiB/s", &|r| rate(v.up.get(r)));
        line("upstream CPU s/GiB", &|r| proxied(r, cpu(v.up.get(r))));
        line("sequential p50 µs", &|r| pct(v.rtt.get(r), 0.5));
        line("sequential p99 µs", &|r| pct(v.rtt.get(r), 0.99));
        line("concurrent p50 µs", &|r| pct(v.conc.get(r), 0.5));
        line("concurrent p99 µs", &|r| pct(v.conc.get(r), 0.99));
        line("new sessions/s", &|r| per_s(v.news.get(r)));
        let per_1000 = |l: &[Latency]| {
            list(
                l.iter()
                    .map(|l| format!("{:.3}", 1000.0 * l.cpu.run / l.samples.len() as f64))
                    .collect(),
            )
        };
        line("CPU s per 1,000 new sessions", &|r| {
            proxied(r, per_1000(v.news.get(r)))
        });
        if v.client_tls {
            line("… full TLS handshakes", &|r| {
                proxied(r, per_1000(v.news_full.get(r)))
            });
        }
        line("idle KiB/session", &|r| idle(v.idle.get(r)));
        let _ = writeln!(out, "\n</details>\n");
    }
}

/// A variant's heading: what each side speaks and how each proxy is set up for it.
pub(crate) fn variant_title(v: &VariantResults) -> String {
    let upstream = if v.tls {
        "TLS upstream (`wss://`: our proxy in in-cluster mode with a service-account CA and \
         bearer; nginx `proxy_pass https://` with `proxy_ssl_verify on`, HAProxy `server ... ssl \
         verify required`, the same CA and bearer)"
    } else {
        "plain upstream (`ws://`: our proxy in local dev mode; nginx `proxy_pass http://`, \
         HAProxy `server` without `ssl`)"
    };
    if v.client_tls {
        format!(
            "TLS client side (`wss://` to the proxy: our TLS_CERT_FILE/TLS_KEY_FILE, nginx \
             `listen ssl`, HAProxy `bind ssl`, one ECDSA P-256 certificate, TLS 1.2 and 1.3, \
             resumption by tickets and session cache), {upstream}"
        )
    } else {
        let mut t = format!("Plain client side, {upstream}");
        t[..1].make_ascii_uppercase();
        t
    }
}
