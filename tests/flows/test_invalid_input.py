"""A training that fails ends its MLflow run FAILED. Bad input, refused before anything trains, is catalogued in
tests/test_bad_input_catalog.py."""

from __future__ import annotations

import pytest

from flows.train import train
from tasks.tracking import runs_of_flow_run


def test_training_failure_ends_the_mlflow_run_failed(stack, shapes_cls):
    state = train(
        dataset=str(shapes_cls),
        model="tests.flows.models:exploding",
        epochs=1,
        image_size=32,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        state.result()
    runs = runs_of_flow_run(state.state_details.flow_run_id)
    assert [run.info.status for run in runs] == ["FAILED"]
