#!/usr/bin/env bash
# Entrypoint of the datastore image: one image, one role per container.
#
#   serve [ARGS...]   a shard server over $DATASTORE_DIR. Its shards are $SHARDS (e.g. 0,3) or,
#                     when unset, the pod ordinal: the StatefulSet pod NAME-i serves shard i.
#   router ARGS...    the router; ARGS name the shard servers: --shard ADDR[,ADDR...] per shard.
#   build ARGS...     `datastore build ARGS...` (add --ray to run it on a Ray cluster).
#   fetch             seed $DATASTORE_DIR with this pod's shards copied from $DATASTORE_SOURCE,
#                     a finished build on shared storage (the shard pods' init container).
#   anything else     run as a command: `datastore info /var/lib/datastore`, `bash`, ...
#
# Settings (environment): DATASTORE_DIR (/var/lib/datastore), GRPC_HOST (0.0.0.0),
# GRPC_PORT (50051), METRICS_PORT (9090; empty for no metrics endpoint), SHARDS, DATASTORE_SOURCE.
set -euo pipefail

DATASTORE_DIR=${DATASTORE_DIR:-/var/lib/datastore}
GRPC_HOST=${GRPC_HOST:-0.0.0.0}
GRPC_PORT=${GRPC_PORT:-50051}
METRICS_PORT=${METRICS_PORT-9090}

die() { echo "entrypoint: $*" >&2; exit 2; }

# The shards this pod serves: $SHARDS, or the ordinal that ends a StatefulSet pod's hostname.
shard_ids() {
  if [[ -n ${SHARDS:-} ]]; then
    [[ $SHARDS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "SHARDS=$SHARDS is not a list like 0,3"
    echo "$SHARDS"
    return
  fi
  local host=${HOSTNAME:-$(hostname)}
  [[ $host =~ -([0-9]+)$ ]] ||
    die "cannot tell the shard from hostname '$host' (a StatefulSet pod is NAME-ORDINAL);" \
      "set SHARDS, e.g. SHARDS=0,3"
  echo "$((10#${BASH_REMATCH[1]}))"
}

metrics=()
[[ -n $METRICS_PORT ]] && metrics=(--metrics-port "$METRICS_PORT")

role=${1:-}
case $role in
  serve)
    shift
    shards=$(shard_ids)
    exec datastore serve "$DATASTORE_DIR" --shards "$shards" \
      --host "$GRPC_HOST" --port "$GRPC_PORT" "${metrics[@]}" "$@"
    ;;
  router)
    shift
    exec datastore serve --router --host "$GRPC_HOST" --port "$GRPC_PORT" "${metrics[@]}" "$@"
    ;;
  build)
    shift
    exec datastore build "$@"
    ;;
  fetch)
    shift
    shards=$(shard_ids)
    [[ -n ${DATASTORE_SOURCE:-} ]] || die "fetch needs DATASTORE_SOURCE, the directory of a finished build"
    # Seeds once: a volume that already holds a datastore is kept (it may hold updates made
    # through the API since). To serve a new build, start a new copy or delete the volume.
    # The manifest is copied last, so an interrupted copy is redone on the next start.
    exec python3 - "$DATASTORE_SOURCE" "$DATASTORE_DIR" "$shards" <<'PY'
import json
import shutil
import sys
from pathlib import Path

src, dst, ids = Path(sys.argv[1]), Path(sys.argv[2]), [int(i) for i in sys.argv[3].split(",")]
if (dst / "manifest.json").exists():
    print(f"fetch: {dst} already holds a datastore; keeping it", file=sys.stderr)
    sys.exit(0)
try:
    manifest = json.loads((src / "manifest.json").read_text())
except FileNotFoundError:
    sys.exit(f"fetch: no datastore in {src} yet: run the build (deploy/ray/rayjob.yaml) first")
if not manifest.get("complete"):
    sys.exit(f"fetch: the build in {src} has not finished; this pod retries until it has")
paths = {s["id"]: s["path"] for s in manifest["shards"]}
missing = [i for i in ids if i not in paths]
if missing:
    sys.exit(f"fetch: {src} has shards 0..{len(paths) - 1}, not {missing}: "
             "a StatefulSet's replicas must equal the datastore's number of shards")
dst.mkdir(parents=True, exist_ok=True)
for i in ids:
    tmp = dst / (paths[i] + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / paths[i], tmp, ignore=shutil.ignore_patterns("lock.mdb"))  # LMDB remakes it
    shutil.rmtree(dst / paths[i], ignore_errors=True)
    tmp.rename(dst / paths[i])
shutil.copyfile(src / "manifest.json", dst / "manifest.json.incoming")
(dst / "manifest.json.incoming").rename(dst / "manifest.json")
print(f"fetch: copied shards {ids} of {src} into {dst}", file=sys.stderr)
PY
    ;;
  "")
    exec datastore --help
    ;;
  *)
    exec "$@"
    ;;
esac
