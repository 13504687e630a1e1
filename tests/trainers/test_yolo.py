"""The Ultralytics trainer, for real: a tiny generated detection dataset, YOLOv8n from scratch on the CPU.

One module-scoped training (3 epochs, inside an active MLflow run) is shared by most tests; the resume tests
train one more epoch each on copies of its output directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from trainers.base import Callback, TrainingPaused, TrainJob, TrainResult
from trainers.checkpoints import CheckpointError
from trainers.config import TrainConfig
from trainers.data.synthetic import make_shapes_detection
from trainers.data.validate import load_dataset
from trainers.onnx_export import ParityError, check_onnx_parity, read_label_map, write_label_map

pytestmark = pytest.mark.slow

EPOCHS = 3
EVERY = 2
HOUR = 3600  # a checkpoint.min_interval_seconds no test epoch reaches: only the forced saves happen
VAL_METRICS = {"val_map50", "val_map50_95", "val_precision", "val_recall"}
TRAIN_LOSSES = {"train_box_loss", "train_cls_loss", "train_dfl_loss"}


class Recorder(Callback):
    def __init__(self) -> None:
        self.starts: list[tuple[int, int]] = []
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path]] = []

    def on_train_start(self, total_epochs: int, start_epoch: int) -> None:
        self.starts.append((total_epochs, start_epoch))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append((epoch, dict(metrics)))

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.checkpoints.append((epoch, path))
        assert path.is_file(), f"checkpoint {path} announced before it exists"


def make_job(
    dataset,
    data_yaml: Path,
    output_dir: Path,
    epochs: int = EPOCHS,
    min_interval_seconds: float = 0,
    best_metric: str | None = None,
) -> tuple[TrainJob, Recorder]:
    config = TrainConfig(
        dataset=str(data_yaml),
        trainer="yolo",
        model="yolov8n.yaml",
        epochs=epochs,
        batch_size=8,
        image_size=64,
        learning_rate=1e-3,
        # min_interval_seconds 0 unless a test says otherwise: these epochs take about a second, and the tests
        # count on Ultralytics' save at every epoch.
        checkpoint={"every_n_epochs": EVERY, "min_interval_seconds": min_interval_seconds, "best_metric": best_metric},
    )
    recorder = Recorder()
    return TrainJob(config=config, dataset=dataset, output_dir=output_dir, callbacks=[recorder]), recorder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes-det"
    data_yaml = make_shapes_detection(root, train_images=16, val_images=8, image_size=64)
    return load_dataset(data_yaml), data_yaml


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A private SQLite tracking store; the caller's experiment; restores MLflow's global state afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tmp = tmp_path_factory.mktemp("mlflow")
    pinned = tracking_utils._tracking_uri  # None unless someone called set_tracking_uri: then env decides
    with pytest.MonkeyPatch.context() as env:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
            env.delenv(var, raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        experiment_id = mlflow.create_experiment("yolo-caller")
        try:
            yield experiment_id
        finally:
            if mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(pinned)


@pytest.fixture(scope="module")
def trained(dataset, tracking, tmp_path_factory):
    """Train once, the way the flow does: inside the caller's active MLflow run, its config already logged."""
    import mlflow

    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    job, recorder = make_job(spec, data_yaml, tmp_path_factory.mktemp("runs") / "job-1")
    with mlflow.start_run(experiment_id=tracking) as run:
        # The caller's params share keys with Ultralytics' args but not values (optimizer adamw vs AdamW).
        mlflow.log_params({k: v for k, v in job.config.model_dump().items() if not isinstance(v, dict)})
        result = YoloTrainer().train(job)
        still_active = mlflow.active_run()
    return {
        "job": job,
        "recorder": recorder,
        "result": result,
        "run_id": run.info.run_id,
        "active_after": still_active.info.run_id if still_active else None,
    }


# ------------------------------------------------------------------------------------------------ config


def test_config_maps_onto_ultralytics_arguments(dataset, tmp_path):
    from trainers.yolo import _train_args

    spec, data_yaml = dataset
    config = TrainConfig(
        dataset=str(data_yaml),
        trainer="yolo",
        model="yolo11n.yaml",
        epochs=7,
        batch_size=4,
        image_size=96,
        learning_rate=0.02,
        optimizer="sgd",
        scheduler="constant",
        augmentations={"horizontal_flip": 0.3, "vertical_flip": 0.1, "color_jitter": 0.4, "mosaic": 1.0},
        loss={"box_gain": 5.0, "cls_gain": 1.0},
        seed=3,
        deterministic=True,
        workers=2,
        checkpoint={"every_n_epochs": 5},
    )
    job = TrainJob(config=config, dataset=spec, output_dir=tmp_path / "run", device="cuda:1")
    args = _train_args(job, tmp_path / "dataset.yaml", tmp_path / "run")
    expected = {
        "epochs": 7,
        "batch": 4,
        "imgsz": 96,
        "lr0": 0.02,
        "optimizer": "SGD",
        "cos_lr": False,
        "lrf": 1.0,
        "seed": 3,
        "deterministic": True,
        "workers": 2,
        "fliplr": 0.3,
        "flipud": 0.1,
        "hsv_h": 0.0,
        "hsv_s": 0.4,
        "hsv_v": 0.4,
        "mosaic": 1.0,
        "box": 5.0,
        "cls": 1.0,
        "device": "1",
        "amp": True,
        "plots": False,
        "val": True,
        "project": str(tmp_path),
        "name": "run",
        "exist_ok": True,
    }
    assert {k: args.get(k) for k in expected} == expected
    assert "dfl" not in args and "warmup_bias_lr" not in args  # Ultralytics' defaults stay

    adamw = TrainJob(
        config=config.model_copy(update={"optimizer": "adamw", "scheduler": "cosine"}),
        dataset=spec,
        output_dir=tmp_path / "run",
    )
    args = _train_args(adamw, tmp_path / "dataset.yaml", tmp_path / "run")
    assert (args["optimizer"], args["cos_lr"], args["device"], args["amp"]) == ("AdamW", True, "cpu", False)
    assert args["warmup_bias_lr"] == 0.0 and "lrf" not in args


# ------------------------------------------------------------------------------------------------ training


def test_training_writes_ultralytics_checkpoints_and_reports_the_best(trained):
    result: TrainResult = trained["result"]
    weights = trained["job"].output_dir / "weights"
    assert result.best_checkpoint == weights / "best.pt" and result.best_checkpoint.is_file()
    assert result.last_checkpoint == weights / "last.pt" and result.last_checkpoint.is_file()
    assert result.epochs_completed == EPOCHS
    assert result.primary_metric == "val_map50_95"
    assert set(result.metrics) == VAL_METRICS
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())


def test_every_epoch_is_reported_with_trainyard_metric_names(trained):
    recorder: Recorder = trained["recorder"]
    assert recorder.starts == [(EPOCHS, 0)]
    assert [epoch for epoch, _ in recorder.epochs] == list(range(1, EPOCHS + 1))
    for _, metrics in recorder.epochs:
        assert set(metrics) >= VAL_METRICS | TRAIN_LOSSES
        assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())


def test_checkpoints_every_n_epochs_and_at_the_last(trained):
    recorder: Recorder = trained["recorder"]
    weights = trained["job"].output_dir / "weights"
    assert [epoch for epoch, _ in recorder.checkpoints] == [2, 3]
    assert [path for _, path in recorder.checkpoints] == [weights / "epoch2.pt", weights / "epoch3.pt"]
    assert sorted(p.name for p in weights.glob("epoch*.pt")) == ["epoch2.pt", "epoch3.pt"]


def test_the_checkpoint_label_map_is_the_datasets(trained, dataset):
    from trainers.yolo import checkpoint_labels

    spec, _ = dataset
    result: TrainResult = trained["result"]
    assert result.labels == spec.labels == ["circle", "square", "triangle"]
    assert checkpoint_labels(result.best_checkpoint) == spec.labels
    assert checkpoint_labels(result.last_checkpoint) == spec.labels


def test_evaluate_returns_the_split_metrics_and_creates_no_mlflow_run(trained, tracking):
    import mlflow

    from trainers.yolo import YoloTrainer

    assert mlflow.active_run() is None
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    metrics = YoloTrainer().evaluate(trained["job"], trained["result"].best_checkpoint, "val")
    assert set(metrics) == VAL_METRICS
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    with pytest.raises(ValueError, match="no 'test' split"):
        YoloTrainer().evaluate(trained["job"], trained["result"].best_checkpoint, "test")


# -------------------------------------------------------------------------------------------------- export


def test_onnx_export_matches_pytorch_on_real_images(trained, tmp_path):
    from trainers.yolo import YoloTrainer

    trainer, job = YoloTrainer(), trained["job"]
    best = trained["result"].best_checkpoint
    weights_before = sorted(p.name for p in best.parent.iterdir())
    onnx_path = trainer.export_onnx(job, best, tmp_path / "model.onnx", opset=17)
    assert onnx_path == tmp_path / "model.onnx" and onnx_path.is_file()
    # Nothing is left beside the checkpoint or the export.
    assert sorted(p.name for p in best.parent.iterdir()) == weights_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    batch = trainer.parity_inputs(job, 4)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == np.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    reference = trainer.torch_outputs(job, best, batch)
    assert reference.dtype == np.float32
    assert reference.shape[:2] == (4, 4 + len(job.dataset.labels))  # (N, 4 box + classes, anchors)

    # 10x tighter than the flow's 1e-3; seen: max |diff| ~1e-4 on box coordinates (pixels), ~1e-7 on scores.
    report = check_onnx_parity(onnx_path, batch, reference, atol=1e-4, rtol=1e-4)
    print(f"ONNX parity max |diff| over {report.images} images: {report.max_abs_diff:.3g}")
    assert report.images == 4 and report.max_abs_diff < 1e-3

    with pytest.raises(ParityError):
        check_onnx_parity(onnx_path, batch, reference + 1.0, atol=1e-4, rtol=1e-4)

    write_label_map(onnx_path, job.dataset.labels)
    assert read_label_map(onnx_path) == dict(enumerate(job.dataset.labels))


# -------------------------------------------------------------------------------------------------- MLflow


def test_metrics_land_in_the_callers_run_which_stays_active(trained, tracking):
    import mlflow
    from mlflow import MlflowClient

    assert trained["active_after"] == trained["run_id"]
    mlflow.flush_async_logging()
    client = MlflowClient()

    def steps(name: str) -> list[int]:
        return [m.step for m in client.get_metric_history(trained["run_id"], name)]

    # Ultralytics' own callback: its names, step = 0-based epoch, then the best model's validation at EPOCHS.
    assert steps("metrics/mAP50-95B") == list(range(EPOCHS + 1))
    assert steps("train/box_loss") == list(range(EPOCHS))
    # Trainyard's names at 1-based steps, like the other trainers.
    for name in VAL_METRICS | TRAIN_LOSSES:
        assert steps(name) == list(range(1, EPOCHS + 1))

    params = client.get_run(trained["run_id"]).data.params
    assert params["optimizer"] == "adamw"  # the caller's value, untouched
    assert params["yolo.optimizer"] == "AdamW" and params["yolo.epochs"] == str(EPOCHS)


def test_no_stray_run_or_experiment(trained, tracking):
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [trained["run_id"]]
    assert sorted(e.name for e in mlflow.search_experiments()) == ["Default", "yolo-caller"]
    assert not mlflow.MlflowClient().list_artifacts(trained["run_id"])  # no checkpoint upload behind our back


# -------------------------------------------------------------------------------------------------- resume


def _copy_run(trained, tmp_path: Path) -> Path:
    copy = tmp_path / "job-copy"
    shutil.copytree(trained["job"].output_dir, copy)
    return copy


def test_a_finished_run_is_continued_to_more_epochs(trained, dataset, tracking, tmp_path):
    """Ultralytics refuses to resume a finished run (last.pt is stripped): the trainer resumes epochN.pt."""
    import mlflow

    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _copy_run(trained, tmp_path)  # a moved directory too: the checkpoints name the original
    job, recorder = make_job(spec, data_yaml, output_dir, epochs=EPOCHS + 1)
    result = YoloTrainer().train(job)  # no active MLflow run: Ultralytics must create none
    assert recorder.starts == [(EPOCHS + 1, EPOCHS)]
    assert [epoch for epoch, _ in recorder.epochs] == [EPOCHS + 1]
    assert [epoch for epoch, _ in recorder.checkpoints] == [EPOCHS + 1]
    assert result.epochs_completed == EPOCHS + 1
    rows = (output_dir / "results.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == list(range(1, EPOCHS + 2))
    assert not list(trained["job"].output_dir.glob("weights/epoch4.pt"))  # the original is left alone
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1

    # A retry of the same request finds it done: no training, the same checkpoints.
    again, recorder = make_job(spec, data_yaml, output_dir, epochs=EPOCHS + 1)
    result2 = YoloTrainer().train(again)
    assert recorder.starts == [(EPOCHS + 1, EPOCHS + 1)] and recorder.epochs == []
    assert result2.best_checkpoint == result.best_checkpoint and result2.epochs_completed == EPOCHS + 1
    assert set(result2.metrics) == VAL_METRICS


def _killed_after_saving_epoch_2(trained, tmp_path: Path) -> Path:
    """A copy of the trained run as a run killed after saving epoch 2 leaves it: last.pt = the epoch-2 state, two
    rows of results."""
    output_dir = _copy_run(trained, tmp_path)
    weights = output_dir / "weights"
    shutil.copyfile(weights / "epoch2.pt", weights / "last.pt")
    (weights / "epoch3.pt").unlink()
    csv = output_dir / "results.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:3]) + "\n")
    return output_dir


def test_an_interrupted_run_resumes_where_it_stopped(trained, dataset, tmp_path):
    """Ultralytics' own resume: last.pt still holds optimizer state when a run dies mid-way."""
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _killed_after_saving_epoch_2(trained, tmp_path)
    job, recorder = make_job(spec, data_yaml, output_dir)
    result = YoloTrainer().train(job)
    assert recorder.starts == [(EPOCHS, 2)]
    assert [epoch for epoch, _ in recorder.epochs] == [3]
    assert result.epochs_completed == EPOCHS


def test_a_resume_drops_the_results_rows_of_epochs_it_trains_again(trained, dataset, tmp_path):
    """Epoch 3 trained and written to results.csv, but not saved (min_interval_seconds, or killed before its save):
    the resume trains it again, and results.csv holds it once."""
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _copy_run(trained, tmp_path)
    weights = output_dir / "weights"
    shutil.copyfile(weights / "epoch2.pt", weights / "last.pt")
    (weights / "epoch3.pt").unlink()
    job, recorder = make_job(spec, data_yaml, output_dir)
    YoloTrainer().train(job)
    assert [epoch for epoch, _ in recorder.epochs] == [3]
    rows = (output_dir / "results.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2, 3]


def test_resuming_on_another_dataset_is_refused(trained, tmp_path_factory, tmp_path):
    from trainers.yolo import YoloTrainer

    root = tmp_path_factory.mktemp("other") / "shapes-det"
    other_yaml = make_shapes_detection(root, classes=("a", "b"), train_images=4, val_images=2, image_size=64)
    output_dir = _copy_run(trained, tmp_path)
    job, _ = make_job(load_dataset(other_yaml), other_yaml, output_dir)
    with pytest.raises(CheckpointError, match="another dataset version and label map"):
        YoloTrainer().train(job)


def test_resuming_with_another_best_metric_is_refused(trained, dataset, tmp_path):
    """best.pt and Ultralytics' best_fitness were chosen by the metric the training started with."""
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    job, _ = make_job(spec, data_yaml, _copy_run(trained, tmp_path), best_metric="map50")
    with pytest.raises(CheckpointError, match="checkpoint.best_metric 'fitness' then, 'map50' now"):
        YoloTrainer().train(job)


def test_a_pause_stops_after_the_epoch_it_arrives_in_and_training_again_continues_there(dataset, tmp_path):
    """Ultralytics resumes from epoch boundaries: a pause takes effect when the current epoch is saved, also inside
    checkpoint.min_interval_seconds (which keeps epoch 1 from being saved)."""
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    job, recorder = make_job(spec, data_yaml, tmp_path / "job", min_interval_seconds=HOUR)

    class PauseDuringEpoch2(Recorder):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1:
                job.control.request_pause()  # arrives while epoch 2 trains

    job.callbacks.append(PauseDuringEpoch2())
    with pytest.raises(TrainingPaused, match="paused after epoch 2"):
        YoloTrainer().train(job)
    assert [epoch for epoch, _ in recorder.epochs] == [1, 2]
    assert recorder.checkpoints == [(2, tmp_path / "job" / "weights" / "epoch2.pt")]

    again, recorder = make_job(spec, data_yaml, tmp_path / "job", min_interval_seconds=HOUR)
    result = YoloTrainer().train(again)
    assert recorder.starts == [(EPOCHS, 2)]
    assert [epoch for epoch, _ in recorder.epochs] == [3]
    assert result.epochs_completed == EPOCHS


def _killed_while_writing_last_pt(trained, tmp_path: Path) -> Path:
    """A run killed during Ultralytics' in-place write of last.pt in epoch 3: epochs 1-2 done, last.pt truncated."""
    output_dir = _killed_after_saving_epoch_2(trained, tmp_path)
    last = output_dir / "weights" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    return output_dir


def test_a_last_pt_truncated_by_a_kill_falls_back_to_the_newest_verified_copy(trained, dataset, tmp_path, caplog):
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _killed_while_writing_last_pt(trained, tmp_path)
    job, recorder = make_job(spec, data_yaml, output_dir)
    result = YoloTrainer().train(job)
    assert "last.pt does not load" in caplog.text and "resuming from epoch2.pt" in caplog.text
    assert recorder.starts == [(EPOCHS, 2)]
    assert [epoch for epoch, _ in recorder.epochs] == [3]
    assert result.epochs_completed == EPOCHS


def test_damaged_copies_too_are_a_clear_error_never_a_silent_restart(trained, dataset, tmp_path):
    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _killed_while_writing_last_pt(trained, tmp_path)
    for copy in (output_dir / "weights").glob("epoch*.pt"):
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: only the checksum can tell
        copy.write_bytes(bytes(data))
    job, _ = make_job(spec, data_yaml, output_dir)
    with pytest.raises(CheckpointError, match=r"epoch2\.pt \(epoch2\.pt differs from the manifest.*from scratch"):
        YoloTrainer().train(job)


def test_a_resumed_run_fills_in_a_saved_epoch_the_killed_attempt_never_logged(trained, dataset, tracking, tmp_path):
    """Killed after Ultralytics saved epoch 2, before its metrics reached MLflow: the resumed attempt logs epoch 2
    from results.csv and trains and logs epoch 3; each epoch is in the run once."""
    import mlflow
    from mlflow import MlflowClient

    from trainers.yolo import YoloTrainer

    spec, data_yaml = dataset
    output_dir = _killed_after_saving_epoch_2(trained, tmp_path)
    csv = output_dir / "results.csv"
    header, _, row_2 = csv.read_text().splitlines()
    saved_epoch_2 = dict(zip(header.split(","), row_2.split(","), strict=True))

    client = MlflowClient()
    names = VAL_METRICS | TRAIN_LOSSES
    epoch_1 = {name: client.get_metric_history(trained["run_id"], name)[0].value for name in names}
    with mlflow.start_run(experiment_id=tracking) as run:
        mlflow.log_metrics(epoch_1, step=1)  # what the killed attempt logged
        job, _ = make_job(spec, data_yaml, output_dir)
        YoloTrainer().train(job)
    for name in names:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [1, 2, 3], name
    [map_2] = [m.value for m in client.get_metric_history(run.info.run_id, "val_map50_95") if m.step == 2]
    assert map_2 == pytest.approx(float(saved_epoch_2["metrics/mAP50-95(B)"]))


# ------------------------------------------------------------------------------- checkpoint.min_interval_seconds


def test_epochs_inside_the_min_interval_are_not_saved_and_best_pt_is_the_best_of_those_written(
    dataset, tracking, tmp_path
):
    """Epoch 1 saved on request, epoch 2 skipped (too soon, though every_n_epochs makes it due), epoch 3 the last."""
    import mlflow
    from mlflow import MlflowClient

    from trainers.yolo import YoloTrainer, _load_ckpt

    spec, data_yaml = dataset
    job, recorder = make_job(spec, data_yaml, tmp_path / "job", min_interval_seconds=HOUR)

    class CheckpointNow(Recorder):
        def on_train_start(self, total_epochs: int, start_epoch: int) -> None:
            job.control.request_checkpoint()  # served when epoch 1 ends

    job.callbacks.append(CheckpointNow())
    with mlflow.start_run(experiment_id=tracking) as run:
        YoloTrainer().train(job)
    weights = tmp_path / "job" / "weights"
    assert recorder.checkpoints == [(1, weights / "epoch1.pt"), (3, weights / "epoch3.pt")]
    assert sorted(p.name for p in weights.glob("epoch*.pt")) == ["epoch1.pt", "epoch3.pt"]
    assert [epoch for epoch, _ in recorder.epochs] == [1, 2, 3]

    # best_fitness (what best.pt follows) counts only the saved epochs: 1 and 3, never the skipped epoch 2.
    first, last = _load_ckpt(weights / "epoch1.pt"), _load_ckpt(weights / "epoch3.pt")
    assert (first["epoch"], last["epoch"]) == (0, 2)
    saved_fitness = [first["train_metrics"]["fitness"], last["train_metrics"]["fitness"]]
    assert last["best_fitness"] == max(saved_fitness)
    assert _load_ckpt(weights / "best.pt")["train_metrics"]["fitness"] == max(saved_fitness)

    # Trainyard's metric names: epoch 2 reached MLflow with epoch 3's checkpoint, each epoch once.
    for name in VAL_METRICS | TRAIN_LOSSES:
        assert sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, name)) == [1, 2, 3], name


# -------------------------------------------------------------------------------------- checkpoint.best_metric


def test_best_pt_follows_the_chosen_metric_as_ultralytics_fitness(dataset, tmp_path):
    import csv

    from trainers.yolo import YoloTrainer, _load_ckpt

    spec, data_yaml = dataset
    job, _ = make_job(spec, data_yaml, tmp_path / "job", best_metric="map50")
    result = YoloTrainer().train(job)
    weights = tmp_path / "job" / "weights"
    with (tmp_path / "job" / "results.csv").open(newline="") as handle:
        rows = [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(handle)]
    map50 = [float(row["metrics/mAP50(B)"]) for row in rows]
    assert len(map50) == EPOCHS  # min_interval_seconds 0: every epoch saved, so every epoch competes
    # Each saved epoch's fitness is its mAP50, and best.pt is the epoch of the highest.
    for copy in (weights / f"epoch{EVERY}.pt", weights / f"epoch{EPOCHS}.pt"):
        metrics = _load_ckpt(copy)["train_metrics"]
        assert metrics["fitness"] == metrics["metrics/mAP50(B)"]
    best = _load_ckpt(weights / "best.pt")
    assert best["train_metrics"]["fitness"] == pytest.approx(max(map50))
    assert _load_ckpt(weights / f"epoch{EPOCHS}.pt")["best_fitness"] == pytest.approx(max(map50))  # best.pt: stripped
    assert result.primary_metric == "val_map50"
    assert result.metrics["val_map50"] == pytest.approx(max(map50), abs=1e-4)  # Ultralytics' final val of best.pt


def test_results_csv_reads_as_ultralytics_reads_it(trained):
    """The trainer reads results.csv with the stdlib instead of Ultralytics' polars (whose import took 0.1 s inside
    the first checkpoint): the same columns, values and types, and {} for a file that cannot be read."""
    import polars as pl

    from trainers.yolo import read_results_csv

    path = trained["job"].output_dir / "results.csv"
    ours = read_results_csv(path)
    theirs = pl.read_csv(path.read_bytes(), infer_schema_length=None).to_dict(as_series=False)
    assert ours == theirs and len(ours["epoch"]) == EPOCHS
    assert {name: type(values[0]) for name, values in ours.items()} == {n: type(v[0]) for n, v in theirs.items()}
    assert read_results_csv(path.with_name("missing.csv")) == {}


# Validation numbers per epoch, scripted over the real validator's (a 3-epoch CPU training scores 0 everywhere):
# mAP50 is best at epoch 1, Ultralytics' fitness at epoch 2.
SCRIPTED = {
    1: {"metrics/mAP50(B)": 0.9, "metrics/mAP50-95(B)": 0.1, "fitness": 0.1},
    2: {"metrics/mAP50(B)": 0.2, "metrics/mAP50-95(B)": 0.5, "fitness": 0.5},
    3: {"metrics/mAP50(B)": 0.3, "metrics/mAP50-95(B)": 0.3, "fitness": 0.3},
}


@pytest.mark.parametrize(("best_metric", "best_epoch"), [("map50", 1), (None, 2)])
def test_the_best_epoch_is_the_one_the_chosen_metric_ranks_first(
    dataset, tmp_path, monkeypatch, best_metric, best_epoch
):
    from ultralytics.engine.validator import BaseValidator

    from trainers.yolo import YoloTrainer, _load_ckpt

    validate = BaseValidator.__call__

    def scripted(self, trainer=None, model=None, **kwargs):
        metrics = validate(self, trainer=trainer, model=model, **kwargs)
        if trainer is not None:  # during training; Ultralytics' final validation of best.pt is left as it is
            metrics = {**metrics, **SCRIPTED[trainer.epoch + 1]}
        return metrics

    monkeypatch.setattr(BaseValidator, "__call__", scripted)
    spec, data_yaml = dataset
    YoloTrainer().train(make_job(spec, data_yaml, tmp_path / "job", best_metric=best_metric)[0])
    weights = tmp_path / "job" / "weights"
    chosen = SCRIPTED[best_epoch]
    assert _load_ckpt(weights / "best.pt")["train_metrics"]["metrics/mAP50(B)"] == chosen["metrics/mAP50(B)"]
    wanted = chosen["metrics/mAP50(B)"] if best_metric == "map50" else chosen["fitness"]
    assert _load_ckpt(weights / f"epoch{EPOCHS}.pt")["best_fitness"] == pytest.approx(wanted)
