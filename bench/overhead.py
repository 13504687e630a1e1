"""Platform overhead: the same torch-trainer job run directly through trainers/ and through the full flow.

Direct = validate the dataset, train, evaluate, export to ONNX and check parity, as plain function calls.
Flow   = the train flow on the running stack (`make up`; without it the bench says so in one line): the same
         work plus Prefect tasks, artifacts, the MLflow run, and model registration.

Training time on a shared 2-core machine varies by +-15 % run to run, so the two paths alternate --repeats times
and the medians are compared.

    python bench/overhead.py [--epochs 30] [--repeats 3]
Last line: overhead_ratio=<flow/direct>
SIGTERM stops it (a train flow in progress is marked Crashed first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import running_stack

from trainers.base import TrainJob
from trainers.config import TrainConfig
from trainers.data.synthetic import make_shapes_classification
from trainers.data.validate import load_dataset
from trainers.onnx_export import check_onnx_parity
from trainers.torch_classifier import TorchClassifierTrainer

# The 180 training images every figure in docs/benchmarks.md was measured on (the demo data has grown since).
BENCH_SIZES = {"train_per_class": 60, "val_per_class": 20, "test_per_class": 20}


def direct(config: TrainConfig, out: Path) -> float:
    start = time.perf_counter()
    dataset = load_dataset(config.dataset)
    job = TrainJob(config, dataset, out, "cpu")
    trainer = TorchClassifierTrainer()
    result = trainer.train(job)
    for split in ("val", "test"):
        trainer.evaluate(job, result.best_checkpoint, split)
    onnx_path = trainer.export_onnx(job, result.best_checkpoint, out / "model.onnx", 17)
    batch = trainer.parity_inputs(job, 8)
    check_onnx_parity(onnx_path, batch, trainer.torch_outputs(job, result.best_checkpoint, batch), atol=1e-3, rtol=1e-3)
    return time.perf_counter() - start


def through_flow(params: dict) -> float:
    from flows.train import train

    start = time.perf_counter()
    state = train(**params, experiment="bench-overhead", return_state=True)
    elapsed = time.perf_counter() - start
    assert state.is_completed(), state.message
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="30 epochs: about 30 s of training here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = running_stack("bench/overhead.py")
    dataset = make_shapes_classification(settings.home / "datasets" / "bench-shapes-cls", **BENCH_SIZES)
    params = {"dataset": str(dataset), "epochs": args.epochs, "learning_rate": 0.003, "image_size": 64}

    through_flow({**params, "epochs": 1})  # warm-up: imports, server-side caches, experiment creation
    direct_runs, flow_runs = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            direct_runs.append(direct(TrainConfig(**params), Path(tmp)))
        flow_runs.append(through_flow(params))
        print(f"direct {direct_runs[-1]:.2f} s, flow {flow_runs[-1]:.2f} s", flush=True)
    direct_s, flow_s = statistics.median(direct_runs), statistics.median(flow_runs)
    print(f"direct_s={direct_s:.2f}")
    print(f"flow_s={flow_s:.2f}")
    print(f"fixed_overhead_s={flow_s - direct_s:.2f}")
    print(f"overhead_ratio={flow_s / direct_s:.3f}")


if __name__ == "__main__":
    main()
