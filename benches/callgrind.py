#!/usr/bin/env python3
"""User-space instructions per round trip and per session, counted by callgrind.

    python3 benches/callgrind.py [--binary PATH] [--trips N] [--sessions M] [--nginx] [--tls]

Runs the proxy binary (default: a release build with symbols, made here in
target/profiling) under `valgrind --tool=callgrind` twice per workload, in
local dev mode in front of a small echo upstream written below, and reports
the difference divided by the extra work, so start-up and shutdown cancel
out:

- round trips: one session, then N 32-byte echo round trips on it;
- sessions: M sessions one after another, each connect, upgrade with an
  HS256 token, one echo, close (what `benches/nginx/` calls a new session).

With `--tls` the client speaks TLS to the proxy and the proxy TLS to the
upstream (`wss://`), both TLS 1.3 on a certificate made here with `openssl`
(the client and the upstream are Python's ssl, whose work is not counted):
the path of `BENCH_TLS=1 BENCH_CLIENT_TLS=1` in `benches/nginx/`, each
session a full handshake both ways.

With `--nginx` the same is counted for nginx (one process, `master_process
off`, `proxy_buffering off`, the Upgrade headers, a location mapping
/TOKEN/VMI to the upstream as `benches/nginx/` does; it checks no token).

The callgrind files stay in target/profiling for `callgrind_annotate`.
Counts are exact and repeatable (unlike times on a shared VM), but callgrind
runs SHA-1/SHA-256 in their portable code (no SHA-NI), which inflates the
token check's share. Needs valgrind (`apt-get install valgrind`).
"""

import argparse
import base64
import hashlib
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "target", "profiling")


def recv_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def recv_exact(s, n, buf):
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    return buf[:n], buf[n:]


def read_frame(s, buf):
    head, buf = recv_exact(s, 2, buf)
    opcode, masked, length = head[0] & 15, head[1] & 128, head[1] & 127
    if length == 126:
        ext, buf = recv_exact(s, 2, buf)
        length = struct.unpack(">H", ext)[0]
    key = b""
    if masked:
        key, buf = recv_exact(s, 4, buf)
    payload, buf = recv_exact(s, length, buf)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, buf


def frame(opcode, payload, mask):
    head = bytes([0x80 | opcode, (0x80 if mask else 0) | len(payload)])
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def serve_upstream(conn, tls=None):
    """Echo every frame back (unmasked) after a real 101."""
    try:
        if tls:
            conn = tls.wrap_socket(conn, server_side=True)
        head, buf = recv_head(conn)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        while True:
            opcode, payload, buf = read_frame(conn, buf)
            conn.sendall(frame(opcode, payload, False))
            if opcode == 8:
                break
    except (EOFError, OSError, StopIteration):
        pass
    conn.close()


def upstream(listener, tls):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_upstream, args=(conn, tls), daemon=True).start()


def make_pki(d):
    """A CA and a certificate for localhost and 127.0.0.1 it signed, in `d`:
    ca.pem, cert.pem, key.pem."""
    def run(*argv):
        subprocess.check_call(argv, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "leaf.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "leaf.ext")


def session(port, path, echoes, tls=None):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        s = tls.wrap_socket(s, server_hostname="localhost")
    s.sendall(
        (
            "GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % path
        ).encode()
    )
    head, buf = recv_head(s)
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise SystemExit("upgrade refused: %r" % head)
    for _ in range(echoes):
        s.sendall(frame(2, b"x" * 32, True))
        _, payload, buf = read_frame(s, buf)
        if payload != b"x" * 32:
            raise SystemExit("echo mismatch")
    s.sendall(frame(8, struct.pack(">H", 1000), True))
    opcode, _, buf = read_frame(s, buf)
    if opcode != 8:
        raise SystemExit("no close answer")
    s.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NGINX_CONF = """worker_processes 1; master_process off; daemon off;
pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/a; proxy_temp_path {d}/b; fastcgi_temp_path {d}/c;
  uwsgi_temp_path {d}/d; scgi_temp_path {d}/e;
  server {{
    listen 127.0.0.1:{port};
    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_buffering off;
    location ~ ^/[^/]+/(?<vmi>[^/]+)$ {{ proxy_pass http://127.0.0.1:{up}/x/$vmi/vnc; }}
  }}
}}
"""


def proxy_command(binary, env):
    """The proxy's command line and the path a client asks for."""
    token = subprocess.check_output(
        [binary, "token", "--vmi", "vm1", "--namespace", "ns"], env=env
    ).decode().strip()
    return [binary], "/%s/vm1" % token


def nginx_command(upstream_port, port):
    d = os.path.join(OUT, "nginx")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(d=d, port=port, up=upstream_port))
    return ["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")], "/token/vm1"


def measure(command, env, sessions, echoes, out, tls=None):
    """Instructions callgrind counted in the server that `command(port)`
    starts for `sessions` sessions of `echoes` round trips each (over TLS
    with the client context `tls`)."""
    port = free_port()
    env = dict(env, PORT=str(port))
    argv, path = command(port)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out] + argv,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("the proxy did not start listening")
        for _ in range(sessions):
            session(port, path, echoes, tls)
        time.sleep(0.3)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    found = re.search(rb"Collected : (\d+)", err)
    if not found:
        raise SystemExit("no count from callgrind:\n" + err.decode(errors="replace"))
    # The probe connection above counts as one short session in both runs.
    return int(found.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", help="proxy binary (default: build one with symbols)")
    ap.add_argument("--trips", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--nginx", action="store_true", help="count nginx instead")
    ap.add_argument("--tls", action="store_true", help="TLS to the client and to the upstream")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    binary = args.binary
    if not binary and not args.nginx:
        env = dict(
            os.environ,
            CARGO_PROFILE_RELEASE_STRIP="false",
            CARGO_PROFILE_RELEASE_DEBUG="1",
        )
        subprocess.check_call(
            ["cargo", "build", "--release", "--target-dir", OUT], cwd=REPO, env=env
        )
        binary = os.path.join(OUT, "release", "kubevirt-vnc-proxy")
    if args.tls and args.nginx:
        raise SystemExit("--tls counts our proxy only")
    server_tls = client_tls = None
    if args.tls:
        pki = os.path.join(OUT, "pki")
        os.makedirs(pki, exist_ok=True)
        make_pki(pki)
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(os.path.join(pki, "cert.pem"), os.path.join(pki, "key.pem"))
        client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.load_verify_locations(os.path.join(pki, "ca.pem"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    threading.Thread(target=upstream, args=(listener, server_tls), daemon=True).start()
    upstream_port = listener.getsockname()[1]
    env = dict(
        os.environ,
        LOCAL_DEV_MODE="true",
        WS_REMOTE_URL="ws://127.0.0.1:%d" % upstream_port,
        SECRET_KEY="s" * 40,
        LOGLEVEL="WARNING",
    )
    if args.tls:
        env.update(
            WS_REMOTE_URL="wss://localhost:%d" % upstream_port,
            UPSTREAM_CA_FILE=os.path.join(pki, "ca.pem"),
            TLS_CERT_FILE=os.path.join(pki, "cert.pem"),
            TLS_KEY_FILE=os.path.join(pki, "key.pem"),
        )
    if args.nginx:
        name = "nginx"

        def command(port):
            return nginx_command(upstream_port, port)
    else:
        name = "callgrind-tls" if args.tls else "callgrind"

        def command(port):
            return proxy_command(binary, env)
    files = {w: os.path.join(OUT, "%s.%s" % (name, w)) for w in ("base", "trips", "sessions")}
    base = measure(command, env, 1, 1, files["base"], client_tls)
    trips = measure(command, env, 1, 1 + args.trips, files["trips"], client_tls)
    sessions = measure(command, env, 1 + args.sessions, 1, files["sessions"], client_tls)
    print("server: %s" % (name if args.nginx else binary))
    print("instructions per round trip: %.0f" % ((trips - base) / args.trips))
    print("instructions per session: %.0f" % ((sessions - base) / args.sessions))
    print("callgrind files: %s/%s.{base,trips,sessions}" % (OUT, name))


if __name__ == "__main__":
    sys.exit(main())
