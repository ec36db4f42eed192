"""Operator settings: environment variables (what the Helm chart sets), overridden by flags."""

import pytest

from qlora_operator.settings import DEFAULT_BASE_MODEL, DEFAULT_TRAINER_IMAGE, Settings, load_settings


def test_defaults_are_the_charts_defaults():
    s = load_settings([], env={})
    assert s == Settings()
    assert s.watch_namespaces == () and s.clusterwide
    assert s.trainer_image == DEFAULT_TRAINER_IMAGE == "ghcr.io/qlora-operator/qlora-trainer:0.1.0"
    assert s.default_base_model == DEFAULT_BASE_MODEL == "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
    assert (s.metrics_port, s.health_port) == (8080, 8081)
    assert s.prometheus_url is None
    assert (s.scrape_interval, s.status_min_interval) == (10.0, 5.0)


@pytest.mark.parametrize(
    "env, field, expected",
    [
        ({"QLORA_WATCH_NAMESPACES": "ml, team-a,,ml"}, "watch_namespaces", ("ml", "team-a")),
        ({"QLORA_WATCH_NAMESPACES": ""}, "watch_namespaces", ()),
        ({"QLORA_TRAINER_IMAGE": "reg.local/t:1"}, "trainer_image", "reg.local/t:1"),
        ({"QLORA_TRAINER_IMAGE": "  "}, "trainer_image", DEFAULT_TRAINER_IMAGE),
        ({"QLORA_DEFAULT_BASE_MODEL": "org/m"}, "default_base_model", "org/m"),
        ({"QLORA_METRICS_PORT": "9100"}, "metrics_port", 9100),
        ({"QLORA_HEALTH_PORT": "0"}, "health_port", 0),
        ({"QLORA_PROMETHEUS_URL": "http://prom:9090"}, "prometheus_url", "http://prom:9090"),
        ({"QLORA_PROMETHEUS_URL": ""}, "prometheus_url", None),
        ({"QLORA_SCRAPE_INTERVAL": "2.5"}, "scrape_interval", 2.5),
        ({"QLORA_STATUS_MIN_INTERVAL": "1"}, "status_min_interval", 1.0),
        ({"QLORA_LEADER_LEASE": "ops/qlora-operator"}, "leader_lease", "ops/qlora-operator"),
    ],
)
def test_environment(env, field, expected):
    assert getattr(load_settings([], env=env), field) == expected


def test_flags_override_environment():
    s = load_settings(
        ["--namespaces", "a,b", "--trainer-image", "flag/t:2", "--metrics-port", "9000"],
        env={"QLORA_WATCH_NAMESPACES": "x", "QLORA_TRAINER_IMAGE": "env/t:1", "QLORA_HEALTH_PORT": "9001"},
    )
    assert s.watch_namespaces == ("a", "b") and not s.clusterwide
    assert s.trainer_image == "flag/t:2"
    assert (s.metrics_port, s.health_port) == (9000, 9001)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"QLORA_METRICS_PORT": "http"}, "QLORA_METRICS_PORT: expected a port number"),
        ({"QLORA_HEALTH_PORT": "70000"}, "out of range"),
        ({"QLORA_SCRAPE_INTERVAL": "0"}, "QLORA_SCRAPE_INTERVAL: must be above 0"),
        ({"QLORA_STATUS_MIN_INTERVAL": "soon"}, "expected seconds"),
        ({"QLORA_LEADER_LEASE": "qlora-operator"}, "QLORA_LEADER_LEASE: expected NAMESPACE/NAME of a Lease"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        load_settings([], env=env)
