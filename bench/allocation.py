"""GPU allocation under contention: lease round trip, and the idle gap when a GPU passes to the next run.

21 processes want the same GPU (one holds it, 20 wait); each holds it HOLD_S, then releases. The gap between one
release and the next holder's start is the GPU's idle time between runs (target: at most 5 s). The allocate and
release round trip is also timed on a free GPU. The GPU is supplied (this machine has none); the Prefect server,
its concurrency limits and leases are real: it uses the running stack (`make up`), and says so in one line when
it is not up. SIGTERM stops the bench and the processes it started.

    python bench/allocation.py [--waiting 20] [--hold 1.0]
Last line: gpu_handoff_s=<median gap>
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import exit_on_sigterm, running_stack

from infra.compute.allocation import Need, gpu_lease
from infra.compute.gpus import GPU, HostInventory


def supplied_inventory() -> HostInventory:
    tag = uuid.uuid4().hex[:8]
    gpu = GPU(0, f"GPU-bench-{tag}", "Bench GPU", 16 * 1024, 0, 0, 30, 50.0, ())
    return HostInventory(f"bench-{tag}", 8, 4, 32.0, 30.0, 100.0, (gpu,), "bench", "")


def worker(inventory_file: str, hold: float, out: str) -> None:
    with gpu_lease(Need(gpus=1), HostInventory.from_json(Path(inventory_file).read_text()), set_visible=False):
        start = time.time()
        time.sleep(hold)
        released_at = time.time()
    done = time.time()
    with open(out, "a") as handle:
        handle.write(json.dumps({"start": start, "end": released_at, "release_s": done - released_at}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--waiting", type=int, default=20)
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], float(args.worker[1]), args.worker[2])
        return
    running_stack("bench/allocation.py", mlflow=False)
    procs: list[subprocess.Popen] = []
    exit_on_sigterm(lambda: [proc.kill() for proc in procs])

    inventory = supplied_inventory()
    round_trips = []
    for _ in range(10):
        started = time.perf_counter()
        with gpu_lease(Need(gpus=1), inventory, set_visible=False):
            acquired = time.perf_counter()
        round_trips.append((acquired - started, time.perf_counter() - acquired))
    print(
        f"free GPU: allocate {statistics.median(a for a, _ in round_trips) * 1000:.0f} ms, "
        f"release {statistics.median(r for _, r in round_trips) * 1000:.0f} ms (medians of 10)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        inventory_file, out = Path(tmp) / "inventory.json", Path(tmp) / "leases.jsonl"
        inventory_file.write_text(inventory.to_json())
        command = [sys.executable, __file__, "--worker", str(inventory_file), str(args.hold), str(out)]
        procs.extend(subprocess.Popen(command) for _ in range(args.waiting + 1))
        for proc in procs:
            proc.wait(timeout=1200)
        leases = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["start"])
    gaps = [b["start"] - a["end"] for a, b in zip(leases, leases[1:], strict=False)]
    assert len(leases) == args.waiting + 1 and min(gaps) >= 0, "a GPU was held twice at once"
    release = statistics.median(r["release_s"] for r in leases)
    print(
        f"{len(leases)} runs, one GPU, {args.waiting} waiting: handoff gap median {statistics.median(gaps):.2f} s, "
        f"max {max(gaps):.2f} s; release under contention {release * 1000:.0f} ms (median)"
    )
    print(f"gpu_handoff_s={statistics.median(gaps):.2f}")


if __name__ == "__main__":
    main()
