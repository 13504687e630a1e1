"""Liveness on a busy machine: no training is declared dead while it lives, and a real death is caught quickly.

Setup: the running stack (`make up` first; without it the bench says so in one line), pools and workers of its own
with a temporary store, and the CPU saturated by BUSY busy-loop processes (4 on this 2-core machine, by default).
Workload: two trainings of each trainer (torch, hf-image, yolo) at once, each sized to last several minutes under
that load (its duration is printed; the issue asks for at least three). Meanwhile a seventh training runs on the
`victim` profile; once it has checkpointed, its worker and everything the worker started are killed (kill -9), and
the fallback to `backup` resumes it.

false_crashes: load trainings whose training step was ever Crashed (each one was alive all along).
detect_s: the kill -> the victim's step Crashed (the zombie automation's verdict).
fallback_running_s: the kill -> the backup's training step Running.

    python bench/liveness.py [--busy 4] [--scale 1.0]
Last line: false_crashes=<n> detect_s=<s> fallback_running_s=<s>
Takes about 10 minutes on 2 cores; SIGTERM stops it and everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psutil
from _common import exit_on_sigterm, running_stack
from prefect.client.orchestration import get_client

from infra.compute.store import ComputeProfile, Store
from infra.settings import ROOT, Settings
from infra.stack import services as local_stack
from infra.stack.apply import apply_profiles
from infra.stack.automations import ensure_zombie_automation
from trainers.data.synthetic import make_shapes_classification, make_shapes_detection

PROFILES = {"load": 6, "victim": 1, "backup": 1}  # name -> max_concurrent
# Epochs that keep each trainer busy for three to five minutes under this load on 2 cores (measured: torch about
# 6 epochs a minute, hf-image 3.4, yolo 24); the durations are printed, and --scale adjusts them.
WORKLOAD = {
    "torch": {"trainer": "torch", "epochs": 30},
    "hf-image": {"trainer": "hf-image", "model": "resnet-tiny", "epochs": 15},
    "yolo": {"trainer": "yolo", "model": "yolov8n.yaml", "epochs": 100},
}
VICTIM_EPOCHS = 30


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _train(dataset: str, profiles: list[str], **request):
    from flows.train import train

    return train(
        dataset=dataset,
        compute={"profiles": profiles},
        image_size=32,
        batch_size=8,
        experiment="bench-liveness",
        return_state=True,
        **request,
    )


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _crashed(flow_run_id) -> bool:
    with get_client(sync_client=True) as client:
        return any(s.is_crashed() for s in client.read_flow_run_states(flow_run_id))


def _kill_tree(process: psutil.Process) -> None:
    for member in [*process.children(recursive=True), process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def victim_death(store: Store, dataset: str, settings: Settings, victim) -> tuple[threading.Thread, float, float]:
    """Start the victim's training, kill its worker's process tree once it has checkpointed, and time the zombie
    verdict and the fallback's start. Returns the request's thread (it goes on training on `backup`)."""
    request = {"epochs": VICTIM_EPOCHS, "checkpoint": {"min_interval_seconds": 0}}
    thread = threading.Thread(target=lambda: _train(dataset, ["victim", "backup"], **request), daemon=True)
    thread.start()
    running = lambda: next((a for a in store.attempts() if a.profile == "victim" and a.outcome == "running"), None)  # noqa: E731
    attempt = _poll(running)
    _poll(lambda: (settings.runs_dir / attempt.request_id / "last.pt").exists())
    time.sleep(5)
    killed_at = datetime.now(UTC)
    _kill_tree(local_stack.running(settings, victim))
    backup = _poll(lambda: next((a for a in store.attempts(attempt.request_id) if a.profile == "backup"), None))
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(attempt.flow_run_id)
        crashed_at = next(_utc(s.timestamp) for s in states if s.is_crashed())
        started = _poll(lambda: client.read_flow_run(backup.flow_run_id).start_time)
    victim_attempt = store.attempts(attempt.request_id)[0]
    print(f"victim: {victim_attempt.outcome} ({victim_attempt.reason})", flush=True)
    return thread, (crashed_at - killed_at).total_seconds(), (_utc(started) - killed_at).total_seconds()


def _poll(read, every: float = 0.5):
    while not (value := read()):
        time.sleep(every)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy", type=int, default=4, help="busy-loop processes that saturate the CPU")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training's epochs")
    args = parser.parse_args()

    settings = running_stack("bench/liveness.py")
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-liveness-"))
    url = f"sqlite:///{tmp / 'store.db'}"
    os.environ["TRAINYARD_STORE_URL"] = url
    store = Store(url)
    for priority, (name, slots) in enumerate(PROFILES.items()):
        store.save_profile(
            ComputeProfile(
                name=name,
                work_pool=f"bench-liveness-{name}",
                deployment=f"train-step/bench-liveness-{name}",
                priority=priority,
                max_concurrent=slots,
                cpu_cores=2,
                ram_gb=8,
            )
        )
    asyncio.run(apply_profiles(store.profiles()))
    ensure_zombie_automation()
    workers = {
        name: local_stack.worker_service(settings, f"bench-liveness-{name}", "process", {"TRAINYARD_STORE_URL": url})
        for name in PROFILES
    }
    classification = str(make_shapes_classification(tmp / "shapes", train_per_class=16, val_per_class=4, image_size=32))
    detection = str(make_shapes_detection(tmp / "shapes-det", train_images=16, val_images=4, image_size=64))
    busy: list[subprocess.Popen] = []

    def stop_everything() -> None:
        for process in [*busy, *FLOWS]:
            process.kill()
        stopping = [threading.Thread(target=local_stack.stop, args=(settings, w)) for w in workers.values()]
        for thread in stopping:  # the workers and the trainings they started, all at once
            thread.start()
        for thread in stopping:
            thread.join()

    exit_on_sigterm(stop_everything)  # the trainings' threads would keep the interpreter alive: leave at once
    try:
        for worker in workers.values():
            local_stack.start(settings, worker)
        time.sleep(15)  # workers come online
        busy = _busy(args.busy)
        print(f"{args.busy} busy processes; load average {os.getloadavg()[0]:.1f}", flush=True)
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            futures = {}
            for name, request in WORKLOAD.items():
                dataset = detection if request["trainer"] == "yolo" else classification
                request = {**request, "epochs": max(1, round(request["epochs"] * args.scale))}
                for copy in (1, 2):
                    futures[f"{name} #{copy}"] = pool.submit(_timed, dataset, request)
            time.sleep(60)  # the load trainings are under way
            victim_request, detect_s, fallback_s = victim_death(store, classification, settings, workers["victim"])
            print(f"detect_s={detect_s:.1f} fallback_running_s={fallback_s:.1f} (the rest goes on)", flush=True)
            outcomes = {label: future.result() for label, future in futures.items()}
            victim_request.join()
        load_average = os.getloadavg()[0]
    finally:
        stop_everything()
    false_crashes = 0
    for label, (state, request_id, minutes) in outcomes.items():
        steps = [a for a in store.attempts(request_id) if a.flow_run_id]
        crashed = any(_crashed(a.flow_run_id) for a in steps)
        false_crashes += crashed
        print(f"{label}: {state} in {minutes:.1f} min; its training step ever Crashed: {crashed}", flush=True)
    print(f"total {(time.monotonic() - started) / 60:.1f} min; load average at the end {load_average:.1f}")
    print(f"false_crashes={false_crashes} detect_s={detect_s:.1f} fallback_running_s={fallback_s:.1f}")


# Each load training's train flow runs in a process of its own, as a deployment's run would: several train flows
# in one interpreter would share torch's lazy imports and ONNX export state across threads.
FLOWS: list[subprocess.Popen] = []  # the load trainings' train flow processes
TRAIN_ONE = """
import json, sys
from flows.train import train
state = train(**json.loads(sys.argv[1]), return_state=True)
print("RESULT", state.type.value, state.state_details.flow_run_id, flush=True)
"""


def _timed(dataset: str, request: dict) -> tuple[str, str, float]:
    started = time.monotonic()
    request = {**request, "dataset": dataset, "compute": {"profiles": ["load"]}, "image_size": 32, "batch_size": 8}
    request["experiment"] = "bench-liveness"
    argv = [sys.executable, "-c", TRAIN_ONE, json.dumps(request)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    FLOWS.append(process)
    out, err = process.communicate()
    result = next((line.split() for line in out.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(f"a load training did not finish:\n{out[-2000:]}\n{err[-2000:]}")
    return result[1], result[2], (time.monotonic() - started) / 60


if __name__ == "__main__":
    main()
