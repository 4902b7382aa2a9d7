#!/usr/bin/env bash
# Installs LabOrchestrator's own Python code from PyPI, so the tests mint tokens with the real
# issuer and compare the proxy with the Python program it replaces (tests/labo_tokens.rs,
# tests/differential.rs). One virtualenv each, under target/python/:
#
#   auth-0.0.5   lab-orchestrator-lib-auth==0.0.5 (what lab-orchestrator-lib 1.0.1 and the Python
#                proxy pin: production), with its own dependency PyJWT
#   auth-2.2.0   lab-orchestrator-lib-auth==2.2.0 (the latest), plus cryptography for RS256
#   ws-proxy     the Python proxy: lab-orchestrator-ws-proxy 1.0.0 and -ws-proxy-lib 1.0.0 with
#                lab-orchestrator-lib-auth 0.0.5, websockets 10.0 and PyJWT 2.1.0, installed with
#                --no-deps: their pins include asyncio==3.4.3, a 2015 backport that breaks the
#                asyncio of Python 3.11; and with lib-auth 2.x the proxy closes every valid
#                session with 1011 (it takes verify_auth_token's (bool, data) tuple for the data).
#
# Idempotent: a virtualenv whose requirements are already installed is left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="$root/target/python"
python="${PYTHON:-python3}"

log() { printf 'python setup: %s\n' "$*" >&2; }

command -v "$python" >/dev/null 2>&1 || { log "$python not found (Python 3.8-3.11 is needed)"; exit 1; }
mkdir -p "$dest"

# venv NAME PIP_FLAGS -- REQUIREMENT...
venv() {
    local name="$1"; shift
    local flags=()
    while [[ "$1" != "--" ]]; do flags+=("$1"); shift; done
    shift
    local dir="$dest/$name" stamp want
    stamp="$dir/.installed"
    want="${flags[*]:-} $*"
    if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "$name up to date"
        return
    fi
    log "creating $name: $*"
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check "${flags[@]}" "$@"
    printf '%s' "$want" >"$stamp"
}

venv auth-0.0.5 -- lab-orchestrator-lib-auth==0.0.5
venv auth-2.2.0 -- lab-orchestrator-lib-auth==2.2.0 cryptography==50.0.2
venv ws-proxy --no-deps -- lab-orchestrator-ws-proxy==1.0.0 lab-orchestrator-ws-proxy-lib==1.0.0 \
    lab-orchestrator-lib-auth==0.0.5 websockets==10.0 PyJWT==2.1.0

for name in auth-0.0.5 auth-2.2.0 ws-proxy; do
    log "$name: $("$dest/$name/bin/pip" list --format=freeze 2>/dev/null \
        | grep -iE '^(lab-orchestrator|pyjwt|websockets|cryptography)' | tr '\n' ' ')"
done
