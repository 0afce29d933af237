#!/usr/bin/env python3
"""Generates berth.json, the Grafana dashboard the chart ships.

The dashboard is code: edit the panels here and run this script (the chart
tests fail when berth.json is not what it writes). Every panel query is
also evaluated against a real Prometheus scraping a real berth in the
tests (tests/observe), so a panel that stays empty under its own traffic
fails there.

    python3 charts/berth/dashboards/generate.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# The canary analysis queries, as Berth's fleet analysis asks them.
QUERIES = os.path.join(HERE, "..", "..", "..", "host", "src", "canary", "queries.promql")
SEL = 'namespace=~"$namespace", pod=~"$pod"'
MOD = f'{SEL}, module=~"$module"'
RATE = "$__rate_interval"



def analysis(name):
    """Fleet analysis query `name` over this dashboard's selection."""
    with open(QUERIES) as f:
        for line in f:
            if line.startswith(name + " "):
                return line[len(name) + 1:].strip().replace("RANGE", RATE).replace("MATCHERS", MOD)
    raise KeyError(name)


# (section, [(title, type, unit, [(expr, legend)])])
SECTIONS = [
    ("Requests (RED)", [
        ("Request rate by module and route", "timeseries", "reqps", [
            (f"sum by (module, route) (rate(berth_http_server_requests_total{{{MOD}}}[{RATE}]))", "{{module}} {{route}}"),
        ]),
        ("Error ratio (5xx) by module", "timeseries", "percentunit", [
            (f'sum by (module) (rate(berth_http_server_requests_total{{{MOD}, status=~"5.."}}[{RATE}])) '
             f"/ sum by (module) (rate(berth_http_server_requests_total{{{MOD}}}[{RATE}]))", "{{module}}"),
        ]),
        ("Latency p50 / p95 / p99 by module", "timeseries", "s", [
            (f"histogram_quantile({q}, sum by (module, le) (rate(berth_http_server_request_duration_seconds_bucket{{{MOD}}}[{RATE}])))",
             f"{{{{module}}}} p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)
        ]),
        ("Requests by status", "timeseries", "reqps", [
            (f"sum by (module, status) (rate(berth_http_server_requests_total{{{MOD}}}[{RATE}]))", "{{module}} {{status}}"),
        ]),
        ("In flight", "timeseries", "short", [
            (f"sum by (module) (berth_http_server_active_requests{{{MOD}}})", "{{module}}"),
        ]),
        ("Shed requests (503 at the concurrency limit)", "timeseries", "reqps", [
            (f"sum by (module) (rate(berth_http_server_shed_requests_total{{{MOD}}}[{RATE}]))", "{{module}}"),
        ]),
    ]),
    ("Outbound calls", [
        ("Outbound rate by module and upstream", "timeseries", "reqps", [
            (f"sum by (module, upstream) (rate(berth_http_client_requests_total{{{MOD}}}[{RATE}]))", "{{module}} → {{upstream}}"),
        ]),
        ("Outbound errors by outcome", "timeseries", "reqps", [
            (f'sum by (module, upstream, outcome) (rate(berth_http_client_requests_total{{{MOD}, outcome!~"[1-4].."}}[{RATE}]))',
             "{{module}} → {{upstream}} {{outcome}}"),
        ]),
        ("Outbound p99 by upstream", "timeseries", "s", [
            (f"histogram_quantile(0.99, sum by (module, upstream, le) (rate(berth_http_client_request_duration_seconds_bucket{{{MOD}}}[{RATE}])))",
             "{{module}} → {{upstream}}"),
        ]),
        ("Retries", "timeseries", "short", [
            (f"sum by (module, upstream) (rate(berth_http_client_retries_total{{{MOD}}}[{RATE}]))", "{{module}} → {{upstream}}"),
        ]),
        ("Circuit breaker (0 closed, 1 half-open, 2 open)", "timeseries", "short", [
            (f"max by (module, upstream) (berth_http_client_circuit_state{{{MOD}}})", "{{module}} → {{upstream}}"),
        ]),
    ]),
    ("Guest instances", [
        ("Instantiation time p99", "timeseries", "s", [
            (f"histogram_quantile(0.99, sum by (module, le) (rate(berth_module_instantiation_duration_seconds_bucket{{{MOD}}}[{RATE}])))",
             "{{module}}"),
        ]),
        ("Traps, timeouts and memory-limit hits", "timeseries", "short", [
            (f"sum by (module, kind) (increase(berth_guest_failures_total{{{MOD}}}[{RATE}]))", "{{module}} {{kind}}"),
        ]),
        ("Instances created", "timeseries", "short", [
            (f"sum by (module) (rate(berth_instances_created_total{{{MOD}}}[{RATE}]))", "{{module}}"),
        ]),
    ]),
    ("Modules, reloads and canaries", [
        ("Module versions (sha256)", "table", "short", [
            (f"max by (pod, module, sha256) (berth_module_info{{{MOD}}})", ""),
        ]),
        ("Module loads and reloads by result", "timeseries", "short", [
            (f"sum by (module, result) (increase(berth_module_reloads_total{{{MOD}}}[{RATE}]))", "reload {{module}} {{result}}"),
            (f"sum by (module, result) (increase(berth_module_loads_total{{{MOD}}}[{RATE}]))", "load {{module}} {{result}}"),
        ]),
        ("Modules whose last load failed", "timeseries", "short", [
            (f"max by (pod, module) (berth_module_load_error{{{MOD}}})", "{{pod}} {{module}}"),
        ]),
        ("Config reloads by result", "timeseries", "short", [
            (f"sum by (result) (increase(berth_config_reloads_total{{{SEL}}}[{RATE}]))", "{{result}}"),
        ]),
        ("Canary weight (%)", "timeseries", "percent", [
            (f"max by (pod, module) (berth_canary_weight{{{MOD}}})", "{{pod}} {{module}}"),
        ]),
        ("Canary state (0 progressing, 1 paused, 2 promoted, 3 rolled back)", "timeseries", "short", [
            (f"max by (pod, module) (berth_canary_state{{{MOD}}})", "{{pod}} {{module}}"),
        ]),
        ("Canary judgements by result", "timeseries", "short", [
            (f"sum by (module, result) (increase(berth_canary_judgements_total{{{MOD}}}[{RATE}]))", "{{module}} {{result}}"),
        ]),
        ("Requests by track (stable, canary)", "timeseries", "reqps", [
            (f"sum by (module, track, version) (rate(berth_http_server_requests_total{{{MOD}}}[{RATE}]))", "{{module}} {{track}} {{version}}"),
        ]),
        # What a fleet-analysed canary is judged on, asked as the replicas ask
        # it (one module selected: the sums span the modules selected).
        ("Canary analysis: requests by track and status", "timeseries", "short", [
            (analysis("requests"), "{{track}} {{status}}"),
        ]),
        ("Canary analysis: shed requests by version (not judged)", "timeseries", "short", [
            (analysis("shed"), "{{version}}"),
        ]),
        ("Canary analysis: p99 by track", "timeseries", "s", [
            (analysis("p99"), "{{track}}"),
        ]),
    ]),
    ("Process", [
        ("CPU", "timeseries", "percentunit", [
            (f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{pod}}"),
        ]),
        ("Resident memory", "timeseries", "bytes", [
            (f"process_resident_memory_bytes{{{SEL}}}", "{{pod}}"),
        ]),
        ("Open file descriptors", "timeseries", "short", [
            (f"process_open_fds{{{SEL}}}", "{{pod}}"),
        ]),
        ("Ready (1) or not (0)", "timeseries", "short", [
            (f"berth_ready{{{SEL}}}", "{{pod}}"),
        ]),
    ]),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def variable(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
    }


def dashboard():
    panels, next_id, y = [], 1, 0
    for section, items in SECTIONS:
        panels.append({"id": next_id, "type": "row", "title": section, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for i, (title, kind, unit, queries) in enumerate(items):
            x = (i % 3) * 8
            if i and x == 0:
                y += 8
            panel = {
                "id": next_id,
                "type": kind,
                "title": title,
                "datasource": DATASOURCE,
                "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {},
                "targets": [
                    {"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, **({"format": "table", "instant": True} if kind == "table" else {})}
                    for j, (expr, legend) in enumerate(queries)
                ],
            }
            panels.append(panel)
            next_id += 1
        y += 8
    return {
        "uid": "berth-overview",
        "title": "Berth",
        "description": "Berth hosts: requests, outbound calls, guest instances, modules, canaries and the process.",
        "tags": ["berth", "wasm"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "graphTooltip": 1,
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            variable("namespace", "Namespace", "label_values(berth_build_info, namespace)"),
            variable("pod", "Pod", 'label_values(berth_build_info{namespace=~"$namespace"}, pod)'),
            variable("module", "Module", 'label_values(berth_module_info{namespace=~"$namespace", pod=~"$pod"}, module)'),
        ]},
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    with open(os.path.join(HERE, "berth.json"), "w") as f:
        f.write(render())
