"""Tests of deploy/check.py's reading of the README's deploy commands (run by .ci/run:
`python3 -m unittest deploy/test_check.py`)."""

import importlib.util
import os
import unittest

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


if __name__ == "__main__":
    unittest.main()
