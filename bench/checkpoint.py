"""Checkpoint cost: save and load time and size for each trainer's demo model, and checkpointing's share of the
training wall time at the default policy (a checkpoint every epoch, but none less than
checkpoint.min_interval_seconds = 10 s after the previous one, and always the last epoch).

Each trainer trains its demo configuration (prefect.yaml) on the generated demo data, directly through trainers/.
Time spent writing checkpoints is measured where they are written, counting only the outermost call: the torch
trainer's CheckpointStore.save (with the checksum and the manifest), Transformers' Trainer._save_checkpoint,
Ultralytics' BaseTrainer.save_model, and any other `torch.save` or safetensors `save_file` call, plus Trainyard's
work around the libraries' checkpoints (hf-image's checksum manifests, yolo's verified epochN.pt copies). The load
time is reading the final resumable checkpoint back.

    python bench/checkpoint.py [--trainers torch,hf-image,yolo] [--epochs-scale 1.0] [--data-scale 1] [--cold]

Each trainer trains in a process forked from this one, which is first prepared as the warm-start server prepares
the process it forks every training on a process worker from (infra/runs/warm_start.py: the same imports and `warm_up()`
hooks). --cold skips that preparation, as in a container that starts one training: hf-image's first checkpoint
then also builds Transformers' weight-conversion table.

--data-scale N generates N times the demo's images: each epoch takes about N times longer while a checkpoint costs
the same, which shows the share for epochs longer than the demo's very short ones (0.4 s for hf-image).
Last line: checkpoint_overhead_pct=<the largest share among the trainers, in %>
It needs no stack: everything runs in this process and its children. SIGTERM stops them and removes the data.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

import safetensors.torch
import torch
from _common import exit_on_sigterm

from trainers import checkpoints
from trainers.base import TrainJob, get_trainer
from trainers.config import TrainConfig
from trainers.data.synthetic import make_shapes_classification, make_shapes_detection
from trainers.data.validate import load_dataset

DEMOS = {  # the demo deployments' parameters (prefect.yaml)
    "torch": dict(model="tiny-cnn", epochs=10, learning_rate=0.003),
    "hf-image": dict(model="vit-tiny", epochs=5, batch_size=32, learning_rate=0.001),
    "yolo": dict(model="yolov8n.yaml", epochs=10, batch_size=16, image_size=128, learning_rate=0.01, optimizer="sgd"),
}


class SaveTimer:
    """Wall time inside checkpoint writers, outermost calls only (a store's save wraps a torch.save)."""

    def __init__(self) -> None:
        self.seconds, self.count, self._depth = 0.0, 0, 0

    def wrap(self, owner, name: str, counts: bool = True) -> None:
        """Time `owner.name`; `counts=False` for Trainyard's extra work around a library's checkpoint (checksums,
        copies): its time is part of the share, but it is not another checkpoint."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
                    self.count += counts

        setattr(owner, name, timed)


def final_checkpoint(trainer: str, out: Path) -> list[Path]:
    """The files a resume reads."""
    if trainer == "torch":
        return [out / "last.pt"]
    if trainer == "yolo":
        return [out / "weights" / "last.pt"]
    latest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return sorted(p for p in latest.iterdir() if p.suffix in {".pt", ".pth", ".safetensors", ".bin"})


def load_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        if path.suffix == ".safetensors":
            safetensors.torch.load_file(path)
        else:
            torch.load(path, map_location="cpu", weights_only=False)
    return time.perf_counter() - start


def measure(trainer: str, data: Path, scale: float) -> dict[str, float]:
    demo = dict(DEMOS[trainer])
    demo["epochs"] = max(2, round(demo["epochs"] * scale))
    dataset = data / ("shapes-det/data.yaml" if trainer == "yolo" else "shapes-cls")
    config = TrainConfig(dataset=str(dataset), trainer=trainer, **demo)
    timer = SaveTimer()
    timer.wrap(torch, "save")
    timer.wrap(safetensors.torch, "save_file")
    timer.wrap(checkpoints.CheckpointStore, "save")
    if trainer == "hf-image":  # the whole checkpoint: weights, optimizer, scheduler, RNG, trainer state, configs
        import transformers

        from trainers import hf_image

        timer.wrap(transformers.Trainer, "_save_checkpoint")
        timer.wrap(hf_image, "write_dir_manifest", counts=False)
    if trainer == "yolo":
        from ultralytics.engine.trainer import BaseTrainer

        from trainers import yolo

        timer.wrap(BaseTrainer, "save_model")
        timer.wrap(yolo, "copy_atomic", counts=False)  # the resumable epochN.pt copies
        timer.wrap(yolo, "record_file", counts=False)
    with tempfile.TemporaryDirectory(dir=data) as tmp:  # under the data folder: SIGTERM removes both
        out = Path(tmp)
        job = TrainJob(config, load_dataset(config.dataset), out)
        start = time.perf_counter()
        get_trainer(trainer).train(job)
        wall = time.perf_counter() - start
        files = final_checkpoint(trainer, out)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        load_s = load_seconds(files)
    return {
        "epochs": demo["epochs"],
        "wall_s": wall,
        "checkpoints": timer.count,
        "save_s": timer.seconds / max(timer.count, 1),
        "load_s": load_s,
        "size_mb": size_mb,
        "share_pct": 100 * timer.seconds / wall,
    }


def in_forked_child(function, *args) -> dict[str, float]:
    """`function(*args)` in a child forked from this process, as warm start runs a training; its result back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(read_end)
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the libraries' progress bars
                result = function(*args)
            os.write(write_end, json.dumps(result).encode())
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    CHILDREN.append(pid)
    with os.fdopen(read_end, "rb") as reader:
        received = reader.read()
    _, status = os.waitpid(pid, 0)
    CHILDREN.remove(pid)
    if not received:
        raise RuntimeError(f"the measuring child failed (wait status {status}); see its error above")
    return json.loads(received)


CHILDREN: list[int] = []  # the measuring child, while it runs


def stop(data: Path) -> None:
    for pid in CHILDREN:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", default=",".join(DEMOS))
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="fraction of the demo's epochs to train")
    parser.add_argument("--data-scale", type=int, default=1, help="times the demo's number of images (longer epochs)")
    parser.add_argument("--cold", action="store_true", help="no warm-start preparation (a fresh container's process)")
    args = parser.parse_args()
    if not args.cold:
        from infra.runs.warm_start import PRELOAD, warm_up

        warm_up(PRELOAD)
    n = args.data_scale
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        exit_on_sigterm(lambda: stop(data))
        make_shapes_classification(data / "shapes-cls", train_per_class=60 * n, val_per_class=20 * n)
        make_shapes_detection(data / "shapes-det", train_images=64 * n, val_images=16 * n)
        shares = []
        for trainer in args.trainers.split(","):
            figures = in_forked_child(measure, trainer, data, args.epochs_scale)
            shares.append(figures["share_pct"])
            print(
                f"{trainer}: {figures['epochs']} epochs in {figures['wall_s']:.1f} s, {figures['checkpoints']} "
                f"checkpoint writes of {figures['size_mb']:.2f} MB, save {figures['save_s'] * 1000:.0f} ms each, "
                f"load {figures['load_s'] * 1000:.0f} ms, share of training {figures['share_pct']:.2f} %",
                flush=True,
            )
    print(f"checkpoint_overhead_pct={max(shares):.2f}")


if __name__ == "__main__":
    main()
