"""Generated from api/proto/reconciler/api/daemon/v1 (do not edit; run `make gen`)."""
