"""`python -m infra.compute.profiles`, run in-process: each command, and each error as exit 2 with one clear line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.compute.profiles import FIELDS, SEED_FILE, ProfileSpec, main
from infra.compute.store import Attempt, ComputeProfile, Store


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'trainyard.db'}"


@pytest.fixture
def cli(url: str, capsys: pytest.CaptureFixture[str]):
    """Run the command line against the test store: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--url", url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_every_profile_field_has_a_type():
    assert set(FIELDS) == set(ComputeProfile.model_fields) - {"name"}
    assert set(ProfileSpec.model_fields) == set(ComputeProfile.model_fields)  # one model validates every field
    for name in FIELDS:  # and a row made without it defaults as it does
        spec, row = ProfileSpec.model_fields[name], ComputeProfile.model_fields[name]
        if not spec.is_required():
            assert spec.get_default(call_default_factory=True) == row.get_default(call_default_factory=True), name


def test_seed_then_list_and_show(cli):
    code, out, _ = cli("seed")
    assert code == 0 and "added: local, gpu-host-0, docker-gpu, k8s-a100, ecs-g5" in out
    code, out, _ = cli("list")
    header, _, *rows = out.splitlines()
    assert code == 0 and header.split() == ["name", "kind", "pool", "GPUs", "CPU/RAM", "$/h", "speed", "max"] + [
        "priority",
        "enabled",
    ]
    assert rows[0].split() == ["local", "process", "trainyard-local", "-", "2/16GB", "0.00", "1", "2", "10", "yes"]
    assert any("k8s-a100" in row and "1x NVIDIA A100 80GB" in row and "3.20" in row for row in rows)
    code, out, _ = cli("show", "ecs-g5")
    assert code == 0 and "work_pool: trainyard-ecs" in out and "- aws-credentials/trainyard" in out
    code, out, _ = cli("seed")
    assert "added: none" in out and "kept as they are" in out


def test_add_set_remove(cli, url):
    code, out, _ = cli(
        "add", "box", "--kind", "docker", "--work-pool", "box-pool", "--gpu-count", "2", "--gpu-memory-gb", "48"
    )
    assert code == 0 and "train-step/box" in out
    code, _, _ = cli("set", "box", "price_per_hour=0.75", "enabled=false", "credential_blocks=secret/a,secret/b")
    assert code == 0
    box = Store(url).profile("box")
    assert (box.kind, box.gpu_count, box.gpu_memory_gb, box.deployment) == ("docker", 2, 48.0, "train-step/box")
    assert (box.price_per_hour, box.enabled, box.credential_blocks) == (0.75, False, ["secret/a", "secret/b"])
    code, _, _ = cli("set", "box", "gpu_type=none", "credential_blocks=")
    assert code == 0 and Store(url).profile("box").credential_blocks == []
    code, out, _ = cli("remove", "box")
    assert code == 0 and Store(url).profile("box") is None


def test_attempts_table(cli, url):
    start = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
    store = Store(url)
    store.record_attempt(
        Attempt(
            request_id="req-1",
            profile="local",
            outcome="completed",
            started_at=start,
            ended_at=start + timedelta(minutes=3),
        )
    )
    store.record_attempt(Attempt(request_id="req-2", profile="ecs-g5", outcome="no-worker", reason="no worker"))
    code, out, _ = cli("attempts")
    assert code == 0 and "req-1" in out and "req-2" in out and "2026-02-01 08:00:00" in out and "3.0" in out
    code, out, _ = cli("attempts", "--request", "req-2")
    assert "req-2" in out and "req-1" not in out and "no-worker" in out


def test_seed_if_empty_keeps_a_deleted_profile_deleted(tmp_path, capsys):
    from infra.compute.profiles import main

    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["--url", url, "seed", "--if-empty"]) == 0
    assert main(["--url", url, "remove", "local"]) == 0
    assert main(["--url", url, "seed", "--if-empty"]) == 0
    assert "nothing seeded" in capsys.readouterr().out
    assert main(["--url", url, "show", "local"]) == 2


# --- one source of truth: the store; the YAML file is its reviewable copy (export) and its definition (import) ---


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    """A copy of infra/profiles.yaml to edit."""
    copy = tmp_path / "profiles.yaml"
    copy.write_text(SEED_FILE.read_text())
    return copy


def test_the_shipped_file_is_what_export_writes_from_a_store_seeded_with_it(cli, yaml_file):
    assert cli("seed", "--file", str(yaml_file))[0] == 0
    code, out, _ = cli("export", str(yaml_file))
    assert code == 0 and "wrote 5 profile(s)" in out
    assert yaml_file.read_text() == SEED_FILE.read_text()  # comments on the name lines kept; nothing else moved


def test_export_writes_the_command_line_edits_and_import_brings_them_to_another_store(cli, url, yaml_file, tmp_path):
    cli("seed", "--file", str(yaml_file))
    cli("add", "box", "--kind", "docker", "--work-pool", "box-pool", "--gpu-count", "2", "--speed", "4")
    cli("set", "local", "max_concurrent=3", "credential_blocks=secret/a")
    cli("remove", "ecs-g5")
    code, _, _ = cli("export", str(yaml_file))
    text = yaml_file.read_text()
    assert code == 0 and "  box:\n    kind: docker\n    work_pool: box-pool\n" in text and "ecs-g5" not in text
    assert "    max_concurrent: 3\n" in text and "credential_blocks: [secret/a]" in text
    code, out, _ = cli("export", "-")
    assert code == 0 and out == text

    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["--url", other, "import", str(yaml_file)]) == 0
    assert [p.model_dump() for p in Store(other).profiles()] == [p.model_dump() for p in Store(url).profiles()]


def test_import_prints_each_added_changed_and_removed_profile_and_applies_them(cli, url, yaml_file):
    cli("seed", "--file", str(yaml_file))
    text = yaml_file.read_text().replace("    max_concurrent: 2\n", "    max_concurrent: 3\n", 1)
    text = text.split("\n  ecs-g5:")[0] + "\n  box:\n    work_pool: box-pool\n    speed: 2.5\n"
    yaml_file.write_text(text)

    code, out, _ = cli("import", str(yaml_file), "--dry-run")
    assert code == 0 and "would add box" in out and "would change local: max_concurrent 2 -> 3" in out
    assert "would remove ecs-g5" in out and "nothing changed" in out
    assert Store(url).profile("box") is None and Store(url).profile("local").max_concurrent == 2

    code, out, _ = cli("import", str(yaml_file))
    lines = out.splitlines()
    assert code == 0 and "added box" in lines and "changed local: max_concurrent 2 -> 3" in lines
    assert "removed ecs-g5" in lines and "unchanged: gpu-host-0, docker-gpu, k8s-a100" in lines
    store = Store(url)
    assert store.profile("box").speed == 2.5 and store.profile("box").deployment == "train-step/box"
    assert store.profile("local").max_concurrent == 3 and store.profile("ecs-g5") is None
    code, out, _ = cli("import", str(yaml_file))
    assert code == 0 and "nothing to change" in out


def test_seed_if_empty_prints_every_difference_and_the_two_commands_that_reconcile_them(cli, yaml_file):
    code, out, _ = cli("seed", "--if-empty", "--file", str(yaml_file))
    assert code == 0 and "added: local" in out and "differ" not in out
    code, out, _ = cli("seed", "--if-empty", "--file", str(yaml_file))
    assert code == 0 and "nothing seeded" in out and "differ" not in out  # in sync: nothing more to say

    cli("set", "local", "max_concurrent=5", "enabled=false")
    cli("add", "box", "--kind", "process", "--work-pool", "box-pool")
    cli("remove", "ecs-g5")
    yaml_file.write_text(yaml_file.read_text().replace("    speed: 20\n", "    speed: 25\n"))  # k8s-a100, edited
    code, out, _ = cli("seed", "--if-empty", "--file", str(yaml_file))
    assert code == 0 and "nothing seeded" in out and "and the platform store differ" in out
    assert "  local: max_concurrent: store 5, file 2; enabled: store false, file true" in out
    assert "  k8s-a100: speed: store 20, file 25" in out
    assert "  box: only in the store" in out and "  ecs-g5: only in " in out
    assert f"--url URL export {yaml_file}" in out and f"--url URL import {yaml_file}" in out

    code, out, _ = cli("seed", "--file", str(yaml_file))  # seed puts back ecs-g5 and overwrites nothing
    assert code == 0 and "added: ecs-g5" in out and "local: max_concurrent: store 5, file 2" in out
    assert "ecs-g5: only in" not in out

    assert cli("export", str(yaml_file))[0] == 0  # reconciled one way: nothing differs any more
    code, out, _ = cli("seed", "--if-empty", "--file", str(yaml_file))
    assert code == 0 and "differ" not in out


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('    gpu_count: "1"\n', "field 'gpu_count' must be an integer, got '1' (text: write 1 without quotes)"),
        (
            "    enabled: 'true'\n",
            "field 'enabled' must be true or false, got 'true' (text: write true without quotes)",
        ),
        ("    price_per_hour: .nan\n", "field 'price_per_hour' must be a finite number"),
        ("    kind: slurm\n", "field 'kind' must be one of process, docker, kubernetes, ecs, got 'slurm'"),
        ("    work_pool: other\n", "'work_pool' is given twice (also at line 3); keep one"),
    ],
    ids=["quoted-integer", "quoted-boolean", "nan", "unknown-kind", "field-given-twice"],
)
def test_import_of_a_bad_file_changes_nothing_and_names_profile_field_rule_and_fix(cli, url, tmp_path, entry, message):
    cli("seed")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  box:\n    work_pool: box-pool\n" + entry)
    code, out, err = cli("import", str(bad))
    assert code == 2 and message in err and "fix it there" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in Store(url).profiles()] == ["local", "gpu-host-0", "docker-gpu", "ecs-g5", "k8s-a100"]


def test_the_command_line_reads_text_as_the_fields_type_and_yaml_must_give_the_type_itself(cli, url, tmp_path):
    cli("seed")
    assert cli("set", "local", "gpu_count=1", "enabled=off", "speed=2")[0] == 0
    local = Store(url).profile("local")
    assert (local.gpu_count, local.enabled, local.speed) == (1, False, 2.0)
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text('profiles:\n  local:\n    work_pool: trainyard-local\n    gpu_count: "1"\n')
    code, _, err = cli("import", str(quoted))
    assert code == 2 and "profile 'local': field 'gpu_count' must be an integer, got '1'" in err
