#!/usr/bin/env python3
"""Exercises the Dockerfile's commands without a Docker engine.

Builds the release binary the way the builder stage does, then runs the
runtime stage's ENTRYPOINT + CMD with its ENV, with the image's paths mapped
to local ones (binary, config file, cache folder), against the example
modules; runs the smoke test against it and stops it with SIGTERM, as the
kubelet would, expecting exit code 0.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_stage(path):
    """ENTRYPOINT, CMD, ENV and the builder's cargo command of the Dockerfile."""
    lines, buf = [], ""
    for raw in open(path):
        line = raw.rstrip("\n")
        if line.strip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append((buf + line).strip())
        buf = ""
    stage = {"env": {}, "entrypoint": None, "cmd": None, "run": []}
    for line in filter(None, lines):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage = {"env": {}, "entrypoint": None, "cmd": None, "run": stage["run"]}
        elif op == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                stage["env"][key] = value
        elif op in ("ENTRYPOINT", "CMD"):
            stage[op.lower()] = json.loads(rest)
        elif op == "RUN":
            stage["run"].append(rest)
    return stage


def main():
    stage = final_stage(os.path.join(ROOT, "Dockerfile"))
    cargo = next(r for r in stage["run"] if r.startswith("cargo build"))
    cargo = cargo.split("&&")[0].strip()
    print(f"image-check: builder stage: {cargo}", flush=True)
    subprocess.run(shlex.split(cargo), cwd=ROOT, check=True)
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "berth")

    tmp = tempfile.mkdtemp(prefix="berth-image-")
    wasm = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "wasm32-wasip2", "release")
    config = os.path.join(tmp, "berth.toml")
    with open(config, "w") as f:
        f.write(
            f'[server]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
            f'[runtime]\nmodules_dir = "{wasm}"\n[shutdown]\ndrain_delay = "0s"\ngrace_period = "5s"\n'
            '[modules.hello]\nfile = "hello.wasm"\nroute = "/hello"\n'
            '[modules.api]\nfile = "api.wasm"\nroute = "/api"\n'
        )
    mapping = {
        "/usr/local/bin/berth": binary,
        "/etc/berth/berth.toml": config,
        "/var/cache/berth": os.path.join(tmp, "cache"),
    }
    argv = [mapping.get(a, a) for a in stage["entrypoint"] + (stage["cmd"] or [])]
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    env.update({k: mapping.get(v, v) for k, v in stage["env"].items()})
    print(f"image-check: running {argv} with {stage['env']}", flush=True)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    addrs, deadline = {}, time.time() + 120
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("message") == "listening":
                addrs[event["listener"]] = event["addr"]
            if event.get("message") == "ready":
                break
            if time.time() > deadline:
                raise SystemExit("image-check: berth did not get ready")
        else:
            raise SystemExit(f"image-check: berth exited with {proc.wait()}")
        smoke = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "smoke_test.sh")],
            env=dict(os.environ, TARGET_URL=f"http://{addrs['traffic']}", ADMIN_URL=f"http://{addrs['admin']}"),
        )
        if smoke.returncode != 0:
            raise SystemExit("image-check: smoke test failed")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if code != 0:
            raise SystemExit(f"image-check: berth exited with {code} on SIGTERM")
        print("image-check: the image's command line serves the examples and stops cleanly on SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
