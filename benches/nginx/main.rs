//! The proxy against nginx and HAProxy as WebSocket reverse proxies, and all three against a
//! direct connection, to the same upstream, in one run.
//!
//! Run with `bash benches/nginx-setup.sh && cargo bench --bench nginx` (the script installs
//! Debian's nginx and haproxy if they are missing). Four routes reach one upstream:
//!
//! - **direct**: the client dials the upstream itself, on the KubeVirt path;
//! - **ours**: the release binary of this crate as a child process, with a fresh HS256 token
//!   per session;
//! - **nginx**: `nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'` as a child process, one
//!   worker, `proxy_buffering off`, the usual `Upgrade`/`Connection` headers, a regex location
//!   that maps `/TOKEN/VMI` to the same KubeVirt path our proxy sends. nginx checks no token:
//!   it does strictly less work per session than our proxy;
//! - **HAProxy**: `haproxy -db -f DIR/haproxy.cfg` as a child process (one process, `nbthread
//!   1`), HTTP mode with `option splice-auto`, `http-request replace-path` for the same mapping,
//!   `timeout tunnel` for the upgraded connection, no token check either (`haproxy.rs`).
//!
//! The upstream ("origin") is written here, not taken from `tests/support/upstream.rs`: that
//! stand-in runs a thread per connection, generates its stream byte by byte and hashes what it
//! sinks, which caps throughput well below what the proxies can do, and 9,000 idle sessions
//! would be 9,000 threads. The origin is one mio thread in the bench process: it writes a
//! pre-built stream of frames, compares what it sinks with a pre-built masked stream (memcmp),
//! echoes, and serves plain TCP or TLS (rustls, the certificates of `tests/support/pki.rs`).
//! It accepts only the KubeVirt VNC path for namespace `lab-ns`, so every route must present
//! the same upstream request; in the TLS variant it also requires the service-account bearer.
//!
//! Workloads, identical on every route (R rounds, the order of the routes rotating per round,
//! medians reported):
//!
//! 1. downstream: S MiB in 64 KiB binary frames from the origin, compared byte for byte;
//! 2. upstream: S MiB in 64 KiB masked frames to the origin's sink, clock stopped by its close
//!    reply (it checks everything before answering);
//! 3. N sequential 32-byte echo round trips on one session per route (p50, p99, added over
//!    direct), the routes taking turns in batches of 500 so that noise from elsewhere on the
//!    machine lands on all of them alike;
//! 4. C concurrent sessions doing T round trips each, driven by one mio client thread (total
//!    time, p50, p99);
//! 5. new sessions: 16 client threads, each session connect + upgrade + one echo + close,
//!    M sessions in all (sessions per second, p50/p99 of a whole session);
//! 6. K idle sessions (one echo each) on a *fresh* proxy, a fresh nginx and a fresh HAProxy
//!    per round: RSS of our process, of the nginx worker and of HAProxy at 0, K/2 and K
//!    sessions (the allocator keeps freed memory, so a reused process would measure almost
//!    nothing).
//!
//! The report ends with the README's tables ("For the README"), ratios against the better of
//! nginx and HAProxy (the lower cost, the higher rate).
//!
//! Scaling (plain variant only, after its rounds): workloads 4 and 5 again on two more processes
//! of ours, started with `WORKERS=1` and `WORKERS=2`, taking turns in each round (the order
//! alternating), with the pinning undone so that every CPU is available to them (the rest of the
//! run stays placed as `BENCH_PIN` says). A worker is a thread; the proxy's thread names cannot
//! tell a loop from its signal thread, so in every sample at least WORKERS of its threads must
//! have run (`/proc/PID/task/*/schedstat`), or the bench fails. The load generator (client
//! threads, the origin) runs on the same CPUs, so the ratio 2/1 is a lower bound of what a
//! second core gives the proxy.
//!
//! Costs are read from `/proc`: our proxy process, the nginx *worker* (the child of the
//! master; the master does nothing per connection), the HAProxy process. CPU is the run time the scheduler
//! accounted (`/proc/PID/task/*/schedstat`, nanoseconds) with its user/system split from
//! utime/stime in `/proc/PID/stat` (clock ticks, too coarse alone for a 0.1 s transfer).
//!
//! Four variants run: plain `ws://` upstream (our proxy in local dev mode) and TLS upstream
//! (our proxy in in-cluster mode with a service-account directory; nginx with `proxy_ssl_verify
//! on`, HAProxy with `ssl verify required`, the same CA and bearer, TLS 1.2 and 1.3 allowed),
//! each with the client side plain and with the client side over TLS (issue 15, point 5: our
//! proxy with `TLS_CERT_FILE`/`TLS_KEY_FILE`, nginx `listen ssl`, HAProxy `bind ssl`, one ECDSA
//! P-256 certificate from the test CA for all three, TLS 1.2 and 1.3; resumption as each
//! would be deployed: ours tickets plus a session cache, nginx `ssl_session_cache
//! shared:SSL:10m` with tickets, HAProxy its defaults, a 20,000-session cache and tickets).
//! The direct route speaks TLS exactly when the upstream does. In the client-TLS variants the
//! bench's client is rustls with ALPN `http/1.1` and one session cache per route (rustls keys
//! it by server name, 127.0.0.1 for every route); the new-session workload runs twice, once
//! letting sessions resume and once with no client cache (full handshakes), and the report
//! counts the resumed handshakes. The concurrent workload's mio client is plain TCP only, so
//! it skips a route that speaks TLS to its client.
//!
//! Knobs (environment): `BENCH_MIB` (S, 256), `BENCH_RTT` (N, 20000), `BENCH_CONC` (C, 1000),
//! `BENCH_CONC_TRIPS` (T, 100), `BENCH_NEW` (M, 4000), `BENCH_IDLE` (K, 9000), `BENCH_ROUNDS`
//! (R, 3), `BENCH_TLS` (1; 0 skips the TLS variant), `BENCH_WORKERS` (1; 0 skips the scaling
//! section), `BENCH_LOGLEVEL` (our proxy's LOGLEVEL, WARNING: nginx runs with `access_log off`,
//! so our per-session INFO lines would be extra work), `NGINX` (the nginx binary). For experiments: `BENCH_PROXY_ENV=K=V,K=V` (extra
//! environment for our proxy, e.g. `RELAY_BUFFER_BYTES=262144`) and `BENCH_NGINX_DIRECTIVES`
//! (extra directives in nginx's server block, e.g. `proxy_buffer_size 64k; proxy_buffers 4
//! 64k; proxy_busy_buffers_size 64k;`); both appear in the reported command line.
//! `BENCH_PROXY_BIN` measures another build of the proxy (one with symbols, for perf).
//! `BENCH_PIN` places the processes with taskset(1) for the whole run but the scaling section:
//! `one` (default) puts the bench, our proxy and the nginx worker on the last CPU, `split` the
//! proxies on the last CPU and the bench on the others, `off` leaves it to the scheduler. On a small VM a wakeup across
//! CPUs costs tens of microseconds and is charged, inflated, to the woken process, so without
//! pinning the latency and CPU figures depend on where each process happened to land (a round
//! trip's p50 flips between ~18 and ~90 µs from one round to the next).
//! `BENCH_CLIENT_TLS` (1; 0 skips the two client-TLS variants), `HAPROXY` (the haproxy binary).
//! `BENCH_SMOKE=1` (or no `--bench` argument, as under `cargo test --benches`) makes every
//! default tiny; explicit knobs still win.
//!
//! Every transfer, echo and close is verified; a mismatch, a refusal at the origin, a process
//! that died or a stuck socket (every socket has a timeout) makes the bench exit non-zero.
//! The report goes to stdout and `target/bench-nginx.md` (`bench-nginx-smoke.md` in smoke
//! mode). The targets section only reports whether each target is met.
//!
//! Where things are: `knobs.rs` (the `BENCH_*` knobs, open-files limits, CPU pinning),
//! `frames.rs` (WebSocket frames and the pre-built wire bytes), `origin.rs` (the mio WebSocket
//! origin server), `nginx.rs` (nginx's configuration and process), `haproxy.rs` (HAProxy's), `proxy.rs` (our proxy as a
//! child), `process.rs` (CPU time and RSS as this bench counts them), `client.rs` (the clients
//! and their routes), `workloads.rs` (each measured workload), `variant.rs` (every route and
//! round for a plain or TLS upstream), `scaling.rs` (one worker against two), `report.rs` (the
//! report's tables). What the benches share is in `benches/support/`.

#[path = "../../tests/support/pki.rs"]
mod pki;
#[path = "../../tests/support/tokens.rs"]
mod tokens;
#[path = "../../tests/support/upstream.rs"]
mod upstream;

#[path = "../support/mod.rs"]
mod support;

mod client;
mod frames;
mod haproxy;
mod knobs;
mod nginx;
mod origin;
mod process;
mod proxy;
mod report;
mod scale;
mod scaling;
mod variant;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use frames::Wire;
use haproxy::{find_haproxy, haproxy_version};
use knobs::{Knobs, raise_nofile_limit};
use nginx::{find_nginx, nginx_version};
use report::Report;
use support::procfs::Settle;
use support::proxy::PROXY_BIN;
use variant::run_variant;

/// The proxy binary to measure: `BENCH_PROXY_BIN` (for profiling a build with symbols) or the
/// one Cargo built.
pub(crate) fn proxy_bin() -> PathBuf {
    std::env::var_os("BENCH_PROXY_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(PROXY_BIN), PathBuf::from)
}
/// Namespace in the tokens, in nginx's rewrite and the only one the origin serves.
pub(crate) const NS: &str = "lab-ns";
/// The KubeVirt path prefix every route must present to the origin.
pub(crate) const KUBEVIRT_PREFIX: &str =
    "/apis/subresources.kubevirt.io/v1/namespaces/lab-ns/virtualmachineinstances/";
/// The service-account token in the TLS variant (the origin requires it as bearer).
pub(crate) const SA_TOKEN: &str = "bench-service-account-token-0123456789";
/// Size of each binary frame in the throughput workloads.
pub(crate) const FRAME: usize = 64 * 1024;
/// Size of each echo message.
pub(crate) const ECHO_LEN: usize = 32;
/// Untimed round trips before the timed sequential ones.
pub(crate) const WARMUP_TRIPS: usize = 200;
/// Sequential round trips per route before the next route takes its turn.
pub(crate) const RTT_BATCH: usize = 500;
/// Client threads opening new sessions.
pub(crate) const NEW_THREADS: usize = 16;
/// Read/write timeout on every blocking client socket: bounds every blocking loop.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started proxy or nginx has to accept connections.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// RSS counts as settled after 3 equal samples 100 ms apart, or after 5 s.
pub(crate) const SETTLE: Settle = Settle {
    samples: 3,
    interval: Duration::from_millis(100),
    limit: Duration::from_secs(5),
};
/// How long closed sessions may take to disappear from the origin.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Most frames read while waiting for a close reply.
pub(crate) const CLOSE_READ_LIMIT: usize = 1024;
/// Largest frame payload a client accepts outside the streaming workload.
pub(crate) const MAX_CLIENT_FRAME: usize = 1 << 20;
/// Largest request head the origin accepts.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// The origin stops reading a connection while this much output is queued.
pub(crate) const ORIGIN_OUT_LIMIT: usize = 1 << 20;
/// Rounds of read/write per connection per event before others get a turn.
pub(crate) const DRIVE_LIMIT: usize = 64;
/// Bytes per write() of the pre-built downstream stream.
pub(crate) const STREAM_CHUNK: usize = 4 << 20;
/// Descriptors kept in reserve beyond two per idle session.
pub(crate) const FD_RESERVE: u64 = 400;
/// nginx's worker_connections when sized small, to measure its preallocated slots.
pub(crate) const NGINX_SMALL_CONNECTIONS: usize = 128;

pub(crate) const MIB: f64 = 1024.0 * 1024.0;
pub(crate) const GIB: f64 = 1024.0 * MIB;

pub(crate) type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench nginx FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let started = Instant::now();
    let load_before = support::load_average();
    let limits = raise_nofile_limit()?;
    let mut knobs = Knobs::from_env()?;
    knobs.fit_idle_to(limits.0);
    let nginx_bin = find_nginx()?;
    let nginx_version = nginx_version(&nginx_bin);
    let haproxy_bin = find_haproxy()?;
    let haproxy_version = haproxy_version(&haproxy_bin);
    eprintln!(
        "bench nginx: {} ({nginx_version}, {haproxy_version})",
        knobs.describe()
    );

    let t = Instant::now();
    let wire = Arc::new(Wire::build(knobs.mib as usize * (1 << 20)));
    eprintln!(
        "bench nginx: built the {} MiB streams in {:.1} s",
        knobs.mib,
        t.elapsed().as_secs_f64()
    );

    // (upstream TLS, client TLS) per variant.
    let mut sides = vec![(false, false)];
    if knobs.tls {
        sides.push((true, false));
    }
    if knobs.client_tls {
        sides.push((false, true));
        if knobs.tls {
            sides.push((true, true));
        }
    }
    let mut variants = Vec::with_capacity(sides.len());
    for (tls, client_tls) in sides {
        variants.push(run_variant(
            &knobs,
            &wire,
            &nginx_bin,
            &haproxy_bin,
            tls,
            client_tls,
        )?);
    }
    let report = Report {
        knobs: &knobs,
        variants: &variants,
        nginx_version,
        haproxy_version,
        load_before,
        load_after: support::load_average(),
        limits,
        elapsed: started.elapsed(),
    }
    .render();
    println!("{report}");
    let path = support::write_report("nginx", knobs.smoke, &report)?;
    eprintln!("bench nginx: report written to {}", path.display());
    Ok(())
}
