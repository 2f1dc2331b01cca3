#!/usr/bin/env bash
# Profile tuneserve under the peer bench's load with py-spy (both workers): a flame graph, the
# collapsed stacks and CPU ms per request by category. Options: bench/peers/profile_server.py --help.
#   bash bench/profile.sh --seconds 20 --out bench/results/profile
# py-spy reads other processes' memory: it needs root (or CAP_SYS_PTRACE).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "no $PY: run 'make test' or 'make serve' once to create the venv" >&2; exit 1; }
[ -x "$ROOT/.venv/bin/py-spy" ] || "$PY" -m pip install -q py-spy
exec "$PY" "$ROOT/bench/peers/profile_server.py" "$@"
