"""The server's Prometheus metrics, in a registry of its own (two apps in one process, as in
the tests, do not share counts). ``GET /metrics`` renders it in the text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux)
        p = "rootdefense_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens_out = Counter(p + "tokens_out", "answer tokens sent to clients", registry=r)
        self.tokens_replaced = Counter(p + "tokens_replaced", "answer tokens the defense replaced", registry=r)
        self.rollbacks = Counter(p + "rollbacks", "answers rds-expert rolled back", registry=r)
        self.withheld = Counter(p + "withheld", "answers rds-expert withheld (finish content_filter: the steered "
                                "text never carried the expert's correction)", registry=r)
        self.cancelled = Counter(p + "cancelled", "requests stopped before their end, by reason", ["reason"],
                                 registry=r)
        self.steps = Counter(p + "decode_steps", "decoding steps the model worker ran", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge(p + "batch_size", "requests in the running batch", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request arrival to its first answer text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "request arrival to its last byte",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
