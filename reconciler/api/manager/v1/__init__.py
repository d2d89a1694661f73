"""Generated from api/proto/reconciler/api/manager/v1 (do not edit; run `make gen`)."""
