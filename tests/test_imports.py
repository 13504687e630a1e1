"""Cheap wiring checks, no server: every module of the platform imports; every deployment in prefect.yaml names a
flow that exists and takes its parameters; every trainer in trainers/registry.py names a Trainer class."""

from __future__ import annotations

import importlib
import inspect
import subprocess

import pytest
import yaml
from prefect import Flow, Task
from prefect.utilities.importtools import import_object

from infra.settings import ROOT
from trainers.registry import TRAINERS

PACKAGES = ("flows", "tasks", "trainers", "infra", "deployments")
FILES = subprocess.run(
    ["git", "ls-files", *(f"{package}/*.py" for package in PACKAGES)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
).stdout.split()
# `python -m infra.stack` runs its command line on import: __main__ modules are programs, not modules to import.
MODULES = sorted(
    path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    for path in FILES
    if not path.endswith("__main__.py")
)
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_the_modules_are_found():
    assert set(PACKAGES) <= set(MODULES) and "flows.train" in MODULES and "trainers.registry" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_flow_and_task_resolves():
    """Each Flow or Task defined in a module is a Prefect object with a callable body; each flow has a parameter
    schema (what a deployment and the UI's form are built from)."""
    flows, tasks = {}, {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, Flow | Task) and getattr(value.fn, "__module__", None) == name:
                (flows if isinstance(value, Flow) else tasks)[f"{name}:{attribute}"] = value
    named = {"flows.train:train", "flows.train_step:train_step", "flows.monitor:monitor", "flows.cleanup:cleanup"}
    assert named <= set(flows), sorted(flows)
    assert tasks, "no Prefect task found in flows/ or tasks/"
    for where, flow in flows.items():
        assert callable(flow.fn), where
        assert flow.parameters.type == "object", where
    for where, task in tasks.items():
        assert callable(task.fn) and task.name, where


def _flow_parameters(flow: Flow) -> tuple[set[str], bool]:
    """The flow's parameter names as Prefect sees them (the train flow's come from its request model, through
    flows.request.request_parameters), and whether it takes any keyword besides (**kwargs)."""
    signature = inspect.signature(flow.fn)
    names = {p.name for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return names, open_ended


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_names_a_flow_that_takes_its_parameters(deployment):
    path, _, function = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and function, deployment["entrypoint"]
    flow = import_object(deployment["entrypoint"])
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is a {type(flow).__name__}, not a Prefect flow"
    names, open_ended = _flow_parameters(flow)
    assert names == set(flow.parameters.properties), "the signature Prefect builds its schema from"
    given = set(deployment.get("parameters") or {})
    unknown = given - names
    assert open_ended or not unknown, f"{deployment['name']}: {sorted(unknown)} are not parameters of {flow.name}"
    required = set(flow.parameters.required or [])
    assert required <= given, f"{deployment['name']}: {sorted(required - given)} required by {flow.name}, not given"


def test_the_train_flow_takes_each_field_of_the_request_by_name():
    from flows.request import TrainRequest
    from flows.train import train

    names, open_ended = _flow_parameters(train)
    assert names == set(TrainRequest.model_fields) and not open_ended


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_target_is_a_trainer_class(name):
    from trainers.base import Trainer

    spec = TRAINERS[name]
    assert spec.name == name and spec.target.count(":") == 1, spec.target
    cls = spec.load()
    assert inspect.isclass(cls) and issubclass(cls, Trainer) and cls is not Trainer, spec.target
    assert not inspect.isabstract(cls), f"{spec.target} leaves abstract methods: {sorted(cls.__abstractmethods__)}"
