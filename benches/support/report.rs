//! What every benchmark report says about where it ran, and where it is written.

use std::path::{Path, PathBuf};

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

/// The target directory: `CARGO_TARGET_DIR` if set, else two levels above the proxy binary
/// Cargo built for this bench (`target/release/kubevirt-vnc-proxy` under `cargo bench`).
pub fn target_dir() -> PathBuf {
    let bin = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(Path::new(bin).parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// `target/bench-NAME.md` (`-smoke.md` in smoke mode, so a CI smoke run never replaces real
/// figures), in [`target_dir`].
pub fn report_path(name: &str, smoke: bool) -> PathBuf {
    let suffix = if smoke { "-smoke" } else { "" };
    target_dir().join(format!("bench-{name}{suffix}.md"))
}

/// Writes `report` to [`report_path`]`(name, smoke)`; the path written.
pub fn write_report(name: &str, smoke: bool, report: &str) -> Result<PathBuf, String> {
    let path = report_path(name, smoke);
    std::fs::write(&path, report).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}
