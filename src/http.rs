//! The HTTP/1.1 parts of a session: the client's upgrade request, the
//! responses the proxy writes, the upgrade it sends upstream and the upstream's
//! answer. Pure functions over byte slices; the session does the I/O.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Headers accepted in one request head; more is refused with 431.
const MAX_HEADERS: usize = 64;

/// An HTTP status the proxy answers with: a refusal before the upgrade
/// (4xx, 5xx), or a probe's answer. One type instead of bare numbers, so a
/// status is one of these by construction, with its reason phrase and, for
/// `REJECT_WITH=close`, its close code beside it.
///
/// Displays as the bare code (`403`), as the access log and the
/// `…_refusals_total{status}` label show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[repr(u16)]
pub enum Status {
    /// 200: a probe's answer (never a refusal's).
    Ok = 200,
    /// 400: a malformed request.
    BadRequest = 400,
    /// 401: the token is missing or does not verify.
    Unauthorized = 401,
    /// 403: the token (or the host's policy) does not allow this.
    Forbidden = 403,
    /// 404: no such path (or the upstream knows no such VMI).
    NotFound = 404,
    /// 405: a method other than GET (answered with `Allow: GET`).
    MethodNotAllowed = 405,
    /// 408: the request head did not come in time.
    RequestTimeout = 408,
    /// 409: the upstream says the VMI is not in a state to connect to
    /// (KubeVirt: not running, paused, or without a display; see
    /// `names_vmi_state`).
    Conflict = 409,
    /// 414: the request line alone is over the head limit (a token or path
    /// too long to parse).
    UriTooLong = 414,
    /// 426: not a WebSocket upgrade, or a WebSocket version other than 13
    /// (answered with `Upgrade: websocket` and `Sec-WebSocket-Version: 13`).
    UpgradeRequired = 426,
    /// 431: the request head is too large.
    RequestHeaderFieldsTooLarge = 431,
    /// 500: the proxy itself failed.
    InternalServerError = 500,
    /// 502: the upstream failed, or answered something else than 101.
    BadGateway = 502,
    /// 503: shutting down, a connection limit, or the VMI's console is in
    /// use (KubeVirt's `preserveSession`, see `CONSOLE_IN_USE`).
    ServiceUnavailable = 503,
    /// 504: the upstream (or a deferred authorization) did not answer in time.
    GatewayTimeout = 504,
}

impl Status {
    /// The numeric code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The reason phrase of the status line (RFC 9110).
    pub const fn reason_phrase(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::Conflict => "Conflict",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::UriTooLong => "URI Too Long",
            Status::UpgradeRequired => "Upgrade Required",
            Status::RequestHeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::BadGateway => "Bad Gateway",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::GatewayTimeout => "Gateway Timeout",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.code().fmt(f)
    }
}

impl From<Status> for u16 {
    fn from(s: Status) -> u16 {
        s.code()
    }
}

/// A refusal before the upgrade: an HTTP status and a short plain-text reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: Status,
    /// A short reason, sent as the body and logged.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status` and `reason`.
    pub fn new(status: Status, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

/// A valid WebSocket upgrade request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The request target (path and query), as sent.
    pub target: String,
    /// The client's `Sec-WebSocket-Key`, as sent.
    pub key: String,
    /// The subprotocols the client offered, in order.
    pub protocols: Vec<String>,
    /// Every header, in order (for custom authorizers).
    pub headers: Headers,
    /// Length of the request head in bytes; anything after it is frame data.
    pub head_len: usize,
}

impl UpgradeRequest {
    /// The `Origin` header, if any (a request with two is refused).
    pub fn origin(&self) -> Option<&str> {
        self.headers.get("origin")
    }
}

/// A request's headers, in order, names and values as sent (values not in
/// UTF-8 converted lossily). All of them live in one string: this is built
/// for every session, and two allocations per header would be most of the
/// allocations a session makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    text: String,
    /// Per header, where its name and its value end in `text`; each name
    /// starts where the previous value ended.
    ends: Vec<(usize, usize)>,
}

impl Headers {
    fn with_capacity(headers: usize, bytes: usize) -> Self {
        Headers {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(headers),
        }
    }

    /// Append a header.
    pub fn push(&mut self, name: &str, value: &str) {
        self.text.push_str(name);
        let name_end = self.text.len();
        self.text.push_str(value);
        self.ends.push((name_end, self.text.len()));
    }

    /// Every header as (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, v)| v));
        starts.zip(&self.ends).map(|(start, &(name_end, end))| {
            (&self.text[start..name_end], &self.text[name_end..end])
        })
    }

    /// The first header called `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every value of the headers called `name` (case-insensitive), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// How many headers.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// A Content-Length of zero (`1*DIGIT`, RFC 9110 §8.6, all of them 0).
fn is_zero(value: &[u8]) -> bool {
    let v = value.trim_ascii();
    !v.is_empty() && v.iter().all(|&b| b == b'0')
}

fn header_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

fn has_token(value: &[u8], token: &str) -> bool {
    header_tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// A request the proxy answers itself, without an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `GET /healthz`: alive.
    Health,
    /// `GET /readyz`: ready for new sessions.
    Ready,
    /// `GET /metrics`.
    Metrics,
}

/// What a complete request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade.
    Upgrade(UpgradeRequest),
    /// A plain `GET` of a probe path (no `Upgrade` header).
    Probe(Probe),
}

/// Parse a request head that may be a probe (`GET /healthz`, `/readyz`,
/// `/metrics` without `Upgrade`) or an upgrade. See
/// [`parse_upgrade_request`] for the rest.
pub fn parse_request(buf: &[u8], max_len: usize) -> Result<Option<Request>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // HEAD too (`curl -I`, a load balancer's `httpchk HEAD /healthz`):
    // RFC 9110 §9.1 asks a server to support both; the caller sends the
    // head of the answer only (`is_head`). An Upgrade to anything but a
    // WebSocket (`curl --http2` offers h2c) is ignored, as RFC 9110 §7.8
    // lets a server do, and the probe answered.
    if let Ok(httparse::Status::Complete(_)) = req.parse(buf)
        && matches!(req.method, Some("GET" | "HEAD"))
        && !req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && has_token(h.value, "websocket"))
    {
        let path = req.path.map(origin_form);
        let probe = match path.as_deref().map(|p| p.split('?').next().unwrap_or(p)) {
            Some("/healthz") => Some(Probe::Health),
            Some("/readyz") => Some(Probe::Ready),
            Some("/metrics") => Some(Probe::Metrics),
            _ => None,
        };
        if let Some(p) = probe {
            return Ok(Some(Request::Probe(p)));
        }
    }
    Ok(parse_upgrade_request(buf, max_len)?.map(Request::Upgrade))
}

/// The request is a HEAD: its answer is the head alone (RFC 9110 §9.3.2).
/// Empty lines before the request line are skipped, as the parser skips
/// them (RFC 9112 §2.2).
pub fn is_head(head: &[u8]) -> bool {
    let start = head.iter().position(|&b| b != b'\r' && b != b'\n');
    start.is_some_and(|i| head[i..].starts_with(b"HEAD "))
}

/// Cut a response to its head, for a HEAD request. The Content-Length
/// stays: it is what a GET would have brought, as RFC 9110 §8.6 allows.
pub fn strip_content(response: &mut Vec<u8>) {
    if let Some(i) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(i + 4);
    }
}

/// A plain response to a probe.
pub fn plain_response(status: Status, content_type: &str, body: &str) -> Vec<u8> {
    let (status, phrase) = (status.code(), status.reason_phrase());
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Parse the client's request head from `buf` (everything read so far).
///
/// `Ok(None)`: incomplete, read more (unless `buf` is already `max_len` long,
/// which is reported as 431). `Err`: refuse with that status.
pub fn parse_upgrade_request(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<UpgradeRequest>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_len {
                return Err(oversized(buf, max_len));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                Status::RequestHeaderFieldsTooLarge,
                "too many request headers",
            ));
        }
        Err(e) => {
            return Err(Refusal::new(
                Status::BadRequest,
                format!("malformed request: {}", syntax_error(e)),
            ));
        }
    };
    if head_len > max_len {
        return Err(oversized(&buf[..head_len], max_len));
    }
    // httparse tolerates bare LF line ends; a proxy must not, since a peer
    // that splits lines differently could see another request (smuggling).
    if has_bare_lf(&buf[..head_len]) {
        return Err(Refusal::new(
            Status::BadRequest,
            "malformed request: bare LF line ending",
        ));
    }
    if req.method != Some("GET") {
        return Err(Refusal::new(
            Status::MethodNotAllowed,
            "WebSocket upgrade must use GET",
        ));
    }
    if req.version != Some(1) {
        return Err(Refusal::new(
            Status::BadRequest,
            "WebSocket upgrade requires HTTP/1.1",
        ));
    }
    let target = origin_form(req.path.unwrap_or_default());

    let mut upgrade_ok = false;
    let mut connection_ok = false;
    let mut version: Option<&[u8]> = None;
    let mut key: Option<&[u8]> = None;
    let mut host = false;
    let mut protocols = Vec::new();
    let mut origin = false;
    let mut zero_length = false;
    let mut authorization = false;
    let bytes = req
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len())
        .sum();
    let mut headers = Headers::with_capacity(req.headers.len(), bytes);
    for h in req.headers.iter() {
        headers.push(h.name, &String::from_utf8_lossy(h.value));
    }
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ok |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_ok |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.replace(h.value).is_some() {
                return Err(Refusal::new(
                    Status::BadRequest,
                    "duplicate Sec-WebSocket-Version",
                ));
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.replace(h.value).is_some() {
                return Err(Refusal::new(
                    Status::BadRequest,
                    "duplicate Sec-WebSocket-Key",
                ));
            }
        } else if name.eq_ignore_ascii_case("host") {
            if host {
                return Err(Refusal::new(Status::BadRequest, "duplicate Host"));
            }
            host = true;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for p in header_tokens(h.value).filter(|t| !t.is_empty()) {
                protocols.push(String::from_utf8_lossy(p).into_owned());
            }
        } else if name.eq_ignore_ascii_case("origin") {
            if std::mem::replace(&mut origin, true) {
                return Err(Refusal::new(Status::BadRequest, "duplicate Origin"));
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            if std::mem::replace(&mut authorization, true) {
                return Err(Refusal::new(Status::BadRequest, "duplicate Authorization"));
            }
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            // An upgrade request has no body; one that claims a body is
            // either confused or smuggling (so is a second Content-Length).
            // One `Content-Length: 0` says there is none: Envoy (Istio's
            // ingress and sidecars) adds it to requests without a body,
            // upgrades included, so refusing it refused every console
            // behind them.
            let says_none = name.eq_ignore_ascii_case("content-length") && is_zero(h.value);
            if !says_none || std::mem::replace(&mut zero_length, true) {
                return Err(Refusal::new(
                    Status::BadRequest,
                    "upgrade request must not have a body",
                ));
            }
        }
    }
    if !host {
        return Err(Refusal::new(Status::BadRequest, "missing Host header"));
    }
    if !upgrade_ok || !connection_ok {
        // A browser opening the console's URL as a page, say: 426 names the
        // protocol to upgrade to (RFC 9110 15.5.22), as the Python proxy did.
        return Err(Refusal::new(
            Status::UpgradeRequired,
            "not a WebSocket upgrade (Upgrade: websocket and Connection: upgrade required)",
        ));
    }
    if version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(Refusal::new(
            Status::UpgradeRequired,
            "Sec-WebSocket-Version 13 required",
        ));
    }
    let key = key.map(<[u8]>::trim_ascii).unwrap_or_default();
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(Refusal::new(
                Status::BadRequest,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ));
        }
    }
    Ok(Some(UpgradeRequest {
        target,
        key: String::from_utf8_lossy(key).into_owned(),
        protocols,
        headers,
        head_len,
    }))
}

/// `target` in origin form (`/path?query`): an absolute-form target
/// (`http://host/path?query`, which RFC 9112 3.2.2 says a server must
/// accept, though only proxies are sent one) loses its scheme and authority;
/// the route is the path, whatever the host.
fn origin_form(target: &str) -> String {
    let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    });
    let Some(rest) = after_scheme else {
        return target.to_owned();
    };
    match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => rest[i..].to_owned(),
        Some(i) => format!("/{}", &rest[i..]),
        None => "/".to_owned(),
    }
}

/// The refusal for a head over `max_len` bytes: 414 when the request line
/// alone does not fit (RFC 9112 3: a target too long to parse, a token of
/// kilobytes, say), else 431.
fn oversized(head: &[u8], max_len: usize) -> Refusal {
    // httparse skips empty lines before the request line; so does this.
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let line_end = head[start..].iter().position(|&b| b == b'\n');
    if line_end.is_none_or(|end| start + end >= max_len) {
        Refusal::new(
            Status::UriTooLong,
            format!("request line longer than {max_len} bytes"),
        )
    } else {
        Refusal::new(
            Status::RequestHeaderFieldsTooLarge,
            "request head too large",
        )
    }
}

/// httparse's error in our words: its own say "invalid token", which here
/// would read as the JWT.
fn syntax_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid character in a header name",
        httparse::Error::HeaderValue => "invalid character in a header value",
        httparse::Error::NewLine => "malformed line ending",
        httparse::Error::Version => "malformed HTTP version",
        httparse::Error::Token | httparse::Error::Status | httparse::Error::TooManyHeaders => {
            "malformed request line (method or target)"
        }
    }
}

/// A LF not preceded by CR anywhere in `head`. Written as a fold over byte
/// pairs (no early exit) so that the compiler vectorizes it: it runs over
/// every request head.
fn has_bare_lf(head: &[u8]) -> bool {
    let first = head.first() == Some(&b'\n');
    let pairs = head.iter().zip(head.iter().skip(1));
    first
        | pairs.fold(false, |bare, (&prev, &b)| {
            bare | ((b == b'\n') & (prev != b'\r'))
        })
}

/// The Kubernetes precedent for a bearer token carried as a subprotocol;
/// such a protocol carries a credential and is never echoed back.
pub const BEARER_PROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// The subprotocol to answer the client with: the first one it offered that
/// is in `allowed`, never one carrying a credential, never one it did not
/// offer; `None` when nothing fits (the upgrade then names no protocol).
pub fn select_client_protocol<'a>(offered: &'a [String], allowed: &[String]) -> Option<&'a str> {
    offered
        .iter()
        .filter(|p| !p.starts_with(BEARER_PROTOCOL_PREFIX))
        .find(|p| allowed.iter().any(|a| a == *p))
        .map(String::as_str)
}

/// The response for a refusal: status, plain-text reason, `Connection: close`.
pub fn refusal_response(r: &Refusal) -> Vec<u8> {
    let body = format!("{}\n", r.reason);
    // What RFC 9110 requires beside these two statuses.
    let (extra, connection) = match r.status {
        Status::UpgradeRequired => (
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            "Upgrade, close",
        ),
        Status::MethodNotAllowed => ("Allow: GET\r\n", "close"),
        _ => ("", "close"),
    };
    format!(
        "HTTP/1.1 {} {}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        r.status.code(),
        r.status.reason_phrase(),
        body.len(),
    )
    .into_bytes()
}

/// The close code a web page can read for a refusal with `REJECT_WITH=close`
/// (`None`: the refusal has no such code and stays an HTTP response).
pub fn refusal_close_code(status: Status) -> Option<u16> {
    match status {
        Status::Unauthorized => Some(4401),
        Status::Forbidden => Some(4403),
        Status::NotFound => Some(4404),
        Status::Conflict => Some(4409),
        Status::BadGateway => Some(4502),
        Status::ServiceUnavailable => Some(4503),
        Status::GatewayTimeout => Some(4504),
        _ => None,
    }
}

/// The 101 response completing the client's upgrade.
pub fn switching_protocols(client_key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(client_key.as_bytes());
    // Concatenated, not formatted: this runs for every session.
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A fresh `Sec-WebSocket-Key` for the upstream handshake.
///
/// The key is a nonce (it lets the proxy check that the 101 answers this
/// request), not a secret, so it needs no syscall per session: each key is
/// SipHash, keyed once per thread from the OS RNG by std's `RandomState`, of
/// a per-thread counter. That is a keyed PRF, so keys are still unpredictable
/// to anyone who does not know the thread's key, and never repeat.
pub fn new_key() -> String {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static KEYED: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
    }
    let (a, b) = KEYED.with(|(state, counter)| {
        let n = counter.get();
        counter.set(n.wrapping_add(1));
        (state.hash_one((n, 0u8)), state.hash_one((n, 1u8)))
    });
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&a.to_le_bytes());
    raw[8..].copy_from_slice(&b.to_le_bytes());
    BASE64.encode(raw)
}

/// The upgrade request the proxy sends upstream.
pub fn upstream_request(
    path: &str,
    host: &str,
    key: &str,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    // Concatenated into one allocation of the right size: this runs for
    // every session.
    let extra: usize = extra_headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let mut req = String::with_capacity(160 + path.len() + host.len() + key.len() + extra);
    for part in [
        "GET ",
        path,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ",
        key,
        "\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        req.push_str(part);
    }
    for (name, value) in extra_headers {
        req.push_str(name);
        req.push_str(": ");
        req.push_str(value);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// The upstream's answer to the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAnswer {
    /// 101 with a correct accept key; `head_len` bytes are the head, the rest
    /// is already frame data.
    Upgraded {
        /// Length of the response head.
        head_len: usize,
        /// The subprotocol the upstream chose, if any.
        protocol: Option<String>,
    },
    /// Anything else: the status and reason to pass to the client.
    Refused(Refusal),
}

/// Parse the upstream's response head from `buf`.
///
/// `Ok(None)`: incomplete. For a non-101 answer with a body, the body is
/// awaited (up to `max_len` bytes in all, or until `eof`) so the upstream's
/// own reason can reach the client.
pub fn parse_upstream_response(
    all: &[u8],
    key: &str,
    max_len: usize,
    eof: bool,
) -> Result<Option<UpstreamAnswer>, Refusal> {
    // Interim answers (100 Continue; 103 Early Hints from a proxy in front
    // of the API server) come before the real one (RFC 9110 15.2): skipped.
    // Each is a whole head, so this ends within `all`.
    let mut start = 0;
    while let Some(n) = interim_head_len(&all[start..]) {
        start += n;
    }
    let buf = &all[start..];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if eof {
                return Err(Refusal::new(
                    Status::BadGateway,
                    "upstream closed during the handshake",
                ));
            }
            if all.len() >= max_len {
                return Err(Refusal::new(
                    Status::BadGateway,
                    "upstream response head too large",
                ));
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(Refusal::new(
                Status::BadGateway,
                format!("upstream sent a malformed response: {e}"),
            ));
        }
    };
    let code = resp.code.unwrap_or(0);
    let find = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if code != 101 {
        // Wait for the body (bounded by max_len or EOF), so the reason the
        // user sees does not depend on how TCP split the answer. Its end is
        // where HTTP/1.1 puts it (RFC 9112 6.3): an upstream that keeps the
        // connection open is not waited for until the timeout.
        let rest = &buf[head_len..];
        let chunked = find("transfer-encoding").is_some_and(|v| has_token(v, "chunked"));
        let (body, complete): (std::borrow::Cow<'_, [u8]>, bool) = if matches!(code, 204 | 304) {
            (std::borrow::Cow::Borrowed(&[]), true)
        } else if chunked {
            let (body, done) = dechunk(rest);
            (std::borrow::Cow::Owned(body), done)
        } else {
            let body_len = find("content-length")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<usize>().ok());
            match body_len {
                Some(n) => (rest[..n.min(rest.len())].into(), rest.len() >= n),
                None => (rest.into(), false),
            }
        };
        if !complete && !eof && all.len() < max_len {
            return Ok(None);
        }
        let detail = upstream_reason(&body)
            .or_else(|| resp.reason.and_then(|r| upstream_reason(r.as_bytes())))
            .unwrap_or_else(|| "no reason given".into());
        // Passed on where the client can act on it (no such VMI, VMI not
        // running or paused, console in use); anything else is the
        // upstream's failure (and counts in the upstream-failure alert,
        // which a stopped VM must not, and virt-api being down must).
        let status = match code {
            404 if detail.starts_with(PATH_NOT_SERVED) => Status::BadGateway,
            404 => Status::NotFound,
            409 => Status::Conflict,
            400 if names_vmi_state(&detail) => Status::Conflict,
            500 | 503 if detail.contains(CONSOLE_IN_USE) => Status::ServiceUnavailable,
            _ => Status::BadGateway,
        };
        return Ok(Some(UpstreamAnswer::Refused(Refusal::new(
            status,
            format!("upstream answered {code}: {detail}"),
        ))));
    }
    let upgrade_ok = find("upgrade").is_some_and(|v| has_token(v, "websocket"));
    let connection_ok = find("connection").is_some_and(|v| has_token(v, "upgrade"));
    if !upgrade_ok || !connection_ok {
        return Err(Refusal::new(
            Status::BadGateway,
            "upstream answered 101 without a WebSocket upgrade",
        ));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if find("sec-websocket-accept").map(<[u8]>::trim_ascii) != Some(expected.as_bytes()) {
        return Err(Refusal::new(
            Status::BadGateway,
            "upstream sent a wrong Sec-WebSocket-Accept",
        ));
    }
    if find("sec-websocket-extensions").is_some() {
        return Err(Refusal::new(
            Status::BadGateway,
            "upstream negotiated an extension the proxy did not offer",
        ));
    }
    let protocol = find("sec-websocket-protocol")
        .map(|v| String::from_utf8_lossy(v.trim_ascii()).into_owned());
    Ok(Some(UpstreamAnswer::Upgraded {
        head_len: start + head_len,
        protocol,
    }))
}

/// The length of the whole interim (1xx but 101) response head at the
/// start of `buf`, if that is what it holds.
fn interim_head_len(buf: &[u8]) -> Option<usize> {
    // Nearly every answer is a 101 or a refusal: told by the status code's
    // first digit without parsing the head twice (`HTTP/1.1 1xx`).
    if buf.get(9) != Some(&b'1') || buf.get(9..12) == Some(b"101") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if matches!(resp.code, Some(100..=199)) => {
            (resp.code != Some(101)).then_some(n)
        }
        _ => None,
    }
}

/// The data of a chunked body (RFC 9112 7.1) as far as it has come, and
/// whether its last chunk has. Chunk extensions and trailers are skipped; a
/// size line that does not parse ends the body where it stands (the answer
/// is a refusal either way, and its reason is only for reading).
fn dechunk(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let line = std::str::from_utf8(&data[..eol]).unwrap_or("");
        let size = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return (out, true);
        };
        if size == 0 {
            return (out, true);
        }
        let chunk = &data[eol + 2..];
        if chunk.len() < size {
            out.extend_from_slice(chunk);
            return (out, false);
        }
        out.extend_from_slice(&chunk[..size]);
        match chunk[size..].strip_prefix(b"\r\n") {
            Some(next) => data = next,
            None => return (out, chunk.len() >= size + 2),
        }
    }
}

/// The API server's 404 for a path that nothing serves (its generic
/// NotFound Status): KubeVirt is not installed, or `API_PATH` names an API
/// version it does not serve. The proxy's setup is at fault, not the VMI
/// (virt-api's own 404 names it: `virtualmachineinstance.kubevirt.io "x"
/// not found`), so it is a 502 and counts as an upstream failure.
const PATH_NOT_SERVED: &str = "the server could not find the requested resource";

/// What virt-handler answers a `preserveSession=true` request while another
/// console to the VMI is open. Current virt-api passes it on inside a 500
/// (an InternalError Status: "Internal error occurred: Can't connect to
/// websocket (503): ... application info: Active VNC connection. Request
/// denied."; pkg/virt-api/rest/dialers.go with client-go's `EnrichError`),
/// so the message, not the status, says the console is busy. A 503 without
/// it is most likely the API server's own "service unavailable" for a
/// virt-api it cannot reach (kube-aggregator), an upstream failure.
const CONSOLE_IN_USE: &str = "Active VNC connection. Request denied";

/// Whether an upstream 400's message is KubeVirt telling why the VMI cannot
/// have a console now, a fact about the VMI and not a fault of either side.
/// virt-api answers these as a BadRequest Status (pkg/virt-api/rest:
/// `validateVMIForVNC`, `getVirtHandlerConnForVMI`): a VMI still scheduling
/// or already stopped ("VMI is not running", or, in older releases, "Unable
/// to connect to VirtualMachineInstance because phase is ..."), or one built
/// without a display ("No graphics devices are present."). Any other 400 may
/// be the proxy's own request at fault, so it stays a 502.
fn names_vmi_state(message: &str) -> bool {
    const STATES: [&str; 3] = [
        "VMI is not running",
        "Unable to connect to VirtualMachineInstance because phase is ",
        "No graphics devices are present",
    ];
    STATES.iter().any(|s| message.starts_with(s))
}

/// The readable reason in an upstream error body: a Kubernetes `Status`
/// object's `message`, else the first line of text, cut short.
fn upstream_reason(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let message = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| text.lines().next().unwrap_or_default().to_owned());
    let mut cut = message.len().min(200);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    // Keep the reason on one line and free of control characters: it is
    // written into an HTTP body and a log line.
    Some(
        message[..cut]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_keys_are_16_bytes_and_never_repeat() {
        let keys: std::collections::HashSet<String> = (0..10_000).map(|_| new_key()).collect();
        assert_eq!(keys.len(), 10_000);
        for k in keys.iter().take(10) {
            assert_eq!(BASE64.decode(k).map(|raw| raw.len()).ok(), Some(16), "{k}");
        }
        // Another thread has its own key: its first key is not ours.
        let other = std::thread::spawn(new_key).join().expect("thread");
        assert!(!keys.contains(&other));
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str) -> String {
        format!(
            "GET /t/vm HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn accepts_a_browser_upgrade_incrementally() {
        let full = req("Sec-WebSocket-Protocol: binary, base64\r\nOrigin: http://o\r\n");
        let mut bytes = full.clone().into_bytes();
        bytes.extend_from_slice(b"\x82\x80");
        for cut in 0..full.len() {
            assert_eq!(parse_upgrade_request(&bytes[..cut], 8192), Ok(None));
        }
        let r = parse_upgrade_request(&bytes, 8192).unwrap().unwrap();
        assert_eq!(r.head_len, full.len());
        assert_eq!(r.target, "/t/vm");
        assert_eq!(r.protocols, ["binary", "base64"]);
        assert_eq!(r.origin(), Some("http://o"));
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "Host",
                "Upgrade",
                "Connection",
                "Sec-WebSocket-Version",
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Protocol",
                "Origin"
            ]
        );
        assert_eq!(r.headers.get("CONNECTION"), Some("keep-alive, Upgrade"));
        assert_eq!(r.headers.get("x-none"), None);
    }

    #[test]
    fn refusals_have_precise_statuses() {
        let status = |s: &str| {
            parse_upgrade_request(s.as_bytes(), 8192)
                .unwrap_err()
                .status
                .code()
        };
        assert_eq!(status(&req("").replace("GET", "POST")), 405);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.0")), 400);
        // Not an upgrade at all (a page load, say): the protocol is named.
        assert_eq!(status(&req("").replace("Upgrade: websocket\r\n", "")), 426);
        assert_eq!(
            status(&req("").replace("keep-alive, Upgrade", "keep-alive")),
            426
        );
        assert_eq!(status(&req("").replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&req("").replace(KEY, "c2hvcnQ=")), 400);
        assert_eq!(status(&req("Sec-WebSocket-Key: x\r\n")), 400);
        // One Content-Length of zero (Envoy adds it) says there is no body.
        assert!(parse_upgrade_request(req("Content-Length: 0\r\n").as_bytes(), 8192).is_ok());
        assert!(parse_upgrade_request(req("content-length:  00 \r\n").as_bytes(), 8192).is_ok());
        assert_eq!(status(&req("Content-Length: 1\r\n")), 400);
        assert_eq!(status(&req("Content-Length: \r\n")), 400);
        assert_eq!(status(&req("Content-Length: +0\r\n")), 400);
        assert_eq!(status(&req("Content-Length: 0, 0\r\n")), 400);
        assert_eq!(
            status(&req("Content-Length: 0\r\nContent-Length: 0\r\n")),
            400
        );
        assert_eq!(
            status(&req("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n")),
            400
        );
        assert_eq!(status(&req("Transfer-Encoding: chunked\r\n")), 400);
        assert_eq!(status(&req("").replace("Host: x\r\n", "")), 400);
        // Obsolete line folding and bare LF line ends are refused.
        assert_eq!(status(&req(" folded\r\n")), 400);
        assert_eq!(status(&req("").replace("Host: x\r\n", "Host: x\n")), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n garbage\r\n\r\n"), 400);
        let big = req(&format!("X-Big: {}\r\n", "X".repeat(9000)));
        assert_eq!(
            parse_upgrade_request(&big.as_bytes()[..8192], 8192)
                .unwrap_err()
                .status,
            Status::RequestHeaderFieldsTooLarge
        );
        // A request line over the limit on its own: 414, complete or not.
        let long = req("").replace("/t/vm", &format!("/{}/vm", "t".repeat(9000)));
        for head in [&long.as_bytes()[..8192], long.as_bytes()] {
            let r = parse_upgrade_request(head, 8192).unwrap_err();
            assert_eq!(r.status, Status::UriTooLong, "{}", head.len());
            assert_eq!(r.reason, "request line longer than 8192 bytes");
        }
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&req(&many)), 431);
        // The last line's LF, and a head made of a bare LF alone.
        assert_eq!(status(&req("").replace("\r\n\r\n", "\r\n\n")), 400);
        assert!(has_bare_lf(b"\n") && has_bare_lf(b"\nGET") && has_bare_lf(b"a\r\nb\n"));
        assert!(!has_bare_lf(b"") && !has_bare_lf(b"\r\n") && !has_bare_lf(b"a\r\n\r\n"));
        let resp = String::from_utf8(refusal_response(&Refusal::new(
            Status::UpgradeRequired,
            "v13",
        )))
        .unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"));
        assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(resp.contains("Connection: Upgrade, close\r\n"));
        let resp = refusal_response(&Refusal::new(Status::MethodNotAllowed, "GET"));
        let resp = String::from_utf8(resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"));
        assert!(resp.contains("Connection: close\r\n"));
    }

    #[test]
    fn an_absolute_form_target_is_routed_by_its_path() {
        for (target, path) in [
            ("http://proxy:5001/t/vm?x=1", "/t/vm?x=1"),
            ("HTTPS://proxy/t/vm", "/t/vm"),
            ("http://proxy", "/"),
            ("http://proxy?x=1", "/?x=1"),
            ("/t/vm", "/t/vm"),
            ("ws://proxy/t/vm", "ws://proxy/t/vm"),
        ] {
            assert_eq!(origin_form(target), path, "{target}");
        }
        let line = req("").replace("GET /t/vm", "GET http://proxy/t/vm");
        let r = parse_upgrade_request(line.as_bytes(), 8192)
            .unwrap()
            .unwrap();
        assert_eq!(r.target, "/t/vm");
        let probe = b"GET http://10.0.0.1:9090/healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_request(probe, 8192),
            Ok(Some(Request::Probe(Probe::Health)))
        );
    }

    /// httparse calls a bad character in the request line an "invalid token";
    /// in a log about JWTs that reads as a bad token, so it is said in our words.
    #[test]
    fn a_malformed_request_line_is_not_called_an_invalid_token() {
        let reason = |s: &[u8]| parse_upgrade_request(s, 8192).unwrap_err().reason;
        for line in [
            &b"GET /a\xe9/b HTTP/1.1\r\n"[..],
            b"GET  /a/b HTTP/1.1\r\n",
            b"GET /a/\x01 HTTP/1.1\r\n",
            b"G(T /a/b HTTP/1.1\r\n",
        ] {
            let r = reason(&[line, &b"Host: x\r\n\r\n"[..]].concat());
            assert_eq!(
                r,
                "malformed request: malformed request line (method or target)"
            );
        }
        let r = reason(b"GET /a/b HTTP/1.1\r\nHo st: x\r\n\r\n");
        assert_eq!(r, "malformed request: invalid character in a header name");
        let r = reason(b"GET /a/b HTTP/1.1\r\nHost: \x01\r\n\r\n");
        assert_eq!(r, "malformed request: invalid character in a header value");
        let r = reason(b"GET /a/b HTTP/1.x\r\nHost: x\r\n\r\n");
        assert_eq!(r, "malformed request: malformed HTTP version");
    }

    #[test]
    fn client_protocol_choice() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let allowed = v(&["binary", "plain.kubevirt.io"]);
        assert_eq!(select_client_protocol(&v(&[]), &allowed), None);
        assert_eq!(select_client_protocol(&v(&["base64"]), &allowed), None);
        assert_eq!(
            select_client_protocol(&v(&["base64", "plain.kubevirt.io", "binary"]), &allowed),
            Some("plain.kubevirt.io")
        );
        let bearer = format!("{BEARER_PROTOCOL_PREFIX}abc");
        let allowed_bearer = v(&[&bearer, "binary"]);
        assert_eq!(
            select_client_protocol(&v(&[&bearer]), &allowed_bearer),
            None
        );
        assert_eq!(
            select_client_protocol(&v(&[&bearer, "binary"]), &allowed_bearer),
            Some("binary")
        );
    }

    #[test]
    fn upstream_refusals_wait_for_the_body_and_clean_the_reason() {
        // Found by fuzzing: a declared body larger than the head limit was
        // answered before it arrived; a tab in the status reason was kept.
        let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100000\r\n\r\n";
        assert_eq!(
            parse_upstream_response(head.as_bytes(), KEY, 8192, false),
            Ok(None)
        );
        let full = format!("{head}Active VNC connection. Request denied.");
        let Some(UpstreamAnswer::Refused(r)) =
            parse_upstream_response(full.as_bytes(), KEY, 8192, true).unwrap()
        else {
            panic!()
        };
        assert!(
            r.reason.ends_with("Active VNC connection. Request denied."),
            "{}",
            r.reason
        );
        let Some(UpstreamAnswer::Refused(r)) =
            parse_upstream_response(b"HTTP/1.1 500 a\tb\r\n\r\n", KEY, 8192, true).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.reason, "upstream answered 500: a b");
    }

    #[test]
    fn upstream_answers() {
        let accept = tungstenite::handshake::derive_accept_key(KEY.as_bytes());
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\nRFB"
        );
        let a = parse_upstream_response(ok.as_bytes(), KEY, 8192, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            UpstreamAnswer::Upgraded {
                head_len: ok.len() - 3,
                protocol: None
            }
        );
        // After an interim answer, the frames start after the 101's head.
        let hinted = format!("HTTP/1.1 103 Early Hints\r\n\r\n{ok}");
        assert_eq!(
            parse_upstream_response(hinted.as_bytes(), KEY, 8192, false),
            Ok(Some(UpstreamAnswer::Upgraded {
                head_len: hinted.len() - 3,
                protocol: None
            }))
        );
        let bad = ok.replace(&accept, "AAAA");
        assert_eq!(
            parse_upstream_response(bad.as_bytes(), KEY, 8192, false)
                .unwrap_err()
                .status,
            Status::BadGateway
        );
        let body = r#"{"kind":"Status","message":"VMI is not running","code":404}"#;
        let nf = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            parse_upstream_response(&nf.as_bytes()[..nf.len() - 1], KEY, 8192, false),
            Ok(None)
        );
        let Some(UpstreamAnswer::Refused(r)) =
            parse_upstream_response(nf.as_bytes(), KEY, 8192, false).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.status, Status::NotFound);
        assert!(r.reason.contains("VMI is not running"), "{}", r.reason);
        let busy = "HTTP/1.1 500 Oops\r\n\r\nline one\nline two";
        let Some(UpstreamAnswer::Refused(r)) =
            parse_upstream_response(busy.as_bytes(), KEY, 8192, true).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (r.status.code(), r.reason.as_str()),
            (502, "upstream answered 500: line one")
        );
        assert_eq!(
            parse_upstream_response(b"HTTP/1.1 10", KEY, 8192, true)
                .unwrap_err()
                .status,
            Status::BadGateway
        );
    }

    #[test]
    fn a_chunked_or_bodiless_refusal_ends_where_http_says_not_at_eof() {
        let reason = |answer: &[u8]| match parse_upstream_response(answer, KEY, 8192, false) {
            Ok(Some(UpstreamAnswer::Refused(r))) => Some(r.reason),
            Ok(None) => None,
            other => panic!("{other:?}"),
        };
        let status = r#"{"kind":"Status","message":"virtualmachineinstance \"x\" not found"}"#;
        let head = "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunked = format!(
            "{head}10;ext=1\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            &status[..16],
            status.len() - 16,
            &status[16..]
        );
        assert_eq!(
            reason(chunked.as_bytes()).as_deref(),
            Some(r#"upstream answered 404: virtualmachineinstance "x" not found"#)
        );
        // Until the last chunk, the answer is not complete (the connection is open).
        for cut in [head.len(), head.len() + 5, chunked.len() - 3] {
            assert_eq!(reason(&chunked.as_bytes()[..cut]), None, "cut at {cut}");
        }
        // Interim answers are skipped, whole or in part (then: more to come).
        let early = "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n";
        let not_found = "HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\ngone";
        let both = format!("{early}HTTP/1.1 100 Continue\r\n\r\n{not_found}");
        assert_eq!(
            reason(both.as_bytes()).as_deref(),
            Some("upstream answered 404: gone")
        );
        assert_eq!(reason(early.as_bytes()), None);
        assert_eq!(reason(&both.as_bytes()[..early.len() + 5]), None);
        // 204 and 304 have no body, whatever the headers say.
        assert_eq!(
            reason(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n").as_deref(),
            Some("upstream answered 204: No Content")
        );
        assert_eq!(
            dechunk(b"zz\r\nabc"),
            (vec![], true),
            "a bad size line ends it"
        );
        assert_eq!(
            dechunk(b"ffffffffffffffffff\r\n"),
            (vec![], true),
            "too big: no number"
        );
    }

    #[test]
    fn a_huge_content_length_from_the_upstream_is_no_panic() {
        // usize::MAX: the body's end was computed as head + length and
        // overflowed, panicking the loop on the upstream's say-so.
        let huge = "HTTP/1.1 500 Oops\r\nContent-Length: 18446744073709551615\r\n\r\nbusy";
        let Some(UpstreamAnswer::Refused(r)) =
            parse_upstream_response(huge.as_bytes(), KEY, 8192, true).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.reason, "upstream answered 500: busy");
    }

    #[test]
    fn a_status_is_its_code_and_phrase() {
        let all = [
            (Status::Ok, 200, "OK", None),
            (Status::BadRequest, 400, "Bad Request", None),
            (Status::Unauthorized, 401, "Unauthorized", Some(4401)),
            (Status::Forbidden, 403, "Forbidden", Some(4403)),
            (Status::NotFound, 404, "Not Found", Some(4404)),
            (Status::MethodNotAllowed, 405, "Method Not Allowed", None),
            (Status::RequestTimeout, 408, "Request Timeout", None),
            (Status::Conflict, 409, "Conflict", Some(4409)),
            (Status::UriTooLong, 414, "URI Too Long", None),
            (Status::UpgradeRequired, 426, "Upgrade Required", None),
            (
                Status::RequestHeaderFieldsTooLarge,
                431,
                "Request Header Fields Too Large",
                None,
            ),
            (
                Status::InternalServerError,
                500,
                "Internal Server Error",
                None,
            ),
            (Status::BadGateway, 502, "Bad Gateway", Some(4502)),
            (
                Status::ServiceUnavailable,
                503,
                "Service Unavailable",
                Some(4503),
            ),
            (Status::GatewayTimeout, 504, "Gateway Timeout", Some(4504)),
        ];
        for (status, code, phrase, close) in all {
            assert_eq!(status.code(), code);
            assert_eq!(u16::from(status), code);
            assert_eq!(status.to_string(), code.to_string());
            assert_eq!(status.reason_phrase(), phrase);
            assert_eq!(refusal_close_code(status), close, "{status}");
            let line = format!("HTTP/1.1 {code} {phrase}\r\n");
            assert!(
                plain_response(status, "text/plain", "x\n").starts_with(line.as_bytes()),
                "{status}"
            );
            assert!(
                refusal_response(&Refusal::new(status, "x")).starts_with(line.as_bytes()),
                "{status}"
            );
        }
    }
}
