"""Building and running the server: gRPC service, health, reflection, model loading, shutdown.

`create_server` binds the port first and loads the model in the background, so health checks answer
NOT_SERVING (and RPCs UNAVAILABLE) while a large model loads; `stop` flips health to NOT_SERVING,
drains in-flight generations within the grace period and tells the rest why they end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from textgen.v1 import textgen_pb2, textgen_pb2_grpc

from .engine import Engine
from .metrics import Metrics
from .model_config import TOKENIZER_FILE, ModelConfig
from .scheduler import Scheduler, SchedulerLimits
from .service import ModelState, TextGenerationService
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = textgen_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name


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
    grace_seconds: float = 30.0


class TextgenServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.service = TextGenerationService(settings.model_name, on_reject=self.metrics.observe_rejection)
        self.scheduler: Scheduler | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen (health NOT_SERVING until `load_model`); returns the bound port."""
        # grpc.aio objects belong to the event loop they are made on: make them here, not in __init__.
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        textgen_pb2_grpc.add_TextGenerationServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_serving(False)
        await self.server.start()
        log.info("listening on %s:%d; loading %s", self.settings.host, self.port, self.settings.model_dir)
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port)
        return self.port

    async def load_model(self) -> None:
        s = self.settings
        max_len = ModelConfig.load(s.model_dir).max_total_tokens  # a slot holds the longest request
        slots = s.limits.kv_slots(max_len)
        if slots < 1:
            raise ValueError(
                f"--max-batch-total-tokens {s.limits.max_batch_total_tokens} cannot hold one sequence of "
                f"{max_len} positions (the model's max_total_tokens)"
            )
        engine = await asyncio.to_thread(
            Engine, s.model_dir, provider=s.provider, threads=s.threads, slots=slots, max_len=max_len
        )
        tokenizer = Tokenizer.from_file(s.model_dir / TOKENIZER_FILE)
        # The model's own prefill limit (the card's 8192) caps whatever was configured.
        prefill = min(s.limits.max_batch_prefill_tokens, engine.config.max_batch_prefill_tokens)
        limits = dataclasses.replace(s.limits, max_batch_prefill_tokens=prefill)
        self.scheduler = Scheduler(engine, tokenizer, limits, on_step=self.metrics.observe_step)
        self.scheduler.start()
        self.service.model = ModelState(
            self.scheduler,
            tokenizer,
            engine.config,
            engine.execution_provider,
            kv_slots=self.scheduler.slots,
            kv_cache_bytes=engine.cache.nbytes,
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

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_seconds if grace is None else grace
        await self._set_serving(False)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop, grace)
        await self.server.stop(grace=1.0)

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def create_server(settings: ServerSettings) -> tuple[TextgenServer, int]:
    """Start a server with its model loaded; returns it and its port (bind port 0 in tests)."""
    server = TextgenServer(settings)
    port = await server.start()
    await server.load_model()
    return server, port
