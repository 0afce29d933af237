"""Checks of the Helm chart and the Dockerfile, run by `make test`.

Uses the tools scripts/k8s-tools.sh installs into .tools/: helm, checkov,
kubernetes-validate and hadolint. The rendered host config is also served
by the real berth binary, so chart and host cannot drift apart.
"""
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "charts", "berth")
TOOLS = os.path.join(ROOT, ".tools")
HELM = os.path.join(TOOLS, "bin", "helm")
VENV_BIN = os.path.join(TOOLS, "venv", "bin")
ENVS = ["values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
# The host binary `make build` made (the Makefile passes its path).
BERTH_BIN = os.environ.get("BERTH_BIN", os.path.join(TARGET, "release", "berth"))


def run(*args, check=True, env=None):
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(*extra):
    out = run(HELM, "template", "rel", CHART, "--namespace", "shop", *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs, kind, suffix=""):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


@pytest.mark.parametrize("values", [None] + ENVS)
def test_lint_strict(values):
    args = ["-f", os.path.join(CHART, values)] if values else []
    run(HELM, "lint", "--strict", CHART, *args)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "replicaCount=-1"], "replicaCount"),
        (["--set", "replicaCuont=2"], "replicaCuont"),
        (["--set", "modules.hello.sha256=nothex"], "sha256"),
        (["--set", "modules.x.route=/x", "--set", "modules.x.url=https://e/x.wasm"], "sha256"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        # An `oci` module needs a digest unless tags are allowed...
        (["--set", "modules.x.route=/x", "--set", "modules.x.oci=reg.example/t/x:1.0"], "sha256"),
        # ...and is one source only.
        (["--set", "modules.hello.oci=reg.example/t/x@sha256:" + "a" * 64], "not"),
        (["--set", "registry.retries=99"], "retries"),
        # A canary needs a source, and rising percentages.
        (["--set", "modules.hello.canary.steps={5,50}"], "canary"),
        (["--set", "modules.hello.canary.file=api.wasm", "--set", "modules.hello.canary.steps={5,500}"], "steps"),
        (["--set", "modules.hello.canary.file=api.wasm", "--set", "modules.hello.canary.interval=soon"], "interval"),
        (["--set", "modules.hello.canary.file=api.wasm", "--set", "modules.hello.canary.sticky.header=a b"], "header"),
    ],
)
def test_schema_rejects_bad_values(bad, message):
    proc = run(HELM, "lint", "--strict", CHART, *bad, check=False)
    assert proc.returncode != 0, f"lint accepted {bad}"
    assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize("values", ENVS)
def test_rendered_manifests_pass_kubernetes_schemas(values, tmp_path):
    out = run(HELM, "template", "rel", CHART, "-f", os.path.join(CHART, values)).stdout
    manifest = tmp_path / "all.yaml"
    manifest.write_text(out)
    proc = run(os.path.join(VENV_BIN, "kubernetes-validate"), "--strict", str(manifest), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Everything but the PodMonitor CRD (no built-in schema) passed.
    passed = re.findall(r"passed for resource (\S+)", proc.stdout + proc.stderr)
    assert any(p.startswith("deployment/") for p in passed)


def test_module_configmap_holds_the_exact_bytes():
    docs = render()
    binary = find(docs, "ConfigMap", "-modules")["binaryData"]
    files = sorted(f for f in os.listdir(os.path.join(CHART, "modules")) if f.endswith(".wasm"))
    assert sorted(binary) == files
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    for name in files:
        source = open(os.path.join(CHART, "modules", name), "rb").read()
        rendered = base64.b64decode(binary[name])
        assert hashlib.sha256(rendered).hexdigest() == hashlib.sha256(source).hexdigest()
    # The digests pinned in every environment are those of the shipped files.
    for env in [None] + ENVS:
        vals = yaml.safe_load(open(os.path.join(CHART, env))) if env else values
        for module, spec in vals.get("modules", {}).items():
            if "file" in spec:
                data = open(os.path.join(CHART, "modules", spec["file"]), "rb").read()
                assert spec["sha256"] == hashlib.sha256(data).hexdigest(), (env, module)


def test_modules_over_one_mebibyte_fail_with_a_pointer_to_urls(tmp_path):
    big = tmp_path / "big.b64"
    big.write_text(base64.b64encode(os.urandom(900_000)).decode())
    proc = run(
        HELM, "template", "rel", CHART, "--set-file", f"moduleFiles.big\\.wasm={big}", check=False
    )
    assert proc.returncode != 0
    assert "at most 1 MiB" in proc.stderr and "url" in proc.stderr


def test_deployment_is_hardened_and_shutdown_is_consistent():
    docs = render("-f", os.path.join(CHART, "values-prod.yaml"))
    dep = find(docs, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["image"].endswith("@sha256:" + "0" * 64)
    # preStop sleep + drain delay + grace period fit in the termination grace.
    prestop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    toml = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    drain = int(re.search(r'drain_delay = "(\d+)s"', toml).group(1))
    grace = int(re.search(r'grace_period = "(\d+)s"', toml).group(1))
    assert spec["terminationGracePeriodSeconds"] > prestop + drain + grace
    # Modules mounted whole (no subPath) so ConfigMap updates reach the pod.
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "subPath" not in mounts["modules"] and mounts["modules"]["mountPath"] == "/modules"
    assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} == {"cache", "tmp"}
    # Config changes roll the pods; module changes do not.
    annotations = pod["metadata"]["annotations"]
    assert "checksum/config" in annotations and "checksum/modules" not in annotations
    assert annotations["prometheus.io/port"] == "9090"
    kinds = {d["kind"] for d in docs}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor"} <= kinds


def test_blue_green_by_track():
    docs = render("--set", "track=green", "--set", "service.track=blue")
    assert find(docs, "Deployment")["metadata"]["name"].endswith("-green")
    assert find(docs, "Service")["spec"]["selector"]["track"] == "blue"


def test_secrets_become_environment_for_the_host():
    docs = render("--set", "secrets.hello.api_key=s3cr3t")
    secret = find(docs, "Secret")
    assert secret["stringData"] == {"BERTH_MODULES__HELLO__SECRETS__API_KEY": "s3cr3t"}
    env_from = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from[0]["secretRef"]["name"] == secret["metadata"]["name"]


def test_security_scans_pass_with_justified_skips():
    skips = open(os.path.join(ROOT, ".checkov.yaml")).read()
    # Every skipped check is preceded by a comment saying why.
    lines = skips.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- CKV", line):
            before = [l for l in lines[:i] if l.strip()]
            assert before[-1].strip().startswith("#") or re.match(r"\s*- CKV", before[-1]), line
    env = {"PATH": os.path.join(TOOLS, "bin") + os.pathsep + os.environ["PATH"]}
    checkov = os.path.join(VENV_BIN, "checkov")
    config = os.path.join(ROOT, ".checkov.yaml")
    for args in (["-d", CHART, "--framework", "helm"], ["-f", os.path.join(ROOT, "Dockerfile"), "--framework", "dockerfile"]):
        proc = run(checkov, "--config-file", config, *args, check=False, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run(os.path.join(VENV_BIN, "hadolint"), os.path.join(ROOT, "Dockerfile"), check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout


def test_environments_promote_one_oci_digest_and_mount_the_pull_secrets():
    refs = set()
    for env in ENVS:
        docs = render("-f", os.path.join(CHART, env))
        config = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
        refs.add(re.search(r'oci = "([^"]+)"', config).group(1))
        assert "/var/run/secrets/berth/registry/shop-registry/config.json" in config
        pod = find(docs, "Deployment")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "pull-secret-shop-registry")
        assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    assert len(refs) == 1 and "@sha256:" in refs.pop()
    # Allowing tags lets a tag through the schema.
    render("--set", "modules.x.route=/x", "--set", "modules.x.oci=reg.example/t/x:1.0",
           "--set", "modules.x.allowTags=true")
    # Without `oci` modules nothing is mounted for them.
    docs = render("--set", "imagePullSecrets[0].name=regcred")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert not any(v["name"].startswith("pull-secret") for v in pod["volumes"])


def test_an_oci_module_of_the_chart_is_pulled_from_a_real_registry_and_served(tmp_path):
    """The promoted digest flow: `berth push` to a registry, pin the digest
    in the values, and the config the chart renders pulls and serves it."""
    port = free_port()
    host = f"127.0.0.1:{port}"
    (tmp_path / "registry.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'data'}\nhttp:\n  addr: {host}\n"
    )
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")])
    try:
        wait_listening(host)
        hello = os.path.join(TARGET, "wasm32-wasip2", "release", "hello.wasm")
        pushed = run(BERTH_BIN, "push", hello, f"{host}/shop/orders:1.4.2", "--insecure-registry", host)
        digest = pushed.stdout.strip()
        serve_rendered(
            tmp_path,
            ["-f", os.path.join(CHART, "values-prod.yaml"),
             "--set", f"modules.orders.oci={host}/shop/orders@{digest}",
             "--set", "modules.orders.config.greeting=Hello from the registry",
             "--set", f"registry.insecureRegistries={{{host}}}"],
            "/orders?name=chart",
            {"message": "Hello from the registry, chart!"},
        )
    finally:
        registry.kill()
        registry.wait()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host, limit=20):
    import socket
    import time
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(host.split(":"), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listens on {host}")


def test_rendered_config_is_served_by_the_real_host(tmp_path):
    serve_rendered(
        tmp_path,
        ["-f", os.path.join(CHART, "values-dev.yaml"), "--set", "modules.orders=null"],
        "/hello?name=chart",
        {"message": "Hello from dev, chart!"},
    )


def test_a_canary_in_values_runs_in_the_real_host(tmp_path):
    """`modules.NAME.canary` renders to berth's keys, with integer steps,
    and the host starts that canary at its first step."""
    values = tmp_path / "canary.yaml"
    values.write_text(
        "modules:\n  hello:\n    canary:\n      file: api.wasm\n      steps: [10, 50]\n"
        "      interval: 1h\n      minSuccessRate: 99.5\n      maxP99: 200ms\n"
        "      maxP99Ratio: 1.5\n      minRequests: 30\n      sticky: {header: x-user}\n"
    )
    docs = render("-f", str(values))
    toml = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    assert "steps = [10, 50]" in toml and "min_requests = 30" in toml, toml

    def check(info):
        hello = next(m for m in info["modules"] if m["name"] == "hello")
        canary = hello["canary"]
        assert canary["state"] == "progressing" and canary["weight"] == 10, canary
        assert canary["source"].endswith("api.wasm"), canary

    # No request: at 10 % one may reach api.wasm, which has no /hello.
    serve_rendered(tmp_path, ["-f", str(values)], None, None, check)


def serve_rendered(tmp_path, values, path, want, check_info=None):
    docs = render(*values)
    toml = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    config = tmp_path / "berth.toml"
    config.write_text(toml)
    berth = BERTH_BIN
    env = {
        **os.environ,
        "BERTH_RUNTIME__MODULES_DIR": os.path.join(CHART, "modules"),
        "BERTH_RUNTIME__CACHE_DIR": str(tmp_path / "cache"),
        "LOG_FORMAT": "json",
        "BERTH_SHUTDOWN__DRAIN_DELAY": "0s",
    }
    env.pop("RUST_LOG", None)
    proc = subprocess.Popen(
        [berth, "--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        addrs = {}
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("message") == "listening":
                addrs[event["listener"]] = event["addr"]
            if event.get("message") == "ready":
                break
        else:
            pytest.fail(f"berth exited with {proc.wait()}")
        if path is not None:
            body = json.load(urllib.request.urlopen(f"http://{addrs['traffic']}{path}", timeout=10))
            assert body == want
        if check_info:
            check_info(json.load(urllib.request.urlopen(f"http://{addrs['admin']}/info", timeout=10)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
