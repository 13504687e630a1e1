"""Pause, resume, or checkpoint a running training from the command line (the Prefect CLI has no pause).

    python -m flows.control pause <flow-run-id> [--timeout-hours 24]
    python -m flows.control resume <flow-run-id>
    python -m flows.control checkpoint <flow-run-id> [--wait 120]

The flow run is the train flow run (the one a deployment started). Pause and resume do what the Prefect UI's Pause
(or Suspend) and Resume buttons do; cancel is Prefect's own `prefect flow-run cancel <id>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID, uuid4

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.flow_runs import resume_flow_run, suspend_flow_run

from tasks.control_watch import CHECKPOINT_KEY


class ControlError(RuntimeError):
    """A request that cannot apply to this flow run, with what to do instead."""


def _running_train_run(client, flow_run_id: UUID, action: str):
    try:
        run = client.read_flow_run(flow_run_id)
    except ObjectNotFound:
        raise ControlError(f"no flow run {flow_run_id} on this Prefect server (check PREFECT_API_URL)") from None
    if run.parent_task_run_id is not None:
        parent = client.read_task_run(run.parent_task_run_id).flow_run_id
        raise ControlError(f"flow run {flow_run_id} is a training step; {action} its train flow run {parent}")
    if run.state is None or not run.state.is_running():
        state = run.state.name if run.state else "not started"
        raise ControlError(f"flow run {flow_run_id} is {state}: only a running training can be asked to {action}")
    return run


def pause(flow_run_id: UUID, timeout_hours: float) -> str:
    with get_client(sync_client=True) as client:
        _running_train_run(client, flow_run_id, "pause")
    try:
        suspend_flow_run(flow_run_id=flow_run_id, timeout=int(timeout_hours * 3600))
    except RuntimeError as error:  # the server refused, e.g. a run with no deployment to reschedule
        raise ControlError(f"flow run {flow_run_id} cannot be paused: {error}") from None
    return (
        f"pause requested: flow run {flow_run_id} is Suspended; training checkpoints and stops within a step. "
        f"Resume within {timeout_hours:g} h: python -m flows.control resume {flow_run_id}"
    )


def resume(flow_run_id: UUID) -> str:
    try:
        resume_flow_run(flow_run_id)
    except ObjectNotFound:
        raise ControlError(f"no flow run {flow_run_id} on this Prefect server (check PREFECT_API_URL)") from None
    except Exception as error:  # not paused, or past its pause timeout
        raise ControlError(f"flow run {flow_run_id} cannot be resumed: {error}") from None
    return f"resumed: flow run {flow_run_id} is scheduled again and will continue from its last checkpoint"


def checkpoint(flow_run_id: UUID, wait_s: float) -> str:
    key = f"{CHECKPOINT_KEY}-{uuid4().hex[:12]}"
    with get_client(sync_client=True) as client:
        _running_train_run(client, flow_run_id, "checkpoint")
        requested = json.dumps({"requested_at": datetime.now(UTC).isoformat()})
        client.create_flow_run_input(flow_run_id, key, requested, sender="flows.control")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:  # the training deletes the request once its checkpoint is written
            time.sleep(1.0)
            try:
                client.read_flow_run_input(flow_run_id, key)
            except PrefectHTTPStatusError as gone:
                if gone.response.status_code != 404:
                    raise
                return f"checkpoint written: flow run {flow_run_id} (see its logs and the MLflow tag checkpoint.last)"
    if wait_s:
        raise ControlError(
            f"no checkpoint within {wait_s:g} s; the request stays open and is served at the trainer's next "
            "boundary (yolo: the end of the epoch)"
        )
    return f"checkpoint requested: flow run {flow_run_id}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.control", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pause", help="checkpoint, stop and release the machine; the run shows Suspended")
    p.add_argument("flow_run_id", type=UUID)
    p.add_argument("--timeout-hours", type=float, default=24.0, help="how long it may stay paused (default 24)")
    p = commands.add_parser("resume", help="continue a paused training from its checkpoint")
    p.add_argument("flow_run_id", type=UUID)
    p = commands.add_parser("checkpoint", help="write a checkpoint now and go on training")
    p.add_argument("flow_run_id", type=UUID)
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for it; 0 returns at once")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.command == "pause":
            print(pause(args.flow_run_id, args.timeout_hours))
        elif args.command == "resume":
            print(resume(args.flow_run_id))
        else:
            print(checkpoint(args.flow_run_id, args.wait))
    except ControlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
