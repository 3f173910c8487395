"""Generated protobuf and gRPC code for proto/datastore/v1 (do not edit; see scripts/gen_proto.sh)."""
