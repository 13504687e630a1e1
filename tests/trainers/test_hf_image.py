"""HFImageTrainer with real Transformers, MLflow (SQLite) and ONNX Runtime on tiny generated shapes.

One module-scoped training (vit-tiny, 3 epochs, a checkpoint every 2 epochs, inside one active MLflow run)
feeds most tests; resume, a local pretrained directory and the two tiny architectures run separately.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import trainers.offline  # noqa: F401
from trainers.base import Callback, TrainingPaused, TrainJob, TrainResult
from trainers.checkpoints import CheckpointError
from trainers.config import TrainConfig
from trainers.data.spec import DatasetSpec
from trainers.data.synthetic import make_shapes_classification
from trainers.data.validate import load_dataset
from trainers.onnx_export import ParityError, check_onnx_parity

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("transformers")

from trainers.hf_image import HFImageTrainer, build_model  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS, EVERY_N, BATCH, SIZE = 3, 2, 8, 32
TRAIN_PER_CLASS = 8
STEPS_PER_EPOCH = math.ceil(3 * TRAIN_PER_CLASS / BATCH)  # 3 classes
EXPERIMENT = "hf-image-test"
# Names HF's MLflowCallback would log as params (TrainingArguments, model config) with other values.
CALLER_PARAMS = {
    "learning_rate": "caller",
    "num_train_epochs": "caller",
    "seed": "caller",
    "image_size": "caller",
}


@dataclass
class Recorder(Callback):
    starts: list[tuple[int, int]] = field(default_factory=list)
    epochs: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)

    def on_train_start(self, total_epochs: int, start_epoch: int) -> None:
        self.starts.append((total_epochs, start_epoch))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append((epoch, dict(metrics)))

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.checkpoints.append((epoch, Path(path)))


@dataclass
class Trained:
    job: TrainJob
    result: TrainResult
    recorder: Recorder
    run_id: str
    active_after_train: str | None
    active_after_evaluate: str | None
    status_after_evaluate: str
    evaluated: dict[str, dict[str, float]]


def _job(dataset: DatasetSpec, output_dir: Path, *, epochs: int = EPOCHS, model: str = "vit-tiny", **kw) -> TrainJob:
    config = TrainConfig(
        dataset=str(dataset.root),
        trainer="hf-image",
        model=model,
        epochs=epochs,
        batch_size=kw.pop("batch_size", BATCH),
        image_size=SIZE,
        learning_rate=1e-3,
        # min_interval_seconds 0: the epochs are sub-second and these tests count on a checkpoint per due epoch.
        checkpoint={
            "every_n_epochs": kw.pop("every_n_epochs", EVERY_N),
            "min_interval_seconds": kw.pop("min_interval_seconds", 0),
            "best_metric": kw.pop("checkpoint_best_metric", None),
        },
        **kw,
    )
    return TrainJob(config=config, dataset=dataset, output_dir=output_dir, callbacks=[Recorder()])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> DatasetSpec:
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_classification(
        root, train_per_class=TRAIN_PER_CLASS, val_per_class=4, test_per_class=4, image_size=SIZE
    )
    return load_dataset(root)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A SQLite tracking store for this module only; the previous tracking URI comes back afterwards."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(uri)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def trained(shapes, tracking, tmp_path_factory) -> Trained:
    """Train once inside one active run, as the flow does, with MLflow env vars that would misdirect HF."""
    job = _job(shapes, tmp_path_factory.mktemp("hf") / "out")
    trainer = HFImageTrainer()
    # Artifacts under tmp too: a SQLite store's default artifact root is ./mlruns in the working directory.
    artifacts = (tmp_path_factory.mktemp("mlflow-artifacts")).as_uri()
    experiment_id = tracking.create_experiment(EXPERIMENT, artifact_location=artifacts)
    with pytest.MonkeyPatch.context() as mp, mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(CALLER_PARAMS)
        # Ignored by the trainer: HF's own callback would resume/nest a run or set a stray experiment.
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "stray-hf-experiment")
        mp.setenv("MLFLOW_NESTED_RUN", "true")
        result = trainer.train(job)
        active_after_train = mlflow.active_run().info.run_id if mlflow.active_run() else None
        evaluated = {split: trainer.evaluate(job, result.best_checkpoint, split) for split in ("val", "test")}
        active_after_evaluate = mlflow.active_run().info.run_id if mlflow.active_run() else None
        status = tracking.get_run(run.info.run_id).info.status
    return Trained(
        job=job,
        result=result,
        recorder=job.callbacks[0],
        run_id=run.info.run_id,
        active_after_train=active_after_train,
        active_after_evaluate=active_after_evaluate,
        status_after_evaluate=status,
        evaluated=evaluated,
    )


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    load = AutoModelForImageClassification.from_pretrained
    left, right = load(str(a)).state_dict(), load(str(b)).state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), f"weights of {a} and {b} differ"


def _chosen_checkpoint(last: Path) -> Path:
    """The checkpoint the Trainer selected as best (the last one when no epoch ever improved on the first)."""
    best = json.loads((last / "trainer_state.json").read_text())["best_model_checkpoint"]
    return Path(best) if best else last


def _id2label(checkpoint: Path) -> dict[int, str]:
    raw = json.loads((checkpoint / "config.json").read_text())["id2label"]
    return {int(k): v for k, v in raw.items()}


def test_train_writes_best_and_last_checkpoints_with_the_label_map(trained: Trained, shapes: DatasetSpec):
    result = trained.result
    assert result.labels == shapes.labels == ["circle", "square", "triangle"]
    assert result.best_checkpoint == trained.job.output_dir / "best"
    assert result.last_checkpoint.name == f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    for checkpoint in (result.best_checkpoint, result.last_checkpoint):
        assert (checkpoint / "model.safetensors").is_file()
        assert _id2label(checkpoint) == dict(enumerate(shapes.labels))
    assert result.epochs_completed == EPOCHS
    assert result.primary_metric == "val_accuracy"
    assert set(result.metrics) == {"val_accuracy", "val_loss"}
    # best/ holds the weights of the checkpoint the Trainer chose, and the metrics are theirs.
    _assert_same_weights(result.best_checkpoint, _chosen_checkpoint(result.last_checkpoint))
    assert trained.evaluated["val"]["val_accuracy"] == pytest.approx(result.metrics["val_accuracy"])
    assert trained.evaluated["val"]["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-4)


def test_progress_callbacks_follow_epochs_and_checkpoint_cadence(trained: Trained):
    recorder = trained.recorder
    assert recorder.starts == [(EPOCHS, 0)]
    assert [epoch for epoch, _ in recorder.epochs] == [1, 2, 3]
    for _, metrics in recorder.epochs:
        assert {"val_accuracy", "val_loss", "train_loss"} <= set(metrics)
        assert 0.0 <= metrics["val_accuracy"] <= 1.0
    # every 2 epochs, and always the last one
    assert [epoch for epoch, _ in recorder.checkpoints] == [2, 3]
    assert [path.name for _, path in recorder.checkpoints] == [
        f"checkpoint-{2 * STEPS_PER_EPOCH}",
        f"checkpoint-{3 * STEPS_PER_EPOCH}",
    ]
    assert all(path.is_dir() for _, path in recorder.checkpoints)
    assert sorted(p.name for p in trained.job.output_dir.glob("checkpoint-*")) == [
        path.name for _, path in recorder.checkpoints
    ]


def test_evaluate_returns_split_prefixed_metrics(trained: Trained):
    for split, metrics in trained.evaluated.items():
        assert set(metrics) == {f"{split}_accuracy", f"{split}_loss"}
        assert 0.0 <= metrics[f"{split}_accuracy"] <= 1.0
        assert metrics[f"{split}_loss"] > 0


def test_onnx_export_matches_pytorch(trained: Trained, tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    trainer, job, best = HFImageTrainer(), trained.job, trained.result.best_checkpoint
    path = trainer.export_onnx(job, best, tmp_path / "model.onnx", opset=17)
    assert path == tmp_path / "model.onnx" and path.is_file()
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis

    batch = trainer.parity_inputs(job, 5)  # not the batch size the export traced with
    assert batch.shape == (5, 3, SIZE, SIZE) and str(batch.dtype) == "float32"
    reference = trainer.torch_outputs(job, best, batch)
    assert reference.shape == (5, 3)
    report = check_onnx_parity(path, batch, reference, atol=1e-4, rtol=1e-3)
    assert report.images == 5 and report.max_abs_diff < 1e-4
    print(f"vit-tiny ONNX parity max |diff| = {report.max_abs_diff:.3g}")

    with pytest.raises(ParityError):
        check_onnx_parity(path, batch, reference + 0.5, atol=1e-4, rtol=1e-3)


def test_mlflow_logs_into_the_active_run_only(trained: Trained, tracking):
    assert trained.active_after_train == trained.run_id
    assert trained.active_after_evaluate == trained.run_id
    assert trained.status_after_evaluate == "RUNNING"

    history = tracking.get_metric_history(trained.run_id, "eval_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [
        STEPS_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 1)
    ]
    assert len(tracking.get_metric_history(trained.run_id, "eval_loss")) == EPOCHS
    assert tracking.get_metric_history(trained.run_id, "loss")

    run = tracking.get_run(trained.run_id)
    assert run.data.params == CALLER_PARAMS  # HF logged no params over the caller's
    artifacts = [a.path for a in tracking.list_artifacts(trained.run_id, "hf-image")]
    assert artifacts == ["hf-image/training_args.json"]

    experiments = tracking.search_experiments()
    assert sorted(e.name for e in experiments) == ["Default", EXPERIMENT]
    assert len(tracking.search_runs([e.experiment_id for e in experiments])) == 1


def test_resume_continues_from_the_last_checkpoint(trained: Trained, shapes: DatasetSpec, tracking, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(trained.job.output_dir, output_dir)
    shutil.rmtree(output_dir / "best")
    job = _job(shapes, output_dir, epochs=EPOCHS + 1)
    assert mlflow.active_run() is None

    result = HFImageTrainer().train(job)

    recorder: Recorder = job.callbacks[0]
    assert recorder.starts == [(EPOCHS + 1, EPOCHS)]
    assert [epoch for epoch, _ in recorder.epochs] == [EPOCHS + 1]
    assert [epoch for epoch, _ in recorder.checkpoints] == [EPOCHS + 1]
    assert result.epochs_completed == EPOCHS + 1
    assert result.last_checkpoint.name == f"checkpoint-{(EPOCHS + 1) * STEPS_PER_EPOCH}"
    assert (result.best_checkpoint / "config.json").is_file()
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    evaluated_steps = [e["step"] for e in state["log_history"] if "eval_accuracy" in e]
    assert evaluated_steps == [STEPS_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 2)]
    # With no active run nothing was logged: still the one run of the module.
    experiments = tracking.search_experiments()
    assert len(tracking.search_runs([e.experiment_id for e in experiments])) == 1
    assert mlflow.active_run() is None


def test_resuming_with_another_best_metric_or_dataset_is_refused_before_training(
    trained: Trained, shapes: DatasetSpec, tmp_path: Path
):
    """Transformers compares a resumed run's evaluations with the best_metric value its checkpoint recorded: under
    another metric (or on another dataset) that comparison would be meaningless."""
    output_dir = tmp_path / "out"
    shutil.copytree(trained.job.output_dir, output_dir)
    before = sorted(p.name for p in output_dir.iterdir())
    job = _job(shapes, output_dir, epochs=EPOCHS + 1, checkpoint_best_metric="val_loss")
    with pytest.raises(CheckpointError, match="checkpoint.best_metric 'val_accuracy' then, 'val_loss' now"):
        HFImageTrainer().train(job)
    relabelled = tmp_path / "relabelled"
    shutil.copytree(shapes.root, relabelled)
    for split in ("train", "val", "test"):
        (relabelled / split / "circle").rename(relabelled / split / "disc")
    with pytest.raises(CheckpointError, match="another dataset version and label map"):
        HFImageTrainer().train(_job(load_dataset(relabelled), output_dir, epochs=EPOCHS + 1))
    assert sorted(p.name for p in output_dir.iterdir()) == before  # nothing trained, nothing written


def test_retry_after_a_finished_run_restores_the_weights(trained: Trained, shapes: DatasetSpec, tmp_path):
    """A retry finds the final checkpoint: no step runs, and the weights come back through the resume path."""
    output_dir = tmp_path / "out"
    shutil.copytree(trained.job.output_dir, output_dir)
    shutil.rmtree(output_dir / "best")
    job = _job(shapes, output_dir)

    result = HFImageTrainer().train(job)

    recorder: Recorder = job.callbacks[0]
    assert recorder.starts == [(EPOCHS, EPOCHS)] and recorder.epochs == [] and recorder.checkpoints == []
    assert result.epochs_completed == EPOCHS
    assert result.metrics == pytest.approx(trained.result.metrics)
    # Transformers 5.23's own loader skips ViT's renamed weights (strict=False): best/ would be a fresh init.
    _assert_same_weights(result.best_checkpoint, trained.result.best_checkpoint)


def test_best_model_is_loaded_with_every_weight(shapes: DatasetSpec, tmp_path: Path):
    """load_best_model_at_end goes through from_pretrained: ViT's renamed weights are loaded too."""
    import torch
    from transformers import TrainingArguments

    from trainers.hf_image import _trainer_class

    torch.manual_seed(0)
    best = build_model("vit-tiny", shapes.labels, SIZE)
    best.save_pretrained(tmp_path / "checkpoint-1")
    torch.manual_seed(1)
    current = build_model("vit-tiny", shapes.labels, SIZE)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = _trainer_class()(model=current, args=args)
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    trainer._load_best_model()
    current.save_pretrained(tmp_path / "loaded")
    _assert_same_weights(tmp_path / "loaded", tmp_path / "checkpoint-1")


def test_fine_tunes_a_local_pretrained_directory_with_other_classes(trained: Trained, tmp_path: Path):
    root = make_shapes_classification(
        tmp_path / "two",
        classes=("ring", "cross"),
        train_per_class=4,
        val_per_class=2,
        test_per_class=2,
        image_size=SIZE,
    )
    dataset = load_dataset(root)
    job = _job(
        dataset,
        tmp_path / "out",
        epochs=1,
        model=str(trained.result.best_checkpoint),
        batch_size=8,
        every_n_epochs=1,
        optimizer="sgd",
        scheduler="constant",
        loss={"label_smoothing": 0.1},
    )
    result = HFImageTrainer().train(job)
    assert _id2label(result.best_checkpoint) == {0: "cross", 1: "ring"}
    # One epoch: its checkpoint is the best, loaded back at the end (load_best_model_at_end).
    assert _chosen_checkpoint(result.last_checkpoint) == result.last_checkpoint
    _assert_same_weights(result.best_checkpoint, result.last_checkpoint)
    metrics = HFImageTrainer().evaluate(job, result.best_checkpoint, "test")
    assert set(metrics) == {"test_accuracy", "test_loss"}


@pytest.mark.parametrize("name", ["vit-tiny", "resnet-tiny"])
def test_tiny_models_build_step_and_export(name: str, shapes: DatasetSpec, tmp_path: Path):
    import torch

    torch.manual_seed(0)
    model = build_model(name, shapes.labels, SIZE)
    assert model.config.id2label == dict(enumerate(shapes.labels))
    job = _job(shapes, tmp_path / "out", model=name)
    trainer = HFImageTrainer()
    batch = torch.from_numpy(trainer.parity_inputs(job, 6))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model(pixel_values=batch, labels=labels)
    assert out.logits.shape == (6, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    # BatchNorm (resnet) must be exported and compared in eval mode.
    model.save_pretrained(tmp_path / "ckpt")
    path = trainer.export_onnx(job, tmp_path / "ckpt", tmp_path / "m.onnx", opset=17)
    report = check_onnx_parity(
        path,
        batch.numpy(),
        trainer.torch_outputs(job, tmp_path / "ckpt", batch.numpy()),
        atol=1e-4,
        rtol=1e-3,
    )
    print(f"{name} ONNX parity max |diff| = {report.max_abs_diff:.3g}")


class PauseAfterEpoch(Recorder):
    """A user's pause arriving while epoch `epoch` ends (the control is what the Prefect watcher sets)."""

    def __init__(self, job: TrainJob, epoch: int) -> None:
        super().__init__()
        self.job, self.epoch = job, epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        super().on_epoch_end(epoch, metrics)
        if epoch == self.epoch:
            self.job.control.request_pause()


def test_a_pause_saves_a_checkpoint_mid_epoch_and_training_again_finishes_every_epoch_once(
    shapes: DatasetSpec, tmp_path: Path
):
    job = _job(shapes, tmp_path / "out", every_n_epochs=1)
    job.callbacks = [PauseAfterEpoch(job, 1)]
    with pytest.raises(TrainingPaused, match=f"paused in epoch 2, at step {STEPS_PER_EPOCH + 1}"):
        HFImageTrainer().train(job)
    first = job.callbacks[0]
    assert [epoch for epoch, _ in first.epochs] == [1]
    # The step after the request, mid-epoch 2 (1 epoch completed), saved by Transformers with its full state.
    assert first.checkpoints[-1] == (1, tmp_path / "out" / f"checkpoint-{STEPS_PER_EPOCH + 1}")
    assert (first.checkpoints[-1][1] / "trainer_state.json").is_file()

    again = _job(shapes, tmp_path / "out", every_n_epochs=1)
    result = HFImageTrainer().train(again)
    second: Recorder = again.callbacks[0]
    assert second.starts == [(EPOCHS, 1)]
    assert [epoch for epoch, _ in second.epochs] == [2, 3]  # epoch 2 finished from its saved step, not repeated
    assert result.epochs_completed == EPOCHS
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_accuracy" in e] == [
        STEPS_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 1)
    ]


def test_checkpoint_now_saves_at_the_next_step_and_training_goes_on(shapes: DatasetSpec, tmp_path: Path):
    job = _job(shapes, tmp_path / "out", every_n_epochs=EPOCHS)

    class AskAfterFirstEpoch(Recorder):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            super().on_epoch_end(epoch, metrics)
            if epoch == 1:
                job.control.request_checkpoint()

    job.callbacks = [AskAfterFirstEpoch()]
    result = HFImageTrainer().train(job)
    saved = [path.name for _, path in job.callbacks[0].checkpoints]
    assert saved == [f"checkpoint-{STEPS_PER_EPOCH + 1}", f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"]
    assert result.epochs_completed == EPOCHS


# ------------------------------------------------------------------ interruptions: cancel, kill -9, damage

DRIVER = Path(__file__).with_name("hf_driver.py")


class Terminated(BaseException):
    """What Prefect's SIGTERM handler raises in the main thread when a run is cancelled (a BaseException)."""


@contextlib.contextmanager
def _sigterm_at_training_step(step: int):
    """SIGTERM arrives while training step `step` runs its forward pass (model and optimizer consistent)."""
    from trainers import hf_image

    real_build = hf_image.build_model
    forwards = 0

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def before_forward(module, inputs):
            nonlocal forwards
            if module.training:
                forwards += 1
                if forwards == step:
                    signal.raise_signal(signal.SIGTERM)

        model.register_forward_pre_hook(before_forward)
        return model

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hf_image, "build_model", build)
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_cancel_mid_epoch_checkpoints_the_steps_trained_and_training_again_finishes_every_epoch_once(
    shapes: DatasetSpec, tmp_path: Path, caplog
):
    out = tmp_path / "out"
    job = _job(shapes, out, every_n_epochs=1)
    with _sigterm_at_training_step(STEPS_PER_EPOCH + 2), pytest.raises(Terminated):  # the 2nd step of epoch 2
        HFImageTrainer().train(job)
    saved = out / f"checkpoint-{STEPS_PER_EPOCH + 1}"  # every step that finished, mid-epoch 2
    assert job.callbacks[0].checkpoints[-1] == (1, saved)
    assert (saved / "trainer_state.json").is_file() and (saved / "trainyard-manifest.json").is_file()
    assert f"checkpoint at step {STEPS_PER_EPOCH + 1}" in caplog.text

    again = _job(shapes, out, every_n_epochs=1)
    result = HFImageTrainer().train(again)
    assert again.callbacks[0].starts == [(EPOCHS, 1)]
    assert [epoch for epoch, _ in again.callbacks[0].epochs] == [2, 3]
    assert result.epochs_completed == EPOCHS


def test_every_seconds_checkpoints_mid_epoch(shapes: DatasetSpec, tmp_path: Path):
    job = _job(shapes, tmp_path / "out", epochs=1, every_n_epochs=1)
    job.config.checkpoint.every_seconds = 1e-6  # each step is past the interval
    HFImageTrainer().train(job)
    steps = [int(path.name.split("-")[1]) for _, path in job.callbacks[0].checkpoints]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1))


def test_a_damaged_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    shapes: DatasetSpec, tmp_path: Path, caplog
):
    out = tmp_path / "out"
    HFImageTrainer().train(_job(shapes, out, epochs=2, every_n_epochs=1))
    newest = out / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a disk error, a partial copy

    again = _job(shapes, out, every_n_epochs=1)
    HFImageTrainer().train(again)
    assert "model.safetensors differs from the manifest" in caplog.text
    assert (out / f"damaged-checkpoint-{2 * STEPS_PER_EPOCH}").is_dir()
    assert again.callbacks[0].starts == [(EPOCHS, 1)]  # from checkpoint-3: epochs 2 and 3 again
    assert [epoch for epoch, _ in again.callbacks[0].epochs] == [2, 3]


def test_no_usable_checkpoint_is_a_clear_error_never_a_silent_restart(shapes: DatasetSpec, tmp_path: Path):
    out = tmp_path / "out"
    HFImageTrainer().train(_job(shapes, out, epochs=1, every_n_epochs=1))
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint .* will not restart from scratch"):
        HFImageTrainer().train(_job(shapes, out, every_n_epochs=1))


@pytest.mark.parametrize("kill_point", ["KILL_AFTER_EVAL_OF_EPOCH", "KILL_AFTER_SAVE_OF_EPOCH"])
def test_each_epochs_metrics_reach_mlflow_exactly_once_across_a_kill(shapes: DatasetSpec, tmp_path: Path, kill_point):
    import os
    import subprocess
    import sys

    from infra.settings import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("hf-kill", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    env = {
        **os.environ,
        "DATASET": str(shapes.root),
        "OUT": str(tmp_path / "out"),
        "EPOCHS": str(EPOCHS),
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_RUN_ID": run_id,
    }

    def train(**extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(DRIVER)]
        return subprocess.run(command, env={**env, **extra}, cwd=ROOT, capture_output=True, text=True, timeout=300)

    killed = train(**{kill_point: "2"})  # epoch 2 evaluated (and, for the second, saved), then kill -9
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    every_epoch = [STEPS_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 1)]
    for name in ("eval_accuracy", "eval_loss", "loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == every_epoch, name
    assert client.get_run(run_id).info.status == "FINISHED"


# ------------------------------------------------------------------ checkpoint.min_interval_seconds

HOUR = 3600  # a min_interval_seconds no test epoch reaches: only the forced saves happen


class AskAfterEpoch(Recorder):
    """Asks for a pause or a checkpoint when the given epoch ends."""

    def __init__(self, job: TrainJob, pause_after: int = 0, checkpoint_after: int = 0) -> None:
        super().__init__()
        self.job, self.pause_after, self.checkpoint_after = job, pause_after, checkpoint_after

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        super().on_epoch_end(epoch, metrics)
        if epoch == self.pause_after:
            self.job.control.request_pause()
        if epoch == self.checkpoint_after:
            self.job.control.request_checkpoint()


def test_epochs_inside_the_min_interval_are_not_saved_but_a_requested_step_and_the_last_are(
    shapes: DatasetSpec, tmp_path: Path
):
    job = _job(shapes, tmp_path / "out", every_n_epochs=1, min_interval_seconds=HOUR)
    job.callbacks = [AskAfterEpoch(job, checkpoint_after=1)]
    result = HFImageTrainer().train(job)
    last = f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    saved = [path.name for _, path in job.callbacks[0].checkpoints]
    assert saved == [f"checkpoint-{STEPS_PER_EPOCH + 1}", last]  # "checkpoint now" a step into epoch 2, the last
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == sorted(saved)
    assert [epoch for epoch, _ in job.callbacks[0].epochs] == [1, 2, 3]  # every epoch still evaluated
    # The only evaluated checkpoint is the last: it is the best, with its own metrics.
    state = json.loads((tmp_path / "out" / last / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(tmp_path / "out" / last)
    assert result.metrics["val_accuracy"] == job.callbacks[0].epochs[-1][1]["val_accuracy"]


def test_a_pause_inside_the_min_interval_saves_at_once(shapes: DatasetSpec, tmp_path: Path):
    job = _job(shapes, tmp_path / "out", every_n_epochs=1, min_interval_seconds=HOUR)
    job.callbacks = [AskAfterEpoch(job, pause_after=1)]
    with pytest.raises(TrainingPaused, match=f"at step {STEPS_PER_EPOCH + 1}"):
        HFImageTrainer().train(job)
    assert [path.name for _, path in job.callbacks[0].checkpoints] == [f"checkpoint-{STEPS_PER_EPOCH + 1}"]


def test_the_best_checkpoint_is_the_best_of_those_saved_not_a_skipped_epoch(
    shapes: DatasetSpec, tmp_path: Path, monkeypatch
):
    from trainers import hf_image

    # Accuracy scripted per evaluation so that epoch 2, which min_interval_seconds does not save, would be the best.
    accuracies = iter([0.3, 0.9, 0.6])
    monkeypatch.setattr(hf_image, "_compute_metrics", lambda eval_pred: {"accuracy": next(accuracies)})
    out = tmp_path / "out"
    HFImageTrainer().train(_job(shapes, out, epochs=1, every_n_epochs=1))  # epoch 1 (0.3) saved
    job = _job(shapes, out, every_n_epochs=1, min_interval_seconds=HOUR)
    result = HFImageTrainer().train(job)
    last = out / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    assert [path for _, path in job.callbacks[0].checkpoints] == [last]  # epoch 2 (0.9) not saved
    # Epoch 3 (0.6) beats the best saved checkpoint (epoch 1): Transformers picks it, not checkpoint-<epoch 1>.
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["best_model_checkpoint"], state["best_metric"]) == (str(last), 0.6)
    assert result.metrics["val_accuracy"] == 0.6
    _assert_same_weights(result.best_checkpoint, last)


def _scripted_metrics(monkeypatch, scores: list[tuple[float, float]]) -> None:
    """(accuracy, loss) per evaluation from Trainyard's compute_metrics; its "loss" becomes eval_loss, replacing
    the loss Transformers computed (its own keys are prefixed after compute_metrics's)."""
    from trainers import hf_image

    scripted = iter(scores)

    def compute_metrics(eval_pred) -> dict[str, float]:
        accuracy, loss = next(scripted)
        return {"accuracy": accuracy, "loss": loss}

    monkeypatch.setattr(hf_image, "_compute_metrics", compute_metrics)


@pytest.mark.parametrize(("best_metric", "best_epoch"), [(None, 2), ("val_accuracy", 2), ("val_loss", 3)])
def test_the_best_checkpoint_follows_the_chosen_metric(
    shapes: DatasetSpec, tmp_path: Path, monkeypatch, best_metric, best_epoch
):
    # The most accurate epoch (2) is not the one of lowest loss (3).
    scores = [(0.5, 0.8), (0.9, 0.6), (0.7, 0.3)]
    _scripted_metrics(monkeypatch, scores)
    out = tmp_path / "out"
    job = _job(shapes, out, every_n_epochs=1, checkpoint_best_metric=best_metric)
    result = HFImageTrainer().train(job)
    best = out / f"checkpoint-{best_epoch * STEPS_PER_EPOCH}"
    state = json.loads((out / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}" / "trainer_state.json").read_text())
    chosen = scores[best_epoch - 1][0 if best_metric in (None, "val_accuracy") else 1]
    assert (state["best_model_checkpoint"], state["best_metric"]) == (str(best), chosen)
    assert result.metrics == {"val_accuracy": scores[best_epoch - 1][0], "val_loss": scores[best_epoch - 1][1]}
    assert result.primary_metric == (best_metric or "val_accuracy")
    _assert_same_weights(result.best_checkpoint, best)


def test_a_minimised_best_metric_is_the_best_of_those_saved_not_a_skipped_epoch(
    shapes: DatasetSpec, tmp_path: Path, monkeypatch
):
    # Loss scripted so that epoch 2, which min_interval_seconds does not save, would be the best (lowest).
    _scripted_metrics(monkeypatch, [(0.5, 0.7), (0.5, 0.1), (0.5, 0.4)])
    out = tmp_path / "out"
    HFImageTrainer().train(_job(shapes, out, epochs=1, every_n_epochs=1, checkpoint_best_metric="val_loss"))
    job = _job(shapes, out, every_n_epochs=1, min_interval_seconds=HOUR, checkpoint_best_metric="val_loss")
    result = HFImageTrainer().train(job)
    last = out / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    assert [path for _, path in job.callbacks[0].checkpoints] == [last]  # epoch 2 (0.1) not saved
    # Epoch 3 (0.4) beats the best saved checkpoint (epoch 1, 0.7), whatever the unsaved epoch 2 scored.
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["best_model_checkpoint"], state["best_metric"]) == (str(last), 0.4)
    assert result.metrics["val_loss"] == 0.4


WARM_SAVE = """
import sys, tempfile
import transformers.conversion_mapping as conversion
from trainers import hf_image
if sys.argv[1] == "warm":
    hf_image.warm_up()
def refuse():
    raise SystemExit("the first save built Transformers' conversion table")
conversion._build_checkpoint_conversion_mapping = refuse
hf_image.build_model("vit-tiny", ["a", "b"], 32).save_pretrained(tempfile.mkdtemp())
"""


@pytest.mark.parametrize("process", ["warm", "cold"])
def test_a_process_warmed_up_like_the_warm_start_server_saves_without_building_transformers_table(process):
    """What the warm-start server (infra/runs/warm_start.py) saves every training it forks: the hook builds the table
    that a cold process builds inside its first checkpoint (the cold case shows the test can tell)."""
    import subprocess
    import sys

    from infra.settings import ROOT

    done = subprocess.run([sys.executable, "-c", WARM_SAVE, process], cwd=ROOT, capture_output=True, text=True)
    if process == "warm":
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert done.returncode == 1 and "built Transformers' conversion table" in done.stderr
