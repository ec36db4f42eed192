"""The node agent's deciding functions: pod spec -> process spec, process result -> pod status."""

from __future__ import annotations

import base64

import pytest

from hack.localcluster import localcluster, nodeagent as na

RULES = na.parse_image_rules({"images": [
    {"pattern": "qlora-trainer*", "env": {"PATH": "/venv/bin:/usr/bin"}, "entrypoint": ["python", "-m", "qlora_trainer"]},
    {"pattern": "*/qlora-trainer:*", "env": {"PATH": "/venv/bin:/usr/bin"}, "entrypoint": ["python", "-m", "qlora_trainer"]},
    {"pattern": "python:*", "env": {"PATH": "/venv/bin:/usr/bin", "LANG": "C.UTF-8"}, "cmd": ["python3"]},
]})


def make_pod(container: dict | None = None, **spec) -> dict:
    c = {"name": "main", "image": "python:3.12", **(container or {})}
    return {"metadata": {"name": "p1", "namespace": "ml", "uid": "uid-1", "labels": {"app": "x"}},
            "spec": {"nodeName": "localnode", "serviceAccountName": "trainer", "containers": [c], **spec},
            "status": {"podIP": "127.9.0.3", "podIPs": [{"ip": "127.9.0.3"}], "hostIP": "127.0.0.1"}}


OBJECTS = {
    ("Secret", "ml", "hf"): {"kind": "Secret", "data": {"HF_TOKEN": base64.b64encode(b"hf_abc").decode()}},
    ("ConfigMap", "ml", "cfg"): {"kind": "ConfigMap", "data": {"config.json": "{}", "mode": "fast"}},
}


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


@pytest.mark.parametrize("image,pattern", [
    ("qlora-trainer:dev", "qlora-trainer*"),
    ("ghcr.io/acme/qlora-trainer:0.1.0", "*/qlora-trainer:*"),
    ("python:3.12-slim", "python:*"),
    ("nginx:1.27", None),
    ("ghcr.io/acme/other:1", None),
])
def test_images_match_the_first_rule_or_none(image, pattern):
    rule = na.match_image(image, RULES)
    assert (rule.pattern if rule else None) == pattern


def test_default_image_table_runs_project_images_and_refuses_others():
    rules = na.parse_image_rules(__import__("json").loads(localcluster.default_images("/venv/bin/python")))
    for image in ("python:3.11", "busybox:1.36", "qlora-trainer:latest", "qlora-operator:dev",
                  "ghcr.io/x/qlora-trainer:1", "ghcr.io/x/qlora-operator:1"):
        assert na.match_image(image, rules), image
    assert na.match_image("nginx:latest", rules) is None
    trainer = na.match_image("qlora-trainer:latest", rules)
    assert trainer.env["PATH"].startswith("/venv/bin:")
    assert trainer.entrypoint == ("python", "-m", "qlora_trainer")


@pytest.mark.parametrize("value,expected", [
    ("$(A)-$(B)", "1-2"),
    ("$(MISSING)", "$(MISSING)"),
    ("$$(A)", "$(A)"),
    ("cost $$5", "cost $5"),
    ("plain", "plain"),
])
def test_expansion_follows_kubernetes_rules(value, expected):
    assert na.expand(value, {"A": "1", "B": "2"}) == expected


def test_env_is_resolved_like_the_kubelet():
    pod = make_pod({"envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}},
                            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                            {"name": "URL", "value": "http://$(POD_IP):9090"},
                            {"name": "LANG", "value": "en_US.UTF-8"},
                            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}}]})
    env = na.container_env(pod, pod["spec"]["containers"][0], na.match_image("python:3", RULES), lookup, 6443)
    assert env["HF_TOKEN"] == "hf_abc"
    assert env["MODE"] == "fast" and env["CFG_mode"] == "fast"
    assert env["POD_IP"] == "127.9.0.3" and env["POD_NAME"] == "p1" and env["APP"] == "x"
    assert env["URL"] == "http://127.9.0.3:9090"
    assert env["LANG"] == "en_US.UTF-8"  # the pod's env wins over the image's
    assert env["PATH"] == "/venv/bin:/usr/bin"
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert "OPT" not in env


@pytest.mark.parametrize("var,message", [
    ({"secretKeyRef": {"name": "absent", "key": "k"}}, 'secret "absent" not found'),
    ({"secretKeyRef": {"name": "hf", "key": "other"}}, "couldn't find key other in Secret ml/hf"),
    ({"configMapKeyRef": {"name": "absent", "key": "k"}}, 'configmap "absent" not found'),
])
def test_missing_references_are_config_errors(var, message):
    pod = make_pod({"env": [{"name": "X", "valueFrom": var}]})
    with pytest.raises(na.ConfigError, match=message):
        na.container_env(pod, pod["spec"]["containers"][0], RULES[2], lookup, 6443)


def test_resource_field_ref_uses_limits_or_node_allocatable():
    pod = make_pod({"resources": {"limits": {"memory": "2Gi"}},
                    "env": [{"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                                               "divisor": "1Mi"}}},
                            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]})
    env = na.container_env(pod, pod["spec"]["containers"][0], RULES[2], lookup, 6443, {"cpu": "8"})
    assert env["MEM"] == "2048" and env["CPU"] == "8"


@pytest.mark.parametrize("container,expected", [
    ({"command": ["python", "-c", "print(1)"]}, ["python", "-c", "print(1)"]),
    ({"command": ["sh", "-c"], "args": ["echo $(X)"]}, ["sh", "-c", "echo x"]),
    ({"image": "qlora-trainer:1", "args": ["--config", "/etc/c.json"]},
     ["python", "-m", "qlora_trainer", "--config", "/etc/c.json"]),
    ({"image": "qlora-trainer:1"}, ["python", "-m", "qlora_trainer"]),
    ({}, ["python3"]),
])
def test_command_follows_entrypoint_and_cmd_rules(container, expected):
    c = {"name": "main", "image": "python:3.12", **container}
    assert na.container_argv(c, na.match_image(c["image"], RULES), {"X": "x"}) == expected


def test_volume_files_from_config_maps_secrets_and_projections():
    pod = make_pod()
    cm = na.volume_files(pod, {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "mode", "path": "m/mode"}]}},
                         lookup)
    assert cm == {"m/mode": (b"fast", 0o644)}
    secret = na.volume_files(pod, {"name": "v", "secret": {"secretName": "hf", "defaultMode": 0o400}}, lookup)
    assert secret == {"HF_TOKEN": (b"hf_abc", 0o400)}
    projected = {"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "cfg", "items": [{"key": "config.json", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
    files = na.volume_files(pod, projected, lookup, token_for=lambda aud, exp: f"tok-{exp}")
    assert files["token"][0] == b"tok-3607" and files["namespace"][0] == b"ml" and files["ca.crt"][0] == b"{}"
    assert na.volume_files(pod, {"name": "scratch", "emptyDir": {}}, lookup) is None
    with pytest.raises(na.ConfigError, match='configmap "gone" not found'):
        na.volume_files(pod, {"name": "v", "configMap": {"name": "gone"}}, lookup)
    assert na.volume_files(pod, {"name": "v", "configMap": {"name": "gone", "optional": True}}, lookup) == {}


def test_mounts_include_sub_paths_read_only_and_the_termination_file():
    c = {"name": "main", "volumeMounts": [{"name": "out", "mountPath": "/output", "subPath": "run1"},
                                          {"name": "cfg", "mountPath": "/etc/cfg"}],
         "terminationMessagePath": "/tmp/msg"}
    mounts = na.container_mounts(c, {"out": ("/node/pvc-1", False), "cfg": ("/node/pod/cfg", True)}, "/node/term")
    assert mounts == [na.Mount("/node/pvc-1/run1", "/output", False), na.Mount("/node/pod/cfg", "/etc/cfg", True),
                      na.Mount("/node/term", "/tmp/msg", False)]
    with pytest.raises(na.ConfigError):
        na.container_mounts({"name": "m", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}, {}, "/t")


@pytest.mark.parametrize("rc,code,reason", [(0, 0, "Completed"), (3, 3, "Error"), (-9, 137, "Error"),
                                            (-15, 143, "Error")])
def test_terminated_state_from_a_process_result(rc, code, reason):
    state = na.terminated_state(rc, 1000.0, 1010.0, "bye")
    assert (state["exitCode"], state["reason"], state["message"]) == (code, reason, "bye")
    assert state["startedAt"] == "1970-01-01T00:16:40Z" and state["finishedAt"] == "1970-01-01T00:16:50Z"


def test_start_error_is_reported():
    state = na.terminated_state(128, 1.0, 2.0, start_error="exec: nope: not found")
    assert (state["exitCode"], state["reason"], state["message"]) == (128, "StartError", "exec: nope: not found")


def test_termination_message_file_then_logs_on_error():
    log = b"".join(f"line {i}\n".encode() for i in range(200))
    assert na.termination_message(b'{"loss": 1}', log, "FallbackToLogsOnError", 1) == '{"loss": 1}'
    assert na.termination_message(b"", log, "File", 1) == ""
    fallback = na.termination_message(b"", log, "FallbackToLogsOnError", 1)
    assert fallback.endswith("line 199\n") and "line 119\n" not in fallback and len(fallback) <= 2048
    assert na.termination_message(b"", log, "FallbackToLogsOnError", 0) == ""  # only on error
    assert len(na.termination_message(b"x" * 10000, b"", None, 0)) == 4096


RUN = {"startedAt": "t"}


@pytest.mark.parametrize("policy,states,phase", [
    ("Never", [{"running": RUN}], "Running"),
    ("Never", [{"terminated": {"exitCode": 0}}], "Succeeded"),
    ("Never", [{"terminated": {"exitCode": 1}}], "Failed"),
    ("Never", [{"terminated": {"exitCode": 0}}, {"terminated": {"exitCode": 2}}], "Failed"),
    ("Never", [{"terminated": {"exitCode": 0}}, {"running": RUN}], "Running"),
    ("Never", [{"waiting": {"reason": "ErrImagePull"}}], "Pending"),
    ("OnFailure", [{"terminated": {"exitCode": 0}}], "Succeeded"),
    ("OnFailure", [{"waiting": {"reason": "CrashLoopBackOff"}}], "Running"),
    ("Always", [{"terminated": {"exitCode": 0}}], "Running"),
])
def test_pod_phase(policy, states, phase):
    assert na.pod_phase(policy, True, False, states) == phase


def test_pod_phase_with_init_containers():
    assert na.pod_phase("Never", False, False, [{"waiting": {}}]) == "Pending"
    assert na.pod_phase("Never", False, True, [{"waiting": {}}]) == "Failed"


def snapshot(**kw):
    base = {"podIP": "127.9.0.3", "hostIP": "127.0.0.1", "startTime": "2026-01-01T00:00:00Z", "init": [],
            "containers": [{"name": "main", "ready": True, "state": {"running": RUN}}], "initOk": True,
            "initFailed": False}
    return {**base, **kw}


def test_pod_status_running_is_ready_with_ips():
    status = na.pod_status(make_pod(restartPolicy="Never"), snapshot(), "2026-01-01T00:00:05Z")
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Running"
    assert conds["Ready"]["status"] == conds["ContainersReady"]["status"] == conds["Initialized"]["status"] == "True"
    assert status["podIP"] == "127.9.0.3" and status["podIPs"] == [{"ip": "127.9.0.3"}]
    assert status["hostIP"] == "127.0.0.1" and status["startTime"] == "2026-01-01T00:00:00Z"


def test_pod_status_keeps_transition_times_until_a_flip():
    pod = make_pod(restartPolicy="Never")
    first = na.pod_status(pod, snapshot(), "T1")
    pod["status"]["conditions"] = first["conditions"]
    same = na.pod_status(pod, snapshot(), "T2")
    assert {c["lastTransitionTime"] for c in same["conditions"]} == {"T1"}
    done = snapshot(containers=[{"name": "main", "ready": False, "state": {"terminated": {"exitCode": 0}}}])
    flipped = {c["type"]: c for c in na.pod_status(pod, done, "T3")["conditions"]}
    assert flipped["Ready"]["status"] == "False" and flipped["Ready"]["lastTransitionTime"] == "T3"
    assert flipped["Ready"]["reason"] == "PodCompleted"
    assert flipped["Initialized"]["lastTransitionTime"] == "T1"


def test_pod_status_forced_failure_carries_reason():
    status = na.pod_status(make_pod(restartPolicy="Never"), snapshot(
        phase="Failed", reason="DeadlineExceeded", message="Pod was active on the node longer than the specified deadline"),
        "T")
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")


@pytest.mark.parametrize("policy,code,restart", [("Never", 1, False), ("OnFailure", 1, True), ("OnFailure", 0, False),
                                                 ("Always", 0, True)])
def test_restart_policy(policy, code, restart):
    assert na.restart_wanted(policy, code) is restart


def test_backoff_grows_and_is_capped():
    assert [na.backoff_seconds(n) for n in range(3)] == [1, 2, 4]
    assert na.backoff_seconds(30) == 60


def test_log_tail_and_limit():
    data = b"a\nb\nc\n"
    assert na.tail_bytes(data, 2, None) == b"b\nc\n"
    assert na.tail_bytes(data, None, 3) == b"a\nb"
    assert na.tail_bytes(data, 0, None) == b""


def test_build_key_changes_with_the_inputs(tmp_path):
    (tmp_path / "go.mod").write_text("module x\n")
    (tmp_path / "main.go").write_text("package main\n")
    (tmp_path / "README.md").write_text("docs")
    key = localcluster.build_key(tmp_path, "go1.26")
    (tmp_path / "README.md").write_text("other docs")
    assert localcluster.build_key(tmp_path, "go1.26") == key  # only Go inputs count
    assert localcluster.build_key(tmp_path, "go1.27") != key
    (tmp_path / "main.go").write_text("package main\n// changed\n")
    assert localcluster.build_key(tmp_path, "go1.26") != key


def test_mount_targets_follow_symlinks_inside_the_pod_root(tmp_path):
    from hack.localcluster.podlaunch import in_root
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute, as on Debian: must stay inside the root
    assert in_root(str(root), "/var/run/secrets/token") == f"{root}/run/secrets/token"
    assert in_root(str(root), "/etc/config") == f"{root}/etc/config"


def test_hosts_file_names_the_pod_at_its_ip():
    pod = make_pod(hostname="trainer-0", subdomain="run1", hostAliases=[{"ip": "127.0.0.5", "hostnames": ["hub"]}])
    hosts = na.hosts_file(pod, "127.9.0.3")
    assert "127.0.0.1\tlocalhost" in hosts
    assert "127.9.0.3\ttrainer-0.run1.ml.svc.cluster.local\ttrainer-0" in hosts
    assert "127.0.0.5\thub" in hosts


def test_taking_events_stops_at_the_deadline_while_more_keep_coming():
    import queue

    events: queue.Queue = queue.Queue()
    events.put("first")
    now = [0.0]

    def handle(event):  # every event brings another, and takes a tenth of a second
        now[0] += 0.1
        events.put("more")

    taken = na.take_events(events, 0.5, handle, clock=lambda: now[0])
    assert taken == 5 and events.qsize() == 1


def test_taking_events_returns_when_none_come():
    import queue

    assert na.take_events(queue.Queue(), 0.05, lambda event: None) == 0


def test_a_pod_deleted_before_it_was_prepared_is_removed(tmp_path):
    """The garbage collector can delete a Job's pod before the agent has prepared it (no folder, no process):
    the agent still finishes the deletion."""
    calls = []

    class Kube:
        def call(self, method, path, body=None, **kw):
            calls.append((method, path, body))
            return {}

        def patch(self, path, body, **kw):
            calls.append(("PATCH", path, body))
            return {"metadata": {"uid": "u1", "name": "p", "namespace": "ns"}, "spec": POD_SPEC}

    agent = object.__new__(na.Agent)
    agent.kube = Kube()
    pod = {"metadata": {"uid": "u1", "name": "p", "namespace": "ns", "deletionTimestamp": "2026-12-01T00:00:00Z",
                        "deletionGracePeriodSeconds": 30}, "spec": POD_SPEC}
    run = na.PodRun(pod=pod, dir=tmp_path / "never-made")
    agent.step(run)
    deletes = [c for c in calls if c[0] == "DELETE"]
    assert deletes == [("DELETE", "/api/v1/namespaces/ns/pods/p",
                        {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                         "preconditions": {"uid": "u1"}})]
    assert run.delete_requested and not run.dir.exists()


POD_SPEC = {"containers": [{"name": "main", "image": "python"}], "restartPolicy": "Never"}
