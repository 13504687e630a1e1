"""Stage 2: choose where training runs, and say why for every profile."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from infra.compute.pool_health import observe
from infra.compute.profiles import seed_profiles
from infra.compute.selection import Needs, PoolState, Ranking, estimate_hours, rank_profiles
from infra.compute.store import ComputeProfile, Store
from infra.settings import ROOT, get_settings

SEED_PROFILES = ROOT / "infra" / "profiles.yaml"


class NoComputeNow(RuntimeError):
    """No profile can run the request now (none has a worker, a free slot, ...); each profile's reason is given."""

    def __init__(self, ranking: Ranking) -> None:
        why = "; ".join(f"{name}: {reason}" for name, reason in ranking.reasons.items())
        super().__init__(
            f"no compute profile can run this training now ({why}). Start a worker for one of them, wait and "
            "retry, or use strategy 'queue' to wait for capacity"
        )


def needs_of(request) -> Needs:
    options = request.compute
    gpus = max(options.gpus, 1 if request.device == "cuda" else 0)
    return Needs(gpus=gpus, gpu_memory_gb=options.gpu_memory_gb, cpu_cores=options.cpu_cores, ram_gb=options.ram_gb)


def current_work_pool() -> str | None:
    """The work pool this flow run was started on (None outside a deployment: a script, a notebook, a test)."""
    if flow_run.id is None or deployment.id is None:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id).work_pool_name


def runs_here(profile: ComputeProfile, current_pool: str | None) -> bool:
    """The profile is where this flow already runs: train in this process instead of starting another one."""
    if profile.kind != "process":
        return False
    return profile.work_pool == (current_pool or get_settings().work_pool)


def rank(request, dataset_version: str, store: Store) -> Ranking:
    """Observe every profile's pool now and rank them; raises at once if nothing could ever run the request."""
    options = request.compute
    profiles = _requested(store.profiles(), options.profiles)
    hours = estimate_hours(store.attempts(), profiles, request.trainer, dataset_version, options.default_hours)
    states = observe(profiles)
    here = current_work_pool()
    for profile in profiles:
        if runs_here(profile, here):  # this process is the worker: no pool, worker or deployment needed
            states[profile.name] = _here(states.get(profile.name))
    return rank_profiles(
        profiles,
        states,
        needs_of(request),
        options.strategy,
        options.profiles or None,
        options.budget_usd,
        hours,
    )


@task
def select_compute(request, dataset_version: str) -> Ranking:
    store = Store.shared()
    if not store.profiles():  # first use: the seed file; afterwards the store is the user's to edit
        seed_profiles(store, SEED_PROFILES)
    ranking = rank(request, dataset_version, store)
    chosen = ranking.candidates[0].name if ranking.candidates else None
    queueing = request.compute.strategy == "queue" and ranking.waiting
    rows = "\n".join(
        f"| {name} | {'**' if name == chosen else ''}{why}{'**' if name == chosen else ''} | "
        f"{_money(ranking.estimates_usd.get(name))} |"
        for name, why in ranking.reasons.items()
    )
    headline = f"Compute: **{chosen}** first" if chosen else "Compute: no profile is free now"
    order = ", ".join(p.name for p in ranking.candidates) or "none"
    create_markdown_artifact(
        f"{headline} (strategy {request.compute.strategy}; order: {order})\n\n"
        f"| profile | decision | estimate |\n|---|---|---|\n{rows}\n",
        key="compute-decision",
        description="Where training runs and why",
    )
    if chosen is None and not queueing:
        raise NoComputeNow(ranking)  # before the MLflow run exists: nothing was tried, nothing to record
    return ranking


def _requested(profiles: list[ComputeProfile], names: list[str]) -> list[ComputeProfile]:
    """The profiles the request names (primary, then fallbacks), or every profile when it names none."""
    if not names:
        return profiles
    known = {profile.name for profile in profiles}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown compute profile(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
            "(see `python -m infra.compute.profiles list`)"
        )
    return [profile for profile in profiles if profile.name in names]


def _here(observed: PoolState | None) -> PoolState:
    running = observed.running if observed else 0
    return PoolState(ready=True, online_workers=1, paused=False, running=running, reason="this flow runs here")


def _money(value: float | None) -> str:
    return "" if value is None else f"${value:.2f}"
