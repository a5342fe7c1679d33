"""Generated protobuf and gRPC stubs of the specmesh.v1 wire contract (see specmesh.protogen)."""
