"""Generated from api/proto/reconciler/api/agent (do not edit; run `make gen`)."""
