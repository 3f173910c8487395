#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools; fast when already done.
# torch is installed first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
echo "installing into .venv (first run only; log: .venv/setup.log)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q torch==2.13.0 &&
       .venv/bin/python -m pip install -q -e '.[dev]'; } > .venv/setup.log 2>&1; then
  cat .venv/setup.log >&2
  echo "setup failed (log above)" >&2
  exit 1
fi
# shellcheck lints deploy/entrypoint.sh in the tests (optional: they skip without it)
command -v shellcheck >/dev/null || { apt-get update -q && apt-get install -y -q shellcheck; } >> .venv/setup.log 2>&1 || true
rm -f .venv/.installed-*
touch "$stamp"
