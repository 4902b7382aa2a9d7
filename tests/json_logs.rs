//! `LOG_FORMAT=json` through the real binary: every line is one JSON object
//! with `ts` (RFC 3339, UTC) and `level`, and each kind of line (a message,
//! and the access lines `opened`, `session` and `refused`) carries exactly
//! the fields README.md's "JSON log lines" table documents, with their types.
//! Refusals name the VMI asked for and, where a verified token says it, the
//! namespace; never the token.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{
    Behaviour as B, Binary, NS, SECRET, StandIn, raw_request, tokens, upgrade_request, ws_connect,
};
use serde_json::Value;
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");

/// README.md's "JSON log lines" table: field -> (the kinds of line it is
/// in, whether it may be absent, the JSON types it may have).
type Schema = BTreeMap<String, (BTreeSet<String>, bool, BTreeSet<&'static str>)>;

const KINDS: [&str; 4] = ["message", "opened", "session", "refused"];

fn documented_schema() -> Schema {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n### JSON log lines\n")
        .nth(1)
        .expect("README.md has a '### JSON log lines' section");
    let section = section.split("\n#").next().unwrap();
    let mut schema = Schema::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let [field, lines, types, _meaning] = cells[..] else {
            panic!("a schema row has four columns: {row}");
        };
        let field = field.trim_matches('`').to_owned();
        let optional = lines.contains("(optional)");
        let lines = lines.replace("(optional)", "");
        let kinds: BTreeSet<String> = if lines.trim() == "all" {
            KINDS.iter().map(|k| k.to_string()).collect()
        } else {
            lines.split(',').map(|k| k.trim().to_owned()).collect()
        };
        for k in &kinds {
            assert!(
                KINDS.contains(&k.as_str()),
                "unknown kind of line '{k}' in {row}"
            );
        }
        let types = types
            .split(" or ")
            .map(|t| match t.trim() {
                "string" => "string",
                "number" => "number",
                "null" => "null",
                other => panic!("unknown type '{other}' in {row}"),
            })
            .collect();
        assert!(
            schema
                .insert(field.clone(), (kinds, optional, types))
                .is_none(),
            "{field} documented twice"
        );
    }
    assert!(schema.len() > 15, "{schema:?}");
    schema
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Null => "null",
        _ => "other",
    }
}

/// `2026-12-02T18:12:00.439Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

/// Check one line against the schema for its kind; the line, parsed.
fn check(schema: &Schema, kind: &str, line: &Value) {
    let obj = line.as_object().unwrap();
    for (field, (kinds, optional, types)) in schema {
        if !kinds.contains(kind) {
            assert!(
                !obj.contains_key(field),
                "{kind} line has undocumented {field}: {line}"
            );
            continue;
        }
        match obj.get(field) {
            None => assert!(*optional, "{kind} line lacks {field}: {line}"),
            Some(v) => assert!(
                types.contains(type_of(v)),
                "{kind} line's {field} is a {}, documented as {types:?}: {line}",
                type_of(v)
            ),
        }
    }
    for key in obj.keys() {
        assert!(
            schema.contains_key(key),
            "{kind} line has undocumented {key}: {line}"
        );
    }
    let ts = line["ts"].as_str().unwrap();
    assert!(is_rfc3339_utc(ts), "ts {ts}");
    // Within a minute of now: UTC, not local time, not some other epoch.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let civil = |days: u64| {
        // The date of `days` since 1970-01-01, as the proxy should write it.
        let (mut y, mut d) = (1970, days);
        loop {
            let len = if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) {
                366
            } else {
                365
            };
            if d < len {
                break;
            }
            d -= len;
            y += 1;
        }
        (y, d)
    };
    let (year, _) = civil(now / 86_400);
    assert!(
        ts.starts_with(&format!("{year}-")),
        "ts {ts} is not this year's"
    );
    let hms = |t: &str| {
        let p: Vec<u64> = t[11..19].split(':').map(|x| x.parse().unwrap()).collect();
        p[0] * 3600 + p[1] * 60 + p[2]
    };
    let diff = (hms(ts) as i64 - (now % 86_400) as i64).rem_euclid(86_400);
    assert!(
        !(60..=86_400 - 60).contains(&diff),
        "ts {ts} is not UTC now"
    );
    assert!(
        ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&line["level"].as_str().unwrap()),
        "{line}"
    );
}

#[test]
fn every_json_line_has_ts_and_level_and_the_documented_fields() {
    let schema = documented_schema();
    let standin = StandIn::serving(B::Echo);
    let p = Binary::start(standin.addr(), &[("LOG_FORMAT", "json")]);

    // A session: opened, then session.
    let t = tokens::mint(SECRET, NS, &["echo"], tokens::now() + 600);
    let mut ws = ws_connect(p.addr, &format!("/{t}/echo")).unwrap();
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    drop(ws);
    // Refusals: a VMI the token does not allow (the namespace is the
    // verified token's), an expired token (verified, so its namespace is
    // known too), and a token that does not verify (only the VMI asked for).
    let forbidden = raw_request(p.addr, &upgrade_request(&format!("/{t}/windows"), ""));
    assert_eq!(forbidden.status, 403);
    let expired = tokens::mint(SECRET, "other-ns", &["echo"], tokens::now() - 3600);
    let answer = raw_request(p.addr, &upgrade_request(&format!("/{expired}/echo"), ""));
    assert_eq!(answer.status, 401);
    let forged = tokens::mint(
        "a-wrong-secret-that-is-32-bytes-long",
        "forged-ns",
        &["echo"],
        tokens::now() + 60,
    );
    let answer = raw_request(p.addr, &upgrade_request(&format!("/{forged}/echo"), ""));
    assert_eq!(answer.status, 401);
    // Token and VMI the wrong way round: what stands where the VMI should
    // is not a VMI name, and is not logged (it is a token).
    let answer = raw_request(p.addr, &upgrade_request(&format!("/echo/{t}"), ""));
    assert_eq!(answer.status, 401);

    let mut lines = p.startup.clone();
    // The session's line comes when the stand-in's FIN does, which may be
    // after the refusals' lines: both are waited for.
    lines.extend(p.lines_until(|l| {
        l.iter()
            .filter(|l| l.contains(r#""event":"refused""#))
            .count()
            == 4
            && l.iter().any(|l| l.contains(r#""event":"session""#))
    }));
    let mut seen = BTreeMap::<&str, Vec<Value>>::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for token in [&t, &expired, &forged] {
            assert!(!l.contains(token.as_str()), "a token in the log: {l}");
        }
        let kind = match v["event"].as_str() {
            None => "message",
            Some(e) => KINDS
                .iter()
                .find(|k| **k == e)
                .unwrap_or_else(|| panic!("undocumented kind of line {e}: {l}")),
        };
        check(&schema, kind, &v);
        seen.entry(kind).or_default().push(v);
    }
    // Every kind the README documents was seen, and looks as it says.
    for kind in KINDS {
        assert!(seen.contains_key(kind), "no {kind} line in {lines:#?}");
    }
    let startup = &seen["message"][0];
    assert_eq!(startup["level"], "INFO");
    assert_eq!(startup["target"], "kubevirt_vnc_proxy");
    assert!(
        startup["msg"]
            .as_str()
            .unwrap()
            .starts_with("listening on ")
    );
    for kind in ["opened", "session"] {
        let v = &seen[kind][0];
        assert_eq!(
            (v["level"].as_str(), v["target"].as_str()),
            (Some("INFO"), Some("access"))
        );
        assert_eq!(
            (v["namespace"].as_str(), v["vmi"].as_str()),
            (Some(NS), Some("echo")),
            "{v}"
        );
        assert_eq!(v["token_id"], "5");
    }
    // The client's close frame had no code: 1005, as documented.
    assert_eq!(seen["session"][0]["client_close"], 1005);
    let refused = &seen["refused"];
    let names = |i: usize| {
        let v = &refused[i];
        (
            v["status"].as_u64().unwrap(),
            v["namespace"].clone(),
            v["vmi"].clone(),
        )
    };
    assert_eq!(
        names(0),
        (403, Value::from(NS), Value::from("windows")),
        "{refused:#?}"
    );
    assert_eq!(
        names(1),
        (401, Value::from("other-ns"), Value::from("echo")),
        "{refused:#?}"
    );
    assert_eq!(
        names(2),
        (401, Value::Null, Value::from("echo")),
        "{refused:#?}"
    );
    assert_eq!(names(3), (401, Value::Null, Value::Null), "{refused:#?}");
    for v in refused {
        let detail = v["detail"].as_str().unwrap();
        let fp = detail
            .strip_prefix("token ")
            .and_then(|d| d.split(',').next())
            .unwrap_or_else(|| panic!("{detail}"));
        assert!(
            fp.len() == 8
                && fp
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{detail}"
        );
    }
}

#[test]
fn a_start_that_fails_reports_its_errors_as_json_lines() {
    let out = Command::new(BIN)
        .env_clear()
        .env("LOG_FORMAT", "json")
        .env("LOCAL_DEV_MODE", "true")
        .env("PORT", "70000")
        .env("WORKERS", "0")
        .env("SECRET_KY", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let schema = documented_schema();
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for v in &lines {
        check(&schema, "message", v);
    }
    let said: Vec<(&str, &str)> = lines
        .iter()
        .map(|v| (v["level"].as_str().unwrap(), v["msg"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            (
                "WARN",
                "environment variable SECRET_KY is not an option and is ignored: did you mean SECRET_KEY?"
            ),
            (
                "ERROR",
                "configuration error: PORT: '70000' is out of range 0-65535"
            ),
            (
                "ERROR",
                "configuration error: WORKERS: '0' is out of range 1-256"
            ),
            (
                "ERROR",
                "configuration error: SECRET_KEY: not set (required unless JWT_PUBLIC_KEY_FILE is set)"
            ),
        ]
    );
}
