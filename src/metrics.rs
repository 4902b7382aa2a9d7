//! Counters and histograms, fed by session events and by the loop, rendered
//! in the Prometheus text format (version 0.0.4) for `GET /metrics`.
//! Hand-written: a handful of counters does not need a metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::events::{Event, Observer, SessionEnd};
use crate::http::Status;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default, Clone, PartialEq)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(other.counts) {
            *c += o;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metrics {
    sessions_by_end: BTreeMap<SessionEnd, u64>,
    refusals_by_status: BTreeMap<Status, u64>,
    /// Bytes of ended sessions (see `end_session`).
    bytes_up: u64,
    bytes_down: u64,
    /// Bytes of open sessions, as far as counted (see `count_live`): the
    /// counter moves while a console is open, not all at once when it ends.
    live_up: u64,
    live_down: u64,
    handshake: Histogram,
    upstream_dial: Histogram,
    /// Sessions ended because a peer stopped answering keepalive pings.
    pub keepalive_timeouts: u64,
    /// Times a relay buffer filled up and reading from its source paused.
    pub backpressure_pauses: u64,
    /// Times a connection limit was hit.
    pub limits_hit: u64,
    /// Listener TLS handshakes that failed (no or untrusted client
    /// certificate, no common version, not TLS at all).
    pub tls_handshake_failures: u64,
    /// Listener certificates loaded after a rotation.
    pub tls_reloads: u64,
    /// Rotated listener certificate files that did not load (the old
    /// certificate stayed).
    pub tls_reload_failures: u64,
}

/// Live values the loop knows at render time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Connections open (any state).
    pub open_connections: usize,
    /// Sessions relaying frames.
    pub relaying: usize,
    /// Relay buffers in use.
    pub buffers_in_use: usize,
    /// Of those, bulk buffers.
    pub bulk_buffers_in_use: usize,
    /// Bytes of the relay buffers in use.
    pub buffer_bytes: usize,
    /// Sessions waiting for relay memory.
    pub waiting_for_memory: usize,
    /// Draining for shutdown.
    pub draining: bool,
    /// Event loops of the process (`WORKERS`). Not summed by
    /// [`add`](Self::add): the loop serving `/metrics` sets both for the
    /// process.
    pub workers: usize,
    /// Of those, the ones still running (a dead one serves nobody).
    pub workers_alive: usize,
    /// MAX_CONNECTIONS of this loop (summed: the process's capacity).
    pub max_connections: usize,
    /// When the listener's certificate chain expires (Unix seconds), when
    /// the listener speaks TLS. Not combined by [`add`](Self::add): the
    /// workers share one TLS state, which the loop serving `/metrics` reads
    /// when it renders (a worker's published copy may be a pass old).
    pub tls_not_after: Option<i64>,
}

impl Gauges {
    /// Add another worker's values (draining if either is).
    pub fn add(&mut self, other: &Gauges) {
        self.open_connections += other.open_connections;
        self.relaying += other.relaying;
        self.buffers_in_use += other.buffers_in_use;
        self.bulk_buffers_in_use += other.bulk_buffers_in_use;
        self.buffer_bytes += other.buffer_bytes;
        self.waiting_for_memory += other.waiting_for_memory;
        self.draining |= other.draining;
        self.max_connections += other.max_connections;
    }
}

impl Metrics {
    /// Bytes an open session relayed since it was last counted.
    pub(crate) fn count_live(&mut self, (up, down): (u64, u64)) {
        self.live_up += up;
        self.live_down += down;
    }

    /// A session ends with `total` bytes, of which `counted` were in the
    /// live count: they move to the ended sessions' count in one step, so
    /// a `/metrics` rendered at any moment (one may be answered between a
    /// session's end and its `Closed` event's dispatch) never sees the sum
    /// go down.
    pub(crate) fn end_session(&mut self, counted: (u64, u64), total: (u64, u64)) {
        self.live_up = self.live_up.saturating_sub(counted.0);
        self.live_down = self.live_down.saturating_sub(counted.1);
        self.bytes_up += total.0;
        self.bytes_down += total.1;
    }

    /// Add another worker's counts.
    pub fn merge(&mut self, other: &Metrics) {
        for (k, v) in &other.sessions_by_end {
            *self.sessions_by_end.entry(*k).or_default() += v;
        }
        for (k, v) in &other.refusals_by_status {
            *self.refusals_by_status.entry(*k).or_default() += v;
        }
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.live_up += other.live_up;
        self.live_down += other.live_down;
        self.handshake.merge(&other.handshake);
        self.upstream_dial.merge(&other.upstream_dial);
        self.keepalive_timeouts += other.keepalive_timeouts;
        self.backpressure_pauses += other.backpressure_pauses;
        self.limits_hit += other.limits_hit;
        self.tls_handshake_failures += other.tls_handshake_failures;
        self.tls_reloads += other.tls_reloads;
        self.tls_reload_failures += other.tls_reload_failures;
    }

    /// Render in the Prometheus text format.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let outcomes: Vec<(String, u64)> = SessionEnd::ALL
            .iter()
            .map(|end| {
                (
                    format!("{{outcome=\"{end}\"}}"),
                    self.sessions_by_end.get(end).copied().unwrap_or(0),
                )
            })
            .collect();
        counter(
            "kubevirt_vnc_proxy_sessions_total",
            "Relayed sessions that ended, by outcome.",
            &outcomes,
        );
        let refusals: Vec<(String, u64)> = self
            .refusals_by_status
            .iter()
            .map(|(s, v)| (format!("{{status=\"{s}\"}}"), *v))
            .collect();
        counter(
            "kubevirt_vnc_proxy_refusals_total",
            "Requests refused before relaying, by HTTP status.",
            &refusals,
        );
        counter(
            "kubevirt_vnc_proxy_bytes_total",
            "Frame bytes relayed, by direction (open sessions' counted every second).",
            &[
                ("{direction=\"up\"}".into(), self.bytes_up + self.live_up),
                (
                    "{direction=\"down\"}".into(),
                    self.bytes_down + self.live_down,
                ),
            ],
        );
        counter(
            "kubevirt_vnc_proxy_keepalive_timeouts_total",
            "Sessions ended because a peer stopped answering pings.",
            &[(String::new(), self.keepalive_timeouts)],
        );
        counter(
            "kubevirt_vnc_proxy_backpressure_pauses_total",
            "Times a relay buffer filled and reading its source paused.",
            &[(String::new(), self.backpressure_pauses)],
        );
        counter(
            "kubevirt_vnc_proxy_limits_hit_total",
            "Times MAX_CONNECTIONS or MAX_CONNECTIONS_PER_IP was hit.",
            &[(String::new(), self.limits_hit)],
        );
        // The TLS families exist only when the listener speaks TLS.
        if g.tls_not_after.is_some() {
            counter(
                "kubevirt_vnc_proxy_tls_handshake_failures_total",
                "Client TLS handshakes that failed (no or untrusted client certificate, no common version or ALPN, not TLS).",
                &[(String::new(), self.tls_handshake_failures)],
            );
            counter(
                "kubevirt_vnc_proxy_tls_reloads_total",
                "Rotated TLS_CERT_FILE/TLS_KEY_FILE/CLIENT_CA_FILE sets loaded (once per process: the workers share one TLS state).",
                &[(String::new(), self.tls_reloads)],
            );
            counter(
                "kubevirt_vnc_proxy_tls_reload_failures_total",
                "Rotated TLS file sets that did not load; the previous certificate kept serving (once per process).",
                &[(String::new(), self.tls_reload_failures)],
            );
        }
        let mut gauge = |name: &str, help: &str, v: &dyn std::fmt::Display| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "kubevirt_vnc_proxy_open_connections",
            "Client connections open, in any state, as MAX_CONNECTIONS counts them (the probe port's not included).",
            &g.open_connections,
        );
        gauge(
            "kubevirt_vnc_proxy_open_sessions",
            "Sessions relaying frames.",
            &g.relaying,
        );
        gauge(
            "kubevirt_vnc_proxy_buffers_in_use",
            "Relay buffers held by sessions.",
            &g.buffers_in_use,
        );
        gauge(
            "kubevirt_vnc_proxy_bulk_buffers_in_use",
            "Bulk relay buffers held by sessions streaming in bulk (at most RELAY_BULK_BUFFERS).",
            &g.bulk_buffers_in_use,
        );
        gauge(
            "kubevirt_vnc_proxy_buffer_bytes",
            "Bytes of the relay buffers held by sessions (at most RELAY_MEMORY_BYTES per worker, but for handshake leftovers).",
            &g.buffer_bytes,
        );
        gauge(
            "kubevirt_vnc_proxy_sessions_waiting_for_memory",
            "Sessions with a direction waiting for a relay buffer (RELAY_MEMORY_BYTES reached): their sources go unread.",
            &g.waiting_for_memory,
        );
        gauge(
            "kubevirt_vnc_proxy_draining",
            "1 while shutting down.",
            &usize::from(g.draining),
        );
        gauge(
            "kubevirt_vnc_proxy_max_connections",
            "MAX_CONNECTIONS times the workers: the connections the process accepts at most.",
            &g.max_connections,
        );
        if let Some(t) = g.tls_not_after {
            gauge(
                "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds",
                "When the served TLS certificate expires (notAfter, Unix seconds).",
                &t,
            );
        }
        gauge(
            "kubevirt_vnc_proxy_workers",
            "Event loops the process started (WORKERS).",
            &g.workers,
        );
        gauge(
            "kubevirt_vnc_proxy_workers_alive",
            "Event loops still running; fewer than the workers outside a shutdown: one died, and /healthz answers 503.",
            &g.workers_alive,
        );
        self.handshake.render(
            &mut out,
            "kubevirt_vnc_proxy_handshake_seconds",
            "From accept to the client's 101.",
        );
        self.upstream_dial.render(
            &mut out,
            "kubevirt_vnc_proxy_upstream_dial_seconds",
            "From dialing the upstream to its 101.",
        );
        out
    }
}

impl Observer for Metrics {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Opened {
                handshake,
                upstream_dial,
                ..
            } => {
                self.handshake.observe(*handshake);
                self.upstream_dial.observe(*upstream_dial);
            }
            Event::Refused { status, .. } => {
                *self.refusals_by_status.entry(*status).or_default() += 1
            }
            // Its bytes were counted when it ended (`end_session`).
            Event::Closed { end, .. } => {
                *self.sessions_by_end.entry(*end).or_default() += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_in_the_text_format() {
        let mut m = Metrics::default();
        m.on_event(&Event::Refused {
            id: 1,
            peer: "127.0.0.1:1".parse().unwrap(),
            status: Status::Unauthorized,
            reason: "x".into(),
            vmi: None,
            namespace: None,
            detail: None,
        });
        m.on_event(&Event::Opened {
            id: 2,
            peer: "127.0.0.1:1".parse().unwrap(),
            namespace: "n".into(),
            vmi: "v".into(),
            token_id: "5".into(),
            handshake: Duration::from_millis(3),
            upstream_dial: Duration::from_millis(2),
        });
        let text = m.render(Gauges::default());
        assert!(text.contains("kubevirt_vnc_proxy_refusals_total{status=\"401\"} 1"));
        assert!(text.contains("kubevirt_vnc_proxy_handshake_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("kubevirt_vnc_proxy_handshake_seconds_count 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(!name.is_empty());
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
