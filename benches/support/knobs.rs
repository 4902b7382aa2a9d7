//! The `BENCH_*` (and `SOAK_*`) environment knobs every bench reads the same way.

/// Whether `name` is set to something other than empty, `0` or `false`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A positive integer from the environment, or `default` when unset or empty.
pub fn env_num<T: std::str::FromStr + PartialOrd + From<u8>>(
    name: &str,
    default: T,
) -> Result<T, String> {
    let value = match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<T>()
            .map_err(|_| format!("{name}={v:?}: not a number"))?,
        _ => default,
    };
    if value < T::from(1) {
        return Err(format!("{name} must be at least 1"));
    }
    Ok(value)
}
