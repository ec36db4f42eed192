"""The operator's settings: environment variables (the Helm chart sets them) overridden by command-line flags.

One frozen dataclass, read once at start and passed to whatever needs it; nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence

DEFAULT_TRAINER_IMAGE = "ghcr.io/qlora-operator/qlora-trainer:0.1.0"
DEFAULT_BASE_MODEL = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an operator deployment may change; the defaults are the Helm chart's defaults."""

    # Empty: every namespace (cluster-wide); otherwise exactly these.
    watch_namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    default_base_model: str = DEFAULT_BASE_MODEL
    metrics_port: int = 8080
    health_port: int = 8081
    # Issue 6: read trainer metrics through this Prometheus server instead of from the pods.
    prometheus_url: str | None = None
    scrape_interval: float = 10.0
    # The least time between two status patches of one resource that only move metrics.
    status_min_interval: float = 5.0
    log_level: str = "INFO"
    # NAMESPACE/NAME of the Lease that lets one operator act at a time (leader.py); None: no election.
    leader_lease: str | None = None

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces


# (field, environment variable, flag, parser); flags override the environment.
_SOURCES = (
    ("watch_namespaces", "QLORA_WATCH_NAMESPACES", "--namespaces", "namespaces"),
    ("trainer_image", "QLORA_TRAINER_IMAGE", "--trainer-image", "text"),
    ("default_base_model", "QLORA_DEFAULT_BASE_MODEL", "--default-base-model", "text"),
    ("metrics_port", "QLORA_METRICS_PORT", "--metrics-port", "port"),
    ("health_port", "QLORA_HEALTH_PORT", "--health-port", "port"),
    ("prometheus_url", "QLORA_PROMETHEUS_URL", "--prometheus-url", "optional"),
    ("scrape_interval", "QLORA_SCRAPE_INTERVAL", "--scrape-interval", "seconds"),
    ("status_min_interval", "QLORA_STATUS_MIN_INTERVAL", "--status-min-interval", "seconds"),
    ("log_level", "QLORA_LOG_LEVEL", "--log-level", "text"),
    ("leader_lease", "QLORA_LEADER_LEASE", "--leader-lease", "lease"),
)


def _parse(kind: str, name: str, raw: str):
    raw = raw.strip()
    if kind == "namespaces":
        return tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if kind == "optional":
        return raw or None
    if kind == "lease":
        namespace, _, lease = raw.partition("/")
        if not namespace or not lease or "/" in lease:
            raise ValueError(f"{name}: expected NAMESPACE/NAME of a Lease, got {raw!r}")
        return raw
    if kind == "port":
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"{name}: expected a port number, got {raw!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"{name}: port {port} is out of range 0-65535")
        return port
    if kind == "seconds":
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{name}: expected seconds, got {raw!r}") from None
        if seconds <= 0:
            raise ValueError(f"{name}: must be above 0, got {raw!r}")
        return seconds
    if not raw:
        raise ValueError(f"{name}: must not be empty")
    return raw


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-operator",
        description="Runs QLoRAFinetune resources as Kubernetes Jobs. Every flag has an environment variable.",
    )
    for field, env, flag, _ in _SOURCES:
        parser.add_argument(flag, dest=field, default=None, help=f"(env {env})")
    return parser


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default: the process environment) overridden by the flags in `argv`."""
    env = os.environ if env is None else env
    flags = vars(argument_parser().parse_args([] if argv is None else list(argv)))
    values = {}
    for field, variable, flag, kind in _SOURCES:
        if flags.get(field) is not None:
            values[field] = _parse(kind, flag, flags[field])
        elif env.get(variable, "").strip():  # an empty variable (a blank Helm value) means the default
            values[field] = _parse(kind, variable, env[variable])
    return Settings(**values)
