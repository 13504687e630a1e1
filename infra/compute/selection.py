"""Which compute profile runs a training request: eligibility, strategy order, cost estimates.

Pure logic: profiles, observed pool states and the request's needs in; a ranking with a reason for every profile out.
No Prefect, no I/O: `infra.compute.pool_health.observe` gathers the states, the train flow acts on the ranking.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, get_args

from infra.compute.store import Attempt, ComputeProfile

Strategy = Literal["preferred", "cheapest", "fastest", "queue"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@dataclass(frozen=True)
class Needs:
    """What one training request needs. A request may give per-GPU memory instead of a GPU count (then: 1 GPU)."""

    gpus: int = 0
    gpu_memory_gb: float = 0.0  # per GPU
    cpu_cores: int = 1
    ram_gb: float = 0.0

    @property
    def gpu_count(self) -> int:
        return self.gpus if self.gpus > 0 else (1 if self.gpu_memory_gb > 0 else 0)


@dataclass(frozen=True)
class PoolState:
    """A profile's work pool and deployment as observed now (see infra.compute.pool_health.observe)."""

    ready: bool  # the pool exists, is not paused and has at least one online worker
    online_workers: int
    paused: bool
    running: int  # this profile's active training-step runs
    missing_blocks: tuple[str, ...] = ()  # credential blocks ("<type-slug>/<name>") that do not exist
    reason: str = ""  # why the pool is not ready, when the observer knows better than "no online worker"
    deployment_missing: bool = False  # the profile's training-step deployment does not exist


class UnsatisfiableRequest(ValueError):
    """No enabled profile could ever run the request: it needs more than any of them has."""


class OverBudget(ValueError):
    """Even the cheapest profile that fits the request is estimated above its budget."""


@dataclass
class Ranking:
    candidates: list[ComputeProfile]  # eligible now, in strategy order
    waiting: list[ComputeProfile]  # fit the needs and budget, not eligible now (no worker / full / paused)
    reasons: dict[str, str]  # every profile: "eligible: ..." or why not
    estimates_usd: dict[str, float] = field(default_factory=dict)
    estimated_hours: dict[str, float] = field(default_factory=dict)
    observed_at: float = field(default_factory=time.monotonic)  # when the pools were observed for this ranking

    @property
    def chosen(self) -> ComputeProfile | None:
        return self.candidates[0] if self.candidates else None


def fit_problem(profile: ComputeProfile, needs: Needs) -> str | None:
    """Why the profile can never run a request with these needs, or None when it offers enough."""
    if profile.gpu_count < needs.gpu_count:
        return f"offers {profile.gpu_count} GPUs, request needs {needs.gpu_count}"
    if needs.gpu_memory_gb > 0 and profile.gpu_memory_gb < needs.gpu_memory_gb:
        return f"offers {profile.gpu_memory_gb:g} GB per GPU, request needs {needs.gpu_memory_gb:g} GB"
    if profile.cpu_cores < needs.cpu_cores:
        return f"offers {profile.cpu_cores} CPU cores, request needs {needs.cpu_cores}"
    if profile.ram_gb < needs.ram_gb:
        return f"offers {profile.ram_gb:g} GB RAM, request needs {needs.ram_gb:g} GB"
    return None


def _not_now(profile: ComputeProfile, state: PoolState | None) -> tuple[str | None, bool]:
    """(why the profile cannot run right now, whether waiting could fix it) or (None, False) when it can."""
    if state is None:
        return f"pool {profile.work_pool} was not observed", True
    if state.missing_blocks:
        return "missing credentials block " + ", ".join(state.missing_blocks), False
    if state.deployment_missing:
        return f"deployment {profile.deployment} does not exist (deploy it to pool {profile.work_pool})", False
    if state.paused:
        return f"pool {profile.work_pool} is paused", True
    if not state.ready or state.online_workers < 1:
        return state.reason or f"pool {profile.work_pool} has no online worker", True
    if state.running >= profile.max_concurrent:
        return f"{state.running}/{profile.max_concurrent} slots in use", True
    return None, False


def _order(
    profiles: list[ComputeProfile], strategy: Strategy, preferred: list[str] | None, estimates: dict[str, float]
) -> list[ComputeProfile]:
    if strategy in ("preferred", "queue"):
        position = {name: i for i, name in enumerate(preferred or [])}
        return sorted(profiles, key=lambda p: (position.get(p.name, len(position)), p.priority, p.name))
    if strategy == "cheapest":
        return sorted(profiles, key=lambda p: (estimates[p.name], -p.speed, p.priority, p.name))
    return sorted(profiles, key=lambda p: (-p.speed, estimates[p.name], p.priority, p.name))


def _money(value: float) -> str:
    return f"${value:,.2f}"


def rank_profiles(
    profiles: list[ComputeProfile],
    states: dict[str, PoolState],
    needs: Needs,
    strategy: Strategy,
    preferred: list[str] | None,
    budget_usd: float | None,
    estimated_hours: dict[str, float],
) -> Ranking:
    """Rank the profiles for one request; every profile gets a one-line reason.

    Eligible now: enabled; fits the needs (GPU count, per-GPU memory, CPU, RAM); estimate (price_per_hour * hours)
    within the budget; credential blocks exist; deployment exists; pool ready (an online worker, not paused);
    a free concurrency slot (running < max_concurrent).

    Strategies order the candidates (and the waiting list the same way):
      preferred: the `preferred` list's order, then the other profiles by priority (lower first).
      cheapest:  estimated cost ascending; ties by speed (faster first), then priority.
      fastest:   speed descending; ties by estimated cost (cheaper first), then priority.
      queue:     ordered as preferred. The caller waits for the first preferred profile (it may be in `waiting`)
                 instead of falling back at once; this function only ranks.

    Raises ValueError for an unknown strategy or unknown names in `preferred`; UnsatisfiableRequest when no enabled
    profile could ever fit the needs; OverBudget when the cheapest profile that fits is estimated above the budget.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    names = {p.name for p in profiles}
    unknown = [name for name in preferred or [] if name not in names]
    if unknown:
        raise ValueError(f"unknown compute profile(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    missing_hours = [p.name for p in profiles if p.enabled and p.name not in estimated_hours]
    if missing_hours:
        raise ValueError(f"no estimated hours for profile(s) {', '.join(missing_hours)}")

    hours = {p.name: estimated_hours[p.name] for p in profiles if p.name in estimated_hours}
    estimates = {p.name: round(p.price_per_hour * hours[p.name], 4) for p in profiles if p.name in hours}
    reasons: dict[str, str] = {}

    fitting: list[ComputeProfile] = []
    for profile in profiles:
        if not profile.enabled:
            reasons[profile.name] = "disabled"
        elif problem := fit_problem(profile, needs):
            reasons[profile.name] = problem
        else:
            fitting.append(profile)
    if not fitting:
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "there are no compute profiles"
        hint = "Ask for fewer resources, or add/enable a profile that has them (python -m infra.compute.profiles)."
        raise UnsatisfiableRequest(f"no enabled compute profile can ever satisfy {needs}: {detail}. {hint}")

    cheapest = min(fitting, key=lambda p: (estimates[p.name], -p.speed, p.priority, p.name))
    if budget_usd is not None and estimates[cheapest.name] > budget_usd:
        raise OverBudget(
            f"over budget: the cheapest profile that fits, {cheapest.name}, is estimated at "
            f"{_money(estimates[cheapest.name])} ({hours[cheapest.name]:.2f} h at {_money(cheapest.price_per_hour)}/h) "
            f"> budget {_money(budget_usd)}. Raise budget_usd or train fewer epochs."
        )

    candidates: list[ComputeProfile] = []
    waiting: list[ComputeProfile] = []
    for profile in fitting:
        cost = estimates[profile.name]
        if budget_usd is not None and cost > budget_usd:
            reasons[profile.name] = f"estimated {_money(cost)} > budget {_money(budget_usd)}"
            continue
        state = states.get(profile.name)
        why, can_wait = _not_now(profile, state)
        if why is None:
            candidates.append(profile)
            reasons[profile.name] = (
                f"eligible: {state.running}/{profile.max_concurrent} slots in use, "
                f"{state.online_workers} online worker(s), est. {hours[profile.name]:.2f} h, {_money(cost)}"
            )
        else:
            reasons[profile.name] = why
            if can_wait:
                waiting.append(profile)

    return Ranking(
        candidates=_order(candidates, strategy, preferred, estimates),
        waiting=_order(waiting, strategy, preferred, estimates),
        reasons=reasons,
        estimates_usd=estimates,
        estimated_hours=hours,
    )


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def estimate_hours(
    store_attempts: Iterable[Attempt],
    profiles: list[ComputeProfile],
    trainer: str,
    dataset_version: str,
    default_hours: float,
) -> dict[str, float]:
    """Expected training hours on each profile.

    From earlier completed attempts of the same trainer and dataset version: each duration is brought to speed 1.0
    (hours * speed of the profile it ran on), the median taken, then divided by each profile's speed.
    Without such history: default_hours (declared for speed 1.0) / speed.
    """
    speeds = {p.name: p.speed for p in profiles}
    base_hours = [
        (_utc(a.ended_at) - _utc(a.started_at)).total_seconds() / 3600 * speeds[a.profile]
        for a in store_attempts
        if a.outcome == "completed"
        and a.trainer == trainer
        and a.dataset_version == dataset_version
        and a.ended_at is not None
        and speeds.get(a.profile, 0) > 0
    ]
    base = statistics.median(base_hours) if base_hours else default_hours
    return {p.name: base / p.speed for p in profiles if p.speed > 0}
