#!/usr/bin/env python3
"""Builds the image from the Dockerfile without a Docker engine, and runs
it as the chart's pod.

The build goes through scripts/container.py: the context is what
`.dockerignore` lets through, each stage gets only what its `COPY` lines
take, and the builder's `RUN` runs there (with the shared cargo target
folder as its cache mount). The runtime stage's ENTRYPOINT and CMD then
run as the chart's pod through scripts/kubelet.py: uid 65532, read-only
root, only the chart's writable mounts, probes, smoke test, preStop and
SIGTERM, exit code 0 within the grace period.
"""
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import container  # noqa: E402
import kubelet  # noqa: E402

HELM = os.path.join(ROOT, ".tools", "bin", "helm")


def main():
    work = tempfile.mkdtemp(prefix="berth-image-")
    os.chmod(work, 0o755)
    try:
        image = container.build(ROOT, work, log=lambda m: print(f"image-check: {m}", flush=True))
    except container.BuildError as e:
        raise SystemExit(f"image-check: the image does not build: {e}")
    print(f"image-check: built; entrypoint {image.entrypoint} {image.cmd}, user {image.user}", flush=True)
    rendered = subprocess.run(
        [HELM, "template", "berth", os.path.join(ROOT, "charts", "berth")],
        capture_output=True, text=True, check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    pod = kubelet.Pod(docs, image, os.path.join(work, "pod"), log=lambda m: print(f"image-check: {m}", flush=True))
    try:
        pod.start()
        pod.wait_started()
        pod.wait_ready(120)
        smoke = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "smoke_test.sh")],
            env=dict(os.environ, TARGET_URL=f"http://{pod.pod_ip}:8080", ADMIN_URL=f"http://{pod.pod_ip}:9090"),
        )
        if smoke.returncode != 0:
            raise SystemExit("image-check: smoke test failed:\n" + "\n".join(pod.lines[-30:]))
        code, took, _ = pod.delete()
        if code != 0:
            raise SystemExit(f"image-check: berth exited with {code} after {took:.1f}s on SIGTERM")
        print(f"image-check: the image serves as the chart's pod and stops cleanly in {took:.1f}s")
    except kubelet.PodFailed as e:
        raise SystemExit(f"image-check: {e}")
    finally:
        pod.cleanup()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    sys.exit(main())
