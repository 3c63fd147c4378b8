"""`textgen-healthcheck`, the images' HEALTHCHECK and the exec probe of TLS pods: its exit status."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme
from server_harness import ServerThread
from textgen_server.healthcheck import main as healthcheck
from tls_health import mtls_health_server, write_tls_files


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
    assert (
        capsys.readouterr().err
        == f"textgen-healthcheck: {server.target}: NOT_FOUND: no service 'no.such.Service'\n"
    )


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert healthcheck(["--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_mutual_tls(ca: trustme.CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server_files = write_tls_files(ca, tmp_path / "server", "textgen.default.svc")
    client_files = write_tls_files(ca, tmp_path / "client", "prober")
    stranger_files = write_tls_files(trustme.CA(), tmp_path / "stranger", "prober")
    tls = ["--tls-ca", str(server_files["ca"]), "--tls-server-name", "textgen.default.svc"]
    client = ["--tls-cert", str(client_files["cert"]), "--tls-key", str(client_files["key"])]
    with mtls_health_server(server_files) as target:
        assert healthcheck(["--target", target, *tls, *client]) == 0
        assert capsys.readouterr().out.strip() == f"{target}: SERVING"
        # Refused: no client certificate, one from another CA, plaintext, the wrong server name.
        stranger = ["--tls-cert", str(stranger_files["cert"]), "--tls-key", str(stranger_files["key"])]
        assert healthcheck(["--target", target, "--timeout", "2", *tls]) == 1
        assert healthcheck(["--target", target, "--timeout", "2", *tls, *stranger]) == 1
        assert healthcheck(["--target", target, "--timeout", "2"]) == 1
        wrong_name = ["--tls-ca", str(server_files["ca"]), "--tls-server-name", "elsewhere.example"]
        assert healthcheck(["--target", target, "--timeout", "2", *wrong_name, *client]) == 1


def test_unreadable_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck(["--tls-ca", str(tmp_path / "missing.crt")]) == 1
    assert "missing.crt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--timeout", "inf"],  # no probe: grpc failed it at once, DEADLINE_EXCEEDED
        ["--timeout", "0"],
        ["--tls-server-name", "textgen"],  # it was ignored and the check went over plaintext
    ],
)
def test_options_a_probe_cannot_use_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck(argv)
    assert exit_info.value.code == 2


def test_client_certificate_needs_its_key() -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck(["--tls-ca", "ca.crt", "--tls-cert", "client.crt"])
    assert exit_info.value.code == 2
