//! What the benches share, included by each with `mod support;` (a directory module, so Cargo
//! does not take it for a bench target of its own):
//!
//! - `knobs.rs`: reading the `BENCH_*` environment knobs;
//! - `proxy.rs`: the proxy binary as a child process (clean environment, its stderr lines, its
//!   "listening on" address, killed when dropped);
//! - `procfs.rs`: CPU time, RSS and descriptors of a process, from `/proc`;
//! - `stats.rs`: medians, percentiles, minimum and maximum;
//! - `report.rs`: the machine and load the numbers were taken on, and where a report is written;
//! - here: the open-files limit, raised and shared out.
#![allow(dead_code)]

pub mod knobs;
pub mod procfs;
pub mod proxy;
pub mod report;
pub mod stats;

pub use report::{load_average, machine, write_report};

#[path = "../../tests/support/fdlimit.rs"]
mod fdlimit;

/// Descriptors a bench keeps free beside its sessions: the stand-in's listener, the proxy's
/// pipes, the report, the sessions of the other workloads on their way out.
pub const FD_RESERVE: u64 = 64;

/// The soft open-files limit of this process, raised to the hard limit (see
/// `tests/support/fdlimit.rs`).
pub fn raise_nofile_limit() -> u64 {
    fdlimit::nofile_limit()
}

/// How many of `wanted` sessions `bench` can hold open at once when each costs `per_session`
/// descriptors in this process (the proxy, a child, inherits the same limit and holds two per
/// session), beside [`FD_RESERVE`].
pub fn fit_to_nofile_limit(bench: &str, wanted: usize, per_session: usize) -> usize {
    fdlimit::fit_to_nofile_limit(&format!("bench {bench}"), wanted, per_session, FD_RESERVE)
}
