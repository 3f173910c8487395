#!/usr/bin/env bash
# The whole test suite (what CI runs): install, then pytest on real LMDB, gRPC and the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
