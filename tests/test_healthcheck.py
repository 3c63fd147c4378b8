"""`textgen-healthcheck`, the images' HEALTHCHECK and the exec probe of TLS pods: its exit status."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from server_harness import ServerThread
from textgen_server.healthcheck import main as healthcheck


def test_serving_server(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck(["--target", server.target]) == 0
    assert capsys.readouterr().out.strip() == f"{server.target}: SERVING"
    assert healthcheck(["--target", server.target, "--service", "textgen.v1.TextGeneration"]) == 0


def test_server_still_loading_its_model(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loading = ServerThread(tiny_model_dir, load=False)
    try:
        assert healthcheck(["--target", loading.target]) == 1
        assert capsys.readouterr().out.strip() == f"{loading.target}: NOT_SERVING"
    finally:
        loading.stop(grace=0)


def test_unknown_service(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck(["--target", server.target, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert healthcheck(["--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    server_cert = ca.issue_cert("textgen.default.svc")
    client_cert = ca.issue_cert("prober")
    files = {
        "ca": tmp_path / "ca.crt",
        "server_chain": tmp_path / "tls.crt",
        "server_key": tmp_path / "tls.key",
        "client_chain": tmp_path / "client.crt",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_pem.write_to_path(str(files["server_key"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    for name, cert in (("server_chain", server_cert), ("client_chain", client_cert)):
        files[name].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


@pytest.fixture
def mtls_health_server(tls_files: dict[str, Path]) -> Iterator[str]:
    """A gRPC server with the standard health service that asks every client for a certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(tls_files["server_key"].read_bytes(), tls_files["server_chain"].read_bytes())],
        root_certificates=tls_files["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_mutual_tls(
    mtls_health_server: str, tls_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--tls-ca", str(tls_files["ca"]), "--tls-server-name", "textgen.default.svc"]
    client = ["--tls-cert", str(tls_files["client_chain"]), "--tls-key", str(tls_files["client_key"])]
    assert healthcheck(["--target", mtls_health_server, *tls, *client]) == 0
    assert capsys.readouterr().out.strip().endswith("SERVING")
    # Without a client certificate the server refuses the handshake; plaintext fails as well.
    assert healthcheck(["--target", mtls_health_server, "--timeout", "2", *tls]) == 1
    assert healthcheck(["--target", mtls_health_server, "--timeout", "2"]) == 1
    # A certificate checked against the wrong name is refused too.
    wrong_name = ["--tls-ca", str(tls_files["ca"]), "--tls-server-name", "elsewhere.example"]
    assert healthcheck(["--target", mtls_health_server, "--timeout", "2", *wrong_name, *client]) == 1


def test_unreadable_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck(["--tls-ca", str(tmp_path / "missing.crt")]) == 1
    assert "missing.crt" in capsys.readouterr().err


def test_client_certificate_needs_its_key() -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck(["--tls-ca", "ca.crt", "--tls-cert", "client.crt"])
    assert exit_info.value.code == 2
