"""observe() against the test session's real Prefect server: pools, workers, pauses, active runs, credential blocks."""

from __future__ import annotations

from infra.compute.store import ComputeProfile


def make_pool(client, name: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def profile(name: str, pool: str, deployment: str | None = None, **fields) -> ComputeProfile:
    return ComputeProfile(name=name, work_pool=pool, deployment=deployment or f"ty-test-flow/{name}", **fields)


def test_a_missing_pool_and_a_pool_without_worker_are_not_ready(client, unique):
    from infra.compute.pool_health import observe

    make_pool(client, unique)
    states = observe([profile("idle", unique), profile("ghost", f"{unique}-missing")], client)
    assert not states["idle"].ready and states["idle"].online_workers == 0 and not states["idle"].paused
    assert "no online worker" in states["idle"].reason
    assert not states["ghost"].ready and "does not exist" in states["ghost"].reason
    assert states["idle"].deployment_missing and states["idle"].running == 0


def test_a_worker_heartbeat_makes_the_pool_ready_and_pausing_it_does_not(client, unique):
    from prefect.client.schemas.actions import WorkPoolUpdate

    from infra.compute.pool_health import observe

    make_pool(client, unique)
    client.send_worker_heartbeat(unique, f"{unique}-worker", heartbeat_interval_seconds=30)
    state = observe([profile("p", unique)], client)["p"]
    assert state.ready and state.online_workers == 1 and state.reason == ""

    client.update_work_pool(unique, WorkPoolUpdate(is_paused=True))
    state = observe([profile("p", unique)], client)["p"]
    assert not state.ready and state.paused and "paused" in state.reason


def test_active_runs_of_the_profile_deployment_are_counted(client, unique):
    from prefect.states import Cancelled, Running, Scheduled

    from infra.compute.pool_health import observe

    make_pool(client, unique)
    flow_id = client.create_flow_from_name(f"{unique}-flow")
    deployment_id = client.create_deployment(flow_id=flow_id, name="gpu", work_pool_name=unique)
    other_id = client.create_deployment(flow_id=flow_id, name="other", work_pool_name=unique)
    for deployment, state in [(deployment_id, Running()), (deployment_id, Running()), (deployment_id, Cancelled())]:
        run = client.create_flow_run_from_deployment(deployment, state=Scheduled())
        client.set_flow_run_state(run.id, state, force=True)
    run = client.create_flow_run_from_deployment(other_id, state=Scheduled())
    client.set_flow_run_state(run.id, Running(), force=True)

    states = observe([profile("gpu", unique, f"{unique}-flow/gpu"), profile("other", unique, f"{unique}-flow/other")])
    assert (states["gpu"].running, states["other"].running) == (2, 1)
    assert not states["gpu"].deployment_missing


def test_credential_blocks_are_checked_by_type_slug_and_name(client, unique):
    from prefect.blocks.system import Secret

    from infra.compute.pool_health import observe

    Secret(value="x").save("trainyard-test", overwrite=True)
    blocks = ["secret/trainyard-test", f"aws-credentials/{unique}", f"secret/{unique}"]
    state = observe([profile("cloud", unique, credential_blocks=blocks)], client)["cloud"]
    assert state.missing_blocks == (f"aws-credentials/{unique}", f"secret/{unique}")
