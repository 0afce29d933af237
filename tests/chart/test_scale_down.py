"""Scale-down is safe because drain is (issue 28): three berth hosts
serving the config the chart renders, load spread over them by clients
that pick an endpoint for each connection from a shared list (as
kube-proxy does from the Service's endpoints), then 3 -> 1 the way
Kubernetes removes two pods: both marked terminating at once; the
endpoints controller and kube-proxy drop them after a lag; meanwhile the
kubelet runs the preStop sleep, sends SIGTERM, and waits up to
terminationGracePeriodSeconds. The lag here is the longest the chart's
shutdown values cover (preStop sleep + drain delay, less a second), and a
request is sent to each leaving pod just before its endpoint goes, long
enough to be in flight when its listener closes. No request may fail."""
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request

from test_chart import BERTH_BIN, CHART, TARGET, find, free_port, render

WASM = os.path.join(TARGET, "wasm32-wasip2", "release")
VALUES = ["--set", "modules.slow.file=misbehave.wasm", "--set", "modules.slow.route=/slow"]


class Pod:
    """One berth host on the rendered config, at its own loopback ports."""

    def __init__(self, name, config, modules, tmp_path):
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.log = open(tmp_path / f"{name}.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env.update(BERTH_RUNTIME__MODULES_DIR=str(modules), BERTH_RUNTIME__CACHE_DIR=str(tmp_path / f"{name}-cache"),
                   LOG_FORMAT="json", LOG_LEVEL="warn")
        self.proc = subprocess.Popen(
            [BERTH_BIN, "serve", "--config", str(config), "--listen", f"127.0.0.1:{self.port}",
             "--admin-listen", f"127.0.0.1:{self.admin_port}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.sigterm_at = None
        self.exited_at = None

    def wait_ready(self, limit=60):
        deadline = time.time() + limit
        while time.time() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited: {open(self.log.name).read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never became ready")

    def terminate(self, pre_stop, grace, started):
        """The kubelet's part: preStop sleep, SIGTERM, and SIGKILL if the
        pod is still there `grace` seconds after it began terminating."""
        time.sleep(pre_stop)
        self.sigterm_at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=max(0.0, started + grace - time.time()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.exited_at = time.time()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def get(url, timeout=30):
    """(status, error): a new connection for each request, so the endpoint
    picked is the one used, as with kube-proxy."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError as e:
        return None, repr(e)


def test_scaling_from_three_pods_to_one_under_load_fails_no_request(tmp_path):
    docs = render(*VALUES)
    pod_spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec["terminationGracePeriodSeconds"]
    config_text = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    drain_delay = int(tomllib.loads(config_text)["shutdown"]["drain_delay"].rstrip("s"))
    # The slowest endpoint update the chart's values cover.
    lag = pre_stop + drain_delay - 1
    config = tmp_path / "berth.toml"
    config.write_text(config_text)
    modules = tmp_path / "modules"
    shutil.copytree(os.path.join(CHART, "modules"), modules)
    shutil.copy(os.path.join(WASM, "misbehave.wasm"), modules)

    pods = [Pod(f"pod-{i}", config, modules, tmp_path) for i in range(3)]
    endpoints = list(pods)
    lock = threading.Lock()
    results = []  # (pod, path, started, ended, status, error)
    stop = threading.Event()
    deadline = time.time() + 120

    def client(paths):
        rng = random.Random()
        while not stop.is_set() and time.time() < deadline:
            with lock:
                pod = rng.choice(endpoints)
            path = rng.choice(paths)
            started = time.time()
            status, error = get(pod.url + path)
            with lock:
                results.append((pod.name, path, started, time.time(), status, error))

    threads = []
    try:
        for p in pods:
            p.wait_ready()
        fast, slow = ["/hello?name=load", "/slow/sleep?ms=100"], ["/slow/sleep?ms=600"]
        threads += [threading.Thread(target=client, args=(paths,), daemon=True)
                    for paths in [fast] * 4 + [slow] * 2]
        for t in threads:
            t.start()
        time.sleep(3)

        # 3 -> 1: pods 1 and 2 begin terminating.
        leaving = pods[1:]
        t0 = time.time()
        kubelet = [threading.Thread(target=p.terminate, args=(pre_stop, grace, t0)) for p in leaving]
        for k in kubelet:
            k.start()
        # Just before the endpoints go: a request to each leaving pod that
        # outlasts the drain delay, so it is in flight when the listener
        # closes.
        time.sleep(lag - 0.3)
        last = []
        for p in leaving:
            t = threading.Thread(target=lambda p=p: last.append((p.name, time.time(), *get(p.url + "/slow/sleep?ms=2500"))))
            t.start()
            last.append(t)
        time.sleep(0.3)
        with lock:
            for p in leaving:
                endpoints.remove(p)
            removed_at = time.time()
        for k in kubelet:
            k.join(timeout=grace + 10)
        for t in [x for x in last if isinstance(x, threading.Thread)]:
            t.join(timeout=30)
        time.sleep(2)
    finally:
        # The clients first: pod 0 is killed, not drained, at the end.
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for p in pods:
            p.stop()

    failed = [r for r in results if r[4] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    late = [x for x in last if not isinstance(x, threading.Thread)]
    assert len(late) == 2 and all(status == 200 for _, _, status, _ in late), late
    for p in leaving:
        # Drained and gone well within the grace, exit code 0 (not SIGKILL).
        assert p.proc.returncode == 0, (p.name, p.proc.returncode, open(p.log.name).read())
        assert p.exited_at - t0 < grace, (p.name, p.exited_at - t0)
        # It served what reached it after SIGTERM (while not ready, before
        # its endpoint went), and its last request, still running when its
        # listener closed (SIGTERM + drain delay).
        after = [r for r in results if r[0] == p.name and r[2] > p.sigterm_at]
        assert after, f"no request reached {p.name} after SIGTERM"
        start, = [s for name, s, _, _ in late if name == p.name]
        assert start > p.sigterm_at and start + 2.5 > p.sigterm_at + drain_delay
    # Load was spread over the three pods before, and went to the one left after.
    before = {r[0] for r in results if r[3] < t0}
    assert before == {"pod-0", "pod-1", "pod-2"}, before
    assert {r[0] for r in results if r[2] > removed_at} == {"pod-0"}
