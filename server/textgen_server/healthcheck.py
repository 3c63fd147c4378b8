"""`textgen-healthcheck`: exit 0 when the server's `grpc.health.v1` service answers SERVING, else 1.

The container images' HEALTHCHECK, and the exec probe of Kubernetes pods that serve TLS: the
kubelet's own gRPC probe dials plaintext only (and never presents a client certificate), so a TLS
or mutual-TLS server is checked from inside its pod with the pod's own certificates instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_TIMEOUT = 3600.0  # seconds: a probe is meant to answer, and grpc fails a deadline far off at once


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen-healthcheck",
        description="Exit 0 if the gRPC health service reports SERVING, 1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address, HOST:PORT")
    parser.add_argument("--service", default="", help="service to check; empty for the server as a whole")
    parser.add_argument(
        "--timeout", type=_seconds, default=3.0, help="seconds to wait for the answer (at most 3600)"
    )
    parser.add_argument("--tls-ca", type=Path, help="CA bundle that signed the server's certificate (TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for a server that asks for one")
    parser.add_argument("--tls-key", type=Path, help="the client certificate's private key")
    parser.add_argument(
        "--tls-server-name",
        help="name to verify the server's certificate against (it names the Service, not 127.0.0.1)",
    )
    return parser


def _seconds(text: str) -> float:
    """A probe's wait: a probe that never gives up (inf, or a deadline grpc cannot hold: it failed
    those at once, DEADLINE_EXCEEDED) is no probe."""
    value = float(text)
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be positive and at most {MAX_TIMEOUT:g}, got {text}")
    return value


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target)
    client_pair = (
        (args.tls_key.read_bytes(), args.tls_cert.read_bytes()) if args.tls_cert is not None else (None, None)
    )
    credentials = grpc.ssl_channel_credentials(args.tls_ca.read_bytes(), *client_pair)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca (a client certificate is only sent over TLS)")
    if args.tls_server_name is not None and args.tls_ca is None:
        parser.error("--tls-server-name needs --tls-ca (the name is checked against a TLS certificate)")
    try:
        with channel_for(args) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except OSError as exc:  # an unreadable certificate or key file
        print(f"textgen-healthcheck: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        # grpc's health service answers an unknown service NOT_FOUND with no message.
        details = exc.details() or (
            f"no service {args.service!r}" if exc.code() == grpc.StatusCode.NOT_FOUND else ""
        )
        print(f"textgen-healthcheck: {args.target}: {exc.code().name}: {details}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
