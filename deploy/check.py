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
     RuntimeDefault seccomp, service-account token mounted), 2 replicas, a
     PodDisruptionBudget, port 5001 named ws, resource requests and limits;
  g. terminationGracePeriodSeconds is at least 5 s above the longest the
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
     image` puts under the `images:` name of the kustomization.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

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

    def check_termination_grace(self, where, pod):
        period = pod.get("terminationGracePeriodSeconds")
        grace = self.shutdown_grace(where, pod)
        if grace is None:
            return
        need = grace + PROXY_CLOSING_BOUND + TERMINATION_MARGIN
        if not isinstance(period, int) or isinstance(period, bool) or period < need:
            self.fail(where, f"terminationGracePeriodSeconds must be an integer of at least {need}: the proxy "
                      f"takes up to SHUTDOWN_GRACE_SECONDS ({grace}) + {PROXY_CLOSING_BOUND} s from SIGTERM to "
                      f"exit, and the kubelet's SIGKILL must come at least {TERMINATION_MARGIN} s later; "
                      f"got {period!r}")

    # f, g, h. Deployment --------------------------------------------------------
    def check_deployment(self, where, dep, listed, options):
        spec = dep.get("spec") or {}
        tmpl = spec.get("template") or {}
        pod = tmpl.get("spec") or {}
        if spec.get("replicas") != 2:
            self.fail(where, f"replicas must be 2, got {spec.get('replicas')!r}")
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
                if pspec.get("minAvailable") != 1 and pspec.get("maxUnavailable") != 1:
                    self.fail(pdb_where, "needs minAvailable: 1 or maxUnavailable: 1")
                if ((pspec.get("selector") or {}).get("matchLabels") or {}).get(LABEL) != NAME:
                    self.fail(pdb_where, f"selector.matchLabels must be {LABEL}: {NAME}")

            ns_docs = self.resources_of(listed, "Namespace")
            if namespace and not any(d["metadata"]["name"] == namespace for _w, d in ns_docs):
                self.fail("deploy/kubernetes", f"no listed Namespace named {namespace!r}")

            self.check_readme_commands(listed, namespace, secret_ref, k)

        render = self.check_render()
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
