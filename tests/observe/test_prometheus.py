"""Every dashboard panel and every alert rule, evaluated by a real
Prometheus against a real berth under a small, bounded load that includes
failing, slow, shed, timed-out and memory-hungry requests, a canary, an
outbound call to a dead upstream, a failed reload, and a second host that
is draining. Each expression must parse, and each must return series: a
panel that stays empty under its own traffic fails here."""
import json
import os
import re
import signal
import time
import urllib.parse

import pytest

from conftest import CHART, Berth, Load, Prometheus, free_port, http, render, wasm

# Grafana's variables as the dashboard's "All" selects them.
VARIABLES = {"$namespace": ".*", "$pod": ".*", "$module": ".*", "$__rate_interval": "1m"}


def config(dead_port):
    mis = wasm("misbehave")
    return f"""
[log]
access_log = false
[runtime]
cache_dir = ""
watch = false

[modules.shop]
file = "{mis}"
route = "/m"
limits = {{ timeout = "1s", memory = "32MiB" }}

[modules.slow]
file = "{mis}"
route = "/s"

[modules.busy]
file = "{mis}"
route = "/b"
limits = {{ max_concurrency = 1 }}

[modules.gw]
file = "{wasm('gateway')}"
route = "/gw"
config = {{ upstream = "http://127.0.0.1:{dead_port}" }}
allowed_outbound_hosts = ["http://127.0.0.1:{dead_port}"]
outbound = {{ retries = 1, circuit_breaker = {{ failures = 3, open_for = "1m" }} }}

[modules.cart]
file = "{wasm('swap_v1')}"
route = "/cart"
config = {{ fail_percent = "50" }}

[modules.cart.canary]
file = "{wasm('swap_v2')}"
steps = [50]
interval = "2s"
min_requests = 5
"""


@pytest.fixture(scope="module")
def lit():
    """A berth serving traffic of every kind, a draining berth, and a
    Prometheus that has scraped both for a while."""
    dead_port = free_port()
    berth = Berth(config(dead_port)).wait_ready()
    draining = Berth(
        f'[shutdown]\ndrain_delay = "60s"\n[runtime]\ncache_dir = ""\n'
        f'[modules.hello]\nfile = "{wasm("swap_v1")}"\nroute = "/"\n'
    ).wait_ready()
    prometheus = Prometheus({"berth-0": f"127.0.0.1:{berth.admin_port}", "berth-1": f"127.0.0.1:{draining.admin_port}"})
    u = berth.url
    load = Load([
        [f"{u}/m/ok", f"{u}/m/ok", f"{u}/m/panic"],
        [f"{u}/m/loop", f"{u}/m/alloc?mb=64", f"{u}/m/ok"],
        [f"{u}/s/sleep?ms=600"],
        [f"{u}/b/sleep?ms=300"], [f"{u}/b/sleep?ms=300"], [f"{u}/b/sleep?ms=300"],
        [f"{u}/cart"],
        [f"{u}/gw/orders"],
    ], limit=90)
    try:
        # A module that fails to load on reload.
        broken = os.path.join(berth.dir, "broken.wasm")
        with open(broken, "wb") as f:
            f.write(b"<not wasm>")
        with open(berth.config, "a") as f:
            f.write(f'\n[modules.broken]\nfile = "{broken}"\nroute = "/broken"\n')
        status, body = berth.reload()
        assert status == 422 and "broken" in body, body
        # The second host drains: not ready, still scraped.
        draining.proc.send_signal(signal.SIGTERM)
        # Enough traffic and scrapes for every rate window to hold points.
        time.sleep(20)
        yield prometheus
    finally:
        statuses = load.stop()
        prometheus.stop()
        berth.stop()
        draining.stop()
    kinds = {s for s in statuses}
    assert {200, 500, 503, 504} <= kinds, f"the load did not get every kind of answer: {kinds}"


def dashboard_queries():
    with open(os.path.join(CHART, "dashboards", "berth.json")) as f:
        d = json.load(f)
    for panel in d["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            yield pytest.param(expr, id=f"{panel['title']} [{target['refId']}]")


def alert_rules():
    docs = render("--set", "alerts.enabled=true")
    spec = next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            yield pytest.param(rule["expr"], id=rule["alert"])


def returns_series(prometheus, expr):
    status, answer = prometheus.query(expr)
    assert status == 200 and answer.get("status") == "success", f"{expr}\n{answer}"
    result = answer["data"]["result"]
    assert result, f"no series for {expr}"
    return result


@pytest.mark.parametrize("expr", list(dashboard_queries()))
def test_every_dashboard_panel_shows_its_traffic(lit, expr):
    returns_series(lit, expr)


def test_the_dashboard_variables_list_values(lit):
    with open(os.path.join(CHART, "dashboards", "berth.json")) as f:
        variables = [v for v in json.load(f)["templating"]["list"] if v["type"] == "query"]
    for v in variables:
        # label_values(metric{...}, label) is Grafana's; Prometheus answers
        # it through the label values API.
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector = m.group(1)
        for var, value in VARIABLES.items():
            selector = selector.replace(var, value)
        query = urllib.parse.urlencode({"match[]": selector})
        status, body = http(f"{lit.url}/api/v1/label/{m.group(2)}/values?{query}")
        values = json.loads(body)["data"]
        assert status == 200 and values, f"{v['name']}: {body}"


@pytest.mark.parametrize("expr", list(alert_rules()))
def test_every_alert_fires_on_the_traffic_that_should_light_it(lit, expr):
    returns_series(lit, expr)


def test_the_alerts_name_the_right_culprits(lit):
    by = {}
    for param in alert_rules():
        expr, name = param.values[0], param.id
        by[name] = returns_series(lit, expr)
    assert {s["metric"]["module"] for s in by["BerthLatencyBudgetBurnFast"]} == {"slow"}
    assert {s["metric"]["module"] for s in by["BerthShedding"]} == {"busy"}
    assert {s["metric"]["pod"] for s in by["BerthNotReady"]} == {"berth-1"}
    assert {s["metric"]["module"] for s in by["BerthReloadFailing"]} == {"broken"}
    assert {s["metric"]["kind"] for s in by["BerthGuestFailures"]} >= {"trap", "timeout", "memory_limit"}
    assert {s["metric"]["module"] for s in by["BerthCircuitOpen"]} == {"gw"}
