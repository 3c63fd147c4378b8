"""Streams through the real server: an in-process gRPC server and its clients on one event loop.

The server binds 127.0.0.1 port 0; clients share one channel (HTTP/2 streams), as an SDK client
would. Each stream records when its request was sent and when each token message arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.app import ServerSettings, TextgenServer, create_server

T = TypeVar("T")


class GrpcPeer:
    def __init__(
        self, model_dir: str, threads: int, lora_dir: str | None = None, prefix_cache: bool = False
    ) -> None:
        """`prefix_cache` off by default: the bench sends the same prompts in every repetition and
        order, and with the cache a later run would prefill less than an earlier one, so the cache
        would be measured instead of what each workload compares (bench.prefix measures it)."""
        self.threads = threads
        self.loop = asyncio.new_event_loop()
        self.server: TextgenServer
        # lora_dir only when asked, prefix_cache only where the settings have it: the engine before v2
        # (bench/variants.py) runs this peer too, and its settings have neither field.
        extra: dict[str, Any] = {"lora_dir": Path(lora_dir)} if lora_dir else {}
        if "prefix_cache" in {f.name for f in dataclasses.fields(ServerSettings)}:
            extra["prefix_cache"] = prefix_cache
        settings = ServerSettings(
            model_dir=Path(model_dir), host="127.0.0.1", port=0, provider="cpu", threads=threads, **extra
        )
        self.server, port = self.loop.run_until_complete(create_server(settings))
        self.target = f"127.0.0.1:{port}"
        self.channel = self.loop.run_until_complete(self._open_channel())

    async def _open_channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.target)
        await channel.channel_ready()
        return channel

    def info(self) -> dict[str, Any]:
        return {"grpc": grpc.__version__, "threads": self.threads, "target": self.target}

    def streams(
        self,
        prompts: list[str],
        new_tokens: int,
        json_schema: dict[str, Any] | None = None,
        loras: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One concurrent stream per prompt; per stream: sent time, token arrival times, usage.
        With `json_schema` every stream is constrained to it (response_format); with `loras`, stream i
        uses adapter loras[i]."""
        return self.loop.run_until_complete(self._streams(prompts, new_tokens, json_schema, loras))

    def one_by_one(self, prompts: list[str], new_tokens: int) -> list[dict[str, Any]]:
        """The same streams as `streams`, each sent when the one before has ended."""

        async def in_turn() -> list[dict[str, Any]]:
            stub = rpc.TextGenerationStub(self.channel)
            return [await self._one(stub, prompt, new_tokens) for prompt in prompts]

        return self.loop.run_until_complete(in_turn())

    def arrivals(
        self, prompts: list[str], new_tokens: int, long_prompt: str, long_new_tokens: int = 1
    ) -> dict[str, Any]:
        """`prompts` as concurrent streams; once every one has its first token, `long_prompt` is sent
        again and again (each when the last has ended) until they are done. Returns the streams and
        `long`: one `{"sent", "ended"}` per long request."""
        return self.loop.run_until_complete(self._arrivals(prompts, new_tokens, long_prompt, long_new_tokens))

    def generate_text(self, prompt: str, new_tokens: int) -> list[float]:
        """One stream as `[sent, token_1, ..., token_n]`, comparable with the in-process peers."""
        stream = self.loop.run_until_complete(self._streams([prompt], new_tokens))[0]
        return [stream["sent"], *stream["token_times"]]

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.run_until_complete(self.server.stop(1.0))

    async def _streams(
        self,
        prompts: list[str],
        new_tokens: int,
        json_schema: dict[str, Any] | None = None,
        loras: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        stub = rpc.TextGenerationStub(self.channel)
        adapters = loras or [""] * len(prompts)
        return list(
            await asyncio.gather(
                *(
                    self._one(stub, p, new_tokens, json_schema, lora)
                    for p, lora in zip(prompts, adapters, strict=True)
                )
            )
        )

    async def while_streaming(
        self,
        prompts: list[str],
        new_tokens: int,
        meanwhile: Callable[[rpc.TextGenerationStub, asyncio.Future[list[dict[str, Any]]]], Awaitable[T]],
    ) -> tuple[list[dict[str, Any]], T]:
        """`prompts` as concurrent streams (as `streams`); once every one has its first token,
        `meanwhile(stub, streams)` runs other requests on the same channel until `streams` is done.
        Returns the streams and what `meanwhile` returned."""
        stub = rpc.TextGenerationStub(self.channel)
        started = [asyncio.Event() for _ in prompts]
        streams = asyncio.gather(
            *(self._one(stub, p, new_tokens, first_token=e) for p, e in zip(prompts, started, strict=True))
        )
        await asyncio.wait([asyncio.ensure_future(e.wait()) for e in started])
        other = await meanwhile(stub, streams)
        return list(await streams), other

    async def _arrivals(
        self, prompts: list[str], new_tokens: int, long_prompt: str, long_new_tokens: int
    ) -> dict[str, Any]:
        async def long_prompts(
            stub: rpc.TextGenerationStub, streams: asyncio.Future[list[dict[str, Any]]]
        ) -> list[dict[str, float]]:
            long: list[dict[str, float]] = []
            while not streams.done():
                sent = time.perf_counter()
                await self._one(stub, long_prompt, long_new_tokens)
                long.append({"sent": sent, "ended": time.perf_counter()})
            return long

        streams, long = await self.while_streaming(prompts, new_tokens, long_prompts)
        return {"streams": streams, "long": long}

    async def _one(
        self,
        stub: rpc.TextGenerationStub,
        prompt: str,
        new_tokens: int,
        json_schema: dict[str, Any] | None = None,
        lora: str = "",
        first_token: asyncio.Event | None = None,
    ) -> dict[str, Any]:
        """One stream; `first_token` is set when its first token arrives."""
        request = pb.GenerateRequest(prompt=prompt, raw=True, max_tokens=new_tokens, temperature=0, lora=lora)
        if json_schema is not None:
            request.response_format.type = "json_schema"
            request.response_format.json_schema.update(json_schema)
        sent = time.perf_counter()
        times: list[float] = []
        usage = None
        # The generated stubs are typed for the sync API; on an aio channel the call is async-iterable.
        try:
            async for message in stub.GenerateStream(request):  # type: ignore[attr-defined]
                now = time.perf_counter()
                if message.HasField("token"):  # a closing message may carry no token
                    times.append(now)
                    if first_token is not None:
                        first_token.set()
                if message.HasField("usage"):
                    usage = message.usage
        finally:
            if first_token is not None:  # also for a stream that ends or fails before any token
                first_token.set()
        if usage is None:
            raise RuntimeError("the stream ended without usage")
        return {
            "sent": sent,
            "token_times": times,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        }
