"""Building and running the server: gRPC service, health, reflection, security, metrics, shutdown.

`create_server` binds the port first and loads the model in the background, so health checks answer
NOT_SERVING (and RPCs UNAVAILABLE) while a large model loads; `stop` flips health to NOT_SERVING,
drains in-flight generations within the grace period and tells the rest why they end.
`rescan_adapters` brings the served LoRA adapters in line with `--lora-dir` (start-up and SIGHUP).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from textgen.v1 import textgen_pb2, textgen_pb2_grpc

from .adapters import Adapter, AdapterRegistry, ScanResult
from .auth import BearerTokenInterceptor, TokenFile, TokenFileError
from .decoding import UndecodableRequestInterceptor
from .engine import Engine
from .grammar import GrammarCompiler
from .metrics import Metrics
from .model_config import TOKENIZER_FILE, ModelConfig
from .request_log import RequestRecord, log_request
from .scheduler import Scheduler, SchedulerLimits
from .service import ModelState, TextGenerationService
from .tls import TlsConfigError, TlsFiles, server_credentials
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = textgen_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
MAX_MESSAGE_BYTES = 1 << 20
"""Default cap on a request or response message. A request within the card's limits (3072 tokens,
6144-character messages) is a few hundred KB at most; gRPC refuses larger ones RESOURCE_EXHAUSTED
before they are parsed."""


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # the package has no types
    """grpcio-health-checking's asyncio servicer with `List`, which it leaves unimplemented (every
    call answered UNIMPLEMENTED and logged a traceback here), service names of a sane length (health
    answers callers without a token, and each open `Watch` held its megabyte-long name), and a
    `Watch` that writes outside the lock `set` takes."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        await _check_service_name(request, context)
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """The base class's Watch, but it writes outside the service's lock: there, one client that
        stopped reading (an HTTP/2 window of 0) held the lock `set` needs, so the server never
        reported SERVING and never finished shutting down while that client stayed."""
        await _check_service_name(request, context)
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        sent = None
        try:
            while True:
                async with condition:
                    while (status := self._watched_status(service)) == sent:
                        await condition.wait()  # woken by `set`
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status  # a change made during the write is sent on the next round
        finally:  # the base class's bookkeeping, which its `set` relies on
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    def _watched_status(self, service: str) -> int:
        status: int = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return status

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        # The statuses Check answers from, as the base class keeps them.
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


class _MetadataNotUtf8(logging.Filter):
    """Drops grpc's record of a metadata value that is not UTF-8: a traceback at ERROR for each such
    header (grpc then reads it as Latin-1 and goes on), which any caller could have written into
    the log by the thousand, with or without a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Invalid encoding on"))


_GRPC_CYTHON_LOG = logging.getLogger("grpc._cython.cygrpc")


def _quiet_metadata_decoding() -> None:
    if not any(isinstance(f, _MetadataNotUtf8) for f in _GRPC_CYTHON_LOG.filters):
        _GRPC_CYTHON_LOG.addFilter(_MetadataNotUtf8())


# Streams a connection may open beside the requests the server takes: health checks, GetModelInfo.
STREAMS_BESIDE_REQUESTS = 32


def max_streams_per_connection(limits: SchedulerLimits) -> int:
    """What a connection may have open at once: every request the server takes, and room beside them
    for health checks and GetModelInfo."""
    return limits.max_concurrent_requests + STREAMS_BESIDE_REQUESTS


MAX_SERVICE_NAME = 200  # characters of a health request's service name (gRPC's names are far shorter)


async def _check_service_name(
    request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    if len(request.service) > MAX_SERVICE_NAME:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"service: at most {MAX_SERVICE_NAME} characters, got {len(request.service)}",
        )


class StartupError(Exception):
    """The server cannot start as configured; the message is one line naming the cause."""


@dataclass(frozen=True)
class ServerSettings:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    provider: str = "auto"
    threads: int | None = None
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)
    model_name: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: the same address as `host`
    grace_seconds: float = 30.0
    tls: TlsFiles | None = None
    auth_token_file: Path | None = None
    reflection_public: bool = False
    max_message_bytes: int = MAX_MESSAGE_BYTES
    lora_dir: Path | None = None  # every NAME.npz there is served as adapter NAME
    prefix_cache: bool = True  # free KV slots keep finished sequences' positions for later prompts
    huge_pages: bool = True  # on the CPU the weights move into 2 MiB pages once loaded (huge_pages.py)
    validation_workers: int = 2  # threads validating requests (tokenizing, compiling grammars)


class TextgenServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.service = TextGenerationService(
            settings.model_name,
            on_request_end=self._request_ended,
            validation_workers=settings.validation_workers,
        )
        self.scheduler: Scheduler | None = None
        self.tokens: TokenFile | None = None
        self.adapters: AdapterRegistry | None = None
        self._rescanning = asyncio.Lock()
        self.port = 0
        self.metrics_port: int | None = None

    async def start(self) -> int:
        """Listen (health NOT_SERVING until `load_model`); returns the bound port. Raises
        StartupError for unusable TLS files or token file, or an address it cannot listen on."""
        s = self.settings
        _quiet_metadata_decoding()
        try:
            credentials = None if s.tls is None else server_credentials(s.tls)
            self.tokens = None if s.auth_token_file is None else TokenFile(s.auth_token_file)
        except (TlsConfigError, TokenFileError) as exc:
            raise StartupError(str(exc)) from exc
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.tokens is not None:
            interceptors.append(
                BearerTokenInterceptor(
                    self.tokens,
                    reflection_public=s.reflection_public,
                    on_refused=self.metrics.observe_auth_failure,
                )
            )
        # After authentication: a caller without a token learns nothing, not even what fails to decode.
        interceptors.append(UndecodableRequestInterceptor(on_refused=self._undecodable))
        # grpc.aio objects belong to the event loop they are made on: make them here, not in __init__.
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                # Streams a connection may hold open at once: without a bound, a client held
                # hundreds of thousands whose request never came (17 KB each, no handler started, so
                # nothing else counted them). The bound never binds a well-behaved client: more
                # requests than max_concurrent_requests are refused anyway.
                ("grpc.max_concurrent_streams", max_streams_per_connection(s.limits)),
            ],
        )
        textgen_pb2_grpc.add_TextGenerationServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = host_port(s.host, s.port)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc says only "Failed to bind"; ask the OS why
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {address} (gRPC): {_bind_failure(s.host, s.port)}")
        if s.metrics_port is not None:
            metrics_host = s.host if s.metrics_host is None else s.metrics_host
            try:
                self.metrics_port = self.metrics.serve(metrics_host, s.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {host_port(metrics_host, s.metrics_port)}: {exc.strerror or exc}"
                ) from exc
            log.info("metrics on http://%s/metrics", host_port(metrics_host, self.metrics_port))
        await self._set_serving(False)
        await self.server.start()
        security = []
        if s.tls is not None:
            security.append("mutual TLS" if s.tls.client_ca is not None else "TLS")
        if self.tokens is not None:
            security.append(f"bearer tokens ({len(self.tokens)} from {s.auth_token_file})")
        log.info(
            "listening on %s:%d (%s); loading %s",
            s.host,
            self.port,
            ", ".join(security) or "plaintext, no authentication",
            s.model_dir,
        )
        return self.port

    def reload_tokens(self) -> None:
        """Re-read the token file (on SIGHUP); a file that cannot be used keeps the old tokens."""
        if self.tokens is None:
            log.info("no --auth-token-file: nothing to reload")
            return
        self.tokens.reload()

    def _request_ended(self, record: RequestRecord) -> None:
        self.metrics.observe_request(record)
        log_request(record)

    def _undecodable(self, method: str) -> None:
        """A Generate/GenerateStream call refused before the servicer because its message does not
        decode: counted and logged as the servicer's own refusals are."""
        name = method.rpartition("/")[2]
        if name in ("Generate", "GenerateStream"):
            record = RequestRecord(name, code=grpc.StatusCode.INVALID_ARGUMENT)
            record.ended = record.started
            self._request_ended(record)

    async def load_model(self) -> None:
        s = self.settings
        config = ModelConfig.load(s.model_dir)
        max_len = config.max_total_tokens  # a slot holds the longest request
        if s.lora_dir is not None and config.lora is None:  # before minutes of loading, not after
            raise ValueError(
                f"--lora-dir {s.lora_dir}: {s.model_dir} was exported without adapter slots "
                "(export it again with --lora-slots N to serve LoRA adapters)"
            )
        slots = s.limits.kv_slots(max_len)
        if slots < 1:
            raise ValueError(
                f"--max-batch-total-tokens {s.limits.max_batch_total_tokens} cannot hold one sequence of "
                f"{max_len} positions (the model's max_total_tokens)"
            )
        engine = await asyncio.to_thread(
            Engine,
            s.model_dir,
            provider=s.provider,
            threads=s.threads,
            slots=slots,
            max_len=max_len,
            huge_pages=s.huge_pages,
        )
        tokenizer = Tokenizer.from_file(s.model_dir / TOKENIZER_FILE)
        if tokenizer.vocab_size > engine.config.vocab_size:
            raise ValueError(
                f"{s.model_dir / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens, more than the model's "
                f"{engine.config.vocab_size} (a tokenizer from another model?)"
            )
        grammars = await asyncio.to_thread(
            GrammarCompiler.from_file,
            s.model_dir / TOKENIZER_FILE,
            eos_id=tokenizer.eos_id,
            vocab_size=engine.config.vocab_size,
        )
        if s.lora_dir is not None:
            self.adapters = AdapterRegistry(engine.config, s.lora_dir)
            await self.rescan_adapters()
        # The model's own prefill limit (the card's 8192) caps whatever was configured.
        prefill = min(s.limits.max_batch_prefill_tokens, engine.config.max_batch_prefill_tokens)
        limits = dataclasses.replace(s.limits, max_batch_prefill_tokens=prefill)
        self.scheduler = Scheduler(
            engine,
            tokenizer,
            limits,
            on_step=self.metrics.observe_step,
            adapters=self.adapters,
            prefix_cache=s.prefix_cache,
        )
        self.scheduler.start()
        self.service.model = ModelState(
            self.scheduler,
            tokenizer,
            engine.config,
            engine.execution_provider,
            self.adapters,
            kv_slots=self.scheduler.slots,
            kv_cache_bytes=engine.cache.nbytes,
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            grammars=grammars,
        )
        self.metrics.observe_model(
            model=self.service.model_name or engine.config.name,
            dtype=engine.config.dtype,
            weight_dtype=engine.config.weight_dtype,
            execution_provider=engine.execution_provider,
            kv_slots=engine.slots,
            slot_positions=engine.max_len,
        )
        await self._set_serving(True)
        log.info(
            "serving %s on %s (%s weights, %s activations): %d KV slots x %d positions, %d bytes",
            engine.config.name,
            engine.execution_provider,
            engine.config.weight_dtype,
            engine.config.dtype,
            engine.slots,
            engine.max_len,
            engine.cache.nbytes,
        )

    async def rescan_adapters(self) -> ScanResult:
        """Serve what --lora-dir holds now: new files added, deleted ones removed, changed ones
        replaced, malformed ones refused (logged). Requests keep running meanwhile: files are read on
        a worker thread, and a removed adapter's running requests finish with it."""
        if self.adapters is None:
            return ScanResult()
        async with self._rescanning:
            result = await asyncio.to_thread(self.adapters.scan)
        for name in result.added:
            log.info("lora-dir: serving adapter %s", _describe(self.adapters.get(name)))
        for name in result.replaced:
            log.info("lora-dir: replaced adapter %s", _describe(self.adapters.get(name)))
        for name in result.removed:
            log.info("lora-dir: removed adapter %s (its file is gone)", name)
        for file_name, reason in result.refused.items():
            log.error("lora-dir: refused %s: %s", file_name, reason)
        log.info("lora-dir %s: adapters served: %d", self.adapters.directory, len(self.adapters.names()))
        return result

    def end_drain(self) -> None:
        """A `stop` under way ends the calls still running now (UNAVAILABLE, as at the end of its
        grace period): an operator's second SIGINT or SIGTERM."""
        if self.scheduler is not None:
            self.scheduler.end_drain()

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_seconds if grace is None else grace
        await self._set_serving(False)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop, grace)
        await self.server.stop(grace=1.0)
        self.service.close()
        await asyncio.to_thread(self.metrics.stop)

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def _describe(adapter: Adapter | None) -> str:
    if adapter is None:  # replaced again meanwhile
        return "(gone)"
    return (
        f"{adapter.name} (rank {adapter.rank}, {', '.join(adapter.modules)}, "
        f"{adapter.nbytes / 2**20:.1f} MiB, {adapter.path})"
    )


async def create_server(settings: ServerSettings) -> tuple[TextgenServer, int]:
    """Start a server with its model loaded; returns it and its port (bind port 0 in tests)."""
    server = TextgenServer(settings)
    port = await server.start()
    await server.load_model()
    return server, port


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets as gRPC and URLs want it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _bind_failure(host: str, port: int) -> str:
    """Why the OS refuses host:port (gRPC's own error does not say), e.g. 'Address already in use'."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return "gRPC could not bind it (set GRPC_VERBOSITY=debug for its reason)"
