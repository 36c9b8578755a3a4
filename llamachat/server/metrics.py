"""The server's Prometheus metrics, in a registry of its own (never the process-wide one, so
two apps in one process, as in tests, count apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
