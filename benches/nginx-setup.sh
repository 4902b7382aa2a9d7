#!/usr/bin/env bash
# Installs what `cargo bench --bench nginx` needs: nginx from Debian (nginx-light, falling back
# to nginx) and Debian's haproxy (the second reference). Idempotent: installs nothing when both
# binaries are already on PATH or in /usr/sbin. `apt-get update` runs only if the first install
# attempt fails (stale package lists).
set -euo pipefail

have_nginx() {
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
}
have_haproxy() {
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]
}

if ! have_nginx || ! have_haproxy; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx-setup: nginx is missing and apt-get is not available; install nginx yourself" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  install() {
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@"
  }
  # The packages' postinst tries to start the system service; without an init system (a
  # container) that fails harmlessly, and the bench never uses that instance.
  if ! have_nginx; then
    if ! install nginx-light && ! install nginx; then
      $sudo apt-get update
      install nginx-light || install nginx
    fi
  fi
  if ! have_haproxy; then
    if ! install haproxy; then
      $sudo apt-get update
      install haproxy
    fi
  fi
  # Stop system instances the packages may have started: the bench runs its own.
  if command -v systemctl >/dev/null 2>&1; then
    for svc in nginx haproxy; do
      if systemctl is-active --quiet "$svc" 2>/dev/null; then
        $sudo systemctl stop "$svc" || true
      fi
    done
  fi
fi
have_nginx || { echo "nginx-setup: nginx still not installed" >&2; exit 1; }
have_haproxy || { echo "nginx-setup: haproxy still not installed" >&2; exit 1; }
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

# The bench needs the WebSocket proxy and proxy_ssl (http_ssl_module) and regex locations (PCRE).
"$nginx_bin" -V 2>&1 | grep -q -- '--with-http_ssl_module' \
  || { echo "nginx-setup: $nginx_bin lacks http_ssl_module" >&2; exit 1; }
echo "nginx-setup: $("$nginx_bin" -v 2>&1) at $nginx_bin"
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
# HAProxy must terminate and originate TLS (the TLS variants). The output is read whole first:
# `grep -q` leaving the pipe early would fail it under pipefail.
haproxy_features=$("$haproxy_bin" -vv 2>&1 || true)
grep -q -- '+OPENSSL' <<<"$haproxy_features" \
  || { echo "nginx-setup: $haproxy_bin lacks SSL support" >&2; exit 1; }
echo "nginx-setup: $(head -1 <<<"$haproxy_features") at $haproxy_bin"

# 9,000 idle sessions hold ~18,000 descriptors in the bench process and in the proxy: this only
# helps when the bench runs from this same shell (`source`d); the bench also raises its own
# soft limit to the hard limit at start.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
