"""Create or update every enabled compute profile's work pool and its training-step deployment, from the store.

    python -m infra.stack.apply [--url STORE_URL] [--only NAME ...] [--include-disabled] [--image [PROFILE=]IMAGE ...]

Idempotent: each pool and deployment is reported as created, updated or unchanged; a second run changes nothing.
Pools get `work_pools.base_job_template(profile)`; defaults their owner set on other variables (an ECS cluster,
a Kubernetes namespace) are kept. The deployment "train-step/<profile>" runs flows/train_step.py:train_step on the
pool: from the host's checkout ($TRAINYARD_ROOT on the worker) for process pools, from the image for the others.

Image of a container profile: --image PROFILE=IMAGE, else $TRAINYARD_IMAGE_<PROFILE> (upper case, - as _),
else --image IMAGE, else $TRAINYARD_IMAGE, else trainyard-train:latest.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_arguments_from_entrypoint
from prefect.utilities.callables import parameter_schema_from_entrypoint

from infra.compute.store import ComputeProfile, Store
from infra.settings import ROOT
from infra.stack.work_pools import IMAGE_WORKDIR, WORKER_TYPES, PoolSettings, base_job_template, keep_owner_defaults

ENTRYPOINT = "flows/train_step.py:train_step"
DEFAULT_IMAGE = "trainyard-train:latest"
# As in prefect.yaml: the worker's environment says where the code is on that host.
PROCESS_PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TRAINYARD_ROOT }}"}}]


class ApplyError(RuntimeError):
    pass


@dataclass(frozen=True)
class Change:
    kind: str  # "pool" or "deployment"
    name: str
    outcome: str  # "created", "updated" or "unchanged"

    def __str__(self) -> str:
        return f"  {self.kind:10} {self.name:40} {self.outcome}"


def image_for(profile: ComputeProfile, images: dict[str, str] | None = None) -> str:
    """The training image of a container profile (see the module docstring for the order)."""
    images = images or {}
    variable = "TRAINYARD_IMAGE_" + re.sub(r"[^A-Z0-9]", "_", profile.name.upper())
    return (
        images.get(profile.name)
        or os.environ.get(variable)
        or images.get("")
        or os.environ.get("TRAINYARD_IMAGE")
        or DEFAULT_IMAGE
    )


def _normal(value: Any) -> Any:
    """What the server gives back for a value we send: JSON types, so comparisons see only real changes."""
    return json.loads(json.dumps(value))


@functools.cache
def training_step() -> tuple[str, dict[str, Any]]:
    """The training-step flow's name and parameter schema, read from its source (no import of torch and friends)."""
    entrypoint = f"{ROOT / ENTRYPOINT.partition(':')[0]}:{ENTRYPOINT.partition(':')[2]}"
    name = load_flow_arguments_from_entrypoint(entrypoint, {"name"})["name"]
    return name, parameter_schema_from_entrypoint(entrypoint).model_dump(exclude_unset=True)


def deployment_fields(profile: ComputeProfile, images: dict[str, str] | None = None) -> dict[str, Any]:
    """The training-step deployment of a profile, as DeploymentUpdate fields."""
    container = profile.kind != "process"
    gpus = f"{profile.gpu_count}x {profile.gpu_type or 'GPU'}" if profile.gpu_count else "no GPU"
    return {
        "description": f"Training step on compute profile {profile.name} ({profile.kind}, {gpus}).",
        "work_pool_name": profile.work_pool,
        "entrypoint": ENTRYPOINT,
        # Code baked into the image at IMAGE_WORKDIR; a process worker changes into its host's checkout instead.
        "path": IMAGE_WORKDIR if container else None,
        "pull_steps": [] if container else PROCESS_PULL_STEPS,
        "job_variables": {"image": image_for(profile, images)} if container else {},
        "parameter_openapi_schema": training_step()[1],
        "enforce_parameter_schema": True,
        "tags": ["train-step", profile.kind],
    }


async def _credential_blocks(client: PrefectClient, profiles: list[ComputeProfile]) -> tuple[dict[str, str], list[str]]:
    """Block document ids of the profiles' credential blocks that exist, and a note for each that does not."""
    found: dict[str, str] = {}
    notes: list[str] = []
    for slug_name in sorted({block for profile in profiles for block in profile.credential_blocks or []}):
        slug, _, name = slug_name.partition("/")
        try:
            found[slug_name] = str((await client.read_block_document_by_name(name, slug)).id)
        except ObjectNotFound:
            notes.append(f"credential block {slug_name} not found: the pool's worker uses its own credentials")
    return found, notes


async def _apply_pool(client: PrefectClient, pool: str, kind: str, desired: dict[str, Any], description: str) -> Change:
    try:
        existing = await client.read_work_pool(pool)
    except ObjectNotFound:
        await client.create_work_pool(
            WorkPoolCreate(name=pool, type=WORKER_TYPES[kind], base_job_template=desired, description=description)
        )
        return Change("pool", pool, "created")
    if existing.type != WORKER_TYPES[kind]:
        raise ApplyError(
            f"work pool {pool!r} is of type {existing.type!r} but its profile is {kind!r}: a pool cannot change type; "
            f"delete it (prefect work-pool delete {pool}) or point the profile at another pool"
        )
    desired = _normal(keep_owner_defaults(desired, existing.base_job_template, kind))
    if desired == _normal(existing.base_job_template) and (existing.description or "") == description:
        return Change("pool", pool, "unchanged")
    await client.update_work_pool(pool, WorkPoolUpdate(base_job_template=desired, description=description))
    return Change("pool", pool, "updated")


async def _apply_deployment(client: PrefectClient, profile: ComputeProfile, fields: dict[str, Any]) -> Change:
    flow_name = training_step()[0]
    wanted_flow, _, name = (profile.deployment or f"{flow_name}/{profile.name}").partition("/")
    if wanted_flow != flow_name or not name:
        raise ApplyError(
            f"profile {profile.name!r} names deployment {profile.deployment!r}; the training step on its pool is "
            f"{flow_name}/<name> ({ENTRYPOINT})"
        )
    try:
        existing = await client.read_deployment_by_name(f"{flow_name}/{name}")
    except ObjectNotFound:
        flow_id = await client.create_flow_from_name(flow_name)
        await client.create_deployment(flow_id=flow_id, name=name, **fields)
        return Change("deployment", f"{flow_name}/{name}", "created")
    current = {key: getattr(existing, key) for key in fields}
    if _normal(current) == _normal(fields):
        return Change("deployment", f"{flow_name}/{name}", "unchanged")
    await client.update_deployment(existing.id, DeploymentUpdate(**fields))
    return Change("deployment", f"{flow_name}/{name}", "updated")


async def apply_profiles(
    profiles: list[ComputeProfile],
    images: dict[str, str] | None = None,
    notes: list[str] | None = None,
    report: Callable[[Change], None] | None = None,
) -> list[Change]:
    """Create or update the pools and deployments of these profiles on the Prefect API in the environment.

    `report` sees each change as it is made (so a failure part-way still shows what was done); `notes` collects
    what the caller should know (missing credential blocks)."""
    notes = notes if notes is not None else []
    changes: list[Change] = []

    def done(change: Change) -> None:
        changes.append(change)
        if report:
            report(change)

    async with get_client() as client:
        blocks, block_notes = await _credential_blocks(client, profiles)
        notes.extend(block_notes)
        settings = PoolSettings.from_env(blocks)
        pools: dict[str, tuple[ComputeProfile, dict[str, Any]]] = {}
        for profile in profiles:
            template = base_job_template(profile, settings)
            if profile.work_pool in pools and pools[profile.work_pool][1] != template:
                other = pools[profile.work_pool][0]
                raise ApplyError(
                    f"profiles {other.name!r} and {profile.name!r} share work pool {profile.work_pool!r} but need "
                    "different job templates (kind, GPUs, CPU or memory): give one of them its own pool"
                )
            pools.setdefault(profile.work_pool, (profile, template))
        for pool, (profile, template) in pools.items():
            names = ", ".join(p.name for p in profiles if p.work_pool == pool)
            description = (
                f"Trainyard compute profile {names} ({profile.kind}); template from python -m infra.stack.apply"
            )
            done(await _apply_pool(client, pool, profile.kind, template, description))
        for profile in profiles:
            done(await _apply_deployment(client, profile, deployment_fields(profile, images)))
    return changes


def select_profiles(
    store: Store, only: list[str] | None = None, include_disabled: bool = False
) -> tuple[list[ComputeProfile], list[str]]:
    """The profiles to apply, and a note for each disabled one left out."""
    profiles = store.profiles()
    if only:
        unknown = sorted(set(only) - {p.name for p in profiles})
        if unknown:
            raise ApplyError(f"no profile named {', '.join(unknown)} in the store ({store.url})")
        profiles = [p for p in profiles if p.name in only]
    if include_disabled:
        return profiles, []
    skipped = [p.name for p in profiles if not p.enabled]
    notes = [f"profile {name} is disabled: skipped (--include-disabled applies it)" for name in skipped]
    return [p for p in profiles if p.enabled], notes


def _parse_images(values: list[str]) -> dict[str, str]:
    images: dict[str, str] = {}
    for value in values:
        name, sep, image = value.partition("=")
        # "registry:5000/img:tag" has no "=", so a "=" always separates a profile name
        images[name if sep else ""] = image if sep else value
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="platform store URL (default TRAINYARD_STORE_URL, else the local SQLite store)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="apply these profiles only")
    parser.add_argument("--include-disabled", action="store_true", help="apply disabled profiles too")
    parser.add_argument(
        "--image", action="append", default=[], metavar="[PROFILE=]IMAGE", help="training image (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        profiles, notes = select_profiles(Store(args.url), args.only, args.include_disabled)
        asyncio.run(apply_profiles(profiles, _parse_images(args.image), notes, report=print))
    except ApplyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"  note: {note}")
    if not profiles:
        print("  nothing to apply: no enabled profile (python -m infra.compute.profiles, or --include-disabled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
