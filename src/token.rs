//! Where a request's token comes from. Browsers cannot set headers on a
//! WebSocket, so besides the path (the compatible default) the token may
//! travel in the query, a cookie, or a subprotocol; non-browser clients may
//! use `Authorization: Bearer`. Pure functions, no I/O.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::http::BEARER_PROTOCOL_PREFIX;
use crate::route::percent_decode;

/// One way a token can travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenSource {
    /// `/[PREFIX/]TOKEN/VMI` (LabOrchestrator's contract).
    Path,
    /// `?token=…`.
    Query,
    /// `Authorization: Bearer …`.
    Header,
    /// A cookie (name configurable).
    Cookie,
    /// Subprotocol `base64url.bearer.authorization.k8s.io.<base64url(token)>`.
    Protocol,
}

impl TokenSource {
    /// Parse a `TOKEN_SOURCES` entry.
    pub fn parse(name: &str) -> Option<TokenSource> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "path" => TokenSource::Path,
            "query" => TokenSource::Query,
            "header" | "authorization" => TokenSource::Header,
            "cookie" => TokenSource::Cookie,
            "protocol" | "subprotocol" => TokenSource::Protocol,
            _ => return None,
        })
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenSource::Path => "path",
            TokenSource::Query => "query",
            TokenSource::Header => "header",
            TokenSource::Cookie => "cookie",
            TokenSource::Protocol => "protocol",
        })
    }
}

/// What the request carries that could hold a token (besides the path).
#[derive(Debug, Default, Clone, Copy)]
pub struct Carriers<'a> {
    /// The raw query string.
    pub query: Option<&'a str>,
    /// The `Authorization` header value.
    pub authorization: Option<&'a str>,
    /// Every `Cookie` header value.
    pub cookies: &'a [&'a str],
    /// The offered subprotocols.
    pub protocols: &'a [String],
}

/// Find the token in the enabled non-path sources, in the order
/// header, protocol, query, cookie (most deliberate first). `None`: no
/// enabled source carries one.
pub fn find_token(sources: &[TokenSource], c: &Carriers<'_>, cookie_name: &str) -> Option<String> {
    let enabled = |s| sources.contains(&s);
    if enabled(TokenSource::Header)
        && let Some(t) = c.authorization.and_then(bearer)
    {
        return Some(t);
    }
    if enabled(TokenSource::Protocol)
        && let Some(t) = c.protocols.iter().find_map(|p| from_protocol(p))
    {
        return Some(t);
    }
    if enabled(TokenSource::Query)
        && let Some(t) = c.query.and_then(|q| query_value(q, "token"))
    {
        return Some(t);
    }
    if enabled(TokenSource::Cookie)
        && let Some(t) = c.cookies.iter().find_map(|h| cookie_value(h, cookie_name))
    {
        return Some(t);
    }
    None
}

fn bearer(value: &str) -> Option<String> {
    let (scheme, token) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

// A carrier whose token does not decode still carries this request's token:
// it is passed on as it came, to be refused as a malformed token (401 with
// that reason), not taken for no token at all ("token missing"). Neither a
// '%' nor a protocol's base64 survives the JWT parser.

fn from_protocol(p: &str) -> Option<String> {
    let encoded = p.strip_prefix(BEARER_PROTOCOL_PREFIX)?;
    let token = URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .unwrap_or_else(|| encoded.to_owned());
    Some(token).filter(|t| !t.is_empty())
}

fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name)
            .then(|| percent_decode(v).unwrap_or_else(|| v.to_owned()))
            .filter(|v| !v.is_empty())
    })
}

fn cookie_value(header: &str, name: &str) -> Option<String> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k.trim() == name)
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[TokenSource] = &[
        TokenSource::Query,
        TokenSource::Header,
        TokenSource::Cookie,
        TokenSource::Protocol,
    ];

    #[test]
    fn each_carrier() {
        let none = Carriers::default();
        assert_eq!(find_token(ALL, &none, "t"), None);
        let c = Carriers {
            query: Some("a=1&token=abc%2Edef"),
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "t").as_deref(), Some("abc.def"));
        // A token that does not decode is still the request's token.
        let c = Carriers {
            query: Some("token=abc%zz"),
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "t").as_deref(), Some("abc%zz"));
        assert_eq!(find_token(&[TokenSource::Cookie], &c, "t"), None);
        let c = Carriers {
            authorization: Some("Bearer x.y.z"),
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "t").as_deref(), Some("x.y.z"));
        let c = Carriers {
            authorization: Some("Basic dXNlcg=="),
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "t"), None);
        let cookies = ["a=b; vnc_token=q.r.s; c=d"];
        let c = Carriers {
            cookies: &cookies,
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "vnc_token").as_deref(), Some("q.r.s"));
        assert_eq!(find_token(ALL, &c, "other"), None);
        let protocols = vec![
            "binary".to_string(),
            format!(
                "{BEARER_PROTOCOL_PREFIX}{}",
                URL_SAFE_NO_PAD.encode("h.p.s")
            ),
        ];
        let c = Carriers {
            protocols: &protocols,
            ..Default::default()
        };
        assert_eq!(find_token(ALL, &c, "t").as_deref(), Some("h.p.s"));
        assert_eq!(find_token(&[TokenSource::Query], &c, "t"), None);
    }

    #[test]
    fn names() {
        for s in ALL.iter().chain([TokenSource::Path].iter()) {
            assert_eq!(TokenSource::parse(&s.to_string()), Some(*s));
        }
        assert_eq!(TokenSource::parse("smoke"), None);
    }
}
