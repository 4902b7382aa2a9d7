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
    Opt { var: "WORKERS", flag: "--workers", default: "1", help: "independent event loops sharing the port (SO_REUSEPORT), one thread each" },
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
    Opt { var: "MAX_CONNECTIONS", flag: "--max-connections", default: "10000", help: "open connections at most; at the limit accepting pauses until 90 %" },
    Opt { var: "MAX_CONNECTIONS_PER_IP", flag: "--max-connections-per-ip", default: "0", help: "open connections per client address at most, 503 above (0: no limit; behind an ingress every client shares its address)" },
    Opt { var: "REJECT_WITH", flag: "--reject-with", default: "http", help: "http: refuse with HTTP statuses; close: upgrade, then close with 44xx/45xx codes a web page can read" },
    Opt { var: "LOCAL_DEV_MODE", flag: "--local-dev-mode", default: "false", help: "true: upstream at WS_REMOTE_URL (e.g. kubectl proxy); false: in-cluster mode" },
    Opt { var: "WS_REMOTE_URL", flag: "--ws-remote-url", default: "ws://localhost:8001", help: "upstream base URL, ws://… or wss://… (in-cluster mode: only when set explicitly)" },
    Opt { var: "KUBERNETES_SERVICE_HOST", flag: "--kubernetes-service-host", default: "", help: "API server host in in-cluster mode (set by Kubernetes)" },
    Opt { var: "KUBERNETES_SERVICE_PORT", flag: "--kubernetes-service-port", default: "443", help: "API server port in in-cluster mode (set by Kubernetes)" },
    Opt { var: "SERVICE_ACCOUNT_DIR", flag: "--service-account-dir", default: "/var/run/secrets/kubernetes.io/serviceaccount", help: "directory with the service account's ca.crt and token" },
    Opt { var: "UPSTREAM_CA_FILE", flag: "--upstream-ca-file", default: "", help: "PEM CA bundle, the only trust anchors for a wss:// upstream (default: SERVICE_ACCOUNT_DIR/ca.crt)" },
    Opt { var: "UPSTREAM_TOKEN_FILE", flag: "--upstream-token-file", default: "", help: "bearer token file sent upstream (default in-cluster: SERVICE_ACCOUNT_DIR/token)" },
    Opt { var: "ALLOW_CLEARTEXT_BEARER_TOKEN", flag: "--allow-cleartext-bearer-token", default: "false", help: "true: send the upstream bearer token over a ws:// (unencrypted) upstream; otherwise that configuration does not start" },
    Opt { var: "CREDENTIALS_CHECK_SECONDS", flag: "--credentials-check-seconds", default: "5", help: "how often the CA and token files are checked for rotation" },
    Opt { var: "API_PATH", flag: "--api-path", default: DEFAULT_API_PATH, help: "upstream path template with {namespace} and {vmi_name}" },
    Opt { var: "UPSTREAM_SUBPROTOCOLS", flag: "--upstream-subprotocols", default: "plain.kubevirt.io", help: "subprotocols offered to the upstream, comma-separated (empty: none)" },
    Opt { var: "CLIENT_SUBPROTOCOLS", flag: "--client-subprotocols", default: "binary,plain.kubevirt.io", help: "subprotocols a client may be answered with (the first it offers that is listed)" },
    Opt { var: "UPSTREAM_QUERY_PARAMS", flag: "--upstream-query-params", default: "preserveSession", help: "query parameters passed on to the upstream, comma-separated; others are dropped" },
    Opt { var: "LOGLEVEL", flag: "--loglevel", default: "INFO", help: "DEBUG, INFO, WARNING or ERROR (RUST_LOG wins when set)" },
    Opt { var: "LOG_FORMAT", flag: "--log-format", default: "text", help: "text or json (one JSON object per line, access log included)" },
    Opt { var: "METRICS_ADDR", flag: "--metrics-addr", default: "", help: "HOST:PORT to serve GET /metrics on (Prometheus text format); off when empty" },
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

/// A configuration problem: which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let mut c = Self::parse_unvalidated(
            [
                ("LOCAL_DEV_MODE".to_owned(), "true".to_owned()),
                ("WS_REMOTE_URL".to_owned(), remote_url.to_owned()),
                ("HOST".to_owned(), "127.0.0.1".to_owned()),
                ("PORT".to_owned(), "0".to_owned()),
            ],
            Vec::<String>::new(),
        )
        .and_then(|c| match c {
            Command::Run(c) => Ok(*c),
            _ => Err(ConfigError::new("args", "unexpected command")),
        })?;
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
    /// its variable.
    pub fn from_sources(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Command, ConfigError> {
        let command = Self::parse_unvalidated(env, args)?;
        if let Command::Run(c) = &command {
            c.validate()?;
        }
        Ok(command)
    }

    fn parse_unvalidated(
        env: impl IntoIterator<Item = (String, String)>,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Command, ConfigError> {
        let mut values: Vec<(&'static str, String)> = Vec::new();
        let known: Vec<(String, String)> = env.into_iter().collect();
        for opt in OPTIONS {
            if let Some((_, v)) = known.iter().find(|(k, _)| k == opt.var) {
                values.push((opt.var, v.clone()));
            }
        }
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
                _ => {}
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let Some(opt) = OPTIONS.iter().find(|o| o.flag == flag) else {
                return Err(ConfigError::new(&arg, "unknown argument (see --help)"));
            };
            let value = match inline.or_else(|| args.next()) {
                Some(v) => v,
                None => return Err(ConfigError::new(opt.flag, "needs a value")),
            };
            values.retain(|(k, _)| *k != opt.var);
            values.push((opt.var, value));
        }
        let get = |var: &str| -> Option<String> {
            values
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.clone())
        };
        let or_default = |var: &'static str| -> String {
            get(var).unwrap_or_else(|| {
                OPTIONS
                    .iter()
                    .find(|o| o.var == var)
                    .map(|o| o.default.to_owned())
                    .unwrap_or_default()
            })
        };

        let local_dev = parse_bool("LOCAL_DEV_MODE", &or_default("LOCAL_DEV_MODE"))?;
        let upstream = match get("WS_REMOTE_URL").filter(|_| !local_dev) {
            // In a cluster the API server is where Kubernetes says it is,
            // unless the operator names another endpoint explicitly.
            None if !local_dev => {
                let host = get("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()).ok_or_else(|| {
                    ConfigError::new(
                        "KUBERNETES_SERVICE_HOST",
                        "not set: in-cluster mode (LOCAL_DEV_MODE=false) needs it; outside a cluster set LOCAL_DEV_MODE=true",
                    )
                })?;
                let port: u16 = parse_num(
                    "KUBERNETES_SERVICE_PORT",
                    &or_default("KUBERNETES_SERVICE_PORT"),
                )?;
                let host = host.trim().trim_start_matches('[').trim_end_matches(']');
                UpstreamUrl {
                    tls: true,
                    host: host.to_owned(),
                    port,
                    base_path: String::new(),
                }
            }
            _ => UpstreamUrl::parse(&or_default("WS_REMOTE_URL"))
                .map_err(|m| ConfigError::new("WS_REMOTE_URL", m))?,
        };
        let sa_dir = PathBuf::from(or_default("SERVICE_ACCOUNT_DIR"));
        let file = |var: &str| get(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        let ca_file =
            file("UPSTREAM_CA_FILE").or_else(|| upstream.tls.then(|| sa_dir.join("ca.crt")));
        let token_file =
            file("UPSTREAM_TOKEN_FILE").or_else(|| (!local_dev).then(|| sa_dir.join("token")));
        // A service-account token over ws:// is readable by anyone on the
        // path (and in-cluster mode sends one by default): only on request.
        if token_file.is_some()
            && !upstream.tls
            && !parse_bool(
                "ALLOW_CLEARTEXT_BEARER_TOKEN",
                &or_default("ALLOW_CLEARTEXT_BEARER_TOKEN"),
            )?
        {
            let why = if local_dev {
                "UPSTREAM_TOKEN_FILE is set"
            } else {
                "in-cluster mode (LOCAL_DEV_MODE=false) sends the service-account token"
            };
            return Err(ConfigError::new(
                "WS_REMOTE_URL",
                format!(
                    "is a ws:// URL and {why}: the bearer token would travel unencrypted; \
                     use wss://, or set ALLOW_CLEARTEXT_BEARER_TOKEN=true to send it anyway"
                ),
            ));
        }
        let list = |var: &'static str| -> Vec<String> {
            or_default(var)
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let algorithms = or_default("JWT_ALGORITHMS")
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|name| {
                parse_algorithm(name).ok_or_else(|| {
                    ConfigError::new(
                        "JWT_ALGORITHMS",
                        format!("unknown algorithm '{}'", name.trim()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let files = |var: &'static str| -> Result<Vec<KeyMaterial>, ConfigError> {
            list(var)
                .into_iter()
                .map(|path| {
                    let bytes = std::fs::read(&path)
                        .map_err(|e| ConfigError::new(var, format!("cannot read '{path}': {e}")))?;
                    let kid = std::path::Path::new(&path)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned());
                    Ok(KeyMaterial {
                        kid,
                        bytes,
                        source: path,
                    })
                })
                .collect()
        };
        let mut secrets = Vec::new();
        if let Some(secret) = get("SECRET_KEY").filter(|s| !s.is_empty()) {
            secrets.push(KeyMaterial {
                kid: None,
                bytes: secret.into_bytes(),
                source: "SECRET_KEY".into(),
            });
        }
        secrets.extend(files("SECRET_KEY_FILES")?.into_iter().map(|mut k| {
            // A secret file ends with a newline more often than not.
            let trimmed = String::from_utf8_lossy(&k.bytes)
                .trim_end_matches(['\r', '\n'])
                .len();
            k.bytes.truncate(trimmed);
            k
        }));
        let public_keys = files("JWT_PUBLIC_KEY_FILE")?;
        let token_sources = list("TOKEN_SOURCES")
            .iter()
            .map(|n| {
                TokenSource::parse(n).ok_or_else(|| {
                    ConfigError::new("TOKEN_SOURCES", format!("unknown source '{n}'"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reject_with_close = match or_default("REJECT_WITH")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "http" => false,
            "close" => true,
            other => {
                return Err(ConfigError::new(
                    "REJECT_WITH",
                    format!("'{other}' is not http or close"),
                ));
            }
        };
        let prefix = or_default("HOST_PATH_PREFIX");
        let prefix = prefix.trim_matches('/');
        if prefix.contains('/') {
            return Err(ConfigError::new(
                "HOST_PATH_PREFIX",
                "must be a single path segment (no '/' inside)",
            ));
        }
        let ping_interval: u64 = parse_num(
            "PING_INTERVAL_SECONDS",
            &or_default("PING_INTERVAL_SECONDS"),
        )?;
        let config = Config {
            host: or_default("HOST"),
            port: parse_num("PORT", &or_default("PORT"))?,
            workers: parse_num("WORKERS", &or_default("WORKERS"))?,
            path_prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            jwt: JwtSettings {
                algorithms,
                secrets,
                public_keys,
                leeway_secs: parse_num("JWT_LEEWAY_SECONDS", &or_default("JWT_LEEWAY_SECONDS"))?,
                audience: list("JWT_AUDIENCE"),
                issuer: list("JWT_ISSUER"),
                allow_weak_secret: parse_bool(
                    "ALLOW_WEAK_SECRET",
                    &or_default("ALLOW_WEAK_SECRET"),
                )?,
            },
            token_sources,
            token_cookie: or_default("TOKEN_COOKIE"),
            allowed_origins: list("ALLOWED_ORIGINS"),
            close_on_token_expiry: parse_bool(
                "CLOSE_ON_TOKEN_EXPIRY",
                &or_default("CLOSE_ON_TOKEN_EXPIRY"),
            )?,
            max_connections: parse_num("MAX_CONNECTIONS", &or_default("MAX_CONNECTIONS"))?,
            max_connections_per_ip: parse_num(
                "MAX_CONNECTIONS_PER_IP",
                &or_default("MAX_CONNECTIONS_PER_IP"),
            )?,
            reject_with_close,
            upstream,
            in_cluster: !local_dev,
            ca_file,
            token_file,
            credentials_check_interval: Duration::from_secs(parse_num(
                "CREDENTIALS_CHECK_SECONDS",
                &or_default("CREDENTIALS_CHECK_SECONDS"),
            )?),
            upstream_subprotocols: list("UPSTREAM_SUBPROTOCOLS"),
            client_subprotocols: list("CLIENT_SUBPROTOCOLS"),
            upstream_query_params: list("UPSTREAM_QUERY_PARAMS"),
            api_path: or_default("API_PATH"),
            log_level: parse_level(&or_default("LOGLEVEL"))?,
            log_format: match or_default("LOG_FORMAT")
                .trim()
                .to_ascii_lowercase()
                .as_str()
            {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::new(
                        "LOG_FORMAT",
                        format!("'{other}' is not text or json"),
                    ));
                }
            },
            metrics_addr: get("METRICS_ADDR").filter(|a| !a.trim().is_empty()),
            shutdown_grace: Duration::from_secs(parse_num(
                "SHUTDOWN_GRACE_SECONDS",
                &or_default("SHUTDOWN_GRACE_SECONDS"),
            )?),
            ping_interval: Duration::from_secs(ping_interval),
            peer_timeout: Duration::from_secs(
                match get("PEER_TIMEOUT_SECONDS").filter(|v| !v.trim().is_empty()) {
                    Some(v) => parse_num("PEER_TIMEOUT_SECONDS", &v)?,
                    None => 3 * ping_interval,
                },
            ),
            max_head_bytes: parse_num(
                "MAX_REQUEST_HEAD_BYTES",
                &or_default("MAX_REQUEST_HEAD_BYTES"),
            )?,
            handshake_timeout: Duration::from_secs(parse_num(
                "HANDSHAKE_TIMEOUT_SECONDS",
                &or_default("HANDSHAKE_TIMEOUT_SECONDS"),
            )?),
            upstream_timeout: Duration::from_secs(parse_num(
                "UPSTREAM_TIMEOUT_SECONDS",
                &or_default("UPSTREAM_TIMEOUT_SECONDS"),
            )?),
            buffer_size: parse_num("RELAY_BUFFER_BYTES", &or_default("RELAY_BUFFER_BYTES"))?,
            bulk_buffer_size: parse_num(
                "RELAY_BULK_BUFFER_BYTES",
                &or_default("RELAY_BULK_BUFFER_BYTES"),
            )?,
            bulk_buffers: parse_num("RELAY_BULK_BUFFERS", &or_default("RELAY_BULK_BUFFERS"))?,
            max_frame_size: parse_num("MAX_FRAME_SIZE", &or_default("MAX_FRAME_SIZE"))?,
            close_timeout: Duration::from_secs(5),
        };
        Ok(Command::Run(Box::new(config)))
    }

    /// Check the values together (ranges, keys usable, templates complete).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.jwt.secrets.is_empty() && self.jwt.public_keys.is_empty() {
            return Err(ConfigError::new(
                "SECRET_KEY",
                "not set (required unless JWT_PUBLIC_KEY_FILE is set)",
            ));
        }
        self.validate_without_keys()
    }

    /// Everything [`validate`](Self::validate) checks except that token keys
    /// exist (a custom authorizer may not use them).
    pub fn validate_without_keys(&self) -> Result<(), ConfigError> {
        if self.buffer_size < self.max_head_bytes + 1024 {
            // Bytes that arrive with a handshake head must fit the buffer.
            return Err(ConfigError::new(
                "RELAY_BUFFER_BYTES",
                "must be at least MAX_REQUEST_HEAD_BYTES + 1024",
            ));
        }
        if self.token_sources.is_empty() {
            return Err(ConfigError::new("TOKEN_SOURCES", "no token source enabled"));
        }
        if self.token_sources.contains(&TokenSource::Cookie) && self.allowed_origins.is_empty() {
            // A cookie goes with every request the browser makes, from any
            // page: without an Origin check any site could open a console
            // with the user's cookie (cross-site WebSocket hijacking).
            return Err(ConfigError::new(
                "ALLOWED_ORIGINS",
                "must be set when TOKEN_SOURCES includes cookie (cross-site WebSocket hijacking)",
            ));
        }
        if !self.ping_interval.is_zero() && self.peer_timeout <= self.ping_interval {
            return Err(ConfigError::new(
                "PEER_TIMEOUT_SECONDS",
                "must be longer than PING_INTERVAL_SECONDS (a peer needs time to answer a ping)",
            ));
        }
        if !(1..=256).contains(&self.workers) {
            return Err(ConfigError::new("WORKERS", "must be between 1 and 256"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new("MAX_CONNECTIONS", "must be at least 1"));
        }
        JwtVerifier::new(&self.jwt).map_err(|(var, m)| ConfigError::new(var, m))?;
        if !self.api_path.starts_with('/') {
            return Err(ConfigError::new("API_PATH", "must start with '/'"));
        }
        if self
            .api_path
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "API_PATH",
                "must not contain spaces or control characters",
            ));
        }
        if !(512..=1 << 20).contains(&self.max_head_bytes) {
            return Err(ConfigError::new(
                "MAX_REQUEST_HEAD_BYTES",
                "must be between 512 and 1048576",
            ));
        }
        if !(1024..=16 << 20).contains(&self.buffer_size) {
            return Err(ConfigError::new(
                "RELAY_BUFFER_BYTES",
                "must be between 1024 and 16777216",
            ));
        }
        // Not above RELAY_BUFFER_BYTES means off (a larger regular buffer
        // set before bulk buffers existed keeps working as it did).
        if self.bulk_buffer_size > 16 << 20 {
            return Err(ConfigError::new(
                "RELAY_BULK_BUFFER_BYTES",
                "must be at most 16777216",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "HANDSHAKE_TIMEOUT_SECONDS",
                "must be at least 1",
            ));
        }
        if self.upstream_timeout.is_zero() {
            return Err(ConfigError::new(
                "UPSTREAM_TIMEOUT_SECONDS",
                "must be at least 1",
            ));
        }
        if self.max_frame_size == 0 {
            return Err(ConfigError::new("MAX_FRAME_SIZE", "must be at least 1"));
        }
        Ok(())
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
         USAGE: kubevirt-vnc-proxy [OPTIONS]\n\n\
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

fn parse_num<T: std::str::FromStr>(var: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| ConfigError::new(var, format!("'{v}' is not a valid number")))
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
