"""gRPC service over the datastore: server, error mapping, conversions and the Python client."""
