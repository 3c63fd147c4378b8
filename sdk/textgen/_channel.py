"""What every channel of the SDK is: its target, its options and its credentials. Both clients use it.

A target is one address (`host:port`), any gRPC target (`dns:///textgen.ns.svc:50051` for the
replicas behind a Kubernetes headless Service), or a list of `host:port` replicas. Calls are spread
over every address the target resolves to with gRPC's `round_robin` policy; a replica that goes
away is skipped from then on (and DNS is asked again).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from ._version import __version__

__all__ = ["CHANNEL_OPTIONS", "SERVICE_CONFIG", "channel_target", "check_target", "tls_credentials"]

SERVICE_CONFIG: Final = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
"""Spread calls over every resolved address (gRPC's default, pick_first, uses one of them)."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, int | str], ...]] = (
    # Ping an idle connection every minute so a dead peer (or a NAT that dropped the flow) is
    # noticed within keepalive_timeout instead of at the next request. At most two pings go out
    # without data in between (the default), so servers with the default ping policy accept them.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.primary_user_agent", f"textgen-python/{__version__}"),
    ("grpc.service_config", SERVICE_CONFIG),
)
"""Options of every channel the clients open."""


def check_target(target: str | Sequence[str]) -> str | tuple[str, ...]:
    """The target as the clients keep it (a list becomes a tuple); raises ValueError for an empty
    target or a list entry that is not host:port."""
    if isinstance(target, str):
        if not target.strip():
            raise ValueError("target must not be empty")
        return target
    targets = tuple(target)
    if not targets:
        raise ValueError("the list of targets is empty")
    for entry in targets:
        _split_host_port(entry)
    return targets


class UnresolvedTargetError(grpc.RpcError):
    """A name in a list of targets that DNS does not resolve: a call's UNAVAILABLE, retried and
    raised as gRPC's own failures are (as a `dns:///` target's would be)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[Any, ...]:  # none: the call never left this process
        return ()


def channel_target(target: str | tuple[str, ...]) -> str:
    """The gRPC target string: a string as it is; a list as one static `ipv4:` or `ipv6:` target
    holding every replica's address (names are resolved once, here: use `dns:///name:port` for
    names whose addresses change). Raises UnresolvedTargetError for a name DNS does not resolve."""
    if isinstance(target, str):
        return target
    addresses = [_resolve(*_split_host_port(entry)) for entry in target]
    families = {address.version for address, _ in addresses}
    if len(families) > 1:
        raise ValueError(f"targets mix IPv4 and IPv6 addresses ({', '.join(target)}); use one family")
    if families == {4}:
        return "ipv4:" + ",".join(f"{address}:{port}" for address, port in addresses)
    return "ipv6:" + ",".join(f"[{address}]:{port}" for address, port in addresses)


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: `ca` verifies the server (default: gRPC's bundled roots);
    `cert` and `key` are this client's certificate and key, for servers that require mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else Path(ca).read_bytes(),
        private_key=None if key is None else Path(key).read_bytes(),
        certificate_chain=None if cert is None else Path(cert).read_bytes(),
    )


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _split_host_port(entry: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {entry!r}: expected host:port (an IPv6 address in brackets)")
    return host, int(port)


def _resolve(host: str, port: int) -> tuple[_IPAddress, int]:
    """An IP address of `host`: the literal itself, else its first IPv4 address (else IPv6)."""
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnresolvedTargetError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    return min(addresses, key=lambda address: address.version), port
