//! The crate's public API is the embedding API and nothing more (issue 14,
//! point 4): every public item is a semver promise under
//! `#![deny(missing_docs)]`, so one that only fuzz/, benches or the proxy's
//! own inside needs must not become public by accident. Read from the
//! sources, so it needs no `cargo doc` build: what `src/lib.rs` exports, what
//! the two public modules hold, and which types may grow.

use std::collections::BTreeSet;

fn source(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The names of the top-level `pub` items of a source file (column 0, so
/// items of `impl` blocks and nested modules are not counted; `pub(crate)`
/// is not public).
fn pub_items(src: &str) -> BTreeSet<String> {
    const KINDS: [&str; 8] = [
        "fn", "struct", "enum", "trait", "const", "static", "type", "mod",
    ];
    src.lines()
        .filter_map(|line| line.strip_prefix("pub "))
        .filter_map(|rest| {
            let (kind, rest) = rest.split_once(' ')?;
            KINDS.contains(&kind).then(|| {
                rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .collect()
}

/// What `src/lib.rs` re-exports: the names inside `pub use path::{...};`
/// and `pub use path::Name;` at the top level.
fn root_reexports(lib: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for stmt in lib.split("\npub use ").skip(1) {
        let stmt = stmt.split(';').next().unwrap_or_default();
        let list = match stmt.split_once('{') {
            Some((_, list)) => list.trim_end_matches('}'),
            None => stmt.rsplit("::").next().unwrap_or(stmt),
        };
        names.extend(
            list.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned),
        );
    }
    names
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn the_crate_root_exports_the_embedding_api_only() {
    let lib = source("src/lib.rs");
    let modules: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches([';', ' ', '{']).to_owned())
        .collect();
    // `config` and `events` hold what the binary needs besides the types
    // below (`--help`, JSON log lines); `fuzzing` is hidden and behind its
    // feature (checked below).
    assert_eq!(
        modules,
        set(&["config", "events", "fuzzing"]),
        "public modules of src/lib.rs"
    );
    assert!(
        lib.contains("#[cfg(feature = \"fuzzing\")]\n#[doc(hidden)]\npub mod fuzzing {"),
        "the parsers are exposed only with the `fuzzing` feature, and hidden"
    );
    assert_eq!(
        root_reexports(&lib),
        set(&[
            // Running a proxy.
            "Config",
            "ConfigError",
            "Proxy",
            "ProxyBuilder",
            "Running",
            "Handle",
            "Stats",
            "StartError",
            "SHUTDOWN_CLOSE_TIME",
            // Deciding who may reach which console.
            "Authorizer",
            "AuthRequest",
            "Decision",
            "Ticket",
            "JwtAuthorizer",
            "Grant",
            "Refusal",
            "Status",
            "Headers",
            // Watching sessions.
            "Event",
            "Observer",
            "SessionEnd",
            // The types of `Config`'s public fields.
            "JwtSettings",
            "KeyMaterial",
            "TokenSource",
        ]),
        "items re-exported by src/lib.rs: a new one must be part of the embedding API"
    );
}

/// The public modules may shrink, never grow unnoticed.
#[test]
fn the_public_modules_hold_no_more_than_listed() {
    let allowed = [
        (
            "src/events.rs",
            set(&[
                "ACCESS_TARGET",
                "AccessLog",
                "Event",
                "LogFormat",
                "Observer",
                "SessionEnd",
                "write_json_record",
            ]),
        ),
        (
            "src/config.rs",
            set(&[
                "Config",
                "ConfigError",
                "UpstreamUrl",
                "help_text",
                // For the binary (src/cli.rs: every configuration error in
                // one run, flags told from subcommands, near misses named).
                "ConfigErrors",
                "Lookalike",
                "lookalike_variables",
                "is_option_flag",
                "is_option_variable",
                "did_you_mean",
            ]),
        ),
    ];
    for (path, allowed) in allowed {
        let extra: Vec<String> = pub_items(&source(path))
            .difference(&allowed)
            .cloned()
            .collect();
        assert!(
            extra.is_empty(),
            "{path} makes {extra:?} public: make it pub(crate), or add it to the embedding API here"
        );
    }
}

/// Types that will grow are `#[non_exhaustive]`, so growing them is not a
/// breaking change for hosts.
#[test]
fn growing_types_are_non_exhaustive() {
    for (path, decl) in [
        ("src/config.rs", "pub struct Config {"),
        ("src/config.rs", "pub struct ConfigError {"),
        ("src/events.rs", "pub enum Event {"),
        ("src/events.rs", "pub enum SessionEnd {"),
        ("src/events.rs", "pub enum LogFormat {"),
        ("src/server.rs", "pub struct Stats {"),
        ("src/server.rs", "pub enum StartError {"),
        ("src/authorize.rs", "pub enum Decision {"),
        ("src/authorize.rs", "pub struct AuthRequest<'a> {"),
        ("src/auth.rs", "pub struct JwtSettings {"),
        ("src/token.rs", "pub enum TokenSource {"),
    ] {
        let src = source(path);
        let at = src
            .find(&format!("\n{decl}"))
            .unwrap_or_else(|| panic!("{path}: no `{decl}`"));
        let attrs: Vec<&str> = src[..at]
            .lines()
            .rev()
            .take_while(|l| l.starts_with("#[") || l.starts_with("///"))
            .collect();
        assert!(
            attrs.contains(&"#[non_exhaustive]"),
            "{path}: `{decl}` is not #[non_exhaustive]"
        );
    }
}
