"""`python -m infra.compute.profiles`, run in-process: each command, and each error as exit 2 with one clear line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.compute.profiles import FIELD_TYPES, main
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
    assert set(FIELD_TYPES) == set(ComputeProfile.model_fields) - {"name"}


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
