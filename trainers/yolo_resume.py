"""What an earlier attempt left in a yolo run directory, and how the next attempt goes on from it: Ultralytics'
weights/last.pt (written in place, stripped when training ends), Trainyard's weights/epochN.pt full-state copies and
results.csv (see trainers/yolo.py)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from trainers.base import TrainJob
from trainers.checkpoints import CheckpointError, copy_atomic, file_damage, write_atomic

log = logging.getLogger("trainers.yolo")


class _Plan:
    def __init__(self, completed: int = 0, resume_from: Path | None = None, done: bool = False) -> None:
        self.completed, self.resume_from, self.done = completed, resume_from, done


def _resume_plan(job: TrainJob, last: Path) -> _Plan:
    """Fresh start, resume, or nothing to do, from what an earlier attempt left in weights/.

    - No last.pt: train from the start.
    - last.pt with optimizer state (an interrupted run): Ultralytics resumes it, to the config's epochs.
    - last.pt stripped (a finished run; Ultralytics refuses to resume those): done if it reached
      config.epochs; otherwise resume from the full-state weights/epochN.pt copy of its final epoch.
    """
    if not last.is_file():
        return _Plan()
    try:
        ckpt = _load_ckpt(last)
    except Exception as error:  # Ultralytics writes last.pt in place: a kill during that write truncates it
        ckpt = _recover_last(last, error)
    if ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0:
        completed = ckpt["epoch"] + 1
        if completed >= job.config.epochs:
            # Interrupted after its final save (in Ultralytics' final validation): the weights are complete.
            return _Plan(completed, done=True)
        _set_checkpoint_epochs(last, ckpt, job.config.epochs)
        return _Plan(completed, resume_from=last)
    completed = _finished_epochs(ckpt, last)
    if completed >= job.config.epochs:
        return _Plan(completed, done=True)
    full = last.parent / f"epoch{completed}.pt"
    full_ckpt = _load_ckpt(full) if full.is_file() else {}
    if full_ckpt.get("optimizer") is None or full_ckpt.get("epoch", -1) < 0:
        raise RuntimeError(
            f"{last.parent.parent} holds a finished {completed}-epoch training without a resumable "
            f"checkpoint ({full.name}); Ultralytics cannot continue it to {job.config.epochs} epochs. "
            "Use a new output directory, or remove this one to train from the start"
        )
    _set_checkpoint_epochs(last, full_ckpt, job.config.epochs, force=True)  # last.pt: resumable again
    return _Plan(completed, resume_from=last)


def _recover_last(last: Path, error: Exception) -> dict[str, Any]:
    """Replace an unreadable last.pt with the newest epochN.pt copy that verifies and loads, with a warning."""
    copies = sorted(last.parent.glob("epoch*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
    problems = [f"{last.name} ({type(error).__name__})"]
    for copy in reversed(copies):
        damage = file_damage(copy)
        try:
            if damage:
                raise ValueError(damage)
            ckpt = _load_ckpt(copy)
        except Exception as bad:
            problems.append(f"{copy.name} ({bad})")
            continue
        log.warning("%s does not load (%s): resuming from %s instead", last, error, copy.name)
        copy_atomic(copy, last)
        return ckpt
    raise CheckpointError(
        f"no usable checkpoint in {last.parent}: {'; '.join(problems)}. Training will not restart from scratch on "
        "its own: restore the files, or remove the directory (or use another output directory) to start over"
    )


def _load_ckpt(path: Path) -> dict[str, Any]:
    from ultralytics.utils.patches import torch_load

    return torch_load(str(path), map_location="cpu", weights_only=False)


def _finished_epochs(ckpt: dict[str, Any], last: Path) -> int:
    epochs = (ckpt.get("train_results") or {}).get("epoch") or []
    if epochs:
        return int(max(epochs))
    return int((ckpt.get("train_args") or {}).get("epochs") or 0)


def _set_checkpoint_epochs(path: Path, ckpt: dict[str, Any], epochs: int, *, force: bool = False) -> None:
    """Write ckpt to path with `epochs` as its total: Ultralytics resumes to the checkpoint's own `epochs`."""
    import torch

    if not force and ckpt["train_args"].get("epochs") == epochs:
        return
    ckpt["train_args"] = {**ckpt["train_args"], "epochs": epochs}
    write_atomic(path, lambda handle: torch.save(ckpt, handle))


def read_results_csv(path: Path) -> dict[str, list[int | float]]:
    """results.csv as {column: values}, as Ultralytics' read_results_csv gives it: a column of integers as ints,
    any other as floats; {} when the file cannot be read."""
    try:
        with path.open(newline="") as handle:
            header, *rows = list(csv.reader(handle))
        columns = {name.strip(): [row[i].strip() for row in rows] for i, name in enumerate(header)}
        return {name: _numbers(values) for name, values in columns.items()}
    except (OSError, ValueError, IndexError):
        return {}


def _numbers(values: list[str]) -> list[int | float]:
    try:
        return [int(value) for value in values]
    except ValueError:
        return [float(value) for value in values]


def _forget_unsaved_epochs(results_csv: Path, completed: int) -> None:
    """Drop the rows of epochs after the checkpoint a resume starts from (trained, not saved: min_interval_seconds
    or a crash): Ultralytics appends to results.csv, and those epochs are trained and written again."""
    if not results_csv.is_file():
        return
    header, *rows = results_csv.read_text(encoding="utf-8").splitlines()
    kept = [row for row in rows if float(row.split(",", 1)[0]) <= completed]
    if len(kept) < len(rows):
        write_atomic(results_csv, lambda handle: handle.write("\n".join([header, *kept, ""]).encode()))


def checkpoint_labels(checkpoint: Path) -> list[str]:
    """The label map Ultralytics stored in a checkpoint (model.names), index order."""
    from ultralytics.utils.patches import torch_load

    ckpt = torch_load(str(checkpoint), map_location="cpu", weights_only=False)
    model = ckpt.get("model") if ckpt.get("model") is not None else ckpt.get("ema")
    names = getattr(model, "names", None) or {}
    if isinstance(names, dict):
        return [names[i] for i in sorted(names)]
    return list(names)
