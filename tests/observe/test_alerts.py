"""The chart's alert rules: promtool checks them, and its unit tests
(alerts_test.yml) fire each alert on a synthetic series and keep it quiet
on a healthy one. Every alert carries a summary, a description and a
runbook link to a section that exists in docs/runbooks.md."""
import os
import re
import shutil
import subprocess

import yaml

from conftest import ROOT, render

HERE = os.path.dirname(os.path.abspath(__file__))


def rules(*values):
    docs = render("--set", "alerts.enabled=true", *values)
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    return rule["spec"]


def alerts(spec):
    return [r for g in spec["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules(tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules()))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts(rules()))} rules found" in out.stdout, out.stdout


def test_promtool_unit_tests_fire_each_alert_and_keep_healthy_series_quiet(tmp_path):
    spec = rules()
    # promtool compares annotations exactly; the unit tests are about when
    # each alert fires, so they run on the rules without them (the
    # annotations are checked below).
    for rule in alerts(spec):
        rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(spec))
    shutil.copy(os.path.join(HERE, "alerts_test.yml"), tmp_path)
    out = subprocess.run(["promtool", "test", "rules", str(tmp_path / "alerts_test.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has a unit test.
    tested = set(re.findall(r"alertname: (\w+)", open(os.path.join(HERE, "alerts_test.yml")).read()))
    assert {a["alert"] for a in alerts(spec)} <= tested


def anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces
    to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_alert_has_a_summary_a_description_and_a_runbook_section():
    runbooks = anchors(open(os.path.join(ROOT, "docs", "runbooks.md")).read())
    base = "https://runbooks.example/berth.md"
    for alert in alerts(rules("--set", f"alerts.runbookBaseUrl={base}")):
        notes = alert.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), alert
        url = notes.get("runbook_url", "")
        assert url.startswith(base + "#"), alert
        assert url.split("#", 1)[1] in runbooks, f"{alert['alert']}: no section {url} in docs/runbooks.md"


def test_slo_values_set_the_thresholds():
    spec = rules("--set", "alerts.slo.availability=99", "--set", "alerts.slo.latencyThreshold=0.25",
                 "--set", "alerts.breakerOpenFor=10m")
    by_name = {a["alert"]: a for a in alerts(spec)}
    # 14.4 x a 1 % budget.
    assert "> 0.144" in by_name["BerthErrorBudgetBurnFast"]["expr"]
    assert 'le="0.25"' in by_name["BerthLatencyBudgetBurnFast"]["expr"]
    assert by_name["BerthCircuitOpen"]["for"] == "10m"
