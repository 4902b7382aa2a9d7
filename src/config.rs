//! Typed configuration: defaults, the environment variables of the Python
//! program it replaces, command-line flags, and validation with messages that
//! name the setting to fix.
//!
//! Every option is one row of a table (the `options!` macro below): its
//! variable, its flag, its default, its doc line and a typed parser. Values
//! are read through the rows (`r.get(&PORT)` is a `u16`), so a misspelt
//! option does not compile, and `--help`, flag lookup and the look-alike
//! warnings all come from the same rows.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::auth::{JwtSettings, JwtVerifier, KeyMaterial, parse_algorithm};
use crate::events::LogFormat;
use crate::token::TokenSource;

/// The upstream path KubeVirt serves VNC at.
pub(crate) const DEFAULT_API_PATH: &str = "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{vmi_name}/vnc";

/// Durations are whole seconds, at most a year: no timeout needs more, and a
/// deadline far enough out overflows the clock it is added to.
const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// A count bounded only by its type: its message says "must be at least LO"
/// rather than naming a range no one could type.
const UNBOUNDED: u64 = usize::MAX as u64;

/// How an option's text becomes its value.
enum Parse<T> {
    /// Whatever the function accepts; its error is the message after
    /// "VAR: ".
    With(fn(&str) -> Result<T, String>),
    /// A whole number within `LO..=HI` (inclusive), also checked by
    /// [`Config::validate`] for values set in code: the row keeps the bounds
    /// so that both say the same.
    Within(fn(&str, u64, u64) -> Result<T, String>, u64, u64),
}

/// One option. The rows are `const`s named after their variable (the
/// [`options!`] macro makes the name and `var` the same), so reading an
/// option that does not exist is a compile error, and they can stand in
/// other constants (the key settings a problem depends on).
struct Opt<T> {
    var: &'static str,
    flag: &'static str,
    /// As `--help` shows it, and parsed when the option is unset.
    default: &'static str,
    doc: &'static str,
    parse: Parse<T>,
}

impl<T> Opt<T> {
    fn parse(&self, v: &str) -> Result<T, String> {
        match self.parse {
            Parse::With(f) => f(v),
            Parse::Within(f, lo, hi) => f(v, lo, hi),
        }
    }

    /// The value when unset (or set wrongly: reading goes on with it, so one
    /// run names every mistake).
    fn default_value(&self) -> T {
        // Constant text of this file; `every_default_parses` checks them all.
        self.parse(self.default)
            .unwrap_or_else(|m| panic!("{}'s default does not parse: {m}", self.var))
    }
}

/// What the table knows of an option whatever its type: for `--help`, flag
/// lookup, look-alike warnings, error order and range checks.
trait OptInfo {
    fn var(&self) -> &'static str;
    fn flag(&self) -> &'static str;
    fn default(&self) -> &'static str;
    fn doc(&self) -> &'static str;
    /// Inclusive bounds of a numeric option.
    fn range(&self) -> Option<(u64, u64)>;
}

impl<T> OptInfo for Opt<T> {
    fn var(&self) -> &'static str {
        self.var
    }
    fn flag(&self) -> &'static str {
        self.flag
    }
    fn default(&self) -> &'static str {
        self.default
    }
    fn doc(&self) -> &'static str {
        self.doc
    }
    fn range(&self) -> Option<(u64, u64)> {
        match self.parse {
            Parse::With(_) => None,
            Parse::Within(_, lo, hi) => Some((lo, hi)),
        }
    }
}

/// Defines each row as a `const` named after its variable and [`OPTIONS`],
/// every row in `--help`'s order: a row cannot be left out of the list.
macro_rules! options {
    ($($var:ident: $t:ty = $parse:expr, $flag:literal, $default:expr, $doc:literal;)*) => {
        $(
            const $var: Opt<$t> = Opt {
                var: stringify!($var),
                flag: $flag,
                default: $default,
                doc: $doc,
                parse: $parse,
            };
        )*
        /// Every option, in the order of `--help` (and of the errors).
        const OPTIONS: &[&dyn OptInfo] = &[$(&$var),*];
    };
}

use Parse::{With, Within};

// One row a line, as `--help` and the README's table show them: variable:
// type = parser, flag, default, doc.
options! {
    HOST: String = With(text), "--host", "0.0.0.0", "address to listen on";
    PORT: u16 = Within(number, 0, 65535), "--port", "5001", "port to listen on";
    WORKERS: usize = Within(number, 1, 256), "--workers", "1", "independent event loops sharing the port (SO_REUSEPORT), one thread each; MAX_CONNECTIONS applies to each";
    HOST_PATH_PREFIX: Option<String> = With(path_segment), "--host-path-prefix", "", "one leading path segment to expect and strip (behind a reverse proxy), compared once percent-decoded";
    SECRET_KEY: Option<String> = With(non_empty), "--secret-key", "", "HMAC secret for HS* tokens (required unless JWT_PUBLIC_KEY_FILE is set)";
    JWT_ALGORITHMS: Vec<Algorithm> = With(algorithms), "--jwt-algorithms", "HS256", "accepted algorithms, comma-separated: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA";
    JWT_PUBLIC_KEY_FILE: Vec<String> = With(list), "--jwt-public-key-file", "", "PEM public key files for the asymmetric algorithms, comma-separated (kid = file name without extension)";
    SECRET_KEY_FILES: Vec<String> = With(list), "--secret-key-files", "", "more HMAC secrets, one file each, comma-separated (rotation; kid = file name without extension)";
    ALLOW_WEAK_SECRET: bool = With(boolean), "--allow-weak-secret", "false", "accept HMAC secrets shorter than 32 bytes (with a warning)";
    JWT_LEEWAY_SECONDS: u64 = Within(number, 0, MAX_SECONDS), "--jwt-leeway-seconds", "30", "clock skew allowed on exp and nbf";
    JWT_AUDIENCE: Vec<String> = With(list), "--jwt-audience", "", "accepted audiences, comma-separated; when set, aud is required; unset, a token with aud is refused";
    JWT_ISSUER: Vec<String> = With(list), "--jwt-issuer", "", "accepted issuers, comma-separated; when set, iss is required";
    TOKEN_SOURCES: Vec<TokenSource> = With(token_sources), "--token-sources", "path", "where tokens may travel: path, query, header, cookie, protocol (comma-separated)";
    TOKEN_COOKIE: String = With(text), "--token-cookie", "vnc_token", "cookie name for the cookie token source";
    ALLOWED_ORIGINS: Vec<String> = With(list), "--allowed-origins", "", "exact Origin values allowed, comma-separated; others get 403 (required for the cookie source)";
    CLOSE_ON_TOKEN_EXPIRY: bool = With(boolean), "--close-on-token-expiry", "true", "end a session when its token expires (client close 1008)";
    MAX_CONNECTIONS: usize = Within(number, 1, UNBOUNDED), "--max-connections", "10000", "open connections at most, per worker (the probe path's not counted); at the limit accepting pauses until 90 %";
    MAX_CONNECTIONS_PER_IP: usize = Within(number, 0, UNBOUNDED), "--max-connections-per-ip", "0", "open connections per client address at most, 503 above (0: no limit; behind an ingress every client shares its address)";
    REJECT_WITH: bool = With(reject_with_close), "--reject-with", "http", "http: refuse with HTTP statuses; close: upgrade, then close with 44xx/45xx codes a web page can read";
    LOCAL_DEV_MODE: bool = With(boolean), "--local-dev-mode", "false", "true: upstream at WS_REMOTE_URL (e.g. kubectl proxy); false: in-cluster mode";
    WS_REMOTE_URL: UpstreamUrl = With(UpstreamUrl::parse), "--ws-remote-url", "ws://localhost:8001", "upstream base URL, ws://… or wss://…, without user:password@ (no @ at all) (in-cluster mode: only when set explicitly)";
    KUBERNETES_SERVICE_HOST: Option<String> = With(non_empty), "--kubernetes-service-host", "", "API server host in in-cluster mode (set by Kubernetes)";
    KUBERNETES_SERVICE_PORT: u16 = Within(number, 1, 65535), "--kubernetes-service-port", "443", "API server port in in-cluster mode (set by Kubernetes)";
    SERVICE_ACCOUNT_DIR: PathBuf = With(path), "--service-account-dir", "/var/run/secrets/kubernetes.io/serviceaccount", "directory with the service account's ca.crt and token";
    UPSTREAM_CA_FILE: Option<PathBuf> = With(optional_path), "--upstream-ca-file", "", "PEM CA bundle, the only trust anchors for a wss:// upstream (default: SERVICE_ACCOUNT_DIR/ca.crt)";
    UPSTREAM_TOKEN_FILE: Option<PathBuf> = With(optional_path), "--upstream-token-file", "", "bearer token file sent upstream (default in-cluster: SERVICE_ACCOUNT_DIR/token)";
    ALLOW_CLEARTEXT_BEARER_TOKEN: bool = With(boolean), "--allow-cleartext-bearer-token", "false", "true: send the upstream bearer token over a ws:// (unencrypted) upstream; otherwise that configuration (e.g. in-cluster mode with a ws:// WS_REMOTE_URL) does not start (status 2)";
    CREDENTIALS_CHECK_SECONDS: Duration = Within(seconds, 0, MAX_SECONDS), "--credentials-check-seconds", "5", "how often the upstream CA and token files, and the TLS_* and CLIENT_CA_FILE files, are checked for rotation";
    API_PATH: String = With(text), "--api-path", DEFAULT_API_PATH, "upstream path template with {namespace} and {vmi_name}";
    UPSTREAM_SUBPROTOCOLS: Vec<String> = With(list), "--upstream-subprotocols", "plain.kubevirt.io", "subprotocols offered to the upstream, comma-separated (empty: none)";
    CLIENT_SUBPROTOCOLS: Vec<String> = With(list), "--client-subprotocols", "binary,plain.kubevirt.io", "subprotocols a client may be answered with (the first it offers that is listed)";
    UPSTREAM_QUERY_PARAMS: Vec<String> = With(list), "--upstream-query-params", "preserveSession", "query parameters passed on to the upstream, comma-separated; others are dropped";
    LOGLEVEL: log::LevelFilter = With(log_level), "--loglevel", "INFO", "DEBUG, INFO, WARNING or ERROR (RUST_LOG wins when set)";
    LOG_FORMAT: LogFormat = With(log_format), "--log-format", "text", "text or json (one JSON object per line, access log included)";
    TLS_CERT_FILE: Option<PathBuf> = With(optional_path), "--tls-cert-file", "", "PEM certificate chain: with TLS_KEY_FILE, the port (and METRICS_ADDR) speak TLS 1.2/1.3 only (wss://, https://); reloaded on change";
    TLS_KEY_FILE: Option<PathBuf> = With(optional_path), "--tls-key-file", "", "PEM private key (RSA, ECDSA or Ed25519) of TLS_CERT_FILE";
    CLIENT_CA_FILE: Option<PathBuf> = With(optional_path), "--client-ca-file", "", "PEM CA bundle: clients of the port must present a certificate it signed (mTLS; needs TLS_CERT_FILE)";
    METRICS_ADDR: Option<String> = With(non_blank), "--metrics-addr", "", "IP:PORT of the probe path: GET /metrics (Prometheus text format), /healthz and /readyz, answered outside MAX_CONNECTIONS; off when empty";
    SHUTDOWN_GRACE_SECONDS: Duration = Within(seconds, 0, MAX_SECONDS), "--shutdown-grace-seconds", "25", "on SIGTERM/SIGINT, how long open sessions may run before close 1001";
    PING_INTERVAL_SECONDS: Duration = Within(seconds, 0, MAX_SECONDS), "--ping-interval-seconds", "15", "ping a side after this much silence from it (0: no keepalive)";
    PEER_TIMEOUT_SECONDS: Option<Duration> = Within(optional_seconds, 0, MAX_SECONDS), "--peer-timeout-seconds", "", "a side silent this long, or that takes none of the bytes waiting for it this long, is gone: the other gets close 1001 (default 3 x PING_INTERVAL_SECONDS; needs an interval)";
    MAX_REQUEST_HEAD_BYTES: usize = Within(number, 512, 1 << 20), "--max-request-head-bytes", "8192", "largest client request head accepted (431 above, 414 when the request line alone is)";
    HANDSHAKE_TIMEOUT_SECONDS: Duration = Within(seconds, 1, MAX_SECONDS), "--handshake-timeout-seconds", "10", "time a client has to send its request head (408 after)";
    UPSTREAM_TIMEOUT_SECONDS: Duration = Within(seconds, 1, MAX_SECONDS), "--upstream-timeout-seconds", "10", "time the upstream has to connect, finish TLS and answer the upgrade (504 after)";
    RELAY_BUFFER_BYTES: usize = Within(number, 1024, 16 << 20), "--relay-buffer-bytes", "65536", "size of the fixed buffer per relay direction";
    RELAY_BULK_BUFFER_BYTES: usize = Within(number, 0, 16 << 20), "--relay-bulk-buffer-bytes", "262144", "larger buffer for a direction whose source fills its buffer between two writes (with TLS, all but the room a record needs; fewer, larger reads and writes); off when not above RELAY_BUFFER_BYTES";
    RELAY_BULK_BUFFERS: usize = Within(number, 0, UNBOUNDED), "--relay-bulk-buffers", "64", "at most this many bulk buffers in use at once (bounds their memory); others keep RELAY_BUFFER_BYTES";
    RELAY_MEMORY_BYTES: usize = Within(number, 0, UNBOUNDED), "--relay-memory-bytes", "33554432", "relay buffers in use at once, in bytes, per worker (bulk ones included; 0: no limit); a direction that finds none free leaves its source unread until one is";
    MAX_FRAME_SIZE: u64 = Within(number, 1, u64::MAX), "--max-frame-size", "67108864", "largest frame payload relayed (close 1009 above)";
}

// The parsers. Their messages are what operators see after "VAR: ".

fn text(v: &str) -> Result<String, String> {
    Ok(v.to_owned())
}

/// Unset and empty are the same.
fn non_empty(v: &str) -> Result<Option<String>, String> {
    Ok((!v.is_empty()).then(|| v.to_owned()))
}

/// Blank (spaces only) is unset too, for an address.
fn non_blank(v: &str) -> Result<Option<String>, String> {
    Ok((!v.trim().is_empty()).then(|| v.to_owned()))
}

fn path(v: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(v))
}

fn optional_path(v: &str) -> Result<Option<PathBuf>, String> {
    Ok((!v.is_empty()).then(|| PathBuf::from(v)))
}

/// Comma-separated, each item trimmed, empty items dropped.
fn list(v: &str) -> Result<Vec<String>, String> {
    Ok(v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Booleans as the Python program accepted them.
fn boolean(v: &str) -> Result<bool, String> {
    parse_bool("", v).map_err(|e| e.message)
}

/// `HOST_PATH_PREFIX`: one segment (`/vnc/` and `vnc` are the same prefix;
/// a second segment is refused), which may be given percent-encoded as in a
/// URL or not; kept decoded, as the request's segment is compared once
/// decoded (so a literal `%` is written `%25`).
fn path_segment(v: &str) -> Result<Option<String>, String> {
    let prefix = v.trim_matches('/');
    if prefix.contains('/') {
        return Err("must be a single path segment (no '/' inside)".into());
    }
    let decoded = crate::route::percent_decode(prefix)
        .ok_or("malformed percent-encoding (write a literal '%' as %25)")?;
    // A decoded '/' (`%2F`) could never match one segment of a request.
    if decoded.contains('/') {
        return Err("must be a single path segment (no '/' inside, escaped or not)".into());
    }
    Ok((!decoded.is_empty()).then_some(decoded))
}

fn algorithms(v: &str) -> Result<Vec<Algorithm>, String> {
    v.split(',')
        .filter(|name| !name.trim().is_empty())
        .map(|name| {
            parse_algorithm(name).ok_or_else(|| format!("unknown algorithm '{}'", name.trim()))
        })
        .collect()
}

fn token_sources(v: &str) -> Result<Vec<TokenSource>, String> {
    list(v)?
        .into_iter()
        .map(|n| TokenSource::parse(&n).ok_or_else(|| format!("unknown source '{n}'")))
        .collect()
}

/// `REJECT_WITH`: whether refusals upgrade and close (`close`) or answer
/// with an HTTP status (`http`).
fn reject_with_close(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "http" => Ok(false),
        "close" => Ok(true),
        other => Err(format!("'{other}' is not http or close")),
    }
}

fn log_level(v: &str) -> Result<log::LevelFilter, String> {
    Ok(match v.trim().to_ascii_uppercase().as_str() {
        "DEBUG" => log::LevelFilter::Debug,
        "INFO" => log::LevelFilter::Info,
        "WARNING" | "WARN" => log::LevelFilter::Warn,
        "ERROR" | "CRITICAL" => log::LevelFilter::Error,
        _ => return Err(format!("'{v}' is not one of DEBUG, INFO, WARNING, ERROR")),
    })
}

fn log_format(v: &str) -> Result<LogFormat, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("'{other}' is not text or json")),
    }
}

/// A whole number within `lo..=hi`, as `T` (a number past the range,
/// negative or too long, is out of range too, not "not a number").
fn number<T: TryFrom<u64>>(v: &str, lo: u64, hi: u64) -> Result<T, String> {
    let t = v.trim();
    let n = match t.parse::<u64>() {
        Ok(n) => n,
        Err(_) => {
            let (below, digits) = match t.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, t.strip_prefix('+').unwrap_or(t)),
            };
            return Err(
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    out_of_range(lo, hi, v, below)
                } else {
                    format!("'{v}' is not a valid number")
                },
            );
        }
    };
    check_range((lo, hi), n, v)?;
    T::try_from(n).map_err(|_| out_of_range(lo, hi, v, false))
}

/// Whole seconds.
fn seconds(v: &str, lo: u64, hi: u64) -> Result<Duration, String> {
    number(v, lo, hi).map(Duration::from_secs)
}

/// Whole seconds, or unset when empty (the value is then derived).
fn optional_seconds(v: &str, lo: u64, hi: u64) -> Result<Option<Duration>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    seconds(v, lo, hi).map(Some)
}

fn check_range((lo, hi): (u64, u64), n: u64, shown: &str) -> Result<(), String> {
    if (lo..=hi).contains(&n) {
        Ok(())
    } else {
        Err(out_of_range(lo, hi, shown, n < lo))
    }
}

/// "'V' is out of range LO-HI"; for a count with no upper bound but its
/// type's, "must be at least LO" (or "'V' is too large").
fn out_of_range(lo: u64, hi: u64, shown: &str, below: bool) -> String {
    if hi < UNBOUNDED {
        format!("'{shown}' is out of range {lo}-{hi}")
    } else if below {
        format!("must be at least {lo}")
    } else {
        format!("'{shown}' is too large (at most {hi})")
    }
}

/// A configuration problem: which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The environment variable (or flag) at fault.
    pub var: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl ConfigError {
    fn new(var: &str, message: impl Into<String>) -> Self {
        ConfigError {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration error: {}: {}", self.var, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration, in the order found: a deployment
/// is fixed in one round instead of one restart per mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// One per setting at fault (a value that depends on a broken one is
    /// not reported again).
    pub errors: Vec<ConfigError>,
    /// The log format asked for (text when `LOG_FORMAT` itself is wrong), so
    /// that the errors can be reported the way the other lines are.
    pub log_format: LogFormat,
}

impl fmt::Display for ConfigErrors {
    /// One line per error.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why `entry` can never equal an `Origin` header as browsers write it (RFC
/// 6454 6.2: `scheme://host[:port]`, lower case, no path, no default port),
/// with the spelling that would; `None` when it can (or is `null`).
fn origin_problem(entry: &str) -> Option<String> {
    let not_origin = || Some(format!("'{entry}' is not an origin (scheme://host[:port])"));
    if entry == "null" {
        return None;
    }
    let Some((scheme, rest)) = entry.split_once("://") else {
        return not_origin();
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if scheme.is_empty() || authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return not_origin();
    }
    let (scheme, authority) = (scheme.to_ascii_lowercase(), authority.to_ascii_lowercase());
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let canonical = match authority.strip_suffix(default_port) {
        Some(host) if !default_port.is_empty() => format!("{scheme}://{host}"),
        _ => format!("{scheme}://{authority}"),
    };
    (canonical != entry)
        .then(|| format!("'{entry}' is never what a browser sends as Origin: write '{canonical}'"))
}

/// Where to reach the upstream (KubeVirt's API, `kubectl proxy`, or a
/// stand-in): a plain `ws://` URL in local dev mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `wss://`: TLS to the upstream.
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path prefix from the URL, without a trailing slash (often empty).
    pub base_path: String,
}

impl UpstreamUrl {
    /// Parse `ws://host[:port][/path]` or `wss://…`.
    pub fn parse(url: &str) -> Result<Self, String> {
        // Credentials (`user:password@`) are not sent, and an error line
        // reaches logs and CI transcripts: a URL with an @ anywhere is
        // refused before any part of it is shown. Where the authority ends
        // is no guide: a password may hold a '/'.
        if url.contains('@') {
            return Err(
                "must not contain '@': credentials in the URL are not supported \
                 (the value is not shown: it may hold a password; in-cluster, the service \
                 account's token is sent)"
                    .into(),
            );
        }
        // It becomes the request line and the Host header: a space or a
        // line break would split them (or forge a header).
        if url.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces or control characters".into());
        }
        let (tls, rest) = if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else {
            return Err(format!("'{url}' is not a ws:// or wss:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err("the URL must not have a query or fragment".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in '{url}'"))?;
            // `[::1]8001`, a ':' short: not port 80 with the rest ignored.
            let port = after.strip_prefix(':');
            if port.is_none() && !after.is_empty() {
                return Err(format!("'{after}' after ']' is not ':PORT'"));
            }
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(format!("'{url}': an IPv6 address goes in brackets, [::1]"));
                }
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("'{url}' has no usable host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("'{p}' is not a port number"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(UpstreamUrl {
            tls,
            host: host.to_owned(),
            port,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }

    /// The `Host` header value for this upstream.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Everything the proxy needs to run. Build it with [`Config::from_env`],
/// [`Config::from_sources`] (as the binary does, with the flags it sorted
/// out of its command line), or in code from [`Config::local_dev`] and then
/// adjust fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address to listen on (`HOST`).
    pub host: String,
    /// Port to listen on (`PORT`); 0 picks a free port.
    pub port: u16,
    /// Event loops sharing the port (`WORKERS`); the binary runs this many.
    pub workers: usize,
    /// One path segment expected before the token (`HOST_PATH_PREFIX`).
    pub path_prefix: Option<String>,
    /// Keys and algorithms for tokens.
    pub jwt: JwtSettings,
    /// Where the upstream is (`WS_REMOTE_URL`, or the API server in-cluster).
    pub upstream: UpstreamUrl,
    /// In-cluster mode (`LOCAL_DEV_MODE=false`).
    pub in_cluster: bool,
    /// The only trust anchors for a `wss://` upstream.
    pub ca_file: Option<PathBuf>,
    /// A bearer token file sent upstream as `Authorization: Bearer …`.
    pub token_file: Option<PathBuf>,
    /// Send that token over a `ws://` upstream too
    /// (`ALLOW_CLEARTEXT_BEARER_TOKEN`); otherwise such a configuration
    /// does not validate.
    pub allow_cleartext_bearer_token: bool,
    /// How often the credential files are checked for rotation.
    pub credentials_check_interval: Duration,
    /// Subprotocols offered to the upstream.
    pub upstream_subprotocols: Vec<String>,
    /// Subprotocols the proxy may accept from a client.
    pub client_subprotocols: Vec<String>,
    /// Query parameters passed on to the upstream.
    pub upstream_query_params: Vec<String>,
    /// Upstream path template (`API_PATH`).
    pub api_path: String,
    /// Where tokens may travel (`TOKEN_SOURCES`).
    pub token_sources: Vec<TokenSource>,
    /// Cookie name for [`TokenSource::Cookie`] (`TOKEN_COOKIE`).
    pub token_cookie: String,
    /// Exact Origin values allowed; empty: any (`ALLOWED_ORIGINS`).
    pub allowed_origins: Vec<String>,
    /// End sessions when their token expires (`CLOSE_ON_TOKEN_EXPIRY`).
    pub close_on_token_expiry: bool,
    /// Open connections at most (`MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Open connections per client address at most; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Refuse by upgrading and closing with a 4xxx code (`REJECT_WITH=close`).
    pub reject_with_close: bool,
    /// Access log (and, in the binary, all log lines) format (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Where `/metrics` is served (`METRICS_ADDR`), off when `None`.
    pub metrics_addr: Option<String>,
    /// The listener's certificate chain (`TLS_CERT_FILE`): with the key,
    /// both listeners speak TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// The listener's private key (`TLS_KEY_FILE`).
    pub tls_key_file: Option<PathBuf>,
    /// Trust anchors for client certificates (`CLIENT_CA_FILE`): when set,
    /// the main listener requires one.
    pub client_ca_file: Option<PathBuf>,
    /// How long open sessions may run after SIGTERM (`SHUTDOWN_GRACE_SECONDS`).
    pub shutdown_grace: Duration,
    /// Ping a side after this much silence (`PING_INTERVAL_SECONDS`); zero: off.
    pub ping_interval: Duration,
    /// A side silent this long is gone (`PEER_TIMEOUT_SECONDS`).
    pub peer_timeout: Duration,
    /// Log level name (`LOGLEVEL`), used by the binary to set up logging.
    pub log_level: log::LevelFilter,
    /// Largest request head accepted.
    pub max_head_bytes: usize,
    /// Time a client has to send its request head.
    pub handshake_timeout: Duration,
    /// Time the upstream has to connect and answer the upgrade.
    pub upstream_timeout: Duration,
    /// Bytes per relay buffer (one per direction, only while data is in flight).
    pub buffer_size: usize,
    /// Bytes per bulk buffer, taken instead by a direction whose source
    /// filled a whole buffer in one read (0: never).
    pub bulk_buffer_size: usize,
    /// Bulk buffers in use at once, at most.
    pub bulk_buffers: usize,
    /// Bytes of relay buffers in use at once, at most (0: no limit).
    pub relay_memory: usize,
    /// Largest frame payload relayed.
    pub max_frame_size: u64,
    /// Time allowed for the closing handshake and for lingering after a
    /// refusal before a socket is closed regardless.
    pub close_timeout: Duration,
}

impl Config {
    /// A local-dev-mode configuration with defaults, for use in code: the
    /// upstream at `remote_url` (`ws://…`), HS256 with `secret`, listening on
    /// 127.0.0.1 on a free port.
    pub fn local_dev(remote_url: &str, secret: &[u8]) -> Result<Config, ConfigError> {
        let (mut c, errors) = Self::parse(
            [
                (LOCAL_DEV_MODE.var, "true"),
                (WS_REMOTE_URL.var, remote_url),
                (HOST.var, "127.0.0.1"),
                (PORT.var, "0"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
            Vec::<String>::new(),
        );
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        c.jwt.secrets = vec![KeyMaterial {
            kid: None,
            bytes: secret.to_vec(),
            source: SECRET_KEY.var.into(),
        }];
        c.validate()?;
        Ok(c)
    }

    /// Read the process environment and command line: the options'
    /// variables, and their flags (`--port 5002`, `--port=5002`), the only
    /// arguments it knows. A host whose command line has arguments of its
    /// own (a subcommand, `--help`) reads them itself and passes the flags
    /// to [`from_sources`](Self::from_sources), as the binary does.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_sources(std::env::vars(), std::env::args().skip(1))
    }

    /// Build from explicit environment pairs and flags; a flag wins over
    /// its variable. The first problem found;
    /// [`from_sources_all`](Self::from_sources_all) reports every one. An
    /// argument that is neither a flag nor a flag's value is refused by its
    /// position, never echoed: it may be a secret put in the wrong place.
    pub fn from_sources(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Config, ConfigError> {
        Self::from_sources_all(env, args)
            .map_err(|e| e.errors.into_iter().next().expect("at least one error"))
    }

    /// [`from_sources`](Self::from_sources), reporting every problem found
    /// (what the binary does): each setting at fault once, and nothing that
    /// only follows from another one at fault.
    pub fn from_sources_all(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Config, ConfigErrors> {
        let (c, mut errors) = Self::parse(env, args);
        for (e, depends_on) in c.problems(true) {
            let reported = |var: &str| errors.iter().any(|r| r.var == var);
            if !reported(&e.var) && !depends_on.iter().any(|d| reported(d)) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigErrors {
                errors,
                log_format: c.log_format,
            })
        }
    }

    /// Read every value, collecting every problem: the configuration as far
    /// as it could be read (a value at fault replaced by its default), and
    /// the problems in the order found.
    fn parse(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> (Config, Vec<ConfigError>) {
        let mut r = Reader {
            values: Vec::new(),
            errors: Vec::new(),
        };
        let known: Vec<(String, String)> = env.into_iter().collect();
        for opt in OPTIONS {
            if let Some((_, v)) = known.iter().find(|(k, _)| k == opt.var()) {
                r.values.push((opt.var(), v.clone()));
            }
        }
        let mut args = args.into_iter().enumerate().peekable();
        while let Some((i, arg)) = args.next() {
            if !arg.starts_with('-') {
                // A bare word: a typo, or a secret put where a flag was
                // meant (this line may go to a log). Its position only.
                r.fail(ConfigError::new(
                    "args",
                    format!(
                        "unexpected argument {} (not shown: it may be a secret; see --help)",
                        i + 1
                    ),
                ));
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let Some(opt) = OPTIONS.iter().find(|o| o.flag() == flag) else {
                let hint = lookalike(&flag, OPTIONS.iter().map(|o| o.flag()));
                let hint = hint.map_or(String::new(), |f| format!("; did you mean {f}?"));
                // Only the flag: an inline value may be a secret
                // (`--secret-kye=…`), and this line may go to a log.
                r.fail(ConfigError::new(
                    &flag,
                    format!("unknown argument{hint} (see --help)"),
                ));
                // An unknown flag's value is not one more unknown argument.
                if inline.is_none() && args.peek().is_some_and(|(_, next)| !next.starts_with('-')) {
                    args.next();
                }
                continue;
            };
            let Some(value) = inline.or_else(|| args.next().map(|(_, v)| v)) else {
                r.fail(ConfigError::new(opt.flag(), "needs a value"));
                break;
            };
            r.values.retain(|(k, _)| *k != opt.var());
            r.values.push((opt.var(), value));
        }

        let local_dev = r.get(&LOCAL_DEV_MODE);
        let upstream = if r.failed(LOCAL_DEV_MODE.var) {
            // Which upstream applies is unknown: no error follows from it.
            // A URL that is set is checked all the same.
            r.given(&WS_REMOTE_URL)
                .unwrap_or_else(|| WS_REMOTE_URL.default_value())
        } else if !local_dev && !r.is_set(&WS_REMOTE_URL) {
            // In a cluster the API server is where Kubernetes says it is,
            // unless the operator names another endpoint explicitly.
            let port = r.get(&KUBERNETES_SERVICE_PORT);
            match r.get(&KUBERNETES_SERVICE_HOST) {
                Some(host) => UpstreamUrl {
                    tls: true,
                    host: host
                        .trim()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port,
                    base_path: String::new(),
                },
                None => {
                    r.fail(ConfigError::new(
                        KUBERNETES_SERVICE_HOST.var,
                        "not set: in-cluster mode (LOCAL_DEV_MODE=false) needs it; outside a cluster set LOCAL_DEV_MODE=true",
                    ));
                    WS_REMOTE_URL.default_value()
                }
            }
        } else {
            r.get(&WS_REMOTE_URL)
        };
        let sa_dir = r.get(&SERVICE_ACCOUNT_DIR);
        let ca_file = r
            .get(&UPSTREAM_CA_FILE)
            .or_else(|| upstream.tls.then(|| sa_dir.join("ca.crt")));
        let token_file = r
            .get(&UPSTREAM_TOKEN_FILE)
            .or_else(|| (!local_dev).then(|| sa_dir.join("token")));
        let allow_cleartext_bearer_token = r.get(&ALLOW_CLEARTEXT_BEARER_TOKEN);
        let mut secrets = Vec::new();
        if let Some(secret) = r.get(&SECRET_KEY) {
            secrets.push(KeyMaterial {
                kid: None,
                bytes: secret.into_bytes(),
                source: SECRET_KEY.var.into(),
            });
        }
        secrets.extend(r.files(&SECRET_KEY_FILES).into_iter().map(|mut k| {
            // A secret file ends with a newline more often than not. The
            // bytes are trimmed, not a lossy text of them: a secret that is
            // not UTF-8 grows there, and its newline stayed.
            let end = k
                .bytes
                .iter()
                .rposition(|b| !matches!(b, b'\r' | b'\n'))
                .map_or(0, |i| i + 1);
            k.bytes.truncate(end);
            k
        }));
        let public_keys = r.files(&JWT_PUBLIC_KEY_FILE);
        let ping_interval = r.get(&PING_INTERVAL_SECONDS);
        // Derived when unset: within the range whatever the (valid)
        // interval, so no error names a variable the operator did not set.
        // A blank value is unset, as for every optional setting; an
        // invalid one has its own error already.
        let given_timeout = r.get(&PEER_TIMEOUT_SECONDS);
        let derived = given_timeout.is_none() && !r.failed(PEER_TIMEOUT_SECONDS.var);
        let peer_timeout = given_timeout
            .unwrap_or_else(|| (3 * ping_interval).min(Duration::from_secs(MAX_SECONDS)));
        // Without keepalive nothing times silence: a timeout set for it
        // would be ignored without a word.
        if given_timeout.is_some()
            && ping_interval.is_zero()
            && !r.failed(PING_INTERVAL_SECONDS.var)
        {
            r.fail(ConfigError::new(
                PEER_TIMEOUT_SECONDS.var,
                "has no effect with PING_INTERVAL_SECONDS=0 (no keepalive: silence is not \
                 timed); unset it, or set an interval",
            ));
        }
        // An interval of a whole year leaves no longer timeout to derive:
        // the error is the interval's, the one the operator set.
        if derived && !ping_interval.is_zero() && peer_timeout <= ping_interval {
            r.fail(ConfigError::new(
                PING_INTERVAL_SECONDS.var,
                format!(
                    "'{}' leaves no room for the peer timeout, 3 x it but at most \
                     {MAX_SECONDS}, which must be longer: set a shorter interval",
                    ping_interval.as_secs()
                ),
            ));
        }
        let config = Config {
            host: r.get(&HOST),
            port: r.get(&PORT),
            workers: r.get(&WORKERS),
            path_prefix: r.get(&HOST_PATH_PREFIX),
            jwt: JwtSettings {
                algorithms: r.get(&JWT_ALGORITHMS),
                secrets,
                public_keys,
                leeway_secs: r.get(&JWT_LEEWAY_SECONDS),
                audience: r.get(&JWT_AUDIENCE),
                issuer: r.get(&JWT_ISSUER),
                allow_weak_secret: r.get(&ALLOW_WEAK_SECRET),
            },
            token_sources: r.get(&TOKEN_SOURCES),
            token_cookie: r.get(&TOKEN_COOKIE),
            allowed_origins: r.get(&ALLOWED_ORIGINS),
            close_on_token_expiry: r.get(&CLOSE_ON_TOKEN_EXPIRY),
            max_connections: r.get(&MAX_CONNECTIONS),
            max_connections_per_ip: r.get(&MAX_CONNECTIONS_PER_IP),
            reject_with_close: r.get(&REJECT_WITH),
            upstream,
            in_cluster: !local_dev,
            ca_file,
            token_file,
            allow_cleartext_bearer_token,
            credentials_check_interval: r.get(&CREDENTIALS_CHECK_SECONDS),
            upstream_subprotocols: r.get(&UPSTREAM_SUBPROTOCOLS),
            client_subprotocols: r.get(&CLIENT_SUBPROTOCOLS),
            upstream_query_params: r.get(&UPSTREAM_QUERY_PARAMS),
            api_path: r.get(&API_PATH),
            log_level: r.get(&LOGLEVEL),
            log_format: r.get(&LOG_FORMAT),
            metrics_addr: r.get(&METRICS_ADDR),
            tls_cert_file: r.get(&TLS_CERT_FILE),
            tls_key_file: r.get(&TLS_KEY_FILE),
            client_ca_file: r.get(&CLIENT_CA_FILE),
            shutdown_grace: r.get(&SHUTDOWN_GRACE_SECONDS),
            ping_interval,
            peer_timeout,
            max_head_bytes: r.get(&MAX_REQUEST_HEAD_BYTES),
            handshake_timeout: r.get(&HANDSHAKE_TIMEOUT_SECONDS),
            upstream_timeout: r.get(&UPSTREAM_TIMEOUT_SECONDS),
            buffer_size: r.get(&RELAY_BUFFER_BYTES),
            bulk_buffer_size: r.get(&RELAY_BULK_BUFFER_BYTES),
            bulk_buffers: r.get(&RELAY_BULK_BUFFERS),
            relay_memory: r.get(&RELAY_MEMORY_BYTES),
            max_frame_size: r.get(&MAX_FRAME_SIZE),
            close_timeout: Duration::from_secs(5),
        };
        // Argument errors first, then in the order of --help.
        let mut errors = r.errors;
        errors.sort_by_key(|e| {
            OPTIONS
                .iter()
                .position(|o| o.var() == e.var)
                .map_or(0, |i| i + 1)
        });
        (config, errors)
    }

    /// Check the values together (ranges, keys usable, templates complete).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.problems(true)
            .into_iter()
            .next()
            .map_or(Ok(()), |(e, _)| Err(e))
    }

    /// Everything [`validate`](Self::validate) checks except that token keys
    /// exist (a custom authorizer may not use them).
    pub fn validate_without_keys(&self) -> Result<(), ConfigError> {
        self.problems(false)
            .into_iter()
            .next()
            .map_or(Ok(()), |(e, _)| Err(e))
    }

    /// Every problem with the values together, each with the other settings
    /// it follows from (not reported when one of those is at fault already).
    fn problems(&self, keys: bool) -> Vec<(ConfigError, &'static [&'static str])> {
        const KEY_SETTINGS: &[&str] = &[
            SECRET_KEY.var,
            SECRET_KEY_FILES.var,
            JWT_PUBLIC_KEY_FILE.var,
            JWT_ALGORITHMS.var,
            ALLOW_WEAK_SECRET.var,
        ];
        let mut p: Vec<(ConfigError, &'static [&'static str])> = Vec::new();
        if keys && self.jwt.secrets.is_empty() && self.jwt.public_keys.is_empty() {
            p.push((
                ConfigError::new(
                    SECRET_KEY.var,
                    "not set (required unless JWT_PUBLIC_KEY_FILE is set)",
                ),
                &[SECRET_KEY_FILES.var, JWT_PUBLIC_KEY_FILE.var],
            ));
        }
        for (opt, value) in self.numeric_values() {
            if let Some(range) = opt.range()
                && let Err(m) = check_range(range, value, &value.to_string())
            {
                p.push((ConfigError::new(opt.var(), m), &[]));
            }
        }
        if self.buffer_size < self.max_head_bytes + 1024 {
            // Bytes that arrive with a handshake head must fit the buffer.
            p.push((
                ConfigError::new(
                    RELAY_BUFFER_BYTES.var,
                    "must be at least MAX_REQUEST_HEAD_BYTES + 1024",
                ),
                &[MAX_REQUEST_HEAD_BYTES.var],
            ));
        }
        if self.relay_memory != 0 && self.relay_memory < self.buffer_size {
            // Not one buffer would fit: no session could relay a byte.
            p.push((
                ConfigError::new(
                    RELAY_MEMORY_BYTES.var,
                    "must be 0 (no limit) or at least RELAY_BUFFER_BYTES",
                ),
                &[RELAY_BUFFER_BYTES.var],
            ));
        }
        if self.token_sources.is_empty() {
            p.push((
                ConfigError::new(TOKEN_SOURCES.var, "no token source enabled"),
                &[],
            ));
        }
        if self.token_sources.contains(&TokenSource::Cookie) && self.allowed_origins.is_empty() {
            // A cookie goes with every request the browser makes, from any
            // page: without an Origin check any site could open a console
            // with the user's cookie (cross-site WebSocket hijacking).
            p.push((
                ConfigError::new(
                    ALLOWED_ORIGINS.var,
                    "must be set when TOKEN_SOURCES includes cookie (cross-site WebSocket hijacking)",
                ),
                &[TOKEN_SOURCES.var],
            ));
        }
        // Compared byte for byte with what the browser sends, an entry in
        // another spelling of the same origin would refuse every session.
        for entry in &self.allowed_origins {
            if let Some(m) = origin_problem(entry) {
                p.push((ConfigError::new(ALLOWED_ORIGINS.var, m), &[]));
            }
        }
        if !self.ping_interval.is_zero() && self.peer_timeout <= self.ping_interval {
            p.push((
                ConfigError::new(
                    PEER_TIMEOUT_SECONDS.var,
                    "must be longer than PING_INTERVAL_SECONDS (a peer needs time to answer a ping)",
                ),
                &[PING_INTERVAL_SECONDS.var],
            ));
        }
        if let Err((var, m)) = JwtVerifier::new(&self.jwt) {
            p.push((ConfigError::new(var, m), KEY_SETTINGS));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => p.push((
                ConfigError::new(TLS_KEY_FILE.var, "not set, but TLS_CERT_FILE is"),
                &[],
            )),
            (None, Some(_)) => p.push((
                ConfigError::new(TLS_CERT_FILE.var, "not set, but TLS_KEY_FILE is"),
                &[],
            )),
            (None, None) if self.client_ca_file.is_some() => p.push((
                ConfigError::new(
                    CLIENT_CA_FILE.var,
                    "needs TLS on the listener: set TLS_CERT_FILE and TLS_KEY_FILE",
                ),
                &[],
            )),
            _ => {}
        }
        // A bearer token over ws:// is readable by anyone on the path (and
        // in-cluster mode sends the service account's by default): only on
        // request. Checked here, so that a host building its Config in code
        // is held to it as the binary is.
        if self.token_file.is_some() && !self.upstream.tls && !self.allow_cleartext_bearer_token {
            let why = if self.in_cluster {
                "in-cluster mode (LOCAL_DEV_MODE=false) sends the service-account token"
            } else {
                "UPSTREAM_TOKEN_FILE is set"
            };
            p.push((
                ConfigError::new(
                    WS_REMOTE_URL.var,
                    format!(
                        "is a ws:// URL and {why}: the bearer token would travel unencrypted; \
                         use wss://, or set ALLOW_CLEARTEXT_BEARER_TOKEN=true to send it anyway"
                    ),
                ),
                &[
                    LOCAL_DEV_MODE.var,
                    KUBERNETES_SERVICE_HOST.var,
                    UPSTREAM_TOKEN_FILE.var,
                    ALLOW_CLEARTEXT_BEARER_TOKEN.var,
                ],
            ));
        }
        // Parsed when the listener is bound; checked here so that
        // check-config and every other error in the same run name it too.
        if let Some(a) = &self.metrics_addr
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            p.push((
                ConfigError::new(
                    METRICS_ADDR.var,
                    format!("'{a}' is not IP:PORT (e.g. 0.0.0.0:9090; names are not looked up)"),
                ),
                &[],
            ));
        }
        if !self.api_path.starts_with('/') {
            p.push((ConfigError::new(API_PATH.var, "must start with '/'"), &[]));
        } else if self
            .api_path
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            p.push((
                ConfigError::new(
                    API_PATH.var,
                    "must not contain spaces or control characters",
                ),
                &[],
            ));
        }
        p
    }

    /// The numeric settings, each with its row (which has its range), as
    /// whole numbers (a duration in whole seconds, a fraction counting as
    /// one more).
    fn numeric_values(&self) -> [(&'static dyn OptInfo, u64); 17] {
        let secs = |d: Duration| d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
        let n = |v: usize| v as u64;
        [
            (&PORT, self.port.into()),
            (&WORKERS, n(self.workers)),
            (&JWT_LEEWAY_SECONDS, self.jwt.leeway_secs),
            (&MAX_CONNECTIONS, n(self.max_connections)),
            (&MAX_CONNECTIONS_PER_IP, n(self.max_connections_per_ip)),
            (
                &CREDENTIALS_CHECK_SECONDS,
                secs(self.credentials_check_interval),
            ),
            (&SHUTDOWN_GRACE_SECONDS, secs(self.shutdown_grace)),
            (&PING_INTERVAL_SECONDS, secs(self.ping_interval)),
            (&PEER_TIMEOUT_SECONDS, secs(self.peer_timeout)),
            (&MAX_REQUEST_HEAD_BYTES, n(self.max_head_bytes)),
            (&HANDSHAKE_TIMEOUT_SECONDS, secs(self.handshake_timeout)),
            (&UPSTREAM_TIMEOUT_SECONDS, secs(self.upstream_timeout)),
            (&RELAY_BUFFER_BYTES, n(self.buffer_size)),
            (&RELAY_BULK_BUFFER_BYTES, n(self.bulk_buffer_size)),
            (&RELAY_BULK_BUFFERS, n(self.bulk_buffers)),
            (&RELAY_MEMORY_BYTES, n(self.relay_memory)),
            (&MAX_FRAME_SIZE, self.max_frame_size),
        ]
    }

    /// The upstream request path for one session: `WS_REMOTE_URL`'s path
    /// followed by `API_PATH` with the (already validated) names filled in.
    pub fn upstream_path(&self, namespace: &str, vmi: &str) -> String {
        // One pass, one allocation (this runs once per session): each
        // placeholder is filled in where it stands, never inside a value.
        let base = &self.upstream.base_path;
        let mut out =
            String::with_capacity(base.len() + self.api_path.len() + namespace.len() + vmi.len());
        out.push_str(base);
        let mut rest = self.api_path.as_str();
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let at = &rest[i..];
            if let Some(after) = at.strip_prefix("{namespace}") {
                out.push_str(namespace);
                rest = after;
            } else if let Some(after) = at.strip_prefix("{vmi_name}") {
                out.push_str(vmi);
                rest = after;
            } else {
                out.push('{');
                rest = &at[1..];
            }
        }
        out.push_str(rest);
        out
    }
}

/// Every option, its variable, flag, default and meaning, generated from
/// the option table: the part of `--help` that describes the library's
/// options (the binary adds its usage, `--help`, `--version` and its
/// subcommands).
pub fn help_text() -> String {
    let mut s = String::from(
        "Every option can be set by its environment variable or its flag; the flag wins.\n\n\
         OPTIONS:\n",
    );
    for o in OPTIONS {
        // SECRET_KEY's default is empty anyway: never a value on screen.
        let default = if o.default().is_empty() {
            "none"
        } else {
            o.default()
        };
        s.push_str(&format!(
            "  {} <value>   [env {}] [default: {}]\n      {}\n",
            o.flag(),
            o.var(),
            default,
            o.doc()
        ));
    }
    s
}

/// Whether `flag` is one of the options' flags (`--port`): such a flag
/// takes the next argument as its value whatever it looks like, where an
/// unknown one takes it only when it does not start with `-`. For a host
/// that sorts its command line before passing the flags on.
pub fn is_option_flag(flag: &str) -> bool {
    OPTIONS.iter().any(|o| o.flag() == flag)
}

/// Whether `name` is an option's environment variable.
pub fn is_option_variable(name: &str) -> bool {
    OPTIONS.iter().any(|o| o.var() == name)
}

/// The candidate `name` most probably meant, if any (another case, `-`
/// for `_`, a typo or two): for a host's own "did you mean" hints.
pub fn did_you_mean<'k>(
    name: &str,
    candidates: impl IntoIterator<Item = &'k str>,
) -> Option<&'k str> {
    lookalike(name, candidates.into_iter())
}

/// Booleans as the Python program accepted them.
pub(crate) fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            var,
            format!("'{v}' is not a boolean (true/false, 1/0, yes/no, on/off)"),
        )),
    }
}

/// The values given (flags over variables), and every problem found so far:
/// a value at fault is recorded and replaced by its default, so that reading
/// goes on and one run names every mistake.
struct Reader {
    values: Vec<(&'static str, String)>,
    errors: Vec<ConfigError>,
}

impl Reader {
    /// The text given for `opt`, if any.
    fn raw<T>(&self, opt: &Opt<T>) -> Option<&str> {
        // Values are collected for the rows in OPTIONS only, which the
        // `options!` macro guarantees for every row; checked all the same,
        // as a row outside it would read as unset without a word.
        debug_assert!(
            OPTIONS.iter().any(|o| o.var() == opt.var),
            "{} is not in OPTIONS",
            opt.var
        );
        self.values
            .iter()
            .find(|(k, _)| *k == opt.var)
            .map(|(_, v)| v.as_str())
    }

    fn is_set<T>(&self, opt: &Opt<T>) -> bool {
        self.raw(opt).is_some()
    }

    /// The value given, if it was given and is valid; an invalid one is
    /// recorded (once, however often it is read).
    fn given<T>(&mut self, opt: &Opt<T>) -> Option<T> {
        match opt.parse(self.raw(opt)?) {
            Ok(v) => Some(v),
            Err(message) => {
                if !self.failed(opt.var) {
                    self.fail(ConfigError::new(opt.var, message));
                }
                None
            }
        }
    }

    /// The value given, or the default when unset or invalid.
    fn get<T>(&mut self, opt: &Opt<T>) -> T {
        self.given(opt).unwrap_or_else(|| opt.default_value())
    }

    fn fail(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    fn failed(&self, var: &str) -> bool {
        self.errors.iter().any(|e| e.var == var)
    }

    /// Key files, one per comma-separated path (the first unreadable one is
    /// reported; the others are still read).
    fn files(&mut self, opt: &Opt<Vec<String>>) -> Vec<KeyMaterial> {
        let mut keys = Vec::new();
        for path in self.get(opt) {
            match crate::upstream::read_small(std::path::Path::new(&path)) {
                Ok(bytes) => {
                    let kid = std::path::Path::new(&path)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned());
                    keys.push(KeyMaterial {
                        kid,
                        bytes,
                        source: path,
                    });
                }
                Err(e) if !self.failed(opt.var) => {
                    self.fail(ConfigError::new(
                        opt.var,
                        format!("cannot read '{path}': {e}"),
                    ));
                }
                Err(_) => {}
            }
        }
        keys
    }
}

/// An environment variable that looks like one of ours but is not: set, and
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookalike {
    /// The variable set.
    pub found: String,
    /// The option it probably meant.
    pub expected: &'static str,
}

impl fmt::Display for Lookalike {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "environment variable {} is not an option and is ignored: did you mean {}?",
            self.found, self.expected
        )
    }
}

/// Variables in `env` that look like an option (a small typo, a different
/// case, `_SECONDS` missing or added) without being one. Variables other
/// programs set (Kubernetes' service links among them) are left alone.
pub fn lookalike_variables<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Lookalike> {
    let known = || OPTIONS.iter().map(|o| o.var()).chain(["RUST_LOG"]);
    let mut found: Vec<Lookalike> = names
        .into_iter()
        .filter(|n| !known().any(|k| k == *n) && !set_by_kubernetes(n) && !OTHERS.contains(n))
        .filter_map(|n| {
            lookalike(n, known()).map(|expected| Lookalike {
                found: n.to_owned(),
                expected,
            })
        })
        .collect();
    // The environment's order is nobody's choice: name order.
    found.sort_by(|a, b| a.found.cmp(&b.found));
    found
}

/// Variables of other programs that look like ours: OpenSSL's trust store
/// (one letter from `TLS_CERT_FILE`).
const OTHERS: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// `KUBERNETES_*`, and the variables Kubernetes sets for every Service in
/// the namespace (`FOO_SERVICE_HOST`, `FOO_SERVICE_PORT[_NAME]`, `FOO_PORT`,
/// `FOO_PORT_5001_TCP[_PROTO|_PORT|_ADDR]`), whatever the Services are called.
fn set_by_kubernetes(name: &str) -> bool {
    name.starts_with("KUBERNETES_")
        || name.ends_with("_SERVICE_HOST")
        || name.contains("_SERVICE_PORT")
        || name.ends_with("_PORT")
        || name
            .split("_PORT_")
            .nth(1)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The candidate `name` most probably meant, if any: the same letters in
/// another case or with `-`/`_` swapped, one with `_SECONDS` (or `_SECS`,
/// `_SEC`) missing or added, or one a typo or two away (one for short names).
fn lookalike<'k>(name: &str, candidates: impl Iterator<Item = &'k str>) -> Option<&'k str> {
    fn norm(s: &str) -> String {
        s.trim_start_matches('-')
            .to_ascii_uppercase()
            .replace('-', "_")
    }
    fn base(s: &str) -> &str {
        ["_SECONDS", "_SECS", "_SEC"]
            .iter()
            .find_map(|suffix| s.strip_suffix(suffix))
            .unwrap_or(s)
    }
    let n = norm(name);
    candidates
        .filter_map(|c| {
            let k = norm(c);
            let d = distance(&n, &k).min(distance(base(&n), base(&k)));
            let allowed = if base(&k).len() < 10 { 1 } else { 2 };
            (d <= allowed).then_some((d, c))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance with adjacent transpositions (optimal string alignment),
/// on bytes: `PROT` is one step from `PORT`.
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return 3;
    }
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(pairs: &[(&str, &str)], args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_sources(env(pairs), args.iter().map(|s| s.to_string()))
    }

    const LONG: &str = "0123456789abcdef0123456789abcdef";
    const BASE: &[(&str, &str)] = &[("SECRET_KEY", LONG), ("LOCAL_DEV_MODE", "TRUE")];

    #[test]
    fn defaults_match_the_python_program() {
        let c = run(BASE, &[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 5001));
        assert_eq!(c.api_path, DEFAULT_API_PATH);
        assert_eq!(c.upstream.host, "localhost");
        assert_eq!(c.upstream.port, 8001);
        assert_eq!(c.path_prefix, None);
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.max_head_bytes, 8192);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(
            c.upstream_path("ns", "vm"),
            "/apis/subresources.kubevirt.io/v1/namespaces/ns/virtualmachineinstances/vm/vnc"
        );
    }

    #[test]
    fn flags_win_over_environment() {
        let mut e = BASE.to_vec();
        e.push(("PORT", "6000"));
        assert_eq!(run(&e, &[]).unwrap().port, 6000);
        assert_eq!(run(&e, &["--port", "7000"]).unwrap().port, 7000);
        assert_eq!(run(&e, &["--port=7001"]).unwrap().port, 7001);
        let c = run(&e, &["--host-path-prefix", "/vnc/"]).unwrap();
        assert_eq!(c.path_prefix.as_deref(), Some("vnc"));
    }

    #[test]
    fn a_path_prefix_is_kept_decoded_as_the_requests_segment_is_compared() {
        let prefix = |v: &str| {
            let mut e = BASE.to_vec();
            e.push(("HOST_PATH_PREFIX", v));
            run(&e, &[]).map(|c| c.path_prefix)
        };
        assert_eq!(prefix("lab%20consoles"), Ok(Some("lab consoles".into())));
        assert_eq!(prefix("lab consoles"), Ok(Some("lab consoles".into())));
        assert_eq!(prefix("100%25"), Ok(Some("100%".into())));
        for slashed in ["a%2Fb", "%2Fvnc%2F"] {
            let e = all_errors(&[BASE, &[("HOST_PATH_PREFIX", slashed)]].concat(), &[]);
            assert_eq!(e.len(), 1, "{slashed}: {e:?}");
            assert!(e[0].message.contains("single path segment"), "{e:?}");
        }
        let e = all_errors(&[BASE, &[("HOST_PATH_PREFIX", "100%")]].concat(), &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            (e[0].var.as_str(), e[0].message.as_str()),
            (
                "HOST_PATH_PREFIX",
                "malformed percent-encoding (write a literal '%' as %25)"
            )
        );
    }

    #[test]
    fn bulk_buffers_never_stop_a_large_regular_buffer_from_starting() {
        // Set before bulk buffers existed: still starts, bulk simply off.
        let mut e = BASE.to_vec();
        e.push(("RELAY_BUFFER_BYTES", "1048576"));
        let c = run(&e, &[]).unwrap();
        assert_eq!((c.buffer_size, c.bulk_buffer_size), (1 << 20, 256 << 10));
        e.push(("RELAY_BULK_BUFFER_BYTES", "16777217"));
        assert_eq!(run(&e, &[]).unwrap_err().var, "RELAY_BULK_BUFFER_BYTES");
    }

    #[test]
    fn relay_memory_holds_at_least_one_buffer_or_is_off() {
        let c = run(BASE, &[]).unwrap();
        assert_eq!((c.relay_memory, c.buffer_size), (32 << 20, 64 << 10));
        let mut e = BASE.to_vec();
        e.push(("RELAY_MEMORY_BYTES", "65535"));
        let err = run(&e, &[]).unwrap_err();
        assert_eq!(err.var, "RELAY_MEMORY_BYTES");
        assert!(
            err.message.contains("RELAY_BUFFER_BYTES"),
            "{}",
            err.message
        );
        for ok in ["0", "65536"] {
            e.pop();
            e.push(("RELAY_MEMORY_BYTES", ok));
            assert!(run(&e, &[]).is_ok(), "{ok}");
        }
    }

    #[test]
    fn booleans_as_python_accepted_them() {
        for t in ["true", "True", "1", "yes", "ON"] {
            assert_eq!(parse_bool("X", t), Ok(true));
        }
        for f in ["false", "FALSE", "0", "no", "off"] {
            assert_eq!(parse_bool("X", f), Ok(false));
        }
        assert_eq!(parse_bool("X", "maybe").unwrap_err().var, "X");
    }

    #[test]
    fn errors_name_the_variable() {
        let var = |pairs: &[(&str, &str)], args: &[&str]| run(pairs, args).unwrap_err().var;
        assert_eq!(var(&[("LOCAL_DEV_MODE", "true")], &[]), "SECRET_KEY");
        assert_eq!(var(&[("LOCAL_DEV_MODE", "perhaps")], &[]), "LOCAL_DEV_MODE");
        assert_eq!(var(&[("SECRET_KEY", LONG)], &[]), "KUBERNETES_SERVICE_HOST");
        // RFC 8725 / RFC 7518: an HMAC key shorter than the hash is refused
        // unless the operator says otherwise.
        let weak = [("SECRET_KEY", "short"), ("LOCAL_DEV_MODE", "true")];
        let e = run(&weak, &[]).unwrap_err();
        assert_eq!(e.var, "SECRET_KEY");
        assert!(e.message.contains("ALLOW_WEAK_SECRET"), "{}", e.message);
        assert!(run(&weak, &["--allow-weak-secret", "yes"]).is_ok());
        // The cookie transport needs an Origin allow-list.
        assert_eq!(
            var(BASE, &["--token-sources", "path,cookie"]),
            "ALLOWED_ORIGINS"
        );
        assert!(
            run(
                BASE,
                &[
                    "--token-sources",
                    "cookie",
                    "--allowed-origins",
                    "https://a"
                ]
            )
            .is_ok()
        );
        assert_eq!(
            var(BASE, &["--token-sources", "path,carrier-pigeon"]),
            "TOKEN_SOURCES"
        );
        assert_eq!(var(BASE, &["--reject-with", "silence"]), "REJECT_WITH");
        assert_eq!(
            var(BASE, &["--secret-key-files", "/nonexistent/k1"]),
            "SECRET_KEY_FILES"
        );
        let mut e = BASE.to_vec();
        e.push(("PORT", "70000"));
        assert_eq!(var(&e, &[]), "PORT");
        assert_eq!(var(BASE, &["--ws-remote-url", "http://x"]), "WS_REMOTE_URL");
        assert_eq!(
            var(BASE, &["--jwt-algorithms", "HS256,none"]),
            "JWT_ALGORITHMS"
        );
        assert_eq!(
            var(BASE, &["--jwt-algorithms", "RS256"]),
            "JWT_PUBLIC_KEY_FILE"
        );
        assert_eq!(var(BASE, &["--loglevel", "LOUD"]), "LOGLEVEL");
        assert_eq!(var(BASE, &["--bogus"]), "--bogus");
        assert_eq!(var(BASE, &["--port"]), "--port");
        assert_eq!(var(BASE, &["--api-path", "no-slash"]), "API_PATH");
    }

    fn all_errors(pairs: &[(&str, &str)], args: &[&str]) -> Vec<ConfigError> {
        match Config::from_sources_all(env(pairs), args.iter().map(|s| s.to_string())) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors,
        }
    }

    #[test]
    fn numbers_out_of_range_name_the_range() {
        let one = |pairs: &[(&str, &str)]| {
            let mut e = all_errors(pairs, &[]);
            assert_eq!(e.len(), 1, "{e:?}");
            e.remove(0)
        };
        let with = |var: &str, v: &str| {
            let mut e: Vec<(&str, &str)> = BASE.to_vec();
            e.push((var, v));
            one(&e)
        };
        assert_eq!(
            with("PORT", "70000").to_string(),
            "configuration error: PORT: '70000' is out of range 0-65535"
        );
        assert_eq!(with("PORT", "-1").message, "'-1' is out of range 0-65535");
        assert_eq!(
            with("PORT", "99999999999999999999999").message,
            "'99999999999999999999999' is out of range 0-65535"
        );
        assert_eq!(with("PORT", "5k").message, "'5k' is not a valid number");
        assert_eq!(with("WORKERS", "0").message, "'0' is out of range 1-256");
        // Every option with a range, just outside it.
        let ranged = OPTIONS
            .iter()
            .filter_map(|o| o.range().map(|(lo, hi)| (o.var(), lo, hi)));
        assert_eq!(ranged.clone().count(), 18);
        for (var, lo, hi) in ranged {
            let bad = if lo > 0 {
                (lo - 1).to_string()
            } else {
                (u128::from(hi) + 1).to_string()
            };
            let e = if var == "KUBERNETES_SERVICE_PORT" {
                one(&[
                    ("SECRET_KEY", LONG),
                    ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
                    (var, &bad),
                ])
            } else {
                with(var, &bad)
            };
            assert_eq!(e.var, var);
            let message = match (hi, lo) {
                (u64::MAX, 0) => format!("'{bad}' is too large (at most {hi})"),
                (u64::MAX, _) => format!("must be at least {lo}"),
                _ => format!("'{bad}' is out of range {lo}-{hi}"),
            };
            assert_eq!(e.message, message);
        }
        assert_eq!(with("MAX_CONNECTIONS", "-3").message, "must be at least 1");
        // A configuration built in code gets the same words.
        let mut c = run(BASE, &[]).unwrap();
        c.workers = 300;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "configuration error: WORKERS: '300' is out of range 1-256"
        );
        c.workers = 1;
        c.handshake_timeout = Duration::ZERO;
        assert_eq!(
            c.validate().unwrap_err().message,
            "'0' is out of range 1-31536000"
        );
        c.handshake_timeout = Duration::from_millis(300);
        assert!(c.validate().is_ok());
    }

    #[test]
    #[should_panic(expected = "not in OPTIONS")]
    fn reading_a_row_that_is_not_in_the_table_is_caught() {
        // The macro lists every row it defines; a row written by hand
        // outside it would never be given a value.
        const PING_INTERVAL_SECOND: Opt<Duration> = Opt {
            var: "PING_INTERVAL_SECOND",
            flag: "--ping-interval-second",
            default: "15",
            doc: "",
            parse: Within(seconds, 0, MAX_SECONDS),
        };
        let r = Reader {
            values: Vec::new(),
            errors: Vec::new(),
        };
        r.is_set(&PING_INTERVAL_SECOND);
    }

    #[test]
    fn every_default_parses_and_every_row_is_listed_once() {
        let mut vars: Vec<&str> = OPTIONS.iter().map(|o| o.var()).collect();
        vars.sort_unstable();
        vars.dedup();
        assert_eq!(vars.len(), OPTIONS.len(), "a variable twice");
        for o in OPTIONS {
            assert_eq!(
                o.flag().trim_start_matches("--"),
                o.var().to_ascii_lowercase().replace('_', "-"),
                "the flag is the variable's name"
            );
        }
        // Reading a configuration with nothing set parses every default
        // (a default that did not parse would panic).
        let (_, errors) = Config::parse(env(BASE), Vec::<String>::new());
        assert!(errors.is_empty(), "{errors:?}");
        let in_cluster = [("SECRET_KEY", LONG), ("KUBERNETES_SERVICE_HOST", "h")];
        assert!(
            Config::parse(env(&in_cluster), Vec::<String>::new())
                .1
                .is_empty()
        );
    }

    #[test]
    fn a_row_reads_its_type() {
        let mut r = Reader {
            values: vec![
                ("PORT", "5002".into()),
                ("PEER_TIMEOUT_SECONDS", " ".into()),
                ("HOST_PATH_PREFIX", "/a/b/".into()),
            ],
            errors: Vec::new(),
        };
        let port: u16 = r.get(&PORT);
        assert_eq!(port, 5002);
        assert_eq!(r.get(&PEER_TIMEOUT_SECONDS), None);
        assert_eq!(r.get(&HANDSHAKE_TIMEOUT_SECONDS), Duration::from_secs(10));
        assert_eq!(r.get(&TOKEN_SOURCES), [TokenSource::Path]);
        // Invalid: the default, and the error once however often it is read.
        assert_eq!(r.get(&HOST_PATH_PREFIX), None);
        assert_eq!(r.get(&HOST_PATH_PREFIX), None);
        assert_eq!(
            r.errors,
            [ConfigError::new(
                "HOST_PATH_PREFIX",
                "must be a single path segment (no '/' inside)"
            )]
        );
    }

    #[test]
    fn no_error_hides_another_or_shows_a_secret() {
        let vars = |pairs: &[(&str, &str)], args: &[&str]| -> Vec<String> {
            all_errors(pairs, args).into_iter().map(|e| e.var).collect()
        };
        // A mistyped flag's inline value may be a secret: never echoed.
        let e = all_errors(BASE, &["--secret-kye=supersecretvalue123"]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].var, "--secret-kye");
        assert!(!e[0].to_string().contains("supersecret"), "{}", e[0]);
        // A bad leeway does not hide a weak secret.
        let weak = [("SECRET_KEY", "short"), ("LOCAL_DEV_MODE", "true")];
        let mut with_leeway = weak.to_vec();
        with_leeway.push(("JWT_LEEWAY_SECONDS", "abc"));
        assert_eq!(
            vars(&with_leeway, &[]),
            ["JWT_LEEWAY_SECONDS", "SECRET_KEY"]
        );
        // A valid but long ping interval gives no error about the timeout
        // derived from it.
        let mut ping = BASE.to_vec();
        ping.push(("PING_INTERVAL_SECONDS", "20000000"));
        assert!(vars(&ping, &[]).is_empty(), "{:?}", vars(&ping, &[]));
        // One of a whole year leaves no longer timeout to derive: the
        // interval is named, not the timeout nobody set.
        let mut year = BASE.to_vec();
        year.push(("PING_INTERVAL_SECONDS", "31536000"));
        assert_eq!(vars(&year, &[]), ["PING_INTERVAL_SECONDS"]);
        year.push(("PEER_TIMEOUT_SECONDS", "31536000"));
        assert_eq!(vars(&year, &[]), ["PEER_TIMEOUT_SECONDS"]);
        // No keepalive: a peer timeout would be ignored, so it is refused.
        let mut off = BASE.to_vec();
        off.push(("PING_INTERVAL_SECONDS", "0"));
        assert!(vars(&off, &[]).is_empty());
        off.push(("PEER_TIMEOUT_SECONDS", "300"));
        assert_eq!(vars(&off, &[]), ["PEER_TIMEOUT_SECONDS"]);
        // Blank is unset, for both checks; invalid is reported once.
        let blank = ("PEER_TIMEOUT_SECONDS", "");
        off.pop();
        off.push(blank);
        assert!(vars(&off, &[]).is_empty(), "{:?}", vars(&off, &[]));
        year.pop();
        year.push(blank);
        assert_eq!(vars(&year, &[]), ["PING_INTERVAL_SECONDS"]);
        off.pop();
        off.push(("PEER_TIMEOUT_SECONDS", "abc"));
        assert_eq!(vars(&off, &[]), ["PEER_TIMEOUT_SECONDS"]);
        // A bad LOCAL_DEV_MODE does not hide a bad WS_REMOTE_URL.
        assert_eq!(
            vars(
                &[
                    ("SECRET_KEY", LONG),
                    ("LOCAL_DEV_MODE", "maybe"),
                    ("WS_REMOTE_URL", "http://x")
                ],
                &[]
            ),
            ["LOCAL_DEV_MODE", "WS_REMOTE_URL"]
        );
    }

    #[test]
    fn every_error_is_reported_once_in_one_run() {
        let mut e = BASE.to_vec();
        e.extend([
            ("PORT", "70000"),
            ("WORKERS", "0"),
            ("LOGLEVEL", "LOUD"),
            ("SHUTDOWN_GRACE_SECONDS", "x"),
            ("REJECT_WITH", "silence"),
        ]);
        let errors = all_errors(&e, &["--bogus", "1", "--token-sources", "path,pigeon"]);
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(
            vars,
            [
                "--bogus",
                "PORT",
                "WORKERS",
                "TOKEN_SOURCES",
                "REJECT_WITH",
                "LOGLEVEL",
                "SHUTDOWN_GRACE_SECONDS"
            ]
        );
        // The first is what from_sources reports, as before.
        assert_eq!(run(&e, &["--bogus"]).unwrap_err().var, "--bogus");
        // Parse errors come before the checks of values together.
        let errors = all_errors(&[("LOCAL_DEV_MODE", "true"), ("PORT", "x")], &[]);
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars, ["PORT", "SECRET_KEY"]);
        // Nothing that only follows from another mistake.
        let only = |pairs: &[(&str, &str)], var: &str| {
            let errors = all_errors(pairs, &[]);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].var, var);
        };
        only(
            &[("SECRET_KEY", LONG), ("LOCAL_DEV_MODE", "perhaps")],
            "LOCAL_DEV_MODE",
        );
        only(
            &[
                ("LOCAL_DEV_MODE", "1"),
                ("SECRET_KEY_FILES", "/nonexistent/k1"),
            ],
            "SECRET_KEY_FILES",
        );
        let mut e = BASE.to_vec();
        e.extend([
            ("PING_INTERVAL_SECONDS", "x"),
            ("PEER_TIMEOUT_SECONDS", "3"),
        ]);
        only(&e, "PING_INTERVAL_SECONDS");
        let mut e = BASE.to_vec();
        e.push(("RELAY_BUFFER_BYTES", "100"));
        only(&e, "RELAY_BUFFER_BYTES");
        let mut e = BASE.to_vec();
        e.push(("JWT_ALGORITHMS", "RS256,none"));
        only(&e, "JWT_ALGORITHMS");
    }

    #[test]
    fn arguments_are_flags_only_and_a_stray_word_is_never_echoed() {
        // The library knows no subcommand, --help or --version: those are
        // the binary's (src/cli.rs).
        for word in ["check-config", "hunter2-secret", "-h"] {
            assert!(run(BASE, &[word]).is_err(), "{word}");
        }
        let e = all_errors(
            BASE,
            &["--port", "5002", "hunter2-secret", "--host", "h", "x"],
        );
        let lines: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "configuration error: args: unexpected argument 3 (not shown: it may be a secret; see --help)",
                "configuration error: args: unexpected argument 6 (not shown: it may be a secret; see --help)",
            ]
        );
        // A mistyped flag gets a suggestion, and its value is not one more
        // stray word.
        let e = run(BASE, &["--shutdown-grace", "2"]).unwrap_err();
        assert!(
            e.message.contains("did you mean --shutdown-grace-seconds?"),
            "{e}"
        );
        assert_eq!(all_errors(BASE, &["--shutdown-grace", "2"]).len(), 1);
        // What a host sorting its own command line needs.
        assert!(is_option_flag("--port") && !is_option_flag("--help"));
        assert_eq!(
            did_you_mean("chek-config", ["token", "check-config"]),
            Some("check-config")
        );
    }

    #[test]
    fn variables_that_look_like_ours_are_named_with_the_one_expected() {
        let found = |names: &[&str]| -> Vec<(String, &'static str)> {
            lookalike_variables(names.iter().copied())
                .into_iter()
                .map(|l| (l.found, l.expected))
                .collect()
        };
        for (typo, meant) in [
            ("SHUTDOWN_GRACE", "SHUTDOWN_GRACE_SECONDS"),
            ("PING_INTERVAL_SECS", "PING_INTERVAL_SECONDS"),
            ("MAX_FRAME_SIZE_SECONDS", "MAX_FRAME_SIZE"),
            ("PROT", "PORT"),
            ("secret_key", "SECRET_KEY"),
            ("SECRET_KY", "SECRET_KEY"),
            ("SECRET_KEY_FILE", "SECRET_KEY_FILES"),
            ("LOG_LEVEL", "LOGLEVEL"),
            ("JWT_ALGORITHM", "JWT_ALGORITHMS"),
            ("ALLOWED_ORIGIN", "ALLOWED_ORIGINS"),
            ("HANDSHAKE_TIMEOUT", "HANDSHAKE_TIMEOUT_SECONDS"),
            ("UPSTREAM_TIMOUT_SECONDS", "UPSTREAM_TIMEOUT_SECONDS"),
            ("RUST_LGO", "RUST_LOG"),
        ] {
            assert_eq!(found(&[typo]), [(typo.to_owned(), meant)], "{typo}");
        }
        assert_eq!(
            lookalike_variables(["SHUTDOWN_GRACE"])[0].to_string(),
            "environment variable SHUTDOWN_GRACE is not an option and is ignored: did you mean SHUTDOWN_GRACE_SECONDS?"
        );
        // Ours, and what a shell, a container or Kubernetes sets.
        let mut unrelated: Vec<&str> = OPTIONS.iter().map(|o| o.var()).collect();
        unrelated.extend([
            "PATH",
            "HOME",
            "HOSTNAME",
            "USER",
            "SHELL",
            "TERM",
            "LANG",
            "LC_ALL",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "TZ",
            "LOGNAME",
            "MAIL",
            "EDITOR",
            "PAGER",
            "DISPLAY",
            "_",
            "RUST_LOG",
            "RUST_BACKTRACE",
            "RUST_LOG_STYLE",
            "RUST_MIN_STACK",
            "CARGO_HOME",
            "RUSTUP_HOME",
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
            "http_proxy",
            "no_proxy",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "LD_LIBRARY_PATH",
            "TMPDIR",
            "XDG_RUNTIME_DIR",
            "CI",
            "GITHUB_ACTIONS",
            "E2E_SKIP",
            "KUBERNETES_PORT",
            "KUBERNETES_PORT_443_TCP",
            "KUBERNETES_PORT_443_TCP_ADDR",
            "KUBERNETES_PORT_443_TCP_PORT",
            "KUBERNETES_PORT_443_TCP_PROTO",
            "KUBERNETES_SERVICE_PORT_HTTPS",
            "KUBEVIRT_VNC_PROXY_SERVICE_HOST",
            "KUBEVIRT_VNC_PROXY_SERVICE_PORT",
            "KUBEVIRT_VNC_PROXY_SERVICE_PORT_WS",
            "KUBEVIRT_VNC_PROXY_PORT",
            "KUBEVIRT_VNC_PROXY_PORT_5001_TCP",
            "KUBEVIRT_VNC_PROXY_PORT_5001_TCP_PORT",
            "KUBEVIRT_VNC_PROXY_PORT_5001_TCP_ADDR",
            "HOST_SERVICE_HOST",
            "HOST_PORT",
            "PORT_PORT_80_TCP",
        ]);
        assert_eq!(found(&unrelated), []);
    }

    #[test]
    fn help_lists_every_option() {
        let h = help_text();
        for o in OPTIONS {
            assert!(h.contains(o.var()) && h.contains(o.flag()), "{}", o.var());
        }
    }

    #[test]
    fn a_bearer_token_over_ws_is_refused_unless_allowed() {
        let in_cluster = [
            ("SECRET_KEY", LONG),
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("WS_REMOTE_URL", "ws://10.0.0.2:8080"),
        ];
        let e = run(&in_cluster, &[]).unwrap_err();
        assert_eq!(e.var, "WS_REMOTE_URL");
        assert!(
            e.message.contains("ALLOW_CLEARTEXT_BEARER_TOKEN=true"),
            "{e}"
        );
        assert!(e.message.contains("in-cluster mode"), "{e}");
        let mut allowed = in_cluster.to_vec();
        allowed.push(("ALLOW_CLEARTEXT_BEARER_TOKEN", "true"));
        let c = run(&allowed, &[]).unwrap();
        assert!(!c.upstream.tls && c.token_file.is_some());
        // wss:// in-cluster, and ws:// without a token, start as before.
        let mut wss = in_cluster.to_vec();
        wss[2] = ("WS_REMOTE_URL", "wss://10.0.0.2:8443");
        assert!(run(&wss, &[]).is_ok());
        assert!(run(BASE, &["--ws-remote-url", "ws://10.0.0.2"]).is_ok());
        let e = run(
            BASE,
            &["--upstream-token-file", "/t", "--ws-remote-url", "ws://h"],
        );
        assert!(
            e.unwrap_err()
                .message
                .contains("UPSTREAM_TOKEN_FILE is set")
        );
    }

    #[test]
    fn in_cluster_mode_brackets_ipv6_and_uses_the_service_account() {
        let c = run(
            &[
                ("SECRET_KEY", LONG),
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "6443"),
            ],
            &[],
        )
        .unwrap();
        assert!(c.in_cluster && c.upstream.tls);
        assert_eq!(c.upstream.host_header(), "[fd00::1]:6443");
        let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
        assert_eq!(
            c.ca_file.as_deref(),
            Some(std::path::Path::new(&format!("{sa}/ca.crt")))
        );
        assert_eq!(
            c.token_file.as_deref(),
            Some(std::path::Path::new(&format!("{sa}/token")))
        );
        assert_eq!(c.upstream_subprotocols, ["plain.kubevirt.io"]);
        assert_eq!(c.client_subprotocols, ["binary", "plain.kubevirt.io"]);
        assert_eq!(c.upstream_query_params, ["preserveSession"]);
        let c = run(
            &[
                ("SECRET_KEY", LONG),
                ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
                ("UPSTREAM_SUBPROTOCOLS", ""),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.upstream.host_header(), "10.0.0.1");
        assert!(c.upstream_subprotocols.is_empty());
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("ws://[::1]:9000/base/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("::1", 9000, "/base")
        );
        assert_eq!(u.host_header(), "[::1]:9000");
        assert_eq!(UpstreamUrl::parse("ws://h").unwrap().host_header(), "h");
        for bad in [
            "http://h",
            "ws://",
            "ws://h:0",
            "ws://h:x",
            "ws://h/p?q",
            "ws://[::1",
            "ws://[::1]8001",
            "ws://[::1]:",
            "ws://::1:8001",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_password_in_the_upstream_url_is_refused_and_never_shown() {
        for url in [
            "ws://admin:hunter2@h:8001/p",
            "ws://admin:hunter2@h",
            "wss://admin:hunter2@[::1]:1",
            "http://admin:hunter2@h",
            "admin:hunter2@h/x",
            // A '/' in the password: the authority seems to end inside it.
            "ws://admin:hun/ter2@h:8001",
            "ws://admin:1234/ter2@h:8001",
            // One slash short.
            "ws:/admin:hunter2@h",
        ] {
            let e = UpstreamUrl::parse(url).unwrap_err();
            assert!(!e.contains("hun") && !e.contains("admin"), "{e}");
            assert!(e.starts_with("must not contain '@'"), "{url}: {e}");
        }
    }
}
