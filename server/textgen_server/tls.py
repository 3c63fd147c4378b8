"""TLS for the gRPC port: the server's certificate and key, and optionally the CA whose client
certificates it requires (mutual TLS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(Exception):
    """A certificate or key file that cannot be used; the message names the option and the file."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key of the server
    client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; with a client CA, a client without a certificate signed by
    it is refused during the handshake."""
    cert = _read_pem("--tls-cert", files.cert, "CERTIFICATE")
    key = _read_pem("--tls-key", files.key, "PRIVATE KEY")
    client_ca = (
        None if files.client_ca is None else _read_pem("--tls-client-ca", files.client_ca, "CERTIFICATE")
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(option: str, path: Path, kind: str) -> bytes:
    # gRPC only reports a bad PEM as "Failed to bind" much later: check the obvious here, by name.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{option} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise TlsConfigError(f"{option} {path}: not a PEM file holding a {kind.lower()}")
    return data
