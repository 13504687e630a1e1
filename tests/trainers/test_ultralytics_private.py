"""The private Ultralytics APIs trainers/ultralytics_private.py relies on are still there, as it uses them.

A failure here means the installed Ultralytics changed one: review trainers/ultralytics_private.py (its docstring
says why each is needed) before trusting the yolo trainer with this version.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import trainers.ultralytics_private  # noqa: F401  (YOLO_CONFIG_DIR before Ultralytics)

pytest.importorskip("ultralytics")


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_check_font_and_check_amp_that_are_replaced():
    for module in ("ultralytics.data.utils", "ultralytics.utils.plotting"):
        check_font = importlib.import_module(module).check_font
        assert _params(check_font) == ["font"], module
    engine = importlib.import_module("ultralytics.engine.trainer")
    assert _params(engine.check_amp) == ["model"]
    assert "check_amp(" in inspect.getsource(engine.BaseTrainer)  # looked up in the module at call time


def test_base_trainer_methods_that_are_overridden_and_attributes_that_are_read():
    from ultralytics.engine.trainer import BaseTrainer

    for name in ("save_model", "validate", "read_results_csv"):
        assert _params(getattr(BaseTrainer, name)) == ["self"], name
    assert _params(BaseTrainer.label_loss_items)[:3] == ["self", "loss_items", "prefix"]
    source = inspect.getsource(BaseTrainer)
    read = ("best_fitness", "epoch", "epochs", "stop", "start_epoch", "wdir", "last", "tloss", "metrics", "lr")
    for attribute in read:
        assert re.search(rf"\bself\.{attribute}\b[^\n]*=", source), attribute  # set by the trainer
    assert "self.save_model()" in source and "self.validate()" in source
    assert 'run_callbacks("on_model_save")' in source


def test_the_mlflow_callbacks_module_and_its_hooks():
    module = importlib.import_module("ultralytics.utils.callbacks.mlflow")
    for name in ("on_pretrain_routine_end", "on_train_end"):
        assert callable(getattr(module, name)), name
    hooks = inspect.getsource(module)
    assert '"on_pretrain_routine_end"' in hooks and '"on_train_end"' in hooks


def test_detect_head_export_attributes():
    from ultralytics.nn.modules import Detect

    for attribute in ("export", "format", "dynamic", "shape", "xyxy"):
        assert hasattr(Detect, attribute), attribute
    assert hasattr(Detect, "end2end")


def test_the_checkpoint_dict_that_the_resume_reads():
    from ultralytics.engine.model import Model
    from ultralytics.engine.trainer import BaseTrainer

    source = inspect.getsource(BaseTrainer.save_model)
    for key in ("epoch", "optimizer", "train_args", "train_results", "model", "ema", "best_fitness"):
        assert f'"{key}"' in source, key
    assert "task_map" in inspect.getsource(Model)
