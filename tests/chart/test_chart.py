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
import shlex
import signal
import subprocess
import tempfile
import tomllib
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


def render(*extra, release="rel"):
    out = run(HELM, "template", release, CHART, "--namespace", "shop", *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs, kind, suffix=""):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def traffic_service(docs):
    """The Service clients use (not the headless one that names the pods)."""
    return next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")


def test_the_pods_service_names_every_pod_of_the_track_for_admin_peers():
    docs = render("--set", "track=green")
    pods = find(docs, "Service", "-green-pods")
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["publishNotReadyAddresses"] is True
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in pods["spec"]["selector"].items())
    assert pods["spec"]["selector"]["track"] == "green"
    assert pods["spec"]["ports"] == [{"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"}]
    config = tomllib.loads(find(docs, "ConfigMap", "-config")["data"]["berth.toml"])
    assert config["admin"]["peers"] == f"{pods['metadata']['name']}.shop.svc:9090"


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
        # A made-up digest pins nothing that exists.
        (["--set", "image.digest=sha256:" + "0" * 64], "digest"),
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
        # Module keys are camelCase like the rest of the values; the error
        # lists the keys there are.
        (["--set", "modules.hello.limits.max_concurrency=5"], "maxConcurrency"),
        (["--set", "modules.hello.instances.max_requests=5"], "maxRequests"),
        (["--set", "modules.hello.outbound.connect_timeout=1s"], "connectTimeout"),
        (["--set", "modules.hello.outbound.circuitBreaker.open_for=1s"], "openFor"),
        (["--set", "modules.hello.limits.cpu=1"], "maxConcurrency"),
        # Integers where the host reads integers, sizes and durations it parses.
        (["--set-json", "modules.hello.limits.maxConcurrency=5.5"], "integer"),
        (["--set", "modules.hello.limits.maxConcurrency=five"], "integer"),
        (["--set-json", "modules.hello.limits.maxConcurrency=0"], "maxConcurrency"),
        (["--set-json", "modules.hello.instances.maxRequests=1.5"], "integer"),
        (["--set-json", "modules.hello.instances.maxConcurrent=0"], "maxConcurrent"),
        (["--set-json", "modules.hello.outbound.retries=1.5"], "integer"),
        (["--set-json", "modules.hello.outbound.circuitBreaker.failures=2.5"], "integer"),
        (["--set-json", "modules.hello.limits.memory=1.5"], "memory"),
        (["--set", "modules.hello.limits.memory=lots"], "memory"),
        (["--set", "modules.hello.limits.timeout=0s"], "timeout"),
        (["--set", "modules.hello.instances.idleTimeout=soon"], "idleTimeout"),
        (["--set-json", "modules.hello.outbound.retryBudget=20"], "retryBudget"),
        (["--set-json", "limits.maxConcurrency=5.5"], "integer"),
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


def test_only_the_files_modules_name_ride_in_the_configmap(tmp_path):
    # The examples set to null cost nothing: a 740 KB module fits alone.
    big = tmp_path / "big.b64"
    big.write_text(base64.b64encode(os.urandom(740_000)).decode())
    docs = render("--set", "modules.hello=null", "--set", "modules.api=null",
                  "--set", "modules.big.route=/big", "--set-file", f"moduleFiles.big\\.wasm={big}")
    binary = find(docs, "ConfigMap", "-modules")["binaryData"]
    assert sorted(binary) == ["big.wasm"]
    docs = render("--set", "modules.api=null")
    assert sorted(find(docs, "ConfigMap", "-modules")["binaryData"]) == ["hello.wasm"]
    # A canary's file rides along.
    docs = render("--set", "modules.api=null", "--set", "modules.hello.canary.file=api.wasm")
    assert sorted(find(docs, "ConfigMap", "-modules")["binaryData"]) == ["api.wasm", "hello.wasm"]


def test_modules_over_one_mebibyte_fail_with_a_pointer_to_urls(tmp_path):
    big = tmp_path / "big.b64"
    big.write_text(base64.b64encode(os.urandom(900_000)).decode())
    proc = run(
        HELM, "template", "rel", CHART, "--set-file", f"moduleFiles.big\\.wasm={big}", check=False
    )
    assert proc.returncode != 0
    assert "at most 1 MiB" in proc.stderr and "modules.NAME.oci" in proc.stderr


def test_deployment_is_hardened_and_shutdown_is_consistent():
    pinned = "sha256:" + "ab" * 32
    docs = render("-f", os.path.join(CHART, "values-prod.yaml"), "--set", f"image.digest={pinned}")
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
    assert c["image"].endswith("@" + pinned)
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
    assert traffic_service(docs)["spec"]["selector"]["track"] == "blue"


def selects(selector, labels):
    """Whether a matchLabels selector (a Service's, a Deployment's) picks `labels`."""
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(docs):
    return find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def documented_commands(heading):
    """The commands of the first `sh` block under `heading` in
    docs/deploy.md, as argument lists (continuation lines joined)."""
    doc = open(os.path.join(ROOT, "docs", "deploy.md")).read()
    section = doc.split("\n" + heading + "\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def helm_as_documented(cmd):
    """`helm install|upgrade NAME CHART ARGS` of the docs as render() would
    run it: the release name, and ARGS without the namespace."""
    assert cmd[:2] in (["helm", "install"], ["helm", "upgrade"]), cmd
    name, chart, args = cmd[2], cmd[3], cmd[4:]
    assert os.path.join(ROOT, chart) == CHART, cmd
    rendered = []
    while args:
        arg = args.pop(0)
        if arg in ("-n", "--namespace"):
            args.pop(0)
        elif arg in ("-f", "--values"):
            rendered += [arg, os.path.join(ROOT, args.pop(0))]
        else:
            rendered.append(arg)
    return name, rendered


def reached_by_helm_test(releases, name):
    """The releases whose pods `helm test NAME` reaches: through the Service
    its pod calls, past the NetworkPolicy of the pods that Service selects."""
    test_pod = find(releases[name], "Pod", "-test-ready")
    url = test_pod["spec"]["containers"][0]["command"][-1]
    service_name = re.match(r"http://([^:/]+)", url).group(1)
    service = next(d for docs in releases.values() for d in docs
                   if d["kind"] == "Service" and d["metadata"]["name"] == service_name)
    reached = set()
    for release, docs in releases.items():
        if selects(service["spec"]["selector"], pod_labels(docs)):
            policy = next((d for d in docs if d["kind"] == "NetworkPolicy"), None)
            assert policy is None or admits(policy, "http", test_pod["metadata"]["labels"], None), release
            reached.add(release)
    return reached


def test_blue_green_switch_as_documented_moves_traffic_to_the_green_pods_only():
    """docs/deploy.md "Blue/green", command by command: a second release of
    the app on track green, `helm test` on it, then `service.track: green`
    on the serving release moves its Service to the green pods, and only
    those; the Service of the new release and `helm test` follow."""
    prod = ["-f", os.path.join(CHART, "values-prod.yaml")]
    # The serving release, as "Promote" installs it; another app beside it.
    releases = {"shop": render(*prod, release="shop")}
    payments = render(*prod, "--set", "track=green", release="payments")
    tests = []
    for cmd in documented_commands("## Blue/green"):
        if cmd[:2] == ["helm", "test"]:
            tests.append((cmd[2], reached_by_helm_test(releases, cmd[2])))
        else:
            name, args = helm_as_documented(cmd)
            releases[name] = render(*args, release=name)
    # Checked through its own Service before the switch, through the
    # serving one after it: the green pods each time.
    assert tests == [("shop-green", {"shop-green"}), ("shop", {"shop-green"})], tests
    blue, green = pod_labels(releases["shop"]), pod_labels(releases["shop-green"])
    assert blue["track"] == "blue" and green["track"] == "green"
    selector = traffic_service(releases["shop"])["spec"]["selector"]
    assert selects(selector, green) and not selects(selector, blue), selector
    assert not selects(selector, pod_labels(payments)), selector
    # Each Deployment's own selector: its pods, not the other release's.
    for own, other in [(releases["shop"], green), (releases["shop-green"], blue)]:
        dep_selector = find(own, "Deployment")["spec"]["selector"]["matchLabels"]
        assert selects(dep_selector, pod_labels(own)) and not selects(dep_selector, other)
    # "Roll back": the same upgrade with service.track=blue.
    switch = next(c for c in documented_commands("## Blue/green") if "service.track=green" in c)
    _, args = helm_as_documented(switch)
    rolled_back = render(*[a.replace("=green", "=blue") for a in args], release="shop")
    selector = traffic_service(rolled_back)["spec"]["selector"]
    assert selects(selector, blue) and not selects(selector, green), selector


def admits(policy, port, labels, namespace_labels):
    """Whether a NetworkPolicy (matchLabels only) admits a pod with `labels`,
    in a namespace with `namespace_labels` (None: the policy's own), to the
    named `port` of the pods it selects."""
    for rule in policy["spec"].get("ingress", []):
        if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                ns_ok = namespace_labels is not None and selects(
                    peer["namespaceSelector"].get("matchLabels", {}), namespace_labels)
            else:
                ns_ok = namespace_labels is None
            if ns_ok and selects(peer.get("podSelector", {}).get("matchLabels", {}), labels):
                return True
    return False


def test_helm_test_passes_the_prod_network_policy():
    """docs/deploy.md checks each release with `helm test`; in prod the
    NetworkPolicy admits the traffic port only from the ingress namespace."""
    docs = render("-f", os.path.join(CHART, "values-prod.yaml"), release="shop")
    policy = find(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(docs))
    test_pod = find(docs, "Pod", "-test-ready")
    assert admits(policy, "http", test_pod["metadata"]["labels"], None)
    # Still closed to everything else in the namespace, open to the ingress.
    assert not admits(policy, "http", {"app": "other"}, None)
    assert admits(policy, "http", {}, {"kubernetes.io/metadata.name": "ingress"})
    assert not admits(policy, "admin", test_pod["metadata"]["labels"], None)


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
    # Dev starts without a registry (see test_rendered_config_is_served...).
    for env in ["values-staging.yaml", "values-prod.yaml"]:
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
        ["-f", os.path.join(CHART, "values-dev.yaml")],
        "/hello?name=chart",
        {"message": "Hello from dev, chart!"},
    )


def rendered_canary(*args):
    """The `canary` table of module hello in the rendered berth.toml."""
    docs = render(*args)
    toml = tomllib.loads(find(docs, "ConfigMap", "-config")["data"]["berth.toml"])
    return toml["modules"]["hello"]["canary"]


def test_an_oci_canary_maps_every_key():
    digest = "registry.example.com/team/hello@sha256:" + "1" * 64
    tag = "registry.example.com/team/hello:2"
    assert rendered_canary(
        "--set", f"modules.hello.canary.oci={digest}", "--set", "modules.hello.canary.steps={5,25,100}",
        "--set", "modules.hello.canary.maxP99Ratio=2", "--set", "modules.hello.canary.sticky.cookie=session",
    ) == {"oci": digest, "steps": [5, 25, 100], "max_p99_ratio": 2.0, "sticky": {"cookie": "session"}}
    assert rendered_canary(
        "--set", f"modules.hello.canary.oci={tag}", "--set", "modules.hello.canary.allowTags=true",
        "--set", "modules.hello.canary.minSuccessRate=99",
    ) == {"oci": tag, "allow_tags": True, "min_success_rate": 99.0}


def test_a_canary_in_values_runs_in_the_real_host(tmp_path):
    """`modules.NAME.canary` renders to berth's keys, with integer steps,
    and the host starts that canary at its first step."""
    values = tmp_path / "canary.yaml"
    values.write_text(
        "modules:\n  hello:\n    canary:\n      file: api.wasm\n      steps: [10, 50]\n"
        "      sha256: be9916af90493980a2027e3b5cc76d32023ffe7cfca67da788791957175ca6eb\n"
        "      interval: 1h\n      minSuccessRate: 99.5\n      maxP99: 200ms\n"
        "      maxP99Ratio: 1.5\n      maxFailures: 2\n      minRequests: 30\n"
        "      sticky: {header: x-user}\n"
    )
    assert rendered_canary("-f", str(values)) == {
        "file": "api.wasm",
        "sha256": "be9916af90493980a2027e3b5cc76d32023ffe7cfca67da788791957175ca6eb",
        "steps": [10, 50],
        "interval": "1h",
        "min_success_rate": 99.5,
        "max_p99": "200ms",
        "max_p99_ratio": 1.5,
        "max_failures": 2,
        "min_requests": 30,
        "sticky": {"header": "x-user"},
    }

    def check(info):
        hello = next(m for m in info["modules"] if m["name"] == "hello")
        canary = hello["canary"]
        assert canary["state"] == "progressing" and canary["weight"] == 10, canary
        assert canary["source"].endswith("api.wasm"), canary

    # No request: at 10 % one may reach api.wasm, which has no /hello.
    serve_rendered(tmp_path, ["-f", str(values)], None, None, check)


def test_a_fleet_analysed_canary_in_values_runs_in_the_real_host(tmp_path):
    """`canary.analysis` renders to berth's keys, scoped to the release's
    namespace unless the values name labels, and the host accepts it: the
    canary waits for the fleet's record (weight 0) and says Prometheus is
    unreachable, rather than serving a share nobody judges."""
    values = tmp_path / "fleet.yaml"
    values.write_text(
        "modules:\n  hello:\n    canary:\n      file: api.wasm\n      steps: [10, 50]\n"
        "      interval: 1m\n"
        "      analysis:\n        prometheus: http://127.0.0.1:9\n        scrapeInterval: 15s\n"
        "        rollbackAfterUnavailable: 1h\n        bearerTokenFile: /var/run/secrets/prom/token\n"
    )
    assert rendered_canary("-f", str(values))["analysis"] == {
        "prometheus": "http://127.0.0.1:9",
        # This release's series, as the autoscaling queries select them.
        "labels": {"namespace": "shop", "app_kubernetes_io_instance": "rel", "app_kubernetes_io_name": "berth",
                   "berth_dev_track": "blue"},
        "scrape_interval": "15s",
        "rollback_after_unavailable": "1h",
        "bearer_token_file": "/var/run/secrets/prom/token",
    }
    labelled = rendered_canary("-f", str(values), "--set", "modules.hello.canary.analysis.labels.job=shop/berth")
    assert labelled["analysis"]["labels"] == {"job": "shop/berth"}
    for bad in ["modules.hello.canary.analysis.labels.module=x", "modules.hello.canary.analysis.prometheus=ftp://x",
                "modules.hello.canary.analysis.scrapeInterval=often"]:
        out = run(HELM, "template", "rel", CHART, "-f", str(values), "--set", bad, check=False)
        assert out.returncode != 0, bad

    def check(info):
        canary = next(m for m in info["modules"] if m["name"] == "hello")["canary"]
        assert canary["weight"] == 0 and canary["state"] == "progressing", canary
        assert canary["analysis"]["status"] in ("joining", "unavailable"), canary

    unfiled = tmp_path / "nofile.yaml"
    unfiled.write_text(values.read_text().replace("        bearerTokenFile: /var/run/secrets/prom/token\n", ""))
    serve_rendered(tmp_path, ["-f", str(unfiled)], None, None, check)


MODULE_KEYS = """
modules:
  hello:
    config:
      greeting: Hi
      retries: 3
    allowedOutboundHosts: ["https://api.example.com"]
    limits:
      timeout: 5s
      memory: 64MiB
      maxConcurrency: 5
      maxBody: 1048576
      maxResponseBody: 8MiB
      metricSeries: 50
      logRate: 20
    instances:
      maxRequests: 8
      maxConcurrent: 2
      idleTimeout: 2s
    outbound:
      connectTimeout: 1s
      firstByteTimeout: 3s
      betweenBytesTimeout: 3s
      timeout: 4s
      retries: 1
      retryBackoff: 20ms
      retryBackoffMax: 1s
      retryBudget: 0.1
      retryNonIdempotent: true
      maxRetryBody: 32KiB
      circuitBreaker: {failures: 3, openFor: 10s, halfOpenProbes: 2}
      h2c: true
"""


def snake(key):
    return re.sub(r"([A-Z])", r"_\1", key).lower()


def test_every_module_key_in_a_values_file_runs_in_the_real_host(tmp_path):
    """A values file (helm reads its numbers as float64) setting each key a
    module has renders berth's keys with integers kept integers, and the
    real host starts on it, serves, and shows those limits in /info."""
    values = tmp_path / "modules.yaml"
    values.write_text(MODULE_KEYS)
    hello = yaml.safe_load(MODULE_KEYS)["modules"]["hello"]
    run(HELM, "lint", "--strict", CHART, "-f", str(values))
    docs = render("-f", str(values))
    config = tomllib.loads(find(docs, "ConfigMap", "-config")["data"]["berth.toml"])
    module = config["modules"]["hello"]

    def host_keys(section):
        return {snake(k): (host_keys(v) if isinstance(v, dict) else v) for k, v in section.items()}

    for section in ["limits", "instances", "outbound"]:
        assert module[section] == host_keys(hello[section]), section
    assert type(module["limits"]["max_concurrency"]) is int and type(module["limits"]["max_body"]) is int
    assert type(module["outbound"]["circuit_breaker"]["failures"]) is int
    assert module["allowed_outbound_hosts"] == ["https://api.example.com"]

    def check(info):
        served = next(m for m in info["modules"] if m["name"] == "hello")
        assert served["limits"] == {
            "timeout": "5s", "memory": "64MiB", "max_concurrency": 5,
            "max_body": "1MiB", "max_response_body": "8MiB",
        }, served["limits"]
        # A WASI 0.2 handler runs one request at a time per instance.
        concurrent = 2 if served["world"] == "wasi:http@0.3" else 1
        assert served["instances"] == {
            "max_requests": 8, "max_concurrent": concurrent, "idle_timeout": "2s",
        }, served["instances"]

    serve_rendered(tmp_path, ["-f", str(values)], "/hello?name=chart", {"message": "Hi, chart!"}, check)
    # The example of the module keys in values.yaml's comments is valid too.
    comments = open(os.path.join(CHART, "values.yaml")).read()
    example = re.search(r"\n(#   config:.*?)\n#\n", comments, re.S).group(1)
    documented = tmp_path / "documented.yaml"
    documented.write_text("modules:\n  hello:\n" + re.sub(r"(?m)^#", "", example) + "\n")
    assert sorted(yaml.safe_load(documented.read_text())["modules"]["hello"]) == sorted(hello)
    run(HELM, "lint", "--strict", CHART, "-f", str(documented))
    # Every key the schema knows for a module was set here.
    schema = json.load(open(os.path.join(CHART, "values.schema.json")))["definitions"]
    for section in ["limits", "instances", "outbound"]:
        assert sorted(hello[section]) == sorted(schema[section]["properties"]), section
    assert sorted(hello["outbound"]["circuitBreaker"]) == sorted(schema["circuitBreaker"]["properties"])


def host_fields(struct):
    """The serde field names of `pub struct NAME` in the host's config
    (host/src/config.rs and its sections in host/src/config/)."""
    folder = os.path.join(ROOT, "host", "src", "config")
    files = [os.path.join(ROOT, "host", "src", "config.rs")] + sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".rs"))
    for path in files:
        found = re.search(r"pub struct %s \{(.*?)\n\}" % struct, open(path).read(), re.S)
        if found:
            return set(re.findall(r"^    pub (\w+):", found.group(1), re.M))
    raise AssertionError(f"no `pub struct {struct}` in the host's config")


@pytest.mark.parametrize(
    "definition, struct",
    [("limits", "LimitsOverride"), ("instances", "Instances"),
     ("outbound", "OutboundOverride"), ("circuitBreaker", "BreakerConfig")],
)
def test_module_keys_are_the_hosts_in_camel_case(definition, struct):
    schema = json.load(open(os.path.join(CHART, "values.schema.json")))["definitions"][definition]
    assert {snake(k) for k in schema["properties"]} == host_fields(struct)
    # The error for a key that is not there lists those that are.
    assert schema["additionalProperties"] is False
    assert sorted(schema["propertyNames"]["enum"]) == sorted(schema["properties"])


def serve_rendered(tmp_path, values, path, want, check_info=None, env=None):
    """Serves the config `values` render with the real host (as the pod
    would, `env` added), checks `path` answers `want`, and returns the log
    lines up to ready."""
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
        **(env or {}),
    }
    env.pop("RUST_LOG", None)
    proc = subprocess.Popen(
        [berth, "--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    log = []
    try:
        addrs = {}
        for line in proc.stdout:
            log.append(line)
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
    return log


def test_the_service_port_can_declare_h2c_for_grpc_through_a_mesh():
    port = traffic_service(render())["spec"]["ports"][0]
    assert "appProtocol" not in port, port
    port = traffic_service(render("--set", "service.appProtocol=kubernetes.io/h2c"))["spec"]["ports"][0]
    assert port["appProtocol"] == "kubernetes.io/h2c"
    bad = run(HELM, "template", "rel", CHART, "--set", "service.appProtocol=grpc", check=False)
    assert bad.returncode != 0 and "appProtocol" in bad.stderr, bad.stderr
