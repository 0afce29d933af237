"""Every dashboard panel and every alert rule, evaluated by a real
Prometheus against a real berth under a small, bounded load that includes
failing, slow, shed, timed-out and memory-hungry requests, a canary, an
outbound call to a dead upstream, a failed reload, and a second host that
is draining.

Each panel has an expectation: which module (or pod) its own traffic
lights, and with what value. Berth registers many series at zero, so a
panel that merely returns series proves nothing. The alert rules are
loaded into that Prometheus as the chart renders them, with every `for:`
cut to a few seconds to keep the test bounded, and each alert must be
seen pending first and firing no sooner than its `for:` allows."""
import json
import os
import re
import signal
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import CHART, Berth, Load, Prometheus, free_port, http, render, wasm

# Every alert's `for:` in the test (the chart's are minutes long).
FOR_TEST = 8

# Grafana's variables as the dashboard's "All" selects them.
VARIABLES = {"$namespace": ".*", "$pod": ".*", "$module": ".*", "$__rate_interval": "1m"}


def config(dead_port, live_port):
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

[modules.up]
file = "{wasm('gateway')}"
route = "/up"
config = {{ upstream = "http://127.0.0.1:{live_port}" }}
allowed_outbound_hosts = ["http://127.0.0.1:{live_port}"]

[modules.cart]
file = "{wasm('swap_v1')}"
route = "/cart"
config = {{ fail_percent = "50" }}

[modules.cart2]
file = "{wasm('swap_v1')}"
route = "/cart2"

[modules.cart2.canary]
file = "{wasm('swap_v2')}"
steps = [50]
interval = "1h"
"""


def upstream():
    """A live upstream for outbound calls: `ok` after 20 ms (so its latency
    shows), and a 503 to every third GET (so the host retries)."""
    calls = iter(range(1 << 30))

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.02)
            self.send_response(503 if next(calls) % 3 == 2 else 200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def lit():
    """A berth serving traffic of every kind, a draining berth, and a
    Prometheus that has scraped both for a while."""
    dead_port = free_port()
    live = upstream()
    berth = Berth(config(dead_port, live.server_address[1])).wait_ready()
    draining = Berth(
        f'[shutdown]\ndrain_delay = "300s"\n[runtime]\ncache_dir = ""\n'
        f'[modules.hello]\nfile = "{wasm("swap_v1")}"\nroute = "/"\n'
    ).wait_ready()
    prometheus = Prometheus(
        {"berth-0": f"127.0.0.1:{berth.admin_port}", "berth-1": f"127.0.0.1:{draining.admin_port}"},
        rules=rules_for_test(),
    )
    prometheus.started = time.time()
    u = berth.url
    load = Load([
        [f"{u}/m/ok", f"{u}/m/ok", f"{u}/m/panic"],
        [f"{u}/m/loop", f"{u}/m/alloc?mb=64", f"{u}/m/ok"],
        [f"{u}/s/sleep?ms=600"],
        [f"{u}/b/sleep?ms=300"], [f"{u}/b/sleep?ms=300"], [f"{u}/b/sleep?ms=300"],
        [f"{u}/cart", f"{u}/cart2"],
        [f"{u}/gw/orders"],
        [f"{u}/up/orders"],
    ], limit=90)
    try:
        # Each failure below happens twice, a few scrapes apart, after
        # Prometheus has seen the host, and differently each time: the host
        # counts each distinct failure once, and a counter born at 1 shows
        # no increase, so one failure alone would light no panel.
        # (Prometheus finds its targets only some seconds after it starts.)
        deadline = time.time() + 60
        while not prometheus.query('up{pod="berth-0"} == 1')[1].get("data", {}).get("result"):
            assert time.time() < deadline, "prometheus never scraped berth-0"
            time.sleep(0.5)
        time.sleep(1)
        # A module that fails to load on reload: not Wasm, then a core
        # module rather than a component. With the first, cart gets a
        # canary that fails its first judgement (after Prometheus has seen
        # its judgement counters at zero).
        broken = os.path.join(berth.dir, "broken.wasm")
        with open(berth.config, "a") as f:
            f.write(f'\n[modules.broken]\nfile = "{broken}"\nroute = "/broken"\n'
                    f'\n[modules.cart.canary]\nfile = "{wasm("swap_v2")}"\nsteps = [50]\n'
                    f'interval = "2s"\nmin_requests = 5\n')
        for content in (b"<not wasm>", b"\0asm\x01\0\0\0"):
            with open(broken, "wb") as f:
                f.write(content)
            status, body = berth.reload()
            assert status == 422 and "broken" in body, body
            time.sleep(2)
        # A config file that does not parse (at two different lines):
        # refused, the running one kept.
        with open(berth.config) as f:
            good = f.read()
        for junk in ("\n[[[ one\n", "\n\n[[[ two\n"):
            with open(berth.config, "w") as f:
                f.write(good + junk)
            status, body = berth.reload()
            assert status >= 400 and "toml" in body.lower(), (status, body)
            time.sleep(2)
        with open(berth.config, "w") as f:
            f.write(good)
        # The second host drains: not ready, still scraped.
        draining.proc.send_signal(signal.SIGTERM)
        # Enough traffic and scrapes for every rate window to hold points,
        # and for every alert to run through its shortened `for:`.
        time.sleep(20)
        yield prometheus
    finally:
        statuses = load.stop()
        prometheus.stop()
        berth.stop()
        draining.stop()
        live.shutdown()
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


def rendered_rules():
    docs = render("--set", "alerts.enabled=true")
    return next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]


def rules_for_test():
    spec = rendered_rules()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{FOR_TEST}s"
    return spec


def alert_rules():
    for group in rendered_rules()["groups"]:
        for rule in group["rules"]:
            yield pytest.param(rule["expr"], id=rule["alert"])


def returns_series(prometheus, expr):
    status, answer = prometheus.query(expr)
    assert status == 200 and answer.get("status") == "success", f"{expr}\n{answer}"
    result = answer["data"]["result"]
    assert result, f"no series for {expr}"
    return result


# What each panel shows under the load above: for a target, each entry is
# (labels a series must carry, a test of its value). A series at zero, or
# under another module's name, does not count.
ABOVE_ZERO = (lambda v: v > 0, "> 0")
PANELS = {
    "Request rate by module and route [A]": [({"module": "shop", "route": "/m"}, ABOVE_ZERO),
                                             ({"module": "slow", "route": "/s"}, ABOVE_ZERO)],
    "Error ratio (5xx) by module [A]": [({"module": "shop"}, ABOVE_ZERO), ({"module": "busy"}, ABOVE_ZERO)],
    # The slow module sleeps 600 ms a request.
    "Latency p50 / p95 / p99 by module [A]": [({"module": "slow"}, (lambda v: v >= 0.5, ">= 0.5 s"))],
    "Latency p50 / p95 / p99 by module [B]": [({"module": "slow"}, (lambda v: v >= 0.5, ">= 0.5 s"))],
    "Latency p50 / p95 / p99 by module [C]": [({"module": "slow"}, (lambda v: v >= 0.5, ">= 0.5 s"))],
    "Requests by status [A]": [({"module": "shop", "status": "500"}, ABOVE_ZERO),
                               ({"module": "shop", "status": "504"}, ABOVE_ZERO),
                               ({"module": "busy", "status": "503"}, ABOVE_ZERO)],
    # A gauge: sampled, so retried until a scrape lands mid-request.
    "In flight [A]": [({"module": "slow"}, ABOVE_ZERO)],
    "Shed requests (503 at the concurrency limit) [A]": [({"module": "busy"}, ABOVE_ZERO)],
    "Outbound rate by module and upstream [A]": [({"module": "up"}, ABOVE_ZERO), ({"module": "gw"}, ABOVE_ZERO)],
    "Outbound errors by outcome [A]": [({"module": "gw"}, ABOVE_ZERO), ({"module": "up"}, ABOVE_ZERO)],
    # The live upstream answers after 20 ms.
    "Outbound p99 by upstream [A]": [({"module": "up"}, (lambda v: v >= 0.02, ">= 0.02 s"))],
    "Retries [A]": [({"module": "up"}, ABOVE_ZERO)],
    "Circuit breaker (0 closed, 1 half-open, 2 open) [A]": [({"module": "gw"}, (lambda v: v == 2, "== 2 (open)"))],
    "Instantiation time p99 [A]": [({"module": "shop"}, ABOVE_ZERO)],
    "Traps, timeouts and memory-limit hits [A]": [({"module": "shop", "kind": "trap"}, ABOVE_ZERO),
                                                  ({"module": "shop", "kind": "timeout"}, ABOVE_ZERO),
                                                  ({"module": "shop", "kind": "memory_limit"}, ABOVE_ZERO)],
    "Instances created [A]": [({"module": "shop"}, ABOVE_ZERO)],
    "Module versions (sha256) [A]": [({"pod": "berth-0", "module": m}, (lambda v: v == 1, "== 1"))
                                     for m in ("shop", "slow", "busy", "gw", "cart")],
    "Module loads and reloads by result [A]": [({"module": "broken", "result": "error"}, ABOVE_ZERO)],
    # Start-up loads, all before the first scrape: the panel shows them only
    # when a pod restarts, which this fixture does not do. Its series must
    # carry each module's name and result all the same.
    "Module loads and reloads by result [B]": [({"module": m, "result": "ok"}, (lambda v: v == 0, "== 0"))
                                               for m in ("shop", "slow", "busy", "gw", "up", "cart", "cart2")],
    "Modules whose last load failed [A]": [({"pod": "berth-0", "module": "broken"}, (lambda v: v == 1, "== 1"))],
    "Config reloads by result [A]": [({"result": "error"}, ABOVE_ZERO)],
    # cart's canary fails its first judgement and is rolled back; cart2's
    # stays at its step (an interval of an hour).
    "Canary weight (%) [A]": [({"pod": "berth-0", "module": "cart2"}, (lambda v: v == 50, "== 50")),
                              ({"pod": "berth-0", "module": "cart"}, (lambda v: v == 0, "== 0"))],
    "Canary state (0 progressing, 1 paused, 2 promoted, 3 rolled back) [A]": [
        ({"pod": "berth-0", "module": "cart"}, (lambda v: v == 3, "== 3 (rolled back)")),
        ({"pod": "berth-0", "module": "cart2"}, (lambda v: v == 0, "== 0 (progressing)"))],
    "Canary judgements by result [A]": [({"module": "cart", "result": "fail"}, ABOVE_ZERO)],
    "Requests by track (stable, canary) [A]": [({"module": "cart2", "track": "stable"}, ABOVE_ZERO),
                                               ({"module": "cart2", "track": "canary"}, ABOVE_ZERO)],
    # The fleet analysis queries (host/src/canary/queries.promql).
    "Canary analysis: requests by track and status [A]": [({"track": "canary", "status": "200"}, ABOVE_ZERO),
                                                          ({"track": "stable", "status": "200"}, ABOVE_ZERO)],
    "Canary analysis: shed requests by version (not judged) [A]": [({}, ABOVE_ZERO)],
    "Canary analysis: p99 by track [A]": [({"track": "canary"}, ABOVE_ZERO), ({"track": "stable"}, ABOVE_ZERO)],
    "CPU [A]": [({"pod": "berth-0"}, ABOVE_ZERO)],
    "Resident memory [A]": [({"pod": "berth-0"}, ABOVE_ZERO)],
    "Open file descriptors [A]": [({"pod": "berth-0"}, ABOVE_ZERO)],
    "Ready (1) or not (0) [A]": [({"pod": "berth-0"}, (lambda v: v == 1, "== 1 (ready)")),
                                 ({"pod": "berth-1"}, (lambda v: v == 0, "== 0 (draining)"))],
}


def unmet(result, expected):
    """The expectations no series of `result` meets."""
    missing = []
    for labels, (test, says) in expected:
        if not any(all(s["metric"].get(k) == v for k, v in labels.items()) and test(float(s["value"][1]))
                   for s in result):
            missing.append(f"{labels} {says}")
    return missing


def test_every_panel_has_an_expectation():
    assert {p.id for p in dashboard_queries()} == set(PANELS)


@pytest.mark.parametrize("expr", list(dashboard_queries()))
def test_every_dashboard_panel_shows_its_traffic(lit, expr, request):
    expected = PANELS[request.node.callspec.id]
    # Gauges are sampled, so a value can miss its moment: a few tries.
    deadline = time.time() + 10
    while True:
        result = returns_series(lit, expr)
        missing = unmet(result, expected)
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    shown = [(s["metric"], s["value"][1]) for s in result]
    assert not missing, f"{expr}\nexpected {missing}\ngot {shown}"


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
    assert {s["metric"]["module"] for s in by["BerthCanaryRolledBack"]} == {"cart"}


def first_seen(prometheus, expr):
    """When `expr` first had a sample, since the fixture began."""
    result = prometheus.query_range(expr, prometheus.started, time.time())
    times = [float(t) for s in result for t, _ in s["values"]]
    return min(times) if times else None


def test_every_alert_goes_pending_then_fires_after_its_for(lit):
    """The rules as Prometheus runs them: an alert with `for:` is pending
    first and fires no sooner than `for:` later; one without fires at
    once."""
    problems = []
    for group in rendered_rules()["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            pending = first_seen(lit, f'ALERTS{{alertname="{name}", alertstate="pending"}}')
            firing = first_seen(lit, f'ALERTS{{alertname="{name}", alertstate="firing"}}')
            if firing is None:
                problems.append(f"{name} never fired")
            elif "for" not in rule:
                if pending is not None:
                    problems.append(f"{name} has no `for:` but was pending")
            elif pending is None:
                problems.append(f"{name} fired without being pending first")
            # One evaluation interval (1 s) of slack for the sampling.
            elif firing - pending < FOR_TEST - 1:
                problems.append(f"{name} fired {firing - pending:.0f} s after going pending, "
                                f"before its `for:` of {FOR_TEST} s")
    assert not problems, "\n".join(problems)
