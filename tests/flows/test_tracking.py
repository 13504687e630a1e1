"""The one MLflow run of a training request, against the real tracking server."""

from __future__ import annotations

import uuid

import mlflow
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

from tasks.tracking import attached_run, use_experiment


def test_a_run_that_loses_the_race_to_create_its_experiment_still_lands_in_it(stack, monkeypatch):
    """Twenty runs started at once with a new experiment name: the experiment is created by one of them between
    another's lookup and its own create. That other run must still be recorded in the experiment, not in Default
    (MLflow's set_experiment returns without activating it then: 2 of 10 runs of the scale-out test hit it)."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    lookup = TrackingServiceClient.get_experiment_by_name
    raced: list[str] = []

    def looked_up_just_before_another_run_created_it(self, experiment_name):
        if experiment_name == name and not raced:
            raced.append(MlflowClient().create_experiment(name))  # the other run wins the race
            return None
        return lookup(self, experiment_name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", looked_up_just_before_another_run_created_it)
    experiment_id = use_experiment(name)
    with mlflow.start_run() as run:
        pass

    assert raced == [experiment_id]
    assert run.info.experiment_id == experiment_id


def test_a_training_step_attaches_to_its_run_in_a_process_where_another_experiment_is_active(stack):
    """A process that ran another flow before (another experiment active) still continues the request's run:
    MLflow refuses start_run(run_id) of another experiment than the active one unless Trainyard switches first."""
    use_experiment(f"other-{uuid.uuid4().hex[:8]}")
    request_experiment = MlflowClient().create_experiment(f"request-{uuid.uuid4().hex[:8]}")
    run_id = MlflowClient().create_run(request_experiment).info.run_id

    with attached_run(run_id):
        mlflow.log_metric("train_loss", 0.5, step=1)

    run = mlflow.get_run(run_id)
    assert run.data.metrics == {"train_loss": 0.5}
    assert run.info.status == "RUNNING"  # the train flow, not the step, ends it
