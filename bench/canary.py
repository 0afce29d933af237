#!/usr/bin/env python3
"""What routing through a canary costs: one module served alone, against
the same module with a canary at 50 % (held there: a one-hour interval).
Both versions are the same component (a copy under another name), so the
difference is the routing: the weight, the random draw, the window's
counts and the second version's metric series. Writes bench/CANARY.md,
which bench.py folds into RESULTS.md, and splices it into RESULTS.md now.

Run by `make bench`; alone: `python3 bench/canary.py` after `make guests build`.
"""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BERTH, HELLO, ROOT, Server, fmt, free_port, measure, splice_results, wrk  # noqa: E402

ROUNDS = int(os.environ.get("CANARY_ROUNDS", "5"))
MARK_BEGIN, MARK_END = "<!-- canary: begin -->", "<!-- canary: end -->"


def start(name, canary_file=None):
    port, admin = free_port(), free_port()
    text = (
        '[runtime]\ncache_dir = ""\nwatch = false\n[log]\naccess_log = false\n'
        '[shutdown]\ndrain_delay = "0s"\n'
        f'[modules.hello]\nfile = "{HELLO}"\nroute = "/"\n'
    )
    if canary_file:
        text += f'[modules.hello.canary]\nfile = "{canary_file}"\nsteps = [50]\ninterval = "1h"\n'
    config = tempfile.mktemp(suffix=".toml", prefix="berth-canary-")
    with open(config, "w") as f:
        f.write(text)
    return Server(
        name,
        [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        f"http://127.0.0.1:{port}/",
        env={"LOG_LEVEL": "warn"},
        ready=f"http://127.0.0.1:{admin}/ready",
    )


def main():
    tmp = tempfile.mkdtemp(prefix="berth-canary-bench-")
    copy = os.path.join(tmp, "hello-v2.wasm")
    shutil.copy(HELLO, copy)
    scenarios = [("no canary", None), ("canary at 50 %", copy)]
    results = {name: [] for name, _ in scenarios}
    try:
        for rnd in range(ROUNDS):
            order = scenarios if rnd % 2 == 0 else list(reversed(scenarios))
            for name, canary in order:
                server = start(name, canary)
                try:
                    wrk(server.url, "2s")
                    r = measure(server)
                    results[name].append(r)
                    print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, {r['cpu_us']:.1f} us CPU/req, errors {r['errors']}", flush=True)
                finally:
                    server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def col(name, key):
        return [r[key] for r in results[name]]

    base = sorted(col("no canary", "cpu_us"))[ROUNDS // 2]
    with_canary = sorted(col("canary at 50 %", "cpu_us"))[ROUNDS // 2]
    cost = with_canary / base - 1
    plain = col("no canary", "cpu_us")
    spread = (max(plain) - min(plain)) / 2 / base
    rows = [
        f"| {name} | {fmt(col(name, 'rps'))} | {fmt(col(name, 'cpu_us'), ' µs', 1)} | {fmt(col(name, 'p99_ms'), ' ms', 2)} |"
        for name, _ in scenarios
    ]
    text = "\n".join([
        MARK_BEGIN,
        "## Canary routing (bench/canary.py)",
        "",
        f"`plain-hello` alone, and with a copy of it as a canary held at 50 % "
        f"(`interval = \"1h\"`); {ROUNDS} rounds alternating, same load as above; median (min-max).",
        "",
        "| module | req/s | server CPU per request | p99 |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"Routing with a canary at 50 % costs {cost * 100:+.1f}% server CPU per request, "
        f"median against median (target < 3 %: {'yes' if cost < 0.03 else 'NO'}); the rounds of "
        f"one setup spread ±{spread * 100:.0f}% on this shared machine, so the cost is below what "
        "it can resolve. With no canary the route holds none, and the request path checks one "
        "`None` where it took the module before.",
        MARK_END,
        "",
    ])
    with open(os.path.join(ROOT, "bench", "CANARY.md"), "w") as f:
        f.write(text)
    splice_results(text, MARK_BEGIN, MARK_END)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
