"""Tests of deploy/check.py: the README's deploy commands, the probes, the autoscaler and
disruption budget, the TLS overlays, and the dashboard's and rules' metric names against a
live /metrics (run by .ci/run: `python3 -m unittest deploy/test_check.py`)."""

import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("check", os.path.join(HERE, "check.py"))
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

NS = "kubevirt-vnc-proxy"
REF = (NS, "secret-key")


def simulate(block):
    commands = check.readme_deploy_commands("\n## Deploying to a cluster\n```sh\n" + block + "```\n")
    return check.simulate_deploy(commands, NS, {NS}, REF, "kubevirt-vnc-proxy")


GOOD = """export IMAGE=registry.example.com/kubevirt-vnc-proxy:0.1.0
bash deploy/build-image.sh
docker push "$IMAGE"
(cd deploy/kubernetes && kustomize edit set image kubevirt-vnc-proxy="$IMAGE")
kubectl apply -f deploy/kubernetes/namespace.yaml
kubectl -n kubevirt-vnc-proxy create secret generic kubevirt-vnc-proxy \\
  --from-literal=secret-key="$KEY"
kubectl apply -k deploy/kubernetes
"""


class ReadmeDeployCommands(unittest.TestCase):
    def test_an_inline_image_and_a_missing_argument(self):
        inline = GOOD.replace("export IMAGE=registry.example.com/kubevirt-vnc-proxy:0.1.0\nbash",
                              "IMAGE=registry.example.com/kubevirt-vnc-proxy:0.1.0 bash")
        inline = inline.replace('"$IMAGE"', "registry.example.com/kubevirt-vnc-proxy:0.1.0")
        self.assertEqual(simulate(inline), [])
        broken = simulate(GOOD + "kubectl -n\nkubectl create namespace\n")
        self.assertEqual(sum("cannot read this command" in p for p in broken), 2, broken)

    def test_the_readme_as_it_is(self):
        with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as f:
            commands = check.readme_deploy_commands(f.read())
        self.assertEqual(check.simulate_deploy(commands, NS, {NS}, REF, "kubevirt-vnc-proxy"), [])

    def test_a_good_order_passes(self):
        self.assertEqual(simulate(GOOD), [])

    def test_the_secret_before_its_namespace_fails(self):
        bad = GOOD.replace("kubectl apply -f deploy/kubernetes/namespace.yaml\n", "")
        self.assertTrue(any("before any command creates it" in p for p in simulate(bad)))

    def test_another_key_or_a_late_secret_fails(self):
        self.assertTrue(simulate(GOOD.replace("secret-key=", "key=")))
        late = GOOD.replace("kubectl apply -k deploy/kubernetes\n", "")
        late = late.replace("kubectl apply -f", "kubectl apply -k deploy/kubernetes\nkubectl apply -f")
        self.assertTrue(any("no command before it creates that" in p for p in simulate(late)))

    def test_an_image_not_pushed_or_not_set_fails(self):
        self.assertTrue(simulate(GOOD.replace('docker push "$IMAGE"', "docker push other:1")))
        self.assertTrue(simulate(GOOD.replace("kustomize edit set image", "echo")))
        self.assertTrue(simulate(GOOD.replace("kubevirt-vnc-proxy=\"$IMAGE\"", "other=\"$IMAGE\"")))

    def test_a_bare_assignment_is_a_shell_variable(self):
        # Expanded by later words, so the push and `kustomize edit set image` agree...
        bare = GOOD.replace("export IMAGE=", "IMAGE=")
        problems = simulate(bare)
        self.assertFalse(any("cannot read this command" in p for p in problems), problems)
        # ...but not exported: build-image.sh builds its default, and that is what is said.
        self.assertTrue(any("not exported" in p and "bash deploy/build-image.sh" in p for p in problems),
                        problems)
        # Exported afterwards, or given on the command itself, it is what the script sees.
        self.assertEqual(simulate(bare.replace("bash deploy/build-image.sh",
                                               "export IMAGE\nbash deploy/build-image.sh")), [])
        self.assertEqual(simulate(bare.replace("bash deploy/build-image.sh",
                                               'IMAGE="$IMAGE" bash deploy/build-image.sh')), [])


def container(metrics_addr):
    """The Deployment's container as deploy/kubernetes/deployment.yaml has it, as far as
    check_deployment's probe rules look, with METRICS_ADDR set to `metrics_addr`."""
    probe = {"httpGet": {"path": None, "port": "metrics"}}
    return {
        "name": "proxy",
        "ports": [{"name": "ws", "containerPort": 5001}, {"name": "metrics", "containerPort": 9090}],
        "env": [{"name": "METRICS_ADDR", "value": metrics_addr}],
        "readinessProbe": {"httpGet": dict(probe["httpGet"], path="/readyz")},
        "livenessProbe": {"httpGet": dict(probe["httpGet"], path="/healthz")},
    }


def metrics_addr_problems(metrics_addr):
    checker = check.Checker.__new__(check.Checker)
    checker.errors, checker.notes, checker.help = [], [], ""
    dep = {"spec": {"template": {"spec": {"containers": [container(metrics_addr)]}}}}
    checker.check_deployment("deployment.yaml", dep, [], None)
    return [e for e in checker.errors if "METRICS_ADDR" in e]


class MetricsAddr(unittest.TestCase):
    def test_any_address_on_the_metrics_port_passes(self):
        self.assertEqual(metrics_addr_problems("0.0.0.0:9090"), [])
        self.assertEqual(metrics_addr_problems("[::]:9090"), [])

    def test_a_bad_metrics_addr_is_reported_once(self):
        for bad in ("", "0.0.0.0:9091", "0.0.0.0:metrics"):
            self.assertEqual(len(metrics_addr_problems(bad)), 1, bad)

    def test_loopback_fails_the_kubelet_probes(self):
        for loopback in ("127.0.0.1:9090", "127.1.2.3:9090", "localhost:9090", "[::1]:9090"):
            problems = metrics_addr_problems(loopback)
            self.assertEqual(len(problems), 1, (loopback, problems))
            self.assertIn("loopback", problems[0])


def bare_checker(help_text=""):
    checker = check.Checker.__new__(check.Checker)
    checker.errors, checker.notes, checker.help, checker.docs = [], [], help_text, {}
    checker.binary = "kubevirt-vnc-proxy"
    checker.yaml = check.load_yaml_module()
    return checker


def load_base():
    """The base's documents as check.py lists them: [(where, doc)] and the Deployment."""
    checker = bare_checker()
    checker.parse_all()
    listed = checker.check_kustomization()
    found = [(f"deploy/kubernetes/{rel}", d) for rel in listed for d in checker.docs[rel]]
    dep = next(d for _w, d in found if d.get("kind") == "Deployment")
    return found, dep


def scaling_problems(found, dep):
    checker = bare_checker()
    checker.check_scaling(found, "deployment.yaml", dep)
    return checker.errors


def edited(found, kind, edit):
    """A deep copy of `found` with `edit` applied to the document of that kind."""
    out = copy.deepcopy(found)
    for _w, d in out:
        if d.get("kind") == kind:
            edit(d)
    return out


class Termination(unittest.TestCase):
    def problems(self, pod):
        checker = bare_checker()
        checker.check_termination_grace("deployment.yaml", pod)
        return checker.errors

    def setUp(self):
        _found, dep = load_base()
        self.pod = dep["spec"]["template"]["spec"]

    def test_the_base_as_it_is(self):
        self.assertEqual(self.problems(self.pod), [])

    def test_no_prestop_sleep_is_reported(self):
        pod = copy.deepcopy(self.pod)
        for c in pod["containers"]:
            c.pop("lifecycle", None)
        self.assertTrue(any("preStop.sleep.seconds" in p for p in self.problems(pod)))

    def test_the_sleep_counts_in_the_termination_period(self):
        pod = copy.deepcopy(self.pod)
        pod["terminationGracePeriodSeconds"] = 35  # 25 + 2 + 5, without the 5 s sleep
        problems = self.problems(pod)
        self.assertTrue(any("at least 37" in p and "preStop sleep (5 s)" in p for p in problems), problems)


class Scaling(unittest.TestCase):
    def setUp(self):
        self.found, self.dep = load_base()

    def test_the_base_as_it_is(self):
        self.assertEqual(scaling_problems(self.found, self.dep), [])

    def test_a_budget_at_the_autoscalers_minimum_blocks_drains(self):
        def at_min(d):
            d["spec"]["minAvailable"] = 2
        problems = scaling_problems(edited(self.found, "PodDisruptionBudget", at_min), self.dep)
        self.assertTrue(any("minAvailable 2" in p and "block" in p for p in problems), problems)

        def all_may_go(d):
            d["spec"].pop("minAvailable")
            d["spec"]["maxUnavailable"] = "100%"
        problems = scaling_problems(edited(self.found, "PodDisruptionBudget", all_may_go), self.dep)
        self.assertTrue(any("maxUnavailable" in p for p in problems), problems)

    def test_replicas_in_the_deployment_are_reported(self):
        dep = copy.deepcopy(self.dep)
        dep["spec"]["replicas"] = 2
        problems = scaling_problems(self.found, dep)
        self.assertTrue(any("sets replicas: 2" in p and "kubectl apply" in p for p in problems), problems)
        dep["spec"]["replicas"] = 40
        self.assertTrue(any("not even within" in p for p in scaling_problems(self.found, dep)))

    def test_the_autoscaler_must_scale_this_deployment_on_cpu_from_two(self):
        def other_target(d):
            d["spec"]["scaleTargetRef"]["name"] = "other"
        self.assertTrue(any("scaleTargetRef" in p for p in
                            scaling_problems(edited(self.found, "HorizontalPodAutoscaler", other_target), self.dep)))

        def memory(d):
            d["spec"]["metrics"][0]["resource"]["name"] = "memory"
        self.assertTrue(any("must scale on CPU" in p for p in
                            scaling_problems(edited(self.found, "HorizontalPodAutoscaler", memory), self.dep)))

        def one(d):
            d["spec"]["minReplicas"] = 1
        self.assertTrue(any("minReplicas must be at least 2" in p for p in
                            scaling_problems(edited(self.found, "HorizontalPodAutoscaler", one), self.dep)))
        no_hpa = [(w, d) for w, d in self.found if d.get("kind") != "HorizontalPodAutoscaler"]
        self.assertTrue(any("HorizontalPodAutoscaler" in p for p in scaling_problems(no_hpa, self.dep)))


@unittest.skipUnless(shutil.which("kubectl"), "kubectl renders the overlays")
class Overlays(unittest.TestCase):
    OPTIONS = {"SECRET_KEY", "LOCAL_DEV_MODE", "LOGLEVEL", "LOG_FORMAT", "SHUTDOWN_GRACE_SECONDS",
               "METRICS_ADDR", "MAX_CONNECTIONS", "TLS_CERT_FILE", "TLS_KEY_FILE", "CLIENT_CA_FILE"}

    @classmethod
    def setUpClass(cls):
        checker = bare_checker()
        cls.rendered = {o: checker.render(os.path.join(check.DEPLOY, o)) for o in check.OVERLAYS}
        assert not checker.errors, checker.errors

    def problems(self, overlay, edit=None, options=None):
        docs = copy.deepcopy(self.rendered[overlay])
        if edit:
            edit({d["kind"]: d for d in docs})
        checker = bare_checker()
        checker.check_overlay(overlay, docs, options or self.OPTIONS)
        return checker.errors

    @staticmethod
    def container(kinds):
        return kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]

    def test_the_overlays_as_they_are(self):
        for overlay in check.OVERLAYS:
            self.assertEqual(self.problems(overlay), [], overlay)

    def test_an_http_probe_is_reported(self):
        def http(kinds):
            self.container(kinds)["livenessProbe"]["httpGet"].pop("scheme")
        problems = self.problems("overlays/tls", http)
        self.assertTrue(any("livenessProbe must have scheme: HTTPS" in p for p in problems), problems)

    def test_a_subpath_mount_is_reported(self):
        def subpath(kinds):
            c = self.container(kinds)
            c["volumeMounts"][0]["subPath"] = "tls.crt"
            c["volumeMounts"][0]["mountPath"] = "/etc/kubevirt-vnc-proxy/tls/tls.crt"
        problems = self.problems("overlays/tls", subpath)
        self.assertTrue(any("TLS_CERT_FILE comes from a subPath" in p and "..data" in p for p in problems),
                        problems)

    def test_an_unknown_env_name_is_reported(self):
        problems = self.problems("overlays/tls", options=self.OPTIONS - {"TLS_KEY_FILE"})
        self.assertTrue(any("'TLS_KEY_FILE' is not an option" in p for p in problems), problems)

    def test_files_from_another_secret_or_key_are_reported(self):
        def other_secret(kinds):
            kinds["Certificate"]["spec"]["secretName"] = "other"
        self.assertTrue(any("which no Certificate writes" in p for p in self.problems("overlays/tls", other_secret)))

        def swapped(kinds):
            for e in self.container(kinds)["env"]:
                if e["name"] == "TLS_KEY_FILE":
                    e["value"] = "/etc/kubevirt-vnc-proxy/tls/tls.crt"
        self.assertTrue(any("must be key 'tls.key'" in p for p in self.problems("overlays/tls", swapped)))

    def test_a_resource_outside_the_namespace_and_a_cleartext_scrape_are_reported(self):
        def no_ns(kinds):
            kinds["Certificate"]["metadata"].pop("namespace")
        self.assertTrue(any("Certificate/kubevirt-vnc-proxy renders in namespace None" in p
                            for p in self.problems("overlays/tls", no_ns)))

        def http_scrape(kinds):
            kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["scheme"] = "http"
        self.assertTrue(any("scheme must be https" in p for p in self.problems("overlays/tls-monitoring", http_scrape)))

    def test_dns_names_must_name_the_service(self):
        def moved(kinds):
            kinds["Certificate"]["spec"]["dnsNames"] = ["proxy.example.com"]
        self.assertTrue(any("dnsNames lack 'kubevirt-vnc-proxy.kubevirt-vnc-proxy.svc'" in p
                            for p in self.problems("overlays/tls", moved)))


class BaseProbes(unittest.TestCase):
    def test_https_probes_without_tls_are_reported(self):
        _found, dep = load_base()
        pod = copy.deepcopy(dep["spec"]["template"]["spec"])
        checker = bare_checker()
        checker.check_tls_pod("deployment.yaml", pod, [], require=False)
        self.assertEqual(checker.errors, [])
        pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] = "HTTPS"
        checker.check_tls_pod("deployment.yaml", pod, [], require=False)
        self.assertTrue(any("plain HTTP" in e for e in checker.errors), checker.errors)


class PromQL(unittest.TestCase):
    def test_functions_labels_keywords_and_variables_are_not_metrics(self):
        names = check.promql_metric_names
        self.assertEqual(names('sum by (status) (rate(a_total{status=~"5..", pod=~"$pod"}[$__rate_interval]))'),
                         {"a_total"})
        self.assertEqual(names("histogram_quantile(0.9, sum by (namespace, le) (rate(h_bucket[10m]))) > 1"),
                         {"h_bucket"})
        self.assertEqual(names("min without (pod) (e) - time() < 7 * 24 * 3600"), {"e"})
        self.assertEqual(names("a < bool b and on (pod) group_left (node) c == 0 offset 5m unless d"),
                         {"a", "b", "c", "d"})
        self.assertEqual(names('{__name__="n", x="rate(y)"} + {__name__=~"re.*"} # z\n+ absent(w)'),
                         {"n", "w"})
        self.assertEqual(names('label_replace(v, "dst", "$1", "src", "(.*)") * Inf'), {"v"})

    def test_grafana_variable_queries(self):
        q = check.grafana_variable_query
        self.assertEqual(q({"query": "label_values(m{ns=~\"$ns\"}, pod)"}), 'm{ns=~"$ns"}')
        self.assertIsNone(q("label_values(namespace)"))
        self.assertEqual(q("query_result(sum(m))"), "sum(m)")

    def test_histogram_suffixes_only_on_histograms(self):
        fams = check.metric_families(textwrap.dedent("""\
            # HELP h_seconds x
            # TYPE h_seconds histogram
            h_seconds_bucket{le="+Inf"} 0
            h_seconds_sum 0
            h_seconds_count 0
            # TYPE c_total counter
            # TYPE g gauge
            g 1
            loose 2
            """))
        self.assertEqual(fams, {"h_seconds": "histogram", "c_total": "counter", "g": "gauge", "loose": "untyped"})
        for ok in ("h_seconds_bucket", "h_seconds_count", "h_seconds_sum", "c_total", "g", "loose"):
            self.assertIsNone(check.metric_problem(ok, fams), ok)
        self.assertIn("is a histogram", check.metric_problem("h_seconds", fams))
        for missing in ("c_total_count", "g_bucket", "made_up_total"):
            self.assertIn("is not in the proxy's /metrics", check.metric_problem(missing, fams), missing)


FAMS_TEXT = "\n".join(f"# TYPE {n} {t}" for n, t in {
    **{f: "counter" for f in ("kubevirt_vnc_proxy_sessions_total", "kubevirt_vnc_proxy_refusals_total",
                              "kubevirt_vnc_proxy_bytes_total", "kubevirt_vnc_proxy_limits_hit_total",
                              "kubevirt_vnc_proxy_keepalive_timeouts_total",
                              "kubevirt_vnc_proxy_backpressure_pauses_total",
                              "kubevirt_vnc_proxy_tls_reloads_total", "kubevirt_vnc_proxy_tls_reload_failures_total",
                              "kubevirt_vnc_proxy_tls_handshake_failures_total")},
    **{f: "gauge" for f in ("kubevirt_vnc_proxy_open_sessions", "kubevirt_vnc_proxy_open_connections",
                            "kubevirt_vnc_proxy_max_connections", "kubevirt_vnc_proxy_workers",
                            "kubevirt_vnc_proxy_workers_alive", "kubevirt_vnc_proxy_draining",
                            "kubevirt_vnc_proxy_sessions_waiting_for_memory", "kubevirt_vnc_proxy_buffer_bytes",
                            check.EXPIRY)},
    **{f: "histogram" for f in ("kubevirt_vnc_proxy_upstream_dial_seconds", "kubevirt_vnc_proxy_handshake_seconds")},
}.items()) + "\n"


def load_kit():
    with open(check.DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    with open(check.RULES, encoding="utf-8") as f:
        rules = [d for d in check.load_yaml_module().safe_load_all(f) if d]
    return dashboard, rules


def query_problems(dashboard, rules, text=FAMS_TEXT):
    checker = bare_checker()
    checker.check_queries(check.metric_families(text), dashboard, rules)
    return checker.errors


class DashboardAndRules(unittest.TestCase):
    def test_the_kit_as_it_is_against_the_promised_families(self):
        dashboard, rules = load_kit()
        self.assertEqual(query_problems(dashboard, rules), [])

    def test_a_made_up_metric_in_the_dashboard_is_reported(self):
        dashboard, rules = load_kit()
        row = {"type": "row", "title": "r", "panels": [
            {"title": "p", "targets": [{"refId": "A", "expr": "sum(rate(kubevirt_vnc_proxy_made_up_total[5m]))"}]}]}
        dashboard["panels"].append(row)
        problems = query_problems(dashboard, rules)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("row 'r', panel 'p' target A", problems[0])
        self.assertIn("kubevirt_vnc_proxy_made_up_total is not in the proxy's /metrics", problems[0])

    def test_a_made_up_metric_in_a_rule_or_a_variable_is_reported(self):
        dashboard, rules = load_kit()
        rules[0]["spec"]["groups"][0]["rules"][0]["expr"] = (
            "kubevirt_vnc_proxy_open_connections / kubevirt_vnc_proxy_max_conns > 0.8")
        dashboard["templating"]["list"][1]["query"] = {"query": "label_values(kubevirt_vnc_proxy_nope, namespace)"}
        problems = query_problems(dashboard, rules)
        self.assertTrue(any("KubevirtVncProxyNearMaxConnections" in p and "kubevirt_vnc_proxy_max_conns" in p
                            for p in problems), problems)
        self.assertTrue(any("variable 'namespace'" in p and "kubevirt_vnc_proxy_nope" in p for p in problems), problems)

    def test_aggregations_that_drop_a_label(self):
        drop = check.promql_aggregations_dropping
        self.assertEqual(drop("max by (pod) (x)", "pod"), [])
        self.assertEqual(drop("sum(x{pod=~\"$pod\"}) by (namespace, pod)", "pod"), [])
        self.assertEqual(drop("sum without (le) (x) / max by (pod) (y)", "pod"), [])
        self.assertEqual(drop("rate(x[5m])", "pod"), [])
        self.assertEqual(drop("sum(x{pod=~\"$pod\"})", "pod"), ["sum"])
        self.assertEqual(drop("max by (pod) (x) / count(y) by (namespace)", "pod"), ["count"])
        # topk and the like pick series whole; label names are not operators.
        self.assertEqual(drop("topk(5, max by (pod) (x))", "pod"), [])
        self.assertEqual(drop("x{quantile=\"0.99\"}", "pod"), [])
        self.assertEqual(drop("max by (pod) (x) * on (pod) group_left (count) y", "pod"), [])
        self.assertEqual(drop("quantile(0.9, x)", "pod"), ["quantile"])

    def test_a_per_pod_panel_summing_over_pods_is_reported(self):
        dashboard, rules = load_kit()
        dashboard["panels"].append({"title": "Waiting sessions per pod", "targets": [
            {"refId": "A", "expr": "max by (pod) (kubevirt_vnc_proxy_buffer_bytes)"},
            {"refId": "B", "expr": "sum(kubevirt_vnc_proxy_sessions_waiting_for_memory)"}]})
        problems = query_problems(dashboard, rules)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("panel 'Waiting sessions per pod' target B", problems[0])
        self.assertIn("`sum` aggregates over pods", problems[0])

    def test_a_recorded_name_counts_and_a_missing_family_is_reported(self):
        dashboard, rules = load_kit()
        group = rules[0]["spec"]["groups"][0]["rules"]
        group.append({"record": "ns:kubevirt_vnc_proxy_refusals:rate5m",
                      "expr": "sum by (namespace) (rate(kubevirt_vnc_proxy_refusals_total[5m]))"})
        group.append({"alert": "X", "expr": "ns:kubevirt_vnc_proxy_refusals:rate5m > 1"})
        self.assertEqual(query_problems(dashboard, rules), [])
        text = FAMS_TEXT.replace(f"# TYPE {check.EXPIRY} gauge\n", "")
        problems = query_problems(dashboard, rules, text)
        self.assertTrue(any(check.EXPIRY in p for p in problems), problems)
        dashboard["panels"] = [p for p in dashboard["panels"] if "Bytes" not in p.get("title", "")]
        self.assertTrue(any("no query uses kubevirt_vnc_proxy_bytes_total" in p
                            for p in query_problems(dashboard, rules)))


# A stand-in for the proxy binary: prints `[env NAME]` options for --help, and serves
# FAMS_TEXT on METRICS_ADDR over TLS (TLS_CERT_FILE/TLS_KEY_FILE), the expiry gauge at
# the certificate's notAfter plus FAKE_SKEW seconds.
FAKE_PROXY = r'''
import os, socket, ssl, sys
# The checker runs it with a clean environment: its settings are files beside it.
here = os.path.dirname(os.path.abspath(sys.argv[0]))
if "--help" in sys.argv:
    print("\n".join(f"  --x <value>   [env {n}]" for n in ("TLS_CERT_FILE", "TLS_KEY_FILE", "METRICS_ADDR")))
    sys.exit(0)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.environ["TLS_CERT_FILE"], os.environ["TLS_KEY_FILE"])
info = ssl._ssl._test_decode_cert(os.environ["TLS_CERT_FILE"])
skew = int(open(os.path.join(here, "skew")).read())
expiry = ssl.cert_time_to_seconds(info["notAfter"]) + skew
host, port = os.environ["METRICS_ADDR"].rsplit(":", 1)
srv = socket.create_server((host, int(port)))
body = (open(os.path.join(here, "fams")).read() + "EXPIRY %d\n" % expiry).encode()
while True:
    conn, _ = srv.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            s.recv(4096)
            s.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
    except (OSError, ssl.SSLError):
        pass
'''


@unittest.skipUnless(shutil.which("openssl"), "openssl makes the test certificate")
class LiveMetrics(unittest.TestCase):
    def run_fake(self, skew):
        with tempfile.TemporaryDirectory() as tmp:
            fake = os.path.join(tmp, "fake-proxy")
            with open(fake, "w", encoding="utf-8") as f:
                f.write(f"#!{sys.executable}\n" + FAKE_PROXY.replace("EXPIRY", check.EXPIRY))
            os.chmod(fake, 0o755)
            for name, text in (("fams", FAMS_TEXT), ("skew", str(skew))):
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            checker = bare_checker()
            checker.binary = fake
            self.assertIsNotNone(checker.proxy_env_names())
            return checker.check_live_metrics(), checker.errors

    def test_metrics_are_read_over_tls_and_checked(self):
        summary, errors = self.run_fake(0)
        self.assertEqual(errors, [])
        self.assertIn("over TLS", summary)

    def test_an_expiry_gauge_not_at_the_certificates_not_after_is_reported(self):
        _summary, errors = self.run_fake(3600)
        self.assertTrue(any("notAfter" in e and "wrong time" in e for e in errors), errors)


@unittest.skipUnless(shutil.which("promtool"), "promtool checks PromQL and runs the alert tests")
class Promtool(unittest.TestCase):
    def problems(self, edit_rules=None, edit_dashboard=None):
        with open(check.RULES, encoding="utf-8") as f:
            rules = f.read()
        with open(check.DASHBOARD, encoding="utf-8") as f:
            dashboard = f.read()
        with tempfile.TemporaryDirectory() as tmp:
            rules_path, dash_path = os.path.join(tmp, "rules.yaml"), os.path.join(tmp, "dashboard.json")
            with open(rules_path, "w", encoding="utf-8") as f:
                f.write(edit_rules(rules) if edit_rules else rules)
            with open(dash_path, "w", encoding="utf-8") as f:
                f.write(edit_dashboard(dashboard) if edit_dashboard else dashboard)
            checker = bare_checker()
            with mock.patch.object(check, "RULES", rules_path), mock.patch.object(check, "DASHBOARD", dash_path):
                self.assertEqual(checker.check_promtool(), "ok")
            return checker.errors

    def test_the_kit_as_it_is(self):
        self.assertEqual(self.problems(), [])

    def test_an_alert_that_fires_at_the_wrong_threshold_fails_its_test(self):
        problems = self.problems(lambda r: r.replace("  > 0.8\n", "  > 0.9\n", 1))
        self.assertTrue(any("promtool test rules" in p and "KubevirtVncProxyNearMaxConnections" in p
                            for p in problems), problems)

    def test_a_query_that_does_not_parse_is_reported(self):
        unbalanced = lambda d: d.replace("sum by (outcome) (rate(", "sum by (outcome) (rate((", 1)  # noqa: E731
        problems = self.problems(edit_dashboard=unbalanced)
        self.assertTrue(any("dashboard.json" in p and "promtool check rules" in p for p in problems), problems)


if __name__ == "__main__":
    unittest.main()
