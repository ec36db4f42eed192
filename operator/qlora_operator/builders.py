"""Pure builders: a `QLoRAFinetune` -> the objects that run it (trainer ConfigMap, Job, headless Service).

No I/O here: every function takes the parsed spec and returns plain dicts as the API server stores them, so
each is tested without a cluster (tests/unit/test_builders.py). The handlers create what these return.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

from qlora_trainer.config import (
    DatasetConfig,
    DatasetOptions,
    MetricsConfig,
    ModelSource,
    OutputConfig,
    TrainerConfig,
)
from qlora_trainer.contract import EXIT_TERMINATED, METRICS_PORT, FailureReason
from qlora_trainer.launch import MULTICAST_OFF

from qlora_operator.api import API_VERSION, KIND, QLoRAFinetuneSpec
from qlora_operator.settings import Settings

# Where things are inside the trainer pod.
CONFIG_DIR = "/etc/qlora"
CONFIG_FILE = "config.json"
MODEL_MOUNT = "/models"
DATA_MOUNT = "/data"  # the dataset ConfigMap's key
DATASET_MOUNT = "/dataset"  # the dataset PVC
OUTPUT_MOUNT = "/output"
TMP_MOUNT = "/tmp"
CACHE_MOUNT = "/cache"  # Hugging Face hub cache and other caches; the root filesystem is read-only
SHM_MOUNT = "/dev/shm"
TERMINATION_LOG = "/dev/termination-log"

CONTAINER = "trainer"
RENDEZVOUS_PORT = 29500
RUN_AS = 1000
# Time for the trainer to save a checkpoint after SIGTERM (suspend, eviction, deletion).
TERMINATION_GRACE_SECONDS = 120

LABEL_FINETUNE = "qlora.io/finetune"
# Label values stop at 63 characters; this annotation carries the full resource name.
ANNOTATION_FINETUNE = "qlora.io/finetune-name"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# On a Job whose ranks the operator restarts as a group (regroup.py): why.
ANNOTATION_REGROUP = "qlora.io/regroup"
MANAGED_BY = "qlora-operator"
POD_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# Exit codes after which another attempt cannot succeed: the Job fails at once (contract.FailureReason).
NON_RETRYABLE_EXIT_CODES = sorted(r.exit_code for r in FailureReason if not r.retryable)
RETRYABLE_EXIT_CODES = sorted(r.exit_code for r in FailureReason if r.retryable)

# Job names become pod hostnames (`<job>-<index>`) and label values: keep them short DNS labels.
MAX_JOB_NAME = 52


@dataclass(frozen=True)
class Owner:
    """The `QLoRAFinetune` the children belong to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _shorten(name: str, limit: int) -> str:
    if len(name) <= limit:
        return name
    return f"{name[: limit - 7].rstrip('-.')}-{_hash(name)}"


def job_name(name: str) -> str:
    """The Job's name: the resource's, when it is a short DNS label (dots would break pod hostnames)."""
    return _shorten(name.replace(".", "-"), MAX_JOB_NAME)


def config_map_name(name: str) -> str:
    return f"{job_name(name)}-config"


def service_name(name: str) -> str:
    """The headless Service of a multi-node run (a DNS-1035 label: starts with a letter)."""
    job = job_name(name)
    return job if job[0].isalpha() else f"qft-{job}"


def label_value(name: str) -> str:
    return _shorten(name, 63)


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "qlora-trainer",
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "qlora-operator",
        LABEL_FINETUNE: label_value(name),
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, component),
        "annotations": {ANNOTATION_FINETUNE: owner.name},
        "ownerReferences": [owner_reference(owner)],
    }


def _in_volume(mount: str, path: str | None) -> str:
    return posixpath.join(mount, path) if path else mount


# ------------------------------------------------------------------------------------ trainer config

def resolved_model(spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, str]:
    """The base model a run uses, after the operator's default (status.model)."""
    return {"name": spec.model.name or settings.default_base_model, "revision": spec.model.revision}


def output_path(spec: QLoRAFinetuneSpec) -> str:
    """Where the adapter lands, as the trainer pod sees it."""
    return _in_volume(OUTPUT_MOUNT, spec.output.pvc.path)


def build_trainer_config(spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, Any]:
    """The trainer's config document (qlora_trainer.config.TrainerConfig) with in-pod paths."""
    model = resolved_model(spec, settings)
    source = spec.dataset
    options = source.model_dump(include=set(DatasetOptions.model_fields))
    if source.config_map is not None:
        dataset = DatasetConfig(path=posixpath.join(DATA_MOUNT, source.config_map.key), **options)
    elif source.pvc is not None:
        dataset = DatasetConfig(path=_in_volume(DATASET_MOUNT, source.pvc.path), **options)
    elif source.hf is not None:
        dataset = DatasetConfig(hf=source.hf, **options)
    else:
        dataset = DatasetConfig(inline=source.inline, **options)
    config = TrainerConfig(
        model=ModelSource(
            name=_in_volume(MODEL_MOUNT, spec.model.pvc.path) if spec.model.pvc else model["name"],
            revision=model["revision"],
            trust_remote_code=spec.model.trust_remote_code,
        ),
        dataset=dataset,
        quantization=spec.quantization,
        lora=spec.lora,
        training=spec.training,
        output=OutputConfig(dir=output_path(spec), merge_adapter=spec.output.merge_adapter),
        metrics=MetricsConfig(port=METRICS_PORT),
        gpus=spec.resources.gpus,
        termination_message_path=TERMINATION_LOG,
    )
    return config.to_wire()


def build_config_map(owner: Owner, spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, Any]:
    """The ConfigMap holding the trainer's config (no credentials: the token only reaches the pod's env)."""
    document = build_trainer_config(spec, settings)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_map_name(owner.name), "config"),
        "data": {CONFIG_FILE: json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False)},
    }


# ----------------------------------------------------------------------------------------------- Job

def pod_failure_policy() -> dict[str, Any]:
    """Disruptions (eviction, preemption, node drain) and a trainer that stopped on a SIGTERM after saving a
    checkpoint (its pod deleted by a person, say: exit 143) retry without counting; the trainer's exit codes for
    a bad config, data set or model fail the Job at once; its retryable failures count against backoffLimit."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_TERMINATED]},
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": NON_RETRYABLE_EXIT_CODES},
            },
            {
                "action": "Count",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": RETRYABLE_EXIT_CODES},
            },
        ]
    }


def _env(owner: Owner, spec: QLoRAFinetuneSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "QLORA_FINETUNE", "value": owner.name},
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "TMPDIR", "value": TMP_MOUNT},
        {"name": "XDG_CACHE_HOME", "value": CACHE_MOUNT},
        {"name": "HF_HOME", "value": posixpath.join(CACHE_MOUNT, "huggingface")},
    ]
    token = spec.model.token_secret_ref
    if token is not None:
        # Only a reference: the token's value never leaves its Secret but for the pod's environment.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    if spec.model.pvc is not None:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    nodes = spec.resources.nodes
    if nodes > 1:
        env += [
            {"name": "NNODES", "value": str(nodes)},
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": POD_COMPLETION_INDEX}}},
            {"name": "MASTER_ADDR", "value": f"{job_name(owner.name)}-0.{service_name(owner.name)}"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "RENDEZVOUS_TIMEOUT_SECONDS", "value": str(spec.runtime.rendezvous_timeout_seconds)},
        ]
    user = [var.to_wire() for var in spec.runtime.env or ()]
    if spec.resources.gpus > 1 or nodes > 1:  # data-parallel: the workers talk through NCCL
        named = {var["name"] for var in user}
        env += [{"name": k, "value": v} for k, v in MULTICAST_OFF.items() if k not in named]
    return env + user


def _volumes(owner: Owner, spec: QLoRAFinetuneSpec) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): config, dataset, model, output, and writable scratch for a read-only root."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(owner.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_MOUNT},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "shm", "mountPath": SHM_MOUNT},
    ]
    dataset = spec.dataset
    if dataset.config_map is not None:
        key = dataset.config_map.key
        volumes.append({"name": "dataset", "configMap": {"name": dataset.config_map.name,
                                                         "items": [{"key": key, "path": key}]}})
        mounts.append({"name": "dataset", "mountPath": DATA_MOUNT, "readOnly": True})
    elif dataset.pvc is not None:
        volumes.append({"name": "dataset", "persistentVolumeClaim": {"claimName": dataset.pvc.claim_name,
                                                                     "readOnly": True}})
        mounts.append({"name": "dataset", "mountPath": DATASET_MOUNT, "readOnly": True})
    if spec.model.pvc is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc.claim_name,
                                                                   "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc.claim_name}})
    mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
    return volumes, mounts


def _resources(spec: QLoRAFinetuneSpec) -> dict[str, Any]:
    res = spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.gpus > 0:
        limits[res.gpu_resource_name] = str(res.gpus)  # extended resources: the request equals the limit
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)  # no CPU limit: throttling a data loader only slows the GPU down
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _container(owner: Owner, spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, Any]:
    _, mounts = _volumes(owner, spec)
    ports = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if spec.resources.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    return {
        "name": CONTAINER,
        "image": spec.runtime.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "qlora_trainer"],
        "args": ["--config", posixpath.join(CONFIG_DIR, CONFIG_FILE)],
        "env": _env(owner, spec),
        "ports": ports,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def build_pod_template(owner: Owner, spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, Any]:
    res, runtime = spec.resources, spec.runtime
    volumes, _ = _volumes(owner, spec)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer never talks to the API server: no token in its file system.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,  # the output volume is writable by the trainer
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(owner, spec, settings)],
        "volumes": volumes,
    }
    optional = {
        "serviceAccountName": runtime.service_account_name,
        "imagePullSecrets": [s.to_wire() for s in runtime.image_pull_secrets] if runtime.image_pull_secrets else None,
        "nodeSelector": res.node_selector,
        "tolerations": res.tolerations,
        "affinity": res.affinity,
        "priorityClassName": res.priority_class_name,
        "subdomain": service_name(owner.name) if res.nodes > 1 else None,
    }
    pod.update({k: v for k, v in optional.items() if v})
    return {
        "metadata": {"labels": labels(owner.name, "trainer"), "annotations": {ANNOTATION_FINETUNE: owner.name}},
        "spec": pod,
    }


def build_job(owner: Owner, spec: QLoRAFinetuneSpec, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer (Indexed, one pod per node, when `resources.nodes` > 1)."""
    runtime, nodes = spec.runtime, spec.resources.nodes
    metadata = _metadata(owner, job_name(owner.name), "trainer")
    if runtime.queue_name:
        metadata["labels"][LABEL_KUEUE_QUEUE] = runtime.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": runtime.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        # A retry starts only once the old pod is gone: it may still be saving a checkpoint to the same folder.
        "podReplacementPolicy": "Failed",
        # Kueue admits a queued Job by unsuspending it.
        "suspend": bool(spec.suspend or runtime.queue_name),
        "completions": nodes,
        "parallelism": nodes,
        "completionMode": "Indexed" if nodes > 1 else "NonIndexed",
        "template": build_pod_template(owner, spec, settings),
    }
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    if runtime.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def build_service(owner: Owner, spec: QLoRAFinetuneSpec) -> dict[str, Any] | None:
    """The headless Service that gives each pod of a multi-node run a DNS name; None for one node."""
    if spec.resources.nodes <= 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(owner.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Peers must resolve each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_FINETUNE: label_value(owner.name), "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def build_children(owner: Owner, spec: QLoRAFinetuneSpec, settings: Settings) -> list[dict[str, Any]]:
    """Everything a run needs, in creation order: the ConfigMap (and Service) before the Job that uses them."""
    children = [build_config_map(owner, spec, settings)]
    service = build_service(owner, spec)
    if service is not None:
        children.append(service)
    children.append(build_job(owner, spec, settings))
    return children


def mutable_job_fields(spec: QLoRAFinetuneSpec) -> dict[str, Any]:
    """The Job fields a spec update may change after creation (API.md: suspend and two runtime fields)."""
    return {
        "activeDeadlineSeconds": spec.runtime.active_deadline_seconds,
        "ttlSecondsAfterFinished": spec.runtime.ttl_seconds_after_finished,
    }
