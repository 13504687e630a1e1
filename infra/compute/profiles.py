"""Compute profiles: one pydantic model that validates them (ProfileSpec), their YAML file, the command line.

The platform store is the one source of truth: training, this command line and `python -m infra.stack.apply` read it,
and on a multi-host setup every host shares it (PostgreSQL). infra/profiles.yaml is the definition a new store is
seeded from and the store's reviewable copy in git. Nothing reconciles the two behind your back:

    python -m infra.compute.profiles export [FILE|-]             store -> YAML (default infra/profiles.yaml)
    python -m infra.compute.profiles import [FILE] [--dry-run]   YAML -> store: adds, changes, removes, printing each
    python -m infra.compute.profiles seed [--file FILE] [--if-empty]
        inserts the file's profiles the store lacks (`--if-empty`: only into an empty store, as `make deploy` runs it),
        then prints every profile and field where the file and the store still differ, with those two commands.

    python -m infra.compute.profiles list
    python -m infra.compute.profiles show local
    python -m infra.compute.profiles add gpu-box --kind process --work-pool gpu-box --gpu-count 1 \
        --gpu-memory-gb 24 --speed 8
    python -m infra.compute.profiles set gpu-box price_per_hour=0.5 enabled=true credential_blocks=secret/gpu-box
    python -m infra.compute.profiles remove gpu-box
    python -m infra.compute.profiles attempts [--request ID]

Every profile, from a YAML entry, `add`, `set` or `import`, is validated by ProfileSpec before it reaches the store.
`--url` (before the command) overrides TRAINYARD_STORE_URL. Errors exit with status 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType
from typing import Annotated, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from infra.compute.store import Attempt, ComputeProfile, ProfileKind, Store, store_url
from infra.settings import ROOT

SEED_FILE = ROOT / "infra" / "profiles.yaml"
COMMAND = "python -m infra.compute.profiles"
KINDS: tuple[str, ...] = get_args(ProfileKind)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BLOCK_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*/[^/\s]+$")  # "<block type slug>/<block name>"
DEPLOYMENT_PATTERN = re.compile(r"^[^/\s][^/]*/[^/]*[^/\s]$")  # "<flow name>/<deployment name>"

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
BlockSlug = Annotated[str, Field(pattern=BLOCK_PATTERN.pattern)]


def _rule(text: str) -> dict[str, str]:
    """What a value of the field must be, in the words of an error message ("must be <rule>")."""
    return {"rule": text}


class ProfileSpec(BaseModel):
    """One compute profile, validated: every source (a YAML entry, `add`, `set`, `import`) goes through this model.

    Strict: YAML's "1" is not the integer 1 and "yes" is not true. The command line's text is parsed in lax mode
    (`validate_profile(..., strict=False)`: "3", "2.5", "on"), then held to the same rules. The fields are those of
    the store's ComputeProfile table (a test keeps the two alike); their descriptions document the YAML file."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN.pattern,
        description="letters, digits, '.', '_' or '-' (starting alphanumeric)",
        json_schema_extra=_rule("letters, digits, '.', '_' or '-' (starting alphanumeric)"),
    )
    kind: ProfileKind = Field("process", description="process | docker | kubernetes | ecs (the Prefect work pool type)")
    work_pool: Text = Field(
        description="the Prefect work pool it runs on", json_schema_extra=_rule("a non-empty string")
    )
    deployment: str = Field(
        pattern=DEPLOYMENT_PATTERN.pattern,
        description='"<flow>/<deployment>" of the training step on that pool; default train-step/<profile name>',
        json_schema_extra=_rule("'<flow name>/<deployment name>', e.g. 'train-step/NAME'"),
    )
    gpu_type: Text | None = Field(
        None, description='e.g. "NVIDIA A10" (informational)', json_schema_extra=_rule("a non-empty string or null")
    )
    gpu_count: int = Field(0, ge=0, description="GPUs a run gets")
    gpu_memory_gb: float = Field(0.0, ge=0, allow_inf_nan=False, description="memory per GPU, GB")
    cpu_cores: int = Field(1, ge=1, description="CPU cores a run gets")
    ram_gb: float = Field(1.0, ge=0, allow_inf_nan=False, description="RAM a run gets, GB")
    price_per_hour: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="USD while a run is on it (0 for hardware already paid for)"
    )
    speed: float = Field(1.0, gt=0, allow_inf_nan=False, description="relative throughput; this machine's CPU is 1.0")
    max_concurrent: int = Field(1, ge=1, description="training runs at once on this profile")
    priority: int = Field(100, ge=0, description="lower goes first where the request gives no order")
    credential_blocks: list[BlockSlug] = Field(
        default_factory=list,
        description='Prefect blocks that must exist, as "<block type slug>/<block name>"',
        json_schema_extra=_rule("a list of block slugs like 'aws-credentials/NAME' (<block type slug>/<block name>)"),
    )
    enabled: bool = Field(True, description="false keeps the profile out of every selection")

    @model_validator(mode="before")
    @classmethod
    def _default_deployment(cls, data: object) -> object:
        if isinstance(data, Mapping) and "deployment" not in data and isinstance(data.get("name"), str):
            return {**data, "deployment": default_deployment(data["name"])}
        return data

    def row(self) -> ComputeProfile:
        """The store's row for this profile."""
        return ComputeProfile(**self.model_dump())


FIELDS: tuple[str, ...] = tuple(name for name in ProfileSpec.model_fields if name != "name")  # what a profile sets


class ProfileError(ValueError):
    """A profile entry, field or value that is not valid; the message names the profile, the field, the rule and the
    fix."""


def default_deployment(name: str) -> str:
    return f"train-step/{name}"


_INTEGER = {"int_type", "int_parsing", "int_from_float"}
_NUMBER = {"float_type", "float_parsing"}
_BOOLEAN = {"bool_type", "bool_parsing"}


def _problem(error: Mapping) -> str:
    """One pydantic error as the words after "profile 'NAME': " (the field, the rule, what was given)."""
    field_name, kind, ctx = error["loc"][0], error["type"], error.get("ctx") or {}
    info = ProfileSpec.model_fields[field_name]
    if kind == "missing":
        return f"field {field_name!r} is required ({info.description})"
    value = error.get("input")
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "rule" in extra:
        rule = extra["rule"]
    elif kind == "literal_error":
        rule = f"one of {', '.join(KINDS)}"
    elif kind in _INTEGER:
        rule = "an integer"
    elif kind in _NUMBER:
        rule = "a number"
    elif kind == "finite_number":
        rule = "a finite number"
    elif kind in _BOOLEAN:
        rule = "true or false"
    elif kind == "greater_than_equal":
        rule = f"at least {ctx['ge']:g} ({info.description})"
    elif kind == "greater_than":
        rule = f"greater than {ctx['gt']:g} ({info.description})"
    else:  # a rule without words of its own: pydantic's
        rule = f"valid ({error['msg']})"
    message = f"field {field_name!r} must be {rule}, got {value!r}"
    if isinstance(value, str) and kind in _INTEGER | _NUMBER | _BOOLEAN and _unquoted(value, kind) is not None:
        message += f" (text: write {_unquoted(value, kind)} without quotes)"
    return message


def _unquoted(text: str, kind: str) -> str | None:
    """The YAML a quoted number or boolean meant, when it is one ('1' for "1"); None otherwise."""
    try:
        meant = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return None
    if kind in _BOOLEAN:
        return str(meant).lower() if isinstance(meant, bool) else None
    if isinstance(meant, bool) or not isinstance(meant, int | float):
        return None
    return text if kind in _NUMBER or isinstance(meant, int) else None


def validate_profile(name: str, values: Mapping[str, object], *, strict: bool = True) -> ComputeProfile:
    """The store row of a profile, validated by ProfileSpec; ProfileError naming the profile, fields and rules if bad.

    `values`: typed fields (a YAML entry, a profile's fields after an edit), or with strict=False the command line's
    text ("3", "2.5", "true")."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ProfileError(f"profile name {name!r} must be {ProfileSpec.model_fields['name'].description}; rename it")
    if not isinstance(values, Mapping):
        raise ProfileError(f"profile {name!r}: expected a mapping of fields, got {values!r}")
    unknown = sorted(set(values) - set(FIELDS) - {"name"}, key=str)
    if unknown:
        raise ProfileError(
            f"profile {name!r}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}"
        )
    if "name" in values and values["name"] != name:
        raise ProfileError(f"profile {name!r}: field 'name' is {values['name']!r}; a profile cannot be renamed")
    try:
        spec = ProfileSpec.model_validate({**values, "name": name}, strict=strict)
    except ValidationError as error:
        problems = [_problem(e) for e in error.errors(include_url=False)]
        raise ProfileError(f"profile {name!r}: " + "; ".join(problems)) from None
    return spec.row()


def parse_value(profile: str, field_name: str, text: str) -> object:
    """A command-line string for a field: a list split at commas ('a/x,b/y'), 'none' for an optional field, else the
    text itself, which validate_profile(..., strict=False) reads as the field's type ('true', '3', '2.5')."""
    if field_name not in FIELDS:
        if field_name == "name":
            raise ProfileError(
                f"profile {profile!r}: field 'name' cannot be set; add a new profile and remove this one"
            )
        raise ProfileError(f"profile {profile!r}: unknown field {field_name!r}; known: {', '.join(FIELDS)}")
    annotation, raw = ProfileSpec.model_fields[field_name].annotation, text.strip()
    if get_origin(annotation) is list:
        raw = raw.removeprefix("[").removesuffix("]")
        return [item.strip().strip("'\"") for item in raw.split(",") if item.strip()]
    if NoneType in get_args(annotation) and raw.lower() in {"", "none", "null"}:
        return None
    return raw


def profile_fields(profile: ComputeProfile) -> dict[str, object]:
    return {name: getattr(profile, name) for name in FIELDS}


# --- the YAML file ------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one and loses the other)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so
                break
            if first is not None and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (also at line {first + 1}); keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _shown_path(path: str | os.PathLike) -> str:
    """The path as a command in this checkout takes it: relative to the current directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_seed(path: str | os.PathLike) -> list[ComputeProfile]:
    """Every profile of a YAML file, validated (all of them, before any is used)."""
    path = Path(path)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
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
    other = sorted(set(document) - {"profiles"}, key=str)
    if other:
        raise ProfileError(
            f"the profile seed {path}: unknown top-level key(s) {', '.join(map(repr, other))}; "
            "only 'profiles:' (a mapping of name -> fields) is read; remove them"
        )
    profiles = []
    for name, values in entries.items():
        if not isinstance(name, str):
            raise ProfileError(f"profile name {name!r} in {path} is not text; quote it: '{name}':")
        try:
            profiles.append(validate_profile(name, {} if values is None else values))
        except ProfileError as error:
            raise ProfileError(f"{error} (in {_shown_path(path)}; fix it there)") from None
    return profiles


@dataclass
class SeedResult:
    added: list[str]
    kept: list[str]  # already in the store: left exactly as the user has them


def seed_profiles(store: Store, path: str | os.PathLike | None = None) -> SeedResult:
    """Insert the file's profiles that the store does not have (default infra/profiles.yaml); never overwrite one
    that exists. `compare` says how the kept ones differ."""
    result = SeedResult(added=[], kept=[])
    for profile in load_seed(path or SEED_FILE):
        (result.added if store.add_profile(profile) else result.kept).append(profile.name)
    return result


@dataclass
class Comparison:
    """A YAML file's profiles against the store's, by name; `changed` holds (file's, store's, the fields that
    differ)."""

    only_in_file: list[ComputeProfile] = field(default_factory=list)
    only_in_store: list[ComputeProfile] = field(default_factory=list)
    changed: list[tuple[ComputeProfile, ComputeProfile, list[str]]] = field(default_factory=list)
    same: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:  # true when they differ
        return bool(self.only_in_file or self.only_in_store or self.changed)


def compare(defined: Sequence[ComputeProfile], stored: Sequence[ComputeProfile]) -> Comparison:
    result, in_store = Comparison(), {p.name: p for p in stored}
    for profile in defined:
        current = in_store.pop(profile.name, None)
        if current is None:
            result.only_in_file.append(profile)
            continue
        mine, theirs = profile_fields(profile), profile_fields(current)
        fields = [name for name in FIELDS if mine[name] != theirs[name]]
        if fields:
            result.changed.append((profile, current, fields))
        else:
            result.same.append(profile.name)
    result.only_in_store = list(in_store.values())
    return result


def _value(value: object) -> str:
    """A field's value as YAML writes it: true, null, 16, 3.2, [a/x, b/y], text."""
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _plain(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def drift_report(path: str | os.PathLike, comparison: Comparison, url: str | None = None) -> str:
    """Every profile and field where a YAML file and the store differ, and the two commands that reconcile them."""
    shown = _shown_path(path)
    lines = [f"{shown} and the platform store differ (training uses the store):"]
    lines += [f"  {p.name}: only in the store" for p in comparison.only_in_store]
    lines += [f"  {p.name}: only in {shown}" for p in comparison.only_in_file]
    for defined, stored, fields in comparison.changed:
        changes = "; ".join(
            f"{name}: store {_value(getattr(stored, name))}, file {_value(getattr(defined, name))}" for name in fields
        )
        lines.append(f"  {defined.name}: {changes}")
    url_option = " --url URL" if url else ""
    lines += [
        "Reconcile them with one of:",
        f"  {COMMAND}{url_option} export {shown}   # keep the store's: write it to the file, then commit the file",
        f"  {COMMAND}{url_option} import {shown}   # keep the file's: make the store match it (adds, changes, removes)",
    ]
    return "\n".join(lines)


HEADER = f"""\
# Compute profiles. The platform store (TRAINYARD_STORE_URL) is the source of truth: training, the command line and
# `python -m infra.stack.apply` read it. This file is the definition a new store is seeded from, and the store's copy
# for review in git. Keep the two alike:
#   {COMMAND} export   after `add`, `set`, `remove`: store -> this file (commit the diff)
#   {COMMAND} import   after editing this file: file -> store (prints each change it makes)
# `make deploy` (`seed --if-empty`) prints every profile and field where this file and the store differ.
# `export` writes this file: a comment on a profile's name line is kept, other comments are not.
# The GPU and cloud examples are disabled until their pool has a worker and their credential blocks exist.
#
# Fields (all but work_pool optional; validated by infra.compute.profiles.ProfileSpec):
"""
HEADER += "".join(f"#   {name:<18} {ProfileSpec.model_fields[name].description}\n" for name in FIELDS)

_ENTRY = re.compile(r"^  (?:'(?P<single>[^']*)'|\"(?P<double>[^\"]*)\"|(?P<plain>[^\s#'\"][^:#]*?)):\s*(?P<note>#.*)?$")


def _entries(path: Path) -> dict[str, str]:
    """The profile names of a file written by `export`, in its order, each with the comment on its name line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    notes = {}
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if match:
            name = match["single"] if match["single"] is not None else match["double"] or match["plain"]
            notes[name] = match["note"] or ""
    return notes


def render(profiles: Sequence[ComputeProfile], notes: Mapping[str, str] | None = None) -> str:
    """The YAML file of these profiles: the header, then each profile's fields, those with no value (null, [])
    left out. `notes`: a comment for a profile's name line."""
    notes = notes or {}
    if not profiles:
        return HEADER + "\nprofiles: {}\n"
    parts = [HEADER, "\nprofiles:\n"]
    for i, profile in enumerate(profiles):
        note = notes.get(profile.name)
        parts.append(("\n" if i else "") + f"  {_value(profile.name)}:{'  ' + note if note else ''}\n")
        for name, value in profile_fields(profile).items():
            if value is not None and value != []:
                parts.append(f"    {name}: {_value(value)}\n")
    return "".join(parts)


def export_profiles(store: Store, path: str | os.PathLike | None = None) -> str:
    """The store's profiles as YAML, written to `path` (default infra/profiles.yaml; "-": only returned, as it would
    be written to infra/profiles.yaml). Profiles keep the file's order and name-line comments; new ones follow in the
    store's order."""
    target = Path(path or SEED_FILE)
    notes = _entries(SEED_FILE if str(path) == "-" else target)
    stored = {p.name: p for p in store.profiles()}
    ordered = [stored.pop(name) for name in notes if name in stored] + list(stored.values())
    text = render(ordered, notes)
    if str(path) != "-":
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, encoding="utf-8", suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, target)
    return text


def import_profiles(store: Store, path: str | os.PathLike | None = None, dry_run: bool = False) -> Comparison:
    """Make the store hold exactly the file's profiles (all validated first; applied in one transaction); what
    differed. With dry_run, nothing is applied."""
    comparison = compare(load_seed(path or SEED_FILE), store.profiles())
    if comparison and not dry_run:
        store.apply_profile_changes(
            save=[*comparison.only_in_file, *(defined for defined, _, _ in comparison.changed)],
            remove=[p.name for p in comparison.only_in_store],
        )
    return comparison


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
    for name in FIELDS:
        option = "--" + name.replace("_", "-")
        if name == "enabled":
            add.add_argument("--disabled", action="store_true", help="add it disabled")
        elif name == "credential_blocks":
            add.add_argument(option, metavar="TYPE/NAME,...", help="comma-separated credential block slugs")
        elif name == "kind":
            add.add_argument(option, required=True, metavar="KIND", help=" | ".join(KINDS))
        else:
            add.add_argument(option, required=name in ("kind", "work_pool"), metavar=_metavar(name))

    set_ = add_parser("set", help="change fields: NAME field=value ...")
    set_.add_argument("name")
    set_.add_argument("assignments", nargs="+", metavar="field=value")
    add_parser("remove", help="delete a profile").add_argument("name")
    seed = add_parser(
        "seed", help="insert the file's profiles the store lacks (never overwrites); print where the two differ"
    )
    seed.add_argument("--file", default=str(SEED_FILE), help="profiles YAML (default: infra/profiles.yaml)")
    seed.add_argument(
        "--if-empty", action="store_true", help="only when the store has no profile (first setup; keeps deletions)"
    )
    export = add_parser("export", help="write the store's profiles to a YAML file (store -> file)")
    export.add_argument("file", nargs="?", default=str(SEED_FILE), help="default: infra/profiles.yaml; - for stdout")
    import_ = add_parser("import", help="make the store hold exactly a YAML file's profiles (file -> store)")
    import_.add_argument("file", nargs="?", default=str(SEED_FILE), help="default: infra/profiles.yaml")
    import_.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    attempts = add_parser("attempts", help="the attempts ledger as a table")
    attempts.add_argument("--request", help="only this request's attempts (the train flow run id)")
    return parser


def _metavar(name: str) -> str:
    annotation = ProfileSpec.model_fields[name].annotation
    return {int: "INT", float: "NUMBER"}.get(annotation, "TEXT")


def _import_report(path: str, comparison: Comparison, dry_run: bool) -> str:
    shown = _shown_path(path)
    if not comparison:
        return f"the store already holds exactly the profiles of {shown}; nothing to change"
    add, change, remove = ("would add", "would change", "would remove") if dry_run else ("added", "changed", "removed")
    lines = [f"{add} {p.name}" for p in comparison.only_in_file]
    for defined, stored, fields in comparison.changed:
        changes = ", ".join(
            f"{name} {_value(getattr(stored, name))} -> {_value(getattr(defined, name))}" for name in fields
        )
        lines.append(f"{change} {defined.name}: {changes}")
    lines += [f"{remove} {p.name}" for p in comparison.only_in_store]
    if comparison.same:
        lines.append(f"unchanged: {', '.join(comparison.same)}")
    if dry_run:
        lines.append(f"dry run: nothing changed; `{COMMAND} import {shown}` applies it")
    return "\n".join(lines)


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
            name: parse_value(args.name, name, getattr(args, name))
            for name in FIELDS
            if name != "enabled" and getattr(args, name) is not None
        }
        profile = validate_profile(args.name, values | {"enabled": not args.disabled}, strict=False)
        if not store.add_profile(profile):
            raise ProfileError(f"profile {args.name!r} already exists")
        print(f"added {profile.name} ({profile.kind}, pool {profile.work_pool}, deployment {profile.deployment})")
    elif args.command == "set":
        values = profile_fields(_existing(store, args.name))
        for assignment in args.assignments:
            key, sep, text = assignment.partition("=")
            if not sep:
                raise ProfileError(f"expected field=value, got {assignment!r}")
            values[key.strip()] = parse_value(args.name, key.strip(), text)
        profile = store.save_profile(validate_profile(args.name, values, strict=False))
        print(f"updated {profile.name}: " + ", ".join(a.strip() for a in args.assignments))
    elif args.command == "remove":
        _existing(store, args.name)
        store.remove_profile(args.name)
        print(f"removed {args.name}")
    elif args.command == "seed":
        if args.if_empty and store.profiles():
            print("the store already has profiles; nothing seeded")
        else:
            result = seed_profiles(store, args.file)
            print(f"added: {', '.join(result.added) or 'none'}")
            if result.kept:
                print(f"kept as they are (already in the store): {', '.join(result.kept)}")
        comparison = compare(load_seed(args.file), store.profiles())
        if comparison:
            print(drift_report(args.file, comparison, args.url))
    elif args.command == "export":
        text = export_profiles(store, args.file)
        if args.file == "-":
            print(text, end="")
        else:
            print(f"wrote {len(store.profiles())} profile(s) to {_shown_path(args.file)}; review and commit it")
    elif args.command == "import":
        comparison = import_profiles(store, args.file, dry_run=args.dry_run)
        print(_import_report(args.file, comparison, args.dry_run))
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
