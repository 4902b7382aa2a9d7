#!/usr/bin/env bash
# Autobahn|Testsuite through the proxy (issue 4, point 9).
#
# Runs the suite's fuzzing client twice against the same reference echo
# upstream (autobahntestsuite's echo server): once directly, once through the
# proxy, then compares the verdicts case by case (compare.py). Compression
# cases (12.*, 13.*) are excluded: the proxy negotiates no extensions.
#
#   bash tests/conformance/run.sh
#
# Everything listens on 127.0.0.1 only, every process started here is killed
# by its PID on exit, each suite pass is bounded by AUTOBAHN_TIMEOUT seconds.
# Outputs: target/autobahn/{direct,proxied}/ (index.json, index.html, one
# report per case, wstest.log), target/autobahn/summary.md.
#
# Environment:
#   PYTHON27          a Python 2.7 interpreter (default: pyenv's 2.7.18, then
#                     python2.7 on PATH)
#   AUTOBAHN_CASES    JSON list of cases to run (default ["*"])
#   AUTOBAHN_TIMEOUT  seconds allowed for each pass (default 1200)
#   AUTOBAHN_ECHO_FAIL_BY_DROP=1
#                     run the echo upstream with Autobahn's server default,
#                     failing connections by a TCP reset instead of a close
#                     frame (see echoserver.py: verdicts then differ by design)
#   AUTOBAHN_STRICT=1 fail on every verdict that differs, including those
#                     explained in known-differences.txt
#   PROXY_LOGLEVEL    the proxy's LOGLEVEL (default WARNING)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/conformance
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
venv=$target/autobahn-venv
out=$target/autobahn
cases=${AUTOBAHN_CASES:-'["*"]'}
pass_timeout=${AUTOBAHN_TIMEOUT:-1200}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- Python 2.7 and the suite -------------------------------------------------
py27=${PYTHON27:-}
if [ -z "$py27" ]; then
  for c in "$HOME/.pyenv/versions/2.7.18/bin/python" python2.7; do
    if command -v "$c" >/dev/null 2>&1; then py27=$(command -v "$c"); break; fi
  done
fi
if [ -z "$py27" ] || ! "$py27" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
  echo "run.sh: Autobahn|Testsuite needs Python 2.7, and none was found" >&2
  echo "  (looked for PYTHON27, ~/.pyenv/versions/2.7.18/bin/python, python2.7 on PATH;" >&2
  echo "   'pyenv install 2.7.18' provides one)" >&2
  exit 1
fi

tmp=$(mktemp -d)
pids=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local pid live=()
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && live+=("$pid"); done
  for pid in "${live[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The venv is reused while it matches the pinned lists; any change to them
# (or a broken venv) reinstalls.
stamp=$({ cat "$here/requirements-py27.txt" "$here/constraints-build-py27.txt"; echo "$py27"; } | sha256sum | cut -c1-16)
if [ -x "$venv/bin/wstest" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$stamp" ] \
  && "$venv/bin/python" -c 'import autobahntestsuite, wsaccel' 2>/dev/null; then
  echo "== Autobahn|Testsuite: reusing $venv"
else
  echo "== Autobahn|Testsuite: installing into $venv (Python 2.7: $py27)"
  t0=$(now)
  rm -rf "$venv"
  # virtualenv itself, in a throwaway directory: nothing lands in the
  # interpreter's own site-packages or in ~/.local.
  "$py27" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$tmp/virtualenv" 'virtualenv==20.15.1' 2> >(grep -v DEPRECATION >&2)
  PYTHONPATH="$tmp/virtualenv" VIRTUALENV_OVERRIDE_APP_DATA="$tmp/virtualenv-data" \
    "$py27" -m virtualenv --quiet --no-periodic-update "$venv"
  PIP_CONSTRAINT="$PWD/$here/constraints-build-py27.txt" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    -r "$here/requirements-py27.txt" 2> >(grep -v DEPRECATION >&2)
  "$venv/bin/pip" check --disable-pip-version-check 2> >(grep -v DEPRECATION >&2)
  echo "$stamp" >"$venv/.stamp"
  echo "   installed in $(since "$t0") s"
fi
"$venv/bin/wstest" --autobahnversion 2>&1 | sed 's/^/   /'

mkdir -p "$out"

# --- the proxy -----------------------------------------------------------------
echo "== building the proxy"
cargo build --quiet --release --bin kubevirt-vnc-proxy
proxy_bin=$target/release/kubevirt-vnc-proxy

# --- the reference echo upstream -------------------------------------------------
: >"$tmp/echo.out"
echo_args=()
[ "${AUTOBAHN_ECHO_FAIL_BY_DROP:-0}" = 1 ] && echo_args+=(--fail-by-drop)
"$venv/bin/python" -u "$here/echoserver.py" "${echo_args[@]}" >>"$tmp/echo.out" 2>&1 &
pids+=($!)
echo_port=""
for _ in $(seq 1 300); do
  echo_port=$(sed -n 's/^PORT \([0-9]*\) .*$/\1/p' "$tmp/echo.out")
  [ -n "$echo_port" ] && break
  kill -0 "${pids[-1]}" 2>/dev/null || break
  sleep 0.1
done
[ -n "$echo_port" ] || { cat "$tmp/echo.out" >&2; echo "run.sh: the echo server did not start" >&2; exit 1; }
echo "== echo upstream on 127.0.0.1:$echo_port ($(sed -n 's/^PORT [0-9]* //p' "$tmp/echo.out"))"

# --- the proxy in front of it ----------------------------------------------------
proxy_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
secret=$(head -c 48 /dev/urandom | base64 | tr -d '\n=+/')
# The largest frame in the suite is 16 MiB (9.1.6, 9.2.6); this is the
# proxy's default limit, stated so the run does not depend on the default.
SECRET_KEY=$secret LOCAL_DEV_MODE=true WS_REMOTE_URL=ws://127.0.0.1:$echo_port \
  API_PATH=/ UPSTREAM_SUBPROTOCOLS='' HOST=127.0.0.1 PORT=$proxy_port \
  MAX_FRAME_SIZE=67108864 SHUTDOWN_GRACE_SECONDS=1 LOGLEVEL=${PROXY_LOGLEVEL:-WARNING} \
  "$proxy_bin" >"$out/proxy.log" 2>&1 &
pids+=($!)
up=""
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null; then up=1; break; fi
  kill -0 "${pids[-1]}" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || { cat "$out/proxy.log" >&2; echo "run.sh: the proxy did not start" >&2; exit 1; }
token=$(SECRET_KEY=$secret "$proxy_bin" token --vmi echo --namespace lab-ns --ttl 3600)
echo "== proxy on 127.0.0.1:$proxy_port (log: $out/proxy.log)"

# --- the two passes --------------------------------------------------------------
declare -A took
run_pass() { # name url
  local name=$1 url=$2 t0 rc=0
  rm -rf "${out:?}/$name"
  mkdir -p "$out/$name"
  cat >"$tmp/$name.json" <<EOF
{
  "outdir": "$out/$name",
  "servers": [{"agent": "$name", "url": "$url"}],
  "cases": $cases,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
  echo "== fuzzingclient, $name: ${url//$token/<token>}"
  t0=$(now)
  # The log names the URL; the token is masked there (the per-case reports
  # keep the request as sent; the token dies with this run's random secret).
  timeout "$pass_timeout" "$venv/bin/wstest" -m fuzzingclient -s "$tmp/$name.json" 2>&1 \
    | sed -u "s#$token#<token>#g" >"$out/$name/wstest.log" || rc=$?
  took[$name]=$(since "$t0")
  echo "   $(grep -c '^Running test case ID' "$out/$name/wstest.log" || true) cases in ${took[$name]} s (exit $rc)"
  [ "$rc" = 0 ] || { tail -n 20 "$out/$name/wstest.log" >&2; echo "run.sh: the $name pass failed or timed out" >&2; exit 1; }
  [ -f "$out/$name/index.json" ] || { echo "run.sh: the $name pass wrote no index.json" >&2; exit 1; }
}
run_pass direct "ws://127.0.0.1:$echo_port"
run_pass proxied "ws://127.0.0.1:$proxy_port/$token/echo"

# --- the verdicts ------------------------------------------------------------------
echo "== comparing verdicts (summary: $out/summary.md)"
known=(--known "$here/known-differences.txt")
[ "${AUTOBAHN_STRICT:-0}" = 1 ] && known=()
rc=0
python3 "$here/compare.py" "$out/direct/index.json" "$out/proxied/index.json" \
  --markdown "$out/summary.md" "${known[@]}" || rc=$?
{
  echo
  echo "Run by \`bash tests/conformance/run.sh\` on $(date -u +%Y-%m-%dT%H:%MZ):"
  echo "$("$venv/bin/wstest" --autobahnversion 2>&1 | paste -sd, | sed 's/,/, /g'), echo upstream" \
    "$(sed -n 's/^PORT [0-9]* //p' "$tmp/echo.out"); direct pass ${took[direct]} s," \
    "proxied pass ${took[proxied]} s."
} >>"$out/summary.md"
exit "$rc"
