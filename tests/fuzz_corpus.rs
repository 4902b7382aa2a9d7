//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and any saved
//! regressions (`fuzz/regressions/<target>/`) through the same checks the
//! cargo-fuzz targets run (`fuzz/checks.rs`), at replay depth (every split
//! point). Runs in plain `cargo test`: no libFuzzer, no nightly features.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The regular files of `dir`, sorted; hidden files are skipped.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Run `check` on every file, collecting failures with the file's name and
/// the panic message rather than stopping at the first one.
fn replay(check: checks::Check, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| {
            // Every split point, then what the fuzz target itself runs.
            check(&data, checks::Depth::Replay);
            check(&data, checks::Depth::Fuzz);
        })) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)")
                .to_owned();
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    failures
}

fn replay_target(name: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no check named {name}"));
    let corpus = fuzz_dir().join("corpus").join(name);
    assert!(
        corpus.is_dir(),
        "corpus directory {} is missing",
        corpus.display()
    );
    let mut files = files_in(&corpus);
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty: the replay would test nothing",
        corpus.display()
    );
    let regressions = fuzz_dir().join("regressions").join(name);
    if regressions.is_dir() {
        files.extend(files_in(&regressions));
    }
    let failures = replay(*check, &files);
    assert!(
        failures.is_empty(),
        "{} of {} inputs for {name} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn request_head_corpus() {
    replay_target("request_head");
}

#[test]
fn route_corpus() {
    replay_target("route");
}

#[test]
fn frame_scanner_client_corpus() {
    replay_target("frame_scanner_client");
}

#[test]
fn frame_scanner_upstream_corpus() {
    replay_target("frame_scanner_upstream");
}

#[test]
fn upstream_response_corpus() {
    replay_target("upstream_response");
}

#[test]
fn token_corpus() {
    replay_target("token");
}

/// Every corpus and regression directory belongs to a known target, and
/// every target has a test above (a new target cannot go unreplayed).
#[test]
fn every_directory_is_a_target() {
    let known: Vec<&str> = checks::TARGETS.iter().map(|(n, _)| *n).collect();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert_eq!(kind, "regressions", "{} is missing", dir.display());
            continue;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                assert!(
                    known.contains(&name.as_str()),
                    "{} is not a fuzz target",
                    path.display()
                );
            }
        }
    }
    let this = include_str!("fuzz_corpus.rs");
    for name in &known {
        assert!(
            this.contains(&format!("replay_target(\"{name}\")")),
            "target {name} has no replay test"
        );
        let target = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(target.is_file(), "{} is missing", target.display());
    }
}

/// The harness's own signer against a token minted by PyJWT: if the HMAC or
/// base64url here were wrong, the token target's signed inputs would all be
/// refused and the fuzzer would never get past the signature check.
#[test]
fn harness_signer_matches_pyjwt() {
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pyjwt_hs256.jwt"),
    )
    .expect("PyJWT fixture");
    let (signed, sig) = fixture.trim().rsplit_once('.').unwrap();
    assert_eq!(
        checks::base64url(&checks::hmac_sha256(checks::SECRET, signed.as_bytes())),
        sig
    );
    // FIPS 180-4 example: SHA-256("abc").
    assert_eq!(
        checks::sha256(b"abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
