"""Bad input fails early, with a message naming the thing, the rule and the fix, and leaves no MLflow run open."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.request import TrainRequest
from flows.train import train
from tasks.tracking import runs_of_flow_run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"epochs": 0}, "epochs\n  Input should be greater than or equal to 1"),
        ({"batch_size": -1}, "batch_size\n  Input should be greater than or equal to 1"),
        ({"trainer": "xgboost"}, "trainer\n  Input should be 'torch', 'hf-image' or 'yolo'"),
        (
            {"model": "resnet9000"},
            "model 'resnet9000' is not known to the torch trainer; use one of tiny-cnn",
        ),
        ({"dataset": "/no/such/dataset"}, "dataset path '/no/such/dataset' does not exist"),
        ({"loss": {"box_gain": 7.5}}, "loss option(s) box_gain are not taken by the torch trainer"),
        ({"augmentations": {"mosaic": 0.5}}, "augmentations.mosaic applies to detection (yolo) only"),
        ({"learning_rate": 0}, "learning_rate\n  Input should be greater than 0"),
        ({"optimiser": "sgd"}, "optimiser\n  Extra inputs are not permitted"),
        ({"compute": {"strategy": "random"}}, "compute.strategy\n  Input should be 'preferred', 'cheapest',"),
        ({"compute": {"start_deadline_s": 0}}, "compute.start_deadline_s\n  Input should be greater than 0"),
        ({"alias": "v3"}, "alias 'v3' must be a name like 'candidate'"),
    ],
)
def test_invalid_request_is_refused_with_its_reason(shapes_cls, override, message):
    with pytest.raises(ValidationError) as error:
        TrainRequest(**{"dataset": str(shapes_cls), **override})
    assert message in str(error.value)


def test_yolo_refuses_classification_loss_options(shapes_cls):
    with pytest.raises(ValidationError, match="label_smoothing are not taken by the yolo trainer"):
        TrainRequest(dataset=str(shapes_cls), trainer="yolo", model="yolov8n.yaml", loss={"label_smoothing": 0.1})


_runs_of = runs_of_flow_run


def test_invalid_parameter_fails_the_flow_run_before_anything_runs(stack, shapes_cls):
    state = train(dataset=str(shapes_cls), epochs=0, return_state=True)
    assert state.is_failed()
    assert "epochs" in state.message and "greater than or equal to 1" in state.message
    assert _runs_of(state.state_details.flow_run_id) == []


def test_option_the_trainer_does_not_take_fails_the_flow_run(stack, shapes_cls):
    state = train(dataset=str(shapes_cls), loss={"box_gain": 2.0}, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationError, match="box_gain are not taken by the torch trainer"):
        state.result()
    assert _runs_of(state.state_details.flow_run_id) == []


def test_dataset_defect_fails_before_training_and_names_the_file(stack, shapes_cls, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shapes_cls, broken)
    victim = next((broken / "val" / "square").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:40])  # truncated mid-file, as an interrupted copy leaves it
    state = train(dataset=str(broken), epochs=1, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError) as error:
        state.result()
    assert f"val/square/{victim.name}" in str(error.value)
    assert "nothing was trained" in str(error.value)
    assert _runs_of(state.state_details.flow_run_id) == []


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
    runs = _runs_of(state.state_details.flow_run_id)
    assert [run.info.status for run in runs] == ["FAILED"]


def test_an_unknown_compute_profile_is_named_with_the_known_ones(stack, shapes_cls):
    state = train(dataset=str(shapes_cls), compute={"profiles": ["moon"]}, return_state=True)
    assert state.is_failed()
    assert "unknown compute profile(s) moon; known:" in state.message and "local" in state.message
    assert _runs_of(state.state_details.flow_run_id) == []
