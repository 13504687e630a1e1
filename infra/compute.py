"""Compute profiles and the choice among them.

Today there is one profile, this machine; the interface (ranked profiles in, a choice and the reasons out)
is the one compute fallback builds on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ComputeProfile:
    name: str
    kind: Literal["process"] = "process"
    work_pool: str = "trainyard-local"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class ComputeDecision:
    profile: ComputeProfile
    device: str  # what the trainer gets: "cpu" or "cuda:N"
    reasons: dict[str, str] = field(default_factory=dict)  # profile name -> why chosen or not

    @property
    def reason(self) -> str:
        return self.reasons[self.profile.name]


class NoComputeError(RuntimeError):
    pass


PROFILES: dict[str, ComputeProfile] = {"local": ComputeProfile(name="local")}


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def select_compute(profiles: list[ComputeProfile], needs_gpu: bool = False) -> ComputeDecision:
    """The first profile in rank order that can run the job; every profile gets its reason."""
    reasons: dict[str, str] = {}
    gpus = visible_gpus()
    for profile in profiles:
        if needs_gpu and not gpus:
            reasons[profile.name] = "skipped: the request needs a GPU and none is visible to torch"
            continue
        if profile.device == "cpu" or not gpus:
            why = "CPU only by request" if profile.device == "cpu" else "no CUDA GPU visible"
            reasons[profile.name] = f"chosen: {why}; training on CPU ({os.cpu_count()} cores)"
            return ComputeDecision(profile, "cpu", reasons)
        reasons[profile.name] = f"chosen: CUDA GPU 0 ({gpus[0]}) of {len(gpus)} visible"
        return ComputeDecision(profile, "cuda:0", reasons)
    raise NoComputeError(
        "no compute profile can run this request: "
        + "; ".join(f"{name}: {why}" for name, why in reasons.items())
        + ". Set device to 'auto' or 'cpu', or run it where a GPU is visible."
    )
