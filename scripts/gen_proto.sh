#!/usr/bin/env bash
# Regenerates service/pb from proto/ (the generated code is committed so that
# installs need no protoc). Run after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python -m grpc_tools.protoc -I proto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  proto/datastore/v1/datastore.proto
mkdir -p service/pb
cp "$tmp"/datastore/v1/datastore_pb2.py "$tmp"/datastore/v1/datastore_pb2.pyi "$tmp"/datastore/v1/datastore_pb2_grpc.py service/pb/
sed -i 's/^from datastore\.v1 import datastore_pb2/from service.pb import datastore_pb2/' service/pb/datastore_pb2_grpc.py
rm -rf "$tmp"
echo "generated service/pb"
