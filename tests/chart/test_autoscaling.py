"""The chart's autoscaling options (docs/deploy.md, "Autoscaling"): the
CPU HPA as before, the HPA on Berth's signals through prometheus-adapter
with the adapter's rules, and a KEDA ScaledObject. Every option rendered
and checked against the real schemas: the HPA against Kubernetes'
(kubernetes-validate, strict), the ScaledObject against KEDA's API types
(tests/chart/keda), the adapter's rules against its config format; every
query parsed by promtool. tests/observe/test_scaling_queries.py runs the
same queries against a real Prometheus scraping real hosts."""
import json
import os
import re
import subprocess

import jsonschema
import pytest
import yaml

from test_chart import CHART, HELM, ROOT, VENV_BIN, find, render, run

KEDA_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keda", "validate.mjs")
ADAPTER_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prometheus-adapter-config.schema.json")
SIGNALS = {
    "inFlight": "berth_http_server_active_requests",
    "requestRate": "berth_http_server_requests_total",
    "shedRate": "berth_http_server_shed_requests_total",
}
# The Prometheus scaler's metadata keys (keda.sh/docs/scalers/prometheus):
# a misspelt key in this string map passes KEDA's schema and is ignored.
KEDA_PROMETHEUS_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
    "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "timeout", "authModes",
}
KEDA = ["--set", "autoscaling.keda.enabled=true",
        "--set", "autoscaling.keda.serverAddress=http://prometheus-operated.monitoring.svc:9090"]
ADAPTER = ["--set", "autoscaling.enabled=true", "--set", "autoscaling.prometheusAdapter.enabled=true"]
ALL_SIGNALS = ["--set", "autoscaling.signals.inFlight=20", "--set", "autoscaling.signals.requestRate=50",
               "--set-json", "autoscaling.signals.shedRate=0.5"]

# Every option: (id, values).
OPTIONS = [
    ("cpu", ["--set", "autoscaling.enabled=true"]),
    ("adapter-cpu-all-signals", ADAPTER + ALL_SIGNALS),
    ("adapter-no-cpu", ADAPTER + ["--set", "autoscaling.targetCPUUtilizationPercentage=null",
                                  "--set", "autoscaling.signals.requestRate=100"]),
    ("adapter-shed-beside-cpu", ADAPTER + ["--set", "autoscaling.signals.shedRate=2"]),
    ("keda-in-flight", KEDA + ["--set", "autoscaling.signals.inFlight=20"]),
    ("keda-all", KEDA + ALL_SIGNALS + [
        "--set", "autoscaling.keda.authenticationRef.name=prometheus-auth",
        "--set", "autoscaling.keda.authenticationRef.kind=ClusterTriggerAuthentication",
        "--set", r"autoscaling.keda.authModes=bearer\,tls", "--set", "autoscaling.keda.pollingInterval=15",
        "--set", "autoscaling.keda.fallback.failureThreshold=3", "--set", "autoscaling.keda.fallback.replicas=4",
        "--set", "autoscaling.signals.rateWindow=2m", "--set", "autoscaling.minReplicas=3",
        "--set", "autoscaling.maxReplicas=30", "--set", "track=green", "--set", "podMonitor.enabled=true"]),
]


def options():
    return [pytest.param(values, id=name) for name, values in OPTIONS]


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def keda_problems(objects, tmp_path):
    path = tmp_path / "keda.json"
    path.write_text(json.dumps(objects))
    proc = run("node", KEDA_CHECK, str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_the_cpu_hpa_is_as_it_was():
    docs = render("--set", "autoscaling.enabled=true")
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    assert not kinds(docs, "ScaledObject")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-prometheus-adapter")]
    # Off by default: nothing autoscales, the Deployment keeps replicaCount.
    docs = render()
    assert not kinds(docs, "HorizontalPodAutoscaler") and not kinds(docs, "ScaledObject")
    assert find(docs, "Deployment")["spec"]["replicas"] == 2


@pytest.mark.parametrize("values", options())
def test_every_option_passes_the_real_schemas(values, tmp_path):
    docs = render(*values)
    # Built-in kinds against Kubernetes' schema, unknown fields refused.
    builtin = [d for d in docs if "." not in d["apiVersion"].split("/")[0]]
    manifest = tmp_path / "builtin.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    proc = run(os.path.join(VENV_BIN, "kubernetes-validate"), "--strict", str(manifest), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = re.findall(r"passed for resource (\S+)", proc.stdout + proc.stderr)
    assert any(p.startswith("horizontalpodautoscaler/") for p in passed) == bool(kinds(docs, "HorizontalPodAutoscaler"))
    # The ScaledObject against KEDA's API.
    scaled = kinds(docs, "ScaledObject")
    assert bool(scaled) == ("keda" in " ".join(values))
    if scaled:
        assert keda_problems(scaled, tmp_path) == [[]]
        for trigger in scaled[0]["spec"]["triggers"]:
            assert set(trigger["metadata"]) <= KEDA_PROMETHEUS_KEYS, trigger["metadata"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert float(trigger["metadata"]["threshold"]) > 0
    # The adapter's rules against its config format.
    for cm in [d for d in docs if d["metadata"]["name"].endswith("-prometheus-adapter")]:
        config = yaml.safe_load(cm["data"]["config.yaml"])
        jsonschema.validate(config, json.load(open(ADAPTER_SCHEMA)))
        check_adapter_rules(config["rules"])
    # Whoever scales, the Deployment leaves the count to it.
    autoscaled = kinds(docs, "HorizontalPodAutoscaler") or scaled
    assert ("replicas" in find(docs, "Deployment")["spec"]) == (not autoscaled)


def check_adapter_rules(rules):
    """What the adapter itself checks when it loads its rules: the name
    regex compiles and matches the series the rule discovers, the
    resources map to namespaces and pods, and the query is a template of
    the fields the adapter fills in (<<.Series>>, <<.LabelMatchers>>,
    <<.GroupBy>>)."""
    for rule in rules:
        series = re.fullmatch(r'(\w+)\{namespace!="",pod!=""\}', rule["seriesQuery"]).group(1)
        assert series in SIGNALS.values(), series
        assert re.fullmatch(rule["name"]["matches"], series) and rule["name"]["as"].startswith("berth_")
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        fields = set(re.findall(r"<<\s*([^>]*?)\s*>>", rule["metricsQuery"]))
        assert fields == {".Series", ".LabelMatchers", ".GroupBy"}, rule["metricsQuery"]
    # Each metric served once (the adapter refuses nothing, it serves one).
    assert len({r["name"]["as"] for r in rules}) == len(rules)


def test_the_hpa_asks_the_adapter_for_the_metrics_its_rules_serve():
    docs = render(*ADAPTER, *ALL_SIGNALS)
    metrics = find(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    pods = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in metrics if m["type"] == "Pods"}
    rules = yaml.safe_load(find(docs, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])["rules"]
    assert set(pods) == {r["name"]["as"] for r in rules} and len(pods) == 3
    assert sorted(t["averageValue"] for t in pods.values()) == ["0.5", "20", "50"]
    assert all(t["type"] == "AverageValue" for t in pods.values())
    # CPU stays beside them unless left out.
    assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]


def keda_queries(docs):
    scaled = find(docs, "ScaledObject")
    return {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}


def matchers(query):
    """The label matchers of every selector of a query, as one set."""
    found = set()
    for selector in re.findall(r"\{([^}]*)\}", query):
        found |= set(re.findall(r'(\w+)(=~|!=|=)"((?:[^"\\]|\\.)*)"', selector))
    return found


def test_keda_selects_this_tracks_pods_by_the_labels_the_podmonitor_copies():
    """The series of the track's pods, and only those: its namespace and
    every label of its Deployment's selector, which the PodMonitor copies
    onto the series under Prometheus' names for them."""
    for release, track in [("rel", "blue"), ("shop-green", "green")]:
        docs = render(*KEDA, "--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.signals.requestRate=5",
                      "--set", f"track={track}", "--set", "podMonitor.enabled=true", release=release)
        selector = dict(find(docs, "Deployment")["spec"]["selector"]["matchLabels"])
        # The track under its own name: Berth's series have a `track` label
        # (stable, canary) that a target label `track` would rename.
        selector["berth.dev/track"] = selector.pop("track")
        pod = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert all(pod[k] == v for k, v in selector.items()), pod
        want = {("namespace", "=", "shop")} | {(re.sub(r"[^a-zA-Z0-9_]", "_", k), "=", v) for k, v in selector.items()}
        for name, query in keda_queries(docs).items():
            assert matchers(query) == want, (name, query)
        monitor = find(docs, "PodMonitor")
        assert sorted(monitor["spec"]["podTargetLabels"]) == sorted(selector)
        assert "track" not in monitor["spec"]["podTargetLabels"]
        # The PodMonitor itself still scrapes every track of the release.
        assert all(selector[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())


def adapter_as_keda(query, series, selector):
    """The adapter's metricsQuery expanded with KEDA's matchers and no
    grouping: what it would ask for the whole track."""
    expanded = (query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", selector)
                .replace("<<.GroupBy>>", ""))
    return expanded.replace("sum by () ", "sum")


def test_keda_and_the_adapter_run_one_query():
    """Built in one place (_helpers.tpl): the adapter's query, given KEDA's
    matchers and no grouping, is KEDA's query."""
    docs = render(*ADAPTER, *ALL_SIGNALS, "--set", "autoscaling.signals.rateWindow=3m")
    rules = yaml.safe_load(find(docs, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])["rules"]
    docs = render(*KEDA, *ALL_SIGNALS, "--set", "autoscaling.signals.rateWindow=3m")
    queries = keda_queries(docs)
    selector = re.search(r"berth_ready\{([^}]*)\}", queries["in-flight"]).group(1)
    by_series = {re.match(r"\w+", r["seriesQuery"]).group(0): r["metricsQuery"] for r in rules}
    for trigger, signal in [("in-flight", "inFlight"), ("request-rate", "requestRate"), ("shed-rate", "shedRate")]:
        series = SIGNALS[signal]
        assert adapter_as_keda(by_series[series], series, selector) == queries[trigger]
        assert ("[3m]" in queries[trigger]) == (signal != "inFlight")


def test_every_query_parses(tmp_path):
    """promtool parses each query (KEDA's, and the adapter's as it expands
    it for two pods) as a rule expression."""
    docs = render(*KEDA, *ALL_SIGNALS)
    exprs = list(keda_queries(docs).values())
    docs = render(*ADAPTER, *ALL_SIGNALS)
    for rule in yaml.safe_load(find(docs, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])["rules"]:
        exprs.append(rule["metricsQuery"].replace("<<.Series>>", re.match(r"\w+", rule["seriesQuery"]).group(0))
                     .replace("<<.LabelMatchers>>", 'namespace="shop",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [
        {"record": f"berth:q{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    proc = run("promtool", "check", "rules", str(rules), check=False)
    assert proc.returncode == 0 and f"{len(exprs)} rules found" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        # KEDA makes an HPA of its own: not beside the chart's.
        (["--set", "autoscaling.enabled=true", *KEDA, "--set", "autoscaling.signals.inFlight=5"],
         "/autoscaling/enabled': value must be false"),
        # The adapter's metrics are the HPA's.
        (["--set", "autoscaling.prometheusAdapter.enabled=true", "--set", "autoscaling.signals.inFlight=5"],
         "/autoscaling/enabled': value must be true"),
        # An autoscaler on Berth's signals with none given...
        (KEDA, "/autoscaling/signals/inFlight': got null, want number"),
        (ADAPTER, "/autoscaling/signals/inFlight': got null, want number"),
        # ...or only shedding, which falls to 0 once pods are enough.
        (KEDA + ["--set", "autoscaling.signals.shedRate=1"], "/autoscaling/signals/requestRate': got null"),
        (ADAPTER + ["--set", "autoscaling.signals.shedRate=1", "--set", "autoscaling.targetCPUUtilizationPercentage=null"],
         "missing property 'targetCPUUtilizationPercentage'"),
        # The HPA with no metric at all.
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.targetCPUUtilizationPercentage=null"],
         "missing property 'targetCPUUtilizationPercentage'"),
        # Targets are per pod and above 0 (0 would divide by zero).
        (KEDA + ["--set", "autoscaling.signals.inFlight=-5"], "/autoscaling/signals/inFlight': minimum"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=0"], "/autoscaling/signals/inFlight': minimum"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=lots"], "/autoscaling/signals/inFlight': got string"),
        (["--set", "autoscaling.targetCPUUtilizationPercentage=0"], "targetCPUUtilizationPercentage"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.signals.rateWindow=0m"], "rateWindow"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.signals.rateWindow=90"], "rateWindow"),
        # KEDA needs Prometheus' address, a URL.
        (["--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.signals.inFlight=5"], "serverAddress"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.serverAddress=prometheus:9090"],
         "serverAddress"),
        # Credentials and the way to send them come together.
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.authModes=bearer"],
         "authenticationRef"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.authenticationRef.name=a"],
         "authModes"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.authModes=oauth"], "authModes"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.authModes=bearer",
                 "--set", "autoscaling.keda.authenticationRef.kind=Secret"], "kind"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.fallback.replicas=3"],
         "failureThreshold"),
        # Unknown keys, at every level.
        (["--set", "autoscaling.signals.inflight=5"], "'inflight' not allowed"),
        (["--set", "autoscaling.keda.serverAdress=http://p:9090"], "'serverAdress' not allowed"),
        (["--set", "autoscaling.prometheusAdapter.rules=x"], "'rules' not allowed"),
        (["--set", "autoscaling.keda.fallback.replica=3"], "'replica' not allowed"),
    ],
)
def test_the_schema_refuses_nonsense(bad, message):
    proc = run(HELM, "lint", "--strict", CHART, *bad, check=False)
    assert proc.returncode != 0, f"lint accepted {bad}"
    assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5", "--set", "autoscaling.maxReplicas=3"],
         "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (3)"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.minReplicas=5",
                 "--set", "autoscaling.maxReplicas=3"], "is above autoscaling.maxReplicas"),
        (KEDA + ["--set", "autoscaling.signals.inFlight=5", "--set", "autoscaling.keda.fallback.failureThreshold=3",
                 "--set", "autoscaling.keda.fallback.replicas=30"], "fallback.replicas (30) is outside"),
    ],
)
def test_what_the_schema_cannot_compare_fails_the_render(bad, message):
    proc = run(HELM, "template", "rel", CHART, *bad, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_fractional_targets_from_a_values_file_render_as_written(tmp_path):
    """A values file's numbers are float64 to Helm: 20 stays "20" (not
    "20.0" or "2e+01"), 0.25 stays "0.25", for KEDA and the HPA alike."""
    values = tmp_path / "scale.yaml"
    values.write_text("autoscaling:\n  signals:\n    inFlight: 20\n    shedRate: 0.25\n    requestRate: 1000000\n")
    docs = render("-f", str(values), *KEDA)
    thresholds = {t["name"]: t["metadata"]["threshold"] for t in find(docs, "ScaledObject")["spec"]["triggers"]}
    assert thresholds == {"in-flight": "20", "shed-rate": "0.25", "request-rate": "1000000"}
    docs = render("-f", str(values), *ADAPTER)
    targets = sorted(m["pods"]["target"]["averageValue"] for m in find(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
                     if m["type"] == "Pods")
    assert targets == ["0.25", "1000000", "20"]


def test_the_adapter_rules_in_the_docs_are_the_rendered_ones():
    """docs/deploy.md shows the rules to copy into the adapter's config;
    they are the ones the chart renders (every signal, the default window)."""
    docs = render(*ADAPTER, *ALL_SIGNALS)
    rendered = yaml.safe_load(find(docs, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])
    doc = open(os.path.join(ROOT, "docs", "deploy.md")).read()
    section = doc.split("\n## Autoscaling\n", 1)[1]
    block = re.search(r"```yaml\n(# prometheus-adapter.*?)```", section, re.S).group(1)
    assert yaml.safe_load(block) == rendered


def test_a_rate_window_of_fewer_than_four_scrapes_is_refused():
    """rate() needs two samples in its window; with fewer the fallback reads
    0 and the autoscaler scales the track down under load."""
    base = KEDA + ["--set", "podMonitor.enabled=true", "--set", "autoscaling.signals.requestRate=50"]
    out = run(HELM, "template", "rel", CHART, *base, "--set", "podMonitor.interval=30s", check=False)
    assert out.returncode != 0 and "rateWindow (1m) must span at least four scrapes" in out.stderr, out.stderr
    assert run(HELM, "template", "rel", CHART, *base, "--set", "podMonitor.interval=15s").returncode == 0
    # In-flight is a gauge: no window to span.
    gauge = KEDA + ["--set", "podMonitor.enabled=true", "--set", "autoscaling.signals.inFlight=5",
                    "--set", "podMonitor.interval=5m"]
    assert run(HELM, "template", "rel", CHART, *gauge).returncode == 0


def test_the_longest_release_name_keeps_every_name_a_label_value():
    """KEDA labels what it makes with the ScaledObject's name: at most 63
    characters, and the Deployment it scales is the one rendered."""
    release = "a" * 53
    docs = render(*KEDA, "--set", "autoscaling.signals.inFlight=20", release=release)
    scaled, deployment = find(docs, "ScaledObject"), find(docs, "Deployment")
    assert len(scaled["metadata"]["name"]) <= 63, scaled["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_a_target_below_a_thousandth_is_refused():
    """KEDA and the HPA count targets in thousandths: less is 0."""
    out = run(HELM, "template", "rel", CHART, *KEDA, "--set-json", "autoscaling.signals.inFlight=0.0004", check=False)
    assert out.returncode != 0, out.stdout[:300]
