#!/usr/bin/env bash
# `make test-fuzz`: Schemathesis against /openapi.json of a running edge node (API, broker
# and consumer on free ports, over a fresh PostgreSQL database and MongoDB database),
# every operation, as an admin and then as a viewer, with a fixed seed: coverage, fuzzing
# and stateful phases (the spec links each creation to what it created), checking for
# server errors and response-schema conformance. Fails on any failure Schemathesis
# reports, on any 5xx the API itself counted (its /metrics), or when fewer than
# FUZZ_MIN_REQUESTS requests were served.
#
# Settings: FUZZ_SEED (42), FUZZ_MAX_EXAMPLES per operation (60), FUZZ_MIN_REQUESTS
# (10000), FUZZ_WORKERS (2). Needs DATABASE_URL and MONGODB_URI (make passes
# scripts/services.sh env) and the tools of scripts/services.sh up.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV_DIR=${TERMOPAR_DEV_DIR:-$HOME/.local/share/termopar-dev}
VENV=$DEV_DIR/schemathesis
SEED=${FUZZ_SEED:-42}
EXAMPLES=${FUZZ_MAX_EXAMPLES:-60}
MIN_REQUESTS=${FUZZ_MIN_REQUESTS:-10000}
WORKERS=${FUZZ_WORKERS:-2}
: "${DATABASE_URL:?DATABASE_URL is needed (make test-fuzz sets it)}"
: "${MONGODB_URI:?MONGODB_URI is needed (make test-fuzz sets it)}"

log() { printf '[fuzz] %s\n' "$*" >&2; }
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

NAME=termopar_fuzz_$$
API_PORT=$(free_port)
MQTT_PORT=$(free_port)
BASE=http://127.0.0.1:$API_PORT
WORK=$(mktemp -d)
PID=

cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    "$VENV/bin/python" - "$MONGODB_URI" "$NAME" <<'EOF' || true
import sys, pymongo
pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000).drop_database(sys.argv[2])
EOF
    psql "${DATABASE_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

cd "$ROOT"
cargo build -q -p termopar
log "edge node on $BASE (database $NAME)"
# No job workers: the fuzzer writes alarm rules whose webhook URLs name any host, and
# nothing here may reach beyond loopback (the jobs are tested by the API tests).
API_ADDR=127.0.0.1:$API_PORT MQTT_ADDR=127.0.0.1:$MQTT_PORT JOBS_WORKERS=false \
    DATABASE_URL=${DATABASE_URL%/*}/$NAME MONGODB_DB=$NAME \
    ADMIN_EMAIL=admin@fuzz.test ADMIN_PASSWORD=fuzz-admin-password \
    JWT_SECRET=fuzz-secret-of-at-least-32-bytes-long RUST_LOG=warn \
    ./target/debug/termopar >"$WORK/termopar.log" 2>&1 &
PID=$!
for _ in $(seq 1 240); do
    curl -fs -o /dev/null "$BASE/health" && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/termopar.log" >&2; exit 1; }
    sleep 0.25
done

# Tokens of an admin and of a viewer of a client with a sensor.
call() { curl -fsS -H 'content-type: application/json' "$@"; }
json() { "$VENV/bin/python" -c "import json, sys; print(json.load(sys.stdin)$1)"; }
login() { call "$BASE/api/v1/auth/login" -d "{\"email\":\"$1\",\"password\":\"$2\"}" | json '["access_token"]'; }
ADMIN=$(login admin@fuzz.test fuzz-admin-password)
CLIENT=$(call "$BASE/api/v1/clients" -H "authorization: Bearer $ADMIN" -d '{"name":"Fuzzed","timezone":"America/Sao_Paulo"}' | json '["id"]')
call "$BASE/api/v1/sensors" -H "authorization: Bearer $ADMIN" -d "{\"name\":\"s\",\"client_id\":\"$CLIENT\"}" >/dev/null
call "$BASE/api/v1/users" -H "authorization: Bearer $ADMIN" \
    -d "{\"email\":\"viewer@fuzz.test\",\"password\":\"fuzz-viewer-password\",\"role\":\"viewer\",\"client_id\":\"$CLIENT\"}" >/dev/null
VIEWER=$(login viewer@fuzz.test fuzz-viewer-password)

# Operations that end the caller's own tokens (log out, password, refresh) or change or
# delete users (the fuzzer would find its own id) would cut the run short, and the alarm
# feed never ends (a stream of server-sent events); the API tests cover them.
run() {
    local who=$1 token=$2
    log "schemathesis as $who: seed $SEED, up to $EXAMPLES examples per operation"
    "$VENV/bin/st" run "$BASE/openapi.json" --url "$BASE/api/v1" \
        -H "Authorization: Bearer $token" \
        --checks not_a_server_error,response_schema_conformance \
        --phases coverage,fuzzing,stateful \
        --seed "$SEED" --max-examples "$EXAMPLES" --workers "$WORKERS" \
        --generation-database none \
        --exclude-operation-id logout --exclude-operation-id changePassword \
        --exclude-operation-id refreshToken --exclude-operation-id updateUser \
        --exclude-operation-id deleteUser --exclude-operation-id alarmFeed \
        --no-color >"$WORK/$who.log" 2>&1 || { cat "$WORK/$who.log"; log "schemathesis found failures as $who"; return 1; }
    grep -E "generated|Stateful|API Links" "$WORK/$who.log" | sed "s/^/[fuzz] $who: /" >&2
}
status=0
run admin "$ADMIN" || status=1
run viewer "$VIEWER" || status=1

# What the API itself served and answered, from its Prometheus counters.
curl -fsS "$BASE/metrics" >"$WORK/metrics"
read -r REQUESTS ERRORS < <(awk '
    /^http_requests_total\{/ { total += $NF; if ($0 ~ /status="5[0-9][0-9]"/) errors += $NF }
    END { printf "%d %d\n", total, errors }' "$WORK/metrics")
log "requests served: $REQUESTS, answered 5xx: $ERRORS (min $MIN_REQUESTS requests)"
if [ "$ERRORS" -ne 0 ]; then
    grep -E '^http_requests_total\{.*status="5' "$WORK/metrics" >&2
    grep -E 'ERROR' "$WORK/termopar.log" | tail -20 >&2
    status=1
fi
if [ "$REQUESTS" -lt "$MIN_REQUESTS" ]; then
    log "fewer requests than $MIN_REQUESTS: raise FUZZ_MAX_EXAMPLES"
    status=1
fi
exit $status
