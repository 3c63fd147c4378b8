"""An in-process textgen server on port 0, running its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from textgen_server.app import ServerSettings, TextgenServer
from textgen_server.scheduler import SchedulerLimits

T = TypeVar("T")


class ServerThread:
    def __init__(
        self,
        model_dir: Path,
        *,
        load: bool = True,
        limits: SchedulerLimits | None = None,
        grace_seconds: float = 5.0,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings = ServerSettings(
            model_dir=model_dir,
            port=0,
            provider="cpu",
            limits=limits or SchedulerLimits(),
            grace_seconds=grace_seconds,
        )
        self.server = TextgenServer(settings)
        self.port = self.call(self.server.start())
        if load:
            self.call(self.server.load_model())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self, grace: float | None = None) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
