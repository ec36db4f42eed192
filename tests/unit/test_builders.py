"""The pure builders: a QLoRAFinetune spec -> trainer config, ConfigMap, Job, headless Service."""

import copy
import json

import pytest
from qlora_trainer.config import TrainerConfig

from qlora_operator import builders
from qlora_operator.api import QLoRAFinetuneSpec
from qlora_operator.settings import Settings

OWNER = builders.Owner(name="support-bot", namespace="ml", uid="uid-1")
SETTINGS = Settings(trainer_image="reg.local/qlora-trainer:9", default_base_model="org/default-model")
MINIMAL = {
    "dataset": {"configMap": {"name": "support-qa", "key": "data.jsonl"}},
    "output": {"pvc": {"claimName": "adapters", "path": "support-bot"}},
}


def spec_of(**changes) -> QLoRAFinetuneSpec:
    raw = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return QLoRAFinetuneSpec.model_validate(raw)


def job_of(**changes):
    return builders.build_job(OWNER, spec_of(**changes), SETTINGS)


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(job):
    return {e["name"]: e for e in container(job)["env"]}


def mounts_of(job):
    return {m["mountPath"]: m for m in container(job)["volumeMounts"]}


def volumes_of(job):
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


# --------------------------------------------------------------------------------- trainer config

@pytest.mark.parametrize(
    "changes, expected_model, expected_dataset",
    [
        ({}, {"name": "org/default-model", "revision": "main", "trustRemoteCode": False},
         {"path": "/data/data.jsonl"}),
        ({"model": {"name": "org/m", "revision": "v2", "trustRemoteCode": True}},
         {"name": "org/m", "revision": "v2", "trustRemoteCode": True}, {"path": "/data/data.jsonl"}),
        ({"model": {"name": "label-only", "pvc": {"claimName": "models", "path": "exaone"}}},
         {"name": "/models/exaone", "revision": "main", "trustRemoteCode": False}, {"path": "/data/data.jsonl"}),
        ({"model": {"pvc": {"claimName": "models"}}},
         {"name": "/models", "revision": "main", "trustRemoteCode": False}, {"path": "/data/data.jsonl"}),
        ({"dataset": {"pvc": {"claimName": "data", "path": "sets/qa.parquet"}}}, None,
         {"path": "/dataset/sets/qa.parquet"}),
        ({"dataset": {"hf": {"name": "org/ds", "subset": "ko"}}}, None,
         {"hf": {"name": "org/ds", "split": "train", "subset": "ko"}}),
        ({"dataset": {"inline": [{"question": "q", "answer": "a"}]}}, None,
         {"inline": [{"question": "q", "answer": "a"}]}),
    ],
)
def test_trainer_config_sources(changes, expected_model, expected_dataset):
    raw = copy.deepcopy(MINIMAL) | changes
    config = builders.build_trainer_config(QLoRAFinetuneSpec.model_validate(raw), SETTINGS)
    TrainerConfig.model_validate(config)  # the trainer accepts what the operator writes
    if expected_model:
        assert config["model"] == expected_model
    source = {k: v for k, v in config["dataset"].items() if k in ("path", "hf", "inline")}
    assert source == expected_dataset


def test_trainer_config_passes_recipe_and_dataset_options_through():
    spec = QLoRAFinetuneSpec.model_validate(MINIMAL | {
        "dataset": {"configMap": {"name": "c", "key": "k.jsonl"}, "format": "qa", "fields": {"question": "q"},
                    "systemPrompt": "You are kind.", "evalFraction": 0.1},
        "lora": {"r": 8, "alpha": 16, "targetModules": "all-linear"},
        "training": {"maxSteps": 30, "batchSize": "auto", "learningRate": 1e-4},
        "quantization": {"bits": 8},
        "resources": {"gpus": 0},
        "output": {"pvc": {"claimName": "out"}, "mergeAdapter": True},
    })
    config = builders.build_trainer_config(spec, SETTINGS)
    assert config["dataset"] | {} == {"path": "/data/k.jsonl", "format": "qa", "fields": {"question": "q"},
                                      "systemPrompt": "You are kind.", "evalFraction": 0.1}
    assert (config["lora"]["r"], config["lora"]["alpha"], config["lora"]["targetModules"]) == (8, 16, "all-linear")
    assert (config["training"]["maxSteps"], config["training"]["batchSize"]) == (30, "auto")
    assert config["quantization"]["bits"] == 8
    assert config["gpus"] == 0
    assert config["output"] == {"dir": "/output", "mergeAdapter": True}
    assert config["metrics"] == {"port": 9090}
    assert config["terminationMessagePath"] == "/dev/termination-log"


def test_config_map_holds_the_config_and_never_the_token():
    spec = spec_of(model={"tokenSecretRef": {"name": "hf", "key": "TOKEN"}})
    cm = builders.build_config_map(OWNER, spec, SETTINGS)
    assert cm["metadata"]["name"] == "support-bot-config"
    document = json.loads(cm["data"]["config.json"])
    assert document == builders.build_trainer_config(spec, SETTINGS)
    assert "hf" not in json.dumps(document["model"]) and "TOKEN" not in cm["data"]["config.json"]


# ------------------------------------------------------------------------------------------- Job

def test_job_basics():
    job = job_of()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "support-bot" and job["metadata"]["namespace"] == "ml"
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False
    assert spec["completionMode"] == "NonIndexed" and spec["completions"] == spec["parallelism"] == 1
    assert spec["podReplacementPolicy"] == "Failed"
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["automountServiceAccountToken"] is False
    c = container(job)
    assert c["name"] == "trainer" and c["image"] == "reg.local/qlora-trainer:9"
    assert c["command"] == ["python", "-m", "qlora_trainer"] and c["args"] == ["--config", "/etc/qlora/config.json"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}


def test_pod_failure_policy_ignores_disruptions_and_fails_fast_on_bad_input():
    rules = job_of()["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # A SIGTERM checkpoint (a pod deleted by hand) is no failure either.
    assert rules[1]["action"] == "Ignore" and rules[1]["onExitCodes"]["values"] == [143]
    assert rules[2]["action"] == "FailJob" and rules[2]["onExitCodes"]["values"] == [64, 65, 66]
    assert rules[3]["action"] == "Count" and rules[3]["onExitCodes"]["values"] == [67, 70, 71]
    assert all(r.get("onExitCodes", {}).get("containerName", "trainer") == "trainer" for r in rules)


def test_security_context_is_restricted():
    job = job_of()
    pod_sc = job["spec"]["template"]["spec"]["securityContext"]
    c_sc = container(job)["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] == 1000 and pod_sc["fsGroup"] == 1000
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c_sc["runAsNonRoot"] and c_sc["allowPrivilegeEscalation"] is False
    assert c_sc["readOnlyRootFilesystem"] is True and c_sc["capabilities"] == {"drop": ["ALL"]}
    # A read-only root still needs somewhere to write: /tmp and the caches are emptyDirs.
    assert {"/tmp", "/cache", "/dev/shm"} <= set(mounts_of(job))
    assert volumes_of(job)["tmp"] == {"name": "tmp", "emptyDir": {}}


@pytest.mark.parametrize(
    "component, obj",
    [
        ("trainer", job_of()),
        ("config", builders.build_config_map(OWNER, spec_of(), SETTINGS)),
        ("rendezvous", builders.build_service(OWNER, spec_of(resources={"nodes": 2}))),
    ],
)
def test_every_child_is_labelled_and_controlled_by_the_resource(component, obj):
    meta = obj["metadata"]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "qlora-trainer",
        "app.kubernetes.io/instance": "support-bot",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "qlora-operator",
        "app.kubernetes.io/part-of": "qlora-operator",
        "qlora.io/finetune": "support-bot",
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": "qlora.io/v1alpha1", "kind": "QLoRAFinetune", "name": "support-bot", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True,
    }]


def test_pods_carry_the_labels_the_operator_watches():
    template = job_of()["spec"]["template"]["metadata"]
    assert template["labels"]["qlora.io/finetune"] == "support-bot"
    assert template["annotations"] == {"qlora.io/finetune-name": "support-bot"}


@pytest.mark.parametrize(
    "changes, check",
    [
        ({"runtime": {"backoffLimit": 0}}, lambda j: j["spec"]["backoffLimit"] == 0),
        ({"runtime": {"activeDeadlineSeconds": 600}}, lambda j: j["spec"]["activeDeadlineSeconds"] == 600),
        ({"runtime": {"ttlSecondsAfterFinished": 0}}, lambda j: j["spec"]["ttlSecondsAfterFinished"] == 0),
        ({"suspend": True}, lambda j: j["spec"]["suspend"] is True),
        ({"runtime": {"queueName": "gpu-queue"}},
         lambda j: j["spec"]["suspend"] is True
         and j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"),
        ({"runtime": {"image": "mine/trainer:1"}}, lambda j: container(j)["image"] == "mine/trainer:1"),
        ({"runtime": {"serviceAccountName": "trainer"}},
         lambda j: j["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"),
        ({"runtime": {"imagePullSecrets": [{"name": "regcred"}]}},
         lambda j: j["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]),
        ({"resources": {"gpus": 4, "gpuResourceName": "amd.com/gpu", "cpu": "8", "memory": "48Gi"}},
         lambda j: container(j)["resources"] == {"limits": {"amd.com/gpu": "4", "memory": "48Gi"},
                                                 "requests": {"cpu": "8", "memory": "48Gi"}}),
        ({"resources": {"gpus": 0}}, lambda j: container(j)["resources"] == {}),
        ({"resources": {"nodeSelector": {"gpu": "h100"}, "priorityClassName": "high",
                        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        "affinity": {"nodeAffinity": {"x": 1}}}},
         lambda j: (lambda p: p["nodeSelector"] == {"gpu": "h100"} and p["priorityClassName"] == "high"
                    and p["tolerations"][0]["key"] == "gpu" and p["affinity"] == {"nodeAffinity": {"x": 1}})(
             j["spec"]["template"]["spec"])),
    ],
)
def test_job_follows_the_spec(changes, check):
    raw = copy.deepcopy(MINIMAL) | changes
    job = builders.build_job(OWNER, QLoRAFinetuneSpec.model_validate(raw), SETTINGS)
    assert check(job)


def test_unset_placement_is_left_out():
    pod = job_of()["spec"]["template"]["spec"]
    for field in ("serviceAccountName", "imagePullSecrets", "nodeSelector", "tolerations", "affinity",
                  "priorityClassName", "subdomain"):
        assert field not in pod


@pytest.mark.parametrize(
    "changes, present, absent",
    [
        ({}, {"POD_IP", "POD_NAME", "POD_NAMESPACE", "HF_HOME", "HOME"}, {"HF_TOKEN", "HF_HUB_OFFLINE", "NNODES"}),
        ({"model": {"tokenSecretRef": {"name": "hf"}}}, {"HF_TOKEN"}, {"HF_HUB_OFFLINE"}),
        ({"model": {"pvc": {"claimName": "models", "path": "m"}}}, {"HF_HUB_OFFLINE"}, {"HF_TOKEN"}),
        ({"runtime": {"env": [{"name": "WANDB_PROJECT", "value": "p"}]}}, {"WANDB_PROJECT"}, set()),
    ],
)
def test_env(changes, present, absent):
    env = env_of(builders.build_job(OWNER, QLoRAFinetuneSpec.model_validate(copy.deepcopy(MINIMAL) | changes),
                                    SETTINGS))
    assert present <= set(env) and not (absent & set(env))


def test_token_only_through_a_secret_reference_and_pod_ip_from_the_downward_api():
    env = env_of(job_of(model={"tokenSecretRef": {"name": "hf-token", "key": "token"}}))
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert env["POD_IP"] == {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def test_runtime_env_passes_through_with_secret_references():
    var = {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}
    env = env_of(job_of(runtime={"env": [var]}))
    assert env["WANDB_API_KEY"] == var


@pytest.mark.parametrize(
    "changes, volumes, mounts",
    [
        ({}, {"config": {"configMap": {"name": "support-bot-config"}},
              "dataset": {"configMap": {"name": "support-qa", "items": [{"key": "data.jsonl", "path": "data.jsonl"}]}},
              "output": {"persistentVolumeClaim": {"claimName": "adapters"}}},
         {"/etc/qlora": True, "/data": True, "/output": False}),
        ({"dataset": {"pvc": {"claimName": "data", "path": "a.jsonl"}}},
         {"dataset": {"persistentVolumeClaim": {"claimName": "data", "readOnly": True}}},
         {"/dataset": True}),
        ({"dataset": {"inline": [{"text": "t"}]}}, {}, {}),
        ({"model": {"pvc": {"claimName": "models", "path": "m"}}},
         {"model": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}}, {"/models": True}),
    ],
)
def test_volumes(changes, volumes, mounts):
    job = builders.build_job(OWNER, QLoRAFinetuneSpec.model_validate(copy.deepcopy(MINIMAL) | changes), SETTINGS)
    have = volumes_of(job)
    for name, source in volumes.items():
        assert {k: v for k, v in have[name].items() if k != "name"} == source
    for path, read_only in mounts.items():
        assert mounts_of(job)[path].get("readOnly", False) is read_only
    if "inline" in changes.get("dataset", {}):
        assert "dataset" not in have and "/data" not in mounts_of(job)


# ----------------------------------------------------------------------------------- multi-node

def test_multi_node_is_an_indexed_job_with_a_headless_service():
    spec = spec_of(resources={"nodes": 3, "gpus": 8})
    job = builders.build_job(OWNER, spec, SETTINGS)
    service = builders.build_service(OWNER, spec)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == "support-bot"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"qlora.io/finetune": "support-bot", "app.kubernetes.io/component": "trainer"}
    env = env_of(job)
    assert env["NNODES"]["value"] == "3"
    assert env["MASTER_ADDR"]["value"] == "support-bot-0.support-bot"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("job-completion-index']")
    assert env["RENDEZVOUS_TIMEOUT_SECONDS"]["value"] == "600"  # runtime.rendezvousTimeoutSeconds' default
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container(job)["ports"]
    kinds = [c["kind"] for c in builders.build_children(OWNER, spec, SETTINGS)]
    assert kinds == ["ConfigMap", "Service", "Job"]


@pytest.mark.parametrize(
    "resources, data_parallel",
    [({}, False), ({"gpus": 0}, False), ({"gpus": 2}, True), ({"nodes": 2, "gpus": 1}, True),
     ({"nodes": 2, "gpus": 0}, True)],
)
def test_data_parallel_pods_run_with_nvlink_multicast_off(resources, data_parallel):
    env = env_of(job_of(resources=resources))
    off = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert {name: env[name]["value"] for name in off if name in env} == (off if data_parallel else {})


def test_runtime_env_sets_nvlink_multicast_its_own_way():
    job = job_of(resources={"gpus": 8}, runtime={"env": [{"name": "NCCL_NVLS_ENABLE", "value": "1"}]})
    assert [e["value"] for e in container(job)["env"] if e["name"] == "NCCL_NVLS_ENABLE"] == ["1"]
    assert env_of(job)["NVSHMEM_DISABLE_NVLS"]["value"] == "1"


def test_single_node_has_no_service():
    assert builders.build_service(OWNER, spec_of()) is None
    assert [c["kind"] for c in builders.build_children(OWNER, spec_of(), SETTINGS)] == ["ConfigMap", "Job"]


# ------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize(
    "name, job, service",
    [
        ("support-bot", "support-bot", "support-bot"),
        ("v1.2-run", "v1-2-run", "v1-2-run"),
        ("7b-run", "7b-run", "qft-7b-run"),
        ("a" * 100, None, None),
    ],
)
def test_names_are_valid_dns_labels(name, job, service):
    assert len(builders.job_name(name)) <= builders.MAX_JOB_NAME
    assert len(builders.label_value(name)) <= 63
    if job:
        assert builders.job_name(name) == job and builders.service_name(name) == service
    else:
        assert builders.job_name(name) != builders.job_name(name[:-1] + "b")  # long names stay distinct


def test_mutable_job_fields():
    assert builders.mutable_job_fields(spec_of(runtime={"activeDeadlineSeconds": 5})) == {
        "activeDeadlineSeconds": 5, "ttlSecondsAfterFinished": None}
