"""Checkpoints of the torch trainer under kill -9: exact resume, damaged and incompatible checkpoints, retention,
and MLflow metrics logged exactly once. The trainer runs in its own process (torch_driver.py) so it can be killed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from infra.settings import ROOT
from trainers.base import Callback, TrainingPaused, TrainJob
from trainers.checkpoints import CheckpointError, CheckpointStore
from trainers.config import TrainConfig
from trainers.data.synthetic import make_shapes_classification
from trainers.data.validate import load_dataset
from trainers.torch_classifier import TorchClassifierTrainer

DRIVER = Path(__file__).with_name("torch_driver.py")
EPOCHS = 3
STEPS_PER_EPOCH = 9  # 36 training images, batches of 4
EVERY_STEP = "0.000001"  # every_seconds so small that each training step writes a checkpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt-data") / "shapes"
    return make_shapes_classification(root, train_per_class=12, val_per_class=4, test_per_class=2, image_size=32)


def train(dataset: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    variables = {**os.environ, "DATASET": str(dataset), "OUT": str(out), "EPOCHS": str(EPOCHS), **env}
    return subprocess.run(
        [sys.executable, str(DRIVER)], env=variables, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def state(out: Path) -> dict:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = train(dataset, out)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_training(out: Path, reference: Path) -> None:
    ours, theirs = state(out), state(reference)
    assert ours["progress"]["epoch"] == EPOCHS
    for name, tensor in theirs["model"].items():
        assert (ours["model"][name].float() - tensor.float()).abs().max().item() <= 1e-6, name
    assert ours["progress"]["history"] == theirs["progress"]["history"]  # every epoch's metrics, exactly


def test_killed_mid_epoch_and_resumed_ends_with_the_weights_and_metrics_of_an_uninterrupted_run(
    dataset, uninterrupted, tmp_path
):
    killed = train(dataset, tmp_path, KILL_AT_STEP=str(STEPS_PER_EPOCH + 5), EVERY_SECONDS=EVERY_STEP)
    assert killed.returncode == -9
    progress = state(tmp_path)["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 4)  # the last checkpoint is mid-epoch
    resumed = train(dataset, tmp_path, EVERY_SECONDS=EVERY_STEP)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "at epoch 1, batch 4" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(dataset, uninterrupted, tmp_path):
    killed = train(dataset, tmp_path, KILL_IN_SAVE="7", EVERY_SECONDS=EVERY_STEP)
    assert killed.returncode == -9
    assert list(tmp_path.glob(".*.tmp")), "the half-written file should be the temporary one"
    store = CheckpointStore(tmp_path)
    assert all(store.verified(entry) for entry in store.entries())  # the manifest names only whole files
    assert state(tmp_path)["progress"]["step"] == 6
    resumed = train(dataset, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_killed_during_export_leaves_no_partial_model_and_the_rerun_exports_without_retraining(
    dataset, uninterrupted, tmp_path
):
    import onnxruntime

    killed = train(dataset, tmp_path, KILL_IN_EXPORT="1")
    assert killed.returncode == -9
    assert not (tmp_path / "model.onnx").exists()  # the half-written file is the temporary one
    checkpoints = CheckpointStore(tmp_path).entries()
    rerun = train(dataset, tmp_path, EXPORT="1")
    assert rerun.returncode == 0, rerun.stderr
    assert CheckpointStore(tmp_path).entries() == checkpoints  # training was complete: nothing retrained
    assert_same_training(tmp_path, uninterrupted)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    assert session.run(None, {"images": torch.zeros(1, 3, 32, 32).numpy()})[0].shape == (1, 3)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(dataset, uninterrupted, tmp_path):
    assert train(dataset, tmp_path, KILL_AT_STEP="12", EVERY_SECONDS=EVERY_STEP).returncode == -9
    newest = CheckpointStore(tmp_path).entries()[-1]
    with open(tmp_path / newest.file, "r+b") as handle:  # a bad disk block in the middle of the file
        handle.seek(newest.bytes // 2)
        handle.write(b"\xff" * 64)
    resumed = train(dataset, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {tmp_path / newest.file} is damaged" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_no_usable_checkpoint_is_a_clear_error_never_a_silent_restart(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for entry in CheckpointStore(out).entries():
        (out / entry.file).write_bytes(b"truncated")
    failed = train(dataset, out)
    assert failed.returncode == 1
    assert f"CheckpointError: no usable checkpoint in {out}" in failed.stderr
    assert "remove the directory" in failed.stderr


def test_a_checkpoint_of_another_model_label_map_or_best_metric_is_refused_by_name(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    other_model = TrainConfig(dataset=str(dataset), trainer="torch", model="mobilenet_v3_small", epochs=EPOCHS + 1)
    with pytest.raises(CheckpointError, match="another architecture .'torch_driver:model'."):
        TorchClassifierTrainer().train(TrainJob(other_model, load_dataset(dataset), out))

    relabelled = tmp_path / "relabelled"
    shutil.copytree(dataset, relabelled)
    for split in ("train", "val", "test"):
        (relabelled / split / "circle").rename(relabelled / split / "disc")
    config = TrainConfig(dataset=str(relabelled), trainer="torch", model="tiny-cnn", epochs=EPOCHS)
    with pytest.raises(CheckpointError, match="another dataset or label map"):
        TorchClassifierTrainer().train(TrainJob(config, load_dataset(relabelled), out))

    other_best = TrainConfig(
        dataset=str(dataset), trainer="torch", model="tiny-cnn", epochs=EPOCHS, checkpoint={"best_metric": "val_loss"}
    )
    with pytest.raises(CheckpointError, match="best_metric 'val_accuracy', this run asks for 'val_loss'"):
        TorchClassifierTrainer().train(TrainJob(other_best, load_dataset(dataset), out))


def test_retention_keeps_the_newest_checkpoints_and_the_best(uninterrupted):
    manifest = json.loads((uninterrupted / "checkpoints.json").read_text())
    kept = {entry["file"] for entry in manifest["checkpoints"]}
    assert manifest["best"] in kept and manifest["last"] in kept
    assert len(kept - {manifest["best"]}) <= 2  # keep_last defaults to 2
    assert {path.name for path in uninterrupted.glob("ckpt-*.pt")} == kept  # the others are deleted
    assert (uninterrupted / "last.pt").samefile(uninterrupted / manifest["last"])
    assert (uninterrupted / "best.pt").samefile(uninterrupted / manifest["best"])


def test_each_epochs_metrics_reach_mlflow_exactly_once_across_a_kill(stack, dataset, uninterrupted, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("checkpoint-tests") or client.get_experiment(
        client.create_experiment("checkpoint-tests")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    # Killed in epoch 3, after epoch 2's metrics were logged (epoch checkpoints only): the resumed attempt
    # repeats epoch 3 but must not repeat 1 or 2.
    killed = train(dataset, tmp_path, KILL_AT_STEP=str(2 * STEPS_PER_EPOCH + 3), MLFLOW_RUN_ID=run_id)
    assert killed.returncode == -9
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]  # checkpointed epochs only
    resumed = train(dataset, tmp_path, MLFLOW_RUN_ID=run_id)
    assert resumed.returncode == 0, resumed.stderr
    expected = state(uninterrupted)["progress"]["history"]
    for name in ("train_loss", "val_accuracy", "val_loss", "learning_rate"):
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3], name
        assert [m.value for m in history] == pytest.approx([expected[e][name] for e in (1, 2, 3)], abs=1e-9)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_pause_checkpoints_at_the_next_step_and_training_again_ends_like_an_uninterrupted_run(
    dataset, uninterrupted, tmp_path
):
    paused = train(dataset, tmp_path, PAUSE_AFTER_EPOCH="1")
    assert paused.returncode == 3, paused.stderr
    report = json.loads(paused.stdout.splitlines()[-1])
    assert report["paused"] == "paused in epoch 2, after batch 1"
    progress = state(tmp_path)["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 1)  # one step after the request, not at the epoch's end
    resumed = train(dataset, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1, batch 1" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_checkpoint_now_writes_one_at_the_next_step_and_training_goes_on(dataset, uninterrupted, tmp_path):
    done = train(dataset, tmp_path, CHECKPOINT_AFTER_EPOCH="1")
    assert done.returncode == 0, done.stderr
    saved = [name for _, name in json.loads(done.stdout.splitlines()[-1])["checkpoints"]]
    # Epoch checkpoints are ckpt-eNNNN-s(epochs * 9); the requested one is a step into epoch 2.
    assert f"ckpt-e0001-s{STEPS_PER_EPOCH + 1:08d}.pt" in saved
    assert (
        saved.index(f"ckpt-e0001-s{STEPS_PER_EPOCH + 1:08d}.pt")
        == saved.index(f"ckpt-e0001-s{STEPS_PER_EPOCH:08d}.pt") + 1
    )
    assert_same_training(tmp_path, uninterrupted)  # a checkpoint changes nothing about the training


# ------------------------------------------------------------------ checkpoint.min_interval_seconds (in-process)


class Saves(Callback):
    """Records the checkpoints written; asks for a pause or a checkpoint when the given epoch ends."""

    def __init__(self, job: TrainJob, pause_after: int = 0, checkpoint_after: int = 0) -> None:
        self.job, self.pause_after, self.checkpoint_after = job, pause_after, checkpoint_after
        self.names: list[str] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.pause_after:
            self.job.control.request_pause()
        if epoch == self.checkpoint_after:
            self.job.control.request_checkpoint()

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.names.append(path.name)


def in_process_job(
    dataset: Path, out: Path, epochs: int, min_interval: float, best_metric: str | None = None, **asks: int
) -> TrainJob:
    config = TrainConfig(
        dataset=str(dataset),
        trainer="torch",
        model="tiny-cnn",
        epochs=epochs,
        batch_size=4,
        image_size=32,
        learning_rate=0.01,
        checkpoint={"min_interval_seconds": min_interval, "best_metric": best_metric},
    )
    job = TrainJob(config, load_dataset(dataset), out)
    job.callbacks.append(Saves(job, **asks))
    return job


def ckpt(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:08d}.pt"


def test_epochs_inside_the_min_interval_are_not_checkpointed_but_a_requested_one_and_the_last_are(dataset, tmp_path):
    job = in_process_job(dataset, tmp_path, EPOCHS, min_interval=3600, checkpoint_after=1)
    result = TorchClassifierTrainer().train(job)
    # Epochs 1 and 2 end within the hour: no checkpoint of their own; "checkpoint now" (a step into epoch 2) and
    # the last epoch are written all the same.
    assert job.callbacks[0].names == [ckpt(1, STEPS_PER_EPOCH + 1), ckpt(EPOCHS, EPOCHS * STEPS_PER_EPOCH)]
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())
    assert manifest["best"] == manifest["last"] == ckpt(EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    history = state(tmp_path)["progress"]["history"]
    assert sorted(history) == [1, 2, 3]  # every epoch's metrics, checkpointed or not
    assert result.metrics == {k: v for k, v in history[EPOCHS].items() if k.startswith("val_")}


def test_a_pause_inside_the_min_interval_checkpoints_at_once(dataset, tmp_path):
    job = in_process_job(dataset, tmp_path, EPOCHS, min_interval=3600, pause_after=1)
    with pytest.raises(TrainingPaused, match="paused in epoch 2, after batch 1"):
        TorchClassifierTrainer().train(job)
    assert job.callbacks[0].names == [ckpt(1, STEPS_PER_EPOCH + 1)]  # epoch 1 itself was too soon


def test_the_best_checkpoint_is_the_best_of_those_written_not_a_skipped_epoch(dataset, tmp_path, monkeypatch):
    from trainers import torch_classifier

    # Validation accuracy scripted per epoch so that epoch 2, which min_interval_seconds skips, would be the best.
    accuracies = iter([0.3, 0.9, 0.6])
    real_evaluate = torch_classifier._evaluate

    def scripted(*args, **kwargs) -> dict[str, float]:
        return {**real_evaluate(*args, **kwargs), "val_accuracy": next(accuracies)}

    monkeypatch.setattr(torch_classifier, "_evaluate", scripted)
    TorchClassifierTrainer().train(in_process_job(dataset, tmp_path, 1, min_interval=0))  # epoch 1 written
    job = in_process_job(dataset, tmp_path, EPOCHS, min_interval=3600)
    result = TorchClassifierTrainer().train(job)
    assert job.callbacks[0].names == [ckpt(EPOCHS, EPOCHS * STEPS_PER_EPOCH)]  # epoch 2 skipped
    # Epoch 3 (0.6) beats the best written checkpoint (epoch 1, 0.3): it is best.pt, whatever epoch 2 scored.
    assert json.loads((tmp_path / "checkpoints.json").read_text())["best"] == ckpt(EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)["epoch"] == EPOCHS
    assert result.metrics["val_accuracy"] == 0.6


@pytest.mark.parametrize("trainer", ["torch", "hf-image", "yolo"])
def test_a_negative_min_interval_is_refused_by_name(dataset, trainer):
    with pytest.raises(ValidationError, match=r"checkpoint\.min_interval_seconds\n.*greater than or equal to 0"):
        TrainConfig(dataset=str(dataset), trainer=trainer, checkpoint={"min_interval_seconds": -1})


# ------------------------------------------------------------------------------------------ checkpoint.best_metric


@pytest.mark.parametrize(("best_metric", "best_epoch"), [(None, 2), ("val_accuracy", 2), ("val_loss", 3)])
def test_best_pt_follows_the_chosen_metric(dataset, tmp_path, monkeypatch, best_metric, best_epoch):
    from trainers import torch_classifier

    # (accuracy, loss) scripted per epoch: the most accurate epoch (2) is not the one of lowest loss (3).
    scores = iter([(0.5, 0.8), (0.9, 0.6), (0.7, 0.3)])
    real_evaluate = torch_classifier._evaluate

    def scripted(*args, **kwargs) -> dict[str, float]:
        accuracy, loss = next(scores)
        return {**real_evaluate(*args, **kwargs), "val_accuracy": accuracy, "val_loss": loss}

    monkeypatch.setattr(torch_classifier, "_evaluate", scripted)
    result = TorchClassifierTrainer().train(in_process_job(dataset, tmp_path, EPOCHS, 0, best_metric))
    best_step = best_epoch * STEPS_PER_EPOCH
    assert json.loads((tmp_path / "checkpoints.json").read_text())["best"] == ckpt(best_epoch, best_step)
    assert torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)["epoch"] == best_epoch
    assert result.metrics == {
        "val_accuracy": [0.5, 0.9, 0.7][best_epoch - 1],
        "val_loss": [0.8, 0.6, 0.3][best_epoch - 1],
    }
    assert result.primary_metric == (best_metric or "val_accuracy")


@pytest.mark.parametrize(
    ("trainer", "model", "name", "allowed"),
    [
        ("torch", "tiny-cnn", "map50", "val_accuracy, val_loss"),
        ("hf-image", "vit-tiny", "accuracy", "val_accuracy, val_loss"),
        ("yolo", "yolov8n.yaml", "val_loss", "fitness, map50_95, map50, precision, recall"),
    ],
)
def test_a_best_metric_the_trainer_does_not_report_is_refused_by_name(dataset, trainer, model, name, allowed):
    with pytest.raises(ValidationError, match=rf"checkpoint\.best_metric '{name}' .* {trainer} trainer.*{allowed}"):
        TrainConfig(dataset=str(dataset), trainer=trainer, model=model, checkpoint={"best_metric": name})
