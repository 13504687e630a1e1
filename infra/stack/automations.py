"""Automations Trainyard's setup creates on the Prefect server.

Zombie runs: a flow run whose host or worker died stays Running for ever. Heartbeats say a run lives: its launcher
sends one every 10 s for as long as the run's process lives (infra/runs/liveness.py), and Prefect's engine one every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30, set for the worker by the stack; the only ones of container pools).
This automation marks a run Crashed when they stop for ZOMBIE_AFTER, so fallback and cleanup can act on it, once
infra/runs/fencing.py has made sure its process is gone. A paused (Suspended) run has no process and sends none: it is
not a zombie.
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_AFTER = timedelta(seconds=60)  # two missed heartbeats
ZOMBIE_AUTOMATION = "trainyard: mark zombie flow runs Crashed"
# After a heartbeat, any of these within ZOMBIE_AFTER means the run is alive or has ended on purpose.
ALIVE_OR_ENDED = {
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Suspended",  # paused by the user: the process left on purpose
    "prefect.flow-run.Paused",
    "trainyard.flow-run.paused",  # tasks.control_watch.PAUSED_EVENT: sent as a paused run's process leaves
    "trainyard.flow-run.exited",  # infra.runs.liveness.EXITED: its launcher saw the process end
    "trainyard.flow-run.fenced",  # infra.runs.liveness.FENCED: its launcher killed it after a Crashed verdict
}


def ensure_zombie_automation() -> bool:
    """Create the automation if it is missing; True when it was created."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        if set(existing.trigger.expect) == ALIVE_OR_ENDED:
            return False
        existing.delete()  # created by an older Trainyard: replace it
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="Flow runs whose heartbeats stopped (host or worker lost) end Crashed instead of Running.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=ALIVE_OR_ENDED,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=ZOMBIE_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {ZOMBIE_AFTER.seconds} s: its host or worker was lost.",
            )
        ],
    ).create()
    return True
