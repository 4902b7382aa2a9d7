//! The README is a contract: its commands run as written, and what it says they print is what
//! they print.
//!
//! - The two "Try it" commands: the demo (`cargo run --release --example demo`, with `PORT=0`
//!   so tests can run side by side) driven by the client command it prints, and the test
//!   command, which must be exactly what `.ci/run` runs.
//! - The install command (`cargo install … --path .`), into a folder under `target/` instead of
//!   `~/.cargo` (`--root`), sharing this checkout's build directory.
//! - Every ```` ```console ```` block: each `$ COMMAND` line runs in bash with the proxy binary
//!   on `PATH`, and its output (stdout and stderr) must match the lines below it. In an
//!   expected line `…` stands for any text; a line that is only `…` for any number of lines.
//! - The ```` ```sh ```` block that mints a token with the `token` subcommand and uses it
//!   against the demo runs as written, with the demo's real address for `127.0.0.1:5001`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-vnc-proxy");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// A fenced code block: its info string (`sh`, `console`, …) and its text.
#[derive(Debug)]
struct Block {
    lang: String,
    body: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    lang: info.trim().to_owned(),
                    body: String::new(),
                })
            }
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some(b), None) => {
                b.body.push_str(line);
                b.body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The one `sh` block of the README whose text contains `needle`.
fn sh_block_with(needle: &str) -> String {
    let found: Vec<Block> = blocks(&readme())
        .into_iter()
        .filter(|b| b.lang == "sh" && b.body.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "README.md should have exactly one sh block with {needle:?}: {found:#?}"
    );
    found.into_iter().next().map(|b| b.body).unwrap_or_default()
}

/// The command part of a line (a `#` comment after two spaces is the README's annotation).
fn command_of(line: &str) -> &str {
    line.split("  #").next().unwrap_or(line).trim()
}

/// A folder holding `kubevirt-vnc-proxy` (the binary this test was built with), for `PATH`.
fn bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo().join("target/readme-bin");
        std::fs::create_dir_all(&dir).expect("target/readme-bin");
        let link = dir.join("kubevirt-vnc-proxy");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(BIN, &link).expect("symlink the binary");
        dir
    })
    .clone()
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// One `$ COMMAND` of a console block and the lines it promises.
#[derive(Debug)]
struct Promise {
    command: String,
    output: Vec<String>,
}

fn promises(console: &str) -> Vec<Promise> {
    let mut out: Vec<Promise> = Vec::new();
    for line in console.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            out.push(Promise {
                command: cmd.to_owned(),
                output: Vec::new(),
            });
        } else if let Some(p) = out.last_mut() {
            p.output.push(line.to_owned());
        }
    }
    out
}

/// `actual` matches `expected`, where `…` in `expected` stands for any text.
fn line_matches(expected: &str, actual: &str) -> bool {
    let mut parts = expected.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = actual.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// `actual` lines match `expected` lines in order, a line `…` standing for any number of lines.
fn output_matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "…" => {
            (0..=actual.len()).any(|skip| output_matches(rest, &actual[skip..]))
        }
        Some((e, rest)) => actual
            .split_first()
            .is_some_and(|(a, more)| line_matches(e, a) && output_matches(rest, more)),
    }
}

#[test]
fn the_matcher_means_what_the_module_doc_says() {
    assert!(line_matches("a…c", "abbbc"));
    assert!(line_matches("…", "anything"));
    assert!(line_matches("x", "x"));
    assert!(!line_matches("x", "xy"));
    assert!(!line_matches("a…c", "abd"));
    assert!(line_matches("a…b…c", "a1b2c"));
    let lines = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(output_matches(
        &lines(&["a", "…", "z"]),
        &["a", "b", "c", "z"]
    ));
    assert!(output_matches(&lines(&["a", "…"]), &["a"]));
    assert!(!output_matches(&lines(&["a", "z"]), &["a", "b", "z"]));
    assert!(!output_matches(&lines(&["a"]), &["a", "b"]));
    let p = promises("$ one\nout\n$ two\n");
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].output, ["out"]);
    assert!(p[1].output.is_empty());
}

#[test]
fn the_test_command_is_what_ci_runs() {
    let try_it = sh_block_with("--example demo");
    let commands: Vec<&str> = try_it.lines().map(command_of).collect();
    assert_eq!(
        commands,
        [
            "cargo run --release --example demo",
            "bash tests/e2e/setup.sh && cargo test"
        ],
        "the README's two commands"
    );
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == commands[1]),
        ".ci/run must run the README's test command as written: {}",
        commands[1]
    );
}

#[test]
fn every_console_block_prints_what_it_promises() {
    let dir = bin_dir();
    let mut checked = 0;
    for block in blocks(&readme()).iter().filter(|b| b.lang == "console") {
        for p in promises(&block.body) {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!("{} 2>&1", p.command))
                .env("PATH", path_with(&dir))
                .current_dir(repo())
                .stdin(Stdio::null())
                .output()
                .expect("bash");
            let text = String::from_utf8_lossy(&out.stdout);
            let actual: Vec<&str> = text.lines().collect();
            assert!(
                output_matches(&p.output, &actual),
                "README.md promises that `{}` prints\n{}\nbut it printed\n{}",
                p.command,
                p.output.join("\n"),
                text
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} console commands in README.md");
}

/// A process killed (by its PID) when dropped, its output lines on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, lines) = mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (seen so far or within `within`) for which `pick` gives something.
    fn wait_for<T>(&mut self, within: Duration, pick: impl Fn(&str) -> Option<T>) -> Option<T> {
        if let Some(t) = self.seen.iter().find_map(|l| pick(l)) {
            return Some(t);
        }
        let deadline = Instant::now() + within;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let picked = pick(&line);
            self.seen.push(line);
            if picked.is_some() {
                return picked;
            }
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a README command line in bash from the checkout, `stdin` as its input; its output.
fn run_sh(script: &str, stdin: &str, path: &str) -> String {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("set -e\n{script}"))
        .env("PATH", path)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("bash output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "`{script}` failed:\n{text}");
    text
}

#[test]
fn the_demo_runs_as_written_with_its_client_and_a_minted_token() {
    let try_it = sh_block_with("--example demo");
    let demo = command_of(try_it.lines().next().unwrap_or_default()).to_owned();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("exec {demo}"))
        .env("PORT", "0")
        .current_dir(repo());
    let mut running = Running::start(cmd);
    // A release build may take minutes on a small machine.
    let url = running
        .wait_for(Duration::from_secs(900), |l| {
            l.split_whitespace()
                .find(|w| w.starts_with("ws://127.0.0.1:") && w.ends_with("/vnc-demo"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("the demo printed no URL:\n{}", running.seen.join("\n")));
    let client = running
        .wait_for(Duration::from_secs(5), |l| {
            l.trim()
                .starts_with("cargo run --release --example client -- ")
                .then(|| l.trim().to_owned())
        })
        .unwrap_or_else(|| {
            panic!(
                "the demo printed no client command:\n{}",
                running.seen.join("\n")
            )
        });
    let path = path_with(&bin_dir());
    // The client command the demo prints, as the README shows it.
    let out = run_sh(&client, "hello through the proxy\n", &path);
    assert!(out.contains("RFB 003.008"), "{out}");
    assert!(out.contains("< hello through the proxy"), "{out}");
    // The README's own token, minted with the installed binary, against the demo.
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mint = sh_block_with("$TOKEN/vnc-demo").replace("127.0.0.1:5001", &addr);
    let out = run_sh(&mint, "minted here\n", &path);
    assert!(out.contains("RFB 003.008"), "{out}");
    assert!(out.contains("< minted here"), "{out}");
    // The README says the log shows the session open and close, and names the lines.
    for line in ["event=opened", "event=session"] {
        assert!(
            readme().contains(&format!("`{line}`")),
            "README names {line}"
        );
        assert!(
            running
                .wait_for(Duration::from_secs(5), |l| l.contains(line).then_some(()))
                .is_some(),
            "no {line} line in the demo's log:\n{}",
            running.seen.join("\n")
        );
    }
}

#[test]
fn the_install_command_installs_the_binary() {
    let install = sh_block_with("cargo install");
    let command = command_of(install.lines().next().unwrap_or_default());
    assert!(
        command.starts_with("cargo install ") && command.contains("--path ."),
        "{command}"
    );
    let root = repo().join("target/readme-install");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{command} --root '{}'", root.display()))
        .env("CARGO_TARGET_DIR", repo().join("target"))
        .current_dir(repo())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = Command::new(root.join("bin/kubevirt-vnc-proxy"))
        .arg("--version")
        .output()
        .expect("the installed binary runs");
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("kubevirt-vnc-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}
