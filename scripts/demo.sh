#!/usr/bin/env bash
# The main job: install, build a datastore of Wikipedia lead articles (once), answer questions.
# Extra arguments go to `datastore demo` (e.g. --docs all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/datastore demo "$@"
