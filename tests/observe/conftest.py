"""Shared pieces of the observability tests: a real berth (the release
binary `make build` made) with real components, a real Prometheus
scraping it, the chart's rendered dashboard and rules, and bounded load."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "charts", "berth")
HELM = os.path.join(ROOT, ".tools", "bin", "helm")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BERTH_BIN = os.environ.get("BERTH_BIN", os.path.join(TARGET, "release", "berth"))
WASM = os.path.join(TARGET, "wasm32-wasip2", "release")
ARTIFACTS = os.path.join(TARGET, "test-artifacts")


def wasm(name):
    path = os.path.join(WASM, f"{name}.wasm")
    assert os.path.isfile(path), f"{path} is missing: run `make guests`"
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, headers=None, timeout=10):
    """(status, body) of a request; errors are answers too."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


class Berth:
    """`berth serve` on free loopback ports, stopped by `stop()`."""

    TOKEN = "observe-test-token"

    def __init__(self, config, env=None, admin_port=None):
        self.dir = tempfile.mkdtemp(prefix="berth-observe-")
        self.config = os.path.join(self.dir, "berth.toml")
        with open(self.config, "w") as f:
            f.write(config)
        self.port, self.admin_port = free_port(), admin_port or free_port()
        full_env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        full_env.update(LOG_FORMAT="json", LOG_LEVEL="warn", BERTH_ADMIN__TOKEN=self.TOKEN, **(env or {}))
        self.log = open(os.path.join(self.dir, "berth.log"), "w")
        self.proc = subprocess.Popen(
            [BERTH_BIN, "serve", "--config", self.config,
             "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}"],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, limit=60):
        deadline = time.time() + limit
        while time.time() < deadline:
            if http(self.admin + "/ready")[0] == 200:
                return self
            assert self.proc.poll() is None, f"berth exited: {open(self.log.name).read()}"
            time.sleep(0.05)
        raise AssertionError("berth never became ready")

    def reload(self):
        return http(self.admin + "/admin/reload", data=b"", headers={"Authorization": f"Bearer {self.TOKEN}"})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Load:
    """Clients requesting URLs back to back (each thread its own list, in a
    round) until stopped or `limit` seconds pass."""

    def __init__(self, url_lists, limit=120):
        self.stop_event = threading.Event()
        self.statuses = []
        self.lock = threading.Lock()
        deadline = time.time() + limit

        def client(urls):
            while not self.stop_event.is_set() and time.time() < deadline:
                for url in urls:
                    status, _ = http(url, timeout=15)
                    with self.lock:
                        self.statuses.append(status)

        self.threads = [threading.Thread(target=client, args=(urls,), daemon=True) for urls in url_lists]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.statuses


class Prometheus:
    """A real Prometheus (Debian's) scraping `targets` every second, each
    target with its own `pod` label and `namespace="shop"`, as a
    PodMonitor labels them (or by the `scrape_configs` given)."""

    def __init__(self, targets, rules=None, scrape_configs=None, port=None):
        self.dir = tempfile.mkdtemp(prefix="prometheus-observe-")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [],
            # Or jobs of the caller's own (`targets` then unused).
            "scrape_configs": scrape_configs or [{
                "job_name": "berth",
                "static_configs": [
                    {"targets": [addr], "labels": {"namespace": "shop", "pod": pod}}
                    for pod, addr in targets.items()
                ],
            }],
        }
        if rules is not None:
            # The spec of a PrometheusRule is a rule file as it stands.
            rule_file = os.path.join(self.dir, "rules.yml")
            with open(rule_file, "w") as f:
                yaml.safe_dump(rules, f)
            config["rule_files"].append(rule_file)
        path = os.path.join(self.dir, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        port = port or free_port()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while http(self.url + "/-/ready")[0] != 200:
            assert time.time() < deadline, "prometheus never became ready"
            time.sleep(0.1)

    def query(self, expr):
        status, body = http(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return status, json.loads(body) if body.startswith("{") else {"error": body}

    def query_range(self, expr, start, end, step=1):
        query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        status, body = http(self.url + "/api/v1/query_range?" + query)
        answer = json.loads(body)
        assert status == 200 and answer.get("status") == "success", f"{expr}\n{body}"
        return answer["data"]["result"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def render(*values):
    out = subprocess.run([HELM, "template", "rel", CHART, *values], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture
def artifacts():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS
