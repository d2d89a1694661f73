"""Generated from api/proto/reconciler/api/manager (do not edit; run `make gen`)."""
