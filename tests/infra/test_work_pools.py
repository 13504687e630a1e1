"""Work-pool templates per profile kind, rendered by each worker's own job configuration class, and `infra.stack.apply`
against the test session's real Prefect server. No Docker engine, cluster or AWS account is needed: what those would
receive is checked with the libraries that would send it (docker-py, the ECS worker and botocore's ECS model)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest

from infra.compute.store import ComputeProfile, Store
from infra.stack.gpu_workers import gpu_workers
from infra.stack.work_pools import PoolSettings, base_job_template

KINDS = ["process", "docker", "kubernetes", "ecs"]
SHARED = "/shared/trainyard/runs"
SETTINGS = PoolSettings(checkpoint_dir=SHARED, checkpoint_pvc="trainyard-ckpt", mlflow_uri="http://127.0.0.1:5000")


def gpu_profile(kind: str, name: str | None = None, **fields) -> ComputeProfile:
    """A profile with two A100s, 8 cores and 32 GB."""
    name = name or f"ty-{kind}"
    values = dict(gpu_type="NVIDIA A100", gpu_count=2, gpu_memory_gb=80, cpu_cores=8, ram_gb=32) | fields
    return ComputeProfile(name=name, kind=kind, work_pool=name, deployment=f"train-step/{name}", **values)


def render(configuration_class, template: dict, values: dict, client=None):
    return asyncio.run(configuration_class.from_template_and_values(template, values, client=client))


@pytest.mark.parametrize("kind", KINDS)
def test_each_template_is_its_workers_default_with_a_valid_variables_schema(kind):
    from prefect.utilities.schema_tools import is_valid_schema

    from infra.stack.work_pools import default_template

    template = base_job_template(gpu_profile(kind), SETTINGS)
    stock = default_template(kind)
    assert set(template) == {"job_configuration", "variables"}
    assert template["variables"]["type"] == "object"
    is_valid_schema(template["variables"], preprocess=False)  # raises on an invalid schema
    assert set(template["variables"]["properties"]) == set(stock["variables"]["properties"])
    assert set(template["job_configuration"]) == set(stock["job_configuration"])


def test_a_process_pool_gives_each_run_the_gpu_of_the_worker_that_took_it(monkeypatch):
    from prefect.workers.process import ProcessJobConfiguration

    template = base_job_template(gpu_profile("process"), SETTINGS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what `workers --gpus 0,1` gives the second worker
    config = render(ProcessJobConfiguration, template, {"env": {"EXTRA": "from the deployment"}})
    assert config.env["CUDA_VISIBLE_DEVICES"] == "1" and config.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert config.env["EXTRA"] == "from the deployment"  # a deployment's env adds to the defaults

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # a worker started by hand without pinning: no GPU, not all of them
    assert render(ProcessJobConfiguration, template, {}).env["CUDA_VISIBLE_DEVICES"] == ""

    cpu_only = base_job_template(gpu_profile("process", gpu_count=0), SETTINGS)
    assert "CUDA_VISIBLE_DEVICES" not in (render(ProcessJobConfiguration, cpu_only, {}).env or {})


def test_a_gpu_host_gets_one_single_run_worker_per_gpu(capsys):
    from infra.stack.gpu_workers import main

    workers = gpu_workers("gpu-host-0", [0, 1])
    assert [w.extra_env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"]
    assert len({w.name for w in workers}) == 2
    for worker in workers:
        argv = " ".join(worker.argv)
        assert "worker start --pool gpu-host-0 --type process" in argv and argv.endswith("--limit 1")
    assert main(["--pool", "gpu-host-0", "--gpus", "0,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]


def test_gpu_workers_start_with_the_hosts_warm_start_and_stop(client, unique, stack):
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.stack import services as local_stack
    from infra.stack.gpu_workers import main

    client.create_work_pool(WorkPoolCreate(name=unique, type="process"))  # as `python -m infra.stack.apply` would
    assert main(["--pool", unique, "--gpus", "0", "--start"]) == 0
    [service] = gpu_workers(unique, [0])
    try:
        assert local_stack.running(stack, local_stack.warm_start_service(stack)) is not None
        deadline = time.monotonic() + 90
        while not (online := client.read_workers_for_work_pool(unique)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [w.name for w in online] == [service.argv[service.argv.index("--name") + 1]]
        assert service.extra_env["TRAINYARD_WARM_SOCKET"] == str(stack.warm_socket)
    finally:
        assert main(["--pool", unique, "--gpus", "0", "--stop"]) == 0
    assert local_stack.running(stack, service) is None
    assert local_stack.running(stack, local_stack.warm_start_service(stack))  # shared with the host's other workers


def test_docker_requests_the_profiles_gpus_and_mounts_the_shared_checkpoints():
    from docker.types import HostConfig
    from prefect_docker.worker import DockerWorkerJobConfiguration

    config = render(DockerWorkerJobConfiguration, base_job_template(gpu_profile("docker"), SETTINGS), {"image": "t:1"})
    kwargs = config.container_create_kwargs
    assert kwargs["device_requests"] == [{"count": 2, "capabilities": [["gpu"]]}]
    assert f"{SHARED}:{SHARED}" in config.volumes and config.mem_limit == "32g"
    assert config.env["MLFLOW_TRACKING_URI"] == "http://host.docker.internal:5000"
    # docker-py turns the worker's extra create kwargs into the Engine API's HostConfig, as `docker run --gpus 2`.
    host_config = HostConfig(version="1.44", mem_limit=config.mem_limit, **kwargs)
    assert host_config["DeviceRequests"] == [
        {"Driver": "", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host_config["NanoCpus"] == 8 * 10**9 and host_config["ShmSize"] == 8 * 1024**3


def test_kubernetes_limits_gpus_tolerates_gpu_nodes_and_mounts_the_checkpoint_claim():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = base_job_template(gpu_profile("kubernetes"), SETTINGS)
    config = render(KubernetesWorkerJobConfiguration, template, {"image": "t:1"})
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == "trainyard-ckpt"
    assert {"name": claim["name"], "mountPath": SHARED} in container["volumeMounts"]


def test_ecs_registers_an_ec2_gpu_task_definition_that_the_ecs_api_accepts():
    from botocore.session import get_session
    from botocore.validate import ParamValidator
    from prefect.client.schemas.objects import FlowRun
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration, ECSWorker

    config = render(ECSJobConfiguration, base_job_template(gpu_profile("ecs"), SETTINGS), {"image": "t:1"})
    assert config.task_run_request["launchType"] == "EC2"  # Fargate has no GPUs
    # What the worker would register, prepared by the worker itself.
    worker = ECSWorker(work_pool_name="ty-ecs")
    task_definition = worker._prepare_task_definition(config, "eu-west-1", FlowRun(flow_id=uuid.uuid4(), name="t"))
    container = task_definition["containerDefinitions"][0]
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "2"}]
    assert (container["cpu"], container["memory"]) == (8 * 1024, 32 * 1024)
    assert container["mountPoints"] == [{"sourceVolume": "checkpoints", "containerPath": SHARED}]
    model = get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition")
    report = ParamValidator().validate(task_definition, model.input_shape)
    assert not report.has_errors(), report.generate_report()


# --- against the real Prefect server --------------------------------------------------------------------------


def test_the_server_accepts_every_kinds_template_and_ecs_gets_the_profiles_credentials(client, unique):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect_aws import AwsCredentials
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration

    from infra.stack.work_pools import WORKER_TYPES

    block = AwsCredentials(region_name="eu-west-1").save(unique)
    for kind in KINDS:
        profile = gpu_profile(kind, f"{unique}-{kind}", credential_blocks=[f"aws-credentials/{unique}"])
        blocks = {f"aws-credentials/{unique}": str(block)} if kind == "ecs" else {}
        template = base_job_template(profile, dataclasses.replace(SETTINGS, blocks=blocks))
        # The server checks the placeholders, and the defaults against the variables schema (a 422 otherwise).
        client.create_work_pool(
            WorkPoolCreate(name=profile.work_pool, type=WORKER_TYPES[kind], base_job_template=template)
        )
    pool = client.read_work_pool(f"{unique}-ecs")

    async def render_with_server():
        async with get_client() as async_client:
            return await ECSJobConfiguration.from_template_and_values(pool.base_job_template, {}, client=async_client)

    assert asyncio.run(render_with_server()).aws_credentials.region_name == "eu-west-1"


def apply(*args: str) -> tuple[int, dict[str, str]]:
    """Run `python -m infra.stack.apply ARGS` in-process; its exit code and each pool's and deployment's outcome."""
    import contextlib
    import io

    from infra.stack.apply import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    outcomes = {f"{w[0]} {w[1]}": w[2] for w in (line.split() for line in out.getvalue().splitlines()) if len(w) == 3}
    return code, outcomes


def test_apply_creates_pools_and_deployments_once_and_updates_on_a_profile_change(client, unique, tmp_path):
    from prefect.client.schemas.actions import WorkPoolUpdate

    from infra.stack.apply import DEFAULT_IMAGE, PROCESS_PULL_STEPS

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.save_profile(gpu_profile("process", f"{unique}-host", gpu_count=1))
    store.save_profile(gpu_profile("docker", f"{unique}-docker", gpu_count=1))
    store.save_profile(gpu_profile("kubernetes", f"{unique}-off", enabled=False))
    host, docker = f"pool {unique}-host", f"pool {unique}-docker"
    host_step, docker_step = f"deployment train-step/{unique}-host", f"deployment train-step/{unique}-docker"

    code, outcomes = apply("--url", url)
    assert code == 0 and outcomes == {host: "created", docker: "created", host_step: "created", docker_step: "created"}
    assert client.read_work_pool(f"{unique}-docker").type == "docker"
    process_step = client.read_deployment_by_name(f"train-step/{unique}-host")
    assert process_step.entrypoint == "flows/train_step.py:train_step"
    assert process_step.work_pool_name == f"{unique}-host" and process_step.pull_steps == PROCESS_PULL_STEPS
    docker_step_read = client.read_deployment_by_name(f"train-step/{unique}-docker")
    assert docker_step_read.job_variables == {"image": DEFAULT_IMAGE} and not docker_step_read.pull_steps
    assert "request" in docker_step_read.parameter_openapi_schema["properties"]

    # A default the pool's owner set on a variable no profile decides survives; nothing else changes.
    pool = client.read_work_pool(f"{unique}-docker")
    pool.base_job_template["variables"]["properties"]["image_pull_policy"]["default"] = "Always"
    client.update_work_pool(pool.name, WorkPoolUpdate(base_job_template=pool.base_job_template))
    code, outcomes = apply("--url", url)
    assert code == 0 and set(outcomes.values()) == {"unchanged"} and len(outcomes) == 4

    profile = store.profile(f"{unique}-docker")
    profile.gpu_count = 2
    store.save_profile(profile)
    code, outcomes = apply("--url", url, "--only", f"{unique}-docker", "--image", f"{unique}-docker=reg.example/t:2")
    assert code == 0 and outcomes == {docker: "updated", docker_step: "updated"}
    variables = client.read_work_pool(f"{unique}-docker").base_job_template["variables"]["properties"]
    assert variables["container_create_kwargs"]["default"]["device_requests"][0]["count"] == 2
    assert variables["image_pull_policy"]["default"] == "Always"
    assert client.read_deployment_by_name(f"train-step/{unique}-docker").job_variables == {"image": "reg.example/t:2"}


def test_apply_refuses_to_change_a_pools_type_and_names_unknown_profiles(client, unique, tmp_path, capsys):
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.stack.apply import main

    client.create_work_pool(WorkPoolCreate(name=unique, type="process"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).save_profile(gpu_profile("docker", unique))
    assert main(["--url", url]) == 2
    assert "cannot change type" in capsys.readouterr().err
    assert main(["--url", url, "--only", "nope"]) == 2
    assert "no profile named nope" in capsys.readouterr().err
