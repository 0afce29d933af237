#!/usr/bin/env python3
"""Berth benchmarks: side by side with `wasmtime serve` and a native hyper
server, in one run, as ratios. See bench/README.md; `make bench` runs it.

Throughput runs pin the server to CPU 0 and wrk to CPU 1 (64 keep-alive
connections, 1 thread), alternate the servers round by round, and report
the median (min-max) of the rounds. Server CPU time per request comes from
/proc/<pid>/stat (utime + stime) around each run.
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BERTH = os.path.join(TARGET, "release", "berth")
NATIVE = os.path.join(TARGET, "release", "native-hello")
WASMTIME = os.environ.get("WASMTIME", os.path.join(ROOT, ".tools", "wasmtime", "bin", "wasmtime"))
WASM = os.path.join(TARGET, "wasm32-wasip2", "release")
HELLO = os.path.join(WASM, "plain_hello.wasm")
# WASI 0.3 hello: the conformance fixture (standard interfaces only), `/hello`.
HELLO_P3 = os.path.join(WASM, "p3_plain.wasm")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "10s")
CONNS = 64
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = "0", "1"
# keep_resident values measured against the default (issue 24).
KEEP = ["0", "64KiB", "256KiB", "1MiB", "4MiB"]
METRICS = "berth (metrics on, defaults)"
LOGGED = "berth (metrics, JSON access log)"
TRACED = "berth (metrics, JSON access log, OTLP traces of every request)"
SAMPLED = "berth (metrics, JSON access log, OTLP, 1 % parent-based sampling)"


def keep_row(k):
    return f"berth (metrics on, keep_resident = {k})"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.005)
    raise SystemExit(f"bench: {url} never answered")


class OtlpSink(BaseHTTPRequestHandler):
    """A local OTLP/HTTP receiver that accepts and drops spans."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server:
    def __init__(self, name, argv, url, env=None, ready=None):
        self.name, self.url = name, url
        full_env = dict(os.environ)
        # RUST_BACKTRACE=1 makes every error capture a backtrace (~8% CPU).
        for k in ("RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"):
            full_env.pop(k, None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU] + argv,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(ready or url)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wrk(url, duration=DURATION):
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNS}", f"-d{duration}", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    return rps, total, float(p99.group(1)) * scale, int(errors.group(1)) if errors else 0


def measure(server, path="/"):
    before = cpu_seconds(server.proc.pid)
    rss = []
    sampler_stop = threading.Event()

    def sample():
        while not sampler_stop.wait(0.5):
            rss.append(rss_mib(server.proc.pid))

    t = threading.Thread(target=sample)
    t.start()
    rps, total, p99, errors = wrk(server.url.rstrip("/") + path)
    sampler_stop.set()
    t.join()
    cpu = cpu_seconds(server.proc.pid) - before
    return {
        "rps": rps,
        "cpu_us": cpu * 1e6 / max(total, 1),
        "p99_ms": p99,
        "errors": errors,
        "rss_mib": max(rss) if rss else rss_mib(server.proc.pid),
    }


def berth_config(modules, access_log=False, cache_dir="", runtime=""):
    lines = [
        f'[runtime]\ncache_dir = "{cache_dir}"\nwatch = false\n{runtime}',
        f"[log]\naccess_log = {'true' if access_log else 'false'}\n",
        '[shutdown]\ndrain_delay = "0s"\ngrace_period = "5s"\n',
    ]
    for name, route, file in modules:
        lines.append(f'[modules.{name}]\nfile = "{file}"\nroute = "{route}"\n')
    path = tempfile.mktemp(suffix=".toml", prefix="berth-bench-")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def start_berth(name, modules, env=None, access_log=False, cache_dir="", runtime=""):
    port, admin = free_port(), free_port()
    config = berth_config(modules, access_log, cache_dir, runtime)
    s = Server(
        name,
        [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        f"http://127.0.0.1:{port}/",
        env={"LOG_LEVEL": "info", **(env or {})},
        ready=f"http://127.0.0.1:{admin}/ready",
    )
    s.admin = f"http://127.0.0.1:{admin}"
    return s


def splice_results(text, begin, end):
    """Puts `text` (a section between the markers `begin` and `end`) into
    RESULTS.md in place of the previous one, before "## Targets"."""
    results = os.path.join(ROOT, "bench", "RESULTS.md")
    current = open(results).read() if os.path.exists(results) else "# Benchmark results\n"
    if begin in current:
        current = current[:current.index(begin)] + current[current.index(end) + len(end) + 1:]
    anchor = "## Targets"
    current = current.replace(anchor, text + "\n" + anchor, 1) if anchor in current else current + "\n" + text
    with open(results, "w") as f:
        f.write(current)


def summary(values):
    return statistics.median(values), min(values), max(values)


def paired(a, b):
    """How `a` compares with `b`: the median of their per-round ratios.
    The two run close together in each round, so most of the machine's
    drift over the minutes between rounds cancels, which a ratio of the
    two medians would keep."""
    return statistics.median(x / y for x, y in zip(a, b))


def fmt(values, unit="", digits=0):
    med, lo, hi = summary(values)
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def start_to_ready(modules, cache_dir, settle=0.0):
    """Seconds from exec to /ready 200, and RSS `settle` seconds later
    (no request served)."""
    port, admin = free_port(), free_port()
    config = berth_config(modules, cache_dir=cache_dir)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{admin}/ready", limit=600)
    took = time.perf_counter() - started
    time.sleep(settle)
    rss = rss_mib(proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    return took, rss


def cold_start(modules, cache_dir):
    """Seconds from exec to /ready 200."""
    return start_to_ready(modules, cache_dir)[0]


def main():
    for tool, path in (("wrk", shutil.which("wrk")), ("berth", BERTH), ("native-hello", NATIVE), ("wasmtime", WASMTIME)):
        if not path or not os.path.exists(path):
            raise SystemExit(f"bench: {tool} missing; run `make bench` (bench/run.sh) to install and build")
    sink = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    otlp = f"http://127.0.0.1:{sink.server_address[1]}"
    twenty = [(f"m{i}", f"/m{i}", HELLO) for i in range(20)]

    one = [("hello", "/", HELLO)]
    # Servers a target compares run close together in every round (the
    # metrics-only and access-log rows have three partners each, so not
    # every pair can be neighbours).
    scenarios = [
        ("berth, 20 modules (last route)", lambda: start_berth("berth-20", twenty), "/m19"),
        ("wasmtime serve", lambda: (lambda p: Server(
            "wasmtime", [WASMTIME, "serve", "-Scli", f"--addr=127.0.0.1:{p}", HELLO], f"http://127.0.0.1:{p}/"))(free_port()), "/"),
        (METRICS, lambda: start_berth("berth", one), "/"),
        (LOGGED, lambda: start_berth("berth-log", one, access_log=True), "/"),
        (TRACED, lambda: start_berth(
            "berth-full", one, access_log=True,
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp, "OTEL_SERVICE_NAME": "bench"}), "/"),
        (SAMPLED, lambda: start_berth(
            "berth-sampled", one, access_log=True,
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp, "OTEL_SERVICE_NAME": "bench",
                 "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}), "/"),
    ] + [
        (keep_row(k), (lambda k: lambda: start_berth(
            "berth-keep", one, runtime=f'keep_resident = "{k}"\n'))(k), "/") for k in KEEP
    ] + [
        ("wasmtime serve (p3)", lambda: (lambda p: Server(
            "wasmtime-p3", [WASMTIME, "serve", "-Scli", f"--addr=127.0.0.1:{p}", HELLO_P3], f"http://127.0.0.1:{p}/",
            ready=f"http://127.0.0.1:{p}/hello"))(free_port()), "/hello"),
        ("berth (p3, defaults)", lambda: start_berth("berth-p3", [("hello3", "/", HELLO_P3)]), "/hello"),
        ("berth (p3, max_requests = 1)", lambda: start_berth(
            "berth-p3-fresh", [("hello3", "/", HELLO_P3)],
            env={"BERTH_MODULES__HELLO3__INSTANCES__MAX_REQUESTS": "1"}), "/hello"),
        ("native hyper", lambda: (lambda p: Server(
            "native", [NATIVE, f"127.0.0.1:{p}"], f"http://127.0.0.1:{p}/"))(free_port()), "/"),
    ]
    results = {name: [] for name, _, _ in scenarios}
    instantiation = []
    for rnd in range(ROUNDS):
        order = scenarios if rnd % 2 == 0 else list(reversed(scenarios))
        for name, start, path in order:
            server = start()
            try:
                wrk(server.url.rstrip("/") + path, "2s")  # warm-up
                r = measure(server, path)
                if name == METRICS:
                    page = urllib.request.urlopen(server.admin + "/metrics").read().decode()
                    s = float(re.search(r"berth_module_instantiation_duration_seconds_sum\{[^}]*\} ([\d.e-]+)", page).group(1))
                    c = float(re.search(r"berth_module_instantiation_duration_seconds_count\{[^}]*\} ([\d.e-]+)", page).group(1))
                    instantiation.append(s / c * 1e6)
                results[name].append(r)
                print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, {r['cpu_us']:.1f} us CPU/req, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", flush=True)
            finally:
                server.stop()

    # Cold starts, 1 and 20 modules, cold and warm compile cache.
    starts = {}
    for label, modules in (("1 module", [("hello", "/", HELLO)]), ("20 modules", twenty)):
        for cache in ("cold", "warm"):
            times = []
            for _ in range(ROUNDS):
                cache_dir = tempfile.mkdtemp(prefix="berth-cache-")
                if cache == "warm":
                    cold_start(modules, cache_dir)
                times.append(cold_start(modules, cache_dir))
                shutil.rmtree(cache_dir, ignore_errors=True)
            starts[(label, cache)] = times
            print(f"cold start to /ready, {label}, {cache} cache: {fmt([t * 1e3 for t in times], ' ms')}", flush=True)

    # Idle RSS with the examples loaded.
    examples = [(n, r, os.path.join(WASM, f)) for n, r, f in (
        ("hello", "/hello", "hello.wasm"), ("api", "/api", "api.wasm"),
        ("gateway", "/gateway", "gateway.wasm"), ("hello-raw", "/hello-raw", "hello_raw.wasm"))]
    # Compiled at start-up (no cache: the worst case, a pod's first start),
    # then from a warm compile cache.
    idle_rss = {}
    cache_dir = tempfile.mkdtemp(prefix="berth-cache-")
    cold_start(examples, cache_dir)  # fills the cache for the second run
    for label, cache in (("compiled at start-up", ""), ("warm cache", cache_dir)):
        idle = start_berth("berth-idle", examples, cache_dir=cache)
        time.sleep(1)
        idle_rss[label] = rss_mib(idle.proc.pid)
        idle.stop()
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"idle RSS with the examples loaded: {idle_rss}", flush=True)
    density = measure_density()
    burst = measure_idle_release()
    write_results(results, starts, instantiation, idle_rss, density, burst)


def distinct_copy(n, folder):
    """`plain-hello` with a custom section naming `n` appended: a valid
    component with bytes of its own, so it is compiled and loaded apart."""
    payload = b"berth-bench" + str(n).encode()
    name = b"x"
    body = bytes([len(name)]) + name + payload
    assert len(body) < 128, "one LEB128 byte for the section size"
    path = os.path.join(folder, f"hello-{n}.wasm")
    with open(path, "wb") as f:
        f.write(open(HELLO, "rb").read() + b"\x00" + bytes([len(body)]) + body)
    return path


def measure_density():
    """Modules per pod: 200 copies of one component to `/ready` from an
    empty and a warm cache, and idle RSS for 1 to 1,000 modules of one
    component and 1 to 100 distinct ones."""
    out = {"ready": {}, "rss": {}}
    same = lambda n: [(f"m{i}", f"/m{i}", HELLO) for i in range(n)]
    for cache in ("cold", "warm"):
        times = []
        for _ in range(ROUNDS):
            cache_dir = tempfile.mkdtemp(prefix="berth-cache-")
            if cache == "warm":
                cold_start(same(200), cache_dir)
            times.append(cold_start(same(200), cache_dir))
            shutil.rmtree(cache_dir, ignore_errors=True)
        out["ready"][cache] = times
        print(f"200 modules of one component to /ready, {cache} cache: {fmt([t * 1e3 for t in times], ' ms')}", flush=True)
    folder = tempfile.mkdtemp(prefix="berth-distinct-")
    cache_dir = tempfile.mkdtemp(prefix="berth-cache-")
    for kind, counts in (("one component", (1, 10, 100, 1000)), ("distinct components", (1, 10, 100))):
        for n in counts:
            modules = same(n) if kind == "one component" else [
                (f"m{i}", f"/m{i}", distinct_copy(i, folder)) for i in range(n)]
            cold_start(modules, cache_dir)  # compiles into the cache
            took, rss = start_to_ready(modules, cache_dir, settle=1)
            out["rss"][(kind, n)] = rss
            print(f"{n} modules, {kind}: {rss:.1f} MiB idle RSS, ready in {took * 1e3:.0f} ms (warm cache)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def measure_idle_release():
    """RSS idle, at the end of a 10 s burst, and 60 s after it, at the
    default `runtime.release_idle_after`."""
    server = start_berth("berth-burst", [("hello", "/h", HELLO), ("hello3", "/", HELLO_P3)])
    try:
        for path in ("h", "hello"):
            urllib.request.urlopen(server.url + path).read()
        time.sleep(2)
        idle = rss_mib(server.proc.pid)
        for path in ("h", "hello"):
            wrk(server.url + path, "5s")
        peak = rss_mib(server.proc.pid)
        time.sleep(60)
        after = rss_mib(server.proc.pid)
    finally:
        server.stop()
    print(f"RSS idle {idle:.1f} MiB, after a 10 s burst {peak:.1f} MiB, 60 s later {after:.1f} MiB", flush=True)
    return {"idle": idle, "peak": peak, "after": after}


def version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def locked(package):
    """The version of `package` Cargo.lock pins Berth to."""
    lock = open(os.path.join(ROOT, "Cargo.lock")).read()
    found = re.search(r'name = "' + re.escape(package) + r'"\nversion = "([^"]+)"', lock)
    return found.group(1) if found else "?"


def write_results(results, starts, instantiation, idle_rss, density, burst):
    col = lambda name, key: [r[key] for r in results[name]]
    ws, bm, bf, b20, nat = (
        "wasmtime serve", METRICS, TRACED, "berth, 20 modules (last route)", "native hyper")
    logged, sampled = LOGGED, SAMPLED
    ws3, b3, b3fresh = "wasmtime serve (p3)", "berth (p3, defaults)", "berth (p3, max_requests = 1)"
    med = lambda name, key: statistics.median(col(name, key))
    ratio = lambda a, b, key: paired(col(a, key), col(b, key))
    best = bm
    cpu_lead = ratio(ws, best, "cpu_us")
    ratio_full = ratio(bf, ws, "rps")
    ratio3 = ratio(b3, ws3, "rps")
    extra = lambda name, base: (ratio(name, base, "cpu_us") - 1) * 100
    log_cost, trace_cost, sample_cost = extra(logged, bm), extra(bf, logged), extra(sampled, logged)
    ready200 = {k: statistics.median(v) * 1e3 for k, v in density["ready"].items()}
    rss1000 = density["rss"][("one component", 1000)]
    after_burst = (burst["after"] / burst["idle"] - 1) * 100
    routing = 1 - ratio(b20, bm, "rps")
    warm20 = statistics.median(starts[("20 modules", "warm")]) * 1e3
    p99_ok = med(best, "p99_ms") <= med(ws, "p99_ms")
    yes = lambda ok: "met" if ok else "**missed**"
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (bench/bench.py) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- Machine: {os.cpu_count()} vCPU ({cpu_model}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; shared and noisy, so compare ratios within this run.",
        f"- Versions: {version([BERTH, 'version'])} (on the wasmtime crate {locked('wasmtime')}), `wasmtime serve`: {version([WASMTIME, '--version'])}, {version(['wrk', '--version']) or 'wrk'}, {version(['rustc', '--version'])}.",
        f"- Load: `taskset -c {LOAD_CPU} wrk -t1 -c{CONNS} -d{DURATION} --latency`, server pinned with `taskset -c {SERVER_CPU}`; {ROUNDS} rounds, servers alternating order each round, 2 s warm-up each; median (min-max). Each target below that compares two servers' CPU or req/s is the median of their per-round ratios (p99s compare medians).",
        "- Component: `tests/guests/plain-hello` (bare `wasi:http/proxy` plus the `wasi:cli` imports of Rust std, answers `hello`), the same file for every Wasm server (`wasmtime serve -Scli`); a fresh instance per request everywhere (`wasmtime serve` defaults to that for p2 components).",
        "- p3 rows: `tests/guests/p3-plain` (`wasi:http/handler@0.3`, `GET /hello`), the same file under `wasmtime serve -Scli` and Berth, each at its defaults (instances reused: 128 requests, 16 at once), plus Berth with a fresh p3 instance per request.",
        "",
        "| server | req/s | server CPU per request | p99 latency | peak RSS under load |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in [ws, bm] + [keep_row(k) for k in KEEP] + [logged, bf, sampled, b20, ws3, b3, b3fresh, nat]:
        lines.append(
            f"| {name} | {fmt(col(name, 'rps'))} | {fmt(col(name, 'cpu_us'), ' µs', 1)} | {fmt(col(name, 'p99_ms'), ' ms', 2)} | {fmt(col(name, 'rss_mib'), ' MiB', 1)} |"
        )
    lines += [
        "",
        f"Per-request instantiation (host histogram, berth metrics-on runs): {fmt(instantiation, ' µs', 1)}.",
        "",
        "| cold start to `/ready` | cold compile cache | warm compile cache |",
        "| --- | --- | --- |",
    ]
    for label in ("1 module", "20 modules"):
        lines.append(
            f"| {label} | {fmt([t * 1e3 for t in starts[(label, 'cold')]], ' ms')} | {fmt([t * 1e3 for t in starts[(label, 'warm')]], ' ms')} |"
        )
    lines += [
        "",
        "Idle RSS with the four examples loaded: "
        + ", ".join(f"{v:.1f} MiB {k}" for k, v in idle_rss.items()) + ".",
        "",
        "### Density (bench.py `measure_density`)",
        "",
        f"200 modules of one component (`plain-hello`) to `/ready`: {fmt([t * 1e3 for t in density['ready']['cold']], ' ms')} from an empty cache, {fmt([t * 1e3 for t in density['ready']['warm']], ' ms')} warm.",
        "",
        "| modules | idle RSS, one component | idle RSS, distinct components |",
        "| --- | --- | --- |",
    ]
    for n in (1, 10, 100, 1000):
        distinct = density["rss"].get(("distinct components", n))
        lines.append(f"| {n} | {density['rss'][('one component', n)]:.1f} MiB | "
                     + (f"{distinct:.1f} MiB" if distinct is not None else "not measured (1,000 compiles)") + " |")
    lines += [
        "",
        f"Idle memory back (`plain-hello` and `p3-plain`, defaults): {burst['idle']:.1f} MiB idle, {burst['peak']:.1f} MiB at the end of a 10 s burst (5 s each), {burst['after']:.1f} MiB 60 s later.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| p2 fresh instance, metrics on: >= 3.5x less server CPU per request than `wasmtime serve` | {cpu_lead:.2f}x (medians {med(best, 'cpu_us'):.1f} vs {med(ws, 'cpu_us'):.1f} µs) | {yes(cpu_lead >= 3.5)} |",
        f"| ... and p99 no worse than `wasmtime serve` | {med(best, 'p99_ms'):.2f} ms vs {med(ws, 'p99_ms'):.2f} ms | {yes(p99_ok)} |",
        f"| full telemetry: >= 1.5x `wasmtime serve` req/s | {ratio_full:.2f}x | {yes(ratio_full >= 1.5)} |",
        f"| p3 at defaults: >= 1.5x `wasmtime serve` p3 req/s | {ratio3:.2f}x | {yes(ratio3 >= 1.5)} |",
        f"| ... and p99 no worse than `wasmtime serve` p3 | {med(b3, 'p99_ms'):.2f} ms vs {med(ws3, 'p99_ms'):.2f} ms | {yes(med(b3, 'p99_ms') <= med(ws3, 'p99_ms'))} |",
        f"| JSON access log: <= +5% server CPU per request over metrics only | {log_cost:+.1f}% | {yes(log_cost <= 5)} |",
        f"| OTLP traces of every request: <= +15% over the access log | {trace_cost:+.1f}% | {yes(trace_cost <= 15)} |",
        f"| 1 % parent-based sampling: <= +3% over the access log | {sample_cost:+.1f}% | {yes(sample_cost <= 3)} |",
        f"| 200 modules of one component to `/ready`, empty cache: <= 1 s | {ready200['cold']:.0f} ms | {yes(ready200['cold'] <= 1000)} |",
        f"| ... warm cache: <= 150 ms | {ready200['warm']:.0f} ms | {yes(ready200['warm'] <= 150)} |",
        f"| 1,000 modules of one component: < 256 MiB idle RSS | {rss1000:.1f} MiB | {yes(rss1000 < 256)} |",
        f"| RSS 60 s after a 10 s burst: within +10% of idle | {after_burst:+.1f}% | {yes(after_burst <= 10)} |",
        f"| routing across 20 modules costs < 5% | {routing * 100:.1f}% | {yes(routing < 0.05)} |",
        f"| cold start to `/ready`, warm cache, 20 modules: < 100 ms | {warm20:.0f} ms | {yes(warm20 < 100)} |",
        f"| idle RSS < 40 MiB with the examples loaded (compiled at start-up) | {idle_rss['compiled at start-up']:.1f} MiB | {yes(idle_rss['compiled at start-up'] < 40)} |",
        "",
    ]
    # The registry, canary and HTTP/2 figures of bench/oci.py,
    # bench/canary.py and bench/http2.py (run first by bench/run.sh).
    for part in ("OCI.md", "CANARY.md", "GRPC.md"):
        path = os.path.join(ROOT, "bench", part)
        if os.path.exists(path):
            lines.insert(lines.index("## Targets"), open(path).read())
    notes = os.path.join(ROOT, "bench", "NOTES.md")
    if os.path.exists(notes):
        lines += [open(notes).read()]
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
