#!/usr/bin/env python3
"""Ask a reconciler server's gRPC health service whether it is SERVING.

What: one `grpc.health.v1.Health/Check` call to the Manager or a daemon, exit 0 when
the answer is SERVING and 1 otherwise (unreachable, timed out, NOT_SERVING). It is the
container image's HEALTHCHECK and the Helm chart's liveness and readiness probe.
What not: no retries and no output beyond one line; the caller (Docker, the kubelet)
owns the schedule. Why a script and not the kubelet's built-in gRPC probe: the built-in
probe cannot present a client certificate (mTLS mode) and cannot reach a server that
listens on loopback only (insecure development mode); an exec probe does both.
Where next: deploy/Dockerfile installs it as /usr/local/bin/reconciler-healthcheck;
charts/reconciler/templates/_helpers.tpl calls it.

Usage: reconciler-healthcheck [HOST:PORT] [--tls-dir DIR] [--server-name NAME]
HOST:PORT defaults to $RECONCILER_HEALTHCHECK_ADDRESS, else 127.0.0.1:7070 (the daemon);
--tls-dir defaults to $RECONCILER_HEALTHCHECK_TLS_DIR, else plaintext.
With --tls-dir, DIR holds the cert-manager style files tls.crt, tls.key and ca.crt; the
probe presents tls.crt as its client certificate and expects the server to present a
certificate for NAME (default: the first DNS name in DIR/tls.crt, which is right when
the probe runs next to the server and shares its certificate).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["main"]

TIMEOUT_S = 3.0


def _first_dns_name(cert_pem: bytes) -> str | None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    names = san.value.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def _channel(address: str, tls_dir: str, server_name: str) -> grpc.Channel:
    if not tls_dir:
        return grpc.insecure_channel(address)
    base = pathlib.Path(tls_dir)
    cert = (base / "tls.crt").read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(base / "ca.crt").read_bytes(),
        private_key=(base / "tls.key").read_bytes(),
        certificate_chain=cert,
    )
    name = server_name or _first_dns_name(cert)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reconciler-healthcheck")
    parser.add_argument(
        "address",
        nargs="?",
        default=os.environ.get("RECONCILER_HEALTHCHECK_ADDRESS", "127.0.0.1:7070"),
        help="host:port of the gRPC server",
    )
    parser.add_argument(
        "--tls-dir",
        default=os.environ.get("RECONCILER_HEALTHCHECK_TLS_DIR", ""),
        help="directory with tls.crt, tls.key, ca.crt",
    )
    parser.add_argument("--server-name", default="", help="expected name in the server cert")
    args = parser.parse_args(argv)
    try:
        with _channel(args.address, args.tls_dir, args.server_name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    except (grpc.RpcError, OSError, ValueError) as exc:
        print(f"unhealthy: {args.address}: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
