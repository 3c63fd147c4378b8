"""Prometheus metrics, served over HTTP when asked (`--metrics-port`).

Names follow text-generation-inference's (`tgi_*` becomes `textgen_*`) wherever they mean the same,
so its dashboards carry over; prometheus_client adds `_total` to counters. Two sources feed them:
- the scheduler, after each step (`observe_step`): queue and batch gauges, forward-pass times,
  tokens, time to first token;
- the servicer, when a request ends (`observe_request`): counts by outcome and the per-request
  histograms. As in TGI, the duration and token histograms take successful requests only;
- the server, once the model has loaded (`observe_model`): what is served, and the KV capacity.
Every Generate/GenerateStream call is counted once when it ends, as exactly one of success,
failure (by status code) or cancelled (the client cancelled or its deadline passed).
"""

from __future__ import annotations

import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from textgen import __version__

from .request_log import RequestRecord
from .scheduler import StepStats

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The metrics endpoint serves each connection on a thread of its own (one request per connection):
# a connection that has sent no request within this time is closed, and beyond this many at once new
# ones are closed unanswered. Without them every idle connection held a thread for good.
METRICS_READ_TIMEOUT_S = 10.0
MAX_METRICS_CONNECTIONS = 64


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        # -- from the scheduler ----------------------------------------------------------------
        self.queue_size = Gauge("textgen_queue_size", "Requests waiting for admission", registry=r)
        self.batch_current_size = Gauge(
            "textgen_batch_current_size", "Sequences in the running batch", registry=r
        )
        self.kv_positions = Gauge(
            "textgen_kv_positions",
            "KV cache positions the running batch held at the peak of the last step (0 when empty)",
            registry=r,
        )
        self.batch_forward_duration = Histogram(
            "textgen_batch_forward_duration",
            "Forward pass time of a batch, by method (prefill or decode), in seconds",
            ["method"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.batch_forward_failures = Counter(
            "textgen_batch_forward_failures",
            "Forward passes that raised, by method (prefill; decode; decode_part: part of a batch whose "
            "pass failed; decode_alone: a row's own pass after the parts it was in failed) and cause "
            "(out_of_memory or error)",
            ["method", "cause"],
            registry=r,
        )
        # observe_step runs after every step, between two forward passes: children looked up once.
        self._prefill_duration = self.batch_forward_duration.labels("prefill")
        self._decode_duration = self.batch_forward_duration.labels("decode")
        self.generated_tokens = Counter(
            "textgen_generated_tokens", "Tokens generated, all requests (cancelled ones too)", registry=r
        )
        self.prefill_tokens = Counter(
            "textgen_prefill_tokens", "Prompt tokens run through a forward pass", registry=r
        )
        self.prefix_cache_tokens = Counter(
            "textgen_prefix_cache_tokens",
            "Prompt tokens whose keys and values came from a finished sequence's slot (not prefilled)",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "From admission to the queue to the first token",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        # -- from the servicer, per request ----------------------------------------------------
        self.request_count = Counter(
            "textgen_request_count", "Generate and GenerateStream calls, counted when they end", registry=r
        )
        self.request_success = Counter(
            "textgen_request_success", "Requests that generated to the end", ["finish_reason"], registry=r
        )
        self.request_failure = Counter(
            "textgen_request_failure",
            "Requests that ended with an error status, by code (refusals included)",
            ["code"],
            registry=r,
        )
        self.request_cancelled = Counter(
            "textgen_request_cancelled",
            "Requests whose client left: CANCELLED, or DEADLINE_EXCEEDED",
            ["code"],
            registry=r,
        )
        self.request_duration = self._seconds("request_duration", "End-to-end time of a request")
        self.request_validation_duration = self._seconds(
            "request_validation_duration", "From arrival to the scheduler's queue (validation, tokenizing)"
        )
        self.request_queue_duration = self._seconds(
            "request_queue_duration", "Time in the queue before the prefill began"
        )
        self.request_inference_duration = self._seconds(
            "request_inference_duration", "From the start of the prefill to the last token"
        )
        self.request_mean_time_per_token_duration = Histogram(
            "textgen_request_mean_time_per_token_duration",
            "Mean time between output tokens of a request (inter-token latency), in seconds",
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.request_input_length = Histogram(
            "textgen_request_input_length",
            "Prompt tokens per request",
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.request_generated_tokens = Histogram(
            "textgen_request_generated_tokens",
            "Generated tokens per request",
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.auth_failure = Counter(
            "textgen_auth_failure",
            "Calls refused UNAUTHENTICATED, by reason (missing or invalid token)",
            ["reason"],
            registry=r,
        )
        # -- from start-up: what this replica serves, for dashboards that tell replicas apart --------
        self.model = Info("textgen_model", "The model served and how (once it has loaded)", registry=r)
        self.kv_capacity = Gauge(
            "textgen_kv_capacity_positions",
            "KV cache positions allocated at start-up, slots x positions a slot (0 until the model loads)",
            registry=r,
        )
        self._http: WSGIServer | None = None

    def _seconds(self, name: str, description: str) -> Histogram:
        return Histogram(
            f"textgen_{name}", f"{description}, in seconds", buckets=_REQUEST_BUCKETS, registry=self.registry
        )

    def observe_step(self, stats: StepStats) -> None:
        """Called by the scheduler thread after each iteration."""
        self.queue_size.set(stats.queue_size)
        self.batch_current_size.set(stats.batch_size)
        # The step's peak; an empty batch holds nothing, whatever the step held before it emptied.
        self.kv_positions.set(stats.kv_positions if stats.batch_size else 0)
        if stats.tokens:
            self.generated_tokens.inc(stats.tokens)
        if stats.prefill_positions:
            self.prefill_tokens.inc(stats.prefill_positions)
        if stats.reused_positions:
            self.prefix_cache_tokens.inc(stats.reused_positions)
        for seconds in stats.first_token_seconds:
            self.time_to_first_token.observe(seconds)
        if stats.prefill_seconds:
            self._prefill_duration.observe(stats.prefill_seconds)
        if stats.decode_seconds:
            self._decode_duration.observe(stats.decode_seconds)
        for method, cause in stats.failed_passes:
            self.batch_forward_failures.labels(method, cause).inc()

    def observe_model(
        self,
        *,
        model: str,
        dtype: str,
        weight_dtype: str,
        execution_provider: str,
        kv_slots: int,
        slot_positions: int,
    ) -> None:
        """Called once the model has loaded."""
        self.model.info(
            {
                "model": model,
                "dtype": dtype,
                "weight_dtype": weight_dtype,
                "execution_provider": execution_provider,
                "version": __version__,
            }
        )
        self.kv_capacity.set(kv_slots * slot_positions)

    def observe_request(self, record: RequestRecord) -> None:
        """Called on the event loop when a Generate or GenerateStream call ends."""
        self.request_count.inc()
        if record.cancelled:
            self.request_cancelled.labels(record.code.name).inc()
            return
        if not record.succeeded:
            self.request_failure.labels(record.code.name).inc()
            return
        self.request_success.labels(record.finish_reason or "unknown").inc()
        for histogram, value in (
            (self.request_duration, record.duration),
            (self.request_validation_duration, record.validation_duration),
            (self.request_queue_duration, record.queue_duration),
            (self.request_inference_duration, record.inference_duration),
            (self.request_mean_time_per_token_duration, record.mean_time_per_token),
        ):
            if value is not None:
                histogram.observe(value)
        self.request_input_length.observe(record.prompt_tokens)
        self.request_generated_tokens.observe(record.completion_tokens)

    def observe_auth_failure(self, reason: str) -> None:
        self.auth_failure.labels(reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 picks a free port) in a thread; returns the bound port.
        Raises OSError when it cannot listen."""
        # As prometheus_client's start_http_server: the address family and address `host` resolves to.
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(_BoundedServer):
            address_family = family

        server = make_server(
            str(address[0]), port, make_wsgi_app(self.registry), Server, handler_class=_Handler
        )
        threading.Thread(target=server.serve_forever, name="textgen-metrics", daemon=True).start()
        self._http = server
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop serving /metrics (blocks up to half a second: the HTTP server's poll interval)."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _Handler(WSGIRequestHandler):
    """prometheus_client's handler, with a read timeout: a client that sends nothing frees its thread."""

    timeout = METRICS_READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (as prometheus_client's own handler)."""


class _BoundedServer(ThreadingWSGIServer):
    """At most MAX_METRICS_CONNECTIONS connections served at once; more are closed unanswered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._places = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._places.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else gives the place back
            self._places.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()
