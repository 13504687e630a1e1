"""Ranking compute profiles: eligibility, each strategy's order, a reason for every profile, estimates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from infra.compute.selection import (
    Needs,
    OverBudget,
    PoolState,
    UnsatisfiableRequest,
    estimate_hours,
    rank_profiles,
)
from infra.compute.store import Attempt, ComputeProfile

READY = PoolState(ready=True, online_workers=1, paused=False, running=0)


def profile(name: str, **fields) -> ComputeProfile:
    defaults = dict(work_pool=f"pool-{name}", deployment=f"train-step/{name}", cpu_cores=8, ram_gb=32)
    return ComputeProfile(name=name, **(defaults | fields))


@pytest.fixture
def fleet() -> list[ComputeProfile]:
    return [
        profile("local", cpu_cores=2, ram_gb=16, speed=1, max_concurrent=2, priority=10),
        profile("a10", gpu_count=1, gpu_memory_gb=24, speed=8, priority=20),
        profile("g5", gpu_count=1, gpu_memory_gb=24, speed=9, price_per_hour=1.2, priority=40),
        profile("a100", gpu_count=1, gpu_memory_gb=80, speed=20, price_per_hour=3.2, priority=50),
    ]


def rank(profiles, needs=None, strategy="preferred", preferred=None, budget=None, states=None, hours=1.0):
    needs = needs or Needs()
    states = {p.name: READY for p in profiles} | (states or {})
    return rank_profiles(profiles, states, needs, strategy, preferred, budget, {p.name: hours for p in profiles})


def names(profiles: list[ComputeProfile]) -> list[str]:
    return [p.name for p in profiles]


def test_preferred_follows_the_list_then_priority(fleet):
    ranking = rank(fleet, preferred=["a100", "local"])
    assert names(ranking.candidates) == ["a100", "local", "a10", "g5"]
    assert names(rank(fleet).candidates) == ["local", "a10", "g5", "a100"]  # no list: priority


def test_cheapest_orders_by_estimate_then_speed(fleet):
    ranking = rank(fleet, strategy="cheapest")
    assert names(ranking.candidates) == ["a10", "local", "g5", "a100"]  # both free: the faster first
    assert ranking.estimates_usd == {"local": 0.0, "a10": 0.0, "g5": 1.2, "a100": 3.2}


def test_fastest_orders_by_speed_then_cost(fleet):
    fleet.append(profile("a100-spot", gpu_count=1, gpu_memory_gb=80, speed=20, price_per_hour=1.0, priority=90))
    assert names(rank(fleet, strategy="fastest").candidates) == ["a100-spot", "a100", "g5", "a10", "local"]


def test_queue_ranks_like_preferred_and_keeps_busy_profiles_waiting(fleet):
    busy = {"a100": PoolState(ready=True, online_workers=1, paused=False, running=1)}
    fleet[3].max_concurrent = 1
    ranking = rank(fleet, strategy="queue", preferred=["a100", "a10"], states=busy)
    assert names(ranking.candidates) == ["a10", "local", "g5"]
    assert names(ranking.waiting) == ["a100"]
    assert ranking.reasons["a100"] == "1/1 slots in use"


def test_every_profile_not_chosen_has_its_reason(fleet):
    fleet.append(profile("disabled-one", enabled=False))
    fleet.append(profile("ecs", gpu_count=1, gpu_memory_gb=24, price_per_hour=1.0, priority=60))
    states = {
        "local": PoolState(ready=True, online_workers=1, paused=False, running=2),
        "a10": PoolState(ready=False, online_workers=0, paused=False, running=0),
        "g5": PoolState(ready=False, online_workers=1, paused=True, running=0),
        "ecs": PoolState(True, 1, False, 0, missing_blocks=("aws-credentials/trainyard",)),
    }
    ranking = rank(fleet, needs=Needs(cpu_cores=2), states=states)
    assert names(ranking.candidates) == ["a100"]
    assert set(ranking.reasons) == {p.name for p in fleet}
    assert ranking.reasons["a100"].startswith("eligible: 0/1 slots in use")
    assert ranking.reasons["local"] == "2/2 slots in use"
    assert ranking.reasons["a10"] == "pool pool-a10 has no online worker"
    assert ranking.reasons["g5"] == "pool pool-g5 is paused"
    assert ranking.reasons["ecs"] == "missing credentials block aws-credentials/trainyard"
    assert ranking.reasons["disabled-one"] == "disabled"
    assert names(ranking.waiting) == ["local", "a10", "g5"]  # missing credentials do not come by waiting


def test_resources_and_budget_reasons(fleet):
    ranking = rank(fleet, needs=Needs(gpus=1), budget=2.0)
    assert names(ranking.candidates) == ["a10", "g5"]
    assert ranking.reasons["local"] == "offers 0 GPUs, request needs 1"
    assert ranking.reasons["a100"] == "estimated $3.20 > budget $2.00"


def test_gpu_memory_alone_means_one_gpu_with_that_much(fleet):
    ranking = rank(fleet, needs=Needs(gpu_memory_gb=40))
    assert names(ranking.candidates) == ["a100"]
    assert ranking.reasons["local"] == "offers 0 GPUs, request needs 1"
    assert ranking.reasons["a10"] == "offers 24 GB per GPU, request needs 40 GB"


def test_an_unsatisfiable_request_is_refused_at_once_with_every_reason(fleet):
    with pytest.raises(UnsatisfiableRequest) as error:
        rank(fleet, needs=Needs(gpus=2, cpu_cores=4))
    message = str(error.value)
    assert "local: offers 0 GPUs, request needs 2" in message
    assert "a100: offers 1 GPUs, request needs 2" in message
    with pytest.raises(UnsatisfiableRequest, match="local: offers 16 GB RAM, request needs 64 GB"):
        rank(fleet[:1], needs=Needs(ram_gb=64))
    with pytest.raises(UnsatisfiableRequest, match="a10: disabled"):  # disabled profiles do not count
        rank([profile("a10", gpu_count=1, enabled=False)], needs=Needs(gpus=1))


def test_over_budget_names_the_cheapest_estimate_and_the_fix(fleet):
    with pytest.raises(OverBudget) as error:
        rank(fleet, needs=Needs(gpu_memory_gb=40), budget=1.0, hours=2.0)
    message = str(error.value)
    assert "a100" in message and "$6.40" in message and "$1.00" in message and "budget_usd" in message


def test_unknown_preferred_names_and_strategies_are_refused(fleet):
    with pytest.raises(ValueError, match="nope"):
        rank(fleet, preferred=["local", "nope"])
    with pytest.raises(ValueError, match="strategy"):
        rank(fleet, strategy="random")


def test_an_unobserved_or_missing_pool_waits_with_its_reason(fleet):
    states = {"a10": PoolState(False, 0, False, 0, reason="work pool pool-a10 does not exist")}
    ranking = rank_profiles(fleet, states, Needs(gpus=1), "preferred", None, None, dict.fromkeys(names(fleet), 1.0))
    assert ranking.reasons["a10"] == "work pool pool-a10 does not exist"
    assert ranking.reasons["g5"] == "pool pool-g5 was not observed"
    assert ranking.candidates == [] and names(ranking.waiting) == ["a10", "g5", "a100"]


def attempt(profile_name: str, minutes: float, outcome="completed", trainer="yolo", dataset="v1") -> Attempt:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return Attempt(
        request_id="r",
        profile=profile_name,
        trainer=trainer,
        dataset_version=dataset,
        started_at=start,
        ended_at=start + timedelta(minutes=minutes),
        outcome=outcome,
    )


def test_estimate_hours_from_the_ledger_converts_by_speed(fleet):
    ledger = [
        attempt("a10", 60),  # 8 h at speed 1
        attempt("a100", 30),  # 10 h at speed 1
        attempt("local", 720),  # 12 h at speed 1
        attempt("local", 1, outcome="failed"),
        attempt("local", 1, trainer="torch"),
        attempt("local", 1, dataset="v2"),
        attempt("removed-profile", 1),
    ]
    hours = estimate_hours(ledger, fleet, "yolo", "v1", default_hours=1.0)
    assert hours["local"] == pytest.approx(10.0)  # the median at speed 1
    assert hours["a100"] == pytest.approx(0.5)
    assert hours["g5"] == pytest.approx(10 / 9)


def test_estimate_hours_without_history_uses_the_default_per_speed(fleet):
    hours = estimate_hours([attempt("a10", 60, trainer="torch")], fleet, "yolo", "v1", default_hours=2.0)
    assert hours == {"local": 2.0, "a10": 0.25, "g5": pytest.approx(2 / 9), "a100": 0.1}
