"""Generated gRPC stubs of the textgen.v1 API; regenerate with scripts/gen_proto.sh."""
