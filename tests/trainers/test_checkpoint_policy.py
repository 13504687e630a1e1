"""The shared checkpoint policy and epoch-metrics logger, without a training library."""

from __future__ import annotations

import signal

import pytest

from trainers.base import TrainControl
from trainers.checkpoint_policy import CheckpointSchedule, improves, save_on_the_way_out
from trainers.checkpoints import retained_files
from trainers.config import CheckpointPolicy as CheckpointSettings


def _policy(**settings) -> CheckpointSchedule:
    return CheckpointSchedule(CheckpointSettings(**settings), TrainControl())


def test_a_due_epoch_waits_for_the_min_interval_but_final_asked_and_every_seconds_do_not():
    policy = _policy(every_n_epochs=2, min_interval_seconds=3600)
    assert policy.epoch_due(2) and not policy.epoch_due(3)
    assert not policy.save_now(due=True)  # too soon after the start of this attempt
    assert policy.save_now(due=False, final=True)
    assert policy.save_now(due=False, asked=True)
    assert policy.veto(due=True, final=False) and not policy.veto(due=True, final=True)
    policy.settings.every_seconds = 1e-9
    assert policy.time_is_up() and policy.save_now(due=False)
    assert _policy(min_interval_seconds=0).save_now(due=True)


def test_requests_are_taken_once_and_a_pause_stays():
    policy = _policy()
    assert not policy.asked()
    policy.control.request_checkpoint()
    assert policy.asked() and not policy.asked()
    policy.control.request_pause()
    assert policy.asked() and policy.asked() and policy.pause_requested


def test_the_best_as_of_the_last_save_is_remembered():
    policy = _policy()
    policy.start(0.5)
    assert policy.best_at_save == 0.5
    policy.saved(0.7)
    assert policy.best_at_save == 0.7 and not policy.time_is_up()


def test_improves_follows_the_metric_direction():
    assert improves({"val_accuracy": 0.6}, {}, "val_accuracy")
    assert not improves({"val_accuracy": 0.6}, {"val_accuracy": 0.7}, "val_accuracy")
    assert improves({"val_loss": 0.2}, {"val_loss": 0.3}, "val_loss")
    assert not improves({"val_loss": 0.4}, {"val_loss": 0.3}, "val_loss")


def test_a_signal_saves_on_the_way_out_unless_mid_update_and_an_error_never(caplog):
    saves = []

    def save() -> str:
        saves.append(signal.getsignal(signal.SIGTERM))
        return "epoch 1, batch 2"

    save_on_the_way_out(ValueError("an error"), True, save)
    save_on_the_way_out(KeyboardInterrupt(), False, save)
    assert saves == [] and "in the middle of a training step" in caplog.text
    save_on_the_way_out(KeyboardInterrupt(), True, save)
    assert saves == [signal.SIG_IGN]  # a repeated signal cannot abort the save
    assert "interrupted (KeyboardInterrupt): checkpoint at epoch 1, batch 2" in caplog.text


def test_retention_keeps_the_newest_the_best_and_the_last():
    manifest = {"checkpoints": [{"file": f"c{i}"} for i in range(5)], "best": "c1", "last": "c4"}
    assert retained_files(manifest, 2) == {"c3", "c4", "c1"}
    assert retained_files({"checkpoints": [], "best": None, "last": None}, 2) == set()


def test_epoch_metrics_are_logged_once_per_step_across_loggers(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from trainers.metrics_log import EpochMetricsLog

    assert not EpochMetricsLog("train_loss").active  # no active run: nothing is logged
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("log-once", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            first = EpochMetricsLog("train_loss")
            first.log_epochs({1: {"train_loss": 1.0}, 2: {"train_loss": 0.5}})
            second = EpochMetricsLog("train_loss")  # a resumed attempt: reads back what the run holds
            second.log_epochs({1: {"train_loss": 9.0}, 2: {"train_loss": 9.0}, 3: {"train_loss": 0.25}})
            assert second.is_bound()
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]
        assert not second.is_bound()  # the run ended
    finally:
        mlflow.set_tracking_uri(previous)
