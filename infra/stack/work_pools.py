"""Base job templates for the compute profiles' work pools (the per-GPU workers of a GPU host: gpu_workers.py).

Each template starts from its worker's own default (`<Worker>.get_default_base_job_template()`) and changes only
what a profile decides: GPUs, CPU and memory, the shared checkpoint directory, the environment. Nothing generated is
kept in git: `python -m infra.stack.apply` regenerates the templates from the profiles in the platform store.

    python -m infra.stack.work_pools show PROFILE                        # the template apply would give PROFILE's pool

Settings (environment, read when a template is generated):
    TRAINYARD_CHECKPOINT_DIR  the runs directory of the host where the train flow runs (default: this host's
                              $TRAINYARD_HOME/runs). Training steps write checkpoints to <dir>/<train flow run id>,
                              so every host and container must see this shared directory at that same path
    TRAINYARD_CHECKPOINT_PVC  the Kubernetes PersistentVolumeClaim mounted there (default trainyard-checkpoints)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infra.compute.store import ComputeProfile, Store
from infra.settings import get_settings

IMAGE_WORKDIR = "/opt/trainyard"  # where infra/docker/Dockerfile puts the code; the container deployments' path
IMAGE_UID = 1000  # the Dockerfile's non-root user
CHECKPOINT_VOLUME = "checkpoints"
WORKER_TYPES = {"process": "process", "docker": "docker", "kubernetes": "kubernetes", "ecs": "ecs"}
# The variables whose defaults a profile decides, per kind. `infra.stack.apply` resets these; a default set on any other
# variable of the pool (in the UI or the API: an ECS cluster, a Kubernetes namespace...) is kept.
MANAGED_VARIABLES = {
    "process": {"env", "command"},
    "docker": {"container_create_kwargs", "volumes", "mem_limit", "env"},
    "kubernetes": {"cpu_request", "memory_request", "memory_limit", "env", "cluster_config"},
    "ecs": {"launch_type", "cpu", "memory", "env", "aws_credentials"},
}
WARM_START_COMMAND = "python -m infra.runs.warm_start"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # set by NVIDIA GPU feature discovery / the GPU operator


@dataclass(frozen=True)
class PoolSettings:
    """What the templates need besides the profile: where checkpoints are shared, and what the runs report to."""

    checkpoint_dir: str
    checkpoint_pvc: str = "trainyard-checkpoints"
    mlflow_uri: str = ""
    # "<block type slug>/<block name>" -> block document id, for the profile's credential blocks that exist
    blocks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, blocks: dict[str, str] | None = None) -> PoolSettings:
        stack = get_settings()
        return cls(
            checkpoint_dir=str(stack.checkpoint_dir or stack.runs_dir),
            checkpoint_pvc=stack.checkpoint_pvc,
            mlflow_uri=stack.client_env()["MLFLOW_TRACKING_URI"],
            blocks=dict(blocks or {}),
        )


def default_template(kind: str) -> dict[str, Any]:
    """The worker's own default base job template for a profile kind (a fresh copy)."""
    if kind == "process":
        from prefect.workers.process import ProcessWorker as Worker
    elif kind == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    elif kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    elif kind == "ecs":
        from prefect_aws.workers.ecs_worker import ECSWorker as Worker
    else:
        raise ValueError(f"unknown profile kind {kind!r}; expected one of {', '.join(WORKER_TYPES)}")
    return copy.deepcopy(Worker.get_default_base_job_template())


def _set_default(template: dict[str, Any], variable: str, value: Any) -> None:
    template["variables"]["properties"][variable]["default"] = value


def _block_ref(profile: ComputeProfile, settings: PoolSettings, slug: str) -> dict[str, Any] | None:
    """A `$ref` to the profile's credential block of that type, when the block exists (the UI's own format)."""
    for block in profile.credential_blocks or []:
        if block.startswith(f"{slug}/") and block in settings.blocks:
            return {"$ref": {"block_document_id": settings.blocks[block]}}
    return None


def _shm_gb(profile: ComputeProfile) -> int:
    # PyTorch DataLoader workers pass batches through /dev/shm; a container's default 64 MB makes them crash.
    return max(1, int(profile.ram_gb // 4))


def container_env(settings: PoolSettings, docker: bool = False) -> dict[str, str]:
    """What a training container needs beyond what the worker sets (PREFECT_API_URL): MLflow, quiet telemetry."""
    uri = settings.mlflow_uri
    if docker:  # the worker maps host.docker.internal to the host, as it does for PREFECT_API_URL
        uri = uri.replace("127.0.0.1", "host.docker.internal").replace("localhost", "host.docker.internal")
    env = get_settings().client_env()
    keep = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PREFECT_LOGGING_EXTRA_LOGGERS")
    return {"MLFLOW_TRACKING_URI": uri, **{key: env[key] for key in keep}, "YOLO_AUTOINSTALL": "false"}


def process_template(profile: ComputeProfile, settings: PoolSettings) -> dict[str, Any]:
    """A host's own Python: one worker per GPU, each run sees only its worker's GPU.

    The env default reads CUDA_VISIBLE_DEVICES from the worker's environment when the worker renders the job, so
    `workers --gpus 0,1` (CUDA_VISIBLE_DEVICES=0 and =1) gives each run one GPU, which the trainer sees as cuda:0.
    A worker started without it gives its runs no GPU rather than all of them.

    The command is the warm-start launcher (infra/runs/warm_start.py): a run forks from a server that has Prefect, torch
    and the flows imported, or starts cold when the host has none. `python` is the worker's: workers started by
    Trainyard have their virtualenv first on PATH.
    """
    template = default_template("process")
    _set_default(template, "command", WARM_START_COMMAND)
    if profile.gpu_count > 0:
        _set_default(
            template,
            "env",
            {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "{{ $CUDA_VISIBLE_DEVICES }}"},
        )
    return template


def docker_template(profile: ComputeProfile, settings: PoolSettings) -> dict[str, Any]:
    """A container per run on a Docker host (NVIDIA Container Toolkit), GPUs passed through as `--gpus N` does."""
    template = default_template("docker")
    create_kwargs: dict[str, Any] = {"shm_size": f"{_shm_gb(profile)}g", "nano_cpus": int(profile.cpu_cores * 1e9)}
    if profile.gpu_count > 0:
        create_kwargs["device_requests"] = [{"count": profile.gpu_count, "capabilities": [["gpu"]]}]
    _set_default(template, "container_create_kwargs", create_kwargs)
    _set_default(template, "volumes", [f"{settings.checkpoint_dir}:{settings.checkpoint_dir}"])
    _set_default(template, "mem_limit", f"{profile.ram_gb:g}g")
    _set_default(template, "env", container_env(settings, docker=True))
    return template


def kubernetes_template(profile: ComputeProfile, settings: PoolSettings) -> dict[str, Any]:
    """A Job per run: GPU limits, a GPU node selector and toleration, the checkpoint PVC, memory-backed /dev/shm."""
    template = default_template("kubernetes")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["volumeMounts"] = [
        {"name": CHECKPOINT_VOLUME, "mountPath": settings.checkpoint_dir},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    pod["volumes"] = [
        {"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": settings.checkpoint_pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{_shm_gb(profile)}Gi"}},
    ]
    pod["securityContext"] = {"fsGroup": IMAGE_UID}  # the image's non-root user can write to the claim
    if profile.gpu_count > 0:
        container["resources"]["limits"]["nvidia.com/gpu"] = profile.gpu_count  # GPUs are requested as limits
        pod["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        pod["tolerations"] = [dict(GPU_TOLERATION)]
    _set_default(template, "cpu_request", str(profile.cpu_cores))
    _set_default(template, "memory_request", f"{profile.ram_gb:g}Gi")
    _set_default(template, "memory_limit", f"{profile.ram_gb:g}Gi")
    _set_default(template, "env", container_env(settings))
    if ref := _block_ref(profile, settings, "kubernetes-cluster-config"):
        _set_default(template, "cluster_config", ref)
    return template


def ecs_template(profile: ComputeProfile, settings: PoolSettings) -> dict[str, Any]:
    """A task per run on EC2 GPU container instances (Fargate has no GPUs): a GPU resource requirement."""
    template = default_template("ecs")
    container = template["job_configuration"]["task_definition"]["containerDefinitions"][0]
    if profile.gpu_count > 0:
        container["resourceRequirements"] = [{"type": "GPU", "value": str(profile.gpu_count)}]  # ECS wants a string
    container["linuxParameters"] = {"sharedMemorySize": _shm_gb(profile) * 1024}  # MiB
    # The shared filesystem (EFS or NFS) mounted on every container instance at the checkpoint path.
    container["mountPoints"] = [{"sourceVolume": CHECKPOINT_VOLUME, "containerPath": settings.checkpoint_dir}]
    template["job_configuration"]["task_definition"]["volumes"] = [
        {"name": CHECKPOINT_VOLUME, "host": {"sourcePath": settings.checkpoint_dir}}
    ]
    _set_default(template, "launch_type", "EC2")
    _set_default(template, "cpu", profile.cpu_cores * 1024)  # CPU units
    _set_default(template, "memory", int(profile.ram_gb * 1024))  # MiB
    _set_default(template, "env", container_env(settings))
    if ref := _block_ref(profile, settings, "aws-credentials"):
        _set_default(template, "aws_credentials", ref)
    return template


TEMPLATES: dict[str, Callable[[ComputeProfile, PoolSettings], dict[str, Any]]] = {
    "process": process_template,
    "docker": docker_template,
    "kubernetes": kubernetes_template,
    "ecs": ecs_template,
}


def base_job_template(profile: ComputeProfile, settings: PoolSettings | None = None) -> dict[str, Any]:
    """The base job template of the profile's work pool."""
    if profile.kind not in TEMPLATES:
        kinds = ", ".join(TEMPLATES)
        raise ValueError(f"profile {profile.name!r} has unknown kind {profile.kind!r}; expected one of {kinds}")
    return TEMPLATES[profile.kind](profile, settings or PoolSettings.from_env())


def keep_owner_defaults(desired: dict[str, Any], existing: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """`desired`, keeping the defaults the pool's owner set on variables no profile decides (cluster, namespace...)."""
    merged = copy.deepcopy(desired)
    current = (existing or {}).get("variables", {}).get("properties", {})
    for name, prop in merged["variables"]["properties"].items():
        if name not in MANAGED_VARIABLES[kind] and "default" in current.get(name, {}):
            prop["default"] = current[name]["default"]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack.work_pools", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the base job template of a profile's pool (JSON)")
    show.add_argument("profile")
    show.add_argument("--url", help="platform store URL (default TRAINYARD_STORE_URL)")
    args = parser.parse_args(argv)

    profile = Store(args.url).profile(args.profile)
    if profile is None:
        print(f"error: no profile {args.profile!r} in the store", file=sys.stderr)
        return 2
    print(json.dumps(base_job_template(profile), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
