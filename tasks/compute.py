"""Stage 2: choose where training runs, and say why."""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.artifacts import create_markdown_artifact

from infra.compute import PROFILES, ComputeDecision
from infra.compute import select_compute as choose


@task
def select_compute(profile_names: list[str], device: str = "auto") -> ComputeDecision:
    profiles = [PROFILES[name] for name in profile_names]
    if device == "cpu":
        profiles = [dataclasses.replace(profile, device="cpu") for profile in profiles]
    decision = choose(profiles, needs_gpu=device == "cuda")
    rows = "\n".join(f"| {name} | {why} |" for name, why in decision.reasons.items())
    create_markdown_artifact(
        f"**Compute: {decision.profile.name} on {decision.device}**\n\n| profile | decision |\n|---|---|\n{rows}\n",
        key="compute-decision",
        description="Why training runs where it runs",
    )
    return decision
