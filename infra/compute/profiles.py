"""Compute profiles in the platform store: validation, the YAML seed, and the command line.

    python -m infra.compute.profiles list
    python -m infra.compute.profiles show local
    python -m infra.compute.profiles add gpu-box --kind process --work-pool gpu-box --gpu-count 1 \
        --gpu-memory-gb 24 --speed 8
    python -m infra.compute.profiles set gpu-box price_per_hour=0.5 enabled=true credential_blocks=secret/gpu-box
    python -m infra.compute.profiles remove gpu-box
    python -m infra.compute.profiles seed [--file infra/profiles.yaml]
    python -m infra.compute.profiles attempts [--request ID]

`--url` (before the command) overrides TRAINYARD_STORE_URL. Errors exit with status 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from infra.compute.store import Attempt, ComputeProfile, ProfileKind, Store, store_url
from infra.settings import ROOT

SEED_FILE = ROOT / "infra" / "profiles.yaml"
KINDS: tuple[str, ...] = get_args(ProfileKind)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BLOCK_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*/[^/\s]+$")  # "<block type slug>/<block name>"

# Every ComputeProfile field but the name: its type, as the YAML seed and the command line give it.
FIELD_TYPES: dict[str, str] = {
    "kind": "str",
    "work_pool": "str",
    "deployment": "str",
    "gpu_type": "str?",
    "gpu_count": "int",
    "gpu_memory_gb": "float",
    "cpu_cores": "int",
    "ram_gb": "float",
    "price_per_hour": "float",
    "speed": "float",
    "max_concurrent": "int",
    "priority": "int",
    "credential_blocks": "list",
    "enabled": "bool",
}
MINIMUM: dict[str, float] = {"gpu_count": 0, "gpu_memory_gb": 0, "cpu_cores": 1, "ram_gb": 0, "price_per_hour": 0}
MINIMUM |= {"max_concurrent": 1, "priority": 0}
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class ProfileError(ValueError):
    """A profile entry, field or value that is not valid; the message names the profile and the field."""


def default_deployment(name: str) -> str:
    return f"train-step/{name}"


def _check_field(profile: str, field: str, value: object) -> object:
    """The value, when it has the field's type and range; ProfileError naming the profile and field otherwise."""
    kind = FIELD_TYPES[field]

    def bad(expected: str) -> ProfileError:
        return ProfileError(f"profile {profile!r}: field {field!r} must be {expected}, got {value!r}")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if not math.isfinite(value):  # nan passes every comparison below, inf breaks cost estimates
            raise bad("a finite number")
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "list":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise bad("a list of block slugs like 'aws-credentials/NAME'")
        malformed = [item for item in value if not BLOCK_PATTERN.match(item)]
        if malformed:
            raise bad("a list of block slugs like 'aws-credentials/NAME' (<block type slug>/<block name>)")
    elif kind == "str?":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise bad("a non-empty string or null")
    elif not isinstance(value, str) or not value.strip():
        raise bad("a non-empty string")

    if field in MINIMUM and value < MINIMUM[field]:
        raise bad(f"at least {MINIMUM[field]:g}")
    if field == "speed" and value <= 0:
        raise bad("greater than 0 (relative throughput; this machine's CPU is 1.0)")
    if field == "kind" and value not in KINDS:
        raise bad(f"one of {', '.join(KINDS)}")
    if field == "deployment" and value.count("/") != 1:
        raise bad("'<flow name>/<deployment name>', e.g. 'train-step/NAME'")
    return value


def validate_profile(name: str, values: Mapping[str, object]) -> ComputeProfile:
    """A ComputeProfile from typed values (a YAML entry, or a profile's fields after an edit); ProfileError if bad."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ProfileError(f"profile name {name!r} must be letters, digits, '.', '_' or '-' (starting alphanumeric)")
    if not isinstance(values, Mapping):
        raise ProfileError(f"profile {name!r}: expected a mapping of fields, got {values!r}")
    unknown = sorted(set(values) - set(FIELD_TYPES) - {"name"})
    if unknown:
        raise ProfileError(
            f"profile {name!r}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELD_TYPES)}"
        )
    if "name" in values and values["name"] != name:
        raise ProfileError(f"profile {name!r}: field 'name' is {values['name']!r}; a profile cannot be renamed")
    if values.get("work_pool") is None:
        raise ProfileError(f"profile {name!r}: field 'work_pool' is required (the Prefect work pool it runs on)")
    checked = {field: _check_field(name, field, value) for field, value in values.items() if field != "name"}
    checked.setdefault("deployment", default_deployment(name))
    return ComputeProfile(name=name, **checked)


def parse_value(profile: str, field: str, text: str) -> object:
    """A command-line string as the field's type: 'true', '3', '2.5', 'a/x,b/y', 'none'; ProfileError if it is not."""
    if field not in FIELD_TYPES:
        if field == "name":
            raise ProfileError(
                f"profile {profile!r}: field 'name' cannot be set; add a new profile and remove this one"
            )
        raise ProfileError(f"profile {profile!r}: unknown field {field!r}; known: {', '.join(FIELD_TYPES)}")
    kind, raw = FIELD_TYPES[field], text.strip()

    def bad(expected: str) -> ProfileError:
        return ProfileError(f"profile {profile!r}: field {field!r} must be {expected}, got {text!r}")

    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if kind == "bool":
        if raw.lower() in TRUE | FALSE:
            return raw.lower() in TRUE
        raise bad("true or false")
    if kind == "list":
        raw = raw.removeprefix("[").removesuffix("]")
        return [item.strip().strip("'\"") for item in raw.split(",") if item.strip()]
    if kind == "str?" and raw.lower() in {"", "none", "null"}:
        return None
    return raw


def profile_fields(profile: ComputeProfile) -> dict[str, object]:
    return {field: getattr(profile, field) for field in FIELD_TYPES}


# --- the YAML seed ------------------------------------------------------------------------------------------------


def load_seed(path: str | os.PathLike) -> list[ComputeProfile]:
    """Every profile of a seed file, validated (all of them, before any is used)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ProfileError(f"cannot read the profile seed {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ProfileError(f"the profile seed {path} is not valid YAML{where}: {problem}; fix it there") from None
    entries = document.get("profiles") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ProfileError(f"the profile seed {path} must have a 'profiles:' mapping of name -> fields")
    return [validate_profile(str(name), values or {}) for name, values in entries.items()]


@dataclass
class SeedResult:
    added: list[str]
    kept: list[str]  # already in the store: left exactly as the user has them


def seed_profiles(store: Store, path: str | os.PathLike | None = None) -> SeedResult:
    """Insert the seed's profiles that the store does not have; never overwrite one that exists."""
    result = SeedResult(added=[], kept=[])
    for profile in load_seed(path or SEED_FILE):
        (result.added if store.add_profile(profile) else result.kept).append(profile.name)
    return result


# --- the command line ---------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _gpus(profile: ComputeProfile) -> str:
    if profile.gpu_count == 0:
        return "-"
    memory = f" {profile.gpu_memory_gb:g}GB" if profile.gpu_memory_gb else ""
    return f"{profile.gpu_count}x {profile.gpu_type or 'GPU'}{memory}"


def _profiles_table(profiles: list[ComputeProfile]) -> str:
    headers = ["name", "kind", "pool", "GPUs", "CPU/RAM", "$/h", "speed", "max", "priority", "enabled"]
    rows = [
        [
            p.name,
            p.kind,
            p.work_pool,
            _gpus(p),
            f"{p.cpu_cores}/{p.ram_gb:g}GB",
            f"{p.price_per_hour:.2f}",
            f"{p.speed:g}",
            p.max_concurrent,
            p.priority,
            "yes" if p.enabled else "no",
        ]
        for p in profiles
    ]
    return _table(headers, rows)


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _attempts_table(attempts: list[Attempt]) -> str:
    headers = [
        "id",
        "request",
        "profile",
        "outcome",
        "started",
        "ended",
        "minutes",
        "est $",
        "cost $",
        "GPUs",
        "reason",
    ]
    rows = []
    for a in attempts:
        minutes = f"{(a.ended_at - a.started_at).total_seconds() / 60:.1f}" if a.ended_at and a.started_at else "-"
        rows.append(
            [
                a.id,
                a.request_id,
                a.profile,
                a.outcome,
                _when(a.started_at),
                _when(a.ended_at),
                minutes,
                "-" if a.estimated_cost_usd is None else f"{a.estimated_cost_usd:.2f}",
                "-" if a.actual_cost_usd is None else f"{a.actual_cost_usd:.2f}",
                a.gpus or "-",
                a.reason,
            ]
        )
    return _table(headers, rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.compute.profiles", description="Manage Trainyard compute profiles."
    )
    parser.add_argument("--url", help="platform store URL (default: $TRAINYARD_STORE_URL or SQLite in TRAINYARD_HOME)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --url is also accepted after the command; there it overrides the one before only when given.
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_parser = functools.partial(commands.add_parser, parents=[url])
    add_parser("list", help="all profiles as a table")
    add_parser("show", help="one profile's fields").add_argument("name")

    add = add_parser("add", help="a new profile (fields as options)")
    add.add_argument("name")
    for field, kind in FIELD_TYPES.items():
        option = "--" + field.replace("_", "-")
        if field == "enabled":
            add.add_argument("--disabled", action="store_true", help="add it disabled")
        elif field == "credential_blocks":
            add.add_argument(option, metavar="TYPE/NAME,...", help="comma-separated credential block slugs")
        else:
            add.add_argument(option, required=field in ("kind", "work_pool"), metavar=kind.upper().rstrip("?"))

    set_ = add_parser("set", help="change fields: NAME field=value ...")
    set_.add_argument("name")
    set_.add_argument("assignments", nargs="+", metavar="field=value")
    add_parser("remove", help="delete a profile").add_argument("name")
    seed = add_parser("seed", help="insert the seed file's profiles the store lacks (never overwrites)")
    seed.add_argument("--file", default=str(SEED_FILE), help="seed YAML (default: infra/profiles.yaml)")
    seed.add_argument(
        "--if-empty", action="store_true", help="only when the store has no profile (first setup; keeps deletions)"
    )
    attempts = add_parser("attempts", help="the attempts ledger as a table")
    attempts.add_argument("--request", help="only this request's attempts (the train flow run id)")
    return parser


def _existing(store: Store, name: str) -> ComputeProfile:
    profile = store.profile(name)
    if profile is None:
        known = ", ".join(p.name for p in store.profiles()) or "none; run `python -m infra.compute.profiles seed`"
        raise ProfileError(f"unknown profile {name!r}; known: {known}")
    return profile


def _run(args: argparse.Namespace, store: Store) -> None:
    if args.command == "list":
        profiles = store.profiles()
        print(_profiles_table(profiles) if profiles else "no profiles; run `python -m infra.compute.profiles seed`")
    elif args.command == "show":
        print(
            yaml.safe_dump({"name": args.name} | profile_fields(_existing(store, args.name)), sort_keys=False), end=""
        )
    elif args.command == "add":
        if store.profile(args.name) is not None:
            raise ProfileError(f"profile {args.name!r} already exists; change it with `set {args.name} field=value`")
        values = {
            field: parse_value(args.name, field, getattr(args, field))
            for field in FIELD_TYPES
            if field != "enabled" and getattr(args, field) is not None
        }
        profile = validate_profile(args.name, values | {"enabled": not args.disabled})
        if not store.add_profile(profile):
            raise ProfileError(f"profile {args.name!r} already exists")
        print(f"added {profile.name} ({profile.kind}, pool {profile.work_pool}, deployment {profile.deployment})")
    elif args.command == "set":
        values = profile_fields(_existing(store, args.name))
        for assignment in args.assignments:
            field, sep, text = assignment.partition("=")
            if not sep:
                raise ProfileError(f"expected field=value, got {assignment!r}")
            values[field.strip()] = parse_value(args.name, field.strip(), text)
        profile = store.save_profile(validate_profile(args.name, values))
        print(f"updated {profile.name}: " + ", ".join(a.strip() for a in args.assignments))
    elif args.command == "remove":
        _existing(store, args.name)
        store.remove_profile(args.name)
        print(f"removed {args.name}")
    elif args.command == "seed":
        if args.if_empty and store.profiles():
            print("the store already has profiles; nothing seeded")
            return
        result = seed_profiles(store, args.file)
        print(f"added: {', '.join(result.added) or 'none'}")
        if result.kept:
            print(f"kept as they are (already in the store): {', '.join(result.kept)}")
    elif args.command == "attempts":
        attempts = store.attempts(args.request)
        print(_attempts_table(attempts) if attempts else "no attempts recorded")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return int(exit_.code or 0)
    url = args.url or None
    try:
        store = Store(url)
        _run(args, store)
    except ProfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ArgumentError as error:  # the URL itself: unparsable, or a database SQLAlchemy has no driver for
        print(
            f"error: the platform store URL {_shown(url or store_url())} cannot be used "
            f"({str(error).splitlines()[0]}); give --url or TRAINYARD_STORE_URL as sqlite:///<file> or "
            "postgresql+psycopg://user@host/db",
            file=sys.stderr,
        )
        return 2
    except SQLAlchemyError as error:
        print(
            f"error: the platform store at {_shown(url or store_url())} failed: {str(error).splitlines()[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return repr(url)


if __name__ == "__main__":
    sys.exit(main())
