//! What the benches read about a process from `/proc`: CPU time (clock ticks and the
//! scheduler's nanoseconds), memory (`/proc/PID/status`) and open descriptors.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

/// `getconf CLK_TCK` (100 where it cannot be read), read once: the unit of utime and stime.
pub fn clock_ticks_per_second() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&t| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A file under `/proc`, with its path in the error.
pub fn read_proc(path: &str) -> Res<String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state). The command
/// name (field 2) may contain spaces, so the split starts after its closing parenthesis.
pub fn stat_fields(pid: u32) -> Res<Vec<String>> {
    let text = read_proc(&format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// `(utime, stime)` of `pid` in seconds: fields 14 and 15 of `/proc/PID/stat`, in clock ticks.
pub fn user_sys_seconds(pid: u32) -> Res<(f64, f64)> {
    let fields = stat_fields(pid)?;
    let ticks = |i: usize| -> Res<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| format!("malformed /proc/{pid}/stat"))
    };
    Ok((
        ticks(11)? / clock_ticks_per_second(),
        ticks(12)? / clock_ticks_per_second(),
    ))
}

/// Scheduler run time (ns, `/proc/PID/task/TID/schedstat`) of each thread of `pid`, by thread
/// id; a thread that ends while being read is left out.
pub fn thread_run_ns(pid: u32) -> Res<Vec<(u32, u64)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("read /proc/{pid}/task: {e}"))?;
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        out.push((tid, ns));
    }
    Ok(out)
}

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM, ...).
pub fn status_kib(pid: u32, field: &str) -> Res<u64> {
    let path = format!("/proc/{pid}/status");
    read_proc(&path)?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in {path}"))
}

/// How long to watch a reading settle: it is taken as settled after `samples` equal readings
/// `interval` apart, or whatever it is at `limit`.
#[derive(Clone, Copy)]
pub struct Settle {
    pub samples: usize,
    pub interval: Duration,
    pub limit: Duration,
}

/// VmRSS once it has stopped moving (freed memory and lazily touched pages take a moment).
pub fn settled_rss_kib(pid: u32, settle: Settle) -> Res<u64> {
    let deadline = Instant::now() + settle.limit;
    let mut last = status_kib(pid, "VmRSS")?;
    let mut same = 0;
    while same < settle.samples && Instant::now() < deadline {
        thread::sleep(settle.interval);
        let now = status_kib(pid, "VmRSS")?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// Open descriptors of `pid`: entries of `/proc/PID/fd`.
pub fn fd_count(pid: u32) -> Res<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .map_err(|e| format!("read {path}: {e}"))?
        .count())
}

/// What the open descriptors of `pid` are, grouped ("socket: 12, pipe: 1, ..."), for error
/// messages.
pub fn fd_summary(pid: u32) -> String {
    let path = format!("/proc/{pid}/fd");
    let Ok(dir) = std::fs::read_dir(&path) else {
        return format!("cannot read {path}");
    };
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for entry in dir.flatten() {
        let link = std::fs::read_link(entry.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        let kind = link.split([':', '[']).next().unwrap_or("?").to_string();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
