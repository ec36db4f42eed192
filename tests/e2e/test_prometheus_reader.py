"""The operator's Prometheus mode against a real Prometheus server: the series a trainer serves, scraped by
Prometheus and read back through its query API, give the same reading as the pod itself; when the target
goes away, Prometheus' staleness makes the reading fail instead of serving old values as new."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import start_http_server

from qlora_operator import trainer_metrics as tm
from qlora_trainer.contract import Metric, Phase
from tests.prometheus_server import PrometheusServer, prometheus_binary, static_job
from tests.unit.test_trainer_metrics import FULL, trainer_registry

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (apt-get install prometheus)"),
]


def read(reader: tm.MetricsReader, namespace: str, pod: str, ip: str | None):
    async def go():
        try:
            return await reader.read(namespace, pod, ip)
        finally:
            await reader.close()

    return asyncio.run(go())


def test_prometheus_mode_reads_what_the_pod_serves_and_notices_when_it_goes(tmp_path):
    registry = trainer_registry(FULL, Phase.EVALUATING)
    exporter, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = exporter.server_address[1]
    labels = {"namespace": "ml", "pod": "support-bot-0-x1y2z"}
    try:
        with PrometheusServer(tmp_path / "prom", [static_job("trainer", [f"127.0.0.1:{port}"], labels)]) as prom:
            prom.wait_for_series(tm.promql_selector("ml", "support-bot-0-x1y2z"))
            via_prometheus = read(tm.MetricsReader(prometheus_url=prom.url), "ml", "support-bot-0-x1y2z", None)
            direct = read(tm.MetricsReader(port=port), "ml", "support-bot-0-x1y2z", "127.0.0.1")
            assert via_prometheus == direct
            assert via_prometheus.phase is Phase.EVALUATING and via_prometheus.step == FULL[Metric.STEP]

            # Another pod's series are not this pod's.
            with pytest.raises(tm.MetricsUnreadable, match="no trainer series"):
                read(tm.MetricsReader(prometheus_url=prom.url), "ml", "support-bot-0-other", None)

            exporter.shutdown()
            exporter.server_close()
            deadline = time.monotonic() + 60
            while True:
                try:
                    read(tm.MetricsReader(prometheus_url=prom.url), "ml", "support-bot-0-x1y2z", None)
                except tm.MetricsUnreadable as err:
                    assert "no trainer series" in str(err)
                    break
                assert time.monotonic() < deadline, "Prometheus kept serving the series of a target that is gone"
                time.sleep(0.5)
    finally:
        exporter.shutdown()
        exporter.server_close()
        thread.join(timeout=5)


def test_an_unreachable_prometheus_is_a_short_error():
    with pytest.raises(tm.MetricsUnreadable) as err:
        read(tm.MetricsReader(prometheus_url="http://127.0.0.1:9", timeout=1), "ml", "p", None)
    assert "\n" not in str(err.value)
