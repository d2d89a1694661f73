"""Generated from api/proto/reconciler/api/agent/v1 (do not edit; run `make gen`)."""
