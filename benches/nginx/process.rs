//! Processes: CPU time as the nginx bench counts it (scheduler run time, with the tick counts
//! for the user/system split), RSS once settled, ports, signals.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::procfs;
use crate::{Res, SETTLE, START_TIMEOUT};

/// CPU time of a process (or a difference of two readings), in seconds.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    /// Scheduler run time of all its threads (ns precision).
    pub(crate) run: f64,
    /// utime and stime (clock ticks), for the user/system split.
    pub(crate) user: f64,
    pub(crate) sys: f64,
}

impl Cpu {
    pub(crate) fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            run: self.run - earlier.run,
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }

    pub(crate) fn sys_share(self) -> f64 {
        let ticks = self.user + self.sys;
        if ticks > 0.0 {
            self.sys / ticks
        } else {
            f64::NAN
        }
    }
}

/// CPU time of `pid`: the scheduler run time of its threads, and utime and stime.
pub(crate) fn cpu_of(pid: u32) -> Res<Cpu> {
    let (user, sys) = procfs::user_sys_seconds(pid)?;
    let run_ns: u64 = procfs::thread_run_ns(pid)?.iter().map(|&(_, ns)| ns).sum();
    // Without schedstat (unusual kernels) fall back to the tick counts.
    let run = if run_ns > 0 {
        run_ns as f64 / 1e9
    } else {
        user + sys
    };
    Ok(Cpu { run, user, sys })
}

/// VmRSS once it has stopped moving.
pub(crate) fn settled_rss_kib(pid: u32) -> Res<u64> {
    procfs::settled_rss_kib(pid, SETTLE)
}

/// A port that was free a moment ago (for programs that need it in their configuration).
pub(crate) fn free_port() -> Res<u16> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Waits until `addr` accepts a TCP connection, failing early if `alive` says the server is
/// gone.
pub(crate) fn wait_listening(addr: SocketAddr, mut alive: impl FnMut() -> Res<()>) -> Res<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "nothing listening on {addr} after {START_TIMEOUT:?}"
    ))
}

/// Stops `child` (whose PID is `pid`) with SIGTERM, waits up to 5 s for it
/// to exit, then kills it; reaped either way.
pub(crate) fn terminate(child: &mut std::process::Child, pid: u32) {
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends a signal by PID with kill(1) (no libc binding in this crate).
pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
