#!/usr/bin/env bash
# Build the FROM-scratch image (deploy/Containerfile.scratch) and check it the
# way a cluster would run it, on a machine that reaches no container registry
# and cannot start containers (.ci/run runs this after the deploy checks):
#
#   1. a statically linked release binary (glibc with crt-static; see the
#      Containerfile for why), checked with `file` and `ldd`;
#   2. the image, with `buildah --storage-driver vfs bud` (buildah is installed
#      from apt when missing), then pushed to an OCI directory and its one
#      layer unpacked into a root filesystem;
#   3. the size of that layer and root filesystem against MAX_IMAGE_BYTES
#      (5 MiB);
#   4. the image's own entrypoint and user (read from its config), run from
#      that root filesystem with chroot, as `podman run` would if it could
#      (crun fails on setrlimit and cgroups here): --version, check-config
#      with a good and a bad configuration, name resolution, and one real
#      session through the demo's stand-in upstream with the example client.
#
#   bash deploy/build-scratch-image.sh
#   IMAGE=registry.example.com/kubevirt-vnc-proxy:0.1.0-scratch bash deploy/build-scratch-image.sh
#
# Needs root (chroot, buildah's vfs storage, apt). Everything listens on
# 127.0.0.1, every wait is bounded, and every process it starts is stopped by
# its PID. Work files go to target/scratch-image/.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-localhost/kubevirt-vnc-proxy:scratch}
max_bytes=${MAX_IMAGE_BYTES:-$((5 * 1024 * 1024))}
target=x86_64-unknown-linux-gnu
work=target/scratch-image
say() { echo "build-scratch-image.sh: $*"; }
die() { echo "build-scratch-image.sh: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (chroot, buildah's storage and apt need it)"

# Processes started below, stopped by PID on any exit.
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# The tools this needs beyond the Rust toolchain, from Debian when missing.
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v file >/dev/null 2>&1 || missing+=(file)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} (Debian's packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 1. the static binary ----------------------------------------------------
# --target, even though it is the host's: with it, RUSTFLAGS reach only the
# binary and its dependencies, not build scripts and proc-macros (which must
# stay dynamic, being loaded by the compiler), and the output goes to
# target/$target/ instead of replacing target/release's dynamic binary.
say "static release binary (RUSTFLAGS=-C target-feature=+crt-static, --target $target)"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin kubevirt-vnc-proxy
bin=target/$target/release/kubevirt-vnc-proxy
file "$bin"
file -b "$bin" | grep -Eq 'static(-pie)? linked' || die "$bin is not statically linked"
# ldd says "not a dynamic executable" (exit 1) or "statically linked" (exit 0,
# for static-pie): anything naming a library means it is dynamic.
ldd_out=$(ldd "$bin" 2>&1 || true)
echo "ldd: $ldd_out"
if grep -q '=>' <<<"$ldd_out"; then die "$bin links shared libraries"; fi

# --- 2. the image and its root filesystem ------------------------------------
rm -rf "$work"
mkdir -p "$work/context"
# The build context holds only the binary: the repository (with target/) would
# be copied into buildah's storage for nothing.
install -m 0755 "$bin" "$work/context/kubevirt-vnc-proxy"
say "buildah bud -f deploy/Containerfile.scratch -t $image"
# The previous build under this tag would stay in the storage, untagged, at
# every run: remove it first.
buildah --storage-driver vfs rmi "$image" >/dev/null 2>&1 || true
buildah --storage-driver vfs bud --quiet -f deploy/Containerfile.scratch -t "$image" "$work/context"
# The image as a registry would receive it: manifest, config, layer blobs.
buildah --storage-driver vfs push --quiet "$image" "dir:$work/oci"
manifest=$work/oci/manifest.json
# Read with python3 (already a CI dependency for deploy/check.py): no jq here.
read -r layers config_digest < <(python3 - "$manifest" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(len(m["layers"]), m["config"]["digest"].split(":", 1)[1])
EOF
)
[ "$layers" = 1 ] || die "expected one layer (FROM scratch + one COPY), the manifest lists $layers"
layer_digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["digest"].split(":",1)[1])' "$manifest")
layer=$work/oci/$layer_digest
config=$work/oci/$config_digest
read -r entrypoint user < <(python3 - "$config" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))["config"]
ep = c.get("Entrypoint") or []
if len(ep) != 1:
    sys.exit(f"entrypoint must be one path, got {ep}")
print(ep[0], c.get("User", ""))
EOF
)
say "image config: entrypoint $entrypoint, user $user"
[ "$user" = 65532:65532 ] || die "the image must run as 65532:65532 (deployment.yaml), its config says '$user'"
rootfs=$work/rootfs
mkdir -p "$rootfs"
# Whatever the layer's compression, tar detects it.
tar -xf "$layer" -C "$rootfs"
# The directory made by mkdir is the image's /, which the runtime makes 0755
# (uid 65532 must traverse it).
chmod 0755 "$rootfs"
[ -x "$rootfs$entrypoint" ] || die "the entrypoint $entrypoint is not in the layer"

# --- 3. the size ------------------------------------------------------------
layer_bytes=$(stat -c %s "$layer")
rootfs_bytes=$(du -sb "$rootfs" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
say "image size: layer $layer_bytes bytes ($(mib "$layer_bytes")), root filesystem $rootfs_bytes bytes ($(mib "$rootfs_bytes")), target <= $(mib "$max_bytes")"
for b in "$layer_bytes" "$rootfs_bytes"; do
  [ "$b" -le "$max_bytes" ] || die "the image is above the $(mib "$max_bytes") target"
done

# --- 4. run it as the cluster would ------------------------------------------
chroot_bin=$(command -v chroot)
timeout_bin=$(command -v timeout)
# Every run starts from an empty environment (`env -i`), as a container does:
# only what each check sets. env, timeout and chroot each exec the next, so the
# PID of a run started with & is the proxy's own.
run_as=("$chroot_bin" "--userspec=$user" "$rootfs" "$entrypoint")
secret='test-secret-that-is-at-least-32-bytes-long!!'  # the demo's (tests/support/tokens.rs)

say "--version"
version=$(env -i "$timeout_bin" 10 "${run_as[@]}" --version)
echo "$version"
expected="kubevirt-vnc-proxy $(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ "$version" = "$expected" ] || die "--version printed '$version', expected '$expected'"

say "check-config: a valid local dev configuration exits 0"
env -i SECRET_KEY="$secret" LOCAL_DEV_MODE=true WS_REMOTE_URL=ws://127.0.0.1:8001 \
  "$timeout_bin" 10 "${run_as[@]}" check-config || die "check-config refused a valid configuration"
say "check-config: a bad one (PORT out of range, secret too short) exits 2"
rc=0
env -i SECRET_KEY=short LOCAL_DEV_MODE=true WS_REMOTE_URL=ws://127.0.0.1:8001 PORT=70000 \
  "$timeout_bin" 10 "${run_as[@]}" check-config >"$work/bad-config.log" 2>&1 || rc=$?
cat "$work/bad-config.log"
[ "$rc" = 2 ] || die "check-config exited $rc on a bad configuration, expected 2"
grep -q 'PORT' "$work/bad-config.log" || die "check-config did not name PORT"

# The static binary's getaddrinfo: glibc 2.34+ has the "files" and "dns"
# sources built in, so /etc/hosts works without NSS modules. The image has no
# /etc/hosts of its own (the kubelet mounts one into every container), so
# `localhost` fails from the bare image and resolves once a hosts file is there.
say "name resolution: localhost without /etc/hosts fails (exit 2), with one resolves"
rc=0
env -i SECRET_KEY="$secret" LOCAL_DEV_MODE=true WS_REMOTE_URL=ws://localhost:8001 \
  "$timeout_bin" 10 "${run_as[@]}" check-config >"$work/resolve.log" 2>&1 || rc=$?
if [ "$rc" != 2 ] || ! grep -q 'cannot resolve the upstream' "$work/resolve.log"; then
  cat "$work/resolve.log"
  die "expected 'cannot resolve' (exit 2) for localhost with no /etc/hosts, got exit $rc"
fi
mkdir "$rootfs/etc"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n' >"$rootfs/etc/hosts"
env -i SECRET_KEY="$secret" LOCAL_DEV_MODE=true WS_REMOTE_URL=ws://localhost:8001 \
  "$timeout_bin" 10 "${run_as[@]}" check-config || die "localhost did not resolve through the kubelet-style /etc/hosts"
rm -r "${rootfs:?}/etc"

# A real session: the demo's stand-in KubeVirt upstream (outside the chroot),
# the image's proxy in front of it (inside), the example client through it.
say "a session through the image's proxy to the demo's stand-in upstream"
# The same command as .ci/run's demo step, so the two share their build.
cargo build --release --locked --examples
PORT=0 timeout 120 ./target/release/examples/demo >"$work/demo.log" 2>&1 &
pids+=($!)
standin=""
for _ in $(seq 1 100); do
  standin=$(grep -o 'stand-in KubeVirt VNC upstream on ws://127\.0\.0\.1:[0-9]*' "$work/demo.log" | grep -o '127.*' || true)
  [ -n "$standin" ] && break
  sleep 0.1
done
[ -n "$standin" ] || { cat "$work/demo.log"; die "the demo did not print its stand-in's address"; }
say "stand-in upstream on $standin"
# The token from the image's own `token` subcommand.
token=$(env -i SECRET_KEY="$secret" "$timeout_bin" 10 "${run_as[@]}" token --namespace lab-ns --vmi vnc-demo --ttl 600)
env -i SECRET_KEY="$secret" LOCAL_DEV_MODE=true WS_REMOTE_URL="ws://$standin" HOST=127.0.0.1 PORT=0 \
  METRICS_ADDR=127.0.0.1:0 SHUTDOWN_GRACE_SECONDS=2 \
  "$timeout_bin" 60 "${run_as[@]}" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
addr=""; metrics=""
for _ in $(seq 1 100); do
  addr=$(grep -o 'listening on 127\.0\.0\.1:[0-9]*' "$work/proxy.log" | grep -o '127.*' || true)
  metrics=$(grep -o 'serving /metrics, /healthz and /readyz on 127\.0\.0\.1:[0-9]*' "$work/proxy.log" | grep -o '127.*' || true)
  [ -n "$addr" ] && [ -n "$metrics" ] && break
  sleep 0.1
done
if [ -z "$addr" ] || [ -z "$metrics" ]; then
  cat "$work/proxy.log"
  die "the image's proxy did not say where it listens"
fi
say "image's proxy on $addr, probes on $metrics"
# The probes the Deployment's kubelet uses (plain HTTP/1.0 over bash's /dev/tcp: no curl needed).
for path in /healthz /readyz; do
  exec 3<>"/dev/tcp/${metrics%:*}/${metrics##*:}"
  printf 'GET %s HTTP/1.0\r\nHost: probe\r\n\r\n' "$path" >&3
  status=$(timeout 10 head -n 1 <&3 || true)
  exec 3<&-
  grep -q ' 200 ' <<<"$status" || die "GET $path answered '$status'"
  echo "GET $path: $status"
done
reply=$(printf 'hello through the image\n' | timeout 20 ./target/release/examples/client "ws://$addr/$token/vnc-demo") \
  || { echo "$reply"; cat "$work/proxy.log"; die "the client's session failed"; }
echo "$reply"
grep -q 'RFB 003.008' <<<"$reply" || die "no VNC greeting from the upstream through the image"
grep -q '< hello through the image' <<<"$reply" || die "the line typed did not come back through the image"
# SIGTERM to the proxy (chroot exec'd it, under timeout, which passes the
# signal on): it must drain and exit 0, as in a pod.
kill -TERM "$proxy_pid"
rc=0; wait "$proxy_pid" || rc=$?
[ "$rc" = 0 ] || { cat "$work/proxy.log"; die "the image's proxy exited $rc on SIGTERM, expected 0"; }
grep -q 'event=session' "$work/proxy.log" || { cat "$work/proxy.log"; die "the proxy logged no session"; }
say "image $image: $(mib "$layer_bytes") layer, static binary, entrypoint and user as deployment.yaml expects, a session relayed; all checks passed"
