"""The private Transformers APIs trainers/transformers_private.py relies on are still there, as it uses them.

A failure here means the installed Transformers changed one: review trainers/transformers_private.py (its
docstring says why each is needed) before trusting the hf-image trainer with this version.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402
from transformers.integrations import MLflowCallback  # noqa: E402

from trainers.transformers_private import MLFLOW_CALLBACK_ATTRIBUTES  # noqa: E402


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_trainer_checkpoint_loaders_that_are_overridden():
    assert _params(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert inspect.signature(Trainer._load_from_checkpoint).parameters["model"].default is None
    assert _params(Trainer._load_best_model) == ["self"]
    source = inspect.getsource(Trainer)
    assert "self._load_from_checkpoint(" in source and "self._load_best_model(" in source  # still what it calls


def test_trainer_save_checkpoint_and_callback_handler_on_save():
    assert _params(Trainer._save_checkpoint) == ["self", "model", "trial"]
    source = inspect.getsource(Trainer)
    assert "self._save_checkpoint(" in source
    assert "self.callback_handler.on_save(" in source
    from transformers.trainer_callback import CallbackHandler

    assert _params(CallbackHandler.on_save)[:4] == ["self", "args", "state", "control"]


def test_mlflow_callback_setup_and_the_attributes_it_sets():
    assert _params(MLflowCallback.setup) == ["self", "args", "state", "model"]
    assert _params(MLflowCallback.on_log)[:5] == ["self", "args", "state", "control", "logs"]
    source = inspect.getsource(MLflowCallback)
    for name in MLFLOW_CALLBACK_ATTRIBUTES:
        assert f"self.{name}" in source, name


def test_checkpoint_conversion_mapping_for_the_warm_up():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    assert _params(get_checkpoint_conversion_mapping) == ["model_type"]


def test_the_best_so_far_that_an_unsaved_evaluation_puts_back():
    import dataclasses

    from transformers.trainer_callback import TrainerState

    fields = {field.name for field in dataclasses.fields(TrainerState)}
    assert {"best_metric", "best_global_step", "best_model_checkpoint"} <= fields
    assert _params(Trainer._determine_best_metric)[:2] == ["self", "metrics"]
    source = inspect.getsource(Trainer._determine_best_metric)
    assert "self.state.best_metric" in source and "self.state.best_global_step" in source
