"""The autoscaling queries of the chart (KEDA's ScaledObject and
prometheus-adapter's rules) run against a real Prometheus that scrapes two
real berth hosts as the chart's PodMonitor has them scraped, under bounded
load, and return what the scaling decision needs:

- in flight per pod within its module's concurrency limit, and reaching it;
- the request rate per pod the clients saw answered;
- shed requests above 0 on the pod that sheds, 0 on the one that does not;
- KEDA's figure for the track the sum of the adapter's per-pod figures;
- nothing of a pod of another namespace (under the same pod name), of
  another track or of another release, though a third host is scraped
  under all three names with more load than ours;
- an idle pod (no request counted yet) as 0, and a track with no pod
  scraped as no value at all, which KEDA (ignoreNullValues "false") takes
  as an error, not as 0.

The scrape job is built from the rendered PodMonitor the way
prometheus-operator builds one: namespace, pod and container from the pod,
each of podTargetLabels from the pod's labels (the rendered Deployment's);
only service discovery is replaced by static targets carrying the same
__meta_kubernetes_* labels."""
import json
import re
import subprocess
import threading
import time
import urllib.parse

import pytest
import yaml

from conftest import CHART, HELM, Berth, Prometheus, http, wasm

# The rates' window in the test (the chart's default is 1m at 15s scrapes;
# here Prometheus scrapes every second).
WINDOW = 20
SIGNALS = ["--set", "autoscaling.signals.inFlight=10", "--set", "autoscaling.signals.requestRate=10",
           "--set", "autoscaling.signals.shedRate=1", "--set", f"autoscaling.signals.rateWindow={WINDOW}s",
           # The PodMonitor's interval as this test's Prometheus scrapes (1 s):
           # the chart refuses a rate window of fewer than four scrapes.
           "--set", "podMonitor.enabled=true", "--set", "podMonitor.interval=1s"]
KEDA = ["--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.keda.serverAddress=http://prometheus:9090"]
ADAPTER = ["--set", "autoscaling.enabled=true", "--set", "autoscaling.prometheusAdapter.enabled=true"]
# Our track's two pods, as the Deployment names them.
POD_A, POD_B = "rel-berth-blue-6d5f8c7b9-k2x7q", "rel-berth-blue-6d5f8c7b9-p4m9w"
# Module busy sheds past 2 requests at once.
LIMIT = 2


def config():
    return f"""
[log]
access_log = false
[runtime]
cache_dir = ""
watch = false
[modules.busy]
file = "{wasm('misbehave')}"
route = "/b"
limits = {{ max_concurrency = {LIMIT} }}
[modules.crowd]
file = "{wasm('misbehave')}"
route = "/c"
limits = {{ max_concurrency = 8 }}
"""


def sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def scrape_job(monitor, namespace, pods):
    """The job prometheus-operator makes of `monitor` for `pods` (name ->
    (address, pod labels)) in `namespace`."""
    relabel = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ] + [
        {"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(label)}"], "target_label": sanitize(label),
         "regex": "(.+)", "replacement": "$1"}
        for label in monitor["spec"]["podTargetLabels"]
    ]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    return {
        "job_name": f"podMonitor/{namespace}/{monitor['metadata']['name']}/0",
        "metrics_path": endpoint["path"],
        "static_configs": [
            {"targets": [addr], "labels": {
                "__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
                "__meta_kubernetes_pod_container_name": "berth",
                **{f"__meta_kubernetes_pod_label_{sanitize(k)}": v for k, v in labels.items()}}}
            for pod, (addr, labels) in pods.items()
        ],
        "relabel_configs": relabel,
    }


def pod_labels(docs):
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]


def rendered(*values, release="rel", namespace="shop"):
    """The chart rendered for `release` in `namespace`, with the signals."""
    out = subprocess.run([HELM, "template", release, CHART, "--namespace", namespace, *SIGNALS, *values],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs, kind, suffix=""):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


class Clients:
    """Clients each requesting one URL back to back until stopped (or
    `limit` seconds pass); every answer is kept with its status and the
    time it came. A shed request (503) is retried after 50 ms, as a client
    backs off."""

    def __init__(self, urls, limit=90):
        self.stop_event = threading.Event()
        self.answers = []
        self.lock = threading.Lock()
        deadline = time.time() + limit

        def client(key, url):
            while not self.stop_event.is_set() and time.time() < deadline:
                status, _ = http(url, timeout=15)
                with self.lock:
                    self.answers.append((key, status, time.time()))
                if status != 200:
                    time.sleep(0.05)

        self.threads = [threading.Thread(target=client, args=kv, daemon=True) for kv in urls]
        for t in self.threads:
            t.start()

    def rate(self, key, end, window):
        """Answers per second `key` got in (end - window, end]."""
        with self.lock:
            n = sum(1 for k, _, t in self.answers if k == key and end - window < t <= end)
        return n / window

    def statuses(self, key):
        with self.lock:
            return {s for k, s, _ in self.answers if k == key}

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


def instant(prometheus, expr, at=None):
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    status, body = http(prometheus.url + "/api/v1/query?" + urllib.parse.urlencode(params))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{expr}\n{body}"
    return answer["data"]["result"]


def adapter_query(rule, namespace, pods):
    """A rule's metricsQuery as prometheus-adapter builds it for the pods
    an HPA asks about (pkg/naming/metrics_query.go, Build): the series the
    rule discovered, the namespace and the pods as label matchers (a regex
    for several pods), grouped by pod."""
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)
    pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{namespace}",{pod}').replace("<<.GroupBy>>", "pod"))


@pytest.fixture(scope="module")
def fleet():
    """Pods A and B of release rel, track blue, in namespace shop; a third
    host under three other names; Prometheus scraping all of it."""
    keda_docs = rendered(*KEDA)
    adapter_docs = rendered(*ADAPTER)
    monitor = find(keda_docs, "PodMonitor")
    ours = pod_labels(keda_docs)
    hosts = [Berth(config()) for _ in range(3)]
    a, b, other = hosts
    try:
        for h in hosts:
            h.wait_ready()
        other_addr = f"127.0.0.1:{other.admin_port}"
        jobs = [
            scrape_job(monitor, "shop", {
                POD_A: (f"127.0.0.1:{a.admin_port}", ours),
                POD_B: (f"127.0.0.1:{b.admin_port}", ours),
                # Another track of the release, another release.
                "rel-berth-green-7c9d4f5b6-z8r2t": (other_addr, pod_labels(rendered("--set", "track=green"))),
                "rel-2-berth-blue-5b7c8d9f4-h3j6k": (other_addr, pod_labels(rendered(release="rel-2"))),
            }),
            # The same release and pod name in the namespace next door.
            scrape_job(monitor, "other", {POD_A: (other_addr, pod_labels(rendered(namespace="other")))}),
        ]
        prometheus = Prometheus({}, scrape_configs=jobs)
        try:
            yield {
                "prometheus": prometheus, "hosts": hosts,
                "keda": {t["name"]: t["metadata"]["query"] for t in find(keda_docs, "ScaledObject")["spec"]["triggers"]},
                "rules": {r["name"]["as"]: r for r in yaml.safe_load(
                    find(adapter_docs, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])["rules"]},
            }
        finally:
            prometheus.stop()
    finally:
        for h in hosts:
            h.stop()


def wait_for(prometheus, expr, count, limit=60):
    deadline = time.time() + limit
    while len(instant(prometheus, expr)) < count:
        assert time.time() < deadline, f"Prometheus never returned {count} series for {expr}"
        time.sleep(0.5)


def test_the_queries_give_the_scaling_decision_its_figures(fleet):
    prom, keda, rules = fleet["prometheus"], fleet["keda"], fleet["rules"]
    a, b, other = fleet["hosts"]
    # Every name of every host scraped: five targets.
    wait_for(prom, "berth_ready", 5)
    per_pod = {name: adapter_query(rule, "shop", [POD_A, POD_B]) for name, rule in rules.items()}

    # Idle: each pod is there with 0 (requests_total has no series yet).
    assert not instant(prom, "berth_http_server_requests_total")
    for name, query in per_pod.items():
        got = {s["metric"]["pod"]: float(s["value"][1]) for s in instant(prom, query)}
        assert got == {POD_A: 0.0, POD_B: 0.0}, (name, got)
    for name, query in keda.items():
        got = instant(prom, query)
        assert [float(s["value"][1]) for s in got] == [0.0] and got[0]["metric"] == {}, (name, got)
    # A track with no pod scraped has no value: an error to KEDA, not 0.
    nobody = find(rendered(*KEDA, release="nobody"), "ScaledObject")
    for trigger in nobody["spec"]["triggers"]:
        assert trigger["metadata"]["ignoreNullValues"] == "false"
        assert instant(prom, trigger["metadata"]["query"]) == []

    # Load: A sheds (three clients, a limit of 2), B does not (one
    # client); the third host has more of everything than both, under
    # every name it is scraped by.
    sleep = "/b/sleep?ms=300"
    urls = [("A", a.url + sleep)] * 3 + [("B", b.url + sleep)] + \
        [("other", other.url + "/c/sleep?ms=300")] * 6 + [("other", other.url + sleep)] * 3
    clients = Clients(urls)
    try:
        started = time.time()
        # A window of steady load, and a few scrapes past it.
        time.sleep(WINDOW + 4)
        at = time.time() - 2
        assert at - WINDOW > started
        # Per pod, as the adapter answers the HPA.
        got = {name: {s["metric"]["pod"]: float(s["value"][1]) for s in instant(prom, q, at)}
               for name, q in per_pod.items()}
        for name in got:
            assert set(got[name]) == {POD_A, POD_B}, (name, got[name])
        rate = got["berth_requests_per_second"]
        for pod, key in [(POD_A, "A"), (POD_B, "B")]:
            seen = clients.rate(key, at, WINDOW)
            assert seen > 0 and abs(rate[pod] - seen) <= 0.2 * seen, (pod, rate[pod], seen)
        shed = got["berth_shed_requests_per_second"]
        assert shed[POD_A] > 0 and shed[POD_B] == 0, shed
        # For the track, as KEDA asks: the pods' sum, and nothing else's.
        for trigger, metric in [("request-rate", "berth_requests_per_second"),
                                ("shed-rate", "berth_shed_requests_per_second"),
                                ("in-flight", "berth_in_flight_requests")]:
            total = instant(prom, keda[trigger], at)
            assert len(total) == 1, total
            assert float(total[0]["value"][1]) == pytest.approx(sum(got[metric].values())), (trigger, total, got)
        # In flight, every sample of the window: within each pod's limit
        # (B has one client), and at it while the clients keep it busy.
        # The third host, at 6 + 2 in flight, would break either bound.
        for pod, most in [(POD_A, LIMIT), (POD_B, 1)]:
            query = adapter_query(rules["berth_in_flight_requests"], "shop", [pod])
            samples = query_range(prom, query, at - WINDOW, at)
            assert samples and max(samples) == most and min(samples) >= 0, (pod, samples)
        track = query_range(prom, keda["in-flight"], at - WINDOW, at)
        assert track and max(track) <= LIMIT + 1 and max(track) >= LIMIT, track
    finally:
        clients.stop()
    assert clients.statuses("A") == {200, 503} and clients.statuses("B") == {200}
    assert 503 in clients.statuses("other")


def query_range(prometheus, expr, start, end):
    result = prometheus.query_range(expr, start, end)
    assert len(result) <= 1, result
    return [float(v) for s in result for _, v in s["values"]]


def test_the_adapters_series_queries_find_our_series_with_their_pods(fleet):
    """prometheus-adapter discovers its metrics through each rule's
    seriesQuery and ties each series to a namespace and a pod through
    resources.overrides: the labels every series found must carry, and
    the name every series must match."""
    prom = fleet["prometheus"]
    wait_for(prom, "berth_ready", 5)
    for name, rule in fleet["rules"].items():
        query = urllib.parse.urlencode({"match[]": rule["seriesQuery"]})
        deadline = time.time() + 60
        while True:
            status, body = http(f"{prom.url}/api/v1/series?{query}")
            series = json.loads(body)["data"]
            # requests_total has series only once a request was answered.
            if series or time.time() > deadline:
                break
            http(fleet["hosts"][0].url + "/b/ok")
            time.sleep(1)
        assert status == 200 and series, (name, body)
        for s in series:
            assert re.fullmatch(rule["name"]["matches"], s["__name__"]), s
            for label in rule["resources"]["overrides"]:
                assert s.get(label), (label, s)
