#!/usr/bin/env python3
"""HTTP/2 and gRPC: what a stream costs next to an HTTP/1.1 request, and a
gRPC unary call from a guest next to a native tonic server.

- the p2 hello (`plain-hello`, a fresh instance per request) over HTTP/1.1
  with wrk, and over h2c with h2load: 64 connections, one request at a
  time on each, so both hold the same 64 in flight;
- `greeter.Greeter/SayHello` with h2load (a length-prefixed `HelloRequest`
  posted with gRPC's headers; 64 connections, one stream each): the example
  `grpc-greeter` (SDK, WASI 0.2, fresh instance), the same service on
  WASI 0.3 (`tests/guests/p3-grpc`, instances reused at the defaults), and
  a native tonic server (`bench/native-grpc`).

Before measuring, each gRPC server is called once with grpcio and must
answer `grpc-status` 0, so the load is not measuring errors (h2load counts
HTTP statuses only). Server pinned to CPU 0, load to CPU 1; CPU per call
from /proc/<pid>/stat. Writes bench/GRPC.md, which bench.py folds into
RESULTS.md, and splices it into RESULTS.md now.

Run by `make bench`; alone: `.tools/venv/bin/python bench/http2.py` after `make guests
build` and `cargo build --release --manifest-path bench/native-grpc/Cargo.toml`.
"""
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402
    BERTH, DURATION, HELLO, LOAD_CPU, ROOT, ROUNDS, SERVER_CPU, TARGET, WASM, Server, cpu_seconds,
    fmt, free_port, paired, splice_results, wrk,
)

NATIVE_GRPC = os.path.join(TARGET, "release", "native-grpc")
GREETER = os.path.join(WASM, "grpc_greeter.wasm")
GREETER_P3 = os.path.join(WASM, "p3_grpc.wasm")
CONNS = 64
METHOD = "/greeter.Greeter/SayHello"
# HelloRequest { name: "Ada" }, length-prefixed: flag 0, length 5, then
# field 1 (tag 0x0a), length 3, "Ada".
CALL = b"\x00\x00\x00\x00\x05\x0a\x03Ada"
MARK_BEGIN, MARK_END = "<!-- grpc: begin -->", "<!-- grpc: end -->"

HELLO_H1, HELLO_H2 = "berth, p2 hello, HTTP/1.1 (wrk)", "berth, p2 hello, h2c (h2load)"
UNARY_P2, UNARY_P3 = "berth, gRPC unary, WASI 0.2 (SDK, fresh instance)", "berth, gRPC unary, WASI 0.3 (SDK, reused)"
TONIC = "native tonic, gRPC unary"


def seconds(duration):
    return int(duration.rstrip("s"))


def wait_port(port, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"bench: nothing listens on {port}")


def h2load(url, duration, body=None):
    """(req/s, calls done, failures) of h2load on `url`, h2c by prior
    knowledge, 64 connections with one stream each."""
    argv = ["taskset", "-c", LOAD_CPU, "h2load", "-D", str(seconds(duration)), "-c", str(CONNS),
            "-m", "1", "-t", "1"]
    if body is not None:
        path = os.path.join(TARGET, "bench-grpc-call.bin")
        with open(path, "wb") as f:
            f.write(body)
        argv += ["-d", path, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    done, ok = int(m.group(1)), int(m.group(2))
    not_2xx = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    bad = sum(int(x) for x in not_2xx.groups()) if not_2xx else 0
    return rps, done, done - ok + bad


def grpc_answers(port):
    """Whether one SayHello gets status 0 and a greeting (grpcio)."""
    import grpc  # the test venv's grpcio (scripts/k8s-tools.sh)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    reply = call(CALL[5:], timeout=10)
    channel.close()
    return b"Ada" in reply


def berth(modules):
    port, admin = free_port(), free_port()
    text = ('[runtime]\ncache_dir = ""\nwatch = false\n[log]\naccess_log = false\n'
            '[shutdown]\ndrain_delay = "0s"\n[server]\nhttp2 = true\n')
    for name, route, file in modules:
        text += f'[modules.{name}]\nfile = "{file}"\nroute = "{route}"\n'
    config = os.path.join(TARGET, f"bench-grpc-{port}.toml")
    with open(config, "w") as f:
        f.write(text)
    s = Server("berth", [BERTH, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
                         "--admin-listen", f"127.0.0.1:{admin}"],
               f"http://127.0.0.1:{port}/", env={"LOG_LEVEL": "warn"},
               ready=f"http://127.0.0.1:{admin}/ready")
    s.port = port
    return s


class Tonic:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, NATIVE_GRPC, f"127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def run(server, kind):
    """One measured run (after a 2 s warm-up): req/s, CPU per call, failures."""
    url = f"http://127.0.0.1:{server.port}"
    load = {
        "h1": lambda d: wrk(url + "/", d),
        "h2": lambda d: h2load(url + "/", d),
        "grpc": lambda d: h2load(url + METHOD, d, CALL),
    }[kind]
    load("2s")
    before = cpu_seconds(server.proc.pid)
    if kind == "h1":
        rps, done, _, failures = load(DURATION)
    else:
        rps, done, failures = load(DURATION)
    cpu = cpu_seconds(server.proc.pid) - before
    return {"rps": rps, "cpu_us": cpu * 1e6 / max(done, 1), "failures": failures}


def main():
    for tool, path in (("h2load", "/usr/bin/h2load"), ("berth", BERTH), ("native-grpc", NATIVE_GRPC)):
        if not os.path.exists(path):
            raise SystemExit(f"bench: {tool} missing; run `make bench` (bench/run.sh)")
    # The HTTP/1.1 hello, which two ratios divide by, runs between them.
    scenarios = [
        (HELLO_H2, lambda: berth([("hello", "/", HELLO)]), "h2"),
        (HELLO_H1, lambda: berth([("hello", "/", HELLO)]), "h1"),
        (UNARY_P2, lambda: berth([("greeter", "/greeter.Greeter", GREETER)]), "grpc"),
        (UNARY_P3, lambda: berth([("greeter", "/greeter.Greeter", GREETER_P3)]), "grpc"),
        (TONIC, Tonic, "grpc"),
    ]
    results = {name: [] for name, _, _ in scenarios}
    for rnd in range(ROUNDS):
        order = scenarios if rnd % 2 == 0 else list(reversed(scenarios))
        for name, start, kind in order:
            server = start()
            try:
                if kind == "grpc" and not grpc_answers(server.port):
                    raise SystemExit(f"bench: {name} does not answer SayHello")
                r = run(server, kind)
                results[name].append(r)
                print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, {r['cpu_us']:.1f} us CPU/call, "
                      f"failures {r['failures']}", flush=True)
            finally:
                server.stop()
    write(results)


def write(results):
    col = lambda name, key: [r[key] for r in results[name]]
    cpu = lambda a, b: paired(col(a, "cpu_us"), col(b, "cpu_us"))
    unary_cost, stream_cost, vs_tonic = cpu(UNARY_P2, HELLO_H1), cpu(HELLO_H2, HELLO_H1), cpu(UNARY_P2, TONIC)
    lines = [
        MARK_BEGIN,
        "## HTTP/2 and gRPC (bench/http2.py)",
        "",
        f"64 connections, one request or call in flight on each: wrk for HTTP/1.1, `h2load -c{CONNS} -m1` "
        f"for h2c (prior knowledge) and gRPC (`SayHello`, a 10-byte request, with `content-type: "
        f"application/grpc` and `te: trailers`; each server checked with grpcio first). {ROUNDS} rounds "
        f"alternating, {DURATION} each after a 2 s warm-up, server and load pinned as above; median (min-max), "
        f"and each ratio the median of the per-round ratios.",
        "",
        "| server | calls/s | server CPU per call | failures |",
        "| --- | --- | --- | --- |",
    ]
    for name in (HELLO_H1, HELLO_H2, UNARY_P2, UNARY_P3, TONIC):
        lines.append(f"| {name} | {fmt(col(name, 'rps'))} | {fmt(col(name, 'cpu_us'), ' µs', 1)} | "
                     f"{sum(col(name, 'failures'))} |")
    lines += [
        "",
        f"An h2c stream costs {stream_cost:.2f}x an HTTP/1.1 request of the same hello in server CPU. "
        f"A gRPC unary call from a WASI 0.2 guest costs {unary_cost:.2f}x the HTTP/1.1 hello "
        f"(target <= 1.3x: {'met' if unary_cost <= 1.3 else '**missed**'}), and {vs_tonic:.1f}x the same "
        "call on native tonic.",
        MARK_END,
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(ROOT, "bench", "GRPC.md"), "w") as f:
        f.write(text)
    splice_results(text, MARK_BEGIN, MARK_END)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
