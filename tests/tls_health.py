"""Certificates from throwaway CAs (trustme) and a gRPC health server that requires client certificates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme
from _fake_server import EXCLUSIVE_PORT
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def write_tls_files(ca: trustme.CA, directory: Path, *names: str, prefix: str = "tls") -> dict[str, Path]:
    """`ca.crt`, `PREFIX.crt` (the chain) and `PREFIX.key` for a certificate naming `names`,
    laid out as a kubernetes.io/tls Secret from cert-manager is mounted."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*names)  # trustme's certificates carry both the server and the client usage
    files = {
        "ca": directory / "ca.crt",
        "cert": directory / f"{prefix}.crt",
        "key": directory / f"{prefix}.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by another CA: one the server must refuse
    rogue_client_key: Path


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for localhost and 127.0.0.1, a client certificate it signed, and a
    client certificate from a second CA."""
    ca = trustme.CA()
    server = write_tls_files(ca, directory / "server", "localhost", "127.0.0.1")
    client = write_tls_files(ca, directory / "client", "a-client")
    rogue = write_tls_files(trustme.CA(), directory / "rogue", "a-rogue-client")
    return Certs(
        ca=server["ca"],
        server_cert=server["cert"],
        server_key=server["key"],
        client_cert=client["cert"],
        client_key=client["key"],
        rogue_client_cert=rogue["cert"],
        rogue_client_key=rogue["key"],
    )


@contextlib.contextmanager
def mtls_health_server(server_files: dict[str, Path]) -> Iterator[str]:
    """The standard health service (SERVING) over TLS, refusing clients without a certificate from the CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=EXCLUSIVE_PORT)
    servicer = health.HealthServicer()
    for service in ("", "textgen.v1.TextGeneration"):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_files["key"].read_bytes(), server_files["cert"].read_bytes())],
        root_certificates=server_files["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
