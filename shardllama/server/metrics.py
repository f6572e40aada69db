"""``GET /metrics``: the server's figures in Prometheus' text format (``prometheus-client``).

Each application has its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide one), so
several servers in one process each count their own.  Three sources:

- the HTTP layer counts every answer by route (the route's pattern, so ids do not multiply the series) and
  status (:func:`metrics_middleware`);
- the engine calls :meth:`Metrics.observe` after each forward pass and at each request's first token
  (``Engine(observer=...)``), which fill the latency histograms;
- the engine's own counters and gauges (tokens, prompt-cache hits, queue depth...) are read from
  ``Engine.stats()`` at each scrape (:class:`_EngineCollector`), so they are never counted twice.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .common import SERVING, STATE, ServerState

PREFIX = "shardllama_"
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Engine.stats() key -> (metric name, help): counters, then gauges.
ENGINE_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of the requests admitted"),
    "generated": ("generation_tokens", "Tokens generated"),
    "computed_tokens": ("computed_prompt_tokens", "Prompt tokens fed through the model (not from the cache)"),
    "cache_hits": ("prompt_cache_hits", "Requests that reused at least one prompt token from the prompt cache"),
    "cached_tokens": ("prompt_cache_cached_tokens", "Prompt tokens reused from the prompt cache"),
    "decode_passes": ("decode_passes", "Decode forward passes"),
    "prefill_passes": ("prefill_passes", "Prefill forward passes"),
}
ENGINE_OUTCOMES = ("requests", "completed", "cancelled", "failed", "rejected")
ENGINE_GAUGES = {
    "waiting": ("queue_depth", "Requests waiting for a run place"),
    "running": ("running_requests", "Requests generating now"),
    "cache_entries": ("prompt_cache_entries", "Entries in the prompt cache"),
    "cache_bytes_used": ("prompt_cache_bytes", "KV-cache bytes the prompt cache holds"),
}


class Metrics:
    """The registry of one application and the metrics the server and the engine feed."""

    def __init__(self, state: ServerState):
        self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.pass_seconds = Histogram(PREFIX + "forward_pass_seconds", "Duration of one forward pass",
                                      ["kind"], buckets=PASS_BUCKETS, registry=self.registry)
        self.first_token_seconds = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "From a request's admission to its first token",
                                             buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(state))

    def observe(self, kind: str, seconds: float, n_tokens: int) -> None:
        """The engine's observer: ``kind`` "prefill" or "decode" for a forward pass, "first_token" for a
        request's first token (``n_tokens``, the tokens fed or the prompt's, is not recorded yet)."""
        if kind == "first_token":
            self.first_token_seconds.observe(seconds)
        else:
            self.pass_seconds.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's counters and gauges, read at each scrape (nothing while the model loads)."""

    def __init__(self, state: ServerState):
        self.state = state

    def describe(self):
        return []  # the families depend on whether the engine exists yet: none registered ahead

    def collect(self):
        ready = GaugeMetricFamily(PREFIX + "ready", "1 when the server takes requests (GET /health is 200)")
        ready.add_metric([], float(self.state.phase == SERVING and self.state.unavailable() is None))
        yield ready
        engine = self.state.engine
        if engine is None:
            return
        stats = engine.stats()
        for key, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=stats[key])
        outcomes = CounterMetricFamily(PREFIX + "engine_requests", "Engine requests by outcome (requests: "
                                       "admitted to run; rejected: the queue was full)", labels=["outcome"])
        for key in ENGINE_OUTCOMES:
            outcomes.add_metric([key], stats[key])
        yield outcomes
        for key, (name, doc) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats[key])


def metrics_middleware():
    """Counts every answer of the application (and its sub-applications) by route pattern and status."""

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        response = await handler(request)  # the error middlewares inside turn failures into answers
        metrics = request.app[STATE].metrics
        if metrics is not None:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            metrics.requests.labels(route, str(response.status)).inc()
        return response

    return count


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
