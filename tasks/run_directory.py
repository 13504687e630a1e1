"""The run directory a request's attempts share: a later attempt, on this host or another, resumes from the
checkpoints an earlier one left there. Without an artifact store to carry them, every host must see one directory."""

from __future__ import annotations

from pathlib import Path

# Written by the train flow before it submits a step; seen by the step, the directory is shared. Hidden: not mirrored.
FLOW_MARK = ".trainyard-flow"
SHARE_IT = (
    "A training step's checkpoints must reach the host of the request's next attempt (fallback, resume), so the run "
    "directory must be shared by the hosts (one filesystem, the same path) or carried by an artifact store. "
    "Mount the runs directory on every host at that path (docs/work-pools.md, 'Shared checkpoint storage'), or set "
    "TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix where the train flow and the workers run (docs/storage.md)."
)


class RunDirectoryNotShared(RuntimeError):
    """A training step's host cannot see the train flow's run directory, and no artifact store carries it."""


def mark_run_directory(output_dir: Path) -> None:
    """Done by the train flow before it submits a step: the step's host sees the mark only on a shared directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / FLOW_MARK).touch()


def require_shared(output_dir: Path) -> None:
    if not (output_dir / FLOW_MARK).exists():
        raise RunDirectoryNotShared(
            f"The run directory {output_dir} on this host is not the train flow's: its mark {FLOW_MARK} is not "
            f"there, and no artifact store is set. {SHARE_IT}"
        )
