"""The README starts with the two commands; docs/configuration.md documents every request field."""

from __future__ import annotations

from pydantic import BaseModel

from flows.request import TrainRequest
from infra.settings import ROOT

README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += _fields(field.annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_every_request_field_is_in_the_configuration_reference():
    reference = CONFIGURATION.split("# Configuration reference", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in _fields(TrainRequest) if f"| `{name}` |" not in reference]
    assert not missing, f"document these request fields in docs/configuration.md: {missing}"
