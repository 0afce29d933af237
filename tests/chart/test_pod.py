"""The chart's pods, started the way the kubelet starts them.

`helm install berth ./charts/berth` names the Service `berth`, so the
kubelet's service links (`BERTH_SERVICE_HOST`, `BERTH_PORT_80_TCP_ADDR`,
...) land in berth's own environment namespace. These tests render the
chart with the release name a user would pick, run the Deployment's
container through scripts/kubelet.py (service links, ConfigMap volumes in
the `..data` layout, emptyDirs, runAsUser, read-only root, probes, preStop
and SIGTERM within the grace period) on the image's layout
(scripts/container.py, the runtime stage with the binary `make build` made), and
check it becomes ready, serves and exits 0 in time.
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import container  # noqa: E402
import kubelet  # noqa: E402

CHART = os.path.join(ROOT, "charts", "berth")
HELM = os.path.join(ROOT, ".tools", "bin", "helm")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BERTH_BIN = os.environ.get("BERTH_BIN", os.path.join(TARGET, "release", "berth"))
ENVS = [None, "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]

# What the platform team keeps in the namespace before the release:
# values-prod.yaml names this Secret for the admin token.
EXISTING = [
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "berth-admin-token"},
        "data": {"token": "cHJvZC10b2tlbg=="},
    }
]


def render(release, *extra):
    out = subprocess.run(
        [HELM, "template", release, CHART, "--namespace", "shop", *extra],
        capture_output=True, text=True, check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The runtime stage's layout, with the binary `make build` made
    standing in for the builder's output (the image check builds the real
    one)."""
    work = str(tmp_path_factory.mktemp("image"))
    os.chmod(work, 0o755)
    binary = BERTH_BIN
    return container.build(ROOT, work, prebuilt={"/out/berth": binary})


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


@contextlib.contextmanager
def ready_pod(docs, image, tmp_path):
    """A pod of `docs`, started and ready; cleaned up afterwards."""
    pod = kubelet.Pod(docs, image, tempfile.mkdtemp(dir=tmp_path), namespace="shop")
    try:
        pod.start()
        pod.wait_started()
        pod.wait_ready(60)
        yield pod
    finally:
        pod.cleanup()


def run_pod(docs, image, tmp_path, serve_path="/hello?name=pod"):
    with ready_pod(docs, image, tmp_path) as pod:
        status, body = get(f"http://{pod.pod_ip}:8080{serve_path}")
        pod.check_liveness(3)
        code, took, drained_ready = pod.delete()
        return pod, status, body, code, took, drained_ready


@pytest.mark.parametrize("values", ENVS)
def test_helm_install_berth_starts_serves_and_stops_in_time(values, image, tmp_path):
    # Staging's and prod's `orders` module lives in a registry this sandbox
    # cannot reach; test_chart.py serves an `oci` module the chart renders
    # from a real registry. Dev installs as documented, with nothing else.
    extra = ["-f", os.path.join(CHART, values)] if values else []
    if values in ("values-staging.yaml", "values-prod.yaml"):
        extra += ["--set", "modules.orders=null"]
    docs = render("berth", *extra) + EXISTING
    pod, status, body, code, took, drained_ready = run_pod(docs, image, tmp_path)
    assert status == 200, body
    assert "pod" in json.loads(body)["message"]
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert code == 0, f"exit {code} after {took:.1f}s:\n" + "\n".join(pod.lines[-20:])
    assert took < grace
    # Readiness failed during the drain, before the process exited: a 503
    # `draining` while the traffic port still took connections, not only a
    # refused connection once the process was gone.
    assert any(
        p["status"] == 503 and p["body"].startswith("draining") and p["traffic"] for p in drained_ready
    ), drained_ready
    assert not drained_ready[-1]["ready"], drained_ready
    lines = [json.loads(l) for l in pod.lines if l.startswith("{")]
    assert any(l.get("message") == "shutdown complete" for l in lines)
    # The compile cache works on the chart's emptyDir (fsGroup-owned, 2777):
    # berth's private folder inside it is accepted.
    assert not any("compile cache disabled" in l.get("message", "") for l in lines), pod.lines
    # Dev logs at debug: the host's lines, not the compiler's.
    noisy = [l for l in lines if l.get("target", "").startswith(("cranelift", "wasmtime_internal_cranelift", "regalloc", "oci_client"))]
    assert not noisy, noisy[:3]


def test_service_links_do_not_stop_the_pod_even_when_the_chart_lets_them_in(image, tmp_path):
    docs = render("berth")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["enableServiceLinks"] is False
    # The host side of the fix: with service links on (as in a chart that
    # forgot the setting), the pod still starts, and says what it ignored.
    dep["spec"]["template"]["spec"]["enableServiceLinks"] = True
    pod, status, _, code, _, _ = run_pod(docs, image, tmp_path)
    assert status == 200 and code == 0
    env = pod.environment()
    assert env["BERTH_SERVICE_HOST"] and env["BERTH_PORT_80_TCP_ADDR"]
    warning = next(json.loads(l) for l in pod.lines if "BERTH_PORT_80_TCP_ADDR" in l)
    assert warning["level"] == "WARN"


def test_kubelet_service_links_match_the_documented_names():
    svc = {
        "metadata": {"name": "redis-primary"},
        "spec": {"clusterIP": "10.0.0.11", "ports": [{"name": "redis", "port": 6379, "protocol": "TCP"}]},
    }
    env = kubelet.service_link_env([svc])
    # kubernetes.io/docs/concepts/services-networking/service/#environment-variables
    assert env == {
        "REDIS_PRIMARY_SERVICE_HOST": "10.0.0.11",
        "REDIS_PRIMARY_SERVICE_PORT": "6379",
        "REDIS_PRIMARY_SERVICE_PORT_REDIS": "6379",
        "REDIS_PRIMARY_PORT": "tcp://10.0.0.11:6379",
        "REDIS_PRIMARY_PORT_6379_TCP": "tcp://10.0.0.11:6379",
        "REDIS_PRIMARY_PORT_6379_TCP_PROTO": "tcp",
        "REDIS_PRIMARY_PORT_6379_TCP_PORT": "6379",
        "REDIS_PRIMARY_PORT_6379_TCP_ADDR": "10.0.0.11",
    }


def test_configmap_volumes_use_the_atomic_writer_layout(tmp_path):
    vol = tmp_path / "vol"
    kubelet.atomic_writer_volume(str(vol), {"berth.toml": b"x", "a.wasm": b"\0asm"}, 65532)
    assert os.readlink(vol / "berth.toml") == "..data/berth.toml"
    data = os.readlink(vol / "..data")
    assert data.startswith("..") and (vol / data / "a.wasm").read_bytes() == b"\0asm"
    assert os.stat(vol / data / "a.wasm").st_gid == 65532


def test_the_admin_port_is_not_published_and_admin_writes_need_the_token(image, tmp_path):
    docs = render("berth", "--set", "admin.token=from-values")
    svc = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    with ready_pod(docs, image, tmp_path) as pod:
        url = f"http://{pod.pod_ip}:9090/admin/reload"
        for auth, want in [(None, 401), ("Bearer nope", 401), ("Bearer from-values", 200)]:
            req = urllib.request.Request(url, method="POST")
            if auth:
                req.add_header("Authorization", auth)
            try:
                status = urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                status = e.code
            assert status == want, auth
        assert get(f"http://{pod.pod_ip}:9090/metrics")[0] == 200


def test_a_pinned_module_moves_with_its_pin_as_docs_deploy_md_says(image, tmp_path):
    """docs/deploy.md, "Update a module in place": a pinned module's new
    bytes ship under a new file name with their sha256, in one upgrade, and
    every pod then starts. Replacing only the bytes behind the old pin is
    what the doc warns against: such a pod refuses to start."""
    import base64
    import hashlib

    wasm = os.path.join(TARGET, "wasm32-wasip2", "release")

    def release(files, file, pinned):
        encoded = []
        for name, source in files.items():
            b64 = tmp_path / f"{name}.b64"
            b64.write_text(base64.b64encode(open(os.path.join(wasm, source), "rb").read()).decode())
            encoded += ["--set-file", f"moduleFiles.{name.replace('.', chr(92) + '.')}={b64}"]
        sha = hashlib.sha256(open(os.path.join(wasm, pinned), "rb").read()).hexdigest()
        return render(
            "shop", "--set", "modules.hello=null", "--set", "modules.api=null",
            "--set", f"modules.greeter.file={file}", "--set", f"modules.greeter.sha256={sha}",
            "--set", "modules.greeter.route=/greeter", *encoded,
        ) + EXISTING

    v1 = {"greeter-1.0.wasm": "hello.wasm"}
    v2 = {"greeter-1.0.wasm": "hello.wasm", "greeter-1.1.wasm": "plain_hello.wasm"}
    # 1.0 serves; the upgrade names 1.1 with its pin, and a new pod serves it.
    _, status, body, code, _, _ = run_pod(release(v1, "greeter-1.0.wasm", "hello.wasm"), image, tmp_path,
                                          "/greeter?name=pod")
    assert (status, code) == (200, 0) and "pod" in body, body
    docs = release(v2, "greeter-1.1.wasm", "plain_hello.wasm")
    _, status, body, code, _, _ = run_pod(docs, image, tmp_path, "/greeter")
    assert (status, code) == (200, 0), body
    # The old way: new bytes under the old name, the old pin kept.
    swapped = release({"greeter-1.0.wasm": "plain_hello.wasm"}, "greeter-1.0.wasm", "hello.wasm")
    pod = kubelet.Pod(swapped, image, tempfile.mkdtemp(dir=tmp_path), namespace="shop")
    try:
        pod.start()
        with pytest.raises(kubelet.PodFailed) as failed:
            pod.wait_started()
            pod.wait_ready(30)
        assert "exited with 2" in str(failed.value) and "sha256" in str(failed.value), failed.value
    finally:
        pod.cleanup()


def test_readiness_through_the_native_grpc_probe(image, tmp_path):
    """`probes.grpc: true`: the kubelet asks grpc.health.v1 on the traffic
    port; the pod becomes ready through it and stops being ready while it
    drains (NOT_SERVING), before it exits."""
    docs = render("berth", "--set", "probes.grpc=true")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    ready = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert ready["grpc"] == {"port": 8080, "service": ""}, ready
    assert "httpGet" not in ready
    pod, status, body, code, took, drained_ready = run_pod(docs, image, tmp_path)
    assert status == 200, body
    assert code == 0, "\n".join(pod.lines[-20:])
    assert any(event == "ready" for event, _ in pod.events), pod.events
    assert any(p["status"] == 503 and p["body"] == "NOT_SERVING" and p["traffic"] for p in drained_ready), drained_ready


def test_a_pod_never_takes_an_address_block_a_killed_run_left_routed(image, tmp_path):
    """A run killed mid-test leaves a pod's namespace and veth behind, with
    the route of its address block. A pod given that block again would be
    reached through the dead pod's veth: its probes refused for good."""
    import itertools
    index = next(kubelet._POD_INDEX) + 1
    kubelet._POD_INDEX = itertools.count(index)
    stale = index % 250 + 1
    ns, veth = f"berth-stale-{os.getpid()}", f"bstale{os.getpid() % 10000}"
    setup = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"10.233.{stale}.1/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
    ]
    try:
        for c in setup:
            subprocess.run(c, check=True, capture_output=True)
        pod, status, body, code, _, _ = run_pod(render("berth"), image, tmp_path)
        assert pod.pod_ip != f"10.233.{stale}.2"
        assert status == 200, body
        assert code == 0, "\n".join(pod.lines[-20:])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


def post(url, token=None, timeout=90):
    req = urllib.request.Request(url, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    with contextlib.suppress(ValueError):
        body = json.loads(body)
    return status, body


def test_a_canary_aborted_with_pods_all_on_one_pod_ends_on_every_pod(image, tmp_path):
    """docs/deploy.md, "Operator actions": one request to one pod, with
    `?pods=all`, reaches every pod of the release through the chart's
    headless Service (admin.peers). Two pods of the Deployment, each in its
    own network namespace; cluster DNS answers the Service's name with both
    addresses, and the NetworkPolicy admits the pods to each other's admin
    port."""
    docs = render(
        "shop", "--set", "admin.token=fleet-token", "--set", "networkPolicy.enabled=true",
        "--set", "modules.hello.canary.file=api.wasm", "--set", "modules.hello.canary.steps={50,100}",
        "--set", "modules.hello.canary.interval=10m",
    )
    # The admin port admits the release's own pods.
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    labels = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    admin_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "admin")
    assert any(
        "podSelector" in f and all(labels.get(k) == v for k, v in f["podSelector"]["matchLabels"].items())
        for f in admin_rule["from"]
    ), admin_rule
    pods = [kubelet.Pod(docs, image, tempfile.mkdtemp(dir=tmp_path), namespace="shop") for _ in range(2)]
    names = kubelet.cluster_dns(pods)
    assert sorted(names["shop-berth-blue-pods.shop.svc"]) == sorted(p.pod_ip for p in pods), names
    with kubelet.forwarding():
        try:
            for pod in pods:
                pod.start()
            for pod in pods:
                pod.wait_started()
                pod.wait_ready(60)
            first = f"http://{pods[0].pod_ip}:9090/admin/canary/hello/abort?pods=all"
            # The token is checked before anything is sent on.
            assert post(first, "wrong")[0] == 401
            status, body = post(first, "fleet-token")
            assert status == 200, body
            assert sorted(a["pod"] for a in body["pods"]) == sorted(f"{p.pod_ip}:9090" for p in pods), body
            assert all(a["status"] == 200 and a["answer"]["state"] == "rolled_back" for a in body["pods"]), body
            for pod in pods:
                info = json.loads(get(f"http://{pod.pod_ip}:9090/info")[1])
                hello = next(m for m in info["modules"] if m["name"] == "hello")
                assert hello["canary"]["state"] == "rolled_back", hello
            # Again: each pod's canary has ended, which is no failure.
            status, body = post(first, "fleet-token")
            assert status == 200 and body["failed"] == 0, body
            assert all(a["status"] == 409 for a in body["pods"]), body
            # A pod gone: its address fails the action, the other still acts.
            pods[1].proc.kill()
            pods[1].proc.wait()
            status, body = post(f"http://{pods[0].pod_ip}:9090/admin/reload?pods=all", "fleet-token")
            assert status == 502 and body["failed"] == 1, body
            gone = next(a for a in body["pods"] if a["pod"].startswith(pods[1].pod_ip))
            assert gone["error"].startswith("cannot connect"), gone
        finally:
            for pod in pods:
                pod.cleanup()
