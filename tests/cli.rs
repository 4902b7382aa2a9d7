//! The command line through the real binary: subcommands among the flags in
//! any order, every configuration error in one run (one line each, exit 2),
//! ranges named, and a warning for variables that look like ours.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// The binary with only `env` in its environment (values and arguments
/// need not be text).
fn run<V: AsRef<std::ffi::OsStr>>(env: &[(&str, V)], args: &[V]) -> Output {
    Command::new(BIN)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const LOCAL: &[(&str, &str)] = &[("SECRET_KEY", SECRET), ("LOCAL_DEV_MODE", "true")];

/// A fresh directory for this test process's files, named after `what`.
fn scratch_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvp-cli-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `check-config` with [`LOCAL`] and `extra`: its exit status and its standard error.
fn check_config(extra: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = run(&[LOCAL, extra].concat(), &["check-config"]);
    (out.status.code(), text(&out.stderr))
}

#[test]
fn a_subcommand_may_come_after_the_flags() {
    for args in [
        &["--port", "5002", "check-config"][..],
        &["check-config", "--port", "5002"],
        &["--port=5002", "check-config", "--host", "127.0.0.1"],
    ] {
        let out = run(LOCAL, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).starts_with("configuration ok"),
            "{args:?}"
        );
    }
    // The flags are still read: a bad one after the subcommand, or before.
    for args in [
        &["--port", "x", "check-config"][..],
        &["check-config", "--port", "x"],
    ] {
        let out = run(LOCAL, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            text(&out.stderr),
            "configuration error: PORT: 'x' is not a valid number\n"
        );
    }
    // token, after a flag it shares with the proxy.
    let out = run(
        &[],
        &[
            "--secret-key",
            SECRET,
            "token",
            "--vmi",
            "ubuntu",
            "--namespace",
            "ns",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim().matches('.').count(), 2, "a JWT");
    // The usage line says where subcommands go.
    let help = text(&run(&[], &["--help"]).stdout);
    let usage = help.lines().find(|l| l.starts_with("USAGE:")).unwrap();
    assert!(
        usage.contains("kubevirt-vnc-proxy [check-config] [OPTIONS]"),
        "{usage}"
    );
    assert!(
        help.contains("kubevirt-vnc-proxy token [TOKEN OPTIONS]"),
        "{help}"
    );
}

#[test]
fn every_configuration_error_is_reported_at_once() {
    let mut env = LOCAL.to_vec();
    env.extend([
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("SHUTDOWN_GRACE_SECONDS", "soon"),
        ("REJECT_WITH", "silence"),
    ]);
    let expected = "configuration error: --bogus: unknown argument (see --help)\n\
                    configuration error: PORT: '70000' is out of range 0-65535\n\
                    configuration error: WORKERS: '0' is out of range 1-256\n\
                    configuration error: REJECT_WITH: 'silence' is not http or close\n\
                    configuration error: SHUTDOWN_GRACE_SECONDS: 'soon' is not a valid number\n\
                    configuration error: MAX_REQUEST_HEAD_BYTES: '100' is out of range 512-1048576\n";
    let args = ["--bogus", "--max-request-head-bytes", "100"];
    let check: Vec<&str> = std::iter::once("check-config").chain(args).collect();
    let out = run(&env, &check);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), expected);
    // A normal start says the same, and does not listen.
    let out = run(&env, &args);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), expected);
}

#[test]
fn variables_that_look_like_ours_are_warned_about_at_start() {
    let env = [
        ("SECRET_KEY", SECRET),
        ("LOCAL_DEV_MODE", "true"),
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("SHUTDOWN_GRACE", "2"),
        ("PING_INTERVAL", "5"),
        ("LOG_LEVEL", "DEBUG"),
        // Nothing to say about these.
        ("PATH", "/usr/bin:/bin"),
        ("HOME", "/root"),
        ("HOSTNAME", "proxy-7d9f"),
        ("RUST_LOG", "info"),
        ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
        ("KUBERNETES_PORT_443_TCP_PORT", "443"),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
        ("KUBEVIRT_VNC_PROXY_SERVICE_HOST", "10.96.7.7"),
        ("KUBEVIRT_VNC_PROXY_PORT", "tcp://10.96.7.7:5001"),
    ];
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let listening = line.contains("listening on ");
        lines.push(line);
        if listening || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warnings: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains(" WARN "))
        .map(|l| l.split("] ").nth(1).unwrap())
        .collect();
    assert_eq!(
        warnings,
        [
            "environment variable LOG_LEVEL is not an option and is ignored: did you mean LOGLEVEL?",
            "environment variable PING_INTERVAL is not an option and is ignored: did you mean PING_INTERVAL_SECONDS?",
            "environment variable SHUTDOWN_GRACE is not an option and is ignored: did you mean SHUTDOWN_GRACE_SECONDS?",
        ],
        "{lines:#?}"
    );
    assert!(
        lines.last().unwrap().contains("listening on "),
        "{lines:#?}"
    );
    // check-config says so too, and the configuration is still fine.
    let out = run(&env, &["check-config"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("warning: environment variable "))
            .count(),
        3,
        "{}",
        text(&out.stderr)
    );
    // When the start fails, the warnings come first: they may explain it.
    let out = run(&[("SECRET_KY", SECRET), ("LOCAL_DEV_MODE", "true")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "warning: environment variable SECRET_KY is not an option and is ignored: did you mean SECRET_KEY?\n\
         configuration error: SECRET_KEY: not set (required unless JWT_PUBLIC_KEY_FILE is set)\n"
    );
}

#[test]
fn a_stray_argument_is_named_by_its_position_never_echoed() {
    // A secret pasted where a flag was meant (a missing `--secret-key`)
    // must not reach a terminal, a log or a CI transcript.
    let secret = "s3cr3t-pasted-in-the-wrong-place";
    let stray = "configuration error: command line: unexpected argument 3 (not shown: it may be a secret; see --help)\n";
    for args in [
        &["--port", "0", secret][..],
        &["--port", "0", secret, "check-config"],
    ] {
        let out = run(LOCAL, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(text(&out.stderr), stray, "{args:?}");
        assert!(!text(&out.stdout).contains(secret));
    }
    // With other mistakes: the command line's first, then the settings,
    // all in one run.
    let out = run(LOCAL, &["check-config", "--workers", "0", secret]);
    assert_eq!(
        text(&out.stderr),
        "configuration error: command line: unexpected argument 4 (not shown: it may be a secret; see --help)\n\
         configuration error: WORKERS: '0' is out of range 1-256\n"
    );
    // A near miss of a subcommand is no secret: named, with the one meant.
    let out = run(LOCAL, &["chek-config", "--port", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "configuration error: chek-config: unknown argument; did you mean check-config? (see --help)\n"
    );
    // A flag's value is a value, whatever it looks like, and --help wins
    // over any mistake.
    let out = run(
        LOCAL,
        &["check-config", "--api-path", "/x/{namespace}/{vmi_name}"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&[], &["--bogus", secret, "-h"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("kubevirt-vnc-proxy: "));
}

#[test]
fn token_names_a_stray_argument_by_its_position_too() {
    let secret = "s3cr3t-pasted-in-the-wrong-place";
    for (args, position) in [
        (&["token", "--vmi", "a", "--namespace", "ns", secret][..], 6),
        (&["--vmi", "a", "token", secret, "--namespace", "ns"], 4),
    ] {
        let out = run(&[("SECRET_KEY", SECRET)], args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "token: unexpected argument {position} (not shown: it may be a secret)\n"
            )),
            "{err}"
        );
        assert!(!err.contains(secret) && !text(&out.stdout).contains(secret));
    }
}

#[test]
fn a_value_that_is_not_text_is_named_never_shown_and_never_a_panic() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;
    // Bytes that are no UTF-8 around a would-be secret: the standard
    // library's env::vars() and env::args() panicked on them, printing
    // the value.
    let bad = OsStr::from_bytes(b"s3cr3t-\xff-pasted");
    let secret = OsStr::new(SECRET);
    let local = OsStr::new("true");
    let check = OsStr::new("check-config");
    // An option's variable: named, exit 2, and not also called missing.
    let out = run(&[("SECRET_KEY", bad), ("LOCAL_DEV_MODE", local)], &[check]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "configuration error: SECRET_KEY: not valid UTF-8 (not shown: it may be a secret)\n"
    );
    // Any other variable is none of ours: left alone.
    let out = run(
        &[
            ("SECRET_KEY", secret),
            ("LOCAL_DEV_MODE", local),
            ("SOMEONE_ELSES", bad),
        ],
        &[check],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // An argument: by its place.
    let out = run(
        &[("SECRET_KEY", secret), ("LOCAL_DEV_MODE", local)],
        &[check, OsStr::new("--port"), bad],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "configuration error: command line: argument 3 is not valid UTF-8 (not shown: it may be a secret)\n"
    );
}

#[test]
fn a_password_in_ws_remote_url_is_refused_and_never_echoed() {
    for url in [
        "ws://admin:hunter2@127.0.0.1:8001",
        "ws://admin:hunter2@127.0.0.1",
        "http://admin:hunter2@127.0.0.1",
        // A '/' in the password: the authority seems to end inside it.
        "ws://admin:hun/ter2@127.0.0.1:8001",
        "ws://admin:1234/hunter2@127.0.0.1:8001",
    ] {
        let env = [LOCAL, &[("WS_REMOTE_URL", url)]].concat();
        let out = run(&env, &["check-config"]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{url}: {stdout}{stderr}");
        assert!(
            stderr.starts_with("configuration error: WS_REMOTE_URL: "),
            "{stderr}"
        );
        assert!(
            stderr.contains("must not contain '@'"),
            "{url}: the reason is given: {stderr}"
        );
        assert!(
            !stderr.contains("hun") && !stdout.contains("hun") && !stderr.contains("admin"),
            "{url}: {stderr}"
        );
    }
}

/// A ':' short after an IPv6 address was port 80 with the rest ignored, and the proxy dialed it.
#[test]
fn a_port_without_its_colon_after_an_ipv6_address_is_refused() {
    assert_eq!(
        check_config(&[("WS_REMOTE_URL", "ws://[::1]8001")]),
        (
            Some(2),
            "configuration error: WS_REMOTE_URL: '8001' after ']' is not ':PORT'\n".into()
        )
    );
}

#[test]
fn a_space_or_line_break_in_ws_remote_url_is_refused() {
    // It would become the upstream's request line: a CRLF there forges a header.
    for url in [
        "ws://127.0.0.1:8001/a b",
        "ws://127.0.0.1:8001/a\r\nX-Forged: 1",
    ] {
        let env = [LOCAL, &[("WS_REMOTE_URL", url)]].concat();
        let out = run(&env, &["check-config"]);
        assert_eq!(out.status.code(), Some(2), "{url:?}");
        assert_eq!(
            text(&out.stderr),
            "configuration error: WS_REMOTE_URL: must not contain spaces or control characters\n"
        );
    }
}

#[test]
fn check_config_refuses_a_metrics_addr_the_proxy_could_not_bind() {
    for addr in ["localhost:9090", "9090", "0.0.0.0:99999"] {
        let env = [LOCAL, &[("METRICS_ADDR", addr)]].concat();
        for args in [&["check-config"][..], &["--port", "70000"]] {
            let out = run(&env, args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{addr} {args:?}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "configuration error: METRICS_ADDR: '{addr}' is not IP:PORT"
                )),
                "{addr} {args:?}: {stderr}"
            );
        }
    }
}

#[test]
fn a_key_certificate_or_token_file_over_1_mib_is_refused_unread() {
    // /dev/zero by mistake would fill memory; a 2 MiB file stands for it here.
    let dir = scratch_dir("big");
    let big = dir.join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 << 20]).unwrap();
    let big = big.display().to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("SECRET_KEY_FILES", &big)], "SECRET_KEY_FILES"),
        (
            vec![("JWT_ALGORITHMS", "RS256"), ("JWT_PUBLIC_KEY_FILE", &big)],
            "JWT_PUBLIC_KEY_FILE",
        ),
        (
            vec![("TLS_CERT_FILE", &big), ("TLS_KEY_FILE", &big)],
            "TLS_CERT_FILE",
        ),
        (
            vec![
                ("WS_REMOTE_URL", "wss://127.0.0.1:8443"),
                ("UPSTREAM_CA_FILE", &big),
            ],
            "UPSTREAM_CA_FILE",
        ),
        (
            vec![
                ("UPSTREAM_TOKEN_FILE", &big),
                ("ALLOW_CLEARTEXT_BEARER_TOKEN", "true"),
            ],
            "UPSTREAM_TOKEN_FILE",
        ),
    ];
    for (extra, names) in cases {
        let (code, stderr) = check_config(&extra);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(names) && stderr.contains("larger than 1 MiB"),
            "{extra:?}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The signing key given where the public key belongs: jsonwebtoken takes an RSA private key
/// for a public one and then refuses every token as badly signed, so the mistake used to pass
/// check-config and show only as 401s. Now it is named at start, for every kind of private key
/// (the RSA fixture is PKCS#8, the EC key fresh from rcgen); the public key still passes.
#[test]
fn a_private_key_given_as_jwt_public_key_file_is_refused_at_start() {
    let dir = scratch_dir("private");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let ec = dir.join("ec_private.pem");
    let ec_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&ec, ec_key.serialize_pem()).unwrap();
    let cases = [
        ("RS256", fixtures.join("rsa_private.pem"), false),
        ("ES256", ec, false),
        ("RS256", fixtures.join("rsa_public.pem"), true),
    ];
    for (alg, file, ok) in cases {
        let file = file.display().to_string();
        let (code, stderr) =
            check_config(&[("JWT_ALGORITHMS", alg), ("JWT_PUBLIC_KEY_FILE", &file)]);
        if ok {
            assert_eq!(code, Some(0), "{file}: {stderr}");
            continue;
        }
        assert_eq!(code, Some(2), "{file}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "configuration error: JWT_PUBLIC_KEY_FILE: {file} holds a private key (PRIVATE KEY)"
            )) && stderr.contains("only the public key"),
            "{file}: {stderr}"
        );
        assert!(
            !stderr.contains("BEGIN"),
            "{file}: the key is not shown: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An EC key verifies its own curve's algorithm only. jsonwebtoken parses a key on any curve, so
/// a P-256 key left in place when JWT_ALGORITHMS moved to ES384 (or the other way round) used to
/// pass check-config and then refuse every token as badly signed; now it is named at start.
/// Keys fresh from rcgen.
#[test]
fn an_ec_key_on_a_curve_jwt_algorithms_does_not_accept_is_refused_at_start() {
    let dir = scratch_dir("curves");
    let key = |name: &str, alg: &'static rcgen::SignatureAlgorithm| {
        let path = dir.join(name);
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        std::fs::write(&path, pair.public_key_pem()).unwrap();
        path.display().to_string()
    };
    let p256 = key("p256.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    let p384 = key("p384.pem", &rcgen::PKCS_ECDSA_P384_SHA384);
    let cases = [
        ("ES384", &p256, Some("a P-256 key, for ES256 only")),
        ("ES256", &p384, Some("a P-384 key, for ES384 only")),
        ("RS256,ES384", &p256, Some("a P-256 key, for ES256 only")),
        ("ES256", &p256, None),
        ("ES384", &p384, None),
        ("ES256,ES384", &p384, None),
    ];
    for (algs, file, refused) in cases {
        let (code, stderr) =
            check_config(&[("JWT_ALGORITHMS", algs), ("JWT_PUBLIC_KEY_FILE", file)]);
        let what = format!("{algs} with {file}");
        match refused {
            None => assert_eq!(code, Some(0), "{what}: {stderr}"),
            Some(why) => {
                assert_eq!(code, Some(2), "{what}: {stderr}");
                assert!(
                    stderr.contains(&format!(
                        "configuration error: JWT_PUBLIC_KEY_FILE: {file} is {why}, and \
                         JWT_ALGORITHMS accepts"
                    )),
                    "{what}: {stderr}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The Origin check compares byte for byte with what a browser sends (RFC 6454: lower case, no
/// path, no default port), so an entry spelled otherwise refused every session, the cookie
/// transport's included, while check-config passed. Now each such entry is named at start with
/// the spelling that would match; the browser's own spellings pass.
#[test]
fn an_allowed_origin_no_browser_would_send_is_refused_at_start() {
    let cases = [
        (
            "https://Lab.Example.com/",
            "'https://Lab.Example.com/' is never what a browser sends as Origin: write \
             'https://lab.example.com'",
        ),
        (
            "https://lab.example.com:443",
            "'https://lab.example.com:443' is never what a browser sends as Origin: write \
             'https://lab.example.com'",
        ),
        (
            "http://lab.example.com:80/",
            "'http://lab.example.com:80/' is never what a browser sends as Origin: write \
             'http://lab.example.com'",
        ),
        (
            "https://lab.example.com/console",
            "'https://lab.example.com/console' is not an origin (scheme://host[:port])",
        ),
        (
            "lab.example.com",
            "'lab.example.com' is not an origin (scheme://host[:port])",
        ),
    ];
    for (entry, message) in cases {
        let list = format!("https://ok.example,{entry}");
        assert_eq!(
            check_config(&[("ALLOWED_ORIGINS", list.as_str())]),
            (
                Some(2),
                format!("configuration error: ALLOWED_ORIGINS: {message}\n")
            ),
            "{entry}"
        );
    }
    let good = "https://lab.example.com,http://127.0.0.1:8080,https://[::1]:8443,null";
    let (code, stderr) = check_config(&[("ALLOWED_ORIGINS", good)]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn every_file_problem_is_named_in_one_run() {
    // An operator fixing the mounts of a new deployment: the upstream's CA
    // and the listener's certificate both missing. Each used to show on its
    // own run, the second only once the first was fixed.
    let dir = scratch_dir("files");
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let env = [
        LOCAL,
        &[
            ("WS_REMOTE_URL", "wss://127.0.0.1:9"),
            ("UPSTREAM_CA_FILE", ca),
            ("TLS_CERT_FILE", cert),
            ("TLS_KEY_FILE", key),
            ("PORT", "0"),
        ],
    ]
    .concat();
    let expected = [
        format!("configuration error: UPSTREAM_CA_FILE: cannot read {ca}: "),
        format!("configuration error: TLS_CERT_FILE: cannot read {cert}: "),
    ];
    let out = run(&env, &["check-config"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    for (line, start) in lines.iter().zip(&expected) {
        assert!(line.starts_with(start.as_str()), "{stderr}");
    }
    // A start says the same, one JSON record per problem, and exits 2.
    let env = [&env[..], &[("LOG_FORMAT", "json")]].concat();
    let out = run(&env, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let msgs: Vec<String> = stderr
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v["level"], "ERROR", "{l}");
            v["msg"].as_str().expect("msg").to_owned()
        })
        .collect();
    assert_eq!(msgs.len(), 2, "{stderr}");
    for (msg, start) in msgs.iter().zip(&expected) {
        assert!(msg.starts_with(start.as_str()), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
