"""Scale-out on one machine (docs/scale-out.md): a control host on PostgreSQL and S3, two training "hosts" (each a
worker on the same pool, with its own TRAINYARD_HOME and no S3 credentials), and 20 training runs triggered at once.
None may be lost or stuck: 20 flow runs Completed, 20 MLflow runs FINISHED, and both workers took some.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from waiting import final_flow_runs, mlflow_runs

from infra.runs import warm_start
from infra.settings import ROOT

# The shared stack's helpers live with its own tests; tests/infra is not a package (its name is the project's).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))
from test_shared_stack import SharedStack, cli, shared_stack  # noqa: E402

RUNS = 20
NEEDS_GB = 14  # 20 forked trainings peak at about 12 GB on top of the servers
PER_WORKER = 10  # each worker's --limit: a worker takes at most this many and leaves the rest to the other
DEPLOYMENT = "train/torch-shapes"
POOL = "trainyard-local"  # the deployment's pool (prefect.yaml), served by both hosts
SUBMITTED = re.compile(r"Worker '([^']+)' submitting flow run '([0-9a-f-]{36})'")
ABORTED = re.compile(r"Aborted submission of flow run '([0-9a-f-]{36})'")  # the other worker got it first


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[SharedStack, list[dict[str, str]]]]:
    """The control host, `make deploy` run there (profiles, the torch demo deployment), and two worker hosts."""
    with shared_stack(tmp_path_factory.mktemp("scale")) as shared:
        control = shared.client_env(shared.control_env)  # the control host's shell after `source .trainyard/env`
        for command in (
            [sys.executable, "-m", "infra.compute.profiles", "seed", "--if-empty"],
            # Two hosts of ten slots: the pool's profile may run twenty trainings at once (the seed says two).
            [sys.executable, "-m", "infra.compute.profiles", "set", "local", f"max_concurrent={RUNS}"],
            [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "-n", DEPLOYMENT.split("/")[1]],
        ):
            subprocess.run(command, cwd=ROOT, env=control, check=True, capture_output=True, timeout=300)
        hosts = [shared.host_env(f"gpu-host-{i}") for i in (1, 2)]
        try:
            for i, host in enumerate(hosts, 1):
                cli(
                    "up",
                    "--role",
                    "worker",
                    "--pool",
                    POOL,
                    "--name",
                    f"gpu-host-{i}",
                    "--limit",
                    str(PER_WORKER),
                    env=host,
                )
            _wait_ready(shared, hosts, timeout=180)
            yield shared, hosts
        finally:
            for host in hosts:
                cli("down", env=host, check=False)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    os.environ.get("TRAINYARD_SCALE_TEST") == "0" or psutil.virtual_memory().available < NEEDS_GB * 2**30,
    reason=f"20 concurrent trainings need about {NEEDS_GB} GB of free memory and 3-4 minutes "
    f"(free now: {psutil.virtual_memory().available / 2**30:.1f} GB; TRAINYARD_SCALE_TEST=0 skips it on purpose)",
)
def test_twenty_training_runs_at_once_on_two_workers_none_lost_or_stuck(cluster, shapes_cls):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shared, hosts = cluster
    parameters = {
        "dataset": str(shapes_cls),
        "epochs": 1,
        "image_size": 32,
        "batch_size": 8,
        "experiment": "scale-out",
        "registered_model": "scale-out",
    }
    with temporary_settings({PREFECT_API_URL: shared.settings.prefect_api}):
        started = time.monotonic()
        runs = asyncio.run(_trigger(parameters))
        triggered_s = time.monotonic() - started
        with get_client(sync_client=True) as client:
            finals = final_flow_runs(client, [run.id for run in runs], timeout=900, poll=2)
            states = {i: run.state for i, run in finals.items()}
            final_s = time.monotonic() - started
            histories = {i: _history(client, i) for i, state in states.items() if not state.is_completed()}
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            on_server = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
    ids = {str(run.id) for run in runs}
    assert len(ids) == RUNS
    stuck = {i: s.name for i, s in states.items() if not s.is_final()}
    assert not stuck, f"not finished after 900 s: {stuck}"
    assert not histories, f"not Completed (state history of each): {histories}"
    assert {str(run.id) for run in on_server} == ids  # none lost, none doubled

    mlflow = MlflowClient(tracking_uri=shared.settings.mlflow_uri)
    mlflow_runs = mlflow.search_runs([mlflow.get_experiment_by_name("scale-out").experiment_id], max_results=100)
    by_flow_run = {r.data.tags.get("prefect.flow_run_id"): r.info.status for r in mlflow_runs}
    missing = {i: _mlflow_runs_anywhere(mlflow, i) for i in ids - set(by_flow_run)}
    assert not missing, f"flow runs without an MLflow run in 'scale-out' (their runs anywhere): {missing}"
    assert by_flow_run == dict.fromkeys(ids, "FINISHED")  # one MLflow run each, all FINISHED

    taken = {}
    for host in hosts:
        log = (Path(host["TRAINYARD_HOME"]) / "logs" / "worker.log").read_text()
        aborted = set(ABORTED.findall(log))
        for worker, flow_run_id in SUBMITTED.findall(log):
            if flow_run_id in ids and flow_run_id not in aborted:
                taken.setdefault(worker, set()).add(flow_run_id)
    assert set(taken) == {"gpu-host-1", "gpu-host-2"}, f"runs per worker: { {w: len(r) for w, r in taken.items()} }"
    assert taken["gpu-host-1"] | taken["gpu-host-2"] == ids and not taken["gpu-host-1"] & taken["gpu-host-2"]
    print(
        f"\n{RUNS} runs: triggered in {triggered_s:.1f} s, all final after {final_s:.1f} s; "
        f"per worker {', '.join(f'{w} {len(r)}' for w, r in sorted(taken.items()))}"
    )


def _wait_ready(shared: SharedStack, hosts: list[dict[str, str]], timeout: float) -> None:
    """Both warm starts listening and both workers online: a run triggered now can go to either."""
    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + timeout
    sockets = [Path(host["TRAINYARD_HOME"]) / "warm-start.sock" for host in hosts]
    with SyncPrefectClient(shared.settings.prefect_api) as client:
        while time.monotonic() < deadline:
            online = {w.name for w in client.read_workers_for_work_pool(POOL) if w.status == "ONLINE"}
            if online >= {"gpu-host-1", "gpu-host-2"} and all(warm_start.ready(s) for s in sockets):
                return
            time.sleep(0.5)
    pytest.fail(
        f"after {timeout:.0f} s: workers online {sorted(online)}, warm starts {[warm_start.ready(s) for s in sockets]}"
    )


async def _trigger(parameters: dict) -> list:
    from prefect.deployments import run_deployment

    return await asyncio.gather(*(run_deployment(DEPLOYMENT, parameters=parameters, timeout=0) for _ in range(RUNS)))


def _mlflow_runs_anywhere(mlflow, flow_run_id: str) -> list[str]:
    experiments = {e.experiment_id: e.name for e in mlflow.search_experiments()}
    runs = mlflow_runs(flow_run_id, mlflow.tracking_uri)
    return [f"{r.info.run_id} in {experiments[r.info.experiment_id]!r}: {r.info.status}" for r in runs]


def _history(client, flow_run_id: str) -> list[str]:
    """Every state the run went through, oldest first, with its message: who ended it, and how."""
    states = sorted(client.read_flow_run_states(flow_run_id), key=lambda state: state.timestamp)
    return [f"{state.timestamp:%H:%M:%S} {state.name}: {state.message or ''}".strip() for state in states]
