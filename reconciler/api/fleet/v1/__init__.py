"""Generated from api/proto/reconciler/api/fleet/v1 (do not edit; run `make gen`)."""
