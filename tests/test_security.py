"""TLS, mutual TLS and bearer tokens, end to end with throwaway certificates: the SDK, the CLI and
grpcurl get in with the right credentials and are refused without; health stays open; reflection
needs a token unless made public; tokens are re-read on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import raw_http2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import ServerProcess, ServerThread
from textgen import Client, UnauthenticatedError, UnavailableError, tls_credentials
from textgen.cli import main as cli_main
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.app import ServerSettings, StartupError, TextgenServer
from textgen_server.auth import TokenFile, TokenFileError
from textgen_server.tls import TlsFiles
from tls_health import Certs, make_certs

BIN = Path(sys.executable).parent
TOKENS = "# textgen tokens\n\n  token-one  \ntoken-two\n"


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEXTGEN_TOKEN", raising=False)  # a developer's own must not leak in


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, certs: Certs, token_file: Path) -> Iterator[ServerThread]:
    """TLS and bearer tokens."""
    server = ServerThread(
        tiny_model_dir, tls=TlsFiles(certs.server_cert, certs.server_key), auth_token_file=token_file
    )
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir: Path, certs: Certs) -> Iterator[ServerThread]:
    """Mutual TLS, no tokens."""
    server = ServerThread(tiny_model_dir, tls=TlsFiles(certs.server_cert, certs.server_key, certs.ca))
    yield server
    server.stop(grace=0)


def _client(server: ServerThread, credentials: grpc.ChannelCredentials | None, **kwargs: object) -> Client:
    return Client(server.target, credentials=credentials, max_retries=0, timeout=10, **kwargs)  # type: ignore[arg-type]


# -- TLS and tokens -------------------------------------------------------------------------------


def test_tls_with_a_token_generates(tls_server: ServerThread, certs: Certs) -> None:
    with _client(tls_server, tls_credentials(ca=certs.ca), token="token-one") as client:
        completion = client.generate("Hi", max_tokens=3)
    assert completion.usage.completion_tokens == 3 and completion.request_id
    with _client(tls_server, tls_credentials(ca=certs.ca), token="token-two") as client:
        assert client.model_info().vocab_size == 32000


def test_the_token_comes_from_the_environment(
    tls_server: ServerThread, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEXTGEN_TOKEN", "token-two")
    with _client(tls_server, tls_credentials(ca=certs.ca)) as client:
        assert client.generate("Hi", max_tokens=1).usage.completion_tokens == 1


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing bearer token"), ("token-three", "invalid bearer token"), ("token-on", "invalid")],
)
def test_a_missing_or_wrong_token_is_unauthenticated(
    tls_server: ServerThread, certs: Certs, token: str | None, message: str
) -> None:
    with _client(tls_server, tls_credentials(ca=certs.ca), token=token) as client:
        for call in (
            lambda: client.generate("Hi"),
            client.model_info,
            lambda: list(client.generate("Hi", stream=True)),
        ):
            with pytest.raises(UnauthenticatedError, match=message):
                call()
    refused = tls_server.server.metrics.registry.get_sample_value(
        "textgen_auth_failure_total", {"reason": "missing" if token is None else "invalid"}
    )
    assert refused is not None and refused >= 3


def test_a_malformed_authorization_is_unauthenticated(tls_server: ServerThread, certs: Certs) -> None:
    with grpc.secure_channel(tls_server.target, tls_credentials(ca=certs.ca)) as channel:
        stub = rpc.TextGenerationStub(channel)
        for value in ("token-one", "Basic token-one", "Bearer "):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", value),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "bearer token-one"),))


def test_an_unknown_method_tells_a_stranger_nothing(tls_server: ServerThread, certs: Certs) -> None:
    with grpc.secure_channel(tls_server.target, tls_credentials(ca=certs.ca)) as channel:
        probe = channel.unary_unary("/textgen.v1.TextGeneration/Secret")
        with pytest.raises(grpc.RpcError) as caught:
            probe(b"")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_is_refused(tls_server: ServerThread) -> None:
    with _client(tls_server, None, token="token-one") as client, pytest.raises(UnavailableError):
        client.model_info()


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: ServerThread) -> None:
    with _client(tls_server, tls_credentials(), token="token-one") as client, pytest.raises(UnavailableError):
        client.model_info()


def test_health_is_open_without_a_token(tls_server: ServerThread, certs: Certs) -> None:
    with grpc.secure_channel(tls_server.target, tls_credentials(ca=certs.ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "textgen.v1.TextGeneration"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_metadata_that_is_not_utf8_writes_no_error_to_the_log(
    tiny_model_dir: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc logged a traceback at ERROR for each such header: two per Generate call, one per health
    check, which any caller could repeat without a token."""
    server = ServerThread(tiny_model_dir, auth_token_file=token_file)
    try:
        with caplog.at_level(logging.INFO):
            check = health_pb2.HealthCheckRequest().SerializeToString()
            trailers = raw_http2.call(
                server.port, "/grpc.health.v1.Health/Check", check, [(b"x-foo", b"\xff\xfe")]
            )
            assert trailers[b"grpc-status"] == b"0"
            generate = pb.GenerateRequest(prompt="Hi", max_tokens=1).SerializeToString()
            wrong_token = [(b"authorization", b"Bearer \xff\xfe"), (b"x-foo", b"\xff")]
            trailers = raw_http2.call(
                server.port, "/textgen.v1.TextGeneration/Generate", generate, wrong_token
            )
            assert trailers[b"grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0]).encode()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        server.stop(grace=0)


def _list_services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata
    )
    return [service.name for response in responses for service in response.list_services_response.service]


def test_reflection_needs_a_token(tls_server: ServerThread, certs: Certs) -> None:
    with grpc.secure_channel(tls_server.target, tls_credentials(ca=certs.ca)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _list_services(channel)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "textgen.v1.TextGeneration" in _list_services(
            channel, (("authorization", "Bearer token-one"),)
        )


def test_reflection_can_be_made_public(tiny_model_dir: Path, token_file: Path) -> None:
    server = ServerThread(tiny_model_dir, load=False, auth_token_file=token_file, reflection_public=True)
    try:
        with grpc.insecure_channel(server.target) as channel:
            assert "textgen.v1.TextGeneration" in _list_services(channel)
            with pytest.raises(grpc.RpcError) as caught:  # the API itself still needs a token
                rpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=0)


def test_grpcurl_with_tls_and_a_token(tls_server: ServerThread, certs: Certs) -> None:
    base = [str(BIN / "grpcurl"), "-cacert", str(certs.ca)]
    listed = subprocess.run(
        [*base, "-H", "authorization: Bearer token-one", tls_server.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0 and "textgen.v1.TextGeneration" in listed.stdout, listed.stderr
    refused = subprocess.run(
        [*base, "-d", "{}", tls_server.target, "textgen.v1.TextGeneration/GetModelInfo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_the_readme_security_example_runs(tiny_model_dir: Path, certs: Certs, token_file: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- tests/test_security.py runs these")[1].split("```sh\n")[1].split("```")[0]
    serve, *commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    files = {"server.pem": certs.server_cert, "server.key": certs.server_key, "ca.pem": certs.ca}
    files.update({"models/tiny": tiny_model_dir, "tokens": token_file})
    for name, path in files.items():
        serve = serve.replace(f" {name}", f" {path}")
    server = ServerProcess(*serve.split()[1:], "--port", "0")
    try:
        server.wait_ready()
        assert "TLS, bearer tokens (2 from" in "".join(server.lines)
        target = f"127.0.0.1:{server.port}"
        env = {
            **os.environ,
            "TEXTGEN_TOKEN": "token-one",
            "TEXTGEN_TARGET": target,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
        for command in commands:
            command = command.replace("localhost:50051", target).replace("ca.pem", str(certs.ca))
            result = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env, check=False
            )
            assert result.returncode == 0, (command, result.stderr)
            assert "TextGeneration" in result.stdout or "vocab_size" in result.stdout, result.stdout
    finally:
        server.stop()


def test_the_cli_takes_tls_and_a_token(
    tls_server: ServerThread,
    certs: Certs,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--target", tls_server.target, "--tls-ca", str(certs.ca)]
    assert cli_main([*target, "--token", "token-one", "info"]) == 0
    assert "vocab_size: 32000" in capsys.readouterr().out
    monkeypatch.setenv("TEXTGEN_TOKEN", "token-two")
    assert cli_main([*target, "generate", "Hi", "--max-tokens", "2"]) == 0
    assert "completion_tokens=2" in capsys.readouterr().err
    monkeypatch.setenv("TEXTGEN_TOKEN", "wrong")
    assert cli_main([*target, "--max-retries", "0", "info"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: invalid bearer token")


# -- mutual TLS ---------------------------------------------------------------------------------


def test_mtls_accepts_a_client_certificate_from_its_ca(mtls_server: ServerThread, certs: Certs) -> None:
    credentials = tls_credentials(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    with _client(mtls_server, credentials) as client:
        assert client.generate("Hi", max_tokens=2).usage.completion_tokens == 2


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: ServerThread, certs: Certs) -> None:
    with _client(mtls_server, tls_credentials(ca=certs.ca)) as client, pytest.raises(UnavailableError):
        client.model_info()


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: ServerThread, certs: Certs) -> None:
    credentials = tls_credentials(ca=certs.ca, cert=certs.rogue_client_cert, key=certs.rogue_client_key)
    with _client(mtls_server, credentials) as client, pytest.raises(UnavailableError):
        client.model_info()


def test_the_cli_takes_a_client_certificate(
    mtls_server: ServerThread, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = [
        "--tls-ca",
        str(certs.ca),
        "--tls-cert",
        str(certs.client_cert),
        "--tls-key",
        str(certs.client_key),
    ]
    assert cli_main(["--target", mtls_server.target, *tls, "info"]) == 0
    assert "vocab_size: 32000" in capsys.readouterr().out


# -- the token file -------------------------------------------------------------------------------


def test_the_token_file_skips_comments_and_blank_lines(token_file: Path) -> None:
    tokens = TokenFile(token_file)
    assert len(tokens) == 2
    assert tokens.accepts("token-one") and tokens.accepts("token-two")
    assert not tokens.accepts("# textgen tokens") and not tokens.accepts("") and not tokens.accepts("token")


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot read"), ("# only a comment\n\n", "no token")]
)
def test_an_unusable_token_file_is_named(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenFileError, match=message) as caught:
        TokenFile(path)
    assert str(path) in str(caught.value)


def test_a_byte_order_mark_is_not_part_of_a_token(tmp_path: Path) -> None:
    """Windows editors start the file with one: it made '\ufeff# comment' a token, refused the real
    token on the first line, and a file holding only the mark held one token."""
    path = tmp_path / "tokens"
    path.write_text("\ufeff# textgen tokens\ntoken-one\n", encoding="utf-8")
    tokens = TokenFile(path)
    assert len(tokens) == 1 and tokens.accepts("token-one")
    assert not tokens.accepts("\ufeff# textgen tokens") and not tokens.accepts("# textgen tokens")
    path.write_text("\ufefffirst-token\n", encoding="utf-8")
    assert tokens.reload() and tokens.accepts("first-token")
    path.write_text("\ufeff", encoding="utf-8")
    assert not tokens.reload() and tokens.accepts("first-token")  # empty: the old tokens stay
    assert not tokens.accepts("\ufeff") and not tokens.accepts("")


async def test_a_refused_method_is_quoted_short_in_the_log(
    caplog: pytest.LogCaptureFixture, token_file: Path
) -> None:
    """A refused call's method is the client's :path, sent as any bytes a raw HTTP/2 client likes."""
    from types import SimpleNamespace

    from textgen_server.auth import MAX_LOGGED_METHOD, BearerTokenInterceptor

    interceptor = BearerTokenInterceptor(TokenFile(token_file))
    forged = "/x\n2026-12-07 11:00:00,000 INFO textgen_server.auth: token accepted\x1b[31m" + "A" * 10_000

    async def continuation(details: object) -> None:
        return None

    caplog.set_level("INFO", logger="textgen_server.auth")
    await interceptor.intercept_service(continuation, SimpleNamespace(method=forged, invocation_metadata=()))
    [record] = [r for r in caplog.records if r.name == "textgen_server.auth"]
    line = record.getMessage()
    assert "\n" not in line and "\x1b" not in line
    assert len(line) < MAX_LOGGED_METHOD + 200


def test_a_bad_reload_keeps_the_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old\n")
    tokens = TokenFile(path)
    path.write_text("\n")
    assert not tokens.reload() and tokens.accepts("old")
    path.write_text("new\n")
    assert tokens.reload() and tokens.accepts("new") and not tokens.accepts("old")


def test_sighup_reloads_the_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("first\n")
    server = ServerProcess("--model-dir", str(tiny_model_dir), "--port", "0", "--auth-token-file", str(path))
    try:
        server.wait_ready()

        def info_with(token: str) -> grpc.StatusCode:
            with Client(f"127.0.0.1:{server.port}", token=token, max_retries=0, timeout=10) as client:
                try:
                    client.model_info()
                except UnauthenticatedError as exc:
                    return exc.code
                return grpc.StatusCode.OK

        assert info_with("first") == grpc.StatusCode.OK
        assert info_with("second") == grpc.StatusCode.UNAUTHENTICATED
        path.write_text("second\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("reloaded 1 tokens" in line for line in server.lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert info_with("second") == grpc.StatusCode.OK
        assert info_with("first") == grpc.StatusCode.UNAUTHENTICATED
        assert server.process.poll() is None  # SIGHUP reloads; it does not end the server
    finally:
        server.stop()


def test_startup_refuses_unusable_files(tiny_model_dir: Path, tmp_path: Path, certs: Certs) -> None:
    # As a user runs it: one line, no traceback, exit status 1.
    base = [str(BIN / "textgen-server"), "--model-dir", str(tiny_model_dir), "--port", "0"]
    result = subprocess.run(
        [*base, "--auth-token-file", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot read the token file" in result.stderr.strip().splitlines()[-1]
    # The other files, checked by the same start-up code in-process.
    absent = tmp_path / "absent"
    garbled_ca = tmp_path / "garbled-ca.pem"
    garbled_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    for tls, message in (
        (TlsFiles(certs.server_key, certs.server_key), f"--tls-cert {certs.server_key}: not a PEM file"),
        (TlsFiles(certs.server_cert, absent), f"--tls-key {absent}: No such file"),
        (TlsFiles(certs.server_cert, certs.server_key, absent), f"--tls-client-ca {absent}"),
        # Reported by gRPC as "could not bind" the port, naming neither file.
        (
            TlsFiles(certs.server_cert, certs.client_key),
            f"--tls-key {certs.client_key}: not the key of --tls-cert",
        ),
        (
            TlsFiles(certs.server_cert, certs.server_key, garbled_ca),
            f"--tls-client-ca {garbled_ca}: not a usable CA",
        ),
    ):
        server = TextgenServer(ServerSettings(model_dir=tiny_model_dir, port=0, tls=tls))
        with pytest.raises(StartupError, match=message):
            asyncio.run(server.start())
    result = subprocess.run(
        [*base, "--tls-cert", str(certs.server_cert)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr


def test_no_prompt_text_reaches_the_server_logs_by_default(tiny_model_dir: Path) -> None:
    server = ServerProcess("--model-dir", str(tiny_model_dir), "--port", "0")
    try:
        server.wait_ready()
        with Client(f"127.0.0.1:{server.port}", max_retries=0, timeout=30) as client:
            client.generate("the password is hunter2", max_tokens=2)
            with pytest.raises(Exception):  # noqa: B017 -- any refusal: its log must not quote the prompt
                client.generate("hunter2 " * 1000, max_tokens=0)
    finally:
        server.stop()
    log = "".join(server.lines)
    assert log.count("request id=") == 2
    assert "hunter2" not in log
