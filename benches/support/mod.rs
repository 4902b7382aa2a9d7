//! What every benchmark report says about where it ran and where it is
//! written. Included by each bench with `mod support;` (a directory module,
//! so Cargo does not take it for a bench target of its own).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

#[path = "../../tests/support/fdlimit.rs"]
mod fdlimit;

/// CPU model, core count and kernel, for reading the numbers in context.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

/// `/proc/loadavg`'s 1-minute figure: other work on the machine skews every number.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `target/bench-NAME.md` (`-smoke.md` in smoke mode, so a CI smoke run never
/// replaces real figures): `CARGO_TARGET_DIR` if set, else two levels above
/// the proxy binary (`target/release/kubevirt-vnc-proxy`).
pub fn report_path(name: &str, smoke: bool) -> PathBuf {
    let bin = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(Path::new(bin).parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"));
    let suffix = if smoke { "-smoke" } else { "" };
    dir.join(format!("bench-{name}{suffix}.md"))
}

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
