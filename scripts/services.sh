#!/usr/bin/env bash
# Development services for termopar, installed when missing and started when stopped:
#   PostgreSQL  (Debian package)         127.0.0.1:5432, its own cluster `termopar` with
#               trust for local TCP as `postgres` (another cluster on the port is used
#               only if it already lets us in, and never changed or stopped; if it does
#               not, ours takes the next free port: `env` tells which)
#   FerretDB    v1.24.2 (Go module proxy) 127.0.0.1:27017, SQLite backend, telemetry off
#   Mosquitto   (Debian package)          127.0.0.1:1884 (our own broker keeps 1883)
#   test tools  paho-mqtt (PyPI) in $DEV_DIR/venv, openssl, Chromium (Debian) and
#               playwright-core (npm) in $DEV_DIR/node
#
# Usage: scripts/services.sh [up|down|status|env|bench-tools]
#   env prints the services' URLs as shell assignments (DATABASE_URL, MONGODB_URI,
#   MOSQUITTO_URL); the Makefile evaluates them before cargo.
# Safe to run any number of times: every step checks first. `up` returns once each
# service answers, or fails naming the one that did not.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV_DIR=${TERMOPAR_DEV_DIR:-$HOME/.local/share/termopar-dev}
FERRETDB_VERSION=v1.24.2
FERRETDB_ADDR=${FERRETDB_ADDR:-127.0.0.1:27017}
# FerretDB's debug/metrics listener defaults to 127.0.0.1:8088, which other tools like;
# keep it beside the wire port instead.
FERRETDB_DEBUG_ADDR=${FERRETDB_DEBUG_ADDR:-127.0.0.1:27018}
MOSQUITTO_PORT=${MOSQUITTO_PORT:-1884}
WAIT_SECS=${WAIT_SECS:-60}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# True when something accepts TCP connections on host:port.
port_open() {
    local host=${1%:*} port=${1##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Waits until "$@" succeeds, or fails after WAIT_SECS naming $what.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + WAIT_SECS))
    until "$@"; do
        [ $SECONDS -lt $deadline ] || die "$what did not answer within ${WAIT_SECS}s"
        sleep 0.2
    done
}

APT_UPDATED=
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing ${missing[*]}"
    # policy-rc.d keeps the packages' own init scripts from starting system-wide
    # daemons (a system mosquitto would take port 1883 from our broker).
    local policy=/usr/sbin/policy-rc.d created_policy=
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee $policy >/dev/null
        as_root chmod +x $policy
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -n "$created_policy" ] && as_root rm -f $policy
    return 0
}

# ---------------------------------------------------------------- PostgreSQL
pg_version() { ls /usr/lib/postgresql | sort -V | tail -n 1; }

# The cluster this script creates and may change: `termopar`, or an older cluster this
# script configured before (its pg_hba.conf carries the `# termopar-dev` mark). Any other
# cluster is someone else's: used only if it already lets `postgres` in over local TCP,
# never reconfigured, started or stopped. When such a cluster holds the default port and
# cannot be used, ours goes on the next free port and `env` (which the Makefile reads)
# says where.
PG_CLUSTER=termopar
PG_DEFAULT_PORT=5432

pg_clusters() { pg_lsclusters -h 2>/dev/null; }
# "version name" of the cluster configured for port $1, if any.
pg_cluster_on_port() { pg_clusters | awk -v p="$1" '$3 == p { print $1 " " $2; exit }'; }
pg_cluster_port() { pg_clusters | awk -v v="$1" -v c="$2" '$1 == v && $2 == c { print $3; exit }'; }
pg_online() { pg_clusters | awk -v v="$1" -v c="$2" '$1 == v && $2 == c' | grep -q online; }
pg_marked() { grep -qs '# termopar-dev' "/etc/postgresql/$1/$2/pg_hba.conf"; }
pg_login_ok() { psql -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -c 'select 1' -o /dev/null 2>/dev/null; }

# The cluster (and so the port) this script uses: prints "version name port mine|theirs".
pg_choose() {
    local port=${PG_PORT:-$PG_DEFAULT_PORT} on ver
    on=$(pg_clusters | awk -v c="$PG_CLUSTER" '$2 == c { print $1 " " $2; exit }')
    if [ -n "$on" ] && [ -z "${PG_PORT:-}" ]; then
        echo "$on $(pg_cluster_port $on) mine"; return
    fi
    on=$(pg_cluster_on_port "$port")
    if [ -n "$on" ]; then
        if [ "${on#* }" = "$PG_CLUSTER" ] || pg_marked $on; then echo "$on $port mine"; return; fi
        if pg_online $on && pg_login_ok "$port"; then echo "$on $port theirs"; return; fi
        [ -z "${PG_PORT:-}" ] || die "PostgreSQL cluster $on (not created by this script) holds PG_PORT=$PG_PORT and does not let postgres in over local TCP; it is left alone. Pick another PG_PORT."
        log "PostgreSQL cluster $on holds port $port and cannot be used as it is (not ours: left alone); termopar gets a cluster of its own on another port"
        while [ -n "$(pg_cluster_on_port "$port")" ] || port_open "127.0.0.1:$port"; do port=$((port + 1)); done
    fi
    ver=$(pg_version)
    echo "$ver $PG_CLUSTER $port mine"
}

pg_up() {
    local fresh=
    command -v pg_lsclusters >/dev/null 2>&1 || fresh=1
    apt_install postgresql postgresql-client
    local ver cluster port owner hba on
    ver=$(pg_version)
    # Installing the package just now made Debian's default cluster on 5432: nobody's
    # data, made by this script's install. Make way for ours.
    on=$(pg_cluster_on_port $PG_DEFAULT_PORT)
    if [ -n "$fresh" ] && [ "$on" = "$ver main" ]; then
        log "dropping the empty default cluster $on the package install just created"
        as_root pg_dropcluster --stop "$ver" main
    fi
    local choice
    choice=$(pg_choose) || exit 1
    read -r ver cluster port owner <<<"$choice"
    if [ "$owner" = theirs ]; then
        log "using PostgreSQL cluster $ver $cluster on port $port as it is (not ours: left untouched)"
        return 0
    fi
    if [ -z "$(pg_cluster_port "$ver" "$cluster")" ]; then
        log "creating PostgreSQL $ver cluster '$cluster' on port $port"
        as_root pg_createcluster "$ver" "$cluster" --port "$port" >/dev/null
    fi
    hba=/etc/postgresql/$ver/$cluster/pg_hba.conf
    # Local TCP as `postgres` without a password, so DATABASE_URL's default
    # (postgres://postgres@127.0.0.1:5432/termopar) works. Development machines only.
    if ! pg_marked "$ver" "$cluster"; then
        log "allowing local TCP for postgres in $hba"
        local tmp
        tmp=$(mktemp)
        {
            echo "host all postgres 127.0.0.1/32 trust # termopar-dev"
            echo "host all postgres ::1/128 trust # termopar-dev"
            cat "$hba"
        } >"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
        if pg_online "$ver" "$cluster"; then
            as_root pg_ctlcluster "$ver" "$cluster" reload
        fi
    fi
    # Tests create and drop many small databases; a larger pool of connections and no
    # synchronous commit for them is set per connection by the test harness instead of
    # weakening durability here.
    if ! pg_online "$ver" "$cluster"; then
        log "starting PostgreSQL $ver/$cluster"
        as_root pg_ctlcluster "$ver" "$cluster" start
    fi
    wait_for "PostgreSQL" pg_isready -q -h 127.0.0.1 -p "$port"
    wait_for "PostgreSQL login" pg_login_ok "$port"
    log "PostgreSQL ready on 127.0.0.1:$port"
}

# The port of the PostgreSQL this script uses (the default before anything exists).
pg_port() {
    local ver cluster port owner
    command -v pg_lsclusters >/dev/null 2>&1 || { echo "${PG_PORT:-$PG_DEFAULT_PORT}"; return; }
    local choice
    choice=$(pg_choose 2>/dev/null) || choice="- - ${PG_PORT:-$PG_DEFAULT_PORT} -"
    read -r ver cluster port owner <<<"$choice"
    echo "$port"
}

# Stops only a cluster this script created.
pg_down() {
    local choice ver cluster port owner
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    choice=$(pg_choose 2>/dev/null) || return 0
    read -r ver cluster port owner <<<"$choice"
    [ "$owner" = mine ] && as_root pg_ctlcluster "$ver" "$cluster" stop 2>/dev/null || true
}

# ---------------------------------------------------------------- FerretDB
# The binary's name says which fix it carries (see ferretdb_install), so a binary built
# before the fix is rebuilt rather than reused.
FERRETDB_BIN=$DEV_DIR/bin/ferretdb-$FERRETDB_VERSION-idindex

ferretdb_install() {
    if [ -x "$FERRETDB_BIN" ] && "$FERRETDB_BIN" --version 2>/dev/null | grep -q "version: $FERRETDB_VERSION"; then
        return 0
    fi
    command -v go >/dev/null || die "Go is needed to build FerretDB (install golang)"
    log "building FerretDB $FERRETDB_VERSION (one time)"
    # `go install …/cmd/ferretdb@v1.24.2` cannot be used: the module proxy here answers
    # 403 for the cmd/ferretdb path it probes first, and a plain build of the module
    # panics at start-up without build/version/version.txt (normally generated by
    # FerretDB's release tooling). So: download the exact module, copy it, write the
    # version file and build it as its own main module.
    local dir src
    dir=$(cd "$ROOT/tools/ferretdb" && GOFLAGS=-mod=mod go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -d "$dir" ] || die "could not download github.com/FerretDB/FerretDB@$FERRETDB_VERSION"
    src=$(mktemp -d)
    cp -r "$dir/." "$src/"
    chmod -R u+w "$src"
    echo "$FERRETDB_VERSION" >"$src/build/version/version.txt"
    # One-line fix of FerretDB 1.24.2's SQLite backend: it pushes `{_id: X}` down as
    # `_ferretdb_sjson->'$._id' = ?`, but creates the `_id_` index on
    # `_ferretdb_sjson->"_id"`; SQLite matches index expressions by their text, so every
    # lookup, update and delete by `_id` scanned the whole table (EXPLAIN QUERY PLAN:
    # `SCAN`; ~2 us per KB of the collection). With the pushdown written like the index
    # (`->'_id'`, the same value) they are index searches. Upstream 1.x is no longer
    # developed (2.x replaced this backend); the same bug on its PostgreSQL backend is
    # FerretDB issue #4646. termopar's raw stores are read only by `_id` for this reason.
    local meta=$src/internal/backends/sqlite/metadata/metadata.go
    grep -q "IDColumn = DefaultColumn + \"->'\$._id'\"" "$meta" || die "FerretDB source changed: cannot apply the _id index fix"
    sed -i "s|IDColumn = DefaultColumn + \"->'\$._id'\"|IDColumn = DefaultColumn + \"->'_id'\"|" "$meta"
    mkdir -p "$DEV_DIR/bin"
    (cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -o "$FERRETDB_BIN.tmp" ./cmd/ferretdb)
    mv "$FERRETDB_BIN.tmp" "$FERRETDB_BIN"
    rm -rf "$src"
}

ferretdb_up() {
    local data=$DEV_DIR/ferretdb
    ferretdb_install
    # A FerretDB of ours built before the _id index fix is replaced by the fixed one.
    local pid
    pid=$(cat "$data/ferretdb.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -e "/proc/$pid/exe" ] && [ "$(readlink "/proc/$pid/exe")" != "$FERRETDB_BIN" ]; then
        log "restarting FerretDB with $FERRETDB_BIN"
        kill "$pid" 2>/dev/null || true
        # Until the process is gone, not only its port: it holds SQLite's lock until it
        # exits, and a FerretDB started before that fails with SQLITE_BUSY (seen in CI).
        wait_for "the old FerretDB to stop" bash -c "! [ -e /proc/$pid ]"
    fi
    if port_open "$FERRETDB_ADDR"; then
        log "FerretDB already answering on $FERRETDB_ADDR"
        return 0
    fi
    mkdir -p "$data/sqlite" "$data/state"
    log "starting FerretDB on $FERRETDB_ADDR"
    # FerretDB is a Go program that allocates per document; with Go's default GOGC=100
    # its garbage collector took ~15% of its CPU under the webhook's load. GOGC=400 cut
    # its CPU per raw record by about a fifth (59 -> 48 us) for ~150 MB more resident
    # memory (270 -> 414 MB after make bench-webhook).
    # FerretDB commits one SQLite transaction per 100 documents of an insert, each with
    # an fsync of SQLite's WAL. A batch of 1000 and synchronous=normal (in WAL mode: safe
    # from a crash of FerretDB, like MongoDB's default write concern, whose journal is
    # flushed every 100 ms) cut its CPU per raw webhook record from 52 to 44 us.
    GOGC=${FERRETDB_GOGC:-400} setsid nohup "$FERRETDB_BIN" \
        --handler=sqlite --sqlite-url="file:$data/sqlite/?_pragma=synchronous(${FERRETDB_SQLITE_SYNC:-normal})" \
        --test-batch-size="${FERRETDB_BATCH_SIZE:-1000}" \
        --state-dir="$data/state" \
        --listen-addr="$FERRETDB_ADDR" --debug-addr="$FERRETDB_DEBUG_ADDR" \
        --telemetry=disable --log-level=warn \
        >"$data/ferretdb.log" 2>&1 </dev/null &
    echo $! >"$data/ferretdb.pid"
    wait_for "FerretDB (log: $data/ferretdb.log)" port_open "$FERRETDB_ADDR"
    log "FerretDB ready on $FERRETDB_ADDR"
}

ferretdb_down() {
    local pidfile=$DEV_DIR/ferretdb/ferretdb.pid
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
}

# ---------------------------------------------------------------- test tools
# Third-party MQTT clients the tests drive besides mosquitto_pub/sub: paho-mqtt 2
# (Python, from PyPI) in a virtualenv of our own; openssl makes test certificates.
# Schemathesis (PyPI) fuzzes the API in `make test-fuzz`, in a virtualenv of its own
# (pymongo drops the run's database afterwards).
PAHO_VERSION=2.1.0
SCHEMATHESIS_VERSION=4.32.5
PYMONGO_VERSION=4.20.1

# A virtualenv under $DEV_DIR holding exact versions (checked first, installed if
# missing or another version): py_tools <dir> <module>==<version>...
py_tools() {
    local venv=$DEV_DIR/$1 frozen want missing=0
    shift
    frozen=$("$venv/bin/pip" freeze 2>/dev/null | tr '[:upper:]_' '[:lower:]-') || frozen=
    for want in "$@"; do
        grep -qxF "$(printf '%s' "$want" | tr '[:upper:]_' '[:lower:]-')" <<<"$frozen" || missing=1
    done
    [ "$missing" = 0 ] && return 0
    log "installing $* into $venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$@"
}

test_tools_up() {
    apt_install python3-venv openssl chromium prometheus strace
    py_tools venv "paho-mqtt==$PAHO_VERSION"
    py_tools schemathesis "schemathesis==$SCHEMATHESIS_VERSION" "pymongo==$PYMONGO_VERSION"
    browser_tools_up
}

# An npm package at an exact version in its own directory under $DEV_DIR (checked first,
# installed if missing or another version): npm_tool <dir> <package> <version>.
npm_tool() {
    local dir=$DEV_DIR/$1 package=$2 version=$3
    if [ "$(node -p "require('$dir/node_modules/$package/package.json').version" 2>/dev/null)" = "$version" ]; then
        return 0
    fi
    command -v npm >/dev/null || apt_install nodejs npm
    log "installing $package $version into $dir"
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "$package@$version" >/dev/null
}

# playwright-core drives Debian's Chromium in the browser tests; the version whose
# Chromium matches Debian's (it never downloads a browser of its own).
browser_tools_up() { npm_tool node playwright-core 1.64.1; }

# Lighthouse scores the console's pages in `make bench` (driving the same Chromium); 12.x
# is the last line that runs on Debian's Node 20 (13 wants Node 22).
lighthouse_up() { npm_tool lighthouse lighthouse 12.8.2; }

# ---------------------------------------------------------------- Mosquitto
mosquitto_up() {
    apt_install mosquitto mosquitto-clients
    if port_open "127.0.0.1:$MOSQUITTO_PORT"; then
        log "Mosquitto already answering on 127.0.0.1:$MOSQUITTO_PORT"
        return 0
    fi
    local dir=$DEV_DIR/mosquitto
    mkdir -p "$dir"
    # Persistent sessions must queue everything a killed consumer has not acknowledged,
    # so the queue limits are far above what a test or a benchmark sends.
    cat >"$dir/mosquitto.conf" <<CONF
listener $MOSQUITTO_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $dir/
max_queued_messages 2000000
max_inflight_messages 1000
max_packet_size 2000000
set_tcp_nodelay true
log_dest file $dir/mosquitto.log
log_type error
log_type warning
pid_file $dir/mosquitto.pid
CONF
    log "starting Mosquitto on 127.0.0.1:$MOSQUITTO_PORT"
    # Runs as the invoking user; as root mosquitto would drop to the `mosquitto` user,
    # which cannot write into our directory.
    if [ "$(id -u)" = 0 ]; then
        echo "user root" >>"$dir/mosquitto.conf"
    fi
    mosquitto -d -c "$dir/mosquitto.conf"
    wait_for "Mosquitto (log: $dir/mosquitto.log)" port_open "127.0.0.1:$MOSQUITTO_PORT"
    log "Mosquitto ready on 127.0.0.1:$MOSQUITTO_PORT"
}

mosquitto_down() {
    local pidfile=$DEV_DIR/mosquitto/mosquitto.pid
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
}

status() {
    local s
    for s in "PostgreSQL 127.0.0.1:$(pg_port)" "FerretDB $FERRETDB_ADDR" "Mosquitto 127.0.0.1:$MOSQUITTO_PORT"; do
        if port_open "${s#* }"; then echo "up    $s"; else echo "down  $s"; fi
    done
}

case "${1:-up}" in
    up)
        mkdir -p "$DEV_DIR"
        pg_up
        ferretdb_up
        mosquitto_up
        test_tools_up
        ;;
    down)
        mosquitto_down
        ferretdb_down
        pg_down
        ;;
    status) status ;;
    bench-tools)
        # wrk: the HTTP load generator of `make bench`; Lighthouse for the console's.
        apt_install wrk
        browser_tools_up
        lighthouse_up
        ;;
    env)
        # Shell assignments (the Makefile evaluates them); a variable already set wins.
        printf 'DATABASE_URL=%q\n' "${DATABASE_URL:-postgres://postgres@127.0.0.1:$(pg_port)/termopar}"
        printf 'MONGODB_URI=%q\n' "${MONGODB_URI:-mongodb://$FERRETDB_ADDR}"
        printf 'MOSQUITTO_URL=%q\n' "${MOSQUITTO_URL:-mqtt://127.0.0.1:$MOSQUITTO_PORT}"
        # The fault tests start FerretDB processes of their own, to restart them.
        printf 'FERRETDB_BIN=%q\n' "$FERRETDB_BIN"
        ;;
    *) die "usage: $0 [up|down|status|env|bench-tools]" ;;
esac
