"""`python -m qlora_operator` (or `qlora-operator`): run the operator with settings from env and flags."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import uuid
from collections.abc import Sequence

import kopf
from aiohttp import web

from qlora_operator import handlers
from qlora_operator.kube import Kube
from qlora_operator.leader import LeaderLease
from qlora_operator.metrics_feed import MetricsFeed
from qlora_operator.opmetrics import OperatorMetrics
from qlora_operator.reporter import Reporter
from qlora_operator.settings import Settings, load_settings

log = logging.getLogger("qlora_operator")


async def prime(reporter: Reporter, settings: Settings) -> None:
    """Fill the reporter's view of Jobs and pods before any handler runs, so that a restarted operator
    reports a running run as running from its first refresh (and posts no false transition)."""
    await reporter.relist(settings.watch_namespaces or (None,))


async def run(settings: Settings, stop_flag: asyncio.Event | None = None,
              ready_flag: asyncio.Event | None = None) -> int:
    """Run until stopped; 1 when the leader Lease was lost (the pod restarts and waits for it again)."""
    kube = await Kube.connect()
    identity = f"qlora-operator@{socket.gethostname()}"
    lease = None
    if settings.leader_lease:
        namespace, name = settings.leader_lease.split("/")
        lease = LeaderLease(kube, namespace, name, f"{identity}/{uuid.uuid4().hex[:8]}")
        # Before anything is read or written: a second operator only waits, alive for its liveness probe.
        health = await _serve_health(settings.health_port) if settings.health_port else None
        try:
            await lease.acquire()
        finally:
            if health is not None:
                await health.cleanup()  # kopf serves /healthz from here on
    stop_flag = stop_flag or asyncio.Event()
    lost = asyncio.Event()
    keeper = asyncio.get_running_loop().create_task(lease.keep(lost)) if lease else None
    watcher = asyncio.get_running_loop().create_task(_stop_when(lost, stop_flag))
    try:
        await _operate(settings, kube, identity, stop_flag, ready_flag)
    finally:
        watcher.cancel()
        if keeper is not None:
            keeper.cancel()
            if not lost.is_set():
                await lease.release()
    return 1 if lost.is_set() else 0


async def _serve_health(port: int) -> web.AppRunner:
    """/healthz while waiting for the leader Lease (kopf, which serves it otherwise, has not started)."""
    app = web.Application()
    app.router.add_get("/healthz", lambda request: web.json_response({"waiting": "for the leader Lease"}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _stop_when(lost: asyncio.Event, stop_flag: asyncio.Event) -> None:
    await lost.wait()
    stop_flag.set()


async def _operate(settings: Settings, kube: Kube, identity: str, stop_flag: asyncio.Event,
                   ready_flag: asyncio.Event | None) -> None:
    reporter = Reporter(kube, settings)
    metrics = reporter.metrics = OperatorMetrics(reporter.phases)
    kube.observe = metrics.observe_api_call
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    await prime(reporter, settings)
    log.info("watching %s; trainer image %s; default base model %s",
             ", ".join(settings.watch_namespaces) or "all namespaces", settings.trainer_image,
             settings.default_base_model)
    feed = MetricsFeed(settings)  # the trainers' metrics, merged into status by the reporter (issue 6)
    feed.attach(reporter)
    feed.start()
    memo = kopf.Memo(operator=handlers.Operator(settings=settings, kube=kube, reporter=reporter, metrics=metrics))
    try:
        await kopf.operator(
            registry=kopf.get_default_registry(),
            clusterwide=settings.clusterwide,
            namespaces=settings.watch_namespaces,
            standalone=True,
            # Named here: kopf's own default asks the password database for the user, and the chart's user
            # (65532, or any runAsUser) has no entry in the image: the operator died at start (KeyError).
            identity=identity,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
            memo=memo,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await feed.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every handler's success per object, aiohttp every probe: only their warnings, unless debugging.
    if logging.getLogger().level > logging.DEBUG:
        for noisy in ("aiohttp.access", "kopf.objects"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
