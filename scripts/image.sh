#!/usr/bin/env bash
# Builds the host image from the Dockerfile with the container engine this
# machine has (docker, podman or buildah, in that order; ENGINE= picks one),
# tagged IMAGE (default berth:dev), and with PUSH=1 pushes it and prints the
# digest to pin (image.digest in the chart's values).
set -euo pipefail
cd "$(dirname "$0")/.."
image="${IMAGE:-berth:dev}"
engine="${ENGINE:-}"
if [ -z "$engine" ]; then
  for candidate in docker podman buildah; do
    if command -v "$candidate" >/dev/null 2>&1; then engine="$candidate"; break; fi
  done
fi
if [ -z "$engine" ]; then
  echo "image: no container engine found (docker, podman or buildah); install one, or set ENGINE=" >&2
  echo "image: (\`make image-check\` builds and runs the image without an engine, as CI does)" >&2
  exit 2
fi
if ! command -v "$engine" >/dev/null 2>&1; then
  echo "image: ENGINE=$engine is not on PATH" >&2
  exit 2
fi
case "$engine" in
  buildah) build=(buildah bud) ;;
  *) build=("$engine" build) ;;
esac
echo "image: building $image with $engine"
"${build[@]}" -f Dockerfile -t "$image" .
if [ "${PUSH:-0}" = 1 ]; then
  digest_file="$(mktemp)"
  trap 'rm -f "$digest_file"' EXIT
  case "$engine" in
    docker)
      docker push "$image"
      docker image inspect --format '{{index .RepoDigests 0}}' "$image" | sed 's/.*@//' > "$digest_file" ;;
    *)
      "$engine" push --digestfile "$digest_file" "$image" ;;
  esac
  echo "image: pushed $image; pin it with --set image.repository=${image%:*} --set image.digest=$(cat "$digest_file")"
fi
