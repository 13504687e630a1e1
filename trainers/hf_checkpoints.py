"""The hf-image trainer's checkpoint directories (checkpoint-N, written by Transformers): which one a resume
takes, a run directory copied from another host, the best model's files (see trainers/hf_image.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from trainers.checkpoints import CheckpointError, dir_damage

log = logging.getLogger("trainers.hf_image")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies against its manifest.

    Transformers writes trainer_state.json last, after the weights, optimizer, scheduler and RNG states: a newer
    checkpoint without it (a crash while saving) is removed. One that is damaged (a file differs from its manifest)
    is set aside as damaged-checkpoint-N with a warning, and the one before it is used.
    """
    found = _checkpoints(output_dir)
    complete = [(step, path) for step, path in found if (path / "trainer_state.json").is_file()]
    last_step, last = complete[-1] if complete else (-1, None)
    for step, path in found:
        if step > last_step:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    for _, path in reversed(complete):
        damage = dir_damage(path)
        if damage is None:
            return path
        aside = path.with_name(f"damaged-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the one before it", path, damage, aside)
    if complete:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir}: every one is damaged (set aside as damaged-checkpoint-*). "
            "Training will not restart from scratch on its own: restore them, or remove the directory (or use "
            "another output directory) to start over"
        )
    return last


def _moved_best(resume: Path, output_dir: Path) -> Path | None:
    """The best checkpoint the resumed state records, in this directory, when it is recorded in another one.

    trainer_state.json holds best_model_checkpoint as an absolute path: in a run directory restored on another host
    it names the first host's directory, and Transformers drops it on resume. Without it a resume with nothing left
    to train would skip load_best_model_at_end and return the last checkpoint as the best.
    """
    recorded = json.loads((resume / "trainer_state.json").read_text()).get("best_model_checkpoint")
    if not recorded or Path(recorded).parent == output_dir:
        return None
    here = output_dir / Path(recorded).name
    if not _CHECKPOINT.match(here.name) or not here.is_dir():
        return None
    log.info("best checkpoint %s was recorded in another run directory: using %s", recorded, here)
    return here


def _stamp_in_step_order(output_dir: Path) -> None:
    """Give the checkpoint directories mtimes in step order when they are not.

    Transformers' rotation (save_total_limit) deletes the oldest checkpoints by directory mtime. A copied run
    directory (restored from the artifact store) has the copy's order, e.g. checkpoint-16 before checkpoint-8, and
    rotation would then delete the newest but one.
    """
    found = _checkpoints(output_dir)
    mtimes = [path.stat().st_mtime for _, path in found]
    if all(a < b for a, b in zip(mtimes, mtimes[1:], strict=False)):
        return
    now = time.time()
    for age, (_, path) in enumerate(reversed(found), start=1):
        os.utime(path, (now - age, now - age))  # a second apart: Transformers ignores mtimes closer than that


def _eval_at(log_history: list[dict[str, Any]], step: int) -> dict[str, float] | None:
    for entry in reversed(log_history):
        if entry.get("step") == step and "eval_accuracy" in entry:
            return {"val_accuracy": float(entry["eval_accuracy"]), "val_loss": float(entry["eval_loss"])}
    return None


def _link_model_files(checkpoint: Path, target: Path) -> None:
    """`target` becomes a loadable model directory of the checkpoint's config and weights, hard-linked: the chosen
    weights are already on disk, so they are not written a second time (and a rotated checkpoint keeps them)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for path in checkpoint.iterdir():
        if path.name == "config.json" or path.name.startswith(("model.", "model-")):  # weights, shards, index
            os.link(path, partial / path.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
