#!/usr/bin/env python3
"""Check the deployment files under deploy/ against each other and the proxy.

Usage: python3 deploy/check.py PATH/TO/kubevirt-vnc-proxy

What it enforces (every failure is reported with its file and what was
expected; exit status 1 on any failure, 2 on a usage error):

  a. every YAML file under deploy/kubernetes parses (multi-document aware);
  b. every file in kustomization.yaml `resources:` exists, and every .yaml in
     deploy/kubernetes other than kustomization.yaml and *.example.yaml is
     listed; `namespace:` is set; the `images:` entry names the Deployment's
     image so it can be overridden;
  c. every document has apiVersion, kind and metadata.name, and every listed
     resource carries the label app.kubernetes.io/name: kubevirt-vnc-proxy;
  d. every environment variable the Deployment sets is an option of the proxy
     (`BINARY --help` prints `[env NAME]` for each); SECRET_KEY comes from the
     Secret that secret.example.yaml describes;
  e. the only RBAC is one ClusterRole granting exactly `get` on
     subresources.kubevirt.io virtualmachineinstances/vnc, bound to the
     Deployment's ServiceAccount;
  f. the pod and container security settings (non-root uid 65532, read-only
     root filesystem, no privilege escalation, all capabilities dropped,
     RuntimeDefault seccomp, service-account token mounted), port 5001 named
     ws, resource requests and limits;
  g. the container's preStop hook is Kubernetes' sleep action of at least
     3 s (the endpoint's removal races SIGTERM, and on SIGTERM the proxy
     refuses new consoles), and terminationGracePeriodSeconds, which counts
     from the hook, is at least 5 s above that sleep plus the longest the
     proxy takes from SIGTERM to exit: SHUTDOWN_GRACE_SECONDS (as the
     Deployment sets it, else the default `--help` shows) plus 2 s for the
     closing handshakes;
  h. the readiness probe is GET /readyz and the liveness probe GET /healthz
     on the port of METRICS_ADDR (the probe path, answered outside
     MAX_CONNECTIONS), named metrics; METRICS_ADDR is not a loopback address
     (the kubelet probes the pod IP);
  i. deploy/Dockerfile copies enough of the repository for cargo to load the
     manifest (`cargo fetch --offline --locked` in a copy of just what the
     Dockerfile COPYs), and agrees with the manifests (USER 65532, EXPOSE
     5001, the entrypoint); skipped when cargo is not on PATH;
  j. `kubectl kustomize deploy/kubernetes` renders; skipped without kubectl;
  k. the README's "Deploying to a cluster" commands, read in order, work on a
     fresh cluster against these manifests: every namespace is created before
     a command uses it, the Secret the Deployment reads (name and key) is
     created in the kustomization's namespace before `kubectl apply -k`, and
     the image that is built is the one pushed and the one `kustomize edit set
     image` puts under the `images:` name of the kustomization;
  l. one autoscaling/v2 HorizontalPodAutoscaler scales the Deployment on CPU
     from minReplicas >= 2, the Deployment sets no `replicas` (the autoscaler
     owns the count; an apply would reset it), and the PodDisruptionBudget lets
     a drain evict a pod at that minimum and keeps one (minAvailable below
     minReplicas, or maxUnavailable from 1 to below it); in the base and in
     every rendered overlay;
  m. TLS in the pod: with TLS_CERT_FILE set, both probes are `scheme: HTTPS`
     (the probe port speaks TLS then), TLS_CERT_FILE/TLS_KEY_FILE are keys
     tls.crt/tls.key of a Secret some Certificate writes, mounted read-only as
     a directory, never with subPath (which never sees cert-manager's rotation);
     without it, plain HTTP probes;
  n. the overlays under deploy/overlays render with `kubectl kustomize`
     (skipped without kubectl), set `namespace:` and put every namespaced
     object in it, use only env names the proxy has, carry a cert-manager
     Certificate with an issuerRef and the Service's DNS name, scrape over
     HTTPS (PodMonitor), and hold the dashboard ConfigMap as dashboard.json is;
  o. every metric the Grafana dashboard (panels and query variables) and the
     PrometheusRule's rules name is in the live binary's /metrics: the binary
     runs with LOCAL_DEV_MODE, METRICS_ADDR on a free loopback port and, when
     `--help` lists TLS_CERT_FILE, a certificate made with openssl in a
     temporary directory, /metrics is read over TLS (verified against it), and
     the proxy is stopped by its PID. Names come from the PromQL (functions,
     keywords, labels, ranges, strings and Grafana variables skipped;
     `_bucket`/`_sum`/`_count` stripped only from histograms); every query
     names one; the dashboard and rules use the families the issue asks for;
     the expiry gauge equals the served certificate's notAfter; in a panel whose
     title says "per pod", every aggregation keeps the pod label;
  p. with promtool on PATH (else a note): the rules and the dashboard's queries
     parse (`promtool check rules`), and prometheusrule.test.yaml's alert tests
     pass (`promtool test rules`): each alert fires on its case only.
"""

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

DEPLOY = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DEPLOY)
K8S = os.path.join(DEPLOY, "kubernetes")
NAME = "kubevirt-vnc-proxy"
LABEL = "app.kubernetes.io/name"
PORT = 5001
UID = 65532
# From SIGTERM to exit the proxy takes at most SHUTDOWN_GRACE_SECONDS plus this
# (after the grace, the closing handshakes get SHUTDOWN_CLOSE_TIME, 1 s, in
# src/server.rs; tests/shutdown.rs holds the binary to grace + 2 s).
PROXY_CLOSING_BOUND = 2
# What terminationGracePeriodSeconds must leave above that bound before the
# kubelet's SIGKILL (slow nodes, a preStop hook, the container runtime).
TERMINATION_MARGIN = 5
# The least preStop sleep that lets ingresses and kube-proxy stop sending new
# consoles before SIGTERM makes the proxy refuse them.
PRESTOP_MIN_SLEEP = 3


# The metrics kit (issue 15, point 6) -------------------------------------------
MONITORING = os.path.join(DEPLOY, "components", "monitoring")
DASHBOARD = os.path.join(MONITORING, "dashboard.json")
RULES = os.path.join(MONITORING, "prometheusrule.yaml")
RULES_TEST = os.path.join(MONITORING, "prometheusrule.test.yaml")
# Overlays rendered and checked, relative to deploy/: with TLS, and with TLS and monitoring.
OVERLAYS = ("overlays/tls", "overlays/tls-monitoring")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
# The keys cert-manager writes into a Certificate's Secret, by the variable that must name them.
CERT_MANAGER_KEYS = {"TLS_CERT_FILE": "tls.crt", "TLS_KEY_FILE": "tls.key"}
# What the issue asks the dashboard and the rules to show, as metric families they must use.
DASHBOARD_NEEDS = {
    "kubevirt_vnc_proxy_open_sessions": "sessions open",
    "kubevirt_vnc_proxy_sessions_total": "sessions by outcome",
    "kubevirt_vnc_proxy_refusals_total": "refusals by status",
    "kubevirt_vnc_proxy_bytes_total": "bytes relayed",
    "kubevirt_vnc_proxy_upstream_dial_seconds": "upstream latency",
    "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds": "certificate expiry",
    "kubevirt_vnc_proxy_buffer_bytes": "relay memory",
    "kubevirt_vnc_proxy_sessions_waiting_for_memory": "sessions waiting for relay memory",
}
RULES_NEED = {
    "kubevirt_vnc_proxy_max_connections": "sessions near MAX_CONNECTIONS",
    "kubevirt_vnc_proxy_refusals_total": "refusal, 5xx and upstream failure rates",
    "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds": "certificate expiring in under 7 days",
}
EXPIRY = "kubevirt_vnc_proxy_tls_certificate_expiry_timestamp_seconds"

PROMQL_TOKEN = re.compile(r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<comment>\#[^\n]*)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\])
  | (?P<num>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<punct>.)
""", re.X | re.S)
# Clauses followed by a parenthesised list of label names, not of expressions.
PROMQL_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Words that are neither metrics nor followed by `(`: binary operators, modifiers, literals.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr):
    """The metric names a PromQL expression selects: identifiers outside label matchers
    `{...}` and ranges `[...]` that are not functions or aggregations (followed by `(`),
    keywords, or the label lists of by/without/on/ignoring/group_left/group_right; plus
    `{__name__="NAME"}`. Strings, comments and Grafana variables ($x, ${x}, [[x]]) are skipped."""
    raw = [(m.lastgroup, m.group()) for m in PROMQL_TOKEN.finditer(expr)
           if m.lastgroup not in ("space", "comment")]
    # Drop the label lists first, so that `sum by (le) (x)` reads as `sum (x)`: a function.
    toks, i = [], 0
    while i < len(raw):
        if raw[i][0] == "ident" and raw[i][1].lower() in PROMQL_LABEL_LISTS and raw[i + 1:i + 2] == [("punct", "(")]:
            while i < len(raw) and raw[i] != ("punct", ")"):
                i += 1
            i += 1
            continue
        toks.append(raw[i])
        i += 1
    names = set()
    brace = bracket = 0
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "punct":
            if text == "{":
                brace += 1
            elif text == "}":
                brace = max(0, brace - 1)
            elif text == "[":
                bracket += 1
            elif text == "]":
                bracket = max(0, bracket - 1)
        elif kind == "ident" and brace == 0 and bracket == 0:
            word = text.lower()
            if nxt != ("punct", "(") and word not in PROMQL_WORDS:
                names.add(text)
        elif kind == "ident" and brace > 0 and text == "__name__":
            # Only an equality matcher names one metric; =~ and != do not.
            after = toks[i + 2] if i + 2 < len(toks) else (None, None)
            if nxt == ("punct", "=") and after[0] == "str":
                names.add(after[1][1:-1])
        i += 1
    return names


# Aggregation operators that merge series: each keeps the labels of its `by (...)` or drops
# those of its `without (...)`. (topk, bottomk, limitk and limit_ratio pick series whole, with
# every label kept, so they are not listed.)
PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                       "count_values", "quantile"}


def promql_aggregations_dropping(expr, label):
    """The aggregation operators of a PromQL expression that do not keep `label`: those with
    no `by (...)` naming it (either before or after their arguments), or whose
    `without (...)` names it."""
    toks = [(m.lastgroup, m.group()) for m in PROMQL_TOKEN.finditer(expr)
            if m.lastgroup not in ("space", "comment")]

    def labels(i):
        """The label list opening at toks[i] (a `(`), and the index past its `)`."""
        out, i = [], i + 1
        while i < len(toks) and toks[i] != ("punct", ")"):
            if toks[i][0] == "ident":
                out.append(toks[i][1])
            i += 1
        return out, i + 1

    def clause(i):
        """(keyword, labels) of a by/without clause at toks[i], else None."""
        if (i + 1 < len(toks) and toks[i][0] == "ident" and toks[i][1].lower() in ("by", "without")
                and toks[i + 1] == ("punct", "(")):
            return toks[i][1].lower(), labels(i + 1)[0]
        return None

    dropping = []
    brace, label_list = 0, False
    for i, (kind, text) in enumerate(toks):
        # Label names (`{quantile="0.99"}`, `group_left(count)`) are not operators.
        if (kind, text) == ("punct", "{"):
            brace += 1
        elif (kind, text) == ("punct", "}"):
            brace = max(0, brace - 1)
        elif kind == "ident" and text.lower() in PROMQL_LABEL_LISTS:
            label_list = True
            continue
        elif label_list and (kind, text) == ("punct", ")"):
            label_list = False
        if (kind != "ident" or text.lower() not in PROMQL_AGGREGATIONS or brace or label_list
                or not (toks[i + 1:i + 2] == [("punct", "(")] or clause(i + 1))):
            continue
        found = clause(i + 1)
        if found is None and toks[i + 1:i + 2] == [("punct", "(")]:
            # `sum(x) by (pod)`: the clause follows the arguments.
            depth, j = 0, i + 1
            while j < len(toks):
                if toks[j] == ("punct", "("):
                    depth += 1
                elif toks[j] == ("punct", ")"):
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            found = clause(j + 1)
        keeps = found is not None and ((found[0] == "by") == (label in found[1]))
        if not keeps:
            dropping.append(text)
    return dropping


def grafana_variable_query(query):
    """The PromQL inside a Grafana Prometheus variable query: label_values(EXPR, LABEL) and
    query_result(EXPR) hold one; label_values(LABEL), label_names() and metrics(RE) none."""
    if isinstance(query, dict):
        query = query.get("query") or ""
    query = (query or "").strip()
    m = re.fullmatch(r"(label_values|query_result)\s*\((.*)\)", query, re.S)
    if not m:
        return None if re.match(r"(label_names|metrics)\s*\(", query) else query or None
    if m.group(1) == "query_result":
        return m.group(2)
    inner, depth = m.group(2), 0
    for k, ch in enumerate(inner):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            return inner[:k]
    return None  # label_values(LABEL): no metric


def dashboard_queries(dash):
    """(where, PromQL) for every panel target (rows' nested panels included) and every
    query variable of a Grafana dashboard."""
    out = []

    def walk(panels, path):
        for p in panels or []:
            if not isinstance(p, dict):
                continue
            title = p.get("title") or f"id {p.get('id')}"
            for t in p.get("targets") or []:
                if isinstance(t, dict) and (t.get("expr") or "").strip():
                    out.append((f"{path}panel {title!r} target {t.get('refId', '?')}", t["expr"]))
            walk(p.get("panels"), f"{path}row {title!r}, " if p.get("type") == "row" else path)

    walk(dash.get("panels"), "")
    for v in (dash.get("templating") or {}).get("list") or []:
        if isinstance(v, dict) and v.get("type") == "query":
            q = grafana_variable_query(v.get("query"))
            if q:
                out.append((f"variable {v.get('name')!r}", q))
    return out


def rule_queries(docs):
    """(where, expr) of every rule of the PrometheusRule documents, and the names recording
    rules define (usable by the other rules as if the proxy exposed them)."""
    out, recorded = [], set()
    for d in docs:
        if d.get("kind") != "PrometheusRule":
            continue
        for g in (d.get("spec") or {}).get("groups") or []:
            for r in g.get("rules") or []:
                name = r.get("alert") or r.get("record") or "?"
                if r.get("record"):
                    recorded.add(r["record"])
                out.append((f"group {g.get('name')!r} rule {name!r}", str(r.get("expr") or "")))
    return out, recorded


def metric_families(text):
    """{family: type} of a Prometheus text exposition: its `# TYPE` lines, and sample names
    that belong to no typed family (untyped). A family with no samples yet (a counter
    labelled by a status that has not happened) is still there by its TYPE line."""
    fams = {}
    for line in text.splitlines():
        m = re.match(r"#\s*TYPE\s+([A-Za-z_:][A-Za-z0-9_:]*)\s+(\w+)", line)
        if m:
            fams[m.group(1)] = m.group(2)
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)", line)
        if not m or line.startswith("#"):
            continue
        name = m.group(1)
        if name in fams or any(name.endswith(s) and name[:-len(s)] in fams for s in ("_bucket", "_sum", "_count")):
            continue
        fams[name] = "untyped"
    return fams


def metric_problem(name, fams):
    """Why a metric name a query uses is not in the exposition, or None. `_bucket`, `_sum`
    and `_count` are stripped only where the family is a histogram (`_sum`/`_count` also a
    summary); a histogram's bare name selects no series."""
    kind = fams.get(name)
    if kind == "histogram":
        return f"{name} is a histogram, which has no series of that name: use {name}_bucket, _sum or _count"
    if kind is not None:
        return None
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)] if name.endswith(suffix) else None
        if base and (fams.get(base) == "histogram" or (fams.get(base) == "summary" and suffix != "_bucket")):
            return None
    return f"{name} is not in the proxy's /metrics"


def families_used(name, fams):
    """The family a name selects (histogram suffixes stripped), for coverage checks."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and fams.get(name[:-len(suffix)]) in ("histogram", "summary"):
            return name[:-len(suffix)]
    return name


def sample_value(text, name):
    """The value of an unlabelled sample in an exposition, or None."""
    m = re.search(rf"^{re.escape(name)}(?:\{{\}})?\s+(\S+)", text, re.M)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, tls_context=None, timeout=5):
    """GET path from 127.0.0.1:port (over TLS with tls_context); (status line, body, the
    peer certificate as ssl.getpeercert() gives it or None)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    cert = None
    with raw:
        sock = tls_context.wrap_socket(raw, server_hostname="localhost") if tls_context else raw
        with sock:
            if tls_context:
                cert = sock.getpeercert()
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode("latin-1"), body.decode("utf-8", "replace"), cert


def run_proxy_for_metrics(binary, tls, tmp):
    """Start the proxy as a local demo would (LOCAL_DEV_MODE, an upstream that is never
    dialed), with METRICS_ADDR on a free loopback port and, when `tls`, a certificate
    made now with openssl; read /metrics (over TLS then, verified against that
    certificate); stop the proxy by its PID. Returns (exposition text, the served
    certificate's notAfter in Unix seconds or None); raises RuntimeError with the reason."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SECRET_KEY": os.urandom(24).hex(),
           "LOCAL_DEV_MODE": "true", "WS_REMOTE_URL": "ws://127.0.0.1:9", "HOST": "127.0.0.1",
           "PORT": "0", "SHUTDOWN_GRACE_SECONDS": "1", "LOGLEVEL": "INFO"}
    context = None
    if tls:
        openssl = shutil.which("openssl")
        if not openssl:
            raise RuntimeError("openssl is not on PATH, so no certificate can be made for the TLS run")
        cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
        p = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                           capture_output=True, text=True, timeout=60, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"openssl could not make a test certificate: {p.stderr.strip()}")
        env.update(TLS_CERT_FILE=cert, TLS_KEY_FILE=key)
        context = ssl.create_default_context(cafile=cert)
    port = free_port()
    env["METRICS_ADDR"] = f"127.0.0.1:{port}"
    log_path = os.path.join(tmp, "proxy.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([os.path.abspath(binary)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        deadline = time.monotonic() + 20
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                status, body, peer = http_get(port, "/metrics", context)
            except (OSError, ssl.SSLError) as e:
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.1)
                continue
            if " 200 " not in status + " ":
                raise RuntimeError(f"GET /metrics answered {status!r}")
            not_after = ssl.cert_time_to_seconds(peer["notAfter"]) if peer else None
            return body, not_after
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = " | ".join(f.read().strip().splitlines()[-5:])
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited {proc.returncode} before /metrics answered: {tail}")
        raise RuntimeError(f"/metrics on 127.0.0.1:{port} did not answer in 20 s ({last}): {tail}")
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to that PID: the proxy drains and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load_yaml_module():
    try:
        import yaml  # noqa: PLC0415
        return yaml
    except ImportError:
        pass
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "pyyaml"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
    if subprocess.run(pip, **quiet).returncode != 0:
        # A Debian/Ubuntu system Python refuses plain pip installs (PEP 668).
        subprocess.run(pip + ["--break-system-packages"], **quiet)
    try:
        import yaml  # noqa: PLC0415
        return yaml
    except ImportError:
        sys.exit("deploy/check.py: PyYAML is missing and `pip install pyyaml` did not provide it")


def is_loopback_host(host):
    """Whether the host part of an address (`127.0.0.1`, `[::1]`, `localhost`) is loopback."""
    host = host.strip("[]").lower()
    if host in ("localhost", "::1") or host.endswith(".localhost"):
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() for p in parts)


class Checker:
    def __init__(self, binary):
        self.binary = binary
        self.errors = []
        self.notes = []
        self.yaml = load_yaml_module()
        self.docs = {}  # relative path -> list of documents (None docs dropped)
        self.help = ""  # the binary's --help, once read

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def rel(self, path):
        return os.path.relpath(path, REPO)

    # a. parse ---------------------------------------------------------------
    def parse_all(self):
        files = []
        for root, _dirs, names in os.walk(K8S):
            for n in sorted(names):
                if n.endswith((".yaml", ".yml")):
                    files.append(os.path.join(root, n))
        if not files:
            self.fail(self.rel(K8S), "no YAML files found")
        for path in sorted(files):
            rel = os.path.relpath(path, K8S)
            try:
                with open(path, encoding="utf-8") as f:
                    docs = [d for d in self.yaml.safe_load_all(f) if d is not None]
            except self.yaml.YAMLError as e:
                self.fail(self.rel(path), f"YAML parse error: {e}")
                continue
            for i, d in enumerate(docs):
                if not isinstance(d, dict):
                    self.fail(self.rel(path), f"document {i + 1} is a {type(d).__name__}, not a mapping")
            self.docs[rel] = [d for d in docs if isinstance(d, dict)]

    # b. kustomization -------------------------------------------------------
    def check_kustomization(self):
        where = "deploy/kubernetes/kustomization.yaml"
        kdocs = self.docs.get("kustomization.yaml")
        if not kdocs:
            self.fail(where, "missing or empty")
            return []
        k = kdocs[0]
        resources = k.get("resources")
        if not isinstance(resources, list) or not resources:
            self.fail(where, "`resources:` must be a non-empty list")
            return []
        seen = set()
        for r in resources:
            if r in seen:
                self.fail(where, f"resource {r!r} listed twice")
            seen.add(r)
            if not os.path.isfile(os.path.join(K8S, r)):
                self.fail(where, f"resource {r!r} does not exist in deploy/kubernetes")
        for rel in self.docs:
            base = os.path.basename(rel)
            if base == "kustomization.yaml" or base.endswith((".example.yaml", ".example.yml")):
                continue
            if rel not in seen:
                self.fail(where, f"{rel} is in deploy/kubernetes but not listed in `resources:` "
                          "(list it, or name it *.example.yaml if it must not be applied)")
        if not k.get("namespace"):
            self.fail(where, "`namespace:` is not set")
        return [r for r in resources if r in self.docs]

    # c. identity and labels -------------------------------------------------
    def check_identity(self, listed):
        for rel, docs in self.docs.items():
            if os.path.basename(rel) == "kustomization.yaml":
                continue
            for i, d in enumerate(docs):
                where = f"deploy/kubernetes/{rel} (document {i + 1})"
                for field in ("apiVersion", "kind"):
                    if not d.get(field):
                        self.fail(where, f"missing {field}")
                md = d.get("metadata")
                if not isinstance(md, dict) or not md.get("name"):
                    self.fail(where, "missing metadata.name")
                    continue
                if rel in listed and (md.get("labels") or {}).get(LABEL) != NAME:
                    self.fail(where, f"{d.get('kind')}/{md['name']} lacks label {LABEL}: {NAME}")

    def resources_of(self, listed, kind):
        out = []
        for rel in listed:
            for d in self.docs[rel]:
                if d.get("kind") == kind:
                    out.append((f"deploy/kubernetes/{rel}", d))
        return out

    def one(self, listed, kind):
        found = self.resources_of(listed, kind)
        if len(found) != 1:
            self.fail("deploy/kubernetes", f"expected exactly one {kind} among the listed resources, found {len(found)}")
            return None, None
        return found[0]

    # d. environment ---------------------------------------------------------
    def proxy_env_names(self):
        if not os.path.isfile(self.binary) or not os.access(self.binary, os.X_OK):
            self.fail(self.binary, "proxy binary not found or not executable "
                      "(build it first: cargo build --bin kubevirt-vnc-proxy)")
            return None
        try:
            p = subprocess.run([self.binary, "--help"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.fail(self.binary, f"running `--help` failed: {e}")
            return None
        self.help = p.stdout + p.stderr
        names = set(re.findall(r"\[env ([A-Za-z_][A-Za-z0-9_]*)\]", self.help))
        if p.returncode != 0 or not names:
            self.fail(self.binary, f"`--help` exited {p.returncode} and listed {len(names)} `[env NAME]` options; "
                      "cannot tell which environment variables the proxy reads")
            return None
        return names

    def check_env(self, where, pod, options):
        secret_ref = None
        env_count = 0
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            cname = c.get("name", "?")
            if c.get("envFrom"):
                self.fail(where, f"container {cname}: envFrom would bring in variables that cannot be checked; "
                          "use explicit env entries")
            for e in c.get("env") or []:
                n = e.get("name")
                env_count += 1
                if options is not None and n not in options:
                    self.fail(where, f"container {cname}: env {n!r} is not an option of the proxy "
                              f"(`{os.path.basename(self.binary)} --help` lists: {', '.join(sorted(options))})")
                if n == "SECRET_KEY":
                    secret_ref = ((e.get("valueFrom") or {}).get("secretKeyRef")) or None
                    if e.get("value") is not None or not secret_ref:
                        self.fail(where, "SECRET_KEY must come from valueFrom.secretKeyRef, never a literal value")
                if n == "LOCAL_DEV_MODE" and e.get("value") != "false":
                    self.fail(where, f"LOCAL_DEV_MODE must be the string \"false\" in a cluster, got {e.get('value')!r}")
        names = {e.get("name") for c in pod.get("containers", []) for e in c.get("env") or []}
        for required in ("SECRET_KEY", "LOCAL_DEV_MODE", "LOGLEVEL"):
            if required not in names:
                self.fail(where, f"env {required} is not set")
        return secret_ref, env_count

    def check_secret_example(self, secret_ref):
        where = "deploy/kubernetes/secret.example.yaml"
        docs = self.docs.get("secret.example.yaml")
        if not docs:
            self.fail(where, "missing: an example Secret must show what SECRET_KEY is read from")
            return
        s = docs[0]
        if s.get("kind") != "Secret":
            self.fail(where, f"kind is {s.get('kind')!r}, expected Secret")
        if secret_ref:
            if (s.get("metadata") or {}).get("name") != secret_ref.get("name"):
                self.fail(where, f"Secret name {(s.get('metadata') or {}).get('name')!r} differs from the "
                          f"Deployment's secretKeyRef name {secret_ref.get('name')!r}")
            keys = set((s.get("stringData") or {}).keys()) | set((s.get("data") or {}).keys())
            if secret_ref.get("key") not in keys:
                self.fail(where, f"Secret has no key {secret_ref.get('key')!r} (the Deployment's secretKeyRef key)")

    # k. the README's deploy commands ---------------------------------------
    def check_readme_commands(self, listed, namespace, secret_ref, kustomization):
        where = "README.md (Deploying to a cluster)"
        try:
            with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
                commands = readme_deploy_commands(f.read())
        except OSError as e:
            self.fail(where, f"cannot read: {e}")
            return
        if not commands:
            self.fail(where, "no sh block of deploy commands")
            return
        manifest_namespaces = {d["metadata"]["name"] for _w, d in self.resources_of(listed, "Namespace")}
        ref = (secret_ref.get("name"), secret_ref.get("key")) if secret_ref else None
        images = [i.get("name") for i in kustomization.get("images") or []]
        for problem in simulate_deploy(commands, namespace, manifest_namespaces, ref,
                                       images[0] if images else None):
            self.fail(where, problem)

    # e. RBAC ----------------------------------------------------------------
    def check_rbac(self, listed, sa_name, namespace):
        for kind in ("Role", "RoleBinding"):
            for where, d in self.resources_of(listed, kind):
                self.fail(where, f"unexpected {kind} {d['metadata'].get('name')!r}: the ClusterRole is the only grant")
        where, role = self.one(listed, "ClusterRole")
        if role is not None:
            expected = [{"apiGroups": ["subresources.kubevirt.io"],
                         "resources": ["virtualmachineinstances/vnc"],
                         "verbs": ["get"]}]
            if role.get("rules") != expected:
                self.fail(where, f"rules must be exactly {json.dumps(expected)}, got {json.dumps(role.get('rules'))}")
            if "aggregationRule" in role:
                self.fail(where, "aggregationRule would grant more than the listed rule")
        bwhere, binding = self.one(listed, "ClusterRoleBinding")
        if binding is not None and role is not None:
            ref = binding.get("roleRef") or {}
            if ref.get("kind") != "ClusterRole" or ref.get("name") != role["metadata"]["name"]:
                self.fail(bwhere, f"roleRef must be ClusterRole {role['metadata']['name']!r}, got {ref}")
            subjects = binding.get("subjects") or []
            ok = [s for s in subjects if s.get("kind") == "ServiceAccount" and s.get("name") == sa_name]
            if len(subjects) != 1 or not ok:
                self.fail(bwhere, f"subjects must be exactly the ServiceAccount {sa_name!r}, got {subjects}")
            elif namespace and ok[0].get("namespace") not in (None, namespace):
                self.fail(bwhere, f"subject namespace {ok[0].get('namespace')!r} differs from the kustomization "
                          f"namespace {namespace!r}")

    # g. termination grace ---------------------------------------------------------
    def shutdown_grace(self, where, pod):
        """SHUTDOWN_GRACE_SECONDS as the pod runs it: its env value, else the binary's default."""
        for c in pod.get("containers") or []:
            for e in c.get("env") or []:
                if e.get("name") == "SHUTDOWN_GRACE_SECONDS":
                    v = str(e.get("value", ""))
                    if not v.isdigit():
                        self.fail(where, f"SHUTDOWN_GRACE_SECONDS must be a literal number of seconds, got {v!r}")
                        return None
                    return int(v)
        m = re.search(r"\[env SHUTDOWN_GRACE_SECONDS\] \[default: (\d+)\]", self.help)
        if not m:
            self.fail(where, "SHUTDOWN_GRACE_SECONDS is not set and `--help` shows no default for it")
            return None
        return int(m.group(1))

    def prestop_sleep(self, where, pod):
        """The proxy container's preStop sleep in seconds (0 when there is none)."""
        for c in pod.get("containers") or []:
            if c.get("name") != NAME:
                continue
            hook = ((c.get("lifecycle") or {}).get("preStop") or {})
            seconds = (hook.get("sleep") or {}).get("seconds")
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < PRESTOP_MIN_SLEEP:
                self.fail(where, f"the {NAME} container needs lifecycle.preStop.sleep.seconds of at least "
                          f"{PRESTOP_MIN_SLEEP}: the pod leaves the endpoints while the kubelet signals it, and "
                          f"on SIGTERM the proxy refuses the new consoles still routed to it; got {hook!r}")
                return 0
            return seconds
        return 0

    def check_termination_grace(self, where, pod):
        period = pod.get("terminationGracePeriodSeconds")
        sleep = self.prestop_sleep(where, pod)
        grace = self.shutdown_grace(where, pod)
        if grace is None:
            return
        need = sleep + grace + PROXY_CLOSING_BOUND + TERMINATION_MARGIN
        if not isinstance(period, int) or isinstance(period, bool) or period < need:
            self.fail(where, f"terminationGracePeriodSeconds must be an integer of at least {need}: it counts "
                      f"from the preStop sleep ({sleep} s), the proxy takes up to SHUTDOWN_GRACE_SECONDS "
                      f"({grace}) + {PROXY_CLOSING_BOUND} s from SIGTERM to exit, and the kubelet's SIGKILL "
                      f"must come at least {TERMINATION_MARGIN} s later; got {period!r}")

    # f, g, h. Deployment --------------------------------------------------------
    def check_deployment(self, where, dep, listed, options):
        spec = dep.get("spec") or {}
        tmpl = spec.get("template") or {}
        pod = tmpl.get("spec") or {}
        sel = ((spec.get("selector") or {}).get("matchLabels") or {})
        if sel.get(LABEL) != NAME or ((tmpl.get("metadata") or {}).get("labels") or {}).get(LABEL) != NAME:
            self.fail(where, f"selector.matchLabels and the pod template labels must carry {LABEL}: {NAME}")
        if pod.get("automountServiceAccountToken") is not True:
            self.fail(where, "automountServiceAccountToken must be true (the proxy sends that token upstream)")
        self.check_termination_grace(where, pod)
        containers = pod.get("containers") or []
        if len(containers) != 1:
            self.fail(where, f"expected one container, got {len(containers)}")
            return pod, None
        c = containers[0]
        cn = f"container {c.get('name')}"
        psc = pod.get("securityContext") or {}
        csc = c.get("securityContext") or {}

        def effective(key):
            return csc[key] if key in csc else psc.get(key)

        if effective("runAsNonRoot") is not True:
            self.fail(where, f"{cn}: runAsNonRoot must be true")
        if effective("runAsUser") != UID:
            self.fail(where, f"{cn}: runAsUser must be {UID}, got {effective('runAsUser')!r}")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            self.fail(where, f"{cn}: seccompProfile.type must be RuntimeDefault")
        if csc.get("readOnlyRootFilesystem") is not True:
            self.fail(where, f"{cn}: securityContext.readOnlyRootFilesystem must be true")
        if csc.get("allowPrivilegeEscalation") is not False:
            self.fail(where, f"{cn}: securityContext.allowPrivilegeEscalation must be false")
        if csc.get("privileged"):
            self.fail(where, f"{cn}: must not be privileged")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
            self.fail(where, f"{cn}: capabilities must drop [ALL] and add nothing, got {caps}")

        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if ports.get("ws") != PORT:
            self.fail(where, f"{cn}: needs containerPort {PORT} named ws, got {c.get('ports')}")

        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if not (res.get(part) or {}).get(r):
                    self.fail(where, f"{cn}: resources.{part}.{r} is not set")

        # METRICS_ADDR is checked once, before the probes: both probes depend on it, and a
        # problem with it is one problem, not one per probe.
        env = {e.get("name"): e.get("value") for e in c.get("env") or []}
        metrics_addr = env.get("METRICS_ADDR") or ""
        host, _, probe_port = metrics_addr.rpartition(":")
        if not probe_port.isdigit() or ports.get("metrics") != int(probe_port):
            self.fail(where, f"{cn}: METRICS_ADDR must be set, its port a containerPort named metrics")
            probe_port = None
        elif is_loopback_host(host):
            # The kubelet probes the pod IP, never the pod's loopback: a proxy listening
            # there fails every probe and is restarted over and over.
            self.fail(where, f"{cn}: METRICS_ADDR {metrics_addr!r} listens on loopback only, but the "
                      "kubelet's probes target the pod IP; use 0.0.0.0 (or [::]) with that port")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = (c.get(probe) or {}).get("httpGet")
            if not get:
                self.fail(where, f"{cn}: {probe} must be an httpGet probe on {path}")
                continue
            if get.get("path") != path:
                self.fail(where, f"{cn}: {probe} path must be {path}, got {get.get('path')!r}")
            port = get.get("port")
            if probe_port is None:
                continue
            if ports.get(port, port) != int(probe_port):
                self.fail(where, f"{cn}: {probe} must use the probe path's port (metrics, "
                          f"{probe_port}): on {port!r} a proxy at MAX_CONNECTIONS would not answer")

        image = c.get("image") or ""
        return pod, image

    # i. Dockerfile ----------------------------------------------------------
    def check_dockerfile(self):
        where = "deploy/Dockerfile"
        path = os.path.join(DEPLOY, "Dockerfile")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            self.fail(where, f"cannot read: {e}")
            return "missing"
        lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        stages = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
        final = lines[stages[-1]:] if stages else lines
        if f"USER {UID}" not in " ".join(final) and not any(re.match(rf"USER\s+{UID}(:\d+)?$", ln) for ln in final):
            self.fail(where, f"the final stage must run as USER {UID}")
        if not any(re.match(rf"EXPOSE\s+{PORT}(/tcp)?$", ln) for ln in final):
            self.fail(where, f"the final stage must EXPOSE {PORT}")
        if f'ENTRYPOINT ["/{NAME}"]' not in final:
            self.fail(where, f'the final stage must have ENTRYPOINT ["/{NAME}"]')

        sources = []
        for ln in lines:
            if not ln.upper().startswith("COPY "):
                continue
            args = ln[5:].strip()
            if args.startswith("["):
                parts = json.loads(args)
            else:
                parts = args.split()
            if any(p.startswith("--from") for p in parts):
                continue
            parts = [p for p in parts if not p.startswith("--")]
            sources.extend(parts[:-1])
        missing = [s for s in sources if not os.path.exists(os.path.join(REPO, s))]
        for s in missing:
            self.fail(where, f"COPY source {s!r} does not exist in the repository (the build context is its root)")
        cargo = shutil.which("cargo")
        if not cargo:
            return "skipped (no cargo)"
        if missing:
            return "failed"
        host = ""
        try:
            vv = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, timeout=30, check=False).stdout
            host = next((ln.split(":", 1)[1].strip() for ln in vv.splitlines() if ln.startswith("host:")), "")
        except OSError:
            pass
        with tempfile.TemporaryDirectory() as ctx:
            for s in sources:
                src = os.path.join(REPO, s)
                dst = os.path.join(ctx, s.rstrip("/"))
                if os.path.isdir(src):
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("target"))
                else:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy2(src, dst)
            cmd = [cargo, "fetch", "--offline", "--locked"] + (["--target", host] if host else [])
            p = subprocess.run(cmd, cwd=ctx, capture_output=True, text=True, timeout=120, check=False)
        if p.returncode == 0:
            return "ok"
        err = p.stderr.strip()
        if "failed to parse manifest" in err or "--locked" in err or "lock file" in err:
            detail = " ".join(err.splitlines()[-2:]).strip()
            self.fail(where, f"with only the files it COPYs ({', '.join(sources)}), `cargo fetch --locked` "
                      f"fails: {detail}")
            return "failed"
        # Anything else (e.g. a crate not in the local cache yet) says nothing
        # about the Dockerfile; note it and move on.
        self.notes.append("Dockerfile context check inconclusive: " + (err.splitlines() or ["?"])[-1])
        return "inconclusive"

    # j. kustomize render ----------------------------------------------------
    def check_render(self):
        kubectl = shutil.which("kubectl")
        if not kubectl:
            return "skipped (no kubectl)"
        try:
            p = subprocess.run([kubectl, "kustomize", K8S], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.fail("deploy/kubernetes", f"`kubectl kustomize` could not run: {e}")
            return "failed"
        if p.returncode != 0:
            self.fail("deploy/kubernetes", f"`kubectl kustomize` failed: {p.stderr.strip()}")
            return "failed"
        return "ok"

    # l. autoscaler and disruption budget ------------------------------------------
    def check_scaling(self, found, dep_where, dep):
        """The HorizontalPodAutoscaler scales the Deployment on CPU, owns its replica count,
        and the PodDisruptionBudget lets a drain evict a pod at the autoscaler's minimum."""
        hpas = [(w, d) for w, d in found if d.get("kind") == "HorizontalPodAutoscaler"]
        pdbs = [(w, d) for w, d in found if d.get("kind") == "PodDisruptionBudget"]
        if len(hpas) != 1:
            self.fail(dep_where, f"expected exactly one HorizontalPodAutoscaler for the Deployment, found {len(hpas)}")
            return
        hw, hpa = hpas[0]
        hspec = hpa.get("spec") or {}
        if hpa.get("apiVersion") != "autoscaling/v2":
            self.fail(hw, f"apiVersion must be autoscaling/v2, got {hpa.get('apiVersion')!r}")
        ref = hspec.get("scaleTargetRef") or {}
        want = {"apiVersion": "apps/v1", "kind": "Deployment", "name": (dep.get("metadata") or {}).get("name")}
        if any(ref.get(k) != v for k, v in want.items()):
            self.fail(hw, f"scaleTargetRef must be {want}, got {ref}")
        lo, hi = hspec.get("minReplicas", 1), hspec.get("maxReplicas")
        if not isinstance(lo, int) or lo < 2:
            self.fail(hw, f"minReplicas must be at least 2 (so one pod serves while a drain evicts "
                      f"another), got {lo!r}")
            lo = None
        if not isinstance(hi, int) or (lo is not None and hi < lo):
            self.fail(hw, f"maxReplicas must be an integer not below minReplicas, got {hi!r}")
        cpu = [m for m in hspec.get("metrics") or []
               if m.get("type") == "Resource" and (m.get("resource") or {}).get("name") == "cpu"]
        if not cpu:
            self.fail(hw, "must scale on CPU: a metrics entry of type Resource with resource.name cpu")
        for m in cpu:
            target = m["resource"].get("target") or {}
            if not (target.get("type") == "Utilization" and target.get("averageUtilization")) and \
                    not (target.get("type") == "AverageValue" and target.get("averageValue")):
                self.fail(hw, f"the CPU target needs type Utilization with averageUtilization or "
                          f"AverageValue with averageValue, got {target}")
        replicas = (dep.get("spec") or {}).get("replicas")
        if replicas is not None:
            outside = ""
            if lo is not None and isinstance(hi, int) and not (isinstance(replicas, int) and lo <= replicas <= hi):
                outside = f"; it is not even within [minReplicas, maxReplicas] = [{lo}, {hi}]"
            self.fail(dep_where, f"sets replicas: {replicas!r} while {hw} scales it: every `kubectl apply` "
                      "would reset the count to that, removing the pods the autoscaler added and ending "
                      f"their consoles; leave replicas out and let minReplicas set the floor{outside}")
        if len(pdbs) != 1:
            self.fail(dep_where, f"expected exactly one PodDisruptionBudget, found {len(pdbs)}")
            return
        pw, pdb = pdbs[0]
        pspec = pdb.get("spec") or {}
        if lo is None:
            return

        def pods(v):
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            m = re.fullmatch(r"(\d+)%", str(v))
            return -(-int(m.group(1)) * lo // 100) if m else None  # percentages round up

        if "minAvailable" in pspec:
            keep = pods(pspec["minAvailable"])
            if keep is None or keep < 1 or keep >= lo:
                self.fail(pw, f"minAvailable {pspec['minAvailable']!r} must keep at least 1 pod and fewer than "
                          f"the autoscaler's minReplicas ({lo}, {hw}): at or above it, a drain at the minimum "
                          "could evict nothing and would block")
        elif "maxUnavailable" in pspec:
            gone = pods(pspec["maxUnavailable"])
            if gone is None or gone < 1 or gone >= lo:
                self.fail(pw, f"maxUnavailable {pspec['maxUnavailable']!r} must let at least 1 pod go and keep "
                          f"at least 1 of the autoscaler's minReplicas ({lo}, {hw})")
        else:
            self.fail(pw, "needs minAvailable or maxUnavailable")

    # m. TLS in the pod --------------------------------------------------------------
    def check_tls_pod(self, where, pod, certificates, require):
        """With TLS_CERT_FILE set (required when `require`): both files from a Secret a
        Certificate writes, mounted read-only as a directory (never subPath), and probes over
        HTTPS; without it, probes over HTTP."""
        containers = pod.get("containers") or []
        if len(containers) != 1:
            return
        c = containers[0]
        cn = f"container {c.get('name')}"
        env = {e.get("name"): e.get("value") for e in c.get("env") or []}
        tls = "TLS_CERT_FILE" in env or "TLS_KEY_FILE" in env
        if require and not tls:
            self.fail(where, f"{cn}: a TLS overlay must set TLS_CERT_FILE and TLS_KEY_FILE")
        elif tls and not ("TLS_CERT_FILE" in env and "TLS_KEY_FILE" in env):
            self.fail(where, f"{cn}: TLS_CERT_FILE and TLS_KEY_FILE go together")
        for probe in ("readinessProbe", "livenessProbe"):
            scheme = ((c.get(probe) or {}).get("httpGet") or {}).get("scheme", "HTTP")
            if tls and scheme != "HTTPS":
                self.fail(where, f"{cn}: {probe} must have scheme: HTTPS: with TLS_CERT_FILE set the probe "
                          f"port (METRICS_ADDR) speaks TLS, and an HTTP probe fails; got {scheme!r}")
            elif not tls and scheme != "HTTP":
                self.fail(where, f"{cn}: {probe} has scheme {scheme!r}, but without TLS_CERT_FILE the "
                          "probe port speaks plain HTTP")
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        secrets_written = {(d.get("spec") or {}).get("secretName") for d in certificates}
        for var in ("TLS_CERT_FILE", "TLS_KEY_FILE", "CLIENT_CA_FILE"):
            path = env.get(var)
            if not path:
                continue
            if not str(path).startswith("/"):
                self.fail(where, f"{cn}: {var} must be an absolute path into a mounted volume, got {path!r}")
                continue
            mounts = [m for m in c.get("volumeMounts") or []
                      if path == m.get("mountPath") or path.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")]
            if not mounts:
                self.fail(where, f"{cn}: {var} {path!r} is under no volumeMount")
                continue
            m = max(mounts, key=lambda m: len(m.get("mountPath", "")))
            if m.get("subPath") or m.get("subPathExpr") or path == m.get("mountPath"):
                self.fail(where, f"{cn}: {var} comes from a subPath (or single-file) mount {m.get('mountPath')!r}: "
                          "it never sees the kubelet swap the Secret's `..data` symlink, so a renewed "
                          "certificate would never reach the proxy; mount the whole Secret as a directory")
                continue
            if m.get("readOnly") is not True:
                self.fail(where, f"{cn}: volumeMount {m.get('mountPath')!r} (for {var}) must be readOnly: true")
            secret = (volumes.get(m.get("name")) or {}).get("secret")
            if var == "CLIENT_CA_FILE":
                continue
            if not secret:
                self.fail(where, f"{cn}: {var} must come from a Secret volume (the Certificate's), "
                          f"volume {m.get('name')!r} is not one")
                continue
            if secret.get("secretName") not in secrets_written:
                self.fail(where, f"{cn}: {var} reads Secret {secret.get('secretName')!r}, which no Certificate "
                          f"writes (their secretName: {sorted(s for s in secrets_written if s)})")
            rel = path[len(str(m["mountPath"]).rstrip("/")) + 1:]
            key = {i.get("path"): i.get("key") for i in secret.get("items") or []}.get(rel, rel)
            if secret.get("items") is not None and rel not in {i.get("path") for i in secret["items"]}:
                key = None
            if key != CERT_MANAGER_KEYS[var]:
                self.fail(where, f"{cn}: {var} {path!r} must be key {CERT_MANAGER_KEYS[var]!r} of the "
                          f"Certificate's Secret, got {key!r}")

    def check_certificates(self, where, certificates, services, namespace):
        if not certificates:
            self.fail(where, "no cert-manager Certificate (cert-manager.io/v1)")
        for d in certificates:
            cw = f"{where} Certificate/{(d.get('metadata') or {}).get('name')}"
            spec = d.get("spec") or {}
            if d.get("apiVersion") != "cert-manager.io/v1":
                self.fail(cw, f"apiVersion must be cert-manager.io/v1, got {d.get('apiVersion')!r}")
            if not spec.get("secretName"):
                self.fail(cw, "spec.secretName is not set")
            ref = spec.get("issuerRef") or {}
            if not ref.get("name") or ref.get("kind", "Issuer") not in ("Issuer", "ClusterIssuer"):
                self.fail(cw, f"issuerRef needs a name and kind Issuer or ClusterIssuer, got {ref}")
            names = set(spec.get("dnsNames") or [])
            for svc in services:
                want = f"{svc}.{namespace}.svc"
                if want not in names:
                    self.fail(cw, f"dnsNames lack {want!r}, the Service's name in the overlay's namespace "
                              "(kustomize does not rewrite dnsNames)")

    # n. overlays ---------------------------------------------------------------------
    def render(self, path):
        kubectl = shutil.which("kubectl")
        if not kubectl:
            return None
        try:
            p = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.fail(self.rel(path), f"`kubectl kustomize` could not run: {e}")
            return None
        if p.returncode != 0:
            self.fail(self.rel(path), f"`kubectl kustomize` failed: {p.stderr.strip()}")
            return None
        return [d for d in self.yaml.safe_load_all(p.stdout) if isinstance(d, dict)]

    def check_overlay(self, overlay, docs, options):
        """`overlay`: its directory under deploy/; `docs`: what `kubectl kustomize` renders of it."""
        where = f"deploy/{overlay} (rendered)"
        kust = {}
        try:
            with open(os.path.join(DEPLOY, overlay, "kustomization.yaml"), encoding="utf-8") as f:
                kust = self.yaml.safe_load(f) or {}
        except (OSError, self.yaml.YAMLError):
            pass
        namespace = kust.get("namespace")
        if not namespace:
            self.fail(where, "the overlay's kustomization.yaml must set `namespace:` (the base's covers only "
                      "the base's resources, not what components add)")
        for d in docs:
            md = d.get("metadata") or {}
            if d.get("kind") not in CLUSTER_SCOPED and namespace and md.get("namespace") != namespace:
                self.fail(where, f"{d.get('kind')}/{md.get('name')} renders in namespace "
                          f"{md.get('namespace')!r}, not {namespace!r}")
        found = [(f"{where} {d.get('kind')}/{(d.get('metadata') or {}).get('name')}", d) for d in docs]
        deps = [(w, d) for w, d in found if d.get("kind") == "Deployment"]
        if len(deps) != 1:
            self.fail(where, f"expected exactly one Deployment, found {len(deps)}")
            return
        dw, dep = deps[0]
        pod = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in pod.get("containers") or []:
            for e in c.get("env") or []:
                if options is not None and e.get("name") not in options:
                    self.fail(dw, f"container {c.get('name')}: env {e.get('name')!r} is not an option of the "
                              f"proxy (`{os.path.basename(self.binary)} --help`)")
        certificates = [d for d in docs if d.get("kind") == "Certificate"]
        services = [(d.get("metadata") or {}).get("name") for d in docs if d.get("kind") == "Service"]
        self.check_certificates(where, certificates, services, namespace)
        self.check_tls_pod(dw, pod, certificates, require=True)
        self.check_scaling(found, dw, dep)
        ports = {p.get("name") for c in pod.get("containers") or [] for p in c.get("ports") or []}
        for w, d in found:
            if d.get("kind") == "PodMonitor":
                for ep in (d.get("spec") or {}).get("podMetricsEndpoints") or []:
                    if ep.get("scheme") != "https":
                        self.fail(w, f"scheme must be https: the probe port speaks TLS in this overlay, got "
                                  f"{ep.get('scheme')!r}")
                    if ep.get("port") not in ports:
                        self.fail(w, f"port {ep.get('port')!r} is not a named port of the Deployment ({sorted(ports)})")
            if d.get("kind") == "ConfigMap" and "grafana_dashboard" in ((d.get("metadata") or {}).get("labels") or {}):
                try:
                    with open(DASHBOARD, encoding="utf-8") as f:
                        want = json.load(f)
                    if [json.loads(v) for v in (d.get("data") or {}).values()] != [want]:
                        self.fail(w, f"must hold exactly {self.rel(DASHBOARD)}")
                except (OSError, ValueError) as e:
                    self.fail(w, f"its dashboard does not read as JSON: {e}")

    def check_overlays(self, options):
        if not shutil.which("kubectl"):
            self.notes.append("overlays not rendered (no kubectl)")
            return "skipped (no kubectl)"
        for overlay in OVERLAYS:
            docs = self.render(os.path.join(DEPLOY, overlay))
            if docs is not None:
                self.check_overlay(overlay, docs, options)
        return "ok"

    # o. the dashboard and the rules against the live /metrics ------------------------
    def check_queries(self, fams, dashboard, rule_docs):
        """Every metric a dashboard query or a rule names is in `fams`; each query names one at
        least (else the extraction is wrong); the dashboard and the rules cover what the
        issue asks for. Returns the number of distinct names checked."""
        checked, listed = set(), False
        rules, recorded = rule_queries(rule_docs)
        for label, queries, path, needs in (
                ("dashboard", dashboard_queries(dashboard), self.rel(DASHBOARD), DASHBOARD_NEEDS),
                ("rules", rules, self.rel(RULES), RULES_NEED)):
            if not queries:
                self.fail(path, f"no queries found in the {label}")
            used = set()
            for where, expr in queries:
                names = promql_metric_names(expr)
                if not names:
                    self.fail(f"{path} ({where})", f"names no metric: {expr.strip()!r}")
                for n in sorted(names):
                    checked.add(n)
                    used.add(families_used(n, fams))
                    problem = None if n in recorded else metric_problem(n, fams)
                    if problem and not listed:
                        # The families there are, once: enough to spot a typo or a rename.
                        listed = True
                        problem += (" (the live binary's /metrics has: "
                                    f"{', '.join(sorted(f for f in fams if f.startswith('kubevirt_vnc_proxy')))})")
                    if problem:
                        self.fail(f"{path} ({where})", problem)
            for family, what in needs.items():
                if family not in used:
                    self.fail(path, f"no query uses {family} ({what})")
        # A panel that says "per pod" shows one series per pod: a sum over pods under that
        # title reads as one pod's figure (N pods waiting look like one pod N times worse).
        for where, expr in dashboard_queries(dashboard):
            if "per pod" in where.lower():
                for op in promql_aggregations_dropping(expr, "pod"):
                    self.fail(f"{self.rel(DASHBOARD)} ({where})",
                              f"its title says per pod, but `{op}` aggregates over pods (add `by (pod)`): "
                              f"{expr.strip()!r}")
        return len(checked)

    def check_live_metrics(self):
        try:
            with open(DASHBOARD, encoding="utf-8") as f:
                dashboard = json.load(f)
        except (OSError, ValueError) as e:
            self.fail(self.rel(DASHBOARD), f"cannot read as JSON: {e}")
            dashboard = {}
        try:
            with open(RULES, encoding="utf-8") as f:
                rule_docs = [d for d in self.yaml.safe_load_all(f) if isinstance(d, dict)]
        except (OSError, self.yaml.YAMLError) as e:
            self.fail(self.rel(RULES), f"cannot read: {e}")
            rule_docs = []
        if not self.help:
            return "skipped (no binary)"
        # The TLS run exposes every family (the TLS ones exist only with a certificate);
        # a binary without the TLS options is run in cleartext, and its missing TLS
        # families are then reported like any other.
        tls = "[env TLS_CERT_FILE]" in self.help
        with tempfile.TemporaryDirectory() as tmp:
            try:
                text, not_after = run_proxy_for_metrics(self.binary, tls, tmp)
            except (RuntimeError, OSError) as e:
                self.fail(self.binary, f"reading /metrics from the running proxy failed: {e}")
                return "failed"
        fams = metric_families(text)
        if not tls:
            self.notes.append("the binary has no TLS_CERT_FILE option: /metrics read over plain HTTP")
        gauge = sample_value(text, EXPIRY)
        if not_after is not None and gauge is not None and abs(gauge - not_after) > 1:
            self.fail(self.binary, f"{EXPIRY} is {gauge:.0f}, but the certificate served has notAfter "
                      f"{not_after:.0f}: the expiry alert would fire at the wrong time")
        n = self.check_queries(fams, dashboard, rule_docs)
        return f"{n} metric names checked against /metrics{' over TLS' if tls else ''}"

    # p. PromQL syntax and the alerts' behaviour, with promtool -------------------------
    def check_promtool(self):
        """`promtool check rules` on the PrometheusRule's rules and on the dashboard's queries
        (as recording rules, Grafana's variables replaced), and `promtool test rules` with
        prometheusrule.test.yaml: each alert fires on the series it is for, and not on the
        ones beside it. Skipped, with a note, without promtool (Debian: apt install prometheus)."""
        promtool = shutil.which("promtool")
        if not promtool:
            self.notes.append("promtool not on PATH: the rules' and dashboard's PromQL syntax and the alert "
                              "tests (prometheusrule.test.yaml) were not run (Debian: apt install prometheus)")
            return "skipped (no promtool)"
        try:
            with open(RULES, encoding="utf-8") as f:
                rule = next(d for d in self.yaml.safe_load_all(f) if isinstance(d, dict)
                            and d.get("kind") == "PrometheusRule")
            with open(DASHBOARD, encoding="utf-8") as f:
                dashboard = json.load(f)
        except (OSError, ValueError, StopIteration, self.yaml.YAMLError) as e:
            self.fail(self.rel(RULES), f"cannot read the PrometheusRule or the dashboard: {e}")
            return "failed"
        grafana = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
        recorded = []
        for i, (where, expr) in enumerate(dashboard_queries(dashboard)):
            for var, value in grafana.items():
                expr = expr.replace(var, value)
            # The other variables stand in label matchers' regular expressions.
            expr = re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", ".*", expr)
            recorded.append({"record": f"dashboard:query_{i}", "expr": expr, "labels": {"where": where}})
        with tempfile.TemporaryDirectory() as tmp:
            rules_file = os.path.join(tmp, "rules.yaml")
            with open(rules_file, "w", encoding="utf-8") as f:
                self.yaml.safe_dump(rule.get("spec") or {}, f)
            dash_file = os.path.join(tmp, "dashboard-queries.yaml")
            with open(dash_file, "w", encoding="utf-8") as f:
                self.yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}, f)
            test_file = os.path.join(tmp, "prometheusrule.test.yaml")
            shutil.copy(RULES_TEST, test_file)
            for what, cmd in ((self.rel(RULES), [promtool, "check", "rules", rules_file]),
                              (self.rel(DASHBOARD), [promtool, "check", "rules", dash_file]),
                              (self.rel(RULES_TEST), [promtool, "test", "rules", test_file])):
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=tmp)
                except (OSError, subprocess.TimeoutExpired) as e:
                    self.fail(what, f"`{' '.join(cmd[1:3])}` could not run: {e}")
                    continue
                if p.returncode != 0:
                    out = " | ".join(ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip())
                    self.fail(what, f"`promtool {' '.join(cmd[1:3])}` failed: {out[:3000]}")
        return "ok"

    # ------------------------------------------------------------------------
    def run(self):
        self.parse_all()
        listed = self.check_kustomization()
        self.check_identity(listed)
        k = (self.docs.get("kustomization.yaml") or [{}])[0]
        namespace = k.get("namespace")
        options = self.proxy_env_names()

        env_count = 0
        where, dep = self.one(listed, "Deployment")
        sa_name = None
        if dep is not None:
            pod, image = self.check_deployment(where, dep, listed, options)
            secret_ref, env_count = self.check_env(where, pod, options)
            self.check_secret_example(secret_ref)
            sa_name = pod.get("serviceAccountName")
            swhere, sa = self.one(listed, "ServiceAccount")
            if sa is not None and sa["metadata"]["name"] != sa_name:
                self.fail(where, f"serviceAccountName {sa_name!r} is not the listed ServiceAccount "
                          f"{sa['metadata']['name']!r}")
            image_names = [i.get("name") for i in k.get("images") or []]
            if image and image.split("@")[0].rsplit(":", 1)[0] not in image_names:
                self.fail("deploy/kubernetes/kustomization.yaml",
                          f"`images:` has no entry named after the Deployment's image {image!r}, so it cannot be overridden")
            self.check_rbac(listed, sa_name, namespace)

            svc_where, svc = self.one(listed, "Service")
            if svc is not None:
                sspec = svc.get("spec") or {}
                if (sspec.get("selector") or {}).get(LABEL) != NAME:
                    self.fail(svc_where, f"selector must be {LABEL}: {NAME}")
                if not any(p.get("port") == PORT and p.get("targetPort") in (PORT, "ws") for p in sspec.get("ports") or []):
                    self.fail(svc_where, f"needs port {PORT} with targetPort ws (or {PORT})")

            pdb_where, pdb = self.one(listed, "PodDisruptionBudget")
            if pdb is not None:
                pspec = pdb.get("spec") or {}
                if ((pspec.get("selector") or {}).get("matchLabels") or {}).get(LABEL) != NAME:
                    self.fail(pdb_where, f"selector.matchLabels must be {LABEL}: {NAME}")

            ns_docs = self.resources_of(listed, "Namespace")
            if namespace and not any(d["metadata"]["name"] == namespace for _w, d in ns_docs):
                self.fail("deploy/kubernetes", f"no listed Namespace named {namespace!r}")

            self.check_readme_commands(listed, namespace, secret_ref, k)

            found = [(f"deploy/kubernetes/{rel}", d) for rel in listed for d in self.docs[rel]]
            self.check_scaling(found, where, dep)
            self.check_tls_pod(where, pod, [], require=False)

        render = self.check_render()
        overlays = self.check_overlays(options)
        live = self.check_live_metrics()
        promtool = self.check_promtool()
        docker = self.check_dockerfile()

        if self.errors:
            for e in self.errors:
                print(f"deploy/check.py: FAIL: {e}", file=sys.stderr)
            print(f"deploy/check.py: {len(self.errors)} problem(s)", file=sys.stderr)
            return 1
        ndocs = sum(len(d) for d in self.docs.values())
        print(f"deploy/check.py: OK: {len(self.docs)} YAML files ({ndocs} documents), "
              f"{env_count} env names among the proxy's {len(options or ())} options, "
              f"RBAC get virtualmachineinstances/vnc only, kustomize render {render}, "
              f"overlays {overlays}, dashboard and rules: {live}, promtool {promtool}, "
              f"Dockerfile context {docker}")
        for n in self.notes:
            print(f"deploy/check.py: note: {n}")
        return 0


def readme_deploy_commands(readme):
    """The commands of the first sh block under '## Deploying to a cluster', one string per
    command (backslash continuations joined, comments dropped)."""
    section = readme.split("\n## Deploying to a cluster", 1)
    if len(section) < 2:
        return None
    body = section[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", body, re.S)
    if not m:
        return None
    commands, pending = [], ""
    for line in m.group(1).splitlines():
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def simulate_deploy(commands, kustom_namespace, namespaces_in_manifests, secret_ref, image_name):
    """Walk the README's deploy commands as a fresh cluster would see them; the problems."""
    # `env`: exported variables (seen by the commands run); `shell`: variables set by a bare
    # `NAME=value` line, which later words expand but child processes do not see.
    problems, env, shell = [], {}, {}
    namespaces, secrets = set(), set()
    built = pushed = set_image = None
    applied = False

    def expand(word):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), shell.get(m.group(1), m.group(0))), word)

    def step(words, text):
        nonlocal built, pushed, set_image, applied
        # Leading subshell/cd: `(cd DIR && CMD)`.
        if words[0].startswith("(") or words[0] == "cd":
            joined = text.strip("()")
            words = shlex.split(joined.split("&&", 1)[-1])
        if words[0] == "export":
            for assignment in words[1:]:
                name, eq, value = assignment.partition("=")
                # `export NAME` exports a variable set earlier by a bare assignment.
                env[name] = value if eq else shell.get(name, env.get(name, ""))
                shell.pop(name, None)
            return
        # `NAME=value command`: the assignments hold for that command only.
        local = dict(env)
        assigned = {}
        while words and re.fullmatch(r"\w+=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            assigned[name] = value
        if not words:
            # A bare `NAME=value` line: a shell variable, expanded by later commands but not
            # passed to the programs they run (that takes `export`).
            for name, value in assigned.items():
                if name not in env:
                    shell[name] = value
                else:
                    env[name] = value
            return
        local.update(assigned)
        if words[:2] == ["bash", "deploy/build-image.sh"] or words[0] == "deploy/build-image.sh":
            built = local.get("IMAGE", "kubevirt-vnc-proxy:latest")
            if "IMAGE" not in local and "IMAGE" in shell:
                problems.append(f"`{text}` does not see IMAGE={shell['IMAGE']}: it was set by a bare "
                                "`IMAGE=...` line, not exported, so the script builds "
                                "kubevirt-vnc-proxy:latest (write `export IMAGE=...`)")
            return
        if len(words) >= 3 and words[0] in ("docker", "podman", "buildah") and words[1] == "push":
            pushed = words[2]
            return
        if words[:4] == ["kustomize", "edit", "set", "image"]:
            name, _, value = words[4].partition("=")
            if name != image_name:
                problems.append(f"`{text}` sets image {name!r}, but the kustomization's "
                                f"`images:` entry is {image_name!r}")
            set_image = value
            return
        if words[0] != "kubectl":
            return
        ns = None
        if "-n" in words:
            ns = words[words.index("-n") + 1]
        elif "--namespace" in words:
            ns = words[words.index("--namespace") + 1]
        rest = [w for i, w in enumerate(words[1:], 1)
                if w not in ("-n", "--namespace") and words[i - 1] not in ("-n", "--namespace")]
        if rest[:2] == ["create", "namespace"]:
            namespaces.add(rest[2])
            return
        if rest[:2] == ["apply", "-f"] and rest[2].endswith("namespace.yaml"):
            namespaces.update(namespaces_in_manifests)
            return
        if ns is not None and ns not in namespaces:
            problems.append(f"`{text}` uses namespace {ns!r} before any command creates it")
        if rest[:3] == ["create", "secret", "generic"]:
            name = rest[3]
            keys = [w.split("=", 1)[1].split("=", 1)[0] for w in rest
                    if w.startswith("--from-literal=") or w.startswith("--from-file=")]
            for key in keys:
                secrets.add((ns, name, key))
            return
        if rest[:2] == ["apply", "-k"]:
            applied = True
            if secret_ref and (kustom_namespace, *secret_ref) not in secrets:
                problems.append(
                    f"`{text}` starts the Deployment, which reads key {secret_ref[1]!r} of Secret "
                    f"{secret_ref[0]!r} in {kustom_namespace!r}, but no command before it creates that")
            namespaces.update(namespaces_in_manifests)

    for words in commands:
        words = [expand(w) for w in words]
        text = " ".join(words)
        try:
            step(words, text)
        except (IndexError, ValueError):
            problems.append(f"`{text}`: cannot read this command (an argument is missing)")
    if not applied:
        problems.append("no `kubectl apply -k deploy/kubernetes`")
    if built is None or pushed is None or set_image is None:
        problems.append("the image must be built (deploy/build-image.sh), pushed and set with "
                        "`kustomize edit set image`")
    elif not built == pushed == set_image:
        problems.append(f"the image built ({built!r}), pushed ({pushed!r}) and set ({set_image!r}) differ")
    return problems


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return Checker(sys.argv[1]).run()


if __name__ == "__main__":
    sys.exit(main())
