"""The server's Prometheus metrics, in a registry of its own (never the process-wide one, so
two apps in one process, as in tests, count apart)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from ..backends.base import ChatLoad

# What the backends report of their chats, read at each scrape: (metric, help, ChatLoad field).
LOAD_GAUGES = [
    ("llamachat_batch_running", "Sequences the backend is writing (decoding or prefilling)",
     "running"),
    ("llamachat_batch_waiting", "Sequences the backend holds waiting for a slot", "waiting"),
    ("llamachat_batch_size", "Sequences in the latest decode step; 0 while none runs",
     "last_batch"),
    ("llamachat_kv_cache_tokens", "Tokens held in the KV cache, running or kept for reuse",
     "kv_tokens"),
    ("llamachat_kv_cache_capacity_tokens", "Tokens the KV cache can hold", "kv_capacity"),
]  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llamachat_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "llamachat_prompt_tokens",
            "Prompt tokens of finished replies",
            ["model"],
            registry=self.registry,
        )
        self.cached_tokens = Counter(
            "llamachat_cached_prompt_tokens",
            "Prompt tokens reused from the KV cache",
            ["model"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "llamachat_generated_tokens",
            "Tokens generated",
            ["model"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "llamachat_requests_waiting",
            "Requests waiting for a slot",
            ["model"],
            registry=self.registry,
        )
        self.running = Gauge(
            "llamachat_requests_running",
            "Replies being written",
            ["model"],
            registry=self.registry,
        )

    def watch(self, loads: Callable[[], dict[str, ChatLoad]]) -> None:
        """Report `loads()` (each served chat's ChatLoad, by model name) at every scrape."""
        self.registry.register(_LoadCollector(loads))


class _LoadCollector:
    def __init__(self, loads: Callable[[], dict[str, ChatLoad]]):
        self.loads = loads

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self.loads())

    def _families(self, loads: dict[str, ChatLoad]) -> Iterator[Metric]:
        for name, text, field in LOAD_GAUGES:
            family = GaugeMetricFamily(name, text, labels=["model"])
            for model, load in loads.items():
                family.add_metric([model], getattr(load, field))
            yield family
