"""Every private Ultralytics API the yolo trainer uses, each with the reason; nothing else.

tests/trainers/test_ultralytics_private.py fails when an installed Ultralytics changes one of them (a name, a
signature, an attribute the code relies on): review this module for that version before anything else.

- `ultralytics.data.utils.check_font` and `ultralytics.utils.plotting.check_font`, replaced (prepare_ultralytics):
  called on every dataset check (plots or not), they download Arial.ttf when it is missing; offline that is a
  failed HTTP request per train/val call (3 s timeout, longer where DNS hangs).
- `ultralytics.engine.trainer.check_amp(model)`, wrapped: on CUDA it downloads yolo26n.pt to compare FP32 with AMP.
- `BaseTrainer.save_model()`, `validate()` and `read_results_csv()`, overridden (interval_saving_trainer): Ultralytics
  saves every epoch and has no hook to skip a save (min_interval_seconds), none to choose the fitness best.pt
  follows (checkpoint.best_metric), and reads results.csv with polars (0.1 s import inside the first checkpoint).
  The subclass reads and writes the trainer's `best_fitness`, and the callbacks read `epoch`, `epochs`, `stop`,
  `start_epoch`, `wdir`, `last`, `tloss`, `label_loss_items()`, `metrics`, `lr` (the attributes Ultralytics' own
  callbacks read; `stop` is set to end training after this epoch on a pause).
- The hooks of `ultralytics.utils.callbacks.mlflow` in `trainer.callbacks`, found by that module name and replaced
  (adopt_mlflow_callbacks): its setup would set_experiment, autolog and log ~100 params into the caller's run.
- `Detect.export`, `.format`, `.dynamic`, `.shape`, `.xyxy` and `model.end2end` (export_head): what Ultralytics'
  exporter sets so that the PyTorch model returns what the ONNX graph's first output holds.
- The checkpoint dict save_model writes (`epoch`, `optimizer`, `train_args`, `train_results`, `model`, `ema`), read
  by trainers/yolo_resume.py: whether last.pt is resumable or stripped, how many epochs it holds, and its total
  epochs (rewritten: Ultralytics resumes to the checkpoint's own `epochs`). `model.task_map[model.task]["trainer"]`:
  the trainer class the subclass above extends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from trainers.yolo_resume import read_results_csv

log = logging.getLogger("trainers.yolo")

# Ultralytics reads YOLO_CONFIG_DIR once, at import: point it at a stable cache directory before then, so
# its settings.json (this module edits it: integrations on/off) is Trainyard's, not the user's ~/.config one.
os.environ.setdefault(
    "YOLO_CONFIG_DIR",
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainyard"),  # + /Ultralytics
)

_INTEGRATIONS_OFF = {"sync": False, "clearml": False, "comet": False, "dvc": False, "raytune": False}

_MLFLOW_PARAM_PREFIX = "yolo."  # Ultralytics' args, namespaced so they never collide with the caller's params


_prepared = False


def prepare_ultralytics() -> None:
    """Integrations off (the MLflow one is switched per run), and no network attempts while offline."""
    global _prepared
    from ultralytics import settings

    off = {k: v for k, v in _INTEGRATIONS_OFF.items() if settings.get(k) != v}
    if off:
        settings.update(off)
    if _prepared or os.environ.get("YOLO_OFFLINE", "").lower() not in {"1", "true", "yes", "on"}:
        return
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as engine_trainer
    import ultralytics.utils.plotting as plotting

    # check_font() is called on every dataset check (plots or not) and downloads Arial.ttf when it is missing:
    # offline that is a failed HTTP request per train/val call (3 s timeout, longer where DNS hangs).
    data_utils.check_font = _local_font
    plotting.check_font = _local_font
    # check_amp() downloads yolo26n.pt on CUDA to compare FP32 with AMP; offline that fails and AMP stays on.
    engine_trainer.check_amp = _offline_check_amp(engine_trainer.check_amp)
    _prepared = True


def _local_font(font: str = "Arial.ttf"):
    """Ultralytics' check_font without the download: its config dir's font, matplotlib's, or None."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    file = USER_CONFIG_DIR / Path(font).name
    if file.exists():
        return file
    fonts = font_manager.fontManager.ttflist
    return next((f.fname for f in fonts if font in f.fname and os.path.exists(f.fname)), None)


def _offline_check_amp(original):
    def check_amp(model) -> bool:
        from ultralytics.utils import WEIGHTS_DIR

        if next(model.parameters()).device.type in {"cpu", "mps"} or (WEIGHTS_DIR / "yolo26n.pt").is_file():
            return original(model)
        log.info("AMP check skipped (offline, no yolo26n.pt to compare with); AMP stays on")
        return True

    check_amp.__wrapped__ = original
    return check_amp


def interval_saving_trainer(base: type, progress: Any, fitness_key: str | None = None) -> type:
    """Ultralytics' trainer for the model's task (`base`), saving an epoch only when `progress.save_due(trainer)`,
    with the validation metric `fitness_key` (None: Ultralytics' own fitness) as the fitness best.pt follows."""

    class IntervalSavingTrainer(base):
        def validate(self):
            best_before = self.best_fitness
            metrics, fitness = super().validate()
            if metrics is None or fitness_key is None:
                return metrics, fitness
            # The chosen metric is the fitness: Ultralytics' best_fitness, best.pt and early stopping follow it.
            fitness = metrics[fitness_key]
            self.best_fitness = fitness if best_before is None or best_before < fitness else best_before
            return metrics, fitness

        def read_results_csv(self) -> dict[str, list]:
            # Ultralytics' own imports polars for this on its first call, which is inside the first checkpoint
            # (save_model stores the rows): 0.1 s on a 2-core machine, for a few rows the stdlib reads as well.
            return read_results_csv(Path(self.csv))

        def save_model(self) -> bool:
            if not progress.save_due(self):
                # validate() has already raised best_fitness to this epoch's: back to its value at the last save,
                # so that best.pt stays the best of the checkpoints written and a later epoch is compared with it.
                self.best_fitness = progress.saved_best_fitness
                return False  # Ultralytics runs on_model_save only after a save
            written = super().save_model()
            progress.written(self)
            return written

    return IntervalSavingTrainer


def adopt_mlflow_callbacks(trainer) -> None:
    """Keep Ultralytics' MLflow metric callbacks; replace its setup and end-of-training ones.

    Its setup would call mlflow.set_experiment(<project dir name>) (a stray experiment), mlflow.autolog()
    (autologging on for every installed library, for the rest of the process), log its ~100 args as params (a
    conflict with the caller's params, or with an earlier attempt's on resume, makes MLflow raise and the
    callback stop tracking), and does nothing at all under pytest (unless the test's name says test_mlflow).
    Its train-end hook uploads weights/ (every checkpoint) as run artifacts.
    """
    module = "ultralytics.utils.callbacks.mlflow"
    replaced = False
    for event in ("on_pretrain_routine_end", "on_train_end", "teardown"):
        hooks = trainer.callbacks.get(event, [])
        kept = [hook for hook in hooks if getattr(hook, "__module__", None) != module]
        replaced |= len(kept) != len(hooks)
        trainer.callbacks[event] = kept
    if replaced:
        trainer.callbacks["on_pretrain_routine_end"].append(_attach_mlflow_run)


def _attach_mlflow_run(trainer) -> None:
    """Point Ultralytics' MLflow metric callbacks at the caller's active run; log its args, namespaced."""
    import mlflow

    trainer._mlflow_active = False
    trainer._mlflow_started_run = False
    run = mlflow.active_run()
    if run is None:
        return
    trainer._mlflow_active = True
    try:
        existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
        params = {f"{_MLFLOW_PARAM_PREFIX}{k}": _param_value(v) for k, v in vars(trainer.args).items()}
        new = {k: v for k, v in params.items() if k not in existing}  # resumed: the first values stay
        if new:
            mlflow.log_params(new)
    except Exception as exc:
        log.warning("could not log Ultralytics' args to MLflow run %s: %s", run.info.run_id, exc)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def export_head(model: Any) -> Any:
    """`model` (float, eval) with its head in export mode, as Ultralytics' exporter sets it (without nms): it then
    returns what the ONNX graph's first output holds (detect: (N, 4 + classes, anchors), boxes decoded to pixels
    xywh, class scores sigmoided)."""
    from ultralytics.nn.modules import Detect

    if hasattr(model, "end2end"):
        model.end2end = False  # as the exporter without nms=False: the raw one-to-many head, NMS outside
    for module in model.modules():
        if isinstance(module, Detect):
            module.export, module.format, module.dynamic, module.shape = True, "onnx", True, None
            module.xyxy = False
    return model
