"""One training's GPU lease in its own process, for tests where several compete (or one is killed).

    python tests/infra/allocation_worker.py INVENTORY.json NEED.json HOLD RECORDS.jsonl

HOLD is seconds, or until:PATH to hold the GPUs until that file exists.

INVENTORY.json is a HostInventory (the GPUs a test supplies where the machine has none). Appends one line per
lease to RECORDS.jsonl: pid, the GPUs it got, and when it held them (time.time()). Prints "leased <uuids>" as soon
as it holds them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from infra.compute.allocation import Need, gpu_lease
from infra.compute.gpus import HostInventory


def main() -> None:
    inventory_file, need_file, hold, records = sys.argv[1:5]
    inventory = HostInventory.from_json(Path(inventory_file).read_text())
    need = Need(**json.loads(Path(need_file).read_text()))
    with gpu_lease(need, inventory, on_wait=lambda why: print(why, file=sys.stderr, flush=True)) as lease:
        start = time.time()
        print("leased", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
        if hold.startswith("until:"):  # held until the test creates that file
            while not Path(hold.removeprefix("until:")).exists():
                time.sleep(0.05)
        else:
            time.sleep(float(hold))
        end = time.time()
    record = {"pid": os.getpid(), "gpus": [g.uuid for g in lease.gpus], "slots": list(lease.slots)}
    with open(records, "a") as handle:
        handle.write(json.dumps({**record, "start": start, "end": end}) + "\n")


if __name__ == "__main__":
    main()
