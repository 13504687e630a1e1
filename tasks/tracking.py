"""The pipeline's one MLflow run: created by the flow, written by every stage, always ended."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient
from prefect.exceptions import Pause
from prefect.runtime import flow_run

from infra.settings import ROOT
from infra.storage.mlflow_artifacts import require_s3_credentials
from trainers.base import TrainingPaused
from trainers.data.spec import DatasetSpec

TAG_FLOW_RUN = "prefect.flow_run_id"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def use_experiment(name: str) -> str:
    """Make the experiment `name` active, creating it if need be; returns its id.

    Not mlflow.set_experiment alone: when two runs create the same new experiment at once, the one that loses the
    race gets the experiment back without it becoming active (MLflow 3), and its run lands in Default. Setting it
    again by id always activates it."""
    experiment = mlflow.set_experiment(name)
    return mlflow.set_experiment(experiment_id=experiment.experiment_id).experiment_id


@contextlib.contextmanager
def pipeline_run(request, dataset: DatasetSpec, ranking) -> Iterator[str]:
    """Start the run (or continue this flow run's unfinished one), yield its id; end it FINISHED, or FAILED
    (KILLED on cancel, SCHEDULED on pause) when the stage raises."""
    experiment = mlflow.get_experiment(use_experiment(request.experiment))
    # Direct MLflow artifacts: a host without S3 credentials stops here, not at its first upload after training.
    require_s3_credentials(experiment.artifact_location, f"MLflow experiment {experiment.name!r}")
    ui = flow_run.ui_url
    tags = {
        **request.tags,
        "trainer": request.trainer,
        "model": request.model,
        "dataset.version": dataset.version,
        "dataset.format": dataset.format,
        "dataset.labels": json.dumps(dataset.label_map, ensure_ascii=False),
        "git.commit": git_commit(),
        "compute.order": ",".join(p.name for p in ranking.candidates),
        "compute.strategy": request.compute.strategy,
        TAG_FLOW_RUN: str(flow_run.id or ""),
        "prefect.flow_run_url": ui or "",
        "mlflow.note.content": f"Prefect run: {ui}" if ui else "",
    }
    earlier = [r for r in runs_of_flow_run(flow_run.id) if r.info.status != "FINISHED"] if flow_run.id else []
    if earlier:  # this flow run again (`prefect flow-run retry` after a cancel or a crash): continue its MLflow run
        run = mlflow.start_run(run_id=earlier[0].info.run_id)
        mlflow.set_tags(tags)
    else:
        run = mlflow.start_run(run_name=flow_run.name or None, tags=tags)
    status = "FAILED"
    try:
        mlflow.log_params(flatten(request.train_config().model_dump(mode="json")))
        yield run.info.run_id
        status = "FINISHED"
    except BaseException as error:
        status = _status_after(error)
        raise
    finally:
        mlflow.flush_async_logging()
        mlflow.end_run(status=status)


def _status_after(error: BaseException) -> str:
    """The MLflow status of a pipeline that stopped with `error`. Prefect delivers cancellation as a BaseException
    subclass: a kill, not a failure. A pause leaves the run SCHEDULED: the resumed flow run continues it."""
    if isinstance(error, TrainingPaused | Pause):
        return "SCHEDULED"
    return "KILLED" if type(error).__name__ in {"TerminationSignal", "CancelledError"} else "FAILED"


@contextlib.contextmanager
def attached_run(run_id: str) -> Iterator[None]:
    """Make the pipeline's run active in this process (a training step on another pool) without ending it.

    The train flow owns the run's status; leaving, this step only detaches, so one MLflow run spans every attempt.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield  # already active here: the training step runs inside the train flow's own process
        return
    # MLflow refuses to continue a run of another experiment than the process's active one (a process that ran
    # another flow before): the run's own experiment is made active first.
    run = mlflow.get_run(run_id)
    require_s3_credentials(run.info.artifact_uri, f"MLflow run {run_id}")
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.flush_async_logging()
        mlflow.end_run(status="RUNNING")


def runs_of_flow_run(flow_run_id, status: str | None = None) -> list:
    """The MLflow run(s) a train flow run recorded (exactly one when it got past dataset checks)."""
    where = f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return mlflow.search_runs(search_all_experiments=True, filter_string=where, output_format="list")


def end_runs_left_running(flow_run_id: str, status: str = "FAILED") -> int:
    """End any MLflow run of this flow run still RUNNING (a crash hook; the context manager covers the rest)."""
    client = MlflowClient()
    runs = runs_of_flow_run(flow_run_id, "RUNNING")
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)
    return len(runs)


def ensure_active(run_id: str) -> None:
    """Stages run in the flow's thread, where the run is active; refuse to log anywhere else."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"MLflow run {run_id} is not active in this thread; call stages from the flow directly")
