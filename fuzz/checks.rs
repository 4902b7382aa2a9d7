//! The invariants every fuzz target checks, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the corpus replay in plain `cargo test`
//! (`tests/fuzz_corpus.rs`), so a committed seed or regression is checked by
//! exactly the same code with and without libFuzzer.
//!
//! Plain Rust over the library crate and std only. Every check panics (via
//! `assert!`) on a broken invariant; a panic inside the crate itself is of
//! course a finding too. The oracles here are written independently of the
//! code under test (a reference frame walker, a reference route splitter, an
//! HMAC-SHA-256 signer) so that the checks compare two implementations rather
//! than one implementation with itself.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use kubevirt_vnc_proxy::{Authorizer, Config, Decision, JwtAuthorizer, Status, TokenSource};
// The parsers are not the crate's API: the `fuzzing` feature exposes them
// (fuzz/Cargo.toml, and the crate's own dev-dependency for the replay).
use kubevirt_vnc_proxy::fuzzing::auth::{self, AuthError, JwtVerifier};
use kubevirt_vnc_proxy::fuzzing::frame::{
    self, Direction, FrameHeader, FrameScanner, ScanStop, Violation,
};
use kubevirt_vnc_proxy::fuzzing::http::{self, Probe, Request, UpgradeRequest, UpstreamAnswer};
use kubevirt_vnc_proxy::fuzzing::route::{self, RouteError};
use kubevirt_vnc_proxy::fuzzing::{auth_request, ticket};

/// How hard to look. The fuzzer runs each input once and needs speed; the
/// replay runs a few hundred small seeds and can afford every split point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// A handful of split points derived from the input.
    Fuzz,
    /// Every split point.
    Replay,
}

/// One target's check: the input, and how hard to look.
pub type Check = fn(&[u8], Depth);

/// Every target: its corpus directory name under `fuzz/corpus/` and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("request_head", request_head),
    ("route", route_target),
    ("frame_scanner_client", frame_scanner_client),
    ("frame_scanner_upstream", frame_scanner_upstream),
    ("upstream_response", upstream_response),
    ("token", token),
];

/// The head size limit the proxy runs with by default.
pub const MAX_HEAD: usize = 8192;

/// Split points in `0..=len` for incremental-parsing checks.
fn split_points(data: &[u8], depth: Depth) -> Vec<usize> {
    let len = data.len();
    match depth {
        Depth::Replay => (0..=len).collect(),
        Depth::Fuzz => {
            let first = data.first().map_or(0, |&b| usize::from(b));
            let last = data.last().map_or(0, |&b| usize::from(b));
            let mut v = vec![
                first % (len + 1),
                len / 2,
                (first * 251 + last * 17) % (len + 1),
                len.saturating_sub(1 + last % 8),
            ];
            v.sort_unstable();
            v.dedup();
            v
        }
    }
}

// ---------------------------------------------------------------------------
// request_head: the client's upgrade request, then its target.

/// `http::parse_request`, the session's entry point for a client's head, at
/// the default limit and at a small limit (so the 431 paths are reachable
/// with short inputs); then, for an upgrade, what the session does with it:
/// the authorizer's decision, the query filter and the subprotocol choice.
pub fn request_head(data: &[u8], depth: Depth) {
    check_request_head(data, MAX_HEAD, depth);
    let small = 24 + 2 * usize::from(data.last().copied().unwrap_or(0));
    check_request_head(data, small, depth);
}

fn check_request_head(data: &[u8], max_len: usize, depth: Depth) {
    // The session never holds more than `max_len` bytes of head.
    let data = &data[..data.len().min(max_len)];
    let whole = http::parse_request(data, max_len);
    // A probe, or else exactly the upgrade parser's answer.
    let upgrade = http::parse_upgrade_request(data, max_len);
    match &whole {
        Ok(Some(Request::Probe(p))) => check_probe(data, *p),
        other => assert_eq!(
            *other,
            upgrade.clone().map(|r| r.map(Request::Upgrade)),
            "not a probe, yet not the upgrade parser's answer"
        ),
    }
    match &whole {
        Ok(None) => assert!(
            data.len() < max_len,
            "a full buffer ({} of {max_len} bytes) must be refused, not awaited",
            data.len()
        ),
        Ok(Some(Request::Probe(_))) => {}
        Ok(Some(Request::Upgrade(req))) => check_upgrade_request(data, max_len, req),
        Err(refusal) => {
            assert!(
                matches!(refusal.status.code(), 400 | 405 | 414 | 426 | 431),
                "unexpected refusal status: {refusal:?}"
            );
            check_refusal_response(refusal);
        }
    }
    // Incremental parsing agrees with whole parsing: every prefix is either
    // "read more" or already the final answer.
    for cut in split_points(data, depth) {
        if cut == data.len() {
            continue;
        }
        let part = http::parse_request(&data[..cut], max_len);
        assert!(
            part == Ok(None) || part == whole,
            "prefix of {cut} bytes gave {part:?}, the whole {} bytes gave {whole:?}",
            data.len()
        );
    }
}

fn check_upgrade_request(data: &[u8], max_len: usize, req: &UpgradeRequest) {
    assert!(req.head_len <= data.len(), "head_len beyond the input");
    assert!(req.head_len <= max_len, "head_len beyond max_len");
    let head = &data[..req.head_len];
    assert!(
        head.ends_with(b"\r\n\r\n"),
        "an accepted head ends with CRLF CRLF: {:?}",
        String::from_utf8_lossy(head)
    );
    // Bytes after the head (early frame data) do not change the answer.
    assert_eq!(
        http::parse_request(head, max_len),
        Ok(Some(Request::Upgrade(req.clone()))),
        "the head alone parses differently"
    );
    assert_eq!(req.key.trim(), req.key, "key not trimmed");
    assert_eq!(
        base64_decode_standard(&req.key).map(|k| k.len()),
        Some(16),
        "accepted key {:?} is not 16 bytes of base64",
        req.key
    );
    for p in &req.protocols {
        assert!(
            !p.is_empty() && !p.contains(',') && p.trim() == p,
            "bad protocol token {p:?}"
        );
    }
    for (name, value) in req.headers.iter() {
        assert!(
            !name.is_empty() && !name.contains(['\r', '\n', ':']),
            "bad header name {name:?}"
        );
        assert!(
            !value.contains(['\r', '\n']),
            "header value with a line break: {value:?}"
        );
    }
    assert!(
        req.target.bytes().all(|b| b > b' ' && b != 0x7f),
        "target with whitespace or control bytes: {:?}",
        req.target
    );
    // The 101 for this key is well-formed and parses as an upgrade answer.
    let ok = http::switching_protocols(&req.key, None);
    assert_eq!(
        http::parse_upstream_response(&ok, &req.key, MAX_HEAD, false),
        Ok(Some(UpstreamAnswer::Upgraded {
            head_len: ok.len(),
            protocol: None
        })),
        "our own 101 does not parse as an upgrade"
    );
    check_route(&req.target);
    if let Some((_, query)) = req.target.split_once('?') {
        check_filter_query(query);
    }
    check_protocol_choice(req);
    check_decision(req);
    check_any_source_decision(req);
}

/// A probe was answered: the head is a `GET` or `HEAD` of that path (query
/// aside) without an `Upgrade` to a WebSocket, as a reference reading of the
/// head says.
fn check_probe(data: &[u8], probe: Probe) {
    let text = String::from_utf8_lossy(data);
    // Empty lines before the request line are skipped (RFC 9112 2.2, as
    // httparse does), and the head ends at the next empty line (CRLF or bare
    // LF): what follows is not the request's (a probe has no body; the bytes
    // are left alone).
    let empty = |l: &&str| l.is_empty() || *l == "\r";
    let head: Vec<&str> = text
        .split('\n')
        .skip_while(empty)
        .take_while(|l| !empty(l))
        .collect();
    let line = head.first().copied().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next(), parts.next().unwrap_or_default());
    // An absolute-form target (`http://host/path`) is routed by its path
    // (RFC 9112 3.2.2); no path is `/`.
    let lower = target.to_ascii_lowercase();
    let target = ["http://", "https://"]
        .iter()
        .find(|scheme| lower.starts_with(*scheme))
        .map(|scheme| {
            let rest = &target[scheme.len()..];
            rest.find(['/', '?']).map_or("", |i| &rest[i..])
        })
        .unwrap_or(target);
    let path = match target.split('?').next().unwrap_or_default() {
        "" => "/",
        path => path,
    };
    let want = match probe {
        Probe::Health => "/healthz",
        Probe::Ready => "/readyz",
        Probe::Metrics => "/metrics",
    };
    assert!(
        matches!(method, Some("GET" | "HEAD")) && path == want,
        "probe {probe:?} from {line:?}"
    );
    // An Upgrade to anything but a WebSocket (h2c) is ignored.
    assert!(
        !head.iter().skip(1).any(|l| {
            let l = l.to_ascii_lowercase();
            l.strip_prefix("upgrade:").is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim_matches([' ', '\t', '\r']) == "websocket")
            })
        }),
        "a WebSocket upgrade answered as probe {probe:?}"
    );
}

/// The client address handed to the authorizer with the parsed request
/// (the session hands it the peer's).
const PEER: &str = "192.0.2.7:40000";

/// The decision of the built-in authorizer as the proxy builds it from
/// `config()` (the path carries the token; leeway 0), asked the way the
/// session asks it, must be what its parts answer: the route, then the
/// token's verification. And what the session then relies on must hold.
fn check_decision(req: &UpgradeRequest) -> Decision {
    let peer: SocketAddr = PEER.parse().expect("peer address");
    let decision = STRICT_AUTHORIZER.with(|a| {
        a.borrow_mut()
            .authorize(&auth_request(req, peer), ticket(1))
    });
    let c = strict_config();
    assert_eq!(
        c.token_sources,
        [TokenSource::Path],
        "the default token source"
    );
    let want = match route::parse_request_target(&req.target, c.path_prefix.as_deref(), true, false)
    {
        Err(RouteError::NotFound(_)) => Err((Status::NotFound, None)),
        Err(RouteError::BadEncoding) => Err((Status::BadRequest, None)),
        Err(e @ RouteError::BadQueryValue(_)) => panic!("the path's parser judged the query: {e}"),
        Ok(t) => {
            let token = t.path_token.expect("the path shape carries a token");
            match verifier().authorize(&token, &t.vmi) {
                Ok(g) => Ok(g),
                Err(e) => Err((e.status(), Some((e.to_string(), token)))),
            }
        }
    };
    match (&decision, &want) {
        (Decision::Allow(g), Ok(w)) => {
            assert_eq!(g, w, "the authorizer granted otherwise than the verifier");
            check_grant_for_session(g);
        }
        (Decision::Deny { refusal, .. }, Err((status, verified))) => {
            assert_eq!(refusal.status, *status, "{decision:?} for {:?}", req.target);
            if let Some((reason, token)) = verified {
                assert_eq!(&refusal.reason, reason);
                if token.len() >= 16 && token.contains('.') {
                    assert!(
                        !refusal.reason.contains(token.as_str()),
                        "refusal echoes the token"
                    );
                }
            }
        }
        _ => panic!(
            "for {:?} the authorizer said {decision:?}, its parts {want:?}",
            req.target
        ),
    }
    decision
}

/// Every token source enabled: any carrier may hold the token. No exact
/// expectation (that would be the carrier code again), but the answer is
/// one the session can act on.
fn check_any_source_decision(req: &UpgradeRequest) {
    let peer: SocketAddr = PEER.parse().expect("peer address");
    let decision = ANY_SOURCE_AUTHORIZER.with(|a| {
        a.borrow_mut()
            .authorize(&auth_request(req, peer), ticket(2))
    });
    match &decision {
        Decision::Allow(g) => {
            check_grant_for_session(g);
            let vmi = route::parse_request_target(&req.target, None, true, true)
                .expect("a granted request has a route")
                .vmi;
            assert_eq!(g.vmi, vmi, "granted another VMI than the route names");
        }
        Decision::Deny { refusal, .. } => assert!(
            matches!(refusal.status.code(), 400 | 401 | 403 | 404),
            "{decision:?}"
        ),
        _ => panic!("the built-in authorizer never defers: {decision:?}"),
    }
}

/// What the session checks of a grant before it builds the upstream URL
/// holds for every grant of the built-in authorizer.
fn check_grant_for_session(g: &auth::Grant) {
    assert!(
        route::is_dns1123_label(&g.namespace),
        "granted namespace {:?}",
        g.namespace
    );
    assert!(
        route::is_dns1123_subdomain(&g.vmi),
        "granted vmi {:?}",
        g.vmi
    );
}

/// The subprotocol answered is one the client offered and the proxy allows,
/// the first such, never a bearer credential; and our 101 naming it parses
/// back with that protocol.
fn check_protocol_choice(req: &UpgradeRequest) {
    let mut allowed = config().client_subprotocols.clone();
    // Also allow whatever came first, so the choosing path is exercised.
    allowed.extend(req.protocols.first().cloned());
    let chosen = http::select_client_protocol(&req.protocols, &allowed);
    let want = req
        .protocols
        .iter()
        .find(|p| allowed.contains(p) && !p.starts_with(http::BEARER_PROTOCOL_PREFIX))
        .map(String::as_str);
    assert_eq!(chosen, want, "protocol choice from {:?}", req.protocols);
    if let Some(p) = chosen {
        let ok = http::switching_protocols(&req.key, Some(p));
        assert_eq!(
            http::parse_upstream_response(&ok, &req.key, MAX_HEAD, false),
            Ok(Some(UpstreamAnswer::Upgraded {
                head_len: ok.len(),
                protocol: Some(p.to_owned())
            })),
            "our own 101 with protocol {p:?} does not parse back"
        );
    }
}

/// `route::filter_query` against a reference: only allowed names survive,
/// decoded once, and the output is plain `name=value` pairs of unreserved
/// characters and `%XX` escapes, which filter to themselves.
fn check_filter_query(query: &str) {
    let decode = |s: &str| reference_percent_decode(&s.replace('+', " "));
    let pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    // The first pair's name is allowed too, so the keeping path is exercised.
    let mut allowed = config().upstream_query_params.clone();
    allowed.extend(pairs.first().and_then(|(k, _)| decode(k)));
    let got = route::filter_query(query, &allowed);
    // Only allowed names' values are decoded (what is dropped is never
    // judged); the first of them that does not decode is the error.
    let listed = pairs
        .iter()
        .filter_map(|(k, v)| decode(k).filter(|k| allowed.contains(k)).map(|k| (k, *v)));
    let mut kept = Vec::new();
    for (k, v) in listed {
        let Some(v) = decode(v) else {
            assert_eq!(
                got,
                Err(RouteError::BadQueryValue(k)),
                "filter_query({query:?})"
            );
            return;
        };
        kept.push((k, v));
    }
    let out = match got {
        Ok(out) => out,
        Err(e) => panic!("filter_query({query:?}) = {e:?}, all escapes are valid"),
    };
    let Some(out) = out else {
        assert!(kept.is_empty(), "filter_query({query:?}) dropped {kept:?}");
        return;
    };
    assert!(
        out.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%&=".contains(&b)),
        "filter_query({query:?}) = {out:?} has characters beyond unreserved and escapes"
    );
    let back: Vec<(String, String)> = out
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').expect("name=value");
            (
                reference_percent_decode(k).expect("valid escape"),
                reference_percent_decode(v).expect("valid escape"),
            )
        })
        .collect();
    assert_eq!(back, kept, "filter_query({query:?}) = {out:?}");
    assert_eq!(
        route::filter_query(&out, &allowed),
        Ok(Some(out.clone())),
        "filtering is not idempotent"
    );
}

/// The proxy's own refusal response must be one our response parser reads
/// back as a refusal carrying the same status.
fn check_refusal_response(refusal: &http::Refusal) {
    let bytes = http::refusal_response(refusal);
    let parsed = http::parse_upstream_response(&bytes, "dGhlIHNhbXBsZSBub25jZQ==", MAX_HEAD, false);
    let Ok(Some(UpstreamAnswer::Refused(back))) = parsed else {
        panic!(
            "refusal response {:?} does not parse back: {parsed:?}",
            String::from_utf8_lossy(&bytes)
        );
    };
    let prefix = format!("upstream answered {}: ", refusal.status);
    assert!(back.reason.starts_with(&prefix), "{back:?}");
}

// ---------------------------------------------------------------------------
// route: request targets, percent-decoding and the Kubernetes name rules.

/// Any string as a request target, with and without a prefix, plus the
/// decoder and the name rules on it.
pub fn route_target(data: &[u8], _depth: Depth) {
    let s = String::from_utf8_lossy(data);
    check_route(&s);
    check_percent_decode(&s);
    check_names(&s);
    if let Some((_, query)) = s.split_once('?') {
        check_filter_query(query);
    }
    // The text between the slashes, decoded, as names: the shape VMI names
    // and namespaces take on their way to the upstream URL.
    for seg in s.split(['/', '?']) {
        if let Some(d) = route::percent_decode(seg) {
            check_names(&d);
        }
    }
}

#[derive(Debug, PartialEq)]
enum RefRoute {
    Ok(Option<String>, String, Option<String>),
    NotFound,
    BadEncoding,
}

/// The route shapes the built-in authorizer enables, as
/// `(path_token, vmi_only)`: `TOKEN_SOURCES=path` (the default), another
/// source only, and both.
const ROUTE_SHAPES: [(bool, bool); 3] = [(true, false), (false, true), (true, true)];

/// The route grammar written out step by step: `/[prefix/]token/vmi[?query]`
/// when the path carries the token, `/[prefix/]vmi[?query]` when another
/// source does.
fn reference_route(
    target: &str,
    prefix: Option<&str>,
    path_token: bool,
    vmi_only: bool,
) -> RefRoute {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(target[i + 1..].to_owned())),
        None => (target, None),
    };
    let Some(rest) = path.strip_prefix('/') else {
        return RefRoute::NotFound;
    };
    let mut segs: Vec<&str> = rest.split('/').collect();
    if let Some(p) = prefix {
        // The prefix is configured decoded and matched against the segment
        // decoded once; one that does not decode is malformed.
        match reference_percent_decode(segs[0]) {
            None => return RefRoute::BadEncoding,
            Some(first) if first != p => return RefRoute::NotFound,
            Some(_) => {}
        }
        segs.remove(0);
    }
    let decode = |s: &str| reference_percent_decode(s).ok_or(RefRoute::BadEncoding);
    let decoded = match segs[..] {
        [t, v] if path_token && !t.is_empty() && !v.is_empty() => {
            decode(t).and_then(|t| Ok((Some(t), decode(v)?)))
        }
        [v] if vmi_only && !v.is_empty() => decode(v).map(|v| (None, v)),
        _ => return RefRoute::NotFound,
    };
    match decoded {
        Ok((t, v)) => RefRoute::Ok(t, v, query),
        Err(e) => e,
    }
}

/// `route::parse_request_target`, as the built-in authorizer calls it with
/// each route shape, against the reference.
fn check_route(target: &str) {
    let first_segment = target
        .strip_prefix('/')
        .and_then(|r| r.split(['/', '?']).next())
        .unwrap_or("vnc");
    // As configured: HOST_PATH_PREFIX is kept decoded (and the raw segment,
    // which matches only when it has no escapes).
    let decoded_first = reference_percent_decode(first_segment);
    for (path_token, vmi_only) in ROUTE_SHAPES {
        for prefix in [
            None,
            Some("vnc"),
            Some(first_segment),
            decoded_first.as_deref(),
        ] {
            let got = route::parse_request_target(target, prefix, path_token, vmi_only);
            let want = reference_route(target, prefix, path_token, vmi_only);
            let same = match (&got, &want) {
                (Ok(r), RefRoute::Ok(t, v, q)) => {
                    assert!(!r.vmi.is_empty());
                    assert!(r.path_token.as_ref().is_none_or(|t| !t.is_empty()));
                    r.path_token == *t && r.vmi == *v && r.query == *q
                }
                (Err(RouteError::NotFound(_)), RefRoute::NotFound) => true,
                (Err(RouteError::BadEncoding), RefRoute::BadEncoding) => true,
                _ => false,
            };
            assert!(
                same,
                "parse_request_target({target:?}, {prefix:?}, {path_token}, {vmi_only}) = \
                 {got:?}, reference says {want:?}"
            );
        }
        // Adding a prefix segment and configuring it changes nothing.
        if target.starts_with('/') {
            let prefixed = format!("/vnc{target}");
            assert_eq!(
                route::parse_request_target(&prefixed, Some("vnc"), path_token, vmi_only).ok(),
                route::parse_request_target(target, None, path_token, vmi_only).ok(),
                "prefix stripping differs for {target:?}"
            );
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

fn reference_percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = hex_value(bytes.next()?)?;
            let lo = hex_value(bytes.next()?)?;
            out.push(hi * 16 + lo);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn check_percent_decode(s: &str) {
    let got = route::percent_decode(s);
    assert_eq!(
        got,
        reference_percent_decode(s),
        "percent_decode({s:?}) disagrees with the reference"
    );
    if !s.contains('%') {
        assert_eq!(got.as_deref(), Some(s), "no escapes must mean no change");
    }
    // Encoding every byte and decoding once gives the original back.
    for digits in [b"0123456789ABCDEF", b"0123456789abcdef"] {
        let encoded: String = s
            .bytes()
            .flat_map(|b| {
                let hex = |n: u8| char::from(digits[usize::from(n)]);
                ['%', hex(b >> 4), hex(b & 0xf)]
            })
            .collect();
        assert_eq!(route::percent_decode(&encoded).as_deref(), Some(s));
    }
}

/// RFC 1123 label as Kubernetes validates it: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`,
/// at most 63 characters.
fn reference_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = s.chars();
    match (chars.next(), chars.next_back()) {
        (Some(a), None) => alnum(a),
        (Some(a), Some(z)) => {
            s.len() <= 63 && alnum(a) && alnum(z) && chars.all(|c| alnum(c) || c == '-')
        }
        _ => false,
    }
}

fn check_names(s: &str) {
    let label = route::is_dns1123_label(s);
    let subdomain = route::is_dns1123_subdomain(s);
    assert_eq!(label, reference_label(s), "is_dns1123_label({s:?})");
    let want_subdomain = s.len() <= 253 && s.split('.').all(reference_label);
    assert_eq!(subdomain, want_subdomain, "is_dns1123_subdomain({s:?})");
    if label {
        assert!(subdomain, "a label is a subdomain: {s:?}");
    }
    if subdomain {
        // Nothing that could change an upstream URL's path survives the rules.
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
            "{s:?}"
        );
        assert!(s != "." && s != ".." && !s.contains(".."), "{s:?}");
    }
}

// ---------------------------------------------------------------------------
// frame scanners: input = [max_frame selector, 3 split seeds, stream...].

/// Frame size limits the scanner is run with, picked by the first byte.
const MAX_FRAMES: [u64; 9] = [0, 1, 125, 126, 1000, 65_535, 65_536, 1 << 20, u64::MAX];

/// Client-to-upstream direction (masked frames).
pub fn frame_scanner_client(data: &[u8], depth: Depth) {
    frame_scanner(data, Direction::ClientToUpstream, depth);
}

/// Upstream-to-client direction (unmasked frames).
pub fn frame_scanner_upstream(data: &[u8], depth: Depth) {
    frame_scanner(data, Direction::UpstreamToClient, depth);
}

/// What scanning a whole stream amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    forwardable: usize,
    stop: Option<ScanStop>,
    remaining: u64,
    closed: bool,
}

fn frame_scanner(data: &[u8], dir: Direction, depth: Depth) {
    let (cfg, stream) = data.split_at(data.len().min(4));
    let max_frame = MAX_FRAMES[usize::from(cfg.first().copied().unwrap_or(0)) % MAX_FRAMES.len()];
    let reference = reference_scan(stream, dir, max_frame);
    assert!(reference.forwardable <= stream.len());

    let len = stream.len();
    let seeds: Vec<usize> = cfg.iter().skip(1).map(|&b| usize::from(b)).collect();
    let mut plans: Vec<Vec<usize>> = vec![
        vec![],
        // Every byte on its own: the hardest split for a stateful scanner.
        (1..len).collect(),
        // Split points from the seed bytes, as a relay's reads might fall.
        {
            let mut acc = 0;
            let mut v: Vec<usize> = seeds
                .iter()
                .map(|&s| {
                    acc += s % 37;
                    acc.min(len)
                })
                .collect();
            v.extend(seeds.iter().map(|&s| s * 257 % (len + 1)));
            v.sort_unstable();
            v
        },
    ];
    if depth == Depth::Replay {
        plans.extend((0..=len).map(|k| vec![k]));
    }
    // With the relay's fast path for small data frames and without it (so
    // `scan` alone sees every kind of frame too).
    for fast_path in [true, false] {
        for plan in &plans {
            let got = scan_chunked(stream, dir, max_frame, plan, fast_path);
            assert_eq!(
                got, reference,
                "{dir:?} max_frame {max_frame}: scanning in pieces split at {plan:?} \
                 (fast path: {fast_path}) disagrees with the reference walk"
            );
        }
    }
    check_close_frame(data, dir);
}

/// Feed `stream` to a scanner the way the relay does: bytes arrive up to each
/// split point, and whatever was not forwardable is presented again. With
/// `fast_path`, each new piece goes to `whole_data_frames` first and, when
/// that takes it, not to `scan` (as the relay's `scan_new` does).
fn scan_chunked(
    stream: &[u8],
    dir: Direction,
    max_frame: u64,
    splits: &[usize],
    fast_path: bool,
) -> Outcome {
    let mut s = FrameScanner::new(dir, max_frame);
    let mut consumed = 0usize;
    let mut stop = None;
    for end in splits.iter().copied().chain([stream.len()]) {
        if end < consumed {
            continue;
        }
        let piece = &stream[consumed..end];
        if fast_path && let Some(n) = s.whole_data_frames(piece) {
            // All of the piece, and exactly what `scan` would have said; the
            // scanner is left as it was, at a boundary, which the reference
            // comparison of the whole run then relies on.
            assert_eq!(n, piece.len(), "the fast path takes all or nothing");
            let mut scanned = s.clone();
            let r = scanned.scan(piece);
            assert_eq!(
                (r.forwardable, r.stop),
                (n, None),
                "the fast path took what scan does not forward"
            );
            assert!(scanned.at_boundary() && scanned.last_boundary() == Some(n));
            consumed += n;
            continue;
        }
        let r = s.scan(piece);
        assert!(
            r.forwardable <= end - consumed,
            "forwardable {} exceeds the {} bytes offered",
            r.forwardable,
            end - consumed
        );
        consumed += r.forwardable;
        assert_eq!(s.at_boundary(), s.remaining() == 0);
        if r.stop.is_some() {
            stop = r.stop;
            break;
        }
    }
    match stop {
        Some(ScanStop::Close { .. }) => {
            assert!(s.closed(), "stopped at a close but not closed");
            assert!(s.at_boundary(), "a close stop ends a frame");
            // After a close nothing is forwardable, however much follows.
            let after = s.scan(&stream[consumed..]);
            assert_eq!(after.forwardable, 0, "bytes forwardable after a close");
            assert!(matches!(after.stop, Some(ScanStop::Close { .. })));
            let again = s.scan(b"\x82\x00\x88\x80\0\0\0\0");
            assert_eq!(again.forwardable, 0, "bytes forwardable after a close");
        }
        Some(ScanStop::Violation(v)) => {
            assert!(!s.closed());
            assert!(s.at_boundary(), "a violation is found at a frame start");
            // Nothing was consumed: asking again gives the same answer.
            let again = s.scan(&stream[consumed..]);
            assert_eq!(again.forwardable, 0);
            assert_eq!(again.stop, Some(ScanStop::Violation(v)));
        }
        None => {
            assert!(!s.closed());
            // What is left over is the start of a header, to be completed,
            // or a close frame held back until it is whole.
            let tail = &stream[consumed..];
            if !tail.is_empty() {
                assert!(s.at_boundary(), "leftover bytes inside a payload");
                match FrameHeader::parse(tail) {
                    Ok(None) => assert!(tail.len() < frame::MAX_HEADER_LEN),
                    Ok(Some(h)) => {
                        assert_eq!(h.opcode, frame::opcode::CLOSE, "only a close frame is held");
                        assert!((tail.len() as u64) < h.header_len as u64 + h.payload_len);
                    }
                    Err(v) => panic!("a header violation left unreported: {v:?}"),
                }
            }
        }
    }
    Outcome {
        forwardable: consumed,
        stop,
        remaining: s.remaining(),
        closed: s.closed(),
    }
}

/// Walk the whole stream frame by frame, with no state carried across reads.
fn reference_scan(stream: &[u8], dir: Direction, max_frame: u64) -> Outcome {
    let mut pos = 0usize;
    let mut fragmented = false;
    let open = |forwardable, remaining| Outcome {
        forwardable,
        stop: None,
        remaining,
        closed: false,
    };
    loop {
        if pos == stream.len() {
            return open(pos, 0);
        }
        let at = &stream[pos..];
        let parsed = FrameHeader::parse(at);
        check_header_parse(at, parsed);
        let h = match parsed {
            Ok(None) => return open(pos, 0),
            Ok(Some(h)) => h,
            Err(v) => {
                return Outcome {
                    forwardable: pos,
                    stop: Some(ScanStop::Violation(v)),
                    remaining: 0,
                    closed: false,
                };
            }
        };
        let verdict = frame::validate(&h, dir, max_frame, fragmented);
        assert_eq!(
            verdict.is_ok(),
            reference_valid(&h, dir, max_frame, fragmented),
            "validate({h:?}, {dir:?}, {max_frame}, {fragmented}) = {verdict:?}"
        );
        if let Err(v) = verdict {
            return Outcome {
                forwardable: pos,
                stop: Some(ScanStop::Violation(v)),
                remaining: 0,
                closed: false,
            };
        }
        let payload_at = pos + h.header_len;
        let end = payload_at as u64 + h.payload_len;
        if h.opcode == frame::opcode::CLOSE {
            // A close frame is held back until whole, then its code and
            // reason are checked (RFC 6455 §7.4, §8.1).
            if end > stream.len() as u64 {
                return open(pos, 0);
            }
            let k = h.mask.unwrap_or([0; 4]);
            let payload: Vec<u8> = stream[payload_at..end as usize]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ k[i % 4])
                .collect();
            let verdict = reference_close_payload(&payload);
            return match verdict {
                Ok(code) => Outcome {
                    forwardable: end as usize,
                    stop: Some(ScanStop::Close { code }),
                    remaining: 0,
                    closed: true,
                },
                Err(v) => Outcome {
                    forwardable: pos,
                    stop: Some(ScanStop::Violation(v)),
                    remaining: 0,
                    closed: false,
                },
            };
        }
        if end > stream.len() as u64 {
            return open(stream.len(), end - stream.len() as u64);
        }
        let end = end as usize;
        if !h.is_control() {
            fragmented = !h.fin;
        }
        pos = end;
    }
}

/// The close codes an endpoint may send (RFC 6455 §7.4.1 and the IANA
/// registry: 1000-1003, 1007-1014; 3000-4999 for libraries and
/// applications), and the reason must be UTF-8.
fn reference_close_payload(p: &[u8]) -> Result<Option<u16>, Violation> {
    if p.is_empty() {
        return Ok(None);
    }
    if p.len() == 1 {
        return Err(Violation::BadClosePayload);
    }
    let code = u16::from_be_bytes([p[0], p[1]]);
    let sendable = (1000..=1003).contains(&code)
        || (1007..=1014).contains(&code)
        || (3000..=4999).contains(&code);
    if !sendable {
        return Err(Violation::BadCloseCode);
    }
    if std::str::from_utf8(&p[2..]).is_err() {
        return Err(Violation::BadCloseReason);
    }
    Ok(Some(code))
}

/// RFC 6455 §5.2 header decoding, written out again, compared with
/// `FrameHeader::parse`; and no strict prefix of a header is an answer.
fn check_header_parse(b: &[u8], parsed: Result<Option<FrameHeader>, Violation>) {
    let want: Result<Option<FrameHeader>, Violation> = (|| {
        if b.len() < 2 {
            return Ok(None);
        }
        let ext = match b[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if b.len() < 2 + ext {
            return Ok(None);
        }
        let len = match ext {
            0 => u64::from(b[1] & 0x7f),
            _ => b[2..2 + ext]
                .iter()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
        };
        if ext == 8 && len > i64::MAX as u64 {
            return Err(Violation::LengthTooLarge);
        }
        if (ext == 2 && len < 126) || (ext == 8 && len < 65_536) {
            return Err(Violation::NonMinimalLength);
        }
        let masked = b[1] & 0x80 != 0;
        let header_len = 2 + ext + if masked { 4 } else { 0 };
        if b.len() < header_len {
            return Ok(None);
        }
        Ok(Some(FrameHeader {
            fin: b[0] >> 7 == 1,
            rsv: (b[0] >> 4) & 7,
            opcode: b[0] & 0xf,
            mask: masked.then(|| [b[2 + ext], b[3 + ext], b[4 + ext], b[5 + ext]]),
            payload_len: len,
            header_len,
        }))
    })();
    assert_eq!(
        parsed,
        want,
        "FrameHeader::parse({:02x?})",
        &b[..b.len().min(14)]
    );
    if let Ok(Some(h)) = parsed {
        assert!((2..=frame::MAX_HEADER_LEN).contains(&h.header_len));
        for cut in 0..h.header_len {
            assert_eq!(FrameHeader::parse(&b[..cut]), Ok(None), "prefix {cut}");
        }
    }
}

/// RFC 6455 rules plus the size limit, as a yes/no.
fn reference_valid(h: &FrameHeader, dir: Direction, max_frame: u64, fragmented: bool) -> bool {
    let masking = h.mask.is_some() == matches!(dir, Direction::ClientToUpstream);
    let opcode = match h.opcode {
        0x0 => fragmented,
        0x1 | 0x2 => !fragmented,
        0x8..=0xA => h.fin && h.payload_len <= 125 && !(h.opcode == 0x8 && h.payload_len == 1),
        _ => false,
    };
    masking && h.rsv == 0 && opcode && h.payload_len <= max_frame
}

/// `close_frame` output parses, validates and scans as a close with the code
/// given, and carries a prefix of the reason cut at a character boundary.
fn check_close_frame(data: &[u8], dir: Direction) {
    let code = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 1000,
    };
    let reason = String::from_utf8_lossy(data.get(2..).unwrap_or_default());
    let mask = match (dir, data) {
        (Direction::UpstreamToClient, _) => None,
        (Direction::ClientToUpstream, [.., a, b, c, d]) => Some([*a, *b, *c, *d]),
        (Direction::ClientToUpstream, _) => Some([1, 2, 3, 4]),
    };
    let mut out = [0u8; 131];
    let n = frame::close_frame(code, &reason, mask, &mut out);
    let bytes = &out[..n];
    let h = FrameHeader::parse(bytes)
        .expect("close_frame output parses")
        .expect("close_frame output is complete");
    assert_eq!(
        h.header_len as u64 + h.payload_len,
        n as u64,
        "close frame length"
    );
    assert!(h.fin && h.opcode == frame::opcode::CLOSE && h.mask == mask);
    assert_eq!(frame::validate(&h, dir, 125, false), Ok(()));
    assert_eq!(frame::validate(&h, dir, 125, true), Ok(()));
    let mut s = FrameScanner::new(dir, 125);
    let r = s.scan(bytes);
    // A frame with a code nobody may send is built (the proxy only sends
    // valid ones) but is refused by the scanner like any peer's.
    let want = match reference_close_payload(&[&code.to_be_bytes()[..], b""].concat()) {
        Ok(_) => (n, Some(ScanStop::Close { code: Some(code) })),
        Err(v) => (0, Some(ScanStop::Violation(v))),
    };
    assert_eq!(
        (r.forwardable, r.stop),
        want,
        "close_frame({code}, {reason:?}, {mask:?}) does not scan as expected"
    );
    let k = mask.unwrap_or([0; 4]);
    let payload: Vec<u8> = bytes[h.header_len..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ k[i % 4])
        .collect();
    let sent = std::str::from_utf8(&payload[2..]).expect("close reason is UTF-8");
    assert!(reason.starts_with(sent), "close reason is not a prefix");
    assert!(sent.len() <= 123 && sent.len() + 3 >= reason.len().min(123));
}

// ---------------------------------------------------------------------------
// upstream_response: the upstream's answer to our upgrade.

/// The RFC 6455 example key; its accept value is below.
pub const UPSTREAM_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const UPSTREAM_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// `http::parse_upstream_response` at every prefix, open and at EOF, at the
/// default limit and at a small one.
pub fn upstream_response(data: &[u8], depth: Depth) {
    check_upstream_response(data, MAX_HEAD, depth);
    let small = 32 + 2 * usize::from(data.last().copied().unwrap_or(0));
    check_upstream_response(data, small, depth);
}

fn check_upstream_response(data: &[u8], max_len: usize, depth: Depth) {
    // The session reads at most `max_len` bytes of response.
    let data = &data[..data.len().min(max_len)];
    let open = http::parse_upstream_response(data, UPSTREAM_KEY, max_len, false);
    let eof = http::parse_upstream_response(data, UPSTREAM_KEY, max_len, true);
    check_answer(data, &open);
    check_answer(data, &eof);
    assert!(
        eof != Ok(None),
        "at EOF there is nothing more to wait for, yet the answer was Ok(None)"
    );
    match &open {
        Ok(None) => assert!(data.len() < max_len, "a full buffer must be decided"),
        // A decided answer does not change when EOF follows.
        Ok(Some(a)) => assert_eq!(eof.as_ref().ok(), Some(&Some(a.clone()))),
        Err(e) => assert_eq!(eof.as_ref().map_err(|e| e.status), Err(e.status)),
    }
    // Incremental parsing agrees with whole parsing.
    for cut in split_points(data, depth) {
        if cut == data.len() {
            continue;
        }
        let part = http::parse_upstream_response(&data[..cut], UPSTREAM_KEY, max_len, false);
        let known_issue = TOLERATE_EARLY_OVERSIZED_BODY
            && declared_body_overflows(&data[..cut], max_len)
            && matches!((&part, &open), (
                Ok(Some(UpstreamAnswer::Refused(a))),
                Ok(Some(UpstreamAnswer::Refused(b))),
            ) if a.status == b.status);
        assert!(
            part == Ok(None) || part == open || known_issue,
            "prefix of {cut} bytes gave {part:?}, the whole {} bytes gave {open:?}",
            data.len()
        );
    }
}

/// Known issue, reported and left to the owners of `src/http.rs`: when a
/// refusal's declared `Content-Length` does not fit in `max_len`,
/// `parse_upstream_response` answers at once with whatever part of the body
/// has arrived, instead of awaiting up to `max_len` bytes (or EOF) as its
/// documentation promises; so the reason a user sees depends on how TCP split
/// the response. Set this to `false` once fixed: the saved reproducer in
/// `fuzz/regressions/upstream_response/` then guards the fix.
const TOLERATE_EARLY_OVERSIZED_BODY: bool = false;

/// Known issue, reported and left to the owners of `src/http.rs`: a refusal
/// without a body takes its reason from the status line, which is not
/// cleaned like a body's reason, so a tab in the reason phrase (the only
/// control character httparse lets through there) reaches the client's body
/// and the log line. Set this to `false` once fixed: the saved reproducer in
/// `fuzz/regressions/upstream_response/` then guards the fix.
const TOLERATE_TAB_IN_STATUS_REASON: bool = false;

/// The response head in `buf` is complete and declares a body that cannot fit
/// in `max_len` bytes together with the head.
fn declared_body_overflows(buf: &[u8], max_len: usize) -> bool {
    // httparse skips empty lines before the status line.
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let Some(head_len) = (skip..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        (rest.starts_with(b"\r\n\r\n").then_some(i + 4))
            .or_else(|| rest.starts_with(b"\n\n").then_some(i + 2))
            .or_else(|| rest.starts_with(b"\n\r\n").then_some(i + 3))
    }) else {
        return false;
    };
    String::from_utf8_lossy(&buf[..head_len])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|n| head_len.saturating_add(n) > max_len)
}

fn check_answer(data: &[u8], answer: &Result<Option<UpstreamAnswer>, http::Refusal>) {
    match answer {
        Ok(None) => {}
        Err(r) => assert_eq!(r.status.code(), 502, "{r:?}"),
        Ok(Some(UpstreamAnswer::Refused(r))) => {
            let (code, detail) = r
                .reason
                .strip_prefix("upstream answered ")
                .and_then(|rest| rest.split_once(": "))
                .and_then(|(c, d)| Some((c.parse::<u16>().ok()?, d)))
                .unwrap_or_else(|| panic!("refusal reason without the upstream status: {r:?}"));
            assert_ne!(code, 101, "a 101 is never passed on as a refusal");
            // KubeVirt's 400s that name the VMI's state (virt-api's own
            // messages) are the VMI's, like its 409.
            let vmi_state = code == 400
                && [
                    "VMI is not running",
                    "Unable to connect to VirtualMachineInstance because phase is ",
                    "No graphics devices are present",
                ]
                .iter()
                .any(|m| detail.starts_with(m));
            // virt-handler's refusal of a second console, passed on by
            // virt-api inside a 500 (or as it is): the console is busy.
            let busy = matches!(code, 500 | 503)
                && detail.contains("Active VNC connection. Request denied");
            // The API server's 404 for a path nothing serves is the
            // proxy's setup at fault, not a missing VMI.
            let path_not_served = code == 404
                && detail.starts_with("the server could not find the requested resource");
            let want = if matches!(code, 404 | 409) && !path_not_served {
                code
            } else if vmi_state {
                409
            } else if busy {
                503
            } else {
                502
            };
            assert_eq!(r.status.code(), want, "{r:?}");
            // The reason goes into an HTTP body and a log line.
            let tolerated = |c: char| TOLERATE_TAB_IN_STATUS_REASON && c == '\t';
            assert!(
                !r.reason.chars().any(|c| c.is_control() && !tolerated(c)),
                "control character in the refusal reason: {r:?}"
            );
        }
        Ok(Some(UpstreamAnswer::Upgraded { head_len, protocol })) => {
            assert!(*head_len <= data.len());
            let head = &data[..*head_len];
            assert!(head.ends_with(b"\n"), "head must end a line");
            assert!(
                head.windows(UPSTREAM_ACCEPT.len())
                    .any(|w| w == UPSTREAM_ACCEPT.as_bytes()),
                "upgraded without the right accept value"
            );
            // httparse skips empty lines before the status line (as RFC
            // 9112 2.2 lets a server do before a request line): no upstream
            // sends them, and taking them costs nothing.
            let mut line = head;
            while let Some(rest) = line
                .strip_prefix(b"\r\n".as_slice())
                .or_else(|| line.strip_prefix(b"\n".as_slice()))
            {
                line = rest;
            }
            assert!(
                line.starts_with(b"HTTP/1.")
                    && (line.get(8..13) == Some(b" 101 ".as_slice())
                        || line.get(8..12) == Some(b" 101".as_slice())),
                "upgraded without a 101 status line: {:?}",
                String::from_utf8_lossy(head)
            );
            if let Some(p) = protocol {
                assert_eq!(p.trim(), p);
            }
            for eof in [false, true] {
                assert_eq!(
                    http::parse_upstream_response(head, UPSTREAM_KEY, MAX_HEAD, eof),
                    Ok(Some(UpstreamAnswer::Upgraded {
                        head_len: *head_len,
                        protocol: protocol.clone()
                    })),
                    "the head alone parses differently"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// token: JWT verification and the VMI decision.
//
// Input forms (lines separated by '\n'):
//   TOKEN \n VMI                         a raw token (the default)
//   "sign" \n HEADER \n CLAIMS \n VMI     JSON the harness signs with the secret
//   "model" \n NS \n VMI,VMI \n VMI \n FLAGS \n ID
//                                        claims the harness builds and signs,
//                                        with the exact expected answer
// FLAGS: 'e' omit exp, 'x' expired, 'n' not yet valid, 's' id as a string,
// 'f' exp with a fraction (as LabOrchestrator's issuer writes it).

/// The HS256 secret of the committed seeds (the PyJWT fixtures' secret).
pub const SECRET: &[u8] = b"test-secret-that-is-at-least-32-bytes-long!!";
const EXP_VALID: u64 = 4_102_444_800; // 2100-01-01
const EXP_PAST: u64 = 1_000_000_000; // 2001

/// The configuration the embedding API builds for local development with the
/// seeds' secret: its defaults (subprotocols, query parameters, JWT settings)
/// are what the checks exercise.
fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| Config::local_dev("ws://127.0.0.1:8001", SECRET).expect("local-dev config"))
}

/// `config()` with no clock skew allowed, so "expired" and "not yet valid"
/// are exact.
fn strict_config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = config().clone();
        c.jwt.leeway_secs = 0;
        c
    })
}

thread_local! {
    /// The built-in authorizer as the proxy builds it (it takes `&mut self`,
    /// so one per thread; the replay runs targets on several).
    static STRICT_AUTHORIZER: RefCell<JwtAuthorizer> =
        RefCell::new(JwtAuthorizer::new(strict_config()).expect("authorizer"));
    /// The same with every token source enabled.
    static ANY_SOURCE_AUTHORIZER: RefCell<JwtAuthorizer> = RefCell::new({
        let mut c = strict_config().clone();
        c.token_sources = ["path", "query", "header", "cookie", "protocol"]
            .into_iter()
            .map(|n| TokenSource::parse(n).expect("a token source"))
            .collect();
        JwtAuthorizer::new(&c).expect("authorizer")
    });
}

fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        // Built from the configuration rather than field by field, so the
        // checks follow the settings as they evolve; no clock skew allowed,
        // so "expired" and "not yet valid" are exact.
        let mut jwt = config().jwt.clone();
        jwt.leeway_secs = 0;
        JwtVerifier::new(&jwt).expect("HS256 verifier")
    })
}

/// Fuzz-derived tokens, each in a client's upgrade request
/// (`/TOKEN/VMI`, percent-encoded) through `http::parse_request` and the
/// built-in authorizer, as the session runs them; and, for the exact
/// answers, the verifier alone. See the input forms above.
pub fn token(data: &[u8], _depth: Depth) {
    let text = String::from_utf8_lossy(data);
    if let Some(rest) = text.strip_prefix("model\n") {
        token_model(rest);
    } else if let Some(rest) = text.strip_prefix("sign\n") {
        let mut lines = rest.splitn(3, '\n');
        let header = lines.next().unwrap_or_default();
        let claims = lines.next().unwrap_or_default();
        let vmi = lines.next().unwrap_or_default();
        let token = sign(header, claims);
        let _ = check_authorize(&token, vmi);
        check_token_request(&token, vmi);
    } else {
        let (token, vmi) = text.split_once('\n').unwrap_or((&text, "ubuntu"));
        check_token_request(token, vmi);
        if check_authorize(token, vmi).is_ok() {
            // Only a token carrying our own HMAC of its first two parts, in
            // canonical base64url, can be accepted.
            let (signed, sig) = token.rsplit_once('.').expect("three parts");
            assert_eq!(signed.matches('.').count(), 1, "three parts: {token:?}");
            assert_eq!(
                sig,
                base64url(&hmac_sha256(SECRET, signed.as_bytes())),
                "accepted a signature that is not ours"
            );
        }
    }
}

/// Authorize and check what every answer must satisfy.
fn check_authorize(token: &str, vmi: &str) -> Result<auth::Grant, AuthError> {
    let fp = auth::fingerprint(token);
    assert!(
        fp.len() == 8
            && fp
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(fp, auth::fingerprint(token));
    let result = verifier().authorize(token, vmi);
    match &result {
        Ok(g) => {
            check_grant_for_session(g);
            assert_eq!(g.vmi, vmi, "granted another vmi than asked for");
            // The names cannot change the shape of the upstream URL.
            let path = config().upstream_path(&g.namespace, &g.vmi);
            assert!(
                !path.contains("..")
                    && !path.contains("//")
                    && !path.contains(|c: char| "?#% \\".contains(c) || c.is_control()),
                "upstream path {path:?}"
            );
        }
        Err(e) => {
            assert!(matches!(e.status().code(), 401 | 403), "{e:?}");
            let shown = e.to_string();
            assert!(!shown.is_empty());
            // A refusal never echoes the token (it is logged).
            // (A JWT has dots; the fixed messages have none, so a
            // fuzzed "token" that merely spells out a message is no echo.)
            if token.len() >= 16 && token.contains('.') {
                assert!(!shown.contains(token), "refusal echoes the token");
            }
        }
    }
    result
}

fn token_model(rest: &str) {
    let mut lines = rest.split('\n');
    let mut next = || lines.next().unwrap_or_default();
    let (ns, allowed, vmi, flags, id) = (next(), next(), next(), next(), next());
    let allowed: Vec<&str> = allowed.split(',').collect();
    let (no_exp, expired, future) = (
        flags.contains('e'),
        flags.contains('x'),
        flags.contains('n'),
    );
    let mut claims = String::from("{");
    if flags.contains('s') {
        claims.push_str(&format!("\"id\":{},", json_string(id)));
    } else if let Ok(n) = id.parse::<u64>() {
        claims.push_str(&format!("\"id\":{n},"));
    }
    let fraction = if flags.contains('f') { ".25" } else { "" };
    if !no_exp {
        let exp = if expired { EXP_PAST } else { EXP_VALID };
        claims.push_str(&format!("\"exp\":{exp}{fraction},"));
    }
    if future && !no_exp && !expired {
        claims.push_str(&format!("\"nbf\":{EXP_VALID},"));
    }
    let list: Vec<String> = allowed.iter().map(|v| json_string(v)).collect();
    claims.push_str(&format!(
        "\"lab_instance\":{{\"lab_id\":1,\"lab_instance_id\":9,\"namespace_name\":{},\"allowed_vmi_names\":[{}],\"additional_data\":null}}}}",
        json_string(ns),
        list.join(",")
    ));
    let token = sign(r#"{"alg":"HS256","typ":"JWT"}"#, &claims);
    // The request's decision agrees with the verifier (check_decision),
    // and the verifier with the model (below).
    check_token_request(&token, vmi);
    let got = check_authorize(&token, vmi);
    let ok = || -> bool {
        route::is_dns1123_subdomain(vmi) && allowed.contains(&vmi) && route::is_dns1123_label(ns)
    };
    let fits = match &got {
        _ if no_exp => matches!(got, Err(AuthError::Malformed(_))),
        _ if expired => got == Err(AuthError::Expired),
        _ if future => got == Err(AuthError::NotYetValid),
        Ok(g) => {
            let want_id = if flags.contains('s') {
                id.to_owned()
            } else {
                id.parse::<u64>()
                    .map_or_else(|_| "-".to_owned(), |n| n.to_string())
            };
            let exp = Duration::from_secs(EXP_VALID)
                + Duration::from_millis(if fraction.is_empty() { 0 } else { 250 });
            ok() && g.namespace == ns && g.token_id == want_id && g.expires_at == UNIX_EPOCH + exp
        }
        Err(AuthError::Forbidden(_)) => !ok(),
        Err(_) => false,
    };
    assert!(fits, "claims {claims} for vmi {vmi:?} gave {got:?}");
}

/// `token` and `vmi` in the path of a browser's upgrade request, parsed and
/// authorized as the session does it.
fn check_token_request(token: &str, vmi: &str) {
    let target = format!("/{}/{}", path_segment(token), path_segment(vmi));
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: proxy.example\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {UPSTREAM_KEY}\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: https://lab.example\r\n\r\n"
    );
    match http::parse_request(head.as_bytes(), head.len() + 1) {
        Ok(Some(Request::Upgrade(req))) => {
            assert_eq!(req.target, target);
            let decision = check_decision(&req);
            if token.is_empty() || vmi.is_empty() {
                assert!(
                    matches!(&decision, Decision::Deny { refusal, .. } if refusal.status == Status::NotFound)
                );
            }
        }
        other => panic!("a browser's upgrade for {target:?} parsed as {other:?}"),
    }
}

/// Percent-encode everything but unreserved characters, so the route
/// decodes exactly `s` back.
fn path_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON string literal for any text.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An HS256 JWS over the given header and claims text.
pub fn sign(header: &str, claims: &str) -> String {
    let signed = format!(
        "{}.{}",
        base64url(header.as_bytes()),
        base64url(claims.as_bytes())
    );
    let sig = base64url(&hmac_sha256(SECRET, signed.as_bytes()));
    format!("{signed}.{sig}")
}

// ---------------------------------------------------------------------------
// Small independent primitives: base64 and HMAC-SHA-256 (FIPS 180-4, RFC 2104).

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Unpadded base64url.
pub fn base64url(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            let c = B64[(n >> (18 - 6 * i) & 63) as usize];
            out.push(match c {
                b'+' => '-',
                b'/' => '_',
                c => char::from(c),
            });
        }
    }
    out
}

/// Padded standard base64, strict about length and padding.
fn base64_decode_standard(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for &c in &b[..b.len() - pad] {
        let v = B64.iter().position(|&x| x == c)? as u32;
        bits = bits << 6 | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&(data.len() as u64 * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K256[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// HMAC-SHA-256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha256(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}
