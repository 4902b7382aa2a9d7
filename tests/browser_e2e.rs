//! Browser end-to-end test: a real noVNC (from npm) in Debian's headless Chromium, driven by
//! playwright-core, connects through the proxy binary to a real VNC server (QEMU, with a
//! disk-less VM showing its SeaBIOS screen). Three paths:
//!
//! - (a) local dev mode: the proxy dials QEMU's built-in VNC WebSocket
//!   (`ws://127.0.0.1:<port>`) with `API_PATH=/` (QEMU's WebSocket server serves only `/`).
//! - (b) in-cluster mode: the proxy dials `wss://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`
//!   with the service account's CA and bearer token, to the stand-in KubeVirt
//!   (`tests/support/upstream.rs`: TLS, bearer required, KubeVirt paths only), which bridges
//!   the `bridge-vm` VNC subresource to QEMU's plain VNC TCP port, like virt-handler.
//! - (c) `wss://`: as (a), but noVNC reaches the proxy over `wss://` (its own TLS listener, a
//!   test CA trusted through an NSS database in Chromium's HOME), and the certificate is
//!   rotated mid-test (see its test).
//!
//! [`run_browser_cases`] takes the proxy's environment and the VMI name, so (a) and (b) only
//! bring their upstream; (c) shares its pieces (proxy, page server, tokens, run.mjs). All
//! three tests can run at once (separate ports, directories, screenshots).
//!
//! Needs /usr/bin/chromium, qemu-system-x86_64, node, tests/e2e/node_modules and, for (c),
//! certutil: run
//! `bash tests/e2e/setup.sh` once. Without them the tests fail (so CI cannot pass by not
//! testing), unless `E2E_SKIP=1` is set. Screenshots land in `target/e2e/`.
//!
//! Every process started here is killed by its PID when its guard drops, every wait is bounded,
//! and everything listens on and connects to 127.0.0.1 only.

#[path = "support/labo.rs"]
mod labo;
#[path = "support/pki.rs"]
mod pki;
#[path = "support/tokens.rs"]
mod tokens;
#[path = "support/upstream.rs"]
mod upstream;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use upstream::{Behaviour, StandIn, StandInOptions};

const NAMESPACE: &str = "lab-ns";
const VMI: &str = "testvm";
/// For path (b): the VMI the stand-in is told to bridge to QEMU's VNC port.
const BRIDGE_VMI: &str = "bridge-vm";
/// QEMU's `-vnc HOST:N` listens on this port plus N.
const VNC_BASE_PORT: u16 = 5900;
const CHROMIUM: &str = "/usr/bin/chromium";

/// For the whole `connect` case in run.mjs: browser start, RFB handshake, and the wait for the
/// remote screen (QEMU under TCG on 2 cores can be slow to paint).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// For the whole `rotate` case in run.mjs: two certificate probes, two sessions to the remote
/// screen, and the first session's screen seen updating after the rotation.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(180);
/// For the whole `disconnect` case in run.mjs.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(45);
/// Extra time allowed for run.mjs beyond its own timeout before it is killed.
const NODE_GRACE: Duration = Duration::from_secs(45);
/// For a started process to become ready (listening).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The test

#[test]
fn novnc_in_chromium_through_proxy_to_qemu_local_dev_mode() {
    if !prerequisites_or_skip() {
        return;
    }
    let qemu = Qemu::start(QemuVnc::WebSocket);
    let remote = format!("ws://{}", qemu.addr);
    let outcome = run_browser_cases(&ProxyPath {
        label: "local-dev",
        env: vec![
            ("LOCAL_DEV_MODE".into(), "true".into()),
            ("WS_REMOTE_URL".into(), remote),
            // QEMU's WebSocket server accepts only `/` (no {namespace}/{vmi_name} to fill).
            ("API_PATH".into(), "/".into()),
            // QEMU refuses an offered subprotocol list without `binary` (its 400 answer is not
            // even a complete HTTP head), so the default `plain.kubevirt.io` cannot be offered
            // to it; like noVNC itself, offer none.
            ("UPSTREAM_SUBPROTOCOLS".into(), String::new()),
        ],
        namespace: NAMESPACE,
        vmi: VMI,
    });
    if let Err(report) = outcome {
        panic!("{report}\n--- qemu output ---\n{}", qemu.proc.output());
    }
    qemu.proc.assert_running();
}

#[test]
fn novnc_in_chromium_through_proxy_in_cluster_tls_to_qemu_vnc_tcp() {
    if !prerequisites_or_skip() {
        return;
    }
    let qemu = Qemu::start(QemuVnc::Tcp);
    let pki = pki::TestPki::new();
    // A bound service-account token is an opaque JWT; any unguessable string does here.
    let bearer = format!(
        "sa-token-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let stand_in = StandIn::start_with(StandInOptions {
        tls: Some(pki.server_tls()),
        bearer: Some(bearer.clone()),
        kubevirt_paths_only: true,
        bridge_to: Some(qemu.addr),
        ..StandInOptions::default().vmi(BRIDGE_VMI, Behaviour::Bridge)
    });
    let sa = TempDir::new("sa");
    sa.write("ca.crt", &pki.ca_pem);
    // No trailing newline, like the files Kubernetes projects.
    sa.write("token", &bearer);

    let outcome = run_browser_cases(&ProxyPath {
        label: "in-cluster-tls",
        env: vec![
            // In-cluster mode (LOCAL_DEV_MODE defaults to false): wss:// to the "API server",
            // trusting SERVICE_ACCOUNT_DIR/ca.crt and sending SERVICE_ACCOUNT_DIR/token. The
            // default API_PATH and subprotocols, as in a cluster.
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                stand_in.addr().port().to_string(),
            ),
            ("SERVICE_ACCOUNT_DIR".into(), sa.path.display().to_string()),
        ],
        namespace: NAMESPACE,
        vmi: BRIDGE_VMI,
    });
    let seen = stand_in.seen();
    let seen_paths = || {
        seen.iter()
            .map(|r| r.path.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Err(report) = outcome {
        panic!(
            "{report}\n--- stand-in requests ---\n{}\n--- qemu output ---\n{}",
            seen_paths(),
            qemu.proc.output()
        );
    }

    // The upstream request was KubeVirt's: the v1 subresource path for the token's namespace
    // and VMI, with the service account's bearer. Exactly one reached the stand-in: the bad
    // token was refused before any upstream work.
    let want = format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstances/{BRIDGE_VMI}/vnc"
    );
    let to_vmi: Vec<_> = seen
        .iter()
        .filter(|r| upstream::vmi_name(&r.path) == BRIDGE_VMI)
        .collect();
    assert_eq!(
        to_vmi.len(),
        1,
        "expected exactly one upstream request for {BRIDGE_VMI} (the valid token's); the \
         stand-in saw:\n{}",
        seen_paths()
    );
    let req = to_vmi[0];
    assert_eq!(req.path, want, "the upstream request path");
    assert!(
        req.header("authorization") == Some(format!("Bearer {bearer}").as_str()),
        "the upstream request did not carry the service account's bearer token"
    );
    assert_eq!(
        req.header("sec-websocket-protocol"),
        Some(upstream::KUBEVIRT_SUBPROTOCOL),
        "the proxy offers the default subprotocol upstream"
    );
    qemu.proc.assert_running();
}

/// Path (c): noVNC over `wss://` to the proxy's own TLS listener (a certificate from a test CA
/// that Chromium trusts through its NSS database, mounted like a cert-manager Secret), and on
/// to QEMU's VNC WebSocket as in path (a). The certificate is rotated mid-test: a new TLS
/// connection then gets the new certificate (same CA, another serial), a new session connects
/// and draws the screen, and the session opened before the rotation keeps receiving its screen.
#[test]
fn novnc_in_chromium_over_wss_with_certificate_rotation_to_qemu_local_dev_mode() {
    if !prerequisites_or_skip() {
        return;
    }
    let Some(certutil) = find_in_path("certutil") else {
        panic!(
            "browser_e2e: missing certutil (Debian's libnss3-tools), to make Chromium trust the \
             test CA. Run `bash tests/e2e/setup.sh`, or set E2E_SKIP=1 to skip this test."
        );
    };
    let qemu = Qemu::start(QemuVnc::WebSocket);
    let pki = pki::TestPki::new();
    // Two certificates from the same CA for 127.0.0.1 and localhost, each with a fresh key
    // (and so another serial), expiring on different days so that validTo tells them apart
    // in the log as well.
    let today = tokens::now() as i64 / 86_400;
    let first = pki.issue_pem(pki::KeyKind::EcdsaP256, (today + 90) * 86_400);
    let second = pki.issue_pem(pki::KeyKind::EcdsaP256, (today + 91) * 86_400);
    let serial = |der: &[u8]| {
        pki::serial_of(der).unwrap_or_else(|| panic!("no serial in the certificate {}", hex(der)))
    };
    let (first_serial, second_serial) = (serial(&first.der), serial(&second.der));
    assert_ne!(
        first_serial, second_serial,
        "rcgen gave both the same serial"
    );
    let mut mount = pki::SecretMount::new(&first);

    // HOME for Chromium: a new NSS database trusting the test CA for servers ("C,,"), the way
    // a user imports a private CA on Linux. No flag makes Chromium skip verification.
    let home = TempDir::new("home");
    let nssdb = home.path.join(".pki").join("nssdb");
    std::fs::create_dir_all(&nssdb).expect("create .pki/nssdb");
    home.write("ca.pem", &pki.ca_pem);
    let db = format!("sql:{}", nssdb.display());
    for args in [
        vec!["-N", "-d", &db, "--empty-password"],
        vec![
            "-A",
            "-d",
            &db,
            "-n",
            "kubevirt-vnc-proxy test CA",
            "-t",
            "C,,",
            "-i",
            &home.path.join("ca.pem").display().to_string(),
        ],
    ] {
        let out = Command::new(&certutil)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run certutil");
        assert!(
            out.status.success(),
            "certutil {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let proxy = start_proxy(&[
        ("LOCAL_DEV_MODE".into(), "true".into()),
        ("WS_REMOTE_URL".into(), format!("ws://{}", qemu.addr)),
        // As in path (a): QEMU serves only `/` and wants no subprotocol offer.
        ("API_PATH".into(), "/".into()),
        ("UPSTREAM_SUBPROTOCOLS".into(), String::new()),
        ("TLS_CERT_FILE".into(), mount.cert().display().to_string()),
        ("TLS_KEY_FILE".into(), mount.key().display().to_string()),
        ("CREDENTIALS_CHECK_SECONDS".into(), "1".into()),
        // Chromium may open a spare connection speculatively and keep it idle for up to 10 s:
        // the likely reason why, in 2 runs of 17, `certificate after` showed the old
        // certificate (the sessions' own connections were right). A connection that sends no
        // request within 1 s is closed by the proxy, so every connection that probe can get
        // is newer than the rotation's 1.2 s pause (12 runs of 12 passed with it).
        ("HANDSHAKE_TIMEOUT_SECONDS".into(), "1".into()),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let server = start_static_server().unwrap_or_else(|e| panic!("{e}"));
    let with_logs = |msg: String| {
        format!(
            "{msg}\n--- proxy log ---\n{}\n--- static server log ---\n{}\n--- qemu output ---\n{}",
            proxy.proc.output(),
            server.proc.output(),
            qemu.proc.output()
        )
    };

    let out_dir = e2e_output_dir();
    std::fs::create_dir_all(&out_dir).expect("create target/e2e");
    let shot = out_dir.join("wss-rotation.png");
    let _ = std::fs::remove_file(&shot);
    let token = mint_token(tokens::SECRET, NAMESPACE, VMI);
    let url = format!("wss://{}/{token}/{VMI}", proxy.addr);
    let origin = format!("https://{}", proxy.addr);
    let flag = home.path.join("rotated");
    let started = Instant::now();
    let mut cmd = run_mjs(&server.ready, &url, "rotate", &shot, ROTATION_TIMEOUT);
    cmd.arg("--home")
        .arg(&home.path)
        .args(["--cert-origin", &origin])
        .arg("--rotated-flag")
        .arg(&flag)
        // Holds the token in the WebSocket URLs: it stays in the temp HOME, removed on drop.
        .arg("--net-log")
        .arg(home.path.join("netlog.json"));
    let node = Proc::spawn("run.mjs", &mut cmd).expect("run node");

    // run.mjs has the first session on screen: rotate, like the kubelet would.
    if let Err(e) = node.wait_for_line("rotate now", ROTATION_TIMEOUT) {
        let _ = node.wait_exit(Duration::from_secs(5));
        panic!(
            "{}",
            with_logs(format!(
                "run.mjs never asked for the rotation: {e}\n--- run.mjs output ---\n{}",
                node.output()
            ))
        );
    }
    let rotated_at = Instant::now();
    mount.publish(&second);
    // The files are checked at most every CREDENTIALS_CHECK_SECONDS (1 s) on an accept: after
    // this pause the next connection is sure to be accepted after a check that sees them, and
    // a connection Chromium opened just before the check (it may keep one to reuse) has
    // finished its handshake or been given up (HANDSHAKE_TIMEOUT, 1 s here).
    thread::sleep(Duration::from_millis(2_500));
    std::fs::write(&flag, b"").expect("write the rotated flag");

    let output = finish_mjs(&node, "rotate", &shot, ROTATION_TIMEOUT)
        .map_err(&with_logs)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "browser_e2e[wss-rotation]: both sessions drew the screen, the first kept updating \
         {:.1?} after the rotation; {:.1?} in all; screenshots {} and -second.png",
        rotated_at.elapsed(),
        started.elapsed(),
        shot.display()
    );

    // What is compared: leaf certificates as Chromium received them, DER, against the ones
    // this test issued and published: their serial numbers (read from the DER on both sides)
    // and the whole DER.
    // 1. On the two RFB sessions' own TLS connections (Chromium's NetLog, in the order the
    //    WebSockets were opened): the session opened before the rotation got the first
    //    certificate, the new session after it the second.
    let line_after = |prefix: &str| -> &str {
        output
            .lines()
            .find_map(|l| l.split(prefix).nth(1))
            .unwrap_or_else(|| panic!("run.mjs printed no `{prefix}` line"))
            .trim()
    };
    let sessions: Vec<Vec<u8>> = line_after("websocket certificates: ")
        .split(',')
        .map(|h| unhex(h).unwrap_or_else(|| panic!("bad hex in `websocket certificates:`")))
        .collect();
    assert_eq!(
        sessions.len(),
        2,
        "expected two wss:// sessions in the NetLog"
    );
    assert_eq!(
        hex(&serial(&sessions[0])),
        hex(&first_serial),
        "the session opened before the rotation did not get the first certificate"
    );
    assert_eq!(
        hex(&serial(&sessions[1])),
        hex(&second_serial),
        "the session opened after the rotation did not get the new certificate's serial"
    );
    assert_eq!(sessions[0], first.der.as_ref());
    assert_eq!(sessions[1], second.der.as_ref());
    // 2. On a fresh TLS connection to the origin (GET /healthz in a new page) just before the
    //    first session and just after the rotation: the chain Chromium verified for it (CDP
    //    Network.getCertificate).
    let seen = |label: &str| -> Vec<u8> {
        let prefix = format!("certificate {label}: ");
        unhex(line_after(&prefix)).unwrap_or_else(|| panic!("bad hex after `{prefix}`"))
    };
    let (before, after) = (seen("before"), seen("after"));
    assert_eq!(
        hex(&serial(&before)),
        hex(&first_serial),
        "before the rotation Chromium was not served the first certificate"
    );
    assert_eq!(
        hex(&serial(&after)),
        hex(&second_serial),
        "after the rotation a new TLS connection did not get the new certificate's serial"
    );
    assert_eq!(before, first.der.as_ref());
    assert_eq!(after, second.der.as_ref());

    if let Some(status) = proxy.proc.exited() {
        panic!("{}", with_logs(format!("the proxy exited: {status}")));
    }
    if proxy.proc.output().contains(token.as_str()) {
        panic!("{}", with_logs("the proxy logged the token".into()));
    }
    qemu.proc.assert_running();
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of an even-length hex string, or `None`.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reusable part: the proxy under a given environment, noVNC through it.

/// How the proxy reaches a VNC WebSocket for one end-to-end path.
struct ProxyPath<'a> {
    /// Names the screenshots: `target/e2e/<label>.png`, `target/e2e/<label>-bad-token.png`.
    label: &'a str,
    /// Upstream configuration for the proxy (`LOCAL_DEV_MODE`, `WS_REMOTE_URL`, `API_PATH`, or
    /// whatever an in-cluster path needs). `SECRET_KEY`, `HOST`, `PORT` and `LOGLEVEL` are
    /// set by [`run_browser_cases`]; entries here override them.
    env: Vec<(String, String)>,
    /// The namespace put in the token.
    namespace: &'a str,
    /// The VMI name in the client's URL and in the token's `allowed_vmi_names`.
    vmi: &'a str,
}

/// Starts the proxy with `path.env` and the static page server, then runs noVNC in Chromium
/// twice: with a valid token (must connect and show a multi-colour screen) and with a token
/// signed by another key (must be refused with an HTTP 4xx and never connect). Returns a report
/// with every log on failure.
fn run_browser_cases(path: &ProxyPath<'_>) -> Result<(), String> {
    let out_dir = e2e_output_dir();
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;

    let proxy = start_proxy(&path.env)?;
    let server = start_static_server()?;
    let page = server.ready.clone();
    let with_logs = |msg: String| {
        format!(
            "{msg}\n--- proxy log ---\n{}\n--- static server log ---\n{}",
            proxy.proc.output(),
            server.proc.output()
        )
    };

    let mint = |secret: &str| mint_token(secret, path.namespace, path.vmi);

    // 1. A valid token: noVNC connects and draws the SeaBIOS screen.
    let token = mint(tokens::SECRET);
    let shot = out_dir.join(format!("{}.png", path.label));
    let _ = std::fs::remove_file(&shot);
    let url = format!("ws://{}/{token}/{}", proxy.addr, path.vmi);
    let started = Instant::now();
    run_novnc(&page, &url, "connect", &shot, CONNECT_TIMEOUT, None).map_err(&with_logs)?;
    eprintln!(
        "browser_e2e[{}]: valid token: connected and drew the screen in {:.1?}; screenshot {}",
        path.label,
        started.elapsed(),
        shot.display()
    );
    if !shot.is_file() {
        return Err(with_logs(format!("no screenshot at {}", shot.display())));
    }

    // 2. A token signed with another key: refused before any upstream work.
    let bad = mint("another-secret-that-is-at-least-32-bytes-long");
    let shot = out_dir.join(format!("{}-bad-token.png", path.label));
    let _ = std::fs::remove_file(&shot);
    let url = format!("ws://{}/{bad}/{}", proxy.addr, path.vmi);
    let started = Instant::now();
    run_novnc(
        &page,
        &url,
        "disconnect",
        &shot,
        REFUSAL_TIMEOUT,
        Some("4xx"),
    )
    .map_err(&with_logs)?;
    eprintln!(
        "browser_e2e[{}]: bad token: refused in {:.1?}; screenshot {}",
        path.label,
        started.elapsed(),
        shot.display()
    );

    // The proxy survived both, and never logged a token.
    if let Some(status) = proxy.proc.exited() {
        return Err(with_logs(format!(
            "the proxy exited during the test: {status}"
        )));
    }
    let log = proxy.proc.output();
    for (what, t) in [("valid", &token), ("bad", &bad)] {
        if log.contains(t.as_str()) || log.contains(t.rsplit('.').next().unwrap_or(t)) {
            return Err(with_logs(format!("the proxy logged the {what} token")));
        }
    }
    Ok(())
}

/// A token for `vmi` in `namespace`, signed with `secret`, as LabOrchestrator mints them:
/// generate_auth_token of lab-orchestrator-lib-auth 0.0.5, what production pins (hand-made
/// only with PYTHON_SKIP=1).
fn mint_token(secret: &str, namespace: &str, vmi: &str) -> String {
    if labo::available() {
        let mut m = labo::Mint::new(secret, &[vmi]).expires_in(600.0);
        m.namespace = namespace.into();
        m.with(labo::LibAuth::V0_0_5)
    } else {
        tokens::mint(secret, namespace, &[vmi], tokens::now() + 600)
    }
}

/// `node tests/e2e/run.mjs` with the arguments every case passes; the caller adds its own.
fn run_mjs(page: &str, url: &str, expect: &str, screenshot: &Path, timeout: Duration) -> Command {
    let mut cmd = Command::new("node");
    cmd.current_dir(e2e_dir())
        .arg("run.mjs")
        .args(["--page", page, "--url", url, "--expect", expect])
        .arg("--screenshot")
        .arg(screenshot)
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .args(["--chromium", CHROMIUM]);
    cmd
}

/// Runs `node tests/e2e/run.mjs` and returns its output as the error when it fails.
fn run_novnc(
    page: &str,
    url: &str,
    expect: &str,
    screenshot: &Path,
    timeout: Duration,
    expect_status: Option<&str>,
) -> Result<(), String> {
    let mut cmd = run_mjs(page, url, expect, screenshot, timeout);
    if let Some(status) = expect_status {
        cmd.args(["--expect-status", status]);
    }
    let proc = Proc::spawn("run.mjs", &mut cmd).map_err(|e| format!("cannot run node: {e}"))?;
    finish_mjs(&proc, expect, screenshot, timeout).map(|_| ())
}

/// Waits (bounded: `timeout` plus [`NODE_GRACE`]) for run.mjs to exit; its output when it
/// succeeded, or an error with it.
fn finish_mjs(
    proc: &Proc,
    expect: &str,
    screenshot: &Path,
    timeout: Duration,
) -> Result<String, String> {
    match proc.wait_exit(timeout + NODE_GRACE) {
        Some(status) if status.success() => {
            let output = proc.output();
            eprintln!("{output}");
            Ok(output)
        }
        Some(status) => Err(format!(
            "run.mjs --expect {expect} failed ({status}); screenshot (if any): {}\n--- run.mjs output ---\n{}",
            screenshot.display(),
            proc.output()
        )),
        None => Err(format!(
            "run.mjs --expect {expect} did not finish within {:?}; killed\n--- run.mjs output ---\n{}",
            timeout + NODE_GRACE,
            proc.output()
        )),
    }
}

struct Started {
    proc: Proc,
    addr: SocketAddr,
}

/// The proxy binary on 127.0.0.1 and a free port, in a clean environment plus `env`.
fn start_proxy(env: &[(String, String)]) -> Result<Started, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubevirt-vnc-proxy"));
    // Nothing from the caller's environment (RUST_LOG, a stray SECRET_KEY...) leaks in.
    cmd.env_clear();
    for keep in ["PATH", "LLVM_PROFILE_FILE"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.env("SECRET_KEY", tokens::SECRET)
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("LOGLEVEL", "INFO");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc =
        Proc::spawn("proxy", &mut cmd).map_err(|e| format!("cannot start the proxy: {e}"))?;
    let line = proc
        .wait_for_line("listening on ", READY_TIMEOUT)
        .map_err(|e| {
            format!(
                "the proxy did not start: {e}\n--- proxy log ---\n{}",
                proc.output()
            )
        })?;
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        .ok_or_else(|| format!("cannot parse the proxy's address from {line:?}"))?;
    Ok(Started { proc, addr })
}

struct StaticServer {
    proc: Proc,
    /// `http://127.0.0.1:PORT/`
    ready: String,
}

/// tests/e2e/serve.mjs: page.html, page.js and noVNC's modules over HTTP on 127.0.0.1.
fn start_static_server() -> Result<StaticServer, String> {
    let mut cmd = Command::new("node");
    cmd.current_dir(e2e_dir()).arg("serve.mjs");
    let proc = Proc::spawn("serve.mjs", &mut cmd)
        .map_err(|e| format!("cannot start node serve.mjs: {e}"))?;
    let line = proc
        .wait_for_line("serving on ", READY_TIMEOUT)
        .map_err(|e| format!("serve.mjs did not start: {e}\n{}", proc.output()))?;
    let url = line
        .split("serving on ")
        .nth(1)
        .map(str::trim)
        .filter(|u| u.starts_with("http://127.0.0.1:"))
        .ok_or_else(|| format!("cannot parse serve.mjs's address from {line:?}"))?
        .to_owned();
    Ok(StaticServer { proc, ready: url })
}

// ---------------------------------------------------------------------------------------------
// QEMU: a disk-less VM whose screen is SeaBIOS's "No bootable device."

/// Where QEMU's VNC server is reachable on 127.0.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QemuVnc {
    /// Path (a): QEMU's VNC WebSocket on a free port; the raw VNC server on a unix socket (no
    /// display number to collide with other runs).
    WebSocket,
    /// Path (b): the raw VNC server on TCP, `-vnc 127.0.0.1:N` (port 5900 + N), as virt-handler
    /// would reach it; no WebSocket.
    Tcp,
}

struct Qemu {
    proc: Proc,
    /// The WebSocket port ([`QemuVnc::WebSocket`]) or the VNC TCP port ([`QemuVnc::Tcp`]).
    addr: SocketAddr,
    /// Holds the raw VNC unix socket (WebSocket mode); removed on drop, after QEMU is killed.
    dir: PathBuf,
}

impl Qemu {
    /// Starts QEMU with its VNC server as `vnc` says, on 127.0.0.1 and a port that was free a
    /// moment before. Retries a few times if that port was taken between choosing it and QEMU
    /// binding it.
    fn start(vnc: QemuVnc) -> Qemu {
        let mut last = String::new();
        for attempt in 0..5u16 {
            let dir = std::env::temp_dir().join(format!(
                "kvp-e2e-qemu-{}-{vnc:?}-{attempt}-{}",
                std::process::id(),
                tokens::now()
            ));
            std::fs::create_dir_all(&dir).expect("create the QEMU temp dir");
            let (addr, vnc_arg) = match vnc {
                QemuVnc::WebSocket => {
                    let port = free_port();
                    let sock = dir.join("vnc.sock");
                    (
                        port,
                        format!("unix:{},websocket=127.0.0.1:{port}", sock.display()),
                    )
                }
                QemuVnc::Tcp => {
                    let display = free_vnc_display(attempt);
                    (VNC_BASE_PORT + display, format!("127.0.0.1:{display}"))
                }
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], addr));
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-machine", "pc,accel=tcg", "-m", "64", "-smp", "1"])
                // No default devices, no disks, no network: SeaBIOS tries the disk and the
                // floppy, then prints "No bootable device." in VGA text mode (light grey on
                // black: more than one colour).
                .args(["-nodefaults", "-vga", "std", "-nic", "none"])
                // Halt on boot failure instead of rebooting after 60 s (which blanks the screen).
                .args(["-boot", "reboot-timeout=-1"])
                .args(["-display", "none", "-serial", "none", "-monitor", "none"])
                .args(["-vnc", &vnc_arg]);
            let proc = Proc::spawn("qemu", &mut cmd)
                .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
            let qemu = Qemu { proc, addr, dir };
            match qemu.wait_listening() {
                Ok(()) => return qemu,
                Err(e) => {
                    last = format!("{e}\n--- qemu output ---\n{}", qemu.proc.output());
                    if !last.contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("QEMU did not start: {last}");
    }

    /// Until QEMU's port accepts a TCP connection (bounded), or QEMU exits.
    fn wait_listening(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.exited() {
                return Err(format!("qemu exited: {status}"));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                // Someone listens there; make sure it is this QEMU and not a process that took
                // the port first (QEMU then fails to bind and exits within moments).
                thread::sleep(Duration::from_millis(300));
                return match self.proc.exited() {
                    Some(status) => Err(format!("qemu exited: {status}")),
                    None => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "qemu's VNC port {} not listening after {READY_TIMEOUT:?}",
                    self.addr
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: killed by PID on drop, output collected by reader threads.

struct Proc {
    name: &'static str,
    child: Mutex<Child>,
    output: Arc<Mutex<String>>,
    lines: Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr piped into [`Proc::output`], and stdin a pipe that
    /// closes when this process dies (serve.mjs exits then, even if the kill never came).
    fn spawn(name: &'static str, cmd: &mut Command) -> std::io::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let out = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let output = Arc::clone(&output);
            let tx = tx.clone();
            thread::spawn(move || {
                // Drains the pipe until the process closes it, so the child never blocks on a
                // full pipe.
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    {
                        let mut all = output.lock().unwrap_or_else(|p| p.into_inner());
                        all.push_str(&line);
                        all.push('\n');
                    }
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Proc {
            name,
            child: Mutex::new(child),
            output,
            lines: rx,
        })
    }

    /// Everything the process printed so far, stdout and stderr interleaved by line.
    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn exited(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten()
    }

    fn assert_running(&self) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited unexpectedly: {status}\n{}",
                self.name,
                self.output()
            );
        }
    }

    /// The first line containing `needle`, waiting at most `timeout`.
    fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no line with {needle:?} within {timeout:?}"));
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.exited() {
                        // Lines printed just before exiting may still be queued.
                        if let Some(line) = self.lines.try_iter().find(|l| l.contains(needle)) {
                            return Ok(line);
                        }
                        return Err(format!("{} exited: {status}", self.name));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{} closed its output", self.name));
                }
            }
        }
    }

    /// Waits (bounded) for the process to exit by itself; kills it on timeout.
    fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                // Let the reader threads catch the last lines.
                thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to this process's PID, then reap it.
    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Prerequisites and paths

/// True when the test should run. Panics when something it needs is missing, unless
/// `E2E_SKIP=1`, which skips the test with a notice.
fn prerequisites_or_skip() -> bool {
    if std::env::var("E2E_SKIP").as_deref() == Ok("1") {
        eprintln!("browser_e2e: SKIPPED (E2E_SKIP=1): the browser end-to-end test did not run");
        return false;
    }
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).is_file() {
        missing.push(CHROMIUM.to_owned());
    }
    if find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64".to_owned());
    }
    if find_in_path("node").is_none() {
        missing.push("node (Node.js)".to_owned());
    }
    for module in [
        "node_modules/@novnc/novnc/core/rfb.js",
        "node_modules/playwright-core/package.json",
    ] {
        if !e2e_dir().join(module).is_file() {
            missing.push(format!("tests/e2e/{module}"));
        }
    }
    if !missing.is_empty() {
        panic!(
            "browser_e2e: missing {}.\nRun `bash tests/e2e/setup.sh` (as root: it installs \
             chromium and qemu-system-x86 from Debian and noVNC + playwright-core from npm), \
             or set E2E_SKIP=1 to skip this test.",
            missing.join(", ")
        );
    }
    true
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("e2e")
}

/// `target/e2e/` (next to the `tmp/` cargo gives integration tests).
fn e2e_output_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("e2e")
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A VNC display number N whose port (5900 + N) on 127.0.0.1 was free a moment ago. Runs in
/// other processes start their search at other displays (by PID), and each retry further on.
fn free_vnc_display(attempt: u16) -> u16 {
    const DISPLAYS: u16 = 100;
    let first = (std::process::id() % u32::from(DISPLAYS)) as u16 + attempt * 7;
    (0..DISPLAYS)
        .map(|i| (first + i) % DISPLAYS)
        .find(|d| TcpListener::bind(("127.0.0.1", VNC_BASE_PORT + d)).is_ok())
        .unwrap_or_else(|| {
            panic!(
                "no free VNC display: 127.0.0.1:{VNC_BASE_PORT}..{} all taken",
                VNC_BASE_PORT + DISPLAYS - 1
            )
        })
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kvp-e2e-{what}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            tokens::now()
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    fn write(&self, name: &str, contents: &str) {
        let file = self.path.join(name);
        std::fs::write(&file, contents).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
