//! Session events, for audit, billing, metrics and the access log, without
//! parsing logs. Observers run on the event loop: they must not block.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::Status;

/// The `log` target of access lines.
pub const ACCESS_TARGET: &str = "access";

/// How a relayed session ended, in one word: what `/metrics` counts
/// sessions by and the access line's `end`. `outcome` says the same in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SessionEnd {
    /// A close frame went each way.
    Normal,
    /// A side dropped TCP, failed, or left before the relay began, without
    /// a closing handshake.
    Abnormal,
    /// A side broke RFC 6455 (or sent a frame over `MAX_FRAME_SIZE`).
    Violation,
    /// A side stopped answering pings, or the closing handshake timed out.
    Timeout,
    /// The token expired (`CLOSE_ON_TOKEN_EXPIRY`).
    TokenExpired,
    /// The proxy shut down.
    Shutdown,
}

impl SessionEnd {
    /// Every kind, in the order `/metrics` lists them.
    pub const ALL: [SessionEnd; 6] = [
        SessionEnd::Normal,
        SessionEnd::Abnormal,
        SessionEnd::Violation,
        SessionEnd::Timeout,
        SessionEnd::TokenExpired,
        SessionEnd::Shutdown,
    ];

    /// The word for it (a metrics label value, the access line's `end`).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Normal => "normal",
            SessionEnd::Abnormal => "abnormal",
            SessionEnd::Violation => "violation",
            SessionEnd::Timeout => "timeout",
            SessionEnd::TokenExpired => "token_expired",
            SessionEnd::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The upstream accepted and the client got its 101: frames flow.
    #[non_exhaustive]
    Opened {
        /// Session id (as in log lines).
        id: u64,
        /// Client address.
        peer: SocketAddr,
        /// Namespace of the VMI.
        namespace: String,
        /// The VMI.
        vmi: String,
        /// The token's `id` claim (or the custom authorizer's label).
        token_id: String,
        /// From accept to the client's 101.
        handshake: Duration,
        /// From starting to dial to the upstream's 101.
        upstream_dial: Duration,
    },
    /// The request was refused before any frame was relayed.
    #[non_exhaustive]
    Refused {
        /// Session id.
        id: u64,
        /// Client address.
        peer: SocketAddr,
        /// The HTTP status (or the status behind a 44xx/45xx close code).
        status: Status,
        /// The reason sent to the client.
        reason: String,
        /// The VMI the request asked for, when known (the route was read).
        vmi: Option<String>,
        /// The namespace of the token's lab instance, when known (from a
        /// token whose signature verified, or a grant). Never the token.
        namespace: Option<String>,
        /// Context for the operator only (e.g. token fingerprint and id).
        detail: Option<String>,
    },
    /// A session that relayed frames ended.
    #[non_exhaustive]
    Closed {
        /// Session id.
        id: u64,
        /// Client address.
        peer: SocketAddr,
        /// Namespace of the VMI.
        namespace: String,
        /// The VMI.
        vmi: String,
        /// The token's `id` claim.
        token_id: String,
        /// How it ended, in one word.
        end: SessionEnd,
        /// How it ended, in words.
        outcome: String,
        /// From accept to the end.
        duration: Duration,
        /// Bytes relayed client → upstream (frames, as on the wire).
        bytes_up: u64,
        /// Bytes relayed upstream → client (frames, as on the wire).
        bytes_down: u64,
        /// The close code the client sent, if it sent a close frame.
        client_close: Option<u16>,
        /// The close code the upstream sent, if it sent a close frame.
        upstream_close: Option<u16>,
    },
}

/// Receives every [`Event`]. Called on the event loop thread: return quickly.
pub trait Observer: Send {
    /// One event.
    fn on_event(&mut self, event: &Event);
}

/// How the access log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// `key=value` pairs.
    Text,
    /// One JSON object per line.
    Json,
}

/// The access log line for an event. A relayed session has two: `opened`
/// when frames start to flow (a console session may last hours, and who is
/// connected now must be visible now), and `session` when it ends, with its
/// totals; a refusal has one, `refused`.
pub(crate) fn access_line(event: &Event, format: LogFormat) -> Option<String> {
    let mut f: Vec<(&str, Field)> = Vec::new();
    match event {
        Event::Opened {
            id,
            peer,
            namespace,
            vmi,
            token_id,
            handshake,
            upstream_dial,
        } => {
            f.push(("event", Field::Str("opened".into())));
            f.push(("session", Field::Num(*id)));
            f.push(("client", Field::Str(peer.to_string())));
            f.push(("namespace", Field::Str(namespace.clone())));
            f.push(("vmi", Field::Str(vmi.clone())));
            f.push(("token_id", Field::Str(token_id.clone())));
            f.push(("handshake_ms", Field::Num(handshake.as_millis() as u64)));
            f.push((
                "upstream_dial_ms",
                Field::Num(upstream_dial.as_millis() as u64),
            ));
        }
        Event::Refused {
            id,
            peer,
            status,
            reason,
            vmi,
            namespace,
            detail,
        } => {
            let known =
                |v: &Option<String>| v.as_ref().map_or(Field::Null, |s| Field::Str(s.clone()));
            f.push(("event", Field::Str("refused".into())));
            f.push(("session", Field::Num(*id)));
            f.push(("client", Field::Str(peer.to_string())));
            f.push(("status", Field::Num(u64::from(status.code()))));
            f.push(("reason", Field::Str(reason.clone())));
            f.push(("namespace", known(namespace)));
            f.push(("vmi", known(vmi)));
            if let Some(d) = detail {
                f.push(("detail", Field::Str(d.clone())));
            }
        }
        Event::Closed {
            id,
            peer,
            namespace,
            vmi,
            token_id,
            end,
            outcome,
            duration,
            bytes_up,
            bytes_down,
            client_close,
            upstream_close,
        } => {
            f.push(("event", Field::Str("session".into())));
            f.push(("session", Field::Num(*id)));
            f.push(("client", Field::Str(peer.to_string())));
            f.push(("namespace", Field::Str(namespace.clone())));
            f.push(("vmi", Field::Str(vmi.clone())));
            f.push(("token_id", Field::Str(token_id.clone())));
            f.push(("end", Field::Str(end.as_str().into())));
            f.push(("outcome", Field::Str(outcome.clone())));
            f.push(("duration_ms", Field::Num(duration.as_millis() as u64)));
            f.push(("bytes_up", Field::Num(*bytes_up)));
            f.push(("bytes_down", Field::Num(*bytes_down)));
            f.push((
                "client_close",
                client_close.map_or(Field::Null, |c| Field::Num(c.into())),
            ));
            f.push((
                "upstream_close",
                upstream_close.map_or(Field::Null, |c| Field::Num(c.into())),
            ));
        }
    }
    let mut out = String::new();
    match format {
        LogFormat::Json => {
            out.push('{');
            for (i, (k, v)) in f.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "\"{k}\":");
                match v {
                    Field::Str(s) => out.push_str(&json_string(s)),
                    Field::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Field::Null => out.push_str("null"),
                }
            }
            out.push('}');
        }
        LogFormat::Text => {
            for (i, (k, v)) in f.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                let _ = match v {
                    Field::Str(s) => write!(out, "{k}={}", text_value(s)),
                    Field::Num(n) => write!(out, "{k}={n}"),
                    Field::Null => write!(out, "{k}=-"),
                };
            }
        }
    }
    Some(out)
}

enum Field {
    Str(String),
    Num(u64),
    Null,
}

/// A JSON string literal (also used to quote text-format values), in which
/// no control character is left raw: serde_json escapes only U+0000 to
/// U+001F, and DEL or a C1 control (U+009B is CSI, which a terminal may obey
/// as it does ESC [) would reach whoever reads the log; U+2028 and U+2029
/// break lines in some viewers.
pub(crate) fn json_string(s: &str) -> String {
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    if !quoted.contains(breaks_a_line) {
        return quoted;
    }
    let mut out = String::with_capacity(quoted.len() + 16);
    for c in quoted.chars() {
        if breaks_a_line(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// A character that must not reach a log line as it is: a control
/// character, or a line or paragraph separator.
fn breaks_a_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A VMI name for a log field, when it is one (a DNS-1123 subdomain): what
/// a request asked for is logged only if it cannot be anything else, such
/// as a token in the wrong path segment (a JWT has upper-case letters).
pub(crate) fn vmi_field(name: &str) -> Option<String> {
    crate::route::is_dns1123_subdomain(name).then(|| name.to_owned())
}

/// A namespace for a log field, when it is one (a DNS-1123 label).
pub(crate) fn namespace_field(name: &str) -> Option<String> {
    crate::route::is_dns1123_label(name).then(|| name.to_owned())
}

/// A value for a text log line: as it is when it is a plain word, else a
/// JSON string literal, so that a space, a quote, `=` or a control character
/// (a CRLF in a token's `id`) can neither split a record nor forge a field.
pub(crate) fn text_value(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() || s.contains(|c: char| breaks_a_line(c) || matches!(c, ' ' | '"' | '=')) {
        json_string(s).into()
    } else {
        s.into()
    }
}

/// Writes one log record as one JSON line, as the binary writes every
/// record with `LOG_FORMAT=json`: `ts` (RFC 3339, UTC, milliseconds),
/// `level` (`ERROR`, `WARN`, `INFO`, `DEBUG`), `target`, then either the
/// fields of an access line (target [`ACCESS_TARGET`], whose message is
/// already a JSON object) or `msg`. Every kind of line goes through here, so
/// their envelopes cannot drift apart.
pub fn write_json_record(
    out: &mut impl std::io::Write,
    ts: SystemTime,
    level: log::Level,
    target: &str,
    msg: &str,
) -> std::io::Result<()> {
    write!(
        out,
        "{{\"ts\":\"{}\",\"level\":\"{level}\",\"target\":{}",
        Rfc3339(ts),
        json_string(target)
    )?;
    let fields = msg
        .strip_prefix('{')
        .filter(|f| target == ACCESS_TARGET && f.len() > 1 && f.ends_with('}'));
    match fields {
        Some(fields) => writeln!(out, ",{fields}"),
        None => writeln!(out, ",\"msg\":{}}}", json_string(msg)),
    }
}

/// A time in RFC 3339, UTC, with milliseconds: `2025-01-31T08:15:02.123Z`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let s = secs % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            s / 3600,
            s % 3600 / 60,
            s % 60,
            since.subsec_millis()
        )
    }
}

/// Year, month, day of a day counted from 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The built-in observer that writes the access log through `log` (target
/// `access`, level INFO).
#[derive(Debug)]
pub struct AccessLog {
    format: LogFormat,
}

impl AccessLog {
    /// An access log in `format`.
    pub fn new(format: LogFormat) -> Self {
        AccessLog { format }
    }
}

impl Observer for AccessLog {
    fn on_event(&mut self, event: &Event) {
        // Do not build a line nobody will see (LOGLEVEL=WARNING and up).
        if !log::log_enabled!(target: ACCESS_TARGET, log::Level::Info) {
            return;
        }
        if let Some(line) = access_line(event, self.format) {
            log::info!(target: ACCESS_TARGET, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_control_character_is_left_raw_in_a_quoted_value() {
        let s = "a\r\nb\u{7f}c\u{9b}2J\u{85}d\u{2028}e";
        let q = json_string(s);
        assert_eq!(q, r#""a\r\nb\u007fc\u009b2J\u0085d\u2028e""#);
        // Still JSON, and still the same text once parsed.
        assert_eq!(serde_json::from_str::<String>(&q).unwrap(), s);
        assert_eq!(text_value("x\u{9b}y"), r#""x\u009by""#);
        assert_eq!(text_value("a\u{2028}b"), r#""a\u2028b""#);
        assert_eq!(json_string("plain é"), "\"plain é\"");
    }

    fn closed() -> Event {
        Event::Closed {
            id: 7,
            peer: "127.0.0.1:5555".parse().unwrap(),
            namespace: "lab-ns".into(),
            vmi: "ubuntu".into(),
            token_id: "5".into(),
            end: SessionEnd::Normal,
            outcome: "client close 1000, upstream close 1000".into(),
            duration: Duration::from_millis(1500),
            bytes_up: 10,
            bytes_down: 20,
            client_close: Some(1000),
            upstream_close: None,
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let line = access_line(&closed(), LogFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["client"], "127.0.0.1:5555");
        assert_eq!(v["vmi"], "ubuntu");
        assert_eq!(v["namespace"], "lab-ns");
        assert_eq!(v["token_id"], "5");
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(v["bytes_up"], 10);
        assert_eq!(v["bytes_down"], 20);
        assert_eq!(v["client_close"], 1000);
        assert!(v["upstream_close"].is_null());
    }

    #[test]
    fn an_opened_line_names_the_session_before_it_ends() {
        let opened = Event::Opened {
            id: 7,
            peer: "127.0.0.1:5555".parse().unwrap(),
            namespace: "lab-ns".into(),
            vmi: "ubuntu".into(),
            token_id: "5".into(),
            handshake: Duration::from_millis(12),
            upstream_dial: Duration::from_millis(3),
        };
        let line = access_line(&opened, LogFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "opened");
        assert_eq!(v["session"], 7);
        assert_eq!(v["client"], "127.0.0.1:5555");
        assert_eq!(v["namespace"], "lab-ns");
        assert_eq!(v["vmi"], "ubuntu");
        assert_eq!(v["token_id"], "5");
        assert_eq!(v["handshake_ms"], 12);
        assert_eq!(v["upstream_dial_ms"], 3);
        let text = access_line(&opened, LogFormat::Text).unwrap();
        assert_eq!(
            text,
            "event=opened session=7 client=127.0.0.1:5555 namespace=lab-ns vmi=ubuntu token_id=5 handshake_ms=12 upstream_dial_ms=3"
        );
    }

    #[test]
    fn text_lines_quote_what_needs_it() {
        let line = access_line(&closed(), LogFormat::Text).unwrap();
        assert!(
            line.starts_with("event=session session=7 client=127.0.0.1:5555"),
            "{line}"
        );
        assert!(
            line.contains("outcome=\"client close 1000, upstream close 1000\""),
            "{line}"
        );
        assert!(line.contains("upstream_close=-"), "{line}");
    }

    #[test]
    fn a_line_break_in_a_token_id_cannot_split_a_record() {
        let mut event = closed();
        if let Event::Closed { token_id, .. } = &mut event {
            *token_id = "x\r\nINFO forged".into();
        }
        let line = access_line(&event, LogFormat::Text).unwrap();
        assert!(!line.contains(['\r', '\n']), "{line}");
        assert!(line.contains(r#"token_id="x\r\nINFO forged""#), "{line}");
        assert_eq!(text_value("user-17"), "user-17");
        assert_eq!(text_value("a\tb"), r#""a\tb""#);
        assert_eq!(text_value(""), "\"\"");
    }

    fn refused(vmi: Option<&str>, namespace: Option<&str>) -> Event {
        Event::Refused {
            id: 8,
            peer: "127.0.0.1:5556".parse().unwrap(),
            status: Status::Forbidden,
            reason: "VMI 'other' not allowed".into(),
            vmi: vmi.map(str::to_owned),
            namespace: namespace.map(str::to_owned),
            detail: Some("token ba7816bf, id 5".into()),
        }
    }

    #[test]
    fn a_refusal_names_the_vmi_and_namespace_asked_for() {
        let line = access_line(&refused(Some("other"), Some("lab-ns")), LogFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "refused");
        assert_eq!(v["status"], 403);
        assert_eq!(v["vmi"], "other");
        assert_eq!(v["namespace"], "lab-ns");
        assert_eq!(v["detail"], "token ba7816bf, id 5");
        // Unknown is null, not absent: every refusal line has both fields.
        let line = access_line(&refused(None, None), LogFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["vmi"].is_null() && v["namespace"].is_null(), "{v}");
        let text = access_line(&refused(Some("other"), None), LogFormat::Text).unwrap();
        assert!(text.contains(" namespace=- vmi=other detail="), "{text}");
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |secs: u64, ms: u64| {
            Rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms)).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_796_235_120, 439), "2026-12-02T18:12:00.439Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn every_json_record_has_the_same_envelope() {
        let ts = UNIX_EPOCH + Duration::from_millis(1_796_235_120_439);
        let record = |level, target, msg: &str| {
            let mut out = Vec::new();
            write_json_record(&mut out, ts, level, target, msg).unwrap();
            let line = String::from_utf8(out).unwrap();
            assert!(
                line.ends_with('\n') && line.matches('\n').count() == 1,
                "{line:?}"
            );
            serde_json::from_str::<serde_json::Value>(&line).unwrap()
        };
        let info = record(
            log::Level::Info,
            "kubevirt_vnc_proxy",
            "listening on 127.0.0.1:5001",
        );
        assert_eq!(
            info,
            serde_json::json!({"ts": "2026-12-02T18:12:00.439Z", "level": "INFO",
                "target": "kubevirt_vnc_proxy", "msg": "listening on 127.0.0.1:5001"})
        );
        // An access line keeps its fields, inside the same envelope.
        let line = access_line(&closed(), LogFormat::Json).unwrap();
        let access = record(log::Level::Info, ACCESS_TARGET, &line);
        assert_eq!(access["ts"], "2026-12-02T18:12:00.439Z");
        assert_eq!(access["level"], "INFO");
        assert_eq!(access["target"], "access");
        assert_eq!(access["event"], "session");
        assert_eq!(access["bytes_down"], 20);
        let line = access_line(&refused(Some("other"), Some("lab-ns")), LogFormat::Json).unwrap();
        let refusal = record(log::Level::Info, ACCESS_TARGET, &line);
        assert_eq!(
            (refusal["level"].as_str(), refusal["event"].as_str()),
            (Some("INFO"), Some("refused"))
        );
        assert_eq!(refusal["vmi"], "other");
        // Anything else is a message, even under the access target.
        let warn = record(log::Level::Warn, ACCESS_TARGET, "not {json");
        assert_eq!(
            (warn["level"].as_str(), warn["msg"].as_str()),
            (Some("WARN"), Some("not {json"))
        );
        let odd = record(log::Level::Error, "x\ny", "a \"quoted\"\r\nline");
        assert_eq!(odd["msg"], "a \"quoted\"\r\nline");
    }
}
