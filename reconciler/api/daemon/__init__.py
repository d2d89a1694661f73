"""Generated from api/proto/reconciler/api/daemon (do not edit; run `make gen`)."""
