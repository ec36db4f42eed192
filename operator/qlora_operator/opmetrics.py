"""The operator's own Prometheus metrics (not the trainer's): reconciles, errors, runs by phase, latencies.

Served by prometheus_client on the metrics port from a registry of its own, so tests can make one per operator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from qlora_operator.api import Phase

# Seconds; from a few hundred milliseconds (Job creation) to an hour (a queued run waiting for a GPU).
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)


class _PhaseCollector:
    """`qlora_operator_finetunes{phase}`: resources by phase, read from the operator's view at scrape time."""

    def __init__(self, phases: Callable[[], Mapping[object, str]]):
        self._phases = phases

    def collect(self):
        counts = {p.value: 0 for p in Phase}
        for phase in self._phases().values():
            counts[phase] = counts.get(phase, 0) + 1
        family = GaugeMetricFamily("qlora_operator_finetunes", "QLoRAFinetune resources by phase", labels=["phase"])
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


class OperatorMetrics:
    def __init__(self, phases: Callable[[], Mapping[object, str]], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter("qlora_operator_reconciles", "Reconciles, by what was reconciled",
                                  ["kind"], registry=self.registry)
        self.errors = Counter("qlora_operator_reconcile_errors", "Reconciles that failed, by kind and reason",
                              ["kind", "reason"], registry=self.registry)
        self.job_created = Histogram("qlora_operator_job_created_seconds",
                                     "Seconds from a resource's creation to its Job's creation",
                                     buckets=BUCKETS, registry=self.registry)
        self.running = Histogram("qlora_operator_running_seconds",
                                 "Seconds from a resource's creation to its trainer running",
                                 buckets=BUCKETS, registry=self.registry)
        self.api_calls = Histogram("qlora_operator_api_request_seconds",
                                   "Seconds per API call the operator makes itself (not kopf's watches)",
                                   ["verb", "code"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_PhaseCollector(phases))

    def observe_api_call(self, verb: str, seconds: float, code: int) -> None:
        self.api_calls.labels(verb, str(code)).observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
