#!/usr/bin/env python3
"""Write the committed seed corpora under fuzz/corpus/<target>/.

Each seed is small and named after what it is. Run from anywhere with plain
python3 (standard library only); it rewrites the files it owns and leaves any
other file in the corpus directories alone. The input format of each target is
described in fuzz/checks.rs; the replay test (tests/fuzz_corpus.rs) checks
every file written here.
"""

import base64
import hashlib
import hmac
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
SECRET = b"test-secret-that-is-at-least-32-bytes-long!!"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read().strip()


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def sign(header, claims):
    signed = b64url(header.encode()) + "." + b64url(claims.encode())
    sig = hmac.new(SECRET, signed.encode(), hashlib.sha256).digest()
    return signed + "." + b64url(sig)


# --------------------------------------------------------------- request_head


def request(target="/TOKEN/ubuntu", extra="", method="GET", version="1.1",
            key=KEY, host="proxy.example:5001", eol="\r\n"):
    lines = [
        f"{method} {target} HTTP/{version}",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    head = eol.join(lines) + eol + extra + eol
    return head


def request_heads():
    tok = fixture("pyjwt_hs256.jwt")
    chrome = (
        f"GET /{tok}/ubuntu HTTP/1.1\r\n"
        "Host: console.lab.example\r\n"
        "Connection: Upgrade\r\n"
        "Pragma: no-cache\r\n"
        "Cache-Control: no-cache\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36\r\n"
        "Upgrade: websocket\r\n"
        "Origin: https://console.lab.example\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Accept-Encoding: gzip, deflate, br\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "\r\n"
    )
    write("request_head", "chrome_novnc_upgrade", chrome)
    firefox = (
        f"GET /{tok}/win-10 HTTP/1.1\r\n"
        "Host: 127.0.0.1:5001\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0\r\n"
        "Accept: */*\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Origin: http://127.0.0.1:8080\r\n"
        "Sec-WebSocket-Protocol: binary\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        "Connection: keep-alive, Upgrade\r\n"
        "Sec-Fetch-Mode: websocket\r\n"
        "Upgrade: websocket\r\n"
        "\r\n"
    )
    write("request_head", "firefox_keepalive_upgrade_binary_protocol", firefox)
    write("request_head", "prefix_and_query",
          request(target="/vnc/TOKEN/ubuntu?preserveSession=true"))
    write("request_head", "subprotocols_list",
          request(extra="Sec-WebSocket-Protocol: binary, base64 ,plain.kubevirt.io\r\n"))
    write("request_head", "bearer_subprotocol",
          request(target="/ubuntu/vm",
                  extra="Sec-WebSocket-Protocol: base64url.bearer.authorization.k8s.io.ZXlKaGJHY2lPaUpJVXpJMU5pSjku, binary\r\n"))
    write("request_head", "percent_encoded_names", request(target="/t%2Eok/vm%2d1%2E%2e"))
    write("request_head", "lowercase_header_names",
          request().replace("Upgrade: websocket", "upgrade: WebSocket")
          .replace("Connection: Upgrade", "connection: upgrade")
          .replace("Sec-WebSocket", "sec-websocket"))
    # A masked binary frame sent right behind the head (early data).
    frame = bytes([0x82, 0x83, 1, 2, 3, 4]) + bytes(b ^ k for b, k in zip(b"RFB", [1, 2, 3]))
    write("request_head", "early_frame_after_head", request().encode() + frame)
    write("request_head", "incomplete_head", request()[:-9])
    write("request_head", "refused_post", request(method="POST"))
    write("request_head", "refused_http10", request(version="1.0"))
    write("request_head", "refused_version_8_426",
          request().replace("Version: 13", "Version: 8"))
    write("request_head", "refused_short_key", request(key="c2hvcnQ="))
    write("request_head", "refused_duplicate_key", request(extra=f"Sec-WebSocket-Key: {KEY}\r\n"))
    write("request_head", "refused_duplicate_host", request(extra="Host: other\r\n"))
    write("request_head", "refused_content_length", request(extra="Content-Length: 5\r\n") + "hello")
    write("request_head", "refused_transfer_encoding", request(extra="Transfer-Encoding: chunked\r\n"))
    write("request_head", "refused_no_host", request().replace("Host: proxy.example:5001\r\n", ""))
    write("request_head", "refused_no_upgrade", request().replace("Upgrade: websocket\r\n", ""))
    write("request_head", "refused_bare_lf", request(eol="\n"))
    write("request_head", "refused_obs_fold", request(extra=" folded\r\n"))
    write("request_head", "refused_too_many_headers_431",
          request(extra="".join(f"X-H{i}: y\r\n" for i in range(70))))
    write("request_head", "large_cookie_header",
          request(extra="Cookie: " + "c" * 600 + "\r\n"))
    write("request_head", "refused_garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    # Probes, answered by the proxy itself (http::parse_request), as the
    # kubelet and Prometheus send them; and what is not a probe.
    write("request_head", "probe_healthz_kubelet",
          "GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:5001\r\nUser-Agent: kube-probe/1.30\r\n"
          "Accept: */*\r\nConnection: close\r\n\r\n")
    write("request_head", "probe_readyz_query", "GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    write("request_head", "probe_metrics_prometheus",
          "GET /metrics HTTP/1.1\r\nHost: 10.0.0.5:9090\r\nUser-Agent: Prometheus/2.53.0\r\n"
          "Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n\r\n")
    write("request_head", "probe_path_with_upgrade", request(target="/healthz"))
    write("request_head", "refused_probe_path_post", "POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    # The token in each other carrier (TOKEN_SOURCES), for the authorizer
    # with every source enabled.
    write("request_head", "token_in_query", request(target=f"/ubuntu?token={tok}"))
    write("request_head", "token_in_authorization",
          request(target="/ubuntu", extra=f"Authorization: Bearer {tok}\r\n"))
    write("request_head", "token_in_cookie",
          request(target="/ubuntu", extra=f"Cookie: theme=dark; vnc_token={tok}\r\n"))
    write("request_head", "token_in_subprotocol",
          request(target="/ubuntu", extra="Sec-WebSocket-Protocol: binary, "
                  f"base64url.bearer.authorization.k8s.io.{b64url(tok.encode())}\r\n"))


# ---------------------------------------------------------------------- route


def routes():
    tok = fixture("pyjwt_hs256.jwt")
    seeds = {
        "jwt_and_vmi": f"/{tok}/ubuntu",
        "prefix_query": "/vnc/tok/ubuntu?preserveSession=true",
        "query_with_escapes": "/tok/vm?preserveSession=true&x=%26%3D&token=abc",
        "dot_dot_escaped": "/t/%2e%2e",
        "double_encoded_slash": "/t/a%252Fb",
        "encoded_slash": "/t/a%2Fb",
        "broken_escape": "/t/%zz",
        "truncated_escape": "/t/%4",
        "non_utf8_escape": "/t/%C3",
        "utf8_escape": "/t/%C3%A9",
        "empty_token": "//vm",
        "three_segments": "/a/b/c",
        "no_leading_slash": "tok/vm",
        "trailing_slash": "/tok/vm/",
        "subdomain_vmi": "/t/a.b-c.d",
        "uppercase_vmi": "/t/Ubuntu",
        "label_64": "/t/" + "a" * 64,
        "subdomain_254": "/t/" + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]),
        "plus_is_literal": "/t+k/v+m",
        "only_query": "/?a=b",
        "query_escaped_value": "/t/vm?preserveSession=a%26b%3Dc+d&other=1",
        "query_escaped_name_and_empty_pairs": "/t/vm?preserve%53ession=true&&=&a",
        "query_broken_escape": "/t/vm?x=1&preserveSession=%zz",
    }
    for name, s in seeds.items():
        write("route", name, s)


# ----------------------------------------------------------------- frames


def frame(op, payload=b"", fin=True, mask=None, rsv=0, length=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload) if length is None else length
    m = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n <= 0xFFFF:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask is not None:
        head += bytes(mask)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def raw_header(b0, b1, ext=b"", mask=None):
    return bytes([b0, b1]) + ext + (bytes(mask) if mask else b"")


# The first 4 bytes: [max_frame selector, split seed, split seed, split seed].
# Selector indexes checks.rs MAX_FRAMES: 2 = 125, 4 = 1000, 7 = 1 MiB.
def frames(target, mask):
    m = mask

    def w(name, stream, sel=7, splits=(3, 17, 200)):
        write(target, name, bytes([sel, *splits]) + stream)

    rfb = b"RFB 003.008\n"
    w("binary_rfb_version", frame(0x2, rfb, mask=m))
    w("binary_then_pong_then_binary",
      frame(0x2, rfb, mask=m) + frame(0xA, b"keepalive", mask=m) + frame(0x2, b"\x01", mask=m),
      splits=(1, 2, 9))
    w("fragmented_text_with_ping_between",
      frame(0x1, b"hello ", fin=False, mask=m) + frame(0x9, b"p", mask=m)
      + frame(0x0, b"wor", fin=False, mask=m) + frame(0x0, b"ld", mask=m))
    w("binary_16bit_length_300", frame(0x2, bytes(range(256)) + bytes(44), mask=m), splits=(5, 150, 41))
    w("binary_64bit_length_truncated", frame(0x2, length=70000, mask=m) + b"\x00" * 64)
    w("close_1000_with_reason_then_data",
      frame(0x2, b"x", mask=m) + frame(0x8, struct.pack(">H", 1000) + b"bye", mask=m)
      + frame(0x2, b"after close", mask=m), splits=(9, 1, 1))
    w("close_empty_payload", frame(0x8, mask=m))
    w("close_code_split_across_reads", frame(0x8, struct.pack(">H", 4001), mask=m), splits=(7, 1, 0))
    w("ping_max_125", frame(0x9, b"p" * 125, mask=m))
    w("empty_binary_frames", frame(0x2, mask=m) * 3 + frame(0x1, b"", fin=False, mask=m) + frame(0x0, mask=m))
    w("incomplete_header", frame(0x2, b"abc", mask=m)[:1 if m is None else 4])
    other = [9, 8, 7, 6] if m is None else None
    w("violation_wrong_masking", frame(0x2, b"abc", mask=other))
    w("violation_rsv_bits", frame(0x2, b"abc", mask=m, rsv=4))
    w("violation_reserved_opcode", frame(0x3, b"", mask=m) + frame(0xB, b"", mask=m))
    w("violation_control_too_long", frame(0x9, b"p" * 126, mask=m))
    w("violation_fragmented_ping", frame(0x9, b"p", fin=False, mask=m))
    w("violation_unexpected_continuation", frame(0x0, b"c", mask=m))
    w("violation_expected_continuation",
      frame(0x1, b"a", fin=False, mask=m) + frame(0x1, b"b", mask=m))
    mb = 0x80 if m is not None else 0
    w("violation_non_minimal_16", raw_header(0x82, mb | 126, struct.pack(">H", 5), m) + b"12345")
    w("violation_non_minimal_64", raw_header(0x82, mb | 127, struct.pack(">Q", 300), m))
    w("violation_length_top_bit", raw_header(0x82, mb | 127, struct.pack(">Q", 1 << 63), m))
    w("violation_close_one_byte", frame(0x8, b"\x03", mask=m))
    w("violation_frame_too_large", frame(0x2, b"z" * 200, mask=m), sel=2)
    w("limit_1000_frames", frame(0x2, b"z" * 1000, mask=m) + frame(0x2, b"z" * 1001, mask=m), sel=4)


# ------------------------------------------------------------ upstream_response


def upstream():
    ok = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          f"Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n")
    write("upstream_response", "101_kubevirt_then_rfb", ok + "\x82\x0cRFB 003.008\n")
    write("upstream_response", "101_with_protocol",
          ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: plain.kubevirt.io\r\n\r\n"))
    write("upstream_response", "101_wrong_accept", ok.replace(ACCEPT, "AAAAAAAAAAAAAAAAAAAAAAAAAAA="))
    write("upstream_response", "101_without_upgrade", ok.replace("Upgrade: websocket\r\n", ""))
    write("upstream_response", "101_with_extension",
          ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"))
    write("upstream_response", "101_bare_lf", ok.replace("\r\n", "\n"))

    def status(code, reason, body, ctype="application/json", length=True):
        head = f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
        if length:
            head += f"Content-Length: {len(body.encode())}\r\n"
        return head + "\r\n" + body

    def k8s(code, reason, message):
        return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "message": message, "reason": reason,
                           "code": code})

    write("upstream_response", "404_vmi_not_found",
          status(404, "Not Found", k8s(404, "NotFound",
                 'virtualmachineinstance.kubevirt.io "ubuntu" not found')))
    write("upstream_response", "503_preserve_session_busy",
          status(503, "Service Unavailable",
                 k8s(503, "ServiceUnavailable", "Active VNC connection. Request denied.")))
    write("upstream_response", "500_preserve_session_busy_via_virt_api",
          status(500, "Internal Server Error",
                 k8s(500, "InternalError",
                     "Internal error occurred: Can't connect to websocket (503): websocket: "
                     "bad handshake: application info: Active VNC connection. Request denied.")))
    write("upstream_response", "404_path_not_served",
          status(404, "Not Found", k8s(404, "NotFound", "the server could not find the requested resource")))
    write("upstream_response", "503_aggregator_service_unavailable",
          status(503, "Service Unavailable", "service unavailable\n", ctype="text/plain; charset=utf-8"))
    write("upstream_response", "403_rbac_forbidden",
          status(403, "Forbidden", k8s(403, "Forbidden",
                 'virtualmachineinstances.subresources.kubevirt.io "ubuntu" is forbidden: '
                 'User "system:serviceaccount:vnc:proxy" cannot get resource '
                 '"virtualmachineinstances/vnc"')))
    write("upstream_response", "401_plain_text",
          status(401, "Unauthorized", "Unauthorized\n", ctype="text/plain"))
    write("upstream_response", "500_body_until_eof",
          status(500, "Internal Server Error", "line one\nline two", ctype="text/plain", length=False))
    write("upstream_response", "400_vmi_not_running",
          status(400, "Bad Request", k8s(400, "BadRequest", "VMI is not running")))
    write("upstream_response", "400_no_graphics_devices",
          status(400, "Bad Request", k8s(400, "BadRequest", "No graphics devices are present.")))
    write("upstream_response", "404_body_still_coming",
          status(404, "Not Found", k8s(404, "NotFound", "x"))[:-7])
    write("upstream_response", "502_huge_content_length",
          "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 1000000\r\n\r\nupstream gone")
    write("upstream_response", "200_chunked",
          "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    write("upstream_response", "502_reason_phrase_only",
          "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    write("upstream_response", "status_line_incomplete", "HTTP/1.1 10")
    write("upstream_response", "not_http", "SSH-2.0-OpenSSH_9.6\r\n")


# ---------------------------------------------------------------------- token


def tokens():
    hs = fixture("pyjwt_hs256.jwt")
    write("token", "pyjwt_hs256_ubuntu", hs + "\nubuntu")
    write("token", "pyjwt_hs256_win10", hs + "\nwin-10")
    write("token", "pyjwt_hs256_vmi_not_listed", hs + "\nother")
    write("token", "pyjwt_hs256_vmi_invalid_name", hs + "\n../ubuntu")
    write("token", "pyjwt_hs256_string_ids", fixture("pyjwt_hs256_string_ids.jwt") + "\nubuntu")
    write("token", "pyjwt_hs256_expired", fixture("pyjwt_hs256_expired.jwt") + "\nubuntu")
    write("token", "pyjwt_rs256_wrong_algorithm", fixture("pyjwt_rs256.jwt") + "\nubuntu")
    head, claims, sig = hs.split(".")
    write("token", "tampered_signature", f"{head}.{claims}.{sig[:-6]}AAAAAA\nubuntu")
    write("token", "alg_none", b64url(b'{"alg":"none","typ":"JWT"}') + "." + claims + ".\nubuntu")
    write("token", "garbage", "not-a-jwt\nubuntu")
    write("token", "two_parts", f"{head}.{claims}\nubuntu")

    lab = ('{"id":5,"exp":4102444800,"lab_instance":{"lab_id":1,"lab_instance_id":9,'
           '"namespace_name":"lab-ns","allowed_vmi_names":["ubuntu","win-10"],'
           '"additional_data":null}}')
    write("token", "sign_labinstance", f'sign\n{{"alg":"HS256","typ":"JWT"}}\n{lab}\nubuntu')
    write("token", "sign_header_alg_none", f'sign\n{{"alg":"none"}}\n{lab}\nubuntu')
    write("token", "sign_header_hs512", f'sign\n{{"alg":"HS512","typ":"JWT"}}\n{lab}\nubuntu')
    write("token", "sign_header_with_kid", f'sign\n{{"alg":"HS256","kid":"k1"}}\n{lab}\nubuntu')
    write("token", "sign_claims_exp_as_string",
          'sign\n{"alg":"HS256"}\n' + lab.replace("4102444800", '"4102444800"') + "\nubuntu")
    write("token", "sign_claims_names_not_strings",
          'sign\n{"alg":"HS256"}\n' + lab.replace('"lab-ns"', "7") + "\nubuntu")
    write("token", "sign_claims_extra_nbf_and_aud",
          'sign\n{"alg":"HS256"}\n' + lab.replace('"id":5', '"id":5,"nbf":1,"aud":"x"') + "\nubuntu")
    write("token", "sign_claims_not_json", 'sign\n{"alg":"HS256"}\n{"exp":\nubuntu')

    write("token", "model_granted", "model\nlab-ns\nubuntu,win-10\nubuntu\n\n5")
    write("token", "model_string_id", "model\nlab-ns\nubuntu\nubuntu\ns\nuser-17")
    write("token", "model_not_listed", "model\nlab-ns\nubuntu\nwindows\n\n5")
    write("token", "model_bad_namespace", "model\nLab.NS\nubuntu\nubuntu\n\n5")
    write("token", "model_vmi_path_injection", "model\nlab-ns\n../x,ubuntu\n../x\n\n5")
    write("token", "model_expired", "model\nlab-ns\nubuntu\nubuntu\nx\n5")
    write("token", "model_not_yet_valid", "model\nlab-ns\nubuntu\nubuntu\nn\n5")
    write("token", "model_missing_exp", "model\nlab-ns\nubuntu\nubuntu\ne\n5")
    write("token", "model_escapes_in_names", 'model\nlab"ns\nubu\\ntu,a\tb\nubu\\ntu\ns\n"\\')
    # exp as LabOrchestrator's issuer writes it (time.time() + expires_in), and the values a
    # time claim may not take: each refused with a reason that names the claim.
    write("token", "model_fractional_exp", "model\nlab-ns\nubuntu\nubuntu\nf\n5")
    for name, value in [("fraction", "4102444800.9629297"), ("exponent", "1e20"),
                        ("negative", "-1"), ("infinity", "Infinity"), ("overflow", "1e400"),
                        ("null", "null")]:
        write("token", f"sign_claims_exp_{name}",
              'sign\n{"alg":"HS256"}\n' + lab.replace("4102444800", value) + "\nubuntu")


def main():
    request_heads()
    routes()
    frames("frame_scanner_client", [0x37, 0xFA, 0x21, 0x3D])
    frames("frame_scanner_upstream", None)
    upstream()
    tokens()


if __name__ == "__main__":
    main()
