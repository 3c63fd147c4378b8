"""TLS for the gRPC port: the server's certificate and key, and optionally the CA whose client
certificates it requires (mutual TLS)."""

from __future__ import annotations

import ssl
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
    _check_usable(files)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_usable(files: TlsFiles) -> None:
    """Load the files as OpenSSL will: a key that is not the certificate's, or a CA file with a
    broken body, would reach gRPC, which reports only that it could not bind the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, so that an encrypted key fails instead of prompting on the terminal.
        context.load_cert_chain(files.cert, files.key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--tls-key {files.key}: not the key of --tls-cert {files.cert}, or unreadable ({exc.reason})"
        ) from exc
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"--tls-client-ca {files.client_ca}: not a usable CA ({exc.reason})"
            ) from exc


def _read_pem(option: str, path: Path, kind: str) -> bytes:
    # gRPC only reports a bad PEM as "Failed to bind" much later: check the obvious here, by name.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{option} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise TlsConfigError(f"{option} {path}: not a PEM file holding a {kind.lower()}")
    return data
