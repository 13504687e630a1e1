"""What Prefect says now about each compute profile: its work pool, workers, active runs and credential blocks.

`observe` feeds `selection.rank_profiles`. It reads, never writes, with a handful of API calls whatever the
number of profiles: one for all pools, one per READY pool (its online workers), one per flow name (deployments),
one page of active flow runs per 200, one per distinct credential block.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkerFilter,
    WorkerFilterStatus,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType, WorkerStatus, WorkPool, WorkPoolStatus
from prefect.exceptions import ObjectNotFound

from infra.compute.selection import PoolState
from infra.compute.store import ComputeProfile

# A training-step run in these states holds one of its profile's slots. Scheduled runs do not: a run waiting for a
# worker is the fallback logic's to cancel, and counting it would also count far-future scheduled runs.
ACTIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]
PAGE = 200  # the server's largest page


def observe(profiles: Iterable[ComputeProfile], client: SyncPrefectClient | None = None) -> dict[str, PoolState]:
    """Each profile's PoolState, read from the Prefect API (PREFECT_API_URL) now."""
    profiles = list(profiles)
    if not profiles:
        return {}
    if client is None:
        with get_client(sync_client=True) as own_client:
            return observe(profiles, own_client)
    pools = _pools(client, {p.work_pool for p in profiles})
    workers = {
        name: _online_workers(client, name)
        for name, pool in pools.items()
        if pool is not None and pool.status == WorkPoolStatus.READY
    }
    deployments = _deployment_ids(client, {p.deployment for p in profiles})
    running = _active_runs(client, [i for i in deployments.values() if i is not None])
    missing = _missing_blocks(client, {slug for p in profiles for slug in p.credential_blocks})

    states: dict[str, PoolState] = {}
    for profile in profiles:
        pool = pools[profile.work_pool]
        online = workers.get(profile.work_pool, 0)
        if pool is None:
            reason = f"work pool {profile.work_pool} does not exist (start a worker: prefect worker start --pool ...)"
        elif pool.is_paused:
            reason = f"pool {profile.work_pool} is paused"
        elif online == 0:
            reason = f"pool {profile.work_pool} has no online worker"
        else:
            reason = ""
        deployment_id = deployments[profile.deployment]
        states[profile.name] = PoolState(
            ready=not reason,
            online_workers=online,
            paused=bool(pool and pool.is_paused),
            running=running[deployment_id] if deployment_id else 0,
            missing_blocks=tuple(slug for slug in profile.credential_blocks if slug in missing),
            reason=reason,
            deployment_missing=deployment_id is None,
        )
    return states


def _pools(client: SyncPrefectClient, names: set[str]) -> dict[str, WorkPool | None]:
    found = client.read_work_pools(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=sorted(names))), limit=len(names), offset=0
    )
    by_name = {pool.name: pool for pool in found}
    return {name: by_name.get(name) for name in names}


def _online_workers(client: SyncPrefectClient, pool: str) -> int:
    online = WorkerFilter(status=WorkerFilterStatus(any_=[WorkerStatus.ONLINE.value]))
    return len(client.read_workers_for_work_pool(pool, worker_filter=online, offset=0, limit=PAGE))


def _deployment_ids(client: SyncPrefectClient, full_names: set[str]) -> dict[str, UUID | None]:
    """'<flow>/<deployment>' -> the deployment's id, or None where it does not exist."""
    by_flow: dict[str, list[str]] = defaultdict(list)
    for full_name in full_names:
        flow, _, deployment = full_name.partition("/")
        by_flow[flow].append(deployment)
    ids: dict[str, UUID | None] = dict.fromkeys(full_names)
    for flow, names in by_flow.items():
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=sorted(names))),
            limit=len(names),
            offset=0,
        )
        for deployment in found:
            ids[f"{flow}/{deployment.name}"] = deployment.id
    return ids


def _active_runs(client: SyncPrefectClient, deployment_ids: list[UUID]) -> Counter[UUID]:
    """Flow runs in ACTIVE_STATES per deployment: one query for all deployments, page by page."""
    counts: Counter[UUID] = Counter()
    if not deployment_ids:
        return counts
    active = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)),
    )
    offset = 0
    while True:
        page = client.read_flow_runs(flow_run_filter=active, limit=PAGE, offset=offset)
        counts.update(run.deployment_id for run in page)
        if len(page) < PAGE:
            return counts
        offset += PAGE


def _missing_blocks(client: SyncPrefectClient, slugs: set[str]) -> set[str]:
    """The '<block type slug>/<block name>' references that name no block document."""
    missing = set()
    for slug in slugs:
        block_type, _, name = slug.partition("/")
        try:
            client.read_block_document_by_name(name, block_type, include_secrets=False)
        except ObjectNotFound:
            missing.add(slug)
    return missing
