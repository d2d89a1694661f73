"""Generated gRPC and protobuf code for the reconciler API.

Do not edit: change api/proto and run `make gen`. See docs/api.md.
"""
