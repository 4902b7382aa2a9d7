#!/usr/bin/env bash
# Installs what the browser end-to-end test (tests/browser_e2e.rs) needs:
#   - Debian's chromium (/usr/bin/chromium) and qemu-system-x86 (qemu-system-x86_64 with the
#     SeaBIOS and VGA option ROMs it boots with),
#   - Debian's libnss3-tools (certutil), for the wss:// test's CA in Chromium's NSS database,
#   - noVNC and playwright-core from npm, pinned by package.json + package-lock.json.
#   - LabOrchestrator's own Python code from PyPI, for the token and differential tests
#     (tests/python/setup.sh, run at the end).
# Idempotent and quick when everything is already there. Run as root (CI does) or with sudo.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf 'e2e setup: %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------------------------
pkgs=()
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
command -v qemu-system-x86_64 >/dev/null 2>&1 || pkgs+=(qemu-system-x86)
# The ROMs a disk-less x86 VM needs to show its BIOS screen (normally pulled by qemu-system-x86;
# checked separately so a trimmed install is repaired too).
[[ -e /usr/share/seabios/bios-256k.bin ]] || pkgs+=(seabios)
[[ -e /usr/share/seabios/vgabios-stdvga.bin ]] || pkgs+=(seabios)
# certutil, to put the wss:// test's CA into a throw-away NSS database that Chromium trusts.
command -v certutil >/dev/null 2>&1 || pkgs+=(libnss3-tools)

if ((${#pkgs[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { log "need root to install: ${pkgs[*]}"; exit 1; }
        sudo=(sudo)
    fi
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    log "installing Debian packages: ${pkgs[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
else
    log "chromium and qemu-system-x86_64 already installed"
fi

# --- npm packages -----------------------------------------------------------------------------
command -v npm >/dev/null 2>&1 || { log "npm not found (Node.js 18+ is needed)"; exit 1; }
cd "$here"
# Skip npm when node_modules already matches the lockfile (npm writes its own copy of the
# lockfile into node_modules/.package-lock.json on every install).
if [[ -f package-lock.json && -f node_modules/.package-lock.json \
      && -f node_modules/@novnc/novnc/package.json && -f node_modules/playwright-core/package.json \
      && ! package-lock.json -nt node_modules/.package-lock.json \
      && ! package.json -nt node_modules/.package-lock.json ]]; then
    log "node_modules up to date"
elif [[ -f package-lock.json ]]; then
    log "npm ci"
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but be explicit.
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
else
    log "npm install (no lockfile yet: creating package-lock.json)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error
fi

log "chromium: $(chromium --version 2>/dev/null || echo '?')"
log "qemu: $(qemu-system-x86_64 --version | head -n1)"
log "noVNC: $(node -p "require('./node_modules/@novnc/novnc/package.json').version")," \
    "playwright-core: $(node -p "require('./node_modules/playwright-core/package.json').version")"

# --- LabOrchestrator's Python code (token issuer, the Python proxy) ---------------------------
bash "$here/../python/setup.sh"
