"""Trigger latency: from `prefect deployment run` to the first training step, through the local worker.

t0 is taken just before the CLI command starts. The first training step is the moment the trainer enters its
loop: model built, data loaders ready, the progress artifact created (its server timestamp). The figure is the
median over --runs triggers. It needs the running stack with deployments applied (`make deploy`; `make bench`
applies them), and says so in one line otherwise. SIGTERM cancels the flow run in flight and exits.

    python bench/trigger_latency.py [--runs 3] [--cold]
Last line: trigger_to_first_step_s=<s>

--cold stops the stack's warm-start server for the measurement, so the launcher starts each run in a new interpreter
(what a pool without warm start does), and starts the server again at the end, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import exit_on_sigterm, require_deployment, running_stack
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.states import Cancelling

from infra.settings import Settings

PREFECT = str(Path(sys.executable).parent / "prefect")
BENCH = "bench/trigger_latency.py"
IN_FLIGHT: list[str] = []  # the flow run being measured: cancelled on SIGTERM


# The 180 training images every figure in docs/benchmarks.md was measured on (the demo data has grown since).
BENCH_SIZES = {"train_per_class": 60, "val_per_class": 20, "test_per_class": 20}


def cancel_in_flight() -> None:
    with get_client(sync_client=True) as client:
        for flow_run_id in IN_FLIGHT:
            client.set_flow_run_state(flow_run_id, Cancelling(message=f"{BENCH} was stopped"))


def trigger(dataset: str) -> tuple[float, str]:
    t0 = datetime.now(UTC)
    out = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "train/torch-shapes",
            "--param",
            f"dataset={dataset}",
            "--param",
            "epochs=1",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **Settings.from_env().client_env()},
    ).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    IN_FLIGHT[:] = [flow_run_id]
    return t0.timestamp(), flow_run_id


def first_step_and_created(flow_run_id: str, timeout: float = 180) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key={"any_": ["training-progress"]}),
                flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
            )
            flow_run = client.read_flow_run(flow_run_id)
            if artifacts:
                return artifacts[0].created.timestamp(), flow_run.created.timestamp()
            if flow_run.state and flow_run.state.is_final():
                raise RuntimeError(f"flow run {flow_run_id} ended {flow_run.state.name} before its first training step")
            time.sleep(0.2)
    raise TimeoutError(f"flow run {flow_run_id} did not reach its first training step in {timeout} s")


def wait_finished(flow_run_id: str) -> None:
    with get_client(sync_client=True) as client:
        while not (state := client.read_flow_run(flow_run_id).state) or not state.is_final():
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="without the warm-start server")
    args = parser.parse_args()
    settings = running_stack(BENCH)
    restore = stop_warm_start(settings) if args.cold else (lambda: None)
    exit_on_sigterm(lambda: (cancel_in_flight(), restore()))
    try:
        measure(settings, args.runs)
    finally:
        restore()


def stop_warm_start(settings):
    """Stop the stack's warm-start server; what starts it again."""
    from infra.stack import services as local_stack

    server = local_stack.warm_start_service(settings)
    local_stack.stop(settings, server)
    return lambda: local_stack.start(settings, server)


def measure(settings, runs: int) -> None:
    require_deployment(BENCH, "train/torch-shapes")
    with get_client(sync_client=True) as client:
        if client.read_work_pool(settings.work_pool).status != WorkPoolStatus.READY:
            sys.exit(f"{BENCH}: no worker is online in pool {settings.work_pool}; run `make up` first")
    from trainers.data.synthetic import make_shapes_classification

    dataset = str(make_shapes_classification(settings.home / "datasets" / "bench-shapes-cls", **BENCH_SIZES))
    totals, from_created = [], []
    for i in range(runs + 1):  # the first run warms the dataset cache and the OS page cache
        t0, flow_run_id = trigger(dataset)
        first_step, created = first_step_and_created(flow_run_id)
        wait_finished(flow_run_id)  # one at a time: the next trigger must not queue behind this run
        IN_FLIGHT.clear()
        if i:
            totals.append(first_step - t0)
            from_created.append(first_step - created)
            print(
                f"run {i}: trigger->first step {first_step - t0:.2f} s (flow run created->first step "
                f"{first_step - created:.2f} s)"
            )
    print(f"created_to_first_step_s={statistics.median(from_created):.2f}")
    print(f"trigger_to_first_step_s={statistics.median(totals):.2f}")


if __name__ == "__main__":
    main()
