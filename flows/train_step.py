"""The training step as a flow of its own, deployed on every compute profile's work pool ("train-step/<profile>").

The train flow submits it to the chosen profile and falls back to the next one when it cannot start or crashes.
It trains into the request's checkpoint directory, which every attempt shares, so a later attempt resumes; with an
artifact store (TRAINYARD_ARTIFACT_STORE) the checkpoints also come from there when this host's copy is behind. An
s3:// dataset is synced into this host's cache first.

The train flow evaluates and exports on its own host from the step's result and best checkpoint: from the shared
run directory, or, with an artifact store, from the step's last push. Without either, the step fails before it
trains (the train flow's mark is not in the directory) and says how to share it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.request import TrainRequest
from tasks.control_watch import PAUSED
from tasks.remote_storage import artifact_store, checkpoint_mirror, is_remote, localize_dataset, restore_checkpoints
from tasks.tracking import attached_run
from tasks.training import train_model
from trainers.base import TrainingPaused, TrainResult
from trainers.data.spec import DatasetSpec

RESULT_FILE = "train-result.json"
# Written by the train flow before it submits a step; seen by the step, the directory is shared. Hidden: not mirrored.
FLOW_MARK = ".trainyard-flow"
SHARE_IT = (
    "The train flow evaluates and exports on its host from the training step's result and best checkpoint, so the "
    "run directory must be shared by the two hosts (one filesystem, the same path) or carried by an artifact store. "
    "Mount the runs directory on every host at that path (docs/work-pools.md, 'Shared checkpoint storage'), or set "
    "TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix where the train flow and the workers run (docs/storage.md)."
)


class RunDirectoryNotShared(RuntimeError):
    """The train flow's host cannot get what a training step on another host left in its run directory."""


@flow(name="train-step")
def train_step(
    request: dict, dataset: dict, output_dir: str, mlflow_run_id: str, request_run_id: str | None = None
) -> dict:
    """Train one model for a train flow run (`request_run_id`): the stage that may run on another machine.

    When that run is paused, training checkpoints and this run ends Cancelled with a "paused" message (a subflow
    cannot be suspended itself); the train flow's next attempt resumes from the checkpoint."""
    train_request = TrainRequest(**request)
    if request_run_id and not artifact_store():  # before any download or GPU: the result could never reach the flow
        require_shared(Path(output_dir))
    spec = DatasetSpec.from_json(json.dumps(dataset))
    if is_remote(train_request.dataset):  # this host's own synced copy (the spec names the submitting host's cache)
        spec = localize_dataset(train_request.dataset, spec)
    try:
        with attached_run(mlflow_run_id):
            result = train_model(train_request, spec, Path(output_dir), mlflow_run_id, request_run_id)
    except TrainingPaused as paused:
        return Cancelled(message=f"{PAUSED}{paused}")
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    (Path(output_dir) / RESULT_FILE).write_text(json.dumps(payload))
    mirror = checkpoint_mirror(train_request.experiment, str(request_run_id or flow_run.id), Path(output_dir))
    if mirror is not None:  # the train flow's host reads the result and the best checkpoint from there
        mirror.push()
    return payload


def mark_run_directory(output_dir: Path) -> None:
    """Done by the train flow before it submits a step: the step's host sees the mark only on a shared directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / FLOW_MARK).touch()


def require_shared(output_dir: Path) -> None:
    if not (output_dir / FLOW_MARK).exists():
        raise RunDirectoryNotShared(
            f"The run directory {output_dir} on this host is not the train flow's: its mark {FLOW_MARK} is not "
            f"there, and no artifact store is set. {SHARE_IT}"
        )


def read_result(output_dir: Path, experiment: str, request_id: str) -> TrainResult:
    """What a training step on another pool produced: read from the run directory, which, with an artifact store,
    is first brought up to the step's last push when this host's copy is behind or lacks the result."""
    mirror = checkpoint_mirror(experiment, request_id, output_dir)
    if mirror is not None:
        restore_checkpoints(mirror, required=RESULT_FILE)
    if not (output_dir / RESULT_FILE).exists():
        raise _missing(f"its result {output_dir / RESULT_FILE}", mirror)
    data = json.loads((output_dir / RESULT_FILE).read_text())
    data.update(best_checkpoint=Path(data["best_checkpoint"]), last_checkpoint=Path(data["last_checkpoint"]))
    result = TrainResult(**data)
    if not result.best_checkpoint.exists():
        raise _missing(f"its best checkpoint {result.best_checkpoint}", mirror)
    return result


def _missing(what: str, mirror) -> RunDirectoryNotShared:
    if mirror is None:
        return RunDirectoryNotShared(
            f"The training step finished, but {what} is not on the train flow's host, and no artifact store is "
            f"set. {SHARE_IT}"
        )
    return RunDirectoryNotShared(
        f"The training step finished, but {what} is neither on the train flow's host nor in the step's last push "
        f"to {mirror.uri}: that push did not complete. See the training step's log; run the request again to "
        "resume from the pushed checkpoints."
    )
