//! Session events, for audit, billing, metrics and the access log, without
//! parsing logs. Observers run on the event loop: they must not block.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The upstream accepted and the client got its 101: frames flow.
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
    Refused {
        /// Session id.
        id: u64,
        /// Client address.
        peer: SocketAddr,
        /// The HTTP status (or the status behind a 44xx/45xx close code).
        status: u16,
        /// The reason sent to the client.
        reason: String,
        /// Context for the operator only (e.g. token fingerprint and id).
        detail: Option<String>,
    },
    /// A session that relayed frames ended.
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
pub enum LogFormat {
    /// `key=value` pairs.
    Text,
    /// One JSON object per line.
    Json,
}

/// The access log line for an event (`None` for events that have none:
/// `Opened` is logged when the session ends, as one line).
pub fn access_line(event: &Event, format: LogFormat) -> Option<String> {
    let mut f: Vec<(&str, Field)> = Vec::new();
    match event {
        Event::Opened { .. } => return None,
        Event::Refused {
            id,
            peer,
            status,
            reason,
            detail,
        } => {
            f.push(("event", Field::Str("refused".into())));
            f.push(("session", Field::Num(*id)));
            f.push(("client", Field::Str(peer.to_string())));
            f.push(("status", Field::Num(u64::from(*status))));
            f.push(("reason", Field::Str(reason.clone())));
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

/// A JSON string literal (also used to quote text-format values).
pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A value for a text log line: as it is when it is a plain word, else a
/// JSON string literal, so that a space, a quote, `=` or a control character
/// (a CRLF in a token's `id`) can neither split a record nor forge a field.
pub fn text_value(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() || s.contains(|c: char| c.is_control() || matches!(c, ' ' | '"' | '=')) {
        json_string(s).into()
    } else {
        s.into()
    }
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
        if !log::log_enabled!(target: "access", log::Level::Info) {
            return;
        }
        if let Some(line) = access_line(event, self.format) {
            log::info!(target: "access", "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> Event {
        Event::Closed {
            id: 7,
            peer: "127.0.0.1:5555".parse().unwrap(),
            namespace: "lab-ns".into(),
            vmi: "ubuntu".into(),
            token_id: "5".into(),
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
}
