#!/usr/bin/env bash
# Bounded fuzzing of every target, for CI and for a quick local look.
#
#   bash fuzz/run.sh                      # every target, 30 s each
#   FUZZ_SECONDS=300 bash fuzz/run.sh token frame_scanner_client
#
# Each target runs over a temporary COPY of its committed corpus
# (fuzz/corpus/<target>/), so new inputs the fuzzer finds never grow the
# repository. A crash or a broken invariant fails the script; the input that
# caused it is left in fuzz/artifacts/<target>/ and its path is printed. To
# keep it as a regression, minimise it (`cargo fuzz tmin <target> <file>`),
# copy it to fuzz/regressions/<target>/ with a descriptive name, and plain
# `cargo test --test fuzz_corpus` replays it from then on.
#
# Environment:
#   FUZZ_SECONDS    time per target (default 30)
#   FUZZ_SANITIZER  address (default) or none (about twice the executions)
#   FUZZ_KEEP_TMP   set to keep the temporary corpora (their path is printed)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"

seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
# cargo-fuzz passes nightly-only flags (-Z sanitizer, coverage options) to
# rustc; this lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir "$here")
fi
[ "${#targets[@]}" -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }

echo "== building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build --fuzz-dir "$here" --sanitizer "$sanitizer"
echo "   built in $((SECONDS - build_start)) s"
# The binaries are run directly (not through `cargo fuzz run`), so the build
# above is the only one: nothing is rebuilt between targets even if sources
# change while the script runs.
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$here/target/$triple/release"
if [ "$sanitizer" = address ]; then
  # What `cargo fuzz run` sets for ASan builds.
  export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/kvp-fuzz.XXXXXX")"
if [ -z "${FUZZ_KEEP_TMP:-}" ]; then
  trap 'rm -rf "$tmp"' EXIT
else
  echo "   temporary corpora in $tmp"
fi

failed=()
for target in "${targets[@]}"; do
  seeds="$here/corpus/$target"
  if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
    echo "no seed corpus for $target in $seeds" >&2
    failed+=("$target (no corpus)")
    continue
  fi
  work="$tmp/corpus/$target"
  mkdir -p "$work"
  cp -R "$seeds/." "$work/"
  # Past findings are seeds too: they sit next to the paths that broke.
  if [ -d "$here/regressions/$target" ]; then
    cp -R "$here/regressions/$target/." "$work/"
  fi
  artifacts="$here/artifacts/$target"
  mkdir -p "$artifacts"
  log="$tmp/$target.log"
  before="$(find "$artifacts" -type f | sort)"

  echo "== fuzzing $target for ${seconds} s ($(ls "$seeds" | wc -l) seeds)"
  status=0
  "$bin_dir/$target" "$work" \
    -max_total_time="$seconds" \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -print_final_stats=1 \
    -artifact_prefix="$artifacts/" \
    >"$log" 2>&1 || status=$?

  # libFuzzer's last status line and final stats: coverage and speed.
  grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true

  new="$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) || true)"
  if [ "$status" -ne 0 ] || [ -n "$new" ]; then
    echo "!! $target FAILED (exit $status)"
    # The panic message or sanitizer report, then where the input is.
    grep -E -A12 "panicked at|ERROR: (libFuzzer|AddressSanitizer)|==ERROR" "$log" | head -n 40 || tail -n 40 "$log"
    if [ -n "$new" ]; then
      echo "   crash input(s):"
      sed 's/^/     /' <<<"$new"
      echo "   reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $target <file>"
    else
      tail -n 20 "$log"
    fi
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "== fuzzing failed: ${failed[*]}"
  exit 1
fi
echo "== fuzzing passed: ${targets[*]} (${seconds} s each)"
