#!/usr/bin/env bash
# Smoke test of a running Berth deployment:
#   make smoke_test TARGET_URL=http://host:port ADMIN_URL=http://host:adminport [SMOKE_PATH=/hello]
# Checks the probes, /info, and one request to a module; says what failed.
set -uo pipefail
target="${TARGET_URL:?set TARGET_URL, e.g. http://localhost:8080}"
admin="${ADMIN_URL:?set ADMIN_URL, e.g. http://localhost:9090}"
path="${SMOKE_PATH:-/hello}"
failures=0

check() {
  local what="$1" url="$2" want="$3" status body
  body="$(curl -sS --max-time 10 -o /dev/stdout -w '\n%{http_code}' "$url" 2>&1)"
  status="${body##*$'\n'}"
  body="${body%$'\n'*}"
  if [ "$status" = "$want" ]; then
    echo "ok   $what ($url: $status)"
  else
    echo "FAIL $what: $url answered ${status:-nothing} (want $want): ${body:0:200}"
    failures=$((failures + 1))
  fi
  LAST_BODY="$body"
}

check "liveness" "$admin/healthz" 200
check "readiness" "$admin/ready" 200
check "info" "$admin/info" 200
if [ "$failures" -eq 0 ]; then
  if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get("modules") else 1)' "$LAST_BODY" 2>/dev/null; then
    echo "ok   info lists $(python3 -c 'import json,sys; print(", ".join(m["name"] for m in json.loads(sys.argv[1])["modules"]))' "$LAST_BODY")"
  else
    echo "FAIL info: no modules in $LAST_BODY"
    failures=$((failures + 1))
  fi
fi
check "module request" "$target$path" 200

if [ "$failures" -gt 0 ]; then
  echo "smoke test FAILED: $failures check(s) against $target / $admin"
  exit 1
fi
echo "smoke test passed against $target / $admin"
