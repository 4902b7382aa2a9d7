//! The request target: `/[PREFIX/]TOKEN/VMI_NAME[?query]`.
//!
//! Pure functions only. Names are percent-decoded exactly once and then
//! compared byte for byte; the Kubernetes name rules are checked here so no
//! upstream URL is ever built from a name that could change its path.

use std::fmt;

/// Why a request target did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The path has the wrong shape or prefix (HTTP 404).
    NotFound(&'static str),
    /// A segment has broken percent-encoding or is not UTF-8 (HTTP 400).
    BadEncoding,
    /// The value of this allow-listed query parameter has broken
    /// percent-encoding or is not UTF-8 (HTTP 400).
    BadQueryValue(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NotFound(why) => f.write_str(why),
            RouteError::BadEncoding => f.write_str("malformed percent-encoding in path"),
            RouteError::BadQueryValue(name) => {
                write!(f, "malformed percent-encoding in query parameter '{name}'")
            }
        }
    }
}

/// A request target that matched one of the enabled route shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The token from `/TOKEN/VMI`, percent-decoded once; `None` for the
    /// `/VMI` shape (the token travels elsewhere).
    pub path_token: Option<String>,
    /// The VMI name, percent-decoded once (not yet checked against the rules).
    pub vmi: String,
    /// The raw query string after `?`, if any.
    pub query: Option<String>,
}

/// Split a request target: `/[PREFIX/]TOKEN/VMI` when `path_token` is
/// enabled, `/[PREFIX/]VMI` when another token source is (`vmi_only`).
pub fn parse_request_target(
    target: &str,
    prefix: Option<&str>,
    path_token: bool,
    vmi_only: bool,
) -> Result<Target, RouteError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let Some(rest) = path.strip_prefix('/') else {
        return Err(RouteError::NotFound("path must start with /"));
    };
    let mut segments = rest.split('/');
    if let Some(p) = prefix {
        // Decoded once, like the token and the name: a browser escapes what
        // a URL may not hold raw (`/lab%20consoles/` for "lab consoles").
        // A segment without escapes is its own decoding, without a copy.
        // A broken escape is a malformed request (400), here as in the
        // token or the name, not an unknown path.
        let first = segments.next().unwrap_or_default();
        let same = if first.contains('%') {
            percent_decode(first).ok_or(RouteError::BadEncoding)? == p
        } else {
            first == p
        };
        if !same {
            return Err(RouteError::NotFound("path prefix does not match"));
        }
    }
    let segments: Vec<&str> = segments.take(3).collect();
    let expected = match (path_token, vmi_only) {
        (true, true) => "expected /TOKEN/VMI_NAME or /VMI_NAME",
        (true, false) => "expected /TOKEN/VMI_NAME",
        _ => "expected /VMI_NAME",
    };
    let decode = |s: &str| percent_decode(s).ok_or(RouteError::BadEncoding);
    match segments[..] {
        [token, vmi] if path_token && !token.is_empty() && !vmi.is_empty() => Ok(Target {
            path_token: Some(decode(token)?),
            vmi: decode(vmi)?,
            query,
        }),
        [vmi] if vmi_only && !vmi.is_empty() => Ok(Target {
            path_token: None,
            vmi: decode(vmi)?,
            query,
        }),
        _ => Err(RouteError::NotFound(expected)),
    }
}

/// Decode `%XX` escapes once. `None` for a broken escape or non-UTF-8 result.
/// `+` is left alone: in a path it is a literal plus.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    // Tokens and names rarely carry escapes: then the input is the answer.
    // `contains` on bytes is a vectorized memchr; `position` would go byte
    // by byte over a token of hundreds of bytes on every session.
    if !bytes.contains(&b'%') {
        return Some(s.to_owned());
    }
    let first = bytes.iter().position(|&b| b == b'%').unwrap_or(bytes.len());
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Keep only the query parameters named in `allowed` (exact, case-sensitive
/// names, as KubeVirt reads them), decoded once and re-encoded so nothing but
/// plain `name=value` pairs reaches the upstream. What is dropped is never
/// judged (a page's `?utm=100%` must not cost the session); `Err` for an
/// allowed parameter whose value has broken escapes.
pub fn filter_query(query: &str, allowed: &[String]) -> Result<Option<String>, RouteError> {
    let mut out = String::new();
    let decode = |s: &str| percent_decode(&s.replace('+', " "));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // A name that does not decode is no allowed name.
        let Some(k) = decode(k).filter(|k| allowed.contains(k)) else {
            continue;
        };
        let v = decode(v).ok_or_else(|| RouteError::BadQueryValue(k.clone()))?;
        if !out.is_empty() {
            out.push('&');
        }
        percent_encode_into(&k, &mut out);
        out.push('=');
        percent_encode_into(&v, &mut out);
    }
    Ok((!out.is_empty()).then_some(out))
}

fn percent_encode_into(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// A Kubernetes DNS-1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
/// Namespaces must be labels.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Kubernetes DNS-1123 subdomain: at most 253 characters of dot-separated
/// labels. VMI names must be subdomains.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default shape, `/[PREFIX/]TOKEN/VMI`.
    fn parse_target(target: &str, prefix: Option<&str>) -> Result<Target, RouteError> {
        parse_request_target(target, prefix, true, false)
    }

    #[test]
    fn routes_with_and_without_prefix() {
        let r = parse_target("/tok/ubuntu?preserveSession=true", None).unwrap();
        assert_eq!(r.path_token.as_deref(), Some("tok"));
        assert_eq!(r.vmi, "ubuntu");
        assert_eq!(r.query.as_deref(), Some("preserveSession=true"));
        let r = parse_target("/vnc/tok/ubuntu", Some("vnc")).unwrap();
        assert_eq!(
            (r.path_token.as_deref(), r.vmi.as_str()),
            (Some("tok"), "ubuntu")
        );
        assert!(matches!(
            parse_target("/other/tok/ubuntu", Some("vnc")),
            Err(RouteError::NotFound(_))
        ));
        // The prefix segment is decoded once, as the others are.
        for (target, prefix) in [
            ("/lab%20consoles/tok/ubuntu", "lab consoles"),
            ("/v%6Ec/tok/ubuntu", "vnc"),
            ("/100%25/tok/ubuntu", "100%"),
        ] {
            let r = parse_target(target, Some(prefix)).unwrap();
            assert_eq!(
                (r.path_token.as_deref(), r.vmi.as_str()),
                (Some("tok"), "ubuntu")
            );
        }
        for (target, prefix) in [
            ("/lab%20consoles/tok/ubuntu", "lab%20consoles"),
            ("/100%25/tok/ubuntu", "100%25"),
        ] {
            assert!(
                matches!(
                    parse_target(target, Some(prefix)),
                    Err(RouteError::NotFound(_))
                ),
                "{target} against {prefix}"
            );
        }
        // A prefix segment that does not decode is malformed, as a token or
        // a name that does not is.
        for (target, prefix) in [
            ("/v%6/tok/ubuntu", "v%6"),
            ("/vnc%FF/tok/ubuntu", "vnc\u{FFFD}"),
            ("/%zz/tok/ubuntu", "vnc"),
        ] {
            assert_eq!(
                parse_target(target, Some(prefix)),
                Err(RouteError::BadEncoding),
                "{target} against {prefix}"
            );
        }
        for bad in ["/", "/tok", "/tok/", "//vm", "/a/b/c", "tok/vm", "/tok/vm/"] {
            assert!(
                matches!(parse_target(bad, None), Err(RouteError::NotFound(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn vmi_only_shape_for_other_token_sources() {
        let t = parse_request_target("/p/ubuntu?token=x", Some("p"), false, true).unwrap();
        assert_eq!((t.path_token, t.vmi.as_str()), (None, "ubuntu"));
        assert!(parse_request_target("/tok/ubuntu", None, false, true).is_err());
        assert!(parse_request_target("/ubuntu", None, true, false).is_err());
        let both = |p| parse_request_target(p, None, true, true).unwrap();
        assert_eq!(both("/tok/vm").path_token.as_deref(), Some("tok"));
        assert_eq!(both("/vm").path_token, None);
    }

    #[test]
    fn decodes_exactly_once() {
        let r = parse_target("/t/%2e%2e", None).unwrap();
        assert_eq!(r.vmi, "..");
        let r = parse_target("/t/a%252Fb", None).unwrap();
        assert_eq!(r.vmi, "a%2Fb");
        assert_eq!(parse_target("/t/%zz", None), Err(RouteError::BadEncoding));
        assert_eq!(parse_target("/t/%C3", None), Err(RouteError::BadEncoding));
        assert_eq!(percent_decode("a+b%20c").as_deref(), Some("a+b c"));
    }

    #[test]
    fn query_pass_through() {
        let allowed = vec!["preserveSession".to_string()];
        assert_eq!(
            filter_query("preserveSession=true&x=1&token=abc", &allowed)
                .unwrap()
                .as_deref(),
            Some("preserveSession=true")
        );
        assert_eq!(filter_query("x=1&y", &allowed).unwrap(), None);
        assert_eq!(
            filter_query("preserveSession=a%26b%3Dc+d", &allowed)
                .unwrap()
                .as_deref(),
            Some("preserveSession=a%26b%3Dc%20d")
        );
        assert_eq!(
            filter_query("preserve%53ession=true", &allowed)
                .unwrap()
                .as_deref(),
            Some("preserveSession=true")
        );
        assert_eq!(
            filter_query("preserveSession=%zz", &allowed),
            Err(RouteError::BadQueryValue("preserveSession".into()))
        );
        // What is dropped is not decoded, and so never refused.
        assert_eq!(
            filter_query("utm=100%&preserveSession=1&x%zz=%E9", &allowed)
                .unwrap()
                .as_deref(),
            Some("preserveSession=1")
        );
    }

    #[test]
    fn kubernetes_name_rules() {
        for ok in ["a", "ubuntu", "win-10", "a.b-c.d", &"a".repeat(63)] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert_eq!(long.len(), 254);
        for bad in [
            "",
            "Ubuntu",
            "-a",
            "a-",
            "a..b",
            ".",
            "..",
            "a.",
            "a/b",
            "a%2Fb",
            "a_b",
            &long,
            &"a".repeat(64),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        assert!(is_dns1123_label("lab-ns"));
        assert!(!is_dns1123_label("lab.ns"));
    }
}
