"""Generated from api/proto/reconciler/api/fleet (do not edit; run `make gen`)."""
