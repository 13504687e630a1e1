"""One Prefect process worker per GPU of this host, each pinned with CUDA_VISIBLE_DEVICES and taking one run at a time.

python -m infra.stack.gpu_workers --pool gpu-host-0 --gpus 0,1     # print the commands
python -m infra.stack.gpu_workers --pool gpu-host-0 --gpus all --start | --stop
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from infra.settings import Settings, get_settings
from infra.stack import services as stack


def gpu_indices(spec: str) -> list[int]:
    """'0,1' -> [0, 1]; 'all' -> every GPU NVML sees on this host."""
    if spec != "all":
        return [int(part) for part in spec.split(",") if part.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # no driver, no GPU
        raise SystemExit(f"--gpus all: cannot count GPUs on this host ({error}); pass --gpus 0,1,...") from error


def gpu_workers(pool: str, gpus: list[int], settings: Settings | None = None) -> list[Any]:
    """One `prefect worker start` per GPU, pinned with CUDA_VISIBLE_DEVICES and taking one run at a time."""
    settings = settings or get_settings()
    base_env = stack.services(settings)[2].extra_env  # the local worker's polling and PREFECT_HOME
    host = socket.gethostname()
    return [
        stack.Service(
            name=f"worker-{pool}-gpu{gpu}",
            argv=[
                str(stack.BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                f"{host}-{pool}-gpu{gpu}",
                "--limit",
                "1",
            ],
            port=None,
            health_url=None,
            extra_env={**base_env, "CUDA_VISIBLE_DEVICES": str(gpu)},
        )
        for gpu in gpus
    ]


def _command_line(service: Any) -> str:
    argv = " ".join(service.argv[1:])
    return f"CUDA_VISIBLE_DEVICES={service.extra_env['CUDA_VISIBLE_DEVICES']} prefect {argv}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack.gpu_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--gpus", default="all", help="GPU indices, e.g. 0,1 (default: every GPU on this host)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--start", action="store_true", help="start them (logs and pids under TRAINYARD_HOME)")
    action.add_argument("--stop", action="store_true", help="stop the ones --start started")
    args = parser.parse_args(argv)

    settings = get_settings()
    services = gpu_workers(args.pool, gpu_indices(args.gpus), settings)
    if args.start:  # the host's warm-start server first (reused when `make up` already started it)
        settings.home.mkdir(parents=True, exist_ok=True)
        stack.start(settings, stack.warm_start_service(settings))
    for service in services:
        if args.start:
            stack.start(settings, service)
        elif args.stop:
            stack.stop(settings, service)
        else:
            print(_command_line(service))
    return 0


if __name__ == "__main__":
    sys.exit(main())
