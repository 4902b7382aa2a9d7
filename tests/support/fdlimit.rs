#![allow(dead_code)]
//! The open-files limit for tests and benches that hold many sockets: the soft limit raised to
//! the hard one (the common default soft limit is 1,024), and loads scaled down, with a line
//! saying how far and why, where even the hard limit is too low.
//!
//! Depends only on std and rlimit, so it can be included by `#[path]` from tests and benches.

/// The soft open-files limit of this process, raised to the hard limit first (once: later calls
/// find it raised). Processes started afterwards, the proxy binary included, inherit it.
pub fn nofile_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        // Up to the hard limit; the crate also caps it where the kernel has a lower
        // per-process ceiling (macOS's kern.maxfilesperproc).
        if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
            eprintln!("could not raise the open-files limit: {e}");
        }
        rlimit::Resource::NOFILE
            .get()
            .map_or(1024, |(soft, _)| soft)
    })
}

/// How many of `wanted` units (sessions, clients) `what` can hold open at once when each costs
/// `per_unit` descriptors in this process and `reserve` must stay free for the rest: `wanted`
/// when the limit, raised to the hard limit, has room; otherwise as many as fit (at least one),
/// with a line on stderr saying how far and why.
pub fn fit_to_nofile_limit(what: &str, wanted: usize, per_unit: usize, reserve: u64) -> usize {
    let limit = nofile_limit();
    let fits =
        usize::try_from(limit.saturating_sub(reserve) / per_unit as u64).unwrap_or(usize::MAX);
    if fits >= wanted {
        return wanted;
    }
    let scaled = fits.max(1);
    let hard = rlimit::Resource::NOFILE
        .get()
        .map_or_else(|_| "unknown".to_owned(), |(_, hard)| hard.to_string());
    eprintln!(
        "{what}: scaled down from {wanted} to {scaled}: the open-files limit is {limit}, raised \
         as far as the hard limit ({hard}) allows; each one holds {per_unit} descriptors in this \
         process, and {reserve} stay free for the rest"
    );
    scaled
}
