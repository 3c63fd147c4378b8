"""Prometheus metrics: the scheduler's queue, batch and step timings, served over HTTP when asked."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .scheduler import StepStats

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.queue_size = Gauge(
            "textgen_queue_size", "Requests waiting for admission", registry=self.registry
        )
        self.batch_size = Gauge(
            "textgen_batch_size", "Sequences in the running batch", registry=self.registry
        )
        self.kv_positions = Gauge(
            "textgen_kv_positions",
            "KV cache positions the running batch held at the peak of the last step",
            registry=self.registry,
        )
        self.steps = Counter("textgen_steps", "Scheduler iterations", registry=self.registry)
        self.prefill_seconds = Histogram(
            "textgen_prefill_seconds",
            "Prefill forward pass time",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            "textgen_decode_seconds",
            "Decode forward pass time (whole batch)",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "textgen_generated_tokens", "Tokens generated, all requests", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "From admission to the queue to the first token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "textgen_requests_finished",
            "Requests that ended generating",
            ["finish_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "textgen_requests_rejected",
            "Requests refused before generating",
            ["code"],
            registry=self.registry,
        )
        self._seen_steps = 0

    def observe_step(self, stats: StepStats) -> None:
        """Called by the scheduler thread after each iteration."""
        self.queue_size.set(stats.queue_size)
        self.batch_size.set(stats.batch_size)
        self.kv_positions.set(stats.kv_positions)
        self.steps.inc(stats.steps - self._seen_steps)
        self._seen_steps = stats.steps
        self.generated_tokens.inc(stats.tokens)
        for seconds in stats.first_token_seconds:
            self.time_to_first_token.observe(seconds)
        for reason in stats.finished:
            self.finished.labels(reason).inc()
        if stats.prefill_seconds:
            self.prefill_seconds.observe(stats.prefill_seconds)
        if stats.decode_seconds:
            self.decode_seconds.observe(stats.decode_seconds)

    def observe_rejection(self, code: grpc.StatusCode) -> None:
        self.rejected.labels(code.name).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
