#!/usr/bin/env python3
"""A large module through a registry: the 13 MB JavaScript example
(componentize-js) pushed to the CNCF distribution registry on loopback and
served from it. Measures the push, the pull, the compile, the start from a
warm cache (no pull, no compile) and requests. Writes bench/OCI.md, which
bench.py folds into RESULTS.md, and splices it into RESULTS.md now.

Run by `make bench`; alone: `python3 bench/oci.py` after `make guests build`.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BERTH, ROOT, ROUNDS, WASM, Server, fmt, free_port, measure, wait_http, splice_results, wrk  # noqa: E402

JS = os.path.join(WASM, "js-hello.wasm")
MARK_BEGIN, MARK_END = "<!-- oci: begin -->", "<!-- oci: end -->"


def start_registry(tmp):
    host = f"127.0.0.1:{free_port()}"
    config = os.path.join(tmp, "registry.yml")
    with open(config, "w") as f:
        f.write(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp}/data\nhttp:\n  addr: {host}\n"
        )
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://{host}/v2/")
    return proc, host


def config_file(host, reference, cache_dir):
    path = tempfile.mktemp(suffix=".toml", prefix="berth-oci-")
    with open(path, "w") as f:
        f.write(
            f'[runtime]\ncache_dir = "{cache_dir}"\nwatch = false\n[log]\naccess_log = false\n'
            f'[shutdown]\ndrain_delay = "0s"\n[registry]\ninsecure_registries = ["{host}"]\n'
            f'[modules.js]\noci = "{reference}"\nroute = "/"\n'
        )
    return path


def start(config):
    """Starts berth; returns (seconds to /ready, the JSON log lines)."""
    port, admin = free_port(), free_port()
    log = tempfile.TemporaryFile(mode="w+")
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "RUST_BACKTRACE")}
    env.update(LOG_FORMAT="json", LOG_LEVEL="info")
    began = time.perf_counter()
    proc = subprocess.Popen(
        [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        stdout=log, stderr=subprocess.DEVNULL, env=env)
    wait_http(f"http://127.0.0.1:{admin}/ready", limit=600)
    took = time.perf_counter() - began
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    log.seek(0)
    lines = [json.loads(l) for l in log if l.startswith("{")]
    compile_s = float(re.search(r"berth_module_compile_duration_seconds_sum\{[^}]*\} ([\d.e-]+)", metrics).group(1))
    return took, lines, compile_s


def main():
    for tool in (BERTH, JS):
        if not os.path.exists(tool):
            raise SystemExit(f"bench/oci.py: {tool} missing; run `make guests build`")
    tmp = tempfile.mkdtemp(prefix="berth-oci-bench-")
    registry, host = start_registry(tmp)
    try:
        size = os.path.getsize(JS)
        pushes, cold, warm, pulls, compiles = [], [], [], [], []
        for rnd in range(ROUNDS):
            began = time.perf_counter()
            out = subprocess.run([BERTH, "push", JS, f"{host}/bench/js-hello:{rnd}", "--insecure-registry", host],
                                 capture_output=True, text=True, check=True)
            pushes.append(time.perf_counter() - began)
            reference = f"{host}/bench/js-hello@{out.stdout.strip()}"
            cache = tempfile.mkdtemp(prefix="berth-cache-", dir=tmp)
            config = config_file(host, reference, cache)
            took, lines, compile_s = start(config)
            pulled = next(l for l in lines if l.get("message") == "pulled")
            cold.append(took)
            pulls.append(pulled["ms"] / 1e3)
            compiles.append(compile_s)
            took, lines, _ = start(config)
            assert any(l.get("message") == "module pulled" and l.get("cached") for l in lines), "the warm start pulled"
            warm.append(took)
            print(f"round {rnd + 1}: push {pushes[-1]:.2f}s, cold start {cold[-1]:.2f}s "
                  f"(pull {pulls[-1]:.2f}s, compile {compiles[-1]:.2f}s), warm-cache start {warm[-1]:.3f}s", flush=True)
        cached_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
        # Requests against the module served from the registry.
        port, admin = free_port(), free_port()
        server = Server("berth-js", [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
                                     "--admin-listen", f"127.0.0.1:{admin}"],
                        f"http://127.0.0.1:{port}/", env={"LOG_LEVEL": "warn"},
                        ready=f"http://127.0.0.1:{admin}/ready")
        try:
            wrk(server.url, "2s")
            runs = [measure(server) for _ in range(ROUNDS)]
        finally:
            server.stop()
    finally:
        registry.send_signal(signal.SIGTERM)
        registry.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    col = lambda key: [r[key] for r in runs]
    text = "\n".join([
        MARK_BEGIN,
        "## A 13 MB JavaScript module through a registry",
        "",
        f"`examples/js-hello` (componentize-js 0.23.0, {size / 2**20:.1f} MiB component), pushed with `berth push` "
        "to the CNCF distribution registry on loopback (plain HTTP) and served from it by digest; "
        f"median (min-max) of {ROUNDS} rounds (`bench/oci.py`).",
        "",
        "| step | time |",
        "| --- | --- |",
        f"| `berth push` | {fmt([p * 1e3 for p in pushes], ' ms')} |",
        f"| pull (manifest, layer streamed and verified) | {fmt([p * 1e3 for p in pulls], ' ms')} |",
        f"| compile (Cranelift, both cores) | {fmt(compiles, ' s', 2)} |",
        f"| start to `/ready`, empty cache (pull + compile) | {fmt(cold, ' s', 2)} |",
        f"| start to `/ready`, warm cache (no pull: the cached layer verified, the compiled code loaded) | {fmt([w * 1e3 for w in warm], ' ms')} |",
        "",
        f"Cache folder after one module: {cached_size / 2**20:.1f} MiB (layer and compiled code).",
        "",
        "| requests (`GET /`, fresh instance per request) | req/s | server CPU per request | p99 | peak RSS |",
        "| --- | --- | --- | --- | --- |",
        f"| berth, JS module | {fmt(col('rps'))} | {fmt(col('cpu_us'), ' µs', 1)} | {fmt(col('p99_ms'), ' ms', 2)} | {fmt(col('rss_mib'), ' MiB', 1)} |",
        MARK_END,
        "",
    ])
    with open(os.path.join(ROOT, "bench", "OCI.md"), "w") as f:
        f.write(text)
    splice_results(text, MARK_BEGIN, MARK_END)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
