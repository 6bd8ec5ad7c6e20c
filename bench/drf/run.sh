#!/usr/bin/env bash
# Starts the DRF baseline on 127.0.0.1:$1 against the PostgreSQL database $DRF_DATABASE_URL
# (a virtualenv is created once under the development data dir) with $DRF_WORKERS sync
# workers, one per core by default. Prints the gunicorn pid and its number of workers.
set -euo pipefail
port=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${TERMOPAR_DEV_DIR:-$HOME/.local/share/termopar-dev}/drf-venv
if [ ! -x "$venv/bin/gunicorn" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q -r "$here/requirements.txt" >&2
fi
cd "$here"
"$venv/bin/python" manage.py migrate -v 0 >&2
workers=${DRF_WORKERS:-$(nproc)}
setsid "$venv/bin/gunicorn" baseline.wsgi -w "$workers" -b "127.0.0.1:$port" --log-level warning \
    >/dev/null 2>&1 </dev/null &
echo "$! $workers"
