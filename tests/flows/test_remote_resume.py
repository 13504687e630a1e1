"""hf-image and yolo resumed on another host from the checkpoints in the artifact store (S3, moto's server).

As tests/flows/test_storage_pipeline.py does for the torch trainer: a first training step (host A) trains 2 epochs
and pushes its run directory to S3; then the same request's step runs as the fallback runs it on another host (its
own TRAINYARD_HOME: no dataset cache, no run directory; host A's run directory is gone) with 3 epochs. It must
restore the checkpoints, resume after epoch 2 (no epoch trained twice), leave checkpoints that verify, and log
every epoch once into the one MLflow run of the request. For hf-image a third host then gets the finished run:
nothing to train, and the result must be the best checkpoint, whose absolute path Transformers recorded on host B.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect_logs import run_logs
from s3_server import client, client_env, env_applied

from flows.request import TrainRequest
from flows.train_step import train_step
from infra.settings import Settings
from tasks.remote_storage import sync_dataset_uri
from trainers.data.synthetic import make_shapes_detection
from trainers.data.validate import load_dataset

EXPERIMENT = "remote-resume"
# hf-image: 24 training images (shapes_cls) in batches of 3: 8 steps an epoch, checkpoint-8, -16 and -24. The
# learning rate is too small to change a prediction, so no epoch beats the first: the best is not the last.
HF = {"trainer": "hf-image", "model": "vit-tiny", "batch_size": 3, "image_size": 32, "learning_rate": 1e-6}
HF["checkpoint"] = {"min_interval_seconds": 0}  # sub-second epochs: checkpoint-8 and -16 too, not only the last
HF_STEPS_PER_EPOCH = 8
YOLO = {"trainer": "yolo", "model": "yolov8n.yaml", "batch_size": 8, "image_size": 32}
YOLO["checkpoint"] = {"every_n_epochs": 2}  # weights/epoch2.pt (host A), then epoch3.pt (the last, host B)


@pytest.fixture(scope="module")
def store(stack, s3_endpoint, tmp_path_factory):
    """A new bucket as the artifact store; credentials and endpoint in the environment. Yields (s3, bucket)."""
    with pytest.MonkeyPatch.context() as env:
        env_applied(env, client_env(s3_endpoint, tmp_path_factory.mktemp("aws")))
        s3 = client(s3_endpoint)
        bucket = f"ty-resume-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        env.setenv("TRAINYARD_ARTIFACT_STORE", f"s3://{bucket}/trainyard")
        yield s3, bucket


def upload(s3, bucket: str, root: Path, prefix: str) -> None:
    for path in (p for p in root.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


def read_json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


class Request:
    """One train request's training steps, run as the train flow's fallback runs them: each on a host of its own
    (TRAINYARD_HOME), into the one MLflow run the train flow created, under the request's prefix in the store."""

    def __init__(self, store, dataset_uri: str, fields: dict, monkeypatch) -> None:
        self.s3, self.bucket = store
        self.dataset_uri, self.fields, self.env = dataset_uri, fields, monkeypatch
        self.id = str(uuid.uuid4())  # stands for the train flow run's id (the S3 prefix, the control channel)
        host_a = Settings.from_env()
        local, _ = sync_dataset_uri(dataset_uri, host_a.home / "cache" / "datasets")  # as the train flow's sync
        self.spec = json.loads(load_dataset(local).to_json())  # host A's paths: what every attempt is handed
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(EXPERIMENT)
        self.run_id = MlflowClient().create_run(experiment_id).info.run_id  # the train flow's run, RUNNING

    def step(self, home: Path, epochs: int, until: str) -> dict:
        """The training step on the host whose TRAINYARD_HOME is `home`, in its own run directory; its log read
        once the line `until` matches has arrived."""
        self.env.setenv("TRAINYARD_HOME", str(home))
        output_dir = Settings.from_env().runs_dir / self.id
        request = TrainRequest(dataset=self.dataset_uri, experiment=EXPERIMENT, **{**self.fields, "epochs": epochs})
        state = train_step(
            request=request.model_dump(mode="json"),
            dataset=self.spec,
            output_dir=str(output_dir),
            mlflow_run_id=self.run_id,
            request_run_id=self.id,
            return_state=True,
        )
        assert state.is_completed(), state.message
        logs = run_logs(state.state_details.flow_run_id, until=until)
        return {"result": state.result()["train"], "messages": [log.message for log in logs], "output_dir": output_dir}

    def pushed_progress(self) -> dict:
        prefix = f"trainyard/{EXPERIMENT}/{self.id}/checkpoints"
        pointer = read_json(self.s3, self.bucket, f"{prefix}/latest.json")
        return read_json(self.s3, self.bucket, f"{prefix}/{pointer['key']}")["progress"]

    def finish(self) -> None:
        assert MlflowClient().get_run(self.run_id).info.status == "RUNNING"  # a step never ends the flow's run
        MlflowClient().set_terminated(self.run_id, "FINISHED")  # as the train flow does when its stages are done


def on_two_hosts(request: Request, tmp_path: Path) -> dict:
    """Host A trains 2 epochs and its run directory is lost; host B is asked for 3 and must resume."""
    host_a = request.step(Settings.from_env().home, 2, until=r"checkpoints after epoch 2 uploaded")
    assert request.pushed_progress() == {"epoch": 2}
    shutil.rmtree(host_a["output_dir"])
    host_b = request.step(tmp_path / "host-b", 3, until=r"checkpoints after epoch 3 uploaded")

    messages = host_b["messages"]
    assert any(re.search(r"restored \d+ checkpoint files \(\d+ bytes, epoch 2\) from s3://", m) for m in messages), (
        messages
    )
    assert any("resuming at epoch 3 of 3" in m for m in messages), messages
    trained = [m for m in messages if re.match(r"epoch \d+/3:", m)]
    assert len(trained) == 1 and trained[0].startswith("epoch 3/3:"), messages  # epochs 1 and 2 not trained again
    assert any(re.match(r"checkpoints after epoch 3 uploaded", m) for m in messages), messages
    assert host_b["result"]["epochs_completed"] == 3
    assert request.pushed_progress() == {"epoch": 3}  # host B's checkpoints went up in their turn
    assert not host_a["output_dir"].exists()
    return host_b


def metric_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def assert_each_step_logged_once(run_id: str, skip) -> None:
    """Each training metric once per step across the steps. The metrics of the evaluation and export that end every
    completed step (final_*, onnx_parity_*) are left out: these tests complete several steps on one run, where a
    request completes one."""
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    after_training = ("final_", "onnx_parity_")
    for key in (key for key in run.data.metrics if not skip(key) and not key.startswith(after_training)):
        steps = metric_steps(run_id, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"


# --- yolo ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_det(tmp_path_factory) -> Path:
    """A tiny YOLO dataset whose data.yaml has no absolute `path` (it is synced elsewhere)."""
    root = tmp_path_factory.mktemp("datasets") / "det"
    data_yaml = make_shapes_detection(root, train_images=8, val_images=4, image_size=32)
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    data.pop("path", None)
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return root


def test_yolo_resumes_on_another_host_from_the_s3_checkpoints(store, shapes_det, tmp_path, monkeypatch):
    s3, bucket = store
    upload(s3, bucket, shapes_det, "datasets/det")
    request = Request(store, f"s3://{bucket}/datasets/det/data.yaml", YOLO, monkeypatch)
    host_b = on_two_hosts(request, tmp_path)

    output_dir, messages = host_b["output_dir"], host_b["messages"]
    assert any(m == f"resuming {output_dir} from epoch 3 to 3" for m in messages), messages
    cache = tmp_path / "host-b" / "cache" / "datasets" / bucket / "datasets" / "det"
    assert (cache / "images").is_dir()
    assert f"path: {cache}" in (output_dir / "dataset.yaml").read_text()  # host B's copy of the same dataset

    from trainers.checkpoints import file_damage
    from trainers.yolo import _load_ckpt, checkpoint_labels

    weights = output_dir / "weights"
    recorded = json.loads((weights / "trainyard-manifest.json").read_text())["files"]
    assert set(recorded) == {"epoch2.pt", "epoch3.pt"}  # every 2 epochs and the last
    assert [file_damage(weights / name) for name in sorted(recorded)] == [None, None]
    full = _load_ckpt(weights / "epoch3.pt")  # the third epoch (0-based 2), with its optimizer: resumable
    assert full["epoch"] == 2 and full["optimizer"] is not None
    assert full["train_args"]["save_dir"] == str(output_dir)  # host B's directory, not host A's
    for name in ("last.pt", "best.pt"):  # stripped at the end of the training, as Ultralytics does
        args = _load_ckpt(weights / name)["train_args"]
        assert (args["epochs"], args["data"]) == (3, str(output_dir / "dataset.yaml")), name
        assert checkpoint_labels(weights / name) == ["circle", "square", "triangle"], name
    assert Path(host_b["result"]["best_checkpoint"]) == weights / "best.pt"

    request.finish()
    # Ultralytics' own validation series (metrics/..., val/...) add the best model's validation at step `epochs`
    # (0-based epochs): host A's lands on step 2, beside epoch 3's. Trainyard's names are 1-based, once an epoch.
    assert_each_step_logged_once(request.run_id, skip=lambda key: key.startswith(("metrics/", "val/")))
    for key in ("val_map50_95", "val_map50", "train_box_loss", "train_cls_loss", "learning_rate"):
        assert metric_steps(request.run_id, key) == [1, 2, 3], key
    assert metric_steps(request.run_id, "train/box_loss") == [0, 1, 2]  # Ultralytics' 0-based, trained once each


# --- hf-image --------------------------------------------------------------------------------------------


def test_hf_image_resumes_on_another_host_from_the_s3_checkpoints(store, shapes_cls, tmp_path, monkeypatch):
    s3, bucket = store
    upload(s3, bucket, shapes_cls, "datasets/shapes")
    request = Request(store, f"s3://{bucket}/datasets/shapes", HF, monkeypatch)
    host_b = on_two_hosts(request, tmp_path)

    output_dir, messages = host_b["output_dir"], host_b["messages"]
    assert any(m == f"resuming from {output_dir}/checkpoint-16" for m in messages), messages
    assert (tmp_path / "host-b" / "cache" / "datasets" / bucket / "datasets" / "shapes" / "train").is_dir()
    state = json.loads((output_dir / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24 and state["epoch"] == 3
    assert state["best_global_step"] == 8, "the tiny learning rate should leave epoch 1 the best"
    assert state["best_model_checkpoint"] == str(output_dir / "checkpoint-8")  # host B's directory, not host A's
    assert_hf_checkpoints_verify(output_dir, {"checkpoint-8", "checkpoint-24"})  # the best and the newest

    # Host B is lost after its last push; host C gets the same request: nothing is left to train, and the result
    # must still be the best checkpoint (epoch 1), not the last one.
    shutil.rmtree(output_dir)
    host_c = request.step(tmp_path / "host-c", 3, until=r"restored \d+ checkpoint files")
    assert any(re.search(r"restored \d+ checkpoint files \(\d+ bytes, epoch 3\)", m) for m in host_c["messages"])
    assert not any(re.match(r"epoch \d+/3:", m) for m in host_c["messages"]), host_c["messages"]
    result, output_dir = host_c["result"], host_c["output_dir"]
    assert result["epochs_completed"] == 3
    evaluated = {e["step"]: e for e in state["log_history"] if "eval_accuracy" in e}
    assert result["metrics"] == {"val_accuracy": evaluated[8]["eval_accuracy"], "val_loss": evaluated[8]["eval_loss"]}
    assert result["metrics"]["val_loss"] != evaluated[24]["eval_loss"]
    assert_same_weights(Path(result["best_checkpoint"]), output_dir / "checkpoint-8")
    assert_hf_checkpoints_verify(output_dir, {"checkpoint-8", "checkpoint-24"})

    request.finish()
    assert_each_step_logged_once(request.run_id, skip=lambda key: key == "epoch")  # logged with each log entry
    epochs = [HF_STEPS_PER_EPOCH * n for n in (1, 2, 3)]
    assert metric_steps(request.run_id, "eval_accuracy") == epochs
    assert metric_steps(request.run_id, "loss") == epochs


def assert_hf_checkpoints_verify(output_dir: Path, names: set[str]) -> None:
    from trainers.checkpoints import dir_damage

    checkpoints = list(output_dir.glob("checkpoint-*"))
    assert {p.name for p in checkpoints} == names
    assert [dir_damage(path) for path in checkpoints] == [None] * len(names)
    assert not any(output_dir.glob("damaged-*"))


def assert_same_weights(a: Path, b: Path) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    left = AutoModelForImageClassification.from_pretrained(str(a)).state_dict()
    right = AutoModelForImageClassification.from_pretrained(str(b)).state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), f"weights of {a} and {b} differ"


def test_hf_checkpoints_copied_out_of_step_order_are_rotated_by_step(tmp_path):
    """A copy (a restore) gives checkpoint directories the copy's order as mtimes; Transformers' rotation deletes
    by mtime. Here a new best checkpoint-24 is saved after copied checkpoint-16 and checkpoint-8: the two newest by
    step must stay."""
    from transformers.trainer_utils import rotate_checkpoints

    from trainers.hf_image import _stamp_in_step_order

    run = tmp_path / "run"
    for age, step in ((20, 16), (10, 8)):  # copied in name order: checkpoint-16 first
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        stamp = time.time() - age
        os.utime(run / f"checkpoint-{step}", (stamp, stamp))

    _stamp_in_step_order(run)  # what the trainer does before it resumes
    (run / "checkpoint-24").mkdir()
    rotate_checkpoints(str(run), save_total_limit=2, best_model_checkpoint=str(run / "checkpoint-24"), use_mtime=True)

    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-16", "checkpoint-24"]
