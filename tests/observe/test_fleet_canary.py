"""One canary verdict across replicas (`[modules.NAME.canary.analysis]`):
three or four real berth processes with the same config, scraped by a real
Prometheus (Debian's) as a PodMonitor would scrape pods, load spread over
them, and every replica judging the fleet's figures. Each test ends with
the whole fleet in one state.

The module `cart` serves `swap_v1`; its canary is `swap_v2`, which answers
`fail_percent` of its requests with 500 (config shared by both versions;
v1 ignores it)."""
import json
import time

import pytest

from conftest import Berth, Load, Prometheus, free_port, http, wasm

INTERVAL_MS = 4000
SCRAPE_MS = 1000


def config(prometheus_port, fail_percent, steps, unavailable="60s"):
    return f"""
[log]
access_log = false

[modules.cart]
file = "{wasm('swap_v1')}"
route = "/cart"
config = {{ fail_percent = "{fail_percent}" }}

[modules.cart.canary]
file = "{wasm('swap_v2')}"
steps = {json.dumps(steps)}
interval = "{INTERVAL_MS}ms"
min_requests = 5

[modules.cart.canary.analysis]
prometheus = "http://127.0.0.1:{prometheus_port}"
scrape_interval = "{SCRAPE_MS}ms"
labels = {{ namespace = "shop" }}
rollback_after_unavailable = "{unavailable}"
"""


class Fleet:
    """`count` replicas (and room for `spare` more, scraped from the start),
    a Prometheus scraping them all, and load spread over the running ones."""

    def __init__(self, count, fail_percent, steps, spare=0, unavailable="60s"):
        self.prom_port = free_port()
        self.admin_ports = [free_port() for _ in range(count + spare)]
        self.text = config(self.prom_port, fail_percent, steps, unavailable)
        self.replicas = []
        self.prometheus = None
        self.load = None
        try:
            for port in self.admin_ports[:count]:
                self.replicas.append(Berth(self.text, admin_port=port).wait_ready())
            self.prometheus = Prometheus(
                {f"berth-{i}": f"127.0.0.1:{p}" for i, p in enumerate(self.admin_ports)}, port=self.prom_port
            )
            self.spread()
        except BaseException:
            self.stop()
            raise

    def add(self):
        """Starts the next replica (a scale-up) and spreads load over it too."""
        port = self.admin_ports[len(self.replicas)]
        self.replicas.append(Berth(self.text, admin_port=port).wait_ready())
        self.spread()
        return self.replicas[-1]

    def spread(self):
        if self.load:
            self.load.stop()
        urls = [f"{b.url}/cart" for b in self.replicas]
        self.load = Load([urls[i:] + urls[:i] for i in range(len(urls))], limit=240)

    def canaries(self):
        out = []
        for b in self.replicas:
            status, body = http(b.admin + "/info")
            assert status == 200, body
            cart = next(m for m in json.loads(body)["modules"] if m["name"] == "cart")
            out.append(cart["canary"])
        return out

    def wait(self, done, limit, what):
        deadline = time.time() + limit
        while time.time() < deadline:
            canaries = self.canaries()
            if done(canaries):
                return canaries
            for b in self.replicas:
                assert b.proc.poll() is None, open(b.log.name).read()
            time.sleep(0.5)
        raise AssertionError(f"{what} within {limit}s: {json.dumps(self.canaries(), indent=1)[:4000]}")

    def stop(self):
        if self.load:
            self.load.stop()
        for b in self.replicas:
            b.stop()
        if self.prometheus:
            self.prometheus.stop()


@pytest.fixture
def fleets():
    made = []

    def make(*args, **kwargs):
        made.append(Fleet(*args, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def ended_at(canary, result):
    return next(e["at_ms"] for e in canary["history"] if e["result"] == result)


def judged(canaries, result):
    """Window (as a tuple) -> the figures every replica that judged it saw."""
    seen = {}
    for c in canaries:
        for e in c["history"]:
            if e["result"] == result and "window" in e:
                w = (e["window"]["start_ms"], e["window"]["end_ms"])
                seen.setdefault(w, []).append((e["stable"], e["canary"]))
    return seen


def test_a_failing_canary_is_rolled_back_by_every_replica_on_the_same_window(fleets):
    fleet = fleets(3, fail_percent=50, steps=[20, 50, 100], spare=1)
    canaries = fleet.wait(lambda cs: all(c["state"] == "rolled_back" for c in cs), 60, "every replica rolled back")
    # Every replica asked the same question about the same closed window
    # and got the same answer.
    failed = judged(canaries, "fail")
    assert failed, canaries
    # Replicas judged a failing window themselves, not only by the record.
    assert any(len(figures) >= 2 for figures in failed.values()), failed
    for window, figures in failed.items():
        assert all(f == figures[0] for f in figures), (window, figures)
        assert figures[0][1]["errors"] > 0 and figures[0][1]["success_rate"] < 99
    # Within one interval of each other (a replica that missed the window
    # follows the fleet's record at its next look).
    times = [ended_at(c, "rolled_back") for c in canaries]
    assert max(times) - min(times) <= INTERVAL_MS + 2 * SCRAPE_MS, times
    assert all(c["weight"] == 0 for c in canaries)
    for c in canaries:
        assert c["analysis"]["prometheus"] == f"http://127.0.0.1:{fleet.prom_port}"
        assert any("berth_http_server_requests_total" in q for q in c["analysis"]["queries"])
    # The record each replica exports says so to the fleet.
    deadline = time.time() + 10
    while True:
        status, answer = fleet.prometheus.query('min(berth_canary_fleet_state{module="cart"})')
        if answer["data"]["result"] and answer["data"]["result"][0]["value"][1] == "3":
            break
        assert time.time() < deadline, answer
        time.sleep(0.5)
    # A new pod (a restart, a reschedule, a scale-up) has no local record,
    # and reads the fleet's: the rolled-back canary never serves there.
    late = fleet.add()
    canary = fleet.wait(lambda cs: cs[-1]["state"] == "rolled_back", 20, "the new replica rolled back")[-1]
    assert canary["reason"] == "rolled back by a replica of the fleet", canary
    assert not any(e["result"] == "joined" for e in canary["history"]), canary["history"]
    for _ in range(20):
        status, body = http(late.url + "/cart")
        assert status == 200 and "v2" not in body, body


def test_a_healthy_canary_is_promoted_by_every_replica_at_the_same_step_and_a_late_replica_joins(fleets):
    steps = [10, 20, 30, 40, 50, 100]
    fleet = fleets(3, fail_percent=0, steps=steps, spare=1)
    # Mid-canary, a fourth replica starts (a scale-up): it takes up the
    # fleet's step and weight instead of starting again at step 0.
    fleet.wait(lambda cs: all(c["step"] >= 2 for c in cs), 60, "three replicas at step 2")
    # The record holds a step once Prometheus has scraped it.
    time.sleep(2 * SCRAPE_MS / 1000)
    late = fleet.add()
    canaries = fleet.wait(lambda cs: all(c["analysis"]["status"] == "ok" for c in cs), 20, "the fourth replica joined")
    joined = next(e for e in canaries[-1]["history"] if e["result"] == "joined")
    assert joined["step"] >= 2, canaries[-1]["history"]
    assert joined["weight"] == steps[joined["step"]], joined
    canaries = fleet.wait(lambda cs: all(c["state"] == "promoted" for c in cs), 90, "every replica promoted")
    # Every replica passed the same windows on the same figures, and the
    # fleet promoted at its last step, together.
    passed = judged(canaries, "pass")
    assert passed, canaries
    assert any(len(figures) >= 3 for figures in passed.values()), passed
    for window, figures in passed.items():
        assert all(f == figures[0] for f in figures), (window, figures)
    assert {c["step"] for c in canaries} == {len(steps) - 1}, [c["step"] for c in canaries]
    times = [ended_at(c, "promoted") for c in canaries]
    assert max(times) - min(times) <= INTERVAL_MS + 2 * SCRAPE_MS, times
    assert http(late.url + "/cart")[0] == 200
    # The status page says where the verdict came from and what it saw.
    status, page = http(late.admin + "/")
    assert status == 200 and "fleet: ok" in page and "berth_canary_fleet_state" in page, page[-3000:]
    assert "pass at step" in page, page[-3000:]


def test_without_prometheus_the_canary_holds_then_rolls_back(fleets):
    fleet = fleets(3, fail_percent=0, steps=[10, 20, 30, 40, 50, 100], unavailable="12s")
    fleet.wait(lambda cs: all(c["step"] >= 1 for c in cs), 60, "three replicas at step 1")
    fleet.prometheus.stop()
    fleet.prometheus = None
    canaries = fleet.wait(
        lambda cs: all(c["analysis"]["status"] == "unavailable" for c in cs), 20, "analysis unavailable everywhere"
    )
    held = [(c["step"], c["weight"]) for c in canaries]
    assert all(c["state"] == "progressing" for c in canaries)
    assert all("Prometheus unreachable" in c["analysis"]["error"] for c in canaries), canaries
    # It holds: no step taken while nobody can judge.
    time.sleep(INTERVAL_MS / 1000 + 1)
    for before, c in zip(held, fleet.canaries()):
        if c["state"] == "progressing":
            assert (c["step"], c["weight"]) == before, c
    canaries = fleet.wait(lambda cs: all(c["state"] == "rolled_back" for c in cs), 40, "rolled back after 12s")
    assert all(c["reason"].startswith("analysis unavailable for 12s") for c in canaries), [c["reason"] for c in canaries]


class FakePrometheus:
    """An HTTP server answering /api/v1/query as Prometheus' API does, for
    the answers a real one gives only when something is wrong: the record
    empty (no canary known), and window queries answered by `window(query)`
    (a status and a body), after `delay` seconds."""

    def __init__(self, window, delay=0.0, token=None):
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                import urllib.parse as up
                query = up.parse_qs(up.urlparse(self.path).query).get("query", [""])[0]
                if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    status, body = 401, {"status": "error", "errorType": "unauthorized", "error": "no token"}
                elif "berth_canary_fleet_" in query:
                    status, body = 200, {"status": "success", "data": {"resultType": "vector", "result": []}}
                else:
                    time.sleep(outer.delay)
                    status, body = outer.window(query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.window, self.delay, self.token = window, delay, token
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def vector(*series):
    return 200, {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [0, value]} for labels, value in series]}}


def passing(query):
    """A healthy window: both versions answered, fast."""
    if query.startswith("sum by (track, status)"):
        return vector(({"track": "stable", "status": "200"}, "100"), ({"track": "canary", "status": "200"}, "100"))
    if query.startswith("histogram_quantile"):
        return vector(({"track": "stable"}, "0.01"), ({"track": "canary"}, "0.01"))
    return vector()


def one_replica(prom_port, extra="", unavailable="3s", steps="[10, 50, 100]", analysis=""):
    text = f"""
[log]
access_log = false

[modules.cart]
file = "{wasm('swap_v1')}"
route = "/cart"

[modules.cart.canary]
file = "{wasm('swap_v2')}"
steps = {steps}
interval = "1s"
min_requests = 5
{extra}
[modules.cart.canary.analysis]
prometheus = "http://127.0.0.1:{prom_port}"
scrape_interval = "100ms"
labels = {{ namespace = "shop" }}
rollback_after_unavailable = "{unavailable}"
{analysis}"""
    return Berth(text).wait_ready()


def cart(berth):
    status, body = http(berth.admin + "/info")
    return next(m for m in json.loads(body)["modules"] if m["name"] == "cart")["canary"]


def wait_for(berth, done, limit, what):
    deadline = time.time() + limit
    while time.time() < deadline:
        c = cart(berth)
        if done(c):
            return c
        time.sleep(0.2)
    raise AssertionError(f"{what} within {limit}s: {json.dumps(cart(berth))[:3000]}")


@pytest.fixture
def fake():
    made = []

    def make(window, delay=0.0, token=None):
        made.append(FakePrometheus(window, delay, token))
        return made[-1]

    yield make
    for f in made:
        f.stop()


@pytest.fixture
def replica():
    made = []

    def make(*args, **kwargs):
        made.append(one_replica(*args, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.stop()


def test_window_queries_that_keep_failing_roll_back_although_the_record_answers(fake, replica):
    prom = fake(lambda q: (422, {"status": "error", "errorType": "execution", "error": "too many samples"}))
    berth = replica(prom.port)
    c = wait_for(berth, lambda c: c["state"] == "rolled_back", 20, "rolled back after 3s of failing windows")
    assert c["reason"].startswith("analysis unavailable for 3s"), c["reason"]
    assert "too many samples" in c["reason"], c["reason"]
    # One `unavailable` entry for the spell, not one a look.
    assert sum(e["result"] == "unavailable" for e in c["history"]) == 1, c["history"]


def test_labels_that_select_no_series_do_not_leave_a_canary_unjudged(fake, replica):
    # What Prometheus answers for matchers that select nothing: success,
    # and no series.
    prom = fake(lambda q: vector())
    berth = replica(prom.port, unavailable="4s", steps="[50, 100]")
    load = Load([[berth.url + "/cart"]] * 2, limit=30)
    try:
        c = wait_for(berth, lambda c: c["state"] == "rolled_back", 25, "rolled back")
    finally:
        load.stop()
    assert "do analysis.labels select this fleet's series?" in c["reason"], c["reason"]


def test_a_p99_threshold_without_a_p99_is_not_a_pass(fake, replica):
    def no_buckets(query):
        if query.startswith("histogram_quantile"):
            return vector()
        return passing(query)

    prom = fake(no_buckets)
    berth = replica(prom.port, extra='max_p99 = "100ms"\n')
    c = wait_for(berth, lambda c: c["state"] != "progressing" or c["analysis"]["status"] == "unavailable", 15,
                 "analysis unavailable")
    assert c["state"] == "progressing" and "no p99 for the canary" in c["analysis"]["error"], c
    assert not any(e["result"] == "pass" for e in c["history"]), c["history"]
    c = wait_for(berth, lambda c: c["state"] == "rolled_back", 15, "rolled back")


def test_a_pause_while_the_fleet_is_asked_holds(fake, replica):
    prom = fake(passing, delay=0.8)
    berth = replica(prom.port, unavailable="1m", steps="[10, 20, 30, 40, 50, 100]")
    wait_for(berth, lambda c: c["analysis"]["status"] == "ok", 15, "joined")
    # Pause right after a window's queries went out (due 200 ms after each
    # second's boundary), before their answers come back.
    now = time.time()
    time.sleep((1 - now % 1) + 0.4)
    status, body = http(berth.admin + "/admin/canary/cart/pause", data=b"",
                        headers={"Authorization": f"Bearer {Berth.TOKEN}"})
    assert status == 200, body
    time.sleep(3)
    c = cart(berth)
    assert c["state"] == "paused", c
    results = [e["result"] for e in c["history"]]
    after = results[results.index("paused") + 1:]
    assert not any(r in ("pass", "fail", "wait") for r in after), results


def test_new_stable_bytes_under_the_same_name_start_the_canary_against_them(fake, replica, tmp_path):
    """The fleet's record names both versions. The stable module's file
    rebuilt in place (same name, same config) is another stable version:
    the canary starts again, asking the fleet about the new one."""
    import hashlib
    import shutil

    prom = fake(passing)
    stable = tmp_path / "stable.wasm"
    shutil.copy(wasm("swap_v1"), stable)
    berth = replica(prom.port, unavailable="1m", steps="[10, 20, 30, 40, 50, 100]")
    with open(berth.config) as f:
        text = f.read().replace(wasm("swap_v1"), str(stable))
    with open(berth.config, "w") as f:
        f.write(text)
    status, body = berth.reload()
    assert status == 200, body
    before = wait_for(berth, lambda c: c["analysis"]["status"] == "ok", 15, "joined")
    shutil.copy(wasm("hello"), stable)
    status, body = berth.reload()
    assert status == 200, body
    new = hashlib.sha256(stable.read_bytes()).hexdigest()[:12]
    after = wait_for(berth, lambda c: c["analysis"]["record"]["stable"] == new, 15, "judged against the new stable")
    assert before["analysis"]["record"]["stable"] != new
    assert after["analysis"]["record"]["canary"] == before["analysis"]["record"]["canary"]
    assert all(new in q for q in after["analysis"]["queries"][:3]), after["analysis"]["queries"]


def failing(query):
    """A bad canary's window: half its answers 500."""
    if query.startswith("sum by (track, status)"):
        return vector(({"track": "stable", "status": "200"}, "100"), ({"track": "canary", "status": "200"}, "50"),
                      ({"track": "canary", "status": "500"}, "50"))
    return passing(query)


def test_max_failures_counts_failed_windows_in_a_row(fake, replica):
    prom = fake(failing)
    berth = replica(prom.port, extra="max_failures = 2\n", unavailable="1m")
    c = wait_for(berth, lambda c: c["state"] == "rolled_back", 20, "rolled back after two failed windows")
    results = [e["result"] for e in c["history"]]
    assert results.count("fail") == 2 and results[-1] == "rolled_back", results


def test_the_bearer_token_file_is_sent_to_prometheus(fake, replica, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-prom\n")
    prom = fake(passing, token="s3cret-prom")
    berth = replica(prom.port, unavailable="1m", analysis=f'bearer_token_file = "{token}"\n')
    c = wait_for(berth, lambda c: any(e["result"] == "pass" for e in c["history"]), 15, "a window passed")
    assert c["analysis"]["status"] == "ok", c
    assert "s3cret-prom" not in json.dumps(c)
    # Another token: refused, and said so.
    token.write_text("rotated")
    c = wait_for(berth, lambda c: c["analysis"]["status"] == "unavailable", 15, "refused without the token")
    assert "401" in c["analysis"]["error"], c["analysis"]


def test_a_short_outage_between_answers_does_not_add_up_to_a_rollback(fake, replica):
    """The unavailable clock starts again once a window is judged: two 2 s
    outages with a judged window between never reach a 3 s limit."""
    started = time.time()

    def flaky(query):
        phase = (time.time() - started) % 5
        if phase < 2:
            return 503, {"status": "error", "errorType": "unavailable", "error": "overloaded"}
        return passing(query)

    prom = fake(flaky)
    berth = replica(prom.port, unavailable="3s", steps="[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]")
    time.sleep(11)
    c = cart(berth)
    assert c["state"] != "rolled_back", c["reason"]
    results = [e["result"] for e in c["history"]]
    assert results.count("unavailable") >= 2 and "pass" in results, results
