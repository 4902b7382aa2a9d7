//! Typed configuration: defaults, the environment variables of the Python
//! program it replaces, command-line flags, and validation with messages that
//! name the setting to fix.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{JwtSettings, JwtVerifier, KeyMaterial, parse_algorithm};
use crate::events::LogFormat;
use crate::token::TokenSource;

/// The upstream path KubeVirt serves VNC at.
pub const DEFAULT_API_PATH: &str = "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{vmi_name}/vnc";

/// One configuration option: its variable, its flag, its default, its meaning.
/// This table drives flag parsing and `--help`, so the two cannot disagree.
struct Opt {
    var: &'static str,
    flag: &'static str,
    default: &'static str,
    help: &'static str,
}

#[rustfmt::skip]
const OPTIONS: &[Opt] = &[
    Opt { var: "HOST", flag: "--host", default: "0.0.0.0", help: "address to listen on" },
    Opt { var: "PORT", flag: "--port", default: "5001", help: "port to listen on" },
    Opt { var: "WORKERS", flag: "--workers", default: "1", help: "independent event loops sharing the port (SO_REUSEPORT), one thread each; MAX_CONNECTIONS applies to each" },
    Opt { var: "HOST_PATH_PREFIX", flag: "--host-path-prefix", default: "", help: "one leading path segment to expect and strip (behind a reverse proxy)" },
    Opt { var: "SECRET_KEY", flag: "--secret-key", default: "", help: "HMAC secret for HS* tokens (required unless JWT_PUBLIC_KEY_FILE is set)" },
    Opt { var: "JWT_ALGORITHMS", flag: "--jwt-algorithms", default: "HS256", help: "accepted algorithms, comma-separated: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA" },
    Opt { var: "JWT_PUBLIC_KEY_FILE", flag: "--jwt-public-key-file", default: "", help: "PEM public key files for the asymmetric algorithms, comma-separated (kid = file name without extension)" },
    Opt { var: "SECRET_KEY_FILES", flag: "--secret-key-files", default: "", help: "more HMAC secrets, one file each, comma-separated (rotation; kid = file name without extension)" },
    Opt { var: "ALLOW_WEAK_SECRET", flag: "--allow-weak-secret", default: "false", help: "accept HMAC secrets shorter than 32 bytes (with a warning)" },
    Opt { var: "JWT_LEEWAY_SECONDS", flag: "--jwt-leeway-seconds", default: "30", help: "clock skew allowed on exp and nbf" },
    Opt { var: "JWT_AUDIENCE", flag: "--jwt-audience", default: "", help: "accepted audiences, comma-separated; when set, aud is required" },
    Opt { var: "JWT_ISSUER", flag: "--jwt-issuer", default: "", help: "accepted issuers, comma-separated; when set, iss is required" },
    Opt { var: "TOKEN_SOURCES", flag: "--token-sources", default: "path", help: "where tokens may travel: path, query, header, cookie, protocol (comma-separated)" },
    Opt { var: "TOKEN_COOKIE", flag: "--token-cookie", default: "vnc_token", help: "cookie name for the cookie token source" },
    Opt { var: "ALLOWED_ORIGINS", flag: "--allowed-origins", default: "", help: "exact Origin values allowed, comma-separated; others get 403 (required for the cookie source)" },
    Opt { var: "CLOSE_ON_TOKEN_EXPIRY", flag: "--close-on-token-expiry", default: "true", help: "end a session when its token expires (client close 1008)" },
    Opt { var: "MAX_CONNECTIONS", flag: "--max-connections", default: "10000", help: "open connections at most, per worker (the probe path's not counted); at the limit accepting pauses until 90 %" },
    Opt { var: "MAX_CONNECTIONS_PER_IP", flag: "--max-connections-per-ip", default: "0", help: "open connections per client address at most, 503 above (0: no limit; behind an ingress every client shares its address)" },
    Opt { var: "REJECT_WITH", flag: "--reject-with", default: "http", help: "http: refuse with HTTP statuses; close: upgrade, then close with 44xx/45xx codes a web page can read" },
    Opt { var: "LOCAL_DEV_MODE", flag: "--local-dev-mode", default: "false", help: "true: upstream at WS_REMOTE_URL (e.g. kubectl proxy); false: in-cluster mode" },
    Opt { var: "WS_REMOTE_URL", flag: "--ws-remote-url", default: "ws://localhost:8001", help: "upstream base URL, ws://… or wss://… (in-cluster mode: only when set explicitly)" },
    Opt { var: "KUBERNETES_SERVICE_HOST", flag: "--kubernetes-service-host", default: "", help: "API server host in in-cluster mode (set by Kubernetes)" },
    Opt { var: "KUBERNETES_SERVICE_PORT", flag: "--kubernetes-service-port", default: "443", help: "API server port in in-cluster mode (set by Kubernetes)" },
    Opt { var: "SERVICE_ACCOUNT_DIR", flag: "--service-account-dir", default: "/var/run/secrets/kubernetes.io/serviceaccount", help: "directory with the service account's ca.crt and token" },
    Opt { var: "UPSTREAM_CA_FILE", flag: "--upstream-ca-file", default: "", help: "PEM CA bundle, the only trust anchors for a wss:// upstream (default: SERVICE_ACCOUNT_DIR/ca.crt)" },
    Opt { var: "UPSTREAM_TOKEN_FILE", flag: "--upstream-token-file", default: "", help: "bearer token file sent upstream (default in-cluster: SERVICE_ACCOUNT_DIR/token)" },
    Opt { var: "ALLOW_CLEARTEXT_BEARER_TOKEN", flag: "--allow-cleartext-bearer-token", default: "false", help: "true: send the upstream bearer token over a ws:// (unencrypted) upstream; otherwise that configuration (e.g. in-cluster mode with a ws:// WS_REMOTE_URL) does not start (status 2)" },
    Opt { var: "CREDENTIALS_CHECK_SECONDS", flag: "--credentials-check-seconds", default: "5", help: "how often the CA and token files are checked for rotation" },
    Opt { var: "API_PATH", flag: "--api-path", default: DEFAULT_API_PATH, help: "upstream path template with {namespace} and {vmi_name}" },
    Opt { var: "UPSTREAM_SUBPROTOCOLS", flag: "--upstream-subprotocols", default: "plain.kubevirt.io", help: "subprotocols offered to the upstream, comma-separated (empty: none)" },
    Opt { var: "CLIENT_SUBPROTOCOLS", flag: "--client-subprotocols", default: "binary,plain.kubevirt.io", help: "subprotocols a client may be answered with (the first it offers that is listed)" },
    Opt { var: "UPSTREAM_QUERY_PARAMS", flag: "--upstream-query-params", default: "preserveSession", help: "query parameters passed on to the upstream, comma-separated; others are dropped" },
    Opt { var: "LOGLEVEL", flag: "--loglevel", default: "INFO", help: "DEBUG, INFO, WARNING or ERROR (RUST_LOG wins when set)" },
    Opt { var: "LOG_FORMAT", flag: "--log-format", default: "text", help: "text or json (one JSON object per line, access log included)" },
    Opt { var: "METRICS_ADDR", flag: "--metrics-addr", default: "", help: "HOST:PORT of the probe path: GET /metrics (Prometheus text format), /healthz and /readyz, answered outside MAX_CONNECTIONS; off when empty" },
    Opt { var: "SHUTDOWN_GRACE_SECONDS", flag: "--shutdown-grace-seconds", default: "25", help: "on SIGTERM/SIGINT, how long open sessions may run before close 1001" },
    Opt { var: "PING_INTERVAL_SECONDS", flag: "--ping-interval-seconds", default: "15", help: "ping a side after this much silence from it (0: no keepalive)" },
    Opt { var: "PEER_TIMEOUT_SECONDS", flag: "--peer-timeout-seconds", default: "", help: "a side silent this long is gone: the other gets close 1001 (default 3 x PING_INTERVAL_SECONDS)" },
    Opt { var: "MAX_REQUEST_HEAD_BYTES", flag: "--max-request-head-bytes", default: "8192", help: "largest client request head accepted (431 above)" },
    Opt { var: "HANDSHAKE_TIMEOUT_SECONDS", flag: "--handshake-timeout-seconds", default: "10", help: "time a client has to send its request head (408 after)" },
    Opt { var: "UPSTREAM_TIMEOUT_SECONDS", flag: "--upstream-timeout-seconds", default: "10", help: "time the upstream has to connect, finish TLS and answer the upgrade (504 after)" },
    Opt { var: "RELAY_BUFFER_BYTES", flag: "--relay-buffer-bytes", default: "65536", help: "size of the fixed buffer per relay direction" },
    Opt { var: "RELAY_BULK_BUFFER_BYTES", flag: "--relay-bulk-buffer-bytes", default: "262144", help: "larger buffer for a direction whose source brings a whole buffer in one read (fewer, larger reads and writes); off when not above RELAY_BUFFER_BYTES" },
    Opt { var: "RELAY_BULK_BUFFERS", flag: "--relay-bulk-buffers", default: "64", help: "at most this many bulk buffers in use at once (bounds their memory); others keep RELAY_BUFFER_BYTES" },
    Opt { var: "MAX_FRAME_SIZE", flag: "--max-frame-size", default: "67108864", help: "largest frame payload relayed (close 1009 above)" },
];

/// Durations are whole seconds, at most a year: no timeout needs more, and a
/// deadline far enough out overflows the clock it is added to.
const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The numeric options and the values each accepts (inclusive). A value
/// outside is refused as "'V' is out of range LO-HI" (a count bounded only by
/// its type: "must be at least LO"), when read and by [`Config::validate`]
/// alike.
#[rustfmt::skip]
const RANGES: &[(&str, u64, u64)] = &[
    ("PORT", 0, 65535),
    ("WORKERS", 1, 256),
    ("JWT_LEEWAY_SECONDS", 0, MAX_SECONDS),
    ("MAX_CONNECTIONS", 1, usize::MAX as u64),
    ("MAX_CONNECTIONS_PER_IP", 0, usize::MAX as u64),
    ("KUBERNETES_SERVICE_PORT", 1, 65535),
    ("CREDENTIALS_CHECK_SECONDS", 0, MAX_SECONDS),
    ("SHUTDOWN_GRACE_SECONDS", 0, MAX_SECONDS),
    ("PING_INTERVAL_SECONDS", 0, MAX_SECONDS),
    ("PEER_TIMEOUT_SECONDS", 0, MAX_SECONDS),
    ("MAX_REQUEST_HEAD_BYTES", 512, 1 << 20),
    ("HANDSHAKE_TIMEOUT_SECONDS", 1, MAX_SECONDS),
    ("UPSTREAM_TIMEOUT_SECONDS", 1, MAX_SECONDS),
    ("RELAY_BUFFER_BYTES", 1024, 16 << 20),
    ("RELAY_BULK_BUFFER_BYTES", 0, 16 << 20),
    ("RELAY_BULK_BUFFERS", 0, usize::MAX as u64),
    ("MAX_FRAME_SIZE", 1, u64::MAX),
];

/// The binary's subcommands. They may stand anywhere among the flags.
pub const SUBCOMMANDS: &[&str] = &["token", "check-config"];

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
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.contains('@') {
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

/// Everything the proxy needs to run. Build it with [`Config::from_env`] (as
/// the binary does), [`Config::from_sources`], or in code from
/// [`Config::local_dev`] and then adjust fields.
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
    /// Largest frame payload relayed.
    pub max_frame_size: u64,
    /// Time allowed for the closing handshake and for lingering after a
    /// refusal before a socket is closed regardless.
    pub close_timeout: Duration,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the proxy with this configuration.
    Run(Box<Config>),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

impl Config {
    /// A local-dev-mode configuration with defaults, for use in code: the
    /// upstream at `remote_url` (`ws://…`), HS256 with `secret`, listening on
    /// 127.0.0.1 on a free port.
    pub fn local_dev(remote_url: &str, secret: &[u8]) -> Result<Config, ConfigError> {
        let (command, errors) = Self::parse(
            [
                ("LOCAL_DEV_MODE".to_owned(), "true".to_owned()),
                ("WS_REMOTE_URL".to_owned(), remote_url.to_owned()),
                ("HOST".to_owned(), "127.0.0.1".to_owned()),
                ("PORT".to_owned(), "0".to_owned()),
            ],
            Vec::<String>::new(),
        );
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let Command::Run(c) = command else {
            return Err(ConfigError::new("args", "unexpected command"));
        };
        let mut c = *c;
        c.jwt.secrets = vec![KeyMaterial {
            kid: None,
            bytes: secret.to_vec(),
            source: "SECRET_KEY".into(),
        }];
        c.validate()?;
        Ok(c)
    }

    /// Read the process environment and command line.
    pub fn from_env() -> Result<Command, ConfigError> {
        Self::from_sources(std::env::vars(), std::env::args().skip(1))
    }

    /// Build from explicit environment pairs and arguments; a flag wins over
    /// its variable. The first problem found;
    /// [`from_sources_all`](Self::from_sources_all) reports every one.
    pub fn from_sources(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Command, ConfigError> {
        Self::from_sources_all(env, args)
            .map_err(|e| e.errors.into_iter().next().expect("at least one error"))
    }

    /// [`from_sources`](Self::from_sources), reporting every problem found
    /// (what the binary does): each setting at fault once, and nothing that
    /// only follows from another one at fault.
    pub fn from_sources_all(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Command, ConfigErrors> {
        let (command, mut errors) = Self::parse(env, args);
        let Command::Run(c) = &command else {
            return Ok(command);
        };
        for (e, depends_on) in c.problems(true) {
            let reported = |var: &str| errors.iter().any(|r| r.var == var);
            if !reported(&e.var) && !depends_on.iter().any(|d| reported(d)) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(command)
        } else {
            Err(ConfigErrors {
                errors,
                log_format: c.log_format,
            })
        }
    }

    /// Read every value, collecting every problem: the command, with the
    /// configuration as far as it could be read (a value at fault replaced
    /// by its default), and the problems in the order found.
    fn parse(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> (Command, Vec<ConfigError>) {
        let mut r = Reader {
            values: Vec::new(),
            errors: Vec::new(),
        };
        let known: Vec<(String, String)> = env.into_iter().collect();
        for opt in OPTIONS {
            if let Some((_, v)) = known.iter().find(|(k, _)| k == opt.var) {
                r.values.push((opt.var, v.clone()));
            }
        }
        let mut args = args.into_iter().peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return (Command::Help, Vec::new()),
                "-V" | "--version" => return (Command::Version, Vec::new()),
                _ => {}
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let Some(opt) = OPTIONS.iter().find(|o| o.flag == flag) else {
                let hint = if flag.starts_with('-') {
                    lookalike(&flag, OPTIONS.iter().map(|o| o.flag))
                } else {
                    lookalike(&flag, SUBCOMMANDS.iter().copied())
                };
                let hint = hint.map_or(String::new(), |f| format!("; did you mean {f}?"));
                // Only the flag: an inline value may be a secret
                // (`--secret-kye=…`), and this line may go to a log.
                r.fail(ConfigError::new(
                    &flag,
                    format!("unknown argument{hint} (see --help)"),
                ));
                // An unknown flag's value is not one more unknown argument.
                if flag.starts_with('-')
                    && inline.is_none()
                    && args.peek().is_some_and(|next| !next.starts_with('-'))
                {
                    args.next();
                }
                continue;
            };
            let Some(value) = inline.or_else(|| args.next()) else {
                r.fail(ConfigError::new(opt.flag, "needs a value"));
                break;
            };
            r.values.retain(|(k, _)| *k != opt.var);
            r.values.push((opt.var, value));
        }

        let local_dev = r.bool("LOCAL_DEV_MODE");
        let default_upstream = || UpstreamUrl::parse(default_of("WS_REMOTE_URL")).expect("default");
        let upstream = match r.get("WS_REMOTE_URL").filter(|_| !local_dev) {
            // Which upstream applies is unknown: no error follows from it.
            // A URL that is set is checked all the same.
            _ if r.failed("LOCAL_DEV_MODE") => match r.get("WS_REMOTE_URL") {
                Some(url) => UpstreamUrl::parse(&url).unwrap_or_else(|m| {
                    r.fail(ConfigError::new("WS_REMOTE_URL", m));
                    default_upstream()
                }),
                None => default_upstream(),
            },
            // In a cluster the API server is where Kubernetes says it is,
            // unless the operator names another endpoint explicitly.
            None if !local_dev => {
                let port: u16 = r.num("KUBERNETES_SERVICE_PORT");
                match r.get("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()) {
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
                            "KUBERNETES_SERVICE_HOST",
                            "not set: in-cluster mode (LOCAL_DEV_MODE=false) needs it; outside a cluster set LOCAL_DEV_MODE=true",
                        ));
                        default_upstream()
                    }
                }
            }
            _ => match UpstreamUrl::parse(&r.or_default("WS_REMOTE_URL")) {
                Ok(u) => u,
                Err(m) => {
                    r.fail(ConfigError::new("WS_REMOTE_URL", m));
                    default_upstream()
                }
            },
        };
        let sa_dir = PathBuf::from(r.or_default("SERVICE_ACCOUNT_DIR"));
        let file = |var: &str| r.get(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        let ca_file =
            file("UPSTREAM_CA_FILE").or_else(|| upstream.tls.then(|| sa_dir.join("ca.crt")));
        let token_file =
            file("UPSTREAM_TOKEN_FILE").or_else(|| (!local_dev).then(|| sa_dir.join("token")));
        let allow_cleartext = r.bool("ALLOW_CLEARTEXT_BEARER_TOKEN");
        let upstream_known = !["LOCAL_DEV_MODE", "WS_REMOTE_URL", "KUBERNETES_SERVICE_HOST"]
            .iter()
            .any(|v| r.failed(v));
        // A service-account token over ws:// is readable by anyone on the
        // path (and in-cluster mode sends one by default): only on request.
        if token_file.is_some()
            && !upstream.tls
            && upstream_known
            && !allow_cleartext
            && !r.failed("ALLOW_CLEARTEXT_BEARER_TOKEN")
        {
            let why = if local_dev {
                "UPSTREAM_TOKEN_FILE is set"
            } else {
                "in-cluster mode (LOCAL_DEV_MODE=false) sends the service-account token"
            };
            r.fail(ConfigError::new(
                "WS_REMOTE_URL",
                format!(
                    "is a ws:// URL and {why}: the bearer token would travel unencrypted; \
                     use wss://, or set ALLOW_CLEARTEXT_BEARER_TOKEN=true to send it anyway"
                ),
            ));
        }
        let mut algorithms = Vec::new();
        for name in r.or_default("JWT_ALGORITHMS").split(',') {
            if name.trim().is_empty() {
                continue;
            }
            match parse_algorithm(name) {
                Some(a) => algorithms.push(a),
                None => {
                    r.fail(ConfigError::new(
                        "JWT_ALGORITHMS",
                        format!("unknown algorithm '{}'", name.trim()),
                    ));
                    break;
                }
            }
        }
        let mut secrets = Vec::new();
        if let Some(secret) = r.get("SECRET_KEY").filter(|s| !s.is_empty()) {
            secrets.push(KeyMaterial {
                kid: None,
                bytes: secret.into_bytes(),
                source: "SECRET_KEY".into(),
            });
        }
        secrets.extend(r.files("SECRET_KEY_FILES").into_iter().map(|mut k| {
            // A secret file ends with a newline more often than not.
            let trimmed = String::from_utf8_lossy(&k.bytes)
                .trim_end_matches(['\r', '\n'])
                .len();
            k.bytes.truncate(trimmed);
            k
        }));
        let public_keys = r.files("JWT_PUBLIC_KEY_FILE");
        let mut token_sources = Vec::new();
        for n in r.list("TOKEN_SOURCES") {
            match TokenSource::parse(&n) {
                Some(s) => token_sources.push(s),
                None => r.fail(ConfigError::new(
                    "TOKEN_SOURCES",
                    format!("unknown source '{n}'"),
                )),
            }
        }
        let reject_with = r.or_default("REJECT_WITH").trim().to_ascii_lowercase();
        let reject_with_close = match reject_with.as_str() {
            "http" => false,
            "close" => true,
            other => {
                r.fail(ConfigError::new(
                    "REJECT_WITH",
                    format!("'{other}' is not http or close"),
                ));
                false
            }
        };
        let prefix = r.or_default("HOST_PATH_PREFIX");
        let mut prefix = prefix.trim_matches('/');
        if prefix.contains('/') {
            r.fail(ConfigError::new(
                "HOST_PATH_PREFIX",
                "must be a single path segment (no '/' inside)",
            ));
            prefix = "";
        }
        let log_level = match parse_level(&r.or_default("LOGLEVEL")) {
            Ok(l) => l,
            Err(e) => {
                r.fail(e);
                log::LevelFilter::Info
            }
        };
        let log_format = match r
            .or_default("LOG_FORMAT")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                r.fail(ConfigError::new(
                    "LOG_FORMAT",
                    format!("'{other}' is not text or json"),
                ));
                LogFormat::Text
            }
        };
        let ping_interval = r.secs("PING_INTERVAL_SECONDS");
        let peer_timeout = match r.get("PEER_TIMEOUT_SECONDS") {
            Some(v) if !v.trim().is_empty() => r.secs("PEER_TIMEOUT_SECONDS"),
            // Derived: within the range whatever the (valid) interval, so
            // no error names a variable the operator did not set.
            _ => (3 * ping_interval).min(Duration::from_secs(MAX_SECONDS)),
        };
        let config = Config {
            host: r.or_default("HOST"),
            port: r.num("PORT"),
            workers: r.num("WORKERS"),
            path_prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            jwt: JwtSettings {
                algorithms,
                secrets,
                public_keys,
                leeway_secs: r.num("JWT_LEEWAY_SECONDS"),
                audience: r.list("JWT_AUDIENCE"),
                issuer: r.list("JWT_ISSUER"),
                allow_weak_secret: r.bool("ALLOW_WEAK_SECRET"),
            },
            token_sources,
            token_cookie: r.or_default("TOKEN_COOKIE"),
            allowed_origins: r.list("ALLOWED_ORIGINS"),
            close_on_token_expiry: r.bool("CLOSE_ON_TOKEN_EXPIRY"),
            max_connections: r.num("MAX_CONNECTIONS"),
            max_connections_per_ip: r.num("MAX_CONNECTIONS_PER_IP"),
            reject_with_close,
            upstream,
            in_cluster: !local_dev,
            ca_file,
            token_file,
            credentials_check_interval: r.secs("CREDENTIALS_CHECK_SECONDS"),
            upstream_subprotocols: r.list("UPSTREAM_SUBPROTOCOLS"),
            client_subprotocols: r.list("CLIENT_SUBPROTOCOLS"),
            upstream_query_params: r.list("UPSTREAM_QUERY_PARAMS"),
            api_path: r.or_default("API_PATH"),
            log_level,
            log_format,
            metrics_addr: r.get("METRICS_ADDR").filter(|a| !a.trim().is_empty()),
            shutdown_grace: r.secs("SHUTDOWN_GRACE_SECONDS"),
            ping_interval,
            peer_timeout,
            max_head_bytes: r.num("MAX_REQUEST_HEAD_BYTES"),
            handshake_timeout: r.secs("HANDSHAKE_TIMEOUT_SECONDS"),
            upstream_timeout: r.secs("UPSTREAM_TIMEOUT_SECONDS"),
            buffer_size: r.num("RELAY_BUFFER_BYTES"),
            bulk_buffer_size: r.num("RELAY_BULK_BUFFER_BYTES"),
            bulk_buffers: r.num("RELAY_BULK_BUFFERS"),
            max_frame_size: r.num("MAX_FRAME_SIZE"),
            close_timeout: Duration::from_secs(5),
        };
        // Argument errors first, then in the order of --help.
        let mut errors = r.errors;
        errors.sort_by_key(|e| {
            OPTIONS
                .iter()
                .position(|o| o.var == e.var)
                .map_or(0, |i| i + 1)
        });
        (Command::Run(Box::new(config)), errors)
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
            "SECRET_KEY",
            "SECRET_KEY_FILES",
            "JWT_PUBLIC_KEY_FILE",
            "JWT_ALGORITHMS",
            "ALLOW_WEAK_SECRET",
        ];
        let mut p: Vec<(ConfigError, &'static [&'static str])> = Vec::new();
        if keys && self.jwt.secrets.is_empty() && self.jwt.public_keys.is_empty() {
            p.push((
                ConfigError::new(
                    "SECRET_KEY",
                    "not set (required unless JWT_PUBLIC_KEY_FILE is set)",
                ),
                &["SECRET_KEY_FILES", "JWT_PUBLIC_KEY_FILE"],
            ));
        }
        for (var, value) in self.numeric_values() {
            if let Err(e) = check_range(var, value, &value.to_string()) {
                p.push((e, &[]));
            }
        }
        if self.buffer_size < self.max_head_bytes + 1024 {
            // Bytes that arrive with a handshake head must fit the buffer.
            p.push((
                ConfigError::new(
                    "RELAY_BUFFER_BYTES",
                    "must be at least MAX_REQUEST_HEAD_BYTES + 1024",
                ),
                &["MAX_REQUEST_HEAD_BYTES"],
            ));
        }
        if self.token_sources.is_empty() {
            p.push((
                ConfigError::new("TOKEN_SOURCES", "no token source enabled"),
                &[],
            ));
        }
        if self.token_sources.contains(&TokenSource::Cookie) && self.allowed_origins.is_empty() {
            // A cookie goes with every request the browser makes, from any
            // page: without an Origin check any site could open a console
            // with the user's cookie (cross-site WebSocket hijacking).
            p.push((
                ConfigError::new(
                    "ALLOWED_ORIGINS",
                    "must be set when TOKEN_SOURCES includes cookie (cross-site WebSocket hijacking)",
                ),
                &["TOKEN_SOURCES"],
            ));
        }
        if !self.ping_interval.is_zero() && self.peer_timeout <= self.ping_interval {
            p.push((
                ConfigError::new(
                    "PEER_TIMEOUT_SECONDS",
                    "must be longer than PING_INTERVAL_SECONDS (a peer needs time to answer a ping)",
                ),
                &["PING_INTERVAL_SECONDS"],
            ));
        }
        if let Err((var, m)) = JwtVerifier::new(&self.jwt) {
            p.push((ConfigError::new(var, m), KEY_SETTINGS));
        }
        if !self.api_path.starts_with('/') {
            p.push((ConfigError::new("API_PATH", "must start with '/'"), &[]));
        } else if self
            .api_path
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            p.push((
                ConfigError::new("API_PATH", "must not contain spaces or control characters"),
                &[],
            ));
        }
        p
    }

    /// The numeric settings, as the values [`RANGES`] bounds (a duration in
    /// whole seconds, a fraction counting as one more).
    fn numeric_values(&self) -> [(&'static str, u64); 16] {
        let secs = |d: Duration| d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
        let n = |v: usize| v as u64;
        [
            ("PORT", self.port.into()),
            ("WORKERS", n(self.workers)),
            ("JWT_LEEWAY_SECONDS", self.jwt.leeway_secs),
            ("MAX_CONNECTIONS", n(self.max_connections)),
            ("MAX_CONNECTIONS_PER_IP", n(self.max_connections_per_ip)),
            (
                "CREDENTIALS_CHECK_SECONDS",
                secs(self.credentials_check_interval),
            ),
            ("SHUTDOWN_GRACE_SECONDS", secs(self.shutdown_grace)),
            ("PING_INTERVAL_SECONDS", secs(self.ping_interval)),
            ("PEER_TIMEOUT_SECONDS", secs(self.peer_timeout)),
            ("MAX_REQUEST_HEAD_BYTES", n(self.max_head_bytes)),
            ("HANDSHAKE_TIMEOUT_SECONDS", secs(self.handshake_timeout)),
            ("UPSTREAM_TIMEOUT_SECONDS", secs(self.upstream_timeout)),
            ("RELAY_BUFFER_BYTES", n(self.buffer_size)),
            ("RELAY_BULK_BUFFER_BYTES", n(self.bulk_buffer_size)),
            ("RELAY_BULK_BUFFERS", n(self.bulk_buffers)),
            ("MAX_FRAME_SIZE", self.max_frame_size),
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

/// The `--help` text, generated from the option table.
pub fn help_text() -> String {
    let mut s = String::from(
        "kubevirt-vnc-proxy: WebSocket proxy from noVNC to KubeVirt VNC, guarded by JWT\n\n\
         USAGE: kubevirt-vnc-proxy [check-config] [OPTIONS]   run the proxy, or only check its configuration\n\
         \x20      kubevirt-vnc-proxy token [TOKEN OPTIONS]      mint a token (see token --help)\n\
         A subcommand may stand anywhere among the options.\n\n\
         Every option can be set by its environment variable or its flag; the flag wins.\n\n\
         OPTIONS:\n",
    );
    for o in OPTIONS {
        let default = if o.var == "SECRET_KEY" || o.default.is_empty() {
            "none".to_owned()
        } else {
            o.default.to_owned()
        };
        s.push_str(&format!(
            "  {} <value>   [env {}] [default: {}]\n      {}\n",
            o.flag, o.var, default, o.help
        ));
    }
    s.push_str("  -h, --help      print this help\n  -V, --version   print the version\n");
    s
}

/// Booleans as the Python program accepted them.
pub fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            var,
            format!("'{v}' is not a boolean (true/false, 1/0, yes/no, on/off)"),
        )),
    }
}

/// A whole number within the range [`RANGES`] gives `var` (a number past
/// it, negative or too long, is out of range too).
fn parse_num<T: TryFrom<u64>>(var: &str, v: &str) -> Result<T, ConfigError> {
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
                    out_of_range(var, v, below)
                } else {
                    ConfigError::new(var, format!("'{v}' is not a valid number"))
                },
            );
        }
    };
    check_range(var, n, v)?;
    T::try_from(n).map_err(|_| out_of_range(var, v, false))
}

fn check_range(var: &str, n: u64, shown: &str) -> Result<(), ConfigError> {
    match RANGES.iter().find(|r| r.0 == var) {
        Some((_, lo, hi)) if !(lo..=hi).contains(&&n) => Err(out_of_range(var, shown, n < *lo)),
        _ => Ok(()),
    }
}

/// "'V' is out of range LO-HI"; for a count with no upper bound but its
/// type's, "must be at least LO" (or "'V' is too large").
fn out_of_range(var: &str, shown: &str, below: bool) -> ConfigError {
    let (lo, hi) = RANGES
        .iter()
        .find(|r| r.0 == var)
        .map_or((0, u64::MAX), |r| (r.1, r.2));
    let message = if hi < usize::MAX as u64 {
        format!("'{shown}' is out of range {lo}-{hi}")
    } else if below {
        format!("must be at least {lo}")
    } else {
        format!("'{shown}' is too large (at most {hi})")
    };
    ConfigError::new(var, message)
}

fn default_of(var: &str) -> &'static str {
    known(var);
    OPTIONS
        .iter()
        .find(|o| o.var == var)
        .map_or("", |o| o.default)
}

/// Options are read by name: a name missing from [`OPTIONS`] (a typo in
/// this file) would silently read as unset with an empty default. Every
/// configuration the tests build reads every name, so they catch it.
fn known(var: &str) {
    debug_assert!(
        OPTIONS.iter().any(|o| o.var == var),
        "config.rs reads {var}, which is not in OPTIONS"
    );
}

/// The values given (flags over variables), and every problem found so far:
/// a value at fault is recorded and replaced by its default, so that reading
/// goes on and one run names every mistake.
struct Reader {
    values: Vec<(&'static str, String)>,
    errors: Vec<ConfigError>,
}

impl Reader {
    fn get(&self, var: &str) -> Option<String> {
        known(var);
        self.values
            .iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.clone())
    }

    fn or_default(&self, var: &str) -> String {
        self.get(var).unwrap_or_else(|| default_of(var).to_owned())
    }

    fn fail(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    fn failed(&self, var: &str) -> bool {
        self.errors.iter().any(|e| e.var == var)
    }

    fn bool(&mut self, var: &str) -> bool {
        parse_bool(var, &self.or_default(var)).unwrap_or_else(|e| {
            self.fail(e);
            parse_bool(var, default_of(var)).unwrap_or(false)
        })
    }

    fn num<T: TryFrom<u64> + Default>(&mut self, var: &str) -> T {
        parse_num(var, &self.or_default(var)).unwrap_or_else(|e| {
            self.fail(e);
            parse_num(var, default_of(var)).unwrap_or_default()
        })
    }

    fn secs(&mut self, var: &str) -> Duration {
        Duration::from_secs(self.num(var))
    }

    fn list(&self, var: &str) -> Vec<String> {
        self.or_default(var)
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Key files, one per comma-separated path (the first unreadable one is
    /// reported; the others are still read).
    fn files(&mut self, var: &str) -> Vec<KeyMaterial> {
        let mut keys = Vec::new();
        for path in self.list(var) {
            match std::fs::read(&path) {
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
                Err(e) if !self.failed(var) => {
                    self.fail(ConfigError::new(var, format!("cannot read '{path}': {e}")));
                }
                Err(_) => {}
            }
        }
        keys
    }
}

/// Take the subcommand out of the arguments, wherever it stands: the first
/// word that is neither a flag nor a flag's value (every `--flag` without
/// `=` takes the next argument as its value, as the parsers read them). The
/// subcommand, if any, and the other arguments in their order.
pub fn split_subcommand(args: Vec<String>) -> (Option<String>, Vec<String>) {
    let mut rest = Vec::with_capacity(args.len());
    let mut subcommand = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let takes_value = arg.starts_with('-')
            && !arg.contains('=')
            && !matches!(arg.as_str(), "-h" | "--help" | "-V" | "--version");
        if takes_value {
            rest.push(arg);
            rest.extend(args.next());
        } else if subcommand.is_none() && SUBCOMMANDS.contains(&arg.as_str()) {
            subcommand = Some(arg);
        } else {
            rest.push(arg);
        }
    }
    (subcommand, rest)
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
    let known = || OPTIONS.iter().map(|o| o.var).chain(["RUST_LOG"]);
    let mut found: Vec<Lookalike> = names
        .into_iter()
        .filter(|n| !known().any(|k| k == *n) && !set_by_kubernetes(n))
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

fn parse_level(v: &str) -> Result<log::LevelFilter, ConfigError> {
    Ok(match v.trim().to_ascii_uppercase().as_str() {
        "DEBUG" => log::LevelFilter::Debug,
        "INFO" => log::LevelFilter::Info,
        "WARNING" | "WARN" => log::LevelFilter::Warn,
        "ERROR" | "CRITICAL" => log::LevelFilter::Error,
        _ => {
            return Err(ConfigError::new(
                "LOGLEVEL",
                format!("'{v}' is not one of DEBUG, INFO, WARNING, ERROR"),
            ));
        }
    })
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
        match Config::from_sources(env(pairs), args.iter().map(|s| s.to_string()))? {
            Command::Run(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
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
        for &(var, lo, hi) in RANGES {
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
    fn reading_an_option_that_is_not_in_the_table_is_caught() {
        default_of("PING_INTERVAL_SECOND");
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
        // --help wins over any mistake.
        assert!(matches!(
            Config::from_sources_all(env(&[("PORT", "x")]), ["--bogus".into(), "-h".into()]),
            Ok(Command::Help)
        ));
    }

    #[test]
    fn a_subcommand_may_stand_anywhere() {
        let split = |args: &[&str]| {
            let (sub, rest) = split_subcommand(args.iter().map(|s| s.to_string()).collect());
            (sub, rest.join(" "))
        };
        let check = Some("check-config".to_owned());
        assert_eq!(
            split(&["check-config", "--port", "5002"]),
            (check.clone(), "--port 5002".into())
        );
        assert_eq!(
            split(&["--port", "5002", "check-config"]),
            (check.clone(), "--port 5002".into())
        );
        assert_eq!(
            split(&["--port=5002", "check-config", "--host", "h"]),
            (check, "--port=5002 --host h".into())
        );
        assert_eq!(
            split(&["--secret-key", "k", "token", "--vmi", "a"]),
            (Some("token".into()), "--secret-key k --vmi a".into())
        );
        // A flag's value is never a subcommand; a second one stays an argument.
        assert_eq!(
            split(&["--api-path", "token"]),
            (None, "--api-path token".into())
        );
        assert_eq!(
            split(&["token", "--vmi", "check-config", "check-config"]),
            (
                Some("token".into()),
                "--vmi check-config check-config".into()
            )
        );
        assert_eq!(
            split(&["--help", "check-config"]).0.as_deref(),
            Some("check-config")
        );
        // What is left is read as before.
        let (_, rest) =
            split_subcommand(vec!["--port".into(), "5002".into(), "check-config".into()]);
        assert_eq!(
            run(BASE, &rest.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap()
                .port,
            5002
        );
        // An unknown subcommand gets a suggestion.
        let e = run(BASE, &["chek-config"]).unwrap_err();
        assert!(e.message.contains("did you mean check-config?"), "{e}");
        let e = run(BASE, &["--shutdown-grace", "2"]).unwrap_err();
        assert!(
            e.message.contains("did you mean --shutdown-grace-seconds?"),
            "{e}"
        );
        assert_eq!(all_errors(BASE, &["--shutdown-grace", "2"]).len(), 1);
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
        let mut unrelated: Vec<&str> = OPTIONS.iter().map(|o| o.var).collect();
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
    fn the_usage_line_shows_where_subcommands_go() {
        let help = help_text();
        let usage = help.lines().find(|l| l.starts_with("USAGE:")).unwrap();
        assert!(usage.contains("[check-config] [OPTIONS]"), "{usage}");
        assert!(help.contains("kubevirt-vnc-proxy token"), "{help}");
        assert!(help.contains("anywhere among the options"), "{help}");
    }

    #[test]
    fn help_lists_every_option() {
        let h = help_text();
        for o in OPTIONS {
            assert!(h.contains(o.var) && h.contains(o.flag), "{}", o.var);
        }
        assert!(matches!(
            Config::from_sources(env(BASE), ["--help".to_string()]),
            Ok(Command::Help)
        ));
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
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
